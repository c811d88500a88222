// The Clawgress console: a thin client of /api/v1 with a session cookie.
// Everything shown is set with textContent (never HTML); the CSRF token of
// the session lives only in this page's memory.
"use strict";

let csrf = null;
let role = null;
let stream = null;
let live = [];

const $ = (id) => document.getElementById(id);

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  row.appendChild(td);
  return td;
}

function fill(tableId, rows, cols, rowClass) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    if (rowClass) tr.className = rowClass(r);
    for (const c of cols) cell(tr, typeof c === "function" ? c(r) : r[c]);
    body.appendChild(tr);
  }
  return body;
}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") opts.headers["x-csrf-token"] = csrf || "";
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch("/api/v1/" + path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    let msg = data.error || ("HTTP " + r.status);
    for (const e of data.errors || []) msg += "\n" + (e.path || "(document)") + ": " + e.reason;
    throw new Error(msg);
  }
  return data;
}

function showError(e) {
  $("error").textContent = e ? e.message : "";
}

function signedIn(me) {
  csrf = me.csrf;
  role = me.role;
  $("who").textContent = me.name + " (" + me.role + ")";
  $("signout").hidden = false;
  $("signin-view").hidden = true;
  $("app").hidden = false;
  for (const el of document.querySelectorAll(".operator")) el.hidden = role === "viewer";
  show("overview");
}

async function show(tab) {
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + tab;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  stopStream();
  showError(null);
  try {
    if (tab === "overview") await overview();
    if (tab === "agents") await agents();
    if (tab === "policies") await policies();
    if (tab === "revisions") await revisions();
    if (tab === "decisions") startStream();
  } catch (e) { showError(e); }
}

async function overview() {
  const s = await api("GET", "stats?window_s=3600").catch((e) => {
    showError(e);
    return { total: 0, by_decision: [], by_agent: [], per_minute: [], top_denied_hosts: [] };
  });
  const minutes = s.per_minute || [];
  const limited = minutes.reduce((n, m) => n + m.rate_limited, 0);
  const peak = minutes.reduce((n, m) => Math.max(n, m.requests), 0);
  // The rate now: the last full minute (UTC `YYYY-MM-DDTHH:MM`, as the API
  // keys minutes).
  const lastFull = new Date(Date.now() - 60000).toISOString().slice(0, 16);
  const now = minutes.find((m) => m.minute === lastFull);
  $("overview-total").textContent = s.total + " requests in the last hour, "
    + (s.total ? Math.round(100 * minutes.reduce((n, m) => n + m.denied, 0) / s.total) : 0) + " % denied, "
    + limited + " over quota (429); " + ((now ? now.requests : 0) / 60).toFixed(1) + " req/s over the last full minute, busiest minute "
    + peak + " (" + (peak / 60).toFixed(1) + " req/s)";
  chart($("chart-requests"), minutes);
  fill("overview-table", s.by_decision, ["decision", "reason", "count"]);
  fill("overview-hosts", s.top_denied_hosts || [], ["destination_host", "count"]);
  fill("overview-agents", s.by_agent, ["agent_id", "decision", "count"]);
}

// Bars per minute (the last 60), drawn as SVG elements: no inline style,
// no script in the markup, so the page's CSP holds.
function chart(svg, minutes) {
  const NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const shown = minutes.slice(-60);
  const peak = Math.max(1, ...shown.map((m) => m.requests));
  const w = 600 / 60, h = 100;
  const rect = (x, y, width, height, cls, title) => {
    const r = document.createElementNS(NS, "rect");
    r.setAttribute("x", x); r.setAttribute("y", y);
    r.setAttribute("width", width); r.setAttribute("height", height);
    r.setAttribute("class", cls);
    const t = document.createElementNS(NS, "title");
    t.textContent = title;
    r.appendChild(t);
    svg.appendChild(r);
  };
  const axis = document.createElementNS(NS, "line");
  axis.setAttribute("x1", 0); axis.setAttribute("x2", 600);
  axis.setAttribute("y1", h); axis.setAttribute("y2", h);
  axis.setAttribute("class", "axis");
  svg.appendChild(axis);
  shown.forEach((m, i) => {
    const x = (60 - shown.length + i) * w;
    const all = Math.max(1, Math.round(h * m.requests / peak));
    const denied = Math.round(h * m.denied / peak);
    const label = m.minute + "Z: " + m.requests + " requests, " + m.denied + " denied, " + m.rate_limited + " 429";
    rect(x + 1, h - all, w - 2, all, "bar", label);
    if (denied > 0) rect(x + 1, h - denied, w - 2, denied, "bar deny", label);
    if (m.rate_limited > 0) rect(x + 1, h + 4, w - 2, 6, "bar quota", label);
  });
}

