//! `clawgress serve authz|ratelimit|audit`: one service in this process, on
//! a TCP address or a Unix socket, until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::{metrics, node};

/// Where a service listens: `host:port` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        s.parse()
            .map(Listen::Tcp)
            .map_err(|_| format!("{s:?} is neither host:port nor unix:/path"))
    }
}

/// The services `serve` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Authz,
    Ratelimit,
    Audit,
    Admin,
}

/// Where authz and ratelimit take their policy from.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    /// Watch signed bundles in this directory (`state_dir/bundle`).
    pub bundle_dir: Option<PathBuf>,
    /// The pinned control-plane key (default `state_dir/keys/bundle.pub`).
    pub bundle_key: Option<PathBuf>,
    /// Fetch bundles from the control plane (`…/api/v1/bundle`) into
    /// `bundle_dir` (a fleet node).
    pub bundle_url: Option<String>,
    /// A viewer token for `bundle_url`.
    pub bundle_token_file: Option<PathBuf>,
}

/// The policy to start from: the newest verified bundle when bundles are
/// used, else the config file's own policy part.
fn bundle_source(src: &PolicySource, state: &Path) -> Result<Option<crate::bundles::Source>> {
    let Some(dir) = &src.bundle_dir else {
        return Ok(None);
    };
    node::private_dir(dir)?;
    let key = src
        .bundle_key
        .clone()
        .unwrap_or_else(|| node::keys_dir(state).join("bundle.pub"));
    Ok(Some(crate::bundles::Source::new(dir.clone(), &key)?))
}

/// Tell the control plane which revision this service enforces now.
fn report_loaded(dir: &Path, service: &str, revision: u64) {
    if let Err(e) = node::write_private(
        &dir.join(format!("loaded-{service}")),
        format!("{revision}\n").as_bytes(),
    ) {
        tracing::warn!(error = %e, "cannot report the loaded revision");
    }
}

/// Resolves when SIGTERM or SIGINT arrives. The handlers are installed by
/// this call, not when the future is first polled, so a signal that comes
/// before serving starts is not lost to the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            // Without handlers the default action still stops the process.
            _ => std::future::pending::<()>().await,
        }
    }
}

async fn expose(listen: Option<Listen>, registry: Registry) -> Result<()> {
    match listen {
        Some(l) => http_on(l, metrics_handler(Arc::new(registry))).await,
        None => Ok(()),
    }
}

/// On every SIGHUP, re-read and validate `config` and hand it to `apply`.
/// A file that does not validate is rejected with an alert naming line and
/// reason, and what is in force stays. Returns the task (aborted on drop of
/// the runtime).
fn on_hangup<F>(config: &Path, apply: F) -> Result<tokio::task::JoinHandle<()>>
where
    F: Fn(&clawgress_policy::Document) + Send + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let config = config.to_path_buf();
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match node::load(&config) {
                Ok(doc) => {
                    apply(&doc);
                    tracing::info!(revision = node::revision_of(&doc), "config reloaded");
                }
                Err(e) => {
                    tracing::error!(alert = "config-rejected", error = %format!("{e:#}"), "reload refused; the previous config stays in force");
                }
            }
        }
    }))
}

static SOCKET_GROUP: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// `--socket-group`: the group that may connect to this process's Unix
/// listeners (Envoy's, when `up` runs it as `nft.envoy_user`).
pub fn set_socket_group(gid: Option<u32>) {
    if let Some(g) = gid {
        let _ = SOCKET_GROUP.set(g);
    }
}

static NODE_SETTINGS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `--node-settings`: this node's settings as `up` fixed them at its start.
pub fn set_node_settings(file: Option<PathBuf>) {
    if let Some(f) = file {
        let _ = NODE_SETTINGS.set(f);
    }
}

