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
        Ok(Response::new(CheckResponse {
            status: Some(Status {
                code: 0,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
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
