//! How authz and ratelimit get their policy from signed bundles (§7, §10):
//! `state_dir/bundle/active` is watched; a bundle that verifies against the
//! pinned control-plane key and is newer than the one in force is swapped
//! in and copied to `state_dir/bundle/last-good`. Anything else (bad
//! signature, unparseable, older, invalid) is rejected with an alert and
//! enforcement does not change. On start the active bundle is used if it
//! verifies, else the last good one.

use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clawgress_policy::{Bundle, PolicyDocument};
use ed25519_dalek::VerifyingKey;

/// How often the active bundle file is looked at.
const POLL: Duration = Duration::from_millis(100);

/// `state_dir/bundle`.
pub fn bundle_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("bundle")
}

/// Where the bundles are and the key they must be signed with.
#[derive(Debug, Clone)]
pub struct Source {
    pub dir: PathBuf,
    pub key: VerifyingKey,
}

/// `clawgress_bundle_issued_timestamp_seconds`: when the bundle in force
/// was committed (Unix seconds); its age is `time() - this`.
pub static ISSUED: std::sync::LazyLock<
    prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
> = std::sync::LazyLock::new(Default::default);

fn note_issued(issued_at: &str) {
    if let Ok(t) = humantime::parse_rfc3339_weak(issued_at) {
        if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
            ISSUED.set(d.as_secs_f64());
        }
    }
}

/// Register the bundle gauge in a service's registry.
pub fn register_metrics(reg: &mut prometheus_client::registry::Registry) {
    reg.register(
        "clawgress_bundle_issued_timestamp_seconds",
        "When the policy bundle in force was committed (Unix seconds)",
        ISSUED.clone(),
    );
}

/// A policy in force: its document and the revision it is reported under.
#[derive(Debug, Clone, PartialEq)]
pub struct InForce {
    pub revision: u64,
    pub document: PolicyDocument,
}

