//! Load through a forward proxy on 127.0.0.1: keep-alive HTTP/1.1 over raw
//! TCP (no client library cost in the figures), open loop at a fixed rate
//! with latency measured from each request's *intended* start (corrected for
//! coordinated omission), closed loop at full speed, a new CONNECT tunnel per
//! request, and a hold of many concurrent connections. Every loop is bounded
//! in time and stops itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What to send: the proxy, the upstream it forwards to, and credentials.
#[derive(Debug, Clone)]
pub struct Target {
    pub proxy: SocketAddr,
    pub upstream: SocketAddr,
    /// `Proxy-Authorization` value.
    pub auth: String,
}

impl Target {
    fn get(&self) -> Vec<u8> {
        format!(
            "GET http://{up}/ HTTP/1.1\r\nHost: {up}\r\nProxy-Authorization: {}\r\n\r\n",
            self.auth,
            up = self.upstream
        )
        .into_bytes()
    }

    fn connect(&self) -> Vec<u8> {
        format!(
            "CONNECT {up} HTTP/1.1\r\nHost: {up}\r\nProxy-Authorization: {}\r\n\r\n",
            self.auth,
            up = self.upstream
        )
        .into_bytes()
    }

    fn inner_get(&self) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", self.upstream).into_bytes()
    }
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Latency in microseconds of every completed request.
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub non_2xx: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            ok: 0,
            non_2xx: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, o: &Outcome) {
        let _ = self.hist.add(&o.hist);
        self.ok += o.ok;
        self.non_2xx += o.non_2xx;
        self.errors += o.errors;
    }

    fn record(&mut self, status: Result<u16, ()>, micros: u64) {
        match status {
            Ok(s) => {
                let _ = self.hist.record(micros.max(1));
                if (200..300).contains(&s) {
                    self.ok += 1;
                } else {
                    self.non_2xx += 1;
                }
            }
            Err(()) => self.errors += 1,
        }
    }

    pub fn completed(&self) -> u64 {
        self.ok + self.non_2xx
    }

    pub fn rate(&self) -> f64 {
        self.completed() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Percentile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }
}

/// One keep-alive connection and its read buffer.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(to: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Send `req`, read one response; returns its status and whether the
    /// connection may be reused.
    async fn exchange(&mut self, req: &[u8]) -> std::io::Result<(u16, bool)> {
        self.s.write_all(req).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> std::io::Result<(u16, bool)> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("head"))?;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("status line"))?;
                let lower = head.to_ascii_lowercase();
                let close = lower.contains("\r\nconnection: close");
                let chunked = lower.contains("\r\ntransfer-encoding: chunked");
                let len: usize = lower
                    .split("\r\n")
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let body_start = end + 4;
                // A CONNECT's 200 has no body.
                if chunked {
                    loop {
                        if let Some(e) = find(&self.buf[body_start..], b"0\r\n\r\n") {
                            self.buf.drain(..body_start + e + 5);
                            return Ok((status, !close));
                        }
                        self.fill().await?;
                    }
                }
                while self.buf.len() < body_start + len {
                    self.fill().await?;
                }
                self.buf.drain(..body_start + len);
                return Ok((status, !close));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut tmp = [0u8; 8192];
        let n = self.s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One GET over `conn` (opened or reopened as needed).
async fn one_get(conn: &mut Option<Conn>, t: &Target, req: &[u8]) -> Result<u16, ()> {
    if conn.is_none() {
        *conn = Some(Conn::open(t.proxy).await.map_err(|_| ())?);
    }
    let c = conn.as_mut().ok_or(())?;
    match c.exchange(req).await {
        Ok((status, keep)) => {
            if !keep {
                *conn = None;
            }
            Ok(status)
        }
        Err(_) => {
            *conn = None;
            Err(())
        }
    }
}

/// A new tunnel: CONNECT, one GET inside, close.
async fn one_tunnel(t: &Target, connect: &[u8], inner: &[u8]) -> Result<u16, ()> {
    let mut c = Conn::open(t.proxy).await.map_err(|_| ())?;
    let (status, _) = c.exchange(connect).await.map_err(|_| ())?;
    if status != 200 {
        return Ok(status);
    }
    let (status, _) = c.exchange(inner).await.map_err(|_| ())?;
    Ok(status)
}

