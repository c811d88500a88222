//! Kernel enforcement (DESIGN.md §8): one `inet clawgress` table, rendered
//! here from plain inputs (pure, snapshot-tested) and loaded through
//! `nft -j` in one transaction (the `nftables` crate: typed JSON, never
//! shell strings); the previous table backed up; a state file recording
//! what was applied and its hash; a lock so two runs cannot interleave.
//!
//! Modes:
//! - `proxy-only`: local egress is dropped except loopback, replies, DNS
//!   and Envoy's own traffic (by socket owner); Envoy's own traffic to
//!   private, link-local and metadata ranges is dropped unless allowed, so
//!   a name that resolves to 169.254.169.254 still goes nowhere; forwarded
//!   traffic from protected sources is dropped.
//! - `sovereign`: local users and protected sources reach only loopback,
//!   the allowed private ranges and the gateway (Envoy); everything else is
//!   dropped.
//! - `connected`: the table is removed; nothing Clawgress added remains.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const TABLE: &str = "clawgress";
/// Drops are logged with this prefix when logging is on.
pub const LOG_PREFIX: &str = "clawgress-drop: ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Sovereign,
    ProxyOnly,
    Connected,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sovereign => "sovereign",
            Mode::ProxyOnly => "proxy-only",
            Mode::Connected => "connected",
        }
    }
}

/// Everything a ruleset is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    pub mode: Mode,
    /// Envoy's socket owner.
    pub envoy_uid: u32,
    /// Local users whose traffic is not restricted.
    pub exempt_uids: Vec<u32>,
    /// Forwarded sources (agent VMs, containers) behind this host.
    pub protected_sources: Vec<IpNet>,
    /// Private ranges still reachable (sovereign: by everyone protected;
    /// proxy-only: by Envoy).
    pub allowed_private: Vec<IpNet>,
    /// The private / link-local / metadata ranges Envoy may not reach.
    pub guarded: Vec<IpNet>,
    /// Log every drop (with [`LOG_PREFIX`]).
    pub log: bool,
    /// Envoy's transparent listener: TCP 80/443 from protected sources is
    /// redirected to this local port instead of dropped (transparent
    /// gateway; identity by source address).
    pub transparent_port: Option<u16>,
    /// The admin API's TCP port and who may reach it (`nft.admin_sources`);
    /// anyone else's connection to it is dropped and counted.
    pub admin_port: Option<u16>,
    pub admin_sources: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft: {0}")]
    Nft(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("another `clawgress nft` is running (lock {0})")]
    Locked(PathBuf),
    #[error("{0}")]
    State(String),
}

fn prefix(net: &IpNet) -> Value {
    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

fn set_of(nets: &[&IpNet]) -> Value {
    json!({"set": nets.iter().map(|n| prefix(n)).collect::<Vec<_>>()})
}

fn daddr_in(v6: bool, nets: &[&IpNet]) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": if v6 { "ip6" } else { "ip" }, "field": "daddr"}}, "right": set_of(nets)}})
}

fn saddr_in(v6: bool, nets: &[&IpNet]) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": if v6 { "ip6" } else { "ip" }, "field": "saddr"}}, "right": set_of(nets)}})
}

fn skuid(uid: u32) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": uid}})
}

fn accept() -> Value {
    json!({"accept": null})
}

fn rule(chain: &str, comment: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "comment": comment, "expr": expr}}})
}

/// `counter`, optionally `log`, `drop`.
fn drop_counted(log: bool) -> Vec<Value> {
    let mut v = vec![json!({"counter": null})];
    if log {
        v.push(json!({"log": {"prefix": LOG_PREFIX}}));
    }
    v.push(json!({"drop": null}));
    v
}

/// As [`drop_counted`], but refused at once (`reject`): for Envoy's own
/// connects, so a guarded destination fails fast (Envoy answers 503
/// `upstream-unreachable`) instead of waiting out its connect timeout.
fn reject_counted(log: bool) -> Vec<Value> {
    let mut v = drop_counted(log);
    v.pop();
    v.push(json!({"reject": null}));
    v
}