/// The config file, with this node's settings from `--node-settings` when
/// given (the file's own may have been edited since `up` started: they take
/// effect when it restarts, not when one child does).
fn load_config(config: &Path) -> Result<clawgress_policy::Document> {
    let doc = node::load(config)?;
    let Some(file) = NODE_SETTINGS.get() else {
        return Ok(doc);
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let settings = serde_json::from_str(&text)
        .with_context(|| format!("{} holds no node settings", file.display()))?;
    Ok(doc.with_node(settings))
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    // A socket file left by a killed predecessor would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    if let Some(gid) = SOCKET_GROUP.get() {
        node::share_with_group(path, *gid, 0o660)?;
    }
    Ok(l)
}

/// Bind `$listen` (TCP or Unix), then evaluate `$body` (a future) with
/// `$inc` bound to the listener's stream and `$sd` to the shutdown signal.
macro_rules! serve_on {
    ($listen:expr, |$inc:ident, $sd:ident| $body:expr) => {
        match $listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                let ($inc, $sd) = (TcpListenerStream::new(l), shutdown_signal());
                $body.await?
            }
            Listen::Unix(path) => {
                let l = bind_unix(&path)?;
                let ($inc, $sd) = (UnixListenerStream::new(l), shutdown_signal());
                $body.await?
            }
        }
    };
}

/// Bind `$listen` (TCP or Unix) and serve it with `$run` (a service's
/// `run(service, incoming, shutdown)`) on pinned per-core runtimes
/// (`crate::pinned`) until SIGTERM or SIGINT.
macro_rules! serve_pinned {
    ($listen:expr, $svc:expr, $run:path) => {{
        let svc = $svc;
        let workers = crate::pinned::workers();
        tracing::info!(workers, "serving on pinned per-core runtimes");
        let grace = std::time::Duration::from_secs(5);
        match $listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                crate::pinned::serve(l, workers, shutdown_signal(), grace, move |inc, sd| {
                    let svc = svc.clone();
                    Box::pin(async move { Ok($run(svc, inc, sd).await?) })
                })
                .await?
            }
            Listen::Unix(path) => {
                let l = bind_unix(&path)?;
                crate::pinned::serve(l, workers, shutdown_signal(), grace, move |inc, sd| {
                    let svc = svc.clone();
                    Box::pin(async move { Ok($run(svc, inc, sd).await?) })
                })
                .await?
            }
        }
    }};
}

/// Serve `handler` on `listen` (TCP or Unix) until the process ends.
pub async fn http_on(listen: Listen, handler: metrics::Handler) -> Result<()> {
    match listen {
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(metrics::answer(s, handler.clone()));
                }
            });
        }
        Listen::Unix(path) => {
            let l = bind_unix(&path)?;
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(metrics::answer(s, handler.clone()));
                }
            });
        }
    }
    Ok(())
}

/// `/metrics` from `registry`, `/healthz` always 200.
fn metrics_handler(registry: Arc<Registry>) -> metrics::Handler {
    Arc::new(move |path: &str| {
        let reply = match path {
            "/metrics" => (200, metrics::OPENMETRICS, metrics::encode(&registry)),
            "/healthz" => (200, "text/plain", "ok\n".to_string()),
            _ => (404, "text/plain", "not found\n".to_string()),
        };
        Box::pin(async move { reply })
    })
}

