// What every page uses: the API client, DOM building, errors, formatting, polling.
import { fmt } from "./plot.js";

export { fmt };

export class ApiError extends Error {}

// Call the UI's JSON API; a non-2xx answer throws an ApiError with the server's message.
export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: { "X-Tunelab-UI": "1" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(`the tunelab ui server cannot be reached (${error.message}); is it still running?`);
  }
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok) {
    const message = data && (typeof data.error === "string" ? data.error : data.error && data.error.message);
    throw new ApiError(message || `${method} ${path}: HTTP ${response.status}`);
  }
  return data;
}

// h("div", {class: "x", onclick: f}, "text", child, [children]) -> element (text is never parsed as HTML).
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function showError(error) {
  const box = document.getElementById("error");
  box.replaceChildren(h("strong", {}, "Error: "), h("span", { class: "message" }, error.message || String(error)),
                      h("button", { class: "link", onclick: clearError, "aria-label": "dismiss" }, "×"));
  box.hidden = false;
  if (!(error instanceof ApiError)) console.error(error);
}

export function clearError() {
  const box = document.getElementById("error");
  box.hidden = true;
  box.replaceChildren();
}

// A message inside a page (not the global banner): kind is "error", "warning" or "note".
export function notice(kind, text) {
  return h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

export function when(iso) {
  return iso ? iso.replace("T", " ").replace(/\+00:00$/, " UTC").slice(0, 20) : "";
}

// Call fn every ms milliseconds (after each call finishes) until stop() is called or fn returns false.
export function poll(fn, ms) {
  let stopped = false, timer = null;
  async function tick() {
    if (stopped) return;
    let again = true;
    try { again = (await fn()) !== false; } catch (error) { showError(error); }
    if (!stopped && again) timer = setTimeout(tick, ms);
  }
  timer = setTimeout(tick, ms);
  return () => { stopped = true; clearTimeout(timer); };
}

// A table from headers and rows of cells (strings, numbers or nodes); numbers are right-aligned.
export function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, row.map((cell) =>
      h("td", { class: typeof cell === "number" ? "num" : undefined }, typeof cell === "number" ? fmt(cell) : cell))))));
}

export function statusBadge(status) {
  return h("span", { class: `badge ${status}` }, status || "");
}

// Keep values of a form's inputs across visits of a page.
export function remember(key, input) {
  const stored = localStorage.getItem(`tunelab.${key}`);
  if (stored !== null && !input.value) input.value = stored;
  input.addEventListener("change", () => localStorage.setItem(`tunelab.${key}`, input.value));
  return input;
}

// A headline number: shown rounded, its full value in data-value (and the tooltip).
export function stat(name, value, testid) {
  const known = value !== null && value !== undefined;
  return h("div", { class: "stat" }, h("div", { class: "name" }, name),
    h("div", { class: "value", "data-testid": testid, "data-value": known ? String(value) : undefined, title: known ? String(value) : undefined },
      known ? (typeof value === "number" ? fmt(value) : String(value)) : "–"));
}
