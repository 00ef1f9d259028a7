// sluice dashboard: a small single-page app over the admin API. Everything it shows comes
// from /api/* and /v1/status; all text is inserted with textContent, never as HTML.
//
// Views are registered with `sluice.addView({ name, label, render })`: the router calls
// `render(params, rest)` for `#/name/rest?params`, and a view with a `label` gets a link in
// the navigation. Another script (loaded after this one, before the page has loaded)
// adds its views the same way, with the helpers `window.sluice` hands out.
"use strict";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
let refreshTimer = null;
/** Charts drawn by the current view, resized with their containers. */
let charts = [];

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
  for (const chart of charts) chart.observer.disconnect();
  charts = [];
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
  usd: (n) => {
    if (n === null || n === undefined) return "—";
    const v = Number(n);
    if (v === 0) return "$0";
    if (Math.abs(v) < 0.01) return `$${Number(v.toPrecision(2))}`;
    return `$${v.toFixed(v < 100 ? 2 : 0)}`;
  },
  time: (ms) => new Date(ms).toLocaleString(),
  /** Today's times as 22:29:05, older ones with their date. */
  shortTime: (ms) => {
    const d = new Date(ms);
    const time = d.toLocaleTimeString("en-GB");
    return d.toDateString() === new Date().toDateString() ? time : `${d.toLocaleDateString("en-CA")} ${time}`;
  },
};

/** What each cause of a failure means, as the request list and overview name it. */
const causes = {
  ok: ["ok", "Answered"],
  refused: ["refused", "Refused by sluice: a limit, key or route; no upstream was asked"],
  upstream_error: ["upstream error", "An upstream failed: 5xx, 408, 429 or no answer"],
  rejected: ["rejected", "An upstream turned the request down (4xx)"],
};

const NO_UPSTREAM = "(none: refused before an upstream)";

function statusPill(status) {
  return h("span", { class: `status s${String(status)[0]}` }, status);
}

function causePill(cause) {
  const [label, title] = causes[cause] || [cause || "—", ""];
  return h("span", { class: `cause c-${cause}`, title }, label);
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

/** A table; on narrow screens each row becomes a card whose cells carry their labels. */
function table(columns, rows, onRow) {
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null, title: c.title || null }, c.label)));
  const body = rows.map((row) => h("tr", { class: onRow ? "link" : null, onclick: onRow ? () => onRow(row) : null },
    columns.map((c) => h("td", { class: c.num ? "num" : c.mono ? "mono" : null, "data-label": c.label }, c.value(row)))));
  return h("div", { class: "table-wrap" }, h("table", { class: "cards-on-phone" }, h("thead", {}, head), h("tbody", {}, body)));
}

/**
 * A bar of `used` against `limit`, with what is left; full (and red) at the limit.
 * `show` formats an amount.
 */
function meter(label, used, limit, show) {
  const ratio = limit > 0 ? used / limit : 1;
  const state = ratio >= 1 ? "level-full" : ratio >= 0.8 ? "level-high" : "level-ok";
  const left = Math.max(0, limit - used);
  return h("div", { class: `meter ${state}`, "data-meter": label },
    h("div", { class: "meter-head" },
      h("span", {}, label),
      h("span", { class: "meter-text" }, ratio >= 1
        ? `${show(used)} of ${show(limit)} · at limit`
        : `${show(used)} of ${show(limit)} · ${show(left)} left`)),
    h("div", { class: "meter-track", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": limit, "aria-valuenow": used },
      h("div", { class: "meter-bar", style: `width:${Math.min(100, ratio * 100).toFixed(1)}%` })));
}

// The response cache's figures, once it has looked anything up in the range.
function cacheCards(t) {
  if (!t.cache_lookups) return [];
  return [
    card("cache_hit_rate", "Cache hit rate", fmt.pct(t.cache_hit_rate), `${fmt.int(t.cache_hits)} of ${fmt.int(t.cache_lookups)} lookups answered from the cache`),
    card("saved_cost", "Saved by the cache", fmt.usd(t.saved_cost), "what the hits would have cost upstream"),
  ];
}

function card(key, label, value, note) {
  return h("div", { class: "card", "data-stat": key },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value),
    note ? h("div", { class: "note" }, note) : null);
}

// === charts ===

const palette = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4d7c0f", "#be185d"];

/**
 * A time chart in `container`: `xs` in Unix seconds, `series` as [{ label, values, color }].
 * Sized to its container and resized with it.
 */
