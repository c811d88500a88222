//! `clawgress status` (§10): each child of a running `up` with its PID,
//! uptime, restarts and health. `up` keeps `state_dir/run/status.json`
//! current; this reads it, checks the PIDs are alive and probes each
//! child's socket.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub up_pid: u32,
    pub up_started_at: u64,
    pub children: Vec<Child>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Child {
    pub name: String,
    pub pid: Option<u32>,
    /// Unix seconds.
    pub started_at: Option<u64>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub probe: PathBuf,
}

pub fn file(run: &Path) -> PathBuf {
    run.join("status.json")
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Healthy: a service's socket accepts and its metrics endpoint (beside
/// it, `<name>-metrics.sock`) answers within 2 s — a stopped or wedged
/// process still has its socket accepting into the kernel's backlog, so
/// accepting alone proves nothing; Envoy when its admin `/ready` answers 200.
fn healthy(c: &Child, run: &Path) -> bool {
    if std::os::unix::net::UnixStream::connect(&c.probe).is_err() {
        return false;
    }
    if c.name == "envoy" {
        answers_200(&c.probe, "/ready")
    } else {
        answers_200(&run.join(format!("{}-metrics.sock", c.name)), "/metrics")
    }
}

/// A GET of `path` on a Unix socket answers 200 within 2 s.
fn answers_200(socket: &Path, path: &str) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: clawgress\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 200"
}

fn human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Print the status; `Ok(true)` when `up` runs and every child is healthy.
pub fn show(state_dir: &Path, json: bool) -> Result<bool> {
    let path = file(&state_dir.join("run"));
    let st: Option<Status> = match std::fs::read_to_string(&path) {
        Ok(text) => Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let st = match st {
        Some(s) if alive(s.up_pid) => s,
        _ => {
            if json {
                println!("{}", serde_json::json!({"running": false}));
            } else {
                println!(
                    "clawgress is not running (state dir {})",
                    state_dir.display()
                );
            }
            return Ok(false);
        }
    };
    let now = unix(SystemTime::now());
    let rows: Vec<serde_json::Value> = st
        .children
        .iter()
        .map(|c| {
            let running = c.pid.is_some_and(alive);
            let health = if !running {
                "down"
            } else if healthy(c, &state_dir.join("run")) {
                "healthy"
            } else {
                "unhealthy"
            };
            serde_json::json!({
                "name": c.name,
                "pid": c.pid.filter(|_| running),
                "uptime_s": c.started_at.filter(|_| running).map(|t| now.saturating_sub(t)),
                "restarts": c.restarts,
                "health": health,
                "last_exit": c.last_exit,
            })
        })
        .collect();
    let all_ok = rows.iter().all(|r| r["health"] == "healthy");
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "running": true,
                "up_pid": st.up_pid,
                "uptime_s": now.saturating_sub(st.up_started_at),
                "children": rows,
            }))?
        );
    } else {
        println!(
            "clawgress up (pid {}), up {}",
            st.up_pid,
            human(now.saturating_sub(st.up_started_at))
        );
        println!(
            "{:<10} {:>8} {:>9} {:>8}  {:<9}  last exit",
            "child", "pid", "uptime", "restarts", "health"
        );
        for r in &rows {
            println!(
                "{:<10} {:>8} {:>9} {:>8}  {:<9}  {}",
                r["name"].as_str().unwrap_or(""),
                r["pid"]
                    .as_u64()
                    .map(|p| p.to_string())
                    .unwrap_or("-".into()),
                r["uptime_s"].as_u64().map(human).unwrap_or("-".into()),
                r["restarts"].to_string(),
                r["health"].as_str().unwrap_or(""),
                r["last_exit"].as_str().unwrap_or("")
            );
        }
    }
    Ok(all_ok)
}
