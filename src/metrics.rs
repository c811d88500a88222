//! Prometheus metrics plumbing for the binary (DESIGN.md §10): the alert
//! counter fed by a tracing layer, a minimal `/metrics` HTTP endpoint on TCP
//! or a Unix socket, and the merge `up` uses to serve all of its children's
//! metrics at one address.
//!
//! Each service crate owns its own metrics and registers them into the
//! process's registry; this module only exposes them.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub kind: String,
}

/// `clawgress_alerts_total{kind}`.
pub type Alerts = Family<AlertLabels, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: String,
}

/// `clawgress_store_errors_total{store}`: the alerts that mean a store
/// failed, by store (`ratelimit`, `audit_query`, `control_plane`).
pub type StoreErrors = Family<StoreLabels, Counter>;

/// The store an alert kind reports a failure of, if it does.
fn store_of(kind: &str) -> Option<&'static str> {
    match kind {
        "ratelimit-store-unavailable" => Some("ratelimit"),
        "audit-query-store-failed" => Some("audit_query"),
        "bundle-fetch-failed" | "control-plane-store-failed" => Some("control_plane"),
        _ => None,
    }
}

/// Where this process appends its alerts as audit events (the events
/// spool of the audit sink), and the name it signs them with. Set once the
/// config is loaded; alerts before that are counted and logged only.
static EVENTS: std::sync::OnceLock<(std::path::PathBuf, String)> = std::sync::OnceLock::new();

pub fn record_alerts_in(spool: std::path::PathBuf, actor: &str) {
    let _ = EVENTS.set((spool, actor.to_string()));
}

/// Append one event line to the events spool: one `write` of one line on
/// an `O_APPEND` file, so lines of several processes never interleave.
pub fn append_event(spool: &std::path::Path, e: &clawgress_audit_log::SpoolEvent) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let line = e.to_json_line() + "\n";
    let r = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(spool)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(err) = r {
        // Not through tracing: this runs inside the tracing layer.
        eprintln!(
            "clawgress: cannot record an event in {}: {err}",
            spool.display()
        );
    }
}

/// A fresh unique event id.
pub fn event_id() -> String {
    let b: [u8; 12] = rand::random();
    format!("evt-{}", hex::encode(b))
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Counts every log event that carries an `alert` field, and records it as
/// an audit event: alerts have one form everywhere (§10), so one layer
/// handles them all.
pub struct AlertLayer {
    pub alerts: Alerts,
    pub store_errors: StoreErrors,
}

#[derive(Default)]
struct AlertField {
    kind: Option<String>,
    message: String,
    fields: Vec<String>,
}

impl Visit for AlertField {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "alert" => self.kind = Some(value.to_string()),
            "message" => self.message = value.to_string(),
            name => self.fields.push(format!("{name}={value}")),
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        match field.name() {
            "alert" if self.kind.is_none() => self.kind = Some(v.trim_matches('"').to_string()),
            "alert" => {}
            "message" => self.message = v.trim_matches('"').to_string(),
            name => self.fields.push(format!("{name}={v}")),
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AlertLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut v = AlertField::default();
        event.record(&mut v);
        let Some(kind) = v.kind else { return };
        self.alerts
            .get_or_create(&AlertLabels { kind: kind.clone() })
            .inc();
        if let Some(store) = store_of(&kind) {
            self.store_errors
                .get_or_create(&StoreLabels {
                    store: store.to_string(),
                })
                .inc();
        }
        if let Some((spool, actor)) = EVENTS.get() {
            let mut detail = v.message;
            for f in v.fields {
                detail.push(' ');
                detail.push_str(&f);
            }
            append_event(
                spool,
                &clawgress_audit_log::SpoolEvent {
                    kind: clawgress_audit_log::RecordKind::Alert,
                    id: event_id(),
                    timestamp: now_rfc3339(),
                    what: kind,
                    actor: actor.clone(),
                    detail,
                    result: String::new(),
                },
            );
        }
    }
}

/// The process registry with the alert counter in it.
pub fn registry_with_alerts() -> (Registry, Alerts, StoreErrors) {
    let mut reg = Registry::default();
    let alerts = Alerts::default();
    reg.register(
        "clawgress_alerts",
        "Alerts raised (log lines with alert=<kind>)",
        alerts.clone(),
    );
    let store_errors = StoreErrors::default();
    // Every series exists from the start at 0, so rate() and alerts work
    // before the first failure.
    for store in ["ratelimit", "audit_query", "control_plane"] {
        let _ = store_errors.get_or_create(&StoreLabels {
            store: store.to_string(),
        });
    }
    reg.register(
        "clawgress_store_errors",
        "Store failures (ratelimit counters, audit query store, control plane), from their alerts",
        store_errors.clone(),
    );
    (reg, alerts, store_errors)
}

pub fn encode(reg: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, reg);
    out
}

/// What a tiny HTTP endpoint answers for one path.
pub type Handler = Arc<dyn Fn(&str) -> futures_like::Reply + Send + Sync>;

