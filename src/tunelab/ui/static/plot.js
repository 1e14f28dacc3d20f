// Small SVG plots with axes, units, a legend and hover values (mouse or arrow keys). No dependencies.

const SVG = "http://www.w3.org/2000/svg";
export const COLORS = ["#1f6fb4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Round tick values covering [low, high].
export function niceTicks(low, high, count = 5) {
  if (!(high > low)) { high = low + 1; }
  const raw = (high - low) / count;
  const step = Math.pow(10, Math.floor(Math.log10(raw)));
  const mult = [1, 2, 2.5, 5, 10].find((m) => m * step >= raw) || 10;
  const size = mult * step;
  const ticks = [];
  for (let v = Math.ceil(low / size) * size; v <= high + size * 1e-9; v += size) ticks.push(+v.toPrecision(12));
  return ticks;
}

// A number for an axis or a tooltip: short, exponent for very small or large values.
export function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(digits < 4 ? 1 : 2);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return String(+value.toPrecision(digits));
}

export function fmtTime(seconds) {
  return new Date(seconds * 1000).toISOString().slice(11, 16) + " UTC";
}

/**
 * A line chart.
 * options: {title, xLabel, yLabel, unit, series: [{name, points: [[x, y], ...]}], xFormat, height, metric}
 * Returns a <figure> whose <svg> has data-points (the number of points drawn).
 */