impl Source {
    pub fn new(dir: PathBuf, key_file: &Path) -> Result<Source> {
        let text = std::fs::read_to_string(key_file)
            .with_context(|| format!("cannot read bundle key {}", key_file.display()))?;
        let key = clawgress_policy::bundle::verifying_key_from_hex(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
        Ok(Source { dir, key })
    }

    fn active(&self) -> PathBuf {
        self.dir.join("active")
    }

    fn last_good(&self) -> PathBuf {
        self.dir.join("last-good")
    }

    /// The file's bytes and the bundle they verify as.
    fn read(&self, path: &Path) -> Option<Result<(Vec<u8>, Bundle), String>> {
        match std::fs::read(path) {
            Ok(bytes) => Some(
                Bundle::verify(&bytes, &self.key)
                    .map(|b| (bytes, b))
                    .map_err(|e| e.to_string()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(Err(format!("cannot read: {e}"))),
        }
    }

    /// Whether a bundle was ever kept here (`active` or `last-good` exists,
    /// verifying or not).
    pub fn any_kept(&self) -> bool {
        self.active().exists() || self.last_good().exists()
    }

    /// The bundle to start from: the active one if it verifies, else the
    /// last good one; `None` when neither exists or verifies.
    pub fn initial(&self) -> Option<InForce> {
        let mut best: Option<(Vec<u8>, Bundle)> = None;
        for path in [self.active(), self.last_good()] {
            match self.read(&path) {
                Some(Ok((bytes, b)))
                    if best.as_ref().is_none_or(|(_, x)| b.revision > x.revision) =>
                {
                    best = Some((bytes, b));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::error!(
                    alert = "bundle-rejected", path = %path.display(), error = %e,
                    "bundle rejected at start"
                ),
                None => {}
            }
        }
        let (bytes, b) = best?;
        self.keep_last_good(&bytes);
        tracing::info!(revision = b.revision, "policy bundle loaded");
        note_issued(&b.issued_at);
        Some(InForce {
            revision: b.revision,
            document: b.document,
        })
    }

    /// Keep the accepted bundle's own bytes (already verified) as
    /// `last-good`, atomically.
    fn keep_last_good(&self, bytes: &[u8]) {
        if let Err(e) = crate::node::write_private(&self.last_good(), bytes) {
            tracing::warn!(error = %e, "cannot keep the last good bundle");
        }
    }

    /// Watch the active bundle; call `apply` with every newer one that
    /// verifies. Runs until the process ends.
    pub fn watch<F>(self, current: Option<u64>, apply: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(&InForce) + Send + 'static,
    {
        tokio::spawn(async move {
            let mut current = current;
            let mut seen = stamp(&self.active());
            loop {
                tokio::time::sleep(POLL).await;
                let now = stamp(&self.active());
                if now == seen {
                    continue;
                }
                seen = now;
                match self.read(&self.active()) {
                    None => {}
                    Some(Err(e)) => tracing::error!(
                        alert = "bundle-rejected", error = %e,
                        "new bundle rejected; the policy in force stays"
                    ),
                    // The same revision again (rewritten): nothing to do.
                    Some(Ok((_, b))) if current == Some(b.revision) => {}
                    Some(Ok((_, b))) if current.is_some_and(|c| b.revision < c) => {
                        tracing::error!(
                            alert = "bundle-rejected",
                            revision = b.revision,
                            in_force = current,
                            "bundle older than the one in force rejected"
                        );
                    }
                    Some(Ok((bytes, b))) => {
                        note_issued(&b.issued_at);
                        let f = InForce {
                            revision: b.revision,
                            document: b.document,
                        };
                        apply(&f);
                        current = Some(f.revision);
                        self.keep_last_good(&bytes);
                        tracing::info!(revision = f.revision, "policy bundle applied");
                    }
                }
            }
        })
    }
}

/// What changes when the file is replaced or rewritten.
fn stamp(path: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// Pull bundles from the control plane over HTTP (a fleet node): long-poll
/// `url` (`/api/v1/bundle`) with the revision held as `If-None-Match`;
/// a bundle that verifies and is newer is written to `active`, where the
/// watcher takes it up like a local one. Failures raise an alert and keep
/// what is in force; the loop retries.
pub fn pull(url: String, token: String, source: Source) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(40)))
            .build()
            .into();
        let mut have: Option<u64> = None;
        let mut failing = false;
        // The last bundle refused (its SHA-256) and how long to wait before
        // asking again: a control plane that keeps serving a bad or older
        // bundle answers at once, which must not become a hot loop.
        let mut refused: Option<Vec<u8>> = None;
        let mut backoff = Duration::from_secs(2);
        loop {
            if have.is_none() {
                have = source.initial_quiet();
            }
            let mut req = agent
                .get(&format!("{url}?wait=25"))
                .header("authorization", &format!("Bearer {token}"));
            if let Some(r) = have {
                req = req.header("if-none-match", &format!("\"{r}\""));
            }
            let outcome = req.call().map_err(|e| e.to_string()).and_then(|mut resp| {
                match resp.status().as_u16() {
                    304 => Ok(None),
                    200 => resp
                        .body_mut()
                        .with_config()
                        .limit(clawgress_policy::bundle::MAX_BUNDLE_BYTES as u64)
                        .read_to_vec()
                        .map(Some)
                        .map_err(|e| e.to_string()),
                    s => Err(format!("HTTP {s}")),
                }
            });
            match outcome {
                Ok(None) => failing = false,
                Ok(Some(bytes)) => {
                    failing = false;
                    let digest = sha2::Sha256::digest(&bytes).to_vec();
                    let again = refused.as_deref() == Some(digest.as_slice());
                    let verdict = match Bundle::verify(&bytes, &source.key) {
                        Ok(b) if have.is_none_or(|h| b.revision > h) => {
                            if let Err(e) = crate::node::write_private(&source.active(), &bytes) {
                                tracing::error!(alert = "bundle-fetch-failed", error = %e, "cannot store the fetched bundle");
                            } else {
                                have = Some(b.revision);
                            }
                            Ok(())
                        }
                        Ok(b) => Err(format!(
                            "revision {} is not newer than the {} in force",
                            b.revision,
                            have.unwrap_or(0)
                        )),
                        Err(e) => Err(e.to_string()),
                    };
                    match verdict {
                        Ok(()) => {
                            refused = None;
                            backoff = Duration::from_secs(2);
                        }
                        Err(e) => {
                            // One alert per bad bundle, not per poll.
                            if !again {
                                tracing::error!(alert = "bundle-rejected", error = %e, url, "fetched bundle rejected; the policy in force stays");
                            }
                            refused = Some(digest);
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(60));
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(alert = "bundle-fetch-failed", error = %e, url, "control plane unreachable; the last good bundle stays in force");
                    }
                    failing = true;
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        }
    })
}

impl Source {
    /// The newest revision on disk, without logging (for the puller).
    fn initial_quiet(&self) -> Option<u64> {
        [self.active(), self.last_good()]
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|b| Bundle::verify(&b, &self.key).ok())
            .map(|b| b.revision)
            .max()
    }
}
