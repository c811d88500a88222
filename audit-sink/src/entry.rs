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

/// What the sink needs from one access-log entry, whichever way it came
/// (gRPC stream or JSON file line). All semantics live in [`Entry::record`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    /// RFC 3339 UTC with milliseconds.
    pub timestamp: String,
    pub request_id: String,
    pub method: String,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub response_code: u16,
    pub rate_limited: bool,
    pub rate_limit_service_error: bool,
    pub authz_error: bool,
    pub latency_ms: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub source_address: String,
    /// authz's dynamic metadata.
    pub authz: Meta,
    /// the rate-limit filter's dynamic metadata.
    pub ratelimit: Meta,
}

/// The dynamic-metadata keys the sink reads (authz writes them all; the
/// rate-limit filter `policy_id` and `quota_applied`). A key that is absent,
/// `null` or not a string reads as empty; other keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct Meta {
    #[serde(deserialize_with = "string_or_empty")]
    pub agent_id: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub team_id: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub project_id: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub environment: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub policy_id: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub bundle_revision: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub reason: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub decision: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub shadow_decision: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub shadow_policy_id: String,
    #[serde(deserialize_with = "string_or_empty")]
    pub quota_applied: String,
}

impl Meta {
    /// From a gRPC entry's metadata namespace (string values only).
    fn from_struct(s: Option<&Struct>) -> Meta {
        let mut m = Meta::default();
        for (k, v) in s.iter().flat_map(|s| s.fields.iter()) {
            let Some(Kind::StringValue(x)) = &v.kind else {
                continue;
            };
            let slot = match k.as_str() {
                "agent_id" => &mut m.agent_id,
                "team_id" => &mut m.team_id,
                "project_id" => &mut m.project_id,
                "environment" => &mut m.environment,
                "policy_id" => &mut m.policy_id,
                "bundle_revision" => &mut m.bundle_revision,
                "reason" => &mut m.reason,
                "decision" => &mut m.decision,
                "shadow_decision" => &mut m.shadow_decision,
                "shadow_policy_id" => &mut m.shadow_policy_id,
                "quota_applied" => &mut m.quota_applied,
                _ => continue,
            };
            slot.clone_from(x);
        }
        m
    }
}

/// Any JSON value: a string as itself, everything else as "".
fn string_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_bool<E>(self, _: bool) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_i64<E>(self, _: i64) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_u64<E>(self, _: u64) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_f64<E>(self, _: f64) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_unit<E>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_none<E>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<String, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(String::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<String, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(String::new())
        }
    }
    d.deserialize_any(V)
}

