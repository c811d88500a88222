//! The audit sink: receives Envoy's access-log stream
//! (`AccessLogService/StreamAccessLogs`), turns each entry into one
//! [`AuditRecord`] (DESIGN.md §6) and appends it through a [`RecordWriter`].
//!
//! The request path never waits for this service: Envoy buffers and streams
//! access logs after the response. Entries are handed from the gRPC handler
//! to a single writer thread over a channel, so file I/O never blocks the
//! gRPC runtime and records keep one order.
//! Depends on `clawgress-audit-log` only; never on another service.

mod disk;
mod entry;
pub mod query;
mod tail;
mod writer;

use std::future::Future;
use std::path::{Path, PathBuf};

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clawgress_audit_log::AuditRecord;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

pub use disk::{free_bytes, DiskGuard};
pub use entry::{record_from_entry, Entry};
pub use tail::{Checkpoint, Position};
pub use writer::{
    list_segments, read_checkpoints, read_log, segment_name, AuditKey, JsonlWriter, LogText,
    RecordWriter, SegmentInfo, WriterError, KEY_NAME,
};

/// What flows to the writer thread.
#[derive(Debug)]
pub enum Msg {
    Record(Box<AuditRecord>),
    /// Every record of one read of the access-log file, in order.
    Records(Vec<AuditRecord>),
    /// Save this input position once every record before it is on disk.
    Checkpoint(Checkpoint),
    /// Time passed: seal what is unsealed (a signed log checkpoint).
    Tick,
}

/// Seal the log every this many records ...
const SEAL_EVERY: u64 = 1000;
/// ... and at least this often while records arrive.
const SEAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The sink's metrics (DESIGN.md §10). Cheap to clone; clones share values.
#[derive(Debug, Clone, Default)]
pub struct AuditMetrics {
    /// `clawgress_audit_records_total`
    pub records: Counter,
    /// `clawgress_audit_spool_bytes`: access-log bytes not yet ingested.
    pub spool_bytes: Gauge,
    /// `clawgress_audit_lag_seconds`: age of the newest record when written.
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `clawgress_audit_checkpoint_records`: records under the latest
    /// signed checkpoint.
    pub checkpoint_records: Gauge,
    /// `clawgress_audit_checkpoint_timestamp_seconds`: when it was signed.
    pub checkpoint_time: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl AuditMetrics {
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "clawgress_audit_records",
            "Audit records written",
            self.records.clone(),
        );
        reg.register(
            "clawgress_audit_spool_bytes",
            "Bytes of Envoy's access-log spool not yet ingested",
            self.spool_bytes.clone(),
        );
        reg.register(
            "clawgress_audit_lag_seconds",
            "Age of the newest audit record when it was written",
            self.lag_seconds.clone(),
        );
        reg.register(
            "clawgress_audit_checkpoint_records",
            "Records covered by the latest signed checkpoint",
            self.checkpoint_records.clone(),
        );
        reg.register(
            "clawgress_audit_checkpoint_timestamp_seconds",
            "When the latest signed checkpoint was written (Unix seconds)",
            self.checkpoint_time.clone(),
        );
    }
}

/// Where access-log entries come from (`gateway.audit_input`).
#[derive(Debug, Clone)]
pub enum Input {
    /// Envoy's gRPC access-log stream only.
    Grpc,
    /// Envoy's JSON access-log file (the spool), followed from the offset
    /// saved in `checkpoint`. The gRPC service is still served.
    File { log: PathBuf, checkpoint: PathBuf },
}

/// What the sink does besides the access-log input: follow the events
/// spool (alerts, admin actions) and keep the query store.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// The events spool and its checkpoint file.
    pub events: Option<(PathBuf, PathBuf)>,
    /// The query store (`stores.audit_query`: SQLite `state_dir/audit.db`
    /// or PostgreSQL).
    pub query_store: Option<query::Target>,
    /// The log the query store catches up from (`audit_dir`).
    pub log: Option<PathBuf>,
}

