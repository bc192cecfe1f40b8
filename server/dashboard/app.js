// The loraplex dashboard: polls /dashboard/api/state (and /dashboard/api/runs for admins) with
// the API key as a Bearer header, and renders everything with textContent / DOM nodes (helpers
// in widgets.js): names come from operators and tenants, so none of them is ever parsed as HTML.
"use strict";

const KEY_STORAGE = "loraplex-dashboard-key"; // sessionStorage: this tab only, gone when it closes
const POLL_MS = 2000;
const RUNS_POLL_MS = 10000;
const PAGE_SIZE = 25;

const view = {
  state: null, page: 0, filter: "", pendingConfirm: null, pollTimer: null, runsTimer: null, adaptersSignature: null,
};

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: "no-store",
    credentials: "omit",
  });
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    const message = body && body.error && body.error.message ? body.error.message : "HTTP " + response.status;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text || "";
  status.className = isError ? "error" : "";
}

// ---- panels --------------------------------------------------------------------------------

function renderSummary(state) {
  const s = state.server;
  $("base-model").textContent = "base: " + s.base_model;
  $("viewer").textContent = "viewing as " + state.viewer.tenant + (state.viewer.admin ? " (admin)" : "");
  $("sum-queued").textContent = s.queued;
  $("sum-running").textContent = s.running + " / " + s.max_running;
  $("sum-slots").textContent = s.slots_used + " / " + s.max_loras;
  $("sum-rejected").textContent = formatCount(s.rejected_429);
  const load = state.traffic.load;
  for (const [id, values] of [["chart-queued", load.queued], ["chart-running", load.running], ["chart-slots", load.slots_used]]) {
    $(id).replaceChildren(sparkline(values, load.wall));
  }
  document.body.classList.toggle("admin", state.viewer.admin);
  $("load-form").hidden = !s.can_load;
  $("load-roots").textContent = s.adapter_roots.length ? "roots: " + s.adapter_roots.join(", ") : "";
}

function filteredAdapters(state) {
  const filter = view.filter.toLowerCase();
  return state.adapters.filter((a) => a.name.toLowerCase().includes(filter));
}

function actionButton(label, adapter, verb, path) {
  const button = el("button", label);
  button.type = "button";
  button.dataset.action = verb;
  button.addEventListener("click", () =>
    confirmThen(verb + " adapter " + JSON.stringify(adapter.name) + "?", () =>
      runAction(path, { lora_name: adapter.name }, verb + " " + adapter.name)));
  return button;
}

function renderAdapters(state) {
  const rows = filteredAdapters(state);
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
  view.page = Math.min(view.page, pages - 1);
  const first = view.page * PAGE_SIZE;
  const shown = rows.slice(first, first + PAGE_SIZE);
  const last = Math.min(first + PAGE_SIZE, rows.length);
  $("adapters-page").textContent = rows.length ? (first + 1) + "–" + last + " of " + rows.length : "no adapters";
  $("page-prev").disabled = view.page === 0;
  $("page-next").disabled = view.page >= pages - 1;
  // Rebuild only when something shown changed, so a button under the pointer is not replaced
  // at every poll ("last used" is relative, so its minute is part of what is shown).
  const signature = JSON.stringify([state.viewer.admin, shown, Math.floor(Date.now() / 60000)]);
  if (signature === view.adaptersSignature) return;
  view.adaptersSignature = signature;
  const body = $("adapters-table").tBodies[0];
  body.replaceChildren();
  for (const a of shown) {
    const tr = document.createElement("tr");
    tr.dataset.name = a.name;
    tr.appendChild(el("td", a.name, "name"));
    const version = "v" + a.version + (a.draining_versions.length ? " (draining v" + a.draining_versions.join(", v") + ")" : "") +
      (a.kept_versions.length ? " (kept for experiments: v" + a.kept_versions.join(", v") + ")" : "");
    tr.appendChild(el("td", version, "version"));
    const tierCell = el("td");
    const tierText = a.tier === "slot" ? "slot " + a.slot : a.tier;
    tierCell.appendChild(el("span", tierText, "tier tier-" + a.tier));
    tierCell.className = "tier-cell";
    tr.appendChild(tierCell);
    tr.appendChild(el("td", a.pinned ? "pinned" : "", "pinned"));
    const bytes = el("td", formatBytes(a.bytes), "num");
    bytes.title = a.bytes_measured === "memory" ? "parsed weights in memory" : "weights file on disk";
    tr.appendChild(bytes);
    tr.appendChild(el("td", a.rank, "num"));
    tr.appendChild(el("td", a.target_modules.join(", ")));
    const base = el("td", a.base_model || "–");
    if (a.warnings.length) {
      base.appendChild(el("span", " ⚠", "warning"));
      base.title = a.warnings.join("\n");
    }
    tr.appendChild(base);
    tr.appendChild(el("td", formatAgo(a.last_used), "last-used"));
    const actions = el("td", null, "admin-only actions");
    if (state.viewer.admin) {
      actions.appendChild(actionButton(a.pinned ? "Unpin" : "Pin", a, a.pinned ? "unpin" : "pin",
        a.pinned ? "/v1/unpin_lora_adapter" : "/v1/pin_lora_adapter"));
      actions.appendChild(actionButton("Unload", a, "unload", "/v1/unload_lora_adapter"));
    }
    tr.appendChild(actions);
    body.appendChild(tr);
  }
}

