//! One behavioural body for every counter store: in-process, Redis, and a
//! 3-master Redis Cluster (real `redis-server`s on free loopback ports).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clawgress_policy::Document;
use clawgress_ratelimit::{open_store, CounterStore, Limit, RatelimitService, Subject, Window};
use common::redis::{RedisCluster, RedisServer};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The behaviour every store must show. Scopes are unique per run so a
/// shared server starts clean.
async fn behaviour(store: Arc<dyn CounterStore>) {
    let run = format!("{}", now_ms());
    let scope = |s: &str| format!("agent:{s}-{run}");
    let sec = Limit {
        window: Window::Second,
        max: 3,
    };
    let min = Limit {
        window: Window::Minute,
        max: 5,
    };
    // A fixed instant in the middle of a second: no window edge in the way.
    let t = now_ms() / 60_000 * 60_000 + 10_500;

    // Within limits, then over: the refused request counts nowhere.
    for i in 0..3 {
        let st = store
            .acquire(&scope("a"), &[sec, min], 1, t)
            .await
            .expect("acquire");
        assert!(st.iter().all(|s| !s.over), "request {i}: {st:?}");
        assert_eq!(st[0].count, i + 1);
        assert_eq!(st[0].remaining, 3 - (i + 1));
    }
    let st = store
        .acquire(&scope("a"), &[sec, min], 1, t)
        .await
        .expect("acquire");
    assert!(st[0].over && !st[1].over, "{st:?}");
    assert_eq!(st[1].count, 3, "rpm not charged for a refused request");
    assert_eq!(st[0].reset_ms, 500);

    // Next second: rps resets, rpm has 2 left, then refuses.
    let t2 = t + 1_000;
    for _ in 0..2 {
        assert!(store
            .acquire(&scope("a"), &[sec, min], 1, t2)
            .await
            .expect("acquire")
            .iter()
            .all(|s| !s.over));
    }
    let st = store
        .acquire(&scope("a"), &[sec, min], 1, t2)
        .await
        .expect("acquire");
    assert!(!st[0].over && st[1].over, "{st:?}");

    // Batches are all or nothing.
    assert!(
        store
            .acquire(&scope("b"), &[sec], 4, t)
            .await
            .expect("acquire")[0]
            .over
    );
    assert!(
        !store
            .acquire(&scope("b"), &[sec], 3, t)
            .await
            .expect("acquire")[0]
            .over
    );

    // Release takes a counted request back.
    store
        .release(&scope("b"), &[sec], 1, t)
        .await
        .expect("release");
    assert!(
        !store
            .acquire(&scope("b"), &[sec], 1, t)
            .await
            .expect("acquire")[0]
            .over
    );
    assert!(
        store
            .acquire(&scope("b"), &[sec], 1, t)
            .await
            .expect("acquire")[0]
            .over
    );

    // Scopes are independent; braces in ids do not break hash tags.
    assert!(
        !store
            .acquire(&format!("team:{{odd}}-{run}"), &[sec], 3, t)
            .await
            .expect("acquire")[0]
            .over
    );

    // Concurrency: 64 clients, 10 tries each, limit 50: exactly 50 admitted.
    let lim = Limit {
        window: Window::Second,
        max: 50,
    };
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let s = store.clone();
        let sc = scope("hot");
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            for _ in 0..10 {
                n += u32::from(!s.acquire(&sc, &[lim], 1, t).await.expect("acquire")[0].over);
            }
            n
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    assert_eq!(total, 50);
}

#[test]
fn memory_store_behaves() {
    rt().block_on(behaviour(open_store("memory").expect("store")));
}

#[test]
fn redis_store_behaves() {
    let redis = RedisServer::start();
    rt().block_on(behaviour(open_store(&redis.url()).expect("store")));
}

#[test]
fn redis_cluster_store_behaves() {
    let cluster = RedisCluster::start(3);
    rt().block_on(behaviour(open_store(&cluster.url()).expect("store")));
}

/// Three ratelimit instances on one Redis, 64 clients on one agent for
/// several one-second windows: every full window admits at most the limit,
/// and at least 95 % of it.
#[test]
fn three_instances_never_over_admit_and_do_not_under_admit() {
    let redis = RedisServer::start();
    let rt = rt();
    let doc = Document::from_yaml("quotas:\n  - {agent_id: hot, rps_limit: 40}\n")
        .expect("valid")
        .policy();
    let instances: Vec<RatelimitService> = (0..3)
        .map(|_| RatelimitService::new(&doc, open_store(&redis.url()).expect("store")))
        .collect();
    let per_window: HashMap<u64, u32> = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_millis(3_500);
        let mut tasks = Vec::new();
        for c in 0..64 {
            let svc = instances[c % 3].clone();
            tasks.push(tokio::spawn(async move {
                let who = Subject {
                    agent_id: "hot".into(),
                    ..Default::default()
                };
                let mut admitted: Vec<u64> = Vec::new();
                while Instant::now() < deadline {
                    let now = now_ms();
                    if svc
                        .should_limit(&who, 1, now)
                        .await
                        .expect("store")
                        .admitted
                    {
                        admitted.push(now / 1000);
                    }
                }
                admitted
            }));
        }
        let mut m = HashMap::new();
        for t in tasks {
            for w in t.await.expect("task") {
                *m.entry(w).or_insert(0) += 1;
            }
        }
        m
    });
    let mut windows: Vec<u64> = per_window.keys().copied().collect();
    windows.sort_unstable();
    assert!(windows.len() >= 3, "{per_window:?}");
    for w in &windows {
        assert!(per_window[w] <= 40, "window {w} admitted {}", per_window[w]);
    }
    // The first and last windows are partial; the full ones must be (nearly) full.
    for w in &windows[1..windows.len() - 1] {
        assert!(
            per_window[w] >= 38,
            "window {w} under-admitted: {}",
            per_window[w]
        );
    }
}

#[test]
fn redis_outage_fails_closed_and_recovers_without_restart() {
    let mut redis = RedisServer::start();
    let rt = rt();
    let doc = Document::from_yaml("quotas:\n  - {agent_id: a, rps_limit: 1000}\n")
        .expect("valid")
        .policy();
    let svc = RatelimitService::new(&doc, open_store(&redis.url()).expect("store"));
    let who = Subject {
        agent_id: "a".into(),
        ..Default::default()
    };
    rt.block_on(async {
        assert!(
            svc.should_limit(&who, 1, now_ms())
                .await
                .expect("up")
                .admitted
        );
    });
    redis.kill();
    rt.block_on(async {
        for _ in 0..5 {
            assert!(
                svc.should_limit(&who, 1, now_ms()).await.is_err(),
                "must fail, not admit"
            );
        }
    });
    redis.restart();
    let back = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(o) = svc.should_limit(&who, 1, now_ms()).await {
                return o.admitted;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(back, "admitted again once Redis returned");
}
