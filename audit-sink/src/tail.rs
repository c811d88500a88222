//! The file input (`gateway.audit_input: file`): Envoy appends one JSON line
//! per request to a local access-log file, and the sink follows that file
//! from a checkpointed offset.
//!
//! The file is the spool of DESIGN.md §6: it is written by Envoy whether or
//! not the sink is alive, so a sink that was killed resumes from its last
//! checkpoint and nothing is lost. The checkpoint is saved only after the
//! records read before it are durably appended (see `write_loop`), and
//! records already in the log are skipped by `request_id`, so nothing is
//! written twice either.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use clawgress_audit_log::AuditRecord;

use crate::entry::Entry;
use crate::Msg;

/// Where the sink is in the access-log file: the file's inode (a new file
/// means start over) and the byte offset after the last line handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub inode: u64,
    pub offset: u64,
}

/// A position to persist once what precedes it is on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub file: PathBuf,
    pub position: Position,
}

impl Checkpoint {
    pub fn load(file: &Path) -> Position {
        let Ok(text) = std::fs::read_to_string(file) else {
            return Position::default();
        };
        let mut it = text.split_whitespace().map(|x| x.parse::<u64>().ok());
        match (it.next().flatten(), it.next().flatten()) {
            (Some(inode), Some(offset)) => Position { inode, offset },
            _ => Position::default(),
        }
    }

    /// Write atomically (temp file, fsync, rename).
    pub fn save(&self) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.file.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{} {}", self.position.inode, self.position.offset)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.file)
    }
}

/// How long to wait when the file has nothing new.
const POLL: Duration = Duration::from_millis(100);
/// Largest read per round; a backlog is worked off in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Follow `log` until `stop`, sending records and checkpoints to the writer.
pub fn follow(
    log: PathBuf,
    checkpoint: PathBuf,
    tx: mpsc::Sender<Msg>,
    stop: Arc<AtomicBool>,
    spool_bytes: prometheus_client::metrics::gauge::Gauge,
    parse: fn(&str) -> Result<AuditRecord, String>,
) -> std::io::Result<()> {
    let mut pos = Checkpoint::load(&checkpoint);
    let mut buf = vec![0u8; CHUNK];
    let mut carry: Vec<u8> = Vec::new();
    let mut reported_gap = false;
    let mut starting = true;
    while !stop.load(Ordering::Relaxed) {
        let mut file = match File::open(&log) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if meta.ino() != pos.inode || meta.len() < pos.offset {
            // A new or truncated file: start from its beginning.
            if pos.inode != 0 {
                tracing::warn!(alert = "audit-input-reset", path = %log.display(), "access-log file replaced or truncated; reading it from the start");
            }
            pos = Position {
                inode: meta.ino(),
                offset: 0,
            };
            carry.clear();
        }
        let backlog = meta.len() - pos.offset - carry.len() as u64;
        spool_bytes.set(i64::try_from(meta.len() - pos.offset).unwrap_or(i64::MAX));
        if std::mem::take(&mut starting) && backlog > 0 && pos.offset > 0 {
            // Back after a gap (a crash, a kill, a stop): what Envoy wrote
            // meanwhile is replayed now, nothing lost — but say so.
            tracing::warn!(
                alert = "audit-backlog",
                bytes = backlog,
                path = %log.display(),
                "the sink was away while entries were written; replaying them from its last position"
            );
            reported_gap = true;
        } else if backlog > CHUNK as u64 && !reported_gap {
            tracing::warn!(
                alert = "audit-backlog",
                bytes = backlog,
                "catching up on the access-log spool"
            );
            reported_gap = true;
        }
        file.seek(SeekFrom::Start(pos.offset + carry.len() as u64))?;
        let n = file.read(&mut buf)?;
        if n == 0 {
            reported_gap = false;
            std::thread::sleep(POLL);
            continue;
        }
        carry.extend_from_slice(&buf[..n]);
        // Hand on complete lines only; a partial last line waits.
        let Some(last_nl) = carry.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let complete = &carry[..=last_nl];
        // One message per read: the writer appends and syncs it whole.
        let mut records = Vec::new();
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let parsed = std::str::from_utf8(line)
                .map_err(|e| e.to_string())
                .and_then(parse);
            match parsed {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::error!(alert = "audit-input-unparseable", error = %e, "access-log line skipped");
                }
            }
        }
        pos.offset += complete.len() as u64;
        carry.drain(..=last_nl);
        if !records.is_empty() && tx.blocking_send(Msg::Records(records)).is_err() {
            return Ok(());
        }
        let cp = Checkpoint {
            file: checkpoint.clone(),
            position: pos,
        };
        if tx.blocking_send(Msg::Checkpoint(cp)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Envoy's JSON access-log lines.
pub fn access_log_line(line: &str) -> Result<AuditRecord, String> {
    Entry::from_json_line(line)
        .map(|e| e.record())
        .map_err(|e| e.to_string())
}

/// Events-spool lines (alerts, admin actions).
pub fn event_line(line: &str) -> Result<AuditRecord, String> {
    serde_json::from_str::<clawgress_audit_log::SpoolEvent>(line)
        .map(|e| e.record())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("cp");
        assert_eq!(Checkpoint::load(&f), Position::default());
        let cp = Checkpoint {
            file: f.clone(),
            position: Position {
                inode: 42,
                offset: 1000,
            },
        };
        cp.save().expect("save");
        assert_eq!(Checkpoint::load(&f), cp.position);
        std::fs::write(&f, "nonsense").expect("write");
        assert_eq!(Checkpoint::load(&f), Position::default());
    }
}
