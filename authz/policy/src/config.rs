//! The config document of DESIGN.md §12.
//!
//! Field-level rules (formats, enums, ranges) are enforced while deserialising,
//! so a bad value is reported with the line serde saw it on. Rules that span
//! fields (duplicate ids, a key hash an `api_key` agent needs) run in
//! [`Document::validate`] and name the path; the line is recovered from the
//! text where the offending value appears.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A config problem: where it is and what is wrong. `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: String,
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (false, Some(l)) => write!(f, "line {l}: {}: {}", self.path, self.reason),
            (false, None) => write!(f, "{}: {}", self.path, self.reason),
            (true, Some(l)) => write!(f, "line {l}: {}", self.reason),
            (true, None) => write!(f, "{}", self.reason),
        }
    }
}

/// Every error found in one document, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The whole document: this node's settings plus the policy document.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default)]
    pub gateway: Gateway,
    #[serde(default)]
    pub stores: Stores,
    #[serde(default)]
    pub nft: Nft,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub agents: Vec<Agent>,
    #[serde(default)]
    pub jwt: Jwt,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub quotas: Vec<Quota>,
}

/// The part of the document that describes one node (§12: `gateway`,
/// `stores`, `nft`, `audit`): what `up` fixes for its children at start.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub gateway: Gateway,
    pub stores: Stores,
    pub nft: Nft,
    pub audit: AuditSettings,
}

/// The part of the document that revisions and bundles carry (§12: everything
/// but `gateway`, `stores`, `nft` and `audit`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    #[serde(default)]
    pub agents: Vec<Agent>,
    #[serde(default)]
    pub jwt: Jwt,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub quotas: Vec<Quota>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    #[serde(default = "default_proxy_listen")]
    pub proxy_listen: SocketAddr,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// `None`: `up` picks a per-user state directory.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub private_destinations_allowed: Vec<IpNet>,
    #[serde(default)]
    pub quota_check: QuotaCheck,
    #[serde(default)]
    pub audit_input: AuditInput,
    /// Transparent gateway (§8): Envoy's listener for TCP 80/443 that nft
    /// redirects from `nft.protected_sources`; agents there are named by
    /// source address. Off unless set.
    #[serde(default)]
    pub transparent_listen: Option<SocketAddr>,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            proxy_listen: default_proxy_listen(),
            admin_listen: default_admin_listen(),
            state_dir: None,
            private_destinations_allowed: Vec::new(),
            quota_check: QuotaCheck::default(),
            audit_input: AuditInput::default(),
            transparent_listen: None,
        }
    }
}

fn default_proxy_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10000))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9080))
}

/// Where quotas are checked (§11): `authz` (inside Check: one side call per
/// request instead of two; the default, measured faster on this box) or
/// `rls` (Envoy's rate-limit filter and our RLS, for operators who wire
/// Envoy themselves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaCheck {
    /// The default: measured faster (bench/quota_check.sh).
    #[default]
    Authz,
    Rls,
}

/// How the audit sink receives Envoy's access log (§11): `file` (Envoy
/// writes a local JSON access-log file, the spool, which the sink follows;
/// nothing is lost while the sink is down) or `grpc` (Envoy's access-log
/// stream, for a sink on another host; entries Envoy buffers while the sink
/// is away can be lost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditInput {
    #[default]
    File,
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stores {
    #[serde(default = "default_memory")]
    pub ratelimit: String,
    #[serde(default = "default_sqlite")]
    pub control_plane: String,
    #[serde(default = "default_sqlite")]
    pub audit_query: String,
    /// What happens when the rate limiter or its store is down: `deny`
    /// (503 `ratelimit-unavailable`, the default) or `allow` (requests pass
    /// unlimited, an alert each time).
    #[serde(default)]
    pub ratelimit_failure_mode: FailureMode,
    #[serde(default)]
    pub audit_dir: Option<PathBuf>,
    #[serde(default)]
    pub audit_spool_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    #[default]
    Deny,
    Allow,
}

impl Default for Stores {
    fn default() -> Self {
        Stores {
            ratelimit: default_memory(),
            control_plane: default_sqlite(),
            audit_query: default_sqlite(),
            ratelimit_failure_mode: FailureMode::default(),
            audit_dir: None,
            audit_spool_dir: None,
        }
    }
}

