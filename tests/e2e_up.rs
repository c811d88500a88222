//! `clawgress up` as a user meets it: config checking, start, stop.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn check_config_names_field_line_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    // `up --check-config` on `text`: refused (exit 2); what it said.
    let refused = |text: &str| {
        std::fs::write(&bad, text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_clawgress"))
            .args(["up", "--check-config"])
            .arg(&bad)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        err
    };
    let err =
        refused("agents:\n  - agent_id: a\n    auth_type: api_key\n    api_key_sha256: \"00\"\n");
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("api_key_sha256"), "{err}");

    std::fs::write(&bad, "agents: []\npolices: []\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["up", "--config"])
        .arg(&bad)
        .args(["--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field `polices`") && err.contains("line 2"),
        "{err}"
    );
    assert!(
        !dir.path().join("state").join("run").exists(),
        "nothing was started"
    );

    // Key files are part of the config: a missing one is named up front.
    let err = refused(
        "jwt:\n  issuers:\n    - {issuer: https://idp.test, jwks_file: nowhere.json}\nagents: []\n",
    );
    assert!(
        err.contains("nowhere.json") && err.contains("https://idp.test") && err.contains("line 3"),
        "{err}"
    );
    // A key file that loads but is refused (an RSA key under 2048 bits):
    // named with its line too.
    std::fs::write(
        dir.path().join("small.json"),
        r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
    )
    .expect("write");
    let err = refused("agents: []\njwt:\n  issuers:\n    - issuer: https://idp.test\n      jwks_file: small.json\n");
    assert!(err.contains("line 5") && err.contains("2048"), "{err}");
    // A YAML tag is refused, with its line, rather than dropped.
    let err = refused("agents: []\ngateway:\n  state_dir: !!binary L3RtcA==\n");
    assert!(
        err.contains("line 3") && err.contains("`!!binary`"),
        "{err}"
    );

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, config_allowing(&[8080], "")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["up", "--check-config"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_stops_envoy_and_every_service() {
    let mut stack = Stack::start(&config_allowing(&[8080], ""));
    let pids: Vec<u32> = ["authz", "ratelimit", "audit"]
        .iter()
        .map(|s| stack.service_pid(s).expect("service running"))
        .collect();
    let status = stack.stop().expect("exited");
    assert!(status.success(), "{status:?}\n{}", stack.stderr());
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} outlived up"
        );
    }
    // The proxy port is free again: Envoy is gone too.
    assert!(
        std::net::TcpListener::bind(stack.proxy).is_ok(),
        "Envoy still holds the port"
    );
}

#[test]
fn a_crash_looping_child_makes_up_exit_nonzero_naming_it() {
    let mut stack = Stack::start(&config_allowing(&[8080], ""));
    // Kill authz every time it comes back: the fifth exit within a minute
    // makes up give up.
    let mut killed = 0;
    let ok = eventually(Duration::from_secs(30), || {
        if let Some(pid) = stack.service_pid("authz") {
            signal(pid, "KILL");
            killed += 1;
        }
        killed >= 5
    });
    assert!(ok, "could not kill authz five times:\n{}", stack.stderr());
    let status = stack.wait_exit(Duration::from_secs(20)).expect("up exited");
    assert!(!status.success());
    assert!(
        stack.stderr().contains("authz crash-looped"),
        "{}",
        stack.stderr()
    );
    assert!(
        std::net::TcpListener::bind(stack.proxy).is_ok(),
        "Envoy still holds the port"
    );
}

