// EdgeDiagnosticsPanel front end. Synced: reports (one per diagnostics run), surface_png, surface_summary.
// Shows sharpness against its edge-of-stability threshold over training, the latest numbers colour-coded,
// the efficiency products, the recommendation, and the efficiency-surface figure.

import { formatNumber, lineChart, el } from "./common.js";

function renderEdge({ model, el: root }) {
  root.classList.add("lab-panel", "lab-edge");
  const chart = el("canvas", { class: "lab-chart" });
  const table = el("div", { class: "lab-latest" });
  const advice = el("div", { class: "lab-advice" });
  const img = el("img", { class: "lab-surface", alt: "efficiency surface" });
  const surf = el("div", { class: "lab-caption" });
  root.append(el("div", { class: "lab-header" }, el("b", {}, "Edge diagnostics")), chart, table, advice,
    el("div", { class: "lab-caption" }, "on-the-edge efficiency model"), surf, img);

  function status(ok, warn) { return ok ? "lab-good" : warn ? "lab-warn" : "lab-bad"; }
  function update() {
    const reports = model.get("reports") || [];
    lineChart(chart, [
      { label: "sharpness", color: "#1f77b4", points: reports.map((r) => [r.step, r.sharpness]) },
      { label: "threshold", color: "#d62728", points: reports.map((r) => [r.step, r.threshold]) },
    ], { logY: true, xLabel: "steps" });
    const r = reports[reports.length - 1];
    if (r) {
      const ratio = r.sharpness / r.threshold;
      const eff = Object.entries(r.efficiency || {}).map(([g, e]) => `${g} ${formatNumber(e, 3)}`).join(", ") || "–";
      const rows = [
        ["step", String(r.step), ""],
        ["sharpness / threshold", `${formatNumber(r.sharpness)} / ${formatNumber(r.threshold)}`, status(ratio < 0.5, ratio <= 1)],
        ["Fisher trace", formatNumber(r.fisher_trace), ""],
        ["noise scale (batch)", `${formatNumber(r.noise_scale, 1)} (${r.batch_size})`,
          status(r.noise_scale && r.batch_size >= 0.5 * r.noise_scale && r.batch_size <= 2 * r.noise_scale, true)],
        ["edge band", `${formatNumber(r.edge_band_pct, 0)}%`, status(r.edge_band_pct >= 50, r.edge_band_pct > 0)],
        ["efficiency products", eff, ""],
        ["flat region", r.flat ? "yes" : "no", status(!r.flat, false)],
      ];
      table.replaceChildren(el("table", { class: "lab-table" }, rows.map(([k, v, c]) =>
        el("tr", {}, el("th", {}, k), el("td", { class: c }, v)))));
      advice.textContent = r.recommendation;
    } else {
      table.textContent = "no diagnostics yet";
      advice.textContent = "";
    }
    const png = model.get("surface_png");
    if (png) img.src = `data:image/png;base64,${png}`;
    const s = model.get("surface_summary") || {};
    surf.textContent = s.edge_band_fraction === undefined ? "" :
      `edge band ${(100 * s.edge_band_fraction).toFixed(1)}% of cells; flat region: ${s.flat_region ? "yes" : "no"}`;
  }
  ["reports", "surface_png", "surface_summary"].forEach((e) => model.on(`change:${e}`, update));
  update();
  return () => ["reports", "surface_png", "surface_summary"].forEach((e) => model.off(`change:${e}`, update));
}

export default { render: renderEdge };