async function agents() {
  const list = await api("GET", "agents");
  const stats = await api("GET", "stats?window_s=3600").catch(() => ({ agents: [] }));
  const seen = new Map((stats.agents || []).map((x) => [x.agent_id, x]));
  const n = (a, k) => (seen.get(a.agent_id) || {})[k] ?? "";
  const body = fill("agents-table", list, [
    "agent_id", "auth_type", "status", "team_id", "project_id", "environment", (a) => a.profile || "",
    (a) => n(a, "last_seen"), (a) => n(a, "requests"), (a) => n(a, "denied"), (a) => n(a, "rate_limited"),
    () => "",
  ], (a) => a.status === "disabled" ? "deny" : "");
  if (role === "viewer") return;
  // Changes go to the candidate, like every edit: review and commit them.
  body.querySelectorAll("tr").forEach((tr, i) => {
    const a = list[i];
    const id = a.agent_id;
    const quoted = "agents." + JSON.stringify(id);
    const act = (label, f) => {
      const b = document.createElement("button");
      b.textContent = label;
      b.dataset.agent = id;
      b.dataset.action = label.toLowerCase().replace(/ /g, "-");
      b.addEventListener("click", async () => {
        showError(null);
        try { await f(); await agents(); } catch (e) { showError(e); }
      });
      tr.lastChild.appendChild(b);
    };
    if (a.auth_type === "api_key") {
      act("Rotate key", async () => {
        const r = await api("POST", "agents/" + encodeURIComponent(id) + "/rotate-key");
        $("agent-key").textContent = "New key for " + id + " (shown once; the old key works until you commit): " + r.api_key;
        offerCopy(r.api_key);
      });
    }
    const disabled = a.status === "disabled";
    act(disabled ? "Enable" : "Disable", async () => {
      await api("POST", "candidate/set", { path: quoted + ".status", value: disabled ? "active" : "disabled" });
      $("agent-key").textContent = id + (disabled ? " enabled" : " disabled") + " in the candidate: review and commit it under Revisions.";
    });
  });
}

// The identity fields a policy constrains, as the form writes them:
// `team_id=web environment=prod`, a list as `agent_id=a,b`.
function identityOf(p) {
  return Object.entries(p.match.identity || {})
    .filter(([, v]) => v !== "*")
    .map(([k, v]) => k + "=" + (Array.isArray(v) ? v.join(",") : v));
}

// The form's identity text back into match.identity (null if empty).
function parseIdentity(text) {
  const fields = ["agent_id", "team_id", "project_id", "environment"];
  const out = {};
  for (const item of text.split(/\s+/).filter((x) => x)) {
    const at = item.indexOf("=");
    const k = item.slice(0, at).trim();
    const values = item.slice(at + 1).split(",").map((x) => x.trim()).filter((x) => x);
    if (at < 1 || !fields.includes(k) || !values.length || k in out) {
      throw new Error("identity: space-separated agent_id=…, team_id=…, project_id=…, environment=… (a list as a,b), each once");
    }
    out[k] = values.length === 1 ? values[0] : values;
  }
  return Object.keys(out).length ? out : null;
}

// The policy Edit took into the form, so staging keeps what the form does
// not show (enabled, version).
let editingPolicy = null;