fn default_memory() -> String {
    "memory".into()
}
fn default_sqlite() -> String {
    "sqlite".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Nft {
    #[serde(default)]
    pub mode: NftMode,
    #[serde(default = "default_envoy_user")]
    pub envoy_user: String,
    #[serde(default)]
    pub exempt_users: Vec<String>,
    #[serde(default)]
    pub protected_sources: Vec<IpNet>,
    #[serde(default)]
    pub allowed_private: Vec<IpNet>,
    #[serde(default = "default_admin_sources")]
    pub admin_sources: Vec<IpNet>,
}

impl Default for Nft {
    fn default() -> Self {
        Nft {
            mode: NftMode::default(),
            envoy_user: default_envoy_user(),
            exempt_users: Vec::new(),
            protected_sources: Vec::new(),
            allowed_private: Vec::new(),
            admin_sources: default_admin_sources(),
        }
    }
}

fn default_envoy_user() -> String {
    "clawgress-envoy".into()
}
fn default_admin_sources() -> Vec<IpNet> {
    vec![
        IpNet::from(std::net::IpAddr::from([127, 0, 0, 1])),
        IpNet::from(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NftMode {
    Sovereign,
    #[default]
    ProxyOnly,
    Connected,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    #[serde(default = "default_min_free_mb")]
    pub min_free_mb: u64,
    #[serde(default)]
    pub on_full: OnFull,
    /// Records per audit segment file; a full segment is sealed (signed
    /// checkpoint, read-only) and a new one begun.
    #[serde(default = "default_segment_records")]
    pub segment_records: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            min_free_mb: default_min_free_mb(),
            on_full: OnFull::default(),
            segment_records: default_segment_records(),
        }
    }
}

fn default_segment_records() -> u64 {
    100_000
}

fn default_min_free_mb() -> u64 {
    256
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub agent_id: Name,
    #[serde(default)]
    pub team_id: String,
    #[serde(default)]
    pub project_id: String,
    #[serde(default)]
    pub environment: String,
    pub auth_type: AuthType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<KeyHash>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub status: AgentStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    ApiKey,
    Jwt,
    SourceIp,
}

impl AuthType {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::ApiKey => "api_key",
            AuthType::Jwt => "jwt",
            AuthType::SourceIp => "source_ip",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    #[default]
    Active,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    None,
    TrainingUpdates,
    ExternalApi,
    Custom,
}

/// An identifier (`agent_id`, `policy_id`): non-empty, at most 128 bytes of
/// `[A-Za-z0-9._:-]`, so it is safe in logs, metadata, headers and CLI paths.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For ids this crate generates itself (valid by construction).
    pub(crate) fn generated(s: &str) -> Name {
        Name(s.to_string())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 128 {
            return Err(format!("{s:?} must be 1 to 128 characters"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
        {
            return Err(format!(
                "{s:?} contains {c:?}; use letters, digits, '.', '_', '-' or ':'"
            ));
        }
        Ok(Name(s))
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Name::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The SHA-256 of an API key, 64 hex digits, kept lower case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct KeyHash(String);

impl KeyHash {
    /// The raw 32 bytes.
    pub fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // Validated as 64 hex digits on construction.
        if hex::decode_to_slice(&self.0, &mut out).is_err() {
            out = [0u8; 32];
        }
        out
    }

    /// Hash a freshly minted key (what `clawgress key new` and `up` print).
    pub fn of_key(key: &str) -> KeyHash {
        use sha2::Digest;
        KeyHash(hex::encode(sha2::Sha256::digest(key.as_bytes())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyHash {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(
                "api_key_sha256 must be the 64 hex digits of the key's SHA-256 (never the key itself)"
                    .into(),
            );
        }
        Ok(KeyHash(s.to_ascii_lowercase()))
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        KeyHash::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    #[serde(default)]
    pub issuers: Vec<JwtIssuer>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<ClaimNames>,
    #[serde(default = "default_true")]
    pub require_exp: bool,
    #[serde(default = "default_skew")]
    pub clock_skew_s: u64,
    /// How often `jwks_url` is fetched again (seconds, default 300); a
    /// failed fetch is retried sooner and the last good set stays in use.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_s: u64,
}

fn default_jwks_refresh() -> u64 {
    300
}

fn default_true() -> bool {
    true
}
fn default_skew() -> u64 {
    60
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimNames {
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub environment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub policy_id: Name,
    #[serde(default = "default_version")]
    pub version: u32,
    pub priority: u32,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(rename = "match")]
    pub match_: Match,
    pub action: Action,
}

fn default_version() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    // Declared first so that `Deny < Allow`: on a priority tie deny wins.
    Deny,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub identity: IdentityMatch,
    pub destination: DestinationMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Vec<Method>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<PathPrefix>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityMatch {
    #[serde(default)]
    pub agent_id: FieldMatch,
    #[serde(default)]
    pub team_id: FieldMatch,
    #[serde(default)]
    pub project_id: FieldMatch,
    #[serde(default)]
    pub environment: FieldMatch,
}

/// One identity field's constraint: absent or `"*"` (any), a value, or a list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FieldMatch {
    #[default]
    Any,
    OneOf(Vec<String>),
}

impl FieldMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            FieldMatch::Any => true,
            FieldMatch::OneOf(vs) => vs.iter().any(|v| v == value),
        }
    }
}

impl<'de> Deserialize<'de> for FieldMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a value, a list of values, or \"*\"")
        })?;
        Ok(match raw {
            Raw::One(s) if s == "*" => FieldMatch::Any,
            Raw::One(s) => FieldMatch::OneOf(vec![s]),
            Raw::Many(v) if v.iter().any(|s| s == "*") => FieldMatch::Any,
            Raw::Many(v) if v.is_empty() => {
                return Err(serde::de::Error::custom(
                    "an empty list matches nothing; use \"*\" for any",
                ))
            }
            Raw::Many(v) => FieldMatch::OneOf(v),
        })
    }
}

impl Serialize for FieldMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            FieldMatch::Any => s.serialize_str("*"),
            FieldMatch::OneOf(v) if v.len() == 1 => s.serialize_str(&v[0]),
            FieldMatch::OneOf(v) => v.serialize(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationMatch {
    pub hosts: Vec<HostPattern>,
    /// Left out: any port. Written, at least one (an empty list would
    /// read as "any", widening an allow rule).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "non_empty_ports"
    )]
    pub ports: Vec<Port>,
}

fn non_empty_ports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Port>, D::Error> {
    let v = Vec::<Port>::deserialize(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "an empty list would match every port; leave ports out to match any",
        ));
    }
    Ok(v)
}

/// A TCP port, 1–65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(serde::de::Error::custom(format!(
                "port {n} is outside 1-65535"
            ))),
        }
    }
}

/// A destination host in a policy: `*`, `*.suffix`, an exact name, an IP or
/// a CIDR. Names are normalised as request hosts are (lower case, no
/// trailing dot, IDNA to punycode) so that matching compares like with like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    /// Matches names strictly below the suffix; stored with its leading dot.
    Suffix(String),
    Exact(String),
    Net(IpNet),
}