function drawChart(container, xs, series, options) {
  container.replaceChildren();
  if (typeof uPlot === "undefined") { container.append(h("p", { class: "muted" }, "Charts unavailable.")); return; }
  if (!series.length || !xs.length) { container.append(h("p", { class: "muted" }, "No requests in this period.")); return; }
  const opts = options || {};
  const width = () => Math.max(200, container.clientWidth - 20);
  const plot = new uPlot({
    width: width(), height: opts.height || 220,
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: s.color || palette[i % palette.length], width: 2,
      fill: opts.fill ? (s.color || palette[i % palette.length]) + "18" : undefined,
      value: opts.value ? (_, v) => (v === null || v === undefined ? "—" : opts.value(v)) : undefined,
    }))],
    axes: [{}, { size: 72, values: opts.axis || opts.value ? (_, ticks) => ticks.map(opts.axis || opts.value) : undefined }],
    scales: { x: { time: true } },
    legend: { live: true },
  }, [xs, ...series.map((s) => s.values)], container);
  const observer = new ResizeObserver(() => {
    const w = width();
    if (Math.abs(w - plot.width) > 2) plot.setSize({ width: w, height: opts.height || 220 });
  });
  observer.observe(container);
  charts.push({ plot, observer });
}

/** Bucket starts (Unix seconds) of the `count` buckets of `bucketMs` ending now. */
function buckets(bucketMs, count, now) {
  const end = Math.floor(now / bucketMs) * bucketMs;
  const xs = [];
  for (let i = count - 1; i >= 0; i--) xs.push((end - i * bucketMs) / 1000);
  return xs;
}

/** One value per bucket from rows with `start_ms` (missing buckets: `empty`). */
function perBucket(xs, rows, pick, empty) {
  const at = new Map(rows.map((r) => [r.start_ms / 1000, r]));
  return xs.map((x) => (at.has(x) ? pick(at.get(x)) : empty));
}

/** Series by name (the `limit` largest by `pick` summed), one value per bucket. */
function byName(xs, rows, pick, limit) {
  const totals = new Map();
  for (const r of rows) totals.set(r.name, (totals.get(r.name) || 0) + pick(r));
  const names = [...totals.entries()].sort((a, b) => b[1] - a[1]).slice(0, limit || 8).map(([n]) => n);
  return names.map((name, i) => ({
    label: name || NO_UPSTREAM, color: palette[i % palette.length],
    values: perBucket(xs, rows.filter((r) => r.name === name), pick, 0),
  }));
}

// === login ===

function renderLogin(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  const account = h("input", { type: "text", name: "name", placeholder: "Account (empty: admin key)", autocomplete: "username" });
  const input = h("input", { type: "password", name: "key", placeholder: "Admin key or password", autocomplete: "current-password", required: true });
  const error = h("p", { class: "bad", id: "login-error" }, message || "");
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      const response = await fetch("api/login", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(account.value ? { name: account.value, password: input.value } : { key: input.value }),
      });
      // The app starts afresh at its root, with the session cookie in place and the view
      // asked for before the login (the fragment) kept.
      if (response.ok && /\/login$/.test(location.pathname)) location.replace(`./${location.hash || "#/overview"}`);
      else if (response.ok) location.reload();
      else error.textContent = response.status === 401 ? "That admin key is not right." : `Login failed (${response.status}).`;
    },
  }, account, input, h("button", { type: "submit" }, "Log in"), error);
  render(h("div", { class: "login panel" }, h("h1", {}, "sluice dashboard"),
    h("p", { class: "muted", id: "login-hint" },
      "Enter the gateway's admin key: the value of the environment variable that admin.key_env names (SLUICE_ADMIN_KEY in the examples)."),
    form));
  input.focus();
}

// === overview ===

const ranges = { "24h": [86400e3, 3600e3, 24], "7d": [7 * 86400e3, 86400e3, 7], "30d": [30 * 86400e3, 86400e3, 30] };
const tokenDimensions = [["model", "Model"], ["key", "Gateway key"], ["user", "End user"], ["upstream", "Upstream"]];

