//! Record writers. [`RecordWriter`] is the capability the sink needs; the
//! JSON-lines file with its hash chain and signed checkpoints is the first
//! adapter (the SQL query store joins behind the same trait).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clawgress_audit_log::chain::{leaf_hash, line_hash, Checkpoint, MerkleAccumulator, GENESIS};
use clawgress_audit_log::AuditRecord;
use ed25519_dalek::SigningKey;

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
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
}

/// Appends records durably, assigning each its `seq`.
pub trait RecordWriter: Send {
    /// Append `batch` in order; on `Ok` every record is on disk.
    fn append(&mut self, batch: &mut [AuditRecord]) -> Result<(), WriterError>;

    /// Seal what has been written so far (a signed checkpoint), if anything
    /// is new since the last one.
    fn checkpoint(&mut self) -> Result<(), WriterError> {
        Ok(())
    }

    /// Records written since the last checkpoint.
    fn unsealed(&self) -> u64 {
        0
    }

    /// Request ids of the most recent records already written, oldest first,
    /// so that entries delivered again are not written twice.
    fn recent_request_ids(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The key checkpoints are signed with, and its name in the signed note.
pub struct AuditKey {
    pub name: String,
    pub key: SigningKey,
}

/// The origin line of this log's checkpoints.
pub const ORIGIN: &str = "clawgress/audit";
/// The signature name in checkpoint notes.
pub const KEY_NAME: &str = "clawgress-audit";

impl AuditKey {
    /// `dir/audit.key` (hex seed, 0600), created on first use, with the
    /// public key beside it in `dir/audit.pub` for `audit verify`.
    pub fn load_or_create(dir: &Path) -> Result<AuditKey, WriterError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = dir.join("audit.key");
        let bad = |reason: &str| WriterError::Key {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut seed = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut seed)
                    .map_err(|_| bad("not a 64-hex-digit Ed25519 seed"))?;
                SigningKey::from_bytes(&seed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let seed: [u8; 32] = rand::random();
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                writeln!(f, "{}", hex::encode(seed))?;
                f.sync_all()?;
                SigningKey::from_bytes(&seed)
            }
            Err(e) => return Err(e.into()),
        };
        std::fs::write(
            dir.join("audit.pub"),
            format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
        )?;
        Ok(AuditKey {
            name: KEY_NAME.into(),
            key,
        })
    }
}

/// `audit_dir/audit.jsonl`: one JSON record per line, append-only, each
/// chained to its predecessor; `audit_dir/checkpoints.jsonl`: signed
/// checkpoints over the Merkle tree of the lines. Files 0600 in a 0700
/// directory, synced after every batch.
pub struct JsonlWriter {
    file: File,
    checkpoints: PathBuf,
    next_seq: u64,
    last_hash: String,
    tree: MerkleAccumulator,
    sealed: u64,
    key: Option<AuditKey>,
    recent: Vec<String>,
    /// A write failed part-way: the next one starts on a fresh line, so the
    /// partial line stays a torn record (kept, skipped by readers).
    needs_newline: bool,
}

impl std::fmt::Debug for JsonlWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlWriter")
            .field("next_seq", &self.next_seq)
            .field("sealed", &self.sealed)
            .finish()
    }
}

/// What a scan of an existing log found.
struct Scan {
    last_seq: u64,
    last_hash: String,
    tree: MerkleAccumulator,
    torn_end: bool,
    recent: Vec<String>,
}

impl JsonlWriter {
    pub const FILE: &'static str = "audit.jsonl";
    pub const CHECKPOINTS: &'static str = "checkpoints.jsonl";

    /// Open (or create) the log in `dir`, continuing its sequence and chain.
    /// With `key`, checkpoints are signed and written.
    pub fn open(dir: &Path, key: Option<AuditKey>) -> Result<JsonlWriter, WriterError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = dir.join(Self::FILE);
        let scan = scan(&path)?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        if scan.torn_end {
            file.write_all(b"\n")?;
        }
        let checkpoints = dir.join(Self::CHECKPOINTS);
        let sealed = read_checkpoints(&checkpoints)?
            .last()
            .and_then(|n| n.lines().nth(1).and_then(|s| s.parse().ok()))
            .unwrap_or(0);
        Ok(JsonlWriter {
            file,
            checkpoints,
            next_seq: scan.last_seq + 1,
            last_hash: scan.last_hash,
            tree: scan.tree,
            sealed,
            key,
            recent: scan.recent,
            needs_newline: false,
        })
    }
}

