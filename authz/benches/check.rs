//! The Check decision at scale (DESIGN.md §11: ≤ 10 µs with 10,000 policies
//! and 100,000 identities): API-key authentication, host normalisation and
//! policy evaluation, without gRPC.

use std::fmt::Write;
use std::sync::Arc;

use base64::Engine;
use clawgress_authz::{AuthzService, Config, Facts};
use clawgress_policy::config::KeyHash;
use clawgress_policy::Document;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// `agents` API-key agents a0…, in teams t0…t99, all with one key.
fn agents_yaml(agents: usize) -> String {
    let hash = KeyHash::of_key("bench-key");
    let mut y = String::from("agents:\n");
    for i in 0..agents {
        let _ = writeln!(
            y,
            "  - {{agent_id: a{i}, team_id: t{}, auth_type: api_key, api_key_sha256: \"{}\"}}",
            i % 100,
            hash.as_str()
        );
    }
    y
}

fn document(agents: usize, policies: usize) -> Document {
    let mut y = agents_yaml(agents);
    y.push_str("policies:\n");
    for i in 0..policies {
        let host = match i % 3 {
            0 => format!("h{i}.example.com"),
            1 => format!("*.s{i}.example.net"),
            _ => format!("203.0.{}.0/24", i % 250),
        };
        let _ = writeln!(
            y,
            "  - {{policy_id: p{i}, priority: {}, match: {{identity: {{team_id: t{}}}, destination: {{hosts: [\"{host}\"], ports: [443]}}}}, action: allow}}",
            100 + i,
            i % 100
        );
    }
    Document::from_yaml(&y).expect("valid")
}

/// A fleet's shape the host index alone cannot narrow: every policy names
/// one agent, and all of them share one API host or `*`.
fn document_shared(agents: usize, policies: usize) -> Document {
    let mut y = agents_yaml(agents);
    y.push_str("policies:\n");
    for i in 0..policies {
        let host = if i % 2 == 0 {
            "api.shared.example"
        } else {
            "*"
        };
        let _ = writeln!(
            y,
            "  - {{policy_id: p{i}, priority: {}, match: {{identity: {{agent_id: a{}}}, destination: {{hosts: [\"{host}\"], ports: [443]}}}}, action: allow}}",
            100 + i,
            i * 7 % agents
        );
    }
    Document::from_yaml(&y).expect("valid")
}

/// Counts live heap bytes, so the compiled set's size can be printed
/// exactly (RSS deltas are blurred by the allocator reusing freed pages).
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is only bookkeeping.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_mib() -> f64 {
    LIVE.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("check");
    for policies in [100usize, 1_000, 10_000] {
        let doc = document(100_000, policies);
        let before = live_mib();
        let svc = AuthzService::new(&Config {
            policy: doc.policy(),
            private_allowed: vec![],
            revision: "bench".into(),
            jwt: Arc::default(),
        });
        eprintln!(
            "memory: the compiled set (agent directory + policy index) for 100,000 identities and {policies} policies holds {:.1} MiB of heap",
            live_mib() - before
        );
        drop(doc);
        // Agent a42 is in team t42; the last policy of that team matches.
        let last = (0..policies)
            .rev()
            .find(|i| i % 100 == 42 && i % 3 == 0)
            .unwrap_or(42);
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("a42:bench-key")
        );
        let hit = format!("h{last}.example.com:443");
        let facts = |authority: &'static str| Facts {
            proxy_authorization: Some(Box::leak(auth.clone().into_boxed_str())),
            method: "CONNECT",
            authority,
            path: "",
            connect: true,
            request_id: "r",
            source: None,
        };
        let allow = facts(Box::leak(hit.into_boxed_str()));
        assert!(svc.decide(&allow).decision.allow);
        let deny = facts("nowhere.example.org:443");
        assert!(!svc.decide(&deny).decision.allow);
        // The distribution per call, which criterion's means hide: 200,000
        // Checks, each timed alone, cycling through 1,000 agents (different
        // keys to hash, directory entries, teams) and allowed / denied /
        // IP-literal destinations.
        {
            let agents: Vec<String> = (0..1_000)
                .map(|i| {
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("a{}:bench-key", i * 97 % 100_000))
                    )
                })
                .collect();
            let dests = [
                allow.authority,
                "nowhere.example.org:443",
                "203.0.7.9:443",
                "x.s1.example.net:443",
            ];
            let mut nanos: Vec<u64> = Vec::with_capacity(200_000);
            for n in 0..200_000usize {
                let f = Facts {
                    proxy_authorization: Some(agents[n % agents.len()].as_str()),
                    authority: dests[n % dests.len()],
                    ..allow
                };
                let t = std::time::Instant::now();
                let v = svc.decide(&f);
                nanos.push(t.elapsed().as_nanos() as u64);
                std::hint::black_box(v);
            }
            for (k, d) in dests.iter().enumerate() {
                let mut per: Vec<u64> =
                    nanos.iter().skip(k).step_by(dests.len()).copied().collect();
                per.sort_unstable();
                eprintln!(
                    "  {d}: p50 {:.2} µs p99 {:.2} µs",
                    per[per.len() / 2] as f64 / 1000.0,
                    per[per.len() * 99 / 100] as f64 / 1000.0
                );
            }
            nanos.sort_unstable();
            let q = |p: f64| {
                nanos[((nanos.len() as f64 * p) as usize).min(nanos.len() - 1)] as f64 / 1000.0
            };
            eprintln!(
                "latency: 200,000 Checks one by one, 1,000 agents, 4 destinations, {policies} policies: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.1} µs",
                q(0.5),
                q(0.99),
                q(0.999),
                *nanos.last().unwrap_or(&0) as f64 / 1000.0
            );
        }
        g.bench_with_input(BenchmarkId::new("allow", policies), &allow, |b, f| {
            b.iter(|| svc.decide(f))
        });
        g.bench_with_input(BenchmarkId::new("default-deny", policies), &deny, |b, f| {
            b.iter(|| svc.decide(f))
        });
    }
    g.finish();

    // Per-agent policies on one shared host (and `*`): the index splits a
    // host's policies by the agent (or team) they name.
    for policies in [100usize, 1_000, 10_000] {
        let svc = AuthzService::new(&Config {
            policy: document_shared(100_000, policies).policy(),
            private_allowed: vec![],
            revision: "bench".into(),
            jwt: Arc::default(),
        });
        let agents: Vec<String> = (0..1_000)
            .map(|i| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("a{}:bench-key", i * 7 % 100_000))
                )
            })
            .collect();
        let mut nanos: Vec<u64> = Vec::with_capacity(100_000);
        let mut allowed = 0usize;
        for n in 0..100_000usize {
            let f = Facts {
                proxy_authorization: Some(agents[n % agents.len()].as_str()),
                method: "CONNECT",
                authority: "api.shared.example:443",
                path: "",
                connect: true,
                request_id: "r",
                source: None,
            };
            let t = std::time::Instant::now();
            let v = svc.decide(&f);
            nanos.push(t.elapsed().as_nanos() as u64);
            allowed += usize::from(v.decision.allow);
        }
        assert!(allowed > 0, "some agents have a policy");
        nanos.sort_unstable();
        eprintln!(
            "shared host: {policies} per-agent policies on one host and *, 1,000 agents: p50 {:.2} µs, p99 {:.2} µs ({allowed} of 100,000 allowed)",
            nanos[nanos.len() / 2] as f64 / 1000.0,
            nanos[nanos.len() * 99 / 100] as f64 / 1000.0
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
