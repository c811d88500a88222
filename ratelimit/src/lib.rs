//! The rate-limit service: Envoy asks `RateLimitService/ShouldRateLimit`
//! with a descriptor naming the agent (built from the `agent_id` dynamic
//! metadata authz emitted); this crate counts the request against the agent's
//! `rps_limit` / `rpm_limit` and answers OK or OVER_LIMIT (DESIGN.md §5).
//!
//! Counting lives behind [`CounterStore`], owned here and implemented by
//! adapters ([`MemoryStore`] now; Redis next). A store error answers gRPC
//! `UNAVAILABLE` and Envoy's `failure_mode_deny` turns that into a 503: an
//! outage never looks like a 429 and never lets traffic through.
//! Depends on `clawgress-policy` only; never on another service.

mod redis_store;
mod store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use clawgress_policy::config::{Quota, QuotaMode};
use clawgress_policy::PolicyDocument;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{value::Kind, Duration, Struct, Value};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

pub use redis_store::RedisStore;
pub use store::{CounterStore, Limit, MemoryStore, StoreError, Window, WindowStatus};

/// The descriptor keys Envoy sends (each built from authz's metadata).
pub const AGENT_KEY: &str = "agent_id";
pub const TEAM_KEY: &str = "team_id";
pub const PROJECT_KEY: &str = "project_id";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ratelimit gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Open the store named by `stores.ratelimit`: `memory`, `redis://…` or
/// `redis-cluster://…`.
pub fn open_store(spec: &str) -> Result<Arc<dyn CounterStore>, StoreError> {
    if spec == "memory" {
        Ok(Arc::new(MemoryStore::default()))
    } else {
        Ok(Arc::new(RedisStore::new(spec)?))
    }
}

/// One scope's limits as the service applies them.
#[derive(Debug, Clone, PartialEq)]
struct ScopeQuota {
    limits: Vec<Limit>,
    mode: QuotaMode,
}

/// Quotas by scope key (`agent:ID`, `team:ID`, `project:ID`).
fn quotas_by_scope(doc: &PolicyDocument) -> HashMap<String, ScopeQuota> {
    doc.quotas
        .iter()
        .filter_map(|q: &Quota| {
            let scope = if let Some(a) = &q.agent_id {
                format!("agent:{a}")
            } else if let Some(t) = &q.team_id {
                format!("team:{t}")
            } else {
                format!("project:{}", q.project_id.as_ref()?)
            };
            let mut limits = Vec::new();
            if let Some(n) = q.rps_limit {
                limits.push(Limit {
                    window: Window::Second,
                    max: n,
                });
            }
            if let Some(n) = q.rpm_limit {
                limits.push(Limit {
                    window: Window::Minute,
                    max: n,
                });
            }
            Some((
                scope,
                ScopeQuota {
                    limits,
                    mode: q.mode,
                },
            ))
        })
        .collect()
}

/// Who a request counts against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub agent_id: String,
    pub team_id: String,
    pub project_id: String,
}

impl Subject {
    fn scopes(&self) -> impl Iterator<Item = String> + '_ {
        [
            ("agent", &self.agent_id),
            ("team", &self.team_id),
            ("project", &self.project_id),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}:{v}"))
    }
}

/// The outcome of one request against every quota that applies to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// False only when a `hard_stop` quota is over its limit.
    pub admitted: bool,
    /// For the audit record, one entry per quota that applied, comma
    /// separated: `agent:bot=hard_stop`, `team:infra=alert_only:exceeded`.
    /// Empty when no quota applies.
    pub quota_applied: String,
    /// The quota that refused the request, or the first exceeded one.
    pub policy_id: String,
    /// The tightest window, for `x-ratelimit-*`.
    pub status: Option<WindowStatus>,
    /// Seconds until a window that would admit the request.
    pub retry_after_s: u64,
    /// `alert_only` scopes over their limit.
    pub alerts: Vec<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RatelimitLabels {
    mode: &'static str,
    result: &'static str,
}

/// The `RateLimitService`. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct RatelimitService {
    /// `clawgress_ratelimit_total{mode,result}`: every quota applied to every
    /// request, result `ok`, `over_limit` or `error`.
    counted: Family<RatelimitLabels, Counter>,
    quotas: Arc<ArcSwap<HashMap<String, ScopeQuota>>>,
    store: Arc<dyn CounterStore>,
    /// Scope → the minute it last raised `quota-alert-only`.
    alerted: Arc<Mutex<HashMap<String, u64>>>,
    /// `stores.ratelimit_failure_mode: allow`: a store error admits.
    fail_open: bool,
    /// `clawgress_ratelimit_duration_seconds`: one request's quota check
    /// (ShouldRateLimit, or inside Check with `quota_check: authz`).
    duration: Histogram,
    /// `clawgress_bundle_revision{revision}`: the quotas' revision (value 1).
    revision: Family<RevisionLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