async function policies() {
  const list = (await api("GET", "policies")).slice().sort((a, b) => a.priority - b.priority || a.policy_id.localeCompare(b.policy_id));
  const body = fill("policies-table", list, [
    "priority", "policy_id", "action", "mode",
    (p) => (p.match.destination.hosts || []).join(", "),
    (p) => (p.match.destination.ports || []).join(", "),
    (p) => identityOf(p).join(" "),
    (p) => [(p.match.method || []).join(","), p.match.path_prefix || ""].filter((x) => x).join(" ") || "any",
    () => "",
  ]);
  if (role === "viewer") return;
  body.querySelectorAll("tr").forEach((tr, i) => {
    const p = list[i];
    const act = (label, f) => {
      const b = document.createElement("button");
      b.textContent = label;
      b.dataset.policy = p.policy_id;
      b.dataset.action = label.toLowerCase();
      b.addEventListener("click", async () => {
        showError(null);
        try { await f(); } catch (e) { showError(e); }
      });
      tr.lastChild.appendChild(b);
    };
    // Edit: the form takes the policy as it is; staging replaces it.
    act("Edit", async () => {
      $("policy-id").value = p.policy_id;
      $("policy-priority").value = String(p.priority);
      $("policy-action").value = p.action;
      $("policy-hosts").value = (p.match.destination.hosts || []).join(", ");
      $("policy-ports").value = (p.match.destination.ports || []).join(", ");
      $("policy-who").value = identityOf(p).join(" ");
      editingPolicy = p;
      $("policy-methods").value = (p.match.method || []).join(", ");
      $("policy-path").value = p.match.path_prefix || "";
      $("policy-shadow").checked = p.mode === "shadow";
      $("policy-result").textContent = "Editing " + p.policy_id + ": change it and stage it.";
      $("policy-id").focus();
    });
    act("Remove", async () => {
      await api("POST", "candidate/delete", { path: "policies." + JSON.stringify(p.policy_id) });
      $("policy-result").textContent = "Policy " + p.policy_id + " removed in the candidate: review, configure and commit it under Revisions.";
    });
  });
}

async function revisions() {
  const cmp = await api("GET", "compare");
  $("diff").textContent = cmp.diff.length ? cmp.diff.join("\n") : "(no changes)";
  $("commit").hidden = true;
  clearRollback();
  const r = await api("GET", "revisions?limit=50");
  for (const [sel, pick] of [["sbs-from", 1], ["sbs-to", 0]]) {
    const el = $(sel);
    el.replaceChildren();
    r.revisions.forEach((x, i) => {
      const o = document.createElement("option");
      o.value = String(x.id);
      o.textContent = "rev " + x.id + (x.id === r.active ? " (active)" : "");
      // Default: the revision before the newest against the newest.
      if (i === Math.min(pick, r.revisions.length - 1)) o.selected = true;
      el.appendChild(o);
    });
  }
  const body = fill("revisions-table", r.revisions, [
    (x) => x.id + (x.id === r.active ? " (active)" : ""), "created_at", "actor", "comment", () => "",
  ]);
  if (role !== "viewer") {
    body.querySelectorAll("tr").forEach((tr, i) => {
      const rev = r.revisions[i];
      if (rev.id === r.active) return;
      const b = document.createElement("button");
      b.textContent = "Roll back to " + rev.id;
      b.dataset.rollback = String(rev.id);
      // First what it would change (active → that revision), then confirm.
      b.addEventListener("click", async () => {
        showError(null);
        try {
          const cmp = await api("GET", "compare?from=" + r.active + "&to=" + rev.id);
          $("diff").textContent = "Rolling back to revision " + rev.id + " changes what is enforced:\n" + (cmp.diff.length ? cmp.diff.join("\n") : "(nothing)");
          $("commit").hidden = true;
          pendingRollback = { to: rev.id, from: r.active };
          $("rollback-confirm").textContent = "Confirm rollback to " + rev.id;
          $("rollback-confirm").hidden = false;
          $("rollback-cancel").hidden = false;
          $("diff").scrollIntoView();
        } catch (e) { showError(e); }
      });
      tr.lastChild.appendChild(b);
    });
  }
}

// The revision a shown rollback diff is for, until confirmed or cancelled.
let pendingRollback = null;
function clearRollback() {
  pendingRollback = null;
  $("rollback-confirm").hidden = true;
  $("rollback-cancel").hidden = true;
}

// The key just shown, once, for the copy button (not kept anywhere else).
let shownKey = null;
function offerCopy(key) {
  shownKey = key;
  $("agent-key-copy").hidden = false;
  $("agent-key-copy").textContent = "Copy key";
}

