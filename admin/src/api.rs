//! The REST API under `/api/v1/` (§7, §10). Every call needs
//! `Authorization: Bearer <admin token>`: none or an unknown one is 401, a
//! role too low for the call is 403. Errors are JSON `{error, errors?}` and
//! never carry a secret.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::control::{Control, ControlError};
use crate::store::StoreError;
use crate::{paths, token_hash, Role};

type Ctl = Arc<Control>;

/// An error answer.
pub struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(self.1)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"clawgress\""),
            );
        }
        r
    }
}

fn api_err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, json!({"error": msg.into()}))
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        match e {
            ControlError::Invalid(errs) => ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": "the document is invalid", "errors": errs}),
            ),
            ControlError::Path(p) => ApiError(
                StatusCode::BAD_REQUEST,
                json!({"error": p.to_string(), "errors": [{"path": p.path, "reason": p.reason}]}),
            ),
            ControlError::BadRequest(m) => api_err(StatusCode::BAD_REQUEST, m),
            ControlError::Store(StoreError::Conflict { .. }) => {
                api_err(StatusCode::CONFLICT, e.to_string())
            }
            ControlError::Store(StoreError::NoRevision(_)) => {
                api_err(StatusCode::NOT_FOUND, e.to_string())
            }
            // The database itself failed (unreachable, full, corrupt, its
            // schema gone): 503 and an alert, counted in
            // clawgress_store_errors_total{store="control_plane"}. A row that
            // does not decode is a bug, not an outage: 500 below.
            ControlError::Store(
                StoreError::Db(
                    sqlx::Error::Io(_)
                    | sqlx::Error::Database(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::WorkerCrashed,
                )
                | StoreError::Migrate(_),
            ) => {
                tracing::error!(alert = "control-plane-store-failed", error = %e, "control-plane store failed");
                api_err(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => {
                tracing::error!(error = %other, "admin API error");
                api_err(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

/// The roles as numbers, for [`Auth`].
pub const VIEWER: u8 = 0;
pub const OPERATOR: u8 = 1;
pub const ADMIN: u8 = 2;

fn role_of(n: u8) -> Role {
    match n {
        0 => Role::Viewer,
        1 => Role::Operator,
        _ => Role::Admin,
    }
}

/// The caller's name (from the bearer token), who has at least role `MIN`.
/// Checked before the body is read, so a caller without the role learns
/// nothing from how its body would have been judged.
pub struct Auth<const MIN: u8>(pub String);

impl<const MIN: u8> FromRequestParts<Ctl> for Auth<MIN> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, ctl: &Ctl) -> Result<Auth<MIN>, ApiError> {
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let (name, role) = match bearer {
            Some(token) => match ctl.store().token_role(&token_hash(token)).await {
                Ok(Some(x)) => x,
                Ok(None) => return Err(api_err(StatusCode::UNAUTHORIZED, "unknown admin token")),
                Err(e) => return Err(ControlError::from(e).into()),
            },
            // The web UI: a session cookie, and for anything that changes
            // state the session's CSRF token in a header.
            None => {
                let session = crate::ui::session_of(&parts.headers, ctl).ok_or_else(|| {
                    api_err(
                        StatusCode::UNAUTHORIZED,
                        "an admin token is required (Authorization: Bearer …)",
                    )
                })?;
                if parts.method != axum::http::Method::GET
                    && parts
                        .headers
                        .get("x-csrf-token")
                        .and_then(|v| v.to_str().ok())
                        != Some(session.csrf.as_str())
                {
                    return Err(api_err(
                        StatusCode::FORBIDDEN,
                        "missing or wrong x-csrf-token for a cookie session",
                    ));
                }
                (session.name, session.role)
            }
        };
        let need = role_of(MIN);
        if role < need {
            return Err(api_err(
                StatusCode::FORBIDDEN,
                format!(
                    "this call needs the {} role; the token has {}",
                    need.as_str(),
                    role.as_str()
                ),
            ));
        }
        Ok(Auth(name))
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Clawgress admin API", description = "The control plane of DESIGN.md §7: candidate, configure, commit, rollback, revisions, agents, tokens."),
    paths(candidate, put_candidate, set, delete, active, show, compare, configure, commit,
          confirm, rollback, lockdown, revisions, revision, import, events, rollout, bundle, commits, profiles, agents,
          add_agent, rotate_key, revoke_key, policies, quotas, add_token, audit, audit_stream, audit_proof, alerts, stats, evaluate, openapi),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    summary = "This document",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object)),
    security(("bearer" = []))
)]
async fn openapi(_: Auth<VIEWER>) -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi())
}