impl TryFrom<String> for HostPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(HostPattern::Net(net.trunc()));
        }
        if s.contains('/') {
            return Err(format!(
                "host pattern {s:?} is not a valid CIDR (address/prefix length)"
            ));
        }
        if let Some(rest) = s.strip_prefix("*.") {
            let name = crate::destination::normalise_name(rest)
                .map_err(|e| format!("host pattern {s:?}: {e}"))?;
            return Ok(HostPattern::Suffix(format!(".{name}")));
        }
        if s.contains('*') {
            return Err(format!(
                "host pattern {s:?}: '*' is allowed only alone or as a leading '*.'"
            ));
        }
        match crate::destination::Destination::parse_host(&s) {
            Ok(crate::destination::Host::Name(n)) => Ok(HostPattern::Exact(n)),
            // An IP in another encoding (e.g. 2130706433): store it canonically.
            Ok(crate::destination::Host::Ip(ip)) => Ok(HostPattern::Net(IpNet::from(ip))),
            Err(e) => Err(format!("host pattern {s:?}: {e}")),
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HostPattern::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HostPattern::Any => s.serialize_str("*"),
            HostPattern::Suffix(sfx) => s.serialize_str(&format!("*{sfx}")),
            HostPattern::Exact(n) => s.serialize_str(n),
            HostPattern::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                s.serialize_str(&net.addr().to_string())
            }
            HostPattern::Net(net) => s.serialize_str(&net.to_string()),
        }
    }
}

/// An HTTP method token, kept upper case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Method(String);

impl Method {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For methods this crate names itself (upper-case tokens).
    pub(crate) fn generated(s: &str) -> Method {
        Method(s.to_ascii_uppercase())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(serde::de::Error::custom(format!(
                "method {s:?} is not an HTTP method name"
            )));
        }
        Ok(Method(s.to_ascii_uppercase()))
    }
}

/// A path prefix: starts with `/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PathPrefix(String);

impl PathPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `/`: every origin-form path (for rules the profiles generate).
    pub(crate) fn root() -> PathPrefix {
        PathPrefix("/".to_string())
    }
}

impl<'de> Deserialize<'de> for PathPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') {
            return Err(serde::de::Error::custom(format!(
                "path_prefix {s:?} must start with '/'"
            )));
        }
        Ok(PathPrefix(s))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rps_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm_limit: Option<u32>,
    #[serde(default)]
    pub mode: QuotaMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaMode {
    #[default]
    HardStop,
    AlertOnly,
}

impl QuotaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaMode::HardStop => "hard_stop",
            QuotaMode::AlertOnly => "alert_only",
        }
    }
}

impl Document {
    /// Parse and validate YAML text. Every problem found is returned, each
    /// with its path, line (when known) and reason.
    pub fn from_yaml(text: &str) -> Result<Document, ConfigErrors> {
        let whole = |reason: String, line: Option<usize>| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                line,
                reason,
            }])
        };
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(whole(
                format!("the document is larger than {MAX_DOCUMENT_BYTES} bytes"),
                None,
            ));
        }
        if let Some(line) = too_deep(text) {
            return Err(whole(
                format!("nesting deeper than {MAX_NESTING} levels"),
                Some(line),
            ));
        }
        if text
            .lines()
            .all(|l| matches!(l.trim(), "" | "---" | "...") || l.trim_start().starts_with('#'))
        {
            return Err(whole(
                "the document is empty; it needs at least agents and policies (see DESIGN.md §12)"
                    .into(),
                None,
            ));
        }
        if let Some((tag, line)) = first_tag(text) {
            return Err(whole(
                format!("YAML tag `{tag}` is not supported: write the plain value (a tag would change what the value means, or be ignored)"),
                line,
            ));
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let doc: Document = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner();
            // serde_yaml_ng marks a bad value at the start of the mapping
            // that holds it; walk forward from there to the key's own line.
            let msg = inner.to_string();
            let line = inner.location().map(|l| {
                // A key given twice: serde_yaml_ng names the mapping; the
                // operator wants the second occurrence.
                const DUP: &str = "duplicate field `";
                let twice = msg
                    .find(DUP)
                    .and_then(|i| msg[i + DUP.len()..].split('`').next())
                    .and_then(|key| line_of_duplicate(text, l.line(), key));
                twice
                    .or_else(|| line_of_key(text, l.line(), &path))
                    .unwrap_or(l.line())
            });
            let msg = match msg.rfind(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            // The message repeats the (shorter) path serde_yaml_ng tracked.
            let (_, reason) = split_path(&msg);
            let path = if path == "." { String::new() } else { path };
            ConfigErrors(vec![ConfigError { path, line, reason }])
        })?;
        let errors = doc.validate_with_text(Some(text));
        if errors.is_empty() {
            Ok(doc)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// This node's settings with `policy` as the policy part (a bundle's).
    pub fn with_policy(self, policy: PolicyDocument) -> Document {
        Document {
            agents: policy.agents,
            jwt: policy.jwt,
            policies: policy.policies,
            quotas: policy.quotas,
            ..self
        }
    }

    /// This node's settings (`gateway`, `stores`, `nft`, `audit`).
    pub fn node(&self) -> NodeSettings {
        NodeSettings {
            gateway: self.gateway.clone(),
            stores: self.stores.clone(),
            nft: self.nft.clone(),
            audit: self.audit.clone(),
        }
    }

    /// The same policy with `node`'s settings.
    pub fn with_node(self, node: NodeSettings) -> Document {
        Document {
            gateway: node.gateway,
            stores: node.stores,
            nft: node.nft,
            audit: node.audit,
            ..self
        }
    }

    /// The policy part, as revisions and bundles carry it.
    pub fn policy(&self) -> PolicyDocument {
        PolicyDocument {
            agents: self.agents.clone(),
            jwt: self.jwt.clone(),
            policies: self.policies.clone(),
            quotas: self.quotas.clone(),
        }
    }

    /// Cross-field rules. `text`, when given, is used to find lines.
    fn validate_with_text(&self, text: Option<&str>) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut push = |path: String, needle: Option<&str>, reason: String| {
            let line = match (text, needle) {
                (Some(t), Some(n)) => line_of(t, n),
                _ => None,
            };
            errs.push(ConfigError { path, line, reason });
        };
        let rl = &self.stores.ratelimit;
        if rl != "memory" && !rl.starts_with("redis://") && !rl.starts_with("redis-cluster://") {
            push(
                "stores.ratelimit".into(),
                Some("ratelimit:"),
                format!("{rl:?} is not `memory`, redis://host:port or redis-cluster://h1:p1,h2:p2"),
            );
        }
        if self.gateway.admin_listen == self.gateway.proxy_listen {
            push(
                "gateway.admin_listen".into(),
                Some("admin_listen"),
                "must differ from gateway.proxy_listen".into(),
            );
        }
        if self.gateway.proxy_listen.port() == 0 {
            push(
                "gateway.proxy_listen".into(),
                Some("proxy_listen"),
                "needs a fixed port: agents must be told where the proxy is".into(),
            );
        }
        if let Some(t) = self.gateway.transparent_listen {
            if t.port() == 0 || t == self.gateway.proxy_listen || t == self.gateway.admin_listen {
                push(
                    "gateway.transparent_listen".into(),
                    Some("transparent_listen"),
                    "needs a fixed port of its own (nft redirects to it)".into(),
                );
            }
            if t.ip().is_loopback() {
                push(
                    "gateway.transparent_listen".into(),
                    Some("transparent_listen"),
                    "cannot be a loopback address: redirected connections arrive on the host's own addresses (use 0.0.0.0 or [::])".into(),
                );
            }
            if self.gateway.quota_check == QuotaCheck::Rls {
                push(
                    "gateway.transparent_listen".into(),
                    Some("transparent_listen"),
                    "needs gateway.quota_check: authz (TLS connections pass no rate-limit filter; quotas are checked inside Check)".into(),
                );
            }
            if self.gateway.audit_input != AuditInput::File {
                push(
                    "gateway.transparent_listen".into(),
                    Some("transparent_listen"),
                    "needs gateway.audit_input: file (TLS connections are recorded from the access-log file)".into(),
                );
            }
        }
        for (path, v) in [
            ("stores.control_plane", &self.stores.control_plane),
            ("stores.audit_query", &self.stores.audit_query),
        ] {
            let pg = v.starts_with("postgres://") || v.starts_with("postgresql://");
            if pg {
                // Both stores have a PostgreSQL implementation.
            } else if v != "sqlite" {
                push(
                    path.into(),
                    Some(path.rsplit('.').next().unwrap_or(path)),
                    format!("{v:?} is not `sqlite` or a postgres:// URL"),
                );
            }
        }
        if self.audit.segment_records == 0 {
            push(
                "audit.segment_records".into(),
                Some("segment_records"),
                "must be at least 1".into(),
            );
        }
        let policy_errs = self.policy().validate_inner(text);
        errs.extend(policy_errs);
        errs
    }
}

