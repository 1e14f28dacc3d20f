// Playground: chat with a final model or adapter (streamed through the tunelab serve stack), two side by
// side on the same prompt, and save which answer is better as a human label for tunelab compare.
import { api, h, notice, showError } from "../ui.js";

// Stream an OpenAI chat completion (server-sent events); onText gets each piece of text.
export async function streamChat(url, body, onText) {
  const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json", "X-Tunelab-UI": "1" },
                                      body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { const data = await response.json(); message = (data.error && (data.error.message || data.error)) || message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const payload = event.slice(6);
      if (payload === "[DONE]") return finish;
      const data = JSON.parse(payload);
      if (data.error) throw new Error(data.error.message || String(data.error));
      const choice = data.choices && data.choices[0];
      if (choice && choice.delta && choice.delta.content) onText(choice.delta.content);
      if (choice && choice.finish_reason) finish = choice.finish_reason;
    }
  }
  return finish;
}

function modelPicker(id, models, initial) {
  const list = h("datalist", { id: `${id}-list` }, models.map((m) => h("option", { value: m.path }, m.label)));
  const input = h("input", { id, list: `${id}-list`, class: "grow", placeholder: "model or adapter directory", value: initial || "" });
  return { input, list };
}

export async function render(main, { query }) {
  const { models } = await api("/api/playground/models");
  main.append(h("h1", {}, "Playground"));
  const a = modelPicker("model-a", models, query.get("model") || (models[0] && models[0].path));
  const b = modelPicker("model-b", models, query.get("model_b") || "");
  const sideBySide = h("input", { type: "checkbox", id: "side-by-side", checked: Boolean(query.get("model_b")) });
  const system = h("textarea", { id: "system", rows: 2, placeholder: "system prompt (optional)" });
  const temperature = h("input", { id: "temperature", type: "number", step: "0.1", min: 0, max: 2, value: 0, style: "width:6em" });
  const topP = h("input", { id: "top-p", type: "number", step: "0.05", min: 0.05, max: 1, value: 1, style: "width:6em" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 2048, value: 64, style: "width:7em" });
  const seed = h("input", { id: "seed", type: "number", value: 0, style: "width:6em" });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "your message (Ctrl+Enter sends)" });
  const send = h("button", { class: "primary", id: "send", type: "submit" }, "Send");
  const clear = h("button", { type: "button", onclick: () => { history.length = 0; draw(); judgeBox.replaceChildren(); } }, "New chat");
  const bRow = h("label", { class: "grow", hidden: !sideBySide.checked }, "model B", b.input);
  sideBySide.addEventListener("change", () => { bRow.hidden = !sideBySide.checked; draw(); });
  main.append(h("div", { class: "card" },
    h("div", { class: "row" }, h("label", { class: "grow" }, "model A", a.input), a.list, b.list,
      h("label", { class: "row small" }, sideBySide, " side by side"), bRow),
    h("div", { class: "row" }, h("label", {}, "temperature", temperature), h("label", {}, "top p", topP),
      h("label", {}, "max tokens", maxTokens), h("label", {}, "seed", seed)),
    h("label", { class: "small muted", for: "system" }, "system prompt"), system));
  const panels = h("div", { class: "chat", id: "chat" });
  const judgeBox = h("div", { class: "judge", id: "judge" });
  const form = h("form", { class: "card", onsubmit: (e) => { e.preventDefault(); ask(); } }, prompt, h("div", { class: "row" }, send, clear));
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); ask(); } });
  main.append(panels, judgeBox, form);
  if (!models.length) main.append(notice("note", "no final models in the registry yet; type a model or adapter directory"));

  // history: [{user, answers: [textA, textB]}]
  const history = [];
  const loaded = {};
  function sides() { return sideBySide.checked ? [a.input.value.trim(), b.input.value.trim()] : [a.input.value.trim()]; }
  function draw() {
    panels.replaceChildren(...sides().map((path, side) => h("div", { class: "panel", dataset: { side: String(side) } },
      h("div", { class: "small muted mono" }, `${side ? "B" : "A"}: ${loaded[path] ? loaded[path].name : path || "(choose a model)"}`),
      h("div", { class: "messages" }, system.value.trim() ? h("div", { class: "message system" }, system.value.trim()) : "",
        history.flatMap((turn) => [h("div", { class: "message user" }, turn.user),
          h("div", { class: "message assistant", dataset: { testid: `answer-${side}` } }, turn.answers[side] ?? "")])))));
  }
  async function load(path) {
    if (!path) throw new Error("choose a model (a final model or adapter directory)");
    if (!loaded[path]) loaded[path] = await api("/api/playground/load", { method: "POST", body: { path } });
    return loaded[path];
  }
  async function ask() {
    const text = prompt.value.trim();
    if (!text) return;
    const paths = sides();
    send.disabled = true;
    judgeBox.replaceChildren();
    const turn = { user: text, answers: paths.map(() => "") };
    const before = history.slice();
    history.push(turn);
    prompt.value = "";
    draw();
    try {
      const targets = [];
      for (const path of paths) targets.push(await load(path));  // one at a time: loading is memory-heavy
      draw();
      const messages = side => [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []),
        ...before.flatMap((t) => [{ role: "user", content: t.user }, { role: "assistant", content: t.answers[side] }]),
        { role: "user", content: text }];
      await Promise.all(targets.map((target, side) => streamChat(target.chat_url, {
        model: target.name, messages: messages(side), temperature: Number(temperature.value), top_p: Number(topP.value),
        max_tokens: Number(maxTokens.value), seed: Number(seed.value),
      }, (piece) => {
        turn.answers[side] += piece;
        const box = panels.querySelectorAll(".panel")[side].querySelectorAll(".message.assistant");
        box[box.length - 1].textContent = turn.answers[side];
      })));
      if (targets.length === 2) offerJudgement(messages(0), targets, turn);
    } catch (error) {
      showError(error);
    } finally { send.disabled = false; }
  }
  function offerJudgement(messages, targets, turn) {
    const save = async (winner) => {
      try {
        const result = await api("/api/playground/label", { method: "POST", body: {
          messages, model_a: targets[0].name, model_b: targets[1].name, answer_a: turn.answers[0], answer_b: turn.answers[1], winner } });
        judgeBox.replaceChildren(h("div", { class: "notice note", "data-testid": "label-saved" },
          `saved label ${result.id} (${result.count} in ${result.labels}); compare with:\n${result.command}`));
      } catch (error) { showError(error); }
    };
    judgeBox.replaceChildren(h("span", {}, "Which answer is better?"),
      h("button", { id: "judge-a", onclick: () => save("a") }, "A is better"),
      h("button", { id: "judge-tie", onclick: () => save("tie") }, "Tie"),
      h("button", { id: "judge-b", onclick: () => save("b") }, "B is better"));
  }
  draw();
}
