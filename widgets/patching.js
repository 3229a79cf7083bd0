// PatchingPanel front end. Synced: clean, corrupted, answer, wrong, hook (settable); running, error, tokens,
// corrupted_tokens, labels (rows), values (float32 bytes, (rows, T): the restored logit difference, NaN where not
// patched), shown_hook (the hook of the run shown), clean_diff, corrupted_diff, clean_top / corrupted_top / cell_top ([[token, prob], ...]), cell ([row, pos]).
// "Run" sends {cmd: "run"}, "Stop" {cmd: "stop"} (the run ends at its next forward, the last heatmap stays); a click on a cell sends {cmd: "cell", layer, pos} and the kernel answers with cell_top.

import { el, formatNumber } from "./common.js";

const shown = (text) => text.replace(/\n/g, "↵").replace(/ /g, "␣");   // a space token is not a blank cell

// white at 0, red towards 1 (the clean answer restored), blue below 0
function colour(v) {
  if (!Number.isFinite(v)) return "#eee";
  const a = Math.min(Math.abs(v), 1);
  return v >= 0 ? `rgb(255, ${Math.round(255 - 200 * a)}, ${Math.round(255 - 200 * a)})`
    : `rgb(${Math.round(255 - 200 * a)}, ${Math.round(255 - 150 * a)}, 255)`;
}

function topTable(title, top, cls) {
  return el("div", { class: `lab-side ${cls}` }, el("b", {}, title), el("table", { class: "lab-top" },
    ...top.map(([tok, p]) => el("tr", {}, el("td", {}, JSON.stringify(tok)), el("td", {}, p.toFixed(3))))));
}

