//! Record writers. [`RecordWriter`] is the capability the sink needs; the
//! JSON-lines file with its hash chain and signed checkpoints is the first
//! adapter (the SQL query store joins behind the same trait).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clawgress_audit_log::chain::{leaf_hash, line_hash, Checkpoint, MerkleAccumulator, GENESIS};
use clawgress_audit_log::AuditRecord;
use ed25519_dalek::SigningKey;

pub use clawgress_audit_log::layout::{
    list_segments, read_checkpoints, read_log, segment_name, LogText, SegmentInfo,
};

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

impl From<clawgress_audit_log::layout::LayoutError> for WriterError {
    fn from(e: clawgress_audit_log::layout::LayoutError) -> Self {
        use clawgress_audit_log::layout::LayoutError as L;
        match e {
            L::Io(e) => WriterError::Io(e),
            L::Corrupt { path, line, reason } => WriterError::Corrupt { path, line, reason },
        }
    }
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

    /// Records covered by the latest checkpoint.
    fn sealed(&self) -> u64 {
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

/// The origin line of this log's checkpoints, which must name this log
/// and no other (C2SP tlog-checkpoint): `clawgress/audit/` and the first 8
/// bytes, in hex, of the SHA-256 of the log's public key. Logs written
/// before carried `clawgress/audit` alone; `verify` reads both.
pub fn origin(key: &ed25519_dalek::VerifyingKey) -> String {
    use sha2::Digest;
    let id = sha2::Sha256::digest(key.as_bytes());
    format!("clawgress/audit/{}", hex::encode(&id[..8]))
}
/// The signature name in checkpoint notes.
pub const KEY_NAME: &str = clawgress_audit_log::layout::KEY_NAME;

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

/// The log in `audit_dir`: append-only segment files
/// `segment-<first seq>.jsonl`, one JSON record per line, each chained to its
/// predecessor across segment boundaries; a segment is sealed (a signed
/// checkpoint, then made read-only, never opened for writing again) once it
/// holds `segment_records` records. `audit_dir/checkpoints.jsonl`: signed
/// checkpoints over the Merkle tree of all lines. Files 0600 (sealed
/// segments 0400) in a 0700 directory, synced after every batch.
pub struct JsonlWriter {
    dir: PathBuf,
    file: File,
    /// Records in the segment being written.
    active_records: u64,
    segment_records: u64,
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
    /// Records in the last segment, and whether it is sealed.
    active_records: u64,
    active_sealed: bool,
    last_seq: u64,
    last_hash: String,
    tree: MerkleAccumulator,
    torn_end: bool,
    recent: Vec<String>,
}

impl JsonlWriter {
    /// The single log file of earlier versions; adopted as the first
    /// segment on open.
    pub const LEGACY_FILE: &'static str = clawgress_audit_log::layout::LEGACY_FILE;
    pub const CHECKPOINTS: &'static str = clawgress_audit_log::layout::CHECKPOINTS;
    /// Records per segment unless configured (`audit.segment_records`).
    pub const SEGMENT_RECORDS: u64 = 100_000;

    /// Open (or create) the log in `dir`, continuing its sequence and chain.
    /// With `key`, checkpoints are signed and written.
    pub fn open(dir: &Path, key: Option<AuditKey>) -> Result<JsonlWriter, WriterError> {
        Self::open_with(dir, key, Self::SEGMENT_RECORDS)
    }

    /// [`JsonlWriter::open`], sealing segments at `segment_records` records.
    pub fn open_with(
        dir: &Path,
        key: Option<AuditKey>,
        segment_records: u64,
    ) -> Result<JsonlWriter, WriterError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let legacy = dir.join(Self::LEGACY_FILE);
        if legacy.exists() && list_segments(dir)?.is_empty() {
            std::fs::rename(&legacy, dir.join(segment_name(1)))?;
            tracing::info!(dir = %dir.display(), "audit log adopted as its first segment");
        }
        let scan = scan(dir)?;
        let next_seq = scan.last_seq + 1;
        let segments = list_segments(dir)?;
        let (file, active_records) = match segments.last() {
            Some((_, path)) if !scan.active_sealed => {
                let mut file = OpenOptions::new().append(true).open(path)?;
                if scan.torn_end {
                    file.write_all(b"\n")?;
                }
                (file, scan.active_records)
            }
            _ => (new_segment(dir, next_seq)?, 0),
        };
        let checkpoints = dir.join(Self::CHECKPOINTS);
        let sealed = read_checkpoints(&checkpoints)?
            .last()
            .and_then(|n| n.lines().nth(1).and_then(|s| s.parse().ok()))
            .unwrap_or(0);
        // Every sealed segment was signed before it was sealed: if the
        // checkpoints do not reach that far, someone removed them, and the
        // next checkpoint would sign whatever the files now say. Said
        // before signing, so the record of it is in the log.
        let in_sealed = if scan.active_sealed {
            scan.last_seq
        } else {
            scan.last_seq.saturating_sub(scan.active_records)
        };
        if key.is_some() && sealed < in_sealed {
            tracing::error!(
                alert = "audit-checkpoints-missing",
                signed = sealed,
                sealed_records = in_sealed,
                file = %checkpoints.display(),
                "the signed checkpoints cover fewer records than the sealed segments hold: checkpoints were removed; `clawgress audit verify --from` a checkpoint kept elsewhere tells whether the log was altered"
            );
        }
        Ok(JsonlWriter {
            dir: dir.to_path_buf(),
            file,
            active_records,
            segment_records: segment_records.max(1),
            checkpoints,
            next_seq,
            last_hash: scan.last_hash,
            tree: scan.tree,
            sealed,
            key,
            recent: scan.recent,
            needs_newline: false,
        })
    }

    /// Seal the full segment: a signed checkpoint over everything so far,
    /// the file made read-only, and a new segment begun.
    fn seal_segment(&mut self) -> Result<(), WriterError> {
        if self.needs_newline {
            self.file.write_all(b"\n")?;
            self.needs_newline = false;
        }
        self.checkpoint()?;
        let first = self.next_seq - self.active_records;
        let path = self.dir.join(segment_name(first));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
        self.file = new_segment(&self.dir, self.next_seq)?;
        self.active_records = 0;
        tracing::info!(segment = %path.display(), last_seq = self.next_seq - 1, "audit segment sealed");
        Ok(())
    }
}

/// Append `bytes` to `file` (opened for append) and sync, all or nothing:
/// a write that fails part-way (out of space, say) is cut back to the old
/// length, so that a retry of the same records neither duplicates them nor
/// leaves half a line that `verify` would blame on tampering. On failure,
/// also says whether the cut-back worked.
fn append_whole(file: &mut File, bytes: &[u8]) -> Result<(), (std::io::Error, bool)> {
    let before = file.metadata().map_err(|e| (e, true))?.len();
    match file.write_all(bytes).and_then(|()| file.sync_data()) {
        Ok(()) => Ok(()),
        Err(e) => {
            // Shrinking needs no space.
            let cut_back = file.set_len(before).and_then(|()| file.sync_data()).is_ok();
            Err((e, cut_back))
        }
    }
}

fn new_segment(dir: &Path, first_seq: u64) -> Result<File, WriterError> {
    let path = dir.join(segment_name(first_seq));
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)?;
    // The new name must survive a crash as much as the records in it.
    File::open(dir)?.sync_all()?;
    Ok(f)
}