/// Where records go.
#[derive(Debug, Clone)]
pub struct Config {
    /// `stores.audit_dir`: holds the segment files.
    pub audit_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("audit gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("audit writer: {0}")]
    Writer(#[from] WriterError),
    #[error("audit writer thread panicked")]
    WriterPanicked,
}

/// Records queued between the gRPC handler and the writer thread. Bounded so
/// a stalled disk shows as backpressure on Envoy's stream (which buffers on
/// its side) instead of unbounded memory here.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct AuditService {
    tx: mpsc::Sender<Msg>,
}

#[tonic::async_trait]
impl AccessLogService for AuditService {
    async fn stream_access_logs(
        &self,
        request: tonic::Request<tonic::Streaming<StreamAccessLogsMessage>>,
    ) -> Result<tonic::Response<StreamAccessLogsResponse>, tonic::Status> {
        let mut stream = request.into_inner();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            let Some(LogEntries::HttpLogs(logs)) = msg.log_entries else {
                continue;
            };
            for entry in &logs.log_entry {
                let record = Box::new(record_from_entry(entry));
                if self.tx.send(Msg::Record(record)).await.is_err() {
                    return Err(tonic::Status::unavailable("audit writer stopped"));
                }
            }
        }
        Ok(tonic::Response::new(StreamAccessLogsResponse {}))
    }
}