#[test]
fn a_killed_envoy_is_restarted_and_traffic_resumes() {
    let (stack, up, target, proxy) = allowed_stack();
    // Requests served just before the kill: their records must not die in
    // Envoy's write buffer (§6: one record per request).
    let served: Vec<String> = (0..20)
        .map(|i| format!("/before-kill/{i}"))
        .filter(|p| raw_get(stack.proxy, &format!("http://{}{p}", up.addr), AGENT, KEY) == 200)
        .collect();
    assert_eq!(served.len(), 20);
    let pid = stack.envoy_pid().expect("envoy pid");
    signal(pid, "KILL");
    assert!(
        eventually(Duration::from_secs(20), || {
            stack.envoy_pid().is_some_and(|p| p != pid)
                && curl(&["-x", &proxy, &target], &[]).status == 200
        }),
        "Envoy was not restarted:\n{}",
        stack.stderr()
    );
    let log = stack.stderr();
    assert!(
        log.contains("child-restarted") && log.contains("envoy"),
        "{log}"
    );
    let recorded = |p: &String| {
        stack
            .audit_records()
            .iter()
            .filter(|r| r["path"] == p.as_str())
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || served
            .iter()
            .all(|p| recorded(p) == 1)),
        "records lost with Envoy: {:?}",
        served
            .iter()
            .filter(|p| recorded(p) != 1)
            .collect::<Vec<_>>()
    );
}

/// `clawgress status --json` for the stack's state directory.
fn status(stack: &Stack) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["status", "--json", "--state-dir"])
        .arg(stack.state())
        .output()
        .expect("status")
}

/// A running stack whose agent may reach one plain-HTTP upstream, checked
/// with a request through it: (stack, upstream, its URL, the proxy URL).
fn allowed_stack() -> (Stack, Upstream, String, String) {
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let target = format!("http://{}/", up.addr);
    let proxy = stack.proxy_url(AGENT, KEY);
    assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    (stack, up, target, proxy)
}

/// `clawgress reload --config FILE`.
fn reload(config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["reload", "--config"])
        .arg(config)
        .output()
        .expect("reload")
}

#[test]
fn reload_applies_a_valid_file_and_refuses_a_bad_one() {
    let a = Upstream::http();
    let b = Upstream::http();
    let stack = Stack::start(&config_allowing(&[a.addr.port()], ""));
    let proxy = stack.proxy_url(AGENT, KEY);
    let to_b = format!("http://{}/", b.addr);
    assert_eq!(curl(&["-x", &proxy, &to_b], &[]).status, 403);
    let authz = stack.service_pid("authz").expect("authz");

    // Allow b as well, then `clawgress reload`.
    let text = std::fs::read_to_string(&stack.config).expect("read");
    let widened = text.replace(
        &format!("ports: [{}]", a.addr.port()),
        &format!("ports: [{}, {}]", a.addr.port(), b.addr.port()),
    );
    assert_ne!(text, widened);
    // A copy elsewhere is not the file `up` re-reads: refused, named.
    let copy = stack.state().with_file_name("copy.yaml");
    std::fs::write(&copy, &widened).expect("write");
    let out = reload(&copy);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a reload re-reads the file it was started with"),
        "{err}"
    );
    std::fs::write(&stack.config, &widened).expect("write");
    let out = reload(&stack.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || curl(
            &["-x", &proxy, &to_b],
            &[]
        )
        .status
            == 200),
        "new policy not applied:\n{}",
        stack.stderr()
    );
    assert_eq!(
        stack.service_pid("authz"),
        Some(authz),
        "applied without a restart"
    );

    // A broken file: refused, with its line; what is in force stays.
    std::fs::write(
        &stack.config,
        widened.replace("priority: 100", "priority: high"),
    )
    .expect("write");
    signal(
        std::fs::read_to_string(stack.state().join("run/up.pid"))
            .expect("pidfile")
            .trim()
            .parse()
            .expect("pid"),
        "HUP",
    );
    assert!(
        eventually(Duration::from_secs(10), || stack
            .stderr()
            .contains("config-rejected")),
        "{}",
        stack.stderr()
    );
    assert!(stack.stderr().contains("line "), "{}", stack.stderr());
    // The same through `clawgress reload --config`: the CLI names the line
    // and fails, and `up` still hears of it and raises the alert again
    // (an operator's alerting sees the refused reload, §10).
    let before = stack.stderr().matches("alert=\"config-rejected\"").count()
        + stack.stderr().matches("alert=config-rejected").count();
    let out = reload(&stack.config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("line ")
            && err.contains("priority")
            && err.contains("config-rejected"),
        "{err}"
    );
    assert!(
        eventually(Duration::from_secs(10), || stack
            .stderr()
            .matches("alert=\"config-rejected\"")
            .count()
            + stack.stderr().matches("alert=config-rejected").count()
            > before),
        "up raised no second alert:\n{}",
        stack.stderr()
    );
    assert_eq!(curl(&["-x", &proxy, &to_b], &[]).status, 200);
    assert_eq!(
        curl(&["-x", &proxy, &format!("http://{}/", a.addr)], &[]).status,
        200
    );

    // Emptied, or unparseable before `gateway:` (the file no longer says
    // where `up` keeps its state): `up` is still found, and alerts.
    for broken in ["", "gateway: [\n"] {
        std::fs::write(&stack.config, broken).expect("write");
        let before = stack.stderr().matches("config-rejected").count();
        let out = reload(&stack.config);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("refused by clawgress up (pid"),
            "{broken:?}: {err}"
        );
        assert!(
            eventually(Duration::from_secs(10), || stack
                .stderr()
                .matches("config-rejected")
                .count()
                > before),
            "{broken:?}: up raised no alert:\n{}",
            stack.stderr()
        );
    }
    assert_eq!(curl(&["-x", &proxy, &to_b], &[]).status, 200);

    // A save cut short before `agents:` (only the gateway section left):
    // valid YAML, but committing it would deny everything. Refused.
    let cut = widened.split("agents:").next().expect("head").to_string();
    std::fs::write(&stack.config, cut).expect("write");
    let out = reload(&stack.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || stack
            .stderr()
            .contains("cut short?")),
        "{}",
        stack.stderr()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(curl(&["-x", &proxy, &to_b], &[]).status, 200);
}

