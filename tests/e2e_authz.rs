//! Identity and policy through real Envoy: explicit-proxy HTTP and CONNECT.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn allowed_http_reaches_upstream_without_credentials_or_agent_request_id() {
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let r = curl(
        &[
            "-x",
            &stack.proxy_url(AGENT, KEY),
            "-H",
            "x-request-id: chosen-by-agent",
            &format!("http://{}/hello?q=1", up.addr),
        ],
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "hello from upstream");
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    let h = &seen[0];
    assert!(
        !h.iter().any(|(k, _)| k == "proxy-authorization"),
        "credentials leaked upstream: {h:?}"
    );
    let rid = h
        .iter()
        .find(|(k, _)| k == "x-request-id")
        .map(|(_, v)| v.as_str());
    assert!(
        rid.is_some_and(|v| v != "chosen-by-agent"),
        "agent-chosen request id kept: {rid:?}"
    );
}

#[test]
fn anonymous_wrong_key_disabled_and_unlisted_hosts_are_refused() {
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let target = format!("http://{}/", up.addr);

    let r = curl(&["-x", &format!("http://{}", stack.proxy), &target], &[]);
    assert_eq!(r.status, 407, "{r:?}");
    assert!(r
        .header("proxy-authenticate")
        .is_some_and(|v| v.starts_with("Basic")));
    assert_eq!(r.json()["reason"], "missing-credentials");

    let r = curl(&["-x", &stack.proxy_url(AGENT, "wrong-key"), &target], &[]);
    assert_eq!(r.status, 403, "{r:?}");
    let body = r.json();
    assert_eq!(body["decision"], "deny");
    assert_eq!(body["reason"], "invalid-credentials");
    for k in ["decision", "reason", "policy_id", "request_id", "hint"] {
        assert!(body.get(k).is_some(), "deny body lacks {k}: {body}");
    }
    assert!(r.header("x-clawgress-policy").is_some());

    let r = curl(&["-x", &stack.proxy_url("sleeper", KEY), &target], &[]);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (403, Some("agent-disabled"))
    );

    // A host no policy names: denied by authz before any DNS lookup.
    let r = curl(
        &["-x", &stack.proxy_url(AGENT, KEY), "http://example.org/"],
        &[],
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["policy_id"], "default-deny");
    assert_eq!(r.header("x-clawgress-policy"), Some("default-deny"));

    // Loopback in another encoding, on a port no policy allows.
    let r = curl(
        &[
            "-x",
            &stack.proxy_url(AGENT, KEY),
            &format!("http://2130706433:{}/", up.addr.port() ^ 1),
        ],
        &[],
    );
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (403, Some("private-destination"))
    );
    // The allowed address spelled as clients also read it (curl rewrites
    // these, so on a raw socket): Envoy would resolve it as a name, so it
    // is refused, as malformed (write the dotted quad), not as private:
    // the policy opened 127.0.0.1.
    for host in ["127.1", "2130706433", "0x7f.1", "127.0.0.1."] {
        let (status, body) = raw_get_answer(
            stack.proxy,
            &format!("http://{host}:{}/", up.addr.port()),
            AGENT,
            KEY,
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(
            (status, body["reason"].as_str()),
            (403, Some("malformed-destination")),
            "{host}: {body}"
        );
    }
    assert!(
        up.requests().is_empty(),
        "nothing denied reached the upstream"
    );
}

#[test]
fn connect_tunnels_to_allowed_tls_upstream_and_refuses_others() {
    let tls = Upstream::https();
    let other = Upstream::https();
    let stack = Stack::start(&config_allowing(&[tls.addr.port()], ""));
    let url = format!("https://{}/secure", tls.addr);

    // curl -x with credentials in the proxy URL.
    let r = curl(&["-k", "-x", &stack.proxy_url(AGENT, KEY), &url], &[]);
    assert_eq!((r.connect_status, r.status), (200, 200), "{r:?}");
    assert_eq!(r.body, "hello from upstream");

    // The same through HTTPS_PROXY, as an agent's HTTP library would.
    let proxy = stack.proxy_url(AGENT, KEY);
    let r = curl(&["-k", &url], &[("HTTPS_PROXY", &proxy)]);
    assert_eq!((r.connect_status, r.status), (200, 200), "{r:?}");
    assert_eq!(tls.requests().len(), 2);

    // A port no policy allows: the tunnel is refused with 403.
    let r = curl(
        &["-k", "-x", &proxy, &format!("https://{}/", other.addr)],
        &[],
    );
    assert_eq!(r.connect_status, 403, "{r:?}");
    assert!(other.requests().is_empty());

    // No credentials on CONNECT: 407.
    let r = curl(&["-k", "-x", &format!("http://{}", stack.proxy), &url], &[]);
    assert_eq!(r.connect_status, 407, "{r:?}");
}

