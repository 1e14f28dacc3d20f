// The page router: #/NAME/ARG?QUERY -> pages/NAME.js's render(main, {arg, query}); keyboard shortcuts.
import { clearError, showError } from "./ui.js";

const PAGES = {
  runs: () => import("./pages/runs.js"),
  run: () => import("./pages/run.js"),
  overlay: () => import("./pages/overlay.js"),
  launch: () => import("./pages/launch.js"),
  data: () => import("./pages/data.js"),
  evaluate: () => import("./pages/evaluate.js"),
  playground: () => import("./pages/playground.js"),
  monitor: () => import("./pages/monitor.js"),
};
const SHORTCUTS = { 1: "runs", 2: "launch", 3: "data", 4: "evaluate", 5: "playground", 6: "monitor" };

let cleanup = null;
let generation = 0;

function parseHash() {
  const hash = location.hash.replace(/^#\/?/, "") || "runs";
  const [path, queryText = ""] = hash.split("?");
  const [name, ...rest] = path.split("/");
  return { name, arg: rest.map(decodeURIComponent).join("/"), query: new URLSearchParams(queryText) };
}

async function route() {
  const { name, arg, query } = parseHash();
  const mine = ++generation;
  if (cleanup) { try { cleanup(); } catch (e) { console.error(e); } cleanup = null; }
  clearError();
  const main = document.getElementById("page");
  main.replaceChildren();
  main.dataset.page = name;
  main.removeAttribute("data-ready");
  const top = { run: "runs", overlay: "runs" }[name] || name;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === top));
  const loader = PAGES[name];
  if (!loader) { showError(`no page ${name}`); return; }
  try {
    const module = await loader();
    const result = await module.render(main, { arg, query });
    if (mine !== generation) { if (typeof result === "function") result(); return; }
    cleanup = typeof result === "function" ? result : null;
  } catch (error) {
    showError(error);
  }
  main.dataset.ready = "1";
}

window.addEventListener("hashchange", route);
window.addEventListener("keydown", (event) => {
  const target = event.target;
  const typing = target && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  if (SHORTCUTS[event.key]) { location.hash = `#/${SHORTCUTS[event.key]}`; event.preventDefault(); }
  if (event.key === "/") {
    const search = document.querySelector("main [data-search]");
    if (search) { search.focus(); event.preventDefault(); }
  }
});
route();
