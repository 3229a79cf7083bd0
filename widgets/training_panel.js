// TrainingPanel front end.
// Synced state: history, status, step, total_steps, tokens_per_s, eta_s, elapsed_s, sample, hparams, log_scale, error.
// Commands go back as custom messages: {cmd: "start" | "pause" | "resume" | "stop" | "set" | "log_scale"}.

import { formatNumber, formatDuration, lineChart, sparkline, el } from "./common.js";

function renderTraining({ model, el: root }) {
  root.classList.add("lab-panel", "lab-training");
  const status = el("span", { class: "lab-badge" });
  const progressFill = el("div", { class: "lab-progress-fill" });
  const progress = el("div", { class: "lab-progress" }, progressFill);
  const stats = el("div", { class: "lab-stats" });
  const chart = el("canvas", { class: "lab-chart" });
  const lrSpark = el("canvas", { class: "lab-spark lab-spark-lr" });
  const gnSpark = el("canvas", { class: "lab-spark lab-spark-gn" });
  const sample = el("pre", { class: "lab-sample" });
  const error = el("div", { class: "lab-error" });
  const inputs = {};
  const field = (key, label, step) => {
    inputs[key] = el("input", { type: "number", step, class: `lab-input lab-input-${key}` });
    return el("label", {}, `${label} `, inputs[key]);
  };
  const send = (msg) => model.send(msg);
  const buttons = {
    start: el("button", { class: "lab-btn lab-start", onclick: () => send({ cmd: "start" }) }, "Start"),
    pause: el("button", { class: "lab-btn lab-pause", onclick: () => send({ cmd: "pause" }) }, "Pause"),
    resume: el("button", { class: "lab-btn lab-resume", onclick: () => send({ cmd: "resume" }) }, "Resume"),
    stop: el("button", { class: "lab-btn lab-stop", onclick: () => send({ cmd: "stop" }) }, "Stop"),
  };
  const presetSel = el("select", { class: "lab-input lab-input-preset" });
  const presetLabel = el("label", {}, "model ", presetSel);
  const apply = el("button", {
    class: "lab-btn lab-apply",
    onclick: () => send({ cmd: "set", values: { lr: inputs.lr.value, batch_size: inputs.batch_size.value, steps: inputs.steps.value,
      ...(model.get("presets").length ? { preset: presetSel.value } : {}) } }),
  }, "Apply");
  const logBox = el("input", { type: "checkbox", class: "lab-log", onchange: (e) => send({ cmd: "log_scale", value: e.target.checked }) });
  root.append(
    el("div", { class: "lab-header" }, el("b", {}, "Training"), status, stats),
    progress,
    el("div", { class: "lab-row" }, chart,
      el("div", { class: "lab-side" }, el("div", {}, "learning rate"), lrSpark, el("div", {}, "grad norm"), gnSpark)),
    el("div", { class: "lab-controls" }, Object.values(buttons), el("label", {}, logBox, " log scale")),
    el("div", { class: "lab-controls" }, field("lr", "lr", "0.0001"), field("batch_size", "batch", "1"), field("steps", "steps", "1"), presetLabel, apply),
    el("div", { class: "lab-caption" }, "sample"), sample, error,
  );

  function update() {
    const h = model.get("history") || [];
    const st = model.get("status");
    const step = model.get("step"), total = model.get("total_steps");
    status.textContent = st;
    status.dataset.status = st;
    progressFill.style.width = `${total ? Math.min(100, (100 * step) / total) : 0}%`;
    const last = h[h.length - 1] || {};
    stats.textContent = `step ${step} / ${total} · loss ${formatNumber(last.loss)} · val ${formatNumber(last.val_loss)} · ` +
      `${formatNumber(model.get("tokens_per_s"), 0)} tokens/s · elapsed ${formatDuration(model.get("elapsed_s"))} · ` +
      `ETA ${formatDuration(model.get("eta_s"))}`;
    lineChart(chart, [
      { label: "train loss", color: "#1f77b4", points: h.map((r) => [r.step, r.loss]) },
      { label: "val loss", color: "#ff7f0e", points: h.filter((r) => r.val_loss !== null).map((r) => [r.step, r.val_loss]) },
    ], { logY: model.get("log_scale"), xLabel: "steps" });
    sparkline(lrSpark, h.map((r) => r.lr), "#2ca02c");
    sparkline(gnSpark, h.map((r) => r.grad_norm), "#d62728");
    sample.textContent = model.get("sample") || "(a sample appears every few steps)";
    error.textContent = model.get("error") || "";
    const running = st === "running", paused = st === "paused";
    buttons.start.disabled = running || paused;
    buttons.pause.disabled = !running;
    buttons.resume.disabled = !paused;
    buttons.stop.disabled = !(running || paused);
    logBox.checked = model.get("log_scale");
  }
  function updateInputs() {
    const hp = model.get("hparams") || {};
    for (const k of ["lr", "batch_size", "steps"]) if (document.activeElement !== inputs[k]) inputs[k].value = hp[k];
    const presets = model.get("presets") || [];
    presetLabel.style.display = presets.length ? "" : "none";
    presetSel.replaceChildren(...presets.map((p) => el("option", { value: p }, p)));
    presetSel.value = hp.preset;
  }
  const events = ["history", "status", "step", "total_steps", "sample", "error", "log_scale", "tokens_per_s", "eta_s"];
  events.forEach((e) => model.on(`change:${e}`, update));
  model.on("change:hparams", updateInputs);
  model.on("change:presets", updateInputs);
  update();
  updateInputs();
  return () => {
    events.forEach((e) => model.off(`change:${e}`, update));
    model.off("change:hparams", updateInputs);
    model.off("change:presets", updateInputs);
  };
}

export default { render: renderTraining };
