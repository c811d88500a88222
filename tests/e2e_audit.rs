//! One audit record per request, keyed by Envoy's request id.

mod common;
#[path = "../testkit/postgres.rs"]
mod postgres;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

#[test]
fn n_requests_make_exactly_n_records_from_the_file_spool() {
    n_requests_make_exactly_n_records("file");
}

#[test]
fn n_requests_make_exactly_n_records_from_the_grpc_stream() {
    n_requests_make_exactly_n_records("grpc");
}

fn n_requests_make_exactly_n_records(input: &str) {
    let up = Upstream::http();
    let tls = Upstream::https();
    let stack = Stack::start_with_gateway(
        &format!("  audit_input: {input}\n"),
        &config_allowing(&[up.addr.port(), tls.addr.port()], ""),
    );
    let ok = format!("http://{}/a/b?secret=1", up.addr);
    let proxy = stack.proxy_url(AGENT, KEY);
    let mut deny_ids = Vec::new();
    let mut n = 0;
    for _ in 0..5 {
        assert_eq!(curl(&["-x", &proxy, &ok], &[]).status, 200);
        n += 1;
    }
    for target in ["http://example.org/", "http://example.net/x"] {
        let r = curl(&["-x", &proxy, target], &[]);
        deny_ids.push(r.json()["request_id"].as_str().expect("id").to_string());
        n += 1;
    }
    let r = curl(&["-x", &format!("http://{}", stack.proxy), &ok], &[]);
    deny_ids.push(r.json()["request_id"].as_str().expect("id").to_string());
    n += 1;
    let r = curl(
        &["-k", "-x", &proxy, &format!("https://{}/", tls.addr)],
        &[],
    );
    assert_eq!(r.status, 200);
    n += 1;

    let recs = stack.wait_audit(n);
    // Give a straggler time to show up, then insist on exactly n.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let recs2 = stack.audit_records();
    assert_eq!(recs.len(), n, "{recs:#?}");
    assert_eq!(recs2.len(), n, "records kept arriving: {recs2:#?}");

    let ids: HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), n, "one record per request id");
    for id in &deny_ids {
        assert!(
            ids.contains(id.as_str()),
            "no record for denied request {id}"
        );
    }
    let upstream_ids: Vec<String> = up
        .requests()
        .iter()
        .filter_map(|h| {
            h.iter()
                .find(|(k, _)| k == "x-request-id")
                .map(|(_, v)| v.clone())
        })
        .collect();
    for id in &upstream_ids {
        assert!(
            ids.contains(id.as_str()),
            "upstream saw {id} but the audit did not"
        );
    }

    let allowed: Vec<&serde_json::Value> =
        recs.iter().filter(|r| r["decision"] == "allow").collect();
    assert_eq!(allowed.len(), 6);
    let r = allowed[0];
    assert_eq!(r["agent_id"], "bot");
    assert_eq!(r["team_id"], "infra");
    assert_eq!(r["policy_id"], "allow-local-upstreams");
    assert_eq!(r["path"], "/a/b", "query strings are not kept");
    assert_eq!(r["response_code"], 200);
    assert_eq!(r["source_address"], "127.0.0.1");
    // The config file was committed as revision 1 of the control plane.
    assert_eq!(r["bundle_revision"], "1");
    let tunnel = recs
        .iter()
        .find(|r| r["http_method"] == "CONNECT")
        .expect("CONNECT record");
    assert_eq!(tunnel["destination_port"], tls.addr.port());
    assert!(
        tunnel["bytes_in"].as_u64().unwrap_or(0) > 100,
        "tunnel bytes counted: {tunnel}"
    );
    let anon = recs
        .iter()
        .find(|r| r["response_code"] == 407)
        .expect("407 record");
    assert_eq!(anon["reason"], "missing-credentials");
    // The chain (requests, alerts, admin actions) is numbered without gaps.
    let all = stack.all_audit_records();
    let seqs: Vec<u64> = all.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    // The query store holds the same n request records, field for field.
    let token = std::fs::read_to_string(stack.state().join("admin.token")).expect("token");
    let from_store = || -> Vec<serde_json::Value> {
        let reply = curl(
            &[
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                &format!("http://{}/api/v1/audit?limit=1000", stack.admin),
            ],
            &[],
        );
        reply.json()["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        eventually(std::time::Duration::from_secs(10), || from_store().len()
            == n),
        "query store: {:?}",
        from_store()
    );
    for stored in from_store() {
        let logged = recs
            .iter()
            .find(|r| r["seq"] == stored["seq"])
            .expect("the stored record is in the log");
        for (k, v) in stored.as_object().expect("object") {
            // The log leaves empty fields out; the table has a column each.
            if logged[k].is_null() {
                assert!(v == "" || v == 0, "field {k} of seq {}: {v}", stored["seq"]);
            } else {
                assert_eq!(&logged[k], v, "field {k} of seq {}", stored["seq"]);
            }
        }
    }
    // The chain and checkpoints survived the kill.
    let mut stack = stack;
    stack.stop();
    let (code, out) = clawgress(&[
        "audit",
        "verify",
        "--config",
        &stack.config.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
    let total = stack.all_audit_records().len();
    assert!(total >= n);
    assert!(out.contains(&format!("ok: {total} records")), "{out}");
}

#[test]
fn sink_killed_under_load_loses_nothing_and_duplicates_nothing() {
    sink_killed_under_load("file");
}

/// With `audit_input: grpc` too: what Envoy could not stream while the
/// sink was away is in the spool file it also writes (§6).
#[test]
fn sink_killed_under_load_with_the_grpc_stream_loses_nothing() {
    sink_killed_under_load("grpc");
}

fn sink_killed_under_load(input: &str) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let up = Upstream::http();
    let stack = Stack::start_with_gateway(
        &format!("  audit_input: {input}\n"),
        &config_allowing(&[up.addr.port()], ""),
    );
    let target = format!("http://{}/load", up.addr);
    let first = stack.service_pid("audit").expect("audit pid");
    let sent = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let mut killed = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                // Until the sink has been killed three times (bounded).
                for _ in 0..1_500 {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    let status = raw_get(stack.proxy, &target, AGENT, KEY);
                    assert_eq!(status, 200);
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // SIGKILL the sink three times while load flows, each time once
        // `up` has restarted it and more requests went through.
        let mut pid = first;
        for round in 1..=3usize {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while sent.load(Ordering::SeqCst) < round * 60 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            signal(pid, "KILL");
            killed.push(pid);
            assert!(
                eventually(std::time::Duration::from_secs(20), || stack
                    .service_pid("audit")
                    .is_some_and(|p| !killed.contains(&p))),
                "sink not restarted after kill {round}"
            );
            pid = stack.service_pid("audit").expect("audit pid");
        }
        // A little more load on the last sink, then stop.
        let after = sent.load(Ordering::SeqCst) + 40;
        while sent.load(Ordering::SeqCst) < after {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        done.store(true, Ordering::SeqCst);
    });
    assert_eq!(killed.len(), 3);
    let n = sent.load(Ordering::SeqCst);
    assert!(n >= 220, "{n} requests");
    let sink = first;

    assert!(
        eventually(std::time::Duration::from_secs(20), || stack
            .service_pid("audit")
            .is_some_and(|p| p != sink)),
        "sink not restarted"
    );
    let recs = stack.wait_audit(n);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let recs2 = stack.audit_records();
    assert_eq!(recs.len(), n, "records vs requests");
    assert_eq!(recs2.len(), n, "late duplicates");
    let ids: HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), n, "one record per request id");
    // Each gap was said: `up` alerts every restart of the sink.
    assert!(
        stack.stderr().matches("alert=\"child-restarted\"").count() >= 3,
        "{}",
        stack.stderr()
    );
    // The chain (requests, alerts, admin actions) is numbered without gaps.
    let all = stack.all_audit_records();
    let seqs: Vec<u64> = all.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    // And the log verifies: chain, checkpoints, consistency.
    let mut stack = stack;
    stack.stop();
    let (code, out) = clawgress(&[
        "audit",
        "verify",
        "--config",
        &stack.config.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
}

fn clawgress(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(args)
        .output()
        .expect("run clawgress");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn audit_verify_names_tampering_and_query_reads_newest_first() {
    let up = Upstream::http();
    let mut stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let proxy = stack.proxy_url(AGENT, KEY);
    for i in 0..6 {
        assert_eq!(
            curl(&["-x", &proxy, &format!("http://{}/r{i}", up.addr)], &[]).status,
            200
        );
    }
    assert_eq!(
        curl(&["-x", &proxy, "http://example.org/"], &[]).status,
        403
    );
    assert_eq!(stack.wait_audit(7).len(), 7);
    // Stopping seals the log with a signed checkpoint.
    stack.stop();
    let all = stack.all_audit_records();
    let total = all.len();
    let newest_request = stack
        .audit_records()
        .last()
        .and_then(|r| r["seq"].as_u64())
        .expect("requests");
    let cfg = stack.config.display().to_string();
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("ok: {total} records")), "{out}");

    let (code, out) = clawgress(&["audit", "query", "--config", &cfg, "--limit", "2", "--json"]);
    assert_eq!(code, 0, "{out}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rows.as_array().map(|a| a.len()), Some(2));
    assert_eq!(rows[0]["seq"], newest_request, "newest first");
    assert_eq!(rows[0]["decision"], "deny");
    let (_, out) = clawgress(&[
        "audit",
        "query",
        "--config",
        &cfg,
        "--decision",
        "allow",
        "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rows.as_array().map(|a| a.len()), Some(6));
    for (since, n) in [
        ("1h", 7),
        ("2099-01-01T00:00:00Z", 0),
        // Further back than the epoch: everything, never a panic.
        ("1000y", 7),
        ("18446744073709551615s", 7),
    ] {
        let (code, out) = clawgress(&[
            "audit", "query", "--config", &cfg, "--since", since, "--json",
        ]);
        assert_eq!(code, 0, "{out}");
        let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(rows.as_array().map(|a| a.len()), Some(n), "--since {since}");
    }
    let (code, _) = clawgress(&[
        "audit",
        "query",
        "--config",
        &cfg,
        "--since",
        "yesterday-ish",
    ]);
    assert_ne!(code, 0, "a bad --since is an error");
    // The operator's question, as a table: this agent's denials in the
    // last hour. One row (example.org), a header naming the fields.
    let (code, out) = clawgress(&[
        "audit",
        "query",
        "--config",
        &cfg,
        "--agent",
        AGENT,
        "--since",
        "1h",
        "--decision",
        "deny",
    ]);
    assert_eq!(code, 0, "{out}");
    let table: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(table.len(), 2, "a header and one row:\n{out}");
    for field in ["AGENT", "DECISION", "DESTINATION", "REQUEST_ID"] {
        assert!(table[0].contains(field), "header lacks {field}:\n{out}");
    }
    assert!(
        table[1].contains(AGENT) && table[1].contains("deny") && table[1].contains("example.org"),
        "{out}"
    );
    let (_, out) = clawgress(&[
        "audit", "query", "--config", &cfg, "--agent", "nobody", "--json",
    ]);
    assert_eq!(out.trim(), "[]", "another agent's records are not shown");

    let log = stack
        .state()
        .join("audit")
        .join(clawgress_audit_sink::segment_name(1));
    let original = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = original.lines().collect();

    // Altered: the record of /r2 says it went somewhere else.
    let at = lines
        .iter()
        .position(|l| l.contains("/r2"))
        .expect("/r2 record");
    let altered = original.replacen(lines[at], &lines[at].replace("/r2", "/innocent"), 1);
    std::fs::write(&log, &altered).expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--json"]);
    assert_eq!(code, 1, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (r["problem"]["kind"].as_str(), r["problem"]["seq"].as_u64()),
        (Some("altered"), Some(at as u64 + 1)),
        "{out}"
    );

    // Removed: record 4 deleted.
    let removed: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    std::fs::write(&log, &removed).expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (
            code,
            r["problem"]["kind"].as_str(),
            r["problem"]["seq"].as_u64()
        ),
        (1, Some("removed"), Some(4)),
        "{out}"
    );

    // A byte flipped inside a record (not a field rewrite): altered.
    let mut flipped = original.clone().into_bytes();
    let off = original.find(lines[2]).expect("line 3") + lines[2].len() / 2;
    flipped[off] ^= 0x01;
    std::fs::write(&log, &flipped).expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (code, r["problem"]["kind"].as_str()),
        (1, Some("altered")),
        "{out}"
    );

    // Inserted: record 3 written twice.
    let inserted: String = lines
        .iter()
        .enumerate()
        .flat_map(|(i, l)| if i == 2 { vec![*l, *l] } else { vec![*l] })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, &inserted).expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (
            code,
            r["problem"]["kind"].as_str(),
            r["problem"]["line"].as_u64()
        ),
        (1, Some("inserted"), Some(4)),
        "{out}"
    );

    // Reordered: records 3 and 4 swapped.
    let mut swapped = lines.clone();
    swapped.swap(2, 3);
    std::fs::write(
        &log,
        swapped.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (
            code,
            r["problem"]["kind"].as_str(),
            r["problem"]["seq"].as_u64()
        ),
        (1, Some("reordered"), Some(3)),
        "{out}"
    );

    // Cut off: the last two records gone.
    let cut: String = lines[..total - 2]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, &cut).expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cut off") && out.contains(&format!("seq {}", total - 1)),
        "{out}"
    );

    // Truncated: a crash cut the last record short (half a line, no
    // newline). Not tampering: named, kept, and the log still verifies.
    let last = lines[total - 1];
    std::fs::write(&log, format!("{original}{}", &last[..last.len() / 2])).expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("truncated: segment-") && out.contains(&format!("line {}", total + 1)),
        "{out}"
    );

    // A forged checkpoint (not signed by this node's key) is refused too.
    std::fs::write(&log, &original).expect("write");
    let cps = stack.state().join("audit").join("checkpoints.jsonl");
    let text = std::fs::read_to_string(&cps).expect("checkpoints");
    let (size, forged) = (format!("\\n{total}\\n"), format!("\\n{}\\n", total + 1));
    assert!(text.contains(&size), "{text}");
    std::fs::write(&cps, text.replacen(&size, &forged, 1)).expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BadCheckpoint"), "{out}");

    // A well-formed checkpoint over the true log, signed with another key
    // under the same name: refused.
    let leaves: Vec<[u8; 32]> = lines.iter().map(|l| rfc6962_leaf(l)).collect();
    let body = format!(
        "clawgress/audit\n{}\n{}\n",
        leaves.len(),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, mth(&leaves))
    );
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let sig = ed25519_dalek::Signer::sign(&other, body.as_bytes());
    let mut blob = vec![0u8; 4];
    blob.extend_from_slice(&sig.to_bytes());
    let note = format!(
        "{body}\n\u{2014} clawgress-audit {}\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, blob)
    );
    std::fs::write(
        &cps,
        format!("{text}{}\n", serde_json::json!({ "note": note })),
    )
    .expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BadCheckpoint"), "{out}");
    std::fs::write(&cps, &text).expect("restore");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "restored: {out}");
}

