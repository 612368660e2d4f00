// The kvrank search page: plain JS, no dependencies. It talks to the same server's JSON API only:
// GET /v1/page/config, POST /v1/search, GET /v1/page/judgements, GET /v1/store.
// State lives in the URL (?q=&mode=&depth=&fw=&k=); opening such a link runs that search.
"use strict";

const KEY_STORAGE = "kvrank.apiKey"; // sessionStorage only: gone when the tab closes
const STAGES = ["retrieve", "kv_lookup", "prefill", "scoring"];
const STOPWORDS = new Set(("a an and are as at be by did do does for from has have how in is it its of on or " +
  "the to was were what when where which who whom why with").split(" "));
const SHOWN = 10; // hits per column unless the URL says k=

const $ = (id) => document.getElementById(id);
let config = null;
let pending = null; // what to retry once a key is entered
let lastSearch = null; // the last search's state: what "Search again" repeats
let runs = []; // this search's runs, oldest first: [{key, timings, kv, order, mode}]

// ------------------------------------------------------------------------------------------- small helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

function ms(value) {
  return value >= 100 ? `${value.toFixed(0)} ms` : `${value.toFixed(1)} ms`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function score(value) {
  return value === null || value === undefined ? "–" : value.toFixed(4);
}

// ------------------------------------------------------------------------------------------- API calls
class ApiError extends Error {
  constructor(status, type, message, retryAfter) {
    super(message);
    this.status = status;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

async function api(path, body) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method: body === undefined ? "GET" : "POST", headers,
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, "network", `could not reach the server (${err.message}); is kvrank serve running?`);
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.type || "http", error.message || response.statusText,
                       response.headers.get("Retry-After"));
  }
  return data;
}

function explain(err) {
  const titles = {
    limit_exceeded: "Over a server limit",
    invalid_request: "The request was refused",
    unauthorized: "API key missing or not accepted",
    overloaded: "The server is busy",
    not_ready: "The server is not ready",
    timeout: "The search took too long",
    network: "No connection",
    internal: "Server error",
  };
  const title = titles[err.type] || `Error ${err.status}`;
  let text = err.message;
  if (err.retryAfter) text += ` Try again in ${err.retryAfter} s.`;
  return { title: `${title}${err.status ? ` (${err.status})` : ""}`, text };
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.replaceChildren(); return; }
  const { title, text } = explain(err);
  box.replaceChildren(el("strong", { text: `${title}: ` }), el("span", { text }));
  box.hidden = false;
}

function status(text) { $("status").textContent = text; }

// Runs `action`; a 401 opens the key prompt, and `retry` runs once a key is entered.
async function guarded(action, retry) {
  try {
    showError(null);
    return await action();
  } catch (err) {
    if (err.status === 401) {
      pending = retry;
      askForKey(sessionStorage.getItem(KEY_STORAGE) !== null);
    }
    showError(err);
    status("");
    return undefined;
  }
}

function askForKey(rejected) {
  if (rejected) sessionStorage.removeItem(KEY_STORAGE);
  $("key-why").dataset.rejected = rejected ? "yes" : "no";
  $("key-panel").hidden = false;
  $("api-key").focus();
}

// ------------------------------------------------------------------------------------------- config
function applyConfig(cfg) {
  config = cfg;
  const mode = $("mode");
  mode.replaceChildren();
  for (const name of cfg.modes) {
    let label = name === "none" ? "none (first stage only)" : name;
    const adapter = cfg.adapter;
    if (adapter && name === adapter.mode) label = `${name} + adapter ${adapter.digest.slice(0, 8)}`;
    const disabled = adapter && name !== "none" && name !== adapter.mode; // the adapter fixes the mode
    mode.append(el("option", { value: name, text: disabled ? `${label} (not with this adapter)` : label,
                               disabled }));
  }
  mode.value = cfg.default_mode;
  $("depth").max = cfg.max_rerank_depth;
  $("depth").placeholder = cfg.depth;
  $("fw").placeholder = cfg.fusion_weight === null ? "none" : cfg.fusion_weight;
  const headed = Object.keys(cfg.heads || {});
  if (headed.length) {
    $("fw-help").textContent += ` Not used in ${headed.join(", ")}: a scoring head ranks ` +
      `${headed.length > 1 ? "those modes" : "that mode"}.`;
  }
  $("examples").replaceChildren(...cfg.examples.map((text) => el("option", { value: text })));
  const judged = cfg.judged_queries ? `, ${cfg.judged_queries} judged queries (pick one from the suggestions)` : "";
  $("about").textContent = `${cfg.corpus}: ${cfg.passages} passages${judged}. First stage ${cfg.retriever}, ` +
    `reranker ${cfg.model} over stored passage KV (${cfg.kv_format}).`;
}

