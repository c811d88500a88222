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

#[test]
fn only_admin_sources_reach_the_admin_port() {
    let Some(net) = Net::new() else { return };
    // Something on the admin port (gateway.admin_listen's, 9080 by default).
    let mut admin = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.host,
            "python3",
            "-m",
            "http.server",
            "9080",
        ])
        .args(["--bind", "0.0.0.0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("admin stand-in");
    let reach = |ns: &str, url: &str| {
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            url,
        ])
        .status
        .success()
    };
    let from_inet = || reach(&net.inet, "http://44.0.0.1:9080/");
    assert!(eventually(Duration::from_secs(10), from_inet));
    ok(&net.clawgress(&["nft", "apply", "sovereign"]));
    assert!(!from_inet(), "not an admin source: dropped");
    assert!(
        reach(&net.host, "http://127.0.0.1:9080/"),
        "loopback is (the default admin_sources)"
    );
    std::fs::write(
        net.dir.path().join("nft.yaml"),
        format!(
            "nft:\n  envoy_user: \"{ENVOY_UID}\"\n  admin_sources: [127.0.0.1/32, 44.0.0.2/32]\nagents: []\n"
        ),
    )
    .expect("config");
    ok(&net.clawgress(&["nft", "apply", "sovereign"]));
    assert!(from_inet(), "a listed admin source gets in");
    let _ = admin.kill();
    let _ = admin.wait();
}

/// A routed subnet behind a gateway (MVP Mode B): an "agent" namespace
/// whose only way out is the "gateway" namespace (Envoy and the services,
/// `clawgress up` there, nft applied there), and an "internet" namespace
/// with HTTP and HTTPS servers (and the metadata address). Names resolve
/// through the gateway's own hosts file (`/etc/netns/<gw>/hosts`).
struct Routed {
    agent: String,
    gw: String,
    inet: String,
    servers: Vec<std::process::Child>,
    dir: tempfile::TempDir,
}

const SERVER_PY: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("inet:" + (self.headers.get("Host") or "")).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
if len(sys.argv) > 2:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

impl Routed {
    fn new() -> Option<Routed> {
        if !sh(&["id", "-u"]).stdout.starts_with(b"0") {
            eprintln!("skipped: needs root for network namespaces");
            return None;
        }
        let id = std::process::id();
        let (agent, gw, inet) = (format!("cra{id}"), format!("crg{id}"), format!("crn{id}"));
        for ns in [&agent, &gw, &inet] {
            must(&["ip", "netns", "add", ns]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (va, vga, vgi, vi) = (
            format!("va{id}"),
            format!("vga{id}"),
            format!("vgi{id}"),
            format!("vi{id}"),
        );
        must(&[
            "ip", "link", "add", &va, "netns", &agent, "type", "veth", "peer", "name", &vga,
            "netns", &gw,
        ]);
        must(&[
            "ip", "link", "add", &vgi, "netns", &gw, "type", "veth", "peer", "name", &vi, "netns",
            &inet,
        ]);
        for (ns, dev, v4, v6) in [
            (&agent, &va, "10.20.0.2/24", "fd20::2/64"),
            (&gw, &vga, "10.20.0.1/24", "fd20::1/64"),
            (&gw, &vgi, "44.1.0.1/24", "2a99::1/64"),
            (&inet, &vi, "44.1.0.2/24", "2a99::2/64"),
        ] {
            must(&["ip", "-n", ns, "addr", "add", v4, "dev", dev]);
            must(&["ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
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
            &agent,
            "route",
            "add",
            "default",
            "via",
            "10.20.0.1",
        ]);
        must(&[
            "ip", "-n", &agent, "-6", "route", "add", "default", "via", "fd20::1",
        ]);
        must(&[
            "ip",
            "-n",
            &inet,
            "route",
            "add",
            "10.20.0.0/24",
            "via",
            "44.1.0.1",
        ]);
        must(&[
            "ip",
            "-n",
            &inet,
            "-6",
            "route",
            "add",
            "fd20::/64",
            "via",
            "2a99::1",
        ]);
        must(&[
            "ip",
            "-n",
            &gw,
            "route",
            "add",
            "169.254.169.254/32",
            "dev",
            &vgi,
        ]);
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            must(&["ip", "netns", "exec", &gw, "sysctl", "-q", "-w", key]);
        }
        // The gateway's resolver: `ip netns exec` mounts this over /etc/hosts.
        let etc = std::path::PathBuf::from(format!("/etc/netns/{gw}"));
        std::fs::create_dir_all(&etc).expect("/etc/netns");
        std::fs::write(
            etc.join("hosts"),
            "127.0.0.1 localhost\n44.1.0.2 allowed.test denied.test\n169.254.169.254 rebind.test\n",
        )
        .expect("hosts");

        let dir = tempfile::tempdir().expect("tempdir");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("chmod");
        }
        let script = dir.path().join("server.py");
        std::fs::write(&script, SERVER_PY).expect("script");
        let cert =
            rcgen::generate_simple_self_signed(vec!["allowed.test".into(), "denied.test".into()])
                .expect("cert");
        let (crt, key) = (dir.path().join("crt.pem"), dir.path().join("key.pem"));
        std::fs::write(&crt, cert.cert.pem()).expect("crt");
        std::fs::write(&key, cert.signing_key.serialize_pem()).expect("key");
        let spawn = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &inet, "python3"])
                .arg(&script)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("server")
        };
        let servers = vec![
            spawn(&["80"]),
            spawn(&["8080"]),
            spawn(&[
                "443",
                crt.to_str().expect("utf-8"),
                key.to_str().expect("utf-8"),
            ]),
        ];
        let r = Routed {
            agent,
            gw,
            inet,
            servers,
            dir,
        };
        // Routing works before any rule: the agent reaches the internet directly.
        assert!(
            eventually(Duration::from_secs(10), || r
                .curl(&["http://44.1.0.2:8080/"])
                .0
                == "200"),
            "no route from the agent to the internet host"
        );
        Some(r)
    }

    /// curl from the agent namespace; (status code, body).
    fn curl(&self, args: &[&str]) -> (String, String) {
        let out = sh(&[
            &[
                "ip",
                "netns",
                "exec",
                &self.agent,
                "curl",
                "-sk",
                "--max-time",
                "5",
            ],
            args,
            &["-w", "\n%{http_code}"],
        ]
        .concat());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.to_string(), body.to_string())
    }

    /// The real Envoy binary where an unprivileged user can run it (pip
    /// installs it under root's home): linked, or copied, into our dir.
    fn envoy_for_anyone(&self) -> std::path::PathBuf {
        let real = std::env::var("CLAWGRESS_ENVOY")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| {
                let out = sh(&[
                    "python3",
                    "-c",
                    "import envoy._bin as b, os; print(os.path.join(os.path.dirname(b.__file__), 'envoy'))",
                ]);
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            });
        let here = self.dir.path().join("envoy");
        if std::fs::hard_link(&real, &here).is_err() {
            std::fs::copy(&real, &here).expect("copy envoy");
        }
        here
    }

    fn clawgress(&self, config: &std::path::Path, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.gw, env!("CARGO_BIN_EXE_clawgress")])
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .expect("clawgress")
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.agent, &self.gw, &self.inet] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.gw));
        let _ = &self.dir;
    }
}

