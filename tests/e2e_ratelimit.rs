//! Per-agent quotas through real Envoy and the RLS.

mod common;

use common::*;

#[test]
fn over_quota_gets_429_with_retry_after_and_body() {
    over_quota("  quota_check: rls\n");
}

/// `gateway.quota_check: authz` (the default): the same answers, from
/// inside Check (no rate-limit filter, no RLS call), and `quota_applied` in
/// the audit record.
#[test]
fn over_quota_gets_the_same_429_when_authz_checks_quotas() {
    let stack = over_quota("");
    let rendered =
        std::fs::read_to_string(stack.state().join("run/envoy.yaml")).expect("envoy.yaml");
    assert!(
        !rendered.contains("name: envoy.filters.http.ratelimit"),
        "no RLS filter"
    );
    let recs = stack.wait_audit(8);
    assert!(
        recs.iter()
            .any(|r| r["quota_applied"] == "agent:bot=hard_stop:exceeded"
                && r["response_code"] == 429),
        "{recs:?}"
    );
    assert!(recs
        .iter()
        .any(|r| r["quota_applied"] == "agent:bot=hard_stop" && r["response_code"] == 200));
}

fn over_quota(gateway: &str) -> Stack {
    let up = Upstream::http();
    // rpm 3: eight requests in a row must see a 429 even if a minute
    // boundary falls between them.
    let stack = Stack::start_with_gateway(
        gateway,
        &config_allowing(
            &[up.addr.port()],
            "quotas:\n  - {agent_id: bot, rps_limit: 1000, rpm_limit: 3, mode: hard_stop}\n",
        ),
    );
    let target = format!("http://{}/", up.addr);
    let replies: Vec<Reply> = (0..8)
        .map(|_| curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]))
        .collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        ok + limited.len(),
        8,
        "only 200 and 429 expected: {replies:?}"
    );
    assert!(!limited.is_empty() && ok <= 6, "{replies:?}");
    let r = limited[0];
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{r:?}");
    // The binding window once (Envoy's filter used to repeat it per
    // descriptor under `rls`), the same under both settings.
    assert_eq!(r.header("x-ratelimit-limit"), Some("3, 3;w=60"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    let reset: u64 = r
        .header("x-ratelimit-reset")
        .and_then(|v| v.parse().ok())
        .expect("reset");
    assert!((1..=60).contains(&reset), "{r:?}");
    // Admitted responses carry the headers too, counting down.
    let first = &replies[0];
    assert_eq!(first.status, 200);
    assert!(first.header("x-ratelimit-remaining").is_some(), "{first:?}");
    let body = r.json();
    assert_eq!(body["reason"], "quota-exceeded");
    assert_eq!(body["policy_id"], "quota:agent:bot");
    assert_eq!(r.header("x-clawgress-policy"), Some("quota:agent:bot"));
    assert_eq!(up.requests().len(), ok, "no 429 reached the upstream");
    stack
}

/// `quota_check: rls`: Envoy's rate-limit filter must fail closed when
/// our RLS does not answer (the known trap of §10).
#[test]
fn ratelimit_down_fails_closed_with_503_not_429() {
    let up = Upstream::http();
    let stack = Stack::start_with_gateway(
        "  quota_check: rls\n",
        &config_allowing(
            &[up.addr.port()],
            "quotas:\n  - {agent_id: bot, rps_limit: 1000}\n",
        ),
    );
    let target = format!("http://{}/", up.addr);
    assert_eq!(
        curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]).status,
        200
    );
    let pid = stack.service_pid("ratelimit").expect("ratelimit pid");
    signal(pid, "STOP");
    let r = curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]);
    signal(pid, "CONT");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["reason"], "ratelimit-unavailable");
    assert_eq!(r.header("x-clawgress-policy"), Some("none"));
    assert_eq!(up.requests().len(), 1);
}

#[test]
fn over_rps_gets_429() {
    let up = Upstream::http();
    // rps 1: eight requests in a row see a 429 unless they span 7+ seconds.
    let stack = Stack::start(&config_allowing(
        &[up.addr.port()],
        "quotas:\n  - {agent_id: bot, rps_limit: 1}\n",
    ));
    let target = format!("http://{}/", up.addr);
    let codes: Vec<u16> = (0..8)
        .map(|_| curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]).status)
        .collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    assert_eq!(
        up.requests().len(),
        codes.iter().filter(|c| **c == 200).count()
    );
}

