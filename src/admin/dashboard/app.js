// sluice dashboard: a small single-page app over the admin API. Everything it shows comes
// from /api/* and /v1/status; all text is inserted with textContent, never as HTML.
"use strict";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
let refreshTimer = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function render(...nodes) {
  main.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

function showError(message) {
  banner.textContent = message;
  banner.hidden = !message;
}

class Unauthorized extends Error {}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin", headers: { accept: "application/json" } }, options));
  if (response.status === 401) throw new Unauthorized("not logged in");
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    throw new Error(`${path}: ${message}`);
  }
  return body;
}

const fmt = {
  int: (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US")),
  ms: (n) => (n === null || n === undefined ? "—" : `${Number(n) < 10 ? Number(n).toFixed(2) : Number(n).toFixed(0)} ms`),
  pct: (n) => (n === null || n === undefined ? "—" : `${(Number(n) * 100).toFixed(1)}%`),
  usd: (n) => (n === null || n === undefined ? "—" : `$${Number(n).toFixed(Number(n) < 1 ? 4 : 2)}`),
  time: (ms) => new Date(ms).toLocaleString(),
};

function statusPill(status) {
  return h("span", { class: `status s${String(status)[0]}` }, status);
}

function copyButton(getText) {
  return h("button", {
    class: "small", type: "button", title: "Copy to clipboard",
    onclick: async (event) => {
      const text = getText();
      try { await navigator.clipboard.writeText(text); }
      catch (_) {
        const area = h("textarea", {}, text); document.body.append(area); area.select();
        document.execCommand("copy"); area.remove();
      }
      event.target.textContent = "Copied"; setTimeout(() => { event.target.textContent = "Copy"; }, 1200);
    },
  }, "Copy");
}

function pretty(text) {
  if (text === null || text === undefined) return "";
  if (typeof text !== "string") return JSON.stringify(text, null, 2);
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (_) { return text; }
}

function table(columns, rows, onRow) {
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.label)));
  const body = rows.map((row) => h("tr", { class: onRow ? "link" : null, onclick: onRow ? () => onRow(row) : null },
    columns.map((c) => h("td", { class: c.num ? "num" : c.mono ? "mono" : null }, c.value(row)))));
  return h("table", {}, h("thead", {}, head), h("tbody", {}, body));
}

// === login ===

function renderLogin(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  const input = h("input", { type: "password", name: "key", placeholder: "Admin key", autocomplete: "current-password", required: true });
  const error = h("p", { class: "bad", id: "login-error" }, message || "");
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      const response = await fetch("api/login", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json" }, body: JSON.stringify({ key: input.value }),
      });
      // A fresh load starts the app once, with the session cookie in place.
      if (response.ok) { location.hash = "#/overview"; location.reload(); }
      else error.textContent = response.status === 401 ? "That admin key is not right." : `Login failed (${response.status}).`;
    },
  }, input, h("button", { type: "submit" }, "Log in"), error);
  render(h("div", { class: "login panel" }, h("h1", {}, "sluice dashboard"),
    h("p", { class: "muted" }, "Enter the gateway's admin key (admin.key)."), form));
  input.focus();
}

// === overview ===