async function renderOverview(params) {
  const range = ranges[params.get("range")] ? params.get("range") : "24h";
  const tokensBy = tokenDimensions.some(([d]) => d === params.get("tokens")) ? params.get("tokens") : "model";
  const [span, bucketMs, count] = ranges[range];
  const now = Date.now();
  const stats = await api(`api/stats?from=${now - span}&to=${now}`);
  const t = stats.totals;
  const control = (name, value, options) => h("select", {
    id: `overview-${name}`,
    onchange: (e) => { params.set(name, e.target.value); location.hash = `#/overview?${params}`; },
  }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
  const share = (n, of) => (of ? ` (${fmt.pct(n / of)})` : "");
  const cards = h("div", { class: "cards", id: "totals" },
    card("requests", "Requests", fmt.int(t.requests), "every logged request, refusals included"),
    card("refused", "Refused by sluice", `${fmt.int(t.refused)}${share(t.refused, t.requests)}`, "limits, keys, routes: no upstream asked"),
    card("upstream_errors", "Upstream errors", `${fmt.int(t.upstream_errors)}${share(t.upstream_errors, t.reached)}`, "5xx, timeouts, 429s from upstreams"),
    card("success_rate", "Upstream success rate", fmt.pct(t.reached ? t.success_rate : null), `of the ${fmt.int(t.reached)} requests that reached an upstream`),
    card("p95_latency_ms", "Latency p50 / p95", `${fmt.ms(t.p50_latency_ms)} / ${fmt.ms(t.p95_latency_ms)}`, "whole request, as the client saw it"),
    card("ttfb", "Time to first byte p50 / p95", `${fmt.ms(t.ttfb_p50_ms)} / ${fmt.ms(t.ttfb_p95_ms)}`, "until the upstream's first byte"),
    card("total_tokens", "Tokens", fmt.int(t.total_tokens), `${fmt.int(t.prompt_tokens)} prompt + ${fmt.int(t.completion_tokens)} completion`),
    card("cost", "Cost", fmt.usd(t.cost), "at the configured prices (pricing)"),
    ...cacheCards(t));
  const xs = buckets(bucketMs, count, now);
  const series = bucketMs === 3600e3 ? stats.hourly : stats.daily;
  const latency = bucketMs === 3600e3 ? stats.latency_hourly : stats.latency_daily;
  const by = (bucketMs === 3600e3 ? stats.hourly_by : stats.daily_by)[tokensBy] || [];
  const per = bucketMs === 3600e3 ? "hour" : "day";
  const chart = (id, title, note) => {
    const el = h("div", { class: "chart", id });
    return [h("div", { class: "chart-box" }, h("h2", {}, title), note ? h("p", { class: "muted small" }, note) : null, el), el];
  };
  const [outcomeBox, outcomeChart] = chart("chart-outcomes", `Requests per ${per}, by outcome`);
  const [errorBox, errorChart] = chart("chart-errors", "Error rate by cause",
    "Refusals as a share of all requests; upstream errors and rejections as a share of those that reached an upstream.");
  const [costBox, costChart] = chart("chart-cost", `Cost per ${per}`);
  const [latencyBox, latencyChart] = chart("chart-latency", "Latency and time to first byte, p50 and p95");
  const [tokensBox, tokensChart] = chart("chart-tokens", `Tokens per ${per}`);
  const tokensControl = h("label", { class: "inline" }, "by ", control("tokens", tokensBy, tokenDimensions));
  tokensBox.querySelector("h2").append(" ", tokensControl);

  const breakdown = (nameLabel, nameOf, filter) => [
    { label: nameLabel, value: (r) => nameOf(r) },
    { label: "Requests", num: true, value: (r) => fmt.int(r.requests) },
    { label: "Refused", num: true, title: "refused by sluice", value: (r) => fmt.int(r.refused) },
    { label: "Upstream errors", num: true, value: (r) => fmt.int(r.upstream_errors) },
    { label: "Upstream success", num: true, title: "of requests that reached an upstream", value: (r) => fmt.pct(r.reached ? r.success_rate : null) },
    { label: "Tokens", num: true, value: (r) => fmt.int(r.total_tokens) },
    { label: "Cost", num: true, value: (r) => fmt.usd(r.cost) },
  ].filter((c) => !filter || filter(c));
  const toRequests = (name, value) => () => { if (value) location.hash = `#/requests?${new URLSearchParams({ [name]: value, auto: "0" })}`; };
  const byCost = (rows) => [...rows].sort((a, b) => b.cost - a.cost || b.requests - a.requests);
  const empty = !t.requests;
  render(
    h("div", { class: "toolbar" }, h("h1", { class: "grow" }, "Overview"),
      h("label", {}, "Range", control("range", range, [["24h", "Last 24 hours"], ["7d", "Last 7 days"], ["30d", "Last 30 days"]]))),
    cards,
    empty ? h("div", { class: "empty", style: "margin-top:16px" }, "No requests in this range yet. Point an OpenAI client at this gateway's /v1 and they will appear here.") : null,
    h("div", { class: "grid2" }, outcomeBox, errorBox, costBox, latencyBox),
    tokensBox,
    h("div", { class: "grid2" },
      h("div", { id: "top-keys" }, h("h2", {}, "Top gateway keys by cost"),
        stats.by_key.length ? table(breakdown("Key", (r) => r.name), byCost(stats.by_key), (r) => toRequests("key", r.name)()) : h("div", { class: "empty" }, "No requests.")),
      h("div", { id: "top-users" }, h("h2", {}, "Top end users by cost"),
        h("p", { class: "muted small" }, `The body's user field (end-user attribution). ${fmt.int(stats.users_in_range)} users in this range${stats.users_in_range > stats.by_user.length ? `, the ${stats.by_user.length} dearest shown` : ""}.`),
        stats.by_user.length ? table(breakdown("User", (r) => r.name), stats.by_user, (r) => toRequests("user", r.name)())
          : h("div", { class: "empty" }, "No request named a user (the body's user field)."))),
    h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "By model"), table(breakdown("Model", (r) => r.name || "(none)"), stats.by_model,
        // "other" gathers models the config does not name: no one model to list.
        (r) => toRequests("model", r.name === "other" ? "" : r.name)())),
      h("div", {}, h("h2", {}, "By upstream"),
        table(breakdown("Upstream", (r) => r.name || NO_UPSTREAM), stats.by_upstream, (r) => toRequests("upstream", r.name)()),
        stats.by_upstream.some((r) => !r.name)
          ? h("p", { class: "muted small", id: "no-upstream-note" }, `${NO_UPSTREAM}: requests sluice answered itself (a key, limit, budget or unknown model) before any upstream was tried.`)
          : null)),
  );
  drawChart(outcomeChart, xs, [
    { label: "answered", color: "#16a34a", values: perBucket(xs, series, (r) => r.succeeded, 0) },
    { label: "refused by sluice", color: "#d97706", values: perBucket(xs, series, (r) => r.refused, 0) },
    { label: "upstream errors", color: "#dc2626", values: perBucket(xs, series, (r) => r.upstream_errors, 0) },
    { label: "rejected by upstream", color: "#9333ea", values: perBucket(xs, series, (r) => r.rejected, 0) },
  ], { fill: true });
  drawChart(errorChart, xs, [
    { label: "refused", color: "#d97706", values: perBucket(xs, series, (r) => (r.requests ? r.refused / r.requests : null), null) },
    { label: "upstream errors", color: "#dc2626", values: perBucket(xs, series, (r) => (r.reached ? r.upstream_errors / r.reached : null), null) },
    { label: "rejected", color: "#9333ea", values: perBucket(xs, series, (r) => (r.reached ? r.rejected / r.reached : null), null) },
  ], { value: (v) => `${(v * 100).toFixed(v < 0.1 ? 1 : 0)}%` });
  drawChart(costChart, xs, [{ label: "cost", color: "#2563eb", values: perBucket(xs, series, (r) => r.cost, 0) }], { fill: true, value: fmt.usd });
  drawChart(latencyChart, xs, [
    { label: "latency p50", color: "#2563eb", values: perBucket(xs, latency, (r) => r.p50_ms, null) },
    { label: "latency p95", color: "#1e3a8a", values: perBucket(xs, latency, (r) => r.p95_ms, null) },
    { label: "TTFB p50", color: "#16a34a", values: perBucket(xs, latency, (r) => r.ttfb_p50_ms, null) },
    { label: "TTFB p95", color: "#166534", values: perBucket(xs, latency, (r) => r.ttfb_p95_ms, null) },
  ], { value: (v) => fmt.ms(v), axis: (v) => (v >= 1000 ? `${+(v / 1000).toFixed(1)} s` : `${+v.toFixed(v >= 10 ? 0 : 1)} ms`) });
  drawChart(tokensChart, xs, byName(xs, by, (r) => r.total_tokens), { fill: true, value: (v) => fmt.int(v) });
}

