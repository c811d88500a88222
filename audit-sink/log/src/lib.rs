//! The audit record: one per request (and, later, per admin action and
//! alert), with the fields of DESIGN.md §6 under the same names the query
//! store and Grafana use.
//!
//! Data and its serialised form, no dependency on any service crate.
//! [`chain`] holds the hash chain, Merkle tree and signed checkpoints;
//! [`verify`] checks a whole log against them (both pure); [`layout`] is the
//! one place that knows the files on disk and reads them back.

pub mod chain;
pub mod layout;
pub mod verify;

use serde::{Deserialize, Serialize};

/// What a record is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// A request that reached Envoy.
    #[default]
    Request,
    /// An alert (§10).
    Alert,
    /// A control-plane action (configure, commit, rollback, keys, lockdown).
    Admin,
    /// Records that could not be kept (`audit.on_full: allow` while the
    /// storage was full): how many and when, in `detail`.
    Gap,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Request => "request",
            RecordKind::Alert => "alert",
            RecordKind::Admin => "admin",
            RecordKind::Gap => "gap",
        }
    }
}

/// One audit record. Field names are fixed: they are the query store's
/// columns (§10) and the names dashboards query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub kind: RecordKind,
    /// Position in the log, from 1, assigned by the writer.
    pub seq: u64,
    /// RFC 3339, UTC, millisecond precision: when the request started.
    pub timestamp: String,
    /// Envoy's `x-request-id`; the deduplication key.
    pub request_id: String,
    pub agent_id: String,
    pub team_id: String,
    pub project_id: String,
    pub environment: String,
    pub destination_host: String,
    pub destination_port: u16,
    pub http_method: String,
    pub path: String,
    /// `allow` or `deny` (a denial by Envoy itself, e.g. an unreachable
    /// authz, is a `deny` too).
    pub decision: String,
    pub reason: String,
    pub policy_id: String,
    pub bundle_revision: String,
    pub quota_applied: String,
    pub response_code: u16,
    pub latency_ms: u64,
    /// Agent to destination: request headers and body (tunnel bytes for
    /// CONNECT).
    pub bytes_out: u64,
    /// Destination to agent.
    pub bytes_in: u64,
    pub source_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shadow_decision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shadow_policy_id: String,
    /// Alerts and admin actions: who (a token's name, `file:FILE`, a
    /// service).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actor: String,
    /// Alerts and admin actions: what happened, in words (a diff summary).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// SHA-256 (hex) of the previous record's line as written; the first
    /// record has [`chain::GENESIS`]. Set by the writer.
    pub prev_hash: String,
}

impl AuditRecord {
    /// One JSON line, no trailing newline.
    pub fn to_json_line(&self) -> String {
        // A struct of strings and integers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json_line(line: &str) -> Result<AuditRecord, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// One line of the events spool (`spool/events.jsonl`): an alert or an admin
/// action, appended by whichever process raised it and turned into an audit
/// record by the sink. `id` is unique (the deduplication key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolEvent {
    pub kind: RecordKind,
    pub id: String,
    pub timestamp: String,
    /// The alert kind (`child-restarted`) or the admin action (`commit`).
    pub what: String,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub detail: String,
    /// Admin actions: `ok`, `rejected`, `failed`.
    #[serde(default)]
    pub result: String,
}

impl SpoolEvent {
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The audit record: the alert kind or action goes in `reason`, an
    /// admin action's result in `decision`.
    pub fn record(&self) -> AuditRecord {
        AuditRecord {
            kind: self.kind,
            timestamp: self.timestamp.clone(),
            request_id: self.id.clone(),
            reason: self.what.clone(),
            decision: self.result.clone(),
            actor: self.actor.clone(),
            detail: self.detail.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_round_trip_uses_design_field_names() {
        let r = AuditRecord {
            seq: 7,
            request_id: "r".into(),
            agent_id: "a".into(),
            destination_port: 443,
            decision: "allow".into(),
            ..Default::default()
        };
        let line = r.to_json_line();
        for field in [
            "\"timestamp\"",
            "\"request_id\"",
            "\"agent_id\"",
            "\"team_id\"",
            "\"project_id\"",
            "\"environment\"",
            "\"destination_host\"",
            "\"destination_port\"",
            "\"http_method\"",
            "\"path\"",
            "\"decision\"",
            "\"policy_id\"",
            "\"bundle_revision\"",
            "\"quota_applied\"",
            "\"response_code\"",
            "\"latency_ms\"",
            "\"bytes_out\"",
            "\"bytes_in\"",
            "\"source_address\"",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
        assert!(!line.contains('\n'));
        assert_eq!(AuditRecord::from_json_line(&line).expect("parse"), r);
    }
}