// Live decisions: Server-Sent Events from /api/v1/audit/stream (the
// session cookie goes with them), newest on top, at most 100 kept.
function stopStream() {
  if (stream) { stream.close(); stream = null; }
}

function startStream() {
  stopStream();
  live = [];
  renderDecisions();
  const q = new URLSearchParams();
  if ($("f-agent").value) q.set("agent", $("f-agent").value);
  if ($("f-decision").value) q.set("decision", $("f-decision").value);
  if ($("f-host").value) q.set("host", $("f-host").value);
  stream = new EventSource("/api/v1/audit/stream?" + q.toString());
  stream.onmessage = (ev) => {
    let r;
    try { r = JSON.parse(ev.data); } catch { return; }
    if (live.some((x) => x.seq === r.seq)) return;
    live.unshift(r);
    if (live.length > 100) live.pop();
    if (!$("f-pause").checked) renderDecisions();
  };
}

function renderDecisions() {
  const shown = live.slice();
  const body = fill("decisions-table", shown, [
    "timestamp", "agent_id", "decision", "response_code", "http_method",
    (r) => r.destination_host + ":" + r.destination_port, "path", "policy_id", "reason",
  ], (r) => r.decision + " clickable");
  body.querySelectorAll("tr").forEach((tr, i) => tr.addEventListener("click", () => showRecord(shown[i])));
}

