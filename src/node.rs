//! This node's view of the config: load and validate the §12 document,
//! find the state directory, and create the embedded default on first start.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clawgress_policy::config::KeyHash;
use clawgress_policy::Document;
use sha2::Digest;

/// The embedded default document (`up` with no `--config`).
const DEFAULT_CONFIG: &str = include_str!("default-config.yaml");

/// Read and validate a config file. Errors name the file, line, field and
/// reason, one per line.
pub fn load(path: &Path) -> Result<Document> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let mut doc = Document::from_yaml(&text).map_err(|errs| {
        let lines: Vec<String> = errs
            .0
            .iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect();
        anyhow::anyhow!("invalid config:\n{}", lines.join("\n"))
    })?;
    // Key files named relative to the config file are found next to it.
    let base = path.parent().unwrap_or(Path::new("."));
    // (as written in the file, as opened): to name the line of a bad one.
    let mut named: Vec<(String, String)> = Vec::new();
    for iss in &mut doc.jwt.issuers {
        for f in [&mut iss.jwks_file, &mut iss.hs256_secret_file]
            .into_iter()
            .flatten()
        {
            let written = f.display().to_string();
            if f.is_relative() {
                *f = base.join(&*f);
            }
            named.push((written, f.display().to_string()));
        }
    }
    // Key files are part of the config: a bad one is refused now, not at
    // the first request.
    jwt_verifier(&doc).map_err(|e| {
        let line = key_file_line(&text, &named, &e)
            .map(|n| format!("line {n}: "))
            .unwrap_or_default();
        anyhow::anyhow!("invalid config:\n{}: {line}{e}", path.display())
    })?;
    Ok(doc)
}

/// The line of the key file a key-loading error names (`named`: each file
/// as written and as opened), or else of the issuer it names.
fn key_file_line(text: &str, named: &[(String, String)], error: &str) -> Option<usize> {
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
    named
        .iter()
        .find(|(_, opened)| error.contains(&format!(" {opened}")))
        .and_then(|(written, _)| line_of(written))
        .or_else(|| {
            let issuer = error.strip_prefix("jwt issuer ")?.split(": ").next()?;
            line_of(issuer)
        })
}

/// The issuers' keys of `doc`, loaded from their files.
pub fn jwt_verifier(doc: &Document) -> Result<clawgress_authz::jwt::JwtVerifier, String> {
    clawgress_authz::jwt::JwtVerifier::load(&doc.jwt.issuers)
}

/// The same, with JWKS documents already fetched from `jwks_url`s.
pub fn jwt_verifier_with(
    doc: &Document,
    fetched: &std::collections::HashMap<String, String>,
) -> Result<clawgress_authz::jwt::JwtVerifier, String> {
    clawgress_authz::jwt::JwtVerifier::load_with(&doc.jwt.issuers, fetched)
}

/// The revision name decisions are reported under: a digest of the policy
/// document's canonical form, so the same policy always has the same name.
pub fn revision_of(doc: &Document) -> String {
    let json = doc.policy().to_canonical_json();
    let digest = sha2::Sha256::digest(json.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..16])
}

/// The state directory: `--state-dir`, then `gateway.state_dir`, then a
/// per-user default (`$XDG_STATE_HOME/clawgress` or
/// `~/.local/state/clawgress`).
pub fn state_dir(
    flag: Option<&Path>,
    doc: Option<&Document>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = doc.and_then(|d| d.gateway.state_dir.clone()) {
        return Ok(p);
    }
    if let Some(x) = env("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(x).join("clawgress"));
    }
    match env("HOME").filter(|s| !s.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/state/clawgress")),
        None => bail!("no state directory: set --state-dir, gateway.state_dir, or HOME"),
    }
}