impl PolicyDocument {
    /// Parse a policy document from JSON (a bundle payload) and validate it.
    pub fn from_json(text: &str) -> Result<PolicyDocument, ConfigErrors> {
        let mut de = serde_json::Deserializer::from_str(text);
        let doc: PolicyDocument = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.to_string();
            let reason = match msg.rfind(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            ConfigErrors(vec![ConfigError {
                path: if path == "." { String::new() } else { path },
                line: None,
                reason,
            }])
        })?;
        de.end().map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                line: None,
                reason: e.to_string(),
            }])
        })?;
        let errs = doc.validate_inner(None);
        if errs.is_empty() {
            Ok(doc)
        } else {
            Err(ConfigErrors(errs))
        }
    }

    /// Canonical JSON: field order fixed by the types, no whitespace.
    pub fn to_canonical_json(&self) -> String {
        // Serialising plain structs and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    fn validate_inner(&self, text: Option<&str>) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut push = |path: String, needle: Option<String>, reason: String| {
            // The item's own lines first (`quotas[1]` names the second
            // quota, not the agent of the same id); the whole text when the
            // list is written in flow style.
            let line = text.and_then(|t| match (item_lines(t, &path), needle) {
                (Some((from, to)), Some(n)) => line_of_within(t, &n, from, to).or(Some(from)),
                (Some((from, _)), None) => Some(from),
                (None, Some(n)) => line_of(t, &n),
                (None, None) => None,
            });
            errs.push(ConfigError { path, line, reason });
        };
        let mut seen = std::collections::HashSet::new();
        let mut cidr_owner = std::collections::HashMap::new();
        for (i, a) in self.agents.iter().enumerate() {
            let path = format!("agents[{i}]");
            let needle = Some(format!("agent_id: {}", a.agent_id));
            if !seen.insert(a.agent_id.as_str()) {
                push(
                    format!("{path}.agent_id"),
                    needle.clone(),
                    format!("duplicate agent_id {:?}", a.agent_id.as_str()),
                );
            }
            match a.auth_type {
                AuthType::ApiKey if a.api_key_sha256.is_none() => push(
                    format!("{path}.api_key_sha256"),
                    needle.clone(),
                    "required for auth_type api_key (`clawgress key new` prints one)".into(),
                ),
                AuthType::SourceIp if a.source_cidrs.is_empty() => push(
                    format!("{path}.source_cidrs"),
                    needle.clone(),
                    "required for auth_type source_ip".into(),
                ),
                _ => {}
            }
            if a.agent_id.as_str().contains(':') {
                push(
                    format!("{path}.agent_id"),
                    needle.clone(),
                    "':' cannot be used in an agent_id: it separates id and key in proxy credentials"
                        .into(),
                );
            }
            if a.auth_type != AuthType::SourceIp && !a.source_cidrs.is_empty() {
                push(
                    format!("{path}.source_cidrs"),
                    needle.clone(),
                    "only for auth_type source_ip".into(),
                );
            }
            for net in &a.source_cidrs {
                let key = net.trunc();
                if let Some(other) = cidr_owner.insert(key, a.agent_id.as_str()) {
                    push(
                        format!("{path}.source_cidrs"),
                        needle.clone(),
                        format!(
                            "{key} is bound to agent {other:?} already: one range, one identity"
                        ),
                    );
                }
            }
            if a.auth_type != AuthType::ApiKey && a.api_key_sha256.is_some() {
                push(
                    format!("{path}.api_key_sha256"),
                    needle.clone(),
                    format!(
                        "only valid with auth_type api_key, not {}",
                        a.auth_type.as_str()
                    ),
                );
            }
        }
        let mut issuers = std::collections::HashSet::new();
        for (i, iss) in self.jwt.issuers.iter().enumerate() {
            let path = format!("jwt.issuers[{i}]");
            let needle = Some(format!("issuer: {}", iss.issuer));
            if iss.issuer.is_empty() {
                push(
                    format!("{path}.issuer"),
                    needle.clone(),
                    "must not be empty".into(),
                );
            }
            if !issuers.insert(iss.issuer.as_str()) {
                push(
                    format!("{path}.issuer"),
                    needle.clone(),
                    format!("duplicate issuer {:?}", iss.issuer),
                );
            }
            if let Some(url) = &iss.jwks_url {
                let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
                if !scheme_ok || url.len() > 2048 || url.chars().any(char::is_whitespace) {
                    push(
                        format!("{path}.jwks_url"),
                        needle.clone(),
                        "must be an http:// or https:// URL".into(),
                    );
                }
            } else if iss.jwks_file.is_none() && iss.hs256_secret_file.is_none() {
                push(
                    path.clone(),
                    needle.clone(),
                    "needs jwks_file or hs256_secret_file".into(),
                );
            }
            if iss.clock_skew_s > 600 {
                push(
                    format!("{path}.clock_skew_s"),
                    needle.clone(),
                    "at most 600 seconds".into(),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let path = format!("policies[{i}]");
            let needle = Some(format!("policy_id: {}", p.policy_id));
            if !seen.insert(p.policy_id.as_str()) {
                push(
                    format!("{path}.policy_id"),
                    needle.clone(),
                    format!("duplicate policy_id {:?}", p.policy_id.as_str()),
                );
            }
            if p.policy_id.as_str().starts_with(crate::profiles::PREFIX) {
                push(
                    format!("{path}.policy_id"),
                    needle.clone(),
                    "ids starting with \"profile:\" are reserved for profiles".into(),
                );
            }
            if p.policy_id.as_str() == crate::eval::DEFAULT_DENY {
                push(
                    format!("{path}.policy_id"),
                    needle.clone(),
                    "\"default-deny\" is reserved for the implicit final rule".into(),
                );
            }
            if p.match_.method.as_ref().is_some_and(|m| m.is_empty()) {
                push(
                    format!("{path}.match.method"),
                    needle.clone(),
                    "an empty list matches nothing; leave method out to match any".into(),
                );
            }
            if p.match_.destination.hosts.is_empty() {
                push(
                    format!("{path}.match.destination.hosts"),
                    needle.clone(),
                    "must name at least one host; use \"*\" for any".into(),
                );
            }
        }
        let mut quota_scopes = std::collections::HashSet::new();
        for (i, q) in self.quotas.iter().enumerate() {
            let path = format!("quotas[{i}]");
            let keys = [
                q.agent_id.is_some(),
                q.team_id.is_some(),
                q.project_id.is_some(),
            ];
            let needle = q.agent_id.as_ref().map(|a| format!("agent_id: {a}"));
            match keys.iter().filter(|k| **k).count() {
                1 => {}
                _ => push(
                    path.clone(),
                    needle.clone(),
                    "name exactly one of agent_id, team_id or project_id".into(),
                ),
            }
            let scope = q
                .agent_id
                .as_ref()
                .map(|a| format!("agent:{a}"))
                .or_else(|| q.team_id.as_ref().map(|t| format!("team:{t}")))
                .or_else(|| q.project_id.as_ref().map(|p| format!("project:{p}")));
            if let Some(scope) = scope {
                if !quota_scopes.insert(scope.clone()) {
                    push(
                        path.clone(),
                        needle.clone(),
                        format!("a second quota for {scope}; merge them into one"),
                    );
                }
            }
            if q.rps_limit.is_none() && q.rpm_limit.is_none() {
                push(
                    path.clone(),
                    needle.clone(),
                    "set rps_limit, rpm_limit or both".into(),
                );
            }
            if q.rps_limit == Some(0) || q.rpm_limit == Some(0) {
                push(
                    path.clone(),
                    needle.clone(),
                    "a limit of 0 admits nothing; disable the agent instead".into(),
                );
            }
        }
        errs
    }
}

