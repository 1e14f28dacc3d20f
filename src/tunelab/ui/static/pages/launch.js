// Launch: a training run from a config file or from a form built from the config schema; the jobs list.
import { api, h, notice, poll, showError, statusBadge, when } from "../ui.js";

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function fieldInput(field) {
  const id = `f-${field.key.replaceAll(".", "-")}`;
  let input;
  const placeholder = field.default === null || field.default === undefined ? (field.required ? "required" : "null")
    : typeof field.default === "object" ? JSON.stringify(field.default) : String(field.default);
  if (field.kind === "choice") {
    input = h("select", { id, name: field.key }, h("option", { value: "" }, `default (${placeholder})`),
      field.choices.map((c) => h("option", { value: String(c) }, String(c))));
  } else if (field.kind === "bool") {
    input = h("select", { id, name: field.key }, h("option", { value: "" }, `default (${placeholder})`),
      h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
  } else {
    input = h("input", { id, name: field.key, placeholder, inputmode: ["int", "float"].includes(field.kind) ? "decimal" : undefined });
  }
  return h("div", { class: "field", dataset: { key: field.key } },
    h("label", { for: id }, field.key, field.required ? " *" : ""), input,
    h("div", { class: "field-error", role: "alert", hidden: true }),
    h("div", { class: "doc" }, field.description));
}

export function jobsTable(jobs, refresh) {
  if (!jobs.length) return notice("note", "no jobs started from this UI yet");
  return h("table", { id: "jobs" }, h("thead", {}, h("tr", {}, ["job", "status", "command", "started", ""].map((x) => h("th", {}, x)))),
    h("tbody", {}, jobs.map((job) => h("tr", { dataset: { job: job.id } },
      h("td", { class: "mono" }, job.kind === "train" ? h("a", { href: `#/run/${job.id}` }, job.id) : job.id),
      h("td", {}, statusBadge(job.status)), h("td", { class: "mono small" }, job.command),
      h("td", { class: "small" }, when(job.started_at)),
      h("td", {}, ["running"].includes(job.status) ? h("button", { class: "danger", onclick: async () => {
        try { await api(`/api/jobs/${job.id}/stop`, { method: "POST" }); refresh(); } catch (error) { showError(error); }
      } }, "Stop") : job.kind === "train" && ["stopped", "failed"].includes(job.status) ? h("button", { onclick: async () => {
        try { const next = await api(`/api/jobs/${job.id}/resume`, { method: "POST" }); location.hash = `#/run/${next.id}`; } catch (error) { showError(error); }
      } }, "Resume") : "")))));
}

export async function render(main, { query }) {
  const schema = await api("/api/schema");
  main.append(h("h1", {}, "Launch a training run"));
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const fileTab = h("button", { role: "tab", "aria-selected": "true", id: "tab-file" }, "Config file");
  const formTab = h("button", { role: "tab", "aria-selected": "false", id: "tab-form" }, "Form");
  tabs.append(fileTab, formTab);
  const path = h("input", { id: "config-path", class: "grow", placeholder: "path/to/run.yaml", value: query.get("config") || "" });
  const filePane = h("div", { role: "tabpanel" }, h("div", { class: "row" }, h("label", { class: "grow" }, "config file (relative to where tunelab ui was started)", path)));
  const form = h("form", { id: "config-form", onsubmit: (e) => e.preventDefault() });
  for (const section of schema.sections) {
    const required = section.fields.some((f) => f.required) || ["method", "data", "train"].includes(section.key);
    form.append(h("details", { class: "form-section", open: required || undefined },
      h("summary", {}, section.key, h("span", { class: "muted small" }, `  ${section.doc.split("\n")[0]}`)),
      h("div", { class: "fields" }, section.fields.map(fieldInput))));
  }
  const formPane = h("div", { role: "tabpanel", hidden: true }, form);
  const overrides = h("textarea", { id: "overrides", rows: 3, placeholder: "key=value per line, e.g. train.lr=1e-4" });
  const overwrite = h("input", { type: "checkbox", id: "overwrite" });
  const errors = h("div", { id: "validation", "aria-live": "polite" });
  const yaml = h("pre", { id: "yaml-preview", hidden: true });
  const launch = h("button", { class: "primary", id: "launch" }, "Launch");
  main.append(tabs, h("div", { class: "card" }, filePane, formPane,
    h("label", { for: "overrides", class: "small muted" }, "overrides (as on the command line)"), overrides,
    h("div", { class: "row" }, h("label", { class: "row small" }, overwrite, " overwrite an earlier run in output_dir"), launch),
    errors, yaml));
  const jobsHolder = h("div");
  main.append(h("h2", {}, "Jobs"), jobsHolder);

  let mode = "file";
  function select(which) {
    mode = which;
    fileTab.setAttribute("aria-selected", String(which === "file"));
    formTab.setAttribute("aria-selected", String(which === "form"));
    filePane.hidden = which !== "file";
    formPane.hidden = which !== "form";
    check();
  }
  fileTab.addEventListener("click", () => select("file"));
  formTab.addEventListener("click", () => select("form"));

  function body() {
    const lines = overrides.value.split("\n").map((l) => l.trim()).filter(Boolean);
    if (mode === "file") return { config_path: path.value.trim() || null, overrides: lines, overwrite: overwrite.checked };
    const values = {};
    for (const input of form.querySelectorAll("input, select")) if (input.value.trim()) values[input.name] = input.value;
    return { form: values, overrides: lines, overwrite: overwrite.checked };
  }
  function showErrors(list) {
    form.querySelectorAll(".field").forEach((f) => { f.classList.remove("invalid"); f.querySelector(".field-error").hidden = true; });
    const loose = [];
    for (const error of list) {
      const field = error.key && form.querySelector(`.field[data-key="${CSS.escape(error.key)}"]`);
      if (field && mode === "form") {
        field.classList.add("invalid");
        const box = field.querySelector(".field-error");
        box.textContent = error.message;
        box.hidden = false;
        field.closest("details").open = true;
      }
      loose.push(error.message);
    }
    errors.replaceChildren(...(loose.length ? [h("div", { class: "notice error", "data-testid": "config-errors" }, loose.join("\n"))] : []));
  }
  const check = debounce(async () => {
    const request = body();
    if (mode === "file" && !request.config_path) { showErrors([]); yaml.hidden = true; return; }
    try {
      const result = await api("/api/validate", { method: "POST", body: request });
      showErrors(result.errors);
      if (result.valid) errors.replaceChildren(h("div", { class: "notice note", "data-testid": "config-valid" }, `valid; writes to ${result.output_dir}`));
      yaml.textContent = result.yaml;
      yaml.hidden = !result.yaml;
    } catch (error) { showError(error); }
  }, 300);
  for (const input of [path, overrides]) input.addEventListener("input", check);
  form.addEventListener("input", check);
  form.addEventListener("change", check);

  launch.addEventListener("click", async () => {
    launch.disabled = true;
    try {
      const result = await api("/api/launch", { method: "POST", body: body() });
      if (!result.started) { showErrors(result.errors); return; }
      location.hash = `#/run/${result.job.id}`;
    } catch (error) { showError(error); } finally { launch.disabled = false; }
  });

  async function refresh() {
    const { jobs } = await api("/api/jobs");
    jobsHolder.replaceChildren(jobsTable(jobs, refresh));
    return true;
  }
  await refresh();
  if (path.value) check();
  return poll(refresh, 3000);
}
