//! Properties of evaluation (proptest): the decision is a pure function of
//! (request, document) — the order of the policy list never matters — and
//! an allow added at a lower priority never overturns a policy's deny.

use clawgress_policy::config::{AuthType, Document};
use clawgress_policy::{Destination, Identity, PolicySet, RequestFacts};
use proptest::prelude::*;

const HOSTS: &[&str] = &[
    "a.example",
    "*.example",
    "*",
    "b.example",
    "10.0.0.0/8",
    "93.184.216.0/24",
];
const TEAMS: &[&str] = &["infra", "ml", "*"];
const METHODS: &[&str] = &["GET", "POST"];

#[derive(Debug, Clone)]
struct P {
    id: u8,
    priority: u8,
    allow: bool,
    host: usize,
    team: usize,
    method: Option<usize>,
    path: Option<bool>,
}

fn yaml(ps: &[P]) -> String {
    let mut s = String::from("policies:\n");
    for p in ps {
        s.push_str(&format!(
            "  - policy_id: p{}\n    priority: {}\n    match:\n      identity: {{team_id: \"{}\"}}\n      destination: {{hosts: [\"{}\"]}}\n",
            p.id, p.priority, TEAMS[p.team], HOSTS[p.host]
        ));
        if let Some(m) = p.method {
            s.push_str(&format!("      method: [{}]\n", METHODS[m]));
        }
        if let Some(true) = p.path {
            s.push_str("      path_prefix: /admin\n");
        }
        s.push_str(&format!(
            "    action: {}\n",
            if p.allow { "allow" } else { "deny" }
        ));
    }
    s
}

fn policy() -> impl Strategy<Value = P> {
    (
        1u8..6,
        any::<bool>(),
        0..HOSTS.len(),
        0..TEAMS.len(),
        proptest::option::of(0..METHODS.len()),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(|(priority, allow, host, team, method, path)| P {
            id: 0,
            priority,
            allow,
            host,
            team,
            method,
            path,
        })
}

fn policies() -> impl Strategy<Value = Vec<P>> {
    proptest::collection::vec(policy(), 0..8).prop_map(|mut v| {
        for (i, p) in v.iter_mut().enumerate() {
            p.id = i as u8;
        }
        v
    })
}

#[derive(Debug, Clone)]
struct Req {
    host: &'static str,
    team: &'static str,
    method: &'static str,
    path: &'static str,
    connect: bool,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec![
            "a.example",
            "b.example",
            "c.other",
            "10.1.2.3",
            "93.184.216.34",
            "127.0.0.1",
        ]),
        prop::sample::select(vec!["infra", "ml", "web"]),
        prop::sample::select(vec!["GET", "POST"]),
        prop::sample::select(vec!["/", "/admin/x", "/a/../admin"]),
        any::<bool>(),
    )
        .prop_map(|(host, team, method, path, connect)| Req {
            host,
            team,
            method,
            path,
            connect,
        })
}

fn decide(ps: &[P], r: &Req) -> (bool, String) {
    let doc = Document::from_yaml(&(yaml(ps) + "agents: []\n")).expect("valid");
    let set = PolicySet::new(&doc.policy(), &[], "r");
    let id = Identity {
        agent_id: "a".into(),
        team_id: r.team.into(),
        project_id: String::new(),
        environment: String::new(),
        auth_type: AuthType::ApiKey,
    };
    let dest = Destination::parse_authority(&format!("{}:443", r.host), 443).expect("host");
    let path = clawgress_policy::normalise_path(r.path).expect("path");
    let d = set.evaluate(&RequestFacts {
        identity: &id,
        destination: &dest,
        method: if r.connect { "CONNECT" } else { r.method },
        path: &path,
        connect: r.connect,
    });
    (d.allow, d.policy_id)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_order_of_the_policy_list_never_matters(ps in policies(), r in request(), seed in any::<u64>()) {
        let mut shuffled = ps.clone();
        // A deterministic shuffle from the seed.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(decide(&ps, &r), decide(&shuffled, &r));
    }

    #[test]
    fn a_lower_priority_allow_never_overturns_a_policy_deny(ps in policies(), r in request(), extra in policy()) {
        let (allowed, by) = decide(&ps, &r);
        if allowed || !by.starts_with('p') {
            // Not decided by a policy's deny: nothing to check here.
            return Ok(());
        }
        let deny_priority = ps.iter().find(|p| format!("p{}", p.id) == by).map(|p| p.priority).unwrap_or(0);
        let mut more = ps.clone();
        more.push(P { id: 99, allow: true, priority: deny_priority.max(extra.priority), ..extra });
        prop_assert_eq!(decide(&more, &r), (false, by));
    }
}
