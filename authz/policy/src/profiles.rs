//! Profiles (DESIGN.md §4): named rule sets an agent can be given with
//! `profile:` in its listing. Each becomes ordinary policies, named
//! `profile:<name>…`, for the agents that carry it, so evaluation stays one
//! mechanism:
//!
//! - `custom` (or none): the agent's policies only;
//! - `none`: no external access at all: a deny of everything at the highest
//!   precedence, whatever other policies say;
//! - `training-updates`: the public package registries (PyPI, npm, crates.io,
//!   Go, Maven Central, RubyGems, Debian/Ubuntu/Alpine mirrors): HTTPS tunnels
//!   on 443 and GET/HEAD over plain HTTP on 80, at the lowest precedence, so
//!   an operator's own denies still win;
//! - `external-api`: HTTPS only: every plain-HTTP request is denied at the
//!   highest precedence; which API hosts the agent may tunnel to is up to its
//!   policies. (A deny rule that names methods never matches a tunnel, §3.)

use crate::config::{
    Action, AgentStatus, DestinationMatch, FieldMatch, HostPattern, IdentityMatch, Match, Method,
    Name, Policy, PolicyDocument, PolicyMode, Port, Profile,
};

/// Policy ids starting with this are generated here and reserved.
pub const PREFIX: &str = "profile:";

/// Package registries `training-updates` may reach.
pub const REGISTRIES: &[&str] = &[
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "proxy.golang.org",
    "sum.golang.org",
    "repo.maven.apache.org",
    "repo1.maven.org",
    "rubygems.org",
    "deb.debian.org",
    "security.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "ports.ubuntu.com",
    "dl-cdn.alpinelinux.org",
];

const PLAIN_HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
];

fn hosts(list: &[&str]) -> Vec<HostPattern> {
    list.iter()
        .filter_map(|h| HostPattern::try_from(h.to_string()).ok())
        .collect()
}

fn methods(list: &[&str]) -> Vec<Method> {
    list.iter().map(|m| Method::generated(m)).collect()
}

fn policy(
    id: &str,
    priority: u32,
    agents: &[String],
    hosts: Vec<HostPattern>,
    ports: &[u16],
    method: Option<Vec<Method>>,
    action: Action,
) -> Policy {
    Policy {
        policy_id: Name::generated(id),
        version: 1,
        priority,
        enabled: true,
        mode: PolicyMode::Enforce,
        match_: Match {
            identity: IdentityMatch {
                agent_id: FieldMatch::OneOf(agents.to_vec()),
                ..IdentityMatch::default()
            },
            destination: DestinationMatch {
                hosts,
                ports: ports.iter().map(|p| Port(*p)).collect(),
            },
            method,
            path_prefix: None,
        },
        action,
    }
}

