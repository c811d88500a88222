//! The control plane end to end: the CLI edits and commits through the
//! admin API of a running `up`, and real Envoy enforces the new revision
//! without a restart; bad bundles and a dead admin change nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Run the CLI against `stack` (token and URL found from its state dir).
fn cli(stack: &Stack, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(args)
        .arg("--state-dir")
        .arg(stack.state())
        .env_remove("CLAWGRESS_URL")
        .env_remove("CLAWGRESS_TOKEN")
        .output()
        .expect("run clawgress")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn allow_port(stack: &Stack, id: &str, port: u16) {
    ok(&cli(
        stack,
        &["set", &format!("policies.{id}.priority"), "50"],
    ));
    ok(&cli(
        stack,
        &[
            "set",
            &format!("policies.{id}.match.destination"),
            &format!(r#"{{"hosts": ["127.0.0.1/32"], "ports": [{port}]}}"#),
        ],
    ));
    ok(&cli(
        stack,
        &["set", &format!("policies.{id}.action"), "allow"],
    ));
}

fn status(stack: &Stack, up: &Upstream) -> u16 {
    raw_get(stack.proxy, &format!("http://{}/", up.addr), AGENT, KEY)
}

#[test]
fn cli_commit_changes_enforcement_without_restart() {
    let a = Upstream::http();
    let b = Upstream::http();
    let stack = Stack::start(&config_allowing(&[a.addr.port()], ""));
    assert_eq!(status(&stack, &a), 200);
    assert_eq!(status(&stack, &b), 403, "b is not allowed yet");

    allow_port(&stack, "allow-b", b.addr.port());
    let diff = ok(&cli(&stack, &["compare"]));
    assert!(diff.contains("+ policies.allow-b"), "{diff}");
    let staged = ok(&cli(&stack, &["configure"]));
    assert!(staged.contains("revision 2 staged"), "{staged}");
    let committed = ok(&cli(&stack, &["commit"]));
    assert!(committed.contains("rollout: authz loaded"), "{committed}");
    assert!(
        committed.contains("rollout: ratelimit loaded"),
        "{committed}"
    );
    // The commit answer waits for the rollout: the next request sees it.
    assert_eq!(status(&stack, &b), 200, "{committed}");

    // An invalid candidate is refused, naming the path; nothing changes.
    ok(&cli(&stack, &["set", "policies.bad.action", "maybe"]));
    let out = cli(&stack, &["commit"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policies.bad.action"), "{err}");
    ok(&cli(&stack, &["delete", "policies.bad"]));
    assert_eq!(status(&stack, &b), 200);

    // Rollback to revision 1: b is denied again; lockdown denies all.
    let out = ok(&cli(&stack, &["rollback", "1"]));
    assert!(out.contains("- policies.allow-b"), "{out}");
    assert_eq!(status(&stack, &b), 403);
    assert_eq!(status(&stack, &a), 200);
    ok(&cli(&stack, &["lockdown"]));
    assert_eq!(status(&stack, &a), 403);
    let revs = ok(&cli(&stack, &["revisions"]));
    assert!(revs.contains("lockdown"), "{revs}");

    // No token, wrong token: exit 3 and nothing printed of the token.
    let out = Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["show", "--token", "cga_wrong", "--url"])
        .arg(format!("http://{}", stack.admin))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("cga_wrong"));
}

#[test]
fn commit_to_enforcement_time() {
    // Figures for the closing note: commit (CLI process start) to the first
    // request through Envoy that sees the change, p50 over 20 commits.
    let a = Upstream::http();
    let stack = Stack::start(&config_allowing(&[free_port()], ""));
    let mut times = Vec::new();
    for i in 0..20 {
        let allow = i % 2 == 0;
        if allow {
            allow_port(&stack, "flip", a.addr.port());
        } else {
            ok(&cli(&stack, &["delete", "policies.flip"]));
        }
        let want = if allow { 200 } else { 403 };
        let t = Instant::now();
        ok(&cli(&stack, &["commit"]));
        assert!(eventually(Duration::from_secs(5), || status(&stack, &a) == want));
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "commit-to-enforcement over 20 commits: p50 {:?}, max {:?}",
        times[10], times[19]
    );
}

fn bundle(stack: &Stack) -> std::path::PathBuf {
    stack.state().join("bundle/active")
}

#[test]
fn tampered_unsigned_and_older_bundles_are_rejected_and_enforcement_stays() {
    let a = Upstream::http();
    let b = Upstream::http();
    let stack = Stack::start(&config_allowing(&[a.addr.port()], ""));
    let rev1 = std::fs::read_to_string(bundle(&stack)).expect("bundle 1");
    allow_port(&stack, "allow-b", b.addr.port());
    ok(&cli(&stack, &["commit"]));
    assert_eq!(status(&stack, &b), 200);
    let rev2 = std::fs::read_to_string(bundle(&stack)).expect("bundle 2");

    let write = |text: &str| {
        let tmp = stack.state().join("bundle/.test.tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, bundle(&stack)).expect("rename");
    };
    // Tampered: the port of the allow rule changed, signature kept.
    let tampered = rev2.replace(&b.addr.port().to_string(), &a.addr.port().to_string());
    assert_ne!(tampered, rev2);
    // Unsigned, garbage, and an older (validly signed) revision.
    let mut unsigned: serde_json::Value = serde_json::from_str(&rev2).expect("json");
    unsigned["signature"] = "".into();
    for bad in [tampered, unsigned.to_string(), "{not json".into(), rev1] {
        write(&bad);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(status(&stack, &b), 200, "enforcement unchanged");
        assert_eq!(status(&stack, &a), 200);
    }
    assert!(
        eventually(Duration::from_secs(3), || stack
            .stderr()
            .matches("alert=\"bundle-rejected\"")
            .count()
            >= 8),
        "authz and ratelimit each raise an alert per bad bundle:\n{}",
        stack.stderr()
    );
    // The last good bundle is still the signed revision 2.
    let lkg = std::fs::read_to_string(stack.state().join("bundle/last-good")).expect("lkg");
    assert_eq!(lkg, rev2);
}

#[test]
fn with_admin_killed_enforcement_is_unchanged_and_admin_comes_back() {
    let a = Upstream::http();
    let mut stack = Stack::start(&config_allowing(&[a.addr.port()], ""));
    let pid = stack.service_pid("admin").expect("admin runs");
    signal(pid, "KILL");
    for _ in 0..5 {
        assert_eq!(status(&stack, &a), 200);
    }
    // Supervised: it is restarted, and the API answers again.
    assert!(eventually(Duration::from_secs(10), || {
        cli(&stack, &["show", "active", "policies"])
            .status
            .success()
    }));
    assert!(stack.service_pid("admin").is_some_and(|p| p != pid));
    // A restart does not commit the file again (one revision).
    let revs = ok(&cli(&stack, &["revisions", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&revs).expect("json");
    assert_eq!(v["revisions"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(stack.stop().expect("stopped").success());
}

#[test]
fn sighup_commits_the_changed_file_as_a_new_revision() {
    let a = Upstream::http();
    let b = Upstream::http();
    let mut stack = Stack::start(&config_allowing(&[a.addr.port()], ""));
    assert_eq!(status(&stack, &b), 403);
    std::fs::write(
        &stack.config,
        config_allowing(&[a.addr.port(), b.addr.port()], ""),
    )
    .expect("rewrite");
    let up = stack.up_pid();
    signal(up, "HUP");
    assert!(eventually(Duration::from_secs(5), || status(&stack, &b) == 200));
    let revs = ok(&cli(&stack, &["revisions"]));
    let actor = format!("file:{}", stack.config.display());
    assert_eq!(revs.matches(&actor).count(), 2, "{revs}");
    assert!(Path::new(&stack.state().join("admin.db")).exists());
    assert!(stack.stop().expect("stopped").success());
}

fn api(stack: &Stack, path: &str) -> serde_json::Value {
    let token = std::fs::read_to_string(stack.state().join("admin.token")).expect("token");
    let r = curl(
        &[
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            &format!("http://{}/api/v1/{path}", stack.admin),
        ],
        &[],
    );
    assert_eq!(r.status, 200, "{path}: {r:?}");
    r.json()
}

#[test]
fn the_query_store_serves_audit_alerts_admin_actions_and_stats() {
    let a = Upstream::http();
    let stack = Stack::start(&config_allowing(&[a.addr.port()], ""));
    for _ in 0..3 {
        assert_eq!(status(&stack, &a), 200);
    }
    assert_eq!(raw_get(stack.proxy, "http://example.org/", AGENT, KEY), 403);
    // An alert (a killed child is restarted) and an admin action.
    let pid = stack.service_pid("ratelimit").expect("ratelimit");
    signal(pid, "KILL");
    ok(&cli(&stack, &["lockdown"]));

    assert!(
        eventually(Duration::from_secs(10), || {
            api(&stack, "audit?limit=1000")["records"]
                .as_array()
                .is_some_and(|r| r.len() >= 4)
        }),
        "request records reach the query store"
    );
    let recs = api(&stack, &format!("audit?agent={AGENT}&decision=allow"));
    let recs = recs["records"].as_array().expect("records").clone();
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert!(
        recs[0]["seq"].as_i64() > recs[1]["seq"].as_i64(),
        "newest first"
    );
    for field in [
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
        "policy_id",
        "bundle_revision",
        "quota_applied",
        "response_code",
        "latency_ms",
        "bytes_out",
        "bytes_in",
        "source_address",
    ] {
        assert!(!recs[0][field].is_null(), "{field} missing: {}", recs[0]);
    }
    // Pagination: two pages of 2 and 1.
    let p1 = api(
        &stack,
        &format!("audit?agent={AGENT}&decision=allow&limit=2"),
    );
    let next = p1["next_before_seq"].as_i64().expect("cursor");
    let p2 = api(
        &stack,
        &format!("audit?agent={AGENT}&decision=allow&limit=2&before_seq={next}"),
    );
    assert_eq!(p2["records"].as_array().map(Vec::len), Some(1));

    assert!(eventually(Duration::from_secs(10), || {
        api(&stack, "alerts")["records"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["reason"] == "child-restarted" && r["actor"] == "up")
    }));
    assert!(eventually(Duration::from_secs(10), || {
        api(&stack, "audit?kind=admin")["records"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| {
                r["reason"] == "lockdown" && r["actor"] == "bootstrap" && r["decision"] == "ok"
            })
    }));
    let st = api(&stack, "stats?window_s=600");
    assert_eq!(st["total"], 4, "{st}");
    assert!(st["by_agent"]
        .as_array()
        .expect("by_agent")
        .iter()
        .any(|r| r["agent_id"] == AGENT && r["count"] == 3));

    // The chain, with its new record kinds, still verifies.
    let out = Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["audit", "verify", "--state-dir"])
        .arg(stack.state())
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `serve ratelimit` as a fleet node in `dir`: pulls bundles from the
/// stack's admin API with the token in `token_file`; stderr in `dir/stderr`.
fn fleet_node(
    stack: &Stack,
    dir: &std::path::Path,
    token_file: &std::path::Path,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["serve", "ratelimit", "--config"])
        .arg(&stack.config)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--listen")
        .arg(format!("unix:{}", dir.join("rl.sock").display()))
        .arg("--bundle-dir")
        .arg(dir.join("bundle"))
        .arg("--bundle-key")
        .arg(stack.state().join("keys/bundle.pub"))
        .arg("--bundle-url")
        .arg(format!("http://{}/api/v1/bundle", stack.admin))
        .arg("--bundle-token-file")
        .arg(token_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr"))
        .spawn()
        .expect("serve ratelimit")
}

#[test]
fn a_fleet_node_pulls_bundles_over_http_and_follows_commits() {
    let stack = Stack::start(&config_allowing(&[free_port()], ""));
    let admin_token = std::fs::read_to_string(stack.state().join("admin.token")).expect("token");
    let viewer = curl(
        &[
            "-H",
            &format!("Authorization: Bearer {}", admin_token.trim()),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"name": "node-2", "role": "viewer"}"#,
            &format!("http://{}/api/v1/tokens", stack.admin),
        ],
        &[],
    )
    .json()["token"]
        .as_str()
        .expect("token")
        .to_string();
    let node = tempfile::tempdir().expect("node dir");
    std::fs::write(node.path().join("token"), &viewer).expect("token file");
    let token_file = node.path().join("token");
    let mut child = fleet_node(&stack, node.path(), &token_file);
    let loaded = || {
        std::fs::read_to_string(node.path().join("bundle/loaded-ratelimit"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    assert!(
        eventually(Duration::from_secs(10), || loaded() == Some(1)),
        "first bundle pulled"
    );
    ok(&cli(&stack, &["set", "quotas.bot.rps_limit", "5"]));
    let t = Instant::now();
    ok(&cli(&stack, &["commit"]));
    assert!(
        eventually(Duration::from_secs(10), || loaded() == Some(2)),
        "commit followed"
    );
    eprintln!("fleet node: commit to loaded in {:?}", t.elapsed());

    let _ = child.kill();
    let _ = child.wait();

    // The control plane's bundle file is corrupted and a new node (nothing
    // on disk yet) asks for it: refused, said once, and the server is not
    // hammered (before, the refused bundle was fetched again at once,
    // about a thousand times a second, each an alert).
    let active = stack.state().join("bundle/active");
    let mut bytes = std::fs::read(&active).expect("active bundle");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&active, &bytes).expect("corrupt");
    let node2 = tempfile::tempdir().expect("node dir");
    let mut child = fleet_node(&stack, node2.path(), &token_file);
    let rejected = || {
        std::fs::read_to_string(node2.path().join("stderr"))
            .unwrap_or_default()
            .matches("alert=\"bundle-rejected\"")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || rejected() >= 1),
        "the corrupted bundle was refused"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        rejected(),
        1,
        "one alert for one bad bundle, not one per poll"
    );
    assert!(
        !node2.path().join("bundle/active").exists(),
        "nothing unverified was stored"
    );
    // SIGTERM stops a fleet node promptly, even with a bundle pull blocked
    // in its long-poll (before, the runtime waited for it forever).
    signal(child.id(), "TERM");
    assert!(
        eventually(Duration::from_secs(6), || matches!(
            child.try_wait(),
            Ok(Some(_))
        )),
        "serve ratelimit with --bundle-url did not stop on SIGTERM"
    );
    let _ = child.kill();
    let _ = child.wait();
}
