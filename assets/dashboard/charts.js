// The live 15-minute series (seeded by hello, one point per stats push) and its three uPlot
// charts; also the axis and series styles the replay chart shares.

import { $ } from "./dom.js";
import { fmtCompact, fmtInt, fmtRate, num } from "./format.js";
import { state } from "./state.js";

const SERIES_POINTS_MAX = 900;        // 15 minutes at one sample a second
const SERIES_SPAN_MS = 15 * 60 * 1000;

function emptySeries() {
  return { t: [], online: [], connections: [], hps: [], dps: [], p50: [], p99: [] };
}

/** Replaces the series with the last 15 minutes of `points` (hello's `series`). */
export function seedSeries(points) {
  state.series = emptySeries();
  for (const p of points.slice(-SERIES_POINTS_MAX)) pushPoint(p);
}

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

export function appendSample(p) {
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

export const AXIS = {
  stroke: "#8b96a8",
  grid: { stroke: "rgba(39,48,65,0.9)", width: 1 },
  ticks: { stroke: "rgba(39,48,65,0.9)", width: 1 },
  font: "11px system-ui, sans-serif",
};

/** A uPlot line series; `fmt` formats its legend value. */
export function lineSeries(label, color, fmt, fill) {
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

export function lastValue(col) {
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
        lineSeries("online users", "#3ecf72", fmtInt, "rgba(62,207,114,0.10)"),
        lineSeries("connections", "#5aa9ff", fmtInt),
      ],
      yFmt: (v) => fmtCompact(v),
    },
    {
      sel: "#chart-rates",
      data: () => [s().t, s().hps, s().dps],
      series: [
        lineSeries("handshakes/s", "#f2b134", fmtRate),
        lineSeries("deliveries/s", "#b18cff", fmtRate, "rgba(177,140,255,0.08)"),
      ],
      yFmt: (v) => fmtCompact(v),
    },
    {
      sel: "#chart-latency",
      data: () => [s().t, s().p50, s().p99],
      series: [
        lineSeries("p50", "#5aa9ff", (v) => v.toFixed(2) + " ms"),
        lineSeries("p99", "#f0524f", (v) => v.toFixed(2) + " ms"),
      ],
      yFmt: (v) => v.toFixed(v < 1 ? 2 : 1),
    },
  ];
}

/** Creates the charts once (uPlot is the classic script loaded before the modules). */
export function ensureCharts() {
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

export function redrawCharts() {
  for (const c of state.charts) c.chart.setData(c.spec.data());
}

/** Empties the series and the charts (at start and on sign-out). */
export function clearSeries() {
  state.series = emptySeries();
  redrawCharts();
}
