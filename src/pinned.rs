//! Serving gRPC on one single-threaded runtime per core, each connection
//! pinned to one of them.
//!
//! Envoy keeps one HTTP/2 connection per worker thread to each side-call
//! cluster, and every Check or ShouldRateLimit on it is a short task. On a
//! work-stealing runtime those tasks hop between threads, and each hop is a
//! wake-up through the kernel; measured through Envoy (README, Benchmarks)
//! that costs more CPU per request than the handler does. Here an accepting
//! loop hands each connection, round-robin, to a worker thread running a
//! current-thread runtime, so a connection and the requests on it stay on
//! one thread while Envoy's connections still spread over the cores.

use std::future::Future;
use std::pin::Pin;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// A listener whose connections can move to another runtime.
pub trait Accept: Send + 'static {
    /// The connection, detached from the accepting runtime.
    type Std: Send + 'static;
    /// The connection, registered with the runtime that serves it.
    type Io: Send + 'static;
    fn accept_std(&self) -> impl Future<Output = std::io::Result<Self::Std>> + Send;
    fn attach(s: Self::Std) -> std::io::Result<Self::Io>;
}

impl Accept for tokio::net::TcpListener {
    type Std = std::net::TcpStream;
    type Io = tokio::net::TcpStream;
    async fn accept_std(&self) -> std::io::Result<Self::Std> {
        let (s, _) = self.accept().await?;
        s.set_nodelay(true)?;
        s.into_std()
    }
    fn attach(s: Self::Std) -> std::io::Result<Self::Io> {
        tokio::net::TcpStream::from_std(s)
    }
}

impl Accept for tokio::net::UnixListener {
    type Std = std::os::unix::net::UnixStream;
    type Io = tokio::net::UnixStream;
    async fn accept_std(&self) -> std::io::Result<Self::Std> {
        let (s, _) = self.accept().await?;
        s.into_std()
    }
    fn attach(s: Self::Std) -> std::io::Result<Self::Io> {
        tokio::net::UnixStream::from_std(s)
    }
}

/// The connections one worker serves, and when it should stop.
pub type Incoming<I> = ReceiverStream<std::io::Result<I>>;
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;
pub type Served = Pin<Box<dyn Future<Output = Result<()>>>>;

/// Workers for `serve`: `CLAWGRESS_SERVE_THREADS`, default one per core.
pub fn workers() -> usize {
    std::env::var("CLAWGRESS_SERVE_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Accept on `listener` until `stop` resolves, serving every connection with
/// `serve` on one of `workers` pinned runtimes; then ask every worker to
/// finish its in-flight requests (up to `grace`) and return.
pub async fn serve<L, S>(
    listener: L,
    workers: usize,
    stop: impl Future<Output = ()>,
    grace: std::time::Duration,
    serve: S,
) -> Result<()>
where
    L: Accept,
    S: Fn(Incoming<L::Io>, Shutdown) -> Served + Send + Clone + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for n in 0..workers.max(1) {
        let (tx, mut rx) = mpsc::channel::<L::Std>(64);
        let (conn_tx, conn_rx) = mpsc::channel(64);
        let (serve, mut stop_rx) = (serve.clone(), stop_rx.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build a worker runtime")?;
        let t = std::thread::Builder::new()
            .name(format!("serve-{n}"))
            .spawn(move || {
                rt.block_on(async move {
                    // Register each handed-over connection with this runtime.
                    tokio::spawn(async move {
                        while let Some(s) = rx.recv().await {
                            if conn_tx.send(L::attach(s)).await.is_err() {
                                break;
                            }
                        }
                    });
                    let stopped: Shutdown = Box::pin(async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    });
                    let r = serve(ReceiverStream::new(conn_rx), stopped).await;
                    // Said now, not only at shutdown: the accepting loop
                    // skips this worker from here on.
                    if let Err(e) = &r {
                        tracing::error!(worker = n, error = %format!("{e:#}"), "gRPC worker stopped");
                    }
                    r
                })
            })
            .context("cannot start a worker thread")?;
        senders.push(tx);
        threads.push(t);
    }
    let accepting = async {
        let mut next = 0usize;
        loop {
            match listener.accept_std().await {
                Ok(s) => {
                    // A worker that has gone (its server failed) is skipped.
                    let (mut conn, mut delivered) = (s, false);
                    for _ in 0..senders.len() {
                        let i = next % senders.len();
                        next = next.wrapping_add(1);
                        match senders[i].send(conn).await {
                            Ok(()) => {
                                delivered = true;
                                break;
                            }
                            Err(mpsc::error::SendError(back)) => conn = back,
                        }
                    }
                    if !delivered {
                        anyhow::bail!("every worker has stopped");
                    }
                }
                // Out of descriptors and the like: a pause, not the end.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    };
    let result = tokio::select! {
        r = accepting => r,
        () = stop => Ok(()),
    };
    let _ = stop_tx.send(true);
    drop(senders);
    let deadline = std::time::Instant::now() + grace;
    for t in threads {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if t.is_finished() {
            match t.join() {
                Ok(Err(e)) if result.is_ok() => return Err(e),
                Err(_) => anyhow::bail!("a worker thread panicked"),
                _ => {}
            }
        }
    }
    result
}
