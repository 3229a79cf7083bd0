// AttentionHeatmap front end. Synced: tokens, n_layer, layers (the model layer of each of the n_layer shown: all, or
// those a cache holds), n_head, n_kv_head, weights (float32 bytes, (n_layer, H, T, T)), layer (a model layer), head. The main heatmap shows one query head (rows: queries, columns: keys); hovering a cell highlights its
// row and column and shows the weight; the grid of thumbnails shows every layer x head, and clicking one opens it.
// With grouped-query attention (n_kv_head < n_head) each run of n_head / n_kv_head query heads reads one key-value
// head: the grid groups them under it and the head menu names it. Below the map the tokens themselves: hovering one
// shades every token by the attention it pays them (circuitsvis' token view) and outlines its row in the map.

import { setupCanvas, el } from "./common.js";

function renderAttention({ model, el: root }) {
  root.classList.add("lab-panel", "lab-attention");
  const layerSel = el("select", { class: "lab-layer" });
  const headSel = el("select", { class: "lab-head" });
  const main = el("canvas", { class: "lab-heatmap" });
  const tip = el("div", { class: "lab-tooltip" });
  const thumbs = el("div", { class: "lab-heat-thumbs" });
  const caption = el("div", { class: "lab-caption" });
  const strip = el("div", { class: "lab-token-strip" });
  root.append(el("div", { class: "lab-header" }, el("b", {}, "Attention"), el("label", {}, "layer ", layerSel),
    el("label", {}, "head ", headSel)), main, tip, strip, caption, thumbs);

  let data = new Float32Array(0), T = 0, hover = null;
  const select = (layer, head) => { model.set("layer", layer); model.set("head", head); model.save_changes(); };
  layerSel.onchange = () => select(+layerSel.value, model.get("head"));
  headSel.onchange = () => select(model.get("layer"), +headSel.value);

  function weightsOf(l, h) {   // l: a model layer
    const H = model.get("n_head"), off = (Math.max(model.get("layers").indexOf(l), 0) * H + h) * T * T;
    return data.subarray(off, off + T * T);
  }
  // One pixel per cell in an ImageData, scaled up without smoothing: fast even for 256 x 256 cells and a grid
  // of many thumbnails (drawing cells one rectangle at a time would stall the page at block_size).
  const cellImage = document.createElement("canvas");
  function paint(canvas, w, size, highlight) {
    const ctx = setupCanvas(canvas, size, size);
    let maxW = 0;
    for (let i = 0; i < w.length; i++) maxW = Math.max(maxW, w[i]);
    cellImage.width = T;
    cellImage.height = T;
    const cctx = cellImage.getContext("2d");
    const img = cctx.createImageData(T, T);
    for (let i = 0; i < T * T; i++) {
      const v = maxW ? w[i] / maxW : 0;
      img.data[4 * i] = 255 - 225 * v;
      img.data[4 * i + 1] = 255 - 160 * v;
      img.data[4 * i + 2] = 255 - 40 * v;
      img.data[4 * i + 3] = 255;
    }
    cctx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(cellImage, 0, 0, size, size);
    if (highlight) {
      const cell = size / T;
      ctx.strokeStyle = "#d62728";
      ctx.lineWidth = 1.5;
      ctx.strokeRect(0, highlight.q * cell, size, cell);
      if (highlight.k !== null) ctx.strokeRect(highlight.k * cell, 0, cell, size);
    }
  }
  function drawMain() {
    if (!T) return;
    const size = Math.min(480, Math.max(160, T * 12));
    paint(main, weightsOf(model.get("layer"), model.get("head")), size, hover);
    main.dataset.cells = String(T * T);
    main.dataset.layer = String(model.get("layer"));
    main.dataset.head = String(model.get("head"));
  }
  main.addEventListener("mousemove", (e) => {
    if (!T) return;
    const rect = main.getBoundingClientRect(), cell = rect.width / T;
    const k = Math.floor((e.clientX - rect.left) / cell), q = Math.floor((e.clientY - rect.top) / cell);
    if (q < 0 || k < 0 || q >= T || k >= T) return;
    hover = { q, k };
    const tokens = model.get("tokens");
    tip.textContent = `query ${q} ${JSON.stringify(tokens[q])} → key ${k} ${JSON.stringify(tokens[k])}: ` +
      `${weightsOf(model.get("layer"), model.get("head"))[q * T + k].toFixed(3)}`;
    drawMain();
  });
  main.addEventListener("mouseleave", () => { hover = null; tip.textContent = ""; drawMain(); });
  function shadeTokens(q) {   // q: the hovered query position, or null
    const w = q === null ? null : weightsOf(model.get("layer"), model.get("head")).subarray(q * T, q * T + T);
    let maxW = 0;
    if (w) for (let k = 0; k <= q; k++) maxW = Math.max(maxW, w[k]);
    strip.querySelectorAll(".lab-token").forEach((span, k) => {
      const v = w && maxW ? w[k] / maxW : 0;
      span.style.background = w ? `rgba(31, 119, 180, ${(0.85 * v).toFixed(3)})` : "";
      span.classList.toggle("lab-token-query", k === q);
      span.title = w ? `${JSON.stringify(model.get("tokens")[q])} → ${JSON.stringify(model.get("tokens")[k])}: ${w[k].toFixed(3)}` : "";
    });
  }
  function tokenStrip() {
    strip.replaceChildren(...model.get("tokens").map((text, q) => {
      const span = el("span", { class: "lab-token" }, text.replace(/\n/g, "↵"));
      span.dataset.pos = String(q);
      span.addEventListener("mouseenter", () => {
        hover = { q, k: null };
        const tokens = model.get("tokens");
        tip.textContent = `query ${q} ${JSON.stringify(tokens[q])} attends to the shaded tokens`;
        shadeTokens(q);
        drawMain();
      });
      span.addEventListener("mouseleave", () => { hover = null; tip.textContent = ""; shadeTokens(null); drawMain(); });
      return span;
    }));
  }

  function load() {
    const dv = model.get("weights");
    data = dv && dv.byteLength ? new Float32Array(dv.buffer.slice(dv.byteOffset, dv.byteOffset + dv.byteLength)) : new Float32Array(0);
    T = model.get("tokens").length;
    const layers = model.get("layers"), H = model.get("n_head");
    const KV = model.get("n_kv_head") || H, G = H / KV, grouped = KV < H;
    const kvOf = (h) => Math.floor(h / G), span = (g) => `${g * G}–${g * G + G - 1}`;
    layerSel.replaceChildren(...layers.map((l) => el("option", { value: l }, String(l))));
    headSel.replaceChildren(...Array.from({ length: H }, (_, h) =>
      el("option", { value: h }, grouped ? `${h} (kv ${kvOf(h)})` : String(h))));
    caption.textContent = grouped
      ? "every layer x query head; the heads under one kv head share its keys and values (click to open)"
      : "every layer x head (click to open)";
    thumbs.style.gridTemplateColumns = `repeat(${H}, auto)`;
    thumbs.replaceChildren(...(grouped ? Array.from({ length: KV }, (_, g) =>
      el("div", { class: "lab-kv-group", style: `grid-column: span ${G}` }, `kv head ${g}: heads ${span(g)}`)) : []));
    for (const l of layers) for (let h = 0; h < H; h++) {
      const title = `layer ${l}, head ${h}` + (grouped ? `, reads kv head ${kvOf(h)} with heads ${span(kvOf(h))}` : "");
      const c = el("canvas", { class: "lab-heat-thumb" + (grouped && h % G === 0 && h ? " lab-kv-start" : ""), title });
      c.dataset.layer = String(l);
      c.dataset.head = String(h);
      c.dataset.kvHead = String(kvOf(h));
      c.addEventListener("click", () => select(l, h));
      paint(c, weightsOf(l, h), 56, null);
      thumbs.append(c);
    }
    tokenStrip();
    refresh();
  }
  function refresh() {
    hover = null;
    shadeTokens(null);
    layerSel.value = model.get("layer");
    headSel.value = model.get("head");
    for (const c of thumbs.querySelectorAll("canvas")) {
      c.classList.toggle("selected", +c.dataset.layer === model.get("layer") && +c.dataset.head === model.get("head"));
    }
    drawMain();
  }
  model.on("change:weights", load);
  model.on("change:layer", refresh);
  model.on("change:head", refresh);
  load();
  return () => { model.off("change:weights", load); model.off("change:layer", refresh); model.off("change:head", refresh); };
}

export default { render: renderAttention };