#[test]
fn admin_listen_serves_merged_metrics_health_and_readiness() {
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(
        &[up.addr.port()],
        "quotas:\n  - {agent_id: bot, rps_limit: 1000, rpm_limit: 1, mode: alert_only}\n",
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    let target = format!("http://{}/", up.addr);
    for _ in 0..3 {
        assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    }
    assert_eq!(
        curl(&["-x", &proxy, "http://example.org/"], &[]).status,
        403
    );
    let admin = format!("http://{}", stack.admin);
    assert_eq!(curl(&[&format!("{admin}/healthz")], &[]).status, 200);
    assert_eq!(curl(&[&format!("{admin}/readyz")], &[]).status, 200);
    assert_eq!(curl(&[&format!("{admin}/nope")], &[]).status, 404);
    stack.wait_audit(4);
    let m = curl(&[&format!("{admin}/metrics")], &[]);
    assert_eq!(m.status, 200);
    let text = m.body;
    for want in [
        r#"clawgress_decisions_total{service="authz",decision="allow",reason="policy-allow"} 3"#,
        r#"clawgress_decisions_total{service="authz",decision="deny",reason="default-deny"} 1"#,
        r#"clawgress_ratelimit_total{service="authz",mode="alert_only",result="ok"} 1"#,
        r#"clawgress_ratelimit_total{service="authz",mode="alert_only",result="over_limit"} 2"#,
        r#"clawgress_alerts_total{service="authz",kind="quota-alert-only"} 1"#,
        "clawgress_check_duration_seconds_bucket",
        "clawgress_ratelimit_duration_seconds_bucket{service=\"authz\",le=",
        "clawgress_ratelimit_duration_seconds_count{service=\"authz\"} 3",
        "clawgress_bundle_revision{service=\"authz\",revision=\"1\"}",
        "clawgress_bundle_revision{service=\"ratelimit\",revision=\"1\"}",
        "# EOF",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    // 4 requests (and the control plane's admin records).
    let audited: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"clawgress_audit_records_total{service="audit"} "#))
        .and_then(|v| v.trim().parse().ok())
        .expect("audit records counted");
    assert!(audited >= 4, "{text}");
    assert_eq!(
        text.matches("# TYPE clawgress_alerts counter").count(),
        1,
        "{text}"
    );
    // No agent, key, path or request id in any label.
    for secret in ["bot", KEY, "example.org"] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into metrics:\n{text}"
        );
    }
}

