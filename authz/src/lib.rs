//! The ext_authz server: Envoy asks `Authorization/Check` for every request;
//! this crate resolves the agent from `Proxy-Authorization`, evaluates the
//! policy set, and answers allow or a deny that an agent can read
//! (DESIGN.md §3).
//!
//! Proto types stop at this file's edge: [`facts`] turns a raw
//! `CheckRequest` into plain values once, the domain (`clawgress-policy`)
//! decides, and [`response`] turns the verdict into a `CheckResponse` once.
//! Depends on `clawgress-policy` only; never on another service.

pub mod jwt;

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use clawgress_policy::{
    AgentDirectory, AuthError, Decision, Identity, PolicyDocument, PolicySet, Reason,
};
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

/// What authz enforces: the policy document, the operator's private-range
/// exemptions (`gateway.private_destinations_allowed`), and the revision name
/// decisions are reported under.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub policy: PolicyDocument,
    pub private_allowed: Vec<IpNet>,
    pub revision: String,
    /// The issuers' keys, loaded by [`jwt::JwtVerifier::load`].
    pub jwt: Arc<jwt::JwtVerifier>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("authz gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Everything a decision reads, swapped whole on reload.
#[derive(Debug)]
struct State {
    agents: AgentDirectory,
    policies: PolicySet,
    jwt: Arc<jwt::JwtVerifier>,
}

impl State {
    fn new(c: &Config) -> State {
        State {
            agents: AgentDirectory::new(&c.policy),
            policies: PolicySet::new(&c.policy, &c.private_allowed, &c.revision),
            jwt: c.jwt.clone(),
        }
    }

    /// A bearer token's identity: verified claims, then the agent's listing
    /// (if any) for its status. A listed agent that authenticates otherwise
    /// cannot be impersonated by a token.
    fn bearer(&self, token: &str) -> Result<Identity, (Reason, Option<Identity>)> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let c = self
            .jwt
            .verify(token, now)
            .map_err(|f| (Reason::Token(f), None))?;
        let identity = Identity {
            agent_id: c.agent_id,
            team_id: c.team_id,
            project_id: c.project_id,
            environment: c.environment,
            auth_type: clawgress_policy::config::AuthType::Jwt,
        };
        match self.agents.listing(&identity.agent_id) {
            None => Ok(identity),
            Some((clawgress_policy::config::AuthType::Jwt, false)) => Ok(identity),
            Some((clawgress_policy::config::AuthType::Jwt, true)) => {
                Err((Reason::AgentDisabled, Some(identity)))
            }
            Some(_) => Err((Reason::InvalidCredentials, None)),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

/// authz's metrics (DESIGN.md §10). No label carries an agent, key, path or
/// request id.
#[derive(Debug, Clone)]
struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
    check_duration: Histogram,
    revision: Family<RevisionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            decisions: Family::default(),
            // 1 µs .. ~8 ms.
            check_duration: Histogram::new(exponential_buckets(1e-6, 2.0, 14)),
            revision: Family::default(),
        }
    }
}

/// The `Authorization` service. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct AuthzService {
    state: Arc<ArcSwap<State>>,
    metrics: Metrics,
    /// `state_dir/audit.blocked` exists: the sink cannot record (§10).
    audit_blocked: Arc<std::sync::atomic::AtomicBool>,
    /// `gateway.quota_check: authz`: quotas are checked inside Check.
    quota: Option<Arc<dyn QuotaGate>>,
}

impl std::fmt::Debug for dyn QuotaGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuotaGate")
    }
}

/// Quotas checked inside Check (`gateway.quota_check: authz`, §11): one
/// side call per request instead of two. The binary plugs the rate
/// limiter's counting in here; authz does not depend on it.
#[tonic::async_trait]
pub trait QuotaGate: Send + Sync {
    /// Count one request for the identity against every quota that applies.
    /// `Err` means the counter store failed.
    async fn check(
        &self,
        agent_id: &str,
        team_id: &str,
        project_id: &str,
    ) -> Result<QuotaVerdict, String>;
}

/// What the quotas said about one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaVerdict {
    pub admitted: bool,
    /// For the audit record (`agent:bot=hard_stop`, …); empty if none applied.
    pub quota_applied: String,
    /// `quota:<scope>` of the refusing (or first exceeded) quota.
    pub policy_id: String,
    pub retry_after_s: u64,
    /// `x-ratelimit-limit`, `-remaining`, `-reset` of the tightest window.
    pub headers: Vec<(String, String)>,
}

