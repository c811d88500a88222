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
    assert!(r["bundle_revision"]
        .as_str()
        .is_some_and(|s| s.starts_with("sha256:")));
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
    let seqs: Vec<u64> = recs.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
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
    let seqs: Vec<u64> = recs.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
}
