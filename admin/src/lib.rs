//! The control plane (DESIGN.md §7, §10): a REST API over a store of
//! revisions of the policy document, the appliance workflow (edit the
//! candidate, `configure` to validate and stage it, `commit` to sign and
//! publish it as a bundle, `rollback`, `commit confirmed`), and admin
//! tokens with roles.
//!
//! Publishing is writing the signed bundle to `bundle_dir/active`
//! atomically; authz and ratelimit watch that file, verify it against the
//! pinned key and report what they loaded in `bundle_dir/loaded-<service>`,
//! which is where the rollout status of a commit comes from.

pub mod api;
pub mod audit;
pub mod control;
pub mod paths;
pub mod pg;
pub mod store;
pub mod ui;
pub mod whatif;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;

pub use control::{Control, ControlError};
pub use pg::PgStore;
pub use store::{SqliteStore, Store};

/// What an admin token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Edit, configure, commit, roll back, lock down.
    Operator,
    /// Also import documents and create tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What is called with every admin action.
pub type EventHook = Box<dyn Fn(&store::Event) + Send + Sync>;

/// How the control plane is set up.
pub struct Config {
    pub store: Arc<dyn Store>,
    /// The control plane's bundle signing key.
    pub key: SigningKey,
    /// Where bundles are published (`state_dir/bundle`).
    pub bundle_dir: PathBuf,
    /// How long `commit` waits for the services to report the new revision.
    pub rollout_wait: Duration,
    /// Called with every admin action (the binary records it in the audit
    /// log through the events spool).
    pub on_event: Option<EventHook>,
    /// The audit query store to read (`GET /api/v1/audit`, `alerts`, `stats`).
    pub audit_db: Option<audit::AuditStore>,
    /// The audit log's directory and public key, for a record's proof
    /// status (`GET /api/v1/audit/proof`).
    pub audit_log: Option<audit::AuditLog>,
}

/// SHA-256 of a token, as stored.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A fresh admin token.
pub fn new_token() -> String {
    let b: [u8; 32] = rand::random();
    format!("cga_{}", hex::encode(b))
}

/// `dir/bundle.key` (hex seed, 0600), created on first use, with the public
/// key in `dir/bundle.pub`: the key authz and ratelimit pin.
pub fn bundle_key(dir: &Path) -> anyhow::Result<SigningKey> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("bundle.key");
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut seed = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| {
                anyhow::anyhow!("{}: not a 64-hex-digit Ed25519 seed", path.display())
            })?;
            SigningKey::from_bytes(&seed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed: [u8; 32] = rand::random();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            writeln!(f, "{}", hex::encode(seed))?;
            f.sync_all()?;
            SigningKey::from_bytes(&seed)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    std::fs::write(
        dir.join("bundle.pub"),
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )
    .with_context(|| format!("cannot write {}", dir.join("bundle.pub").display()))?;
    Ok(key)
}

/// Serve the API on `listener` until `shutdown` resolves. `extra` routes
/// (metrics, health) are merged in by the caller.
pub async fn run<L>(
    control: Arc<Control>,
    listener: L,
    extra: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let _timer = control.clone().spawn_confirm_timer();
    let app = api::router(control).merge(extra);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// On first start (no token in the store), create an admin token, keep it
/// in `file` (0600) for the CLI, and return it so it can be shown once.
pub async fn bootstrap_token(store: &dyn Store, file: &Path) -> anyhow::Result<Option<String>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if store.token_count().await? > 0 {
        return Ok(None);
    }
    let token = new_token();
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    store
        .add_token(
            &token_hash(&token),
            "bootstrap",
            Role::Admin,
            &control::now(),
        )
        .await?;
    Ok(Some(token))
}
