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

mod store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
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
use tokio_stream::Stream;
use tonic::transport::server::Connected;

pub use store::{CounterStore, Limit, MemoryStore, StoreError, Window, WindowStatus};

/// The descriptor key Envoy puts the agent under.
pub const AGENT_KEY: &str = "agent_id";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ratelimit gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// One agent's limits as the service applies them.
#[derive(Debug, Clone, PartialEq)]
struct AgentQuota {
    limits: Vec<Limit>,
    mode: QuotaMode,
}

fn quotas_by_agent(doc: &PolicyDocument) -> HashMap<String, AgentQuota> {
    doc.quotas
        .iter()
        .filter_map(|q: &Quota| {
            let agent = q.agent_id.as_ref()?.as_str().to_string();
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
                agent,
                AgentQuota {
                    limits,
                    mode: q.mode,
                },
            ))
        })
        .collect()
}

/// The outcome of one request against its agent's quota, free of protos.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// False only for a `hard_stop` quota over its limit.
    pub admitted: bool,
    /// For the audit record: "" (no quota), "hard_stop", "alert_only",
    /// or the mode with ":exceeded" appended.
    pub quota_applied: String,
    /// The tightest window, for `x-ratelimit-*`.
    pub status: Option<WindowStatus>,
    /// Seconds until a window that would admit the request.
    pub retry_after_s: u64,
}

/// The `RateLimitService`. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct RatelimitService {
    quotas: Arc<ArcSwap<HashMap<String, AgentQuota>>>,
    store: Arc<dyn CounterStore>,
}

impl RatelimitService {
    pub fn new(doc: &PolicyDocument, store: Arc<dyn CounterStore>) -> RatelimitService {
        RatelimitService {
            quotas: Arc::new(ArcSwap::from_pointee(quotas_by_agent(doc))),
            store,
        }
    }

    /// Apply new quotas. Counters live in the store, keyed by agent and
    /// window, so unchanged quotas keep their live counts.
    pub fn reload(&self, doc: &PolicyDocument) {
        self.quotas.store(Arc::new(quotas_by_agent(doc)));
    }

    /// Count `hits` requests for `agent` at `now_ms` (Unix milliseconds).
    pub async fn should_limit(
        &self,
        agent: &str,
        hits: u32,
        now_ms: u64,
    ) -> Result<Outcome, StoreError> {
        let quotas = self.quotas.load();
        let Some(q) = quotas.get(agent) else {
            return Ok(Outcome {
                admitted: true,
                quota_applied: String::new(),
                status: None,
                retry_after_s: 0,
            });
        };
        let statuses = self.store.acquire(agent, &q.limits, hits, now_ms).await?;
        let over: Vec<&WindowStatus> = statuses.iter().filter(|s| s.over).collect();
        let retry_after_s = over
            .iter()
            .map(|s| s.reset_ms.div_ceil(1000))
            .max()
            .unwrap_or(0);
        let tightest = statuses
            .iter()
            .min_by_key(|s| (!s.over, s.remaining))
            .cloned();
        let exceeded = !over.is_empty();
        let mode = q.mode.as_str();
        Ok(Outcome {
            admitted: !(exceeded && q.mode == QuotaMode::HardStop),
            quota_applied: if exceeded {
                format!("{mode}:exceeded")
            } else {
                mode.to_string()
            },
            status: tightest,
            retry_after_s,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The agent a request is for: the `agent_id` entry of its descriptors.
pub fn agent_of(req: &RateLimitRequest) -> Option<&str> {
    req.descriptors
        .iter()
        .flat_map(|d| d.entries.iter())
        .find(|e| e.key == AGENT_KEY && !e.value.is_empty())
        .map(|e| e.value.as_str())
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.into(),
        value,
        ..Default::default()
    }
}

/// Turn an outcome into Envoy's answer, once.
pub fn response(agent: &str, o: &Outcome, descriptors: usize) -> RateLimitResponse {
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
        fields.insert("policy_id".to_string(), s(format!("quota:{agent}")));
    }
    RateLimitResponse {
        overall_code: code as i32,
        // Envoy expects one status per descriptor it sent.
        statuses: status
            .map(|s| vec![s; descriptors.max(1)])
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
        let Some(agent) = agent_of(&req) else {
            // No agent: authz denied before us or the route sent nothing to
            // count. Nothing to limit.
            return Ok(tonic::Response::new(RateLimitResponse {
                overall_code: Code::Ok as i32,
                ..Default::default()
            }));
        };
        // hits_addend 0 means 1 (Envoy's contract).
        let hits = req.hits_addend.max(1);
        match self.should_limit(agent, hits, now_ms()).await {
            Ok(o) => {
                if o.quota_applied.starts_with("alert_only:exceeded") {
                    tracing::warn!(
                        alert = "quota-alert-only",
                        agent_id = agent,
                        "alert_only quota exceeded; request passed"
                    );
                } else if !o.admitted {
                    tracing::debug!(agent_id = agent, "hard_stop quota exceeded");
                }
                Ok(tonic::Response::new(response(
                    agent,
                    &o,
                    req.descriptors.len(),
                )))
            }
            Err(e) => {
                // Fail closed through Envoy: UNAVAILABLE + failure_mode_deny
                // gives the agent a 503 `ratelimit-unavailable`, never a 429.
                tracing::error!(alert = "ratelimit-store-unavailable", error = %e, "counter store failed");
                Err(tonic::Status::unavailable("counter store unavailable"))
            }
        }
    }
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
"#,
        )
        .expect("valid")
        .policy();
        RatelimitService::new(&doc, Arc::new(MemoryStore::default()))
    }

