//! The operator CLI (§7): `set`, `delete`, `show`, `compare`, `configure`,
//! `commit`, `confirm`, `rollback`, `lockdown`, `agent …`, `policy list`.
//! A thin client over the admin API: no verb changes anything locally.
//!
//! Exit codes: 0 done; 1 the control plane refused (invalid document,
//! conflict, nothing there); 2 bad usage; 3 the control plane is not
//! reachable or the token is not accepted.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::node;

/// Where the admin API is and who we are.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The admin API. Default: $CLAWGRESS_URL, else http://<gateway.admin_listen>
    /// of --config, else http://127.0.0.1:9080.
    #[arg(long, value_name = "URL", env = "CLAWGRESS_URL", global = true)]
    pub url: Option<String>,
    /// An admin token. Default: $CLAWGRESS_TOKEN, else STATE_DIR/admin.token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CLAWGRESS_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// The config document, to find admin_listen and state_dir.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Print the API's JSON answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A CLI failure and its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

pub struct Client {
    agent: ureq::Agent,
    url: String,
    token: String,
    pub json: bool,
}

impl Client {
    pub fn new(a: &ClientArgs) -> Result<Client, Failure> {
        let doc = match &a.config {
            Some(p) => Some(node::load(p).map_err(|e| fail(2, format!("{e:#}")))?),
            None => None,
        };
        let env = |k: &str| std::env::var(k).ok();
        let state = node::state_dir(a.state_dir.as_deref(), doc.as_ref(), &env);
        let url = match (&a.url, &doc) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, Some(d)) => format!("http://{}", d.gateway.admin_listen),
            // What the running `up` wrote, else the default admin_listen.
            (None, None) => state
                .as_ref()
                .ok()
                .and_then(|s| std::fs::read_to_string(s.join("run/admin.url")).ok())
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| {
                    format!(
                        "http://{}",
                        clawgress_policy::config::Gateway::default().admin_listen
                    )
                }),
        };
        let token = match &a.token {
            Some(t) => t.trim().to_string(),
            None => {
                let dir = state.map_err(|e| fail(2, format!("{e:#}")))?;
                read_token(&dir.join("admin.token"))?
            }
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Ok(Client {
            agent,
            url,
            token,
            json: a.json,
        })
    }

    /// One API call; the JSON answer, or a failure naming what went wrong.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
        let url = format!("{}/api/v1/{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("authorization", &auth).call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .send_json(b),
            (_, None) => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .send_empty(),
        };
        let mut resp = result.map_err(|e| {
            fail(
                3,
                format!("cannot reach the control plane at {}: {e}", self.url),
            )
        })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let mut msg = v
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        if let Some(errs) = v.get("errors").and_then(Value::as_array) {
            for e in errs {
                let path = e.get("path").and_then(Value::as_str).unwrap_or("");
                let reason = e.get("reason").and_then(Value::as_str).unwrap_or("");
                msg.push_str(&format!(
                    "\n  {}: {reason}",
                    if path.is_empty() { "(document)" } else { path }
                ));
            }
        }
        let code = if matches!(status, 401 | 403) || status >= 500 {
            3
        } else {
            1
        };
        Err(fail(code, msg))
    }
}

fn read_token(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            fail(
                3,
                format!(
                    "no admin token: pass --token or set CLAWGRESS_TOKEN ({}: {e})",
                    path.display()
                ),
            )
        })
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// Add an API-key agent to the candidate; prints its key once.
    Add {
        agent_id: String,
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        environment: Option<String>,
        #[arg(long)]
        profile: Option<String>,
    },
    /// The active agents.
    List,
    /// Disable an agent in the candidate (commit to apply).
    Disable { agent_id: String },
    /// A new key for an API-key agent (printed once; the old one works
    /// until you commit).
    RotateKey { agent_id: String },
    /// Revoke an agent's key: it is disabled until a new key is rotated in.
    RevokeKey { agent_id: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// The active policies.
    List,
}

fn print_lines(title: &str, lines: &Value) {
    println!("{title}");
    match lines.as_array() {
        Some(l) if !l.is_empty() => {
            for x in l {
                println!("  {}", x.as_str().unwrap_or(""));
            }
        }
        _ => println!("  (no changes)"),
    }
}

fn print_commit(c: &Value) {
    println!(
        "commit {}: revision {} active since {}",
        c["commit_id"],
        c["revision"],
        c["timestamp"].as_str().unwrap_or("")
    );
    if let Some(t) = c["confirm_by"].as_str() {
        println!("  rolls back by itself unless `clawgress confirm` comes before {t}");
    }
    print_lines("changes:", &c["diff"]);
    if let Some(r) = c["rollout"].as_object() {
        for (svc, st) in r {
            println!("  rollout: {svc} {}", st.as_str().unwrap_or(""));
        }
    }
}

fn yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_else(|_| v.to_string())
}

pub enum Verb {
    Set {
        path: String,
        value: String,
    },
    Delete {
        path: String,
    },
    Show {
        which: Option<String>,
        path: Option<String>,
    },
    Compare,
    Configure,
    Commit {
        confirmed: Option<f64>,
    },
    Confirm,
    Rollback {
        revision: i64,
    },
    Lockdown,
    Revisions,
    Agent(AgentCommand),
    Policy(PolicyCommand),
}

