//! End-to-end harness: a real `clawgress up` (real Envoy, real services) on
//! free loopback ports in a temporary state directory, upstream test servers
//! on 127.0.0.1:0, and curl as the agent. Everything started here is stopped
//! when its handle drops, also when a test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod redis;

use clawgress_policy::config::KeyHash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const AGENT: &str = "bot";
pub const KEY: &str = "cg_test_key_0123456789abcdef";

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn key_hash(key: &str) -> String {
    KeyHash::of_key(key).as_str().to_string()
}

/// A running `clawgress up`.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    /// `gateway.admin_listen`: /metrics, /healthz, /readyz.
    pub admin: SocketAddr,
    pub config: PathBuf,
    child: Option<Child>,
    pub stderr_log: PathBuf,
}

impl Stack {
    /// Start `up` with `body` (agents/policies/quotas YAML) plus a gateway
    /// section on a free port. Returns once `up` printed that it is up.
    pub fn start(body: &str) -> Stack {
        Self::start_with_gateway("", body)
    }

    /// As [`Stack::start`], with extra `gateway:` lines (each indented two
    /// spaces, e.g. `"  audit_input: grpc\n"`).
    pub fn start_with_gateway(gateway: &str, body: &str) -> Stack {
        Self::start_in(None, "127.0.0.1", None, gateway, body)
    }

