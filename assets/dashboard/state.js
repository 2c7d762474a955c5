// The page's one shared state object. Each part names the module that writes it (the few other
// writers are named too); the rest only read it. Nothing here runs on import.

export const state = {
  token: null,               // auth.js: the admin token signed in with
  // socket.js: the /ws/admin connection and its queries.
  ws: null,
  authed: false,              // the server said hello (feed.js sets it): queries may go
  backoffMs: 0,               // the next reconnect's wait (socket.resetBackoff sets it)
  reconnectTimer: 0,
  staleTimer: 0,
  intervalMs: 1000,           // the server's push interval (feed.js, from hello)
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
  // replay.js: online users from history (history.js stops its timer when history is off,
  // feed.js forgets sampleMs on hello).
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
