//! Check an audit log against its hash chain and signed checkpoints, and
//! name the first record that was altered, inserted, removed or cut off.

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use crate::chain::{
    consistency_proof, leaf_hash, line_hash, verify_consistency, Checkpoint, Hash,
    MerkleAccumulator, GENESIS,
};
use crate::AuditRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    Altered,
    Inserted,
    Removed,
    Reordered,
    CutOff,
    BadCheckpoint,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// 1-based line in the log file (0 when it concerns the end of the log
    /// or a checkpoint).
    pub line: usize,
    pub seq: Option<u64>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub ok: bool,
    pub records: u64,
    pub checkpoints_verified: usize,
    /// Every checkpoint whose signature does not hold (1-based position in
    /// the checkpoint file, and why); the first is also the `problem`.
    pub bad_checkpoints: Vec<String>,
    /// The largest tree size a verified checkpoint covers.
    pub covered: u64,
    /// Partial records left by a crash mid-write (kept, skipped).
    pub torn_lines: Vec<usize>,
    /// Consistency proofs checked: between each pair of successive
    /// checkpoints, and from `--from` to the latest.
    pub consistency_proofs: usize,
    /// With `--from`: the held checkpoint's size, the latest's, and the
    /// proof that the first is a prefix of the second.
    pub from: Option<FromCheck>,
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FromCheck {
    pub from_size: u64,
    pub to_size: u64,
    /// Base64 hashes (RFC 6962 consistency proof).
    pub proof: Vec<String>,
}

/// Verify `log` (the text of `audit.jsonl`) against `notes` (signed
/// checkpoints), with the log's public key.
pub fn verify(log: &str, notes: &[String], key_name: &str, key: &VerifyingKey) -> Report {
    verify_from(log, notes, key_name, key, None)
}