// ------------------------------------------------------------------------------------------- URL state
function readUrl() {
  const params = new URLSearchParams(window.location.search);
  return { q: params.get("q") || "", mode: params.get("mode"), depth: params.get("depth"),
           fw: params.get("fw"), k: params.get("k") };
}

function fillForm(state) {
  $("q").value = state.q;
  if (state.mode && config.modes.includes(state.mode)) $("mode").value = state.mode;
  $("depth").value = state.depth || config.depth;
  $("fw").value = state.fw ?? "";
}

function formState() {
  const state = { q: $("q").value.trim(), mode: $("mode").value, depth: $("depth").value, fw: $("fw").value };
  const k = readUrl().k;
  if (k) state.k = k;
  return state;
}

function stateUrl(state) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(state)) if (value !== "" && value !== null) params.set(name, value);
  return `${window.location.pathname}?${params}`;
}

// ------------------------------------------------------------------------------------------- search
function request(state) {
  const shown = Number(state.k) || SHOWN;
  const depth = Number(state.depth) || config.depth;
  const reranking = state.mode !== "none";
  // Ask for at least the reranked head, so the first-stage column can be rebuilt from the hits' first-stage
  // ranks (the final ranking is a permutation of the first stage's top hits).
  const topK = Math.min(Math.max(shown, reranking ? depth : 0), config.max_top_k);
  const rerank = { mode: state.mode };
  if (reranking) rerank.depth = depth;
  if (reranking && state.fw !== "" && state.fw !== null && state.fw !== undefined) {
    rerank.fusion_weight = state.fw === "none" ? null : Number(state.fw);
  }
  return { query: state.q, top_k: topK, rerank };
}

