// Shared drawing helpers for lab's panels: each panel's module imports them from "./common.js" (plain ESM, no
// dependencies; lab/widgets/base.py links the import for anywidget, see linked_source).

export function setupCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return ctx;
}

export function formatNumber(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(2);
  return v.toFixed(digits);
}

export function formatDuration(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 90) return `${s.toFixed(0)} s`;
  if (s < 5400) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// Line chart of several series [{label, color, points: [[x, y], ...]}]; returns the number of points drawn.
export function lineChart(canvas, series, { width = 520, height = 220, logY = false, xLabel = "" } = {}) {
  const ctx = setupCanvas(canvas, width, height);
  const pad = { l: 48, r: 12, t: 10, b: 28 };
  ctx.clearRect(0, 0, width, height);
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined && (!logY || p[1] > 0)));
  canvas.dataset.points = String(all.length);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#666";
  if (all.length === 0) {
    ctx.fillText("no data yet", width / 2 - 30, height / 2);
    return 0;
  }
  const fy = logY ? Math.log10 : (v) => v;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => fy(p[1]))), Math.max(...all.map((p) => fy(p[1])))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const Y = (y) => height - pad.b - ((fy(y) - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  ctx.strokeStyle = "#ddd";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4;
    const py = height - pad.b - ((yv - y0) / (y1 - y0)) * (height - pad.t - pad.b);
    ctx.beginPath(); ctx.moveTo(pad.l, py); ctx.lineTo(width - pad.r, py); ctx.stroke();
    ctx.fillText(formatNumber(logY ? 10 ** yv : yv, 2), 4, py + 4);
  }
  ctx.fillText(String(Math.round(x0)), pad.l, height - 8);
  ctx.fillText(`${Math.round(x1)} ${xLabel}`, width - pad.r - 60, height - 8);
  series.forEach((s, k) => {
    const pts = s.points.filter((p) => p[1] !== null && p[1] !== undefined && (!logY || p[1] > 0));
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    pts.forEach((p) => { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), pts.length < 40 ? 2.5 : 1, 0, 7); ctx.fill(); });
    ctx.fillText(s.label, pad.l + 8 + k * 90, pad.t + 12);
  });
  return all.length;
}

export function sparkline(canvas, values, color, width = 160, height = 36) {
  const ctx = setupCanvas(canvas, width, height);
  ctx.clearRect(0, 0, width, height);
  const v = values.filter((x) => x !== null && x !== undefined && Number.isFinite(x));
  canvas.dataset.points = String(v.length);
  if (v.length < 2) return;
  const lo = Math.min(...v), hi = Math.max(...v) === lo ? lo + 1 : Math.max(...v);
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  v.forEach((y, i) => {
    const px = (i / (v.length - 1)) * (width - 4) + 2, py = height - 3 - ((y - lo) / (hi - lo)) * (height - 6);
    i ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
  });
  ctx.stroke();
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  children.flat().forEach((c) => node.append(c));
  return node;
}
