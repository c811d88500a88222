//! Reading the audit query store (§10: table `audit_records`, written by the
//! audit sink): filtered, paginated queries, recent alerts, and decision
//! statistics over a window. Read-only; the sink is its only writer.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, Row, SqlitePool};

/// The §6 fields and the rest of the table, in the order they are shown.
const COLUMNS: &[&str] = &[
    "seq",
    "kind",
    "timestamp",
    "request_id",
    "agent_id",
    "team_id",
    "project_id",
    "environment",
    "destination_host",
    "destination_port",
    "http_method",
    "path",
    "decision",
    "reason",
    "policy_id",
    "bundle_revision",
    "quota_applied",
    "response_code",
    "latency_ms",
    "bytes_out",
    "bytes_in",
    "source_address",
    "shadow_decision",
    "shadow_policy_id",
    "actor",
    "detail",
];

/// The audit log on this node: its directory (segments, checkpoints) and
/// the public key its checkpoints are signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLog {
    pub dir: PathBuf,
    pub public_key: PathBuf,
}

impl AuditLog {
    /// Where record `seq` stands: an inclusion proof against the latest
    /// signed checkpoint that covers it (checked here), or that none does
    /// yet. Reads the log; run it off the async threads.
    pub fn proof(&self, seq: u64) -> Result<Value, AuditError> {
        use clawgress_audit_log::layout;
        let text = std::fs::read_to_string(&self.public_key).map_err(|e| {
            AuditError::BadQuery(format!(
                "audit public key {}: {e}",
                self.public_key.display()
            ))
        })?;
        let mut raw = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut raw)
            .map_err(|_| AuditError::BadQuery("the audit public key is not hex".into()))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| AuditError::BadQuery("the audit public key is not Ed25519".into()))?;
        let log = layout::read_log(&self.dir).map_err(|e| AuditError::BadQuery(e.to_string()))?;
        let notes = layout::read_checkpoints(&self.dir.join(layout::CHECKPOINTS))
            .map_err(|e| AuditError::BadQuery(e.to_string()))?;
        match clawgress_audit_log::verify::inclusion(
            &log.text,
            &notes,
            layout::KEY_NAME,
            &key,
            |r| r.seq == seq,
        ) {
            Err(e) => Err(AuditError::NotFound(format!("seq {seq}: {e}"))),
            Ok(None) => Ok(
                json!({"seq": seq, "status": "pending", "detail": "chained, not yet under a signed checkpoint (one is written at least every 5 s while records arrive)"}),
            ),
            Ok(Some(inc)) => Ok(json!({
                "seq": seq,
                "status": if inc.verified { "proven" } else { "mismatch" },
                "detail": if inc.verified {
                    format!("in the log of {} records signed at checkpoint root {}; inclusion proof of {} hashes verified", inc.tree_size, inc.root_hash, inc.proof.len())
                } else {
                    format!("the log does not match checkpoint {}: run `clawgress audit verify`", inc.tree_size)
                },
                "inclusion": inc,
            })),
        }
    }
}

/// Where the sink writes the query store (`stores.audit_query`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditStore {
    Sqlite(PathBuf),
    Postgres(String),
}

enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One value bound to a statement.
enum Arg {
    Text(String),
    Int(i64),
}

/// A statement built for one dialect: `?` for SQLite, `$n` for PostgreSQL
/// (where times are cast to `timestamptz`).
struct Sql {
    pg: bool,
    text: String,
    args: Vec<Arg>,
}

/// Run `sql` on whichever database `db` is and map every row with `f`
/// (rows of SQLite and PostgreSQL are different types; the body is one).
macro_rules! fetch_rows {
    ($sql:expr, $db:expr, |$r:ident| $body:expr) => {{
        macro_rules! run {
            ($pool:expr) => {{
                let mut q = sqlx::query(&$sql.text);
                for a in &$sql.args {
                    q = match a {
                        Arg::Text(t) => q.bind(t.clone()),
                        Arg::Int(i) => q.bind(*i),
                    };
                }
                q.fetch_all($pool)
                    .await?
                    .iter()
                    .map(|$r| $body)
                    .collect::<Vec<Value>>()
            }};
        }
        match $db {
            Db::Sqlite(p) => run!(p),
            Db::Postgres(p) => run!(p),
        }
    }};
}