const TRAFFIC_COLUMNS = ["Name", "Requests", "Tokens", "req/s", "tok/s", "TTFT p50", "TTFT p95",
  "Latency p50", "Latency p95", "429s", "req/s", "tok/s", "latency p95"];

function renderTraffic(table, rows) {
  if (!table.tHead.rows.length) {
    const head = document.createElement("tr");
    TRAFFIC_COLUMNS.forEach((title) => head.appendChild(el("th", title)));
    table.tHead.appendChild(head);
  }
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = el("td", "no traffic yet", "muted");
    td.colSpan = TRAFFIC_COLUMNS.length;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const w = row.window || {};
    const tr = document.createElement("tr");
    tr.dataset.name = row.name;
    tr.appendChild(el("td", row.name, "name"));
    tr.appendChild(el("td", formatCount(row.requests), "num requests"));
    tr.appendChild(el("td", formatCount(row.generation_tokens), "num tokens"));
    tr.appendChild(el("td", formatRate(w.requests_per_s), "num"));
    tr.appendChild(el("td", formatRate(w.tokens_per_s), "num"));
    tr.appendChild(el("td", formatSeconds(w.ttft_p50), "num"));
    tr.appendChild(el("td", formatSeconds(w.ttft_p95), "num"));
    tr.appendChild(el("td", formatSeconds(w.e2e_p50), "num"));
    tr.appendChild(el("td", formatSeconds(w.e2e_p95), "num"));
    tr.appendChild(el("td", row.rejected_429 === null ? "–" : formatCount(row.rejected_429), "num rejected"));
    for (const values of [row.series.requests_per_s, row.series.tokens_per_s, row.series.e2e_p95]) {
      const chart = el("td", null, "chart");
      chart.appendChild(sparkline(values, row.series.wall));
      tr.appendChild(chart);
    }
    body.appendChild(tr);
  }
}

function renderTasks(state) {
  $("traffic-window").textContent = Math.round(state.traffic.window_s / 60) + " minutes";
  const body = $("tasks-table").tBodies[0];
  body.replaceChildren();
  for (const task of state.tasks) {
    const tr = document.createElement("tr");
    tr.dataset.name = task.task;
    tr.appendChild(el("td", task.task, "name"));
    const weights = task.arms || { [task.adapter]: 1 };
    const totalWeight = Object.values(weights).reduce((a, b) => a + b, 0);
    const totalAssigned = Object.values(task.assignments).reduce((a, b) => a + b, 0);
    const arms = el("td");
    const assignments = el("td");
    for (const [name, weight] of Object.entries(weights)) {
      arms.appendChild(el("div", name + ": " + formatShare(weight / totalWeight)));
      const assigned = task.assignments[name] || 0;
      const line = el("div", formatCount(assigned) + (totalAssigned ? " (" + formatShare(assigned / totalAssigned) + ")" : ""));
      line.dataset.arm = name;
      assignments.appendChild(line);
    }
    tr.appendChild(arms);
    tr.appendChild(assignments);
    body.appendChild(tr);
  }
}