#[test]
fn authz_down_fails_closed_with_a_readable_503() {
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let target = format!("http://{}/", up.addr);
    assert_eq!(
        curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]).status,
        200
    );

    // Freeze authz: Envoy's 250 ms timeout fires and it must deny.
    let pid = stack.service_pid("authz").expect("authz pid");
    signal(pid, "STOP");
    let r = curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]);
    signal(pid, "CONT");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["reason"], "authz-unavailable");
    assert!(r.json()["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(
        up.requests().len(),
        1,
        "nothing passed while authz was down"
    );

    // Kill it outright: until the supervisor has it back, requests are
    // refused, never let through; afterwards they flow again.
    signal(pid, "KILL");
    let r = curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]);
    assert!(r.status == 503 || r.status == 200, "{r:?}");
    assert!(
        eventually(std::time::Duration::from_secs(10), || {
            curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]).status == 200
        }),
        "authz was not restarted:\n{}",
        stack.stderr()
    );
    assert!(
        stack.stderr().contains("alert=\"child-restarted\"")
            || stack.stderr().contains("alert=child-restarted")
    );
}

#[test]
fn path_rules_cannot_be_dodged() {
    let up = Upstream::http();
    let port = up.addr.port();
    let stack = Stack::start(&config_allowing(
        &[port],
        &format!(
            "  - policy_id: deny-admin\n    priority: 10\n    match:\n      destination: {{hosts: [\"127.0.0.1/32\"], ports: [{port}]}}\n      path_prefix: /admin\n    action: deny\n"
        ),
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    for path in [
        "/admin",
        "/x/../admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/%2e/admin",
        "/%2E%2E/admin/x",
    ] {
        let r = curl(
            &[
                "--path-as-is",
                "-x",
                &proxy,
                &format!("http://{}{path}", up.addr),
            ],
            &[],
        );
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert_eq!(r.json()["policy_id"], "deny-admin", "{path}");
    }
    for path in ["/x/..%2fadmin", "/%2fadmin", "/%5cadmin"] {
        let r = curl(
            &[
                "--path-as-is",
                "-x",
                &proxy,
                &format!("http://{}{path}", up.addr),
            ],
            &[],
        );
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert_eq!(r.json()["reason"], "malformed-path", "{path}");
    }
    assert!(up.requests().is_empty(), "nothing reached the upstream");
    let r = curl(
        &[
            "--path-as-is",
            "-x",
            &proxy,
            &format!("http://{}/public/../ok", up.addr),
        ],
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn ipv6_cidrs_over_embedding_prefixes_do_not_open_loopback() {
    let stack = Stack::start(&config_allowing(
        &[80],
        "  - policy_id: nat64\n    priority: 1\n    match:\n      destination: {hosts: [\"64:ff9b::/96\", \"2002::/16\", \"::/96\", \"::/0\"]}\n    action: allow\n",
    ));
    let proxy = stack.proxy_url(AGENT, KEY);
    for host in [
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "[::127.0.0.1]",
        "[::1]",
        "[::]",
        "[64:ff9b::a9fe:a9fe]",
    ] {
        let r = curl(&["-g", "-x", &proxy, &format!("http://{host}:80/")], &[]);
        assert_eq!(r.status, 403, "{host}: {r:?}");
        assert_eq!(r.json()["reason"], "private-destination", "{host}");
    }
}

#[test]
fn envoy_own_answers_are_readable_json_too() {
    let up = Upstream::http();
    let closed = free_port();
    let stack = Stack::start(&config_allowing(&[up.addr.port(), closed], ""));
    let proxy = stack.proxy_url(AGENT, KEY);
    // HTTP/1.0 agents work.
    let r = curl(&["-0", "-x", &proxy, &format!("http://{}/", up.addr)], &[]);
    assert_eq!(r.status, 200, "{r:?}");
    // Allowed, but nothing listens there.
    let r = curl(&["-x", &proxy, &format!("http://127.0.0.1:{closed}/")], &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["reason"], "upstream-unreachable");
    assert_eq!(r.json()["policy_id"], "allow-local-upstreams");
    // A scheme the proxy does not speak.
    let r = curl(
        &[
            "-x",
            &proxy,
            &format!("ftp://127.0.0.1:{}/", up.addr.port()),
        ],
        &[],
    );
    assert!(r.status >= 400, "{r:?}");
    let body = r.json();
    for k in ["decision", "reason", "policy_id", "request_id", "hint"] {
        assert!(body.get(k).is_some(), "lacks {k}: {body}");
    }
    assert!(r.header("x-clawgress-policy").is_some());
}

#[test]
fn bearer_jwts_through_envoy() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let up = Upstream::http();
    let secret = "e2e-hs256-secret-0123456789abcdef-xyz";
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hs256.secret"), secret).expect("write");
    let body = format!(
        r#"jwt:
  issuers:
    - issuer: https://idp.test
      audiences: [clawgress]
      hs256_secret_file: {secret_file}
agents:
  - {{agent_id: {AGENT}, auth_type: api_key, api_key_sha256: "{hash}"}}
  - {{agent_id: benched, auth_type: jwt, status: disabled}}
policies:
  - policy_id: ml-team
    priority: 10
    match:
      identity: {{team_id: ml}}
      destination: {{hosts: ["127.0.0.1/32"], ports: [{port}]}}
    action: allow
"#,
        secret_file = dir.path().join("hs256.secret").display(),
        hash = key_hash(KEY),
        port = up.addr.port()
    );
    let stack = Stack::start(&body);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mint = |claims: serde_json::Value, key: &[u8]| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key),
        )
        .expect("encode")
    };
    let claims = |agent: &str, exp: u64| {
        serde_json::json!({"iss": "https://idp.test", "aud": "clawgress", "exp": exp,
                           "agent_id": agent, "team_id": "ml", "project_id": "p1"})
    };
    let target = format!("http://{}/", up.addr);
    let proxy = format!("http://{}", stack.proxy);
    let bearer = |t: &str| format!("Proxy-Authorization: Bearer {t}");

    let ok = mint(claims("trainer-1", now + 300), secret.as_bytes());
    let r = curl(
        &["-x", &proxy, "--proxy-header", &bearer(&ok), &target],
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(up.requests()[0]
        .iter()
        .all(|(k, _)| k != "proxy-authorization"));

    for (token, status, reason) in [
        (
            mint(
                claims("trainer-1", now + 300),
                b"forged-secret-forged-secret-forged!!",
            ),
            403,
            "token-bad-signature",
        ),
        (
            mint(claims("trainer-1", now - 3600), secret.as_bytes()),
            403,
            "token-expired",
        ),
        (
            mint(claims("benched", now + 300), secret.as_bytes()),
            403,
            "agent-disabled",
        ),
        (
            mint(claims(AGENT, now + 300), secret.as_bytes()),
            403,
            "invalid-credentials",
        ),
        (
            // Validly signed, but without the configured audience.
            mint(
                {
                    let mut c = claims("trainer-1", now + 300);
                    c.as_object_mut().map(|o| o.remove("aud"));
                    c
                },
                secret.as_bytes(),
            ),
            403,
            "token-wrong-audience",
        ),
        (
            // Validly signed, `exp` a string (CVE-2026-25537): a JWT, but
            // not an acceptable one: 403, not 407.
            mint(
                {
                    let mut c = claims("trainer-1", now + 300);
                    c["exp"] = serde_json::json!((now + 300).to_string());
                    c
                },
                secret.as_bytes(),
            ),
            403,
            "token-invalid-claim",
        ),
        ("not.a.jwt".to_string(), 407, "token-malformed"),
        (format!("{ok}{}", "x".repeat(9000)), 403, "token-too-large"),
    ] {
        let r = curl(
            &["-x", &proxy, "--proxy-header", &bearer(&token), &target],
            &[],
        );
        assert_eq!(
            (r.status, r.json()["reason"].as_str()),
            (status, Some(reason)),
            "{r:?}"
        );
        assert!(
            !r.body.contains(&token[..token.len().min(20)]),
            "the token is never echoed"
        );
    }
    assert_eq!(up.requests().len(), 1);
    let recs = stack.wait_audit(9);
    let allowed = recs
        .iter()
        .find(|r| r["decision"] == "allow")
        .expect("allowed record");
    assert_eq!(allowed["agent_id"], "trainer-1");
    assert_eq!(allowed["team_id"], "ml");
    assert_eq!(allowed["policy_id"], "ml-team");
}

#[test]
fn profiles_and_shadow_policies_through_envoy() {
    let up = Upstream::http();
    let port = up.addr.port();
    let body = format!(
        r#"agents:
  - {{agent_id: {AGENT}, team_id: infra, auth_type: api_key, api_key_sha256: "{hash}"}}
  - {{agent_id: locked, auth_type: api_key, profile: none, api_key_sha256: "{hash}"}}
policies:
  - policy_id: allow-local
    priority: 100
    match:
      destination: {{hosts: ["127.0.0.1/32"], ports: [{port}]}}
    action: allow
  - policy_id: trial-deny
    priority: 1
    mode: shadow
    match:
      identity: {{agent_id: {AGENT}}}
      destination: {{hosts: ["127.0.0.1/32"]}}
    action: deny
"#,
        hash = key_hash(KEY)
    );
    let stack = Stack::start(&body);
    let target = format!("http://{}/", up.addr);
    // The shadow deny is recorded but changes nothing.
    let r = curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]);
    assert_eq!(r.status, 200, "{r:?}");
    // profile: none overrides every allow.
    let r = curl(&["-x", &stack.proxy_url("locked", KEY), &target], &[]);
    assert_eq!(
        (r.status, r.json()["policy_id"].as_str()),
        (403, Some("profile:none")),
        "{r:?}"
    );
    let recs = stack.wait_audit(2);
    let allowed = recs
        .iter()
        .find(|r| r["decision"] == "allow")
        .expect("allowed");
    assert_eq!(allowed["policy_id"], "allow-local");
    assert_eq!(allowed["shadow_decision"], "deny");
    assert_eq!(allowed["shadow_policy_id"], "trial-deny");
}

