//! Where the log lives on disk: segment files `segment-<first seq>.jsonl`
//! and `checkpoints.jsonl` in the audit directory, and reading them back for
//! every reader (the writer at start, `audit verify|query|prove`, the admin
//! console's proof status). Reading only; the writer is the audit sink's.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::AuditRecord;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: line {line} is not an audit record: {reason}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The single log file of earlier versions (read as the first segment).
pub const LEGACY_FILE: &str = "audit.jsonl";
/// The signature name in checkpoint notes.
pub const KEY_NAME: &str = "clawgress-audit";

/// The signed checkpoints, one JSON line `{"note": …}` each.
pub const CHECKPOINTS: &str = "checkpoints.jsonl";

/// `segment-<first seq, 12 digits>.jsonl`.
pub fn segment_name(first_seq: u64) -> String {
    format!("segment-{first_seq:012}.jsonl")
}

/// The segment files in `dir`, by the first seq their names carry. A log of
/// an earlier version (one `audit.jsonl`, no segments) reads as one segment.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LayoutError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("segment-")
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    if out.is_empty() {
        let legacy = dir.join(LEGACY_FILE);
        if legacy.exists() {
            out.push((1, legacy));
        }
    }
    Ok(out)
}

/// One segment's place in the joined log text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SegmentInfo {
    pub name: String,
    /// The seq its name says it begins with.
    pub first_seq: u64,
    /// Its first line's number in the joined text (1-based).
    pub first_line: usize,
    pub lines: usize,
    pub sealed: bool,
}

/// The whole log: every segment's text, oldest first, joined.
#[derive(Debug, Default)]
pub struct LogText {
    pub text: String,
    pub segments: Vec<SegmentInfo>,
}

impl LogText {
    /// The segment and line within it of line `line` of the joined text.
    pub fn locate(&self, line: usize) -> Option<(&str, usize)> {
        self.segments
            .iter()
            .rev()
            .find(|s| s.first_line <= line)
            .map(|s| (s.name.as_str(), line - s.first_line + 1))
    }

    /// Segments whose name does not match the seq of their first record:
    /// renamed, swapped or with their start cut (name, seq found).
    pub fn misnamed(&self) -> Vec<(String, Option<u64>)> {
        let lines: Vec<&str> = self.text.split('\n').collect();
        self.segments
            .iter()
            .filter_map(|s| {
                let first = lines
                    .iter()
                    .skip(s.first_line - 1)
                    .take(s.lines)
                    .find_map(|l| AuditRecord::from_json_line(l).ok())
                    .map(|r| r.seq);
                match first {
                    Some(seq) if seq == s.first_seq => None,
                    // An empty segment just begun.
                    None if s.lines == 0 => None,
                    other => Some((s.name.clone(), other)),
                }
            })
            .collect()
    }
}

/// Read every segment of the log in `dir`, in order. Each but the last ends
/// with a newline in the joined text, so a partial line never runs into the
/// next segment.
pub fn read_log(dir: &Path) -> Result<LogText, LayoutError> {
    let segments = list_segments(dir)?;
    let mut log = LogText::default();
    let mut line = 1;
    let count = segments.len();
    for (i, (first_seq, path)) in segments.into_iter().enumerate() {
        let bytes = std::fs::read(&path)?;
        let text = String::from_utf8(bytes).map_err(|e| LayoutError::Corrupt {
            path: path.clone(),
            line: 0,
            reason: format!("not UTF-8: {e}"),
        })?;
        let lines = text.lines().count();
        let sealed = std::fs::metadata(&path)?.permissions().mode() & 0o222 == 0;
        log.segments.push(SegmentInfo {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            first_seq,
            first_line: line,
            lines,
            sealed,
        });
        log.text.push_str(&text);
        if i + 1 < count && !text.is_empty() && !text.ends_with('\n') {
            log.text.push('\n');
        }
        line += lines;
    }
    Ok(log)
}

/// The signed checkpoint notes in `path`, oldest first.
pub fn read_checkpoints(path: &Path) -> Result<Vec<String>, LayoutError> {
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
                return Err(LayoutError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(notes)
}