/// For the verbs that find a running `up` (`status`, `reload`): FILE loaded
/// if given, and the state dir from `--state-dir`, else from FILE — as far
/// as it parses as YAML when it does not validate, since these are what an
/// operator runs when something is wrong — else the default.
pub fn locate(
    config: Option<&Path>,
    state_dir: Option<&Path>,
) -> (Result<Option<Document>>, Result<PathBuf>) {
    let env = |k: &str| std::env::var(k).ok();
    let loaded = config.map(load).transpose();
    let named = match (&loaded, config) {
        (Err(_), Some(p)) => state_dir_named_in(p),
        _ => None,
    };
    let doc = loaded.as_ref().ok().and_then(|d| d.as_ref());
    let dir = self::state_dir(state_dir.or(named.as_deref()), doc, &env);
    (loaded, dir)
}

/// `gateway.state_dir` as written in a config file that does not validate
/// (as far as it parses as YAML at all): where to find the running `up`
/// that should hear about it.
pub fn state_dir_named_in(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).ok()?;
    // As `load` takes it: as written.
    Some(PathBuf::from(v.get("gateway")?.get("state_dir")?.as_str()?))
}

/// The audit directory: `stores.audit_dir`, else `state_dir/audit`.
pub fn audit_dir(doc: &Document, state_dir: &Path) -> PathBuf {
    doc.stores
        .audit_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("audit"))
}

/// The mark the audit sink sets while its storage is full, and authz
/// watches (§10).
pub fn audit_blocked_mark(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.blocked")
}

/// Keys this node holds (the audit signing key): `state_dir/keys`.
pub fn keys_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("keys")
}

/// The spool directory: `stores.audit_spool_dir`, else `state_dir/spool`.
/// It holds Envoy's access-log file and the sink's checkpoint in it.
pub fn spool_dir(doc: &Document, state_dir: &Path) -> PathBuf {
    doc.stores
        .audit_spool_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("spool"))
}

/// The events spool: alerts and admin actions, appended by every process,
/// followed by the audit sink.
pub fn events_spool(doc: &Document, state_dir: &Path) -> PathBuf {
    spool_dir(doc, state_dir).join("events.jsonl")
}

/// The audit query store (SQLite).
pub fn audit_query_db(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.db")
}

/// Where the audit query store is (`stores.audit_query`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditQuery {
    Sqlite(PathBuf),
    Postgres(String),
}

pub fn audit_query(doc: &Document, state_dir: &Path) -> AuditQuery {
    match doc.stores.audit_query.as_str() {
        "sqlite" => AuditQuery::Sqlite(audit_query_db(state_dir)),
        url => AuditQuery::Postgres(url.to_string()),
    }
}

/// The access-log file Envoy writes and the sink follows.
pub fn access_log_file(doc: &Document, state_dir: &Path) -> PathBuf {
    spool_dir(doc, state_dir).join("envoy-access.log")
}

/// Create a directory (and parents) that only its owner may read and
/// write. Group read/traverse bits already granted (by `up`, to Envoy's
/// group, see [`share_with_group`]) are kept; group write and anything for
/// others are removed.
pub fn private_dir(p: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("cannot create {}", p.display()))?;
    let group = std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o050)
        .unwrap_or(0);
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700 | group))
        .with_context(|| format!("cannot restrict {}", p.display()))?;
    Ok(())
}

/// Give group `gid` the access `mode` grants to the group on `p` (a
/// directory or file this process owns): `chown :gid`, then `mode`.
pub fn share_with_group(p: &Path, gid: u32, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(p, None, Some(gid))
        .with_context(|| format!("cannot give group {gid} {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", p.display()))
}

/// Why group `gid` is not private to user `uid` (another account has it as
/// its primary group, it lists members, or — for a uid with no account —
/// it exists at all); `None` if it is the user's own.
pub fn group_shared(uid: u32, gid: u32, passwd: &str, group: &str) -> Option<String> {
    let has_account = passwd
        .lines()
        .any(|l| l.split(':').nth(2).and_then(|u| u.parse::<u32>().ok()) == Some(uid));
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let (Some(u), Some(g)) = (
            f.get(2).and_then(|u| u.parse::<u32>().ok()),
            f.get(3).and_then(|g| g.parse::<u32>().ok()),
        ) else {
            continue;
        };
        if g == gid && u != uid {
            return Some(format!("it is also {}'s group", f[0]));
        }
    }
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(gid) {
            continue;
        }
        if !has_account {
            return Some(format!("group {} exists", f[0]));
        }
        if f.get(3).is_some_and(|m| !m.trim().is_empty()) {
            return Some(format!("group {} has members", f[0]));
        }
    }
    None
}

