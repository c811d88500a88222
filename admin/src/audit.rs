//! Reading the audit query store (§10: table `audit_records`, written by the
//! audit sink): filtered, paginated queries, recent alerts, and decision
//! statistics over a window. Read-only; the sink is its only writer.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

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

fn json_object() -> String {
    let pairs: Vec<String> = COLUMNS.iter().map(|c| format!("'{c}', {c}")).collect();
    format!("json_object({})", pairs.join(", "))
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
    /// Default 100, at most 1000.
    pub limit: Option<i64>,
}

pub struct AuditReader {
    path: Option<PathBuf>,
    pool: tokio::sync::OnceCell<SqlitePool>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no audit query store is configured")]
    NotConfigured,
    #[error("the audit query store is not there yet (no record written so far)")]
    NotYet,
    #[error("{0}")]
    BadQuery(String),
    #[error("audit query store: {0}")]
    Db(#[from] sqlx::Error),
}

impl AuditReader {
    pub fn new(path: Option<PathBuf>) -> AuditReader {
        AuditReader {
            path,
            pool: tokio::sync::OnceCell::new(),
        }
    }

    async fn pool(&self) -> Result<&SqlitePool, AuditError> {
        let path = self.path.as_deref().ok_or(AuditError::NotConfigured)?;
        self.pool.get_or_try_init(|| open(path)).await
    }

    /// Records newest first, filtered; with the cursor for the next page.
    pub async fn query(&self, q: &AuditQuery) -> Result<Value, AuditError> {
        let pool = self.pool().await?;
        let mut sql = sqlx::QueryBuilder::new(format!(
            "SELECT {} AS j FROM audit_records WHERE 1=1",
            json_object()
        ));
        match q.kind.as_deref().unwrap_or("request") {
            "all" => {}
            k @ ("request" | "alert" | "admin" | "gap") => {
                sql.push(" AND kind = ").push_bind(k.to_string());
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
                sql.push(format!(" AND {col} = ")).push_bind(v.clone());
            }
        }
        if let Some(t) = &q.since {
            sql.push(" AND timestamp >= ").push_bind(normal_time(t)?);
        }
        if let Some(t) = &q.until {
            sql.push(" AND timestamp < ").push_bind(normal_time(t)?);
        }
        if let Some(b) = q.before_seq {
            sql.push(" AND seq < ").push_bind(b);
        }
        let limit = q.limit.unwrap_or(100).clamp(1, 1000);
        sql.push(" ORDER BY seq DESC LIMIT ").push_bind(limit);
        let rows = sql.build().fetch_all(pool).await?;
        let records: Vec<Value> = rows
            .iter()
            .filter_map(|r| serde_json::from_str(r.get::<&str, _>("j")).ok())
            .collect();
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
        let pool = self.pool().await?;
        let since = humantime::format_rfc3339_millis(
            std::time::SystemTime::now() - std::time::Duration::from_secs(window_s),
        )
        .to_string();
        let group = |cols: &str, limit: i64| {
            format!(
                "SELECT {cols}, COUNT(*) AS n FROM audit_records WHERE kind = 'request' AND timestamp >= ?1 \
                 GROUP BY {cols} ORDER BY n DESC LIMIT {limit}"
            )
        };
        let fetch = |sql: String, cols: &'static [&'static str]| {
            let since = since.clone();
            async move {
                let rows = sqlx::query(&sql).bind(since).fetch_all(pool).await?;
                Ok::<Vec<Value>, sqlx::Error>(
                    rows.iter()
                        .map(|r| {
                            let mut m = serde_json::Map::new();
                            for c in cols {
                                m.insert((*c).into(), Value::String(r.get::<String, _>(*c)));
                            }
                            m.insert("count".into(), json!(r.get::<i64, _>("n")));
                            Value::Object(m)
                        })
                        .collect(),
                )
            }
        };
        let by_decision = fetch(group("decision, reason", 100), &["decision", "reason"]).await?;
        let by_agent = fetch(group("agent_id, decision", 20), &["agent_id", "decision"]).await?;
        let by_policy = fetch(group("policy_id, decision", 20), &["policy_id", "decision"]).await?;
        let total: i64 = by_decision.iter().filter_map(|v| v["count"].as_i64()).sum();
        Ok(json!({
            "window_s": window_s,
            "since": since,
            "total": total,
            "by_decision": by_decision,
            "by_agent": by_agent,
            "by_policy": by_policy,
        }))
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

async fn open(path: &Path) -> Result<SqlitePool, AuditError> {
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
