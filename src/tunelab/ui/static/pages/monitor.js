// Monitor: a request store's latency, throughput, errors, tokens, drift and alerts (tunelab monitor report's numbers).
import { fmtTime, lineChart } from "../plot.js";
import { api, h, notice, remember, showError, stat, table } from "../ui.js";

export async function render(main, { query }) {
  main.append(h("h1", {}, "Monitor"));
  const { stores } = await api("/api/monitor/stores");
  const db = remember("monitor.db", h("input", { id: "monitor-db", class: "grow", list: "stores", placeholder: "request store (.db)", value: query.get("db") || "" }));
  if (!db.value && stores.length) db.value = stores[0].path;
  const since = h("input", { id: "monitor-since", placeholder: "e.g. 1h, 7d (default all)", value: query.get("since") || "" });
  const bucket = h("input", { id: "monitor-bucket", placeholder: "e.g. 5m (default auto)", value: query.get("bucket") || "" });
  const model = h("input", { id: "monitor-model", placeholder: "model name (default all)" });
  const out = h("div", { id: "monitor-out" });
  main.append(h("datalist", { id: "stores" }, stores.map((s) => h("option", { value: s.path }, s.serve_run ? `serve run ${s.serve_run}` : "")),),
    h("form", { class: "card row", onsubmit: (e) => { e.preventDefault(); show(); } },
      h("label", { class: "grow" }, "store", db), h("label", {}, "since", since), h("label", {}, "bucket", bucket),
      h("label", {}, "model", model), h("button", { class: "primary", type: "submit", id: "show" }, "Show")), out);
  if (!stores.length) out.append(notice("note", "no request stores found (tunelab serve records into $TUNELAB_HOME/monitor/NAME.db); type a path"));

  async function show() {
    if (!db.value.trim()) return;
    const params = new URLSearchParams({ db: db.value.trim() });
    for (const [key, input] of [["since", since], ["bucket", bucket], ["model", model]]) if (input.value.trim()) params.set(key, input.value.trim());
    try {
      const s = await api(`/api/monitor/summary?${params}`);
      const times = s.bucket_start.map((t) => t + s.bucket_s / 2);
      const series = (names) => Object.entries(names).map(([label, key]) => ({ name: label, points: times.map((t, i) => [t, s.series[key][i]]) }));
      const chart = (title, names, yLabel, unit = "") => lineChart({ title, xLabel: "time (UTC)", yLabel, unit, xFormat: fmtTime, series: series(names), legend: Object.keys(names).length > 1 });
      out.replaceChildren(
        h("p", { class: "small muted" }, `${s.db} · ${s.from} to ${s.to} · one point per ${s.bucket_s} s${s.served_model ? ` · model ${s.served_model}` : ""}`),
        h("div", { class: "stats" }, stat("requests", s.requests, "requests"), stat("answered", s.succeeded, "succeeded"),
          stat("failed (5xx, 429)", s.failed, "failed"), stat("latency p50 s", s.latency_p50_s, "p50"),
          stat("latency p95 s", s.latency_p95_s, "p95"), stat("latency p99 s", s.latency_p99_s, "p99"),
          stat("prompt tokens", s.prompt_tokens, "prompt-tokens"), stat("completion tokens", s.completion_tokens, "completion-tokens")),
        h("div", { class: "charts" },
          chart("throughput", { "requests/min": "requests_per_min" }, "requests/min"),
          chart("latency", { p50: "latency_p50", p95: "latency_p95", p99: "latency_p99" }, "latency", " s"),
          chart("error rate (5xx and 429)", { "error rate": "error_rate" }, "fraction"),
          chart("time to first token p50", { ttft: "ttft_p50" }, "seconds", " s"),
          chart("tokens per request (median)", { input: "input_length_median", output: "output_length_median" }, "tokens"),
          chart("output perplexity (median)", { perplexity: "perplexity_median" }, "perplexity"),
          chart("drift: PSI against the first quarter", Object.fromEntries(Object.keys(s.series).filter((k) => k.startsWith("psi_")).map((k) => [k.slice(4), k])), "PSI")),
        h("h2", {}, "Drift checks"), s.drift_checks.length ? table(["time", "reference", "feature", "n ref", "n recent", "KS", "KS p", "PSI", "drift"],
          s.drift_checks.slice(-50).map((c) => [new Date(c.time * 1000).toISOString().replace("T", " ").slice(0, 19), c.reference, c.feature, c.n_reference, c.n_recent, c.ks_statistic, c.ks_pvalue, c.psi, c.drift ? "yes" : "no"]), { id: "drift" }) :
          notice("note", "no saved drift checks in this period (tunelab monitor drift saves its results in the store)"),
        h("h2", {}, "Alerts"), s.alerts.length ? table(["time", "rule", "metric", "value", "baseline", "z", "message"],
          s.alerts.map((a) => [new Date(a.time * 1000).toISOString().replace("T", " ").slice(0, 19), a.rule, a.metric, a.value, a.baseline, a.z, a.message]), { id: "alerts" }) :
          notice("note", "no alerts fired in this period"));
    } catch (error) {
      out.replaceChildren();
      showError(error);
    }
  }
  if (db.value) await show();
}
