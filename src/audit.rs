//! `clawgress audit verify` and `clawgress audit query`: read this node's
//! audit log (found through `--config`/`--state-dir` like `up`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clawgress_audit_log::AuditRecord;
use clawgress_audit_sink::{read_checkpoints, read_log, JsonlWriter, LogText, KEY_NAME};

use crate::node;

/// Where this node keeps its audit log and keys.
pub struct Paths {
    pub audit_dir: PathBuf,
    pub keys_dir: PathBuf,
}

pub fn paths(config: Option<&Path>, state_dir: Option<&Path>) -> Result<Paths> {
    let doc = config.map(node::load).transpose()?;
    let env = |k: &str| std::env::var(k).ok();
    let state = node::state_dir(state_dir, doc.as_ref(), &env)?;
    Ok(Paths {
        audit_dir: match &doc {
            Some(d) => node::audit_dir(d, &state),
            None => state.join("audit"),
        },
        keys_dir: node::keys_dir(&state),
    })
}

fn audit_key(p: &Paths) -> Result<ed25519_dalek::VerifyingKey> {
    let pub_path = p.keys_dir.join("audit.pub");
    let text = std::fs::read_to_string(&pub_path)
        .with_context(|| format!("cannot read the audit public key {}", pub_path.display()))?;
    let mut raw = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut raw)
        .with_context(|| format!("{} is not a hex Ed25519 public key", pub_path.display()))?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw)
        .with_context(|| format!("{} is not an Ed25519 public key", pub_path.display()))
}

/// `audit prove REQUEST_ID`: an RFC 6962 inclusion proof of that record
/// against the latest signed checkpoint that covers it. Exit status 0 with
/// the proof; 1 when the record is not (yet) under a checkpoint.
pub fn prove(p: &Paths, request_id: &str, json: bool) -> Result<bool> {
    let log = load(p)?;
    let key = audit_key(p)?;
    let notes = read_checkpoints(&p.audit_dir.join(JsonlWriter::CHECKPOINTS))?;
    let found = clawgress_audit_log::verify::inclusion(&log.text, &notes, KEY_NAME, &key, |r| {
        r.request_id == request_id
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "record with request_id {request_id:?}: {e} ({})",
            p.audit_dir.display()
        )
    })?;
    let Some(inc) = found else {
        println!("record {request_id} is not under a signed checkpoint yet (one is written at least every 5 s while records arrive)");
        return Ok(false);
    };
    if !inc.verified {
        println!(
            "FAIL: the log does not match checkpoint {} (run `clawgress audit verify`)",
            inc.tree_size
        );
        return Ok(false);
    }
    if json {
        let mut v = serde_json::to_value(&inc)?;
        v["request_id"] = serde_json::json!(request_id);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "record {request_id} (leaf {}) is in the log of {} records signed at checkpoint root {}",
            inc.leaf_index, inc.tree_size, inc.root_hash
        );
        println!(
            "proof ({} hashes, RFC 6962, leaf = SHA-256(0x00 || line)):",
            inc.proof.len()
        );
        for h in &inc.proof {
            println!("  {h}");
        }
        print!("checkpoint:\n{}", inc.checkpoint);
    }
    Ok(true)
}

/// Every segment of this node's log, joined.
fn load(p: &Paths) -> Result<LogText> {
    let log = read_log(&p.audit_dir)
        .with_context(|| format!("cannot read the audit log in {}", p.audit_dir.display()))?;
    if log.segments.is_empty() {
        anyhow::bail!(
            "no audit log in {} (no segment files yet: has `clawgress up` or `serve audit` run with this --config/--state-dir?)",
            p.audit_dir.display()
        );
    }
    Ok(log)
}

/// How long a live sink may leave records without a signed checkpoint: it
/// signs at least every 5 s while records arrive and when it stops.
const UNSIGNED_GRACE: Duration = Duration::from_secs(60);

