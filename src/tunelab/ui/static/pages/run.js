// One run: headline numbers, live curves, log (for a job), config, data report, checkpoints, lineage.
import { lineChart } from "../plot.js";
import { api, duration, h, notice, poll, showError, stat, statusBadge, table, when } from "../ui.js";

const UNITS = { lr: "", tokens_per_s: " tok/s", grad_norm: "", loss: "" };
const SKIP = new Set(["step", "epoch", "tokens", "elapsed_s"]);

// Charts for each metric in the rows: loss with eval_loss, then lr, grad norm, tokens/s, each eval metric.
export function chartSpecs(rows) {
  const keys = new Set();
  for (const row of rows) for (const [k, v] of Object.entries(row)) if (!SKIP.has(k) && typeof v === "number") keys.add(k);
  const specs = [];
  if (keys.has("loss") || keys.has("eval_loss")) specs.push({ metric: "loss", title: "loss", series: ["loss", "eval_loss"].filter((k) => keys.has(k)) });
  for (const k of ["lr", "grad_norm", "tokens_per_s"]) if (keys.has(k)) specs.push({ metric: k, title: { lr: "learning rate", grad_norm: "gradient norm", tokens_per_s: "throughput" }[k], series: [k] });
  for (const k of [...keys].sort()) {
    if (["loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"].includes(k)) continue;
    specs.push({ metric: k, title: k, series: [k] });
  }
  return specs;
}

export function drawCharts(holder, rows, label = (k) => k) {
  const charts = chartSpecs(rows).map((spec) => lineChart({
    title: spec.title, metric: spec.metric, xLabel: "step", yLabel: spec.metric === "tokens_per_s" ? "tokens/s" : spec.metric,
    unit: UNITS[spec.metric] && spec.metric !== "tokens_per_s" ? UNITS[spec.metric] : "",
    series: spec.series.map((k) => ({ name: label(k), points: rows.filter((r) => typeof r[k] === "number").map((r) => [r.step, r[k]]) })),
  }));
  holder.replaceChildren(...(charts.length ? charts : [notice("note", "no metrics logged yet")]));
}

function lineageTree(node) {
  const label = node.run_id ? h("a", { href: `#/run/${encodeURIComponent(node.run_id)}` }, node.label) : node.label;
  return h("li", {}, h("span", { class: `node${node.focus ? " focus" : ""}`, dataset: { kind: node.kind } },
    h("span", { class: "kind" }, node.kind), label),
    node.children.length ? h("ul", {}, node.children.map(lineageTree)) : "");
}