impl AuthzService {
    /// Check quotas inside Check with `gate` (`quota_check: authz`).
    pub fn with_quota_gate(mut self, gate: Arc<dyn QuotaGate>) -> AuthzService {
        self.quota = Some(gate);
        self
    }

    pub fn new(config: &Config) -> AuthzService {
        let svc = AuthzService {
            state: Arc::new(ArcSwap::from_pointee(State::new(config))),
            metrics: Metrics::default(),
            audit_blocked: Arc::default(),
            quota: None,
        };
        svc.set_revision(&config.revision);
        svc
    }

    /// Swap in a new policy document atomically; requests in flight finish
    /// under the old one.
    pub fn reload(&self, config: &Config) {
        self.state.store(Arc::new(State::new(config)));
        self.set_revision(&config.revision);
    }

    /// Refuse new requests (503 `audit-unavailable`) while `mark` exists:
    /// the audit sink creates it when its storage is full (`on_full: deny`).
    /// Polled off the request path, every 200 ms.
    pub fn watch_audit_block(&self, mark: std::path::PathBuf) -> tokio::task::JoinHandle<()> {
        let flag = self.audit_blocked.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
            loop {
                every.tick().await;
                let now = tokio::fs::try_exists(&mark).await.unwrap_or(false);
                let was = flag.swap(now, std::sync::atomic::Ordering::Relaxed);
                if now != was {
                    tracing::warn!(
                        blocked = now,
                        "audit storage {}",
                        if now {
                            "full: refusing new requests"
                        } else {
                            "has room again"
                        }
                    );
                }
            }
        })
    }

    fn set_revision(&self, revision: &str) {
        self.metrics.revision.clear();
        self.metrics
            .revision
            .get_or_create(&RevisionLabels {
                revision: revision.to_string(),
            })
            .set(1);
    }

    /// Register authz's metrics: `clawgress_decisions_total{decision,reason}`,
    /// `clawgress_check_duration_seconds`, `clawgress_bundle_revision{revision}`.
    pub fn register_metrics(&self, reg: &mut Registry) {
        reg.register(
            "clawgress_decisions",
            "Check decisions by decision and reason",
            self.metrics.decisions.clone(),
        );
        reg.register(
            "clawgress_check_duration_seconds",
            "Time to decide one Check",
            self.metrics.check_duration.clone(),
        );
        reg.register(
            "clawgress_bundle_revision",
            "The policy revision in force (value 1)",
            self.metrics.revision.clone(),
        );
    }

    /// The decision for one request, free of proto types.
    pub fn decide(&self, f: &Facts<'_>) -> Verdict {
        let state = self.state.load();
        let revision = state.policies.revision().to_string();
        if self
            .audit_blocked
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Verdict {
                identity: None,
                decision: Decision::deny("", Reason::AuditUnavailable),
                revision,
                quota: None,
            };
        }
        let bearer = f
            .proxy_authorization
            .map(str::trim)
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        // No credentials at all: the source address may name the agent
        // (`auth_type: source_ip`, §3 transparent mode). Credentials, when
        // sent, always decide.
        let no_credentials = f.proxy_authorization.is_none_or(|v| v.trim().is_empty());
        let by_source = if no_credentials {
            f.source.and_then(|a| state.agents.by_source_address(a))
        } else {
            None
        };
        let authenticated = match (by_source, bearer) {
            (Some(r), _) => r.map_err(|e| match e {
                AuthError::Disabled(id) => (Reason::AgentDisabled, Some(id)),
                _ => (Reason::InvalidCredentials, None),
            }),
            (None, Some(token)) if !state.jwt.is_empty() => state.bearer(token),
            (None, _) => state
                .agents
                .authenticate(f.proxy_authorization)
                .map_err(|e| match e {
                    AuthError::Missing => (Reason::MissingCredentials, None),
                    AuthError::Malformed => (Reason::MalformedCredentials, None),
                    AuthError::Invalid => (Reason::InvalidCredentials, None),
                    AuthError::JwtNotConfigured => (Reason::JwtNotConfigured, None),
                    AuthError::Disabled(id) => (Reason::AgentDisabled, Some(id)),
                }),
        };
        let identity = match authenticated {
            Ok(id) => id,
            Err((reason, identity)) => {
                return Verdict {
                    identity,
                    decision: Decision::deny("", reason),
                    revision,
                    quota: None,
                };
            }
        };
        let decision = state
            .policies
            .decide(&identity, f.authority, f.method, f.path, f.connect);
        Verdict {
            identity: Some(identity),
            decision,
            revision,
            quota: None,
        }
    }
}

