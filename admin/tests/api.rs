//! The admin API, route by route and role by role, through the real router
//! and a real SQLite store (`app().oneshot(...)`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clawgress_admin::{api, bootstrap_token, Config, Control, Role, SqliteStore, Store};
use clawgress_policy::Bundle;
use ed25519_dalek::SigningKey;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

struct App {
    _dir: tempfile::TempDir,
    ctl: Arc<Control>,
    bundle_dir: std::path::PathBuf,
    key: SigningKey,
    admin: String,
    operator: String,
    viewer: String,
}

async fn app() -> App {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("admin.db"))
            .await
            .expect("store"),
    );
    let admin = bootstrap_token(&*store, &dir.path().join("admin.token"))
        .await
        .expect("bootstrap")
        .expect("first token");
    let mut tokens = Vec::new();
    for (name, role) in [("op", Role::Operator), ("view", Role::Viewer)] {
        let t = clawgress_admin::new_token();
        store
            .add_token(&clawgress_admin::token_hash(&t), name, role, "now")
            .await
            .expect("token");
        tokens.push(t);
    }
    let key = SigningKey::from_bytes(&[7; 32]);
    let bundle_dir = dir.path().join("bundle");
    let ctl = Arc::new(Control::new(Config {
        store,
        key: key.clone(),
        bundle_dir: bundle_dir.clone(),
        rollout_wait: Duration::from_millis(0),
        on_event: None,
        audit_db: None,
        audit_log: None,
    }));
    App {
        _dir: dir,
        ctl,
        bundle_dir,
        key,
        admin,
        operator: tokens.remove(0),
        viewer: tokens.remove(0),
    }
}

impl App {
    async fn call(
        &self,
        token: Option<&str>,
        method: &str,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_h(token, method, uri, body, &[]).await
    }