/// Remove group and other access from the regular files directly in
/// `dir` (e.g. SQLite databases made with the default umask).
pub fn restrict_files(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_file() && m.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(
                e.path(),
                std::fs::Permissions::from_mode(m.permissions().mode() & 0o700),
            )
            .with_context(|| format!("cannot restrict {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// A user's uid and primary gid from `passwd` (e.g. `/etc/passwd`), by name
/// or number; a number with no entry is used as both uid and gid.
pub fn user_ids(user: &str, passwd: &str) -> Option<(u32, u32)> {
    let by_number = user.parse::<u32>().ok();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let (Some(name), Some(uid), Some(gid)) = (f.first(), f.get(2), f.get(3)) else {
            continue;
        };
        let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
            continue;
        };
        if *name == user || by_number == Some(uid) {
            return Some((uid, gid));
        }
    }
    by_number.map(|n| (n, n))
}

/// A fresh 256-bit API key, URL-safe so it can sit in a proxy URL as is.
pub fn new_api_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("cg_{}", hex::encode(bytes))
}

/// The embedded default, materialised in the state directory on first
/// start. Returns its path and, on first start only, the demo key.
pub fn default_config(state_dir: &Path) -> Result<(PathBuf, Option<String>)> {
    let path = state_dir.join("default-config.yaml");
    if path.exists() {
        return Ok((path, None));
    }
    let key = new_api_key();
    let text = DEFAULT_CONFIG.replace("{{demo_key_sha256}}", KeyHash::of_key(&key).as_str());
    // Validate before writing: the embedded default must always be valid.
    Document::from_yaml(&text).map_err(|e| anyhow::anyhow!("embedded default invalid: {e}"))?;
    write_private(&path, text.as_bytes())?;
    Ok((path, Some(key)))
}

/// Write a 0600 file atomically (temp file + rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A temp name of this process's own: two services keeping the same
    // file (authz and ratelimit, `bundle/last-good`) never write into one
    // temp file at once.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // A full disk, say: no half-written temp file left behind (each
        // process has its own name, so nothing would reuse it).
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::Error::new(e).context(format!("cannot write {}", path.display())));
    }
    Ok(())
}

/// Keep the document `up` accepted (from `--config` at start, or at the
/// last reload that validated) as `run/config.yaml`, key-file paths made
/// absolute: the services read this one when they (re)start, so a child
/// restarted while the operator's file is mid-edit or invalid runs with
/// what is in force instead of failing (§10: an invalid file changes
/// nothing). Returns None, after saying why, when the written copy would
/// not load back as the same document (the file itself is used then).
pub fn keep_accepted(run: &Path, doc: &Document) -> Option<PathBuf> {
    let path = run.join("config.yaml");
    let attempt = || -> Result<()> {
        let text = serde_yaml_ng::to_string(doc)?;
        let back = Document::from_yaml(&text)
            .map_err(|e| anyhow::anyhow!("it does not load back: {e}"))?;
        if &back != doc {
            anyhow::bail!("it loads back as a different document");
        }
        write_private(&path, text.as_bytes())
    };
    match attempt() {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot keep the accepted config; services restart from the config file itself");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_private_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The target is a directory: the rename fails.
        let target = dir.path().join("last-good");
        std::fs::create_dir(&target).expect("mkdir");
        assert!(write_private(&target, b"x").is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("last-good")]);
    }

    #[test]
    fn the_accepted_document_is_kept_and_loads_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"