export function lineChart(options) {
  const { title, xLabel = "step", yLabel = "", unit = "", series, xFormat = fmt, height = 220 } = options;
  const figure = document.createElement("figure");
  figure.className = "chart";
  if (options.metric) figure.dataset.metric = options.metric;
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption);
  const width = 520, left = 62, right = 14, top = 12, bottom = 40;
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && Number.isFinite(p[1])));
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", tabindex: "0",
                          "aria-label": `${title}; ${yLabel} against ${xLabel}`, "data-points": String(all.length) });
  figure.append(svg);
  if (!all.length) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, options.empty || "no data"));
    return figure;
  }
  let xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const yTicks = niceTicks(y0, y1, 4);
  y0 = Math.min(y0, yTicks[0]); y1 = Math.max(y1, yTicks[yTicks.length - 1]);
  const sx = (x) => left + (x - x0) / (x1 - x0) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  for (const t of yTicks) {
    svg.append(el("line", { x1: left, x2: width - right, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.append(el("text", { x: left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t, 3) + unit));
  }
  const xTicks = xFormat === fmt ? niceTicks(x0, x1, 5).filter((t) => t >= x0 && t <= x1) :
    [0, 1, 2, 3, 4].map((k) => x0 + (x1 - x0) * k / 4);
  for (const t of xTicks) {
    svg.append(el("line", { x1: sx(t), x2: sx(t), y1: height - bottom, y2: height - bottom + 4, class: "axis" }));
    svg.append(el("text", { x: sx(t), y: height - bottom + 16, "text-anchor": "middle" }, xFormat(t)));
  }
  svg.append(el("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
  svg.append(el("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
  svg.append(el("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle", class: "label" }, xLabel));
  svg.append(el("text", { x: 12, y: (top + height - bottom) / 2, "text-anchor": "middle", class: "label",
                          transform: `rotate(-90 12 ${(top + height - bottom) / 2})` }, yLabel + (unit ? ` (${unit.trim()})` : "")));
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const pts = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
    if (pts.length === 1) {
      svg.append(el("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, fill: color }));
    } else if (pts.length > 1) {
      svg.append(el("polyline", { fill: "none", stroke: color, "stroke-width": 1.8,
                                  points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }));
    }
  });
  if (series.length > 1 || options.legend) {
    const legend = document.createElement("div");
    legend.className = "legend";
    series.forEach((s, i) => {
      const item = document.createElement("span");
      item.innerHTML = `<i style="background:${s.color || COLORS[i % COLORS.length]}"></i>`;
      item.append(document.createTextNode(s.name));
      legend.append(item);
    });
    figure.append(legend);
  }
  // Hover: the nearest x across series, its value in every series.
  const cursor = el("line", { y1: top, y2: height - bottom, class: "cursor", visibility: "hidden" });
  svg.append(cursor);
  const tip = document.createElement("div");
  tip.className = "tip";
  tip.hidden = true;
  figure.append(tip);
  const allX = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b);
  let index = -1;
  function show(i) {
    index = Math.max(0, Math.min(allX.length - 1, i));
    const x = allX[index];
    cursor.setAttribute("x1", sx(x)); cursor.setAttribute("x2", sx(x));
    cursor.setAttribute("visibility", "visible");
    const lines = [`${xLabel} ${xFormat(x)}`];
    series.forEach((s) => {
      const p = s.points.find((q) => q[0] === x);
      if (p && p[1] !== null) lines.push(`${s.name}: ${fmt(p[1])}${unit}`);
    });
    tip.textContent = lines.join("\n");
    tip.hidden = false;
    const rect = svg.getBoundingClientRect();
    const px = rect.width * sx(x) / width;
    tip.style.left = `${Math.min(px + 8, rect.width - 140)}px`;
  }
  function hide() { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; }
  svg.addEventListener("mousemove", (event) => {
    const rect = svg.getBoundingClientRect();
    const x = x0 + ((event.clientX - rect.left) * width / rect.width - left) / (width - left - right) * (x1 - x0);
    let best = 0;
    allX.forEach((v, i) => { if (Math.abs(v - x) < Math.abs(allX[best] - x)) best = i; });
    show(best);
  });
  svg.addEventListener("mouseleave", hide);
  svg.addEventListener("blur", hide);
  svg.addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight") { show(index + 1); event.preventDefault(); }
    if (event.key === "ArrowLeft") { show(index < 0 ? allX.length - 1 : index - 1); event.preventDefault(); }
    if (event.key === "Escape") hide();
  });
  return figure;
}

/**
 * A histogram: bins given by edges (n+1) and counts (n).
 * options: {title, xLabel, unit, edges, counts}
 */
export function histogram(options) {
  const { title, xLabel = "", edges, counts } = options;
  const figure = document.createElement("figure");
  figure.className = "chart";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption);
  const width = 520, height = 200, left = 52, right = 14, top = 12, bottom = 40;
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", tabindex: "0",
                          "aria-label": title, "data-points": String(counts.length) });
  figure.append(svg);
  if (!counts.length) return figure;
  const maxCount = Math.max(...counts, 1);
  const yTicks = niceTicks(0, maxCount, 4);
  const yMax = Math.max(maxCount, yTicks[yTicks.length - 1]);
  const x0 = edges[0], x1 = edges[edges.length - 1];
  const sx = (x) => left + (x - x0) / (x1 - x0 || 1) * (width - left - right);
  const sy = (y) => top + (1 - y / yMax) * (height - top - bottom);
  for (const t of yTicks) {
    svg.append(el("line", { x1: left, x2: width - right, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.append(el("text", { x: left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  const tip = document.createElement("div");
  tip.className = "tip";
  tip.hidden = true;
  figure.append(tip);
  const bars = counts.map((c, i) => {
    const bar = el("rect", { x: sx(edges[i]) + 0.5, y: sy(c), width: Math.max(1, sx(edges[i + 1]) - sx(edges[i]) - 1),
                             height: sy(0) - sy(c), class: "bar" });
    bar.addEventListener("mouseenter", () => showBar(i));
    svg.append(bar);
    return bar;
  });
  function showBar(i) {
    bars.forEach((b, k) => b.classList.toggle("active", k === i));
    tip.textContent = `${fmt(edges[i])}–${fmt(edges[i + 1])} ${xLabel}: ${counts[i]} sequences`;
    tip.hidden = false;
  }
  let current = -1;
  svg.addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight") { current = Math.min(counts.length - 1, current + 1); showBar(current); }
    if (event.key === "ArrowLeft") { current = Math.max(0, current - 1); showBar(current); }
  });
  svg.addEventListener("mouseleave", () => { tip.hidden = true; bars.forEach((b) => b.classList.remove("active")); });
  for (const t of niceTicks(x0, x1, 5).filter((t) => t >= x0 && t <= x1)) {
    svg.append(el("text", { x: sx(t), y: height - bottom + 16, "text-anchor": "middle" }, fmt(t)));
  }
  svg.append(el("line", { x1: left, x2: width - right, y1: sy(0), y2: sy(0), class: "axis" }));
  svg.append(el("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle", class: "label" }, xLabel));
  svg.append(el("text", { x: 12, y: (top + height - bottom) / 2, "text-anchor": "middle", class: "label",
                          transform: `rotate(-90 12 ${(top + height - bottom) / 2})` }, "sequences"));
  return figure;
}
