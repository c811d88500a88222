//! Deterministic policy evaluation (DESIGN.md §3, §4).
//!
//! Among enabled, enforcing policies that match, the lowest `priority` wins;
//! on a tie `deny` beats `allow`; then the smaller `policy_id`. The policies
//! are sorted once in that order when the set is built, so evaluation is the
//! first match. Nothing matching is a deny named `default-deny`.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{Action, FieldMatch, HostPattern, Policy, PolicyDocument, PolicyMode};
use crate::destination::{guarded_range, is_guarded_name, Destination, Host};
use crate::identity::Identity;

/// The `policy_id` of the implicit final rule.
pub const DEFAULT_DENY: &str = "default-deny";

/// Why a bearer token was refused: each names the check that failed, never
/// the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFailure {
    TooLarge,
    Malformed,
    UnknownIssuer,
    AlgorithmNotAllowed,
    UnknownKey,
    BadSignature,
    Expired,
    MissingExp,
    NotYetValid,
    IssuedInFuture,
    WrongAudience,
    BadType,
    CriticalHeader,
    MissingAgentClaim,
    /// A registered claim of the wrong JSON type (`exp: "1796…"`,
    /// `nbf: null`): a JWT, but not an acceptable one (403, not 407).
    InvalidClaim,
}

impl TokenFailure {
    pub fn code(self) -> &'static str {
        match self {
            TokenFailure::TooLarge => "token-too-large",
            TokenFailure::Malformed => "token-malformed",
            TokenFailure::UnknownIssuer => "token-unknown-issuer",
            TokenFailure::AlgorithmNotAllowed => "token-algorithm-not-allowed",
            TokenFailure::UnknownKey => "token-unknown-key",
            TokenFailure::BadSignature => "token-bad-signature",
            TokenFailure::Expired => "token-expired",
            TokenFailure::MissingExp => "token-missing-exp",
            TokenFailure::NotYetValid => "token-not-yet-valid",
            TokenFailure::IssuedInFuture => "token-issued-in-future",
            TokenFailure::WrongAudience => "token-wrong-audience",
            TokenFailure::BadType => "token-bad-type",
            TokenFailure::CriticalHeader => "token-critical-header",
            TokenFailure::MissingAgentClaim => "token-missing-agent-claim",
            TokenFailure::InvalidClaim => "token-invalid-claim",
        }
    }
}

/// Stable machine codes an agent can act on (§3 `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A bearer token failed a check.
    Token(TokenFailure),
    PolicyAllow,
    PolicyDeny,
    DefaultDeny,
    PrivateDestination,
    MalformedDestination,
    MalformedPath,
    MissingCredentials,
    MalformedCredentials,
    InvalidCredentials,
    JwtNotConfigured,
    AgentDisabled,
    QuotaExceeded,
    /// `quota_check: authz` and the counter store failed (fail closed).
    RatelimitUnavailable,
    /// The audit sink cannot record (storage full): nothing is let through.
    AuditUnavailable,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::Token(f) => f.code(),
            Reason::PolicyAllow => "policy-allow",
            Reason::PolicyDeny => "policy-deny",
            Reason::DefaultDeny => "default-deny",
            Reason::PrivateDestination => "private-destination",
            Reason::MalformedDestination => "malformed-destination",
            Reason::MalformedPath => "malformed-path",
            Reason::MissingCredentials => "missing-credentials",
            Reason::MalformedCredentials => "malformed-credentials",
            Reason::InvalidCredentials => "invalid-credentials",
            Reason::JwtNotConfigured => "jwt-not-configured",
            Reason::AgentDisabled => "agent-disabled",
            Reason::QuotaExceeded => "quota-exceeded",
            Reason::RatelimitUnavailable => "ratelimit-unavailable",
            Reason::AuditUnavailable => "audit-unavailable",
        }
    }

    /// One plain sentence on what would make the request allowed: which
    /// operator action, never how to get around the gateway.
    pub fn hint(self) -> &'static str {
        match self {
            Reason::PolicyAllow => "",
            Reason::Token(TokenFailure::TooLarge) => "The token is larger than 8 KiB; ask the issuer for a smaller token.",
            Reason::Token(TokenFailure::Malformed) => "The bearer token could not be parsed as a JWT; send Proxy-Authorization: Bearer <JWT>.",
            Reason::Token(TokenFailure::InvalidClaim) => "A claim of the token (exp, nbf, iat, iss or aud) has the wrong type; ask the issuer for a standard JWT (RFC 7519).",
            Reason::Token(TokenFailure::Expired | TokenFailure::NotYetValid | TokenFailure::IssuedInFuture) => "The token is not valid at this time; get a fresh token from the issuer (and check the agent's clock).",
            Reason::Token(_) => "The token was not accepted; get a token from an issuer the gateway operator has configured.",
            Reason::PolicyDeny => "A policy denies this destination for this agent; ask the gateway operator to change that policy if the access is needed.",
            Reason::DefaultDeny => "No policy allows this destination for this agent; ask the gateway operator to add an allow policy for it.",
            Reason::PrivateDestination => "Private, loopback, link-local and metadata addresses are blocked; only the operator can allow a specific private range.",
            Reason::MalformedDestination => "The destination host or port is malformed or ambiguous; use a plain host name or a dotted-quad address.",
            Reason::MalformedPath => "The request path is ambiguous (encoded slashes, backslashes, control characters or bad escapes); send a plain path.",
            Reason::MissingCredentials => "The proxy needs credentials: use a proxy URL of the form http://AGENT_ID:API_KEY@gateway:port.",
            Reason::MalformedCredentials => "The Proxy-Authorization header could not be parsed; use a proxy URL of the form http://AGENT_ID:API_KEY@gateway:port.",
            Reason::InvalidCredentials => "The agent id or key is not valid; ask the gateway operator for a current key.",
            Reason::JwtNotConfigured => "This gateway accepts no bearer tokens; ask the operator for an API key or to configure a JWT issuer.",
            Reason::AgentDisabled => "This agent is disabled; ask the gateway operator to re-enable it.",
            Reason::QuotaExceeded => "This agent is over its request quota; wait for the Retry-After period or ask the operator to raise the quota.",
            Reason::RatelimitUnavailable => "The gateway's rate-limit store is unavailable; retry later or contact the operator.",
            Reason::AuditUnavailable => "The gateway cannot record requests right now (audit storage is full); retry later, the operator has been alerted.",
        }
    }

    /// The HTTP status an agent gets for this reason.
    pub fn http_status(self) -> u16 {
        match self {
            Reason::PolicyAllow => 200,
            Reason::MissingCredentials
            | Reason::MalformedCredentials
            | Reason::Token(TokenFailure::Malformed) => 407,
            Reason::QuotaExceeded => 429,
            Reason::RatelimitUnavailable => 503,
            Reason::AuditUnavailable => 503,
            _ => 403,
        }
    }
}