export async function render(main, { arg }) {
  const run = await api(`/api/runs/${encodeURIComponent(arg)}`);
  const info = run.info || {};
  const job = run.job;
  const stops = [];
  const actions = h("div", { class: "row" });
  const status = h("span", { "data-testid": "run-status" }, statusBadge(run.status));
  main.append(h("h1", {}, `${run.kind} run `, h("span", { class: "mono" }, info.run_id || run.ref), " ", status),
    h("p", { class: "muted small" }, run.directory || "", info.started_at ? ` · started ${when(info.started_at)}` : "",
      info.wall_seconds ? ` · ${duration(info.wall_seconds)}` : ""), actions);
  for (const warning of run.warnings) main.append(notice("warning", warning));

  const stats = h("div", { class: "stats" });
  const charts = h("div", { class: "charts", id: "charts" });
  const logBox = h("pre", { class: "log", "data-testid": "job-log", hidden: !job });
  main.append(stats, h("h2", {}, "Curves"), charts);
  if (job) main.append(h("h2", {}, "Log ", h("span", { class: "muted small mono" }, job.command)), logBox);

  let rows = [], offset = 0;
  function drawStats() {
    const losses = rows.filter((r) => typeof r.loss === "number");
    const final = losses.length ? losses[losses.length - 1].loss : run.final_loss;
    const last = rows.length ? rows[rows.length - 1] : {};
    stats.replaceChildren(
      stat("final train loss", final, "final-loss"),
      stat("steps logged", last.step, "last-step"),
      ...Object.entries(run.final_metrics || {}).map(([k, v]) => stat(k, v, `metric-${k}`)));
  }
  async function fetchMetrics() {
    const page = await api(`/api/runs/${encodeURIComponent(arg)}/metrics?offset=${offset}`);
    if (page.reset) rows = [];
    if (page.rows.length || page.reset) {
      rows = rows.concat(page.rows);
      drawCharts(charts, rows);
      drawStats();
    }
    offset = page.offset;
    return page;
  }
  await fetchMetrics();
  drawCharts(charts, rows);
  drawStats();

  let drawn = null;
  function drawActions(current) {
    if (current === drawn) return;  // re-drawing would swap a button under a click
    drawn = current;
    actions.replaceChildren();
    if (job && ["running", "stopping"].includes(current)) {
      actions.append(h("button", { class: "danger", id: "stop", disabled: current === "stopping", onclick: async (event) => {
        event.target.disabled = true;
        try { await api(`/api/jobs/${job.id}/stop`, { method: "POST" }); } catch (error) { showError(error); }
      } }, current === "stopping" ? "Stopping (saving a checkpoint)…" : "Stop (keeps a checkpoint)"));
    }
    if (job && ["stopped", "failed"].includes(current) && job.kind === "train") {
      actions.append(h("button", { class: "primary", id: "resume", onclick: async () => {
        try {
          const resumed = await api(`/api/jobs/${job.id}/resume`, { method: "POST" });
          location.hash = `#/run/${resumed.id}`;
        } catch (error) { showError(error); }
      } }, "Resume from the newest checkpoint"));
    }
    if (run.final_dir) actions.append(h("a", { href: `#/playground?model=${encodeURIComponent(run.final_dir)}` }, "Chat with this model"));
    if (info.run_id) actions.append(h("a", { href: `#/overlay?ids=${encodeURIComponent(info.run_id)}` }, "Overlay with other runs"));
  }
  drawActions(run.status);

  // Live: metrics and log while the job runs; then reload once to show what the run recorded.
  if (job) {
    let logOffset = 0;
    const wasRunning = ["running", "stopping"].includes(run.status);
    const follow = async () => {
      const log = await api(`/api/jobs/${job.id}/log?offset=${logOffset}`);
      if (log.text) {
        logBox.textContent += log.text;
        logBox.scrollTop = logBox.scrollHeight;
      }
      logOffset = log.offset;
      await fetchMetrics();
      status.replaceChildren(statusBadge(log.status));
      drawActions(log.status);
      if (!log.running) {
        if (wasRunning && log.status === "finished" && !run.info) setTimeout(() => window.dispatchEvent(new HashChangeEvent("hashchange")), 0);
        return false;
      }
      return true;
    };
    await follow().then((again) => { if (again) stops.push(poll(follow, run.poll_ms)); });
  }

  if (run.config_yaml) main.append(h("h2", {}, "Resolved config"), h("pre", { "data-testid": "config" }, run.config_yaml));
  if (run.data_report) {
    const report = run.data_report;
    main.append(h("h2", {}, "Data report ", h("span", { class: "muted small mono" }, report.fingerprint.slice(0, 12))));
    for (const split of ["train", "eval"]) {
      if (!report[split]) continue;
      main.append(h("h3", {}, split), h("ul", {}, report[split].lines.map((l) => h("li", {}, l))));
    }
  }
  if (run.checkpoints.length || run.final_dir) {
    main.append(h("h2", {}, "Checkpoints"), table(["step", "path"], [
      ...run.checkpoints.map((c) => [c.step, h("span", { class: "mono" }, c.path)]),
      ...(run.final_dir ? [["final", h("span", { class: "mono" }, run.final_dir)]] : [])], { id: "checkpoints" }));
  }
  if (run.lineage) main.append(h("h2", {}, "Lineage"), h("div", { class: "tree", id: "lineage" }, h("ul", {}, lineageTree(run.lineage))));
  if (info.inputs || info.outputs) {
    main.append(h("h2", {}, "Inputs and outputs"), table(["role", "kind", "path", "from run"], [
      ...(info.inputs || []).map((a) => ["input", a.kind, h("span", { class: "mono" }, a.path), a.run_id ? h("a", { href: `#/run/${a.run_id}` }, a.run_id) : ""]),
      ...(info.outputs || []).map((a) => ["output", a.kind, h("span", { class: "mono" }, a.path), ""])]));
  }
  return () => stops.forEach((stop) => stop());
}