pub fn run(args: &ClientArgs, verb: Verb) -> Result<(), Failure> {
    let c = Client::new(args)?;
    let out = |v: &Value, human: &dyn Fn(&Value)| {
        if c.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human(v);
        }
    };
    match verb {
        Verb::Set { path, value } => {
            let v = c.call(
                "POST",
                "candidate/set",
                Some(json!({"path": path, "value": clawgress_admin::paths::value_of(&value)})),
            )?;
            out(&v, &|v| {
                println!("candidate version {}: set {path}", v["version"])
            });
        }
        Verb::Delete { path } => {
            let v = c.call("POST", "candidate/delete", Some(json!({"path": path})))?;
            out(&v, &|v| {
                println!("candidate version {}: deleted {path}", v["version"])
            });
        }
        Verb::Show { which, path } => {
            let which = which.unwrap_or_else(|| "active".into());
            if which != "active" && which != "candidate" {
                return Err(fail(
                    2,
                    format!("show what? {which:?}: candidate or active"),
                ));
            }
            let mut q = format!("show?which={which}");
            if let Some(p) = &path {
                q.push_str(&format!("&path={}", urlencode(p)));
            }
            let v = c.call("GET", &q, None)?;
            out(&v, &|v| print!("{}", yaml(v)));
        }
        Verb::Compare => {
            let v = c.call("GET", "compare", None)?;
            out(&v, &|v| print_lines("candidate vs active:", &v["diff"]));
        }
        Verb::Configure => {
            let v = c.call("POST", "configure", None)?;
            out(&v, &|v| {
                print_lines(
                    &format!(
                        "revision {} staged (commit it with `clawgress commit --revision {}`):",
                        v["revision"], v["revision"]
                    ),
                    &v["diff"],
                )
            });
        }
        Verb::Commit { confirmed } => {
            let body = match confirmed {
                Some(m) => json!({"confirmed_minutes": m}),
                None => json!({}),
            };
            let v = c.call("POST", "commit", Some(body))?;
            out(&v, &|v| print_commit(v));
        }
        Verb::Confirm => {
            let v = c.call("POST", "confirm", None)?;
            out(&v, &|v| println!("revision {} confirmed", v["revision"]));
        }
        Verb::Rollback { revision } => {
            let v = c.call("POST", "rollback", Some(json!({"revision": revision})))?;
            out(&v, &|v| print_commit(v));
        }
        Verb::Lockdown => {
            let v = c.call("POST", "lockdown", None)?;
            out(&v, &|v| {
                println!("LOCKDOWN: every request is denied now.");
                print_commit(v)
            });
        }
        Verb::Revisions => {
            let v = c.call("GET", "revisions", None)?;
            out(&v, &|v| {
                println!("{:>6}  {:<22}  {:<28}  comment", "rev", "created", "actor");
                for r in v["revisions"].as_array().into_iter().flatten() {
                    let mark = if r["id"] == v["active"] { "*" } else { " " };
                    println!(
                        "{:>5}{mark}  {:<22}  {:<28}  {}",
                        r["id"].to_string(),
                        r["created_at"].as_str().unwrap_or(""),
                        r["actor"].as_str().unwrap_or(""),
                        r["comment"].as_str().unwrap_or("")
                    );
                }
            });
        }
        Verb::Agent(AgentCommand::Add {
            agent_id,
            team,
            project,
            environment,
            profile,
        }) => {
            let v = c.call(
                "POST",
                "agents",
                Some(
                    json!({"agent_id": agent_id, "team_id": team, "project_id": project,
                            "environment": environment, "profile": profile}),
                ),
            )?;
            out(&v, &|v| {
                println!("agent {agent_id} added to the candidate.");
                println!(
                    "key (shown once; only its SHA-256 is kept): {}",
                    v["api_key"].as_str().unwrap_or("")
                );
                println!("activate it with `clawgress commit`.");
            });
        }
        Verb::Agent(AgentCommand::List) => {
            let v = c.call("GET", "agents", None)?;
            out(&v, &|v| {
                println!(
                    "{:<24} {:<9} {:<9} {:<14} {:<14} environment",
                    "agent", "auth", "status", "team", "project"
                );
                for a in v.as_array().into_iter().flatten() {
                    let f = |k: &str| a[k].as_str().unwrap_or("").to_string();
                    println!(
                        "{:<24} {:<9} {:<9} {:<14} {:<14} {}",
                        f("agent_id"),
                        f("auth_type"),
                        f("status"),
                        f("team_id"),
                        f("project_id"),
                        f("environment")
                    );
                }
            });
        }
        Verb::Agent(AgentCommand::Disable { agent_id }) => {
            let path = format!("agents.{}.status", quote_segment(&agent_id));
            let v = c.call(
                "POST",
                "candidate/set",
                Some(json!({"path": path, "value": "disabled"})),
            )?;
            out(&v, &|_| {
                println!("agent {agent_id} disabled in the candidate; `clawgress commit` to apply")
            });
        }
        Verb::Agent(AgentCommand::RotateKey { agent_id }) => {
            let v = c.call(
                "POST",
                &format!("agents/{}/rotate-key", urlencode(&agent_id)),
                None,
            )?;
            out(&v, &|v| {
                println!(
                    "new key for {agent_id} (shown once): {}",
                    v["api_key"].as_str().unwrap_or("")
                );
                println!("the old key works until `clawgress commit`.");
            });
        }
        Verb::Agent(AgentCommand::RevokeKey { agent_id }) => {
            let v = c.call(
                "POST",
                &format!("agents/{}/revoke-key", urlencode(&agent_id)),
                None,
            )?;
            out(&v, &|_| {
                println!("agent {agent_id} disabled in the candidate; `clawgress commit` to apply")
            });
        }
        Verb::Policy(PolicyCommand::List) => {
            let v = c.call("GET", "policies", None)?;
            out(&v, &|v| {
                println!(
                    "{:<28} {:>8} {:<6} {:<8} {:<8} hosts",
                    "policy", "priority", "action", "mode", "enabled"
                );
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<28} {:>8} {:<6} {:<8} {:<8} {}",
                        p["policy_id"].as_str().unwrap_or(""),
                        p["priority"].to_string(),
                        p["action"].as_str().unwrap_or(""),
                        p["mode"].as_str().unwrap_or(""),
                        p["enabled"].to_string(),
                        p["match"]["destination"]["hosts"]
                    );
                }
            });
        }
    }
    Ok(())
}

