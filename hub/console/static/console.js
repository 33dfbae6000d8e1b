// The cowork console's one script. It calls only the documented admin API
// (docs/openapi.json) under the console session; every change sends the
// session's CSRF token. Every value from the API is written as text
// (textContent), never as markup: names, labels and payloads are untrusted.
"use strict";

(function () {
  const body = document.body;
  const tenant = body.dataset.tenant || "default";
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";

  function fill(template, values) {
    return template.replace(/\{(\w+)\}/g, function (_, name) {
      if (name === "tenant") return encodeURIComponent(tenant);
      const value = values && values[name];
      return value === undefined || value === null ? "" : encodeURIComponent(String(value));
    });
  }

  async function api(method, path, payload) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    const init = { method: method, headers: headers, credentials: "same-origin" };
    if (payload !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(payload);
    }
    const response = await fetch(path, init);
    let data = null;
    if (response.status !== 204) {
      try { data = await response.json(); } catch (e) { data = null; }
    }
    if (response.status === 401) {
      window.location.assign("/console/login");
    }
    return { ok: response.ok, status: response.status, data: data };
  }

  function say(text, isError) {
    const status = document.getElementById("status");
    if (!status) return;
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function problem(result) {
    const error = result.data && result.data.error;
    return error ? error.code + ": " + error.message : "HTTP " + result.status;
  }

  function pick(row, field) {
    return field.split(".").reduce(function (v, k) { return v == null ? v : v[k]; }, row);
  }

  function formatted(value, format) {
    if (value === null || value === undefined || value === "") return "";
    if (format === "time") {
      const d = new Date(value);
      return isNaN(d.getTime()) ? String(value) : d.toLocaleString();
    }
    if (format === "url") return window.location.origin + String(value);
    if (format === "yesno") return value ? "yes" : "no";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  // --- tables: <table data-source> with <th data-field> / <th data-actions> ---------
  function actionSpecs(text) {
    return text.split(";").filter(Boolean).map(function (part) {
      const eq = part.indexOf("=");
      const rest = part.slice(eq + 1).trim().split(" ");
      return {
        label: part.slice(0, eq).trim(),
        method: rest[0],
        path: rest[1],
        payload: rest.length > 2 ? JSON.parse(rest.slice(2).join(" ")) : undefined,
      };
    });
  }

  function renderRows(table, rows) {
    const heads = Array.from(table.querySelectorAll("thead th"));
    const tbody = table.querySelector("tbody");
    const readOnly = body.dataset.role !== "admin";
    tbody.replaceChildren();
    if (!rows.length) {
      const tr = tbody.insertRow();
      const td = tr.insertCell();
      td.colSpan = heads.length;
      td.textContent = table.dataset.filtered ? "Nothing matches the filters." : "Nothing yet.";
      return;
    }
    rows.forEach(function (row) {
      const tr = tbody.insertRow();
      const key = table.dataset.key ? pick(row, table.dataset.key) : null;
      if (key !== null && key !== undefined) tr.dataset.key = String(key);
      heads.forEach(function (th) {
        const td = tr.insertCell();
        if (th.dataset.actions) {
          actionSpecs(th.dataset.actions).forEach(function (spec) {
            if (readOnly && spec.method !== "GET") return;
            const button = document.createElement("button");
            button.type = "button";
            button.textContent = spec.label;
            button.setAttribute("aria-label", spec.label + " " + (key === null ? "" : key));
            button.addEventListener("click", async function () {
              const result = await api(spec.method, fill(spec.path, row), spec.payload);
              const out = document.getElementById("action-output");
              if (out) out.textContent = result.data ? JSON.stringify(result.data, null, 2) : "";
              say(result.ok ? spec.label + ": done" : spec.label + " failed: " + problem(result), !result.ok);
              if (spec.method !== "GET") refreshTable(table);
            });
            td.appendChild(button);
          });
          return;
        }
        const value = formatted(pick(row, th.dataset.field), th.dataset.format);
        if (th.dataset.format === "state") {
          const span = document.createElement("span");
          span.className = "state state-" + value.replace(/[^a-z_]/g, "");
          span.textContent = value;
          td.appendChild(span);
        } else if (th.dataset.format === "pre") {
          const pre = document.createElement("pre");
          pre.textContent = value;
          td.appendChild(pre);
        } else {
          td.textContent = value;
        }
      });
    });
  }

  // A paged list (nextCursor) shows one page at a time; refreshes keep the page shown.
  function pagedSource(table) {
    const base = fill(table.dataset.source, {});
    const cursor = table.dataset.cursor;
    if (!cursor) return base;
    return base + (base.includes("?") ? "&" : "?") + "cursor=" + encodeURIComponent(cursor);
  }

  function showPager(table, next) {
    const pager = document.getElementById(table.id + "-pager");
    if (!pager) return;
    table.dataset.next = next || "";
    pager.hidden = !next && !table.dataset.cursor;
    pager.querySelector("[data-page=next]").disabled = !next;
    pager.querySelector("[data-page=first]").disabled = !table.dataset.cursor;
  }

  function turnPage(table, cursor) {
    if (cursor) table.dataset.cursor = cursor;
    else delete table.dataset.cursor;
    refreshTable(table);
  }

  async function refreshTable(table) {
    const result = await api("GET", pagedSource(table));
    if (!result.ok) {
      say("Could not load: " + problem(result), true);
      return null;
    }
    const rows = result.data[table.dataset.items || "items"] || [];
    renderRows(table, rows);
    showPager(table, result.data.nextCursor);
    table.dispatchEvent(new CustomEvent("cowork:loaded", { detail: result.data }));
    return result.data;
  }

  function watchTables() {
    document.querySelectorAll("table[data-source]").forEach(function (table) {
      const pager = document.getElementById(table.id + "-pager");
      if (pager) {
        pager.querySelector("[data-page=next]").addEventListener("click", function () {
          turnPage(table, table.dataset.next);
        });
        pager.querySelector("[data-page=first]").addEventListener("click", function () {
          turnPage(table, null);
        });
      }
      refreshTable(table);
      const every = Number(table.dataset.refresh || 0);
      if (every) setInterval(function () { refreshTable(table); }, every * 1000);
    });
    // <form data-query-for="table-id">: its non-empty fields become the table's query
    document.querySelectorAll("form[data-query-for]").forEach(function (form) {
      const table = document.getElementById(form.dataset.queryFor);
      const base = table.dataset.source;
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        const query = new URLSearchParams();
        Array.from(form.elements).forEach(function (el) {
          if (el.name && el.value.trim()) query.set(el.name, el.value.trim());
        });
        const extra = query.toString();
        table.dataset.source = base + (extra ? (base.includes("?") ? "&" : "?") + extra : "");
        table.dataset.filtered = extra ? "yes" : "";
        turnPage(table, null); // new filters: from the first page
      });
    });
  }

  // --- forms: <form data-api="METHOD /path/{name}"> -----------------------------------
  function setPath(target, name, value) {
    const parts = name.split(".");
    let node = target;
    parts.slice(0, -1).forEach(function (p) { node = node[p] = node[p] || {}; });
    node[parts[parts.length - 1]] = value;
  }

  function formValue(el) {
    const type = el.dataset.type;
    if (el.type === "checkbox") return el.checked;
    const raw = el.value.trim();
    if (type === "list") return raw ? raw.split(",").map(function (s) { return s.trim(); }).filter(Boolean) : [];
    if (type === "int") return raw === "" ? undefined : Number(raw);
    if (type === "bool") return raw === "" ? undefined : raw === "true";
    return raw;
  }

  function formPayload(form) {
    const payload = {};
    const pathValues = {};
    Array.from(form.elements).forEach(function (el) {
      if (!el.name || el.disabled) return;
      const value = formValue(el);
      if (el.dataset.path) { pathValues[el.name] = value; return; }
      if (value === undefined || (el.dataset.optional && (value === "" || (Array.isArray(value) && !value.length)))) return;
      if (value === "" && !el.required) return;
      setPath(payload, el.name, value);
    });
    return { payload: payload, pathValues: pathValues };
  }

  function wireForms() {
    document.querySelectorAll("form[data-api]").forEach(function (form) {
      form.addEventListener("submit", async function (event) {
        event.preventDefault();
        const spec = form.dataset.api.split(" ");
        const built = formPayload(form);
        const extra = form._extend ? form._extend(built.payload) : built.payload;
        say("Working...");
        const result = await api(spec[0], fill(spec[1], built.pathValues), extra);
        const out = form.querySelector("output");
        if (out) out.textContent = result.ok ? "Saved." : problem(result);
        say(result.ok ? "Done." : "Refused: " + problem(result), !result.ok);
        if (result.ok) form.dispatchEvent(new CustomEvent("cowork:done", { detail: result.data }));
        document.querySelectorAll("table[data-source]").forEach(refreshTable);
      });
    });
  }

  // --- pages ---------------------------------------------------------------------------
  function show(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function pageDesktops() {
    const form = document.getElementById("pair-form");
    if (!form) return;
    let watching = null;
    form.addEventListener("cowork:done", function (event) {
      const created = event.detail;
      document.getElementById("pair-result").hidden = false;
      show("pair-code", created.code);
      show("pair-expires", formatted(created.expiresAt, "time"));
      show("pair-command", created.command);
      show("pair-link-command", "cowork desktop pair '" + created.pairingLink + "'");
      document.getElementById("pair-qr").src = created.pairingQrSvg;
      show("pair-status", "waiting for the Desktop...");
      if (watching) clearInterval(watching);
      watching = setInterval(async function () {
        const result = await api("GET", fill("/api/v1/tenants/{tenant}/pairings/{id}", { id: created.pairingId }));
        if (!result.ok) return;
        const p = result.data;
        const text = p.online ? "online" : p.status === "revoked" ? "revoked" : p.redeemed ? "paired, " + p.status : "waiting for the Desktop...";
        show("pair-status", text);
        if (p.status === "revoked") clearInterval(watching);
      }, 1000);
    });
  }

  function pageGateways() {
    const form = document.getElementById("gateway-form");
    if (!form) return;
    form.addEventListener("cowork:done", function (event) {
      const created = event.detail;
      document.getElementById("gateway-result").hidden = false;
      show("gw-credential", created.credential);
      show("gw-commands", [
        "umask 077; cat > gateway.credential   # paste the credential above, then Ctrl-D",
        "cowork gateway register --hub " + (body.dataset.natsUrl || "nats://HUB:4222") + " --credential-file gateway.credential --opencode http://127.0.0.1:4096",
        "cowork gateway run --opencode http://127.0.0.1:4096",
      ].join("\n"));
      const timer = setInterval(async function () {
        const result = await api("GET", fill("/api/v1/tenants/{tenant}/gateway-registrations/{id}", { id: created.registrationId }));
        if (!result.ok) return;
        if (result.data.lastHeartbeatAt) {
          show("gw-status", "first heartbeat at " + formatted(result.data.lastHeartbeatAt, "time") + " (" + result.data.status + ")");
          clearInterval(timer);
        }
      }, 2000);
    });
  }

  function schemaFields(fieldset, schema, prefix) {
    fieldset.querySelectorAll(".field").forEach(function (el) { el.remove(); });
    const props = (schema && schema.properties) || {};
    const required = (schema && schema.required) || [];
    Object.keys(props).forEach(function (name) {
      const prop = props[name];
      const wrap = document.createElement("div");
      wrap.className = "field";
      const id = "ch-" + prefix + "-" + name;
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = (prop.title || name) + (required.includes(name) ? " (required)" : "");
      const input = document.createElement("input");
      input.id = id;
      input.name = prefix + "." + name;
      input.required = required.includes(name);
      if (prefix === "secrets") input.type = "password";
      const types = [prop.type].concat((prop.anyOf || []).map(function (t) { return t.type; }));
      if (types.includes("boolean")) { input.type = "checkbox"; }
      else if (types.includes("integer") || types.includes("number")) { input.type = "number"; input.dataset.type = "int"; }
      else if (types.includes("array")) { input.dataset.type = "list"; }
      if (prop.default !== undefined && prop.default !== null && input.type !== "checkbox") input.value = String(prop.default);
      if (prop.default === true) input.checked = true;
      if (!input.required) input.dataset.optional = "true";
      wrap.appendChild(label);
      wrap.appendChild(input);
      fieldset.appendChild(wrap);
    });
  }

  async function pageChannels() {
    const form = document.getElementById("channel-form");
    if (!form) return;
    const select = document.getElementById("ch-kind");
    const result = await api("GET", "/api/v1/channel-kinds");
    if (!result.ok) { say("Could not load the channel kinds: " + problem(result), true); return; }
    const kinds = {};
    result.data.items.forEach(function (k) {
      kinds[k.kind] = k;
      const option = document.createElement("option");
      option.value = k.kind;
      option.textContent = k.kind;
      select.appendChild(option);
    });
    function build() {
      const k = kinds[select.value];
      schemaFields(document.getElementById("ch-settings"), k && k.settingsSchema, "settings");
      schemaFields(document.getElementById("ch-secrets"), k && k.secretsSchema, "secrets");
    }
    select.addEventListener("change", build);
    build();
    await pairingOptions("ch-pairings");
    form._extend = function (payload) {
      payload.settings = payload.settings || {};
      payload.secrets = payload.secrets || {};
      return payload;
    };
    form.addEventListener("cowork:done", function (event) {
      document.getElementById("channel-result").hidden = false;
      show("ch-webhook", window.location.origin + event.detail.webhookPath);
    });
    const instances = document.getElementById("channels-table");
    instances.addEventListener("cowork:loaded", function (event) {
      const list = document.getElementById("ch-instances");
      list.replaceChildren();
      event.detail.items.forEach(function (i) {
        const option = document.createElement("option");
        option.value = i.instanceId;
        option.label = i.displayName || i.kind;
        list.appendChild(option);
      });
    });
    const test = document.getElementById("test-form");
    test.addEventListener("cowork:done", function (event) {
      const instance = test.elements.instanceId.value.trim();
      const path = fill("/api/v1/tenants/{tenant}/channel-instances/{i}/deliveries/{d}", { i: instance, d: event.detail.deliveryId });
      show("test-status", "queued");
      const timer = setInterval(async function () {
        const result = await api("GET", path);
        if (!result.ok) return;
        show("test-status", result.data.status + (result.data.error ? ": " + result.data.error : ""));
        if (result.data.status !== "queued" && result.data.status !== "retrying") clearInterval(timer);
      }, 1000);
    });
    document.getElementById("claim-form").addEventListener("cowork:done", function (event) {
      show("claim-code", "/claim " + event.detail.code);
    });
  }

  function pageChannelUsers() {
    const form = document.getElementById("users-form");
    const table = document.getElementById("users-table");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      const instance = form.elements.instanceId.value.trim();
      table.dataset.source = fill("/api/v1/tenants/{tenant}/channel-instances/{i}/users", { i: instance });
      refreshTable(table);
    });
  }

  function pageHealth() {
    const table = document.getElementById("health-table");
    table.addEventListener("cowork:loaded", function (event) {
      const overall = document.getElementById("overall");
      overall.textContent = event.detail.state;
      overall.className = "state state-" + event.detail.state;
      show("checked-at", "checked " + formatted(event.detail.checkedAt, "time"));
    });
  }

  async function pageHome() {
    function mark(name, done, text) {
      const li = document.querySelector('[data-check="' + name + '"]');
      li.classList.toggle("done", done);
      li.querySelector(".check-state").textContent = text;
    }
    const health = await api("GET", "/api/v1/admin/health");
    if (health.ok) mark("health", health.data.state === "ready", health.data.state);
    const pairings = await api("GET", fill("/api/v1/tenants/{tenant}/pairings?online=true&limit=1"));
    if (pairings.ok) mark("desktop", pairings.data.items.length > 0, pairings.data.items.length ? "a Desktop is online" : "not yet");
    const gateways = await api("GET", fill("/api/v1/tenants/{tenant}/gateway-registrations?limit=1"));
    const online = await api("GET", fill("/api/v1/tenants/{tenant}/gateway-registrations?online=true&limit=1"));
    if (gateways.ok && online.ok) {
      const registered = gateways.data.items.length > 0;
      mark("gateway", registered, online.data.items.length ? "a Gateway is online"
        : registered ? "registered, none online" : "not yet");
    }
    const channels = await api("GET", fill("/api/v1/tenants/{tenant}/channel-instances"));
    if (channels.ok) mark("channel", channels.data.items.length > 0, channels.data.items.length ? "connected" : "not yet");
  }

  async function pairingOptions(listId) {
    const paired = await api("GET", fill("/api/v1/tenants/{tenant}/pairings?limit=200"));
    if (!paired.ok) return;
    const list = document.getElementById(listId);
    paired.data.items.filter(function (p) { return p.status !== "revoked"; }).forEach(function (p) {
      const option = document.createElement("option");
      option.value = p.id;
      option.label = p.label;
      list.appendChild(option);
    });
  }

  function pageEvents() {
    const form = document.getElementById("events-form");
    const list = document.getElementById("events-list");
    let source = null;
    pairingOptions("events-pairings");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (source) source.close();
      list.replaceChildren();
      const workspace = form.elements.workspace.value.trim();
      source = new EventSource(fill("/api/v1/tenants/{tenant}/workspaces/{w}/events", { w: workspace }));
      source.onmessage = function (message) {
        const li = document.createElement("li");
        const head = document.createElement("p");
        const pre = document.createElement("pre");
        try {
          const event = JSON.parse(message.data);
          head.textContent = "#" + event.sequence + " " + event.type + (event.sessionId ? " in " + event.sessionId : "") + " at " + formatted(event.occurredAt, "time");
          pre.textContent = JSON.stringify(event.payload, null, 2);
        } catch (e) {
          pre.textContent = message.data;
        }
        li.appendChild(head);
        li.appendChild(pre);
        list.prepend(li);
        while (list.children.length > 200) list.lastChild.remove();
      };
      source.onerror = function () { say("The live view is reconnecting...", true); };
      source.onopen = function () { say("Watching " + workspace + "."); };
    });
  }

  function pagePair() {
    const fields = new URLSearchParams(window.location.hash.slice(1));
    const code = fields.get("code");
    if (!code) return;
    const link = window.location.href;
    show("pair-command", "cowork desktop pair '" + link + "'\n\nor: cowork desktop pair " + code + " --hub " + (fields.get("hub") || ""));
  }

  const pages = {
    desktops: pageDesktops,
    gateways: pageGateways,
    channels: function () { pageChannelUsers(); pageChannels(); },
    health: pageHealth,
    home: pageHome,
    events: pageEvents,
    pair: pagePair,
  };

  document.addEventListener("DOMContentLoaded", function () {
    const page = pages[body.dataset.page];
    if (page) page();
    if (body.dataset.page !== "pair") {
      wireForms();
      watchTables();
    }
  });
})();