pub async fn serve(
    service: Service,
    config: &Path,
    state_dir: Option<&Path>,
    listen: Listen,
    metrics_listen: Option<Listen>,
    policy_source: PolicySource,
    mut registry: Registry,
) -> Result<()> {
    let doc = load_config(config)?;
    let state = node::state_dir(state_dir, Some(&doc), &|k| std::env::var(k).ok())?;
    // Before anything can raise an alert (a kept bundle rejected at start):
    // every alert is also an audit record (§10).
    let spool = node::spool_dir(&doc, &state);
    if node::private_dir(&spool).is_ok() {
        crate::metrics::record_alerts_in(
            node::events_spool(&doc, &state),
            &format!("{service:?}").to_lowercase(),
        );
    }
    let bundles = match service {
        Service::Authz | Service::Ratelimit => bundle_source(&policy_source, &state)?,
        _ => None,
    };
    let _puller = match (&bundles, &policy_source.bundle_url) {
        (Some(b), Some(url)) => {
            let file = policy_source.bundle_token_file.clone().ok_or_else(|| {
                anyhow::anyhow!("--bundle-url needs --bundle-token-file (a viewer token)")
            })?;
            let token = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .trim()
                .to_string();
            Some(crate::bundles::pull(url.clone(), token, b.clone()))
        }
        (None, Some(_)) => {
            anyhow::bail!("--bundle-url needs --bundle-dir (where fetched bundles are kept)")
        }
        _ => None,
    };
    let initial = bundles.as_ref().and_then(|b| b.initial());
    // Bundles were kept here, yet none verifies (removed, damaged): the
    // config file's policy may be revisions behind (a lockdown, a disabled
    // agent undone), so nothing is allowed until a verified bundle comes.
    let none_verifies = bundles.as_ref().is_some_and(|b| b.any_kept()) && initial.is_none();
    if none_verifies {
        tracing::error!(
            alert = "bundle-rejected",
            "no kept bundle verifies: denying every request (default-deny) until a verified bundle arrives; commit again, or restore bundle/last-good"
        );
    } else if bundles.is_some() && initial.is_none() {
        tracing::warn!(
            "no verified bundle yet: enforcing the config file's policy until one arrives"
        );
    }
    // The document in force: this node's settings with the bundle's policy.
    let start_doc = match &initial {
        Some(f) => doc.clone().with_policy(f.document.clone()),
        None if none_verifies => {
            let mut closed = doc.policy();
            closed.policies.clear();
            doc.clone().with_policy(closed)
        }
        None => doc.clone(),
    };
    let revision_name = |doc: &clawgress_policy::Document, rev: Option<u64>| match rev {
        Some(r) => r.to_string(),
        None => node::revision_of(doc),
    };
    let start_rev = initial.as_ref().map(|f| f.revision);
    tracing::info!(service = ?service, listen = ?listen, revision = revision_name(&start_doc, start_rev), "starting");
    let name = format!("{service:?}").to_lowercase();
    if let (Some(b), Some(r)) = (&bundles, start_rev) {
        report_loaded(&b.dir, &name, r);
    }
    match service {
        Service::Authz => {
            // JWKS fetched from URLs, last good copies on disk.
            let all_urls: Vec<String> = crate::jwks::urls(&start_doc.jwt.issuers)
                .into_iter()
                .map(|(_, u, _)| u)
                .collect();
            let cache = Arc::new(crate::jwks::Cache::load(state.join("jwks"), &all_urls));
            let authz_config = {
                let cache = cache.clone();
                move |doc: &clawgress_policy::Document, rev: Option<u64>| -> Result<_, String> {
                    Ok(clawgress_authz::Config {
                        policy: doc.policy(),
                        private_allowed: doc.gateway.private_destinations_allowed.clone(),
                        revision: revision_name(doc, rev),
                        jwt: Arc::new(node::jwt_verifier_with(doc, &cache.snapshot())?),
                    })
                }
            };
            // What is in force, for rebuilding when keys change.
            let current = Arc::new(std::sync::Mutex::new((start_doc.clone(), start_rev)));
            let mut svc = clawgress_authz::AuthzService::new(
                &authz_config(&start_doc, start_rev).map_err(|e| anyhow::anyhow!(e))?,
            );
            // quota_check: authz — count quotas here, one side call less.
            let limiter = if doc.gateway.quota_check == clawgress_policy::config::QuotaCheck::Authz
            {
                let store = clawgress_ratelimit::open_store(&doc.stores.ratelimit)
                    .map_err(|e| anyhow::anyhow!("stores.ratelimit: {e}"))?;
                let rl = clawgress_ratelimit::RatelimitService::new(&start_doc.policy(), store)
                    .fail_open(
                        doc.stores.ratelimit_failure_mode
                            == clawgress_policy::config::FailureMode::Allow,
                    );
                rl.register_metrics(&mut registry, false);
                svc = svc.with_quota_gate(Arc::new(crate::quota::Gate(rl.clone())));
                tracing::info!(store = %doc.stores.ratelimit, "quotas checked inside Check (quota_check: authz)");
                Some(rl)
            } else {
                None
            };
            let _jwks = {
                let (cur, cur2, s, make) = (
                    current.clone(),
                    current.clone(),
                    svc.clone(),
                    authz_config.clone(),
                );
                crate::jwks::spawn(
                    cache.clone(),
                    move || {
                        cur.lock()
                            .map(|c| c.0.jwt.issuers.clone())
                            .unwrap_or_default()
                    },
                    move || {
                        let Ok(c) = cur2.lock() else { return };
                        match make(&c.0, c.1) {
                            Ok(cfg) => s.reload(&cfg),
                            Err(e) => {
                                tracing::error!(alert = "jwks-rejected", error = %e, "new JWKS refused")
                            }
                        }
                    },
                )
            };
            let _watch = svc.watch_audit_block(node::audit_blocked_mark(&state));
            svc.register_metrics(&mut registry);
            crate::bundles::register_metrics(&mut registry);
            expose(metrics_listen, registry).await?;
            let s = svc.clone();
            let _reloader = match bundles {
                Some(b) => {
                    let (dir, base) = (b.dir.clone(), doc.clone());
                    let _hup = on_hangup(config, |_| {
                        tracing::info!(
                            "policy comes from signed bundles; SIGHUP changes nothing here"
                        )
                    })?;
                    let current = current.clone();
                    let limiter = limiter.clone();
                    b.watch(start_rev, move |f| {
                        let d = base.clone().with_policy(f.document.clone());
                        match authz_config(&d, Some(f.revision)) {
                            Ok(c) => {
                                s.reload(&c);
                                if let Some(rl) = &limiter {
                                    rl.reload(&f.document);
                                }
                                if let Ok(mut cur) = current.lock() {
                                    *cur = (d, Some(f.revision));
                                }
                                report_loaded(&dir, "authz", f.revision);
                            }
                            Err(e) => tracing::error!(alert = "bundle-rejected", error = %e, "bundle refused"),
                        }
                    })
                }
                None => {
                    let current = current.clone();
                    let limiter = limiter.clone();
                    on_hangup(config, move |doc| match authz_config(doc, None) {
                        Ok(c) => {
                            s.reload(&c);
                            if let Some(rl) = &limiter {
                                rl.reload(&doc.policy());
                            }
                            if let Ok(mut cur) = current.lock() {
                                *cur = (doc.clone(), None);
                            }
                        }
                        Err(e) => {
                            tracing::error!(alert = "config-rejected", error = %e, "reload refused")
                        }
                    })?
                }
            };
            serve_pinned!(listen, svc, clawgress_authz::run);
        }
        Service::Ratelimit => {
            let store = clawgress_ratelimit::open_store(&doc.stores.ratelimit)
                .map_err(|e| anyhow::anyhow!("stores.ratelimit: {e}"))?;
            tracing::info!(store = %doc.stores.ratelimit, "counter store");
            let fail_open =
                doc.stores.ratelimit_failure_mode == clawgress_policy::config::FailureMode::Allow;
            if fail_open {
                tracing::warn!("stores.ratelimit_failure_mode is allow: a counter-store outage lets requests through unlimited");
            }
            let svc = clawgress_ratelimit::RatelimitService::new(&start_doc.policy(), store)
                .fail_open(fail_open);
            svc.register_metrics(&mut registry, true);
            svc.set_revision(&revision_name(&start_doc, start_rev));
            crate::bundles::register_metrics(&mut registry);
            expose(metrics_listen, registry).await?;
            let s = svc.clone();
            let _reloader = match bundles {
                Some(b) => {
                    let dir = b.dir.clone();
                    let _hup = on_hangup(config, |_| {
                        tracing::info!(
                            "policy comes from signed bundles; SIGHUP changes nothing here"
                        )
                    })?;
                    b.watch(start_rev, move |f| {
                        s.reload(&f.document);
                        s.set_revision(&f.revision.to_string());
                        report_loaded(&dir, "ratelimit", f.revision);
                    })
                }
                None => on_hangup(config, move |doc| {
                    s.reload(&doc.policy());
                    s.set_revision(&revision_name(doc, None));
                })?,
            };
            serve_pinned!(listen, svc, clawgress_ratelimit::run);
        }
        Service::Admin => {
            let ctl = admin_control(&doc, &state).await?;
            import_config(&ctl, config, &doc, true).await;
            let c = ctl.clone();
            let cfg = config.to_path_buf();
            let _reloader = {
                use tokio::signal::unix::{signal, SignalKind};
                let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match node::load(&cfg) {
                            Ok(d) => import_config(&c, &cfg, &d, false).await,
                            Err(e) => {
                                tracing::error!(alert = "config-rejected", error = %format!("{e:#}"), "reload refused; nothing changed")
                            }
                        }
                    }
                })
            };
            expose(metrics_listen, registry).await?;
            let extra =
                axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
            match listen {
                Listen::Tcp(addr) => {
                    let l = TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?;
                    clawgress_admin::run(ctl, l, extra, shutdown_signal()).await?;
                }
                Listen::Unix(path) => {
                    let l = bind_unix(&path)?;
                    clawgress_admin::run(ctl, l, extra, shutdown_signal()).await?;
                }
            }
        }
        Service::Audit => {
            let dir = node::audit_dir(&doc, &state);
            let key = clawgress_audit_sink::AuditKey::load_or_create(&node::keys_dir(&state))
                .context("audit signing key")?;
            let writer = clawgress_audit_sink::JsonlWriter::open_with(
                &dir,
                Some(key),
                doc.audit.segment_records,
            )
            .with_context(|| format!("cannot open audit log in {}", dir.display()))?;
            // Both settings follow the spool file (`grpc` streams entries
            // too, and each is kept once): with `grpc`, what Envoy could not
            // stream while the sink was away is in the file (§6). A sink on
            // another host, whose Envoy writes no file here, waits for one.
            let input = match doc.gateway.audit_input {
                clawgress_policy::config::AuditInput::Grpc
                | clawgress_policy::config::AuditInput::File => {
                    node::private_dir(&spool)?;
                    clawgress_audit_sink::Input::File {
                        log: node::access_log_file(&doc, &state),
                        checkpoint: spool.join("checkpoint"),
                    }
                }
            };
            // The spool is watched too when it is used (file input).
            let mut watched = vec![dir.clone()];
            if let clawgress_audit_sink::Input::File { log, .. } = &input {
                watched.extend(log.parent().map(Path::to_path_buf));
            }
            let guard = clawgress_audit_sink::DiskGuard::new(
                watched,
                doc.audit.min_free_mb,
                node::audit_blocked_mark(&state),
            )
            .allow_when_full(doc.audit.on_full == clawgress_policy::config::OnFull::Allow);
            tracing::info!(audit_dir = %dir.display(), input = ?input, min_free_mb = doc.audit.min_free_mb, "audit log open");
            let audit_metrics = clawgress_audit_sink::AuditMetrics::default();
            audit_metrics.register(&mut registry);
            expose(metrics_listen, registry).await?;
            // Nothing to reload here, but SIGHUP must not stop the sink.
            let _reloader = on_hangup(config, |_| {})?;
            let extras = clawgress_audit_sink::Extras {
                events: Some((
                    node::events_spool(&doc, &state),
                    node::spool_dir(&doc, &state).join("events.checkpoint"),
                )),
                query_store: Some(match node::audit_query(&doc, &state) {
                    node::AuditQuery::Sqlite(p) => clawgress_audit_sink::query::Target::Sqlite(p),
                    node::AuditQuery::Postgres(u) => {
                        clawgress_audit_sink::query::Target::Postgres(u)
                    }
                }),
                log: Some(dir.clone()),
            };
            serve_on!(listen, |inc, sd| clawgress_audit_sink::run(
                writer,
                input,
                extras,
                audit_metrics,
                Some(guard),
                inc,
                sd
            ));
        }
    }
    tracing::info!(service = ?service, "stopped");
    Ok(())
}