/// The facts of one request, already normalised.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub identity: &'a Identity,
    pub destination: &'a Destination,
    /// As sent; method rules match it whatever its case.
    pub method: &'a str,
    /// Normalised path ([`crate::normalise_path`]); ignored for CONNECT.
    pub path: &'a str,
    /// A CONNECT tunnel: method and path are invisible inside it.
    pub connect: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub policy_id: String,
    pub reason: Reason,
    /// What the first matching shadow policy would have decided.
    pub shadow: Option<ShadowDecision>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowDecision {
    pub allow: bool,
    pub policy_id: String,
}

impl Decision {
    pub fn deny(policy_id: &str, reason: Reason) -> Decision {
        Decision {
            allow: false,
            policy_id: policy_id.to_string(),
            reason,
            shadow: None,
        }
    }
}

/// Policies compiled for evaluation under one bundle revision.
#[derive(Debug, Default)]
pub struct PolicySet {
    enforced: Vec<Policy>,
    enforced_index: Index,
    shadow: Vec<Policy>,
    shadow_index: Index,
    private_allowed: Vec<IpNet>,
    revision: String,
}

/// Which policies can match a host, so that Check looks at a handful of
/// candidates instead of every policy. Values are positions in the
/// precedence-sorted policy list, so the first candidate that fully matches
/// is the winner, exactly as a scan in order would find it.
#[derive(Debug, Default)]
struct Index {
    exact: HashMap<String, Bucket>,
    /// Keyed by the suffix with its leading dot (`.pythonhosted.org`).
    suffix: HashMap<String, Bucket>,
    /// `*`: any name, any public address.
    any: Bucket,
    /// CIDRs by prefix length, keyed by their network address: an address
    /// is looked up once per distinct prefix length (a few), not compared
    /// with every CIDR of the set.
    nets_v4: Vec<(u8, HashMap<u32, Bucket>)>,
    nets_v6: Vec<(u8, HashMap<u128, Bucket>)>,
}

/// The policies of one host key, split by whom they name: a fleet's many
/// per-agent (or per-team) rules on one popular host, or on `*`, are then
/// looked at only for that agent (or team), not for everyone.
#[derive(Debug, Default)]
struct Bucket {
    /// Policies naming agents (`match.identity.agent_id`: value or list).
    agents: HashMap<String, Vec<u32>>,
    /// Policies naming teams but any agent.
    teams: HashMap<String, Vec<u32>>,
    /// The rest: anyone may match, as far as the index knows.
    all: Vec<u32>,
}