#[test]
fn a_source_ip_agent_is_known_by_its_address_and_credentials_still_decide() {
    let up = Upstream::http();
    let extra = format!(
        r#"  - policy_id: allow-lab
    priority: 100
    match:
      identity: {{agent_id: lab}}
      destination: {{hosts: ["127.0.0.1/32"], ports: [{port}]}}
    action: allow
"#,
        port = up.addr.port()
    );
    let body = config_allowing(&[free_port()], &extra).replacen(
        "agents:\n",
        "agents:\n  - agent_id: lab\n    team_id: research\n    auth_type: source_ip\n    source_cidrs: [127.0.0.1/32]\n",
        1,
    );
    let stack = Stack::start(&body);
    let target = format!("http://{}/lab", up.addr);
    // No credentials: the source address 127.0.0.1 names agent lab.
    let r = curl(&["-x", &format!("http://{}", stack.proxy), &target], &[]);
    assert_eq!(r.status, 200, "{r:?}");
    // Credentials always decide: bot is not allowed there, a bad key is 403.
    let r = curl(&["-x", &stack.proxy_url(AGENT, KEY), &target], &[]);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (403, Some("private-destination")),
        "{r:?}"
    );
    let r = curl(&["-x", &stack.proxy_url(AGENT, "wrong"), &target], &[]);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (403, Some("invalid-credentials"))
    );
    let recs = stack.wait_audit(3);
    let lab = recs
        .iter()
        .find(|r| r["path"] == "/lab" && r["decision"] == "allow")
        .expect("lab's record");
    assert_eq!(
        (lab["agent_id"].as_str(), lab["team_id"].as_str()),
        (Some("lab"), Some("research"))
    );
}

