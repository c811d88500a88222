//! Who is asking: agents from the policy document, and the credentials an
//! agent presents in `Proxy-Authorization` (DESIGN.md §3).

use std::collections::HashMap;

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Agent, AgentStatus, AuthType, PolicyDocument};

/// The identity a decision is made for, as it travels in dynamic metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    pub team_id: String,
    pub project_id: String,
    pub environment: String,
    pub auth_type: AuthType,
}

impl Identity {
    fn of(agent: &Agent) -> Identity {
        Identity {
            agent_id: agent.agent_id.as_str().to_string(),
            team_id: agent.team_id.clone(),
            project_id: agent.project_id.clone(),
            environment: agent.environment.clone(),
            auth_type: agent.auth_type,
        }
    }
}

/// Why a request has no usable identity. The first two answer 407 (send
/// credentials), the rest 403 (these credentials will not do).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no Proxy-Authorization credentials")]
    Missing,
    #[error("Proxy-Authorization could not be parsed")]
    Malformed,
    #[error("unknown agent or wrong key")]
    Invalid,
    #[error("bearer tokens are not accepted: no JWT issuer is configured")]
    JwtNotConfigured,
    #[error("agent is disabled")]
    Disabled(Identity),
}

/// Largest `Proxy-Authorization` value looked at (DESIGN.md §3 caps tokens at
/// 8 KiB; a Basic header is far smaller).
const MAX_CREDENTIAL_BYTES: usize = 8 * 1024;

/// API-key agents by id, ready for constant-time key checks.
#[derive(Debug, Default)]
pub struct AgentDirectory {
    by_id: HashMap<String, Entry>,
    /// `source_ip` agents' ranges, most specific first.
    by_source: Vec<(ipnet::IpNet, String)>,
}

#[derive(Debug)]
struct Entry {
    identity: Identity,
    key_sha256: Option<[u8; 32]>,
    disabled: bool,
}

impl AgentDirectory {
    pub fn new(doc: &PolicyDocument) -> AgentDirectory {
        let by_id = doc
            .agents
            .iter()
            .map(|a| {
                (
                    a.agent_id.as_str().to_string(),
                    Entry {
                        identity: Identity::of(a),
                        key_sha256: a.api_key_sha256.as_ref().map(|h| h.bytes()),
                        disabled: a.status == AgentStatus::Disabled,
                    },
                )
            })
            .collect();
        let mut by_source: Vec<(ipnet::IpNet, String)> = doc
            .agents
            .iter()
            .filter(|a| a.auth_type == AuthType::SourceIp)
            .flat_map(|a| {
                a.source_cidrs
                    .iter()
                    .map(|n| (n.trunc(), a.agent_id.as_str().to_string()))
            })
            .collect();
        by_source.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        AgentDirectory { by_id, by_source }
    }

    /// The `source_ip` agent whose range holds `addr` (the most specific
    /// range wins), for requests that bring no credentials (§3 transparent
    /// mode). An IPv4-mapped IPv6 address is judged as its IPv4 address.
    pub fn by_source_address(&self, addr: std::net::IpAddr) -> Option<Result<Identity, AuthError>> {
        let addr = match addr {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(addr),
            v4 => v4,
        };
        let (_, id) = self.by_source.iter().find(|(net, _)| net.contains(&addr))?;
        let e = self.by_id.get(id)?;
        Some(if e.disabled {
            Err(AuthError::Disabled(e.identity.clone()))
        } else {
            Ok(e.identity.clone())
        })
    }