impl Bucket {
    fn push(&mut self, i: u32, p: &Policy) {
        match (&p.match_.identity.agent_id, &p.match_.identity.team_id) {
            (FieldMatch::OneOf(agents), _) => {
                for a in agents {
                    self.agents.entry(a.clone()).or_default().push(i);
                }
            }
            (FieldMatch::Any, FieldMatch::OneOf(teams)) => {
                for t in teams {
                    self.teams.entry(t.clone()).or_default().push(i);
                }
            }
            (FieldMatch::Any, FieldMatch::Any) => self.all.push(i),
        }
    }

    fn extend_into(&self, out: &mut Vec<u32>, who: &Identity) {
        out.extend_from_slice(&self.all);
        if let Some(v) = self.agents.get(&who.agent_id) {
            out.extend_from_slice(v);
        }
        if let Some(v) = self.teams.get(&who.team_id) {
            out.extend_from_slice(v);
        }
    }
}

fn mask_v4(a: u32, len: u8) -> u32 {
    match len {
        0 => 0,
        l => a & (u32::MAX << (32 - u32::from(l.min(32)))),
    }
}

fn mask_v6(a: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l => a & (u128::MAX << (128 - u32::from(l.min(128)))),
    }
}

fn net_slot<K: std::hash::Hash + Eq>(
    by_len: &mut Vec<(u8, HashMap<K, Bucket>)>,
    len: u8,
    key: K,
) -> &mut Bucket {
    let at = match by_len.iter().position(|(l, _)| *l == len) {
        Some(at) => at,
        None => {
            by_len.push((len, HashMap::new()));
            by_len.len() - 1
        }
    };
    by_len[at].1.entry(key).or_default()
}

impl Index {
    fn build(policies: &[Policy]) -> Index {
        let mut idx = Index::default();
        for (i, p) in policies.iter().enumerate() {
            let i = i as u32;
            for h in &p.match_.destination.hosts {
                let bucket = match h {
                    HostPattern::Exact(n) => idx.exact.entry(n.clone()).or_default(),
                    HostPattern::Suffix(s) => idx.suffix.entry(s.clone()).or_default(),
                    HostPattern::Any => &mut idx.any,
                    HostPattern::Net(IpNet::V4(n)) => net_slot(
                        &mut idx.nets_v4,
                        n.prefix_len(),
                        mask_v4(u32::from(n.network()), n.prefix_len()),
                    ),
                    HostPattern::Net(IpNet::V6(n)) => net_slot(
                        &mut idx.nets_v6,
                        n.prefix_len(),
                        mask_v6(u128::from(n.network()), n.prefix_len()),
                    ),
                };
                bucket.push(i, p);
            }
        }
        idx
    }