/// The control plane over this node's store (`stores.control_plane`).
async fn admin_control(
    doc: &clawgress_policy::Document,
    state: &Path,
) -> Result<Arc<clawgress_admin::Control>> {
    let cp = doc.stores.control_plane.as_str();
    node::private_dir(state)?;
    let store: Arc<dyn clawgress_admin::Store> = if cp == "sqlite" {
        Arc::new(
            clawgress_admin::SqliteStore::open(&state.join("admin.db"))
                .await
                .with_context(|| format!("cannot open {}", state.join("admin.db").display()))?,
        )
    } else {
        // A URL may carry a password: never log it whole.
        let shown = cp.split('@').next_back().unwrap_or("");
        Arc::new(
            clawgress_admin::PgStore::connect(cp)
                .await
                .with_context(|| {
                    format!("stores.control_plane: cannot use PostgreSQL at {shown}")
                })?,
        )
    };
    let key = clawgress_admin::bundle_key(&node::keys_dir(state))?;
    if let Some(_token) =
        clawgress_admin::bootstrap_token(&*store, &state.join("admin.token")).await?
    {
        tracing::info!(file = %state.join("admin.token").display(), "bootstrap admin token created");
    }
    let bundle_dir = crate::bundles::bundle_dir(state);
    node::private_dir(&bundle_dir)?;
    let spool = node::events_spool(doc, state);
    let on_event = move |e: &clawgress_admin::store::Event| {
        crate::metrics::append_event(
            &spool,
            &clawgress_audit_log::SpoolEvent {
                kind: clawgress_audit_log::RecordKind::Admin,
                id: crate::metrics::event_id(),
                timestamp: crate::metrics::now_rfc3339(),
                what: e.action.clone(),
                actor: e.actor.clone(),
                detail: e.summary.clone(),
                result: e.result.clone(),
            },
        )
    };
    Ok(Arc::new(clawgress_admin::Control::new(
        clawgress_admin::Config {
            store,
            key,
            bundle_dir,
            rollout_wait: std::time::Duration::from_secs(3),
            on_event: Some(Box::new(on_event)),
            audit_db: Some(match node::audit_query(doc, state) {
                node::AuditQuery::Sqlite(p) => clawgress_admin::audit::AuditStore::Sqlite(p),
                node::AuditQuery::Postgres(u) => clawgress_admin::audit::AuditStore::Postgres(u),
            }),
            audit_log: Some(clawgress_admin::audit::AuditLog {
                dir: node::audit_dir(doc, state),
                public_key: node::keys_dir(state).join("audit.pub"),
            }),
        },
    )))
}