fn quote_segment(s: &str) -> String {
    if s.contains('.') {
        format!("\"{s}\"")
    } else {
        s.to_string()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The operator verbs, each a call to the admin API.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Set PATH in the candidate config to VALUE (JSON, or else a string).
    #[command(after_help = "Examples:\n  \
        clawgress set agents.build-bot.team_id infra\n  \
        clawgress set policies.allow-pypi.match.destination.hosts '[\"pypi.org\"]'\n  \
        clawgress set quotas.build-bot.rps_limit 10\n  \
        clawgress set jwt.issuers.'\"https://idp.example\"'.audiences '[\"clawgress\"]'\n\n\
        Then `clawgress compare`, `clawgress configure`, `clawgress commit`.\n\
        Exit codes: 0 done, 1 refused by the control plane, 2 bad usage, 3 control plane unreachable or token refused.")]
    Set {
        path: String,
        value: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete PATH from the candidate config (a field or a whole entry).
    Delete {
        path: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the active (default) or candidate config, or one PATH of it.
    Show {
        /// candidate | active
        which: Option<String>,
        path: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The changes the candidate would make to the active config.
    Compare {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Validate the candidate and stage it as a revision (prints its diff).
    Configure {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Sign and publish the candidate (or `confirmed MINUTES`: roll back by
    /// itself unless `clawgress confirm` follows in time).
    #[command(
        after_help = "Examples:\n  clawgress commit\n  clawgress commit confirmed 5   # then: clawgress confirm"
    )]
    Commit {
        /// `confirmed`
        #[arg(value_parser = ["confirmed"])]
        confirmed: Option<String>,
        /// Minutes to wait for `confirm` (with `confirmed`).
        minutes: Option<f64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Keep the revision of a `commit confirmed`.
    Confirm {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Commit an earlier revision again (as a new revision).
    Rollback {
        revision: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deny every request, now: commits a deny-all revision in one step.
    Lockdown {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The revisions, newest first (* = active).
    Revisions {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Agents: add (prints the key once), list, disable.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Policies: list.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub fn dispatch(c: CtlCommand) -> Result<(), Failure> {
    let (client, verb) = match c {
        CtlCommand::Set {
            path,
            value,
            client,
        } => (client, Verb::Set { path, value }),
        CtlCommand::Delete { path, client } => (client, Verb::Delete { path }),
        CtlCommand::Show {
            which,
            path,
            client,
        } => (client, Verb::Show { which, path }),
        CtlCommand::Compare { client } => (client, Verb::Compare),
        CtlCommand::Configure { client } => (client, Verb::Configure),
        CtlCommand::Commit {
            confirmed,
            minutes,
            client,
        } => match (confirmed, minutes) {
            (None, None) => (client, Verb::Commit { confirmed: None }),
            (Some(_), Some(m)) => (client, Verb::Commit { confirmed: Some(m) }),
            _ => return Err(fail(2, "usage: clawgress commit [confirmed MINUTES]")),
        },
        CtlCommand::Confirm { client } => (client, Verb::Confirm),
        CtlCommand::Rollback { revision, client } => (client, Verb::Rollback { revision }),
        CtlCommand::Lockdown { client } => (client, Verb::Lockdown),
        CtlCommand::Revisions { client } => (client, Verb::Revisions),
        CtlCommand::Agent { command, client } => (client, Verb::Agent(command)),
        CtlCommand::Policy { command, client } => (client, Verb::Policy(command)),
    };
    run(&client, verb)
}
