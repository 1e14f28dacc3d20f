// Evaluate and compare: eval results (metrics with CIs, searchable predictions), A/B comparisons, launching either.
import { api, fmt, h, notice, poll, remember, showError, table, when } from "../ui.js";
import { jobsTable } from "./launch.js";

function evalResults(holder, ref) {
  return (async () => {
    const data = await api(`/api/evals/results?ref=${encodeURIComponent(ref)}`);
    const results = data.results;
    const parts = [h("h2", {}, `Evaluation ${ref}`), h("p", { class: "small muted" }, `${data.folder} · model ${results.model || ""}${results.adapter ? " + " + results.adapter : ""}`)];
    for (const set of results.sets) {
      parts.push(h("h3", {}, `${set.name} `, h("span", { class: "muted small" }, set.file)));
      parts.push(table(["metric", "value", "95% CI low", "95% CI high"], Object.entries(set.metrics).map(([name, value]) => {
        const ci = (set.ci || {})[name];
        return [name, h("span", { "data-testid": `eval-${set.name}-${name}`, "data-value": String(value) }, value === null ? "–" : fmt(value)),
                ci ? ci[0] : "", ci ? ci[1] : ""];
      }), { class: "metrics" }));
      parts.push(h("p", { class: "small muted" }, Object.entries(set.accounting).filter(([, v]) => typeof v === "number")
        .map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`).join(" · ")));
    }
    const search = h("input", { type: "search", "data-search": true, placeholder: "search prompts, predictions, references", class: "grow", id: "prediction-search" });
    const rows = h("div", { id: "predictions" });
    let page = 0;
    async function load() {
      const found = await api(`/api/evals/predictions?ref=${encodeURIComponent(ref)}&q=${encodeURIComponent(search.value)}&page=${page}`);
      const pages = Math.max(1, Math.ceil(found.total / found.page_size));
      rows.replaceChildren(h("p", { class: "small muted", "data-testid": "prediction-count" }, `${found.total} predictions · page ${page + 1} of ${pages}`),
        table(["id", "prompt", "prediction", "reference"], found.rows.map((r) => [h("span", { class: "mono small" }, r.id), r.prompt, r.prediction, r.reference ?? ""])),
        h("div", { class: "row" }, h("button", { disabled: page === 0, onclick: () => { page -= 1; load(); } }, "Previous"),
          h("button", { disabled: page + 1 >= pages, onclick: () => { page += 1; load(); } }, "Next")));
    }
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { page = 0; load(); }, 250); });
    parts.push(h("h3", {}, `Predictions (${data.predictions})`), h("div", { class: "row" }, search), rows);
    holder.replaceChildren(...parts);
    await load();
  })();
}

function compareResults(holder, path) {
  return (async () => {
    const data = await api(`/api/compare?path=${encodeURIComponent(path)}`);
    const r = data.results;
    const parts = [h("h2", {}, "Comparison"), h("p", { class: "small muted" }, `${data.path} · judge ${r.judge} · ${r.examples} shared examples`),
      table(["A", "B", "wins", "ties", "losses", "no verdict", "win rate of A", "95% CI", "p (sign test)"], r.pairs.map((p) => [
        p.model_a, p.model_b, p.wins, p.ties, p.losses, p.no_verdict, h("span", { "data-testid": `win-rate-${p.model_a}-${p.model_b}`, "data-value": String(p.win_rate) }, fmt(p.win_rate)),
        `${fmt(p.ci_low)} – ${fmt(p.ci_high)}`, p.p_value]), { id: "pairs" })];
    if (r.ratings && r.ratings.length) {
      parts.push(h("h3", {}, "Bradley–Terry ratings"), table(Object.keys(r.ratings[0]), r.ratings.map((x) => Object.values(x)), { id: "ratings" }));
    }
    const search = h("input", { type: "search", placeholder: "filter verdicts by id", "data-search": true });
    const list = h("div");
    const draw = () => {
      const needle = search.value.toLowerCase();
      const rows = data.verdicts.filter((v) => !needle || String(v.id).toLowerCase().includes(needle)).slice(0, 200);
      list.replaceChildren(table(["id", "A", "B", "outcome"], rows.map((v) => [v.id, v.model_a, v.model_b,
        v.outcome === 1 ? "A wins" : v.outcome === -1 ? "B wins" : v.outcome === 0 ? "tie" : "no verdict"])));
    };
    search.addEventListener("input", draw);
    parts.push(h("h3", {}, `Verdicts (${data.verdict_count})`), search, list);
    holder.replaceChildren(...parts);
    draw();
  })();
}

export async function render(main, { query }) {
  main.append(h("h1", {}, "Evaluate and compare"));
  const list = await api("/api/evals");
  const detail = h("div", { id: "detail" });
  const evalRows = list.evals.map((e) => [
    h("a", { href: `#/evaluate?eval=${encodeURIComponent(e.id)}`, class: "mono" }, e.id),
    h("span", { class: "small mono" }, e.model || ""),
    h("span", { class: "small" }, Object.entries(e.metrics).slice(0, 6).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ")),
    h("span", { class: "small" }, when(e.started)),
    e.exists ? "" : h("span", { class: "badge failed" }, "folder gone")]);
  main.append(h("h2", {}, "Evaluations"), evalRows.length ? table(["run", "model", "metrics", "started", ""], evalRows, { id: "evals" }) :
    notice("note", "no eval runs in the registry yet: run tunelab eval, or launch one below"));

  const comparePath = h("input", { class: "grow", id: "compare-path", placeholder: "a tunelab compare --out folder", value: query.get("compare") || "" });
  main.append(h("h2", {}, "Comparisons"), list.compares.length ? table(["job", "status", "folder"], list.compares.map((c) => [
    c.job, c.status, c.exists ? h("a", { href: `#/evaluate?compare=${encodeURIComponent(c.path)}` }, c.path) : c.path])) : "",
    h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); location.hash = `#/evaluate?compare=${encodeURIComponent(comparePath.value.trim())}`; } },
      comparePath, h("button", { type: "submit" }, "Open")), detail);

  // Launch forms.
  const evalModel = remember("eval.model", h("input", { class: "grow", id: "eval-model", placeholder: "model or adapter directory (e.g. runs/x/final)" }));
  const evalData = remember("eval.data", h("input", { class: "grow", id: "eval-data", placeholder: "eval file(s), space-separated" }));
  const evalOut = h("input", { class: "grow", id: "eval-out", placeholder: "output folder" });
  const evalMetrics = h("input", { id: "eval-metrics", placeholder: "metrics (default all)" });
  const evalSamples = h("input", { id: "eval-samples", type: "number", min: 1, placeholder: "max samples", style: "width:8em" });
  const predictions = h("textarea", { id: "compare-predictions", rows: 2, placeholder: "NAME=path/predictions.jsonl per line (two or more)" });
  const judge = h("input", { id: "compare-judge", value: "metric:exact_match" });
  const labels = h("input", { id: "compare-labels", placeholder: "labels.jsonl (judge labels)" });
  const compareOut = h("input", { class: "grow", id: "compare-out", placeholder: "output folder" });
  const jobs = h("div");
  main.append(h("h2", {}, "Launch"),
    h("form", { class: "card row", onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("/api/evals/launch", { method: "POST", body: { model: evalModel.value.trim(), data: evalData.value.split(/\s+/).filter(Boolean),
          out: evalOut.value.trim(), metrics: evalMetrics.value.trim() || null, max_samples: Number(evalSamples.value) || null } });
        refresh();
      } catch (error) { showError(error); }
    } }, h("strong", {}, "tunelab eval"), h("label", { class: "grow" }, "model", evalModel), h("label", { class: "grow" }, "data", evalData),
      h("label", { class: "grow" }, "out", evalOut), h("label", {}, "metrics", evalMetrics), h("label", {}, "samples", evalSamples),
      h("button", { class: "primary", type: "submit" }, "Run eval")),
    h("form", { class: "card row", onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("/api/compare/launch", { method: "POST", body: { predictions: predictions.value.split("\n").map((l) => l.trim()).filter(Boolean),
          judge: judge.value.trim(), labels: labels.value.trim() || null, out: compareOut.value.trim() } });
        refresh();
      } catch (error) { showError(error); }
    } }, h("strong", {}, "tunelab compare"), h("label", { class: "grow" }, "predictions", predictions), h("label", {}, "judge", judge),
      h("label", {}, "labels", labels), h("label", { class: "grow" }, "out", compareOut), h("button", { class: "primary", type: "submit" }, "Run compare")),
    jobs);
  async function refresh() {
    const all = await api("/api/jobs");
    jobs.replaceChildren(jobsTable(all.jobs.filter((j) => j.kind !== "train"), refresh));
  }
  await refresh();
  if (query.get("eval")) await evalResults(detail, query.get("eval"));
  else if (query.get("compare")) await compareResults(detail, query.get("compare"));
  return poll(refresh, 3000);
}