function renderRuns(payload) {
  const list = $("runs-list");
  list.replaceChildren();
  if (!payload.runs_dir) {
    $("runs-note").textContent = "No runs folder: start the server with --runs-dir DIR to list training runs.";
    return;
  }
  $("runs-note").textContent = payload.runs.length + " run(s) in " + payload.runs_dir;
  for (const run of payload.runs) {
    const box = el("div", null, "run");
    box.dataset.name = run.name;
    const info = el("div");
    info.appendChild(el("h3", run.name));
    info.appendChild(el("p", "step " + run.steps + (run.finished ? ", finished" : ", in progress") +
      " · updated " + formatAgo(run.updated), "muted"));
    const last = run.eval[run.eval.length - 1];
    if (last) {
      const table = el("table", null, "eval");
      const head = document.createElement("tr");
      ["Task", "eval loss", "perplexity"].forEach((t) => head.appendChild(el("th", t)));
      table.appendChild(head);
      for (const [task, figures] of Object.entries(last.tasks)) {
        const tr = document.createElement("tr");
        tr.appendChild(el("td", task));
        tr.appendChild(el("td", figures.loss === null ? "–" : figures.loss.toFixed(4), "num"));
        tr.appendChild(el("td", figures.perplexity === null ? "–" : figures.perplexity.toFixed(2), "num"));
        table.appendChild(tr);
      }
      info.appendChild(el("p", "last eval at step " + last.step, "muted"));
      info.appendChild(table);
    }
    box.appendChild(info);
    box.appendChild(lossCurve(run));
    list.appendChild(box);
  }
}

// ---- actions -------------------------------------------------------------------------------

function confirmThen(question, action) {
  $("confirm-text").textContent = question;
  view.pendingConfirm = action;
  $("confirm").hidden = false;
  $("confirm-yes").focus();
}

function closeConfirm(accepted) {
  const action = view.pendingConfirm;
  view.pendingConfirm = null;
  $("confirm").hidden = true;
  if (accepted && action) action();
}

async function runAction(path, body, description) {
  try {
    const result = await api(path, { method: "POST", body });
    setStatus(result && result.message ? result.message : description + ": done", false);
  } catch (err) {
    setStatus(description + " failed: " + err.message, true);
  }
  await refresh();
}

// ---- polling -------------------------------------------------------------------------------

async function refresh() {
  try {
    const state = await api("/dashboard/api/state");
    view.state = state;
    $("content").hidden = false;
    renderSummary(state);
    renderAdapters(state);
    renderTraffic($("traffic-adapters"), state.traffic.adapters);
    renderTraffic($("traffic-tasks"), state.traffic.tasks);
    renderTasks(state);
    renderExperiments(state);
    document.body.dataset.loaded = String(Date.now());
  } catch (err) {
    if (err.status === 401) {
      $("content").hidden = true;
      setStatus((apiKey() ? "That key was refused: " : "This server needs an API key: ") + err.message, true);
      $("key-input").focus();
    } else {
      setStatus("Could not reach the server: " + err.message, true);
    }
  }
}

async function refreshRuns() {
  if (!view.state || !view.state.viewer.admin) {
    $("runs-note").textContent = "Training runs are shown to admin keys.";
    $("runs-list").replaceChildren();
    return;
  }
  try {
    renderRuns(await api("/dashboard/api/runs"));
  } catch (err) {
    $("runs-note").textContent = "Could not read training runs: " + err.message;
  }
}

async function start() {
  clearInterval(view.pollTimer);
  clearInterval(view.runsTimer);
  setStatus("", false);
  try {
    const config = await api("/dashboard/api/config");
    $("key-form").hidden = !config.api_keys; // an open server (no --api-keys) needs no key
    if (config.api_keys && !apiKey()) {
      $("content").hidden = true;
      setStatus("This server needs an API key: enter yours above.", false);
      $("key-input").focus();
      return;
    }
  } catch (err) {
    setStatus("Could not reach the server: " + err.message, true);
    return;
  }
  refresh().then(refreshRuns);
  view.pollTimer = setInterval(refresh, POLL_MS);
  view.runsTimer = setInterval(refreshRuns, RUNS_POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-input").value = "";
    start();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    start();
  });
  $("adapter-filter").addEventListener("input", (event) => {
    view.filter = event.target.value;
    view.page = 0;
    if (view.state) renderAdapters(view.state);
  });
  $("page-prev").addEventListener("click", () => { view.page -= 1; renderAdapters(view.state); });
  $("page-next").addEventListener("click", () => { view.page += 1; renderAdapters(view.state); });
  $("load-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("load-name").value.trim();
    const path = $("load-path").value.trim();
    confirmThen("load adapter " + JSON.stringify(name) + " from " + JSON.stringify(path) + "?", () =>
      runAction("/v1/load_lora_adapter", { lora_name: name, lora_path: path }, "load " + name));
  });
  $("confirm-yes").addEventListener("click", () => closeConfirm(true));
  $("confirm-no").addEventListener("click", () => closeConfirm(false));
  start();
});
