//! Load run: the real `RateLimitService` over gRPC (tonic, loopback TCP),
//! hammered by concurrent clients for a fixed time; prints calls/s and
//! p50/p99 latency. Bounded: stops by itself.
//!
//!   cargo run --release -p clawgress-ratelimit --example rls_load -- memory
//!   cargo run --release -p clawgress-ratelimit --example rls_load -- redis://127.0.0.1:6379
//!
//! Optional 2nd/3rd arguments: seconds (default 5), concurrent clients (64).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawgress_policy::Document;
use clawgress_ratelimit::{open_store, run, RatelimitService};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use hdrhistogram::Histogram;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let store_spec = args.get(1).cloned().unwrap_or_else(|| "memory".into());
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let clients: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);

    let mut y = String::from("quotas:\n");
    for i in 0..1000 {
        y.push_str(&format!(
            "  - {{agent_id: a{i}, rps_limit: 1000000, rpm_limit: 100000000}}\n"
        ));
    }
    let doc = Document::from_yaml(&y).expect("valid").policy();
    let store = open_store(&store_spec).expect("store");
    let svc = RatelimitService::new(&doc, store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(run(
        svc,
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        std::future::pending(),
    ));
    // A few HTTP/2 connections, shared by the clients, as Envoy does.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(
            RateLimitServiceClient::connect(url.clone())
                .await
                .expect("connect"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let hist = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist"),
    ));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = conns[c % conns.len()].clone();
        let hist = hist.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
            let mut n = 0u64;
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let req = RateLimitRequest {
                    domain: "clawgress".into(),
                    descriptors: vec![RateLimitDescriptor {
                        entries: vec![Entry {
                            key: "agent_id".into(),
                            value: format!("a{}", (c * 7919 + n as usize) % 1000),
                        }],
                        ..Default::default()
                    }],
                    hits_addend: 1,
                };
                let t = Instant::now();
                match client.should_rate_limit(req).await {
                    Ok(_) => {
                        let _ = local.record(t.elapsed().as_micros() as u64);
                    }
                    Err(_) => errors += 1,
                }
                n += 1;
            }
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
            (n, errors)
        }));
    }
    let mut total = 0;
    let mut errors = 0;
    for t in tasks {
        let (n, e) = t.await.expect("task");
        total += n;
        errors += e;
    }
    let h = hist.lock().expect("hist");
    println!(
        "store={store_spec} clients={clients} secs={secs}: {:.0} calls/s, p50 {} us, p99 {} us, errors {errors}",
        total as f64 / secs as f64,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
    );
}