/// A metadata object, or anything else (`null`, "-") as no metadata.
fn lenient_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Meta, D::Error> {
    use serde::Deserialize;
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Meta;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a metadata object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Meta, A::Error> {
            Meta::deserialize(serde::de::value::MapAccessDeserializer::new(a))
        }
        fn visit_str<E>(self, _: &str) -> Result<Meta, E> {
            Ok(Meta::default())
        }
        fn visit_bool<E>(self, _: bool) -> Result<Meta, E> {
            Ok(Meta::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Meta, E> {
            Ok(Meta::default())
        }
        fn visit_u64<E>(self, _: u64) -> Result<Meta, E> {
            Ok(Meta::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<Meta, E> {
            Ok(Meta::default())
        }
        fn visit_unit<E>(self) -> Result<Meta, E> {
            Ok(Meta::default())
        }
        fn visit_none<E>(self) -> Result<Meta, E> {
            Ok(Meta::default())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Meta, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(Meta::default())
        }
    }
    d.deserialize_any(V)
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

impl Entry {
    /// The audit record for this entry.
    pub fn record(mut self) -> AuditRecord {
        let connect = self.method == "CONNECT";
        let default_port = if connect || self.scheme == "https" {
            443
        } else {
            80
        };
        let (destination_host, destination_port) = host_port(&self.authority, default_port);
        let request_id = self
            .derived_key()
            .unwrap_or_else(|| std::mem::take(&mut self.request_id));
        let Entry {
            authz: a,
            ratelimit: rl,
            ..
        } = self;
        let (mut decision, mut reason, mut policy_id) = (a.decision, a.reason, a.policy_id);
        if self.rate_limited {
            decision = "deny".into();
            reason = "quota-exceeded".into();
            policy_id = rl.policy_id;
        } else if self.rate_limit_service_error {
            // As in the reply body: an outage, not a policy's decision.
            decision = "deny".into();
            reason = "ratelimit-unavailable".into();
            policy_id = String::new();
        } else if decision.is_empty() {
            // No verdict from authz: Envoy answered on its own (authz down or
            // timed out, or the request never reached the filters).
            decision = "deny".into();
            if self.authz_error || self.response_code == 503 {
                reason = "authz-unavailable".into();
            } else if reason.is_empty() {
                reason = "bad-request".into();
            }
        }
        let mut path = self.path;
        // The query string can carry secrets; the audit keeps the path only.
        if let Some(i) = path.find(['?', '#']) {
            path.truncate(i);
        }
        AuditRecord {
            kind: RecordKind::Request,
            seq: 0,
            timestamp: self.timestamp,
            request_id,
            agent_id: a.agent_id,
            team_id: a.team_id,
            project_id: a.project_id,
            environment: a.environment,
            destination_host,
            destination_port,
            http_method: self.method,
            path,
            decision,
            reason,
            policy_id,
            bundle_revision: a.bundle_revision,
            // From the RLS (quota_check: rls) or from authz (quota_check: authz).
            quota_applied: if rl.quota_applied.is_empty() {
                a.quota_applied
            } else {
                rl.quota_applied
            },
            response_code: self.response_code,
            latency_ms: self.latency_ms,
            bytes_out: self.bytes_out,
            bytes_in: self.bytes_in,
            source_address: self.source_address,
            shadow_decision: a.shadow_decision,
            shadow_policy_id: a.shadow_policy_id,
            // Set by the writer, which knows the predecessor.
            prev_hash: String::new(),
            actor: String::new(),
            detail: String::new(),
        }
    }

    /// The key the record is kept (and deduplicated) under when the request
    /// id cannot be: `None` keeps the request id. Envoy replaces an agent's
    /// `x-request-id` before its filters run, so an entry authz saw carries
    /// Envoy's own. A request Envoy refused before
    /// that (a malformed path, an unparseable header) keeps whatever the
    /// agent sent, or none: not an audit key (§3), since an agent could
    /// reuse a real request's id and have that record dropped as a
    /// duplicate. Such an entry is keyed by what Envoy logged of it
    /// instead, fields the access-log file and the gRPC stream render
    /// alike, so a replay of the file still deduplicates.
    fn derived_key(&self) -> Option<String> {
        if !self.authz.decision.is_empty() || self.authz_error {
            return None;
        }
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            self.timestamp.as_str(),
            &self.source_address,
            &self.authority,
            &self.response_code.to_string(),
            &self.request_id,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        Some(format!("envoy-local-{}", hex::encode(&h.finalize()[..16])))
    }

    /// From Envoy's gRPC access-log entry.
    pub fn from_proto(e: &HttpAccessLogEntry) -> Entry {
        let common = e.common_properties.as_ref();
        let req = e.request.as_ref();
        let resp = e.response.as_ref();
        let md = common.and_then(|c| c.metadata.as_ref());
        let meta = |ns: &str| Meta::from_struct(md.and_then(|m| m.filter_metadata.get(ns)));
        let flags = common.and_then(|c| c.response_flags.as_ref());
        Entry {
            timestamp: common
                .and_then(|c| c.start_time.as_ref())
                .map(|t| rfc3339_millis(t.seconds, t.nanos))
                .unwrap_or_default(),
            request_id: req.map(|r| r.request_id.clone()).unwrap_or_default(),
            method: req
                .and_then(|r| RequestMethod::try_from(r.request_method).ok())
                .filter(|m| *m != RequestMethod::MethodUnspecified)
                .map(|m| m.as_str_name().to_string())
                .unwrap_or_default(),
            scheme: req.map(|r| r.scheme.clone()).unwrap_or_default(),
            authority: req.map(|r| r.authority.clone()).unwrap_or_default(),
            path: req.map(|r| r.path.clone()).unwrap_or_default(),
            response_code: resp
                .and_then(|r| r.response_code.as_ref())
                .map(|c| c.value as u16)
                .unwrap_or(0),
            rate_limited: flags.is_some_and(|f| f.rate_limited),
            rate_limit_service_error: flags.is_some_and(|f| f.rate_limit_service_error),
            authz_error: flags.is_some_and(|f| f.unauthorized_details.is_some())
                && resp.is_some_and(|r| r.response_code_details == "ext_authz_error"),
            latency_ms: common
                .and_then(|c| {
                    c.duration
                        .as_ref()
                        .or(c.time_to_last_downstream_tx_byte.as_ref())
                })
                .map(|d| (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000)
                .unwrap_or(0),
            bytes_out: req
                .map(|r| r.request_headers_bytes + r.request_body_bytes)
                .unwrap_or(0),
            bytes_in: resp
                .map(|r| r.response_headers_bytes + r.response_body_bytes)
                .unwrap_or(0),
            source_address: common
                .and_then(|c| c.downstream_remote_address.as_ref())
                .and_then(|a| a.address.as_ref())
                .map(|a| match a {
                    address::Address::SocketAddress(s) => s.address.clone(),
                    address::Address::Pipe(p) => p.path.clone(),
                    _ => String::new(),
                })
                .unwrap_or_default(),
            authz: meta(AUTHZ_NS),
            ratelimit: meta(RATELIMIT_NS),
        }
    }

    /// From one line of Envoy's JSON access-log file (the format rendered
    /// into the bootstrap, see `envoy/bootstrap.yaml.tmpl`).
    pub fn from_json_line(line: &str) -> Result<Entry, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Line {
            #[serde(default)]
            timestamp: Option<String>,
            #[serde(default)]
            request_id: Option<String>,
            #[serde(default)]
            method: Option<String>,
            #[serde(default)]
            scheme: Option<String>,
            #[serde(default)]
            authority: Option<String>,
            #[serde(default)]
            path: Option<String>,
            #[serde(default, deserialize_with = "lenient_u64")]
            response_code: Option<u64>,
            #[serde(default)]
            response_flags: Option<String>,
            #[serde(default)]
            code_details: Option<String>,
            #[serde(default, deserialize_with = "lenient_u64")]
            duration_ms: Option<u64>,
            #[serde(default, deserialize_with = "lenient_u64")]
            request_header_bytes: Option<u64>,
            #[serde(default, deserialize_with = "lenient_u64")]
            bytes_received: Option<u64>,
            #[serde(default, deserialize_with = "lenient_u64")]
            response_header_bytes: Option<u64>,
            #[serde(default, deserialize_with = "lenient_u64")]
            bytes_sent: Option<u64>,
            #[serde(default)]
            source_address: Option<String>,
            #[serde(default, deserialize_with = "lenient_meta")]
            authz: Meta,
            #[serde(default, deserialize_with = "lenient_meta")]
            ratelimit: Meta,
        }
        let l: Line = serde_json::from_str(line)?;
        let flags = l.response_flags.unwrap_or_default();
        let has = |f: &str| flags.split(',').any(|x| x == f);
        let code_details = l.code_details.unwrap_or_default();
        Ok(Entry {
            timestamp: l.timestamp.unwrap_or_default(),
            request_id: l.request_id.unwrap_or_default(),
            method: l.method.unwrap_or_default(),
            scheme: l.scheme.unwrap_or_default(),
            authority: l.authority.unwrap_or_default(),
            path: l.path.unwrap_or_default(),
            response_code: l.response_code.map(|c| c as u16).unwrap_or(0),
            rate_limited: has("RL"),
            rate_limit_service_error: has("RLSE"),
            // HTTP lines say why ext_authz refused; the transparent
            // listener's TLS lines carry no details, and a refusal by authz
            // itself always comes with its metadata: UAEX without it there
            // means authz did not answer.
            authz_error: has("UAEX")
                && (code_details == "ext_authz_error"
                    || (code_details.is_empty() && l.response_code == Some(0))),
            latency_ms: l.duration_ms.unwrap_or(0),
            bytes_out: l.request_header_bytes.unwrap_or(0) + l.bytes_received.unwrap_or(0),
            bytes_in: l.response_header_bytes.unwrap_or(0) + l.bytes_sent.unwrap_or(0),
            source_address: l.source_address.unwrap_or_default(),
            authz: l.authz,
            ratelimit: l.ratelimit,
        })
    }
}

/// A number Envoy may render as a JSON number, a string, or `null`/"-".
fn lenient_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::Deserialize;
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    })
}

/// Envoy's gRPC entry straight to a record.
pub fn record_from_entry(e: &HttpAccessLogEntry) -> AuditRecord {
    Entry::from_proto(e).record()
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

    /// The transparent listener's TLS lines (no HTTP status, no details).
    #[test]
    fn tls_connection_lines() {
        let line = |flags: &str, authz: &str| {
            format!(
                r#"{{"timestamp":"2026-11-23T10:00:00.000Z","request_id":"tls-1-7","method":"","scheme":"https","authority":"example.com:443","path":"","response_code":0,"response_flags":"{flags}","duration_ms":"12","bytes_received":"517","bytes_sent":"4000","source_address":"10.20.0.2","authz":{authz}}}"#
            )
        };
        let allow =
            r#"{"decision":"allow","agent_id":"vm","policy_id":"p","reason":"policy-allow"}"#;
        let r = Entry::from_json_line(&line("-", allow))
            .expect("parses")
            .record();
        assert_eq!(
            (
                r.destination_host.as_str(),
                r.destination_port,
                r.decision.as_str()
            ),
            ("example.com", 443, "allow")
        );
        assert_eq!((r.bytes_out, r.bytes_in, r.response_code), (517, 4000, 0));
        let deny = r#"{"decision":"deny","agent_id":"vm","policy_id":"default-deny","reason":"default-deny"}"#;
        let r = Entry::from_json_line(&line("UAEX", deny))
            .expect("parses")
            .record();
        assert_eq!(
            (r.decision.as_str(), r.reason.as_str()),
            ("deny", "default-deny")
        );
        // authz did not answer: no metadata, UAEX.
        let r = Entry::from_json_line(&line("UAEX", "null"))
            .expect("parses")
            .record();
        assert_eq!(
            (r.decision.as_str(), r.reason.as_str()),
            ("deny", "authz-unavailable")
        );
    }

    /// A request Envoy refused before authz saw it keeps the agent's
    /// `x-request-id` (or none): the record is keyed by what Envoy logged,
    /// the same from the file and the gRPC stream, never by the agent's id.
    #[test]
    fn an_id_authz_never_saw_is_not_the_audit_key() {
        let line = |ts: &str, id: &str, authz: &str| {
            format!(
                r#"{{"timestamp":"{ts}","request_id":{id},"method":"GET","scheme":"http","authority":"127.0.0.1:8080","path":"?/x","response_code":404,"response_flags":"NR","source_address":"127.0.0.1","authz":{authz}}}"#
            )
        };
        let key = |l: String| {
            Entry::from_json_line(&l)
                .expect("parses")
                .record()
                .request_id
        };
        let victim = r#""0f1e2d3c-real-request""#;
        let forged = key(line("2026-12-03T08:00:00.000Z", victim, "null"));
        assert!(forged.starts_with("envoy-local-"), "{forged}");
        assert_ne!(forged, "0f1e2d3c-real-request");
        // Another such request, or one with no id at all: another key.
        assert_ne!(
            key(line("2026-12-03T08:00:00.001Z", victim, "null")),
            forged
        );
        let none = key(line("2026-12-03T08:00:00.000Z", "null", "null"));
        assert_ne!(none, forged);
        assert!(none.starts_with("envoy-local-"), "{none}");
        // Seen by authz: Envoy's id, as it was.
        assert_eq!(
            key(line(
                "2026-12-03T08:00:00.000Z",
                victim,
                r#"{"decision":"deny"}"#
            )),
            "0f1e2d3c-real-request"
        );
        // The same request from the gRPC stream: the same key, so a replay
        // of the file after a gap still deduplicates.
        let proto = HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                start_time: Some(Timestamp {
                    seconds: 1_796_284_800,
                    nanos: 0,
                }),
                downstream_remote_address: Some(
                    envoy_types::pb::envoy::config::core::v3::Address {
                        address: Some(address::Address::SocketAddress(
                            envoy_types::pb::envoy::config::core::v3::SocketAddress {
                                address: "127.0.0.1".into(),
                                ..Default::default()
                            },
                        )),
                    },
                ),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_id: "0f1e2d3c-real-request".into(),
                authority: "127.0.0.1:8080".into(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: 404 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(record_from_entry(&proto).request_id, forged);
    }

    /// The key-by-key format (`access_log_file.yaml.tmpl`): unset keys are
    /// `null`; whole-Struct lines from an older Envoy config still read.
    #[test]
    fn metadata_key_by_key_and_whole() {
        let line = |authz: &str, rl: &str| {
            format!(
                r#"{{"timestamp":"2026-12-02T10:00:00.000Z","request_id":"r1","method":"GET","scheme":"http","authority":"example.com","path":"/a?token=x","response_code":200,"response_flags":"-","authz":{authz},"ratelimit":{rl}}}"#
            )
        };
        let keyed = r#"{"agent_id":"bot","team_id":"infra","project_id":null,"environment":null,"auth_type":"api_key","policy_id":"p","bundle_revision":"7","reason":"policy-allow","decision":"allow","shadow_decision":null,"shadow_policy_id":null,"quota_applied":"agent:bot=hard_stop"}"#;
        let r = Entry::from_json_line(&line(keyed, r#"{"policy_id":null,"quota_applied":null}"#))
            .expect("parses")
            .record();
        assert_eq!(
            (
                r.agent_id.as_str(),
                r.team_id.as_str(),
                r.project_id.as_str(),
                r.decision.as_str(),
                r.bundle_revision.as_str(),
                r.quota_applied.as_str(),
                r.path.as_str()
            ),
            (
                "bot",
                "infra",
                "",
                "allow",
                "7",
                "agent:bot=hard_stop",
                "/a"
            )
        );
        // The rate-limit filter's verdict wins over authz's.
        let r = Entry::from_json_line(&line(
            keyed,
            r#"{"policy_id":"q","quota_applied":"agent:bot=alert_only:exceeded","extra":[1,{"x":2}]}"#,
        ))
        .expect("parses")
        .record();
        assert_eq!(r.quota_applied, "agent:bot=alert_only:exceeded");
        // Whole Struct (older config), a non-string value, "-" and null.
        let whole = r#"{"agent_id":"bot","decision":"allow","reason":"policy-allow","team_id":5}"#;
        let r = Entry::from_json_line(&line(whole, r#""-""#))
            .expect("parses")
            .record();
        assert_eq!(
            (r.agent_id.as_str(), r.team_id.as_str(), r.decision.as_str()),
            ("bot", "", "allow")
        );
        let r = Entry::from_json_line(&line("null", "null"))
            .expect("parses")
            .record();
        assert_eq!(
            (r.decision.as_str(), r.reason.as_str()),
            ("deny", "bad-request")
        );
        // Not JSON at all is an error, not a record.
        assert!(Entry::from_json_line("{\"authz\":").is_err());
    }
}
