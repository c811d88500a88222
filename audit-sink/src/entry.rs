//! Envoy's `HttpAccessLogEntry` to an [`AuditRecord`], in one place.
//!
//! Identity, decision and revision come from the dynamic metadata authz
//! emitted (`envoy.filters.http.ext_authz`); the quota outcome from the
//! rate-limit filter's (`envoy.filters.http.ratelimit`). Denials Envoy makes
//! on its own (authz or ratelimit unreachable) carry no metadata and are
//! named from the response flags.

use std::time::{Duration, UNIX_EPOCH};

use clawgress_audit_log::{AuditRecord, RecordKind};
use envoy_types::pb::envoy::config::core::v3::{address, RequestMethod};
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::google::protobuf::{value::Kind, Struct};

pub const AUTHZ_NS: &str = "envoy.filters.http.ext_authz";
pub const RATELIMIT_NS: &str = "envoy.filters.http.ratelimit";

fn text(s: Option<&Struct>, key: &str) -> String {
    match s
        .and_then(|s| s.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(v)) => v.clone(),
        _ => String::new(),
    }
}

/// Split an authority into host and port; `default_port` when it has none.
fn host_port(authority: &str, default_port: u16) -> (String, u16) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            let port = after
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(default_port);
            return (host.to_ascii_lowercase(), port);
        }
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h.to_ascii_lowercase(), port),
            Err(_) => (authority.to_ascii_lowercase(), default_port),
        },
        _ => (authority.to_ascii_lowercase(), default_port),
    }
}