    /// As [`Stack::start_with_gateway`], inside network namespace `netns`
    /// (`ip netns exec`, which execs: the child is `up` itself).
    /// The proxy listens on `proxy_ip` (a free port); `envoy` is passed as
    /// `up --envoy`.
    pub fn start_in(
        netns: Option<&str>,
        proxy_ip: &str,
        envoy: Option<&Path>,
        gateway: &str,
        body: &str,
    ) -> Stack {
        // A free port can be taken by a parallel test between our probe and
        // `up`'s bind: that (and only that) is tried again, on new ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start_in(netns, proxy_ip, envoy, gateway, body) {
                Ok(stack) => return stack,
                Err(log) if attempt < 3 && log.contains("is not free") => {
                    eprintln!("port taken meanwhile; starting again: {log}");
                }
                Err(log) => panic!("clawgress up did not come up:\n{log}"),
            }
        }
    }

    fn try_start_in(
        netns: Option<&str>,
        proxy_ip: &str,
        envoy: Option<&Path>,
        gateway: &str,
        body: &str,
    ) -> Result<Stack, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        // Traversable (not listable), as /var/lib is: run as root, `up`
        // starts Envoy as nft.envoy_user, which must reach the state dir.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("chmod tempdir");
        }
        let proxy: SocketAddr = format!("{proxy_ip}:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config = dir.path().join("clawgress.yaml");
        let yaml = format!(
            "gateway:\n  proxy_listen: {proxy}\n  admin_listen: {admin}\n  state_dir: {}\n{gateway}{body}",
            dir.path().join("state").display()
        );
        std::fs::write(&config, yaml).expect("write config");
        let stderr_log = dir.path().join("up.stderr");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_clawgress")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_clawgress")),
        };
        if let Some(e) = envoy {
            cmd.arg("up").arg("--envoy").arg(e);
        } else {
            cmd.arg("up");
        }
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .env("CLAWGRESS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).expect("stderr file"))
            .spawn()
            .expect("spawn clawgress up");
        let stdout = child.stdout.take().expect("stdout");
        let mut stack = Stack {
            dir,
            proxy,
            admin,
            config,
            child: Some(child),
            stderr_log,
        };
        // Readiness is `up`'s own announcement, made after Envoy's /ready.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("clawgress is up") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            stack.stop();
            return Err(std::fs::read_to_string(&stack.stderr_log).unwrap_or_default());
        }
        Ok(stack)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The PID of `up` itself.
    pub fn up_pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn proxy_url(&self, agent: &str, key: &str) -> String {
        format!("http://{agent}:{key}@{}", self.proxy)
    }

    /// The PID of a supervised service (`authz`, `ratelimit`, `audit`),
    /// found by its command line, which names this stack's config.
    pub fn service_pid(&self, name: &str) -> Option<u32> {
        // `serve` children of this stack's `up` name its state directory
        // (their --config is `up`'s accepted copy in it, but admin's).
        let state = self.state().display().to_string();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
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
            if args.iter().any(|a| a == "serve")
                && args.iter().any(|a| a == name)
                && args.contains(&state)
            {
                return Some(pid);
            }
        }
        None
    }

    /// The PID of this stack's Envoy (its command line names our state dir).
    pub fn envoy_pid(&self) -> Option<u32> {
        let cfg = self
            .state()
            .join("run")
            .join("envoy.yaml")
            .display()
            .to_string();
        pids_with_arg(&cfg).into_iter().next()
    }

    /// Request records written so far (not alerts or admin actions).
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        self.all_audit_records()
            .into_iter()
            .filter(|r| r["kind"] == "request")
            .collect()
    }

    /// Every audit record written so far, in log order.
    pub fn all_audit_records(&self) -> Vec<serde_json::Value> {
        clawgress_audit_sink::read_log(&self.state().join("audit"))
            .map(|l| l.text)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait until at least `n` request records exist (Envoy flushes its
    /// access-log stream every 200 ms), or 15 s pass.
    pub fn wait_audit(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let recs = self.audit_records();
            if recs.len() >= n || Instant::now() > deadline {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM `up` and wait for it; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for `up` to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Processes whose command line has `arg` as one argument.
pub fn pids_with_arg(arg: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            if cmd.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// What curl saw.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The proxy's answer to CONNECT, 0 if none.
    pub connect_status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub curl_exit: i32,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Run curl with `args`; `env` adds environment variables.
pub fn curl(args: &[&str], env: &[(&str, &str)]) -> Reply {
    let tmp = tempfile::tempdir().expect("tempdir");
    let body = tmp.path().join("body");
    let head = tmp.path().join("head");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "--noproxy", "", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&head)
        .args(["-w", "%{http_code} %{http_connect}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .envs(env.iter().copied())
        .output()
        .expect("curl is installed");
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = codes
        .split_whitespace()
        .map(|c| c.parse::<u16>().unwrap_or(0));
    let status = it.next().unwrap_or(0);
    let connect_status = it.next().unwrap_or(0);
    let headers = std::fs::read_to_string(&head)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        connect_status,
        headers,
        body: std::fs::read_to_string(&body).unwrap_or_default(),
        curl_exit: out.status.code().unwrap_or(-1),
    }
}

/// One plain-HTTP GET through the proxy on a raw socket (no process spawn,
/// for load); returns the status code, 0 on failure.
pub fn raw_get(proxy: SocketAddr, url: &str, agent: &str, key: &str) -> u16 {
    raw_get_answer(proxy, url, agent, key).0
}

/// The same, sent exactly as given (no client rewrites the host, as curl
/// does `127.1`); the status code (0 on failure) and the body.
pub fn raw_get_answer(proxy: SocketAddr, url: &str, agent: &str, key: &str) -> (u16, String) {
    use base64::Engine;
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(proxy) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("{agent}:{key}"));
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Basic {cred}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Request heads an upstream saw: (lower-cased header name, value) lists.
pub type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// A plain-HTTP upstream on 127.0.0.1:0 that records each request's headers
/// and answers 200 "hello from upstream".
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Seen,
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    pub fn http() -> Upstream {
        Self::start(None)
    }

    /// The same, behind TLS with a fresh self-signed certificate.
    pub fn https() -> Upstream {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("self-signed cert");
        let der = cert.cert.der().clone();
        let key = tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
            cert.signing_key.serialize_der().into(),
        );
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_no_client_auth()
            .with_single_cert(vec![der], key)
            .expect("server cert");
        Self::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
    }

    fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        rt.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let seen = seen2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acc) => {
                            if let Ok(s) = acc.accept(sock).await {
                                answer(s, seen).await;
                            }
                        }
                        None => answer(sock, seen).await,
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            _rt: rt,
        }
    }

    pub fn requests(&self) -> Vec<Vec<(String, String)>> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, seen: Seen) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let headers = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if let Ok(mut v) = seen.lock() {
        v.push(headers);
    }
    if text.lines().next().is_some_and(|l| l.contains("/slow")) {
        // For drain tests: an answer that takes a while (after it was seen).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let body = "hello from upstream";
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A config body with agent `bot` (key [`KEY`]) allowed to reach
/// `127.0.0.1` on `ports`, plus `extra` YAML appended.
pub fn config_allowing(ports: &[u16], extra: &str) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        r#"agents:
  - agent_id: {AGENT}
    team_id: infra
    project_id: ci
    environment: test
    auth_type: api_key
    api_key_sha256: "{hash}"
  - agent_id: sleeper
    auth_type: api_key
    status: disabled
    api_key_sha256: "{hash}"
policies:
  - policy_id: allow-local-upstreams
    priority: 100
    match:
      identity: {{agent_id: {AGENT}}}
      destination: {{hosts: ["127.0.0.1/32"], ports: [{ports}]}}
    action: allow
{extra}"#,
        hash = key_hash(KEY),
        ports = ports.join(", ")
    )
}

/// Running as root (CI does; mounts, namespaces and nft need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A tmpfs of `size` (mount's syntax, `384k`) mounted on a fresh
/// directory, unmounted when dropped: a filesystem a test can really fill.
/// None, with a note, unless running as root.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str, mode: &str) -> Option<Tmpfs> {
        if !is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).expect("mkdir");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode={mode}"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs");
        Some(Tmpfs { path, _dir: dir })
    }

    /// Fill it to the last byte with a file; returns that file (remove it
    /// and the space is back).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![b'x'; 4096];
        while f.write_all(&chunk).is_ok() {}
        let mut one = [b'x'];
        while f.write_all(&one).is_ok() {
            one[0] = b'y';
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Poll `f` every 50 ms until it returns true or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}