// === upstreams and keys ===

function limitMeters(limits, usage) {
  const out = [];
  if (limits.rpm !== null && limits.rpm !== undefined) out.push(meter("Requests this minute (rpm)", usage.minute.requests, limits.rpm, fmt.int));
  if (limits.rpd !== null && limits.rpd !== undefined) out.push(meter("Requests today, UTC (rpd)", usage.day.requests, limits.rpd, fmt.int));
  if (limits.tpm !== null && limits.tpm !== undefined) out.push(meter("Tokens this minute (tpm)", usage.minute.tokens, limits.tpm, fmt.int));
  return out;
}

const periodNames = { day: "today (UTC)", month: "this month (UTC)", total: "in all", minute: "this minute" };

function budgetMeters(budget, usage) {
  if (!budget) return [];
  const used = usage[budget.period] || { tokens: 0, cost: 0 };
  const out = [];
  if (budget.tokens) out.push(meter(`Token budget ${periodNames[budget.period] || budget.period}`, used.tokens, budget.tokens, fmt.int));
  if (budget.cost) out.push(meter(`Cost budget ${periodNames[budget.period] || budget.period}`, used.cost, budget.cost, fmt.usd));
  return out;
}

async function renderUpstreams() {
  const status = await api("v1/status");
  const upstreamRows = status.upstreams.map((u) => h("div", { class: "panel", "data-upstream": u.name },
    h("div", { class: "section-head flush" }, h("h2", {}, u.name),
      u.health.cooling_down ? h("span", { class: "status s5" }, `resting ${Math.ceil(u.health.cooldown_remaining_ms / 1000)} s`) : h("span", { class: "status s2" }, "healthy")),
    h("div", { class: "kv" },
      h("div", {}, "Base URL"), h("div", { class: "mono wrap" }, u.base_url),
      h("div", {}, "Models"), h("div", {}, [...u.models, ...u.aliases.map((a) => `${a} (alias)`)].map((m) => h("span", { class: "pill" }, m))),
      h("div", {}, "Use this minute · today (UTC)"), h("div", {}, `${fmt.int(u.usage.minute.requests)} req, ${fmt.int(u.usage.minute.tokens)} tok · ${fmt.int(u.usage.day.requests)} req, ${fmt.int(u.usage.day.tokens)} tok`),
      h("div", {}, "In flight · TTFB avg · failures in a row"), h("div", {}, `${u.health.in_flight} · ${fmt.ms(u.health.latency_ms)} · ${u.health.failures_in_a_row}`),
      h("div", {}, "Credential"), h("div", {}, u.credential)),
    h("div", { class: "meters" }, limitMeters(u.limits, u.usage).length ? limitMeters(u.limits, u.usage) : h("p", { class: "muted small" }, "No rpm, rpd or tpm limit.")),
    u.keys.length ? table([
      { label: "Key", mono: true, value: (k) => k.key },
      { label: "State", value: (k) => (k.cooling_down ? h("span", { class: "bad" }, `resting ${Math.ceil(k.cooldown_remaining_ms / 1000)} s`) : h("span", { class: "ok" }, "ready")) },
    ], u.keys) : null));
  const keyCards = status.keys.map((k) => {
    const meters = [...limitMeters(k.limits, k.usage), ...budgetMeters(k.budget, k.usage)];
    return h("div", { class: "panel", "data-key": k.name },
      h("div", { class: "section-head flush" }, h("h2", {}, k.name), h("span", { class: "mono muted" }, k.key)),
      h("div", { class: "kv" },
        h("div", {}, "Models"), h("div", {}, k.models.map((m) => h("span", { class: "pill" }, m))),
        h("div", {}, "Admitted today (UTC)"), h("div", { class: "today" }, `${fmt.int(k.usage.day.requests)} req · ${fmt.int(k.usage.day.tokens)} tok · ${fmt.usd(k.usage.day.cost)}`),
        h("div", {}, "This month (UTC)"), h("div", {}, `${fmt.int(k.usage.month.requests)} req · ${fmt.int(k.usage.month.tokens)} tok · ${fmt.usd(k.usage.month.cost)}`)),
      h("div", { class: "meters" }, meters.length ? meters : h("p", { class: "muted small" }, "No limits or budget: unlimited.")),
      h("p", { class: "small" }, h("a", { href: `#/requests?${new URLSearchParams({ key: k.name, auto: "0" })}` }, "This key's requests →")));
  });
  const log = status.log;
  render(
    h("h1", {}, "Upstreams & keys"),
    h("p", { class: "muted" }, `Limit windows: ${status.windows}. Use counted: ${status.usage_source}.`),
    h("h2", {}, "Upstreams"),
    h("div", { class: "panels" }, upstreamRows),
    h("h2", {}, "Gateway keys"),
    status.keys.length ? h("p", { class: "muted small", id: "today-note" },
      "“Admitted” counts the requests a key's limits let through, which is what its limits and budget are checked against. "
      + "sluice's refusals (a limit or budget reached) are not counted here, so the overview, which counts every logged request, can show more.") : null,
    status.keys.length ? h("div", { class: "panels" }, keyCards) : h("div", { class: "empty" }, "No gateway keys configured (access.keys)."),
    log ? h("p", { class: "muted" }, `Request log: ${fmt.int(log.written)} written, ${fmt.int(log.queued)} queued, ${fmt.int(log.dropped)} dropped, ${fmt.int(log.write_errors)} write errors.`) : null,
  );
}