fn split(nets: &[IpNet]) -> (Vec<&IpNet>, Vec<&IpNet>) {
    (
        nets.iter().filter(|n| matches!(n, IpNet::V4(_))).collect(),
        nets.iter().filter(|n| matches!(n, IpNet::V6(_))).collect(),
    )
}

/// The nft JSON commands that replace the table with `i`'s ruleset, in one
/// transaction (`add` then `delete` the table so the delete never fails,
/// then the new content). For `connected`, only the removal.
pub fn render(i: &Inputs) -> Value {
    let mut cmds = vec![
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
    ];
    if i.mode == Mode::Connected {
        return json!({"nftables": cmds});
    }
    cmds.push(json!({"add": {"table": {"family": "inet", "name": TABLE}}}));
    for (name, hook) in [
        ("output", "output"),
        ("forward", "forward"),
        ("input", "input"),
    ] {
        cmds.push(
            json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": name,
            "type": "filter", "hook": hook, "prio": 0, "policy": "accept"}}}),
        );
    }
    let (src4, src6) = split(&i.protected_sources);
    let (allowed4, allowed6) = split(&i.allowed_private);
    if let Some(port) = i
        .transparent_port
        .filter(|_| !i.protected_sources.is_empty())
    {
        // Destination NAT happens before routing: a redirected connection is
        // delivered locally (input), never forwarded.
        cmds.push(
            json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "prerouting",
            "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}}),
        );
        // Not redirected: connections to this host itself and to the
        // private ranges they may still reach (filtered as before).
        cmds.push(rule(
            "prerouting",
            "to this host: not redirected",
            vec![
                json!({"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}),
                accept(),
            ],
        ));
        for (v6, nets) in [(false, &allowed4), (true, &allowed6)] {
            if !nets.is_empty() {
                cmds.push(rule(
                    "prerouting",
                    "to allowed private ranges: not redirected",
                    vec![daddr_in(v6, nets), accept()],
                ));
            }
        }
        for (v6, srcs) in [(false, &src4), (true, &src6)] {
            if srcs.is_empty() {
                continue;
            }
            cmds.push(rule(
                "prerouting",
                "protected sources: HTTP/HTTPS to Envoy's transparent listener",
                vec![
                    saddr_in(v6, srcs),
                    json!({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [80, 443]}}}),
                    json!({"counter": null}),
                    json!({"redirect": {"port": port}}),
                ],
            ));
        }
    }
    if let Some(port) = i.admin_port {
        let dport = || json!({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": port}});
        let (a4, a6) = split(&i.admin_sources);
        for (v6, nets) in [(false, &a4), (true, &a6)] {
            if !nets.is_empty() {
                cmds.push(rule(
                    "input",
                    "admin API: admin sources",
                    vec![dport(), saddr_in(v6, nets), accept()],
                ));
            }
        }
        let mut e = vec![dport()];
        e.extend(drop_counted(i.log));
        cmds.push(rule("input", "admin API: anyone else", e));
    }
    let out = |comment: &str, expr: Vec<Value>| rule("output", comment, expr);
    cmds.push(out(
        "loopback",
        vec![
            json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}}),
            accept(),
        ],
    ));
    cmds.push(out(
        "IPv6 neighbour discovery",
        vec![
            json!({"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
                   "right": {"set": ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert", "mld2-listener-report"]}}}),
            accept(),
        ],
    ));
    cmds.push(out(
        "replies and related",
        vec![
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}),
            accept(),
        ],
    ));
    let (guarded4, guarded6) = split(&i.guarded);
    match i.mode {
        Mode::ProxyOnly => {
            cmds.push(out(
                "envoy: DNS",
                vec![
                    skuid(i.envoy_uid),
                    json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["udp", "tcp"]}}}),
                    json!({"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}}),
                    accept(),
                ],
            ));
            for (v6, nets) in [(false, &allowed4), (true, &allowed6)] {
                if !nets.is_empty() {
                    cmds.push(out(
                        "envoy: allowed private ranges",
                        vec![skuid(i.envoy_uid), daddr_in(v6, nets), accept()],
                    ));
                }
            }
            for (v6, nets) in [(false, &guarded4), (true, &guarded6)] {
                if !nets.is_empty() {
                    let mut e = vec![skuid(i.envoy_uid), daddr_in(v6, nets)];
                    e.extend(reject_counted(i.log));
                    cmds.push(out("envoy: private, link-local, metadata", e));
                }
            }
            cmds.push(out("envoy", vec![skuid(i.envoy_uid), accept()]));
        }
        Mode::Sovereign => {
            cmds.push(out(
                "envoy (the gateway)",
                vec![skuid(i.envoy_uid), accept()],
            ));
            for (v6, nets) in [(false, &allowed4), (true, &allowed6)] {
                if !nets.is_empty() {
                    cmds.push(out(
                        "allowed private ranges",
                        vec![daddr_in(v6, nets), accept()],
                    ));
                }
            }
        }
        Mode::Connected => {}
    }
    for uid in &i.exempt_uids {
        cmds.push(out("exempt user", vec![skuid(*uid), accept()]));
    }
    cmds.push(out("everything else", drop_counted(i.log)));

    // Forwarded traffic from protected sources.
    for (v6, srcs, allowed) in [(false, &src4, &allowed4), (true, &src6, &allowed6)] {
        if srcs.is_empty() {
            continue;
        }
        if i.mode == Mode::Sovereign && !allowed.is_empty() {
            cmds.push(rule(
                "forward",
                "protected sources: allowed private ranges",
                vec![saddr_in(v6, srcs), daddr_in(v6, allowed), accept()],
            ));
        }
        let mut e = vec![saddr_in(v6, srcs)];
        e.extend(drop_counted(i.log));
        cmds.push(rule("forward", "protected sources", e));
    }
    json!({"nftables": cmds})
}