gateway: {proxy_listen: "127.0.0.1:10001", quota_check: rls, audit_input: grpc, private_destinations_allowed: [10.1.2.0/24]}
stores: {ratelimit: "redis://127.0.0.1:6379", ratelimit_failure_mode: allow}
nft: {mode: sovereign, exempt_users: [ops], allowed_private: [192.168.0.0/16]}
audit: {min_free_mb: 64, on_full: allow}
agents:
  - {agent_id: bot, team_id: t, project_id: p, environment: prod, auth_type: api_key, api_key_sha256: "0000000000000000000000000000000000000000000000000000000000000000", profile: external-api}
  - {agent_id: vm, auth_type: source_ip, source_cidrs: [10.20.0.0/24], status: disabled}
jwt:
  issuers:
    - {issuer: "https://idp.example", audiences: [clawgress], jwks_file: /etc/clawgress/jwks.json, clock_skew_s: 30}
policies:
  - {policy_id: a, priority: 5, mode: shadow, match: {identity: {team_id: [t, u]}, destination: {hosts: ["*.example.com", 203.0.113.0/24], ports: [443]}, method: [GET], path_prefix: /v1/}, action: deny}
quotas:
  - {agent_id: bot, rps_limit: 10, rpm_limit: 300, mode: alert_only}
"#;
        let doc = Document::from_yaml(text).expect("valid");
        let kept = keep_accepted(dir.path(), &doc).expect("kept");
        let back = Document::from_yaml(&std::fs::read_to_string(&kept).expect("read"))
            .expect("loads back");
        assert_eq!(back, doc);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kept).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn embedded_default_is_valid_and_key_printed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, key) = default_config(dir.path()).expect("first");
        let key = key.expect("key on first start");
        let doc = load(&path).expect("valid");
        assert_eq!(
            doc.agents[0]
                .api_key_sha256
                .as_ref()
                .map(|h| h.as_str().to_string()),
            Some(KeyHash::of_key(&key).as_str().to_string())
        );
        let (_, again) = default_config(dir.path()).expect("second");
        assert!(again.is_none(), "the key is shown once only");
    }

    #[test]
    fn user_ids_by_name_or_number() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nclawgress-envoy:x:990:985::/nonexistent:/usr/sbin/nologin\nbad:line\n";
        assert_eq!(user_ids("clawgress-envoy", passwd), Some((990, 985)));
        assert_eq!(user_ids("990", passwd), Some((990, 985)));
        assert_eq!(user_ids("4242", passwd), Some((4242, 4242)));
        assert_eq!(user_ids("root", passwd), Some((0, 0)));
        assert_eq!(user_ids("nobody-here", passwd), None);
    }

    #[test]
    fn a_group_is_private_only_if_nobody_else_is_in_it() {
        let passwd = "root:x:0:0::/root:/bin/sh\nenvoy:x:990:990::/:/bin/false\nbob:x:1000:100::/home/bob:/bin/sh\nmallory:x:1001:100::/:/bin/sh\n";
        let group = "root:x:0:\nenvoy:x:990:\nusers:x:100:\nwheel:x:10:alice\nloner:x:4000:\n";
        assert_eq!(group_shared(990, 990, passwd, group), None);
        assert!(group_shared(1000, 100, passwd, group).is_some_and(|w| w.contains("mallory")));
        assert!(group_shared(990, 10, passwd, group).is_some_and(|w| w.contains("members")));
        // A uid with no account: its gid must name no group at all.
        assert_eq!(group_shared(4242, 4242, passwd, group), None);
        assert!(group_shared(4000, 4000, passwd, group).is_some_and(|w| w.contains("loner")));
    }

    #[test]
    fn private_dir_keeps_group_traverse_but_never_group_write() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("x");
        private_dir(&p).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o700);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        private_dir(&p).expect("again");
        assert_eq!(mode(&p), 0o750);
    }

    #[test]
    fn state_dir_precedence() {
        let env = |k: &str| match k {
            "HOME" => Some("/home/u".to_string()),
            _ => None,
        };
        assert_eq!(
            state_dir(None, None, &env).expect("dir"),
            PathBuf::from("/home/u/.local/state/clawgress")
        );
        assert_eq!(
            state_dir(Some(Path::new("/x")), None, &env).expect("dir"),
            PathBuf::from("/x")
        );
        let none = |_: &str| None;
        assert!(state_dir(None, None, &none).is_err());
    }
}