    const T0: u64 = 1_699_999_980_000; // on a minute boundary

    #[tokio::test]
    async fn rps_then_rpm_then_reset() {
        let s = service();
        for i in 0..3 {
            assert!(
                s.should_limit("fast", 1, T0 + i)
                    .await
                    .expect("store")
                    .admitted
            );
        }
        let o = s.should_limit("fast", 1, T0 + 500).await.expect("store");
        assert!(!o.admitted);
        assert_eq!(o.retry_after_s, 1);
        assert_eq!(o.quota_applied, "hard_stop:exceeded");
        // Next second: rps resets, rpm has 2 left.
        for i in 0..2 {
            assert!(
                s.should_limit("fast", 1, T0 + 1000 + i)
                    .await
                    .expect("store")
                    .admitted
            );
        }
        let o = s.should_limit("fast", 1, T0 + 2000).await.expect("store");
        assert!(!o.admitted, "rpm of 5 reached");
        assert_eq!(o.retry_after_s, 58);
        assert!(
            s.should_limit("fast", 1, T0 + 60_000)
                .await
                .expect("store")
                .admitted
        );
    }

    #[tokio::test]
    async fn alert_only_passes_and_says_so() {
        let s = service();
        assert_eq!(
            s.should_limit("loud", 1, T0)
                .await
                .expect("store")
                .quota_applied,
            "alert_only"
        );
        let o = s.should_limit("loud", 1, T0 + 1).await.expect("store");
        assert!(o.admitted);
        assert_eq!(o.quota_applied, "alert_only:exceeded");
    }

    #[tokio::test]
    async fn unknown_agents_are_not_limited_and_reload_keeps_counts() {
        let s = service();
        assert!(
            s.should_limit("nobody", 1, T0)
                .await
                .expect("store")
                .admitted
        );
        for i in 0..3 {
            assert!(
                s.should_limit("fast", 1, T0 + i)
                    .await
                    .expect("store")
                    .admitted
            );
        }
        // Same quota after reload: the count of this second stands.
        let doc =
            Document::from_yaml("quotas:\n  - {agent_id: fast, rps_limit: 3, rpm_limit: 5}\n")
                .expect("valid")
                .policy();
        s.reload(&doc);
        assert!(
            !s.should_limit("fast", 1, T0 + 10)
                .await
                .expect("store")
                .admitted
        );
    }

    #[tokio::test]
    async fn proto_answer_has_retry_after_and_metadata() {
        let s = service();
        let mut last = None;
        for _ in 0..4 {
            last = Some(s.should_limit("fast", 1, T0).await.expect("store"));
        }
        let o = last.expect("ran");
        let r = response("fast", &o, 1);
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        let h = &r.response_headers_to_add[0];
        assert_eq!((h.key.as_str(), h.value.as_str()), ("retry-after", "1"));
        assert_eq!(r.statuses.len(), 1);
        let md = r.dynamic_metadata.expect("metadata");
        assert!(md.fields.contains_key("quota_applied"));
    }

    #[tokio::test]
    async fn hits_addend_counts_as_many() {
        let s = service();
        assert!(s.should_limit("fast", 3, T0).await.expect("store").admitted);
        assert!(!s.should_limit("fast", 1, T0).await.expect("store").admitted);
        // A batch that does not fit is refused whole and consumes nothing.
        let s = service();
        assert!(!s.should_limit("fast", 4, T0).await.expect("store").admitted);
        assert!(s.should_limit("fast", 3, T0).await.expect("store").admitted);
    }
}