/// [`verify`], and with `from` (a signed checkpoint someone kept from
/// earlier), also prove that the log at that checkpoint is a prefix of the
/// log now (an RFC 6962 consistency proof to the latest checkpoint): the
/// check a third party makes without trusting the operator's files.
pub fn verify_from(
    log: &str,
    notes: &[String],
    key_name: &str,
    key: &VerifyingKey,
    from: Option<&str>,
) -> Report {
    let mut report = Report {
        ok: false,
        records: 0,
        checkpoints_verified: 0,
        covered: 0,
        torn_lines: Vec::new(),
        bad_checkpoints: Vec::new(),
        consistency_proofs: 0,
        from: None,
        problem: None,
    };
    let held = match from.map(|n| Checkpoint::verify(n, key_name, key)) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            report.problem = Some(Problem {
                kind: ProblemKind::BadCheckpoint,
                line: 0,
                seq: None,
                detail: format!("the checkpoint given with --from: {e}"),
            });
            return report;
        }
    };
    // Checkpoints first: their signatures, sorted by size.
    // Each one is judged, so the report says which hold and which do not.
    let mut cps: Vec<Checkpoint> = Vec::new();
    for (i, note) in notes.iter().enumerate() {
        match Checkpoint::verify(note, key_name, key) {
            Ok(c) => cps.push(c),
            Err(e) => report
                .bad_checkpoints
                .push(format!("checkpoint #{}: {e}", i + 1)),
        }
    }
    if let Some(first) = report.bad_checkpoints.first() {
        report.checkpoints_verified = cps.len();
        report.problem = Some(Problem {
            kind: ProblemKind::BadCheckpoint,
            line: 0,
            seq: None,
            detail: first.clone(),
        });
        return report;
    }
    cps.sort_by_key(|c| c.size);
    report.checkpoints_verified = cps.len();
    let mut next_cp = cps.iter().peekable();

    let mut acc = MerkleAccumulator::default();
    let mut leaves: Vec<Hash> = Vec::new();
    let mut prev_hash = GENESIS.to_string();
    let mut prev_seq = 0u64;
    let mut prev_line = 0usize;
    let lines: Vec<&str> = log.split('\n').collect();
    let last = lines.len().saturating_sub(1);
    let fail = |report: &mut Report, kind, line, seq, detail: String| {
        report.problem = Some(Problem {
            kind,
            line,
            seq,
            detail,
        });
    };
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        let r = match AuditRecord::from_json_line(line) {
            Ok(r) => r,
            Err(e) => {
                // A partial record from a crash mid-write is kept and
                // skipped by the writer: accept it only if the next record
                // chains to the last good one (checked when it comes).
                let next_chains = lines[i + 1..]
                    .iter()
                    .find(|l| !l.is_empty())
                    .and_then(|l| AuditRecord::from_json_line(l).ok())
                    .is_none_or(|nr| nr.prev_hash == prev_hash);
                if next_chains && (i == last || !line.ends_with('}')) {
                    report.torn_lines.push(n);
                    continue;
                }
                fail(
                    &mut report,
                    ProblemKind::Altered,
                    n,
                    None,
                    format!("line {n} is not an audit record: {e}"),
                );
                return report;
            }
        };
        let expected = prev_seq + 1;
        if r.prev_hash != prev_hash {
            let (kind, line, seq, detail) = if r.seq == expected {
                (
                    ProblemKind::Altered,
                    prev_line,
                    Some(prev_seq),
                    format!("record seq {prev_seq} (line {prev_line}) was altered: seq {} does not chain to it", r.seq),
                )
            } else if r.seq > expected
                && lines[i + 1..].iter().any(|l| {
                    AuditRecord::from_json_line(l).is_ok_and(|later| later.seq == expected)
                })
            {
                (
                    ProblemKind::Reordered,
                    n,
                    Some(expected),
                    format!(
                        "records were reordered: seq {} stands at line {n}, where seq {expected} was due (it comes later)",
                        r.seq
                    ),
                )
            } else if r.seq > expected {
                (
                    ProblemKind::Removed,
                    n,
                    Some(expected),
                    format!(
                        "records seq {expected}..{} were removed before line {n}",
                        r.seq - 1
                    ),
                )
            } else {
                (
                    ProblemKind::Inserted,
                    n,
                    Some(r.seq),
                    format!(
                        "a record was inserted before line {n} (seq {} where {expected} was due)",
                        r.seq
                    ),
                )
            };
            fail(&mut report, kind, line, seq, detail);
            return report;
        }
        if r.seq != expected {
            fail(
                &mut report,
                ProblemKind::Altered,
                n,
                Some(r.seq),
                format!(
                    "record at line {n} was altered: seq {} where {expected} was due",
                    r.seq
                ),
            );
            return report;
        }
        prev_hash = line_hash(line);
        prev_seq = r.seq;
        prev_line = n;
        let leaf = leaf_hash(line);
        acc.push(leaf);
        leaves.push(leaf);
        while let Some(cp) = next_cp.peek() {
            if cp.size != acc.size() {
                break;
            }
            if cp.root != acc.root() {
                fail(
                    &mut report,
                    ProblemKind::Altered,
                    n,
                    Some(r.seq),
                    format!("the log's first {} records do not match their signed checkpoint: a record at or before seq {} was altered", cp.size, cp.size),
                );
                return report;
            }
            report.covered = cp.size;
            next_cp.next();
        }
    }
    report.records = acc.size();
    if let Some(cp) = next_cp.next() {
        let (size, have) = (cp.size, report.records);
        fail(
            &mut report,
            ProblemKind::CutOff,
            0,
            Some(have + 1),
            format!("the log ends after {have} records but a signed checkpoint covers {size}: records from seq {} on were cut off", have + 1),
        );
        return report;
    }
    // Each checkpoint's tree is a prefix of the next one's.
    for w in cps.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let proof = consistency_proof(&leaves[..b.size as usize], a.size as usize);
        if !verify_consistency(a.size, b.size, a.root, b.root, &proof) {
            fail(
                &mut report,
                ProblemKind::BadCheckpoint,
                0,
                None,
                format!(
                    "checkpoints of {} and {} records are not consistent",
                    a.size, b.size
                ),
            );
            return report;
        }
        report.consistency_proofs += 1;
    }
    if let Some(held) = held {
        let Some(latest) = cps.last() else {
            fail(
                &mut report,
                ProblemKind::CutOff,
                0,
                None,
                format!("the log has no signed checkpoint, but the one given with --from covers {} records", held.size),
            );
            return report;
        };
        if held.size > latest.size {
            fail(
                &mut report,
                ProblemKind::CutOff,
                0,
                Some(latest.size + 1),
                format!(
                    "the checkpoint given with --from covers {} records, the log's latest only {}: records were cut off",
                    held.size, latest.size
                ),
            );
            return report;
        }
        let proof = consistency_proof(&leaves[..latest.size as usize], held.size as usize);
        if !verify_consistency(held.size, latest.size, held.root, latest.root, &proof) {
            fail(
                &mut report,
                ProblemKind::Altered,
                0,
                None,
                format!(
                    "the log's first {} records are not the ones the checkpoint given with --from signed: the log was rewritten since",
                    held.size
                ),
            );
            return report;
        }
        report.consistency_proofs += 1;
        let b64 = base64::engine::general_purpose::STANDARD;
        report.from = Some(FromCheck {
            from_size: held.size,
            to_size: latest.size,
            proof: proof
                .iter()
                .map(|h| base64::Engine::encode(&b64, h))
                .collect(),
        });
    }
    report.ok = true;
    report
}

