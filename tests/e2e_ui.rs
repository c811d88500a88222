//! The web console in a real browser: headless Debian Chromium driven over
//! WebDriver (chromedriver), against a running `up` with real Envoy. Saves a
//! screenshot of each page under `target/ui-screenshots/`.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Option<Browser> {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let driver_bin = ["/usr/bin/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let (Some(chromium), Some(driver_bin)) = (chromium, driver_bin) else {
            eprintln!("skipped: chromium and chromium-driver are not installed (scripts/test.sh installs them)");
            return None;
        };
        let port = free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        assert!(eventually(Duration::from_secs(15), || agent
            .get(&format!("{base}/status"))
            .call()
            .is_ok()));
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                         "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            _profile: profile,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().expect("session id").to_string();
        Some(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let r = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, Some(b)) => self.agent.post(&url).send_json(b),
            (_, None) => self.agent.post(&url).send_json(json!({})),
        };
        let mut r = r.expect("webdriver call");
        let text = r.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        v["value"].clone()
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    fn open(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({"url": url})));
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self.call(
            "POST",
            &self.s("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT].as_str().map(str::to_string)
    }

    fn el(&self, css: &str) -> String {
        let mut id = None;
        assert!(
            eventually(Duration::from_secs(10), || {
                id = self.find(css);
                id.is_some()
            }),
            "no element {css}"
        );
        id.unwrap_or_default()
    }

    /// Clicks `css`, finding it again if the page re-rendered it between the
    /// find and the click (a stale element is an error, not a click).
    fn click(&self, css: &str) {
        let mut last = Value::Null;
        let ok = eventually(Duration::from_secs(10), || {
            let Some(id) = self.find(css) else {
                return false;
            };
            last = self.call(
                "POST",
                &self.s(&format!("/element/{id}/click")),
                Some(json!({})),
            );
            last.get("error").is_none()
        });
        assert!(ok, "could not click {css}: {last}");
    }

    fn type_in(&self, css: &str, text: &str) {
        let id = self.el(css);
        self.call(
            "POST",
            &self.s(&format!("/element/{id}/clear")),
            Some(json!({})),
        );
        self.call(
            "POST",
            &self.s(&format!("/element/{id}/value")),
            Some(json!({"text": text})),
        );
    }

    fn text(&self, css: &str) -> String {
        let Some(id) = self.find(css) else {
            return String::new();
        };
        self.call("GET", &self.s(&format!("/element/{id}/text")), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// An input's current value.
    fn value(&self, css: &str) -> String {
        let id = self.el(css);
        self.call(
            "GET",
            &self.s(&format!("/element/{id}/property/value")),
            None,
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    fn displayed(&self, css: &str) -> bool {
        let id = self.el(css);
        self.call("GET", &self.s(&format!("/element/{id}/displayed")), None) == json!(true)
    }

    fn wait_text(&self, css: &str, want: &str) {
        let mut last = String::new();
        let ok = eventually(Duration::from_secs(15), || {
            last = self.text(css);
            last.contains(want)
        });
        assert!(
            ok,
            "{css} never showed {want:?}; it shows {last:?} (the page's error line: {:?})",
            self.text("#error")
        );
    }

    fn screenshot(&self, name: &str) {
        use base64::Engine;
        let v = self.call("GET", &self.s("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .expect("png");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write");
    }

    fn console_errors(&self) -> Vec<String> {
        let v = self.call("POST", &self.s("/se/log"), Some(json!({"type": "browser"})));
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(&format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn an_operator_signs_in_adds_an_agent_commits_and_watches_decisions() {
    let up = Upstream::http();
    let stack = Stack::start(&config_allowing(&[up.addr.port()], ""));
    let Some(b) = Browser::start() else { return };
    let token = std::fs::read_to_string(stack.state().join("admin.token")).expect("token");
    let ui = format!("http://{}/ui/", stack.admin);

    b.open(&ui);
    b.type_in("#token", "cga_wrong");
    b.click("#signin");
    b.wait_text("#signin-error", "unknown admin token");
    b.screenshot("0-sign-in");
    // That refusal (a 401) is the one console error this test causes on purpose.
    let expected = b.console_errors();
    // Positive control: the browser's log is really read (else the
    // zero-errors check below would pass on an empty answer).
    assert!(!expected.is_empty(), "the 401 is in the console log");
    assert!(
        expected
            .iter()
            .all(|e| e.contains("/ui/session") && e.contains("401")),
        "{expected:?}"
    );
    b.type_in("#token", token.trim());
    b.click("#signin");
    b.wait_text("#who", "bootstrap (admin)");
    b.screenshot("1-overview");

    b.click("nav button[data-tab=agents]");
    b.wait_text("#agents-table", AGENT);
    b.type_in("#agent-id", "ui-bot");
    b.type_in("#agent-team", "web");
    b.click("#agent-add");
    b.wait_text("#agent-key", "cg_");
    assert!(b.displayed("#agent-key-copy"), "a copy button for the key");
    b.click("#agent-key-copy");
    assert!(
        eventually(Duration::from_secs(5), || b.text("#agent-key-copy")
            != "Copy key"),
        "the copy button answers"
    );
    b.screenshot("2-agents");
    // Every field is text, never markup: a team named like an element.
    b.type_in("#agent-id", "odd-bot");
    b.type_in("#agent-team", "<img id=pwned src=x>");
    b.click("#agent-add");
    b.wait_text("#agent-key", "Key for odd-bot");

    // A policy for it, staged from the policies page.
    b.click("nav button[data-tab=policies]");
    b.type_in("#policy-id", "ui-web-api");
    b.type_in("#policy-priority", "200");
    b.type_in("#policy-hosts", "api.example.com, *.example.net");
    b.type_in("#policy-ports", "443");
    b.type_in("#policy-who", "team_id=web");
    b.click("#policy-add");
    b.wait_text("#policy-result", "staged");
    // One more, with a list and two identity fields.
    b.type_in("#policy-id", "ui-multi");
    b.type_in("#policy-priority", "300");
    b.type_in("#policy-hosts", "multi.example.com");
    b.type_in("#policy-ports", "");
    b.type_in("#policy-who", "team_id=web,ops environment=prod");
    b.click("#policy-add");
    b.wait_text("#policy-result", "Policy ui-multi staged");
    b.type_in("#whatif-agent", "ui-bot");
    b.type_in("#whatif-url", "https://api.example.com/v1/");
    b.click("#whatif-go");
    b.wait_text("#whatif-table", "ui-web-api");
    b.click("nav button[data-tab=revisions]");
    b.click("#review");
    b.wait_text("#diff", "+ agents.ui-bot");
    b.wait_text("#diff", "+ policies.ui-web-api");
    b.click("#commit");
    b.wait_text("#commit-result", "active");
    // Any two revisions side by side: the commit added ui-bot.
    b.click("nav button[data-tab=revisions]");
    b.wait_text("#revisions-table", "(active)");
    b.click("#sbs-go");
    b.wait_text("#sbs-table", "agents.ui-bot");
    b.screenshot("3-revisions");
    // Rolling back first shows what it would change, and waits to be
    // confirmed; cancelled, nothing changes.
    assert!(!b.displayed("#rollback-confirm"));
    b.click("button[data-rollback='1']");
    b.wait_text("#diff", "Rolling back to revision 1");
    b.wait_text("#diff", "agents.ui-bot");
    assert!(b.displayed("#rollback-confirm"), "a confirmation step");
    b.screenshot("3b-rollback-confirm");
    b.click("#rollback-cancel");
    assert!(eventually(Duration::from_secs(5), || !b.displayed("#rollback-confirm")));
    b.wait_text("#revisions-table", "2 (active)");
    b.click("nav button[data-tab=agents]");
    b.wait_text("#agents-table", "ui-bot");
    b.wait_text("#agents-table", "<img id=pwned src=x>");
    assert!(b.find("#pwned").is_none(), "a field became markup");

    b.click("nav button[data-tab=policies]");
    b.wait_text("#policies-table", "allow-local-upstreams");
    // Edit takes a policy into the form as it is — every identity field,
    // lists whole; Remove takes one out of the candidate.
    b.wait_text("#policies-table", "ui-multi");
    b.click("button[data-policy='ui-multi'][data-action='edit']");
    let who = b.value("#policy-who");
    assert!(
        who.contains("team_id=web,ops") && who.contains("environment=prod"),
        "{who}"
    );
    b.click("button[data-policy='ui-multi'][data-action='remove']");
    b.wait_text("#policy-result", "ui-multi removed");
    // Edit takes a policy into the form as it is; staged, it replaces it.
    b.wait_text("#policies-table", "ui-web-api");
    b.click("button[data-policy='ui-web-api'][data-action='edit']");
    b.wait_text("#policy-result", "Editing ui-web-api");
    assert_eq!(b.value("#policy-id"), "ui-web-api");
    assert_eq!(b.value("#policy-hosts"), "api.example.com, *.example.net");
    assert_eq!(b.value("#policy-who"), "team_id=web");
    b.type_in("#policy-methods", "GET");
    b.type_in("#policy-path", "/v2/");
    b.click("#policy-add");
    b.wait_text("#policy-result", "staged");
    // What does this request get? The agent's allowed upstream, and a
    // metadata address it may not reach.
    b.type_in("#whatif-agent", AGENT);
    b.type_in("#whatif-url", &format!("http://{}/x", up.addr));
    b.click("#whatif-go");
    b.wait_text("#whatif-table", "allow-local-upstreams");
    let t = b.text("#whatif-table");
    assert!(t.contains("candidate") && t.contains("active"), "{t}");
    b.type_in("#whatif-url", "http://169.254.169.254/latest/meta-data/");
    b.click("#whatif-go");
    b.wait_text("#whatif-table", "private-destination");
    b.screenshot("4-policies");

    // A request through Envoy shows up in the live view.
    assert_eq!(
        raw_get(
            stack.proxy,
            &format!("http://{}/from-ui-test", up.addr),
            AGENT,
            KEY
        ),
        200
    );
    b.click("nav button[data-tab=decisions]");
    b.wait_text("#decisions-table", "/from-ui-test");
    b.click("#decisions-table tbody tr");
    b.wait_text("#record", "\"request_id\"");
    // Its place in the signed log: proven once a checkpoint covers it
    // (one is written at least every 5 s while records arrive).
    b.wait_text("#record-proof", "Tamper evidence:");
    assert!(
        eventually(Duration::from_secs(20), || {
            b.click("#decisions-table tbody tr");
            std::thread::sleep(Duration::from_millis(300));
            b.text("#record-proof").contains("proven")
        }),
        "{}",
        b.text("#record-proof")
    );
    assert!(
        b.text("#record-proof").contains("inclusion proof of"),
        "{}",
        b.text("#record-proof")
    );
    b.screenshot("5-decisions");
    // Pushed as it happens (Server-Sent Events), no reload.
    assert_eq!(
        raw_get(
            stack.proxy,
            &format!("http://{}/pushed-live", up.addr),
            AGENT,
            KEY
        ),
        200
    );
    b.wait_text("#decisions-table", "/pushed-live");
    // The overview charts what happened: bars per minute, the denied host.
    assert_eq!(
        raw_get(stack.proxy, "http://denied.example/", AGENT, KEY),
        403
    );
    b.wait_text("#decisions-table", "denied.example");
    b.click("nav button[data-tab=overview]");
    b.wait_text("#overview-hosts", "denied.example");
    assert!(
        b.find("#chart-requests rect.bar").is_some(),
        "a bar is drawn"
    );
    assert!(
        b.find("#chart-requests rect.deny").is_some(),
        "the denial is red"
    );
    b.wait_text("#overview-total", "% denied");
    b.wait_text("#overview-total", "req/s over the last full minute");
    b.screenshot("1b-overview-traffic");

    // Agents: last hour's traffic per agent, and key rotation / disabling
    // into the candidate.
    b.click("nav button[data-tab=agents]");
    b.wait_text("#agents-table", "ui-bot");
    let row = |id: &str| {
        b.text("#agents-table")
            .lines()
            .find(|l| l.starts_with(&format!("{id}\t")) || l.starts_with(&format!("{id} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            b.click("nav button[data-tab=agents]");
            row(AGENT).contains("T")
        }),
        "the agent's last-seen time is shown: {:?}",
        b.text("#agents-table")
    );
    b.click("button[data-agent=ui-bot]");
    b.wait_text("#agent-key", "New key for ui-bot");
    assert!(b.text("#agent-key").contains("cg_"));
    b.screenshot("2b-agents-activity");
    // Disable, into the candidate like every edit.
    b.click("button[data-agent=ui-bot][data-action=disable]");
    b.wait_text("#agent-key", "ui-bot disabled in the candidate");
    b.click("nav button[data-tab=revisions]");
    b.click("#review");
    b.wait_text("#diff", "agents.ui-bot.api_key_sha256");
    b.wait_text("#diff", "agents.ui-bot.status");
    b.wait_text("#diff", "policies.ui-web-api.match.path_prefix");
    b.wait_text("#diff", "- policies.ui-multi");
    let diff = b.text("#diff");
    assert!(
        !diff.contains("ui-web-api.match.identity") && !diff.contains("ui-web-api.enabled"),
        "an edit changed what the form did not: {diff}"
    );
    b.click("#commit");
    b.wait_text("#commit-result", "active");
    b.click("nav button[data-tab=policies]");
    b.wait_text("#policies-table", "GET /v2/");
    b.click("nav button[data-tab=agents]");
    assert!(
        eventually(Duration::from_secs(10), || {
            b.click("nav button[data-tab=agents]");
            row("ui-bot").contains("disabled")
        }),
        "ui-bot is disabled once committed: {:?}",
        b.text("#agents-table")
    );
    assert!(b
        .find("button[data-agent=ui-bot][data-action=enable]")
        .is_some());

    // Rollback confirmed: revision 1 is enforced again (as a new revision).
    b.click("nav button[data-tab=revisions]");
    b.wait_text("#revisions-table", "3 (active)");
    b.click("button[data-rollback='1']");
    b.wait_text("#diff", "Rolling back to revision 1");
    b.click("#rollback-confirm");
    b.wait_text("#commit-result", "rolled back to revision 1");
    b.wait_text("#revisions-table", "4 (active)");
    b.click("nav button[data-tab=policies]");
    b.wait_text("#policies-table", "allow-local-upstreams");
    assert!(
        !b.text("#policies-table").contains("ui-web-api"),
        "{}",
        b.text("#policies-table")
    );

    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    // A viewer sees no operator controls, and the API refuses it anyway.
    let viewer = {
        let r = curl(
            &[
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name": "auditor", "role": "viewer"}"#,
                &format!("http://{}/api/v1/tokens", stack.admin),
            ],
            &[],
        );
        r.json()["token"]
            .as_str()
            .expect("viewer token")
            .to_string()
    };
    b.click("#signout");
    assert!(eventually(Duration::from_secs(5), || b.displayed("#token")));
    b.type_in("#token", &viewer);
    b.click("#signin");
    b.wait_text("#who", "auditor (viewer)");
    b.click("nav button[data-tab=revisions]");
    assert!(!b.displayed("#review"), "no commit controls for a viewer");

    // The page is served with a strict CSP through `up`'s admin_listen.
    let r = curl(&["-s", &ui], &[]);
    let csp = r.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
}