/// Check the rendered JSON against the `nftables` crate's schema.
pub fn typed(v: &Value) -> Result<nftables::schema::Nftables<'static>, NftError> {
    serde_json::from_value(v.clone())
        .map_err(|e| NftError::Nft(format!("ruleset does not fit nft's JSON schema: {e}")))
}

/// How the kernel is reached (`nft` by default; tests may name another).
#[derive(Debug, Clone)]
pub struct Kernel {
    pub nft: String,
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel { nft: "nft".into() }
    }
}

impl Kernel {
    fn load(&self, v: &Value) -> Result<(), NftError> {
        let doc = typed(v)?;
        nftables::helper::apply_ruleset_with_args(
            &doc,
            Some(self.nft.as_str()),
            nftables::helper::DEFAULT_ARGS,
        )
        .map_err(|e| NftError::Nft(e.to_string()))
    }

    fn list(&self, args: &[&str]) -> Result<Value, NftError> {
        let text = nftables::helper::get_current_ruleset_raw(Some(self.nft.as_str()), args)
            .map_err(|e| NftError::Nft(format!("{} {}: {e}", self.nft, args.join(" "))))?;
        serde_json::from_str(&text)
            .map_err(|e| NftError::Nft(format!("unreadable nft output: {e}")))
    }

    /// The table as the kernel has it (`None` when absent).
    pub fn table(&self) -> Result<Option<Value>, NftError> {
        let tables = self.list(&["list", "tables", "inet"])?;
        let present = tables["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|o| o["table"]["name"] == TABLE && o["table"]["family"] == "inet");
        if !present {
            return Ok(None);
        }
        self.list(&["list", "table", "inet", TABLE]).map(Some)
    }
}

/// The table without what changes by itself (handles, counter values,
/// nft's metainfo), for hashing and comparing.
pub fn canonical(table: &Value) -> Value {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| *k != "handle" && *k != "metainfo")
                    .map(|(k, v)| {
                        if k == "counter" && v.is_object() {
                            (k.clone(), json!({"packets": 0, "bytes": 0}))
                        } else {
                            (k.clone(), strip(v))
                        }
                    })
                    .collect(),
            ),
            Value::Array(a) => Value::Array(
                a.iter()
                    .filter(|x| x.get("metainfo").is_none())
                    .map(strip)
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    strip(table)
}

