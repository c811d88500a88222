//! The appliance workflow over the store: candidate edits, configure,
//! commit (sign + publish), confirm, rollback, lockdown, import. Commits
//! are serialised by one lock; each is all or nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clawgress_policy::config::ConfigErrors;
use clawgress_policy::{Bundle, PolicyDocument};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use serde_json::Value;

use crate::paths;
use crate::store::{Commit, Event, Revision, Store, StoreError};
use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Path(#[from] paths::PathError),
    #[error("the document is invalid")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    Publish(String),
    #[error("{0}")]
    BadRequest(String),
}

/// One validation error: where and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

/// Errors with paths as the CLI writes them: `policies[2].action` of a
/// document whose third policy is `bad` becomes `policies.bad.action`.
fn invalid(errs: ConfigErrors, doc: &Value) -> ControlError {
    ControlError::Invalid(
        errs.0
            .into_iter()
            .map(|e| FieldError {
                path: by_id(&e.path, doc),
                reason: e.reason,
            })
            .collect(),
    )
}

fn by_id(path: &str, doc: &Value) -> String {
    let Some((list, rest)) = path.split_once('[') else {
        return path.to_string();
    };
    let Some((index, tail)) = rest.split_once(']') else {
        return path.to_string();
    };
    let entry = index
        .parse::<usize>()
        .ok()
        .and_then(|i| doc.get(list)?.get(i));
    let id = entry.and_then(|e| {
        ["agent_id", "policy_id", "team_id", "project_id", "issuer"]
            .iter()
            .find_map(|f| e.get(f).and_then(Value::as_str))
    });
    match id {
        Some(id) if id.contains('.') => format!("{list}.\"{id}\"{tail}"),
        Some(id) => format!("{list}.{id}{tail}"),
        None => path.to_string(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub version: i64,
    pub document: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Configured {
    pub revision: i64,
    pub candidate_version: i64,
    pub diff: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Committed {
    pub commit_id: i64,
    pub revision: i64,
    pub timestamp: String,
    pub confirm_by: Option<String>,
    pub diff: Vec<String>,
    /// Service → `loaded` or `pending` (the revision it has, if another).
    pub rollout: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Active {
    pub revision: Option<i64>,
    pub commit: Option<Commit>,
    pub document: Value,
}

pub struct Control {
    store: Arc<dyn Store>,
    key: SigningKey,
    bundle_dir: PathBuf,
    rollout_wait: Duration,
    commit_lock: tokio::sync::Mutex<()>,
    on_event: Option<crate::EventHook>,
    pub(crate) audit: crate::audit::AuditReader,
    pub(crate) audit_log: Option<crate::audit::AuditLog>,
    pub(crate) sessions: crate::ui::Sessions,
    /// The revision last published: bundle long-polls wait on it.
    published: tokio::sync::watch::Sender<i64>,
}

pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn canonical(doc: &PolicyDocument) -> Value {
    serde_json::from_str(&doc.to_canonical_json()).unwrap_or(Value::Null)
}

/// Parse and validate a policy document given as JSON.
pub fn validate(doc: &Value) -> Result<PolicyDocument, ControlError> {
    PolicyDocument::from_json(&doc.to_string()).map_err(|e| invalid(e, doc))
}

impl Control {
    pub fn new(c: Config) -> Control {
        Control {
            store: c.store,
            key: c.key,
            bundle_dir: c.bundle_dir,
            rollout_wait: c.rollout_wait,
            commit_lock: tokio::sync::Mutex::new(()),
            on_event: c.on_event,
            audit: crate::audit::AuditReader::new(c.audit_db),
            audit_log: c.audit_log,
            sessions: crate::ui::Sessions::default(),
            published: tokio::sync::watch::channel(0).0,
        }
    }

    /// Changes of the published revision.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.published.subscribe()
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn bundle_dir(&self) -> &Path {
        &self.bundle_dir
    }

    async fn event(&self, actor: &str, action: &str, summary: &str, result: &str) {
        let e = Event {
            id: 0,
            at: now(),
            actor: actor.into(),
            action: action.into(),
            summary: summary.into(),
            result: result.into(),
        };
        tracing::info!(actor, action, summary, result, "admin action");
        if let Some(f) = &self.on_event {
            f(&e);
        }
        if let Err(err) = self.store.add_event(&e).await {
            tracing::error!(alert = "admin-event-lost", error = %err, "cannot record an admin action");
        }
    }

    /// The active revision and its document (empty before the first commit).
    pub async fn active(&self) -> Result<Active, ControlError> {
        let commit = self.store.last_commit().await?;
        let (revision, document) = match &commit {
            Some(c) => {
                let r = self.store.revision(c.revision).await?;
                (Some(c.revision), doc_value(&r))
            }
            None => (None, canonical(&PolicyDocument::default())),
        };
        Ok(Active {
            revision,
            commit,
            document,
        })
    }

    /// The candidate; before any edit it is the active document.
    pub async fn candidate(&self) -> Result<Candidate, ControlError> {
        match self.store.candidate().await? {
            Some((doc, version)) => Ok(Candidate {
                version,
                document: serde_json::from_str(&doc).unwrap_or(Value::Null),
            }),
            None => Ok(Candidate {
                version: 0,
                document: self.active().await?.document,
            }),
        }
    }

    /// Edit the candidate with `f`; `expected` is the version the caller
    /// saw (`None`: whatever is there now, read and written under the lock).
    pub async fn edit<F>(
        &self,
        actor: &str,
        what: &str,
        expected: Option<i64>,
        f: F,
    ) -> Result<Candidate, ControlError>
    where
        F: FnOnce(&mut Value) -> Result<(), ControlError>,
    {
        let _g = self.commit_lock.lock().await;
        let mut c = self.candidate().await?;
        if let Some(e) = expected {
            if e != c.version {
                return Err(StoreError::Conflict {
                    expected: e,
                    actual: c.version,
                }
                .into());
            }
        }
        f(&mut c.document)?;
        let version = self
            .store
            .put_candidate(&c.document.to_string(), Some(c.version))
            .await?;
        self.event(actor, "edit", what, "ok").await;
        Ok(Candidate {
            version,
            document: c.document,
        })
    }

    /// Validate the candidate (or `doc`), stage it as a revision, and diff
    /// it against the active one.
    pub async fn configure(&self, actor: &str) -> Result<Configured, ControlError> {
        let _g = self.commit_lock.lock().await;
        self.configure_locked(actor).await
    }

    async fn configure_locked(&self, actor: &str) -> Result<Configured, ControlError> {
        let cand = self.candidate().await?;
        let doc = match validate(&cand.document) {
            Ok(d) => d,
            Err(e) => {
                self.event(actor, "configure", "candidate invalid", "rejected")
                    .await;
                return Err(e);
            }
        };
        let active = self.active().await?;
        let canon = canonical(&doc);
        let diff = paths::diff(&active.document, &canon);
        let id = self
            .store
            .add_revision(&canon.to_string(), active.revision, actor, "", &now())
            .await?;
        self.event(
            actor,
            "configure",
            &format!("revision {id}: {} change(s)", diff.len()),
            "ok",
        )
        .await;
        Ok(Configured {
            revision: id,
            candidate_version: cand.version,
            diff,
        })
    }

    /// Activate `revision` (default: configure the candidate now). With
    /// `confirm_within`, it is rolled back by itself unless confirmed in time.
    pub async fn commit(
        &self,
        actor: &str,
        revision: Option<i64>,
        confirm_within: Option<Duration>,
    ) -> Result<Committed, ControlError> {
        let _g = self.commit_lock.lock().await;
        let rev = match revision {
            Some(r) => r,
            None => self.configure_locked(actor).await?.revision,
        };
        self.commit_locked(actor, rev, confirm_within, "commit")
            .await
    }

    async fn commit_locked(
        &self,
        actor: &str,
        rev: i64,
        confirm_within: Option<Duration>,
        action: &str,
    ) -> Result<Committed, ControlError> {
        let r = self.store.revision(rev).await?;
        let doc = validate(&doc_value(&r))?;
        let active = self.active().await?;
        let diff = paths::diff(&active.document, &canonical(&doc));
        let at = now();
        let confirm_by = confirm_within
            .map(|d| humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string());
        // All or nothing: the bundle is written beside the active one, the
        // commit recorded, then the bundle renamed into place; if the rename
        // fails the commit row is removed again.
        let text = Bundle::sign(&doc, rev as u64, &at, &self.key);
        let tmp = self.bundle_dir.join(format!(".active.{rev}.tmp"));
        let publish = |e: std::io::Error, what: &str| {
            ControlError::Publish(format!("cannot {what} the bundle: {e}"))
        };
        std::fs::create_dir_all(&self.bundle_dir).map_err(|e| publish(e, "create the dir of"))?;
        write_synced(&tmp, text.as_bytes()).map_err(|e| publish(e, "write"))?;
        let c = Commit {
            id: 0,
            revision: rev,
            previous: active.revision,
            actor: actor.into(),
            at: at.clone(),
            confirm_by: confirm_by.clone(),
            confirmed: confirm_by.is_none(),
        };
        let id = match self.store.add_commit(&c).await {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                self.event(actor, action, &format!("revision {rev}"), "failed")
                    .await;
                return Err(e.into());
            }
        };
        if let Err(e) = std::fs::rename(&tmp, self.bundle_dir.join("active")) {
            let _ = std::fs::remove_file(&tmp);
            let _ = self.store.delete_commit(id).await;
            self.event(actor, action, &format!("revision {rev}"), "failed")
                .await;
            return Err(publish(e, "publish"));
        }
        self.published.send_replace(rev);
        // The candidate follows what is active now.
        if let Err(e) = self
            .store
            .put_candidate(&canonical(&doc).to_string(), None)
            .await
        {
            // The commit stands; only the candidate lags behind it.
            tracing::warn!(error = %e, "commit done, but the candidate could not be reset to it");
        }
        let summary = format!(
            "revision {rev} (was {}): {} change(s){}",
            active
                .revision
                .map(|r| r.to_string())
                .unwrap_or_else(|| "none".into()),
            diff.len(),
            confirm_by
                .as_deref()
                .map(|t| format!(", confirm by {t}"))
                .unwrap_or_default()
        );
        self.event(actor, action, &summary, "ok").await;
        let rollout = self.rollout(rev).await;
        Ok(Committed {
            commit_id: id,
            revision: rev,
            timestamp: at,
            confirm_by,
            diff,
            rollout,
        })
    }

    /// Wait (up to the rollout wait) until every service that reports to
    /// `bundle_dir` has loaded `rev`.
    async fn rollout(&self, rev: i64) -> BTreeMap<String, String> {
        let deadline = tokio::time::Instant::now() + self.rollout_wait;
        loop {
            let status = self.loaded();
            let done = status.values().all(|&r| r >= rev);
            if done || tokio::time::Instant::now() >= deadline {
                return status
                    .into_iter()
                    .map(|(k, r)| {
                        let s = if r >= rev {
                            "loaded".to_string()
                        } else {
                            format!("pending (has {r})")
                        };
                        (k, s)
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The revision each service reports it has loaded.
    pub fn loaded(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(&self.bundle_dir) else {
            return out;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(service) = name.strip_prefix("loaded-") {
                if let Some(r) = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|t| t.trim().parse::<i64>().ok())
                {
                    out.insert(service.to_string(), r);
                }
            }
        }
        out
    }

    /// `confirm`: keep the pending `commit confirmed`.
    pub async fn confirm(&self, actor: &str) -> Result<Commit, ControlError> {
        let _g = self.commit_lock.lock().await;
        let c = self
            .store
            .last_commit()
            .await?
            .filter(|c| !c.confirmed)
            .ok_or_else(|| ControlError::BadRequest("no commit is waiting for confirm".into()))?;
        self.store.confirm(c.id).await?;
        self.event(actor, "confirm", &format!("revision {}", c.revision), "ok")
            .await;
        Ok(Commit {
            confirmed: true,
            ..c
        })
    }

    /// Commit the document of an earlier revision again, as a new revision.
    pub async fn rollback(&self, actor: &str, to: i64) -> Result<Committed, ControlError> {
        let _g = self.commit_lock.lock().await;
        self.rollback_locked(actor, to, "rollback").await
    }

    async fn rollback_locked(
        &self,
        actor: &str,
        to: i64,
        action: &str,
    ) -> Result<Committed, ControlError> {
        let old = self.store.revision(to).await?;
        let parent = self.active().await?.revision;
        let id = self
            .store
            .add_revision(
                &old.document,
                parent,
                actor,
                &format!("{action} to revision {to}"),
                &now(),
            )
            .await?;
        self.commit_locked(actor, id, None, action).await
    }

    /// Commit, in one step, the active document with every policy replaced
    /// by one that denies everything.
    pub async fn lockdown(&self, actor: &str) -> Result<Committed, ControlError> {
        let _g = self.commit_lock.lock().await;
        let mut doc = self.active().await?.document;
        doc["policies"] = serde_json::json!([{
            "policy_id": "lockdown",
            "priority": 0,
            "match": {"destination": {"hosts": ["*", "0.0.0.0/0", "::/0"]}},
            "action": "deny"
        }]);
        let canon = canonical(&validate(&doc)?);
        let parent = self.active().await?.revision;
        let id = self
            .store
            .add_revision(&canon.to_string(), parent, actor, "lockdown", &now())
            .await?;
        self.commit_locked(actor, id, None, "lockdown").await
    }

    /// Commit `doc` as a new revision unless it equals the active one
    /// (`up --config FILE` at start and on reload; actor `file:FILE`).
    pub async fn import(
        &self,
        actor: &str,
        doc: &Value,
    ) -> Result<Option<Committed>, ControlError> {
        let parsed = validate(doc)?;
        let _g = self.commit_lock.lock().await;
        let active = self.active().await?;
        let canon = canonical(&parsed);
        if active.revision.is_some() && active.document == canon {
            // Make sure the bundle is there (a fresh bundle dir).
            if !self.bundle_dir.join("active").exists() {
                if let Some(r) = active.revision {
                    return self.commit_locked(actor, r, None, "import").await.map(Some);
                }
            }
            return Ok(None);
        }
        let id = self
            .store
            .add_revision(&canon.to_string(), active.revision, actor, "import", &now())
            .await?;
        self.commit_locked(actor, id, None, "import")
            .await
            .map(Some)
    }

    /// The document last committed by `actor` (e.g. `file:FILE`), if any.
    pub async fn last_import(&self, actor: &str) -> Result<Option<Value>, ControlError> {
        Ok(self
            .store
            .last_revision_by(actor)
            .await?
            .map(|r| doc_value(&r)))
    }

    /// Publish the active revision again if its bundle is missing (a
    /// cleared bundle directory).
    pub async fn ensure_published(&self) -> Result<(), ControlError> {
        let _g = self.commit_lock.lock().await;
        if self.bundle_dir.join("active").exists() {
            return Ok(());
        }
        if let Some(r) = self.active().await?.revision {
            self.commit_locked("system:republish", r, None, "republish")
                .await?;
        }
        Ok(())
    }

    /// A `commit confirmed` not confirmed by its time is rolled back.
    pub async fn check_confirm_deadline(&self) -> Result<Option<Committed>, ControlError> {
        let _g = self.commit_lock.lock().await;
        let Some(c) = self.store.last_commit().await?.filter(|c| !c.confirmed) else {
            return Ok(None);
        };
        let due = c
            .confirm_by
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| SystemTime::now() >= t);
        if !due {
            return Ok(None);
        }
        // Mark it settled whatever happens next, so it is not retried forever.
        self.store.confirm(c.id).await?;
        let Some(prev) = c.previous else {
            self.event(
                "system:confirm-timeout",
                "rollback",
                "no earlier revision to return to",
                "skipped",
            )
            .await;
            return Ok(None);
        };
        tracing::warn!(
            alert = "commit-not-confirmed",
            revision = c.revision,
            back_to = prev,
            "commit confirmed timed out; rolling back"
        );
        self.rollback_locked("system:confirm-timeout", prev, "rollback")
            .await
            .map(Some)
    }

    pub fn spawn_confirm_timer(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Err(e) = self.check_confirm_deadline().await {
                    tracing::error!(error = %e, "commit-confirmed check failed");
                }
            }
        })
    }

    pub async fn revisions(&self, limit: i64) -> Result<Vec<Revision>, ControlError> {
        Ok(self.store.revisions(limit).await?)
    }

    pub async fn revision_document(&self, id: i64) -> Result<(Revision, Value), ControlError> {
        let r = self.store.revision(id).await?;
        let v = doc_value(&r);
        Ok((r, v))
    }
}

fn doc_value(r: &Revision) -> Value {
    serde_json::from_str(&r.document).unwrap_or(Value::Null)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
