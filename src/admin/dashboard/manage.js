// sluice dashboard: keys, teams and the audit log (issue 16). Loaded after app.js, whose
// helpers (h, render, api, fmt, copyButton, table, showError) it uses; its views are
// registered with app.js's router through `sluice.addView`. A key's secret is shown once, in the answer
// that made it, and never stored by the page.
"use strict";

(function () {
  const role = () => (window.sluiceSession && window.sluiceSession.role) || "viewer";
  const isAdmin = () => role() === "admin";

  async function send(method, path, body) {
    const response = await fetch(path, {
      method, credentials: "same-origin",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let answer = null;
    try { answer = text ? JSON.parse(text) : null; } catch (_) { answer = null; }
    if (!response.ok) throw new Error(answer && answer.error ? answer.error.message : `${response.status}`);
    return answer;
  }

  // A budget's use as a progress bar: the share of its tokens or cost used this period.
  function budgetBar(budget, usage) {
    if (!budget) return h("span", { class: "muted" }, "no budget");
    const used = (usage && usage[budget.period]) || { tokens: 0, cost: 0 };
    const shares = [];
    if (budget.cost !== null && budget.cost !== undefined) shares.push([used.cost / Math.max(budget.cost, 1e-9), `${fmt.usd(used.cost)} of ${fmt.usd(budget.cost)}`]);
    if (budget.tokens !== null && budget.tokens !== undefined) shares.push([used.tokens / Math.max(budget.tokens, 1), `${fmt.int(used.tokens)} of ${fmt.int(budget.tokens)} tokens`]);
    const [share, label] = shares.sort((a, b) => b[0] - a[0])[0];
    const pct = Math.min(100, Math.round(share * 100));
    return h("div", { class: "budget", title: `${label} (${budget.period})` },
      h("div", { class: `bar${pct >= 100 ? " full" : pct >= 80 ? " high" : ""}` }, h("span", { style: `width:${pct}%` })),
      h("small", {}, `${label} · ${budget.period}`));
  }

  const limitsText = (x) => ["rpm", "rpd", "tpm"].filter((k) => x[k] !== null && x[k] !== undefined).map((k) => `${k} ${fmt.int(x[k])}`).join(" · ") || "—";

  // The one place a new secret is shown, with a copy button.
  function secretPanel(name, secret) {
    return h("div", { class: "panel secret", id: "secret-panel" },
      h("strong", {}, `Secret for ${name}: shown once, copy it now.`),
      h("div", { class: "secret-row" }, h("code", { id: "new-secret" }, secret),
        Object.assign(copyButton(() => secret), { id: "copy-secret" })));
  }

  function field(label, input) { return h("label", {}, label, input); }

  function numberOrNull(value) { return value.trim() === "" ? null : Number(value); }

  // The create/edit form of a key; `key` is undefined for a new one.
  function keyForm(key, teams, done) {
    const v = (x) => (x === null || x === undefined ? "" : String(x));
    const name = h("input", { name: "name", value: key ? key.name : "", required: true, disabled: !!key });
    const models = h("input", { name: "models", value: key ? key.models.join(", ") : "*" });
    const rpm = h("input", { name: "rpm", type: "number", min: "0", value: v(key && key.rpm) });
    const rpd = h("input", { name: "rpd", type: "number", min: "0", value: v(key && key.rpd) });
    const tpm = h("input", { name: "tpm", type: "number", min: "0", value: v(key && key.tpm) });
    const cost = h("input", { name: "budget_cost", type: "number", min: "0", step: "any", value: v(key && key.budget && key.budget.cost) });
    const tokens = h("input", { name: "budget_tokens", type: "number", min: "0", value: v(key && key.budget && key.budget.tokens) });
    const period = h("select", { name: "budget_period" }, ["month", "day", "total"].map((p) => h("option", { value: p, selected: key && key.budget && key.budget.period === p }, p)));
    const expires = h("input", { name: "expires_at", type: "datetime-local", value: key && key.expires_at ? key.expires_at.slice(0, 16) : "" });
    const team = h("select", { name: "team" }, h("option", { value: "" }, "no team"),
      teams.map((t) => h("option", { value: t.name, selected: key && key.team === t.name }, t.name)));
    const metadata = h("textarea", { name: "metadata", rows: "2" }, key ? JSON.stringify(key.metadata) : "{}");
    const error = h("p", { class: "bad" });
    const form = h("form", {
      class: "panel form", id: "key-form",
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          const body = {
            models: models.value.split(",").map((m) => m.trim()).filter(Boolean),
            rpm: numberOrNull(rpm.value), rpd: numberOrNull(rpd.value), tpm: numberOrNull(tpm.value),
            budget: cost.value || tokens.value ? { cost: numberOrNull(cost.value), tokens: numberOrNull(tokens.value), period: period.value } : null,
            expires_at: expires.value ? new Date(expires.value).toISOString() : null,
            team: team.value || null,
            metadata: JSON.parse(metadata.value || "{}"),
          };
          if (!key) body.name = name.value.trim();
          const answer = key ? await send("PATCH", `api/keys/${encodeURIComponent(key.id)}`, body) : await send("POST", "api/keys", body);
          done(answer);
        } catch (e) { error.textContent = e.message; }
      },
    },
    h("h2", {}, key ? `Edit ${key.name}` : "New key"),
    h("div", { class: "fields" }, field("Name", name), field("Models (comma-separated, * for all)", models),
      field("Requests / minute", rpm), field("Requests / day", rpd), field("Tokens / minute", tpm),
      field("Budget (USD)", cost), field("Budget (tokens)", tokens), field("Budget period", period),
      field("Expires", expires), field("Team", team), field("Metadata (JSON)", metadata)),
    h("div", { class: "actions" }, h("button", { type: "submit", id: "save-key" }, key ? "Save" : "Create key"),
      h("button", { type: "button", class: "small", onclick: () => done(null) }, "Cancel")), error);
    return form;
  }

  // Daily requests and cost of one key (or several: a team) from the stats rollups.
  async function usageChart(names, title) {
    const now = Date.now();
    const stats = await api(`api/stats?from=${now - 30 * 86400e3}&to=${now}`);
    const rows = ((stats.daily_by || {}).key || []).filter((r) => names.includes(r.name));
    const days = new Map();
    for (const r of rows) {
      const d = days.get(r.start_ms) || { requests: 0, cost: 0 };
      d.requests += r.requests || 0; d.cost += r.cost || 0; days.set(r.start_ms, d);
    }
    const sorted = [...days.entries()].sort((a, b) => a[0] - b[0]);
    if (!sorted.length) return h("div", { class: "empty" }, "No use in the last 30 days.");
    const max = Math.max(...sorted.map(([, d]) => d.requests), 1);
    return h("div", { class: "panel usage", id: "usage-chart" }, h("h2", {}, title),
      h("div", { class: "days" }, sorted.map(([day, d]) => h("div", { class: "day", title: `${new Date(day).toISOString().slice(0, 10)}: ${fmt.int(d.requests)} requests, ${fmt.usd(d.cost)}` },
        h("span", { style: `height:${Math.max(2, Math.round((d.requests / max) * 100))}%` })))),
      h("small", { class: "muted" }, `${fmt.int(sorted.reduce((s, [, d]) => s + d.requests, 0))} requests, ${fmt.usd(sorted.reduce((s, [, d]) => s + d.cost, 0))} over ${sorted.length} day(s)`));
  }

  async function renderKeys(path) {
    const id = path.split("/")[1];
    const [keys, teams] = await Promise.all([api("api/keys"), api("api/teams")]);
    const list = keys.data;
    const top = h("div", { id: "keys-top" });
    const rerender = () => renderKeys("keys");
    const shown = (panel) => top.replaceChildren(panel);
    const actions = (k) => (!isAdmin() || k.read_only || k.state === "revoked") ? h("span", { class: "muted" }, k.read_only ? "config file" : "") :
      h("span", { class: "row-actions" },
        h("button", { class: "small", onclick: (e) => { e.stopPropagation(); shown(keyForm(k, teams.data, (a) => (a ? rerender() : top.replaceChildren()))); } }, "Edit"),
        h("button", { class: "small", onclick: async (e) => {
          e.stopPropagation();
          const grace = prompt("Keep the old secret working for (e.g. 10m, 0s):", "10m");
          if (grace === null) return;
          try { const a = await send("POST", `api/keys/${encodeURIComponent(k.id)}/rotate`, { grace }); await rerender(); document.getElementById("keys-top").replaceChildren(secretPanel(k.name, a.key)); }
          catch (err) { showError(err.message); }
        } }, "Rotate"),
        h("button", { class: "small danger", onclick: async (e) => {
          e.stopPropagation();
          if (!confirm(`Revoke ${k.name}? It is refused from now on.`)) return;
          try { await send("DELETE", `api/keys/${encodeURIComponent(k.id)}`); await rerender(); } catch (err) { showError(err.message); }
        } }, "Revoke"));
    const createButton = isAdmin() ? h("button", { id: "new-key", onclick: () => shown(keyForm(undefined, teams.data, async (a) => {
      if (!a) { top.replaceChildren(); return; }
      await rerender();
      document.getElementById("keys-top").replaceChildren(secretPanel(a.name, a.key));
    })) }, "New key") : null;
    const selected = id ? list.find((k) => k.id === decodeURIComponent(id)) : null;
    render(
      h("div", { class: "section-head" }, h("h1", {}, "Keys"), createButton),
      top,
      list.length ? h("div", { class: "scroll" }, table([
        { label: "Name", value: (k) => k.name },
        { label: "Key", mono: true, value: (k) => k.prefix },
        { label: "State", value: (k) => h("span", { class: `state ${k.state}` }, k.state) },
        { label: "Team", value: (k) => k.team || "—" },
        { label: "Limits", value: limitsText },
        { label: "Budget", value: (k) => budgetBar(k.budget, k.usage) },
        { label: "Today", num: true, value: (k) => (k.usage ? `${fmt.int(k.usage.day.requests)} · ${fmt.usd(k.usage.day.cost)}` : "—") },
        { label: "", value: actions },
      ], list, (k) => { location.hash = `#/keys/${encodeURIComponent(k.id)}`; })) : h("div", { class: "empty" }, "No keys yet."),
      selected ? await usageChart([selected.name], `${selected.name}: requests and cost per day`) : null,
    );
  }

  function teamForm(team, done) {
    const v = (x) => (x === null || x === undefined ? "" : String(x));
    const name = h("input", { name: "name", value: team ? team.name : "", required: true, disabled: !!team });
    const rpm = h("input", { name: "rpm", type: "number", min: "0", value: v(team && team.rpm) });
    const rpd = h("input", { name: "rpd", type: "number", min: "0", value: v(team && team.rpd) });
    const tpm = h("input", { name: "tpm", type: "number", min: "0", value: v(team && team.tpm) });
    const cost = h("input", { name: "budget_cost", type: "number", min: "0", step: "any", value: v(team && team.budget && team.budget.cost) });
    const tokens = h("input", { name: "budget_tokens", type: "number", min: "0", value: v(team && team.budget && team.budget.tokens) });
    const period = h("select", { name: "budget_period" }, ["month", "day", "total"].map((p) => h("option", { value: p, selected: team && team.budget && team.budget.period === p }, p)));
    const error = h("p", { class: "bad" });
    return h("form", {
      class: "panel form", id: "team-form",
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          const body = {
            rpm: numberOrNull(rpm.value), rpd: numberOrNull(rpd.value), tpm: numberOrNull(tpm.value),
            budget: cost.value || tokens.value ? { cost: numberOrNull(cost.value), tokens: numberOrNull(tokens.value), period: period.value } : null,
          };
          if (!team) body.name = name.value.trim();
          done(team ? await send("PATCH", `api/teams/${encodeURIComponent(team.name)}`, body) : await send("POST", "api/teams", body));
        } catch (e) { error.textContent = e.message; }
      },
    }, h("h2", {}, team ? `Edit ${team.name}` : "New team"),
    h("div", { class: "fields" }, field("Name", name), field("Requests / minute", rpm), field("Requests / day", rpd),
      field("Tokens / minute", tpm), field("Budget (USD)", cost), field("Budget (tokens)", tokens), field("Budget period", period)),
    h("div", { class: "actions" }, h("button", { type: "submit" }, team ? "Save" : "Create team"),
      h("button", { type: "button", class: "small", onclick: () => done(null) }, "Cancel")), error);
  }

  async function renderTeams(path) {
    const name = path.split("/")[1];
    const teams = (await api("api/teams")).data;
    const top = h("div", { id: "teams-top" });
    const rerender = () => renderTeams("teams");
    const actions = (t) => isAdmin() ? h("span", { class: "row-actions" },
      h("button", { class: "small", onclick: (e) => { e.stopPropagation(); top.replaceChildren(teamForm(t, (a) => (a ? rerender() : top.replaceChildren()))); } }, "Edit"),
      h("button", { class: "small danger", onclick: async (e) => {
        e.stopPropagation();
        if (!confirm(`Delete team ${t.name}?`)) return;
        try { await send("DELETE", `api/teams/${encodeURIComponent(t.name)}`); await rerender(); } catch (err) { showError(err.message); }
      } }, "Delete")) : null;
    const selected = name ? teams.find((t) => t.name === decodeURIComponent(name)) : null;
    render(
      h("div", { class: "section-head" }, h("h1", {}, "Teams"),
        isAdmin() ? h("button", { id: "new-team", onclick: () => top.replaceChildren(teamForm(undefined, (a) => (a ? rerender() : top.replaceChildren()))) }, "New team") : null),
      top,
      teams.length ? h("div", { class: "scroll" }, table([
        { label: "Name", value: (t) => t.name },
        { label: "Keys", value: (t) => t.keys.join(", ") || "—" },
        { label: "Limits", value: limitsText },
        { label: "Budget", value: (t) => budgetBar(t.budget, t.usage) },
        { label: "Today", num: true, value: (t) => `${fmt.int(t.usage.day.requests)} · ${fmt.usd(t.usage.day.cost)}` },
        { label: "", value: actions },
      ], teams, (t) => { location.hash = `#/teams/${encodeURIComponent(t.name)}`; })) : h("div", { class: "empty" }, "No teams yet."),
      selected ? await usageChart(selected.keys, `${selected.name}: requests and cost per day (its keys)`) : null,
    );
  }

  async function renderAudit() {
    const entries = (await api("api/audit?limit=200")).data;
    render(h("h1", {}, "Audit log"),
      entries.length ? h("div", { class: "scroll" }, table([
        { label: "Time", value: (e) => fmt.time(e.ts) },
        { label: "Who", value: (e) => e.actor },
        { label: "From", mono: true, value: (e) => e.address },
        { label: "Action", value: (e) => e.action },
        { label: "Target", mono: true, value: (e) => e.target },
        { label: "Changes", mono: true, value: (e) => JSON.stringify(e.changes) },
      ], entries)) : h("div", { class: "empty", id: "audit-empty" }, "No changes yet."));
    document.querySelector("main table") && document.querySelector("main table").setAttribute("id", "audit");
  }

  // Admin accounts: the admins' alone (a viewer is told so).
  async function renderAdmins() {
    if (!isAdmin()) {
      render(h("h1", {}, "Admin accounts"), h("div", { class: "empty" }, "Admin accounts are managed by admins."));
      return;
    }
    const admins = (await api("api/admins")).data;
    const rerender = () => renderAdmins();
    const name = h("input", { name: "admin_name", required: true, autocomplete: "off" });
    const password = h("input", { name: "admin_password", type: "password", required: true, minlength: "8", autocomplete: "new-password" });
    const roleSelect = h("select", { name: "admin_role" }, h("option", { value: "viewer" }, "viewer"), h("option", { value: "admin" }, "admin"));
    const error = h("p", { class: "bad" });
    const form = h("form", {
      class: "panel form", id: "admin-form",
      onsubmit: async (event) => {
        event.preventDefault();
        try { await send("POST", "api/admins", { name: name.value.trim(), password: password.value, role: roleSelect.value }); await rerender(); }
        catch (e) { error.textContent = e.message; }
      },
    }, h("h2", {}, "New account"),
    h("div", { class: "fields" }, field("Name", name), field("Password (8 or more characters)", password), field("Role", roleSelect)),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Create account")), error);
    const act = (label, method, path, body, question) => h("button", { class: `small${method === "DELETE" ? " danger" : ""}`, onclick: async () => {
      if (question && !confirm(question)) return;
      try { await send(method, path, body); await rerender(); } catch (err) { showError(err.message); }
    } }, label);
    render(h("h1", {}, "Admin accounts"), form,
      admins.length ? h("div", { class: "scroll" }, table([
        { label: "Name", value: (a) => a.name },
        { label: "Role", value: (a) => a.role },
        { label: "Enabled", value: (a) => (a.enabled ? "yes" : "no") },
        { label: "Created", value: (a) => a.created_at },
        { label: "", value: (a) => h("span", { class: "row-actions" },
          act("End sessions", "POST", `api/admins/${encodeURIComponent(a.name)}/revoke-sessions`),
          act(a.enabled ? "Disable" : "Enable", "PATCH", `api/admins/${encodeURIComponent(a.name)}`, { enabled: !a.enabled }),
          act("Delete", "DELETE", `api/admins/${encodeURIComponent(a.name)}`, undefined, `Delete ${a.name}?`)) },
      ], admins)) : h("div", { class: "empty" }, "No admin accounts: the admin key is the only way in."));
  }

  // Registered with app.js's router (`sluice.addView`): `#/keys/ID` and `#/teams/NAME` open one.
  const one = (name) => (rest) => (rest ? `${name}/${rest}` : name);
  sluice.addView({ name: "keys", label: "Keys", render: (params, rest) => renderKeys(one("keys")(rest)) });
  sluice.addView({ name: "teams", label: "Teams", render: (params, rest) => renderTeams(one("teams")(rest)) });
  sluice.addView({ name: "audit", label: "Audit", render: () => renderAudit() });
  sluice.addView({ name: "admins", label: "Admins", render: () => renderAdmins() });
})();
