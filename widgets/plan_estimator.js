// PlanEstimator front end. Synced: presets, devices, form (the plan's inputs), result (the plan), error.
// Every change of an input sends {cmd: "set", values: {...}}; Python recomputes and updates `result`.

import { formatDuration, el } from "./common.js";

function renderPlan({ model, el: root }) {
  root.classList.add("lab-panel", "lab-plan");
  const inputs = {};
  const set = (key, value) => model.send({ cmd: "set", values: { [key]: value } });
  const select = (key, options) => {
    inputs[key] = el("select", { class: `lab-input lab-input-${key}`, onchange: (e) => set(key, e.target.value) },
      options.map((o) => el("option", { value: o }, o)));
    return el("label", {}, `${key.replace("_", " ")} `, inputs[key]);
  };
  let timer = null;  // recompute while typing, at most every 150 ms
  const number = (key) => {
    inputs[key] = el("input", { type: "number", class: `lab-input lab-input-${key}`, oninput: (e) => {
      clearTimeout(timer);
      timer = setTimeout(() => set(key, e.target.value), 150);
    } });
    return el("label", {}, `${key.replace("_", " ")} `, inputs[key]);
  };
  const bars = el("div", { class: "lab-bars" });
  const summary = el("div", { class: "lab-summary" });
  const verdict = el("div", { class: "lab-verdict" });
  const notes = el("ul", { class: "lab-notes" });
  const error = el("div", { class: "lab-error" });
  root.append(
    el("div", { class: "lab-header" }, el("b", {}, "Plan a training run")),
    el("div", { class: "lab-controls" }, select("preset", model.get("presets")), number("n_layer"), number("n_head"),
      number("n_embd"), number("vocab_size"), number("block_size")),
    el("div", { class: "lab-controls" }, number("batch"), number("seq"), number("tokens"), select("precision", ["fp32"]),
      select("mode", ["full", "lora"]), number("lora_rank"), select("device", model.get("devices"))),
    verdict, summary, bars, notes, error,
  );
  const colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];

  function update() {
    const f = model.get("form") || {};
    for (const [k, node] of Object.entries(inputs)) if (document.activeElement !== node && f[k] !== undefined) node.value = f[k];
    inputs.lora_rank.disabled = f.mode !== "lora";
    const r = model.get("result") || {};
    error.textContent = model.get("error") || "";
    if (!r.memory) return;
    const mem = r.memory, total = mem.total, cap = r.device_memory;
    const parts = Object.entries(mem).filter(([k]) => !["total", "activations", "activations per layer"].includes(k) && !k.startsWith("KV"));
    const scale = Math.max(total, cap);
    bars.replaceChildren(
      el("div", { class: "lab-caption" }, `memory: ${(total / 2 ** 20).toFixed(1)} MiB of ${(cap / 2 ** 30).toFixed(1)} GiB`),
      el("div", { class: "lab-membar" }, parts.map(([k, v], i) => {
        const seg = el("span", { class: "lab-bar", title: `${k}: ${(v / 2 ** 20).toFixed(1)} MiB` });
        seg.style.width = `${(100 * v) / scale}%`;
        seg.style.background = colors[i % colors.length];
        return seg;
      })),
      el("div", { class: "lab-legend" }, parts.map(([k, v], i) => el("span", { class: "lab-legend-item" },
        el("span", { class: "lab-swatch", style: `background:${colors[i % colors.length]}` }), ` ${k} ${(v / 2 ** 20).toFixed(1)} MiB `))),
    );
    summary.replaceChildren(el("table", { class: "lab-table" }, [
      ["parameters", `${r.params.toLocaleString()} (${r.trainable_params.toLocaleString()} trainable)`],
      ["FLOPs", `${r.flops_per_token.toLocaleString()} per token, ${r.total_flops.toExponential(2)} in total`],
      ["step time", `${(r.step_time_s * 1e3).toFixed(1)} ms × ${r.steps.toLocaleString()} steps`],
      ["predicted time", formatDuration(r.total_time_s)],
      ["device", `${r.device_name} (${r.device_source.split(":")[0]})`],
      ["largest buffer", `${r.largest_buffer[0]}: ${(r.largest_buffer[1] / 2 ** 20).toFixed(1)} MiB`],
    ].map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", { class: `lab-value lab-${k.replace(" ", "-")}` }, v)))));
    verdict.textContent = r.fits ? "fits" : `does not fit: ${r.reasons.join("; ")}`;
    verdict.className = `lab-verdict ${r.fits ? "lab-good" : "lab-bad"}`;
    notes.replaceChildren(...r.suggestions.map((s) => el("li", {}, s)));
  }
  ["form", "result", "error"].forEach((e) => model.on(`change:${e}`, update));
  update();
  return () => ["form", "result", "error"].forEach((e) => model.off(`change:${e}`, update));
}

export default { render: renderPlan };
