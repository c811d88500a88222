//! Sustained audit append rate (issue: ≥ 50,000 records/s): the real
//! writer (hash chain, Merkle accumulator, fsync per batch, an Ed25519
//! checkpoint every 1,000 records), batches of 1,024 as the sink forms them,
//! then the query-store ingest of the same records: SQLite, and PostgreSQL
//! when `CLAWGRESS_BENCH_PG` holds a URL. Prints the rates. Segments of
//! 100,000 records are sealed as the sink seals them.
//!
//!   cargo run --release -p clawgress-audit-sink --example append_rate [N [BATCH]]
//!
//! BATCH (default 1,024) is the query-store insert size; the sink's are
//! smaller under light load (what arrived together).
//!   CLAWGRESS_BENCH_PG=postgres://user@127.0.0.1:5432/db cargo run … [N]

use std::time::Instant;

use clawgress_audit_log::AuditRecord;
use clawgress_audit_sink::{AuditKey, JsonlWriter, RecordWriter};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let batch: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024)
        .max(1);
    let dir = tempfile::tempdir()?;
    let key = AuditKey::load_or_create(&dir.path().join("keys"))?;
    let mut w = JsonlWriter::open(&dir.path().join("audit"), Some(key))?;
    let template = AuditRecord {
        timestamp: "2026-11-23T12:00:00.000Z".into(),
        agent_id: "build-bot".into(),
        team_id: "infra".into(),
        project_id: "ci".into(),
        environment: "prod".into(),
        destination_host: "pypi.org".into(),
        destination_port: 443,
        http_method: "CONNECT".into(),
        decision: "allow".into(),
        reason: "policy-allow".into(),
        policy_id: "allow-pypi".into(),
        bundle_revision: "7".into(),
        response_code: 200,
        latency_ms: 12,
        bytes_out: 1234,
        bytes_in: 56789,
        source_address: "10.0.0.7".into(),
        ..Default::default()
    };
    let mut all = Vec::with_capacity(n);
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let len = 1024.min(n - i);
        let mut batch: Vec<AuditRecord> = (i..i + len)
            .map(|k| AuditRecord {
                request_id: format!("req-{k:08}"),
                ..template.clone()
            })
            .collect();
        w.append(&mut batch)?;
        if w.unsealed() >= 1000 {
            w.checkpoint()?;
        }
        i += len;
        all.extend(batch);
    }
    w.checkpoint()?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "append: {n} records in {secs:.2} s = {:.0} records/s (chain + Merkle + fsync per 1,024 + signed checkpoint per 1,000)",
        n as f64 / secs
    );
    use clawgress_audit_sink::query::{QueryStore, Target};
    let mut targets = vec![("SQLite, WAL", Target::Sqlite(dir.path().join("audit.db")))];
    if let Ok(url) = std::env::var("CLAWGRESS_BENCH_PG") {
        targets.push(("PostgreSQL", Target::Postgres(url)));
    }
    for (name, target) in targets {
        let q = QueryStore::open_target(&target)?;
        if q.max_seq()? != 0 {
            // Records already there would be skipped, not inserted.
            return Err(
                format!("{name}: audit_records is not empty; use an empty database").into(),
            );
        }
        let start = Instant::now();
        for chunk in all.chunks(batch) {
            q.insert(chunk)?;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "query store ({name}), batches of {batch}: {n} records in {secs:.2} s = {:.0} records/s",
            n as f64 / secs
        );
    }
    Ok(())
}