/// Fixed rate for `dur`, `conns` connections; latency from each request's
/// intended start time.
pub async fn open_loop(t: &Target, rate: f64, dur: Duration, conns: usize) -> Outcome {
    let total = (rate * dur.as_secs_f64()).ceil() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let interval = 1.0 / rate;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (t, next) = (t.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let req = t.get();
            let mut out = Outcome::new();
            let mut conn = None;
            // Give up on the backlog 5 s past the end: bounded.
            let hard_stop = start + dur + Duration::from_secs(5);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() > hard_stop {
                    break;
                }
                let intended = start + Duration::from_secs_f64(i as f64 * interval);
                tokio::time::sleep_until(intended.into()).await;
                let status = one_get(&mut conn, &t, &req).await;
                out.record(status, intended.elapsed().as_micros() as u64);
            }
            out
        }));
    }
    collect(tasks, start).await
}

/// As fast as `conns` connections go, for `dur`.
pub async fn closed_loop(t: &Target, dur: Duration, conns: usize, tunnel: bool) -> Outcome {
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let (req, connect, inner) = (t.get(), t.connect(), t.inner_get());
            let mut out = Outcome::new();
            let mut conn = None;
            while Instant::now() < deadline {
                let began = Instant::now();
                let status = if tunnel {
                    one_tunnel(&t, &connect, &inner).await
                } else {
                    one_get(&mut conn, &t, &req).await
                };
                out.record(status, began.elapsed().as_micros() as u64);
            }
            out
        }));
    }
    collect(tasks, start).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Outcome>>, start: Instant) -> Outcome {
    let mut all = Outcome::new();
    for t in tasks {
        if let Ok(o) = t.await {
            all.merge(&o);
        }
    }
    all.elapsed = start.elapsed();
    all
}

/// Open `n` CONNECT tunnels through the proxy, one request inside each,
/// hold them all open at once (every one is a request in flight for Envoy),
/// then send a second request inside every one. `ok` counts tunnels whose
/// CONNECT and both requests got 2xx.
/// What a held connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A CONNECT tunnel (Envoy holds two sockets: the agent's and the
    /// upstream's).
    Tunnel,
    /// An HTTP/1.1 keep-alive connection that made one proxied request and
    /// stays open (Envoy holds the agent's socket; upstream connections are
    /// pooled).
    KeepAlive,
}

/// Open `n` connections (`opening` at a time), each proving itself with
/// one proxied request; once all are open at once, each makes a second
/// request on the same connection. Latency is the second request's.
pub async fn hold(t: &Target, n: usize, opening: usize, within: Duration) -> Outcome {
    hold_as(t, n, opening, within, Held::Tunnel).await
}

/// [`hold`] for either kind of connection.
pub async fn hold_as(
    t: &Target,
    n: usize,
    opening: usize,
    within: Duration,
    kind: Held,
) -> Outcome {
    let start = Instant::now();
    let deadline = start + within;
    let gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let opening = Arc::new(tokio::sync::Semaphore::new(opening.max(1)));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (t, gate, opening) = (t.clone(), gate.clone(), opening.clone());
        tasks.push(tokio::spawn(async move {
            let (connect, inner) = match kind {
                Held::Tunnel => (Some(t.connect()), t.inner_get()),
                Held::KeepAlive => (None, t.get()),
            };
            let mut out = Outcome::new();
            let first = {
                let _permit = opening.acquire().await;
                tokio::time::timeout_at(deadline.into(), async {
                    let mut c = Conn::open(t.proxy).await.map_err(|_| ())?;
                    if let Some(connect) = &connect {
                        let (s, _) = c.exchange(connect).await.map_err(|_| ())?;
                        if s != 200 {
                            return Ok((s, None));
                        }
                    }
                    let (s, _) = c.exchange(&inner).await.map_err(|_| ())?;
                    Ok((s, Some(c)))
                })
                .await
                .unwrap_or(Err(()))
            };
            // Everyone holds a tunnel now (or has failed).
            gate.wait().await;
            let began = Instant::now();
            let second = match first {
                Ok((s, Some(mut c))) if (200..300).contains(&s) => {
                    // A tunnel already has its upstream socket: all ask at
                    // once. Kept-alive connections ask `opening` at a time
                    // (all held open meanwhile): asked at once, each would
                    // need an upstream socket of its own in Envoy again.
                    let _permit = match kind {
                        Held::KeepAlive => Some(opening.acquire().await),
                        Held::Tunnel => None,
                    };
                    tokio::time::timeout_at(deadline.into(), c.exchange(&inner))
                        .await
                        .map_err(|_| ())
                        .and_then(|r| r.map(|(s, _)| s).map_err(|_| ()))
                }
                Ok((s, _)) => Ok(s),
                Err(()) => Err(()),
            };
            out.record(second, began.elapsed().as_micros() as u64);
            out
        }));
    }
    gate.wait().await;
    collect(tasks, start).await
}
