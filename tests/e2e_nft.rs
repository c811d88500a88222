//! Kernel enforcement in network namespaces the test makes itself (§8): a
//! "host" namespace where agents run as local users and `clawgress nft`
//! applies its rules, joined by a veth pair to an "internet" namespace
//! running a test server. Needs root (CI runs as root); skipped otherwise.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const ENVOY_UID: &str = "4242";
const AGENT_UID: &str = "4343";

struct Net {
    host: String,
    inet: String,
    server: std::process::Child,
    dir: tempfile::TempDir,
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run")
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn new() -> Option<Net> {
        if !sh(&["id", "-u"]).stdout.starts_with(b"0") {
            eprintln!("skipped: needs root for network namespaces");
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!(
            "{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let (host, inet) = (format!("cgh{id}"), format!("cgi{id}"));
        let (vh, vi) = (format!("vh{id}"), format!("vi{id}"));
        must(&["ip", "netns", "add", &host]);
        must(&["ip", "netns", "add", &inet]);
        must(&[
            "ip", "link", "add", &vh, "netns", &host, "type", "veth", "peer", "name", &vi, "netns",
            &inet,
        ]);
        for (ns, dev, v4, v6) in [
            (&host, &vh, "44.0.0.1/24", "2a99::1/64"),
            (&inet, &vi, "44.0.0.2/24", "2a99::2/64"),
        ] {
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", ns, "addr", "add", v4, "dev", dev]);
            must(&["ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        // The metadata address lives on the "internet" side too.
        must(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            &vi,
        ]);
        must(&[
            "ip",
            "-n",
            &host,
            "route",
            "add",
            "169.254.169.254/32",
            "dev",
            &vh,
        ]);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &inet,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "::",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("server");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("nft.yaml"),
            format!("nft:\n  envoy_user: \"{ENVOY_UID}\"\nagents: []\n"),
        )
        .expect("config");
        let net = Net {
            host,
            inet,
            server,
            dir,
        };
        // Wait for the server (as root, before any rule exists).
        assert!(eventually(Duration::from_secs(10), || net.get_as("0", "44.0.0.2")));
        Some(net)
    }

    /// An HTTP GET from the host namespace as `uid`; true if it answered.
    fn get_as(&self, uid: &str, addr: &str) -> bool {
        let url = if addr.contains(':') {
            format!("http://[{addr}]:8080/")
        } else {
            format!("http://{addr}:8080/")
        };
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.host,
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            &url,
        ])
        .status
        .success()
    }

    fn clawgress(&self, args: &[&str]) -> Output {
        let cfg = self.dir.path().join("nft.yaml");
        let state = self.dir.path().join("state");
        Command::new("ip")
            .args(["netns", "exec", &self.host, env!("CARGO_BIN_EXE_clawgress")])
            .args(args)
            .arg("--config")
            .arg(cfg)
            .arg("--state-dir")
            .arg(state)
            .output()
            .expect("clawgress")
    }

    fn nft(&self, args: &[&str]) -> Output {
        let mut a = vec!["ip", "netns", "exec", &self.host, "nft"];
        a.extend_from_slice(args);
        sh(&a)
    }

    fn dropped(&self) -> u64 {
        let out = self.clawgress(&["nft", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["dropped_packets"].as_u64().unwrap_or(0)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = sh(&["ip", "netns", "del", &self.host]);
        let _ = sh(&["ip", "netns", "del", &self.inet]);
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn proxy_only_leaves_envoy_the_only_way_out_and_guards_its_private_egress() {
    let Some(net) = Net::new() else { return };
    // Before: anyone gets out.
    assert!(net.get_as(AGENT_UID, "44.0.0.2"));
    ok(&net.clawgress(&["nft", "apply", "proxy-only"]));
    assert!(
        net.get_as(ENVOY_UID, "44.0.0.2"),
        "Envoy's own egress passes"
    );
    assert!(net.get_as(ENVOY_UID, "2a99::2"), "over IPv6 too");
    let before = net.dropped();
    assert!(
        !net.get_as(AGENT_UID, "44.0.0.2"),
        "a direct TCP connect fails"
    );
    assert!(
        !net.get_as(AGENT_UID, "2a99::2"),
        "a direct IPv6 connect fails"
    );
    assert!(
        !net.get_as("0", "44.0.0.2"),
        "root is protected too unless exempt"
    );
    // A direct UDP (DNS) packet is dropped and counted.
    let udp = sh(&[
        "ip",
        "netns",
        "exec",
        &net.host,
        "setpriv",
        &format!("--reuid={AGENT_UID}"),
        &format!("--regid={AGENT_UID}"),
        "--clear-groups",
        "bash",
        "-c",
        "echo q > /dev/udp/44.0.0.2/53",
    ]);
    let _ = udp;
    // DNS rebinding: whatever name Envoy resolved, the metadata address is
    // out of its reach.
    assert!(!net.get_as(ENVOY_UID, "169.254.169.254"));
    let after = net.dropped();
    assert!(after >= before + 5, "drops counted: {before} -> {after}");
    assert_eq!(net.clawgress(&["nft", "check"]).status.code(), Some(0));
}

#[test]
fn check_catches_a_hand_edit_rollback_restores_and_connected_removes_only_ours() {
    let Some(net) = Net::new() else { return };
    // Someone else's table must survive everything we do.
    assert!(net.nft(&["add", "table", "inet", "other"]).status.success());
    ok(&net.clawgress(&["nft", "apply", "sovereign"]));
    let sovereign = ok(&net.nft(&["list", "table", "inet", "clawgress"]));
    assert!(sovereign.contains("envoy (the gateway)"), "{sovereign}");
    ok(&net.clawgress(&["nft", "apply", "proxy-only"]));
    assert_eq!(net.clawgress(&["nft", "check"]).status.code(), Some(0));

    // Delete a rule by hand: check fails.
    let listing = ok(&net.nft(&["-a", "list", "chain", "inet", "clawgress", "output"]));
    let handle = listing
        .lines()
        .find(|l| l.contains("everything else"))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(|h| h.trim().to_string())
        .expect("handle");
    assert!(net
        .nft(&[
            "delete",
            "rule",
            "inet",
            "clawgress",
            "output",
            "handle",
            &handle
        ])
        .status
        .success());
    let out = net.clawgress(&["nft", "check"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(net.get_as(AGENT_UID, "44.0.0.2"), "the hole is real");

    // Rollback: the table before the last apply (sovereign), and check passes.
    ok(&net.clawgress(&["nft", "rollback"]));
    let restored = ok(&net.nft(&["list", "table", "inet", "clawgress"]));
    assert!(restored.contains("envoy (the gateway)"), "{restored}");
    assert_eq!(net.clawgress(&["nft", "check"]).status.code(), Some(0));
    let st: serde_json::Value =
        serde_json::from_str(&ok(&net.clawgress(&["nft", "status", "--json"]))).expect("json");
    assert_eq!(st["mode"], "sovereign");
    assert_eq!(st["enforced"], true);
    assert!(!net.get_as(AGENT_UID, "44.0.0.2"));

    // Connected: ours is gone, theirs stays, traffic flows, check passes.
    ok(&net.clawgress(&["nft", "apply", "connected"]));
    let all = ok(&net.nft(&["list", "tables"]));
    assert!(
        !all.contains("clawgress") && all.contains("inet other"),
        "{all}"
    );
    assert!(net.get_as(AGENT_UID, "44.0.0.2"));
    assert_eq!(net.clawgress(&["nft", "check"]).status.code(), Some(0));

    // --dry-run prints the ruleset and changes nothing.
    let dry = ok(&net.clawgress(&["nft", "apply", "proxy-only", "--dry-run"]));
    assert!(dry.contains("\"nftables\""), "{dry}");
    assert!(!ok(&net.nft(&["list", "tables"])).contains("clawgress"));
}