#[test]
fn transparent_gateway_judges_redirected_http_and_https_by_source_and_guards_envoy() {
    let Some(net) = Routed::new() else { return };
    let body = r#"nft:
  envoy_user: "4242"
  protected_sources: [10.20.0.0/24, "fd20::/64"]
agents:
  - {agent_id: lab-vm, team_id: research, auth_type: source_ip, source_cidrs: [10.20.0.0/24, "fd20::/64"]}
policies:
  - policy_id: allow-allowed
    priority: 10
    match: {destination: {hosts: [allowed.test], ports: [80, 443]}}
    action: allow
  - policy_id: allow-rebind
    priority: 10
    match: {destination: {hosts: [rebind.test], ports: [80]}}
    action: allow
"#;
    let envoy = net.envoy_for_anyone();
    let mut stack = Stack::start_in(
        Some(&net.gw),
        "10.20.0.1",
        Some(&envoy),
        "  transparent_listen: \"[::]:15001\"\n",
        body,
    );
    let proxy = format!("http://{}", stack.proxy);
    // `up` runs as root: Envoy runs as nft.envoy_user, the services do not.
    let uid_of = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_default()
    };
    assert_eq!(
        uid_of(stack.envoy_pid().expect("envoy pid")),
        "4242",
        "{}",
        stack.stderr()
    );
    assert_eq!(uid_of(stack.service_pid("authz").expect("authz pid")), "0");

    // Without nft, Envoy reaches the metadata address through a name that
    // resolves to it: the hole the kernel closes below.
    let (code, text) = net.curl(&["-x", &proxy, "http://rebind.test/"]);
    assert_eq!((code.as_str(), text.as_str()), ("200", "inet:rebind.test"));

    let apply = net.clawgress(&stack.config, &["nft", "apply", "proxy-only"]);
    assert!(
        apply.status.success(),
        "{}",
        String::from_utf8_lossy(&apply.stderr)
    );

    // Explicit proxy, named by source address: through Envoy.
    let (code, text) = net.curl(&["-x", &proxy, "http://allowed.test:8080/"]);
    assert_eq!(code, "403", "port 8080 is not in the policy: {text}");
    let (code, text) = net.curl(&["-x", &proxy, "http://allowed.test/"]);
    assert_eq!((code.as_str(), text.as_str()), ("200", "inet:allowed.test"));

    // Transparent: no proxy settings; HTTP judged by Host, HTTPS by SNI.
    let resolve = |port: u16, name: &str| format!("{name}:{port}:44.1.0.2");
    let (code, text) = net.curl(&[
        "--resolve",
        &resolve(80, "allowed.test"),
        "http://allowed.test/",
    ]);
    assert_eq!((code.as_str(), text.as_str()), ("200", "inet:allowed.test"));
    let (code, text) = net.curl(&[
        "--resolve",
        &resolve(443, "allowed.test"),
        "https://allowed.test/",
    ]);
    assert_eq!((code.as_str(), text.as_str()), ("200", "inet:allowed.test"));
    let (code, text) = net.curl(&[
        "--resolve",
        &resolve(80, "denied.test"),
        "http://denied.test/x",
    ]);
    assert_eq!(code, "403", "{text}");
    let deny: serde_json::Value = serde_json::from_str(&text).expect("§3 body");
    assert_eq!(deny["reason"], "default-deny");
    let (code, _) = net.curl(&[
        "--resolve",
        &resolve(443, "denied.test"),
        "https://denied.test/",
    ]);
    assert_eq!(code, "000", "a refused TLS connection is closed");
    // A refused SNI is never even looked up (no DNS channel out of the
    // subnet through Envoy's resolver).
    let admin = stack.state().join("envoy/admin.sock");
    let dns_attempts = || -> u64 {
        let out = sh(&[
            "curl",
            "-s",
            "--unix-socket",
            admin.to_str().expect("utf-8"),
            "http://envoy/stats?filter=dns_query_attempt",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
            .sum()
    };
    let looked_up = dns_attempts();
    assert!(looked_up > 0, "the stat is read");
    let (code, _) = net.curl(&[
        "--resolve",
        &resolve(443, "secret-bits.exfil.test"),
        "https://secret-bits.exfil.test/",
    ]);
    assert_eq!(code, "000");
    assert_eq!(dns_attempts(), looked_up, "a refused SNI was looked up");
    // TLS to another port is not judged as a tunnel to 443: refused.
    let (code, _) = net.curl(&[
        "--resolve",
        &resolve(80, "allowed.test"),
        "https://allowed.test:80/",
    ]);
    assert_ne!(code, "200");
    // IPv6 agents come through the same listener ("[::]").
    let (code, text) = net.curl(&[
        "--resolve",
        "allowed.test:80:[2a99::2]",
        "http://allowed.test/",
    ]);
    assert_eq!((code.as_str(), text.as_str()), ("200", "inet:allowed.test"));

    // Everything else the agent sends is dropped, and counted.
    let dropped = || -> u64 {
        let out = net.clawgress(&stack.config, &["nft", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["dropped_packets"].as_u64().unwrap_or(0)
    };
    let before = dropped();
    assert_eq!(net.curl(&["http://44.1.0.2:8080/"]).0, "000", "direct TCP");
    assert_eq!(
        net.curl(&["http://[2a99::2]:8080/"]).0,
        "000",
        "direct IPv6"
    );
    let _ = sh(&[
        "ip",
        "netns",
        "exec",
        &net.agent,
        "bash",
        "-c",
        "echo q > /dev/udp/44.1.0.2/53",
    ]);
    let after = dropped();
    assert!(after >= before + 3, "drops counted: {before} -> {after}");
    // Per rule: the redirects counted the transparent connections, the
    // forward drop the direct ones.
    let st: serde_json::Value = serde_json::from_slice(
        &net.clawgress(&stack.config, &["nft", "status", "--json"])
            .stdout,
    )
    .expect("status json");
    let counted = |verdict: &str, chain: &str| {
        st["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["verdict"] == verdict && r["chain"] == chain)
            .map(|r| r["packets"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert!(counted("redirect", "prerouting") >= 4, "{st:#}");
    assert!(counted("drop", "forward") >= 3, "{st:#}");

    // DNS rebinding: the policy allows the name, the kernel stops Envoy
    // at the metadata address it resolves to.
    let (code, text) = net.curl(&["-x", &proxy, "http://rebind.test/"]);
    assert_eq!(code, "503", "{text}");
    assert!(text.contains("upstream-unreachable"), "{text}");
    assert_eq!(
        net.clawgress(&stack.config, &["nft", "check"])
            .status
            .code(),
        Some(0)
    );

    // Every decision has its record, named by the source address.
    let recs = stack.wait_audit(8);
    let find = |host: &str, port: u64, decision: &str| {
        recs.iter().any(|r| {
            r["destination_host"] == host
                && r["destination_port"] == port
                && r["decision"] == decision
                && r["agent_id"] == "lab-vm"
                && r["source_address"] == "10.20.0.2"
        })
    };
    assert!(find("allowed.test", 80, "allow"), "{recs:#?}");
    assert!(find("allowed.test", 443, "allow"), "TLS allow: {recs:#?}");
    assert!(find("denied.test", 80, "deny"), "{recs:#?}");
    assert!(find("denied.test", 443, "deny"), "TLS deny: {recs:#?}");
    let _ = net.clawgress(&stack.config, &["nft", "apply", "connected"]);
    stack.stop();
}
