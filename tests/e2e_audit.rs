//! One audit record per request, keyed by Envoy's request id.

mod common;

use std::collections::HashSet;

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
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let target = format!("http://{}/load", up.addr);
    let sink = stack.service_pid("audit").expect("audit pid");
    let sent = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..60 {
                    let status = raw_get(stack.proxy, &target, AGENT, KEY);
                    assert_eq!(status, 200);
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        s.spawn(|| {
            // Kill the sink once load is flowing.
            while sent.load(std::sync::atomic::Ordering::SeqCst) < 40 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            signal(sink, "KILL");
        });
    });
    let n = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(n, 240);
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
    // The chain (requests, alerts, admin actions) is numbered without gaps.
    let all = stack.all_audit_records();
    let seqs: Vec<u64> = all.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
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

    let log = stack.state().join("audit").join("audit.jsonl");
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