/// Documents larger than this are refused before parsing.
const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// Flow-style nesting deeper than this is refused before parsing: the YAML
/// parser's cost grows with the square of the depth, and no real config
/// nests more than a few levels.
const MAX_NESTING: usize = 64;

/// The line where `[`/`{` nesting (outside quotes and comments) first
/// exceeds [`MAX_NESTING`].
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Some(n + 1);
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    None
}

/// The first YAML tag in the document that would be dropped or change the
/// value's meaning, if any: a local tag (`!x`), which serde would drop from
/// a scalar, or a `!!` tag outside YAML's core schema (`!!binary aGk=`
/// would be read as the string `aGk=`). `!!str`, `!!int` and the other core
/// tags mean what they say and are kept. An unknown tag is an error, as an
/// unknown field is.
fn first_tag(text: &str) -> Option<(String, Option<usize>)> {
    use serde_yaml_ng::Value;
    fn walk(v: &Value) -> Option<String> {
        match v {
            Value::Tagged(t) => Some(t.tag.to_string()),
            Value::Sequence(s) => s.iter().find_map(walk),
            Value::Mapping(m) => m.iter().find_map(|(k, v)| walk(k).or_else(|| walk(v))),
            _ => None,
        }
    }
    const CORE: [&str; 9] = [
        "!!str",
        "!!int",
        "!!bool",
        "!!float",
        "!!null",
        "!!seq",
        "!!map",
        "!!timestamp",
        "!!merge",
    ];
    // `!!` at the start of a token, outside quotes and comments: a plain
    // scalar cannot start with `!`, so this is a tag.
    let mut core_schema = None;
    'lines: for (n, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for (i, c) in line.char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if prev == ' ' => break,
                (None, '!') if matches!(prev, ' ' | '[' | '{' | ',') => {
                    let tag: String = line[i..]
                        .chars()
                        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | ']' | '}'))
                        .collect();
                    if tag.starts_with("!!") && !CORE.contains(&tag.as_str()) {
                        core_schema = Some((tag, Some(n + 1)));
                        break 'lines;
                    }
                }
                _ => {}
            }
            prev = c;
        }
    }
    // Unparseable text is left to the typed parse, which names the line.
    let local = serde_yaml_ng::from_str::<Value>(text)
        .ok()
        .and_then(|v| walk(&v))
        .map(|tag| {
            let line = line_of(text, &tag);
            (tag, line)
        });
    // Whichever comes first in the file.
    match (core_schema, local) {
        (Some(a), Some(b)) => Some(if b.1 < a.1 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Split "agents[0].api_key_sha256: reason" into path and reason.
fn split_path(msg: &str) -> (String, String) {
    if let Some((head, rest)) = msg.split_once(": ") {
        if !head.contains(' ') {
            return (head.to_string(), rest.to_string());
        }
    }
    (String::new(), msg.to_string())
}

/// The line of the last key of `path` (`agents[0].api_key_sha256` →
/// `api_key_sha256:`), searching from `from` (1-based) onwards.
fn line_of_key(text: &str, from: usize, path: &str) -> Option<usize> {
    let last = path.rsplit('.').next()?;
    let key = last.split('[').next()?;
    if key.is_empty() || key == "?" {
        return None;
    }
    let pat = format!("{key}:");
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ");
            t.starts_with(&pat) || l.contains(&format!("{{{pat}")) || l.contains(&format!(" {pat}"))
        })
        .map(|(i, _)| i + 1)
}