#[test]
fn sigterm_drains_envoy_so_requests_in_flight_complete() {
    let up = Upstream::http();
    let mut stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let proxy = stack.proxy_url(AGENT, KEY);
    let target = format!("http://{}/slow", up.addr);
    let inflight = std::thread::spawn(move || curl(&["-x", &proxy, &target], &[]));
    // Wait until the slow request has reached the upstream, then stop.
    assert!(eventually(Duration::from_secs(5), || !up
        .requests()
        .is_empty()));
    let status = stack.stop().expect("exited");
    assert!(status.success(), "{status:?}");
    let r = inflight.join().expect("curl thread");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello from upstream"),
        "{r:?}"
    );
}

#[test]
fn status_lists_children_with_pid_uptime_restarts_and_health() {
    let mut stack = Stack::start(&config_allowing(&[free_port()], ""));
    let out = status(&stack);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> = v["children"]
        .as_array()
        .expect("children")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["admin", "authz", "ratelimit", "audit", "envoy"]);
    for c in v["children"].as_array().expect("children") {
        assert_eq!(c["health"], "healthy", "{c}");
        assert!(c["pid"].as_u64().is_some_and(|p| p > 1));
        assert!(c["uptime_s"].is_u64());
        assert_eq!(c["restarts"], 0);
    }
    let pid = stack.service_pid("ratelimit").expect("ratelimit");
    signal(pid, "KILL");
    assert!(eventually(Duration::from_secs(10), || {
        let out = status(&stack);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        out.status.success()
            && v["children"][2]["restarts"] == 1
            && v["children"][2]["last_exit"] == "killed by signal 9"
    }));
    assert!(stack.stop().expect("stopped").success());
    let out = status(&stack);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"running\":false"));
}

#[test]
fn a_stopped_service_is_unhealthy_in_status_and_alerted() {
    let up = Upstream::http();
    let mut stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let target = format!("http://{}/", up.addr);
    let proxy = stack.proxy_url(AGENT, KEY);
    let authz_health = |stack: &Stack| {
        let out = status(stack);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v["children"][1].clone())
    };
    assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    let pid = stack.service_pid("authz").expect("authz");
    // Stopped, not exited: its socket still accepts into the backlog.
    signal(pid, "STOP");
    let r = curl(&["-x", &proxy, &target], &[]);
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (503, "authz-unavailable".into())
    );
    let (code, authz) = authz_health(&stack);
    assert_eq!(code, Some(1), "{authz}");
    assert_eq!(
        (authz["name"].as_str(), authz["health"].as_str()),
        (Some("authz"), Some("unhealthy"))
    );
    let alerted = eventually(Duration::from_secs(20), || {
        stack.stderr().contains("child-unresponsive")
    });
    signal(pid, "CONT");
    assert!(alerted, "no child-unresponsive alert:\n{}", stack.stderr());
    let log = stack.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("child-unresponsive"))
        .unwrap_or_default();
    assert!(line.contains("authz"), "{line}");
    assert!(
        eventually(Duration::from_secs(10), || {
            authz_health(&stack).1["health"] == "healthy"
                && curl(&["-x", &proxy, &target], &[]).status == 200
        }),
        "authz did not come back"
    );
    assert!(eventually(Duration::from_secs(10), || stack
        .stderr()
        .contains("answering again")));
    let log = stack.stderr();
    assert_eq!(
        log.matches("child-unresponsive").count(),
        1,
        "one alert per spell:\n{log}"
    );
    assert!(stack.stop().expect("stopped").success());
}