const ranges = { "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };

async function renderOverview(params) {
  const range = params.get("range") || "24h";
  const by = params.get("by") || "model";
  const now = Date.now();
  const stats = await api(`api/stats?from=${now - ranges[range]}&to=${now}`);
  const t = stats.totals;
  const control = (name, value, options) => h("select", {
    id: `overview-${name}`,
    onchange: (e) => { params.set(name, e.target.value); location.hash = `#/overview?${params}`; },
  }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
  const cards = h("div", { class: "cards", id: "totals" },
    [["Requests", fmt.int(t.requests), "requests"], ["Success rate", fmt.pct(t.success_rate), "success_rate"],
     ["Avg latency", fmt.ms(t.avg_latency_ms), "avg_latency_ms"], ["p95 latency", fmt.ms(t.p95_latency_ms), "p95_latency_ms"],
     ["Tokens", fmt.int(t.total_tokens), "total_tokens"], ["Cost", fmt.usd(t.cost), "cost"], ...cacheCards(t)]
      .map(([label, value, key]) => h("div", { class: "card", "data-stat": key }, h("div", { class: "label" }, label), h("div", { class: "value" }, value))));
  const breakdownColumns = [
    { label: "Name", value: (r) => r.name || "—" },
    { label: "Requests", num: true, value: (r) => fmt.int(r.requests) },
    { label: "Success", num: true, value: (r) => fmt.pct(r.success_rate) },
    { label: "Avg latency", num: true, value: (r) => fmt.ms(r.avg_latency_ms) },
    { label: "Tokens", num: true, value: (r) => fmt.int(r.total_tokens) },
    { label: "Cost", num: true, value: (r) => fmt.usd(r.cost) },
  ];
  const hourlyChart = h("div", { class: "chart", id: "chart-hourly" });
  const dailyChart = h("div", { class: "chart", id: "chart-daily" });
  const empty = !t.requests;
  render(
    h("div", { class: "toolbar" }, h("h1", { style: "margin:0 auto 0 0" }, "Overview"),
      h("label", {}, "Range", control("range", range, [["24h", "Last 24 hours"], ["7d", "Last 7 days"], ["30d", "Last 30 days"]])),
      h("label", {}, "Charts by", control("by", by, [["model", "Model"], ["upstream", "Upstream"], ["key", "Gateway key"]]))),
    cards,
    empty ? h("div", { class: "empty", style: "margin-top:16px" }, "No requests in this range yet. Point an OpenAI client at this gateway's /v1 and they will appear here.") : null,
    h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "Requests per hour, last 48 hours"), hourlyChart),
      h("div", {}, h("h2", {}, "Requests per day, last 30 days"), dailyChart)),
    h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "By model"), table(breakdownColumns, stats.by_model)),
      h("div", {}, h("h2", {}, "By upstream"), table(breakdownColumns, stats.by_upstream))),
    h("h2", {}, "By gateway key"), table(breakdownColumns, stats.by_key),
  );
  drawSeries(hourlyChart, stats.hourly_by[by], 3600e3, 48, now);
  drawSeries(dailyChart, stats.daily_by[by], 86400e3, 30, now);
}

// The response cache's figures, once it has looked anything up in the range.
function cacheCards(t) {
  if (!t.cache_lookups) return [];
  return [["Cache hit rate", fmt.pct(t.cache_hit_rate), "cache_hit_rate"], ["Saved by cache", fmt.usd(t.saved_cost), "saved_cost"]];
}

function drawSeries(container, rows, bucketMs, buckets, now) {
  if (typeof uPlot === "undefined") { container.textContent = "Charts unavailable."; return; }
  const end = Math.floor(now / bucketMs) * bucketMs;
  const xs = [];
  for (let i = buckets - 1; i >= 0; i--) xs.push((end - i * bucketMs) / 1000);
  const names = [...new Set(rows.map((r) => r.name || "—"))].slice(0, 8);
  const palette = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4d7c0f", "#be185d"];
  const data = [xs, ...names.map((name) => xs.map((x) => {
    const row = rows.find((r) => (r.name || "—") === name && r.start_ms / 1000 === x);
    return row ? row.requests : 0;
  }))];
  const width = Math.max(300, container.clientWidth - 20);
  container.replaceChildren();
  if (!names.length) { container.append(h("p", { class: "muted" }, "No requests in this period.")); return; }
  new uPlot({
    width, height: 230,
    series: [{}, ...names.map((name, i) => ({ label: name, stroke: palette[i % palette.length], width: 2, fill: palette[i % palette.length] + "18" }))],
    axes: [{}, { size: 50 }],
    scales: { x: { time: true } },
  }, data, container);
}

// === upstreams and keys ===

