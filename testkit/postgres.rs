//! A throwaway PostgreSQL server on 127.0.0.1 for tests (Debian's
//! `postgresql` package, run as the `postgres` user; needs root). Shared by
//! test trees with `#[path = ".../testkit/postgres.rs"] mod postgres;`.
#![allow(dead_code)]

use std::process::{Child, Command};

/// A throwaway PostgreSQL server on 127.0.0.1.
pub struct Postgres {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Postgres {
    pub fn start() -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("postgres").exists())?;
        let root = Command::new("id")
            .arg("-u")
            .output()
            .ok()?
            .stdout
            .starts_with(b"0");
        if !root {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(dir.path())
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let data = dir.path().join("data");
        let init = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "clawgress", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .ok()?;
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = spawn(&bin, dir.path(), port)?;
        Some(Postgres {
            bin,
            dir,
            child,
            port,
        })
    }

    /// Stop the server (fast shutdown); [`Postgres::restart`] brings it
    /// back on the same port with the same data.
    pub fn stop(&mut self) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-m", "fast", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.child = spawn(&self.bin, self.dir.path(), self.port).expect("restart postgres");
    }

    pub fn url(&self) -> String {
        format!("postgres://clawgress@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &std::path::Path, dir: &std::path::Path, port: u16) -> Option<Child> {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(dir.join("data"))
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-k",
        ])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}
