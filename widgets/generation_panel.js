// GenerationPanel front end. Synced: prompt, temperature, top_k, top_p, max_tokens, beams, has_adapter,
// adapter_mode, output, base_output, running, error. "Generate" sends {cmd: "generate"}; output streams in;
// "Stop" sends {cmd: "stop"} and the text made so far stays. In chat mode (synced chat, history, base_history)
// the prompt box is the user's message, "Send" sends {cmd: "generate"}, the turns are shown with the reply
// streaming into the last one, and "Clear" sends {cmd: "clear"}.

import { el } from "./common.js";

function renderGeneration({ model, el: root }) {
  root.classList.add("lab-panel", "lab-generation");
  const prompt = el("textarea", { class: "lab-prompt", rows: 3, cols: 60 });
  prompt.oninput = () => { model.set("prompt", prompt.value); model.save_changes(); };
  const num = (key, label, step) => {
    const input = el("input", { type: "number", step, class: `lab-input lab-input-${key}` });
    input.onchange = () => { model.set(key, key === "temperature" || key === "top_p" ? parseFloat(input.value) : parseInt(input.value, 10)); model.save_changes(); };
    return [input, el("label", {}, `${label} `, input)];
  };
  const [temp, tempL] = num("temperature", "temperature", "0.1");
  const [topk, topkL] = num("top_k", "top-k", "1");
  const [topp, toppL] = num("top_p", "top-p", "0.05");
  const [maxt, maxtL] = num("max_tokens", "max tokens", "10");
  const [beams, beamsL] = num("beams", "beams", "1");
  const mode = el("select", { class: "lab-adapter-mode" }, ["adapter", "base", "both"].map((m) => el("option", { value: m }, m)));
  mode.onchange = () => { model.set("adapter_mode", mode.value); model.save_changes(); };
  const modeL = el("label", {}, "LoRA ", mode);
  const go = el("button", { class: "lab-btn lab-generate", onclick: () => model.send({ cmd: "generate" }) }, "Generate");
  const stop = el("button", { class: "lab-btn lab-stop", onclick: () => model.send({ cmd: "stop" }) }, "Stop");
  const clear = el("button", { class: "lab-btn lab-clear", onclick: () => model.send({ cmd: "clear" }) }, "Clear");
  const turn = (role, text) => el("div", { class: `lab-turn lab-turn-${role}` }, el("b", {}, `${role}: `), text);
  // one conversation: its turns, then the reply being made (streaming) as the assistant's last turn while the
  // user's message waits for it (in "both" mode the other side's column is finished or not begun)
  const conversation = (turns, streaming) => el("div", { class: "lab-chat" }, ...turns.map((m) => turn(m.role, m.content)),
    ...(model.get("running") && turns.length && turns[turns.length - 1].role === "user" ? [turn("assistant", streaming)] : []));
  const out = el("pre", { class: "lab-output" });
  const baseOut = el("pre", { class: "lab-output lab-output-base" });
  const outs = el("div", { class: "lab-row" });
  const error = el("div", { class: "lab-error" });
  const title = el("b", {}, "Generate");
  root.append(el("div", { class: "lab-header" }, title), prompt,
    el("div", { class: "lab-controls" }, tempL, topkL, toppL, maxtL, beamsL, modeL, go, stop, clear), outs, error);

  function update() {
    if (document.activeElement !== prompt) prompt.value = model.get("prompt");
    for (const [node, key] of [[temp, "temperature"], [topk, "top_k"], [topp, "top_p"], [maxt, "max_tokens"], [beams, "beams"]]) {
      if (document.activeElement !== node) node.value = model.get(key);
    }
    modeL.style.display = model.get("has_adapter") ? "" : "none";
    mode.value = model.get("adapter_mode");
    const both = model.get("has_adapter") && model.get("adapter_mode") === "both";
    const chat = model.get("chat");
    root.classList.toggle("lab-generation-chat", chat);
    go.textContent = chat ? "Send" : "Generate";
    title.textContent = chat ? "Chat" : "Generate";
    clear.style.display = chat ? "" : "none";
    beamsL.style.display = chat ? "none" : "";
    const shown = chat ? conversation(model.get("history"), model.get("output")) : out;
    const baseShown = chat ? conversation(model.get("base_history"), model.get("base_output")) : baseOut;
    if (!chat) {
      out.textContent = model.get("prompt") + model.get("output");
      baseOut.textContent = model.get("prompt") + model.get("base_output");
    }
    outs.replaceChildren(...(both ? [el("div", {}, el("div", { class: "lab-caption" }, "with adapter"), shown),
      el("div", {}, el("div", { class: "lab-caption" }, "base"), baseShown)] : [shown]));
    go.disabled = model.get("running");
    stop.disabled = !model.get("running");
    error.textContent = model.get("error") || "";
  }
  const keys = ["prompt", "temperature", "top_k", "top_p", "max_tokens", "beams", "has_adapter", "adapter_mode", "output", "base_output", "running", "error", "chat", "history", "base_history"];
  keys.forEach((k) => model.on(`change:${k}`, update));
  update();
  return () => keys.forEach((k) => model.off(`change:${k}`, update));
}

export default { render: renderGeneration };