async function renderUpstreams() {
  const status = await api("v1/status");
  const limits = (l) => ["rpm", "rpd", "tpm"].filter((k) => l[k] !== null && l[k] !== undefined).map((k) => `${k} ${fmt.int(l[k])}`).join(" · ") || "unlimited";
  const upstreamRows = status.upstreams.map((u) => h("div", { class: "panel", style: "margin-bottom:12px", "data-upstream": u.name },
    h("div", { class: "section-head", style: "margin-top:0" }, h("h2", {}, u.name),
      u.health.cooling_down ? h("span", { class: "status s5" }, `resting ${Math.ceil(u.health.cooldown_remaining_ms / 1000)} s`) : h("span", { class: "status s2" }, "healthy")),
    h("div", { class: "kv" },
      h("div", {}, "Base URL"), h("div", { class: "mono" }, u.base_url),
      h("div", {}, "Models"), h("div", {}, [...u.models, ...u.aliases.map((a) => `${a} (alias)`)].map((m) => h("span", { class: "pill" }, m))),
      h("div", {}, "Limits"), h("div", {}, limits(u.limits)),
      h("div", {}, "Use this minute / today"), h("div", {}, `${fmt.int(u.usage.minute.requests)} req, ${fmt.int(u.usage.minute.tokens)} tok / ${fmt.int(u.usage.day.requests)} req, ${fmt.int(u.usage.day.tokens)} tok`),
      h("div", {}, "In flight · TTFB avg · failures in a row"), h("div", {}, `${u.health.in_flight} · ${fmt.ms(u.health.latency_ms)} · ${u.health.failures_in_a_row}`),
      h("div", {}, "Credential"), h("div", {}, u.credential)),
    u.keys.length ? table([
      { label: "Key", mono: true, value: (k) => k.key },
      { label: "State", value: (k) => (k.cooling_down ? h("span", { class: "bad" }, `resting ${Math.ceil(k.cooldown_remaining_ms / 1000)} s`) : h("span", { class: "ok" }, "ready")) },
    ], u.keys) : null));
  const keyRows = table([
    { label: "Name", value: (k) => k.name },
    { label: "Key", mono: true, value: (k) => k.key },
    { label: "Models", value: (k) => k.models.join(", ") },
    { label: "Limits", value: (k) => limits(k.limits) },
    { label: "Budget", value: (k) => (k.budget ? `${k.budget.tokens ? fmt.int(k.budget.tokens) + " tok" : ""}${k.budget.cost ? " " + fmt.usd(k.budget.cost) : ""} / ${k.budget.period}` : "—") },
    { label: "Minute", num: true, value: (k) => `${fmt.int(k.usage.minute.requests)} req` },
    { label: "Today", num: true, value: (k) => `${fmt.int(k.usage.day.requests)} req · ${fmt.int(k.usage.day.tokens)} tok` },
    { label: "Month cost", num: true, value: (k) => fmt.usd(k.usage.month.cost) },
  ], status.keys);
  const log = status.log;
  render(
    h("h1", {}, "Upstreams & keys"),
    h("p", { class: "muted" }, `Limit windows: ${status.windows}.`),
    ...upstreamRows,
    h("h2", {}, "Gateway keys"),
    status.keys.length ? keyRows : h("div", { class: "empty" }, "No gateway keys configured (access.keys)."),
    log ? h("p", { class: "muted" }, `Request log: ${fmt.int(log.written)} written, ${fmt.int(log.queued)} queued, ${fmt.int(log.dropped)} dropped, ${fmt.int(log.write_errors)} write errors.`) : null,
  );
}

// === requests ===

const filterNames = ["search", "model", "status", "key", "upstream", "from", "to"];