    /// Candidate positions for `host` and `who`, ascending, without
    /// duplicates: every policy that could match, and no policy that names
    /// only other agents or teams.
    fn candidates(&self, host: &Host, who: &Identity) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        match host {
            Host::Name(n) => {
                if let Some(b) = self.exact.get(n) {
                    b.extend_into(&mut out, who);
                }
                // Every proper suffix starting at a dot: "a.b.c" → ".b.c", ".c".
                for (pos, _) in n.match_indices('.') {
                    if let Some(b) = self.suffix.get(&n[pos..]) {
                        b.extend_into(&mut out, who);
                    }
                }
            }
            Host::Ip(IpAddr::V4(a)) => {
                let a = u32::from(*a);
                for (len, m) in &self.nets_v4 {
                    if let Some(b) = m.get(&mask_v4(a, *len)) {
                        b.extend_into(&mut out, who);
                    }
                }
            }
            Host::Ip(IpAddr::V6(a)) => {
                let a = u128::from(*a);
                for (len, m) in &self.nets_v6 {
                    if let Some(b) = m.get(&mask_v6(a, *len)) {
                        b.extend_into(&mut out, who);
                    }
                }
            }
        }
        self.any.extend_into(&mut out, who);
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl PolicySet {
    pub fn new(doc: &PolicyDocument, private_allowed: &[IpNet], revision: &str) -> PolicySet {
        let mut enabled: Vec<Policy> = doc.policies.iter().filter(|p| p.enabled).cloned().collect();
        enabled.extend(crate::profiles::policies(doc));
        enabled.sort_by(|a, b| {
            (a.priority, a.action, &a.policy_id).cmp(&(b.priority, b.action, &b.policy_id))
        });
        let (shadow, enforced): (Vec<Policy>, Vec<Policy>) = enabled
            .into_iter()
            .partition(|p| p.mode == PolicyMode::Shadow);
        PolicySet {
            enforced_index: Index::build(&enforced),
            shadow_index: Index::build(&shadow),
            enforced,
            shadow,
            private_allowed: private_allowed.to_vec(),
            revision: revision.to_string(),
        }
    }

    /// The bundle revision decisions are made under.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// What an identified agent's request gets: the destination parsed
    /// (default port 443 for CONNECT, 80 otherwise) and the path normalised
    /// as the origin server will see it, then [`PolicySet::evaluate`].
    /// authz's Check and the console's "what does this request get?" both
    /// decide here.
    pub fn decide(
        &self,
        identity: &Identity,
        authority: &str,
        method: &str,
        raw_path: &str,
        connect: bool,
    ) -> Decision {
        let default_port = if connect { 443 } else { 80 };
        let Ok(destination) = Destination::parse_authority(authority, default_port) else {
            return Decision::deny("", Reason::MalformedDestination);
        };
        // CONNECT has no path; elsewhere `/x/../admin` cannot dodge `/admin`.
        let path = if connect {
            String::new()
        } else {
            match crate::normalise_path(raw_path) {
                Ok(p) => p,
                Err(_) => return Decision::deny("", Reason::MalformedPath),
            }
        };
        self.evaluate(&RequestFacts {
            identity,
            destination: &destination,
            method,
            path: &path,
            connect,
        })
    }

    pub fn evaluate(&self, req: &RequestFacts<'_>) -> Decision {
        if let Host::Name(n) = &req.destination.host {
            if is_guarded_name(n) {
                return Decision::deny(DEFAULT_DENY, Reason::PrivateDestination);
            }
        }
        let guard = match req.destination.host {
            Host::Ip(ip) => guarded_range(ip).filter(|_| !self.private_exempt(ip)),
            Host::Name(_) => None,
        };
        if !req.destination.canonical {
            // An address in a form Envoy would resolve as a name: never
            // forwarded. Named for what it encodes when that is guarded and
            // no policy opens it; otherwise malformed, whose hint says to
            // write the dotted quad (which a policy may well allow).
            let opened = || {
                let dotted = Destination {
                    canonical: true,
                    ..req.destination.clone()
                };
                self.evaluate(&RequestFacts {
                    destination: &dotted,
                    ..*req
                })
                .allow
            };
            let reason = if guard.is_some() && !opened() {
                Reason::PrivateDestination
            } else {
                Reason::MalformedDestination
            };
            return Decision::deny(DEFAULT_DENY, reason);
        }
        let host = &req.destination.host;
        let first = |set: &[Policy], idx: &Index| {
            idx.candidates(host, req.identity)
                .into_iter()
                .filter_map(|i| set.get(i as usize))
                .find(|p| matches(p, req, guard))
                .cloned()
        };
        let shadow = first(&self.shadow, &self.shadow_index).map(|p| ShadowDecision {
            allow: p.action == Action::Allow,
            policy_id: p.policy_id.to_string(),
        });
        let mut decision = match first(&self.enforced, &self.enforced_index) {
            Some(p) if p.action == Action::Allow => Decision {
                allow: true,
                policy_id: p.policy_id.to_string(),
                reason: Reason::PolicyAllow,
                shadow: None,
            },
            Some(p) => Decision::deny(p.policy_id.as_str(), Reason::PolicyDeny),
            None if guard.is_some() => Decision::deny(DEFAULT_DENY, Reason::PrivateDestination),
            None => Decision::deny(DEFAULT_DENY, Reason::DefaultDeny),
        };
        decision.shadow = shadow;
        decision
    }

    /// The operator's exemption, judged like the guard: an embedded IPv4
    /// address is exempt when that IPv4 address is.
    fn private_exempt(&self, ip: IpAddr) -> bool {
        let v4 = crate::destination::embedded_ipv4(ip).map(IpAddr::V4);
        self.private_allowed
            .iter()
            .any(|n| n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)))
    }
}

fn matches(p: &Policy, req: &RequestFacts<'_>, guard: Option<IpNet>) -> bool {
    let m = &p.match_;
    // Inside a tunnel the method and path are unknown: a rule that constrains
    // them can neither grant nor deny a CONNECT (§3).
    if req.connect && (m.method.is_some() || m.path_prefix.is_some()) {
        return false;
    }
    let id = req.identity;
    let i = &m.identity;
    if !(i.agent_id.matches(&id.agent_id)
        && i.team_id.matches(&id.team_id)
        && i.project_id.matches(&id.project_id)
        && i.environment.matches(&id.environment))
    {
        return false;
    }
    let d = &m.destination;
    if !d.ports.is_empty() && !d.ports.iter().any(|p| p.0 == req.destination.port) {
        return false;
    }
    // The guard keeps broad patterns from *granting* private destinations;
    // a deny with `*` or `0.0.0.0/0` denies them like anything else.
    let guard = if p.action == Action::Allow {
        guard
    } else {
        None
    };
    if !d
        .hosts
        .iter()
        .any(|h| host_matches(h, &req.destination.host, guard))
    {
        return false;
    }
    if let Some(methods) = &m.method {
        // Methods are case-sensitive (RFC 9110), but upstreams often are
        // not, and HTTP/2 lets an agent send `post`: a rule on POST matches
        // it, so a method deny cannot be dodged by spelling.
        if !methods
            .iter()
            .any(|x| x.as_str().eq_ignore_ascii_case(req.method))
        {
            return false;
        }
    }
    if let Some(prefix) = &m.path_prefix {
        if !req.path.starts_with(prefix.as_str()) {
            return false;
        }
    }
    true
}

