//! The audit query store behaves the same in SQLite and PostgreSQL: what the
//! sink writes (and catches up from the log's segments) is what the admin
//! API reads back, with the same filters, pages, times and statistics.

#[path = "../testkit/postgres.rs"]
mod postgres;

use clawgress_admin::audit::{AuditQuery, AuditReader, AuditStore};
use clawgress_audit_log::{AuditRecord, RecordKind};
use clawgress_audit_sink::query::{QueryStore, Target};
use clawgress_audit_sink::{JsonlWriter, RecordWriter};
use serde_json::json;

fn now_minus(secs: u64) -> String {
    humantime::format_rfc3339_millis(
        std::time::SystemTime::now() - std::time::Duration::from_secs(secs),
    )
    .to_string()
}

fn rec(i: u64) -> AuditRecord {
    let deny = i.is_multiple_of(3);
    AuditRecord {
        kind: if i == 7 {
            RecordKind::Alert
        } else {
            RecordKind::Request
        },
        // One an hour ago, the rest within the last minute.
        timestamp: if i == 1 {
            now_minus(3600)
        } else {
            now_minus(60 - i)
        },
        request_id: format!("req-{i}"),
        agent_id: if i.is_multiple_of(2) {
            "build-bot"
        } else {
            "lab-vm"
        }
        .into(),
        team_id: "infra".into(),
        destination_host: if deny { "evil.example" } else { "pypi.org" }.into(),
        destination_port: 443,
        http_method: "CONNECT".into(),
        decision: if deny { "deny" } else { "allow" }.into(),
        reason: if deny { "default-deny" } else { "policy" }.into(),
        policy_id: if deny { "default-deny" } else { "allow-pypi" }.into(),
        response_code: if deny { 403 } else { 200 },
        latency_ms: i,
        ..Default::default()
    }
}

/// One body for both stores.
fn exercise(target: Target, reader: AuditStore) {
    // The sink's side: 20 records in the log (segments of 8), 12 of them
    // handed to the store, the rest caught up from the log.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit");
    let mut w = JsonlWriter::open_with(&log, None, 8).expect("log");
    let mut recs: Vec<AuditRecord> = (1..=20).map(rec).collect();
    for chunk in recs.chunks_mut(4) {
        w.append(chunk).expect("append");
    }
    let q = QueryStore::open_target(&target).expect("open the store");
    q.insert(&recs[..12]).expect("insert");
    q.insert(&recs[..12]).expect("inserting again is harmless");
    assert_eq!(q.max_seq().expect("max"), 12);
    assert_eq!(q.catch_up(&log).expect("catch up"), 8);
    assert_eq!(q.catch_up(&log).expect("again"), 0);
    assert_eq!(q.max_seq().expect("max"), 20);
    drop(q);
    // Reopening (the schema is there already) is fine.
    QueryStore::open_target(&target).expect("reopen");

    // The admin's side.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let r = AuditReader::new(Some(reader));
    let get = |q: AuditQuery| rt.block_on(r.query(&q)).expect("query");
    let all = get(AuditQuery::default());
    let rows = all["records"].as_array().expect("records");
    assert_eq!(rows.len(), 19, "requests only by default: {all}");
    assert_eq!(rows[0]["seq"], 20, "newest first");
    assert_eq!(rows[0]["request_id"], "req-20");
    assert_eq!(
        rows[0]["timestamp"], recs[19].timestamp,
        "times read back as written"
    );
    assert_eq!(rows[0]["destination_port"], 443);
    let denied = get(AuditQuery {
        decision: Some("deny".into()),
        agent: Some("build-bot".into()),
        ..Default::default()
    });
    let seqs: Vec<i64> = denied["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["seq"].as_i64())
        .collect();
    assert_eq!(seqs, vec![18, 12, 6]);
    let alerts = get(AuditQuery {
        kind: Some("alert".into()),
        ..Default::default()
    });
    assert_eq!(alerts["records"][0]["request_id"], "req-7");
    // Time window: the record of an hour ago is outside the last 30 minutes.
    let recent = get(AuditQuery {
        since: Some(now_minus(1800)),
        kind: Some("all".into()),
        ..Default::default()
    });
    assert_eq!(recent["records"].as_array().map(Vec::len), Some(19));
    let old = get(AuditQuery {
        until: Some(now_minus(1800)),
        ..Default::default()
    });
    assert_eq!(old["records"][0]["request_id"], "req-1");
    // Pages.
    let page1 = get(AuditQuery {
        limit: Some(5),
        ..Default::default()
    });
    let next = page1["next_before_seq"].as_i64().expect("cursor");
    assert_eq!(next, 16);
    let page2 = get(AuditQuery {
        limit: Some(5),
        before_seq: Some(next),
        ..Default::default()
    });
    assert_eq!(page2["records"][0]["seq"], 15);
    // A bad time is the caller's error, not the store's.
    let bad = rt.block_on(r.query(&AuditQuery {
        since: Some("yesterday".into()),
        ..Default::default()
    }));
    assert!(bad.is_err());

    let stats = rt.block_on(r.stats(600)).expect("stats");
    // 18 requests in the window (one an hour old, one an alert).
    assert_eq!(stats["total"], 18, "{stats}");
    // Requests per minute and the most denied hosts.
    let minutes = stats["per_minute"].as_array().expect("per_minute");
    let total: i64 = minutes.iter().filter_map(|m| m["requests"].as_i64()).sum();
    assert_eq!(total, 18, "{stats}");
    let denied: i64 = minutes.iter().filter_map(|m| m["denied"].as_i64()).sum();
    assert_eq!(denied, 6, "{stats}");
    assert!(
        minutes.iter().all(|m| m["minute"]
            .as_str()
            .is_some_and(|t| t.len() == 16 && &t[10..11] == "T")),
        "{stats}"
    );
    assert_eq!(
        stats["top_denied_hosts"][0]["destination_host"], "evil.example",
        "{stats}"
    );
    assert_eq!(stats["top_denied_hosts"][0]["count"], 6, "{stats}");
    // Per agent: requests, denials, 429s, last seen (newest first).
    let agents = stats["agents"].as_array().expect("agents");
    assert_eq!(agents[0]["agent_id"], "build-bot", "{stats}");
    assert_eq!(
        (
            &agents[0]["requests"],
            &agents[0]["denied"],
            &agents[0]["rate_limited"]
        ),
        (&json!(10), &json!(3), &json!(0)),
        "{stats}"
    );
    assert_eq!(
        agents[0]["last_seen"],
        recs[19].timestamp.as_str(),
        "{stats}"
    );
    assert_eq!(
        (&agents[1]["agent_id"], &agents[1]["requests"]),
        (&json!("lab-vm"), &json!(8))
    );
    let by_policy = stats["by_policy"].as_array().expect("by_policy");
    assert!(
        by_policy
            .iter()
            .any(|p| p["policy_id"] == "allow-pypi" && p["count"] == 12),
        "{stats}"
    );
}

#[test]
fn sqlite_query_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("audit.db");
    exercise(Target::Sqlite(db.clone()), AuditStore::Sqlite(db));
}

#[test]
fn postgres_query_store_behaves_the_same() {
    let Some(pg) = postgres::Postgres::start() else {
        eprintln!("skipped: needs root and Debian's postgresql (scripts/test.sh installs it)");
        return;
    };
    let url = pg.url();
    let target = Target::Postgres(url.clone());
    let mut up = false;
    for _ in 0..100 {
        if QueryStore::open_target(&target).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(up, "PostgreSQL came up");
    exercise(target, AuditStore::Postgres(url));
}