/// The request facts authz reads, borrowed from the `CheckRequest`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    pub proxy_authorization: Option<&'a str>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub connect: bool,
    pub request_id: &'a str,
    /// The downstream address as Envoy saw it.
    pub source: Option<std::net::IpAddr>,
}

/// Extract the facts from Envoy's proto, once.
pub fn facts(req: &CheckRequest) -> Facts<'_> {
    let source = req
        .attributes
        .as_ref()
        .and_then(|a| a.source.as_ref())
        .and_then(|p| p.address.as_ref())
        .and_then(|a| match &a.address {
            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) => {
                s.address.parse().ok()
            }
            _ => None,
        });
    let Some(http) = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return Facts {
            source,
            ..Facts::default()
        };
    };
    let header = |name: &str| http.headers.get(name).map(String::as_str);
    Facts {
        proxy_authorization: header("proxy-authorization"),
        method: &http.method,
        authority: &http.host,
        path: &http.path,
        connect: http.method == "CONNECT",
        request_id: header("x-request-id").unwrap_or(&http.id),
        source,
    }
}

/// A connection-level Check (Envoy's network ext_authz on the transparent
/// listener's TLS chain) carries no HTTP request: its destination is the
/// TLS SNI name with the port the agent dialled (the original destination).
/// `None` for an HTTP Check; `Some("")` when a TLS connection named no
/// server, which then fails as a malformed destination.
pub fn tls_destination(req: &CheckRequest) -> Option<String> {
    let a = req.attributes.as_ref()?;
    if a.request.as_ref().is_some_and(|r| r.http.is_some()) {
        return None;
    }
    let sni = a.tls_session.as_ref().map(|t| t.sni.as_str()).unwrap_or("");
    let port = a
        .destination
        .as_ref()
        .and_then(|p| p.address.as_ref())
        .and_then(|a| match &a.address {
            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) => {
                match s.port_specifier {
                    Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => Some(p),
                    _ => None,
                }
            }
            _ => None,
        })
        .unwrap_or(443);
    Some(if sni.is_empty() {
        String::new()
    } else {
        format!("{sni}:{port}")
    })
}

/// A decision with who it was for and the revision it was made under.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub identity: Option<Identity>,
    pub decision: Decision,
    pub revision: String,
    /// With `quota_check: authz`: what the quotas said.
    pub quota: Option<QuotaVerdict>,
}

impl Verdict {
    /// Dynamic metadata for the next filters and the access log (§3),
    /// on allow and deny alike.
    fn metadata(&self) -> Struct {
        let d = &self.decision;
        let id = self.identity.as_ref();
        let field = |f: fn(&Identity) -> &str| id.map(f).unwrap_or("").to_string();
        // Every key costs Envoy a Struct entry to decode and keep per
        // request: only what a consumer reads (the access log, RLS
        // descriptors), and an empty value is left out (read as empty).
        let mut fields = vec![
            ("agent_id", field(|i| &i.agent_id)),
            ("team_id", field(|i| &i.team_id)),
            ("project_id", field(|i| &i.project_id)),
            ("environment", field(|i| &i.environment)),
            ("policy_id", d.policy_id.clone()),
            ("bundle_revision", self.revision.clone()),
            ("reason", d.reason.code().to_string()),
            (
                "decision",
                if d.allow { "allow" } else { "deny" }.to_string(),
            ),
        ];
        if let Some(s) = &d.shadow {
            fields.push((
                "shadow_decision",
                if s.allow { "allow" } else { "deny" }.to_string(),
            ));
            fields.push(("shadow_policy_id", s.policy_id.clone()));
        }
        if let Some(q) = self.quota.as_ref().filter(|q| !q.quota_applied.is_empty()) {
            fields.push(("quota_applied", q.quota_applied.clone()));
        }
        Struct {
            fields: fields
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v)),
                        },
                    )
                })
                .collect(),
        }
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The §3 deny body.
pub fn deny_body(decision: &Decision, request_id: &str) -> String {
    serde_json::json!({
        "decision": "deny",
        "reason": decision.reason.code(),
        "policy_id": decision.policy_id,
        "request_id": request_id,
        "hint": decision.reason.hint(),
    })
    .to_string()
}

