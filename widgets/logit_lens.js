// LogitLensPanel front end. Synced: prompt, k, running, error, tokens (columns), labels (rows: embed, L0, ...), vocab
// ({id: text}), top_ids (int32 bytes, (rows, T, k)), top_probs (float32 bytes, (rows, T, k)), final_rank (int32
// bytes, (rows, T)). Each cell shows the row's top token at that position, shaded by its probability; hovering it
// lists the top-k and the rank of the model's final prediction there. "Run" sends {cmd: "run"} for the typed prompt.

import { el } from "./common.js";

const view = (dv, Type) => (dv && dv.byteLength ? new Type(dv.buffer.slice(dv.byteOffset, dv.byteOffset + dv.byteLength)) : new Type(0));
const shown = (text) => text.replace(/\n/g, "↵").replace(/ /g, "␣");   // a space token is not a blank cell

function renderLogitLens({ model, el: root }) {
  root.classList.add("lab-panel", "lab-logit-lens");
  const prompt = el("textarea", { class: "lab-prompt", rows: 2, cols: 60 });
  prompt.oninput = () => { model.set("prompt", prompt.value); model.save_changes(); };
  const go = el("button", { class: "lab-btn lab-run", onclick: () => model.send({ cmd: "run" }) }, "Run");
  const grid = el("div", { class: "lab-grid" });
  const tip = el("div", { class: "lab-tooltip" });
  const error = el("div", { class: "lab-error" });
  root.append(el("div", { class: "lab-header" }, el("b", {}, "Logit lens"),
    el("span", { class: "lab-caption" }, "each layer's residual stream through the final norm and the unembedding")),
  prompt, el("div", { class: "lab-controls" }, go), error, grid, tip);

  let ids, probs, ranks;
  function hoverCell(r, p) {
    const k = model.get("k"), T = model.get("tokens").length, vocab = model.get("vocab"), off = (r * T + p) * k;
    const rows = Array.from({ length: k }, (_, j) => el("tr", {},
      el("td", {}, JSON.stringify(vocab[ids[off + j]] ?? String(ids[off + j]))), el("td", {}, probs[off + j].toFixed(3))));
    const rank = ranks[r * T + p];
    tip.replaceChildren(el("div", {}, `${model.get("labels")[r]} at position ${p} ${JSON.stringify(model.get("tokens")[p])}: ` +
      `the final prediction ranks ${rank + 1}`), el("table", { class: "lab-top" }, ...rows));
  }
  function draw() {
    ids = view(model.get("top_ids"), Int32Array);
    probs = view(model.get("top_probs"), Float32Array);
    ranks = view(model.get("final_rank"), Int32Array);
    const tokens = model.get("tokens"), labels = model.get("labels"), k = model.get("k"), vocab = model.get("vocab");
    const T = tokens.length;
    grid.style.gridTemplateColumns = `auto repeat(${T}, minmax(2.2em, auto))`;
    const cells = [el("div", {})];
    tokens.forEach((tok) => cells.push(el("div", { class: "lab-grid-head", title: tok }, shown(tok))));
    if (ids.length !== labels.length * T * k) { grid.replaceChildren(); return; }   // (traits mid-update)
    labels.forEach((label, r) => {
      cells.push(el("div", { class: "lab-grid-row" }, label));
      for (let p = 0; p < T; p++) {
        const off = (r * T + p) * k, prob = probs[off], text = vocab[ids[off]] ?? String(ids[off]);
        const cell = el("div", { class: "lab-cell", style: `background: rgba(31, 119, 180, ${(0.9 * prob).toFixed(3)});` +
          (prob > 0.55 ? " color: #fff;" : "") }, shown(text).slice(0, 8), el("small", {}, prob.toFixed(2)));
        cell.dataset.row = String(r);
        cell.dataset.pos = String(p);
        cell.dataset.token = text;
        cell.addEventListener("mouseenter", () => hoverCell(r, p));
        cells.push(cell);
      }
    });
    grid.replaceChildren(...cells);
    grid.dataset.cells = String(labels.length * T);
  }
  function update() {
    if (document.activeElement !== prompt) prompt.value = model.get("prompt");
    go.disabled = model.get("running");
    error.textContent = model.get("error") || "";
  }
  const data = ["tokens", "labels", "vocab", "top_ids", "top_probs", "final_rank", "k"], state = ["prompt", "running", "error"];
  data.forEach((key) => model.on(`change:${key}`, draw));
  state.forEach((key) => model.on(`change:${key}`, update));
  grid.addEventListener("mouseleave", () => tip.replaceChildren());
  draw();
  update();
  return () => { data.forEach((key) => model.off(`change:${key}`, draw)); state.forEach((key) => model.off(`change:${key}`, update)); };
}

export default { render: renderLogitLens };