/// RFC 6962 leaf hash, written here from the RFC: SHA-256(0x00 || line).
fn rfc6962_leaf(line: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update([0u8]);
    h.update(line.as_bytes());
    h.finalize().into()
}

fn rfc6962_node(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update([1u8]);
    h.update(l);
    h.update(r);
    h.finalize().into()
}

/// The Merkle tree hash, by its recursive definition (RFC 6962 §2.1).
fn mth(leaves: &[[u8; 32]]) -> [u8; 32] {
    use sha2::Digest;
    match leaves.len() {
        0 => sha2::Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            rfc6962_node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// Consistency proof check (RFC 9162 §2.1.4.2), written here from the RFC.
fn rfc9162_consistent(
    m: u64,
    n: u64,
    first: [u8; 32],
    second: [u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    if m == 0 || m > n {
        return m == 0 && proof.is_empty();
    }
    if m == n {
        return proof.is_empty() && first == second;
    }
    let mut path = proof.to_vec();
    if m.is_power_of_two() {
        path.insert(0, first);
    }
    let (mut fn_, mut sn) = (m - 1, n - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let Some((&c0, rest)) = path.split_first() else {
        return false;
    };
    let (mut fr, mut sr) = (c0, c0);
    for c in rest {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = rfc6962_node(c, &fr);
            sr = rfc6962_node(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = rfc6962_node(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    fr == first && sr == second && sn == 0
}

#[test]
fn full_audit_storage_refuses_new_requests_with_503() {
    let up = Upstream::http();
    // More free space required than any disk has: storage counts as full.
    let stack = Stack::start(&format!(
        "audit:\n  min_free_mb: 1000000000\n{}",
        config_allowing(&[up.addr.port()], "")
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    let target = format!("http://{}/", up.addr);
    assert!(
        eventually(std::time::Duration::from_secs(10), || stack
            .state()
            .join("audit.blocked")
            .exists()),
        "{}",
        stack.stderr()
    );
    assert!(
        eventually(std::time::Duration::from_secs(5), || curl(
            &["-x", &proxy, &target],
            &[]
        )
        .status
            == 503),
        "requests still flow"
    );
    // authz polls the mark every 200 ms; from the first refusal on, nothing
    // that could not be recorded goes out.
    let before = up.requests().len();
    for _ in 0..3 {
        let r = curl(&["-x", &proxy, &target], &[]);
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.json()["reason"], "audit-unavailable");
        assert!(r.header("x-clawgress-policy").is_some());
    }
    assert_eq!(
        up.requests().len(),
        before,
        "a request went out while the audit was full"
    );
    assert!(
        stack.stderr().contains("audit-disk-full"),
        "{}",
        stack.stderr()
    );
}

/// A real full filesystem (a 384 KiB tmpfs holding `stores.audit_dir`,
/// filled to the last byte), not a threshold: the sink's writes fail with
/// ENOSPC part-way through batches, it blocks new requests instead of
/// stopping, keeps what it holds, and once space returns writes everything
/// exactly once — the log verifies, with no half-written record blamed on
/// tampering. Needs root (mount); skipped otherwise.
#[test]
fn a_really_full_disk_blocks_then_resumes_with_nothing_lost_or_doubled() {
    let Some(fs) = common::Tmpfs::mount("384k", "0700") else {
        return;
    };
    let mnt = fs.path.clone();

    let up = Upstream::http();
    // min_free_mb 0: no threshold, only the failing writes say "full".
    let mut stack = Stack::start(&format!(
        "stores:\n  audit_dir: {}\naudit:\n  min_free_mb: 0\n{}",
        mnt.display(),
        config_allowing(&[up.addr.port()], "")
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    let target = |i: usize| format!("http://{}/r{i}", up.addr);
    let records = || -> Vec<serde_json::Value> {
        clawgress_audit_sink::read_log(&mnt)
            .map(|l| l.text)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] == "request")
            .collect()
    };
    let mut sent = 0;
    for _ in 0..5 {
        assert_eq!(curl(&["-x", &proxy, &target(sent)], &[]).status, 200);
        sent += 1;
    }
    assert!(eventually(std::time::Duration::from_secs(15), || records()
        .len()
        == 5));

    // Fill the filesystem to the last byte.
    let filler = fs.fill();
    // Requests keep coming, eight at a time (so the sink's batches hold
    // several records when a write runs out of space part-way), until the
    // sink, failing to write them, blocks.
    let mut refused = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while refused == 0 && std::time::Instant::now() < deadline {
        let burst: Vec<_> = (0..8)
            .map(|k| {
                let (proxy, url) = (proxy.clone(), target(sent + k));
                std::thread::spawn(move || curl(&["-x", &proxy, &url], &[]))
            })
            .collect();
        sent += burst.len();
        for t in burst {
            let r = t.join().expect("curl thread");
            match r.status {
                200 => {}
                503 => {
                    assert_eq!(r.json()["reason"], "audit-unavailable", "{r:?}");
                    refused += 1;
                }
                other => panic!("unexpected {other}: {r:?}"),
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        refused > 0,
        "no refusal while the disk was full:\n{}",
        stack.stderr()
    );
    assert!(stack.state().join("audit.blocked").exists());
    assert!(
        stack.stderr().contains("audit-disk-full"),
        "{}",
        stack.stderr()
    );
    // Held, not stopped: the sink is not restarted while it waits.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !stack.stderr().contains("child-restarted"),
        "the sink stopped:\n{}",
        stack.stderr()
    );
    let held = records().len();
    assert!(
        held < sent,
        "some records wait for space ({held} of {sent})"
    );

    // Space returns: the mark goes, requests flow, and every request is
    // in the log exactly once.
    std::fs::remove_file(&filler).expect("rm filler");
    assert!(
        eventually(std::time::Duration::from_secs(15), || !stack
            .state()
            .join("audit.blocked")
            .exists()),
        "{}",
        stack.stderr()
    );
    // authz looks at the mark every 200 ms; refused ones are records too.
    assert!(eventually(std::time::Duration::from_secs(5), || {
        sent += 1;
        curl(&["-x", &proxy, &target(sent - 1)], &[]).status == 200
    }));
    for _ in 0..2 {
        assert_eq!(curl(&["-x", &proxy, &target(sent)], &[]).status, 200);
        sent += 1;
    }
    assert!(
        eventually(std::time::Duration::from_secs(20), || records().len()
            >= sent),
        "{} of {sent} records",
        records().len()
    );
    stack.stop();
    let recs = records();
    let ids: std::collections::HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(
        (recs.len(), ids.len()),
        (sent, sent),
        "one record per request"
    );
    let cfg = stack.config.display().to_string();
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("torn") && !out.contains("truncated"),
        "no half-written record: {out}"
    );
}

/// The spool (Envoy's access-log file) on a filesystem that fills to the
/// last byte: Envoy's next write is cut short at the end of the space and,
/// once space returns, the next entry is written straight after the cut
/// one on the same line. That entry is still recorded (the sink reads it
/// out of the damaged line) and the cut one is counted in a signed gap
/// record, so nothing goes unaccounted. Needs root (mount); skipped
/// otherwise.
#[test]
fn an_entry_written_after_one_cut_short_by_a_full_spool_disk_is_recorded() {
    let Some(fs) = common::Tmpfs::mount("256k", "0755") else {
        return;
    };
    let mnt = fs.path.clone();
    let up = Upstream::http();
    // min_free_mb 0: no threshold; the sink's own log is elsewhere.
    let mut stack = Stack::start(&format!(
        "stores:\n  audit_spool_dir: {}\naudit:\n  min_free_mb: 0\n{}",
        mnt.display(),
        config_allowing(&[up.addr.port()], "")
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    let get = |name: &str| curl(&["-x", &proxy, &format!("http://{}/{name}", up.addr)], &[]);
    for i in 0..3 {
        assert_eq!(get(&format!("before{i}")).status, 200);
    }
    assert_eq!(stack.wait_audit(3).len(), 3);
    // Fill the filesystem to the last byte; the access log's last page
    // still has room for part of an entry.
    let filler = fs.fill();
    // One entry per flush (Envoy flushes every 200 ms) until the page is
    // used up: one of them is cut short, the rest are not written at all.
    for i in 0..8 {
        assert_eq!(get(&format!("full{i}")).status, 200);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    std::fs::remove_file(&filler).expect("rm filler");
    for i in 0..3 {
        assert_eq!(get(&format!("after{i}")).status, 200);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let path_of = |r: &serde_json::Value| r["path"].as_str().unwrap_or_default().to_string();
    assert!(
        eventually(std::time::Duration::from_secs(15), || {
            let paths: Vec<String> = stack.audit_records().iter().map(path_of).collect();
            (0..3).all(|i| paths.contains(&format!("/after{i}")))
        }),
        "{:?}\n{}",
        stack
            .audit_records()
            .iter()
            .map(path_of)
            .collect::<Vec<_>>(),
        stack.stderr()
    );
    // Each exactly once.
    let paths: Vec<String> = stack.audit_records().iter().map(path_of).collect();
    for i in 0..3 {
        let p = format!("/after{i}");
        assert_eq!(paths.iter().filter(|x| **x == p).count(), 1, "{paths:?}");
    }
    // The cut entry, if the space ended inside one (it almost always
    // does), is a line that does not parse: counted in a gap record.
    let spool = std::fs::read(mnt.join("envoy-access.log")).expect("spool");
    let cut = spool
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .any(|l| serde_json::from_slice::<serde_json::Value>(l).is_err());
    let gaps: Vec<serde_json::Value> = stack
        .all_audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "gap" && r["reason"] == "input-unreadable")
        .collect();
    assert_eq!(gaps.len(), usize::from(cut), "{gaps:?}");
    // The writes Envoy could not make at all (full0..7 after the cut one)
    // are not in the spool; `up` says so from Envoy's own counter.
    assert!(
        eventually(std::time::Duration::from_secs(10), || stack
            .stderr()
            .contains("audit-spool-write-failed")),
        "{}",
        stack.stderr()
    );
    stack.stop();
    let cfg = stack.config.display().to_string();
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn full_audit_storage_with_on_full_allow_keeps_traffic_flowing() {
    let up = Upstream::http();
    let stack = Stack::start(&format!(
        "audit:\n  min_free_mb: 1000000000\n  on_full: allow\n{}",
        config_allowing(&[up.addr.port()], "")
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    let target = format!("http://{}/", up.addr);
    assert!(
        eventually(std::time::Duration::from_secs(10), || stack
            .stderr()
            .contains("alert=\"audit-disk-full\"")),
        "{}",
        stack.stderr()
    );
    for _ in 0..3 {
        assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!stack.state().join("audit.blocked").exists());
    assert!(stack.audit_records().is_empty(), "nothing kept while full");
}

/// RFC 6962 / 9162, written here from the RFC, independent of the code
/// under test: the root a proof leads to.
fn rfc6962_root(leaf: [u8; 32], index: u64, size: u64, proof: &[[u8; 32]]) -> Option<[u8; 32]> {
    use sha2::Digest;
    let node = |l: &[u8; 32], r: &[u8; 32]| -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update([1u8]);
        h.update(l);
        h.update(r);
        h.finalize().into()
    };
    if index >= size {
        return None;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = leaf;
    for p in proof {
        if sn == 0 {
            return None;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    (sn == 0).then_some(r)
}

#[test]
fn audit_prove_gives_an_inclusion_proof_an_independent_verifier_accepts() {
    use base64::Engine;
    use sha2::Digest;
    let b64 = base64::engine::general_purpose::STANDARD;
    let up = Upstream::http();
    let mut stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let proxy = stack.proxy_url(AGENT, KEY);
    for i in 0..5 {
        let target = format!("http://{}/p{i}", up.addr);
        assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    }
    let recs = stack.wait_audit(5);
    let id = recs[2]["request_id"].as_str().expect("id").to_string();
    stack.stop(); // seals: the last checkpoint covers everything
    let cfg = stack.config.display().to_string();
    let (code, out) = clawgress(&["audit", "prove", &id, "--config", &cfg, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let line = v["record"].as_str().expect("record");
    assert!(line.contains(&id));
    // The leaf, recomputed: SHA-256(0x00 || line).
    let mut h = sha2::Sha256::new();
    h.update([0u8]);
    h.update(line.as_bytes());
    let leaf: [u8; 32] = h.finalize().into();
    assert_eq!(v["leaf_hash"], b64.encode(leaf));
    let proof: Vec<[u8; 32]> = v["proof"]
        .as_array()
        .expect("proof")
        .iter()
        .map(|p| {
            b64.decode(p.as_str().expect("b64"))
                .expect("b64")
                .try_into()
                .expect("32 bytes")
        })
        .collect();
    let root = rfc6962_root(
        leaf,
        v["leaf_index"].as_u64().expect("index"),
        v["tree_size"].as_u64().expect("size"),
        &proof,
    )
    .expect("proof shape");
    assert_eq!(
        v["root_hash"],
        b64.encode(root),
        "the proof leads to the signed root"
    );
    // The checkpoint note carries that root and size, signed by the node's key.
    let note = v["checkpoint"].as_str().expect("note");
    let (body, sigs) = note.split_once("\n\n").expect("note body");
    let mut lines = body.lines();
    let _origin = lines.next();
    assert_eq!(lines.next(), Some(v["tree_size"].to_string().as_str()));
    assert_eq!(lines.next(), v["root_hash"].as_str());
    let sig_line = sigs.lines().next().expect("signature line");
    let blob = b64
        .decode(sig_line.rsplit(' ').next().expect("sig"))
        .expect("b64");
    let pubhex = std::fs::read_to_string(stack.state().join("keys/audit.pub")).expect("pub");
    let mut pk = [0u8; 32];
    hex::decode_to_slice(pubhex.trim(), &mut pk).expect("hex");
    let key = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("key");
    let sig = ed25519_dalek::Signature::from_slice(&blob[4..]).expect("sig");
    key.verify_strict(format!("{body}\n").as_bytes(), &sig)
        .expect("checkpoint signed by the node's audit key");
    // An unknown request id is an error, not a proof.
    let (code, _) = clawgress(&["audit", "prove", "no-such-id", "--config", &cfg]);
    assert_ne!(code, 0);
}

#[test]
fn sealed_segments_verify_and_a_swapped_or_missing_segment_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let up = Upstream::http();
    let mut stack = Stack::start(&format!(
        "audit:\n  segment_records: 3\n{}",
        config_allowing(&[up.addr.port()], "")
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    for i in 0..10 {
        assert_eq!(
            curl(&["-x", &proxy, &format!("http://{}/s{i}", up.addr)], &[]).status,
            200
        );
        // Separate batches, so segments fill one record at a time.
        stack.wait_audit(i + 1);
    }
    stack.stop();
    let audit = stack.state().join("audit");
    let cfg = stack.config.display().to_string();
    let segments = clawgress_audit_sink::list_segments(&audit).expect("segments");
    assert!(segments.len() >= 4, "{segments:?}");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    for (_, p) in &segments[..segments.len() - 1] {
        assert_eq!(mode(p), 0o400, "{} sealed read-only", p.display());
    }

    // A checkpoint a third party kept (the first one) is extended by the log.
    let cps = std::fs::read_to_string(audit.join("checkpoints.jsonl")).expect("checkpoints");
    let first: serde_json::Value =
        serde_json::from_str(cps.lines().next().expect("a checkpoint")).expect("json");
    let held = stack.state().join("held-checkpoint");
    std::fs::write(&held, first["note"].as_str().expect("note")).expect("write");
    let held_s = held.display().to_string();
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--from", &held_s]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("is a prefix of the log"), "{out}");
    // The consistency proof it gives, checked independently: leaves and
    // roots recomputed from the segment files by the RFC's definitions.
    let (_, out) = clawgress(&[
        "audit", "verify", "--config", &cfg, "--from", &held_s, "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let (m, n) = (
        v["from"]["from_size"].as_u64().expect("from"),
        v["from"]["to_size"].as_u64().expect("to"),
    );
    let leaves: Vec<[u8; 32]> = segments
        .iter()
        .flat_map(|(_, p)| {
            std::fs::read_to_string(p)
                .expect("segment")
                .lines()
                .map(rfc6962_leaf)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(m < n && n as usize <= leaves.len(), "{out}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let proof: Vec<[u8; 32]> = v["from"]["proof"]
        .as_array()
        .expect("proof")
        .iter()
        .map(|h| {
            base64::Engine::decode(&b64, h.as_str().expect("b64"))
                .expect("b64")
                .try_into()
                .expect("32 bytes")
        })
        .collect();
    let held_note = first["note"].as_str().expect("note");
    let held_root = held_note.lines().nth(2).expect("root line");
    assert_eq!(
        held_root,
        base64::Engine::encode(&b64, mth(&leaves[..m as usize]))
    );
    assert!(rfc9162_consistent(
        m,
        n,
        mth(&leaves[..m as usize]),
        mth(&leaves[..n as usize]),
        &proof
    ));
    let mut bad = proof.clone();
    if let Some(h) = bad.last_mut() {
        h[0] ^= 1;
        assert!(!rfc9162_consistent(
            m,
            n,
            mth(&leaves[..m as usize]),
            mth(&leaves[..n as usize]),
            &bad
        ));
    }
    assert_eq!(
        v["segments"].as_array().map(Vec::len),
        Some(segments.len()),
        "{out}"
    );

    // A held checkpoint whose signature does not hold is refused.
    std::fs::write(
        &held,
        first["note"]
            .as_str()
            .expect("note")
            .replace("clawgress/audit", "clawgress/other"),
    )
    .expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--from", &held_s]);
    assert_eq!(code, 1, "{out}");

    // Two sealed segments swapped: named.
    let (a, b) = (&segments[0].1, &segments[1].1);
    let (ta, tb) = (std::fs::read(a).expect("a"), std::fs::read(b).expect("b"));
    let put = |p: &std::path::Path, t: &[u8]| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(p, t).expect("write");
    };
    put(a, &tb);
    put(b, &ta);
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("segment-"), "the segment is named: {out}");
    put(a, &ta);
    put(b, &tb);
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "restored: {out}");

    // The checkpoints removed: anyone who can write the files could have
    // rewritten the chain (its hashes need no key), so it is not intact.
    let cps_path = audit.join("checkpoints.jsonl");
    let kept = std::fs::read_to_string(&cps_path).expect("checkpoints");
    std::fs::remove_file(&cps_path).expect("rm");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is sealed") && out.contains("checkpoints were removed"),
        "{out}"
    );
    // Only the last (taken at stop) removed: the unsealed tail is under no
    // checkpoint. Fresh, that is a sink that has not signed yet; written
    // minutes ago, it is a cut.
    let lines: Vec<&str> = kept.lines().collect();
    std::fs::write(&cps_path, lines[..lines.len() - 1].join("\n") + "\n").expect("write");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not yet under a checkpoint"), "{out}");
    let tail = &segments.last().expect("segments").1;
    std::fs::File::options()
        .write(true)
        .open(tail)
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(120)))
        .expect("set mtime");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("under no signed checkpoint"), "{out}");
    std::fs::write(&cps_path, &kept).expect("restore");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg]);
    assert_eq!(code, 0, "restored: {out}");

    // A middle segment deleted: records removed, where they were.
    std::fs::remove_file(&segments[1].1).expect("rm");
    let (code, out) = clawgress(&["audit", "verify", "--config", &cfg, "--json"]);
    assert_eq!(code, 1, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(r["problem"]["kind"], "removed", "{out}");
    assert_eq!(r["problem"]["seq"].as_u64(), Some(segments[1].0), "{out}");
    let name = segments[2]
        .1
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert!(
        r["location"].as_str().is_some_and(|l| l.starts_with(&name)),
        "{out}"
    );
}

/// Rows in PostgreSQL's `audit_records` of kind request: (all, distinct ids).
fn pg_request_rows(url: &str) -> Option<(i64, i64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect(url)
            .await
            .ok()?;
        let row: (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM audit_records WHERE kind = 'request'",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        Some(row)
    })
}

#[test]
fn postgres_query_store_through_envoy_catches_up_after_a_database_restart() {
    let Some(mut pg) = postgres::Postgres::start() else {
        eprintln!("skipped: needs root and Debian's postgresql (scripts/test.sh installs it)");
        return;
    };
    let url = pg.url();
    let up = Upstream::http();
    let stack = Stack::start(&format!(
        "stores:\n  audit_query: \"{url}\"\n{}",
        config_allowing(&[up.addr.port()], "")
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    let send = |from: usize, to: usize| {
        for i in from..to {
            assert_eq!(
                curl(&["-x", &proxy, &format!("http://{}/pg{i}", up.addr)], &[]).status,
                200
            );
        }
    };
    send(0, 5);
    assert!(
        eventually(Duration::from_secs(20), || pg_request_rows(&url)
            == Some((5, 5))),
        "5 rows in PostgreSQL: {:?}",
        pg_request_rows(&url)
    );
    // The database goes away: requests still flow and reach the log.
    pg.stop();
    send(5, 10);
    assert_eq!(stack.wait_audit(10).len(), 10);
    // Longer than the store waits for a connection (5 s): the insert fails.
    assert!(
        eventually(Duration::from_secs(15), || stack
            .stderr()
            .contains("audit-query-store-failed")),
        "the outage raised an alert: {}",
        stack.stderr()
    );
    // It comes back: the sink catches up from the log, nothing twice.
    pg.restart();
    assert!(
        eventually(Duration::from_secs(30), || pg_request_rows(&url)
            == Some((10, 10))),
        "10 rows after the restart: {:?}\n{}",
        pg_request_rows(&url),
        stack.stderr()
    );
    // The admin API reads the same store.
    let token = std::fs::read_to_string(stack.state().join("admin.token")).expect("token");
    let reply = curl(
        &[
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            &format!("http://{}/api/v1/audit?limit=100", stack.admin),
        ],
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    let paths: HashSet<&str> = v["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["path"].as_str())
        .collect();
    for i in 0..10 {
        assert!(paths.contains(format!("/pg{i}").as_str()), "{v}");
    }
}