    /// A listed agent's auth type and whether it is disabled.
    pub fn listing(&self, agent_id: &str) -> Option<(AuthType, bool)> {
        self.by_id
            .get(agent_id)
            .map(|e| (e.identity.auth_type, e.disabled))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Resolve a `Proxy-Authorization` header value (None: header absent).
    pub fn authenticate(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let value = match header {
            None => return Err(AuthError::Missing),
            Some(v) if v.trim().is_empty() => return Err(AuthError::Missing),
            Some(v) if v.len() > MAX_CREDENTIAL_BYTES => return Err(AuthError::Malformed),
            Some(v) => v.trim(),
        };
        let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Malformed)?;
        if scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::JwtNotConfigured);
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(AuthError::Malformed);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .map_err(|_| AuthError::Malformed)?;
        let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Malformed)?;
        let (agent_id, key) = decoded.split_once(':').ok_or(AuthError::Malformed)?;
        if agent_id.is_empty() || key.is_empty() {
            return Err(AuthError::Malformed);
        }
        self.check_key(agent_id, key)
    }

    fn check_key(&self, agent_id: &str, key: &str) -> Result<Identity, AuthError> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let entry = self.by_id.get(agent_id);
        // Compare against something even for unknown agents so that timing
        // does not tell which agent ids exist.
        let stored = entry
            .filter(|e| e.identity.auth_type == AuthType::ApiKey)
            .and_then(|e| e.key_sha256)
            .unwrap_or([0u8; 32]);
        let equal: bool = presented.ct_eq(&stored).into();
        match entry {
            Some(e) if equal && e.key_sha256.is_some() => {
                if e.disabled {
                    Err(AuthError::Disabled(e.identity.clone()))
                } else {
                    Ok(e.identity.clone())
                }
            }
            _ => Err(AuthError::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Document;

    #[test]
    fn source_ranges_bind_identities_most_specific_first() {
        let doc = Document::from_yaml(
            "agents:\n  - {agent_id: lab, team_id: research, auth_type: source_ip, source_cidrs: [10.20.0.0/16]}\n  - {agent_id: gpu, auth_type: source_ip, source_cidrs: [10.20.5.0/24, \"fd00::/64\"]}\n  - {agent_id: off, auth_type: source_ip, status: disabled, source_cidrs: [192.168.1.0/24]}\n",
        )
        .expect("valid");
        let d = AgentDirectory::new(&doc.policy());
        let who = |a: &str| {
            d.by_source_address(a.parse().expect("ip"))
                .map(|r| r.map(|i| i.agent_id))
        };
        assert_eq!(who("10.20.1.1"), Some(Ok("lab".into())));
        assert_eq!(who("10.20.5.9"), Some(Ok("gpu".into())));
        assert_eq!(who("::ffff:10.20.5.9"), Some(Ok("gpu".into())));
        assert_eq!(who("fd00::1"), Some(Ok("gpu".into())));
        assert_eq!(who("10.21.0.1"), None);
        assert!(matches!(
            who("192.168.1.5"),
            Some(Err(AuthError::Disabled(_)))
        ));
        assert_eq!(d.listing("lab"), Some((AuthType::SourceIp, false)));
    }

    fn dir() -> AgentDirectory {
        let yaml = format!(
            "agents:\n  - {{agent_id: a, team_id: t, auth_type: api_key, api_key_sha256: \"{}\"}}\n  - {{agent_id: off, auth_type: api_key, status: disabled, api_key_sha256: \"{}\"}}\n",
            crate::config::KeyHash::of_key("k1").as_str(),
            crate::config::KeyHash::of_key("k2").as_str()
        );
        AgentDirectory::new(&Document::from_yaml(&yaml).expect("valid").policy())
    }

    fn basic(s: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    }

    #[test]
    fn basic_credentials() {
        let d = dir();
        let id = d.authenticate(Some(&basic("a:k1"))).expect("valid");
        assert_eq!((id.agent_id.as_str(), id.team_id.as_str()), ("a", "t"));
        assert_eq!(
            d.authenticate(Some(&basic("a:k2"))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            d.authenticate(Some(&basic("nobody:k1"))),
            Err(AuthError::Invalid)
        );
        assert!(matches!(
            d.authenticate(Some(&basic("off:k2"))),
            Err(AuthError::Disabled(_))
        ));
        // Key with a colon: only the first colon splits.
        assert_eq!(
            d.authenticate(Some(&basic("a:k1:x"))),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn missing_and_malformed() {
        let d = dir();
        assert_eq!(d.authenticate(None), Err(AuthError::Missing));
        assert_eq!(d.authenticate(Some("")), Err(AuthError::Missing));
        for bad in [
            "Basic",
            "Basic !!!",
            "Digest abc",
            "Basic YWJj",
            &basic(":k1"),
            &basic("a:"),
        ] {
            assert_eq!(
                d.authenticate(Some(bad)),
                Err(AuthError::Malformed),
                "{bad}"
            );
        }
        let huge = format!("Basic {}", "A".repeat(9000));
        assert_eq!(d.authenticate(Some(&huge)), Err(AuthError::Malformed));
        assert_eq!(
            d.authenticate(Some("Bearer x.y.z")),
            Err(AuthError::JwtNotConfigured)
        );
    }
}