/// Records that should be under a signed checkpoint by now but are not. A
/// chain alone can be rewritten end to end by anyone who can write the
/// files (the hashes need no key); only the signed checkpoints pin it, so
/// a log whose checkpoints were removed or cut must not pass as intact:
/// - a sealed segment is signed before it is sealed, so its lines must be
///   covered;
/// - the unsealed tail is signed within seconds of being written, so lines
///   last written more than [`UNSIGNED_GRACE`] ago must be covered too (or
///   the sink died before signing and has not run since: started, it
///   signs the tail within 5 s).
fn unsigned_too_long(
    p: &Paths,
    log: &LogText,
    records: u64,
    covered: u64,
    now: SystemTime,
) -> Option<String> {
    // The chain held, so seqs run 1..=records and a segment ends where the
    // next one's name begins.
    let segs = &log.segments;
    for (k, s) in segs.iter().enumerate().filter(|(_, s)| s.sealed) {
        let last_seq = segs
            .get(k + 1)
            .map_or(records, |n| n.first_seq.saturating_sub(1));
        if last_seq > covered {
            return Some(format!(
                "segment {} is sealed, and a segment is signed before it is sealed, yet the signed checkpoints cover only the first {covered} records (it ends at seq {last_seq}): checkpoints were removed from {}",
                s.name,
                JsonlWriter::CHECKPOINTS
            ));
        }
    }
    if records <= covered {
        return None;
    }
    let last = segs.last()?;
    let written = std::fs::metadata(p.audit_dir.join(&last.name))
        .and_then(|m| m.modified())
        .ok()?;
    let age = now.duration_since(written).unwrap_or_default();
    (age > UNSIGNED_GRACE).then(|| {
        format!(
            "the last {} records were written {}s ago and are under no signed checkpoint (the sink signs within 5 s of writing and when it stops): either {} was cut or removed, or the sink died before signing and has not run since (started, it signs them within 5 s; verify again then)",
            records - covered,
            age.as_secs(),
            JsonlWriter::CHECKPOINTS
        )
    })
}

/// Verify the chain across segments, every signed checkpoint and the
/// consistency between them (and from a held checkpoint). Exit status:
/// 0 intact, 1 tampered (the first problem is named, with its segment).
pub fn verify(p: &Paths, from: Option<&Path>, json: bool) -> Result<bool> {
    let log = load(p)?;
    let notes = read_checkpoints(&p.audit_dir.join(JsonlWriter::CHECKPOINTS))?;
    let key = audit_key(p)?;
    let held = from
        .map(|f| {
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the checkpoint {}", f.display()))
        })
        .transpose()?;
    let mut report = clawgress_audit_log::verify::verify_from(
        &log.text,
        &notes,
        KEY_NAME,
        &key,
        held.as_deref(),
    );
    // A segment whose name does not match its first record was renamed,
    // swapped or had its start cut: say so even when the chain alone would
    // name a record.
    let misnamed = log.misnamed();
    let mut location = None;
    if let Some(prob) = report.problem.as_mut() {
        if let Some((seg, line)) = log.locate(prob.line).filter(|_| prob.line > 0) {
            location = Some(format!("{seg} line {line}"));
        }
    } else if let Some((name, seq)) = misnamed.first() {
        report.ok = false;
        report.problem = Some(clawgress_audit_log::verify::Problem {
            kind: clawgress_audit_log::verify::ProblemKind::Altered,
            line: 0,
            seq: *seq,
            detail: format!(
                "segment {name} begins with seq {} but its name says otherwise: it was renamed or its start removed",
                seq.map_or("(none)".to_string(), |s| s.to_string())
            ),
        });
    }
    if report.problem.is_none() {
        if let Some(detail) =
            unsigned_too_long(p, &log, report.records, report.covered, SystemTime::now())
        {
            report.ok = false;
            report.problem = Some(clawgress_audit_log::verify::Problem {
                kind: clawgress_audit_log::verify::ProblemKind::CutOff,
                line: 0,
                seq: None,
                detail,
            });
        }
    }
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["segments"] = serde_json::to_value(&log.segments)?;
        v["location"] = serde_json::json!(location);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Some(prob) = &report.problem {
        match &location {
            Some(at) => println!("FAIL: {} ({:?}; {at})", prob.detail, prob.kind),
            None => println!("FAIL: {} ({:?})", prob.detail, prob.kind),
        }
        if !report.bad_checkpoints.is_empty() {
            println!(
                "checkpoints: {} of {} signatures hold",
                report.checkpoints_verified,
                report.checkpoints_verified + report.bad_checkpoints.len()
            );
            for b in report.bad_checkpoints.iter().skip(1) {
                println!("FAIL: {b}");
            }
        }
    } else {
        let sealed = log.segments.iter().filter(|s| s.sealed).count();
        println!(
            "ok: {} records in {} segments ({sealed} sealed), hash chain intact, {} signed checkpoints verified (the latest covers {} records), {} consistency proofs hold{}",
            report.records,
            log.segments.len(),
            report.checkpoints_verified,
            report.covered,
            report.consistency_proofs,
            if report.covered < report.records {
                format!("; the last {} are chained but not yet under a checkpoint", report.records - report.covered)
            } else {
                String::new()
            }
        );
        if let Some(f) = &report.from {
            println!(
                "ok: the log of {} records the given checkpoint signed is a prefix of the log of {} now (consistency proof of {} hashes)",
                f.from_size,
                f.to_size,
                f.proof.len()
            );
        }
        for l in &report.torn_lines {
            let (seg, line) = log.locate(*l).unwrap_or(("?", *l));
            println!(
                "truncated: {seg} line {line} is a record cut short by a crash mid-write (kept, skipped; the chain holds past it — not tampering)"
            );
        }
    }
    Ok(report.ok)
}

