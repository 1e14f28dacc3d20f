// Data: a dataset through a config exactly as training sees it (rendered, masked, counted).
import { histogram } from "../plot.js";
import { api, fmt, h, notice, remember, showError, stat } from "../ui.js";

function example(ex) {
  return h("div", { class: "card example", dataset: { index: ex.index } },
    h("h3", {}, `example ${ex.index + 1}`),
    ex.views.map((view) => h("div", {},
      h("p", { class: "small muted" }, ex.views.length > 1 ? `${view.name}: ` : "",
        h("span", { "data-testid": "tokens" }, fmt(view.tokens)), " tokens, ",
        h("span", { "data-testid": "trained-tokens" }, fmt(view.trained_tokens)), " trained (highlighted)"),
      h("div", { class: "tokens" }, view.segments.map((s) => s.trained ?
        h("mark", { class: "trained", title: `${s.tokens} trained tokens` }, s.text) : h("span", { title: `${s.tokens} masked tokens` }, s.text))))));
}

export async function render(main, { query }) {
  main.append(h("h1", {}, "Data, as training sees it"));
  const path = remember("data.config", h("input", { id: "data-config", class: "grow", placeholder: "path/to/run.yaml", value: query.get("config") || "" }));
  const overrides = h("input", { id: "data-overrides", class: "grow", placeholder: "overrides: data.max_length=512 data.train_on=all" });
  const count = h("input", { id: "data-n", type: "number", min: 1, max: 50, value: 3, style: "width:5em" });
  const split = h("select", { id: "data-split" }, h("option", { value: "train" }, "train"), h("option", { value: "eval" }, "eval"));
  const start = h("input", { id: "data-start", type: "number", min: 0, value: 0, style: "width:6em" });
  const go = h("button", { class: "primary", id: "preview", type: "submit" }, "Preview");
  const out = h("div", { id: "data-out" });
  main.append(h("form", { class: "card row", onsubmit: (e) => { e.preventDefault(); run(); } },
    h("label", { class: "grow" }, "config file", path), h("label", { class: "grow" }, "overrides", overrides),
    h("label", {}, "split", split), h("label", {}, "from example", start), h("label", {}, "examples", count), go), out);

  async function run() {
    go.disabled = true;
    out.replaceChildren(notice("note", "tokenizing (cached by fingerprint after the first time)…"));
    try {
      const result = await api("/api/data/preview", { method: "POST", body: {
        config_path: path.value.trim(), overrides: overrides.value.split(/\s+/).filter(Boolean),
        n: Number(count.value) || 3, start: Number(start.value) || 0, split: split.value } });
      const counts = result.report.counts;
      out.replaceChildren(
        h("div", { class: "stats" },
          [["sequences", result.rows, "rows"], ["records read", counts.records, "records"], ["tokens", counts.tokens, "total-tokens"],
           ["trained tokens", counts.trained_tokens, "total-trained"], ["truncated", counts.truncated, "truncated"]].map(([name, value, id]) => stat(name, value, id))),
        h("p", { class: "small muted" }, `objective ${result.objective}, loss on ${result.train_on} tokens, data fingerprint ${result.fingerprint.slice(0, 12)}`),
        h("h2", {}, "Report"), h("ul", { id: "data-report" }, result.report.lines.map((l) => h("li", {}, l))),
        h("div", { class: "charts" }, histogram({ title: "sequence lengths", xLabel: "tokens", ...result.histogram })),
        h("h2", {}, "Examples"), ...result.examples.map(example));
    } catch (error) {
      out.replaceChildren();
      showError(error);
    } finally { go.disabled = false; }
  }
  if (path.value) run();
}
