//! The audit query store (§6, §10): one table `audit_records`, one column
//! per §6 field plus `kind`, `seq`, `shadow_decision`, `shadow_policy_id`
//! (and `reason`, `actor`, `detail`), indexed on time, agent, decision, host
//! and policy; what the admin API and Grafana read. SQLite here.
//!
//! The JSON-lines log stays the record of truth: the store is written after
//! each batch is synced there, and on open it catches up from the log, so a
//! crash between the two loses nothing and inserts nothing twice (`seq` is
//! the primary key).

use std::path::{Path, PathBuf};

use clawgress_audit_log::AuditRecord;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

/// A query-store failure, by store.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The table, as the admin API and dashboards read it.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS audit_records (
    seq               INTEGER PRIMARY KEY,
    kind              TEXT    NOT NULL,
    timestamp         TEXT    NOT NULL,
    request_id        TEXT    NOT NULL,
    agent_id          TEXT    NOT NULL,
    team_id           TEXT    NOT NULL,
    project_id        TEXT    NOT NULL,
    environment       TEXT    NOT NULL,
    destination_host  TEXT    NOT NULL,
    destination_port  INTEGER NOT NULL,
    http_method       TEXT    NOT NULL,
    path              TEXT    NOT NULL,
    decision          TEXT    NOT NULL,
    reason            TEXT    NOT NULL,
    policy_id         TEXT    NOT NULL,
    bundle_revision   TEXT    NOT NULL,
    quota_applied     TEXT    NOT NULL,
    response_code     INTEGER NOT NULL,
    latency_ms        INTEGER NOT NULL,
    bytes_out         INTEGER NOT NULL,
    bytes_in          INTEGER NOT NULL,
    source_address    TEXT    NOT NULL,
    shadow_decision   TEXT    NOT NULL,
    shadow_policy_id  TEXT    NOT NULL,
    actor             TEXT    NOT NULL,
    detail            TEXT    NOT NULL
);
-- Every SQLite index entry ends in the rowid, which is seq, which follows
-- time: (agent_id) is (agent_id, seq), newest first by walking it
-- backwards. One key column each instead of (x, timestamp) costs a third
-- less per insert (append_rate: 102k vs 69k records/s). PostgreSQL keeps
-- (x, "timestamp"): its index entries carry no such order.
CREATE INDEX IF NOT EXISTS audit_records_time     ON audit_records (timestamp);
CREATE INDEX IF NOT EXISTS audit_records_agent    ON audit_records (agent_id);
CREATE INDEX IF NOT EXISTS audit_records_team     ON audit_records (team_id);
CREATE INDEX IF NOT EXISTS audit_records_decision ON audit_records (decision);
CREATE INDEX IF NOT EXISTS audit_records_host     ON audit_records (destination_host);
CREATE INDEX IF NOT EXISTS audit_records_policy   ON audit_records (policy_id);
-- Alerts, admin actions and gaps are a sliver of the rows: a partial index
-- finds them (queries say `kind <> 'request'`), and a request's insert
-- touches one index fewer (append_rate: 6.6 → 6.1 µs a record).
DROP INDEX IF EXISTS audit_records_kind;
CREATE INDEX IF NOT EXISTS audit_records_events   ON audit_records (kind) WHERE kind <> 'request';
"#;

/// The same table in PostgreSQL (`timestamp` with time zone).
pub const PG_SCHEMA: &str = include_str!("../sql/postgres.sql");

const COLUMNS: usize = 26;

/// Where the query store lives (`stores.audit_query`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A SQLite file (`state_dir/audit.db`), the one-host default.
    Sqlite(PathBuf),
    /// A PostgreSQL URL, for fleets and Grafana.
    Postgres(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            // Never print a password.
            Target::Postgres(url) => match url.split_once('@') {
                Some((_, host)) => write!(f, "postgres://…@{host}"),
                None => f.write_str(url),
            },
        }
    }
}

enum Pool {
    /// rusqlite, synchronous: this store lives on its own thread anyway.
    Sqlite(rusqlite::Connection),
    Postgres(PgPool),
}

/// The query store, used from its own (synchronous) thread: it owns a
/// small runtime to drive sqlx (PostgreSQL).
pub struct QueryStore {
    rt: tokio::runtime::Runtime,
    pool: Pool,
}

