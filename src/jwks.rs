//! JWKS from URLs (§3), fetched off the request path: authz starts with the
//! last good copies kept in `state_dir/jwks/`, fetches each issuer's
//! `jwks_url` in the background every `jwks_refresh_s` (sooner after a
//! failure), and rebuilds its verifier when a fetched set changes. A URL
//! that fails, or answers something that is not a usable JWKS, raises an
//! alert and the last good set stays. Nothing in a token (`jku`, `x5u`,
//! `kid`) is ever fetched: only configured URLs are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawgress_policy::config::JwtIssuer;

/// Largest JWKS document accepted.
const MAX_BYTES: u64 = 1024 * 1024;
/// Retry delay after a failed fetch.
const RETRY: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(5);

/// The last good JWKS text per URL, in memory and on disk.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    texts: Mutex<HashMap<String, String>>,
}

fn file_of(dir: &Path, url: &str) -> PathBuf {
    use sha2::Digest;
    dir.join(format!(
        "{}.json",
        &hex::encode(sha2::Sha256::digest(url.as_bytes()))[..32]
    ))
}

impl Cache {
    /// The copies kept on disk for `urls`.
    pub fn load(dir: PathBuf, urls: &[String]) -> Cache {
        let texts = urls
            .iter()
            .filter_map(|u| {
                std::fs::read_to_string(file_of(&dir, u))
                    .ok()
                    .map(|t| (u.clone(), t))
            })
            .collect();
        Cache {
            dir,
            texts: Mutex::new(texts),
        }
    }

    pub fn snapshot(&self) -> HashMap<String, String> {
        self.texts.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Keep `text` for `url`; true if it changed.
    fn put(&self, url: &str, text: String) -> bool {
        let Ok(mut m) = self.texts.lock() else {
            return false;
        };
        if m.get(url) == Some(&text) {
            return false;
        }
        if crate::node::private_dir(&self.dir).is_ok() {
            let _ = crate::node::write_private(&file_of(&self.dir, url), text.as_bytes());
        }
        m.insert(url.to_string(), text);
        true
    }
}

/// The configured JWKS URLs with their refresh periods.
pub fn urls(issuers: &[JwtIssuer]) -> Vec<(String, String, Duration)> {
    issuers
        .iter()
        .filter_map(|i| {
            i.jwks_url.as_ref().map(|u| {
                (
                    i.issuer.clone(),
                    u.clone(),
                    Duration::from_secs(i.jwks_refresh_s.max(1)),
                )
            })
        })
        .collect()
}

fn fetch(url: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .max_redirects(0)
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| e.to_string())?;
    resp.body_mut()
        .with_config()
        .limit(MAX_BYTES)
        .read_to_string()
        .map_err(|e| e.to_string())
}

/// Fetch every URL when due, for as long as the process runs. `issuers`
/// gives the current configuration (it changes with bundles); `changed`
/// is called after a URL's set changed.
pub fn spawn<I, F>(cache: Arc<Cache>, issuers: I, changed: F) -> tokio::task::JoinHandle<()>
where
    I: Fn() -> Vec<JwtIssuer> + Send + 'static,
    F: Fn() + Send + 'static,
{
    tokio::spawn(async move {
        let mut due: HashMap<String, Instant> = HashMap::new();
        loop {
            let now = Instant::now();
            for (issuer, url, every) in urls(&issuers()) {
                if due.get(&url).is_some_and(|t| *t > now) {
                    continue;
                }
                let u = url.clone();
                let got = tokio::task::spawn_blocking(move || fetch(&u))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                // Only a document with at least one usable key replaces the
                // last good set.
                let checked = got.and_then(|text| {
                    match clawgress_authz::jwt::parse_jwks(&issuer, &url, &text) {
                        Ok(keys) if !keys.is_empty() => Ok(text),
                        Ok(_) => Err("no usable key in the answer".to_string()),
                        Err(e) => Err(e),
                    }
                });
                match checked {
                    Ok(text) => {
                        due.insert(url.clone(), now + every);
                        if cache.put(&url, text) {
                            tracing::info!(issuer, url, "JWKS fetched; keys updated");
                            changed();
                        }
                    }
                    Err(e) => {
                        due.insert(url.clone(), now + RETRY.min(every));
                        tracing::warn!(
                            alert = "jwks-fetch-failed", issuer, url, error = %e,
                            "JWKS fetch failed; the last good keys stay in use"
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