pub fn router(ctl: Ctl) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/candidate", get(candidate).put(put_candidate))
        .route("/api/v1/candidate/set", post(set))
        .route("/api/v1/candidate/delete", post(delete))
        .route("/api/v1/active", get(active))
        .route("/api/v1/show", get(show))
        .route("/api/v1/compare", get(compare))
        .route("/api/v1/configure", post(configure))
        .route("/api/v1/commit", post(commit))
        .route("/api/v1/confirm", post(confirm))
        .route("/api/v1/rollback", post(rollback))
        .route("/api/v1/lockdown", post(lockdown))
        .route("/api/v1/revisions", get(revisions))
        .route("/api/v1/revisions/{id}", get(revision))
        .route("/api/v1/import", post(import))
        .route("/api/v1/events", get(events))
        .route("/api/v1/rollout", get(rollout))
        .route("/api/v1/commits", get(commits))
        .route("/api/v1/profiles", get(profiles))
        .route("/api/v1/bundle", get(bundle))
        .route("/api/v1/agents", get(agents).post(add_agent))
        .route("/api/v1/agents/{id}/rotate-key", post(rotate_key))
        .route("/api/v1/agents/{id}/revoke-key", post(revoke_key))
        .route("/api/v1/policies", get(policies))
        .route("/api/v1/quotas", get(quotas))
        .route("/api/v1/tokens", post(add_token))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/audit/stream", get(audit_stream))
        .route("/api/v1/audit/proof", get(audit_proof))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/evaluate", post(evaluate))
        .merge(crate::ui::routes())
        .fallback(|| async { api_err(StatusCode::NOT_FOUND, "no such API route") })
        .with_state(ctl)
}

type Answer = Result<Json<Value>, ApiError>;

