//! Record writers. [`RecordWriter`] is the capability the sink needs; the
//! JSON-lines file is the first adapter (segments, chaining and the query
//! store come with the audit issue behind the same trait).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clawgress_audit_log::AuditRecord;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: line {line} is not an audit record: {reason}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Appends records durably, assigning each its `seq`.
pub trait RecordWriter: Send {
    /// Append `batch` in order; on `Ok` every record is on disk.
    fn append(&mut self, batch: &mut [AuditRecord]) -> Result<(), WriterError>;

    /// Request ids of the most recent records already written, oldest first,
    /// so that entries delivered again are not written twice.
    fn recent_request_ids(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `audit_dir/audit.jsonl`: one JSON record per line, append-only, 0600 in a
/// 0700 directory, synced after every batch.
#[derive(Debug)]
pub struct JsonlWriter {
    file: File,
    next_seq: u64,
    recent: Vec<String>,
}

impl JsonlWriter {
    pub const FILE: &'static str = "audit.jsonl";

    /// Open (or create) the log in `dir`, continuing its sequence.
    pub fn open(dir: &Path) -> Result<JsonlWriter, WriterError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = dir.join(Self::FILE);
        let (last, torn, recent) = last_seq(&path)?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        if torn {
            file.write_all(b"\n")?;
        }
        Ok(JsonlWriter {
            file,
            next_seq: last + 1,
            recent,
        })
    }
}

/// The `seq` of the last complete record, and whether the file ends in a
/// torn line (a crash mid-write). A torn last line is kept as evidence for
/// `audit verify`; new records start on the next line. Anything else that
/// does not parse is corruption and stops the writer.
fn last_seq(path: &Path) -> Result<(u64, bool, Vec<String>), WriterError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, false, Vec::new())),
        Err(e) => return Err(e.into()),
    };
    let mut recent = std::collections::VecDeque::new();
    let torn = !text.is_empty() && !text.ends_with(b"\n");
    let mut last = 0;
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        let parsed = std::str::from_utf8(line)
            .map_err(|e| e.to_string())
            .and_then(|l| AuditRecord::from_json_line(l).map_err(|e| e.to_string()));
        match parsed {
            Ok(r) => {
                last = r.seq;
                if !r.request_id.is_empty() {
                    recent.push_back(r.request_id);
                    if recent.len() > RECENT_IDS {
                        recent.pop_front();
                    }
                }
            }
            Err(_) if torn && i + 1 == lines.len() => {
                tracing::warn!(alert = "audit-torn-record", path = %path.display(), line = i + 1, "audit log ends in a partial record; continuing after it");
            }
            Err(reason) => {
                return Err(WriterError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason,
                })
            }
        }
    }
    Ok((last, torn, recent.into()))
}

/// How many request ids of the existing log seed the duplicate filter.
const RECENT_IDS: usize = 100_000;

impl RecordWriter for JsonlWriter {
    fn recent_request_ids(&self) -> Vec<String> {
        self.recent.clone()
    }

    fn append(&mut self, batch: &mut [AuditRecord]) -> Result<(), WriterError> {
        let mut buf = String::new();
        for r in batch.iter_mut() {
            r.seq = self.next_seq;
            self.next_seq += 1;
            buf.push_str(&r.to_json_line());
            buf.push('\n');
        }
        self.file.write_all(buf.as_bytes())?;
        self.file.sync_data()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn appends_with_continuing_sequence_and_private_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit");
        let mut w = JsonlWriter::open(&audit).expect("open");
        let mut batch = vec![AuditRecord::default(), AuditRecord::default()];
        w.append(&mut batch).expect("append");
        drop(w);
        let mut w = JsonlWriter::open(&audit).expect("reopen");
        w.append(&mut [AuditRecord::default()]).expect("append");
        let text = std::fs::read_to_string(audit.join(JsonlWriter::FILE)).expect("read");
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| AuditRecord::from_json_line(l).expect("record").seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&audit), 0o700);
        assert_eq!(mode(&audit.join(JsonlWriter::FILE)), 0o600);
    }

    #[test]
    fn corrupt_log_is_refused_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(JsonlWriter::FILE),
            "{\"kind\":\"request\"}\nnot json\n",
        )
        .expect("write");
        let err = JsonlWriter::open(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn torn_last_line_is_kept_and_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = JsonlWriter::open(dir.path()).expect("open");
        w.append(&mut [AuditRecord::default()]).expect("append");
        drop(w);
        let path = dir.path().join(JsonlWriter::FILE);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"kind\":\"req").expect("torn write");
        let mut w = JsonlWriter::open(dir.path()).expect("reopen after torn write");
        w.append(&mut [AuditRecord::default()]).expect("append");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            AuditRecord::from_json_line(lines[2]).expect("record").seq,
            2
        );
    }
}