/// Serve the access-log stream on `incoming` (and follow the access-log
/// file, with [`Input::File`]) until `shutdown`, writing with `writer`. On
/// shutdown every record already received is written before this returns.
pub async fn run<W, I, IO, IE, F>(
    writer: W,
    input: Input,
    extras: Extras,
    metrics: AuditMetrics,
    guard: Option<DiskGuard>,
    incoming: I,
    shutdown: F,
) -> Result<(), Error>
where
    W: RecordWriter + 'static,
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()> + Send,
{
    let (tx, rx) = mpsc::channel(QUEUE);
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let m = metrics.clone();
    // The query store has a thread of its own, fed the batches the writer
    // has synced: the chain's append never waits on SQLite, only a full
    // hand-over queue (persistent backlog) slows it down.
    let (query_tx, query_thread) = match extras.query_store.clone() {
        Some(target) => {
            let (qtx, qrx) = std::sync::mpsc::sync_channel::<Vec<AuditRecord>>(QUERY_QUEUE);
            let log = extras.log.clone();
            let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let d = dropped.clone();
            let t = std::thread::Builder::new()
                .name("audit-query".into())
                .spawn(move || query_loop(&target, log.as_deref(), qrx, &d))
                .map_err(|e| Error::Writer(WriterError::Io(e)))?;
            (Some((qtx, dropped)), Some(t))
        }
        None => (None, None),
    };
    let writer_thread = std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || {
            let r = write_loop(writer, rx, &m, guard, query_tx);
            let _ = stopped_tx.send(());
            r
        })
        .map_err(|e| Error::Writer(WriterError::Io(e)))?;
    let stop_tail = Arc::new(AtomicBool::new(false));
    let mut tails = Vec::new();
    if let Input::File { log, checkpoint } = input {
        let (tx, stop) = (tx.clone(), stop_tail.clone());
        let spool = metrics.spool_bytes.clone();
        tails.push(
            std::thread::Builder::new()
                .name("audit-tail".into())
                .spawn(move || {
                    tail::follow(log, checkpoint, tx, stop, spool, tail::access_log_line)
                })
                .map_err(|e| Error::Writer(WriterError::Io(e)))?,
        );
    }
    if let Some((log, checkpoint)) = extras.events {
        let (tx, stop) = (tx.clone(), stop_tail.clone());
        let unused = prometheus_client::metrics::gauge::Gauge::default();
        tails.push(
            std::thread::Builder::new()
                .name("audit-events".into())
                .spawn(move || tail::follow(log, checkpoint, tx, stop, unused, tail::event_line))
                .map_err(|e| Error::Writer(WriterError::Io(e)))?,
        );
    }
    let ticker = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SEAL_INTERVAL);
            loop {
                every.tick().await;
                if tx.send(Msg::Tick).await.is_err() {
                    break;
                }
            }
        })
    };
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(AccessLogServiceServer::new(AuditService { tx }))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = drain_rx.await;
        });
    // Boxed so that dropping it below really drops the server, and with it
    // every record sender the writer is waiting on.
    let mut server = Box::pin(server);
    let served = tokio::select! {
        r = &mut server => r,
        // Stop on the caller's signal, or when the writer has died (the
        // process then exits with its error and the supervisor restarts it).
        _ = async { tokio::select! { _ = shutdown => {}, _ = stopped_rx => {} } } => {
            let _ = drain_tx.send(());
            // Envoy keeps its access-log stream open for good: give open
            // streams a bounded grace period, then drop them.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    drop(server);
    ticker.abort();
    let _ = ticker.await;
    stop_tail.store(true, Ordering::Relaxed);
    let mut tailed = Ok(());
    for t in tails {
        let r = tokio::task::spawn_blocking(move || t.join())
            .await
            .map_err(|_| Error::WriterPanicked)?
            .map_err(|_| Error::WriterPanicked)?
            .map_err(|e| Error::Writer(WriterError::Io(e)));
        if tailed.is_ok() {
            tailed = r;
        }
    }
    // Every sender is gone with the server and the tail: the writer drains
    // what is queued and stops.
    let written = tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .map_err(|_| Error::WriterPanicked)?
        .map_err(|_| Error::WriterPanicked)?;
    // The writer dropped its hand-over queue: the query thread finishes.
    if let Some(t) = query_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    written?;
    tailed?;
    served?;
    Ok(())
}

/// How long open access-log streams may take to finish at shutdown.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Request ids recently written, to drop an entry seen twice (a resend, or
/// file lines re-read after a crash between append and checkpoint).
struct Recent {
    /// One allocation per id, shared by the set and the queue; a fast
    /// seeded hash (the ids are Envoy's, but the seed costs nothing).
    set: HashSet<std::rc::Rc<str>, foldhash::fast::RandomState>,
    order: VecDeque<std::rc::Rc<str>>,
}

impl Recent {
    const CAP: usize = 200_000;

    fn new(seed: Vec<String>) -> Recent {
        let mut r = Recent {
            set: HashSet::default(),
            order: VecDeque::new(),
        };
        for id in seed {
            r.insert(&id);
        }
        r
    }

    /// False if `id` was seen. Empty ids (requests Envoy refused before
    /// giving them one) are never duplicates.
    fn insert(&mut self, id: &str) -> bool {
        if id.is_empty() {
            return true;
        }
        if self.set.contains(id) {
            return false;
        }
        let id: std::rc::Rc<str> = id.into();
        self.set.insert(id.clone());
        self.order.push_back(id);
        if self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Batches on their way to the query store's thread, and the flag that
/// tells it one was not taken (it then catches up from the log).
type QueryHandOver = (
    std::sync::mpsc::SyncSender<Vec<AuditRecord>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

/// Write records in batches: block for one message, take what else is
/// queued, append and sync the records together, then save any checkpoint
/// that came after them.
fn write_loop<W: RecordWriter>(
    mut writer: W,
    mut rx: mpsc::Receiver<Msg>,
    metrics: &AuditMetrics,
    mut guard: Option<DiskGuard>,
    query: Option<QueryHandOver>,
) -> Result<(), WriterError> {
    let mut recent = Recent::new(writer.recent_request_ids());
    let mut last_sealed = writer.sealed();
    metrics
        .checkpoint_records
        .set(i64::try_from(last_sealed).unwrap_or(i64::MAX));
    let mut gap = Gap::default();
    let mut batch = Vec::new();
    let mut checkpoint: Option<Checkpoint> = None;
    let mut tick = false;
    let (mut position_failing, mut checkpoint_failing) = (Spell::default(), Spell::default());
    if let Some(g) = guard.as_mut() {
        g.check();
    }
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => keep_new(&mut recent, &mut batch, *r),
                Msg::Records(rs) => {
                    for r in rs {
                        keep_new(&mut recent, &mut batch, r);
                    }
                }
                Msg::Checkpoint(c) => checkpoint = Some(c),
                Msg::Tick => tick = true,
            }
            if batch.len() < 1024 {
                next = rx.try_recv().ok();
            }
        }
        if tick {
            if let Some(g) = guard.as_mut() {
                g.check();
            }
            if gap.count > 0 {
                // Quiet after a full spell: the gap record need not wait
                // for the next request.
                append_when_room(&mut writer, &mut [], guard.as_mut(), &rx, &mut gap)?;
            }
        }
        if !batch.is_empty() {
            match append_when_room(&mut writer, &mut batch, guard.as_mut(), &rx, &mut gap)? {
                Appended::Written => {}
                Appended::Dropped => {
                    batch.clear();
                }
                Appended::Stopped => {
                    // Stopped while storage was full: what is held here was
                    // not written; with the file input it is still in the
                    // spool and its checkpoint was not advanced, so it is
                    // read again.
                    tracing::error!(
                        alert = "audit-write-deferred",
                        pending = batch.len(),
                        "stopping with audit storage full; pending records left in the spool"
                    );
                    return Ok(());
                }
            }
            metrics.records.inc_by(batch.len() as u64);
            // Lag from when the request ended (its start plus its
            // duration): a tunnel open for an hour is not an hour behind.
            if let Some(t) = batch.last().and_then(|r| {
                humantime::parse_rfc3339(&r.timestamp)
                    .ok()
                    .map(|t| t + std::time::Duration::from_millis(r.latency_ms))
            }) {
                let age = std::time::SystemTime::now()
                    .duration_since(t)
                    .unwrap_or_default();
                metrics.lag_seconds.set(age.as_secs_f64());
            }
            match &query {
                // On disk now: hand the batch to the query store. If that
                // thread is gone, the store catches up from the log at the
                // next start.
                Some((q, dropped)) => {
                    if q.try_send(std::mem::take(&mut batch)).is_err() {
                        // The store is slow or away: it catches up from
                        // the log instead; the chain never waits for it.
                        dropped.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                None => batch.clear(),
            }
        }
        if let Some(c) = checkpoint.take() {
            // The spool position after records now on disk. Not saved, the
            // next start re-reads from an older one and drops what it
            // already has by request id: safe to retry with the next.
            position_failing.update(c.save(), "audit-spool-position-failed");
        }
        if writer.unsealed() >= SEAL_EVERY || (tick && writer.unsealed() > 0) {
            // A checkpoint that cannot be written (storage full) is retried
            // at the next occasion; the records are chained on disk already.
            checkpoint_failing.update(writer.checkpoint(), "audit-checkpoint-failed");
        }
        tick = false;
        let sealed = writer.sealed();
        if sealed != last_sealed {
            last_sealed = sealed;
            metrics
                .checkpoint_records
                .set(i64::try_from(sealed).unwrap_or(i64::MAX));
            if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                metrics.checkpoint_time.set(d.as_secs_f64());
            }
        }
    }
    // Seal at close: every record written is covered by a checkpoint.
    writer.checkpoint()?;
    Ok(())
}

/// Add `r` to `batch` unless its request id was written already.
fn keep_new(recent: &mut Recent, batch: &mut Vec<AuditRecord>, r: AuditRecord) {
    if recent.insert(&r.request_id) {
        batch.push(r);
    } else {
        tracing::debug!(request_id = r.request_id, "duplicate entry dropped");
    }
}

/// Batches waiting for the query store.
const QUERY_QUEUE: usize = 64;
/// How long the query store gathers batches into one transaction: what
/// the UI and the API show lags the log by at most this.
const GATHER: std::time::Duration = std::time::Duration::from_millis(250);
/// At most this many records in one transaction.
const GATHER_MAX: usize = 16_384;

/// The query store's own loop: catch up from the log, then insert every
/// batch the writer hands over. The log is the record of truth: when the
/// store is unreachable or an insert fails (PostgreSQL restarting, say), the
/// loop keeps draining so the writer is never held up, retries every few
/// seconds, and once the store answers catches up from the log — nothing is
/// lost and nothing is stored twice (`seq` is the key). Alerts at most once a
/// minute (an alert is itself an event that comes back here).
fn query_loop(
    target: &query::Target,
    log: Option<&Path>,
    rx: std::sync::mpsc::Receiver<Vec<AuditRecord>>,
    dropped: &std::sync::atomic::AtomicBool,
) {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::{Duration, Instant};
    const RETRY: Duration = Duration::from_secs(3);
    let mut store: Option<query::QueryStore> = None;
    // Start behind: whatever the log has that the store lacks goes in first.
    let mut behind = true;
    let mut last_try: Option<Instant> = None;
    let mut last_catch_up: Option<Instant> = None;
    let mut last_alert: Option<Instant> = None;
    let mut alert = |what: &str, e: &dyn std::fmt::Display| {
        if last_alert.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            tracing::error!(alert = "audit-query-store-failed", store = %target, error = %e, "{what}");
            last_alert = Some(Instant::now());
        }
    };
    let mut closing = false;
    while !closing {
        let batch = match rx.recv_timeout(RETRY) {
            Ok(mut b) => {
                // What arrives within GATHER goes in the same transaction:
                // a commit costs per index page touched, not per record, and
                // under load the log is read in small pieces. Profiled: one
                // transaction per piece was half the sink's CPU.
                let until = Instant::now() + GATHER;
                while b.len() < GATHER_MAX {
                    let left = until.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(more) => b.extend(more),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            closing = true;
                            break;
                        }
                    }
                }
                Some(b)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if store.is_none() {
            if last_try.is_some_and(|t| t.elapsed() < RETRY) {
                continue;
            }
            last_try = Some(Instant::now());
            match query::QueryStore::open_target(target) {
                Ok(q) => {
                    tracing::info!(store = %target, "audit query store open");
                    store = Some(q);
                }
                Err(e) => {
                    alert("cannot open the audit query store; records stay in the log and go in once it answers", &e);
                    continue;
                }
            }
        }
        let Some(q) = &store else { continue };
        if dropped.swap(false, std::sync::atomic::Ordering::Relaxed) {
            behind = true;
        }
        if behind {
            if last_catch_up.is_some_and(|t| t.elapsed() < RETRY) {
                continue;
            }
            let Some(log) = log else {
                behind = false;
                continue;
            };
            // The batch in hand is in the log already: catch-up covers it.
            match q.catch_up(log) {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(records = n, store = %target, "query store caught up from the log");
                    }
                    behind = false;
                }
                Err(e) => {
                    last_catch_up = Some(Instant::now());
                    alert("query store catch-up failed", &e);
                }
            }
        } else if let Some(batch) = batch {
            if let Err(e) = q.insert(&batch) {
                alert("query store insert failed; will catch up from the log", &e);
                behind = true;
            }
        }
    }
}