/// §10: a child that is running but answers nothing (here: stopped) is as
/// good as exited. The supervisor alerts, then kills it, and the exit
/// handling restarts it: traffic comes back without anyone touching it.
fn a_wedged_child_is_killed_and_restarted(name: &str, index: usize) {
    let up = Upstream::http();
    let mut stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let target = format!("http://{}/", up.addr);
    let proxy = stack.proxy_url(AGENT, KEY);
    assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    let pid = if name == "envoy" {
        stack.envoy_pid()
    } else {
        stack.service_pid(name)
    }
    .expect("pid");
    signal(pid, "STOP");
    let restarted = eventually(Duration::from_secs(60), || {
        let out = status(&stack);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["children"][index]["restarts"] == 1
    });
    if !restarted {
        signal(pid, "CONT");
    }
    assert!(restarted, "{name} not restarted:\n{}", stack.stderr());
    let out = status(&stack);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        (
            v["children"][index]["name"].as_str(),
            v["children"][index]["last_exit"].as_str()
        ),
        (Some(name), Some("killed by signal 9")),
        "{v}"
    );
    let log = stack.stderr();
    let killed = log
        .lines()
        .find(|l| l.contains("killing it so that it restarts"))
        .unwrap_or_default();
    assert!(
        killed.contains("child-unresponsive") && killed.contains(name),
        "{log}"
    );
    assert!(
        eventually(Duration::from_secs(20), || curl(
            &["-x", &proxy, &target],
            &[]
        )
        .status
            == 200),
        "no traffic after {name} restarted:\n{}",
        stack.stderr()
    );
    assert!(stack.stop().expect("stopped").success());
}

#[test]
fn a_stopped_authz_is_killed_and_restarted() {
    a_wedged_child_is_killed_and_restarted("authz", 1);
}

#[test]
fn a_stopped_envoy_is_killed_and_restarted() {
    a_wedged_child_is_killed_and_restarted("envoy", 4);
}