async function renderRequests(params) {
  const page = Number(params.get("page") || 1);
  const query = new URLSearchParams();
  for (const name of filterNames) {
    const value = params.get(name);
    if (!value) continue;
    query.set(name, name === "from" || name === "to" ? String(new Date(value).getTime()) : value);
  }
  query.set("page", String(page));
  query.set("per_page", "50");
  // Older pages follow a cursor, so paging deep into millions of rows stays fast.
  if (params.get("before")) query.set("before", params.get("before"));
  const list = await api(`api/requests?${query}`);
  const inputs = {};
  const field = (name, label, attrs) => {
    inputs[name] = h("input", Object.assign({ name, value: params.get(name) || "" }, attrs || {}));
    return h("label", {}, label, inputs[name]);
  };
  const apply = (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const name of filterNames) if (inputs[name].value) next.set(name, inputs[name].value);
    if (params.get("auto") === "0") next.set("auto", "0");
    location.hash = `#/requests?${next}`;
  };
  const auto = params.get("auto") !== "0";
  const autoBox = h("input", { type: "checkbox", id: "auto-refresh", checked: auto, onchange: (e) => {
    params.set("auto", e.target.checked ? "1" : "0"); location.hash = `#/requests?${params}`;
  } });
  const older = () => {
    params.set("before", list.next_before); params.set("page", String(page + 1));
    location.hash = `#/requests?${params}`;
  };
  // A search's total is exact on its last page, a lower bound before it ("+"), and absent
  // where the page cannot know it (after a cursor, past the end): then only the page shows.
  const known = typeof list.total === "number";
  const pages = known ? Math.max(1, Math.ceil(list.total / list.per_page)) : 0;
  const more = list.total_exact ? "" : "+"; // counted up to a limit
  render(
    h("h1", {}, "Requests"),
    h("form", { class: "toolbar", onsubmit: apply, id: "filters" },
      field("search", "Search", { placeholder: "path, model, text in bodies…", size: 28 }),
      field("model", "Model", { size: 14 }), field("status", "Status", { placeholder: "200, 4xx, error", size: 10 }),
      field("key", "Key", { size: 10 }), field("upstream", "Upstream", { size: 10 }),
      field("from", "From", { type: "datetime-local" }), field("to", "To", { type: "datetime-local" }),
      h("button", { type: "submit" }, "Apply"),
      h("label", { style: "flex-direction:row;align-items:center;gap:6px;margin-left:auto" }, autoBox, "Auto refresh")),
    list.data.length ? table([
      { label: "Time", value: (r) => fmt.time(r.ts) },
      { label: "Status", value: (r) => statusPill(r.status) },
      { label: "Method", value: (r) => r.method },
      { label: "Path", mono: true, value: (r) => r.path },
      { label: "Model", value: (r) => r.model || "—" },
      { label: "Key", value: (r) => r.key_name },
      { label: "Upstream", value: (r) => r.upstream || "—" },
      { label: "Tokens", num: true, value: (r) => fmt.int(r.total_tokens) },
      { label: "Latency", num: true, value: (r) => fmt.ms(r.latency_ms) },
      { label: "Tries", num: true, value: (r) => r.tries },
    ], list.data, (r) => { location.hash = `#/requests/${encodeURIComponent(r.id)}`; })
      : h("div", { class: "empty" }, list.total === 0 && ![...params.keys()].some((k) => filterNames.includes(k))
        ? "No requests logged yet." : "No requests match these filters."),
    h("div", { class: "pager" },
      h("button", { type: "button", id: "prev", disabled: page <= 1, onclick: () => history.back() }, "← Newer"),
      h("span", { id: "page-info" }, `Page ${page}${known && list.total_exact ? ` of ${fmt.int(pages)}` : ""}${known ? ` · ${fmt.int(list.total)}${more} requests` : ""}`),
      h("button", { type: "button", id: "next", disabled: !list.has_more, onclick: older }, "Older →")),
  );
  if (auto) refreshTimer = setTimeout(() => route(), 5000);
}