/// A side write retried at the next occasion (a checkpoint, the spool
/// position): alerted once when it starts failing, logged when it works
/// again — not once per try while storage stays full.
#[derive(Debug, Default)]
struct Spell {
    failing: bool,
}

impl Spell {
    fn update<E: std::fmt::Display>(&mut self, r: Result<(), E>, kind: &'static str) {
        match r {
            Err(e) if !self.failing => {
                tracing::error!(alert = kind, error = %e, "audit side write failed; retried at the next occasion");
                self.failing = true;
            }
            Err(e) => tracing::debug!(kind, error = %e, "audit side write still failing"),
            Ok(()) if self.failing => {
                tracing::info!(kind, "audit side write works again");
                self.failing = false;
            }
            Ok(()) => {}
        }
    }
}

/// What could not be kept while storage was full (`on_full: allow`).
#[derive(Debug, Default)]
struct Gap {
    count: u64,
    first: String,
    last: String,
}

impl Gap {
    fn add(&mut self, batch: &[AuditRecord]) {
        if self.count == 0 {
            self.first = batch
                .first()
                .map(|r| r.timestamp.clone())
                .unwrap_or_default();
        }
        self.count += batch.len() as u64;
        if let Some(r) = batch.last() {
            self.last = r.timestamp.clone();
        }
    }