/// The policies the document's profiles stand for.
pub fn policies(doc: &PolicyDocument) -> Vec<Policy> {
    let with = |p: Profile| -> Vec<String> {
        doc.agents
            .iter()
            .filter(|a| a.profile == Some(p) && a.status == AgentStatus::Active)
            .map(|a| a.agent_id.to_string())
            .collect()
    };
    let everything = || hosts(&["*", "0.0.0.0/0", "::/0"]);
    let mut out = Vec::new();
    let none = with(Profile::None);
    if !none.is_empty() {
        out.push(policy(
            "profile:none",
            0,
            &none,
            everything(),
            &[],
            None,
            Action::Deny,
        ));
    }
    let api = with(Profile::ExternalApi);
    if !api.is_empty() {
        out.push(policy(
            "profile:external-api:https-only",
            0,
            &api,
            everything(),
            &[],
            Some(methods(PLAIN_HTTP_METHODS)),
            Action::Deny,
        ));
        // Any other method (PROPFIND, PURGE, made-up ones) over plain HTTP
        // too: a path constraint never matches a tunnel (§3), so this
        // denies every plain-HTTP request and no CONNECT.
        let mut any_method = policy(
            "profile:external-api:https-only-any-method",
            0,
            &api,
            everything(),
            &[],
            None,
            Action::Deny,
        );
        any_method.match_.path_prefix = Some(crate::config::PathPrefix::root());
        out.push(any_method);
    }
    let updates = with(Profile::TrainingUpdates);
    if !updates.is_empty() {
        out.push(policy(
            "profile:training-updates:https",
            u32::MAX,
            &updates,
            hosts(REGISTRIES),
            &[443],
            None,
            Action::Allow,
        ));
        out.push(policy(
            "profile:training-updates:http",
            u32::MAX,
            &updates,
            hosts(REGISTRIES),
            &[80],
            Some(methods(&["GET", "HEAD"])),
            Action::Allow,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::Document;
    use crate::eval::{PolicySet, Reason, RequestFacts};
    use crate::{Destination, Identity};

    const DOC: &str = r#"
agents:
  - {agent_id: locked, auth_type: jwt, profile: none}
  - {agent_id: trainer, auth_type: jwt, profile: training-updates}
  - {agent_id: caller, auth_type: jwt, profile: external-api}
  - {agent_id: plain, auth_type: jwt, profile: custom}
policies:
  - policy_id: everyone-example
    priority: 100
    match: {destination: {hosts: ["api.example.com"]}}
    action: allow
  - policy_id: no-npm
    priority: 50
    match: {destination: {hosts: ["registry.npmjs.org"]}}
    action: deny
"#;

    fn decide(agent: &str, authority: &str, method: &str) -> (bool, String) {
        let doc = Document::from_yaml(DOC).expect("valid").policy();
        let set = PolicySet::new(&doc, &[], "r");
        let id = Identity {
            agent_id: agent.into(),
            team_id: String::new(),
            project_id: String::new(),
            environment: String::new(),
            auth_type: crate::config::AuthType::Jwt,
        };
        let connect = method == "CONNECT";
        let dest = Destination::parse_authority(authority, if connect { 443 } else { 80 })
            .expect("authority");
        let d = set.evaluate(&RequestFacts {
            identity: &id,
            destination: &dest,
            method,
            path: "/",
            connect,
        });
        assert!(d.allow || d.reason != Reason::PolicyAllow);
        (d.allow, d.policy_id)
    }

    #[test]
    fn profiles_shape_what_an_agent_gets() {
        // custom: policies only.
        assert_eq!(
            decide("plain", "api.example.com", "GET"),
            (true, "everyone-example".into())
        );
        assert!(!decide("plain", "pypi.org:443", "CONNECT").0);
        // none: nothing, whatever the policies say.
        assert_eq!(
            decide("locked", "api.example.com", "GET"),
            (false, "profile:none".into())
        );
        assert_eq!(
            decide("locked", "api.example.com:443", "CONNECT"),
            (false, "profile:none".into())
        );
        // training-updates: registries over HTTPS and GET over HTTP; the
        // operator's own deny still wins; nothing else is added.
        assert_eq!(
            decide("trainer", "pypi.org:443", "CONNECT"),
            (true, "profile:training-updates:https".into())
        );
        assert_eq!(
            decide("trainer", "deb.debian.org", "GET"),
            (true, "profile:training-updates:http".into())
        );
        assert!(!decide("trainer", "deb.debian.org", "POST").0);
        assert_eq!(
            decide("trainer", "registry.npmjs.org:443", "CONNECT"),
            (false, "no-npm".into())
        );
        assert!(!decide("trainer", "evil.example.org:443", "CONNECT").0);
        // external-api: its policies' hosts, over HTTPS only.
        assert_eq!(
            decide("caller", "api.example.com:443", "CONNECT"),
            (true, "everyone-example".into())
        );
        assert_eq!(
            decide("caller", "api.example.com", "GET"),
            (false, "profile:external-api:https-only".into())
        );
        for m in ["PROPFIND", "PURGE", "BREW"] {
            assert_eq!(
                decide("caller", "api.example.com", m),
                (false, "profile:external-api:https-only-any-method".into()),
                "{m}"
            );
        }
    }
}