#[test]
fn redis_backed_hard_stop_and_alert_only_through_envoy() {
    let redis = common::redis::RedisServer::start();
    let up = Upstream::http();
    let stack = Stack::start(&format!(
        "stores:\n  ratelimit: {}\n{}",
        redis.url(),
        config_allowing(
            &[up.addr.port()],
            "quotas:\n  - {agent_id: bot, rpm_limit: 2, mode: hard_stop}\n  - {team_id: infra, rpm_limit: 1, mode: alert_only}\n",
        )
    ));
    let target = format!("http://{}/", up.addr);
    let codes: Vec<u16> = (0..6)
        .map(|_| curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]).status)
        .collect();
    assert!(codes.contains(&429), "{codes:?}");
    let ok = codes.iter().filter(|c| **c == 200).count();
    assert!(
        (2..=4).contains(&ok),
        "rpm 2, at most one minute boundary: {codes:?}"
    );
    let recs = stack.wait_audit(6);
    assert_eq!(recs.len(), 6);
    // The team's alert_only quota (1/min) is exceeded by the second admitted
    // request: it passes, and the audit record says so.
    assert!(
        recs.iter().any(|r| r["response_code"] == 200
            && r["quota_applied"]
                .as_str()
                .is_some_and(|q| q.contains("team:infra=alert_only:exceeded"))),
        "{recs:#?}"
    );
    let limited = recs
        .iter()
        .find(|r| r["response_code"] == 429)
        .expect("429 record");
    assert_eq!(limited["reason"], "quota-exceeded");
    assert_eq!(limited["policy_id"], "quota:agent:bot");
    assert!(
        stack.stderr().contains("quota-alert-only"),
        "{}",
        stack.stderr()
    );
}

#[test]
fn store_outage_fails_closed_by_default_and_open_when_configured() {
    let mut redis = common::redis::RedisServer::start();
    let up = Upstream::http();
    let quotas = "quotas:\n  - {agent_id: bot, rps_limit: 1000}\n";
    let closed = Stack::start(&format!(
        "stores:\n  ratelimit: {}\n{}",
        redis.url(),
        config_allowing(&[up.addr.port()], quotas)
    ));
    let open = Stack::start(&format!(
        "stores:\n  ratelimit: {}\n  ratelimit_failure_mode: allow\n{}",
        redis.url(),
        config_allowing(&[up.addr.port()], quotas)
    ));
    let target = format!("http://{}/", up.addr);
    for s in [&closed, &open] {
        assert_eq!(
            curl(&["-x", &s.proxy_url(AGENT, KEY), &target], &[]).status,
            200
        );
    }
    redis.kill();
    let r = curl(&["-x", &closed.proxy_url(AGENT, KEY), &target], &[]);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (503, Some("ratelimit-unavailable")),
        "{r:?}"
    );
    let r = curl(&["-x", &open.proxy_url(AGENT, KEY), &target], &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        open.stderr().contains("ratelimit-store-unavailable"),
        "{}",
        open.stderr()
    );
    let recs = open.wait_audit(2);
    assert!(
        recs.iter()
            .any(|r| r["quota_applied"] == "store-unavailable:allowed"),
        "{recs:#?}"
    );
}

#[test]
fn with_quota_check_authz_a_store_outage_fails_closed_too() {
    let mut redis = common::redis::RedisServer::start();
    let up = Upstream::http();
    let stack = Stack::start_with_gateway(
        "  quota_check: authz\n",
        &format!(
            "stores:\n  ratelimit: {}\n{}",
            redis.url(),
            config_allowing(
                &[up.addr.port()],
                "quotas:\n  - {agent_id: bot, rps_limit: 1000}\n"
            )
        ),
    );
    let target = format!("http://{}/", up.addr);
    assert_eq!(
        curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]).status,
        200
    );
    redis.kill();
    let r = curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (503, Some("ratelimit-unavailable")),
        "never a 429, never allowed: {r:?}"
    );
    assert_eq!(up.requests().len(), 1);
    // One alert per failure, in one kind (the store's), not two.
    let log = stack.stderr();
    assert!(
        log.contains("ratelimit-store-unavailable") && !log.contains("ratelimit-store-failed"),
        "{log}"
    );
}

/// `quota_check: rls` with `failure_mode: allow`: a rate-limit service that
/// does not answer lets requests through (Envoy's filter fails open), and
/// `up` raises `ratelimit-unavailable` naming how many (§10: alert each
/// time) — before, nothing said so.
#[test]
fn rls_failing_open_raises_an_alert_naming_the_requests() {
    let up = Upstream::http();
    let mut stack = Stack::start_with_gateway(
        "  quota_check: rls\n",
        &format!(
            "stores:\n  ratelimit_failure_mode: allow\n{}",
            config_allowing(
                &[up.addr.port()],
                "quotas:\n  - {agent_id: bot, rps_limit: 1000}\n"
            )
        ),
    );
    let target = format!("http://{}/", up.addr);
    let proxy = stack.proxy_url(AGENT, KEY);
    assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    let rl = stack.service_pid("ratelimit").expect("ratelimit");
    signal(rl, "STOP");
    for _ in 0..3 {
        assert_eq!(curl(&["-x", &proxy, &target], &[]).status, 200);
    }
    // Counted every 2 s: the three may be split over two alerts.
    let counted = |log: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains("ratelimit-unavailable"))
            .filter_map(|l| l.split("count=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let alerted = eventually(std::time::Duration::from_secs(10), || {
        counted(&stack.stderr()) == 3
    });
    signal(rl, "CONT");
    assert!(alerted, "{}", stack.stderr());
    assert!(stack.stop().expect("stopped").success());
}
