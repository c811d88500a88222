//! The floor's services: gRPC servers that do nothing and answer OK —
//! ext_authz `Check`, RLS `ShouldRateLimit`, ALS `StreamAccessLogs` — so the
//! floor arm measures what the architecture itself costs (Envoy's side
//! calls), not our handlers.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::rpc::Status;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Streaming};

#[derive(Debug, Default, Clone, Copy)]
pub struct Floor;

#[tonic::async_trait]
impl Authorization for Floor {
    async fn check(
        &self,
        _: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, tonic::Status> {
        Ok(Response::new(answer()))
    }
}

/// The floor answers a bare OK. For experiments only,
/// `CLAWGRESS_BENCH_FLOOR_ANSWER` (comma-separated) adds parts of what
/// authz answers, to see what each costs Envoy: `meta` (the eight metadata
/// keys of an allow), `meta4` (four of them), `rl` (three `x-ratelimit-*`
/// response headers), `rm` (remove `proxy-authorization`).
fn answer() -> CheckResponse {
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::OkHttpResponse;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    static PARTS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let parts =
        PARTS.get_or_init(|| std::env::var("CLAWGRESS_BENCH_FLOOR_ANSWER").unwrap_or_default());
    let mut r = CheckResponse {
        status: Some(Status {
            code: 0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let has = |p: &str| parts.split(',').any(|x| x == p);
    let keys: &[(&str, &str)] = &[
        ("agent_id", "agent-0042"),
        ("team_id", "team-2"),
        ("project_id", "proj-2"),
        ("environment", "prod"),
        ("policy_id", "allow-0042"),
        ("bundle_revision", "r1"),
        ("reason", "allowed"),
        ("decision", "allow"),
    ];
    let n = if has("meta") {
        8
    } else if has("meta4") {
        4
    } else {
        0
    };
    if n > 0 {
        r.dynamic_metadata = Some(Struct {
            fields: keys[..n]
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        });
    }
    let mut ok = OkHttpResponse::default();
    if has("rl") {
        for (k, v) in [
            ("x-ratelimit-limit", "10, 10;w=1"),
            ("x-ratelimit-remaining", "9"),
            ("x-ratelimit-reset", "1"),
        ] {
            ok.response_headers_to_add.push(HeaderValueOption {
                header: Some(HeaderValue {
                    key: k.into(),
                    value: v.into(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    if has("rm") {
        ok.headers_to_remove.push("proxy-authorization".into());
    }
    if has("rl") || has("rm") {
        r.http_response = Some(HttpResponse::OkResponse(ok));
    }
    r
}

#[tonic::async_trait]
impl RateLimitService for Floor {
    async fn should_rate_limit(
        &self,
        _: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, tonic::Status> {
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl AccessLogService for Floor {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, tonic::Status> {
        let mut s = request.into_inner();
        while let Some(m) = s.next().await {
            if m.is_err() {
                break;
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

/// The Unix sockets the floor answers on (the paths in Envoy's config).
#[derive(Debug, Clone)]
pub struct Sockets {
    pub authz: PathBuf,
    pub ratelimit: PathBuf,
    pub audit: PathBuf,
}

fn bind(path: &Path) -> anyhow::Result<UnixListenerStream> {
    let _ = std::fs::remove_file(path);
    Ok(UnixListenerStream::new(tokio::net::UnixListener::bind(
        path,
    )?))
}

/// Serve all three until the process ends.
pub async fn serve(s: Sockets) -> anyhow::Result<()> {
    let a = tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Floor))
        .serve_with_incoming(bind(&s.authz)?);
    let r = tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(Floor))
        .serve_with_incoming(bind(&s.ratelimit)?);
    let l = tonic::transport::Server::builder()
        .add_service(AccessLogServiceServer::new(Floor))
        .serve_with_incoming(bind(&s.audit)?);
    tokio::try_join!(a, r, l)?;
    Ok(())
}