/// Bind one record's columns, in the order of the INSERT below; `$ts` is
/// appended after the timestamp (a cast where the column is typed).
macro_rules! bind_record {
    ($b:expr, $r:expr, $ts:expr) => {{
        let r = $r;
        $b.push_bind(r.seq as i64)
            .push_bind(r.kind.as_str())
            .push_bind(store_time(&r.timestamp))
            .push_unseparated($ts)
            .push_bind(&r.request_id)
            .push_bind(&r.agent_id)
            .push_bind(&r.team_id)
            .push_bind(&r.project_id)
            .push_bind(&r.environment)
            .push_bind(&r.destination_host)
            .push_bind(i64::from(r.destination_port))
            .push_bind(&r.http_method)
            .push_bind(&r.path)
            .push_bind(&r.decision)
            .push_bind(&r.reason)
            .push_bind(&r.policy_id)
            .push_bind(&r.bundle_revision)
            .push_bind(&r.quota_applied)
            .push_bind(i64::from(r.response_code))
            .push_bind(r.latency_ms as i64)
            .push_bind(r.bytes_out as i64)
            .push_bind(r.bytes_in as i64)
            .push_bind(&r.source_address)
            .push_bind(&r.shadow_decision)
            .push_bind(&r.shadow_policy_id)
            .push_bind(&r.actor)
            .push_bind(&r.detail);
    }};
}

const INSERT: &str = "INSERT INTO audit_records (seq, kind, \"timestamp\", request_id, agent_id, \
     team_id, project_id, environment, destination_host, destination_port, http_method, \
     path, decision, reason, policy_id, bundle_revision, quota_applied, response_code, \
     latency_ms, bytes_out, bytes_in, source_address, shadow_decision, shadow_policy_id, \
     actor, detail) ";

/// One row, skipped if its `seq` is there: SQLite's prepared insert (built
/// once; `prepare_cached` finds it by this text).
static SQLITE_INSERT_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}VALUES ({})",
        INSERT.replacen("INSERT", "INSERT OR IGNORE", 1),
        vec!["?"; COLUMNS].join(", ")
    )
});