/// `guard` is the special-purpose range the destination IP lies in, unless
/// the operator exempted it. Inside such a range only a policy CIDR that lies
/// within the range itself matches: `*` and broad ranges never lift the guard.
fn host_matches(pattern: &HostPattern, host: &Host, guard: Option<IpNet>) -> bool {
    match (pattern, host) {
        (HostPattern::Any, Host::Name(_)) => true,
        (HostPattern::Any, Host::Ip(_)) => guard.is_none(),
        (HostPattern::Exact(e), Host::Name(n)) => e == n,
        (HostPattern::Suffix(s), Host::Name(n)) => n.ends_with(s.as_str()),
        (HostPattern::Net(net), Host::Ip(ip)) => {
            net.contains(ip)
                && match guard {
                    None => true,
                    // The policy CIDR must lie inside the guarded range it
                    // opens; for an embedded IPv4 the range is IPv4, so no
                    // IPv6 CIDR qualifies.
                    Some(range) => range.contains(net),
                }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthType, Document};

    #[test]
    fn the_identity_split_index_decides_exactly_as_a_scan() {
        // Policies naming agents, teams (lists too), both, or anyone, on a
        // few shared hosts and `*`; every (identity, host) pair decides as a
        // scan of the sorted list in order would.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            x >> 33
        };
        let hosts = ["a.example", "*.example", "*", "10.0.0.0/8", "b.example"];
        let mut y = String::from("policies:\n");
        for i in 0..400 {
            let who = match next() % 5 {
                0 => format!("{{agent_id: ag{}}}", next() % 20),
                1 => format!("{{agent_id: [ag{}, ag{}]}}", next() % 20, next() % 20),
                2 => format!("{{team_id: t{}}}", next() % 4),
                3 => format!("{{agent_id: ag{}, team_id: t{}}}", next() % 20, next() % 4),
                _ => "{}".to_string(),
            };
            let host = hosts[(next() % 5) as usize];
            let action = if next() % 3 == 0 { "deny" } else { "allow" };
            y.push_str(&format!(
                "  - {{policy_id: p{i:03}, priority: {}, match: {{identity: {who}, destination: {{hosts: [\"{host}\"]}}}}, action: {action}}}\n",
                next() % 50
            ));
        }
        let doc = Document::from_yaml(&y).expect("doc");
        let s = PolicySet::new(&doc.policy(), &[], "r");
        for a in 0..22 {
            for t in 0..5 {
                let id = who(&format!("ag{a}"), &format!("t{t}"));
                for host in [
                    "a.example",
                    "x.a.example",
                    "b.example",
                    "c.other",
                    "10.1.2.3",
                ] {
                    let dest = Destination::parse_authority(host, 80).expect("host");
                    let req = RequestFacts {
                        identity: &id,
                        destination: &dest,
                        method: "GET",
                        path: "/",
                        connect: false,
                    };
                    let d = s.evaluate(&req);
                    let want = linear(&s, &req).unwrap_or_else(|| DEFAULT_DENY.to_string());
                    assert_eq!(d.policy_id, want, "ag{a} t{t} {host}");
                }
            }
        }
    }

    #[test]
    fn the_cidr_index_finds_exactly_what_a_scan_finds() {
        // A small LCG: deterministic, no dependency.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            x >> 11
        };
        let mut y = String::from("policies:\n");
        let mut nets: Vec<IpNet> = Vec::new();
        for i in 0..400 {
            let net: IpNet = if i % 3 == 0 {
                let a = (next() as u128) << 64 | next() as u128;
                let len = (next() % 129) as u8;
                ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(a), len)
                    .expect("len")
                    .trunc()
                    .into()
            } else {
                // Few distinct first octets, so nets overlap and nest.
                let a = ((next() % 4) as u32) << 30 | (next() as u32 & 0x3fff_ffff);
                let len = (next() % 33) as u8;
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(a), len)
                    .expect("len")
                    .trunc()
                    .into()
            };
            nets.push(net);
            y.push_str(&format!(
                "  - {{policy_id: p{i:03}, priority: {i}, match: {{destination: {{hosts: [\"{net}\"]}}}}, action: allow}}\n"
            ));
        }
        let doc = Document::from_yaml(&y).expect("doc");
        let policies = doc.policy().policies;
        let idx = Index::build(&policies);
        let mut probes: Vec<IpAddr> = Vec::new();
        for n in &nets {
            // The network address, the last address, and a random one.
            probes.push(n.network());
            probes.push(n.broadcast());
        }
        for _ in 0..2_000 {
            let a = ((next() % 4) as u32) << 30 | (next() as u32 & 0x3fff_ffff);
            probes.push(IpAddr::V4(a.into()));
            probes.push(IpAddr::V6(((next() as u128) << 64 | next() as u128).into()));
        }
        for ip in probes {
            let scan: Vec<u32> = policies
                .iter()
                .enumerate()
                .filter(|(_, p)| {
                    p.match_
                        .destination
                        .hosts
                        .iter()
                        .any(|h| matches!(h, HostPattern::Net(n) if n.contains(&ip)))
                })
                .map(|(i, _)| i as u32)
                .collect();
            assert_eq!(idx.candidates(&Host::Ip(ip), &who("x", "")), scan, "{ip}");
        }
    }

    const DOC: &str = r#"