async function renderDetail(id) {
  const r = await api(`api/requests/${encodeURIComponent(id)}`);
  const headerTable = (headers) => table([
    { label: "Header", mono: true, value: (e) => e[0] },
    { label: "Value", mono: true, value: (e) => e[1] },
  ], Object.entries(headers || {}));
  const block = (title, text, id) => text ? h("div", {},
    h("div", { class: "section-head" }, h("h2", {}, title), copyButton(() => text)),
    h("pre", { id }, text)) : null;
  const toolCalls = r.reply_tool_calls && r.reply_tool_calls.length ? JSON.stringify(r.reply_tool_calls, null, 2) : null;
  render(
    h("p", {}, h("a", { href: "#/requests" }, "← Requests")),
    h("h1", {}, `${r.method} ${r.path} `, statusPill(r.status)),
    h("div", { class: "panel kv", id: "summary" },
      h("div", {}, "Request id"), h("div", { class: "mono" }, r.id),
      h("div", {}, "Time"), h("div", {}, fmt.time(r.ts)),
      h("div", {}, "Client"), h("div", {}, `${r.client_ip} · key ${r.key_name}`),
      h("div", {}, "Model"), h("div", {}, r.model ? `${r.model}${r.upstream_model && r.upstream_model !== r.model ? " → " + r.upstream_model : ""}` : "—"),
      h("div", {}, "Upstream"), h("div", {}, r.upstream ? `${r.upstream} (${r.upstream_key || "no key"})` : "—"),
      h("div", {}, "Time to first byte"), h("div", {}, fmt.ms(r.ttfb_ms)),
      h("div", {}, "Total"), h("div", {}, fmt.ms(r.latency_ms)),
      h("div", {}, "Tokens"), h("div", {}, r.total_tokens === null ? "—" : `${fmt.int(r.prompt_tokens)} prompt + ${fmt.int(r.completion_tokens)} completion = ${fmt.int(r.total_tokens)} (${r.usage_source})`),
      h("div", {}, "Cost"), h("div", {}, fmt.usd(r.cost)),
      h("div", {}, "Streamed"), h("div", {}, r.stream ? "yes" : "no"),
      r.cache ? h("div", {}, "Cache") : null, r.cache ? h("div", { id: "cache" }, r.cache === "hit" ? `hit, saved ${fmt.usd(r.saved_cost)}` : r.cache) : null,
      r.error ? h("div", {}, "Error") : null, r.error ? h("div", { class: "bad" }, r.error) : null),
    h("h2", {}, "Tries"),
    table([
      { label: "#", num: true, value: (a) => r.attempts.indexOf(a) + 1 },
      { label: "Upstream", value: (a) => a.upstream },
      { label: "Model", value: (a) => a.model || "—" },
      { label: "Key", mono: true, value: (a) => a.key || "—" },
      { label: "Outcome", value: (a) => (a.status ? statusPill(a.status) : h("span", { class: "bad" }, a.error || "failed")) },
      { label: "Time", num: true, value: (a) => fmt.ms(a.ms) },
    ], r.attempts || []),
    block("Reply (reassembled)", r.reply_text, "reply-text"),
    block("Tool calls", toolCalls, "tool-calls"),
    h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "Request headers"), headerTable(r.request_headers)),
      h("div", {}, h("h2", {}, "Response headers"), headerTable(r.response_headers))),
    block("Request body", pretty(r.request_body), "request-body"),
    block("Response body", r.stream ? r.response_body : pretty(r.response_body), "response-body"),
  );
}

// === routing ===

async function route() {
  clearTimeout(refreshTimer);
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "overview").split("?");
  const params = new URLSearchParams(query || "");
  const view = path.split("/")[0];
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  try {
    if (view === "requests" && path.split("/")[1]) await renderDetail(decodeURIComponent(path.split("/")[1]));
    else if (view === "requests") await renderRequests(params);
    else if (view === "upstreams") await renderUpstreams();
    else await renderOverview(params);
    showError("");
  } catch (error) {
    if (error instanceof Unauthorized) { renderLogin(); return; }
    showError(error.message || String(error));
  }
}

async function start() {
  try {
    await api("api/session");
  } catch (error) {
    if (error instanceof Unauthorized) { renderLogin(); return; }
    showError(error.message || String(error));
    return;
  }
  document.getElementById("nav").hidden = false;
  const logout = document.getElementById("logout");
  logout.hidden = false;
  logout.onclick = async () => { await fetch("api/logout", { method: "POST", credentials: "same-origin" }); location.hash = ""; renderLogin(); };
  route();
}

window.addEventListener("hashchange", route);
start();
