// Runs: the registry as a sortable, filterable table; select runs to overlay their curves.
import { api, duration, fmt, h, notice, poll, statusBadge, when } from "../ui.js";

const COLUMNS = [
  ["id", "run"], ["kind", "kind"], ["status", "status"], ["objective", "objective"], ["method", "method"],
  ["model", "model"], ["data", "data"],
];

function shortPath(path) {
  if (!path) return "";
  const parts = String(path).split("/").filter(Boolean);
  return parts.length > 2 ? "…/" + parts.slice(-2).join("/") : path;
}

// The metrics most runs have, for their own columns.
function metricColumns(runs, limit = 4) {
  const counts = new Map();
  for (const run of runs) for (const key of Object.keys(run.metrics || {})) counts.set(key, (counts.get(key) || 0) + 1);
  return [...counts.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).slice(0, limit).map((e) => e[0]);
}

export async function render(main, { query }) {
  const state = { sort: query.get("sort") || "started", desc: query.get("asc") === null, filter: query.get("q") || "",
                  kind: query.get("kind") || "", status: "", selected: new Set() };
  let data = await api("/api/runs");
  const filter = h("input", { type: "search", placeholder: "filter: id, model, data, objective…", "data-search": true,
                              "aria-label": "filter runs", value: state.filter, class: "grow" });
  const kind = h("select", { "aria-label": "kind" }, h("option", { value: "" }, "every kind"),
    ["train", "eval", "merge", "export", "serve"].map((k) => h("option", { value: k, selected: k === state.kind }, k)));
  const status = h("select", { "aria-label": "status" }, h("option", { value: "" }, "every status"),
    ["running", "finished", "stopped", "failed"].map((k) => h("option", { value: k }, k)));
  const compare = h("button", { disabled: true, onclick: () => {
    location.hash = `#/overlay?ids=${[...state.selected].map(encodeURIComponent).join(",")}`;
  } }, "Overlay selected");
  const count = h("span", { class: "muted small", "data-testid": "run-count" });
  const holder = h("div");
  main.append(h("h1", {}, "Runs"), h("p", { class: "muted small" }, `registry ${data.registry}`),
              h("div", { class: "row card" }, filter, kind, status, compare, count), holder);
  filter.addEventListener("input", () => { state.filter = filter.value; draw(); });
  kind.addEventListener("change", () => { state.kind = kind.value; draw(); });
  status.addEventListener("change", () => { state.status = status.value; draw(); });

  function draw() {
    const metrics = metricColumns(data.runs);
    const needle = state.filter.toLowerCase();
    let rows = data.runs.filter((r) => (!state.kind || r.kind === state.kind) && (!state.status || r.status === state.status) &&
      (!needle || [r.id, r.model, r.data, r.objective, r.method, r.path, r.kind, r.status].some((v) => String(v || "").toLowerCase().includes(needle))));
    const value = (r, key) => key.startsWith("m:") ? r.metrics[key.slice(2)] : key === "duration" ? r.duration_s : r[key];
    rows = rows.slice().sort((a, b) => {
      const x = value(a, state.sort), y = value(b, state.sort);
      if (x === undefined || x === null) return 1;
      if (y === undefined || y === null) return -1;
      const order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return state.desc ? -order : order;
    });
    count.textContent = `${rows.length} of ${data.runs.length} runs`;
    const header = (key, label, numeric) => h("th", { scope: "col", class: numeric ? "num" : undefined,
      "aria-sort": state.sort === key ? (state.desc ? "descending" : "ascending") : "none" },
      h("button", { onclick: () => { state.desc = state.sort === key ? !state.desc : key === "started"; state.sort = key; draw(); } },
        label, state.sort === key ? (state.desc ? " ▼" : " ▲") : ""));
    const head = h("tr", {}, h("th", { scope: "col" }, ""), COLUMNS.map(([k, l]) => header(k, l)),
                   metrics.map((m) => header(`m:${m}`, m, true)), header("started", "started"), header("duration", "duration", true));
    const body = rows.map((r) => {
      const box = h("input", { type: "checkbox", "aria-label": `select ${r.id}`, checked: state.selected.has(r.id) });
      box.addEventListener("change", () => {
        if (box.checked) state.selected.add(r.id); else state.selected.delete(r.id);
        compare.disabled = state.selected.size < 1;
        compare.textContent = `Overlay selected (${state.selected.size})`;
      });
      return h("tr", { dataset: { run: r.id } }, h("td", {}, box),
        h("td", { class: "mono" }, h("a", { href: `#/run/${encodeURIComponent(r.id)}` }, r.id)),
        h("td", {}, r.kind), h("td", {}, statusBadge(r.status)), h("td", {}, r.objective), h("td", {}, r.method),
        h("td", { title: r.model }, shortPath(r.model)), h("td", { title: r.data }, shortPath(r.data)),
        metrics.map((m) => h("td", { class: "num", dataset: { metric: m } }, r.metrics[m] === undefined ? "" : fmt(r.metrics[m]))),
        h("td", { class: "small" }, when(r.started)), h("td", { class: "num" }, duration(r.duration_s)));
    });
    holder.replaceChildren(
      data.notice ? notice("note", data.notice) : "",
      h("table", { id: "runs-table" }, h("thead", {}, head), h("tbody", {}, body)));
  }
  draw();
  // While a run trains, keep the table current.
  return poll(async () => {
    if (!data.runs.some((r) => r.status === "running" || r.status === "stopping")) return true;
    data = await api("/api/runs");
    draw();
  }, Math.max(2000, data.poll_ms * 3));
}