function renderPatching({ model, el: root }) {
  root.classList.add("lab-panel", "lab-patching");
  const field = (key, tag, attrs) => {
    const node = el(tag, { class: `lab-prompt lab-input-${key}`, ...attrs });
    node.oninput = () => { model.set(key, node.value); model.save_changes(); };
    return node;
  };
  const clean = field("clean", "textarea", { rows: 2 }), corrupted = field("corrupted", "textarea", { rows: 2 });
  const answer = field("answer", "input", { type: "text" }), wrong = field("wrong", "input", { type: "text" });
  answer.classList.remove("lab-prompt"); wrong.classList.remove("lab-prompt");
  const hook = el("select", { class: "lab-hook" }, ["resid_pre", "attn_out", "mlp_out", "resid_post"].map((h) => el("option", { value: h }, h)));
  hook.onchange = () => { model.set("hook", hook.value); model.save_changes(); };
  const go = el("button", { class: "lab-btn lab-run", onclick: () => model.send({ cmd: "run" }) }, "Run");
  const stop = el("button", { class: "lab-btn lab-stop", onclick: () => model.send({ cmd: "stop" }) }, "Stop");
  const status = el("span", { class: "lab-stats" });
  const error = el("div", { class: "lab-error" });
  const grid = el("div", { class: "lab-grid" });
  const caption = el("div", { class: "lab-caption lab-shown" });
  const tip = el("div", { class: "lab-tooltip" });
  const tops = el("div", { class: "lab-row lab-tops" });
  root.append(el("div", { class: "lab-header" }, el("b", {}, "Activation patching"),
    el("span", { class: "lab-caption" }, "clean activations patched into the corrupted run, one cell at a time")),
  el("div", { class: "lab-pair" }, el("label", {}, "clean", clean), el("label", {}, "corrupted", corrupted)),
  el("div", { class: "lab-controls" }, el("label", {}, "answer ", answer), el("label", {}, "wrong ", wrong),
    el("label", {}, "patch ", hook), go, stop, status), error, caption, grid, tip, tops);

  let values = new Float32Array(0);
  function draw() {
    const dv = model.get("values");
    values = dv && dv.byteLength ? new Float32Array(dv.buffer.slice(dv.byteOffset, dv.byteOffset + dv.byteLength)) : new Float32Array(0);
    const tokens = model.get("tokens"), labels = model.get("labels"), T = tokens.length, sel = model.get("cell");
    caption.textContent = T ? `fraction of the clean logit difference restored by patching ${model.get("shown_hook")} ` +
      "(rows: layers, columns: positions; click a cell for that run's prediction)" : "";
    if (values.length !== labels.length * T || !T) { grid.replaceChildren(); grid.dataset.cells = "0"; return; }
    grid.style.gridTemplateColumns = `auto repeat(${T}, minmax(2.2em, auto))`;
    const cells = [el("div", {})];
    tokens.forEach((tok) => cells.push(el("div", { class: "lab-grid-head", title: tok }, shown(tok))));
    labels.forEach((label, r) => {
      cells.push(el("div", { class: "lab-grid-row" }, label));
      for (let p = 0; p < T; p++) {
        const v = values[r * T + p];
        const cell = el("div", { class: "lab-cell", style: `background: ${colour(v)}` }, Number.isFinite(v) ? (Math.abs(v) < 0.005 ? "0.00" : v.toFixed(2)) : "");
        cell.dataset.row = String(r);
        cell.dataset.pos = String(p);
        cell.classList.toggle("selected", sel.length === 2 && sel[0] === r && sel[1] === p);
        cell.addEventListener("mouseenter", () => {
          tip.textContent = `${label} at position ${p} ${JSON.stringify(tokens[p])} (corrupted ` +
            `${JSON.stringify(model.get("corrupted_tokens")[p])}): restores ${formatNumber(v, 3)} of the logit difference`;
        });
        cell.addEventListener("click", () => model.send({ cmd: "cell", layer: r, pos: p }));
        cells.push(cell);
      }
    });
    grid.replaceChildren(...cells);
    grid.dataset.cells = String(labels.length * T);
  }
  function drawTops() {
    const sel = model.get("cell"), labels = model.get("labels"), tokens = model.get("tokens");
    const parts = [];
    if (model.get("clean_top").length) parts.push(topTable(`clean (diff ${formatNumber(model.get("clean_diff"), 3)})`, model.get("clean_top"), "lab-top-clean"));
    if (model.get("corrupted_top").length) parts.push(topTable(`corrupted (diff ${formatNumber(model.get("corrupted_diff"), 3)})`, model.get("corrupted_top"), "lab-top-corrupted"));
    if (sel.length === 2 && model.get("cell_top").length) {
      parts.push(topTable(`patched ${labels[sel[0]]} at ${sel[1]} ${JSON.stringify(tokens[sel[1]])}`, model.get("cell_top"), "lab-top-cell"));
    }
    tops.replaceChildren(...parts);
  }
  function update() {
    for (const [node, key] of [[clean, "clean"], [corrupted, "corrupted"], [answer, "answer"], [wrong, "wrong"]]) {
      if (document.activeElement !== node) node.value = model.get(key);
    }
    hook.value = model.get("hook");
    go.disabled = model.get("running");
    stop.disabled = !model.get("running");
    status.textContent = model.get("running") ? "running…" : "";
    error.textContent = model.get("error") || "";
  }
  const data = ["values", "tokens", "labels", "cell", "shown_hook"], side = ["clean_top", "corrupted_top", "cell_top", "cell", "clean_diff", "corrupted_diff"];
  const state = ["clean", "corrupted", "answer", "wrong", "hook", "running", "error"];
  data.forEach((key) => model.on(`change:${key}`, draw));
  side.forEach((key) => model.on(`change:${key}`, drawTops));
  state.forEach((key) => model.on(`change:${key}`, update));
  grid.addEventListener("mouseleave", () => { tip.textContent = ""; });
  draw();
  drawTops();
  update();
  return () => {
    data.forEach((key) => model.off(`change:${key}`, draw));
    side.forEach((key) => model.off(`change:${key}`, drawTops));
    state.forEach((key) => model.off(`change:${key}`, update));
  };
}

export default { render: renderPatching };