impl Sql {
    fn new(pg: bool, text: impl Into<String>) -> Sql {
        Sql {
            pg,
            text: text.into(),
            args: Vec::new(),
        }
    }

    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    fn bind(&mut self, a: Arg) -> &mut Self {
        self.args.push(a);
        if self.pg {
            self.text.push_str(&format!("${}", self.args.len()));
        } else {
            self.text.push('?');
        }
        self
    }

    /// A time (RFC 3339 text): compared as text in SQLite, where the store
    /// keeps one form, and as `timestamptz` in PostgreSQL.
    fn bind_time(&mut self, t: String) -> &mut Self {
        self.bind(Arg::Text(t));
        if self.pg {
            self.text.push_str("::timestamptz");
        }
        self
    }

    /// The one text column `j` (or the named text columns and count `n`)
    /// of every row.
    async fn rows(&self, db: &Db, cols: &[&str]) -> Result<Vec<Value>, sqlx::Error> {
        Ok(fetch_rows!(self, db, |r| {
            if cols.is_empty() {
                serde_json::from_str(r.get::<&str, _>("j")).unwrap_or(Value::Null)
            } else {
                let mut m = serde_json::Map::new();
                for c in cols {
                    m.insert((*c).into(), Value::String(r.get::<String, _>(*c)));
                }
                m.insert("count".into(), json!(r.get::<i64, _>("n")));
                Value::Object(m)
            }
        })
        .into_iter()
        .filter(|v| !v.is_null())
        .collect())
    }
}