/// The signed checkpoint notes in `path`, oldest first.
pub fn read_checkpoints(path: &Path) -> Result<Vec<String>, WriterError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut notes = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        #[derive(serde::Deserialize)]
        struct Line {
            note: String,
        }
        match serde_json::from_str::<Line>(line) {
            Ok(l) => notes.push(l.note),
            // A torn last line from a crash: the checkpoint was not made.
            Err(_) if !text.ends_with('\n') && i + 1 == text.lines().count() => {}
            Err(e) => {
                return Err(WriterError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(notes)
}

/// How many request ids of the existing log seed the duplicate filter.
const RECENT_IDS: usize = 100_000;

/// Read the existing log: where its sequence, chain and tree stand. A torn
/// last line (a crash mid-write) is kept as evidence for `audit verify`; new
/// records start on the next line and chain to the last whole record.
/// Anything else that does not parse is corruption and stops the writer.
fn scan(path: &Path) -> Result<Scan, WriterError> {
    let mut s = Scan {
        last_seq: 0,
        last_hash: GENESIS.to_string(),
        tree: MerkleAccumulator::default(),
        torn_end: false,
        recent: Vec::new(),
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
        Err(e) => return Err(e.into()),
    };
    s.torn_end = !text.is_empty() && !text.ends_with(b"\n");
    let mut recent = std::collections::VecDeque::new();
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    for (i, raw) in lines.iter().enumerate() {
        if raw.is_empty() {
            continue;
        }
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                AuditRecord::from_json_line(l)
                    .map(|r| (l, r))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok((line, r)) => {
                s.last_seq = r.seq;
                s.last_hash = line_hash(line);
                s.tree.push(leaf_hash(line));
                if !r.request_id.is_empty() {
                    recent.push_back(r.request_id);
                    if recent.len() > RECENT_IDS {
                        recent.pop_front();
                    }
                }
            }
            Err(_) if s.torn_end && i + 1 == lines.len() => {
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
    s.recent = recent.into();
    Ok(s)
}

impl RecordWriter for JsonlWriter {
    fn recent_request_ids(&self) -> Vec<String> {
        self.recent.clone()
    }

    fn append(&mut self, batch: &mut [AuditRecord]) -> Result<(), WriterError> {
        let mut buf = String::new();
        if self.needs_newline {
            buf.push('\n');
        }
        let (mut seq, mut prev, mut tree) =
            (self.next_seq, self.last_hash.clone(), self.tree.clone());
        for r in batch.iter_mut() {
            r.seq = seq;
            r.prev_hash = prev;
            let line = r.to_json_line();
            prev = line_hash(&line);
            tree.push(leaf_hash(&line));
            seq += 1;
            buf.push_str(&line);
            buf.push('\n');
        }
        if let Err(e) = self
            .file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data())
        {
            self.needs_newline = true;
            return Err(e.into());
        }
        self.needs_newline = false;
        // Only once the batch is on disk does the chain move on.
        (self.next_seq, self.last_hash, self.tree) = (seq, prev, tree);
        Ok(())
    }

    fn unsealed(&self) -> u64 {
        self.tree.size() - self.sealed
    }

    fn checkpoint(&mut self) -> Result<(), WriterError> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        if self.tree.size() == self.sealed {
            return Ok(());
        }
        let note = Checkpoint {
            origin: ORIGIN.into(),
            size: self.tree.size(),
            root: self.tree.root(),
        }
        .sign(&key.name, &key.key);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.checkpoints)?;
        writeln!(f, "{}", serde_json::json!({ "note": note }))?;
        f.sync_data()?;
        self.sealed = self.tree.size();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key(dir: &Path) -> AuditKey {
        AuditKey::load_or_create(&dir.join("keys")).expect("key")
    }

    fn verify(dir: &Path) -> clawgress_audit_log::verify::Report {
        let log = std::fs::read_to_string(dir.join("audit").join(JsonlWriter::FILE)).expect("log");
        let notes =
            read_checkpoints(&dir.join("audit").join(JsonlWriter::CHECKPOINTS)).expect("cps");
        let k = key(dir);
        clawgress_audit_log::verify::verify(&log, &notes, KEY_NAME, &k.key.verifying_key())
    }

    #[test]
    fn appends_chain_and_checkpoints_across_reopen_with_private_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit");
        let mut w = JsonlWriter::open(&audit, Some(key(dir.path()))).expect("open");
        let mut batch = vec![AuditRecord::default(), AuditRecord::default()];
        w.append(&mut batch).expect("append");
        assert_eq!(w.unsealed(), 2);
        w.checkpoint().expect("checkpoint");
        assert_eq!(w.unsealed(), 0);
        drop(w);
        let mut w = JsonlWriter::open(&audit, Some(key(dir.path()))).expect("reopen");
        w.append(&mut [AuditRecord::default()]).expect("append");
        w.checkpoint().expect("checkpoint");
        let text = std::fs::read_to_string(audit.join(JsonlWriter::FILE)).expect("read");
        let recs: Vec<AuditRecord> = text
            .lines()
            .map(|l| AuditRecord::from_json_line(l).expect("record"))
            .collect();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(recs[0].prev_hash, GENESIS);
        assert_eq!(
            recs[2].prev_hash,
            line_hash(text.lines().nth(1).expect("line 2"))
        );
        let report = verify(dir.path());
        assert!(report.ok, "{report:?}");
        assert_eq!((report.checkpoints_verified, report.covered), (2, 3));
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&audit), 0o700);
        assert_eq!(mode(&audit.join(JsonlWriter::FILE)), 0o600);
        assert_eq!(mode(&audit.join(JsonlWriter::CHECKPOINTS)), 0o600);
        assert_eq!(mode(&dir.path().join("keys/audit.key")), 0o600);
    }

    #[test]
    fn corrupt_log_is_refused_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(JsonlWriter::FILE),
            "{\"kind\":\"request\"}\nnot json\n",
        )
        .expect("write");
        let err = JsonlWriter::open(dir.path(), None).expect_err("corrupt");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn torn_last_line_is_kept_and_skipped_and_the_log_still_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit");
        let mut w = JsonlWriter::open(&audit, Some(key(dir.path()))).expect("open");
        w.append(&mut [AuditRecord::default()]).expect("append");
        drop(w);
        let path = audit.join(JsonlWriter::FILE);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"kind\":\"req").expect("torn write");
        let mut w =
            JsonlWriter::open(&audit, Some(key(dir.path()))).expect("reopen after torn write");
        w.append(&mut [AuditRecord::default()]).expect("append");
        w.checkpoint().expect("checkpoint");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            AuditRecord::from_json_line(lines[2]).expect("record").seq,
            2
        );
        let report = verify(dir.path());
        assert!(report.ok, "{report:?}");
        assert_eq!(report.torn_lines, vec![2]);
    }
}