/// Timestamps as the store keeps them: RFC 3339 UTC with milliseconds (so
/// text order is time order in SQLite). A record without a readable time
/// (none is written so) is stored at the epoch rather than refused.
fn store_time(t: &str) -> String {
    match humantime::parse_rfc3339_weak(t) {
        Ok(t) => humantime::format_rfc3339_millis(t).to_string(),
        Err(_) => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

impl QueryStore {
    /// Open a SQLite query store (created if missing).
    pub fn open(path: &Path) -> Result<QueryStore, QueryError> {
        Self::open_target(&Target::Sqlite(path.to_path_buf()))
    }

    /// Open the query store at `target`, creating the table if missing.
    pub fn open_target(target: &Target) -> Result<QueryStore, QueryError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let pool = match target {
            Target::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path)?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                // WAL, synced at checkpoints (the log is the record of truth:
                // what a crash loses here comes back from it). Six indexes
                // over a growing table: with SQLite's 2 MiB default cache
                // every batch re-read index pages through pread (profiled:
                // the query store was two thirds of the sink's CPU), so a
                // 64 MiB cache and reads by mmap.
                conn.execute_batch(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA cache_size = -65536; PRAGMA mmap_size = 268435456;",
                )?;
                conn.execute_batch(SCHEMA)?;
                Pool::Sqlite(conn)
            }
            Target::Postgres(url) => Pool::Postgres(rt.block_on(async {
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(std::time::Duration::from_secs(5))
                    .connect(url)
                    .await?;
                // Concurrent sinks of a fleet may race to create it.
                let mut conn = pool.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock(7254001)")
                    .execute(&mut *conn)
                    .await?;
                let made = sqlx::raw_sql(PG_SCHEMA).execute(&mut *conn).await;
                sqlx::query("SELECT pg_advisory_unlock(7254001)")
                    .execute(&mut *conn)
                    .await?;
                made?;
                drop(conn);
                Ok::<_, sqlx::Error>(pool)
            })?),
        };
        Ok(QueryStore { rt, pool })
    }

    /// The highest `seq` stored (0 when empty).
    pub fn max_seq(&self) -> Result<u64, QueryError> {
        const SQL: &str = "SELECT COALESCE(MAX(seq), 0) AS m FROM audit_records";
        let m: i64 = match &self.pool {
            Pool::Sqlite(c) => c.query_row(SQL, [], |r| r.get(0))?,
            Pool::Postgres(p) => self.rt.block_on(sqlx::query(SQL).fetch_one(p))?.get("m"),
        };
        Ok(m.max(0) as u64)
    }

    /// Insert records (already in the log) in one transaction; records
    /// already there are skipped.
    pub fn insert(&self, batch: &[AuditRecord]) -> Result<(), QueryError> {
        if batch.is_empty() {
            return Ok(());
        }
        match &self.pool {
            Pool::Sqlite(conn) => {
                // One prepared statement, executed per row, in one
                // transaction: no SQL text per batch to parse.
                let tx = conn.unchecked_transaction()?;
                {
                    let mut st = tx.prepare_cached(&SQLITE_INSERT_ONE)?;
                    for r in batch {
                        st.execute(rusqlite::params![
                            r.seq as i64,
                            r.kind.as_str(),
                            store_time(&r.timestamp),
                            r.request_id,
                            r.agent_id,
                            r.team_id,
                            r.project_id,
                            r.environment,
                            r.destination_host,
                            i64::from(r.destination_port),
                            r.http_method,
                            r.path,
                            r.decision,
                            r.reason,
                            r.policy_id,
                            r.bundle_revision,
                            r.quota_applied,
                            i64::from(r.response_code),
                            r.latency_ms as i64,
                            r.bytes_out as i64,
                            r.bytes_in as i64,
                            r.source_address,
                            r.shadow_decision,
                            r.shadow_policy_id,
                            r.actor,
                            r.detail,
                        ])?;
                    }
                }
                tx.commit()?;
                Ok(())
            }
            Pool::Postgres(pool) => Ok(self.rt.block_on(async {
                let mut tx = pool.begin().await?;
                // PostgreSQL allows 65535 parameters per statement.
                for chunk in batch.chunks(65535 / COLUMNS) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(INSERT);
                    q.push_values(chunk, |mut b, r| bind_record!(b, r, "::timestamptz"));
                    q.push(" ON CONFLICT (seq) DO NOTHING");
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await
            })?),
        }
    }

    /// Bring the store up to the log: insert every record of the log in
    /// `dir` (its segment files) whose `seq` is above what the store has.
    pub fn catch_up(&self, dir: &Path) -> Result<usize, QueryError> {
        use std::io::BufRead;
        let have = self.max_seq()?;
        let segments =
            crate::writer::list_segments(dir).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut batch = Vec::new();
        let mut added = 0;
        for (i, (_, path)) in segments.iter().enumerate() {
            // Skip segments wholly stored already.
            if segments
                .get(i + 1)
                .is_some_and(|(next, _)| *next <= have + 1)
            {
                continue;
            }
            let file = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            // Bytes per line: a read error is an error (the caller retries
            // the catch-up), while a torn or non-UTF-8 line is skipped, as
            // the writer skips it — never a silent stop part-way through.
            for line in std::io::BufReader::new(file).split(b'\n') {
                let line = line?;
                let Some(r) = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| AuditRecord::from_json_line(l).ok())
                else {
                    continue;
                };
                if r.seq > have {
                    batch.push(r);
                }
                if batch.len() >= 10_000 {
                    self.insert(&batch)?;
                    added += batch.len();
                    batch.clear();
                }
            }
        }
        self.insert(&batch)?;
        Ok(added + batch.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, agent: &str) -> AuditRecord {
        AuditRecord {
            seq,
            request_id: format!("r{seq}"),
            agent_id: agent.into(),
            decision: "allow".into(),
            timestamp: "2026-11-23T12:00:00.000Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn insert_is_idempotent_and_catch_up_fills_the_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = QueryStore::open(&dir.path().join("q.db")).expect("open");
        q.insert(&[rec(1, "a"), rec(2, "b")]).expect("insert");
        q.insert(&[rec(2, "b")]).expect("again");
        assert_eq!(q.max_seq().expect("max"), 2);
        let log = dir.path().join("audit");
        std::fs::create_dir(&log).expect("mkdir");
        let text: String = (1..=5)
            .map(|i| rec(i, "a").to_json_line() + "\n")
            .collect::<String>()
            + "{\"torn";
        std::fs::write(log.join(crate::writer::segment_name(1)), text).expect("write");
        assert_eq!(q.catch_up(&log).expect("catch up"), 3);
        assert_eq!(q.max_seq().expect("max"), 5);
        assert_eq!(q.catch_up(&log).expect("again"), 0);
    }

    /// Requests skip the index of the other kinds; a query for alerts
    /// (with the term admin adds) is answered from it, and an old database
    /// with the former full index on `kind` loses it when opened.
    #[test]
    fn the_other_kinds_have_a_partial_index_that_alert_queries_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.db");
        {
            let c = rusqlite::Connection::open(&path).expect("open");
            c.execute_batch(&SCHEMA.replace(
                "DROP INDEX IF EXISTS audit_records_kind;",
                "CREATE INDEX audit_records_kind ON audit_records (kind);",
            ))
            .expect("old schema");
        }
        let q = QueryStore::open(&path).expect("open");
        q.insert(&[rec(1, "a")]).expect("insert");
        drop(q);
        let c = rusqlite::Connection::open(&path).expect("open");
        let names: Vec<String> = c
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_records'")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .expect("indexes");
        assert!(
            !names.iter().any(|n| n == "audit_records_kind"),
            "{names:?}"
        );
        let plan: String = c
            .prepare(
                "EXPLAIN QUERY PLAN SELECT seq FROM audit_records WHERE 1=1 AND kind = ?1 \
                 AND kind <> 'request' ORDER BY seq DESC LIMIT 100",
            )
            .and_then(|mut st| {
                st.query_map(["alert"], |r| r.get::<_, String>(3))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .expect("plan")
            .join("; ");
        assert!(plan.contains("audit_records_events"), "{plan}");
    }
}