/// A JWKS endpoint on 127.0.0.1 whose answer the test changes.
struct JwksServer {
    url: String,
    answer: std::sync::Arc<std::sync::Mutex<(u16, String)>>,
}

impl JwksServer {
    fn start(body: String) -> JwksServer {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/jwks.json", l.local_addr().expect("addr"));
        let answer = std::sync::Arc::new(std::sync::Mutex::new((200u16, body)));
        let a = answer.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let (code, body) = a.lock().map(|x| x.clone()).unwrap_or((500, String::new()));
                let _ = write!(
                    s,
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer { url, answer }
    }

    fn set(&self, code: u16, body: String) {
        if let Ok(mut a) = self.answer.lock() {
            *a = (code, body);
        }
    }
}

#[test]
fn jwks_from_a_url_is_fetched_refreshed_and_the_last_good_set_kept() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let fixture = |n: &str| {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("authz/tests/fixtures")
                .join(n),
        )
        .expect("fixture")
    };
    let ed = EncodingKey::from_ed_pem(&fixture("ed25519.pem")).expect("ed");
    let ec = EncodingKey::from_ec_pem(&fixture("ec256.pem")).expect("ec");
    let set_of = |key: &EncodingKey, alg: Algorithm| {
        let jwk = Jwk::from_encoding_key(key, alg).expect("jwk");
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).expect("json")
    };
    let jwks = JwksServer::start(set_of(&ed, Algorithm::EdDSA));
    let up = Upstream::http();
    let body = format!(
        r#"jwt:
  issuers:
    - issuer: https://idp.test
      audiences: [clawgress]
      jwks_url: "{url}"
      jwks_refresh_s: 1
policies:
  - policy_id: ml-team
    priority: 10
    match:
      identity: {{team_id: ml}}
      destination: {{hosts: ["127.0.0.1/32"], ports: [{port}]}}
    action: allow
"#,
        url = jwks.url,
        port = up.addr.port()
    );
    let stack = Stack::start(&body);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({"iss": "https://idp.test", "aud": "clawgress", "exp": now + 600,
                                    "agent_id": "trainer-1", "team_id": "ml"});
    let ed_token = encode(&Header::new(Algorithm::EdDSA), &claims, &ed).expect("token");
    let ec_token = encode(&Header::new(Algorithm::ES256), &claims, &ec).expect("token");
    let target = format!("http://{}/", up.addr);
    let proxy = format!("http://{}", stack.proxy);
    let status = |t: &str| {
        curl(
            &[
                "-x",
                &proxy,
                "--proxy-header",
                &format!("Proxy-Authorization: Bearer {t}"),
                &target,
            ],
            &[],
        )
        .status
    };
    assert!(
        eventually(Duration::from_secs(10), || status(&ed_token) == 200),
        "fetched at start"
    );
    assert_eq!(status(&ec_token), 403, "not in the set");
    // The URL fails: the last good set stays in force, and it is an alert.
    jwks.set(500, "oops".into());
    assert!(eventually(Duration::from_secs(10), || stack
        .stderr()
        .contains("jwks-fetch-failed")));
    assert_eq!(status(&ed_token), 200);
    // Garbage is no better than an outage.
    jwks.set(200, r#"{"keys": []}"#.into());
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(status(&ed_token), 200);
    // Rotation: the new set is picked up by itself; the old key stops working.
    jwks.set(200, set_of(&ec, Algorithm::ES256));
    assert!(eventually(Duration::from_secs(10), || status(&ec_token) == 200));
    assert_eq!(status(&ed_token), 403);
}