fn rfc3339_millis(seconds: i64, nanos: i32) -> String {
    let t = UNIX_EPOCH + Duration::new(seconds.max(0) as u64, nanos.max(0) as u32);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn record_from_entry(e: &HttpAccessLogEntry) -> AuditRecord {
    let common = e.common_properties.as_ref();
    let req = e.request.as_ref();
    let resp = e.response.as_ref();
    let md = common.and_then(|c| c.metadata.as_ref());
    let authz = md.and_then(|m| m.filter_metadata.get(AUTHZ_NS));
    let rl = md.and_then(|m| m.filter_metadata.get(RATELIMIT_NS));
    let flags = common.and_then(|c| c.response_flags.as_ref());

    let method = req
        .and_then(|r| RequestMethod::try_from(r.request_method).ok())
        .filter(|m| *m != RequestMethod::MethodUnspecified)
        .map(|m| m.as_str_name().to_string())
        .unwrap_or_default();
    let connect = method == "CONNECT";
    let default_port = match req.map(|r| r.scheme.as_str()) {
        _ if connect => 443,
        Some("https") => 443,
        _ => 80,
    };
    let (destination_host, destination_port) = host_port(
        req.map(|r| r.authority.as_str()).unwrap_or(""),
        default_port,
    );
    // The query string can carry secrets; the audit keeps the path only.
    let path = req
        .map(|r| r.path.split(['?', '#']).next().unwrap_or("").to_string())
        .unwrap_or_default();

    let response_code = resp
        .and_then(|r| r.response_code.as_ref())
        .map(|c| c.value as u16)
        .unwrap_or(0);

    let mut decision = text(authz, "decision");
    let mut reason = text(authz, "reason");
    let mut policy_id = text(authz, "policy_id");
    let quota_applied = text(rl, "quota_applied");
    if flags.is_some_and(|f| f.rate_limited) {
        decision = "deny".into();
        reason = "quota-exceeded".into();
        policy_id = text(rl, "policy_id");
    } else if flags.is_some_and(|f| f.rate_limit_service_error) {
        // As in the reply body: an outage, not a policy's decision.
        decision = "deny".into();
        reason = "ratelimit-unavailable".into();
        policy_id = String::new();
    } else if decision.is_empty() {
        // No verdict from authz: Envoy answered on its own (authz down or
        // timed out, or the request never reached the filters).
        decision = "deny".into();
        if flags.is_some_and(|f| f.unauthorized_details.is_some()) || response_code == 503 {
            reason = "authz-unavailable".into();
        }
    }

    let source_address = common
        .and_then(|c| c.downstream_remote_address.as_ref())
        .and_then(|a| a.address.as_ref())
        .map(|a| match a {
            address::Address::SocketAddress(s) => s.address.clone(),
            address::Address::Pipe(p) => p.path.clone(),
            _ => String::new(),
        })
        .unwrap_or_default();

    let latency_ms = common
        .and_then(|c| {
            c.duration
                .as_ref()
                .or(c.time_to_last_downstream_tx_byte.as_ref())
        })
        .map(|d| (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000)
        .unwrap_or(0);

    AuditRecord {
        kind: RecordKind::Request,
        seq: 0,
        timestamp: common
            .and_then(|c| c.start_time.as_ref())
            .map(|t| rfc3339_millis(t.seconds, t.nanos))
            .unwrap_or_default(),
        request_id: req.map(|r| r.request_id.clone()).unwrap_or_default(),
        agent_id: text(authz, "agent_id"),
        team_id: text(authz, "team_id"),
        project_id: text(authz, "project_id"),
        environment: text(authz, "environment"),
        destination_host,
        destination_port,
        http_method: method,
        path,
        decision,
        reason,
        policy_id,
        bundle_revision: text(authz, "bundle_revision"),
        quota_applied,
        response_code,
        latency_ms,
        bytes_out: req
            .map(|r| r.request_headers_bytes + r.request_body_bytes)
            .unwrap_or(0),
        bytes_in: resp
            .map(|r| r.response_headers_bytes + r.response_body_bytes)
            .unwrap_or(0),
        source_address,
        shadow_decision: text(authz, "shadow_decision"),
        shadow_policy_id: text(authz, "shadow_policy_id"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties, ResponseFlags,
    };
    use envoy_types::pb::google::protobuf::{Timestamp, UInt32Value, Value};

    fn s(pairs: &[(&str, &str)]) -> Struct {
        Struct {
            fields: pairs
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
        }
    }

    fn entry(method: RequestMethod, authority: &str, code: u32) -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                start_time: Some(Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5_000_000,
                }),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_method: method as i32,
                authority: authority.into(),
                path: "/simple/x?token=secret".into(),
                request_id: "rid".into(),
                request_headers_bytes: 100,
                request_body_bytes: 5,
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: code }),
                response_headers_bytes: 50,
                response_body_bytes: 1000,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn allowed_request_takes_identity_from_authz_metadata() {
        let mut e = entry(RequestMethod::Get, "PyPI.org", 200);
        if let Some(c) = e.common_properties.as_mut() {
            c.metadata = Some(Metadata {
                filter_metadata: [
                    (
                        AUTHZ_NS.to_string(),
                        s(&[
                            ("agent_id", "bot"),
                            ("decision", "allow"),
                            ("policy_id", "allow-pypi"),
                            ("bundle_revision", "r1"),
                        ]),
                    ),
                    (
                        RATELIMIT_NS.to_string(),
                        s(&[("quota_applied", "hard_stop")]),
                    ),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            });
        }
        let r = record_from_entry(&e);
        assert_eq!(r.timestamp, "2023-11-14T22:13:20.005Z");
        assert_eq!(
            (r.destination_host.as_str(), r.destination_port),
            ("pypi.org", 80)
        );
        assert_eq!(r.path, "/simple/x", "query string is not kept");
        assert_eq!((r.agent_id.as_str(), r.decision.as_str()), ("bot", "allow"));
        assert_eq!(r.policy_id, "allow-pypi");
        assert_eq!(r.quota_applied, "hard_stop");
        assert_eq!((r.bytes_out, r.bytes_in), (105, 1050));
        assert_eq!(r.http_method, "GET");
    }

    #[test]
    fn envoy_own_denials_are_named_from_flags() {
        let mut e = entry(RequestMethod::Connect, "[2001:db8::1]:8443", 429);
        if let Some(c) = e.common_properties.as_mut() {
            c.response_flags = Some(ResponseFlags {
                rate_limited: true,
                ..Default::default()
            });
        }
        let r = record_from_entry(&e);
        assert_eq!(
            (r.destination_host.as_str(), r.destination_port),
            ("2001:db8::1", 8443)
        );
        assert_eq!(
            (r.decision.as_str(), r.reason.as_str()),
            ("deny", "quota-exceeded")
        );
        let r = record_from_entry(&entry(RequestMethod::Connect, "example.com:443", 503));
        assert_eq!(
            (r.decision.as_str(), r.reason.as_str()),
            ("deny", "authz-unavailable")
        );
        assert_eq!(r.destination_port, 443);
        // An empty entry still yields a record, not a panic.
        let r = record_from_entry(&HttpAccessLogEntry::default());
        assert_eq!(r.decision, "deny");
    }
}