/// How many request ids of the existing log seed the duplicate filter.
const RECENT_IDS: usize = 100_000;

/// Read the existing log: where its sequence, chain and tree stand. A torn
/// last line (a crash mid-write) is kept as evidence for `audit verify`; new
/// records start on the next line and chain to the last whole record.
/// Anything else that does not parse is corruption and stops the writer.
fn scan(dir: &Path) -> Result<Scan, WriterError> {
    let mut s = Scan {
        active_records: 0,
        active_sealed: false,
        last_seq: 0,
        last_hash: GENESIS.to_string(),
        tree: MerkleAccumulator::default(),
        torn_end: false,
        recent: Vec::new(),
    };
    let log = read_log(dir)?;
    let Some(last) = log.segments.last() else {
        return Ok(s);
    };
    s.active_sealed = last.sealed;
    let last_first_line = last.first_line;
    let text = log.text.as_bytes();
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
                if i + 1 >= last_first_line {
                    s.active_records += 1;
                }
                if !r.request_id.is_empty() {
                    recent.push_back(r.request_id);
                    if recent.len() > RECENT_IDS {
                        recent.pop_front();
                    }
                }
            }
            Err(_) if s.torn_end && i + 1 == lines.len() => {
                tracing::warn!(alert = "audit-torn-record", dir = %dir.display(), line = i + 1, "audit log ends in a partial record; continuing after it");
            }
            // A partial record an earlier crash left, already followed by
            // whole ones (`audit verify` checks they chain past it).
            Err(_) if !raw.ends_with(b"}") => {}
            Err(reason) => {
                let (segment, line) = log.locate(i + 1).unwrap_or(("?", i + 1));
                return Err(WriterError::Corrupt {
                    path: dir.join(segment),
                    line,
                    reason,
                });
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
        if self.active_records >= self.segment_records {
            self.seal_segment()?;
        }
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
        if let Err((e, cut_back)) = append_whole(&mut self.file, buf.as_bytes()) {
            // Cut back, the file ends where it did and the batch can be
            // retried as it is; otherwise the next write starts a new line
            // (the reader skips the partial one, as after a crash).
            self.needs_newline = self.needs_newline || !cut_back;
            return Err(e.into());
        }
        self.needs_newline = false;
        // Only once the batch is on disk does the chain move on.
        (self.next_seq, self.last_hash, self.tree) = (seq, prev, tree);
        self.active_records += batch.len() as u64;
        Ok(())
    }

    fn unsealed(&self) -> u64 {
        self.tree.size() - self.sealed
    }

    fn sealed(&self) -> u64 {
        self.sealed
    }

    fn checkpoint(&mut self) -> Result<(), WriterError> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        if self.tree.size() == self.sealed {
            return Ok(());
        }
        let note = Checkpoint {
            origin: origin(&key.key.verifying_key()),
            size: self.tree.size(),
            root: self.tree.root(),
        }
        .sign(&key.name, &key.key);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.checkpoints)?;
        let line = format!("{}\n", serde_json::json!({ "note": note }));
        append_whole(&mut f, line.as_bytes()).map_err(|(e, _)| e)?;
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
        let log = read_log(&dir.join("audit")).expect("log").text;
        let notes =
            read_checkpoints(&dir.join("audit").join(JsonlWriter::CHECKPOINTS)).expect("cps");
        let k = key(dir);
        clawgress_audit_log::verify::verify(&log, &notes, KEY_NAME, &k.key.verifying_key())
    }

    #[test]
    fn checkpoints_name_their_own_log() {
        let origin_of = |seed: u8| {
            let dir = tempfile::tempdir().expect("tempdir");
            let key = AuditKey {
                name: KEY_NAME.into(),
                key: SigningKey::from_bytes(&[seed; 32]),
            };
            let audit = dir.path().join("audit");
            let mut w = JsonlWriter::open(&audit, Some(key)).expect("open");
            w.append(&mut [AuditRecord::default()]).expect("append");
            w.checkpoint().expect("checkpoint");
            let notes = read_checkpoints(&audit.join(JsonlWriter::CHECKPOINTS)).expect("read");
            notes[0].lines().next().expect("origin line").to_string()
        };
        let (a, b) = (origin_of(1), origin_of(2));
        assert!(
            a.starts_with("clawgress/audit/") && a.len() == 16 + 16,
            "{a}"
        );
        assert_ne!(a, b, "two logs, two origins");
        assert_eq!(a, origin_of(1), "one key, one origin");
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
        let text = read_log(&audit).expect("read").text;
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
        assert_eq!(mode(&audit.join(segment_name(1))), 0o600);
        assert_eq!(mode(&audit.join(JsonlWriter::CHECKPOINTS)), 0o600);
        assert_eq!(mode(&dir.path().join("keys/audit.key")), 0o600);
    }

    #[test]
    fn corrupt_log_is_refused_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(JsonlWriter::LEGACY_FILE),
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
        let path = audit.join(segment_name(1));
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

    #[test]
    fn a_log_with_an_old_torn_line_reopens_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit");
        let mut w = JsonlWriter::open(&audit, Some(key(dir.path()))).expect("open");
        w.append(&mut [AuditRecord::default()]).expect("append");
        drop(w);
        let mut f = OpenOptions::new()
            .append(true)
            .open(audit.join(segment_name(1)))
            .expect("open");
        f.write_all(b"{\"kind\":\"req").expect("torn write");
        for _ in 0..2 {
            let mut w = JsonlWriter::open(&audit, Some(key(dir.path()))).expect("reopen");
            w.append(&mut [AuditRecord::default()]).expect("append");
        }
        let report = verify(dir.path());
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records, 3);
    }

    fn records(n: usize) -> Vec<AuditRecord> {
        (0..n)
            .map(|i| AuditRecord {
                request_id: format!("r{i}"),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn full_segments_are_sealed_read_only_and_never_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit");
        let mut w = JsonlWriter::open_with(&audit, Some(key(dir.path())), 3).expect("open");
        w.append(&mut records(3)).expect("append");
        let first = std::fs::read(audit.join(segment_name(1))).expect("segment 1");
        w.append(&mut records(2)).expect("append");
        drop(w);
        // Reopened with the second segment not full: it continues there.
        let mut w = JsonlWriter::open_with(&audit, Some(key(dir.path())), 3).expect("reopen");
        w.append(&mut records(1)).expect("append");
        w.append(&mut records(1)).expect("append");
        w.checkpoint().expect("checkpoint");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        let segs: Vec<u64> = list_segments(&audit)
            .expect("list")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(segs, vec![1, 4, 7]);
        assert_eq!(mode(&audit.join(segment_name(1))), 0o400);
        assert_eq!(mode(&audit.join(segment_name(4))), 0o400);
        assert_eq!(mode(&audit.join(segment_name(7))), 0o600);
        assert_eq!(
            std::fs::read(audit.join(segment_name(1))).expect("segment 1"),
            first
        );
        let log = read_log(&audit).expect("log");
        assert!(log.misnamed().is_empty());
        assert_eq!(log.locate(5), Some((segment_name(4).as_str(), 2)));
        let report = verify(dir.path());
        assert!(report.ok, "{report:?}");
        // A checkpoint at each seal and one at the end.
        assert_eq!((report.records, report.checkpoints_verified), (7, 3));
        assert_eq!(report.consistency_proofs, 2);
    }

    #[test]
    fn swapped_removed_or_inserted_segments_are_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit");
        let mut w = JsonlWriter::open_with(&audit, Some(key(dir.path())), 2).expect("open");
        for _ in 0..3 {
            w.append(&mut records(2)).expect("append");
        }
        w.checkpoint().expect("checkpoint");
        drop(w);
        let (a, b) = (audit.join(segment_name(1)), audit.join(segment_name(3)));
        let (ta, tb) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        let put = |p: &Path, t: &[u8]| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            std::fs::write(p, t).expect("write");
        };
        // Swapped contents.
        put(&a, &tb);
        put(&b, &ta);
        let log = read_log(&audit).expect("log");
        assert_eq!(log.misnamed().len(), 2);
        let r = verify(dir.path());
        assert!(!r.ok, "swap accepted: {r:?}");
        put(&a, &ta);
        put(&b, &tb);
        assert!(verify(dir.path()).ok);
        // A whole segment removed.
        std::fs::rename(&b, dir.path().join("aside")).expect("move");
        let r = verify(dir.path());
        assert_eq!(
            r.problem.map(|p| p.kind),
            Some(clawgress_audit_log::verify::ProblemKind::Removed)
        );
        // A segment inserted: a copy of the first under a later name.
        std::fs::rename(dir.path().join("aside"), &b).expect("back");
        std::fs::write(audit.join(segment_name(5)), &ta).expect("insert");
        std::fs::rename(audit.join(segment_name(5)), audit.join(segment_name(4))).expect("mv");
        let r = verify(dir.path());
        assert!(!r.ok, "insertion accepted: {r:?}");
    }
}