pub mod futures_like {
    use std::future::Future;
    use std::pin::Pin;

    /// Status, content type, body.
    pub type Reply = Pin<Box<dyn Future<Output = (u16, &'static str, String)> + Send>>;
}

/// Answer HTTP/1.1 GETs on one connection with `handler` (one request per
/// connection; Prometheus and probes need no more).
pub async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, handler: Handler) {
    if let Some(buf) = read_head(&mut s).await {
        respond(s, &buf, handler).await;
    }
}

/// Read up to the end of the request head (what came after it too).
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 16 * 1024 {
            return None;
        }
    }
    Some(buf)
}

/// The request path of a head read by [`read_head`].
pub fn request_path(buf: &[u8]) -> String {
    let head = String::from_utf8_lossy(buf);
    head.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string()
}

/// Answer the request whose head is `buf` with `handler`.
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, buf: &[u8], handler: Handler) {
    let head = String::from_utf8_lossy(buf);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (status, ctype, body) = if method == "GET" {
        handler(path.split('?').next().unwrap_or("")).await
    } else {
        (405, "text/plain", "method not allowed\n".to_string())
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Fetch `/metrics` from a child's Unix socket.
pub async fn scrape_unix(path: &std::path::Path) -> Option<String> {
    let mut s = tokio::net::UnixStream::connect(path).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Merge OpenMetrics texts of several processes into one exposition: each
/// family once (first HELP/TYPE wins), every sample labelled with the
/// process it came from, one `# EOF`.
pub fn merge(parts: &[(&str, String)]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut meta: HashMap<String, Vec<String>> = HashMap::new();
    let mut samples: HashMap<String, Vec<String>> = HashMap::new();
    for (service, text) in parts {
        let mut family = String::new();
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut it = rest.splitn(3, ' ');
                let (kind, name) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
                if kind == "TYPE" || kind == "HELP" || kind == "UNIT" {
                    family = name.to_string();
                    if !meta.contains_key(&family) {
                        order.push(family.clone());
                        meta.insert(family.clone(), Vec::new());
                    }
                    let m = meta.entry(family.clone()).or_default();
                    if !m.iter().any(|l| l.starts_with(&format!("# {kind} "))) {
                        m.push(line.to_string());
                    }
                }
                continue;
            }
            samples
                .entry(family.clone())
                .or_default()
                .push(with_label(line, "service", service));
        }
    }
    let mut out = String::new();
    for f in &order {
        for l in meta.get(f).into_iter().flatten() {
            out.push_str(l);
            out.push('\n');
        }
        for l in samples.get(f).into_iter().flatten() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Add `key="value"` to a sample line's label set.
fn with_label(line: &str, key: &str, value: &str) -> String {
    match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let sep = if line[i + 1..].starts_with('}') {
                ""
            } else {
                ","
            };
            format!("{}{{{key}=\"{value}\"{sep}{}", &line[..i], &line[i + 1..])
        }
        Some(i) => format!("{}{{{key}=\"{value}\"}}{}", &line[..i], &line[i..]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_one_block_per_family_and_labels_samples() {
        let a = "# HELP clawgress_alerts Alerts.\n# TYPE clawgress_alerts counter\nclawgress_alerts_total{kind=\"x\"} 1\n# TYPE only_a gauge\nonly_a 3\n# EOF\n";
        let b = "# HELP clawgress_alerts Alerts.\n# TYPE clawgress_alerts counter\nclawgress_alerts_total{kind=\"x\"} 2\n# EOF\n";
        let m = merge(&[("authz", a.into()), ("up", b.into())]);
        assert_eq!(m.matches("# TYPE clawgress_alerts counter").count(), 1);
        assert!(
            m.contains("clawgress_alerts_total{service=\"authz\",kind=\"x\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("clawgress_alerts_total{service=\"up\",kind=\"x\"} 2"),
            "{m}"
        );
        assert!(m.contains("only_a{service=\"authz\"} 3"), "{m}");
        assert_eq!(m.matches("# EOF").count(), 1);
        assert!(m.ends_with("# EOF\n"));
    }

    #[test]
    fn alert_layer_counts_alert_events() {
        use tracing_subscriber::layer::SubscriberExt;
        let (reg, alerts, store_errors) = registry_with_alerts();
        let sub = tracing_subscriber::registry().with(AlertLayer {
            alerts,
            store_errors,
        });
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(alert = "child-restarted", "x");
            tracing::warn!(alert = "child-restarted", "y");
            tracing::error!(alert = "ratelimit-store-unavailable", "z");
            tracing::error!(alert = "control-plane-store-failed", "w");
            tracing::info!("not an alert");
        });
        let text = encode(&reg);
        assert!(
            text.contains("clawgress_alerts_total{kind=\"child-restarted\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("clawgress_store_errors_total{store=\"ratelimit\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("clawgress_store_errors_total{store=\"control_plane\"} 1"),
            "{text}"
        );
        assert!(!text.contains("store=\"child"), "{text}");
    }
}
