// The page's one shared state object. Each part is written by the module named beside it and
// only read elsewhere; nothing here runs on import.

export const state = {
  // socket.js: the /ws/admin connection and its queries.
  token: null,
  ws: null,
  authed: false,              // the server said hello: queries may go
  backoffMs: 0,               // the next reconnect's wait (socket.resetBackoff sets it)
  reconnectTimer: 0,
  staleTimer: 0,
  intervalMs: 1000,           // the server's push interval, from hello
  nextId: 1,
  pending: new Map(),         // query id -> {resolve, reject, timer}
  // charts.js: the live 15-minute series and its charts.
  series: null,               // {t, online, connections, hps, dps, p50, p99} column arrays
  charts: [],
  // users.js: the user list's page.
  page: {
    cursor: null,             // cursor of the page shown (null: the first)
    back: [],                 // cursors of the pages before it
    next: null,               // next_cursor of the page shown
    gen: 0,                   // bumps on each query so stale replies are dropped
    rows: new Map(),          // user id -> <tr>
    lastQueryAt: 0,
    requeryTimer: 0,
    filterTimer: 0,
  },
  // detail.js: the open user panel (user null: closed).
  detail: { user: null, gen: 0, refreshTimer: 0 },
  // history.js: the open user's history: analytics and timeline.
  hist: { gen: 0, timer: 0, lastAt: 0 },
  // feed.js: server clock minus ours, from the samples it pushes.
  serverOffsetMs: 0,
  // history.js: the server answered "history is off" (feed.js clears it on hello).
  historyOff: false,
  // replay.js: online users from history.
  replay: {
    windowMs: 15 * 60 * 1000,
    sampleMs: null,           // history.sample_interval_s in ms, learned from the server
    gen: 0,
    timer: 0,
    data: [[], []],           // uPlot columns: t (s), online (n | null)
    step: 0,                  // of the replay shown (ms)
    group: null,              // of the replay shown
    selected: null,           // the inspected instant (ms); null follows the latest point
    chart: null,
    atGen: 0,
    atTimer: 0,
    atShown: null,            // {t, group} of the list shown
  },
};

/** Now by the server's clock: replay windows are in its time, which is what samples carry. */
export const serverNow = () => Date.now() + state.serverOffsetMs;