// The full record, and where it stands in the tamper-evident log.
async function showRecord(r) {
  $("record").textContent = JSON.stringify(r, null, 2);
  $("record-proof").textContent = "checking the record's place in the signed log…";
  try {
    const p = await api("GET", "audit/proof?seq=" + encodeURIComponent(r.seq));
    $("record-proof").textContent = "Tamper evidence: " + p.status + " — " + p.detail;
  } catch (e) {
    $("record-proof").textContent = "Tamper evidence: " + e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("signin-error").textContent = "";
    const r = await fetch("/ui/session", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: $("token").value }),
    });
    $("token").value = "";
    const data = await r.json().catch(() => ({}));
    if (!r.ok) { $("signin-error").textContent = data.error || ("HTTP " + r.status); return; }
    signedIn(data);
  });
  $("signout").addEventListener("click", async () => {
    await fetch("/ui/session", { method: "DELETE", credentials: "same-origin" });
    stopStream();
    csrf = null; role = null;
    $("who").textContent = "";
    $("signout").hidden = true;
    $("app").hidden = true;
    $("agent-key").textContent = "";
    shownKey = null;
    $("agent-key-copy").hidden = true;
    $("signin-view").hidden = false;
  });
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.tab));
  for (const id of ["f-agent", "f-decision", "f-host"]) $(id).addEventListener("change", startStream);
  $("f-pause").addEventListener("change", () => { if (!$("f-pause").checked) renderDecisions(); });
  $("sbs-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError(null);
    try {
      const from = $("sbs-from").value, to = $("sbs-to").value;
      const c = await api("GET", "compare?from=" + encodeURIComponent(from) + "&to=" + encodeURIComponent(to));
      $("sbs-old").textContent = "rev " + from;
      $("sbs-new").textContent = "rev " + to;
      const show = (v) => v === null || v === undefined ? "—" : JSON.stringify(v);
      fill("sbs-table", c.changes, ["path", (x) => show(x.old), (x) => show(x.new)],
        (x) => x.old === null ? "added" : x.new === null ? "removed" : "changed");
      if (!c.changes.length) fill("sbs-table", [{ path: "(no differences)" }], ["path", () => "", () => ""]);
    } catch (e) { showError(e); }
  });
  $("agent-key-copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(shownKey || "");
      $("agent-key-copy").textContent = "Copied";
    } catch (e) {
      $("agent-key-copy").textContent = "Copy failed: select the key and copy it";
    }
  });
  $("whatif-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError(null);
    try {
      const r = await api("POST", "evaluate", {
        agent_id: $("whatif-agent").value.trim(),
        method: $("whatif-method").value,
        url: $("whatif-url").value.trim(),
      });
      const rows = [["active", r.active], ["candidate", r.candidate]].map(([under, d]) => ({ under, ...d }));
      fill("whatif-table", rows, [
        (d) => d.under + (d.revision && d.under === "active" ? " (rev " + d.revision + ")" : ""),
        "decision", "status", "policy_id", "reason",
        (d) => d.shadow ? d.shadow.decision + " by " + d.shadow.policy_id : "",
        "hint",
      ], (d) => d.decision);
      $("whatif-note").textContent = (r.differs ? "The candidate changes this answer. " : "")
        + "Seen by authz as " + r.candidate.request.method + " " + r.candidate.request.authority + (r.candidate.request.path || "")
        + " (node settings such as private_destinations_allowed and quotas are not applied here).";
    } catch (e) { showError(e); }
  });
  $("agent-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const body = { agent_id: $("agent-id").value };
      if ($("agent-team").value) body.team_id = $("agent-team").value;
      const a = await api("POST", "agents", body);
      $("agent-key").textContent = "Key for " + a.agent_id + " (shown once): " + a.api_key + " — commit to activate.";
      offerCopy(a.api_key);
      $("agent-id").value = "";
    } catch (e) { showError(e); }
  });
  $("policy-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError(null);
    const list = (id) => $(id).value.split(",").map((x) => x.trim()).filter((x) => x);
    try {
      const id = $("policy-id").value.trim();
      const before = editingPolicy && editingPolicy.policy_id === id ? editingPolicy : null;
      const policy = {
        policy_id: id,
        priority: Number($("policy-priority").value),
        enabled: before ? before.enabled !== false : true,
        action: $("policy-action").value,
        match: { destination: { hosts: list("policy-hosts") } },
      };
      if (before && before.version !== undefined) policy.version = before.version;
      const ports = list("policy-ports").map(Number);
      if (ports.some((p) => !Number.isInteger(p) || p < 1 || p > 65535)) throw new Error("ports: whole numbers 1-65535");
      if (ports.length) policy.match.destination.ports = ports;
      const who = parseIdentity($("policy-who").value);
      if (who) policy.match.identity = who;
      const methods = list("policy-methods").map((m) => m.toUpperCase());
      if (methods.length) policy.match.method = methods;
      if ($("policy-path").value.trim()) policy.match.path_prefix = $("policy-path").value.trim();
      if ($("policy-shadow").checked) policy.mode = "shadow";
      // The whole policy at its path: `configure` validates it with the rest.
      await api("POST", "candidate/set", { path: "policies." + JSON.stringify(id), value: policy });
      editingPolicy = null;
      $("policy-result").textContent = "Policy " + id + " staged in the candidate: review, configure and commit it under Revisions.";
    } catch (e) { showError(e); }
  });
  // Review = configure: the candidate is validated and staged as a
  // revision, its diff shown; Commit publishes exactly that revision.
  let staged = null;
  $("review").addEventListener("click", async () => {
    showError(null);
    staged = null;
    $("commit").hidden = true;
    clearRollback();
    try {
      const cmp = await api("GET", "compare");
      if (!cmp.diff.length) { $("diff").textContent = "(no changes)"; return; }
      const c = await api("POST", "configure");
      staged = c.revision;
      $("diff").textContent = c.diff.join("\n");
      $("commit-result").textContent = "revision " + c.revision + " validated and staged; commit it to enforce.";
      $("commit").hidden = false;
    } catch (e) { $("diff").textContent = ""; showError(e); }
  });
  $("commit").addEventListener("click", async () => {
    try {
      const c = await api("POST", "commit", staged ? { revision: staged } : {});
      staged = null;
      $("commit-result").textContent = "commit " + c.commit_id + ": revision " + c.revision + " active; rollout " + JSON.stringify(c.rollout);
      await revisions();
    } catch (e) { showError(e); }
  });
  $("rollback-confirm").addEventListener("click", async () => {
    if (pendingRollback === null) return;
    const { to, from } = pendingRollback;
    clearRollback();
    try {
      // Refused (409) if another revision became active after the diff.
      const c = await api("POST", "rollback", { revision: to, expect_active: from });
      $("commit-result").textContent = "rolled back to revision " + to + ": revision " + c.revision + " active";
      await revisions();
    } catch (e) { showError(e); }
  });
  $("rollback-cancel").addEventListener("click", async () => {
    clearRollback();
    await revisions();
  });
  fetch("/ui/session", { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : null))
    .then((me) => { if (me && me.signed_in) signedIn(me); })
    .catch(() => {});
});
