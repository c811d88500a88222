//! The web console (§7, §10): static assets embedded in the binary, served
//! at `/ui/` under a strict Content-Security-Policy, and the sign-in that
//! trades an admin token for an `HttpOnly`, `SameSite=Strict` session
//! cookie (`Secure` when the request came over TLS). The page calls the same
//! API as the CLI; state-changing calls carry the session's CSRF token in
//! `x-csrf-token`. No token is ever kept in the browser's storage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::control::Control;
use crate::{token_hash, Role};

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");
const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#1b2a3a\"/><path d=\"M4 8h8M8 4v8\" stroke=\"#fff\" stroke-width=\"2\"/></svg>";

pub const COOKIE: &str = "clawgress_session";
/// How long a session lasts.
const TTL: Duration = Duration::from_secs(8 * 3600);

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Debug, Clone)]
pub struct Session {
    pub name: String,
    pub role: Role,
    pub csrf: String,
    expires: Instant,
}

/// Sessions by the SHA-256 of their cookie value.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

fn random() -> String {
    let b: [u8; 32] = rand::random();
    hex::encode(b)
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The live session named by the request's cookie, if any.
pub fn session_of(headers: &HeaderMap, ctl: &Control) -> Option<Session> {
    let id = token_hash(&cookie_value(headers)?);
    let mut m = ctl.sessions.0.lock().ok()?;
    let now = Instant::now();
    m.retain(|_, s| s.expires > now);
    m.get(&id).cloned()
}

fn secured(mut r: Response, content_type: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn index() -> Response {
    secured(INDEX.into_response(), "text/html; charset=utf-8")
}
async fn app_js() -> Response {
    secured(APP_JS.into_response(), "text/javascript; charset=utf-8")
}
async fn style() -> Response {
    secured(STYLE.into_response(), "text/css; charset=utf-8")
}
async fn icon() -> Response {
    secured(ICON.into_response(), "image/svg+xml")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

fn json_err(status: StatusCode, msg: &str) -> Response {
    secured(
        (status, Json(json!({"error": msg}))).into_response(),
        "application/json",
    )
}

/// Trade an admin token for a session cookie; the answer carries the
/// caller's name, role and the CSRF token (kept in page memory only).
async fn sign_in(
    State(ctl): State<Arc<Control>>,
    headers: HeaderMap,
    body: Option<Json<SignIn>>,
) -> Response {
    let Some(Json(b)) = body else {
        return json_err(StatusCode::BAD_REQUEST, "send {\"token\": \"…\"}");
    };
    let (name, role) = match ctl.store().token_role(&token_hash(b.token.trim())).await {
        Ok(Some(x)) => x,
        Ok(None) => return json_err(StatusCode::UNAUTHORIZED, "unknown admin token"),
        Err(e) => {
            tracing::error!(error = %e, "sign-in failed");
            return json_err(StatusCode::INTERNAL_SERVER_ERROR, "sign-in failed");
        }
    };
    let (id, csrf) = (random(), random());
    if let Ok(mut m) = ctl.sessions.0.lock() {
        m.insert(
            token_hash(&id),
            Session {
                name: name.clone(),
                role,
                csrf: csrf.clone(),
                expires: Instant::now() + TTL,
            },
        );
    }
    tracing::info!(actor = name, role = role.as_str(), "web console sign-in");
    // Behind TLS (a terminating proxy says so) the cookie is Secure too.
    let tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        == Some("https");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        TTL.as_secs(),
        if tls { "; Secure" } else { "" }
    );
    let mut r = Json(json!({"name": name, "role": role, "csrf": csrf})).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    secured(r, "application/json")
}

/// Who the session is (the page asks on load); `signed_in: false` when
/// there is none (a question, not a failure).
async fn whoami(State(ctl): State<Arc<Control>>, headers: HeaderMap) -> Response {
    let v = match session_of(&headers, &ctl) {
        Some(s) => json!({"signed_in": true, "name": s.name, "role": s.role, "csrf": s.csrf}),
        None => json!({"signed_in": false}),
    };
    secured(Json(v).into_response(), "application/json")
}

async fn sign_out(State(ctl): State<Arc<Control>>, headers: HeaderMap) -> Response {
    if let (Some(v), Ok(mut m)) = (cookie_value(&headers), ctl.sessions.0.lock()) {
        m.remove(&token_hash(&v));
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "clawgress_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    secured(r, "text/plain")
}

pub fn routes() -> Router<Arc<Control>> {
    Router::new()
        .route(
            "/ui",
            get(|| async { axum::response::Redirect::permanent("/ui/") }),
        )
        .route("/ui/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style))
        .route("/ui/favicon.svg", get(icon))
        .route("/favicon.ico", get(icon))
        .route("/ui/session", post(sign_in).get(whoami).delete(sign_out))
}