// === requests ===

const filterNames = ["search", "model", "status", "key", "upstream", "user", "from", "to"];

/** The list's filters from the view's parameters, as the API takes them. */
function listQuery(params) {
  const query = new URLSearchParams();
  for (const name of filterNames) {
    const value = params.get(name);
    if (!value) continue;
    query.set(name, name === "from" || name === "to" ? String(new Date(value).getTime()) : value);
  }
  return query;
}

let valuesCache = null;

async function filterValues() {
  if (!valuesCache || Date.now() - valuesCache.at > 30e3) valuesCache = { at: Date.now(), values: await api("api/values") };
  return valuesCache.values;
}

async function renderRequests(params) {
  const page = Number(params.get("page") || 1);
  const query = listQuery(params);
  const exportQuery = new URLSearchParams(query);
  query.set("page", String(page));
  query.set("per_page", "50");
  // Older pages follow a cursor, so paging deep into millions of rows stays fast.
  if (params.get("before")) query.set("before", params.get("before"));
  const [list, values] = await Promise.all([api(`api/requests?${query}`), filterValues()]);
  const inputs = {};
  const field = (name, label, attrs) => {
    inputs[name] = h("input", Object.assign({ name, value: params.get(name) || "" }, attrs || {}));
    return h("label", {}, label, inputs[name]);
  };
  const choice = (name, label, options) => {
    const current = params.get(name) || "";
    const known = options.some(([v]) => v === current);
    inputs[name] = h("select", { name },
      h("option", { value: "" }, "any"),
      current && !known ? h("option", { value: current, selected: true }, current) : null,
      options.map(([v, text]) => h("option", { value: v, selected: v === current }, text)));
    return h("label", {}, label, inputs[name]);
  };
  const plain = (list) => list.map((v) => [String(v), String(v)]);
  const statusOptions = [["error", "any error (≥ 400)"], ["2xx", "2xx"], ["4xx", "4xx"], ["5xx", "5xx"], ...plain(values.statuses)];
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
  const search = params.get("search") || "";
  const detail = (r) => { location.hash = `#/requests/${encodeURIComponent(r.id)}${search ? `?${new URLSearchParams({ search })}` : ""}`; };
  // A search's total is exact on its last page, a lower bound before it ("+"), and absent
  // where the page cannot know it (after a cursor, past the end): then only the page shows.
  const known = typeof list.total === "number";
  const pages = known ? Math.max(1, Math.ceil(list.total / list.per_page)) : 0;
  const more = list.total_exact ? "" : "+"; // counted up to a limit
  const exportLink = (format, label) => {
    const q = new URLSearchParams(exportQuery);
    q.set("format", format);
    return h("a", { class: "button ghost-dark", id: `export-${format}`, href: `api/export?${q}`, download: "" }, label);
  };
  render(
    h("div", { class: "toolbar" }, h("h1", { class: "grow" }, "Requests"),
      h("span", { class: "muted small" }, "Export what the filters select (up to 10,000 rows):"),
      exportLink("csv", "CSV"), exportLink("jsonl", "JSON lines")),
    // Folded on a phone unless a filter is set, so the list shows without scrolling.
    h("details", { class: "filter-box", open: window.innerWidth > 700 || filterNames.some((n) => params.get(n)) },
      h("summary", {}, `Filters${filterNames.some((n) => params.get(n)) ? " (set)" : ""}`),
    h("form", { class: "toolbar filters", onsubmit: apply, id: "filters" },
      field("search", "Search", { placeholder: "path, model, text in bodies…", type: "search" }),
      choice("model", "Model", plain(values.models)),
      choice("status", "Status", statusOptions),
      choice("key", "Key", plain(values.keys)),
      choice("upstream", "Upstream", plain(values.upstreams)),
      choice("user", "End user", plain(values.users)),
      field("from", "From", { type: "datetime-local" }), field("to", "To", { type: "datetime-local" }),
      h("button", { type: "submit" }, "Apply"),
      h("label", { class: "inline" }, autoBox, "Auto refresh"))),
    list.data.length ? table([
      { label: "Time", value: (r) => h("span", { class: "nowrap", title: fmt.time(r.ts) }, fmt.shortTime(r.ts)) },
      { label: "Status", value: (r) => statusPill(r.status) },
      { label: "Cause", value: (r) => causePill(r.cause) },
      { label: "Path", mono: true, value: (r) => `${r.method} ${r.path}` },
      { label: "Model", value: (r) => r.model || "—" },
      { label: "Key", value: (r) => r.key_name },
      { label: "User", value: (r) => r.user || "—" },
      { label: "Upstream", value: (r) => r.upstream || h("span", { title: "refused before reaching an upstream" }, "—") },
      { label: "Stream", value: (r) => (r.stream ? "yes" : "no") },
      { label: "Tokens", num: true, value: (r) => fmt.int(r.total_tokens) },
      { label: "Cost", num: true, value: (r) => fmt.usd(r.cost) },
      { label: "TTFB", num: true, value: (r) => fmt.ms(r.ttfb_ms) },
      { label: "Latency", num: true, value: (r) => fmt.ms(r.latency_ms) },
      { label: "Tries", num: true, value: (r) => r.tries },
    ], list.data, detail)
      : h("div", { class: "empty" }, list.total === 0 && ![...params.keys()].some((k) => filterNames.includes(k))
        ? "No requests logged yet." : "No requests match these filters."),
    h("div", { class: "pager" },
      h("button", { type: "button", id: "prev", disabled: page <= 1, onclick: () => history.back() }, "← Newer"),
      h("span", { id: "page-info" }, `Page ${page}${known && list.total_exact ? ` of ${fmt.int(pages)}` : ""}${known ? ` · ${fmt.int(list.total)}${more} requests` : ""}`),
      h("button", { type: "button", id: "next", disabled: !list.has_more, onclick: older }, "Older →")),
  );
  if (auto) refreshTimer = setTimeout(() => route(), 5000);
}