pub fn sha256(v: &Value) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))
}

/// One counting rule as the kernel has it: what it does (`drop`, `reject`,
/// `redirect`), where, and what it counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleCounter {
    pub chain: String,
    pub comment: String,
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Every rule of the table that counts (drops, rejects, redirects).
pub fn counters(table: &Value) -> Vec<RuleCounter> {
    let mut out = Vec::new();
    for obj in table["nftables"].as_array().into_iter().flatten() {
        let rule = &obj["rule"];
        let Some(exprs) = rule["expr"].as_array() else {
            continue;
        };
        let Some(verdict) = ["drop", "reject", "redirect"]
            .into_iter()
            .find(|v| exprs.iter().any(|e| e.get(*v).is_some()))
        else {
            continue;
        };
        let Some(c) = exprs.iter().find_map(|e| e.get("counter")) else {
            continue;
        };
        out.push(RuleCounter {
            chain: rule["chain"].as_str().unwrap_or("").to_string(),
            comment: rule["comment"].as_str().unwrap_or("").to_string(),
            verdict: verdict.to_string(),
            packets: c["packets"].as_u64().unwrap_or(0),
            bytes: c["bytes"].as_u64().unwrap_or(0),
        });
    }
    out
}

/// Packets and bytes counted by every drop (or reject) rule of the table.
pub fn drops(table: &Value) -> (u64, u64) {
    counters(table)
        .iter()
        .filter(|c| c.verdict != "redirect")
        .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
}

/// What `apply` recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub mode: Mode,
    pub applied_at: String,
    /// Hash of the canonical table (empty for `connected`: no table).
    pub ruleset_sha256: String,
    pub protected_sources: Vec<IpNet>,
}

/// `status --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub mode: Option<Mode>,
    pub applied_at: Option<String>,
    pub ruleset_sha256: Option<String>,
    pub enforced: bool,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Per rule: every drop, reject and transparent redirect.
    pub rules: Vec<RuleCounter>,
}

/// Backups kept.
pub const BACKUPS: usize = 10;

/// The state directory (`state_dir/nft`) and the kernel.
pub struct Nft {
    pub dir: PathBuf,
    pub kernel: Kernel,
}