async function search(state, { again = false } = {}) {
  if (!state.q) return;
  const body = request(state);
  const key = JSON.stringify(body);
  status(again ? "Searching again…" : "Searching…");
  $("go").disabled = true;
  try {
    const result = await guarded(async () => {
      const [found, judged] = await Promise.all([
        api("/v1/search", body),
        api(`/v1/page/judgements?query=${encodeURIComponent(state.q)}`),
      ]);
      return { found, judged };
    }, () => search(state, { again }));
    if (!result) return;
    if (!runs.length || runs[0].key !== key) runs = [];
    const order = result.found.hits.map((hit) => hit.doc_id);
    runs.push({ key, timings: result.found.timings_ms, kv: result.found.kv_cache, order,
                   mode: result.found.mode });
    render(state, result.found, result.judged);
    lastSearch = state;
    $("again").disabled = false;
    status(`${result.found.hits.length} hits in ${ms(result.found.timings_ms.total)}`);
    refreshStore();
  } finally {
    $("go").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------- rendering
function queryTerms(text) {
  const words = text.toLowerCase().match(/[\p{L}\p{N}]+/gu) || [];
  return [...new Set(words.filter((w) => w.length > 1 && !STOPWORDS.has(w)))];
}

// The text as nodes with the query terms in <mark> (prefix matches, so "planet" marks "planets").
function highlighted(text, terms) {
  if (!terms.length) return [document.createTextNode(text)];
  const escaped = terms.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const pattern = new RegExp(`(?<![\\p{L}\\p{N}])(${escaped.join("|")})[\\p{L}\\p{N}]*`, "giu");
  const out = [];
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) out.push(document.createTextNode(text.slice(last, match.index)));
    out.push(el("mark", { text: match[0] }));
    last = match.index + match[0].length;
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

function judgement(docId, judged) {
  if (!judged || judged.query_id === null) return null;
  if (!Object.hasOwn(judged.relevance, docId)) return null; // unjudged: no mark (own keys only)
  const level = judged.relevance[docId];
  return el("span", { class: `badge ${level > 0 ? "relevant" : "irrelevant"}`,
                      text: level > 0 ? `relevant (${level})` : "judged not relevant" });
}

function hitItem(hit, rank, { terms, judged, movement, shownScore }) {
  const head = el("div", { class: "hit-head" },
    el("span", { class: "rank", text: `#${rank}` }),
    el("span", { class: "title", text: hit.title || hit.doc_id }));
  if (movement) head.append(movement);
  const badge = judgement(hit.doc_id, judged);
  if (badge) head.append(badge);
  return el("li", { class: "hit", "data-doc": hit.doc_id },
    head,
    el("p", { class: "snippet" }, ...highlighted(hit.snippet, terms)),
    el("p", { class: "meta" }, el("span", { class: "score", text: `score ${score(shownScore)}` }),
       el("span", { class: "doc-id", text: hit.doc_id })));
}

function moved(from, to) {
  const delta = from - to;
  const text = delta === 0 ? `= #${from}` : `from #${from}`;
  const cls = delta > 0 ? "up" : delta < 0 ? "down" : "same";
  const label = delta === 0 ? "same rank as in the first stage"
    : `moved ${delta > 0 ? "up" : "down"} ${Math.abs(delta)} from first-stage rank ${from}`;
  return el("span", { class: `move ${cls}`, title: label, "aria-label": label },
            `${delta > 0 ? "▲" : delta < 0 ? "▼" : ""} ${text}`.trim());
}

function render(state, found, judged) {
  const shown = Number(state.k) || SHOWN;
  const terms = queryTerms(found.query);
  const reranking = found.mode !== "none";
  const finalRank = new Map(found.hits.map((hit, i) => [hit.doc_id, i + 1]));
  const firstStage = [...found.hits].sort((a, b) => a.first_stage.rank - b.first_stage.rank).slice(0, shown);
  $("first").replaceChildren(...firstStage.map((hit) => {
    const to = finalRank.get(hit.doc_id);
    const movement = reranking && hit.reranked
      ? el("span", { class: "move to", text: `→ #${to}`, title: `rank ${to} after reranking` }) : null;
    return hitItem(hit, hit.first_stage.rank, { terms, judged, movement, shownScore: hit.first_stage.score });
  }));
  $("final").replaceChildren(...found.hits.slice(0, shown).map((hit, i) => {
    const movement = reranking
      ? (hit.reranked ? moved(hit.first_stage.rank, i + 1) : el("span", { class: "move same", text: "not reranked" }))
      : null;
    return hitItem(hit, i + 1, { terms, judged, movement, shownScore: hit.score });
  }));
  $("first-note").textContent = `${found.retriever}: its top ${firstStage.length}.`;
  $("final-note").textContent = reranking
    ? `${found.mode}${found.adapter ? ` + adapter ${found.adapter.slice(0, 8)}` : ""}, top ${found.depth} ` +
      `reranked${found.head ? `, scoring head ${found.head.slice(0, 8)}`
        : found.fusion_weight === null ? ", reranker score alone" : `, fusion weight ${found.fusion_weight}`}.`
    : "No reranking (mode none): the first stage's order.";
  $("results").hidden = false;

  const relevant = judged && judged.query_id !== null
    ? Object.values(judged.relevance).filter((r) => r > 0).length : 0;
  const judgedText = judged && judged.query_id !== null
    ? ` Judged query ${judged.query_id}: ${relevant} relevant passage${relevant === 1 ? "" : "s"} in the qrels, ` +
      "marked where they appear." : "";
  const kv = found.kv_cache;
  $("summary").replaceChildren(
    el("span", { class: "kv", text: `KV: ${kv.hits} from the store, ${kv.misses} prefilled` }),
    document.createTextNode(`. ${found.batch_queries > 1 ? `Scored in a batch of ${found.batch_queries}. ` : ""}` +
                            judgedText));
  renderTimings();
  $("run").hidden = false;
}

function renderTimings() {
  const scale = Math.max(...runs.map((run) => run.timings.total), 1);
  const rows = runs.map((run, i) => {
    const t = run.timings;
    const known = STAGES.reduce((sum, stage) => sum + (t[stage] || 0), 0);
    const parts = [...STAGES.map((stage) => [stage, t[stage] || 0]), ["other", Math.max(t.total - known, 0)]];
    const bar = el("div", { class: "bar", role: "img",
                            "aria-label": parts.map(([name, v]) => `${name} ${ms(v)}`).join(", ") });
    for (const [name, value] of parts) {
      if (value <= 0) continue;
      const seg = el("span", { class: `seg ${name}`, title: `${name}: ${ms(value)}` });
      seg.style.width = `${(100 * value) / scale}%`;
      bar.append(seg);
    }
    const numbers = el("dl", { class: "stage-ms" });
    for (const [name, value] of parts) {
      numbers.append(el("dt", { text: name === "kv_lookup" ? "KV lookup" : name }),
                     el("dd", { "data-stage": name, text: ms(value) }));
    }
    const label = i === 0 ? "first search" : `again (${i + 1})`;
    return el("li", { class: "timing", "data-run": i + 1 },
      el("div", { class: "timing-head" }, el("span", { class: "run-label", text: label }),
         el("span", { class: "total", text: `total ${ms(t.total)}` }),
         el("span", { class: "kv-run", text: `KV ${run.kv.hits} hit / ${run.kv.misses} prefilled` })),
      bar, numbers);
  });
  $("timings").replaceChildren(...rows);
  const reuse = $("reuse");
  if (runs.length < 2) {
    reuse.textContent = runs[0].mode === "none" ? ""
      : "Press “Search again”: the passages' KV is now in the store, so the prefill disappears.";
    return;
  }
  const [previous, last] = runs.slice(-2);
  const same = previous.order.join("\n") === last.order.join("\n");
  const saved = previous.timings.prefill - last.timings.prefill;
  reuse.textContent = `${same ? "Same ranking as the previous search" : "The ranking changed"}; ` +
    `${last.kv.misses} passages prefilled this time (before: ${previous.kv.misses}), prefill ` +
    `${ms(last.timings.prefill)} (${saved >= 0 ? "saved" : "added"} ${ms(Math.abs(saved))}).`;
  reuse.dataset.same = same ? "yes" : "no";
}

async function refreshStore() {
  const stats = await api("/v1/store").catch(() => null);
  if (!stats) return;
  const rows = [
    ["entries", stats.entries.toLocaleString()],
    ["tokens", stats.tokens.toLocaleString()],
    ["bytes", `${bytes(stats.bytes)}${stats.max_bytes ? ` of ${bytes(stats.max_bytes)}` : ""}`],
    ["bytes per token", stats.bytes_per_token.toLocaleString()],
    ["KV format", stats.kv_format],
    ["hit rate", `${(100 * stats.hit_rate).toFixed(1)} % (${stats.hits} hits, ${stats.misses} misses)`],
    ["evictions", stats.evictions.toLocaleString()],
    ["kept", stats.persistent ? "on disk" : "in memory"],
  ];
  $("store-stats").replaceChildren(...rows.flatMap(([name, value]) => [
    el("dt", { text: name }), el("dd", { "data-stat": name, text: value })]));
}

// ------------------------------------------------------------------------------------------- wiring
async function start() {
  const cfg = await guarded(() => api("/v1/page/config"), start);
  if (!cfg) return;
  applyConfig(cfg);
  const state = readUrl();
  fillForm(state);
  refreshStore();
  if (state.q) await search({ ...formState(), k: state.k || "" });
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!config) return;
    const state = formState();
    window.history.pushState(state, "", stateUrl(state));
    search(state);
  });
  $("again").addEventListener("click", () => { if (lastSearch) search(lastSearch, { again: true }); });
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("key-panel").hidden = true;
    const retry = config ? pending : start;
    pending = null;
    if (retry) await retry();
  });
  window.addEventListener("popstate", () => {
    if (!config) return;
    const state = readUrl();
    fillForm(state);
    if (state.q) search({ ...formState(), k: state.k || "" });
  });
  start();
});