impl RatelimitService {
    pub fn new(doc: &PolicyDocument, store: Arc<dyn CounterStore>) -> RatelimitService {
        RatelimitService {
            counted: Family::default(),
            quotas: Arc::new(ArcSwap::from_pointee(quotas_by_scope(doc))),
            store,
            alerted: Arc::default(),
            fail_open: false,
            // 2 µs (in-process) to 65 ms (a slow Redis).
            duration: Histogram::new(exponential_buckets(2e-6, 2.0, 16)),
            revision: Family::default(),
        }
    }

    /// Register `clawgress_ratelimit_total{mode,result}` and
    /// `clawgress_ratelimit_duration_seconds`; with `revision_gauge`, also
    /// `clawgress_bundle_revision{revision}` (authz exports its own when
    /// the two share a process, under `quota_check: authz`).
    pub fn register_metrics(
        &self,
        reg: &mut prometheus_client::registry::Registry,
        revision_gauge: bool,
    ) {
        reg.register(
            "clawgress_ratelimit",
            "Quota checks by mode (hard_stop, alert_only) and result (ok, over_limit, error)",
            self.counted.clone(),
        );
        reg.register(
            "clawgress_ratelimit_duration_seconds",
            "Time to check one request against its quotas (counter store included)",
            self.duration.clone(),
        );
        if revision_gauge {
            reg.register(
                "clawgress_bundle_revision",
                "The policy revision in force (value 1)",
                self.revision.clone(),
            );
        }
    }

    /// The revision the quotas in force came from.
    pub fn set_revision(&self, revision: &str) {
        self.revision.clear();
        self.revision
            .get_or_create(&RevisionLabels {
                revision: revision.to_string(),
            })
            .set(1);
    }

    fn count(&self, mode: QuotaMode, result: &'static str) {
        self.counted
            .get_or_create(&RatelimitLabels {
                mode: mode.as_str(),
                result,
            })
            .inc();
    }

    /// Admit requests (with an alert each time) when the store fails,
    /// instead of failing closed.
    pub fn fail_open(mut self, yes: bool) -> RatelimitService {
        self.fail_open = yes;
        self
    }

    /// Apply new quotas. Counters live in the store, keyed by scope and
    /// window, so unchanged quotas keep their live counts.
    pub fn reload(&self, doc: &PolicyDocument) {
        self.quotas.store(Arc::new(quotas_by_scope(doc)));
    }

    /// Count `hits` requests for `who` at `now_ms` (Unix milliseconds)
    /// against every quota that applies. A request refused by one scope is
    /// taken back from the scopes that had already counted it.
    pub async fn should_limit(
        &self,
        who: &Subject,
        hits: u32,
        now_ms: u64,
    ) -> Result<Outcome, StoreError> {
        let quotas = self.quotas.load();
        let mut o = Outcome {
            admitted: true,
            quota_applied: String::new(),
            policy_id: String::new(),
            status: None,
            retry_after_s: 0,
            alerts: Vec::new(),
        };
        let mut counted: Vec<(String, &ScopeQuota)> = Vec::new();
        let mut applied = Vec::new();
        for scope in who.scopes() {
            let Some(q) = quotas.get(&scope) else {
                continue;
            };
            let statuses = match self.store.acquire(&scope, &q.limits, hits, now_ms).await {
                Ok(s) => s,
                Err(e) => {
                    self.count(q.mode, "error");
                    self.undo(&counted, hits, now_ms).await;
                    return Err(e);
                }
            };
            let over: Vec<&WindowStatus> = statuses.iter().filter(|s| s.over).collect();
            let mode = q.mode.as_str();
            let tightest = statuses.iter().min_by_key(|s| (!s.over, s.remaining));
            if o.status.as_ref().is_none_or(|cur| {
                tightest.is_some_and(|t| (!t.over, t.remaining) < (!cur.over, cur.remaining))
            }) {
                o.status = tightest.cloned();
            }
            self.count(q.mode, if over.is_empty() { "ok" } else { "over_limit" });
            if over.is_empty() {
                applied.push(format!("{scope}={mode}"));
                counted.push((scope, q));
                continue;
            }
            applied.push(format!("{scope}={mode}:exceeded"));
            if o.policy_id.is_empty() {
                o.policy_id = format!("quota:{scope}");
            }
            if q.mode == QuotaMode::HardStop {
                o.admitted = false;
                o.policy_id = format!("quota:{scope}");
                o.retry_after_s = over
                    .iter()
                    .map(|s| s.reset_ms.div_ceil(1000))
                    .max()
                    .unwrap_or(1);
                self.undo(&counted, hits, now_ms).await;
                break;
            }
            o.alerts.push(scope);
        }
        o.quota_applied = applied.join(",");
        Ok(o)
    }

