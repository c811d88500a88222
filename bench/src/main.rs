//! `clawgress-bench`: the three-arm benchmark (DESIGN §11). See the crate
//! docs; `run` prints a Markdown table and writes a JSON file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Clawgress against bare Envoy and the architecture's floor, in one run")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the three arms, drive them in turn, print the table.
    Run {
        /// The clawgress binary (release build recommended).
        #[arg(long, default_value = "target/release/clawgress")]
        clawgress: PathBuf,
        /// Envoy (default: `envoy` on PATH).
        #[arg(long, default_value = "envoy")]
        envoy: PathBuf,
        /// Write every run as JSON here.
        #[arg(long, default_value = "bench/results/latest.json")]
        json: PathBuf,
        /// Write the Markdown table here too.
        #[arg(long, default_value = "bench/results/latest.md")]
        markdown: PathBuf,
        /// Seconds per open-loop run.
        #[arg(long, default_value_t = 10.0)]
        open_secs: f64,
        /// Seconds per closed-loop run.
        #[arg(long, default_value_t = 8.0)]
        closed_secs: f64,
        /// Repetitions (interleaved across arms).
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Concurrent connections to hold through clawgress (0 skips).
        #[arg(long, default_value_t = 10_000)]
        hold: usize,
        /// Seconds, not minutes: a check that every arm runs.
        #[arg(long)]
        smoke: bool,
        /// Experiments: also run this clawgress binary as a fourth arm,
        /// `clawgress-b` (same config), interleaved with the others.
        #[arg(long, value_name = "BINARY")]
        compare: Option<PathBuf>,
    },
    /// Print the table again from a JSON file a run wrote.
    Report {
        #[arg(default_value = "bench/results/latest.json")]
        json: PathBuf,
    },
    /// (internal) The do-nothing gRPC services of the floor arm.
    #[command(hide = true)]
    Floor {
        #[arg(long)]
        authz: PathBuf,
        #[arg(long)]
        ratelimit: PathBuf,
        #[arg(long)]
        audit: PathBuf,
    },
    /// (internal) The upstream every arm forwards to.
    #[command(hide = true)]
    Upstream {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Report { json } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("cannot read {}", json.display()))?;
            #[derive(serde::Deserialize)]
            struct File {
                runs: Vec<clawgress_bench::Run>,
            }
            let f: File = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a bench result", json.display()))?;
            println!("{}", clawgress_bench::report::markdown(&f.runs));
            Ok(())
        }
        Cmd::Floor {
            authz,
            ratelimit,
            audit,
        } => tokio::runtime::Runtime::new()?.block_on(clawgress_bench::floor::serve(
            clawgress_bench::floor::Sockets {
                authz,
                ratelimit,
                audit,
            },
        )),
        Cmd::Upstream { listen } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind(listen).await?;
                clawgress_bench::upstream::serve(l).await?;
                Ok(())
            })
        }
        Cmd::Run {
            clawgress,
            envoy,
            json,
            markdown,
            open_secs,
            closed_secs,
            reps,
            hold,
            smoke,
            compare,
        } => {
            let exe = std::env::current_exe().context("own path")?;
            let mut o = if smoke {
                clawgress_bench::Options::smoke(clawgress, envoy)
            } else {
                clawgress_bench::Options::full(
                    clawgress,
                    envoy,
                    clawgress_bench::Helpers::Exec(exe),
                )
            };
            if !smoke {
                (o.open_secs, o.closed_secs, o.reps, o.hold) = (open_secs, closed_secs, reps, hold);
            }
            o.compare = compare;
            eprintln!(
                "bench: {} arms, {} reps, open loop {} s at {:?} of the floor's max, closed loop {} s, hold {}",
                3 + usize::from(o.compare.is_some()),
                o.reps,
                o.open_secs,
                o.levels,
                o.closed_secs,
                o.hold
            );
            let runs = clawgress_bench::run(&o, &mut |r| {
                eprintln!(
                    "  {:<10} {:<9} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>7.2} ms  non-2xx {} errors {}",
                    r.kind, r.arm, r.achieved_rps, r.p50_ms, r.p99_ms, r.non_2xx, r.errors
                )
            })?;
            let table = clawgress_bench::report::markdown(&runs);
            println!("{table}");
            for (path, text) in [
                (
                    &json,
                    serde_json::to_string_pretty(&serde_json::json!({
                        "runs": runs,
                        "verdicts": clawgress_bench::report::verdicts(&runs),
                        "options": {"open_secs": o.open_secs, "closed_secs": o.closed_secs, "reps": o.reps, "hold": o.hold, "agents": o.agents, "policies": o.policies},
                    }))?,
                ),
                (&markdown, table.clone()),
            ] {
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)?;
                }
                std::fs::write(path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            eprintln!("bench: wrote {} and {}", json.display(), markdown.display());
            Ok(())
        }
    }
}
