//! The in-process store's decision: `should_limit` for one request, with
//! 100,000 agents holding quotas (budget: ≤ 2 µs, DESIGN.md / issue 5).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clawgress_policy::Document;
use clawgress_ratelimit::{MemoryStore, RatelimitService, Subject};
use criterion::{criterion_group, criterion_main, Criterion};

fn config(agents: usize) -> String {
    let mut y = String::from("quotas:\n");
    for i in 0..agents {
        y.push_str(&format!(
            "  - {{agent_id: a{i}, rps_limit: 1000000000, rpm_limit: 1000000000}}\n"
        ));
    }
    y.push_str("  - {team_id: infra, rps_limit: 1000000000}\n");
    y
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let doc = Document::from_yaml(&config(100_000))
        .expect("valid")
        .policy();
    let svc = RatelimitService::new(&doc, Arc::new(MemoryStore::default()));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut i = 0u64;
    c.bench_function("should_limit agent quota (100k agents)", |b| {
        b.iter(|| {
            i += 1;
            let who = Subject {
                agent_id: format!("a{}", i % 100_000),
                ..Default::default()
            };
            rt.block_on(svc.should_limit(&who, 1, now)).expect("store")
        })
    });
    c.bench_function("should_limit agent + team quotas", |b| {
        b.iter(|| {
            i += 1;
            let who = Subject {
                agent_id: format!("a{}", i % 100_000),
                team_id: "infra".into(),
                ..Default::default()
            };
            rt.block_on(svc.should_limit(&who, 1, now)).expect("store")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
