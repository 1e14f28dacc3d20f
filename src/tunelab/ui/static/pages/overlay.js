// Several runs: their curves overlaid, and what differs between them (config, data, versions, metrics).
import { lineChart } from "../plot.js";
import { api, h, notice, table } from "../ui.js";
import { chartSpecs } from "./run.js";

export async function render(main, { query }) {
  const ids = (query.get("ids") || "").split(",").filter(Boolean);
  main.append(h("h1", {}, `${ids.length} runs overlaid`));
  if (!ids.length) { main.append(notice("note", "select runs on the Runs page first")); return; }
  const picker = h("input", { placeholder: "add a run id", "aria-label": "add a run id" });
  main.append(h("div", { class: "row" }, picker, h("button", { onclick: () => {
    if (picker.value.trim()) location.hash = `#/overlay?ids=${[...ids, picker.value.trim()].map(encodeURIComponent).join(",")}`;
  } }, "Add")));
  const runs = await Promise.all(ids.map(async (id) => ({ id, page: await api(`/api/runs/${encodeURIComponent(id)}/metrics`) })));
  const all = runs.flatMap((r) => r.page.rows);
  const charts = h("div", { class: "charts", id: "charts" });
  for (const spec of chartSpecs(all)) {
    const series = [];
    for (const run of runs) for (const key of spec.series) {
      const points = run.page.rows.filter((row) => typeof row[key] === "number").map((row) => [row.step, row[key]]);
      if (points.length) series.push({ name: spec.series.length > 1 ? `${run.id} ${key}` : run.id, points });
    }
    charts.append(lineChart({ title: spec.title, metric: spec.metric, xLabel: "step", yLabel: spec.metric, series, legend: true }));
  }
  main.append(h("h2", {}, "Curves"), charts);
  if (ids.length < 2) return;
  try {
    const diff = await api(`/api/diff?ids=${ids.map(encodeURIComponent).join(",")}`);
    const show = (v) => v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : v;
    main.append(h("h2", {}, "What differs"), diff.diff.length ?
      table(["key", ...diff.runs.map((r) => r.id)], diff.diff.map((row) => [h("span", { class: "mono" }, row.key), ...row.values.map(show)]), { id: "diff" }) :
      notice("note", "same config, data, versions and metrics"));
  } catch (error) {
    main.append(notice("warning", `no config diff: ${error.message}`));
  }
}