#[test]
fn a_second_up_on_the_same_state_dir_is_refused_and_the_first_keeps_serving() {
    let (mut stack, _up, target, proxy) = allowed_stack();
    // The same file with other ports: the same state_dir.
    let text = std::fs::read_to_string(&stack.config).expect("read");
    let other = text
        .lines()
        .map(|l| {
            if l.starts_with("  proxy_listen:") {
                format!("  proxy_listen: 127.0.0.1:{}", free_port())
            } else if l.starts_with("  admin_listen:") {
                format!("  admin_listen: 127.0.0.1:{}", free_port())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let second = stack.state().with_file_name("second.yaml");
    std::fs::write(&second, other).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["up", "--config"])
        .arg(&second)
        .output()
        .expect("second up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("another `clawgress up`") && err.contains(&stack.up_pid().to_string()),
        "{err}"
    );
    // The first one's sockets are its own still.
    assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    assert!(stack.stop().expect("stopped").success());
}

#[test]
fn authz_restarted_with_no_verifying_bundle_allows_nothing() {
    let (stack, _up, target, proxy) = allowed_stack();
    // Both kept bundles damaged, then authz restarted: the config file's
    // policy may be revisions behind, so it is not what comes back.
    let dir = stack.state().join("bundle");
    for f in ["active", "last-good"] {
        std::fs::write(dir.join(f), b"not a bundle").expect("damage");
    }
    let pid = stack.service_pid("authz").expect("authz");
    signal(pid, "KILL");
    assert!(
        eventually(Duration::from_secs(15), || {
            stack.service_pid("authz").is_some_and(|p| p != pid)
                && curl(&["-x", &proxy, &target], &[]).status == 403
        }),
        "{}",
        stack.stderr()
    );
    let r = curl(&["-x", &proxy, &target], &[]);
    // (The upstream is on 127.0.0.1: with no policy, that is the guard's.)
    assert_eq!(r.json()["policy_id"], "default-deny", "{r:?}");
    assert!(
        stack.stderr().contains("no kept bundle verifies"),
        "{}",
        stack.stderr()
    );
    // The alerts at start are audit records too, as every alert is (§10).
    assert!(
        eventually(Duration::from_secs(10), || {
            let alerts: Vec<String> = stack
                .all_audit_records()
                .iter()
                .filter(|r| r["kind"] == "alert")
                .map(|r| r.to_string())
                .collect();
            alerts
                .iter()
                .any(|a| a.contains("bundle-rejected") && a.contains("bundle rejected at start"))
                && alerts
                    .iter()
                    .any(|a| a.contains("bundle-rejected") && a.contains("no kept bundle verifies"))
        }),
        "{:#?}",
        stack
            .all_audit_records()
            .iter()
            .filter(|r| r["kind"] == "alert")
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_child_restarted_while_the_file_is_invalid_runs_with_what_is_in_force() {
    let (mut stack, _up, target, proxy) = allowed_stack();
    // The file mid-edit, and authz dies meanwhile: it comes back with the
    // document `up` accepted, and traffic goes on as before (§10: an
    // invalid file changes nothing).
    let good = std::fs::read_to_string(&stack.config).expect("read");
    let bad = good.replace("action: allow", "action: maybe");
    assert_ne!(good, bad);
    std::fs::write(&stack.config, &bad).expect("write");
    let pid = stack.service_pid("authz").expect("authz");
    signal(pid, "KILL");
    assert!(
        eventually(Duration::from_secs(10), || stack
            .service_pid("authz")
            .is_some_and(|p| p != pid)),
        "{}",
        stack.stderr()
    );
    assert!(
        eventually(Duration::from_secs(10), || curl(
            &["-x", &proxy, &target],
            &[]
        )
        .status
            == 200),
        "{}",
        stack.stderr()
    );
    // Admin reads the operator's file itself (it commits it on reload):
    // it is held back until the file validates, with the alert.
    let admin = stack.service_pid("admin").expect("admin");
    signal(admin, "KILL");
    assert!(
        eventually(Duration::from_secs(10), || stack.stderr().contains(
            "not restarting the child until the config file validates"
        )),
        "{}",
        stack.stderr()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !stack.stderr().contains("child-crash-loop"),
        "{}",
        stack.stderr()
    );
    // Enforcement is not admin's: still allowed.
    assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    // `status --config` still works with the file invalid (the state dir
    // read from it as far as it parses), and says what is wrong with it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["status", "--json", "--config"])
        .arg(&stack.config)
        .output()
        .expect("status");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("\"authz\"") && stderr.contains("maybe"),
        "{stdout}\n{stderr}"
    );
    std::fs::write(&stack.config, &good).expect("restore");
    assert!(
        eventually(Duration::from_secs(15), || stack
            .service_pid("admin")
            .is_some_and(|p| p != admin)),
        "{}",
        stack.stderr()
    );
    assert!(stack.stop().expect("stopped").success());
}

#[test]
fn a_restarted_child_keeps_the_node_settings_up_started_with() {
    let (mut stack, _up, target, proxy) = allowed_stack();
    assert_eq!(stack.wait_audit(1).len(), 1);
    // The file's audit_dir edited (valid; takes effect when `up`
    // restarts), then the sink dies and is restarted.
    let elsewhere = stack.state().with_file_name("elsewhere");
    let text = std::fs::read_to_string(&stack.config).expect("read");
    std::fs::write(
        &stack.config,
        format!("stores:\n  audit_dir: {}\n{text}", elsewhere.display()),
    )
    .expect("write");
    let pid = stack.service_pid("audit").expect("audit");
    signal(pid, "KILL");
    assert!(eventually(Duration::from_secs(10), || stack
        .service_pid("audit")
        .is_some_and(|p| p != pid)));
    assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    // One chain, in the directory everything else runs with.
    let recs = stack.wait_audit(2);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(
        !elsewhere.exists(),
        "the sink forked the log into {}",
        elsewhere.display()
    );
    assert!(stack.stop().expect("stopped").success());
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "gateway:\n  state_dir: {}\nagents: []\n",
            dir.path().join("state").display()
        ),
    )
    .expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawgress"))
        .args(["serve", "ratelimit", "--config"])
        .arg(&cfg)
        .arg("--listen")
        .arg(format!("unix:{}", dir.path().join("rl.sock").display()))
        .env("CLAWGRESS_LOG_FORMAT", "json")
        .env("CLAWGRESS_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve ratelimit");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a log line");
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(v["fields"]["message"].is_string(), "{line}");
    assert!(v["timestamp"].is_string(), "{line}");
}