/// Commit the config file's policy part as a new revision (actor
/// `file:FILE`) when it changed. At start only if nothing is active yet or
/// the file changed since it was last imported, so a restart does not undo
/// what operators committed through the API.
async fn import_config(
    ctl: &clawgress_admin::Control,
    file: &Path,
    doc: &clawgress_policy::Document,
    at_start: bool,
) {
    let actor = format!("file:{}", file.display());
    let value = match serde_json::from_str(&doc.policy().to_canonical_json()) {
        Ok(v) => v,
        Err(_) => return,
    };
    if at_start {
        match ctl.last_import(&actor).await {
            Ok(Some(last)) if last == value => {
                if let Err(e) = ctl.ensure_published().await {
                    tracing::error!(error = %e, "cannot publish the active bundle");
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot read the store");
                return;
            }
        }
    }
    match ctl.import(&actor, &value).await {
        Ok(Some(c)) => tracing::info!(revision = c.revision, actor, "config file committed"),
        Ok(None) => tracing::info!(actor, "config file's policy is unchanged"),
        Err(e) => {
            tracing::error!(alert = "config-rejected", error = %e, "config file not committed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert!(matches!(
            "127.0.0.1:0".parse::<Listen>(),
            Ok(Listen::Tcp(_))
        ));
        assert!("unix:".parse::<Listen>().is_err());
        assert!("nowhere".parse::<Listen>().is_err());
    }
}
