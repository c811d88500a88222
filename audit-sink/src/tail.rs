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
/// How long a stopping tail goes on reading what is already in the file.
const FINAL_READ: Duration = Duration::from_secs(2);

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
    // Asked to stop: what is in the file by then is still read, to its
    // end (Envoy, stopped first, has flushed its last entries), within a
    // bound; the rest waits for the next start.
    let mut stopping: Option<std::time::Instant> = None;
    loop {
        if stopping.is_none() && stop.load(Ordering::Relaxed) {
            stopping = Some(std::time::Instant::now() + FINAL_READ);
        }
        if stopping.is_some_and(|until| std::time::Instant::now() > until) {
            break;
        }
        let mut file = match File::open(&log) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if stopping.is_some() {
                    break;
                }
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
            if stopping.is_some() {
                break;
            }
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
        let mut at = pos.offset;
        for line in complete.split(|b| *b == b'\n') {
            let offset = at;
            at += line.len() as u64 + 1;
            if line.is_empty() {
                continue;
            }
            match parse_bytes(line, parse) {
                Ok(record) => records.push(record),
                Err(e) => {
                    // Cut short (a full disk stops Envoy mid-line) and the
                    // next entry written on after it: keep that one, and
                    // count what could not be read in a signed gap record.
                    let (lost, rest) = salvage(line, parse);
                    tracing::error!(
                        alert = "audit-input-unparseable",
                        error = %e,
                        offset,
                        bytes = lost,
                        salvaged = rest.is_some(),
                        "access-log line could not be read; counted in a gap record"
                    );
                    records.push(unreadable(pos.inode, offset, lost, &e));
                    records.extend(rest);
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

fn parse_bytes(
    line: &[u8],
    parse: fn(&str) -> Result<AuditRecord, String>,
) -> Result<AuditRecord, String> {
    std::str::from_utf8(line)
        .map_err(|e| e.to_string())
        .and_then(parse)
}

/// An unreadable line may end in a whole entry: a line cut short, with the
/// next one written straight after it. Every entry is one JSON object, and
/// `{"` only ever starts an object (inside strings `"` is escaped), so the
/// first such start from which the rest of the line parses is that entry.
/// Returns the bytes not accounted for and the entry, if any.
fn salvage(
    line: &[u8],
    parse: fn(&str) -> Result<AuditRecord, String>,
) -> (usize, Option<AuditRecord>) {
    let starts = line
        .windows(2)
        .enumerate()
        .skip(1)
        .filter(|(_, w)| w == b"{\"")
        .map(|(i, _)| i)
        .take(64);
    for i in starts {
        if let Ok(r) = parse_bytes(&line[i..], parse) {
            return (i, Some(r));
        }
    }
    (line.len(), None)
}

/// The signed trace of an input line that could not be read: a gap record
/// keyed by where the line was, so reading the file again after a crash
/// does not count it twice.
fn unreadable(inode: u64, offset: u64, bytes: usize, error: &str) -> AuditRecord {
    AuditRecord {
        kind: clawgress_audit_log::RecordKind::Gap,
        timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        request_id: format!("gap-input-{inode}-{offset}"),
        reason: "input-unreadable".into(),
        detail: format!(
            "{bytes} bytes of the input at offset {offset} could not be read (an entry cut short, e.g. by a full disk): {error}"
        ),
        // As in a storage-full gap: how many entries were lost.
        bytes_out: 1,
        actor: "audit".into(),
        ..Default::default()
    }
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

    fn entry(id: &str) -> String {
        format!(
            r#"{{"authority":"example.com:80","authz":{{"agent_id":"bot","decision":"allow","policy_id":"p","reason":"policy-allow"}},"duration_ms":"3","method":"GET","path":"/{id}","request_id":"{id}","response_code":"200","timestamp":"2026-11-23T10:00:00.000Z"}}"#
        )
    }

    /// A full disk cuts an entry short (mid-character, even) and Envoy
    /// writes the next one straight after it: that one is kept, the cut
    /// one is counted in a gap record, and reading the file again after a
    /// crash yields the same gap record (same key), not a second one.
    #[test]
    fn an_entry_written_after_a_cut_one_is_kept_and_the_cut_one_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        let cut = entry("r2");
        let mut cut = cut.as_bytes()[..cut.len() / 2].to_vec();
        cut.extend_from_slice("é".as_bytes().get(..1).unwrap_or_default());
        let mut text = format!("{}\n", entry("r1")).into_bytes();
        text.extend_from_slice(&cut);
        text.extend_from_slice(
            format!("{}\n{}\nnot json at all\n", entry("r3"), entry("r4")).as_bytes(),
        );
        std::fs::write(&log, &text).expect("write");
        let read = |cp: &Path| {
            let (tx, mut rx) = mpsc::channel(16);
            let stop = Arc::new(AtomicBool::new(false));
            let (l, c, s) = (log.clone(), cp.to_path_buf(), stop.clone());
            let t = std::thread::spawn(move || {
                follow(l, c, tx, s, Default::default(), access_log_line)
            });
            // Never hang: stopped after 10 s, the channel closes.
            let watchdog = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(10));
                watchdog.store(true, Ordering::Relaxed);
            });
            let mut got = Vec::new();
            while got.len() < 5 {
                match rx.blocking_recv() {
                    Some(Msg::Records(rs)) => got.extend(rs),
                    Some(_) => {}
                    None => break,
                }
            }
            stop.store(true, Ordering::Relaxed);
            drop(rx);
            let _ = t.join();
            got
        };
        let got = read(&dir.path().join("cp1"));
        let ids: Vec<&str> = got.iter().map(|r| r.request_id.as_str()).collect();
        let second = format!("{}", entry("r1").len() + 1);
        assert_eq!(ids.len(), 5, "{ids:?}");
        assert_eq!((ids[0], ids[2], ids[3]), ("r1", "r3", "r4"), "{ids:?}");
        assert!(
            ids[1].starts_with("gap-input-") && ids[1].ends_with(&second),
            "{ids:?}"
        );
        assert_eq!(got[1].kind, clawgress_audit_log::RecordKind::Gap);
        assert!(
            got[1].detail.contains(&format!("{} bytes", cut.len())),
            "{}",
            got[1].detail
        );
        assert!(
            ids[4].starts_with("gap-input-") && ids[4] != ids[1],
            "{ids:?}"
        );
        assert_eq!(got[3].path, "/r4");
        // Read again from the start (a crash before the position was
        // saved): the same keys, which the writer drops as seen.
        let again = read(&dir.path().join("cp2"));
        let again: Vec<&str> = again.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(again, ids);
    }

    /// Stopped with entries still unread (Envoy, stopped first, flushed
    /// its last ones just before): they are read before the tail returns,
    /// not left for the next start.
    #[test]
    fn a_stopping_tail_reads_what_is_already_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        let text: String = (0..50)
            .map(|i| format!("{}\n", entry(&format!("r{i}"))))
            .collect();
        std::fs::write(&log, text).expect("write");
        let (tx, mut rx) = mpsc::channel(1024);
        let stop = Arc::new(AtomicBool::new(true));
        let cp = dir.path().join("cp");
        follow(
            log,
            cp.clone(),
            tx,
            stop,
            Default::default(),
            access_log_line,
        )
        .expect("follow");
        let mut got = Vec::new();
        let mut saved = None;
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Records(rs) => got.extend(rs),
                Msg::Checkpoint(c) => saved = Some(c.position),
                _ => {}
            }
        }
        assert_eq!(got.len(), 50);
        assert_eq!(got[49].request_id, "r49");
        assert!(saved.is_some_and(|p| p.offset > 0), "{saved:?}");
    }
}