/** `text` as nodes with every case-insensitive occurrence of `term` in a <mark>. */
function highlighted(text, term) {
  if (!term) return [text];
  const lower = text.toLowerCase();
  const needle = term.toLowerCase();
  const out = [];
  let at = 0;
  for (let found = lower.indexOf(needle); found !== -1 && out.length < 2000; found = lower.indexOf(needle, at)) {
    out.push(text.slice(at, found), h("mark", {}, text.slice(found, found + needle.length)));
    at = found + needle.length;
  }
  out.push(text.slice(at));
  return out;
}

async function renderDetail(id, params) {
  const r = await api(`api/requests/${encodeURIComponent(id)}`);
  const term = (params.get("search") || "").trim();
  const headerTable = (headers) => table([
    { label: "Header", mono: true, value: (e) => highlighted(e[0], term) },
    { label: "Value", mono: true, value: (e) => highlighted(String(e[1]), term) },
  ], Object.entries(headers || {}));
  const block = (title, text, id, note) => text ? h("div", {},
    h("div", { class: "section-head" }, h("h2", {}, title), copyButton(() => text)),
    note ? h("p", { class: "muted small" }, note) : null,
    h("pre", { id }, highlighted(text, term))) : null;
  const toolCalls = r.reply_tool_calls && r.reply_tool_calls.length ? JSON.stringify(r.reply_tool_calls, null, 2) : null;
  const body = (text) => (r.stream ? text : pretty(text));
  const row = (label, value, cls) => [h("div", {}, label), h("div", { class: cls || null }, value)];
  render(
    h("p", {}, h("a", { href: "#/requests" }, "← Requests")),
    h("h1", { class: "wrap" }, `${r.method} ${r.path} `, statusPill(r.status), " ", causePill(r.cause)),
    h("div", { class: "panel kv", id: "summary" },
      row("Request id", r.id, "mono wrap"),
      row("Time", fmt.time(r.ts)),
      row("Outcome", (causes[r.cause] || [r.cause, ""])[1]),
      row("Client", `${r.client_ip} · key ${r.key_name}`),
      row("End user", r.user || "— (the body named no user)"),
      row("Model", r.model ? `${r.model}${r.upstream_model && r.upstream_model !== r.model ? " → " + r.upstream_model : ""}` : "—"),
      row("Upstream", r.upstream ? `${r.upstream} (${r.upstream_key || "no key"})` : "— (refused before reaching an upstream)"),
      row("Time to first byte", fmt.ms(r.ttfb_ms)),
      row("Total", fmt.ms(r.latency_ms)),
      row("Tokens", r.total_tokens === null ? "—" : `${fmt.int(r.prompt_tokens)} prompt + ${fmt.int(r.completion_tokens)} completion = ${fmt.int(r.total_tokens)} (${r.usage_source})`),
      row("Cost", fmt.usd(r.cost)),
      r.cache ? [h("div", {}, "Cache"), h("div", { id: "cache" }, r.cache === "hit" ? `hit, saved ${fmt.usd(r.saved_cost)}` : r.cache)] : null,
      row("Streamed", r.stream ? "yes" : "no"),
      r.retry_after !== undefined && r.retry_after !== null ? row("Retry-After", `${r.retry_after} s`) : null,
      r.error ? row("Error", highlighted(r.error, term), "bad") : null),
    h("h2", {}, "Tries"),
    r.attempts && r.attempts.length ? table([
      { label: "#", num: true, value: (a) => r.attempts.indexOf(a) + 1 },
      { label: "Upstream", value: (a) => a.upstream },
      { label: "Model", value: (a) => a.model || "—" },
      { label: "Key", mono: true, value: (a) => a.key || "—" },
      { label: "Outcome", value: (a) => (a.status ? statusPill(a.status) : h("span", { class: "bad" }, a.error || "failed")) },
      { label: "Time", num: true, value: (a) => fmt.ms(a.ms) },
    ], r.attempts) : h("p", { class: "muted" }, "None: sluice answered before trying an upstream."),
    block("Reply (reassembled)", r.reply_text, "reply-text"),
    block("Tool calls", toolCalls, "tool-calls"),
    h("div", { class: "grid2" },
      h("div", {}, h("h2", {}, "Request headers"), headerTable(r.request_headers)),
      h("div", {}, h("h2", {}, "Response headers"), headerTable(r.response_headers))),
    block("Request body", pretty(r.request_body), "request-body"),
    block("Response body", body(r.response_body), "response-body", "What the client received."),
    block("Upstream's raw answer", body(r.upstream_response_body), "upstream-response-body",
      "The upstream's bytes before sluice shaped them (model name put back, usage chunk removed)."),
  );
  const first = main.querySelector("mark");
  if (first) first.scrollIntoView({ block: "center" });
}

