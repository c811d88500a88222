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

fn document(agents: usize, policies: usize) -> Document {
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
        g.bench_with_input(BenchmarkId::new("allow", policies), &allow, |b, f| {
            b.iter(|| svc.decide(f))
        });
        g.bench_with_input(BenchmarkId::new("default-deny", policies), &deny, |b, f| {
            b.iter(|| svc.decide(f))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
