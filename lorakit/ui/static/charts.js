// Line charts and heatmaps as inline SVG, no library: a chart is redrawn whole from its series.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed"];

function svgEl(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(+v.toPrecision(3));
}

// series: [{name, points: [[x, y], ...]}]; the SVG's data-points is the first series' length.
function lineChart(container, series, opts = {}) {
  const W = opts.width || 360, H = opts.height || 200, L = 52, R = 10, T = 10, B = 26;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "line-chart",
    "data-points": series.length ? series[0].points.length : 0});
  if (!all.length) {
    const t = svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted"});
    t.textContent = "no points yet";
    svg.appendChild(t);
    container.replaceChildren(svg);
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.appendChild(svgEl("rect", {x: L, y: T, width: W - L - R, height: H - T - B, class: "plot-area"}));
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, y = sy(yv);
    svg.appendChild(svgEl("line", {x1: L, x2: W - R, y1: y, y2: y, class: "gridline"}));
    const t = svgEl("text", {x: L - 4, y: y + 4, "text-anchor": "end", class: "tick"});
    t.textContent = fmtTick(yv);
    svg.appendChild(t);
  }
  for (const xv of [x0, (x0 + x1) / 2, x1]) {
    const t = svgEl("text", {x: sx(xv), y: H - 8, "text-anchor": "middle", class: "tick"});
    t.textContent = fmtTick(Math.round(xv));
    svg.appendChild(t);
  }
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    const color = COLORS[i % COLORS.length];
    svg.appendChild(svgEl("polyline", {points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 1.5, class: "series", "data-name": s.name}));
    if (pts.length < 40) {
      for (const p of pts) svg.appendChild(svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2, fill: color}));
    }
    const t = svgEl("text", {x: W - R - 4, y: T + 14 + 14 * i, "text-anchor": "end", fill: color, class: "legend"});
    t.textContent = s.name;
    svg.appendChild(t);
  });
  container.replaceChildren(svg);
  return svg;
}

// A confusion matrix as an SVG heatmap: rows true, columns predicted, shade by row share.
function heatmap(container, labels, matrix) {
  const n = labels.length, cell = Math.max(22, Math.min(48, 480 / Math.max(n, 1)));
  const pad = 110, top = 70, W = pad + n * cell + 10, H = top + n * cell + 10;
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "heatmap"});
  matrix.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    row.forEach((v, j) => {
      const share = v / total;
      const fill = i === j ? `rgba(5,150,105,${0.1 + 0.9 * share})` : `rgba(220,38,38,${v ? 0.1 + 0.9 * share : 0})`;
      const r = svgEl("rect", {x: pad + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1,
        fill, class: "hm-cell", "data-true": labels[i], "data-pred": labels[j], "data-count": v});
      const tip = svgEl("title");
      tip.textContent = `true ${labels[i]}, predicted ${labels[j]}: ${v}`;
      r.appendChild(tip);
      svg.appendChild(r);
      const t = svgEl("text", {x: pad + j * cell + cell / 2, y: top + i * cell + cell / 2 + 4,
        "text-anchor": "middle", class: "hm-num"});
      t.textContent = v;
      svg.appendChild(t);
    });
  });
  labels.forEach((lab, i) => {
    const t = svgEl("text", {x: pad - 4, y: top + i * cell + cell / 2 + 4, "text-anchor": "end", class: "tick"});
    t.textContent = lab;
    svg.appendChild(t);
    const c = svgEl("text", {x: 0, y: 0, "text-anchor": "start", class: "tick",
      transform: `translate(${pad + i * cell + cell / 2 + 4},${top - 4}) rotate(-60)`});
    c.textContent = lab;
    svg.appendChild(c);
  });
  container.replaceChildren(svg);
  return svg;
}