    async fn call_h(
        &self,
        token: Option<&str>,
        method: &str,
        uri: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = api::router(self.ctl.clone())
            .oneshot(req)
            .await
            .expect("answer");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    fn bundle(&self) -> Bundle {
        let bytes = std::fs::read(self.bundle_dir.join("active")).expect("bundle published");
        Bundle::verify(&bytes, &self.key.verifying_key()).expect("bundle verifies")
    }

    async fn set(&self, path: &str, value: Value) -> (StatusCode, Value) {
        self.call(
            Some(&self.operator),
            "POST",
            "/api/v1/candidate/set",
            Some(json!({"path": path, "value": value})),
        )
        .await
    }
}

const ROUTES: &[(&str, &str, Role)] = &[
    ("GET", "/api/v1/candidate", Role::Viewer),
    ("GET", "/api/v1/active", Role::Viewer),
    ("GET", "/api/v1/show", Role::Viewer),
    ("GET", "/api/v1/compare", Role::Viewer),
    ("GET", "/api/v1/revisions", Role::Viewer),
    ("GET", "/api/v1/events", Role::Viewer),
    ("GET", "/api/v1/rollout", Role::Viewer),
    ("GET", "/api/v1/bundle", Role::Viewer),
    ("GET", "/api/v1/commits", Role::Viewer),
    ("GET", "/api/v1/profiles", Role::Viewer),
    ("GET", "/api/v1/agents", Role::Viewer),
    ("GET", "/api/v1/policies", Role::Viewer),
    ("GET", "/api/v1/quotas", Role::Viewer),
    ("POST", "/api/v1/candidate/set", Role::Operator),
    ("POST", "/api/v1/candidate/delete", Role::Operator),
    ("PUT", "/api/v1/candidate", Role::Operator),
    ("POST", "/api/v1/configure", Role::Operator),
    ("POST", "/api/v1/commit", Role::Operator),
    ("POST", "/api/v1/confirm", Role::Operator),
    ("POST", "/api/v1/rollback", Role::Operator),
    ("POST", "/api/v1/lockdown", Role::Operator),
    ("POST", "/api/v1/agents", Role::Operator),
    ("POST", "/api/v1/agents/x/rotate-key", Role::Operator),
    ("POST", "/api/v1/agents/x/revoke-key", Role::Operator),
    ("GET", "/api/v1/audit", Role::Viewer),
    ("GET", "/api/v1/alerts", Role::Viewer),
    ("GET", "/api/v1/stats", Role::Viewer),
    ("POST", "/api/v1/evaluate", Role::Viewer),
    ("GET", "/api/v1/audit/stream?max_s=1", Role::Viewer),
    ("GET", "/api/v1/audit/proof?seq=1", Role::Viewer),
    ("POST", "/api/v1/import", Role::Admin),
    ("POST", "/api/v1/tokens", Role::Admin),
];

#[tokio::test]
async fn every_route_needs_a_token_and_the_right_role() {
    let a = app().await;
    for (method, uri, need) in ROUTES {
        let (s, body) = a.call(None, method, uri, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri} without token");
        assert!(body["error"].is_string());
        let (s, _) = a.call(Some("cga_wrong"), method, uri, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri} unknown token");
        for (token, role) in [
            (&a.viewer, Role::Viewer),
            (&a.operator, Role::Operator),
            (&a.admin, Role::Admin),
        ] {
            let (s, body) = a.call(Some(token), method, uri, None).await;
            if role < *need {
                assert_eq!(s, StatusCode::FORBIDDEN, "{method} {uri} as {role:?}");
                assert!(!body.to_string().contains(token.as_str()));
            } else {
                assert!(
                    s != StatusCode::FORBIDDEN && s != StatusCode::UNAUTHORIZED,
                    "{method} {uri} as {role:?}: {s}"
                );
            }
        }
    }
}

#[tokio::test]
async fn set_configure_commit_publishes_a_signed_bundle_with_the_change() {
    let a = app().await;
    assert_eq!(
        a.set("agents.build-bot.team_id", json!("infra")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        a.set("agents.build-bot.auth_type", json!("api_key"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        a.set("agents.build-bot.api_key_sha256", json!("a".repeat(64)))
            .await
            .0,
        StatusCode::OK
    );
    a.set("policies.allow-pypi.priority", json!(100)).await;
    a.set(
        "policies.allow-pypi.match.destination.hosts",
        json!(["pypi.org"]),
    )
    .await;
    a.set("policies.allow-pypi.action", json!("allow")).await;
    let (s, cmp) = a
        .call(Some(&a.viewer), "GET", "/api/v1/compare", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        cmp["diff"].as_array().expect("diff").iter().any(|l| l
            .as_str()
            .is_some_and(|l| l.starts_with("+ policies.allow-pypi"))),
        "{cmp}"
    );

    // What does this request get? Allowed by the candidate, not yet by
    // the active revision; a viewer may ask.
    let sample = json!({"agent_id": "build-bot", "url": "https://pypi.org/simple/"});
    let (s, ev) = a
        .call(
            Some(&a.viewer),
            "POST",
            "/api/v1/evaluate",
            Some(sample.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ev}");
    assert_eq!(
        (
            ev["candidate"]["decision"].as_str(),
            ev["candidate"]["policy_id"].as_str()
        ),
        (Some("allow"), Some("allow-pypi")),
        "{ev}"
    );
    assert_eq!(ev["active"]["decision"], "deny", "{ev}");
    assert_eq!(ev["differs"], true);
    let (s, ev) = a
        .call(
            Some(&a.viewer),
            "POST",
            "/api/v1/evaluate",
            Some(json!({"agent_id": "build-bot", "url": "ftp://pypi.org/"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{ev}");

    let (s, conf) = a
        .call(Some(&a.operator), "POST", "/api/v1/configure", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{conf}");
    let rev = conf["revision"].as_i64().expect("revision id");
    let (s, c) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/commit",
            Some(json!({"revision": rev})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["revision"], rev);
    assert!(c["commit_id"].is_i64() && c["timestamp"].is_string());
    let b = a.bundle();
    assert_eq!(b.revision, rev as u64);
    assert_eq!(b.document.policies[0].policy_id.as_str(), "allow-pypi");
    assert_eq!(b.document.agents[0].team_id, "infra");

    let (_, show) = a
        .call(
            Some(&a.viewer),
            "GET",
            "/api/v1/show?which=active&path=agents.build-bot.team_id",
            None,
        )
        .await;
    assert_eq!(show, json!("infra"));
    let (s, _) = a
        .call(
            Some(&a.viewer),
            "GET",
            "/api/v1/show?which=active&path=agents.nobody",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Every step was recorded with its actor.
    let (_, ev) = a.call(Some(&a.viewer), "GET", "/api/v1/events", None).await;
    let actions: Vec<(String, String)> = ev["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_string(),
                e["action"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("op".into(), "commit".into())),
        "{actions:?}"
    );
    assert!(actions.contains(&("op".into(), "configure".into())));
}

#[tokio::test]
async fn an_invalid_candidate_is_refused_with_paths_and_nothing_changes() {
    let a = app().await;
    a.set("policies.p.priority", json!(1)).await;
    a.set("policies.p.action", json!("maybe")).await;
    let (s, body) = a
        .call(Some(&a.operator), "POST", "/api/v1/configure", None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let errs = body["errors"].as_array().expect("errors");
    assert!(
        errs.iter()
            .any(|e| e["path"].as_str().is_some_and(|p| p.contains("action"))),
        "{body}"
    );
    let (s, _) = a
        .call(Some(&a.operator), "POST", "/api/v1/commit", None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!a.bundle_dir.join("active").exists());
    let (_, active) = a.call(Some(&a.viewer), "GET", "/api/v1/active", None).await;
    assert_eq!(active["revision"], Value::Null);
    // A bad path is a 400 naming it.
    let (s, body) = a.set("agents..x", json!(1)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["errors"][0]["path"], "agents..x");
}

#[tokio::test]
async fn whole_document_writes_need_the_version_they_replace() {
    let a = app().await;
    let (_, c) = a
        .call(Some(&a.viewer), "GET", "/api/v1/candidate", None)
        .await;
    let v = c["version"].as_i64().expect("version").to_string();
    let doc = json!({"policies": []});
    let (s, _) = a
        .call(
            Some(&a.operator),
            "PUT",
            "/api/v1/candidate",
            Some(doc.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_REQUIRED);
    let (s, _) = a
        .call_h(
            Some(&a.operator),
            "PUT",
            "/api/v1/candidate",
            Some(doc.clone()),
            &[("if-match", &v)],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // A second operator who read the same version loses, visibly.
    let (s, body) = a
        .call_h(
            Some(&a.admin),
            "PUT",
            "/api/v1/candidate",
            Some(doc),
            &[("if-match", &v)],
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
}

async fn commit_policy(a: &App, id: &str) -> i64 {
    a.set(&format!("policies.{id}.priority"), json!(10)).await;
    a.set(
        &format!("policies.{id}.match.destination.hosts"),
        json!([format!("{id}.example")]),
    )
    .await;
    a.set(&format!("policies.{id}.action"), json!("allow"))
        .await;
    let (s, c) = a
        .call(Some(&a.operator), "POST", "/api/v1/commit", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    c["revision"].as_i64().expect("revision")
}

#[tokio::test]
async fn rollback_commits_an_earlier_document_as_a_newer_revision() {
    let a = app().await;
    let r1 = commit_policy(&a, "one").await;
    let r2 = commit_policy(&a, "two").await;
    assert_eq!(a.bundle().document.policies.len(), 2);
    // Any two revisions side by side: what r2 added to r1, and back.
    let (s, cmp) = a
        .call(
            Some(&a.viewer),
            "GET",
            &format!("/api/v1/compare?from={r1}&to={r2}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{cmp}");
    let changes = cmp["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 1, "{cmp}");
    assert_eq!(changes[0]["path"], "policies.two");
    assert!(
        changes[0]["old"].is_null() && changes[0]["new"]["action"].is_string(),
        "{cmp}"
    );
    let (_, back) = a
        .call(
            Some(&a.viewer),
            "GET",
            &format!("/api/v1/compare?from={r2}&to={r1}"),
            None,
        )
        .await;
    assert_eq!(back["diff"], json!(["- policies.two"]), "{back}");
    let (s, _) = a
        .call(Some(&a.viewer), "GET", "/api/v1/compare?from=999", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Pinned to what the caller saw: refused if another revision is active.
    let (s, c) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/rollback",
            Some(json!({"revision": r1, "expect_active": r1})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{c}");
    assert!(
        c["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("revision {r2} is active"))),
        "{c}"
    );
    let (s, c) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/rollback",
            Some(json!({"revision": r1, "expect_active": r2})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let r3 = c["revision"].as_i64().expect("rev");
    assert!(
        r3 > r2,
        "a rollback is a new revision, so services accept it"
    );
    let b = a.bundle();
    assert_eq!(b.revision, r3 as u64);
    assert_eq!(b.document.policies.len(), 1);
    let (s, _) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/rollback",
            Some(json!({"revision": 999})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn commit_confirmed_rolls_back_by_itself_unless_confirmed() {
    let a = app().await;
    let r1 = commit_policy(&a, "base").await;
    a.set("policies.risky.priority", json!(1)).await;
    a.set("policies.risky.match.destination.hosts", json!(["*"]))
        .await;
    a.set("policies.risky.action", json!("deny")).await;
    let (s, c) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/commit",
            Some(json!({"confirmed_minutes": 0.01})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert!(c["confirm_by"].is_string());
    assert_eq!(a.bundle().document.policies.len(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let back = a
        .ctl
        .check_confirm_deadline()
        .await
        .expect("check")
        .expect("rolled back");
    assert_eq!(
        a.bundle().document.policies.len(),
        1,
        "back to revision {r1}'s document"
    );
    assert!(back.revision > c["revision"].as_i64().expect("rev"));
    let (_, ev) = a.call(Some(&a.viewer), "GET", "/api/v1/events", None).await;
    assert!(ev.to_string().contains("system:confirm-timeout"));

    // Confirmed in time: it stays.
    a.set("policies.risky.priority", json!(1)).await;
    a.set("policies.risky.match.destination.hosts", json!(["*"]))
        .await;
    a.set("policies.risky.action", json!("deny")).await;
    a.call(
        Some(&a.operator),
        "POST",
        "/api/v1/commit",
        Some(json!({"confirmed_minutes": 0.01})),
    )
    .await;
    let (s, _) = a
        .call(Some(&a.operator), "POST", "/api/v1/confirm", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(a
        .ctl
        .check_confirm_deadline()
        .await
        .expect("check")
        .is_none());
    assert_eq!(a.bundle().document.policies.len(), 2);
    let (s, _) = a
        .call(Some(&a.operator), "POST", "/api/v1/confirm", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "nothing left to confirm");
    let (s, _) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/commit",
            Some(json!({"confirmed_minutes": -1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn lockdown_replaces_every_policy_with_deny_all() {
    let a = app().await;
    commit_policy(&a, "one").await;
    let (s, c) = a
        .call(Some(&a.operator), "POST", "/api/v1/lockdown", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let b = a.bundle();
    assert_eq!(b.document.policies.len(), 1);
    assert_eq!(b.document.policies[0].policy_id.as_str(), "lockdown");
}

#[tokio::test]
async fn agent_add_shows_the_key_once_and_keeps_only_its_hash() {
    let a = app().await;
    let (s, body) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/agents",
            Some(json!({"agent_id": "bot-1", "team_id": "infra"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let key = body["api_key"].as_str().expect("key").to_string();
    let (_, cand) = a
        .call(Some(&a.viewer), "GET", "/api/v1/candidate", None)
        .await;
    assert!(!cand.to_string().contains(&key));
    assert_eq!(
        cand["document"]["agents"][0]["api_key_sha256"],
        clawgress_admin::token_hash(&key)
    );
    let (s, _) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/agents",
            Some(json!({"agent_id": "bot-1"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "no duplicate agents");
    let (s, _) = a
        .call(
            Some(&a.operator),
            "POST",
            "/api/v1/agents",
            Some(json!({"agent_id": "bad id!"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, cand) = a
        .call(Some(&a.viewer), "GET", "/api/v1/candidate", None)
        .await;
    assert_eq!(cand["document"]["agents"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn import_commits_only_what_changed_and_tokens_are_admin_only() {
    let a = app().await;
    let doc = json!({"policies": [{"policy_id": "p", "priority": 1, "match": {"destination": {"hosts": ["a.example"]}}, "action": "allow"}]});
    let (s, r) = a
        .call(
            Some(&a.admin),
            "POST",
            "/api/v1/import",
            Some(json!({"source": "file:/x.yaml", "document": doc})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["committed"]["revision"].is_i64());
    let (_, r) = a
        .call(
            Some(&a.admin),
            "POST",
            "/api/v1/import",
            Some(json!({"source": "file:/x.yaml", "document": doc})),
        )
        .await;
    assert_eq!(
        r["committed"],
        Value::Null,
        "the same document is no new revision"
    );
    let (s, t) = a
        .call(
            Some(&a.admin),
            "POST",
            "/api/v1/tokens",
            Some(json!({"name": "ci", "role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let tok = t["token"].as_str().expect("token");
    let (s, _) = a.call(Some(tok), "GET", "/api/v1/active", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = a.call(Some(tok), "POST", "/api/v1/commit", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_openapi_document_is_generated_and_names_every_route() {
    let a = app().await;
    let (s, _) = a.call(None, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, doc) = a
        .call(Some(&a.viewer), "GET", "/api/v1/openapi.json", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    for (method, uri, _) in ROUTES {
        let templated = uri
            .split('?')
            .next()
            .unwrap_or(uri)
            .replace("/agents/x/", "/agents/{id}/");
        let op = &doc["paths"][templated.as_str()][method.to_lowercase()];
        assert!(
            op.is_object(),
            "{method} {uri} missing from the OpenAPI document"
        );
        assert!(
            op["security"].is_array(),
            "{method} {uri} must declare bearer auth"
        );
    }
    assert!(doc["components"]["schemas"]["SetBody"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn the_console_trades_a_token_for_a_strict_cookie_and_needs_csrf_to_change_things() {
    let a = app().await;
    let send = |req: Request<Body>| {
        let ctl = a.ctl.clone();
        async move {
            let r = api::router(ctl).oneshot(req).await.expect("answer");
            let status = r.status();
            let headers = r.headers().clone();
            let bytes = r.into_body().collect().await.expect("body").to_bytes();
            (
                status,
                headers,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    // The page and its assets: strict CSP, nothing inline needed.
    let (s, h, _) = send(Request::get("/ui/").body(Body::empty()).expect("req")).await;
    assert_eq!(s, StatusCode::OK);
    let csp = h["content-security-policy"].to_str().expect("csp");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"));
    // A wrong token is refused; a good one gets an HttpOnly, SameSite=Strict cookie.
    let post = |token: &str| {
        Request::post("/ui/session")
            .header("content-type", "application/json")
            .body(Body::from(json!({"token": token}).to_string()))
            .expect("req")
    };
    let (s, h, _) = send(post("cga_nope")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.get("set-cookie").is_none());
    let (s, h, me) = send(post(&a.operator)).await;
    assert_eq!(s, StatusCode::OK);
    let cookie = h["set-cookie"].to_str().expect("cookie").to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains(&a.operator), "the cookie is not the token");
    assert_eq!(me["role"], "operator");
    let csrf = me["csrf"].as_str().expect("csrf").to_string();
    let session = cookie.split(';').next().expect("pair").to_string();
    // Reads with the cookie work; a change needs the CSRF header too.
    let (s, _, _) = send(
        Request::get("/api/v1/agents")
            .header("cookie", &session)
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let lockdown = |csrf: Option<&str>| {
        let mut r = Request::post("/api/v1/lockdown").header("cookie", &session);
        if let Some(c) = csrf {
            r = r.header("x-csrf-token", c);
        }
        r.body(Body::empty()).expect("req")
    };
    let (s, _, _) = send(lockdown(None)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, _, _) = send(lockdown(Some("forged"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "wrong CSRF token");
    let (s, _, body) = send(lockdown(Some(&csrf))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Sign out ends the session.
    let (s, _, _) = send(
        Request::delete("/ui/session")
            .header("cookie", &session)
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = send(
        Request::get("/api/v1/agents")
            .header("cookie", &session)
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A viewer's session, with its own valid CSRF token, still cannot
    // change anything: the role decides, as it does for a bearer token.
    let (s, h, me) = send(post(&a.viewer)).await;
    assert_eq!((s, me["role"].as_str()), (StatusCode::OK, Some("viewer")));
    let session = h["set-cookie"]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_string();
    let csrf = me["csrf"].as_str().expect("csrf").to_string();
    for (path, body) in [
        ("/api/v1/commit", "{}"),
        ("/api/v1/configure", "{}"),
        ("/api/v1/rollback", r#"{"revision": 1}"#),
        ("/api/v1/lockdown", "{}"),
        (
            "/api/v1/candidate/set",
            r#"{"path": "agents.x.team_id", "value": "y"}"#,
        ),
    ] {
        let (s, _, body) = send(
            Request::post(path)
                .header("cookie", &session)
                .header("x-csrf-token", &csrf)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("req"),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {body}");
    }
}

/// The database under the control plane fails (here: a table gone under
/// it): 503 naming the store, never a 500 that reads as a bug, and the
/// `control-plane-store-failed` alert (counted as a store error).
#[tokio::test]
async fn a_failing_control_plane_store_answers_503() {
    let a = app().await;
    let db = a._dir.path().join("admin.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open");
    sqlx::query("DROP TABLE revisions")
        .execute(&pool)
        .await
        .expect("drop");
    let (s, body) = a
        .call(Some(&a.viewer), "GET", "/api/v1/revisions", None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.to_string().contains("store"), "{body}");
}

#[tokio::test]
async fn the_bundle_is_served_with_its_revision_as_etag_and_long_polls() {
    let a = app().await;
    let (s, _) = a.call(Some(&a.viewer), "GET", "/api/v1/bundle", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing committed");
    let r1 = commit_policy(&a, "one").await;
    let get = |etag: Option<String>, wait: u64| {
        let ctl = a.ctl.clone();
        let token = a.viewer.clone();
        async move {
            let mut req = Request::get(format!("/api/v1/bundle?wait={wait}"))
                .header("authorization", format!("Bearer {token}"));
            if let Some(e) = etag {
                req = req.header("if-none-match", e);
            }
            let r = api::router(ctl)
                .oneshot(req.body(Body::empty()).expect("req"))
                .await
                .expect("answer");
            let status = r.status();
            let etag = r
                .headers()
                .get("etag")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let bytes = r.into_body().collect().await.expect("body").to_bytes();
            (status, etag, bytes)
        }
    };
    let (s, etag, bytes) = get(None, 0).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(etag.as_deref(), Some(format!("\"{r1}\"").as_str()));
    let b = Bundle::verify(&bytes, &a.key.verifying_key()).expect("verifies");
    assert_eq!(b.revision, r1 as u64);
    // Same revision, no wait: 304.
    let (s, _, _) = get(etag.clone(), 0).await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);
    // Long-poll: answered as soon as a commit lands.
    let waiting = tokio::spawn(get(etag, 20));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r2 = commit_policy(&a, "two").await;
    let (s, etag2, _) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered before the wait ran out")
        .expect("join");
    assert_eq!(s, StatusCode::OK);
    assert_eq!(etag2.as_deref(), Some(format!("\"{r2}\"").as_str()));
}

#[tokio::test]
async fn profiles_are_listed_with_the_rules_they_become() {
    let a = app().await;
    let (s, p) = a
        .call(Some(&a.viewer), "GET", "/api/v1/profiles", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = p["profiles"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["none", "training-updates", "external-api", "custom"]
    );
    let tu = &p["profiles"][1]["policies"];
    assert!(tu.to_string().contains("pypi.org"), "{tu}");
    assert_eq!(p["profiles"][3]["policies"], json!([]));
}