    async fn undo(&self, counted: &[(String, &ScopeQuota)], hits: u32, now_ms: u64) {
        for (scope, q) in counted {
            if let Err(e) = self.store.release(scope, &q.limits, hits, now_ms).await {
                // The request is refused either way; the scope keeps one
                // count too many until its window ends (under-, never
                // over-admission).
                tracing::warn!(scope, error = %e, "could not take back a counted request");
            }
        }
    }

    /// True at most once per scope per minute: `alert_only` overruns raise
    /// the `quota-alert-only` alert that often, and are counted every time.
    fn should_alert(&self, scope: &str, now_ms: u64) -> bool {
        let minute = now_ms / 60_000;
        let Ok(mut m) = self.alerted.lock() else {
            return true;
        };
        match m.insert(scope.to_string(), minute) {
            Some(prev) => prev != minute,
            None => true,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who a request is for, from its descriptor entries.
pub fn subject_of(req: &RateLimitRequest) -> Subject {
    let mut who = Subject::default();
    for e in req.descriptors.iter().flat_map(|d| d.entries.iter()) {
        let slot = match e.key.as_str() {
            AGENT_KEY => &mut who.agent_id,
            TEAM_KEY => &mut who.team_id,
            PROJECT_KEY => &mut who.project_id,
            _ => continue,
        };
        if slot.is_empty() {
            *slot = e.value.clone();
        }
    }
    who
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.into(),
        value,
        ..Default::default()
    }
}

/// Turn an outcome into Envoy's answer, once.
pub fn response(o: &Outcome, descriptors: usize) -> RateLimitResponse {
    let code = if o.admitted {
        Code::Ok
    } else {
        Code::OverLimit
    };
    let status = o.status.as_ref().map(|s| DescriptorStatus {
        code: if s.over { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: Some(RateLimit {
            name: String::new(),
            requests_per_unit: s.limit.max,
            unit: match s.limit.window {
                Window::Second => Unit::Second,
                Window::Minute => Unit::Minute,
            } as i32,
        }),
        limit_remaining: s.remaining,
        duration_until_reset: Some(Duration {
            seconds: s.reset_ms.div_ceil(1000) as i64,
            nanos: 0,
        }),
        ..Default::default()
    });
    let mut fields = HashMap::new();
    if !o.quota_applied.is_empty() {
        let s = |v: String| Value {
            kind: Some(Kind::StringValue(v)),
        };
        fields.insert("quota_applied".to_string(), s(o.quota_applied.clone()));
        fields.insert("policy_id".to_string(), s(o.policy_id.clone()));
    }
    RateLimitResponse {
        overall_code: code as i32,
        // Envoy expects one status per descriptor it sent, and writes
        // every one that carries a limit into `x-ratelimit-limit`: the
        // binding window once, as authz does, the rest bare.
        statuses: status
            .map(|s| {
                let bare = DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                };
                std::iter::once(s)
                    .chain(std::iter::repeat_n(bare, descriptors.max(1) - 1))
                    .collect()
            })
            .unwrap_or_default(),
        response_headers_to_add: if o.admitted {
            Vec::new()
        } else {
            vec![header("retry-after", o.retry_after_s.max(1).to_string())]
        },
        dynamic_metadata: (!fields.is_empty()).then_some(Struct { fields }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl RateLimitService for RatelimitService {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let req = request.into_inner();
        let who = subject_of(&req);
        if who.agent_id.is_empty() {
            // No agent: authz denied before us or the route sent nothing to
            // count. Nothing to limit.
            return Ok(tonic::Response::new(RateLimitResponse {
                overall_code: Code::Ok as i32,
                ..Default::default()
            }));
        }
        // hits_addend 0 means 1 (Envoy's contract).
        let hits = req.hits_addend.max(1);
        match self.admit(&who, hits).await {
            Ok(o) => Ok(tonic::Response::new(response(&o, req.descriptors.len()))),
            // Fail closed through Envoy: UNAVAILABLE + failure_mode_deny
            // gives the agent a 503 `ratelimit-unavailable`, never a 429.
            Err(_) => Err(tonic::Status::unavailable("counter store unavailable")),
        }
    }
}

impl RatelimitService {
    /// One request's outcome with the failure mode applied and
    /// `alert_only` overruns alerted (at most once per scope per minute):
    /// what the RLS answers, and what authz uses with `quota_check: authz`.
    pub async fn admit(&self, who: &Subject, hits: u32) -> Result<Outcome, StoreError> {
        let now = now_ms();
        let started = std::time::Instant::now();
        let result = self.should_limit(who, hits, now).await;
        self.duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(o) => {
                for scope in &o.alerts {
                    if self.should_alert(scope, now) {
                        tracing::warn!(
                            alert = "quota-alert-only",
                            scope,
                            agent_id = who.agent_id,
                            "alert_only quota exceeded; requests pass"
                        );
                    }
                }
                Ok(o)
            }
            Err(e) if self.fail_open => {
                // Configured to fail open: the request passes unlimited, and
                // says so in the audit record and an alert, every time.
                tracing::error!(alert = "ratelimit-store-unavailable", error = %e, failure_mode = "allow", agent_id = who.agent_id, "counter store failed; request allowed unlimited");
                Ok(Outcome {
                    admitted: true,
                    quota_applied: "store-unavailable:allowed".into(),
                    policy_id: String::new(),
                    status: None,
                    retry_after_s: 0,
                    alerts: Vec::new(),
                })
            }
            Err(e) => {
                tracing::error!(alert = "ratelimit-store-unavailable", error = %e, "counter store failed");
                Err(e)
            }
        }
    }
}

/// The `x-ratelimit-*` headers (IETF draft 03, as Envoy writes them) of an
/// outcome's tightest window.
pub fn x_ratelimit_headers(o: &Outcome) -> Vec<(String, String)> {
    let Some(s) = &o.status else {
        return Vec::new();
    };
    let w = match s.limit.window {
        Window::Second => 1,
        Window::Minute => 60,
    };
    vec![
        (
            "x-ratelimit-limit".into(),
            format!("{}, {};w={w}", s.limit.max, s.limit.max),
        ),
        ("x-ratelimit-remaining".into(), s.remaining.to_string()),
        (
            "x-ratelimit-reset".into(),
            s.reset_ms.div_ceil(1000).to_string(),
        ),
    ]
}

/// Serve `ShouldRateLimit` on `incoming` until `shutdown` resolves.
pub async fn run<I, IO, IE, F>(
    service: RatelimitService,
    incoming: I,
    shutdown: F,
) -> Result<(), Error>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()> + Send,
{
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawgress_policy::Document;

    fn service() -> RatelimitService {
        let doc = Document::from_yaml(
            r#"
quotas:
  - {agent_id: fast, rps_limit: 3, rpm_limit: 5}
  - {agent_id: loud, rps_limit: 1, mode: alert_only}
  - {team_id: infra, rps_limit: 4}
  - {project_id: ci, rpm_limit: 100, mode: alert_only}
"#,
        )
        .expect("valid")
        .policy();
        RatelimitService::new(&doc, Arc::new(MemoryStore::default()))
    }

    fn who(agent: &str, team: &str, project: &str) -> Subject {
        Subject {
            agent_id: agent.into(),
            team_id: team.into(),
            project_id: project.into(),
        }
    }

    const T0: u64 = 1_699_999_980_000; // on a minute boundary

    async fn go(s: &RatelimitService, w: &Subject, hits: u32, at: u64) -> Outcome {
        s.should_limit(w, hits, at).await.expect("store")
    }

    #[tokio::test]
    async fn rps_then_rpm_then_reset() {
        let s = service();
        let w = who("fast", "", "");
        for i in 0..3 {
            assert!(go(&s, &w, 1, T0 + i).await.admitted);
        }
        let o = go(&s, &w, 1, T0 + 500).await;
        assert!(!o.admitted);
        assert_eq!(o.retry_after_s, 1);
        assert_eq!(o.quota_applied, "agent:fast=hard_stop:exceeded");
        assert_eq!(o.policy_id, "quota:agent:fast");
        // Next second: rps resets, rpm has 2 left.
        for i in 0..2 {
            assert!(go(&s, &w, 1, T0 + 1000 + i).await.admitted);
        }
        let o = go(&s, &w, 1, T0 + 2000).await;
        assert!(!o.admitted, "rpm of 5 reached");
        assert_eq!(o.retry_after_s, 58);
        assert!(go(&s, &w, 1, T0 + 60_000).await.admitted);
    }

    #[tokio::test]
    async fn alert_only_passes_and_says_so_once_a_minute() {
        let s = service();
        let w = who("loud", "", "");
        assert_eq!(
            go(&s, &w, 1, T0).await.quota_applied,
            "agent:loud=alert_only"
        );
        let o = go(&s, &w, 1, T0 + 1).await;
        assert!(o.admitted);
        assert_eq!(o.quota_applied, "agent:loud=alert_only:exceeded");
        assert_eq!(o.alerts, vec!["agent:loud".to_string()]);
        assert!(s.should_alert("agent:loud", T0 + 1));
        assert!(!s.should_alert("agent:loud", T0 + 30_000));
        assert!(s.should_alert("agent:loud", T0 + 60_000));
    }

    #[tokio::test]
    async fn team_quota_spans_agents_and_refusals_are_taken_back() {
        let s = service();
        // Team infra: 4/s across its agents.
        for (i, a) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(
                go(&s, &who(a, "infra", "ci"), 1, T0 + i as u64)
                    .await
                    .admitted,
                "{a}"
            );
        }
        let o = go(&s, &who("fast", "infra", "ci"), 1, T0 + 10).await;
        assert!(!o.admitted);
        assert_eq!(o.policy_id, "quota:team:infra");
        assert!(
            o.quota_applied
                .starts_with("agent:fast=hard_stop,team:infra=hard_stop:exceeded"),
            "{}",
            o.quota_applied
        );
        // The refused request was taken back from agent fast's own quota:
        // fast still has all 3 of its per-second requests.
        for i in 0..3 {
            assert!(go(&s, &who("fast", "", ""), 1, T0 + 20 + i).await.admitted);
        }
        assert!(!go(&s, &who("fast", "", ""), 1, T0 + 30).await.admitted);
    }

    #[tokio::test]
    async fn unknown_agents_are_not_limited_and_reload_keeps_counts() {
        let s = service();
        assert!(go(&s, &who("nobody", "", ""), 1, T0).await.admitted);
        assert_eq!(
            go(&s, &who("nobody", "", ""), 1, T0).await.quota_applied,
            ""
        );
        for i in 0..3 {
            assert!(go(&s, &who("fast", "", ""), 1, T0 + i).await.admitted);
        }
        // Same quota after reload: the count of this second stands.
        let doc =
            Document::from_yaml("quotas:\n  - {agent_id: fast, rps_limit: 3, rpm_limit: 5}\n")
                .expect("valid")
                .policy();
        s.reload(&doc);
        assert!(!go(&s, &who("fast", "", ""), 1, T0 + 10).await.admitted);
    }

    #[tokio::test]
    async fn proto_answer_has_retry_after_and_metadata() {
        let s = service();
        let mut last = None;
        for _ in 0..4 {
            last = Some(go(&s, &who("fast", "", ""), 1, T0).await);
        }
        let o = last.expect("ran");
        let r = response(&o, 3);
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        let h = &r.response_headers_to_add[0];
        assert_eq!((h.key.as_str(), h.value.as_str()), ("retry-after", "1"));
        // One status per descriptor; only the first names the limit (so
        // Envoy's x-ratelimit-limit says it once).
        assert_eq!(r.statuses.len(), 3);
        assert!(r.statuses[0].current_limit.is_some());
        assert!(r.statuses[1..].iter().all(|s| s.current_limit.is_none()));
        let md = r.dynamic_metadata.expect("metadata");
        assert!(md.fields.contains_key("quota_applied"));
    }

    #[tokio::test]
    async fn hits_addend_counts_as_many() {
        let s = service();
        let w = who("fast", "", "");
        assert!(go(&s, &w, 3, T0).await.admitted);
        assert!(!go(&s, &w, 1, T0).await.admitted);
        // A batch that does not fit is refused whole and consumes nothing.
        let s = service();
        assert!(!go(&s, &w, 4, T0).await.admitted);
        assert!(go(&s, &w, 3, T0).await.admitted);
    }
}