policies:
  - policy_id: allow-pypi
    priority: 100
    match:
      identity: {team_id: infra}
      destination: {hosts: ["pypi.org", "*.pythonhosted.org"], ports: [443, 80]}
    action: allow
  - policy_id: deny-pypi-tie
    priority: 100
    match:
      identity: {agent_id: evil}
      destination: {hosts: ["pypi.org"]}
    action: deny
  - policy_id: get-only
    priority: 50
    match:
      destination: {hosts: ["api.example.com"]}
      method: [GET]
      path_prefix: /v1/
    action: allow
  - policy_id: deny-admin
    priority: 10
    match:
      destination: {hosts: ["api.example.com"]}
      path_prefix: /admin
    action: deny
  - policy_id: any-host
    priority: 500
    match:
      identity: {agent_id: wide}
      destination: {hosts: ["*", "0.0.0.0/0", "::/0"]}
    action: allow
  - policy_id: wide-no-post
    priority: 400
    match:
      identity: {agent_id: wide}
      destination: {hosts: ["*"]}
      method: [POST]
    action: deny
  - policy_id: local-test
    priority: 20
    match:
      identity: {agent_id: tester}
      destination: {hosts: ["127.0.0.1/32"]}
    action: allow
  - policy_id: disabled
    priority: 1
    enabled: false
    match:
      destination: {hosts: ["*"]}
    action: deny
  - policy_id: shadow-deny
    priority: 1
    mode: shadow
    match:
      destination: {hosts: ["pypi.org"]}
    action: deny