/// Turn a verdict into Envoy's answer, once.
pub fn response(v: &Verdict, request_id: &str) -> CheckResponse {
    let d = &v.decision;
    let metadata = Some(v.metadata());
    if d.allow {
        return CheckResponse {
            status: Some(rpc::Status {
                code: tonic::Code::Ok as i32,
                ..Default::default()
            }),
            dynamic_metadata: metadata,
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                // Credentials never reach the upstream (§3); the route config
                // removes the header too, this covers a hand-wired Envoy.
                headers_to_remove: vec!["proxy-authorization".into()],
                // quota_check: authz — the agent sees its quota as it would
                // from Envoy's rate-limit filter.
                response_headers_to_add: v
                    .quota
                    .iter()
                    .flat_map(|q| q.headers.iter().map(|(k, val)| header(k, val)))
                    .collect(),
                ..Default::default()
            })),
        };
    }
    let status = d.reason.http_status();
    let mut headers = vec![
        header("content-type", "application/json"),
        header(
            "x-clawgress-policy",
            if d.policy_id.is_empty() {
                "none"
            } else {
                &d.policy_id
            },
        ),
    ];
    if status == 407 {
        headers.push(header("proxy-authenticate", "Basic realm=\"clawgress\""));
    }
    if let Some(q) = v.quota.as_ref().filter(|q| !q.admitted) {
        headers.push(header("retry-after", &q.retry_after_s.max(1).to_string()));
        headers.extend(q.headers.iter().map(|(k, val)| header(k, val)));
    }
    let code = if status == 407 {
        tonic::Code::Unauthenticated
    } else {
        tonic::Code::PermissionDenied
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            message: d.reason.code().to_string(),
            ..Default::default()
        }),
        dynamic_metadata: metadata,
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body: deny_body(d, request_id),
        })),
    }
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let req = request.into_inner();
        let started = std::time::Instant::now();
        let tls = tls_destination(&req);
        let mut f = facts(&req);
        if let Some(dest) = tls.as_deref() {
            // Judged as a tunnel (§3): only host and port rules grant it.
            f.authority = dest;
            f.method = "CONNECT";
            f.connect = true;
        }
        let mut verdict = self.decide(&f);
        if let (Some(gate), true, Some(id)) = (
            &self.quota,
            verdict.decision.allow,
            verdict.identity.clone(),
        ) {
            match gate.check(&id.agent_id, &id.team_id, &id.project_id).await {
                Ok(q) => {
                    if !q.admitted {
                        verdict.decision = Decision::deny(&q.policy_id, Reason::QuotaExceeded);
                    }
                    verdict.quota = Some(q);
                }
                Err(e) => {
                    // The store's failure is already the alert
                    // `ratelimit-store-unavailable` (one per failure).
                    tracing::warn!(error = %e, "quota check failed; refused (fail closed)");
                    verdict.decision = Decision::deny("", Reason::RatelimitUnavailable);
                }
            }
        }
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                decision: if verdict.decision.allow {
                    "allow"
                } else {
                    "deny"
                },
                reason: verdict.decision.reason.code(),
            })
            .inc();
        tracing::debug!(
            request_id = f.request_id,
            agent_id = verdict
                .identity
                .as_ref()
                .map(|i| i.agent_id.as_str())
                .unwrap_or(""),
            authority = f.authority,
            method = f.method,
            allow = verdict.decision.allow,
            policy_id = verdict.decision.policy_id,
            reason = verdict.decision.reason.code(),
            "check"
        );
        Ok(tonic::Response::new(response(&verdict, f.request_id)))
    }
}