/// An RFC 6962 inclusion proof of one record against the latest signed
/// checkpoint that covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inclusion {
    /// 0-based leaf index (partial lines a crash left are not leaves).
    pub leaf_index: u64,
    pub tree_size: u64,
    pub leaf_hash: String,
    pub root_hash: String,
    pub proof: Vec<String>,
    pub record: String,
    pub checkpoint: String,
    /// The proof was checked against the signed root here.
    pub verified: bool,
}

/// Where the record `pick` selects stands: `Ok(None)` when it is in the
/// log but no signed checkpoint covers it yet; `Err` when it is not in the
/// log. Hashes base64, as in the checkpoint notes.
pub fn inclusion(
    log: &str,
    notes: &[String],
    key_name: &str,
    key: &VerifyingKey,
    pick: impl Fn(&AuditRecord) -> bool,
) -> Result<Option<Inclusion>, String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| AuditRecord::from_json_line(l).is_ok())
        .collect();
    let index = lines
        .iter()
        .position(|l| AuditRecord::from_json_line(l).is_ok_and(|r| pick(&r)))
        .ok_or_else(|| "no such record in the audit log".to_string())?;
    let best = notes
        .iter()
        .rev()
        .filter_map(|n| Checkpoint::verify(n, key_name, key).ok().map(|c| (n, c)))
        .find(|(_, c)| c.size as usize > index && c.size as usize <= lines.len());
    let Some((note, cp)) = best else {
        return Ok(None);
    };
    let leaves: Vec<Hash> = lines[..cp.size as usize]
        .iter()
        .map(|l| leaf_hash(l))
        .collect();
    let proof = crate::chain::inclusion_proof(&leaves, index);
    let verified =
        crate::chain::verify_inclusion(leaves[index], index as u64, cp.size, &proof, cp.root);
    Ok(Some(Inclusion {
        leaf_index: index as u64,
        tree_size: cp.size,
        leaf_hash: b64.encode(leaves[index]),
        root_hash: b64.encode(cp.root),
        proof: proof.iter().map(|h| b64.encode(h)).collect(),
        record: lines[index].to_string(),
        checkpoint: note.clone(),
        verified,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::merkle_root;
    use ed25519_dalek::SigningKey;

    fn build(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let r = AuditRecord {
                    seq,
                    request_id: format!("r{seq}"),
                    prev_hash: prev.clone(),
                    ..Default::default()
                };
                let line = r.to_json_line();
                prev = line_hash(&line);
                line
            })
            .collect()
    }

    fn note(lines: &[String], size: usize, key: &SigningKey) -> String {
        let leaves: Vec<_> = lines[..size].iter().map(|l| leaf_hash(l)).collect();
        Checkpoint {
            origin: "clawgress/audit".into(),
            size: size as u64,
            root: merkle_root(&leaves),
        }
        .sign("k", key)
    }

    fn text(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn a_held_checkpoint_catches_history_rewritten_with_the_signing_key() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let vk = key.verifying_key();
        let lines = build(10);
        let held = note(&lines, 6, &key);
        let notes = vec![note(&lines, 4, &key), note(&lines, 10, &key)];
        let r = verify_from(&text(&lines), &notes, "k", &vk, Some(&held));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.consistency_proofs, 2);
        assert_eq!(
            r.from.as_ref().map(|f| (f.from_size, f.to_size)),
            Some((6, 10))
        );

        // Someone with the signing key rebuilds the log from record 3 on,
        // re-chains it and signs fresh checkpoints: it verifies on its own…
        let mut prev = line_hash(&lines[1]);
        let forged: Vec<String> = lines[..2]
            .iter()
            .cloned()
            .chain((3..=10).map(|seq| {
                let r = AuditRecord {
                    seq,
                    request_id: format!("forged{seq}"),
                    prev_hash: prev.clone(),
                    ..Default::default()
                };
                let l = r.to_json_line();
                prev = line_hash(&l);
                l
            }))
            .collect();
        let fnotes = vec![note(&forged, 10, &key)];
        assert!(verify(&text(&forged), &fnotes, "k", &vk).ok);
        // …but not against the checkpoint a third party kept.
        let r = verify_from(&text(&forged), &fnotes, "k", &vk, Some(&held));
        assert_eq!(r.problem.map(|p| p.kind), Some(ProblemKind::Altered));
        // A log cut back below the held checkpoint, re-signed, is caught too.
        let short = vec![note(&lines, 5, &key)];
        let r = verify_from(&text(&lines[..5]), &short, "k", &vk, Some(&held));
        assert_eq!(r.problem.map(|p| p.kind), Some(ProblemKind::CutOff));
        // A held checkpoint signed by another key is refused.
        let other = note(&lines, 6, &SigningKey::from_bytes(&[2; 32]));
        let r = verify_from(&text(&lines), &notes, "k", &vk, Some(&other));
        assert_eq!(r.problem.map(|p| p.kind), Some(ProblemKind::BadCheckpoint));
    }

    #[test]
    fn every_checkpoint_is_judged_and_each_bad_one_named() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let lines = build(10);
        let notes = vec![
            note(&lines, 2, &key),
            note(&lines, 4, &other),
            note(&lines, 6, &key),
            note(&lines, 8, &other),
            note(&lines, 10, &key),
        ];
        let r = verify(&text(&lines), &notes, "k", &key.verifying_key());
        assert!(!r.ok);
        assert_eq!(r.checkpoints_verified, 3, "{r:?}");
        assert_eq!(r.bad_checkpoints.len(), 2, "{r:?}");
        assert!(r.bad_checkpoints[0].starts_with("checkpoint #2"), "{r:?}");
        assert!(r.bad_checkpoints[1].starts_with("checkpoint #4"), "{r:?}");
        assert_eq!(r.problem.map(|p| p.kind), Some(ProblemKind::BadCheckpoint));
    }

    #[test]
    fn intact_logs_verify() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let lines = build(10);
        let notes = vec![note(&lines, 4, &key), note(&lines, 10, &key)];
        let r = verify(&text(&lines), &notes, "k", &key.verifying_key());
        assert!(r.ok, "{r:?}");
        assert_eq!((r.records, r.checkpoints_verified, r.covered), (10, 2, 10));
    }

    #[test]
    fn each_kind_of_tampering_is_named() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let vk = key.verifying_key();
        let lines = build(10);
        let notes = vec![note(&lines, 10, &key)];

        let mut altered = lines.clone();
        altered[4] = altered[4].replace("\"r5\"", "\"r5x\"");
        let r = verify(&text(&altered), &notes, "k", &vk);
        let p = r.problem.expect("problem");
        assert_eq!(
            (p.kind, p.seq, p.line),
            (ProblemKind::Altered, Some(5), 5),
            "{p:?}"
        );

        let mut last_altered = lines.clone();
        last_altered[9] = last_altered[9].replace("\"r10\"", "\"rX\"");
        let p = verify(&text(&last_altered), &notes, "k", &vk)
            .problem
            .expect("problem");
        assert_eq!(p.kind, ProblemKind::Altered, "{p:?}");

        let mut removed = lines.clone();
        removed.remove(3);
        let p = verify(&text(&removed), &notes, "k", &vk)
            .problem
            .expect("problem");
        assert_eq!((p.kind, p.seq), (ProblemKind::Removed, Some(4)), "{p:?}");

        let mut inserted = lines.clone();
        inserted.insert(6, lines[2].clone());
        let p = verify(&text(&inserted), &notes, "k", &vk)
            .problem
            .expect("problem");
        assert_eq!(p.kind, ProblemKind::Inserted, "{p:?}");

        let cut = &lines[..7];
        let p = verify(&text(cut), &notes, "k", &vk)
            .problem
            .expect("problem");
        assert_eq!((p.kind, p.seq), (ProblemKind::CutOff, Some(8)), "{p:?}");

        let forged = vec![note(&lines, 10, &SigningKey::from_bytes(&[2; 32]))];
        let p = verify(&text(&lines), &forged, "k", &vk)
            .problem
            .expect("problem");
        assert_eq!(p.kind, ProblemKind::BadCheckpoint, "{p:?}");
    }

    #[test]
    fn a_torn_record_from_a_crash_is_tolerated() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let lines = build(3);
        // Crash mid-write of record 3, then the writer continues with a
        // record that chains to record 2.
        let mut t = text(&lines[..2]);
        t.push_str(&lines[2][..20]);
        t.push('\n');
        t.push_str(&lines[2]);
        t.push('\n');
        let r = verify(&t, &[note(&lines, 3, &key)], "k", &key.verifying_key());
        assert!(r.ok, "{r:?}");
        assert_eq!(r.torn_lines, vec![3]);
    }
}
