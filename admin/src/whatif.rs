//! "What does this request get?": a sample request (agent, method, URL)
//! decided against a policy document exactly as authz's Check decides it
//! (`PolicySet::decide`), so an operator can see the effect of the
//! candidate before committing it. Node settings are not in the document:
//! `gateway.private_destinations_allowed` and quotas are not applied here.

use clawgress_policy::config::AgentStatus;
use clawgress_policy::{Identity, PolicyDocument, PolicySet, Reason};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// An agent listed in the document.
    pub agent_id: String,
    /// For `http://` URLs (default GET); `https://` is a CONNECT tunnel,
    /// where method and path are invisible.
    #[serde(default)]
    pub method: Option<String>,
    /// `http://host[:port]/path` or `https://host[:port]/…`.
    pub url: String,
}

/// Why a sample cannot be evaluated at all (the caller's mistake).
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("url {0:?}: use http://host[:port]/path or https://host[:port]/")]
    Url(String),
    #[error("method {0:?}: one HTTP method token, e.g. GET")]
    Method(String),
}

/// The request as Envoy would put it to authz.
struct Request {
    authority: String,
    method: String,
    path: String,
    connect: bool,
}

fn request(s: &Sample) -> Result<Request, SampleError> {
    let (connect, rest) = if let Some(r) = s.url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = s.url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(SampleError::Url(s.url.clone()));
    };
    let cut = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(SampleError::Url(s.url.clone()));
    }
    let method = match (&s.method, connect) {
        (_, true) => "CONNECT".to_string(),
        (None, false) => "GET".to_string(),
        (Some(m), false) => {
            let m = m.trim().to_ascii_uppercase();
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(SampleError::Method(m));
            }
            m
        }
    };
    Ok(Request {
        authority: authority.to_string(),
        method,
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        connect,
    })
}

/// The decision `doc` (at `revision`) gives `s`, as JSON: decision, reason,
/// policy_id, the status the agent would see, the hint, and shadow.
pub fn evaluate(doc: &PolicyDocument, revision: &str, s: &Sample) -> Result<Value, SampleError> {
    let r = request(s)?;
    let answer = |allow: bool, reason: Reason, policy_id: &str, shadow: Value| {
        json!({
            "decision": if allow { "allow" } else { "deny" },
            "reason": reason.code(),
            "policy_id": policy_id,
            "status": reason.http_status(),
            "hint": reason.hint(),
            "shadow": shadow,
            "revision": revision,
            "request": {"method": r.method, "authority": r.authority, "path": if r.connect { "" } else { r.path.as_str() }},
        })
    };
    let Some(agent) = doc
        .agents
        .iter()
        .find(|a| a.agent_id.as_str() == s.agent_id)
    else {
        return Ok(answer(false, Reason::InvalidCredentials, "", Value::Null));
    };
    if agent.status == AgentStatus::Disabled {
        return Ok(answer(false, Reason::AgentDisabled, "", Value::Null));
    }
    let identity = Identity {
        agent_id: agent.agent_id.as_str().to_string(),
        team_id: agent.team_id.clone(),
        project_id: agent.project_id.clone(),
        environment: agent.environment.clone(),
        auth_type: agent.auth_type,
    };
    let set = PolicySet::new(doc, &[], revision);
    let d = set.decide(&identity, &r.authority, &r.method, &r.path, r.connect);
    let shadow = d.shadow.as_ref().map_or(Value::Null, |sh| {
        json!({"decision": if sh.allow { "allow" } else { "deny" }, "policy_id": sh.policy_id})
    });
    Ok(answer(d.allow, d.reason, &d.policy_id, shadow))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{
      "agents": [
        {"agent_id": "bot", "team_id": "infra", "auth_type": "api_key", "api_key_sha256": "0000000000000000000000000000000000000000000000000000000000000000"},
        {"agent_id": "off", "auth_type": "api_key", "status": "disabled", "api_key_sha256": "0000000000000000000000000000000000000000000000000000000000000000"}
      ],
      "policies": [
        {"policy_id": "pypi", "priority": 10, "match": {"identity": {"team_id": "infra"}, "destination": {"hosts": ["pypi.org"], "ports": [443]}}, "action": "allow"},
        {"policy_id": "api-get", "priority": 20, "match": {"destination": {"hosts": ["api.example.com"]}, "method": ["GET"], "path_prefix": "/v1/"}, "action": "allow"}
      ]
    }"#;

    fn ask(agent: &str, method: Option<&str>, url: &str) -> Value {
        let doc = PolicyDocument::from_json(DOC).expect("doc");
        evaluate(
            &doc,
            "7",
            &Sample {
                agent_id: agent.into(),
                method: method.map(str::to_string),
                url: url.into(),
            },
        )
        .expect("evaluates")
    }

    #[test]
    fn samples_get_what_check_would_give() {
        let v = ask("bot", None, "https://pypi.org/simple/");
        assert_eq!(
            (v["decision"].as_str(), v["policy_id"].as_str()),
            (Some("allow"), Some("pypi"))
        );
        assert_eq!(v["request"]["method"], "CONNECT");
        // A path rule never grants a tunnel; over plain HTTP it does.
        assert_eq!(
            ask("bot", None, "https://api.example.com/v1/x")["reason"],
            "default-deny"
        );
        assert_eq!(
            ask("bot", Some("get"), "http://api.example.com/v1/x")["decision"],
            "allow"
        );
        // The path is normalised as the origin sees it.
        assert_eq!(
            ask("bot", None, "http://api.example.com/v1/../admin")["decision"],
            "deny"
        );
        assert_eq!(
            ask("bot", Some("POST"), "http://api.example.com/v1/x")["decision"],
            "deny"
        );
        assert_eq!(
            ask("bot", None, "http://169.254.169.254/")["reason"],
            "private-destination"
        );
        assert_eq!(
            ask("off", None, "https://pypi.org/")["reason"],
            "agent-disabled"
        );
        assert_eq!(ask("ghost", None, "https://pypi.org/")["status"], 403);
        assert_eq!(
            ask("bot", None, "http://[::1/")["reason"],
            "malformed-destination"
        );
    }

    #[test]
    fn bad_samples_are_the_callers_error() {
        let doc = PolicyDocument::from_json(DOC).expect("doc");
        for (m, url) in [
            (None, "ftp://x/"),
            (None, "pypi.org"),
            (None, "https:///x"),
            (Some("G T"), "http://a/"),
        ] {
            let s = Sample {
                agent_id: "bot".into(),
                method: m.map(str::to_string),
                url: url.into(),
            };
            assert!(evaluate(&doc, "1", &s).is_err(), "{url}");
        }
    }
}