/// `clawgress key new AGENT`: a fresh 256-bit key, printed once with the
/// hash to paste into config — and that key, so configured, gets through.
#[test]
fn key_new_prints_a_key_whose_hash_lets_the_agent_through() {
    let run = |agent: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clawgress"))
            .args(["key", "new", agent])
            .output()
            .expect("run clawgress key new");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let field = |text: &str, prefix: &str| -> String {
        text.lines()
            .find_map(|l| l.split_once(prefix).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
    };
    let (code, out) = run("fresh-bot");
    assert_eq!(code, Some(0), "{out}");
    let key = field(&out, "keep it secret): ");
    let hash = field(&out, "api_key_sha256: ")
        .trim_matches('"')
        .to_string();
    assert!(key.starts_with("cg_") && key.len() == 3 + 64, "{key}");
    assert_eq!(hash, key_hash(&key), "the printed hash is the key's");
    let (_, again) = run("fresh-bot");
    assert_ne!(
        field(&again, "keep it secret): "),
        key,
        "a new key each time"
    );
    assert_eq!(run("bad id!").0, Some(2), "a bad agent id is refused");

    let up = Upstream::http();
    let stack = Stack::start(&format!(
        r#"agents:
  - {{agent_id: fresh-bot, auth_type: api_key, api_key_sha256: "{hash}"}}
policies:
  - policy_id: fresh
    priority: 1
    match:
      identity: {{agent_id: fresh-bot}}
      destination: {{hosts: ["127.0.0.1/32"], ports: [{port}]}}
    action: allow
"#,
        port = up.addr.port()
    ));
    let target = format!("http://{}/", up.addr);
    let ok = curl(&["-x", &stack.proxy_url("fresh-bot", &key), &target], &[]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let bad = curl(
        &["-x", &stack.proxy_url("fresh-bot", "cg_00"), &target],
        &[],
    );
    assert_eq!(bad.status, 403, "{bad:?}");
}

/// Envoy sends authz only the headers it reads (`allowed_headers`): the
/// agent's credentials for the destination (Authorization, cookies) never
/// leave Envoy towards authz. The very config `up` generated, its authz
/// replaced by one that records what it is sent.
#[test]
fn authz_is_sent_only_the_headers_it_reads() {
    use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
        Authorization, AuthorizationServer,
    };
    use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<String>>>>);
    #[tonic::async_trait]
    impl Authorization for Recorder {
        async fn check(
            &self,
            r: tonic::Request<CheckRequest>,
        ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
            let mut names: Vec<String> = r
                .into_inner()
                .attributes
                .and_then(|a| a.request)
                .and_then(|r| r.http)
                .map(|h| h.headers.into_keys().collect())
                .unwrap_or_default();
            names.sort();
            self.0.lock().expect("lock").push(names);
            Ok(tonic::Response::new(CheckResponse {
                status: Some(envoy_types::pb::google::rpc::Status::default()),
                ..Default::default()
            }))
        }
    }

    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let generated =
        std::fs::read_to_string(stack.state().join("run/envoy.yaml")).expect("envoy.yaml");
    let dir = tempfile::tempdir().expect("tempdir");
    for d in ["run", "spool", "envoy"] {
        std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
    }
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let moved = generated
        .replace(
            &stack.state().display().to_string(),
            &dir.path().display().to_string(),
        )
        .replace(
            &format!("port_value: {}", stack.proxy.port()),
            &format!("port_value: {}", proxy.port()),
        );
    assert_ne!(moved, generated, "nothing to move in the generated config");
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, &moved).expect("write");

    let seen = Recorder::default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sock = dir.path().join("run/authz.sock");
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(&sock).expect("bind authz socket")
    };
    let server = seen.clone();
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    });
    let mut envoy = std::process::Command::new("envoy")
        .arg("-c")
        .arg(&cfg)
        .args(["--disable-hot-restart", "--log-level", "warn"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start envoy");
    let listening = eventually(Duration::from_secs(20), || {
        std::net::TcpStream::connect(proxy).is_ok()
    });
    let r = curl(
        &[
            "-x",
            &format!("http://{AGENT}:{KEY}@{proxy}"),
            "-H",
            "authorization: Bearer upstream-secret",
            "-H",
            "cookie: session=upstream-secret",
            "-H",
            "x-custom: 1",
            &format!("http://{}/hello", up.addr),
        ],
        &[],
    );
    let _ = envoy.kill();
    let _ = envoy.wait();
    assert!(listening, "the moved Envoy never listened");
    assert_eq!(r.status, 200, "{r:?}");
    let seen = seen.0.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![vec![
            "proxy-authorization".to_string(),
            "x-request-id".to_string()
        ]],
        "headers authz was sent"
    );
}

/// An IPv6 literal with a zone id in the Host header: Envoy would hand it
/// to its resolver as a name, so authz never lets it through, even where
/// a policy opens the address inside.
#[test]
fn a_zone_id_in_the_host_header_is_denied_not_resolved() {
    use base64::Engine;
    use std::io::{Read, Write};
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("{AGENT}:{KEY}"));
    for host in ["[::ffff:127.0.0.1%lo]", "[::ffff:127.0.0.1%25lo]"] {
        let mut s = std::net::TcpStream::connect(stack.proxy).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {host}:{}\r\nProxy-Authorization: Basic {cred}\r\nConnection: close\r\n\r\n",
            up.addr.port()
        )
        .expect("write");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.1 403"), "{host}: {resp}");
        // The policy opens the address inside: refused as a spelling
        // (write it plainly), not as a range no policy opened.
        assert!(resp.contains("malformed-destination"), "{host}: {resp}");
    }
    assert!(up.requests().is_empty(), "nothing reached the upstream");
}