fn to_json<T: serde::Serialize>(v: T) -> Answer {
    serde_json::to_value(v)
        .map(Json)
        .map_err(|e| api_err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[utoipa::path(
    get,
    path = "/api/v1/candidate",
    summary = "The candidate document and its version",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn candidate(State(ctl): State<Ctl>, _: Auth<VIEWER>) -> Answer {
    to_json(ctl.candidate().await?)
}

/// `If-Match: <version>` is required: a whole-document write must say
/// which version it replaces, so two operators cannot overwrite each other.
#[utoipa::path(
    put,
    path = "/api/v1/candidate",
    summary = "Replace the candidate (If-Match: version required)",
    description = "Role: operator.",
    request_body(content = Object, description = "the policy document"),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn put_candidate(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    headers: HeaderMap,
    Json(doc): Json<Value>,
) -> Answer {
    let actor = actor.as_str();
    let expected = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().trim_matches('"').parse::<i64>().ok())
        .ok_or_else(|| {
            api_err(
                StatusCode::PRECONDITION_REQUIRED,
                "If-Match: <candidate version> is required",
            )
        })?;
    if !doc.is_object() {
        return Err(api_err(
            StatusCode::BAD_REQUEST,
            "the document must be a JSON object",
        ));
    }
    to_json(
        ctl.edit(actor, "replace candidate", Some(expected), move |d| {
            *d = doc;
            Ok(())
        })
        .await?,
    )
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SetBody {
    path: String,
    #[schema(value_type = Object)]
    value: Value,
    #[serde(default)]
    expected_version: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/api/v1/candidate/set",
    summary = "Set a path in the candidate",
    description = "Role: operator.",
    request_body = SetBody,
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn set(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    Json(b): Json<SetBody>,
) -> Answer {
    let actor = actor.as_str();
    let what = format!("set {}", b.path);
    to_json(
        ctl.edit(actor, &what, b.expected_version, |d| {
            paths::set(d, &b.path, b.value).map_err(Into::into)
        })
        .await?,
    )
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    path: String,
    #[serde(default)]
    expected_version: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/api/v1/candidate/delete",
    summary = "Delete a path from the candidate",
    description = "Role: operator.",
    request_body = DeleteBody,
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn delete(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    Json(b): Json<DeleteBody>,
) -> Answer {
    let actor = actor.as_str();
    let what = format!("delete {}", b.path);
    to_json(
        ctl.edit(actor, &what, b.expected_version, |d| {
            paths::delete(d, &b.path).map_err(Into::into)
        })
        .await?,
    )
}

#[utoipa::path(
    get,
    path = "/api/v1/active",
    summary = "The active revision and its document",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn active(State(ctl): State<Ctl>, _: Auth<VIEWER>) -> Answer {
    to_json(ctl.active().await?)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ShowQuery {
    #[serde(default)]
    which: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

/// `show [candidate|active] [path]`.
#[utoipa::path(
    get,
    path = "/api/v1/show",
    summary = "The active or candidate document, or one path of it",
    description = "Role: viewer.",
    params(ShowQuery),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn show(State(ctl): State<Ctl>, _: Auth<VIEWER>, Query(q): Query<ShowQuery>) -> Answer {
    let doc = match q.which.as_deref().unwrap_or("active") {
        "active" => ctl.active().await?.document,
        "candidate" => ctl.candidate().await?.document,
        other => {
            return Err(api_err(
                StatusCode::BAD_REQUEST,
                format!("show what? {other:?} is neither candidate nor active"),
            ))
        }
    };
    match q.path.as_deref().filter(|p| !p.is_empty()) {
        None => Ok(Json(doc)),
        Some(p) => match paths::get(&doc, p).map_err(ControlError::from)? {
            Some(v) => Ok(Json(v)),
            None => Err(api_err(
                StatusCode::NOT_FOUND,
                format!("{p}: nothing there"),
            )),
        },
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/evaluate",
    summary = "What does this request get? A sample (agent, method, URL) decided against the candidate and the active revision",
    description = "Role: viewer. Decided as authz's Check decides it; node settings (private_destinations_allowed, quotas) are not applied.",
    request_body = crate::whatif::Sample,
    responses((status = 200, description = "OK", body = Object), (status = 400, description = "bad sample"), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low"), (status = 422, description = "the candidate does not validate")),
    security(("bearer" = []))
)]
async fn evaluate(
    State(ctl): State<Ctl>,
    _: Auth<VIEWER>,
    Json(sample): Json<crate::whatif::Sample>,
) -> Answer {
    let active = ctl.active().await?;
    let cand = ctl.candidate().await?;
    let parse = |v: &Value, what: &str| {
        clawgress_policy::PolicyDocument::from_json(&v.to_string()).map_err(|e| {
            api_err(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the {what} does not validate: {e}"),
            )
        })
    };
    let a_doc = parse(&active.document, "active document")?;
    let c_doc = parse(&cand.document, "candidate")?;
    let bad = |e: crate::whatif::SampleError| api_err(StatusCode::BAD_REQUEST, e.to_string());
    let rev = active.revision.map_or(String::new(), |r| r.to_string());
    let on_active = crate::whatif::evaluate(&a_doc, &rev, &sample).map_err(bad)?;
    let on_candidate = crate::whatif::evaluate(&c_doc, "candidate", &sample).map_err(bad)?;
    to_json(json!({
        "active": on_active,
        "candidate": on_candidate,
        "differs": on_active["decision"] != on_candidate["decision"]
            || on_active["policy_id"] != on_candidate["policy_id"],
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct CompareQuery {
    /// A revision id (default: the active revision).
    from: Option<i64>,
    /// A revision id (default: the candidate).
    to: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/compare",
    summary = "Diff of two documents: by default candidate against active; any two revisions with from/to",
    description = "Role: viewer. `changes` lists each changed path with its value before and after, for side-by-side views.",
    params(CompareQuery),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn compare(State(ctl): State<Ctl>, _: Auth<VIEWER>, Query(q): Query<CompareQuery>) -> Answer {
    let a = ctl.active().await?;
    let cand = ctl.candidate().await?;
    let doc_of = |id: i64| {
        let ctl = ctl.clone();
        async move { ctl.revision_document(id).await.map(|(_, d)| d) }
    };
    let old = match q.from {
        Some(id) => doc_of(id).await?,
        None => a.document.clone(),
    };
    let new = match q.to {
        Some(id) => doc_of(id).await?,
        None => cand.document.clone(),
    };
    to_json(json!({
        "active_revision": a.revision,
        "candidate_version": cand.version,
        "from": q.from.map_or(json!("active"), |r| json!(r)),
        "to": q.to.map_or(json!("candidate"), |r| json!(r)),
        "diff": paths::diff(&old, &new),
        "changes": paths::changes(&old, &new),
    }))
}

#[utoipa::path(
    post,
    path = "/api/v1/configure",
    summary = "Validate the candidate and stage it as a revision",
    description = "Role: operator.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn configure(State(ctl): State<Ctl>, Auth::<OPERATOR>(actor): Auth<OPERATOR>) -> Answer {
    let actor = actor.as_str();
    to_json(ctl.configure(actor).await?)
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    #[serde(default)]
    revision: Option<i64>,
    /// `commit confirmed <minutes>`.
    #[serde(default)]
    confirmed_minutes: Option<f64>,
}

#[utoipa::path(
    post,
    path = "/api/v1/commit",
    summary = "Sign and publish a revision (default: the candidate)",
    description = "Role: operator.",
    request_body = CommitBody,
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn commit(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    body: Option<Json<CommitBody>>,
) -> Answer {
    let actor = actor.as_str();
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let within = match b.confirmed_minutes {
        None => None,
        Some(m) if m.is_finite() && m > 0.0 && m <= 24.0 * 60.0 => {
            Some(std::time::Duration::from_secs_f64(m * 60.0))
        }
        Some(m) => {
            return Err(api_err(
                StatusCode::BAD_REQUEST,
                format!("confirmed_minutes must be in (0, 1440], not {m}"),
            ))
        }
    };
    to_json(ctl.commit(actor, b.revision, within).await?)
}

#[utoipa::path(
    post,
    path = "/api/v1/confirm",
    summary = "Keep the revision of a commit confirmed",
    description = "Role: operator.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn confirm(State(ctl): State<Ctl>, Auth::<OPERATOR>(actor): Auth<OPERATOR>) -> Answer {
    let actor = actor.as_str();
    to_json(ctl.confirm(actor).await?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    revision: i64,
    /// The revision the caller believes is active (the console sends the
    /// one its diff was made from): refused with 409 if another is, so a
    /// commit made meanwhile is not rolled back unseen.
    #[serde(default)]
    expect_active: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/api/v1/rollback",
    summary = "Commit an earlier revision again",
    description = "Role: operator.",
    request_body = RollbackBody,
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn rollback(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    Json(b): Json<RollbackBody>,
) -> Answer {
    let actor = actor.as_str();
    if let Some(expected) = b.expect_active {
        let now = ctl.active().await?.revision;
        if now != Some(expected) {
            return Err(api_err(
                StatusCode::CONFLICT,
                format!(
                    "revision {} is active now, not {expected}: look at what the rollback changes again",
                    now.map_or("none".to_string(), |r| r.to_string())
                ),
            ));
        }
    }
    to_json(ctl.rollback(actor, b.revision).await?)
}

#[utoipa::path(
    post,
    path = "/api/v1/lockdown",
    summary = "Commit a deny-all revision",
    description = "Role: operator.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn lockdown(State(ctl): State<Ctl>, Auth::<OPERATOR>(actor): Auth<OPERATOR>) -> Answer {
    let actor = actor.as_str();
    to_json(ctl.lockdown(actor).await?)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Limit {
    #[serde(default)]
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/revisions",
    summary = "Revisions, newest first",
    description = "Role: viewer.",
    params(Limit),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn revisions(State(ctl): State<Ctl>, _: Auth<VIEWER>, Query(q): Query<Limit>) -> Answer {
    let active = ctl.active().await?.revision;
    let list = ctl.revisions(q.limit.unwrap_or(100).clamp(1, 1000)).await?;
    to_json(json!({"active": active, "revisions": list}))
}

#[utoipa::path(
    get,
    path = "/api/v1/revisions/{id}",
    summary = "One revision and its document",
    description = "Role: viewer.",
    params(("id" = i64, Path, description = "revision id")),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn revision(State(ctl): State<Ctl>, _: Auth<VIEWER>, Path(id): Path<i64>) -> Answer {
    let (r, doc) = ctl.revision_document(id).await?;
    to_json(json!({"revision": r, "document": doc}))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    /// Recorded as the actor (`file:/etc/clawgress.yaml`).
    source: String,
    #[schema(value_type = Object)]
    document: Value,
}

#[utoipa::path(
    post,
    path = "/api/v1/import",
    summary = "Commit a document if it changed (config file import)",
    description = "Role: admin.",
    request_body = ImportBody,
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn import(State(ctl): State<Ctl>, _: Auth<ADMIN>, Json(b): Json<ImportBody>) -> Answer {
    let committed = ctl.import(&b.source, &b.document).await?;
    to_json(json!({"committed": committed}))
}

#[utoipa::path(
    get,
    path = "/api/v1/events",
    summary = "Admin actions, newest first",
    description = "Role: viewer.",
    params(Limit),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn events(State(ctl): State<Ctl>, _: Auth<VIEWER>, Query(q): Query<Limit>) -> Answer {
    let list = ctl
        .store()
        .events(q.limit.unwrap_or(100).clamp(1, 1000))
        .await
        .map_err(ControlError::from)?;
    to_json(json!({"events": list}))
}

#[utoipa::path(
    get,
    path = "/api/v1/rollout",
    summary = "The revision each service has loaded",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn rollout(State(ctl): State<Ctl>, _: Auth<VIEWER>) -> Answer {
    let active = ctl.active().await?.revision;
    to_json(json!({"active": active, "loaded": ctl.loaded()}))
}

async fn list_of(ctl: &Control, field: &str) -> Answer {
    let doc = ctl.active().await?.document;
    Ok(Json(doc.get(field).cloned().unwrap_or_else(|| json!([]))))
}

#[utoipa::path(
    get,
    path = "/api/v1/agents",
    summary = "Active agents",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn agents(State(ctl): State<Ctl>, _: Auth<VIEWER>) -> Answer {
    list_of(&ctl, "agents").await
}

#[utoipa::path(
    get,
    path = "/api/v1/policies",
    summary = "Active policies",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn policies(State(ctl): State<Ctl>, _: Auth<VIEWER>) -> Answer {
    list_of(&ctl, "policies").await
}

#[utoipa::path(
    get,
    path = "/api/v1/quotas",
    summary = "Active quotas",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn quotas(State(ctl): State<Ctl>, _: Auth<VIEWER>) -> Answer {
    list_of(&ctl, "quotas").await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    agent_id: String,
    #[serde(default)]
    team_id: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    environment: Option<String>,
    #[serde(default)]
    profile: Option<String>,
}

/// Add an API-key agent to the candidate. The key is in this answer only;
/// the store keeps its SHA-256.
#[utoipa::path(
    post,
    path = "/api/v1/agents",
    summary = "Add an API-key agent to the candidate; the key is in this answer only",
    description = "Role: operator.",
    request_body = NewAgent,
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn add_agent(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    Json(a): Json<NewAgent>,
) -> Answer {
    let actor = actor.as_str();
    let key = {
        let b: [u8; 32] = rand::random();
        format!("cg_{}", hex::encode(b))
    };
    let mut entry = json!({
        "agent_id": a.agent_id,
        "auth_type": "api_key",
        "api_key_sha256": token_hash(&key),
        "status": "active",
    });
    for (k, v) in [
        ("team_id", a.team_id),
        ("project_id", a.project_id),
        ("environment", a.environment),
        ("profile", a.profile),
    ] {
        if let Some(v) = v {
            entry[k] = Value::String(v);
        }
    }
    let id = a.agent_id.clone();
    let cand = ctl
        .edit(actor, &format!("agent add {id}"), None, |d| {
            if paths::get(d, &format!("agents.\"{id}\""))?.is_some() {
                return Err(ControlError::BadRequest(format!(
                    "agent {id} exists already"
                )));
            }
            let list = d
                .as_object_mut()
                .ok_or_else(|| ControlError::BadRequest("the candidate is not a map".into()))?
                .entry("agents")
                .or_insert_with(|| json!([]));
            list.as_array_mut()
                .ok_or_else(|| ControlError::BadRequest("agents is not a list".into()))?
                .push(entry);
            Ok(())
        })
        .await?;
    // A bad agent id is caught now, not at configure.
    if let Err(ControlError::Invalid(errs)) = crate::control::validate(&cand.document) {
        let _ = ctl
            .edit(actor, &format!("agent add {id} undone"), None, |d| {
                paths::delete(d, &format!("agents.\"{id}\"")).map_err(Into::into)
            })
            .await;
        return Err(ControlError::Invalid(errs).into());
    }
    to_json(json!({
        "agent_id": id,
        "api_key": key,
        "candidate_version": cand.version,
        "note": "the key is shown once; configure and commit to activate the agent",
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    summary = "Create an admin token (shown once)",
    description = "Role: admin.",
    request_body = NewToken,
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn add_token(
    State(ctl): State<Ctl>,
    Auth::<ADMIN>(actor): Auth<ADMIN>,
    Json(t): Json<NewToken>,
) -> Answer {
    let role = Role::parse(&t.role).ok_or_else(|| {
        api_err(
            StatusCode::BAD_REQUEST,
            format!("role {:?}: one of viewer, operator, admin", t.role),
        )
    })?;
    let token = crate::new_token();
    ctl.store()
        .add_token(&token_hash(&token), &t.name, role, &crate::control::now())
        .await
        .map_err(ControlError::from)?;
    tracing::info!(
        actor,
        name = t.name,
        role = role.as_str(),
        "admin token created"
    );
    to_json(json!({"name": t.name, "role": role, "token": token}))
}

impl From<crate::audit::AuditError> for ApiError {
    fn from(e: crate::audit::AuditError) -> ApiError {
        use crate::audit::AuditError as E;
        match e {
            E::BadQuery(m) => api_err(StatusCode::BAD_REQUEST, m),
            E::NotFound(m) => api_err(StatusCode::NOT_FOUND, m),
            E::NotYet | E::NotConfigured => api_err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            E::Db(err) => {
                tracing::error!(error = %err, "audit query failed");
                api_err(StatusCode::INTERNAL_SERVER_ERROR, "audit query failed")
            }
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/audit",
    summary = "Audit records, newest first, filtered and paginated",
    description = "Role: viewer. Page with next_before_seq.",
    params(crate::audit::AuditQuery),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn audit(
    State(ctl): State<Ctl>,
    _: Auth<VIEWER>,
    Query(q): Query<crate::audit::AuditQuery>,
) -> Answer {
    Ok(Json(ctl.audit.query(&q).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ProofQuery {
    /// The record's seq.
    seq: u64,
}

#[utoipa::path(
    get,
    path = "/api/v1/audit/proof",
    summary = "A record's place in the tamper-evident log: an RFC 6962 inclusion proof against the latest signed checkpoint, checked",
    description = "Role: viewer. status: proven, pending (not yet under a checkpoint) or mismatch.",
    params(ProofQuery),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low"), (status = 404, description = "no such record")),
    security(("bearer" = []))
)]
async fn audit_proof(
    State(ctl): State<Ctl>,
    _: Auth<VIEWER>,
    Query(q): Query<ProofQuery>,
) -> Answer {
    let Some(log) = ctl.audit_log.clone() else {
        return Err(crate::audit::AuditError::NotConfigured.into());
    };
    let v = tokio::task::spawn_blocking(move || log.proof(q.seq))
        .await
        .map_err(|_| api_err(StatusCode::INTERNAL_SERVER_ERROR, "proof task failed"))??;
    to_json(v)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    agent: Option<String>,
    decision: Option<String>,
    host: Option<String>,
    /// Start after this seq (default: the 30 newest matching records first).
    after_seq: Option<i64>,
    /// End the stream after this many seconds (default 300, at most 3600);
    /// an EventSource reconnects by itself.
    max_s: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/audit/stream",
    summary = "Live audit records (Server-Sent Events), oldest first as they arrive",
    description = "Role: viewer. Each event is one record (JSON) with its seq as the event id; the query store is polled every second.",
    params(StreamQuery),
    responses((status = 200, description = "text/event-stream"), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn audit_stream(
    State(ctl): State<Ctl>,
    _: Auth<VIEWER>,
    Query(q): Query<StreamQuery>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_secs(q.max_s.unwrap_or(300).min(3600));
    tokio::spawn(async move {
        let mut after = q.after_seq;
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        while tokio::time::Instant::now() < deadline {
            every.tick().await;
            let query = crate::audit::AuditQuery {
                agent: q.agent.clone(),
                decision: q.decision.clone(),
                host: q.host.clone(),
                after_seq: after,
                limit: Some(if after.is_some() { 1000 } else { 30 }),
                ..Default::default()
            };
            let records = match ctl.audit.query(&query).await {
                Ok(v) => v["records"].as_array().cloned().unwrap_or_default(),
                // Not there yet (no record so far), or a store hiccup: try
                // again next second.
                Err(_) => Vec::new(),
            };
            if after.is_none() {
                after = Some(records.first().and_then(|r| r["seq"].as_i64()).unwrap_or(0));
            }
            // Newest first from the store; sent oldest first.
            for r in records.iter().rev() {
                let seq = r["seq"].as_i64().unwrap_or(0);
                after = after.max(Some(seq));
                let ev = Event::default().id(seq.to_string()).data(r.to_string());
                if tx.send(Ok(ev)).await.is_err() {
                    return; // the client went away
                }
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::<
        Result<Event, std::convert::Infallible>,
    >::new(rx))
    .keep_alive(KeepAlive::default())
    .into_response()
}

#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    summary = "Recent alerts, newest first",
    description = "Role: viewer.",
    params(Limit),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn alerts(State(ctl): State<Ctl>, _: Auth<VIEWER>, Query(l): Query<Limit>) -> Answer {
    let q = crate::audit::AuditQuery {
        kind: Some("alert".into()),
        limit: l.limit,
        ..Default::default()
    };
    Ok(Json(ctl.audit.query(&q).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Window {
    /// Seconds back from now (default 3600, at most 30 days).
    #[serde(default)]
    window_s: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/stats",
    summary = "Decisions over a window: by decision and reason, agent, policy",
    description = "Role: viewer.",
    params(Window),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn stats(State(ctl): State<Ctl>, _: Auth<VIEWER>, Query(w): Query<Window>) -> Answer {
    let window = w.window_s.unwrap_or(3600).clamp(1, 30 * 86400);
    Ok(Json(ctl.audit.stats(window).await?))
}

fn quoted(id: &str) -> String {
    format!("agents.\"{id}\"")
}

#[utoipa::path(
    post,
    path = "/api/v1/agents/{id}/rotate-key",
    summary = "Give an API-key agent a new key (in the candidate); the key is in this answer only",
    description = "Role: operator. The old key works until the candidate is committed.",
    params(("id" = String, Path, description = "agent id")),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low"), (status = 400, description = "no such API-key agent")),
    security(("bearer" = []))
)]
async fn rotate_key(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    Path(id): Path<String>,
) -> Answer {
    let key = {
        let b: [u8; 32] = rand::random();
        format!("cg_{}", hex::encode(b))
    };
    let hash = token_hash(&key);
    let cand = ctl
        .edit(&actor, &format!("key rotate {id}"), None, |d| {
            match paths::get(d, &quoted(&id))? {
                Some(a) if a["auth_type"] == "api_key" => {}
                Some(_) => {
                    return Err(ControlError::BadRequest(format!(
                        "agent {id} does not use an API key"
                    )))
                }
                None => {
                    return Err(ControlError::BadRequest(format!(
                        "no agent {id} in the candidate"
                    )))
                }
            }
            paths::set(
                d,
                &format!("{}.api_key_sha256", quoted(&id)),
                Value::String(hash.clone()),
            )?;
            paths::set(
                d,
                &format!("{}.status", quoted(&id)),
                Value::String("active".into()),
            )?;
            Ok(())
        })
        .await?;
    to_json(json!({
        "agent_id": id,
        "api_key": key,
        "candidate_version": cand.version,
        "note": "the key is shown once; the old key works until you commit",
    }))
}

#[utoipa::path(
    post,
    path = "/api/v1/agents/{id}/revoke-key",
    summary = "Revoke an agent's key: the agent is disabled (in the candidate) until a new key is rotated in",
    description = "Role: operator.",
    params(("id" = String, Path, description = "agent id")),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low"), (status = 400, description = "no such agent")),
    security(("bearer" = []))
)]
async fn revoke_key(
    State(ctl): State<Ctl>,
    Auth::<OPERATOR>(actor): Auth<OPERATOR>,
    Path(id): Path<String>,
) -> Answer {
    let cand = ctl
        .edit(&actor, &format!("key revoke {id}"), None, |d| {
            if paths::get(d, &quoted(&id))?.is_none() {
                return Err(ControlError::BadRequest(format!(
                    "no agent {id} in the candidate"
                )));
            }
            paths::set(
                d,
                &format!("{}.status", quoted(&id)),
                Value::String("disabled".into()),
            )?;
            Ok(())
        })
        .await?;
    to_json(
        json!({"agent_id": id, "status": "disabled", "candidate_version": cand.version,
                   "note": "commit to apply"}),
    )
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Wait {
    /// Long-poll: with `If-None-Match` naming the revision the caller has,
    /// wait up to this many seconds (at most 60) for a newer one.
    #[serde(default)]
    wait: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/bundle",
    summary = "The active signed bundle (ETag = its revision; long-poll with If-None-Match and ?wait=)",
    description = "Role: viewer. 304 when the caller's revision is still the active one after the wait.",
    params(Wait),
    responses((status = 200, description = "the bundle, as written to bundle/active"), (status = 304, description = "unchanged"), (status = 404, description = "nothing committed yet")),
    security(("bearer" = []))
)]
async fn bundle(
    State(ctl): State<Ctl>,
    _: Auth<VIEWER>,
    headers: HeaderMap,
    Query(w): Query<Wait>,
) -> Result<Response, ApiError> {
    let have = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().trim_matches('"').parse::<i64>().ok());
    let mut rx = ctl.subscribe();
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs(w.wait.unwrap_or(0).min(60));
    loop {
        let active = ctl.active().await?.revision;
        match active {
            None => return Err(api_err(StatusCode::NOT_FOUND, "nothing committed yet")),
            Some(rev) if Some(rev) != have => {
                let bytes = std::fs::read(ctl.bundle_dir().join("active")).map_err(|e| {
                    api_err(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("bundle not readable: {e}"),
                    )
                })?;
                let mut r = bytes.into_response();
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                if let Ok(v) = header::HeaderValue::from_str(&format!("\"{rev}\"")) {
                    h.insert(header::ETAG, v);
                }
                return Ok(r);
            }
            Some(_) => {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    return Ok(StatusCode::NOT_MODIFIED.into_response());
                }
            }
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/commits",
    summary = "Commits, newest first (the first names the active revision)",
    description = "Role: viewer.",
    params(Limit),
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn commits(State(ctl): State<Ctl>, _: Auth<VIEWER>, Query(q): Query<Limit>) -> Answer {
    let list = ctl
        .store()
        .commits(q.limit.unwrap_or(100).clamp(1, 1000))
        .await
        .map_err(ControlError::from)?;
    to_json(json!({"commits": list}))
}

#[utoipa::path(
    get,
    path = "/api/v1/profiles",
    summary = "The named profiles an agent can be given, with the rules each becomes",
    description = "Role: viewer.",
    responses((status = 200, description = "OK", body = Object), (status = 401, description = "no or unknown token"), (status = 403, description = "role too low")),
    security(("bearer" = []))
)]
async fn profiles(_: Auth<VIEWER>) -> Answer {
    let described = [
        ("none", "No external access at all: denies everything at the highest precedence, whatever other policies say."),
        ("training-updates", "The public package registries: HTTPS on 443 and GET/HEAD on 80, below every policy so an operator's deny still wins."),
        ("external-api", "HTTPS only: plain HTTP is denied at the highest precedence; the agent's policies name the API hosts."),
        ("custom", "The agent's own policies only."),
    ];
    let mut out = Vec::new();
    for (name, what) in described {
        let doc = json!({"agents": [{"agent_id": "AGENT", "auth_type": "jwt", "profile": name}]});
        let rules = crate::control::validate(&doc)
            .map(|d| clawgress_policy::profiles::policies(&d))
            .unwrap_or_default();
        out.push(json!({"name": name, "description": what, "policies": rules}));
    }
    to_json(json!({"profiles": out}))
}