/// The 1-based line where `key` appears a second time in the block-style
/// mapping whose first key is on line `from` (a list item's, `- key: …`,
/// or a plain one). None for flow style or when it cannot be told.
fn line_of_duplicate(text: &str, from: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.get(from.checked_sub(1)?)?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    // The column the mapping's keys start at.
    let mut col = indent(first);
    let mut rest = &first[col..];
    while let Some(r) = rest.strip_prefix('-') {
        let t = r.trim_start_matches(' ');
        col += rest.len() - t.len();
        rest = t;
    }
    if rest.starts_with('{') {
        return None;
    }
    let names = |t: &str| {
        [
            format!("{key}:"),
            format!("\"{key}\":"),
            format!("'{key}':"),
        ]
        .iter()
        .any(|p| t.starts_with(p.as_str()))
    };
    let mut seen = 0;
    for (i, l) in lines.iter().enumerate().skip(from - 1) {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let at = if i + 1 == from { col } else { indent(l) };
        if i + 1 != from && (at < col || (at + 2 == col && t.starts_with("- "))) {
            break; // the mapping ended, or the next list item began
        }
        let here = if i + 1 == from { rest } else { t };
        if at == col && names(here) {
            seen += 1;
            if seen == 2 {
                return Some(i + 1);
            }
        }
    }
    None
}

/// The 1-based line of the first occurrence of `needle`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// The 1-based line of the first occurrence of `needle` in lines
/// `from..=to`.
fn line_of_within(text: &str, needle: &str, from: usize, to: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .take(to)
        .skip(from.saturating_sub(1))
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
}