/// Every column as one JSON object (text), in the store's dialect; times
/// as RFC 3339 UTC with milliseconds in both.
fn json_object(pg: bool) -> String {
    let pairs: Vec<String> = COLUMNS
        .iter()
        .map(|c| match (*c, pg) {
            ("timestamp", true) => "'timestamp', to_char(\"timestamp\" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')".to_string(),
            ("timestamp", false) => "'timestamp', \"timestamp\"".to_string(),
            (c, _) => format!("'{c}', {c}"),
        })
        .collect();
    if pg {
        format!("json_build_object({})::text", pairs.join(", "))
    } else {
        format!("json_object({})", pairs.join(", "))
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// `request` (default), `alert`, `admin`, or `all`.
    pub kind: Option<String>,
    pub agent: Option<String>,
    pub team: Option<String>,
    pub decision: Option<String>,
    pub host: Option<String>,
    pub policy: Option<String>,
    pub request_id: Option<String>,
    /// RFC 3339; records at or after.
    pub since: Option<String>,
    /// RFC 3339; records before.
    pub until: Option<String>,
    /// Page backwards: records with `seq` below this (the previous answer's
    /// `next_before_seq`).
    pub before_seq: Option<i64>,
    /// Only records with `seq` above this (what a live view has not seen).
    pub after_seq: Option<i64>,
    /// Default 100, at most 1000.
    pub limit: Option<i64>,
}

pub struct AuditReader {
    store: Option<AuditStore>,
    db: tokio::sync::OnceCell<Db>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no audit query store is configured")]
    NotConfigured,
    #[error("the audit query store is not there yet (no record written so far)")]
    NotYet,
    #[error("{0}")]
    BadQuery(String),
    #[error("{0}")]
    NotFound(String),
    #[error("audit query store: {0}")]
    Db(#[from] sqlx::Error),
}

impl AuditReader {
    pub fn new(store: Option<AuditStore>) -> AuditReader {
        AuditReader {
            store,
            db: tokio::sync::OnceCell::new(),
        }
    }

    async fn db(&self) -> Result<(&Db, bool), AuditError> {
        let store = self.store.as_ref().ok_or(AuditError::NotConfigured)?;
        let db = self.db.get_or_try_init(|| open(store)).await?;
        Ok((db, matches!(db, Db::Postgres(_))))
    }

    /// Records newest first, filtered; with the cursor for the next page.
    pub async fn query(&self, q: &AuditQuery) -> Result<Value, AuditError> {
        let (db, pg) = self.db().await?;
        let mut sql = Sql::new(
            pg,
            format!(
                "SELECT {} AS j FROM audit_records WHERE 1=1",
                json_object(pg)
            ),
        );
        match q.kind.as_deref().unwrap_or("request") {
            "all" => {}
            k @ ("request" | "alert" | "admin" | "gap") => {
                sql.push(" AND kind = ").bind(Arg::Text(k.to_string()));
                if k != "request" {
                    // The term SQLite's partial index on the other kinds
                    // is declared with: it is used only when the query
                    // says so itself.
                    sql.push(" AND kind <> 'request'");
                }
            }
            other => {
                return Err(AuditError::BadQuery(format!(
                    "kind {other:?}: one of request, alert, admin, gap, all"
                )))
            }
        }
        for (col, v) in [
            ("agent_id", &q.agent),
            ("team_id", &q.team),
            ("decision", &q.decision),
            ("destination_host", &q.host),
            ("policy_id", &q.policy),
            ("request_id", &q.request_id),
        ] {
            if let Some(v) = v {
                sql.push(&format!(" AND {col} = "))
                    .bind(Arg::Text(v.clone()));
            }
        }
        if let Some(t) = &q.since {
            sql.push(" AND \"timestamp\" >= ")
                .bind_time(normal_time(t)?);
        }
        if let Some(t) = &q.until {
            sql.push(" AND \"timestamp\" < ").bind_time(normal_time(t)?);
        }
        if let Some(a) = q.after_seq {
            sql.push(" AND seq > ").bind(Arg::Int(a));
        }
        if let Some(b) = q.before_seq {
            sql.push(" AND seq < ").bind(Arg::Int(b));
        }
        let limit = q.limit.unwrap_or(100).clamp(1, 1000);
        sql.push(" ORDER BY seq DESC LIMIT ").bind(Arg::Int(limit));
        let records = sql.rows(db, &[]).await?;
        let next = if records.len() as i64 == limit {
            records.last().and_then(|r| r["seq"].as_i64())
        } else {
            None
        };
        Ok(json!({"records": records, "next_before_seq": next}))
    }

    /// Decisions over the last `window_s` seconds: by decision and reason,
    /// the busiest agents and the policies that decided most.
    pub async fn stats(&self, window_s: u64) -> Result<Value, AuditError> {
        let (db, pg) = self.db().await?;
        let since = humantime::format_rfc3339_millis(
            std::time::SystemTime::now() - std::time::Duration::from_secs(window_s),
        )
        .to_string();
        let fetch = |cols: &'static [&'static str], limit: i64| {
            let list = cols.join(", ");
            let mut sql = Sql::new(
                pg,
                format!("SELECT {list}, COUNT(*) AS n FROM audit_records WHERE kind = 'request' AND \"timestamp\" >= "),
            );
            sql.bind_time(since.clone());
            sql.push(&format!(" GROUP BY {list} ORDER BY n DESC LIMIT {limit}"));
            async move { sql.rows(db, cols).await }
        };
        let by_decision = fetch(&["decision", "reason"], 100).await?;
        let by_agent = fetch(&["agent_id", "decision"], 20).await?;
        let by_policy = fetch(&["policy_id", "decision"], 20).await?;
        let agents = self.agents_seen(db, pg, &since).await?;
        let series = self.per_minute(db, pg, &since).await?;
        let denied_hosts = {
            let mut sql = Sql::new(
                pg,
                "SELECT destination_host, COUNT(*) AS n FROM audit_records \
                 WHERE kind = 'request' AND decision = 'deny' AND \"timestamp\" >= ",
            );
            sql.bind_time(since.clone());
            sql.push(" GROUP BY destination_host ORDER BY n DESC LIMIT 10");
            sql.rows(db, &["destination_host"]).await?
        };
        let total: i64 = by_decision.iter().filter_map(|v| v["count"].as_i64()).sum();
        Ok(json!({
            "window_s": window_s,
            "since": since,
            "total": total,
            "by_decision": by_decision,
            "by_agent": by_agent,
            "by_policy": by_policy,
            "agents": agents,
            "per_minute": series,
            "top_denied_hosts": denied_hosts,
        }))
    }
}

impl AuditReader {
    /// Requests per minute in the window (UTC `YYYY-MM-DDTHH:MM`), with
    /// how many were denied and how many got 429, oldest first.
    async fn per_minute(&self, db: &Db, pg: bool, since: &str) -> Result<Vec<Value>, AuditError> {
        let minute = if pg {
            "to_char(date_trunc('minute', \"timestamp\" AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T\"HH24:MI')"
        } else {
            "substr(\"timestamp\", 1, 16)"
        };
        let mut sql = Sql::new(
            pg,
            format!(
                "SELECT {minute} AS minute, COUNT(*) AS n, \
                 SUM(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END) AS denied, \
                 SUM(CASE WHEN response_code = 429 THEN 1 ELSE 0 END) AS limited \
                 FROM audit_records WHERE kind = 'request' AND \"timestamp\" >= "
            ),
        );
        sql.bind_time(since.to_string());
        sql.push(" GROUP BY minute ORDER BY minute");
        Ok(fetch_rows!(sql, db, |r| json!({
            "minute": r.get::<String, _>("minute"),
            "requests": r.get::<i64, _>("n"),
            "denied": r.get::<i64, _>("denied"),
            "rate_limited": r.get::<i64, _>("limited"),
        })))
    }

    /// Per agent in the window: requests, denials, 429s and when it was
    /// last seen (newest first, at most 1,000 agents).
    async fn agents_seen(&self, db: &Db, pg: bool, since: &str) -> Result<Vec<Value>, AuditError> {
        let last = if pg {
            "to_char(MAX(\"timestamp\") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        } else {
            "MAX(\"timestamp\")"
        };
        let mut sql = Sql::new(
            pg,
            format!(
                "SELECT agent_id, COUNT(*) AS n, \
                 SUM(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END) AS denied, \
                 SUM(CASE WHEN response_code = 429 THEN 1 ELSE 0 END) AS limited, \
                 {last} AS last_seen FROM audit_records \
                 WHERE kind = 'request' AND agent_id <> '' AND \"timestamp\" >= "
            ),
        );
        sql.bind_time(since.to_string());
        sql.push(" GROUP BY agent_id ORDER BY last_seen DESC LIMIT 1000");
        Ok(fetch_rows!(sql, db, |r| json!({
            "agent_id": r.get::<String, _>("agent_id"),
            "requests": r.get::<i64, _>("n"),
            "denied": r.get::<i64, _>("denied"),
            "rate_limited": r.get::<i64, _>("limited"),
            "last_seen": r.get::<String, _>("last_seen"),
        })))
    }
}

/// Accept any RFC 3339 time; compare in the store's own form (UTC, ms).
fn normal_time(t: &str) -> Result<String, AuditError> {
    humantime::parse_rfc3339_weak(t)
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .map_err(|e| {
            AuditError::BadQuery(format!(
                "time {t:?}: {e} (RFC 3339, e.g. 2026-11-23T12:00:00Z)"
            ))
        })
}

async fn open(store: &AuditStore) -> Result<Db, AuditError> {
    match store {
        AuditStore::Sqlite(path) => open_sqlite(path).await.map(Db::Sqlite),
        AuditStore::Postgres(url) => Ok(Db::Postgres(
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect(url)
                .await?,
        )),
    }
}

async fn open_sqlite(path: &Path) -> Result<SqlitePool, AuditError> {
    if !path.exists() {
        return Err(AuditError::NotYet);
    }
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(5));
    Ok(SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await?)
}