struct Lock(#[allow(dead_code)] std::fs::File);

impl Nft {
    pub fn new(dir: PathBuf) -> Nft {
        Nft {
            dir,
            kernel: Kernel::default(),
        }
    }

    fn lock(&self) -> Result<Lock, NftError> {
        std::fs::create_dir_all(self.dir.join("backups"))?;
        let path = self.dir.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| NftError::Locked(path))?;
        Ok(Lock(f))
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn state(&self) -> Result<Option<State>, NftError> {
        match std::fs::read_to_string(self.state_file()) {
            Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| {
                NftError::State(format!("{} is damaged: {e}", self.state_file().display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn write_state(&self, s: &State) -> Result<(), NftError> {
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(s).unwrap_or_default())?;
        std::fs::rename(tmp, self.state_file())?;
        Ok(())
    }

    /// Backups, oldest first.
    fn backups(&self) -> Vec<PathBuf> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(self.dir.join("backups"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e
                    .file_name()
                    .to_string_lossy()
                    .strip_suffix(".json")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Load `i`'s ruleset; the table before it is backed up, the state
    /// records what the kernel has now.
    pub fn apply(&self, i: &Inputs) -> Result<State, NftError> {
        let _lock = self.lock()?;
        let before = self.kernel.table()?;
        let backups = self.backups();
        let next = backups
            .last()
            .and_then(|p| p.file_stem()?.to_str()?.parse::<u64>().ok())
            .map_or(1, |n| n + 1);
        let saved = json!({"previous_state": self.state()?, "table": before});
        std::fs::write(
            self.dir.join("backups").join(format!("{next}.json")),
            saved.to_string(),
        )?;
        for old in backups
            .iter()
            .take((backups.len() + 1).saturating_sub(BACKUPS))
        {
            let _ = std::fs::remove_file(old);
        }
        self.kernel.load(&render(i))?;
        let state = self.record(i.mode, &i.protected_sources)?;
        tracing::info!(
            mode = i.mode.as_str(),
            sha256 = state.ruleset_sha256,
            "nft ruleset applied"
        );
        Ok(state)
    }

    fn record(&self, mode: Mode, protected: &[IpNet]) -> Result<State, NftError> {
        let now = self.kernel.table()?;
        let state = State {
            mode,
            applied_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ruleset_sha256: now
                .as_ref()
                .map(|t| sha256(&canonical(t)))
                .unwrap_or_default(),
            protected_sources: protected.to_vec(),
        };
        self.write_state(&state)?;
        Ok(state)
    }

    /// Is the kernel enforcing exactly what was recorded?
    pub fn check(&self) -> Result<(bool, String), NftError> {
        let Some(state) = self.state()? else {
            return Ok((false, "nothing applied yet (no state file)".into()));
        };
        let now = self.kernel.table()?;
        Ok(match (state.mode, now) {
            (Mode::Connected, None) => (true, "connected: no clawgress table, as recorded".into()),
            (Mode::Connected, Some(_)) => (
                false,
                "connected was recorded, but a clawgress table is loaded".into(),
            ),
            (m, None) => (
                false,
                format!(
                    "{} was recorded, but the clawgress table is gone",
                    m.as_str()
                ),
            ),
            (m, Some(t)) => {
                let h = sha256(&canonical(&t));
                if h == state.ruleset_sha256 {
                    (
                        true,
                        format!("{}: enforced as recorded ({})", m.as_str(), &h[..16]),
                    )
                } else {
                    (false, format!("{}: the kernel's table differs from what was applied (someone changed it)", m.as_str()))
                }
            }
        })
    }

    pub fn status(&self) -> Result<Status, NftError> {
        let state = self.state()?;
        let (enforced, _) = self.check()?;
        let table = self.kernel.table()?;
        let (p, b) = table.as_ref().map(drops).unwrap_or((0, 0));
        Ok(Status {
            rules: table.as_ref().map(counters).unwrap_or_default(),
            mode: state.as_ref().map(|s| s.mode),
            applied_at: state.as_ref().map(|s| s.applied_at.clone()),
            ruleset_sha256: state.map(|s| s.ruleset_sha256),
            enforced,
            dropped_packets: p,
            dropped_bytes: b,
        })
    }

    /// Restore the table saved before the last apply (or the one before
    /// `to` applies ago), and record it so `check` passes.
    pub fn rollback(&self, to: usize) -> Result<State, NftError> {
        let _lock = self.lock()?;
        let backups = self.backups();
        let pick = backups
            .len()
            .checked_sub(to.max(1))
            .and_then(|i| backups.get(i))
            .ok_or_else(|| {
                NftError::State(format!(
                    "no backup {to} apply(s) back ({} kept)",
                    backups.len()
                ))
            })?;
        let saved: Value = serde_json::from_str(&std::fs::read_to_string(pick)?)
            .map_err(|e| NftError::State(format!("{}: {e}", pick.display())))?;
        let mut cmds = vec![
            json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
            json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
        ];
        let table = &saved["table"];
        for obj in table["nftables"].as_array().into_iter().flatten() {
            if obj.get("metainfo").is_some() {
                continue;
            }
            let mut o = obj.clone();
            if let Some(m) = o.as_object_mut() {
                for v in m.values_mut() {
                    if let Some(inner) = v.as_object_mut() {
                        inner.remove("handle");
                    }
                }
            }
            cmds.push(json!({"add": o}));
        }
        self.kernel.load(&json!({"nftables": cmds}))?;
        let prev: Option<State> = serde_json::from_value(saved["previous_state"].clone())
            .ok()
            .flatten();
        let mode = match (&prev, table.is_null()) {
            (Some(p), _) => p.mode,
            (None, true) => Mode::Connected,
            (None, false) => Mode::ProxyOnly,
        };
        let protected = prev.map(|p| p.protected_sources).unwrap_or_default();
        let state = self.record(mode, &protected)?;
        let _ = std::fs::remove_file(pick);
        tracing::info!(mode = mode.as_str(), "nft ruleset rolled back");
        Ok(state)
    }
}

/// A user's uid: a number, or a name looked up in `passwd` (the file's
/// path is a parameter for tests).
pub fn uid_of(user: &str, passwd: &Path) -> Result<u32, NftError> {
    if let Ok(n) = user.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(passwd)?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse::<u32>().ok()?;
            Some((name, uid))
        })
        .find(|(n, _)| *n == user)
        .map(|(_, u)| u)
        .ok_or_else(|| {
            NftError::State(format!(
                "no user {user:?} on this host (create it, or give a uid)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(mode: Mode) -> Inputs {
        Inputs {
            mode,
            envoy_uid: 990,
            exempt_uids: vec![0],
            protected_sources: vec![
                "10.20.0.0/24".parse().expect("net"),
                "fd20::/64".parse().expect("net"),
            ],
            allowed_private: vec!["10.1.2.0/24".parse().expect("net")],
            guarded: ["10.0.0.0/8", "169.254.0.0/16", "fe80::/10"]
                .iter()
                .map(|s| s.parse().expect("net"))
                .collect(),
            log: true,
            transparent_port: None,
            admin_port: None,
            admin_sources: vec![],
        }
    }

    #[test]
    fn every_rendered_ruleset_fits_the_nft_schema() {
        for m in [Mode::ProxyOnly, Mode::Sovereign, Mode::Connected] {
            typed(&render(&inputs(m))).expect("typed");
            typed(&render(&Inputs {
                transparent_port: Some(15001),
                admin_port: Some(9080),
                admin_sources: vec!["127.0.0.1/32".parse().expect("net")],
                ..inputs(m)
            }))
            .expect("typed");
        }
    }

    #[test]
    fn transparent_redirect_and_admin_guard_snapshot() {
        let s = shape(&render(&Inputs {
            transparent_port: Some(15001),
            admin_port: Some(9080),
            admin_sources: vec![
                "127.0.0.1/32".parse().expect("net"),
                "10.9.0.0/16".parse().expect("net"),
            ],
            ..inputs(Mode::ProxyOnly)
        }));
        let ours: Vec<&String> = s
            .iter()
            .filter(|l| l.contains("prerouting") || l.contains(" input"))
            .collect();
        let want = [
            "add chain input",
            "add chain prerouting",
            r#"add rule prerouting "to this host: not redirected": [{"match":{"left":{"fib":{"flags":["daddr"],"result":"type"}},"op":"==","right":"local"}},{"accept":null}]"#,
            r#"add rule prerouting "to allowed private ranges: not redirected": [{"match":{"left":{"payload":{"field":"daddr","protocol":"ip"}},"op":"==","right":{"set":[{"prefix":{"addr":"10.1.2.0","len":24}}]}}},{"accept":null}]"#,
            r#"add rule prerouting "protected sources: HTTP/HTTPS to Envoy's transparent listener": [{"match":{"left":{"payload":{"field":"saddr","protocol":"ip"}},"op":"==","right":{"set":[{"prefix":{"addr":"10.20.0.0","len":24}}]}}},{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":{"set":[80,443]}}},{"counter":null},{"redirect":{"port":15001}}]"#,
            r#"add rule prerouting "protected sources: HTTP/HTTPS to Envoy's transparent listener": [{"match":{"left":{"payload":{"field":"saddr","protocol":"ip6"}},"op":"==","right":{"set":[{"prefix":{"addr":"fd20::","len":64}}]}}},{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":{"set":[80,443]}}},{"counter":null},{"redirect":{"port":15001}}]"#,
            r#"add rule input "admin API: admin sources": [{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":9080}},{"match":{"left":{"payload":{"field":"saddr","protocol":"ip"}},"op":"==","right":{"set":[{"prefix":{"addr":"127.0.0.1","len":32}},{"prefix":{"addr":"10.9.0.0","len":16}}]}}},{"accept":null}]"#,
            r#"add rule input "admin API: anyone else": [{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":9080}},{"counter":null},{"log":{"prefix":"clawgress-drop: "}},{"drop":null}]"#,
        ];
        assert_eq!(ours, want, "{ours:#?}");
        // No protected sources: nothing to redirect, no NAT chain.
        let none = shape(&render(&Inputs {
            transparent_port: Some(15001),
            protected_sources: vec![],
            ..inputs(Mode::ProxyOnly)
        }));
        assert!(!none.iter().any(|l| l.contains("prerouting")), "{none:#?}");
    }

    /// Snapshots: the rules of each mode, one line each (chain, comment).
    fn shape(v: &Value) -> Vec<String> {
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let (verb, obj) = c.as_object().and_then(|m| m.iter().next()).expect("cmd");
                let (kind, body) = obj.as_object().and_then(|m| m.iter().next()).expect("obj");
                match kind.as_str() {
                    "rule" => format!(
                        "{verb} rule {} {:?}: {}",
                        body["chain"].as_str().unwrap_or(""),
                        body["comment"].as_str().unwrap_or(""),
                        body["expr"]
                    ),
                    _ => format!("{verb} {kind} {}", body["name"].as_str().unwrap_or("")),
                }
            })
            .collect()
    }

    #[test]
    fn proxy_only_snapshot() {
        let s = shape(&render(&inputs(Mode::ProxyOnly)));
        let want = [
            "add table clawgress",
            "delete table clawgress",
            "add table clawgress",
            "add chain output",
            "add chain forward",
            "add chain input",
            r#"add rule output "loopback": [{"match":{"left":{"meta":{"key":"oifname"}},"op":"==","right":"lo"}},{"accept":null}]"#,
            r#"add rule output "IPv6 neighbour discovery": [{"match":{"left":{"payload":{"field":"type","protocol":"icmpv6"}},"op":"==","right":{"set":["nd-router-solicit","nd-neighbor-solicit","nd-neighbor-advert","mld2-listener-report"]}}},{"accept":null}]"#,
            r#"add rule output "replies and related": [{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":["established","related"]}},{"accept":null}]"#,
            r#"add rule output "envoy: DNS": [{"match":{"left":{"meta":{"key":"skuid"}},"op":"==","right":990}},{"match":{"left":{"meta":{"key":"l4proto"}},"op":"==","right":{"set":["udp","tcp"]}}},{"match":{"left":{"payload":{"field":"dport","protocol":"th"}},"op":"==","right":53}},{"accept":null}]"#,
            r#"add rule output "envoy: allowed private ranges": [{"match":{"left":{"meta":{"key":"skuid"}},"op":"==","right":990}},{"match":{"left":{"payload":{"field":"daddr","protocol":"ip"}},"op":"==","right":{"set":[{"prefix":{"addr":"10.1.2.0","len":24}}]}}},{"accept":null}]"#,
            r#"add rule output "envoy: private, link-local, metadata": [{"match":{"left":{"meta":{"key":"skuid"}},"op":"==","right":990}},{"match":{"left":{"payload":{"field":"daddr","protocol":"ip"}},"op":"==","right":{"set":[{"prefix":{"addr":"10.0.0.0","len":8}},{"prefix":{"addr":"169.254.0.0","len":16}}]}}},{"counter":null},{"log":{"prefix":"clawgress-drop: "}},{"reject":null}]"#,
            r#"add rule output "envoy: private, link-local, metadata": [{"match":{"left":{"meta":{"key":"skuid"}},"op":"==","right":990}},{"match":{"left":{"payload":{"field":"daddr","protocol":"ip6"}},"op":"==","right":{"set":[{"prefix":{"addr":"fe80::","len":10}}]}}},{"counter":null},{"log":{"prefix":"clawgress-drop: "}},{"reject":null}]"#,
            r#"add rule output "envoy": [{"match":{"left":{"meta":{"key":"skuid"}},"op":"==","right":990}},{"accept":null}]"#,
            r#"add rule output "exempt user": [{"match":{"left":{"meta":{"key":"skuid"}},"op":"==","right":0}},{"accept":null}]"#,
            r#"add rule output "everything else": [{"counter":null},{"log":{"prefix":"clawgress-drop: "}},{"drop":null}]"#,
            r#"add rule forward "protected sources": [{"match":{"left":{"payload":{"field":"saddr","protocol":"ip"}},"op":"==","right":{"set":[{"prefix":{"addr":"10.20.0.0","len":24}}]}}},{"counter":null},{"log":{"prefix":"clawgress-drop: "}},{"drop":null}]"#,
            r#"add rule forward "protected sources": [{"match":{"left":{"payload":{"field":"saddr","protocol":"ip6"}},"op":"==","right":{"set":[{"prefix":{"addr":"fd20::","len":64}}]}}},{"counter":null},{"log":{"prefix":"clawgress-drop: "}},{"drop":null}]"#,
        ];
        assert_eq!(s, want, "{s:#?}");
    }

    #[test]
    fn sovereign_and_connected_snapshots() {
        let s = shape(&render(&inputs(Mode::Sovereign)));
        let rules: Vec<&str> = s
            .iter()
            .filter(|l| l.starts_with("add rule"))
            .map(|l| l.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            rules,
            [
                "add rule output \"loopback\"",
                "add rule output \"IPv6 neighbour discovery\"",
                "add rule output \"replies and related\"",
                "add rule output \"envoy (the gateway)\"",
                "add rule output \"allowed private ranges\"",
                "add rule output \"exempt user\"",
                "add rule output \"everything else\"",
                "add rule forward \"protected sources",
                "add rule forward \"protected sources\"",
                "add rule forward \"protected sources\"",
            ]
        );
        assert_eq!(
            shape(&render(&inputs(Mode::Connected))),
            ["add table clawgress", "delete table clawgress"]
        );
    }

    #[test]
    fn canonical_ignores_handles_and_counter_values() {
        let a = json!({"nftables": [{"metainfo": {"version": "1"}}, {"rule": {"handle": 4, "expr": [{"counter": {"packets": 9, "bytes": 900}}, {"drop": null}]}}]});
        let b = json!({"nftables": [{"rule": {"handle": 7, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}]});
        assert_eq!(sha256(&canonical(&a)), sha256(&canonical(&b)));
        assert_eq!(drops(&a), (9, 900));
    }

    #[test]
    fn uids_by_number_or_passwd_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("passwd");
        std::fs::write(
            &p,
            "root:x:0:0:root:/root:/bin/sh\nclawgress-envoy:x:990:990::/:/usr/sbin/nologin\n",
        )
        .expect("write");
        assert_eq!(uid_of("990", &p).expect("n"), 990);
        assert_eq!(uid_of("clawgress-envoy", &p).expect("name"), 990);
        assert!(uid_of("nobody-here", &p).is_err());
    }
}