/// Serve `Authorization/Check` on `incoming` until `shutdown` resolves.
pub async fn run<I, IO, IE, F>(service: AuthzService, incoming: I, shutdown: F) -> Result<(), Error>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()> + Send,
{
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use clawgress_policy::Document;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;

    fn service() -> AuthzService {
        let yaml = format!(
            r#"
agents:
  - {{agent_id: bot, team_id: infra, auth_type: api_key, api_key_sha256: "{}"}}
  - {{agent_id: off, auth_type: api_key, status: disabled, api_key_sha256: "{}"}}
policies:
  - policy_id: allow-example
    priority: 10
    match: {{destination: {{hosts: ["example.com"]}}}}
    action: allow
"#,
            clawgress_policy::config::KeyHash::of_key("sekret").as_str(),
            clawgress_policy::config::KeyHash::of_key("sekret").as_str(),
        );
        let doc = Document::from_yaml(&yaml).expect("valid");
        AuthzService::new(&Config {
            policy: doc.policy(),
            private_allowed: vec![],
            revision: "rev-1".into(),
            jwt: Arc::default(),
        })
    }

    fn check_req(auth: Option<&str>, method: &str, host: &str, path: &str) -> CheckRequest {
        let mut headers = std::collections::HashMap::new();
        if let Some(a) = auth {
            headers.insert("proxy-authorization".to_string(), a.to_string());
        }
        headers.insert("x-request-id".to_string(), "rid-1".to_string());
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: method.into(),
                        host: host.into(),
                        path: path.into(),
                        headers,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    fn basic(s: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    }

    async fn call(req: CheckRequest) -> CheckResponse {
        service()
            .check(tonic::Request::new(req))
            .await
            .expect("check answers")
            .into_inner()
    }

    fn denied(resp: &CheckResponse) -> (i32, serde_json::Value, Vec<(String, String)>) {
        match &resp.http_response {
            Some(HttpResponse::DeniedResponse(d)) => (
                d.status.as_ref().map(|s| s.code).unwrap_or(0),
                serde_json::from_str(&d.body).expect("json body"),
                d.headers
                    .iter()
                    .filter_map(|h| h.header.as_ref())
                    .map(|h| (h.key.clone(), h.value.clone()))
                    .collect(),
            ),
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    fn meta(resp: &CheckResponse, key: &str) -> String {
        match resp
            .dynamic_metadata
            .as_ref()
            .and_then(|m| m.fields.get(key))
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::StringValue(s)) => s.clone(),
            _ => String::new(),
        }
    }

    /// The transparent listener's TLS chain: no HTTP request, the SNI name
    /// and original port are the destination, the source address the agent.
    fn tls_req(source: &str, sni: &str, port: u32) -> CheckRequest {
        use envoy_types::pb::envoy::config::core::v3::{
            address::Address as A, socket_address::PortSpecifier, Address, SocketAddress,
        };
        use envoy_types::pb::envoy::service::auth::v3::attribute_context::{Peer, TlsSession};
        let peer = |ip: &str, port: u32| Peer {
            address: Some(Address {
                address: Some(A::SocketAddress(SocketAddress {
                    address: ip.into(),
                    port_specifier: Some(PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer(source, 40000)),
                destination: Some(peer("93.184.215.14", port)),
                tls_session: Some(TlsSession { sni: sni.into() }),
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn a_transparent_tls_connection_is_judged_by_sni_and_source() {
        let doc = Document::from_yaml(
            r#"
agents:
  - {agent_id: vm, team_id: lab, auth_type: source_ip, source_cidrs: [10.20.0.0/24]}
policies:
  - {policy_id: tls-ok, priority: 10, match: {destination: {hosts: ["example.com"], ports: [443]}}, action: allow}
  - {policy_id: get-only, priority: 10, match: {destination: {hosts: ["api.example"]}, method: [GET]}, action: allow}
"#,
        )
        .expect("valid");
        let svc = AuthzService::new(&Config {
            policy: doc.policy(),
            private_allowed: vec![],
            revision: "rev-9".into(),
            jwt: Arc::default(),
        });
        let ask = |r: CheckRequest| {
            let svc = svc.clone();
            async move {
                svc.check(tonic::Request::new(r))
                    .await
                    .expect("answers")
                    .into_inner()
            }
        };
        let ok = ask(tls_req("10.20.0.7", "example.com", 443)).await;
        assert_eq!(ok.status.as_ref().map(|s| s.code), Some(0));
        assert_eq!(meta(&ok, "agent_id"), "vm");
        assert_eq!(meta(&ok, "policy_id"), "tls-ok");
        // Another name, another port, no SNI, a rule limited by method, an
        // unknown source: all refused.
        for (src, sni, port, reason) in [
            ("10.20.0.7", "evil.example", 443, "default-deny"),
            ("10.20.0.7", "example.com", 8443, "default-deny"),
            ("10.20.0.7", "api.example", 443, "default-deny"),
            ("10.20.0.7", "", 443, "malformed-destination"),
            ("10.99.0.7", "example.com", 443, "missing-credentials"),
        ] {
            let r = ask(tls_req(src, sni, port)).await;
            assert_ne!(r.status.as_ref().map(|s| s.code), Some(0), "{sni}:{port}");
            assert_eq!(meta(&r, "reason"), reason, "{src} {sni}:{port}");
        }
        // An HTTP Check is never read as a TLS one.
        assert_eq!(tls_destination(&check_req(None, "GET", "x", "/")), None);
    }

    #[tokio::test]
    async fn allowed_request_strips_credentials_and_names_agent() {
        let resp = call(check_req(
            Some(&basic("bot:sekret")),
            "GET",
            "example.com",
            "/x?y",
        ))
        .await;
        assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0));
        match &resp.http_response {
            Some(HttpResponse::OkResponse(ok)) => {
                assert_eq!(
                    ok.headers_to_remove,
                    vec!["proxy-authorization".to_string()]
                )
            }
            other => panic!("expected ok, got {other:?}"),
        }
        assert_eq!(meta(&resp, "agent_id"), "bot");
        assert_eq!(meta(&resp, "team_id"), "infra");
        assert_eq!(meta(&resp, "policy_id"), "allow-example");
        assert_eq!(meta(&resp, "bundle_revision"), "rev-1");
    }

    #[tokio::test]
    async fn missing_credentials_get_407_with_challenge() {
        let resp = call(check_req(None, "GET", "example.com", "/")).await;
        let (status, body, headers) = denied(&resp);
        assert_eq!(status, 407);
        assert_eq!(body["reason"], "missing-credentials");
        assert_eq!(body["request_id"], "rid-1");
        assert!(headers
            .iter()
            .any(|(k, v)| k == "proxy-authenticate" && v.starts_with("Basic")));
    }

    #[tokio::test]
    async fn wrong_key_disabled_and_default_deny_get_403() {
        for (auth, reason, policy) in [
            (basic("bot:wrong"), "invalid-credentials", ""),
            (basic("off:sekret"), "agent-disabled", ""),
        ] {
            let (status, body, _) =
                denied(&call(check_req(Some(&auth), "GET", "example.com", "/")).await);
            assert_eq!((status, body["reason"].as_str()), (403, Some(reason)));
            assert_eq!(body["policy_id"], policy);
            assert!(body["hint"].as_str().is_some_and(|h| !h.is_empty()));
        }
        let resp = call(check_req(
            Some(&basic("bot:sekret")),
            "GET",
            "other.com",
            "/",
        ))
        .await;
        let (status, body, headers) = denied(&resp);
        assert_eq!(
            (status, body["policy_id"].as_str()),
            (403, Some("default-deny"))
        );
        assert!(headers.contains(&("x-clawgress-policy".into(), "default-deny".into())));
        // Denials still name the agent for the audit log.
        assert_eq!(meta(&resp, "agent_id"), "bot");
        assert_eq!(meta(&resp, "decision"), "deny");
    }

    #[tokio::test]
    async fn connect_and_malformed_hosts() {
        let ok = call(check_req(
            Some(&basic("bot:sekret")),
            "CONNECT",
            "example.com:443",
            "",
        ))
        .await;
        assert!(matches!(
            ok.http_response,
            Some(HttpResponse::OkResponse(_))
        ));
        for host in [
            "exa mple.com:443",
            "0177.0.0.1:443",
            "example.com:99999",
            "",
        ] {
            let resp = call(check_req(Some(&basic("bot:sekret")), "CONNECT", host, "")).await;
            let (status, body, _) = denied(&resp);
            assert_eq!(
                (status, body["reason"].as_str()),
                (403, Some("malformed-destination")),
                "{host}"
            );
        }
        // An empty request (no attributes at all) is denied, not a panic.
        let resp = call(CheckRequest::default()).await;
        assert_eq!(denied(&resp).0, 407);
    }
}
