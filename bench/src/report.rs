//! The table and the verdicts against DESIGN §11's ratios.

use crate::Run;

/// Runs of `arm` and `kind`, pooled: medians of their figures (a run per
/// repetition).
fn pooled<'a>(runs: &'a [Run], arm: &str, kind: &str) -> Vec<&'a Run> {
    runs.iter()
        .filter(|r| r.arm == arm && r.kind == kind)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

/// The median of one figure over the runs of `arm`/`kind`.
pub fn figure(runs: &[Run], arm: &str, kind: &str, f: impl Fn(&Run) -> f64) -> f64 {
    median(pooled(runs, arm, kind).into_iter().map(f).collect())
}

/// A verdict on one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub target: String,
    pub value: f64,
    pub limit: f64,
    pub pass: bool,
}

pub fn verdicts(runs: &[Run]) -> Vec<Verdict> {
    verdicts_of(runs, "clawgress")
}

/// The verdicts for one clawgress arm (`clawgress`, or the experiment's
/// `clawgress-b`).
pub fn verdicts_of(runs: &[Run], arm: &str) -> Vec<Verdict> {
    let mut v = Vec::new();
    let added = |which: &str, f: fn(&Run) -> f64| {
        figure(runs, which, "open@0.50", f) - figure(runs, "bare", "open@0.50", f)
    };
    for (name, f) in [
        ("p50", (|r: &Run| r.p50_ms) as fn(&Run) -> f64),
        ("p99", |r: &Run| r.p99_ms),
    ] {
        let (c, fl) = (added(arm, f), added("floor", f));
        let ratio = c / fl.max(1e-3);
        v.push(Verdict {
            target: format!("added {name} at 50 % of the floor's max: clawgress ÷ floor"),
            value: ratio,
            limit: 1.25,
            pass: ratio <= 1.25,
        });
    }
    let t = figure(runs, arm, "closed", |r| r.achieved_rps)
        / figure(runs, "floor", "closed", |r| r.achieved_rps).max(1e-9);
    v.push(Verdict {
        target: "max throughput: clawgress ÷ floor".into(),
        value: t,
        limit: 0.9,
        pass: t >= 0.9,
    });
    // Only when the floor's services ran as a process of their own.
    let floor_cpu = figure(runs, "floor", "open@0.50", |r| r.services_cpu_us_per_req);
    if floor_cpu > 0.0 {
        let cpu = figure(runs, arm, "open@0.50", |r| r.services_cpu_us_per_req) / floor_cpu;
        v.push(Verdict {
            target: "services' CPU per request at 50 %: clawgress ÷ floor".into(),
            value: cpu,
            limit: 1.5,
            pass: cpu <= 1.5,
        });
    }
    for (prefix, what) in [
        ("hold ", "concurrent CONNECT tunnels through clawgress"),
        (
            "keep-alive ",
            "keep-alive connections held open at once through clawgress (a proxied request each before and after)",
        ),
    ] {
        if let Some(h) = runs
            .iter()
            .find(|r| r.arm == arm && r.kind.starts_with(prefix))
        {
            let held = h.ok as f64;
            let want = 10_000.0;
            v.push(Verdict {
                target: format!(
                    "{what}, all 2xx (held {})",
                    h.kind.trim_start_matches(prefix)
                ),
                value: held,
                limit: want,
                pass: held >= want && h.errors == 0 && h.non_2xx == 0,
            });
        }
    }
    v
}

/// The Markdown table: one row per arm and kind (medians over repetitions).
pub fn markdown(runs: &[Run]) -> String {
    let mut kinds: Vec<String> = Vec::new();
    for r in runs {
        if !kinds.contains(&r.kind) {
            kinds.push(r.kind.clone());
        }
    }
    let mut s = String::from(
        "| run | arm | offered req/s | achieved req/s | p50 ms | p90 ms | p99 ms | max ms | added p50 / p99 ms | Envoy CPU µs/req | services CPU µs/req | Envoy / services peak RSS MiB | non-2xx | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for k in &kinds {
        for arm in crate::ARMS.into_iter().chain([crate::COMPARE_ARM]) {
            let rs = pooled(runs, arm, k);
            if rs.is_empty() {
                continue;
            }
            let f = |g: fn(&Run) -> f64| figure(runs, arm, k, g);
            let added = if arm == "bare" || !runs.iter().any(|r| r.arm == "bare" && &r.kind == k) {
                "—".to_string()
            } else {
                format!(
                    "{:.2} / {:.2}",
                    f(|r| r.p50_ms) - figure(runs, "bare", k, |r| r.p50_ms),
                    f(|r| r.p99_ms) - figure(runs, "bare", k, |r| r.p99_ms)
                )
            };
            s.push_str(&format!(
                "| {k} | {arm} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {added} | {:.0} | {:.0} | {:.0} / {:.0} | {} | {} |\n",
                rs[0].offered_rps.map_or("—".to_string(), |o| format!("{o:.0}")),
                f(|r| r.achieved_rps),
                f(|r| r.p50_ms),
                f(|r| r.p90_ms),
                f(|r| r.p99_ms),
                f(|r| r.max_ms),
                f(|r| r.envoy_cpu_us_per_req),
                f(|r| r.services_cpu_us_per_req),
                f(|r| r.envoy_peak_rss_mib),
                f(|r| r.services_peak_rss_mib),
                rs.iter().map(|r| r.non_2xx).sum::<u64>(),
                rs.iter().map(|r| r.errors).sum::<u64>(),
            ));
        }
    }
    s.push_str("\n| target (DESIGN §11) | measured | limit | |\n|---|---:|---:|---|\n");
    for v in verdicts(runs) {
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {} |\n",
            v.target,
            v.value,
            v.limit,
            if v.pass { "pass" } else { "**miss**" }
        ));
    }
    if runs.iter().any(|r| r.arm == crate::COMPARE_ARM) {
        s.push_str("\n| the same for the experiment arm `clawgress-b` | measured | limit | |\n|---|---:|---:|---|\n");
        for v in verdicts_of(runs, crate::COMPARE_ARM) {
            s.push_str(&format!(
                "| {} | {:.2} | {:.2} | {} |\n",
                v.target.replace("clawgress ÷", "clawgress-b ÷"),
                v.value,
                v.limit,
                if v.pass { "pass" } else { "**miss**" }
            ));
        }
    }
    s
}