    fn record(&self) -> AuditRecord {
        let b: [u8; 12] = rand::random();
        AuditRecord {
            kind: clawgress_audit_log::RecordKind::Gap,
            timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            request_id: format!("gap-{}", hex::encode(b)),
            reason: "storage-full".into(),
            detail: format!(
                "{} records could not be kept (audit storage full, on_full: allow) from {} to {}",
                self.count, self.first, self.last
            ),
            bytes_out: self.count,
            actor: "audit".into(),
            ..Default::default()
        }
    }
}

/// How often a sink held up by full storage looks again.
const FULL_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Append `batch`, waiting while storage is short or a write fails (out of
/// space, read-only, permission, I/O) instead of failing: nothing is
/// dropped, and the sink stays up to say so. While a write fails the sink
/// blocks new requests (`audit.blocked`) and retries the same batch; the
/// writer cuts a failed write back, so the retry neither duplicates records
/// nor leaves half of one. False if every sender went away while waiting.
fn append_when_room<W: RecordWriter>(
    writer: &mut W,
    batch: &mut [AuditRecord],
    mut guard: Option<&mut DiskGuard>,
    rx: &mpsc::Receiver<Msg>,
    gap: &mut Gap,
) -> Result<Appended, WriterError> {
    loop {
        let room = guard.as_deref_mut().is_none_or(|g| g.check());
        // After a failed write, only a write can tell whether it works again.
        let retry = guard.as_deref().is_some_and(|g| g.write_failing());
        if (room || retry) && gap.count > 0 {
            // Space is back: first the signed account of what was lost.
            let mut rec = [gap.record()];
            match writer.append(&mut rec) {
                Ok(()) => {
                    tracing::warn!(
                        alert = "audit-gap",
                        lost = gap.count,
                        "audit records lost while storage was full; gap record written"
                    );
                    *gap = Gap::default();
                    if let Some(g) = guard.as_deref_mut() {
                        g.write_ok();
                    }
                    if let Err(e) = writer.checkpoint() {
                        tracing::error!(alert = "audit-checkpoint-failed", error = %e, "cannot write a checkpoint; retried later");
                    }
                    continue;
                }
                Err(WriterError::Io(e)) => match guard.as_deref_mut() {
                    Some(g) => g.write_failed(&e),
                    None => return Err(WriterError::Io(e)),
                },
                Err(e) => return Err(e),
            }
        } else if room || retry {
            match writer.append(batch) {
                Ok(()) => {
                    if let Some(g) = guard.as_deref_mut() {
                        g.write_ok();
                    }
                    return Ok(Appended::Written);
                }
                Err(WriterError::Io(e)) => match guard.as_deref_mut() {
                    Some(g) => g.write_failed(&e),
                    None => return Err(WriterError::Io(e)),
                },
                Err(e) => {
                    tracing::error!(alert = "audit-write-failed", error = %e, pending = batch.len(), "audit append failed");
                    return Err(e);
                }
            }
        }
        if guard.as_deref().is_some_and(|g| g.allows_when_full()) {
            // on_full: allow — the batch cannot be kept; count it.
            gap.add(batch);
            return Ok(Appended::Dropped);
        }
        if rx.is_closed() {
            return Ok(Appended::Stopped);
        }
        std::thread::sleep(FULL_RETRY);
    }
}

/// What became of a batch.
#[derive(Debug, PartialEq, Eq)]
enum Appended {
    Written,
    /// Storage full with `on_full: allow`: counted in the gap record.
    Dropped,
    /// Every sender went away while waiting for room.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::HttpAccessLogEntries;
    use std::sync::{Arc, Mutex};

    /// Records in memory; every write fails while its flag is set, as an
    /// unwritable directory or a read-only filesystem would.
    #[derive(Clone, Default)]
    struct Memory(
        Arc<Mutex<Vec<AuditRecord>>>,
        Arc<std::sync::atomic::AtomicBool>,
    );

    impl RecordWriter for Memory {
        fn append(&mut self, batch: &mut [AuditRecord]) -> Result<(), WriterError> {
            if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(WriterError::Io(std::io::Error::from_raw_os_error(13)));
            }
            self.0.lock().expect("lock").extend(batch.iter().cloned());
            Ok(())
        }
    }

    fn message(ids: &[&str]) -> StreamAccessLogsMessage {
        StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: ids
                    .iter()
                    .map(|id| HttpAccessLogEntry {
                        // authz saw it: the id is Envoy's own.
                        common_properties: Some(AccessLogCommon {
                            metadata: Some(Metadata {
                                filter_metadata: [(
                                    "envoy.filters.http.ext_authz".to_string(),
                                    envoy_types::pb::google::protobuf::Struct {
                                        fields: [(
                                            "decision".to_string(),
                                            envoy_types::pb::google::protobuf::Value {
                                                kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                                                    "allow".into(),
                                                )),
                                            },
                                        )]
                                        .into(),
                                    },
                                )]
                                .into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        request: Some(HttpRequestProperties {
                            request_id: id.to_string(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
    }

    async fn start(
        w: Memory,
    ) -> (
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), Error>>,
    ) {
        start_guarded(w, None).await
    }

    async fn start_guarded<W: RecordWriter + 'static>(
        w: W,
        guard: Option<DiskGuard>,
    ) -> (
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), Error>>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(
            w,
            Input::Grpc,
            Extras::default(),
            AuditMetrics::default(),
            guard,
            tokio_stream::wrappers::TcpListenerStream::new(l),
            async {
                let _ = stop_rx.await;
            },
        ));
        (url, stop_tx, task)
    }

    #[tokio::test]
    async fn streamed_entries_are_written_in_order() {
        let w = Memory::default();
        let (url, stop, task) = start(w.clone()).await;
        let mut client = AccessLogServiceClient::connect(url).await.expect("connect");
        let msgs = vec![message(&["a", "b"]), message(&["c"])];
        client
            .stream_access_logs(tokio_stream::iter(msgs))
            .await
            .expect("stream");
        let _ = stop.send(());
        task.await.expect("join").expect("run ok");
        let ids: Vec<String> =
            w.0.lock()
                .expect("lock")
                .iter()
                .map(|r| r.request_id.clone())
                .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_storage_blocks_then_drains_without_loss() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let mark = dir.path().join("audit.blocked");
        let free = Arc::new(AtomicU64::new(0));
        let f = free.clone();
        let guard = DiskGuard::new(vec![dir.path().to_path_buf()], 256, mark.clone())
            .with_probe(move |_| Ok(f.load(Ordering::SeqCst)));
        let w = Memory::default();
        let (url, stop, task) = start_guarded(w.clone(), Some(guard)).await;
        let mut client = AccessLogServiceClient::connect(url).await.expect("connect");
        client
            .stream_access_logs(tokio_stream::iter(vec![message(&["a", "b"])]))
            .await
            .expect("stream");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(mark.exists(), "blocked while short of space");
        assert!(
            w.0.lock().expect("lock").is_empty(),
            "nothing written while full"
        );
        free.store(1 << 40, Ordering::SeqCst);
        let mut drained = false;
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if w.0.lock().expect("lock").len() == 2 {
                drained = true;
                break;
            }
        }
        assert!(drained, "the held records were written once space returned");
        assert!(!mark.exists(), "the mark is gone");
        let _ = stop.send(());
        task.await.expect("join").expect("run ok");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unwritable_log_blocks_and_waits_instead_of_stopping_the_sink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mark = dir.path().join("audit.blocked");
        // Plenty of free space: only the writes fail.
        let guard = DiskGuard::new(vec![dir.path().to_path_buf()], 1, mark.clone())
            .with_probe(|_| Ok(1 << 40));
        let w = Memory::default();
        w.1.store(true, std::sync::atomic::Ordering::SeqCst);
        let (url, stop, task) = start_guarded(w.clone(), Some(guard)).await;
        let mut client = AccessLogServiceClient::connect(url).await.expect("connect");
        client
            .stream_access_logs(tokio_stream::iter(vec![message(&["a", "b"])]))
            .await
            .expect("stream");
        // Past several retries and ticks: still blocked, still running.
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        assert!(mark.exists(), "blocked while writes fail");
        assert!(!task.is_finished(), "the sink waits; it does not stop");
        assert!(w.0.lock().expect("lock").is_empty());
        w.1.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut drained = false;
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if w.0.lock().expect("lock").len() == 2 {
                drained = true;
                break;
            }
        }
        assert!(drained, "the held records were written once writes worked");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!mark.exists(), "the mark is gone");
        let _ = stop.send(());
        task.await.expect("join").expect("run ok");
    }

    #[tokio::test]
    async fn on_full_allow_drops_counts_and_writes_a_gap_record_when_space_returns() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let mark = dir.path().join("audit.blocked");
        let free = Arc::new(AtomicU64::new(0));
        let f = free.clone();
        let guard = DiskGuard::new(vec![dir.path().to_path_buf()], 256, mark.clone())
            .allow_when_full(true)
            .with_probe(move |_| Ok(f.load(Ordering::SeqCst)));
        let w = Memory::default();
        let (url, stop, task) = start_guarded(w.clone(), Some(guard)).await;
        let mut client = AccessLogServiceClient::connect(url).await.expect("connect");
        client
            .stream_access_logs(tokio_stream::iter(vec![message(&["a", "b", "c"])]))
            .await
            .expect("stream");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!mark.exists(), "on_full: allow never blocks traffic");
        assert!(
            w.0.lock().expect("lock").is_empty(),
            "nothing kept while full"
        );
        free.store(1 << 40, Ordering::SeqCst);
        client
            .stream_access_logs(tokio_stream::iter(vec![message(&["d"])]))
            .await
            .expect("stream");
        let mut got = Vec::new();
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            got = w.0.lock().expect("lock").clone();
            if got.len() == 2 {
                break;
            }
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].kind, clawgress_audit_log::RecordKind::Gap);
        assert_eq!(got[0].bytes_out, 3, "three records could not be kept");
        assert!(
            got[0].detail.starts_with("3 records could not be kept"),
            "{}",
            got[0].detail
        );
        assert_eq!(got[1].request_id, "d");
        let _ = stop.send(());
        task.await.expect("join").expect("run ok");
    }

    #[tokio::test]
    async fn a_dead_writer_stops_the_sink_with_its_error() {
        let w = Memory::default();
        w.1.store(true, std::sync::atomic::Ordering::SeqCst);
        let (url, _stop, task) = start(w).await;
        let mut client = AccessLogServiceClient::connect(url).await.expect("connect");
        let _ = client
            .stream_access_logs(tokio_stream::iter(vec![message(&["a"])]))
            .await;
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("sink stopped by itself")
            .expect("join");
        assert!(matches!(r, Err(Error::Writer(_))), "{r:?}");
    }
}
