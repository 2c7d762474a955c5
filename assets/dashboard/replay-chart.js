// The replay's uPlot chart: a stepped line of online users, a dashed marker on the inspected
// instant, and a click that picks the nearest point.

import { AXIS, lastValue, lineSeries } from "./charts.js";
import { $ } from "./dom.js";
import { fmtClock, fmtCompact, fmtInt } from "./format.js";
import { state } from "./state.js";

const REPLAY_CHART_HEIGHT = 190;

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

/** Creates the chart once; a click on it calls `onPick(t)` with the nearest point's time (ms). */
export function ensureReplayChart(onPick) {
  const r = state.replay;
  if (r.chart || typeof uPlot === "undefined") return;
  const host = $("#replay-chart");
  const incrs = [];
  for (let e = 0; e < 10; e++) for (const m of [1, 2, 5]) incrs.push(m * 10 ** e);
  const onClick = (u, ev) => {
    const ts = u.data[0];
    if (!ts.length) return;
    const idx = u.posToIdx(ev.clientX - u.over.getBoundingClientRect().left);
    onPick(ts[Math.max(0, Math.min(ts.length - 1, idx))] * 1000);
  };
  const opts = {
    width: Math.max(200, host.clientWidth),
    height: REPLAY_CHART_HEIGHT,
    // A click (uPlot's "click without a drag", which it otherwise swallows) picks the nearest point.
    cursor: { drag: { x: false, y: false, click: onClick } },
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
        ...lineSeries("online users", "#3ecf72", fmtInt, "rgba(62,207,114,0.12)"),
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