/// The first and last 1-based lines of the block-style list item a path
/// starts with (`quotas[1].rps_limit` → the second `- ` under `quotas:`,
/// `jwt.issuers[0]` → the first under `issuers:` under `jwt:`). None for a
/// list in flow style or a path that names no item.
fn item_lines(text: &str, path: &str) -> Option<(usize, usize)> {
    let (keys, rest) = path.split_once('[')?;
    let index: usize = rest.split(']').next()?.parse().ok()?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let content = |l: &str| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    };
    let lines: Vec<&str> = text.lines().collect();
    // Each key of the path in turn, each nested in the one before.
    let mut at = 0usize;
    let mut key_indent = 0usize;
    for (n, key) in keys.split('.').enumerate() {
        let pat = format!("{key}:");
        let found = lines.iter().enumerate().skip(at).find(|(_, l)| {
            content(l)
                && (n == 0 && indent(l) == 0 || n > 0 && indent(l) > key_indent)
                && l.trim_start().starts_with(&pat)
        })?;
        at = found.0 + 1;
        key_indent = indent(found.1);
    }
    // The items: lines starting with `-` at the first item's indent, until
    // a line back at (or left of) the key's indent.
    let mut item_indent = None;
    let mut starts = Vec::new();
    let mut end = lines.len();
    for (i, l) in lines.iter().enumerate().skip(at) {
        if !content(l) {
            continue;
        }
        let ind = indent(l);
        let dash = l.trim_start().starts_with('-');
        if ind < key_indent || ind == key_indent && !dash {
            end = i;
            break;
        }
        if dash && *item_indent.get_or_insert(ind) == ind {
            starts.push(i);
        }
    }
    let from = *starts.get(index)?;
    let to = starts.get(index + 1).copied().unwrap_or(end);
    Some((from + 1, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
agents:
  - agent_id: build-bot
    team_id: infra
    project_id: ci
    environment: prod
    auth_type: api_key
    api_key_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
policies:
  - policy_id: allow-pypi
    priority: 100
    match:
      identity: {team_id: infra}
      destination: {hosts: ["PyPI.org.", "*.pythonhosted.org", "10.0.0.0/8"], ports: [443]}
      method: [get]
    action: allow
quotas:
  - agent_id: build-bot
    rps_limit: 10
    rpm_limit: 300
"#;

    #[test]
    fn parses_the_design_example() {
        let doc = Document::from_yaml(GOOD).expect("valid");
        assert_eq!(doc.agents[0].agent_id.as_str(), "build-bot");
        let hosts = &doc.policies[0].match_.destination.hosts;
        assert_eq!(hosts[0], HostPattern::Exact("pypi.org".into()));
        assert_eq!(hosts[1], HostPattern::Suffix(".pythonhosted.org".into()));
        assert!(matches!(hosts[2], HostPattern::Net(_)));
        assert_eq!(
            doc.policies[0]
                .match_
                .method
                .as_ref()
                .map(|m| m[0].as_str()),
            Some("GET")
        );
        assert_eq!(doc.gateway.proxy_listen.port(), 10000);
        assert_eq!(doc.quotas[0].mode, QuotaMode::HardStop);
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let text = GOOD.replace(
            "    environment: prod\n",
            "    environment: prod\n    colour: red\n",
        );
        let err = Document::from_yaml(&text).expect_err("unknown field");
        let e = &err.0[0];
        assert_eq!(e.line, Some(7), "{err}");
        assert!(e.reason.contains("unknown field `colour`"), "{err}");
        assert_eq!(e.path, "agents[0].colour");
    }

    #[test]
    fn bad_values_are_refused_with_line() {
        for (from, to, want) in [
            ("rps_limit: 10", "rps_limit: -1", "rps_limit"),
            ("ports: [443]", "ports: [70000]", "outside 1-65535"),
            (
                "auth_type: api_key",
                "auth_type: password",
                "unknown variant",
            ),
            ("\"9f86d0", "\"zz86d0", "64 hex digits"),
            (
                "\"*.pythonhosted.org\"",
                "\"py*.org\"",
                "'*' is allowed only",
            ),
        ] {
            let text = GOOD.replace(from, to);
            let err = Document::from_yaml(&text).expect_err(to);
            assert!(err.to_string().contains(want), "{to}: {err}");
            let want_line = text.lines().position(|l| l.contains(to)).map(|i| i + 1);
            assert_eq!(err.0[0].line, want_line, "{to}: {err}");
        }
    }

    /// What `up` hands its children as JSON reads back the same.
    #[test]
    fn node_settings_round_trip_through_json() {
        let text = format!(
            "gateway:\n  proxy_listen: 127.0.0.1:10001\n  admin_listen: 127.0.0.1:9081\n  state_dir: /tmp/x\n  private_destinations_allowed: [10.1.0.0/16]\n  quota_check: rls\n  audit_input: grpc\nstores:\n  ratelimit: redis://127.0.0.1:6379\n  audit_query: sqlite\n  audit_dir: /tmp/x/audit\nnft:\n  mode: sovereign\n  exempt_users: [backup]\n  protected_sources: [10.20.0.0/24]\n  allowed_private: [10.30.0.0/16]\naudit:\n  min_free_mb: 64\n  on_full: allow\n{GOOD}"
        );
        let doc = Document::from_yaml(&text).expect("valid");
        let json = serde_json::to_string(&doc.node()).expect("json");
        let back: NodeSettings = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, doc.node());
        assert_eq!(Document::default().with_node(back).node(), doc.node());
    }

    #[test]
    fn a_key_given_twice_is_named_at_its_second_line() {
        let cases = [
            // Top level, far from the first line.
            ("gateway: {}\nagents: []\npolicies: []\nagents: []\n", 4, ""),
            // In a nested mapping.
            (
                "gateway:\n  proxy_listen: 127.0.0.1:1\n  # note\n  proxy_listen: 127.0.0.1:2\nagents: []\npolicies: []\n",
                4,
                "gateway",
            ),
            // In a list item, the second item's same key not counted.
            (
                "agents: []\npolicies:\n  - policy_id: a\n    priority: 1\n    match: {destination: {hosts: [a.example]}}\n    action: allow\n  - policy_id: b\n    action: allow\n    priority: 1\n    action: deny\n",
                10,
                "policies[1]",
            ),
            // Quoted the second time.
            ("agents: []\npolicies: []\n\"agents\": []\n", 3, ""),
        ];
        for (text, line, path) in cases {
            let err = Document::from_yaml(text).expect_err("duplicate key");
            assert_eq!(err.0.len(), 1, "{err}");
            assert!(err.0[0].reason.contains("duplicate field"), "{err}");
            assert_eq!(
                (err.0[0].path.as_str(), err.0[0].line),
                (path, Some(line)),
                "{text}\n{err}"
            );
        }
        // Flow style: the mapping's own line.
        let err = Document::from_yaml("agents: []\npolicies: []\ngateway: {proxy_listen: 127.0.0.1:1, proxy_listen: 127.0.0.1:2}\n")
            .expect_err("duplicate key");
        assert_eq!(err.0[0].line, Some(3), "{err}");
    }

    #[test]
    fn cross_field_errors_name_path_and_line() {
        let text = format!("{GOOD}  - agent_id: build-bot\n    rps_limit: 0\n");
        let err = Document::from_yaml(&text).expect_err("zero limit");
        assert!(err.to_string().contains("quotas[1]"), "{err}");
        // The second quota's own line, not the agent's of the same id.
        let own = text.lines().count() - 1;
        for e in &err.0 {
            assert_eq!((e.path.as_str(), e.line), ("quotas[1]", Some(own)), "{err}");
        }
        // A duplicate agent: the second one's line.
        let dup = GOOD.replace(
            "policies:\n",
            "  - agent_id: build-bot\n    auth_type: jwt\npolicies:\n",
        );
        let err = Document::from_yaml(&dup).expect_err("duplicate agent");
        let second = dup
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains("- agent_id: build-bot"))
            .nth(1)
            .map(|(i, _)| i + 1);
        assert_eq!(
            (err.0[0].path.as_str(), err.0[0].line),
            ("agents[1].agent_id", second),
            "{err}"
        );
        let text = GOOD.replace("    api_key_sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n", "");
        let err = Document::from_yaml(&text).expect_err("missing hash");
        assert_eq!(err.0[0].path, "agents[0].api_key_sha256");
        assert_eq!(err.0[0].line, Some(2 + 1));
    }

    #[test]
    fn refusals_by_name() {
        for (bad, want) in [
            ("", "empty"),
            ("# only a comment\n---\n", "empty"),
            ("agents:\n  - {agent_id: \"x:y\", auth_type: jwt}\n", "':' cannot"),
            ("policies:\n  - {policy_id: \"profile:x\", priority: 1, match: {destination: {hosts: [\"*\"]}}, action: allow}\n", "reserved for profiles"),
            ("agents:\n  - {agent_id: x, auth_type: source_ip}\n", "required for auth_type source_ip"),
            ("agents:\n  - {agent_id: x, auth_type: jwt, source_cidrs: [10.0.0.0/8]}\n", "only for auth_type source_ip"),
            ("agents:\n  - {agent_id: x, auth_type: source_ip, source_cidrs: [10.0.0.0/8]}\n  - {agent_id: y, auth_type: source_ip, source_cidrs: [10.0.0.0/8]}\n", "bound to agent"),
            ("stores: {audit_query: \"mysql://u@h/db\"}\nagents: []\n", "not `sqlite` or a postgres"),
            ("audit: {segment_records: 0}\nagents: []\n", "segment_records"),
            ("audit: {on_full: maybe}\nagents: []\n", "on_full"),
            ("audit: {min_free_mb: -1}\nagents: []\n", "min_free_mb"),
            ("gateway: {admin_listen: \"127.0.0.1:10000\"}\nagents: []\n", "must differ"),
            ("gateway: {transparent_listen: \"127.0.0.1:10000\"}\nagents: []\n", "fixed port of its own"),
            ("gateway: {transparent_listen: \"127.0.0.1:15001\"}\nagents: []\n", "loopback"),
            ("gateway: {transparent_listen: \"[::]:15001\", quota_check: rls}\nagents: []\n", "quota_check: authz"),
            ("gateway: {transparent_listen: \"0.0.0.0:0\"}\nagents: []\n", "fixed port of its own"),
            ("gateway: {transparent_listen: \"0.0.0.0:15001\", audit_input: grpc}\nagents: []\n", "needs gateway.audit_input: file"),
            ("gateway: {transparent_listen: \"nowhere\"}\nagents: []\n", "transparent_listen"),
            ("policies:\n  - {policy_id: p, priority: 1, match: {destination: {hosts: [\"10.0.0.0/33\"]}}, action: allow}\n", "not a valid CIDR"),
            ("policies:\n  - {policy_id: p, priority: 1, match: {destination: {hosts: [\"*\"]}, method: []}, action: allow}\n", "empty list"),
            ("policies:\n  - {policy_id: p, priority: 1, match: {destination: {hosts: [\"*\"], ports: []}}, action: allow}\n", "leave ports out"),
        ] {
            let err = Document::from_yaml(bad).expect_err(bad);
            assert!(err.to_string().contains(want), "{bad:?}: {err}");
        }
        assert!(Document::from_yaml(
            "agents:\n  - {agent_id: x, auth_type: jwt, profile: custom}\n"
        )
        .is_ok());
        assert!(Document::from_yaml(
            "gateway: {transparent_listen: \"0.0.0.0:15001\"}\nagents: []\n"
        )
        .is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_fast() {
        let deep = format!("agents: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let err = Document::from_yaml(&deep).expect_err("deep");
        assert!(err.to_string().contains("nesting deeper"), "{err}");
        // Brackets inside quotes and comments do not count.
        let ok = format!("# {}\nagents: []\npolicies:\n  - {{policy_id: p, priority: 1, match: {{destination: {{hosts: [\"*\"]}}, path_prefix: \"/{}\"}}, action: allow}}\n", "[".repeat(100), "[".repeat(100));
        assert!(
            Document::from_yaml(&ok).is_ok(),
            "{:?}",
            Document::from_yaml(&ok)
        );
    }

    #[test]
    fn team_and_project_quotas_and_duplicates() {
        let ok =
            "quotas:\n  - {team_id: infra, rps_limit: 5}\n  - {project_id: ci, rpm_limit: 9}\n";
        assert!(Document::from_yaml(ok).is_ok());
        let dup =
            "quotas:\n  - {team_id: infra, rps_limit: 5}\n  - {team_id: infra, rpm_limit: 9}\n";
        let err = Document::from_yaml(dup).expect_err("duplicate");
        assert!(
            err.to_string().contains("second quota for team:infra"),
            "{err}"
        );
    }

    #[test]
    fn unfinished_features_are_refused_not_ignored() {
        for extra in [
            "gateway: {quota_check: sometimes}\n",
            "jwt: {issuers: [{issuer: x}]}\n",
            "jwt: {issuers: [{issuer: x, jwks_url: \"ftp://idp/jwks\"}]}\n",
        ] {
            let text = format!("{extra}{GOOD}");
            assert!(Document::from_yaml(&text).is_err(), "{extra}");
        }
    }

    #[test]
    fn canonical_json_round_trips() {
        let doc = Document::from_yaml(GOOD).expect("valid").policy();
        let json = doc.to_canonical_json();
        let back = PolicyDocument::from_json(&json).expect("round trip");
        assert_eq!(back, doc);
        assert_eq!(back.to_canonical_json(), json);
    }

    #[test]
    fn yaml_tags_are_refused_with_their_line() {
        for (tagged, tag) in [
            ("gateway: {admin_listen: !weird 127.0.0.1:9080}\n", "!weird"),
            ("gateway:\n  state_dir: !!binary aGVsbG8=\n", "!!binary"),
            (
                "agents:\n  - !!python/object:x {agent_id: a}\n",
                "!!python/object:x",
            ),
            ("nft: !cfg\n  mode: proxy-only\n", "!cfg"),
        ] {
            let text = format!("{tagged}{GOOD}");
            let err = Document::from_yaml(&text).expect_err(tagged).to_string();
            assert!(err.contains(&format!("YAML tag `{tag}`")), "{err}");
            let line = tagged.lines().position(|l| l.contains(tag)).unwrap_or(0) + 1;
            assert!(err.contains(&format!("line {line}")), "{err}");
        }
        // Core tags mean what they say; `!` inside a value is no tag.
        let core = format!("gateway: {{state_dir: !!str /tmp/a!b}}\n{GOOD}");
        assert!(Document::from_yaml(&core).is_ok(), "{core}");
    }
}