"#;

    fn set() -> PolicySet {
        PolicySet::new(
            &Document::from_yaml(DOC).expect("valid").policy(),
            &[],
            "r1",
        )
    }

    fn who(agent: &str, team: &str) -> Identity {
        Identity {
            agent_id: agent.into(),
            team_id: team.into(),
            project_id: String::new(),
            environment: String::new(),
            auth_type: AuthType::ApiKey,
        }
    }

    fn eval(s: &PolicySet, id: &Identity, authority: &str, method: &str, path: &str) -> Decision {
        let connect = method == "CONNECT";
        let dest = Destination::parse_authority(authority, 80).expect("authority");
        s.evaluate(&RequestFacts {
            identity: id,
            destination: &dest,
            method,
            path,
            connect,
        })
    }

    #[test]
    fn priority_and_ties() {
        let s = set();
        let d = eval(&s, &who("bot", "infra"), "pypi.org:443", "CONNECT", "");
        assert!(d.allow);
        assert_eq!(d.policy_id, "allow-pypi");
        assert_eq!(
            d.shadow.as_ref().map(|s| s.policy_id.as_str()),
            Some("shadow-deny")
        );
        // Same priority: deny beats allow.
        let d = eval(&s, &who("evil", "infra"), "pypi.org", "GET", "/");
        assert_eq!((d.allow, d.policy_id.as_str()), (false, "deny-pypi-tie"));
        // Not in the team: default deny.
        let d = eval(&s, &who("bot", "other"), "pypi.org", "GET", "/");
        assert_eq!((d.allow, d.reason), (false, Reason::DefaultDeny));
        assert_eq!(d.policy_id, DEFAULT_DENY);
        let d = eval(
            &s,
            &who("bot", "infra"),
            "files.pythonhosted.org:443",
            "CONNECT",
            "",
        );
        assert!(d.allow);
        // The suffix does not match the bare domain.
        assert!(
            !eval(
                &s,
                &who("bot", "infra"),
                "pythonhosted.org:443",
                "CONNECT",
                ""
            )
            .allow
        );
        assert!(!eval(&s, &who("bot", "infra"), "pypi.org:8443", "CONNECT", "").allow);
    }

    #[test]
    fn same_priority_and_action_the_smaller_policy_id_decides() {
        // Three allows at one priority, listed out of order, each matching:
        // the decision names the smallest id, whatever the list order.
        let yaml = |order: [&str; 3]| {
            let mut y = String::from("policies:\n");
            for id in order {
                y.push_str(&format!(
                    "  - policy_id: {id}\n    priority: 5\n    match:\n      destination: {{hosts: [\"example.com\"]}}\n    action: allow\n"
                ));
            }
            y
        };
        for order in [
            ["b-2", "a-1", "c-3"],
            ["c-3", "b-2", "a-1"],
            ["a-1", "c-3", "b-2"],
        ] {
            let s = PolicySet::new(
                &Document::from_yaml(&yaml(order)).expect("valid").policy(),
                &[],
                "r1",
            );
            let d = eval(&s, &who("x", ""), "example.com", "GET", "/");
            assert_eq!((d.allow, d.policy_id.as_str()), (true, "a-1"), "{order:?}");
        }
    }

    #[test]
    fn tunnels_ignore_method_and_path_rules() {
        let s = set();
        let id = who("x", "");
        assert!(eval(&s, &id, "api.example.com", "GET", "/v1/x").allow);
        assert!(!eval(&s, &id, "api.example.com", "POST", "/v1/x").allow);
        assert_eq!(
            eval(&s, &id, "api.example.com", "GET", "/admin").policy_id,
            "deny-admin"
        );
        // A method/path-limited allow does not grant a tunnel; a
        // path-limited deny does not match one either.
        let d = eval(&s, &id, "api.example.com:443", "CONNECT", "");
        assert_eq!((d.allow, d.policy_id.as_str()), (false, DEFAULT_DENY));
    }

    #[test]
    fn methods_match_whatever_their_case() {
        let s = set();
        let wide = who("wide", "");
        assert!(eval(&s, &wide, "example.com", "GET", "/").allow);
        for post in ["POST", "post", "Post"] {
            let d = eval(&s, &wide, "example.com", post, "/");
            assert_eq!(
                (d.allow, d.policy_id.as_str()),
                (false, "wide-no-post"),
                "{post}"
            );
        }
        let d = eval(&s, &who("x", ""), "api.example.com", "get", "/v1/x");
        assert_eq!((d.allow, d.policy_id.as_str()), (true, "get-only"));
    }

    #[test]
    fn private_guard_is_not_lifted_by_wildcards() {
        let s = set();
        let wide = who("wide", "");
        assert!(eval(&s, &wide, "example.com", "GET", "/").allow);
        assert!(eval(&s, &wide, "8.8.8.8", "GET", "/").allow);
        for private in [
            "127.0.0.1",
            "2130706433",
            "[::1]",
            "169.254.169.254",
            "10.0.0.1",
            "[::ffff:10.0.0.1]",
            "localhost",
            "metadata.google.internal",
        ] {
            let d = eval(&s, &wide, private, "GET", "/");
            assert_eq!(
                (d.allow, d.reason),
                (false, Reason::PrivateDestination),
                "{private}"
            );
        }
        // A narrow CIDR inside the range lifts it.
        let t = who("tester", "");
        for form in ["127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"] {
            assert!(eval(&s, &t, form, "GET", "/").allow, "{form}");
        }
        // Other spellings are addresses to clients but names to Envoy's
        // resolver: never forwarded, even where the address is allowed —
        // then as malformed (write the dotted quad), not as private: a
        // policy opened the range. Where none does, private.
        for form in [
            "127.1:8080",
            "0x7f000001:8080",
            "127.0.0.1.:8080",
            "[::ffff:127.0.0.1%lo]:8080",
            "[::ffff:127.0.0.1%25lo]:8080",
        ] {
            let d = eval(&s, &t, form, "GET", "/");
            assert_eq!(
                (d.allow, d.reason),
                (false, Reason::MalformedDestination),
                "{form}"
            );
            let d = eval(&s, &wide, form, "GET", "/");
            assert_eq!(
                (d.allow, d.reason),
                (false, Reason::PrivateDestination),
                "{form}"
            );
        }
        assert_eq!(
            eval(&s, &wide, "1.0x7f", "GET", "/").reason,
            Reason::MalformedDestination
        );
        assert!(!eval(&s, &t, "127.0.0.2", "GET", "/").allow);
        // IPv6's loopback is its own, not an IPv4-compatible 0.0.0.1: a
        // policy naming ::1 opens it; `*` and ::/0 do not.
        let doc = Document::from_yaml(
            "policies:\n  - {policy_id: v6-local, priority: 1, match: {destination: {hosts: [\"::1/128\"]}}, action: allow}\n",
        )
        .expect("valid")
        .policy();
        let s6 = PolicySet::new(&doc, &[], "r");
        assert!(eval(&s6, &t, "[::1]:8080", "GET", "/").allow);
        for other in ["[::]:8080", "[::2]:8080", "127.0.0.1:8080"] {
            assert!(!eval(&s6, &t, other, "GET", "/").allow, "{other}");
        }
        assert_eq!(
            eval(&s, &wide, "[::1]:8080", "GET", "/").reason,
            Reason::PrivateDestination
        );
        // IPv6 forms embedding loopback are judged by the IPv4 inside: an
        // IPv6 CIDR over the embedding block does not open them.
        let doc = Document::from_yaml(
            "policies:\n  - {policy_id: nat64, priority: 1, match: {destination: {hosts: [\"64:ff9b::/96\", \"2002::/16\", \"::/96\", \"::/0\"]}}, action: allow}\n",
        )
        .expect("valid")
        .policy();
        let s6 = PolicySet::new(&doc, &[], "r1");
        for h in [
            "[64:ff9b::7f00:1]",
            "[2002:7f00:1::]",
            "[::127.0.0.1]",
            "[::1]",
            "[::]",
            "[64:ff9b::a9fe:a9fe]",
            "[2002:a9fe:a9fe::1]",
        ] {
            let d = eval(&s6, &t, h, "GET", "/");
            assert_eq!(
                (d.allow, d.reason),
                (false, Reason::PrivateDestination),
                "{h}"
            );
        }
        assert!(
            eval(&s6, &t, "[64:ff9b::808:808]", "GET", "/").allow,
            "public NAT64 stays reachable"
        );
        assert!(!eval(&s, &t, "localhost", "GET", "/").allow);
        // The operator's exemption lifts it for `*` too.
        let doc = Document::from_yaml(DOC).expect("valid").policy();
        let s = PolicySet::new(&doc, &["10.0.0.0/8".parse().expect("net")], "r1");
        assert!(eval(&s, &wide, "10.1.2.3", "GET", "/").allow);
        assert!(!eval(&s, &wide, "192.168.1.1", "GET", "/").allow);
    }

    /// The decision of a plain scan in precedence order, for comparison.
    fn linear(s: &PolicySet, req: &RequestFacts<'_>) -> Option<String> {
        let guard = match req.destination.host {
            Host::Ip(ip) => guarded_range(ip).filter(|_| !s.private_exempt(ip)),
            Host::Name(_) => None,
        };
        s.enforced
            .iter()
            .find(|p| matches(p, req, guard))
            .map(|p| p.policy_id.to_string())
    }

    #[test]
    fn the_index_decides_exactly_like_a_scan_and_order_of_listing_is_irrelevant() {
        let mut y = String::from("policies:\n");
        let hosts = [
            "a.example.com",
            "*.example.com",
            "*.b.example.com",
            "*",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "8.8.8.0/24",
            "0.0.0.0/0",
            "x.y.z",
            "*.y.z",
            "127.0.0.1/32",
        ];
        for i in 0..60u32 {
            let h1 = hosts[(i as usize * 7) % hosts.len()];
            let h2 = hosts[(i as usize * 3 + 1) % hosts.len()];
            let action = if i % 4 == 0 { "deny" } else { "allow" };
            let team = if i % 5 == 0 { "\"*\"" } else { "[t1, t2]" };
            y.push_str(&format!(
                "  - {{policy_id: p{i:02}, priority: {}, match: {{identity: {{team_id: {team}}}, destination: {{hosts: [\"{h1}\", \"{h2}\"]}}}}, action: {action}}}\n",
                (i * 37) % 11
            ));
        }
        let doc = Document::from_yaml(&y).expect("valid").policy();
        let mut shuffled = doc.clone();
        shuffled.policies.reverse();
        shuffled.policies.rotate_left(17);
        let a = PolicySet::new(&doc, &[], "r");
        let b = PolicySet::new(&shuffled, &[], "r");
        let targets = [
            "a.example.com",
            "q.b.example.com",
            "example.com",
            "x.y.z",
            "deep.x.y.z",
            "10.1.2.3",
            "10.9.9.9",
            "8.8.8.8",
            "1.1.1.1",
            "127.0.0.1",
            "[::1]",
            "other.org",
        ];
        for team in ["t1", "t3"] {
            let id = who("any", team);
            for t in targets {
                let dest = Destination::parse_authority(t, 443).expect("authority");
                let req = RequestFacts {
                    identity: &id,
                    destination: &dest,
                    method: "GET",
                    path: "/",
                    connect: false,
                };
                let da = a.evaluate(&req);
                let want = linear(&a, &req);
                assert_eq!(
                    da.allow
                        .then(|| da.policy_id.clone())
                        .or(Some(da.policy_id.clone()))
                        .filter(|p| p != DEFAULT_DENY),
                    want,
                    "{team} {t}"
                );
                assert_eq!(
                    da,
                    b.evaluate(&req),
                    "listing order changed the decision for {team} {t}"
                );
            }
        }
    }

    #[test]
    fn disabled_policies_are_skipped_and_empty_set_denies() {
        let s = set();
        assert!(eval(&s, &who("bot", "infra"), "pypi.org", "GET", "/").allow);
        let empty = PolicySet::new(&PolicyDocument::default(), &[], "r0");
        let d = eval(&empty, &who("bot", "infra"), "pypi.org", "GET", "/");
        assert_eq!((d.allow, d.reason), (false, Reason::DefaultDeny));
    }
}
