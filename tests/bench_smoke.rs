//! The benchmark harness (bench/, DESIGN §11) in seconds: all three arms
//! start and run, and every request — all of them allowed — gets a 2xx.
//! The figures of a smoke run mean nothing; `clawgress-bench run` measures.

#[test]
fn every_arm_runs_and_every_allowed_request_gets_2xx() {
    let Some(envoy) = clawgress_envoy::find_envoy(None, std::env::var("PATH").ok().as_deref())
    else {
        eprintln!("skipped: no envoy on PATH (scripts/test.sh installs it)");
        return;
    };
    let o = clawgress_bench::Options::smoke(env!("CARGO_BIN_EXE_clawgress").into(), envoy);
    let runs = clawgress_bench::run(&o, &mut |_| {}).expect("the harness runs");
    for arm in clawgress_bench::ARMS {
        for kind in ["closed", "open@0.50", "connect"] {
            let r = runs
                .iter()
                .find(|r| r.arm == arm && r.kind == kind)
                .unwrap_or_else(|| panic!("no {kind} run of {arm}"));
            assert!(r.ok > 0, "{arm} {kind}: nothing answered: {r:?}");
            assert_eq!((r.non_2xx, r.errors), (0, 0), "{arm} {kind}: {r:?}");
            assert!(
                r.envoy_cpu_us_per_req > 0.0,
                "{arm}: Envoy's CPU is read: {r:?}"
            );
        }
    }
    // Both holds: CONNECT tunnels, and keep-alive connections.
    for prefix in ["hold", "keep-alive"] {
        let held = runs
            .iter()
            .find(|r| r.kind.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} run"));
        assert_eq!(
            (held.ok, held.non_2xx, held.errors),
            (o.hold as u64, 0, 0),
            "{held:?}"
        );
    }
    let table = clawgress_bench::report::markdown(&runs);
    assert!(table.contains("| closed | floor |"), "{table}");
}
