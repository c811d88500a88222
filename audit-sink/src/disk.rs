//! Free space under the audit and spool directories (DESIGN.md §10).
//!
//! Below `audit.min_free_mb`, or when a write fails for lack of space, the
//! sink marks `state_dir/audit.blocked`: authz answers new requests with 503
//! `audit-unavailable` while it exists (`on_full: deny`), so nothing happens
//! that could not be recorded. The sink keeps what it holds, the spool keeps
//! the rest, and when space returns the mark goes and the backlog drains.

use std::path::{Path, PathBuf};

/// Free bytes available to this process on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// How free space is measured (injectable for tests).
type Probe = Box<dyn Fn(&Path) -> std::io::Result<u64> + Send>;

/// Watches free space and owns the `audit.blocked` mark.
pub struct DiskGuard {
    dirs: Vec<PathBuf>,
    min_free: u64,
    mark: PathBuf,
    blocked: bool,
    /// `audit.on_full: allow`: keep traffic flowing (no mark); records that
    /// cannot be kept are counted into a signed gap record.
    allow_when_full: bool,
    /// Injectable for tests; [`free_bytes`] otherwise.
    probe: Probe,
    /// The last write failed (no space, read-only, permission, I/O): blocked
    /// until a write succeeds, whatever free space the probe sees.
    write_failure: Option<String>,
}

impl std::fmt::Debug for DiskGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskGuard")
            .field("dirs", &self.dirs)
            .field("min_free", &self.min_free)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl DiskGuard {
    pub fn new(dirs: Vec<PathBuf>, min_free_mb: u64, mark: PathBuf) -> DiskGuard {
        DiskGuard {
            dirs,
            min_free: min_free_mb.saturating_mul(1024 * 1024),
            mark,
            blocked: false,
            allow_when_full: false,
            probe: Box::new(free_bytes),
            write_failure: None,
        }
    }

    /// `audit.on_full: allow`.
    pub fn allow_when_full(mut self, allow: bool) -> DiskGuard {
        self.allow_when_full = allow;
        self
    }

    pub fn allows_when_full(&self) -> bool {
        self.allow_when_full
    }

    pub fn with_probe(
        mut self,
        probe: impl Fn(&Path) -> std::io::Result<u64> + Send + 'static,
    ) -> DiskGuard {
        self.probe = Box::new(probe);
        self
    }

    /// Is there room? Marks or clears `audit.blocked` on a change.
    pub fn check(&mut self) -> bool {
        let short = self.dirs.iter().find_map(|d| match (self.probe)(d) {
            Ok(free) if free < self.min_free => Some(format!(
                "{} has {} MiB free",
                d.display(),
                free / (1024 * 1024)
            )),
            Ok(_) => None,
            Err(e) => Some(format!("{}: {e}", d.display())),
        });
        match short.or_else(|| self.write_failure.clone()) {
            Some(why) => {
                self.block(&why);
                false
            }
            None => {
                self.unblock();
                true
            }
        }
    }

    /// A write to audit storage failed: blocked until one succeeds (the
    /// caller keeps retrying; a write is the only test of writability).
    pub fn write_failed(&mut self, e: &std::io::Error) {
        let why = if is_no_space(e) {
            "a write ran out of space".to_string()
        } else {
            format!("a write failed: {e}")
        };
        self.block(&why);
        self.write_failure = Some(why);
    }

    /// A write succeeded: a write failure no longer blocks.
    pub fn write_ok(&mut self) {
        if self.write_failure.take().is_some() {
            self.check();
        }
    }

    /// A write failed and none has succeeded since.
    pub fn write_failing(&self) -> bool {
        self.write_failure.is_some()
    }

    /// Mark blocked (a write failed, or [`check`] found too little room).
    pub fn block(&mut self, why: &str) {
        if self.allow_when_full {
            if !self.blocked {
                tracing::error!(alert = "audit-disk-full", reason = why, "audit storage is short of space or unwritable; on_full: allow, so requests flow and the records that cannot be kept are counted in a gap record");
            }
            self.blocked = true;
            return;
        }
        if !self.blocked {
            tracing::error!(alert = "audit-disk-full", reason = why, mark = %self.mark.display(), "audit storage is short of space or unwritable; new requests are refused (503 audit-unavailable) until it returns");
        }
        self.blocked = true;
        // Re-create it if someone removed it while we are still short.
        if !self.mark.exists() {
            if let Err(e) = std::fs::write(&self.mark, b"audit storage full\n") {
                tracing::error!(error = %e, mark = %self.mark.display(), "cannot write the audit.blocked mark");
            }
        }
    }

    fn unblock(&mut self) {
        if self.blocked || self.mark.exists() {
            let _ = std::fs::remove_file(&self.mark);
            if self.blocked {
                tracing::warn!(
                    alert = "audit-disk-recovered",
                    "audit storage has room again; requests flow and the backlog drains"
                );
            }
        }
        self.blocked = false;
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }
}

/// Lack of space, as the OS says it.
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(28) // ENOSPC
}