// === routing ===

const views = new Map();

/**
 * Registers a view: `#/name…` renders with `render(params, rest)` (`rest`: the path after
 * `name/`, decoded). A `label` puts a link in the navigation, in the order views are added.
 */
function addView(view) {
  views.set(view.name, view);
  if (view.label) {
    document.getElementById("nav").append(h("a", { href: `#/${view.name}`, "data-view": view.name }, view.label));
  }
}

addView({ name: "overview", label: "Overview", render: (params) => renderOverview(params) });
addView({ name: "upstreams", label: "Upstreams & keys", render: () => renderUpstreams() });
addView({ name: "requests", label: "Requests", render: (params, rest) => (rest ? renderDetail(rest, params) : renderRequests(params)) });

async function route() {
  clearTimeout(refreshTimer);
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "overview").split("?");
  const params = new URLSearchParams(query || "");
  const [name, ...rest] = path.split("/");
  const view = views.get(name) || views.get("overview");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view.name));
  try {
    await view.render(params, rest.length ? decodeURIComponent(rest.join("/")) : "");
    showError("");
  } catch (error) {
    if (error instanceof Unauthorized) { renderLogin(); return; }
    showError(error.message || String(error));
  }
}

async function start() {
  const atLogin = /\/login$/.test(location.pathname);
  try {
    window.sluiceSession = await api("api/session");
  } catch (error) {
    if (error instanceof Unauthorized) { renderLogin(); return; }
    showError(error.message || String(error));
    return;
  }
  // Logged in already: the login page hands over to the app, the deep link kept.
  if (atLogin) { location.replace(`./${location.hash}`); return; }
  document.getElementById("nav").hidden = false;
  const logout = document.getElementById("logout");
  logout.hidden = false;
  logout.onclick = async () => { await fetch("api/logout", { method: "POST", credentials: "same-origin" }); location.replace("login"); };
  window.addEventListener("hashchange", route);
  route();
}

// The helpers another view script needs (see `addView`).
window.sluice = { addView, api, h, render, table, meter, card, fmt, statusPill, copyButton, pretty, drawChart, showError, route };

// After every script of the page has run, so views other scripts add are in place.
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