/// Filters for `audit query`.
#[derive(Debug, Default)]
pub struct Query {
    pub limit: usize,
    /// `request` (default), `alert`, `admin`, `gap` or `all`.
    pub kind: String,
    /// Only records at or after this time: a duration back from now (`1h`,
    /// `15m`) or an RFC 3339 time.
    pub since: Option<String>,
    pub agent: Option<String>,
    pub decision: Option<String>,
    pub host: Option<String>,
    pub request_id: Option<String>,
}

/// Newest first, at most `limit` records matching every filter.
pub fn query(p: &Paths, q: &Query, json: bool) -> Result<()> {
    if !matches!(
        q.kind.as_str(),
        "request" | "alert" | "admin" | "gap" | "all"
    ) {
        anyhow::bail!(
            "--kind {:?}: one of request, alert, admin, gap, all",
            q.kind
        );
    }
    let log = load(p)?.text;
    let want = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|x| x == v);
    let since = match q.since.as_deref() {
        None => None,
        Some(s) => Some(match humantime::parse_duration(s) {
            // Further back than the epoch is the epoch (never a panic on
            // `--since 1000y`).
            Ok(d) => SystemTime::now()
                .checked_sub(d)
                .filter(|t| *t >= SystemTime::UNIX_EPOCH)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
                anyhow::anyhow!("--since {s:?}: a duration (1h, 15m) or an RFC 3339 time")
            })?,
        }),
    };
    let since = since.map(|t| humantime::format_rfc3339_millis(t).to_string());
    let rows: Vec<AuditRecord> = log
        .lines()
        .rev()
        .filter_map(|l| AuditRecord::from_json_line(l).ok())
        .filter(|r| {
            let kind = r.kind.as_str();
            (q.kind == "all" || q.kind == kind)
                && since.as_deref().is_none_or(|t| r.timestamp.as_str() >= t)
                && want(&q.agent, &r.agent_id)
                && want(&q.decision, &r.decision)
                && want(&q.host, &r.destination_host)
                && want(&q.request_id, &r.request_id)
        })
        .take(q.limit)
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<16} {:<8} {:<5} {:<30} {:<22} {:<20} REQUEST_ID",
        "TIMESTAMP", "AGENT", "DECISION", "CODE", "DESTINATION", "POLICY", "REASON"
    );
    for r in rows {
        println!(
            "{:<24} {:<16} {:<8} {:<5} {:<30} {:<22} {:<20} {}",
            r.timestamp,
            r.agent_id,
            r.decision,
            r.response_code,
            format!("{}:{}", r.destination_host, r.destination_port),
            r.policy_id,
            r.reason,
            r.request_id
        );
    }
    Ok(())
}
