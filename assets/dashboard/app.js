// presenced dashboard: one page, one WebSocket (/ws/admin), no framework and no build step.
// The contract it speaks is docs/ADMIN.md. Everything it inserts is set with textContent (never
// innerHTML with data), and styles go through classes or the CSSOM, because the page is served
// under a strict CSP (no inline script or style).
"use strict";

(() => {
  const TOKEN_KEY = "presenced.admin.token";
  const SERIES_POINTS_MAX = 900;        // 15 minutes at one sample a second
  const SERIES_SPAN_MS = 15 * 60 * 1000;
  const PAGE_LIMIT = 50;
  const FILTER_DEBOUNCE_MS = 250;
  const REQUERY_MIN_INTERVAL_MS = 1000; // live re-queries: at most one a second
  const QUERY_TIMEOUT_MS = 10000;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 10000;
  const STALE_INTERVALS = 4;            // no push for this many intervals: reconnect
  const HISTORY_EVENTS = 50;            // the timeline's length
  const HISTORY_MIN_INTERVAL_MS = 1000; // history re-fetches: at most one a second
  const HISTORY_SETTLE_MS = 300;        // let the history writer flush a change before asking
  const HISTORY_PERIODIC_MS = 30000;    // open panel: time online keeps growing
  const REPLAY_POINTS_MAX = 600;
  const REPLAY_AT_LIMIT = 100;
  const REPLAY_REFRESH_MIN_MS = 5000;
  const REPLAY_AT_DEBOUNCE_MS = 150;

  const $ = (sel) => document.querySelector(sel);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };

  // ---- formatting ------------------------------------------------------------------------------
  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const rateFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 });
  const fmtInt = (n) => (typeof n === "number" && isFinite(n) ? intFmt.format(n) : "—");
  const fmtRate = (n) => (typeof n === "number" && isFinite(n) ? rateFmt.format(n) : "—");
  const fmtMs = (us) => (typeof us === "number" && isFinite(us) ? (us / 1000).toFixed(2) + " ms" : "—");
  const fmtCompact = (n) => {
    if (typeof n !== "number" || !isFinite(n)) return "—";
    const a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (n / 1e3).toFixed(1) + "k";
    return intFmt.format(n);
  };
  const fmtDuration = (s) => {
    if (typeof s !== "number" || !isFinite(s) || s < 0) return "—";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), sec = s % 60;
    const p2 = (x) => String(x).padStart(2, "0");
    if (d > 0) return `${d}d ${p2(h)}h ${p2(m)}m`;
    if (h > 0) return `${h}h ${p2(m)}m ${p2(sec)}s`;
    if (m > 0) return `${m}m ${p2(sec)}s`;
    return `${sec}s`;
  };
  const fmtAgo = (ms) => {
    if (typeof ms !== "number" || !isFinite(ms)) return "—";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 5) return "just now";
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
    return `${Math.floor(s / 86400)}d ago`;
  };
  const fmtTime = (ms) => (typeof ms === "number" ? new Date(ms).toLocaleString() : "—");
  const STATUSES = new Set(["online", "away", "busy", "offline"]);
  const statusOf = (s) => (STATUSES.has(s) ? s : "offline");

  // ---- state -------------------------------------------------------------------------------------
  const state = {
    token: null,
    ws: null,
    authed: false,
    backoffMs: BACKOFF_MIN_MS,
    reconnectTimer: 0,
    staleTimer: 0,
    intervalMs: 1000,
    nextId: 1,
    pending: new Map(),       // query id -> {resolve, reject, timer}
    series: null,             // {t, online, connections, hps, dps, p50, p99} column arrays
    charts: [],
    page: {
      cursor: null,            // cursor of the page shown (null: the first)
      back: [],                // cursors of the pages before it
      next: null,              // next_cursor of the page shown
      gen: 0,                  // bumps on each query so stale replies are dropped
      rows: new Map(),         // user id -> <tr>
      lastQueryAt: 0,
      requeryTimer: 0,
      filterTimer: 0,
    },
    detail: { user: null, gen: 0, refreshTimer: 0 },
    // The open user's history: analytics and timeline.
    hist: { gen: 0, timer: 0, lastAt: 0 },
    serverOffsetMs: 0,        // server clock minus ours, from the samples it pushes
    historyOff: false,        // the server answered "history is off"
    replay: {
      windowMs: 15 * 60 * 1000,
      sampleMs: null,          // history.sample_interval_s in ms, learned from the server
      gen: 0,
      timer: 0,
      data: [[], []],          // uPlot columns: t (s), online (n | null)
      step: 0,                 // of the replay shown (ms)
      group: null,             // of the replay shown
      selected: null,          // the inspected instant (ms); null follows the latest point
      chart: null,
      atGen: 0,
      atTimer: 0,
      atShown: null,           // {t, group} of the list shown
    },
  };

  // ---- connection state and sign-in ---------------------------------------------------------------
  function setConnState(text, kind) {
    const s = $("#conn-state");
    s.textContent = text;
    s.className = "state state-" + kind;
    s.title = text;
  }

  function showSignIn(message) {
    $("#main").hidden = true;
    $("#sign-out").hidden = true;
    $("#facts").hidden = true;
    $("#signin").hidden = false;
    const msg = $("#signin-msg");
    msg.textContent = message || "";
    msg.hidden = !message;
    $("#token-input").focus();
  }

  function showMain() {
    $("#signin").hidden = true;
    $("#signin-msg").hidden = true;
    $("#main").hidden = false;
    $("#sign-out").hidden = false;
    $("#facts").hidden = false;
  }

  function tokenFromFragment() {
    if (!location.hash || location.hash.length < 2) return null;
    const params = new URLSearchParams(location.hash.slice(1));
    const t = params.get("token");
    if (t === null) return null;
    // Drop the token from the address bar (and from history) before anything else happens.
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    return t.trim() || null;
  }

  function signIn(token) {
    state.token = token;
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (_) { /* storage disabled */ }
    $("#token-input").value = "";
    showMain();
    state.backoffMs = BACKOFF_MIN_MS;
    connect();
  }

  function signOut(message, connText, connKind) {
    state.token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* storage disabled */ }
    disconnect();
    clearData();
    setConnState(connText || "signed out", connKind || "signed-out");
    showSignIn(message);
  }

  // ---- socket ------------------------------------------------------------------------------------
  function disconnect() {
    clearTimeout(state.reconnectTimer);
    clearTimeout(state.staleTimer);
    const ws = state.ws;
    state.ws = null;
    state.authed = false;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(1000); } catch (_) { /* already closed */ }
    }
    failPending("disconnected");
  }

  function connect() {
    disconnect();
    if (!state.token) return;
    setConnState("connecting", "connecting");
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(`${proto}//${location.host}/ws/admin`);
    } catch (e) {
      setConnState("error: " + e.message, "error");
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify({ op: "auth", token: state.token }));
      armStaleTimer();
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      armStaleTimer();
      onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      state.authed = false;
      clearTimeout(state.staleTimer);
      failPending("connection closed");
      if (ev.code === 4001) {
        signOut("Invalid token: the server refused it (4001).", "error: invalid token", "error");
      } else if (ev.code === 4003) {
        signOut("Not an admin: the token has no admin role (4003).", "error: not an admin", "error");
      } else {
        setConnState("connecting", "connecting");
        scheduleReconnect();
      }
    };
    ws.onerror = () => { /* onclose follows and decides */ };
  }

  function scheduleReconnect() {
    clearTimeout(state.reconnectTimer);
    if (!state.token) return;
    const wait = state.backoffMs;
    state.backoffMs = Math.min(BACKOFF_MAX_MS, state.backoffMs * 2);
    state.reconnectTimer = setTimeout(connect, wait);
  }

  // A socket that stops receiving pushes is dead even if TCP has not noticed yet.
  function armStaleTimer() {
    clearTimeout(state.staleTimer);
    const ws = state.ws;
    state.staleTimer = setTimeout(() => {
      if (state.ws !== ws || !ws) return;
      setConnState("connecting", "connecting");
      try { ws.close(4000); } catch (_) { /* ignore */ }
      // close() fires onclose asynchronously, which reconnects.
    }, Math.max(5000, state.intervalMs * STALE_INTERVALS));
  }

  function send(obj) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(JSON.stringify(obj));
    return true;
  }

  // A request over the socket; resolves with {status, body}.
  function query(path, method) {
    return new Promise((resolve, reject) => {
      if (!state.authed) { reject(new Error("not connected")); return; }
      const id = state.nextId++;
      const msg = { op: "query", id, path };
      if (method && method !== "GET") msg.method = method;
      const timer = setTimeout(() => {
        state.pending.delete(id);
        reject(new Error("no reply in time"));
      }, QUERY_TIMEOUT_MS);
      state.pending.set(id, { resolve, reject, timer });
      if (!send(msg)) {
        clearTimeout(timer);
        state.pending.delete(id);
        reject(new Error("not connected"));
      }
    });
  }

  function failPending(why) {
    for (const [, p] of state.pending) {
      clearTimeout(p.timer);
      p.reject(new Error(why));
    }
    state.pending.clear();
  }

  function onMessage(msg) {
    switch (msg.type) {
      case "hello": return onHello(msg);
      case "stats": return onStats(msg);
      case "changes": return onChanges(msg);
      case "reply": {
        const p = state.pending.get(msg.id);
        if (!p) return;
        state.pending.delete(msg.id);
        clearTimeout(p.timer);
        p.resolve({ status: msg.status, body: msg.body });
        return;
      }
      default: return; // unknown types are ignored: the feed may grow
    }
  }

  // ---- hello / stats -------------------------------------------------------------------------------
  function onHello(msg) {
    state.authed = true;
    state.backoffMs = BACKOFF_MIN_MS;
    if (typeof msg.interval_ms === "number" && msg.interval_ms > 0) state.intervalMs = msg.interval_ms;
    armStaleTimer();
    setConnState("live", "live");
    $("#meta-version").textContent = msg.version ? "v" + msg.version : "";
    $("#meta-shards").textContent = fmtInt(msg.shards);
    $("#meta-admin").textContent = msg.admin || "—";
    seedSeries(Array.isArray(msg.series) ? msg.series : []);
    noteServerTime(lastSample(msg.series));
    ensureCharts();
    redrawCharts();
    const last = state.series.t.length ? lastSample(msg.series) : null;
    if (last) {
      setText("#online-count", fmtInt(last.online));
      setText("#conn-count", fmtInt(last.connections));
      setText("#handshake-rate", fmtRate(last.handshakes_per_s));
      setText("#delivery-rate", fmtRate(last.deliveries_per_s));
    }
    // The server may have restarted with history turned on or off, or sampling differently.
    state.historyOff = false;
    state.replay.sampleMs = null;
    runPageQuery();
    if (state.detail.user) { loadDetail(); loadHistory(); }
    loadReplay();
  }

  // Replay windows are in the server's time: its clock is what the samples carry.
  function noteServerTime(sample) {
    if (sample && typeof sample.t === "number" && isFinite(sample.t)) state.serverOffsetMs = sample.t - Date.now();
  }
  const serverNow = () => Date.now() + state.serverOffsetMs;

  const lastSample = (series) => (series && series.length ? series[series.length - 1] : null);
  const setText = (sel, text) => { $(sel).textContent = text; };

  function onStats(msg) {
    if (!state.authed) return;
    setConnState("live", "live");
    const totals = msg.totals || {};
    const rates = msg.rates || {};
    // "Now" is the recent window when the server sends one; the since-start figures go in the
    // tooltip. No sample at all reads as "—", not as 0 ms.
    const lat = msg.latency_recent_us || msg.latency_us || {};
    const total = msg.latency_us || {};
    setText("#online-count", fmtInt(totals.online_users));
    setText("#conn-count", fmtInt(totals.connections));
    setText("#handshake-rate", fmtRate(rates.handshakes_per_s));
    setText("#delivery-rate", fmtRate(rates.deliveries_per_s));
    const noLat = lat.count === 0;
    setText("#latency-p50", noLat ? "—" : fmtMs(lat.p50));
    setText("#latency-p99", noLat ? "—" : fmtMs(lat.p99));
    $("#latency-p50").title = `since start: p50 ${fmtMs(total.p50)}, p90 ${fmtMs(total.p90)} (${fmtInt(total.count)} samples)`;
    $("#latency-p99").title = `since start: p99 ${fmtMs(total.p99)}, p99.9 ${fmtMs(total.p999)}, max ${fmtMs(total.max)}`;
    setText("#meta-uptime", fmtDuration(msg.uptime_s));
    if (msg.version) setText("#meta-version", "v" + msg.version);
    if (typeof msg.shards === "number") setText("#meta-shards", fmtInt(msg.shards));
    renderShards(Array.isArray(msg.per_shard) ? msg.per_shard : []);
    const sample = msg.sample || {
      t: Date.now(), online: totals.online_users, connections: totals.connections,
      handshakes_per_s: rates.handshakes_per_s, deliveries_per_s: rates.deliveries_per_s,
      ops_per_s: rates.ops_per_s, p50_us: lat.p50, p99_us: lat.p99,
    };
    if (msg.sample) noteServerTime(msg.sample);
    appendSample(sample);
    redrawCharts();
  }

  function renderShards(shards) {
    const body = $("#shards tbody");
    const maxLoad = Math.max(1, ...shards.map((s) => s.connections || 0));
    const rows = shards.map((s) => {
      const tr = el("tr");
      tr.dataset.shard = String(s.shard);
      tr.append(
        el("td", "num mono", s.shard),
        el("td", "num mono", s.cpu === null || s.cpu === undefined ? "—" : s.cpu),
        el("td", "num", fmtInt(s.users)),
        el("td", "num", fmtInt(s.connections)),
        el("td", "num", fmtRate(s.deliveries_per_s)),
        el("td", "num", fmtCompact(s.mesh_in)),
        el("td", "num", fmtCompact(s.mesh_out)),
      );
      const bar = el("div", "bar");
      const fill = el("span");
      fill.style.width = (100 * (s.connections || 0) / maxLoad).toFixed(1) + "%";
      bar.title = `${fmtInt(s.connections)} connections`;
      bar.append(fill);
      const td = el("td");
      td.append(bar);
      tr.append(td);
      return tr;
    });
    body.replaceChildren(...rows);
  }

  // ---- time series + charts -------------------------------------------------------------------------
  function emptySeries() {
    return { t: [], online: [], connections: [], hps: [], dps: [], p50: [], p99: [] };
  }

  function seedSeries(points) {
    state.series = emptySeries();
    for (const p of points.slice(-SERIES_POINTS_MAX)) pushPoint(p);
  }

  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);

  function pushPoint(p) {
    const s = state.series;
    const tSec = num(p.t) !== null ? p.t / 1000 : Date.now() / 1000;
    s.t.push(tSec);
    s.online.push(num(p.online));
    s.connections.push(num(p.connections));
    s.hps.push(num(p.handshakes_per_s));
    s.dps.push(num(p.deliveries_per_s));
    s.p50.push(num(p.p50_us) === null ? null : p.p50_us / 1000);
    s.p99.push(num(p.p99_us) === null ? null : p.p99_us / 1000);
  }

  function appendSample(p) {
    if (!state.series) state.series = emptySeries();
    const s = state.series;
    const tSec = num(p.t) !== null ? p.t / 1000 : Date.now() / 1000;
    const lastT = s.t.length ? s.t[s.t.length - 1] : -Infinity;
    if (tSec < lastT) return;                 // out of order: ignore
    if (tSec === lastT) for (const k in s) s[k].pop(); // same sample again: replace it
    pushPoint(p);
    // Keep 15 minutes: both a point cap and a time window (samples may be sparse after a gap).
    const minT = tSec - SERIES_SPAN_MS / 1000;
    let drop = Math.max(0, s.t.length - SERIES_POINTS_MAX);
    while (drop < s.t.length && s.t[drop] < minT) drop++;
    if (drop > 0) for (const k in s) s[k].splice(0, drop);
  }

  const AXIS = {
    stroke: "#8b96a8",
    grid: { stroke: "rgba(39,48,65,0.9)", width: 1 },
    ticks: { stroke: "rgba(39,48,65,0.9)", width: 1 },
    font: "11px system-ui, sans-serif",
  };

  function series(label, color, fmt, fill) {
    return {
      label, stroke: color, width: 2, fill: fill || undefined,
      points: { show: false }, spanGaps: true,
      // Off the plot (no cursor) the legend shows the latest value instead of nothing.
      value: (u, v, si, idx) => {
        if (idx === null || idx === undefined) v = lastValue(u.data[si]);
        return v === null || v === undefined ? "—" : fmt(v);
      },
    };
  }

  function lastValue(col) {
    for (let i = (col ? col.length : 0) - 1; i >= 0; i--) if (col[i] !== null) return col[i];
    return null;
  }

  function chartSpecs() {
    // Read state.series at draw time: a new hello replaces it.
    const s = () => state.series;
    return [
      {
        sel: "#chart-online",
        data: () => [s().t, s().online, s().connections],
        series: [
          series("online users", "#3ecf72", fmtInt, "rgba(62,207,114,0.10)"),
          series("connections", "#5aa9ff", fmtInt),
        ],
        yFmt: (v) => fmtCompact(v),
      },
      {
        sel: "#chart-rates",
        data: () => [s().t, s().hps, s().dps],
        series: [
          series("handshakes/s", "#f2b134", fmtRate),
          series("deliveries/s", "#b18cff", fmtRate, "rgba(177,140,255,0.08)"),
        ],
        yFmt: (v) => fmtCompact(v),
      },
      {
        sel: "#chart-latency",
        data: () => [s().t, s().p50, s().p99],
        series: [
          series("p50", "#5aa9ff", (v) => v.toFixed(2) + " ms"),
          series("p99", "#f0524f", (v) => v.toFixed(2) + " ms"),
        ],
        yFmt: (v) => v.toFixed(v < 1 ? 2 : 1),
      },
    ];
  }

  function ensureCharts() {
    if (state.charts.length || typeof uPlot === "undefined") return;
    for (const spec of chartSpecs()) {
      const host = $(spec.sel);
      const width = Math.max(200, host.clientWidth);
      const opts = {
        width,
        height: chartHeight(host),
        cursor: { drag: { x: false, y: false } },
        legend: { live: true },
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.15)] } },
        axes: [
          { ...AXIS, space: 60 },
          { ...AXIS, size: 48, values: (u, vals) => vals.map(spec.yFmt) },
        ],
        series: [{
          value: (u, v, si, idx) => {
            if (idx === null || idx === undefined) v = lastValue(u.data[0]);
            return v ? new Date(v * 1000).toLocaleTimeString() : "—";
          },
        }, ...spec.series],
      };
      const chart = new uPlot(opts, spec.data(), host);
      state.charts.push({ chart, spec, host });
    }
    const ro = new ResizeObserver(() => {
      for (const c of state.charts) {
        const w = Math.max(200, c.host.clientWidth);
        if (w !== c.chart.width) c.chart.setSize({ width: w, height: chartHeight(c.host) });
      }
    });
    for (const c of state.charts) ro.observe(c.host);
  }

  // The plot's height; uPlot puts the legend under it, inside the host.
  const chartHeight = () => 180;

  function redrawCharts() {
    for (const c of state.charts) c.chart.setData(c.spec.data());
  }

  // ---- user list --------------------------------------------------------------------------------------
  const FILTERS = [
    ["q", "#filter-q"], ["group", "#filter-group"], ["role", "#filter-role"],
    ["region", "#filter-region"], ["device_type", "#filter-device-type"], ["status", "#filter-status"],
  ];

  function filterValues() {
    const out = {};
    for (const [name, sel] of FILTERS) {
      const v = $(sel).value.trim();
      if (v) out[name] = v;
    }
    return out;
  }

  function pagePath() {
    const params = new URLSearchParams(filterValues());
    params.set("limit", String(PAGE_LIMIT));
    if (state.page.cursor) params.set("cursor", state.page.cursor);
    return "/api/online?" + params.toString();
  }

  async function runPageQuery() {
    const page = state.page;
    clearTimeout(page.requeryTimer);
    page.requeryTimer = 0;
    if (!state.authed) return;
    const gen = ++page.gen;
    page.lastQueryAt = Date.now();
    let res;
    try {
      res = await query(pagePath());
    } catch (e) {
      if (gen === page.gen) showUsersError("User list: " + e.message);
      return;
    }
    if (gen !== page.gen) return; // a newer query is on its way
    if (res.status !== 200) {
      showUsersError(`User list: ${res.status} ${errorText(res.body)}`);
      return;
    }
    const body = res.body || {};
    const users = Array.isArray(body.users) ? body.users : [];
    if (users.length === 0 && page.back.length > 0) {
      // The page emptied (its users left): step back rather than show nothing.
      page.cursor = page.back.pop();
      runPageQuery();
      return;
    }
    showUsersError(null);
    page.next = body.next_cursor || null;
    renderUsers(users, body.total);
  }

  function errorText(body) {
    if (body && typeof body === "object") return body.message || body.error || JSON.stringify(body);
    return String(body);
  }

  function showUsersError(text) {
    const e = $("#users-error");
    e.textContent = text || "";
    e.hidden = !text;
  }

  function renderUsers(users, total) {
    const page = state.page;
    page.rows = new Map();
    const rows = users.map((u) => {
      const tr = userRow(u);
      page.rows.set(u.user, tr);
      return tr;
    });
    $("#users tbody").replaceChildren(...rows);
    $("#users-empty").hidden = rows.length > 0;
    setText("#users-total", fmtInt(typeof total === "number" ? total : users.length));
    $("#page-prev").disabled = page.back.length === 0;
    $("#page-next").disabled = !page.next;
    setText("#page-info", `page ${page.back.length + 1}`);
    markSelected();
  }

  function userRow(u) {
    const tr = el("tr");
    tr.dataset.user = u.user;
    tr.tabIndex = 0;
    const status = el("td");
    const cell = el("div", "status-cell");
    cell.append(el("span", "dot"), el("span", "status-name"), el("span", "status-text"));
    status.append(cell);
    const since = el("td", "since");
    tr.append(
      el("td", "user-id", u.user),
      status,
      el("td", "num devices"),
      chipsCell(u.device_types, "chip"),
      chipsCell(u.regions, "chip"),
      chipsCell(u.groups, "chip chip-group"),
      since,
    );
    patchRow(tr, u);
    return tr;
  }

  function chipsCell(list, cls) {
    const td = el("td");
    for (const v of Array.isArray(list) ? list : []) td.append(el("span", cls, v));
    if (!td.childNodes.length) td.append(el("span", "muted", "—"));
    return td;
  }

  // Presence fields that `changes` carries: status, text, devices, ts.
  function patchRow(tr, u) {
    const st = statusOf(u.status);
    const before = tr.dataset.status;
    tr.dataset.status = st;
    tr.querySelector(".dot").className = "dot dot-" + st;
    tr.querySelector(".status-name").textContent = st;
    const text = typeof u.text === "string" ? u.text : "";
    const t = tr.querySelector(".status-text");
    t.textContent = text ? "· " + text : "";
    t.title = text;
    tr.querySelector(".devices").textContent = fmtInt(u.devices);
    tr.dataset.devices = String(u.devices);
    const since = tr.querySelector(".since");
    if (typeof u.ts === "number") since.dataset.ts = String(u.ts);
    since.textContent = fmtAgo(Number(since.dataset.ts));
    since.title = fmtTime(Number(since.dataset.ts));
    if (before && before !== st) {
      tr.classList.remove("flash");
      void tr.offsetWidth; // restart the animation
      tr.classList.add("flash");
    }
  }

  function onChanges(msg) {
    const users = Array.isArray(msg.users) ? msg.users : [];
    const filters = filterValues();
    let requery = (msg.missed || 0) > 0;
    for (const u of users) {
      const tr = state.page.rows.get(u.user);
      if (!tr) { requery = true; continue; }
      const devicesBefore = tr.dataset.devices;
      patchRow(tr, u);
      // The row may no longer belong on this page, or a device came or went and with it
      // device types, regions or groups that `changes` does not carry.
      if (statusOf(u.status) === "offline" || (filters.status && filters.status !== u.status)
        || devicesBefore !== tr.dataset.devices) requery = true;
    }
    if (requery) scheduleRequery();
    if (state.detail.user && users.some((u) => u.user === state.detail.user)) {
      scheduleDetailRefresh();
      scheduleHistoryRefresh();
    }
  }

  function scheduleRequery() {
    const page = state.page;
    if (page.requeryTimer) return; // one already pending
    const wait = Math.max(0, page.lastQueryAt + REQUERY_MIN_INTERVAL_MS - Date.now());
    page.requeryTimer = setTimeout(runPageQuery, wait);
  }

  function onFilterInput() {
    const page = state.page;
    clearTimeout(page.filterTimer);
    page.filterTimer = setTimeout(() => {
      page.cursor = null;
      page.back = [];
      runPageQuery();
      onReplayScopeInput();
    }, FILTER_DEBOUNCE_MS);
  }

  function nextPage() {
    const page = state.page;
    if (!page.next) return;
    page.back.push(page.cursor);
    page.cursor = page.next;
    runPageQuery();
  }

  function prevPage() {
    const page = state.page;
    if (!page.back.length) return;
    page.cursor = page.back.pop();
    runPageQuery();
  }

  function refreshRelativeTimes() {
    for (const e of document.querySelectorAll("[data-ts]")) e.textContent = fmtAgo(Number(e.dataset.ts));
  }

  // ---- user detail ---------------------------------------------------------------------------------------
  function openDetail(user) {
    state.detail.user = user;
    $("#user-detail").hidden = false;
    $(".people").classList.add("with-detail");
    setText("#detail-user", user);
    $("#detail-dot").className = "dot";
    $("#sessions tbody").replaceChildren();
    $("#sessions-empty").hidden = true;
    setText("#detail-note", "");
    markSelected();
    loadDetail();
    clearHistory();
    loadHistory();
  }

  function closeDetail() {
    state.detail.user = null;
    state.detail.gen++;
    state.hist.gen++;
    clearTimeout(state.hist.timer);
    state.hist.timer = 0;
    $("#user-detail").hidden = true;
    $(".people").classList.remove("with-detail");
    markSelected();
  }

  function markSelected() {
    for (const [id, tr] of state.page.rows) tr.classList.toggle("selected", id === state.detail.user);
  }

  function scheduleDetailRefresh() {
    const d = state.detail;
    if (d.refreshTimer) return;
    d.refreshTimer = setTimeout(() => { d.refreshTimer = 0; loadDetail(); }, 200);
  }

  async function loadDetail() {
    const d = state.detail;
    const user = d.user;
    if (!user || !state.authed) return;
    const gen = ++d.gen;
    let res;
    try {
      res = await query("/api/users/" + encodeURIComponent(user));
    } catch (e) {
      if (gen === d.gen) detailError(e.message);
      return;
    }
    if (gen !== d.gen || d.user !== user) return;
    if (res.status === 404) { detailError("Unknown user: the server has not seen it since it started."); renderDetail(null); return; }
    if (res.status !== 200) { detailError(`${res.status} ${errorText(res.body)}`); return; }
    detailError(null);
    renderDetail(res.body || {});
  }

  function detailError(text) {
    const e = $("#detail-error");
    e.textContent = text || "";
    e.hidden = !text;
  }

  function renderDetail(u) {
    const sessions = u && Array.isArray(u.sessions) ? u.sessions : [];
    const st = statusOf(u && u.status);
    $("#detail-dot").className = "dot dot-" + st;
    setText("#detail-status", u ? st + (u.text ? " · " + u.text : "") : "—");
    setText("#detail-devices", u ? fmtInt(u.devices) : "—");
    const ts = $("#detail-ts");
    if (u && typeof u.ts === "number") { ts.dataset.ts = String(u.ts); ts.title = fmtTime(u.ts); ts.textContent = fmtAgo(u.ts); }
    else { delete ts.dataset.ts; ts.textContent = "—"; }
    // An online user is seen now; last_seen only means something once every session is gone.
    let seen = "—";
    if (u && sessions.length) seen = "now";
    else if (u && typeof u.last_seen === "number") seen = fmtTime(u.last_seen);
    setText("#detail-last-seen", seen);
    setText("#detail-shard", u && u.shard !== undefined ? String(u.shard) : "—");
    setText("#detail-observers", u ? fmtInt(u.observers || 0) : "—");
    $("#kick-user").disabled = sessions.length === 0;
    const rows = sessions.map((s) => {
      const tr = el("tr");
      tr.dataset.session = s.id;
      const connected = el("td", "since");
      if (typeof s.connected_at === "number") {
        connected.dataset.ts = String(s.connected_at);
        connected.title = fmtTime(s.connected_at);
        connected.textContent = fmtAgo(s.connected_at);
      } else connected.textContent = "—";
      const status = el("td");
      const cell = el("div", "status-cell");
      const sst = statusOf(s.status);
      cell.append(el("span", "dot dot-" + sst), el("span", "status-name", sst));
      status.append(cell);
      const kick = el("button", "btn btn-danger btn-small", "kick");
      kick.type = "button";
      kick.dataset.kickSession = s.id;
      kick.title = "Close this session with 4003";
      const act = el("td", "num");
      act.append(kick);
      tr.append(
        el("td", "mono", s.device || "—"),
        el("td", "", s.device_type || "—"),
        el("td", "", s.region || "—"),
        el("td", "mono", s.ip || "—"),
        connected,
        status,
        act,
      );
      tr.title = `session ${s.id}` + (Array.isArray(s.groups) && s.groups.length ? ` · groups: ${s.groups.join(", ")}` : "")
        + (Array.isArray(s.roles) && s.roles.length ? ` · roles: ${s.roles.join(", ")}` : "");
      return tr;
    });
    $("#sessions tbody").replaceChildren(...rows);
    $("#sessions thead").hidden = rows.length === 0;
    $("#sessions-empty").hidden = rows.length > 0 || !u;
  }

  async function kick(path, what) {
    if (!window.confirm(`Kick ${what}? Its connections are closed with 4003.`)) return;
    let res;
    try {
      res = await query(path, "POST");
    } catch (e) {
      toast("Kick failed: " + e.message, true);
      return;
    }
    if (res.status === 200) {
      const n = res.body && typeof res.body.kicked === "number" ? res.body.kicked : "?";
      toast(`Kicked ${what}: ${n} session${n === 1 ? "" : "s"} closed.`);
    } else {
      toast(`Kick failed: ${res.status} ${errorText(res.body)}`, true);
    }
    loadDetail();
  }

  // ---- history: shared bits -------------------------------------------------------------------------------
  const isHistoryOff = (res) => res.status === 503 &&
    ((res.body && res.body.error === "history_off") || /history is off/i.test(errorText(res.body)));

  // Time online as hours and minutes ("3h 05m", "12m", "<1m").
  const fmtHM = (ms) => {
    if (typeof ms !== "number" || !isFinite(ms) || ms < 0) return "—";
    const m = Math.floor(ms / 60000);
    if (m === 0) return ms > 0 ? "<1m" : "0m";
    const h = Math.floor(m / 60);
    return h > 0 ? `${h}h ${String(m % 60).padStart(2, "0")}m` : `${m}m`;
  };
  const CLOCK = { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" };
  // A wall-clock time: "14:03:21" today, "Nov 27 23:58" before.
  const fmtClock = (ms) => {
    if (typeof ms !== "number" || !isFinite(ms)) return "—";
    const d = new Date(ms);
    const time = d.toLocaleTimeString("en-GB", CLOCK);
    if (d.toDateString() === new Date().toDateString()) return time;
    return d.toLocaleDateString("en-US", { month: "short", day: "numeric" }) + " " + time.slice(0, 5);
  };

  function showNote(sel, text, kind, title) {
    const e = $(sel);
    e.textContent = text || "";
    e.className = "note" + (kind ? " note-" + kind : "");
    e.title = title || "";
    e.hidden = !text;
  }

  // Both the replay card and the user's history say so, once the server has answered 503.
  function showHistoryOff(res) {
    state.historyOff = true;
    const detail = "server: " + errorText(res.body);
    showNote("#replay-msg", "History is off on this server, so there is nothing to replay. "
      + "Set history.backend to \"local\" (or \"scylla\") to record who was online.", "off", detail);
    $("#replay-body").hidden = true;
    $("#replay-card").classList.add("history-off");
    clearTimeout(state.replay.timer);
    state.replay.timer = 0;
    showNote("#history-msg", "History is off on this server: sessions and status changes are not recorded.",
      "off", detail);
    $("#history-body").hidden = true;
  }

  // ---- a user's history: analytics for the last 24 h and the latest events ------------------------------
  function clearHistory() {
    for (const sel of ["#an-online", "#an-sessions", "#an-open"]) setText(sel, "—");
    $("#an-online").title = "";
    $("#an-device-types").replaceChildren();
    $("#an-regions").replaceChildren();
    $("#history-events").replaceChildren();
    $("#history-empty").hidden = true;
    setText("#history-count", "loading…");
    showNote("#history-msg", null);
  }

  function scheduleHistoryRefresh() {
    const h = state.hist;
    if (h.timer || !state.detail.user) return;
    // At most one a second, and a moment after the change so the writer has stored it.
    const wait = Math.max(HISTORY_SETTLE_MS, h.lastAt + HISTORY_MIN_INTERVAL_MS - Date.now());
    h.timer = setTimeout(() => { h.timer = 0; loadHistory(); }, wait);
  }

  async function loadHistory() {
    const h = state.hist;
    clearTimeout(h.timer);
    h.timer = 0;
    const user = state.detail.user;
    if (!user || !state.authed) return;
    const gen = ++h.gen;
    h.lastAt = Date.now();
    const u = encodeURIComponent(user);
    let an, ev;
    try {
      // No from/to: the server's last 24 h, by its own clock.
      [an, ev] = await Promise.all([
        query(`/api/analytics/${u}`),
        query(`/api/history/${u}?limit=${HISTORY_EVENTS}`),
      ]);
    } catch (e) {
      if (gen === h.gen) showNote("#history-msg", "History: " + e.message, "error");
      return;
    }
    if (gen !== h.gen || state.detail.user !== user) return;
    if (isHistoryOff(an) || isHistoryOff(ev)) { showHistoryOff(isHistoryOff(an) ? an : ev); return; }
    const bad = an.status !== 200 ? an : ev.status !== 200 ? ev : null;
    if (bad) { showNote("#history-msg", `History: ${bad.status} ${errorText(bad.body)}`, "error"); return; }
    showNote("#history-msg", null);
    $("#history-body").hidden = false;
    renderAnalytics(an.body || {});
    renderTimeline(ev.body || {});
  }

  function barRow(name, frac, value, title) {
    const li = el("li", "bar-row");
    li.dataset.key = name;
    li.title = title;
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = (100 * Math.min(1, Math.max(0, frac || 0))).toFixed(1) + "%";
    bar.append(fill);
    li.append(el("span", "bar-name", name), bar, el("span", "bar-value", value));
    return li;
  }

  function renderAnalytics(a) {
    const online = num(a.online_ms);
    const t = $("#an-online");
    t.textContent = fmtHM(online);
    t.title = online === null ? "" : fmtDuration(online / 1000) + " with at least one session open";
    setText("#an-sessions", fmtInt(a.sessions));
    setText("#an-open", fmtInt(a.open_sessions));
    const none = () => el("li", "bar-none muted", "—");
    const types = Object.entries(a.by_device_type || {})
      .filter(([, ms]) => num(ms) !== null)
      .sort((x, y) => y[1] - x[1] || x[0].localeCompare(y[0]));
    $("#an-device-types").replaceChildren(...(types.length ? types.map(([type, ms]) =>
      barRow(type, online ? ms / online : 0, fmtHM(ms), `${type}: ${fmtDuration(ms / 1000)} online`)) : [none()]));
    const regions = Object.entries(a.sessions_by_region || {})
      .filter(([, n]) => num(n) !== null)
      .sort((x, y) => y[1] - x[1] || x[0].localeCompare(y[0]));
    const most = Math.max(1, ...regions.map(([, n]) => n));
    $("#an-regions").replaceChildren(...(regions.length ? regions.map(([region, n]) =>
      barRow(region, n / most, fmtInt(n), `${region}: ${n} session${n === 1 ? "" : "s"}`)) : [none()]));
  }

  const KIND_LABEL = { session_start: "session start", session_end: "session end", status: "status" };

  function renderTimeline(body) {
    const events = Array.isArray(body.events) ? body.events : [];
    $("#history-events").replaceChildren(...events.map(eventRow));
    $("#history-empty").hidden = events.length > 0;
    setText("#history-count", events.length >= HISTORY_EVENTS ? `latest ${HISTORY_EVENTS}, newest first`
      : events.length ? `${events.length} event${events.length === 1 ? "" : "s"}, newest first` : "");
  }

  function eventRow(e) {
    const kind = KIND_LABEL[e.kind] ? e.kind : "other";
    const li = el("li", "ev ev-" + kind);
    li.dataset.kind = String(e.kind);
    const time = el("time", "ev-time", fmtClock(e.ts));
    if (typeof e.ts === "number") {
      time.dateTime = new Date(e.ts).toISOString();
      time.title = fmtTime(e.ts) + " · " + fmtAgo(e.ts);
    }
    const badge = el("span", "ev-kind", KIND_LABEL[e.kind] || String(e.kind));
    const what = el("span", "ev-what");
    const parts = [];
    if (e.kind === "status") {
      const st = statusOf(e.status);
      const s = el("span", "ev-state");
      s.append(el("span", "dot dot-" + st), el("span", "status-name", st));
      parts.push(s);
      if (e.text) parts.push(el("span", "ev-text", e.text));
      if (typeof e.devices === "number") parts.push(el("span", "muted", `${fmtInt(e.devices)} device${e.devices === 1 ? "" : "s"}`));
    } else {
      if (e.device) parts.push(el("span", "mono ev-device", e.device));
      parts.push(el("span", "ev-type", e.device_type || "other"));
      if (e.region) parts.push(el("span", "muted", e.region));
      if (e.kind === "session_end" && typeof e.started_at === "number" && typeof e.ts === "number") {
        const lasted = e.ts - e.started_at;
        parts.push(el("span", "muted", "after " + (lasted < 1000 ? "<1s" : fmtDuration(lasted / 1000))));
      }
      const groups = Array.isArray(e.groups) ? e.groups : [];
      if (groups.length) li.title = "groups: " + groups.join(", ");
    }
    parts.forEach((p, i) => { if (i) what.append(el("span", "sep", "·")); what.append(p); });
    li.append(time, badge, what);
    return li;
  }

  // ---- replay: online users from history, and who they were --------------------------------------------
  const REPLAY_CHART_HEIGHT = 190;

  function replayGroup() {
    const g = $("#filter-group").value.trim();
    return g && $("#replay-use-group").checked ? g : null;
  }

  function updateReplayScope() {
    const g = $("#filter-group").value.trim();
    $("#replay-use-group").disabled = !g;
    $("#replay-group-check").classList.toggle("disabled", !g);
    setText("#replay-group-label", g ? `only group ${g}` : "group filter");
    const scope = replayGroup();
    const pill = $("#replay-scope");
    pill.textContent = scope ? `group ${scope}` : "all users";
    pill.classList.toggle("scope-group", !!scope);
  }

  function onReplayScopeInput() {
    updateReplayScope();
    if (state.authed && replayGroup() !== state.replay.group) loadReplay();
  }

  function setReplayWindow(ms) {
    const r = state.replay;
    r.windowMs = ms;
    r.selected = null;
    for (const b of document.querySelectorAll(".seg-btn[data-window]")) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.window) === ms));
    }
    loadReplay();
  }

  // Whole seconds, at least the sampling interval, at most REPLAY_POINTS_MAX points.
  function replayStep(windowMs, sampleMs) {
    return Math.max(sampleMs || 1000, Math.ceil(windowMs / REPLAY_POINTS_MAX / 1000) * 1000);
  }

  // False when the answer is usable; otherwise says why on the card.
  function replayFailed(res, what) {
    if (isHistoryOff(res)) { showHistoryOff(res); return true; }
    if (res.status !== 200) {
      showNote("#replay-msg", `${what}: ${res.status} ${errorText(res.body)}`, "error");
      return true;
    }
    return false;
  }

  async function loadReplay() {
    const r = state.replay;
    clearTimeout(r.timer);
    r.timer = 0;
    if (!state.authed || state.historyOff) return;
    const gen = ++r.gen;
    try {
      if (!r.sampleMs) {
        // A one-point replay without `step` answers with the default step: the sampling interval.
        const t = Math.floor(serverNow());
        const probe = await query(`/api/replay?from=${t}&to=${t}`);
        if (gen !== r.gen || replayFailed(probe, "Replay")) return;
        r.sampleMs = num(probe.body && probe.body.step) || 1000;
      }
      const step = replayStep(r.windowMs, r.sampleMs);
      const from = Math.floor((serverNow() - r.windowMs) / step) * step;
      const group = replayGroup();
      const params = new URLSearchParams({ from: String(from), step: String(step) });
      if (group) params.set("group", group);
      const res = await query("/api/replay?" + params.toString());
      if (gen !== r.gen || replayFailed(res, "Replay")) return;
      showNote("#replay-msg", null);
      applyReplay(res.body || {}, group);
    } catch (e) {
      if (gen === r.gen) showNote("#replay-msg", "Replay: " + e.message, "error");
    } finally {
      if (gen === r.gen) scheduleReplayRefresh();
    }
  }

  // Live while following the latest point; an inspected instant pauses it (the chart and the
  // slider hold still under the pointer) until "live" is pressed.
  function scheduleReplayRefresh() {
    const r = state.replay;
    clearTimeout(r.timer);
    r.timer = 0;
    if (!state.authed || state.historyOff || r.selected !== null) return;
    r.timer = setTimeout(loadReplay, Math.max(REPLAY_REFRESH_MIN_MS, r.step || 0));
  }

  function applyReplay(body, group) {
    const r = state.replay;
    const pts = Array.isArray(body.points) ? body.points : [];
    const t = [], online = [];
    let nonNull = 0, max = null, last = null;
    for (const p of pts) {
      if (num(p.t) === null) continue;
      const v = num(p.online);
      t.push(p.t / 1000);
      online.push(v);
      if (v !== null) { nonNull++; max = Math.max(max === null ? 0 : max, v); last = v; }
    }
    r.data = [t, online];
    r.step = num(body.step) || r.step;
    const groupChanged = r.group !== group;
    r.group = group;
    $("#replay-body").hidden = false;
    $("#replay-card").classList.remove("history-off");
    const host = $("#replay-chart");
    host.dataset.points = String(t.length);
    host.dataset.nonNull = String(nonNull);
    host.dataset.max = max === null ? "" : String(max);
    host.dataset.last = last === null ? "" : String(last);
    host.dataset.step = String(r.step);
    ensureReplayChart();
    if (r.chart) r.chart.setData(r.data);

    const slider = $("#replay-at");
    if (!t.length) { slider.disabled = true; return; }
    const first = t[0] * 1000, latest = t[t.length - 1] * 1000;
    slider.min = String(first);
    slider.max = String(latest);
    slider.step = String(r.step);
    slider.disabled = false;
    // An inspected instant outside the (reloaded) window gives way to the latest point.
    if (r.selected !== null && (r.selected < first || r.selected > latest)) r.selected = null;
    const at = r.selected === null ? latest : r.selected;
    slider.value = String(at);
    showLive();
    showAtTime(at);
    const shown = r.atShown;
    if (r.selected === null || groupChanged || !shown || shown.t !== at) loadAt(at);
  }

  function showAtTime(t) {
    const e = $("#replay-at-time");
    e.textContent = fmtClock(t) + (state.replay.selected === null ? " · latest" : " · paused");
    e.title = fmtTime(t) + " · " + fmtAgo(t);
  }

  function showLive() {
    const live = state.replay.selected === null;
    const b = $("#replay-now");
    b.classList.toggle("active", live);
    b.setAttribute("aria-pressed", String(live));
    b.title = live ? "Following the latest point" : "Paused on the chosen instant: back to the latest point, live";
  }

  function selectInstant(t, immediate) {
    const r = state.replay;
    if (!isFinite(t)) return;
    r.selected = t;
    clearTimeout(r.timer); // paused: see scheduleReplayRefresh
    r.timer = 0;
    $("#replay-at").value = String(t);
    showLive();
    showAtTime(t);
    if (r.chart) r.chart.redraw(false, false);
    clearTimeout(r.atTimer);
    r.atTimer = setTimeout(() => loadAt(t), immediate ? 0 : REPLAY_AT_DEBOUNCE_MS);
  }

  async function loadAt(t) {
    const r = state.replay;
    clearTimeout(r.atTimer);
    r.atTimer = 0;
    if (!state.authed || state.historyOff) return;
    const gen = ++r.atGen;
    const group = r.group;
    const params = new URLSearchParams({ t: String(Math.round(t)), limit: String(REPLAY_AT_LIMIT) });
    if (group) params.set("group", group);
    let res;
    try {
      res = await query("/api/replay/at?" + params.toString());
    } catch (e) {
      if (gen === r.atGen) showNote("#replay-msg", "Who was online: " + e.message, "error");
      return;
    }
    if (gen !== r.atGen || replayFailed(res, "Who was online")) return;
    r.atShown = { t, group };
    renderAt(res.body || {}, t);
  }

  function renderAt(body, t) {
    const users = Array.isArray(body.users) ? body.users.filter((u) => typeof u === "string") : [];
    const total = num(body.total) === null ? users.length : body.total;
    const list = $("#replay-users");
    list.dataset.t = String(t);
    setText("#replay-total", fmtInt(total));
    setText("#replay-total-unit", (total === 1 ? "user" : "users") + (body.group ? ` in ${body.group}` : ""));
    const items = users.map((u) => {
      const li = el("li");
      const b = el("button", "chip chip-user", u);
      b.type = "button";
      b.dataset.user = u;
      b.title = `Open ${u}`;
      li.append(b);
      return li;
    });
    if (!items.length) items.push(el("li", "muted small", "nobody"));
    list.replaceChildren(...items);
    const more = $("#replay-more");
    more.textContent = total > users.length ? `+ ${fmtInt(total - users.length)} more not listed` : "";
    more.hidden = !(total > users.length);
    const h = num(body.lookback_h);
    setText("#replay-lookback", h === null ? ""
      : `From sessions that started in the ${h} h before this instant: a session open longer is not counted.`);
  }

  function drawReplayMarker(u) {
    const t = state.replay.selected;
    if (t === null || !u.data[0].length) return;
    const x = Math.round(u.valToPos(t / 1000, "x", true));
    const { left, top, width, height } = u.bbox;
    if (x < left || x > left + width) return;
    const dpr = window.devicePixelRatio || 1;
    const ctx = u.ctx;
    ctx.save();
    ctx.strokeStyle = "#5aa9ff";
    ctx.lineWidth = dpr;
    ctx.setLineDash([4 * dpr, 3 * dpr]);
    ctx.beginPath();
    ctx.moveTo(x + 0.5, top);
    ctx.lineTo(x + 0.5, top + height);
    ctx.stroke();
    ctx.restore();
  }

  function onReplayClick(u, ev) {
    const ts = u.data[0];
    if (!ts.length) return;
    const idx = u.posToIdx(ev.clientX - u.over.getBoundingClientRect().left);
    selectInstant(ts[Math.max(0, Math.min(ts.length - 1, idx))] * 1000, true);
  }

  function ensureReplayChart() {
    const r = state.replay;
    if (r.chart || typeof uPlot === "undefined") return;
    const host = $("#replay-chart");
    const incrs = [];
    for (let e = 0; e < 10; e++) for (const m of [1, 2, 5]) incrs.push(m * 10 ** e);
    const opts = {
      width: Math.max(200, host.clientWidth),
      height: REPLAY_CHART_HEIGHT,
      // A click (uPlot's "click without a drag", which it otherwise swallows) picks the nearest point.
      cursor: { drag: { x: false, y: false, click: onReplayClick } },
      legend: { live: true },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(2, Math.ceil((max || 0) * 1.15))] } },
      axes: [
        { ...AXIS, space: 70 },
        { ...AXIS, size: 48, incrs, values: (u, vals) => vals.map(fmtCompact) },
      ],
      series: [
        {
          value: (u, v, si, idx) => {
            if (idx === null || idx === undefined) v = lastValue(u.data[0]);
            return v ? fmtClock(v * 1000) : "—";
          },
        },
        {
          ...series("online users", "#3ecf72", fmtInt, "rgba(62,207,114,0.12)"),
          spanGaps: false, // no sample there: a gap, not a made-up line
          // Few samples (a young server, sparse history): dots, or a short run is a hairline.
          points: { show: (u, si) => u.data[si].filter((v) => v !== null).length <= 120, size: 5 },
          paths: uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
        },
      ],
      hooks: { draw: [drawReplayMarker] },
    };
    r.chart = new uPlot(opts, r.data, host);
    new ResizeObserver(() => {
      const w = Math.max(200, host.clientWidth);
      if (r.chart && w !== r.chart.width) r.chart.setSize({ width: w, height: REPLAY_CHART_HEIGHT });
    }).observe(host);
  }

  function resetReplay() {
    const r = state.replay;
    clearTimeout(r.timer);
    clearTimeout(r.atTimer);
    r.timer = r.atTimer = 0;
    r.gen++;
    r.atGen++;
    r.selected = null;
    showLive();
    r.atShown = null;
    r.data = [[], []];
    if (r.chart) r.chart.setData(r.data);
    $("#replay-users").replaceChildren();
    setText("#replay-total", "—");
    setText("#replay-at-time", "—");
    $("#replay-more").hidden = true;
    showNote("#replay-msg", null);
  }

  let toastTimer = 0;
  function toast(text, isError) {
    const t = $("#toast");
    t.textContent = text;
    t.className = "toast" + (isError ? " toast-error" : "");
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
  }

  function clearData() {
    for (const sel of ["#online-count", "#conn-count", "#handshake-rate", "#delivery-rate",
      "#latency-p50", "#latency-p99", "#meta-uptime", "#meta-admin", "#users-total"]) setText(sel, "—");
    $("#shards tbody").replaceChildren();
    $("#users tbody").replaceChildren();
    clearTimeout(state.page.requeryTimer);
    clearTimeout(state.page.filterTimer);
    clearTimeout(state.detail.refreshTimer);
    state.page.requeryTimer = state.page.filterTimer = state.detail.refreshTimer = 0;
    state.page.rows = new Map();
    state.page.cursor = null;
    state.page.back = [];
    state.page.next = null;
    state.series = emptySeries();
    redrawCharts();
    closeDetail();
    resetReplay();
  }

  // ---- wiring -------------------------------------------------------------------------------------------
  function init() {
    for (const [, sel] of FILTERS) {
      $(sel).addEventListener("input", onFilterInput);
      $(sel).addEventListener("change", onFilterInput);
    }
    $("#page-next").addEventListener("click", nextPage);
    $("#page-prev").addEventListener("click", prevPage);
    const tbody = $("#users tbody");
    tbody.addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-user]");
      if (tr) openDetail(tr.dataset.user);
    });
    tbody.addEventListener("keydown", (ev) => {
      const tr = ev.target.closest("tr[data-user]");
      if (tr && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); openDetail(tr.dataset.user); }
    });
    $("#detail-close").addEventListener("click", closeDetail);
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && state.detail.user) closeDetail();
    });
    $("#kick-user").addEventListener("click", () => {
      const user = state.detail.user;
      if (user) kick(`/api/users/${encodeURIComponent(user)}/kick`, `every session of ${user}`);
    });
    $("#sessions tbody").addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-kick-session]");
      if (b) kick(`/api/sessions/${encodeURIComponent(b.dataset.kickSession)}/kick`, `session ${b.dataset.kickSession} of ${state.detail.user}`);
    });
    $("#signin-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("#token-input").value.trim();
      if (t) signIn(t);
    });
    $("#sign-out").addEventListener("click", () => signOut(null));
    for (const b of document.querySelectorAll(".seg-btn[data-window]")) {
      b.addEventListener("click", () => setReplayWindow(Number(b.dataset.window)));
    }
    $("#replay-use-group").addEventListener("change", onReplayScopeInput);
    $("#replay-at").addEventListener("input", () => selectInstant(Number($("#replay-at").value), false));
    $("#replay-now").addEventListener("click", () => { state.replay.selected = null; loadReplay(); });
    $("#replay-users").addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-user]");
      if (b) openDetail(b.dataset.user);
    });
    updateReplayScope();
    setInterval(() => {
      refreshRelativeTimes();
      // An open panel's time online keeps growing: re-ask now and then.
      if (state.detail.user && !state.historyOff && Date.now() - state.hist.lastAt >= HISTORY_PERIODIC_MS) {
        scheduleHistoryRefresh();
      }
    }, 5000);

    state.series = emptySeries();
    const fromFragment = tokenFromFragment();
    let stored = null;
    try { stored = sessionStorage.getItem(TOKEN_KEY); } catch (_) { /* storage disabled */ }
    const token = fromFragment || stored;
    if (token) signIn(token);
    else { setConnState("signed out", "signed-out"); showSignIn(null); }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
