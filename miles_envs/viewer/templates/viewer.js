(() => {
  "use strict";
  const started = performance.now();
  const ROW_HEIGHT = 28;
  const OVERSCAN = 10;
  const STATUS_ORDER = ["completed", "truncated", "aborted", "failed"];
  const TYPED_ARRAYS = { Uint8Array, Uint16Array, Uint32Array, Int8Array, Int16Array, Int32Array };
  const NO_ENV = "(no env)";

  const $ = (id) => document.getElementById(id);
  const summary = JSON.parse($("viewer-summary").textContent);
  // Detail records stay one unparsed string; an episode's record is sliced out and parsed on open.
  const detailsText = $("viewer-details").textContent;
  const C = Object.fromEntries(summary.columns.map((name, i) => [name, i]));
  const episodes = summary.rows;
  const vocab = summary.vocab;

  const state = { shown: [], selected: -1, current: null, showIds: !vocab, heat: true, routing: true, layer: 0, expert: null };
  // scriptMs: this script's start-up; readyMs: from navigation start (HTML parsing included).
  const stats = { episodes: episodes.length, scriptMs: 0, readyMs: 0, filterMs: [], tokenViewMs: [] };

  const viewport = $("list-viewport");
  const spacer = $("list-spacer");
  const rowsEl = $("rows");
  const detailEl = $("detail");
  const filters = { env: $("filter-env"), status: $("filter-status"), min: $("filter-reward-min"), max: $("filter-reward-max") };

  // ---- formatting --------------------------------------------------------------------------
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" };
  const esc = (value) => String(value).replace(/[&<>"]/g, (c) => ESCAPES[c]);
  // Non-finite floats arrive as the strings "NaN", "Infinity", "-Infinity".
  const num = (value) => (typeof value === "number" ? value : Number(value));
  const fmt = (value) => {
    const x = num(value);
    return Number.isFinite(x) ? String(+x.toFixed(4)) : String(x);
  };
  const envOf = (row) => row[C.env_id] ?? NO_ENV;
  const badge = (status) => `<span class="badge status-${esc(status)}">${esc(status)}</span>`;
  const flagChips = (flags) => flags.map((f) => `<span class="flag">${esc(f)}</span>`).join("");

  // ---- filters -----------------------------------------------------------------------------
  function fillSelect(select, values) {
    for (const value of values) select.add(new Option(value, value));
  }

  function bound(input, fallback) {
    const text = input.value.trim();
    return text === "" ? fallback : Number(text);
  }

  function applyFilters() {
    const t0 = performance.now();
    const env = filters.env.value;
    const status = filters.status.value;
    const min = bound(filters.min, -Infinity);
    const max = bound(filters.max, Infinity);
    const bounded = min !== -Infinity || max !== Infinity;
    const shown = [];
    for (let i = 0; i < episodes.length; i++) {
      const row = episodes[i];
      if (env && envOf(row) !== env) continue;
      if (status && row[C.status] !== status) continue;
      if (bounded) {
        const reward = num(row[C.reward]);
        if (!(reward >= min && reward <= max)) continue;
      }
      shown.push(i);
    }
    state.shown = shown;
    spacer.style.height = `${shown.length * ROW_HEIGHT}px`;
    const count = $("count");
    count.dataset.shown = shown.length;
    count.dataset.total = episodes.length;
    count.textContent = `${shown.length} of ${episodes.length} episodes`;
    renderRows();
    const ms = performance.now() - t0;
    stats.filterMs.push(ms);
    showTiming(`filtered in ${ms.toFixed(1)} ms`);
  }

  function showTiming(text) {
    $("timing").textContent = `ready in ${stats.readyMs.toFixed(0)} ms · ${text}`;
  }

  // ---- virtualised list --------------------------------------------------------------------
  function rowHtml(index) {
    const row = episodes[index];
    const error = row[C.error] ? `<span class="error">${esc(row[C.error])}</span>` : "";
    const tokens = row[C.prompt_tokens] + row[C.response_tokens];
    return (
      `<div class="row${index === state.selected ? " selected" : ""}" data-index="${index}" data-status="${esc(row[C.status])}">` +
      `<span class="c-index">${index}</span><span class="c-status">${badge(row[C.status])}</span>` +
      `<span class="c-env" title="${esc(envOf(row))}">${esc(envOf(row))}</span>` +
      `<span class="c-reward">${fmt(row[C.reward])}</span><span class="c-turns">${row[C.turns]}</span>` +
      `<span class="c-tokens">${tokens}</span><span class="c-note">${flagChips(row[C.flags])}${error}</span></div>`
    );
  }

  function renderRows() {
    const top = viewport.scrollTop;
    const height = viewport.clientHeight;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(state.shown.length, Math.ceil((top + height) / ROW_HEIGHT) + OVERSCAN);
    let html = "";
    for (let k = first; k < last; k++) html += rowHtml(state.shown[k]);
    rowsEl.style.transform = `translateY(${first * ROW_HEIGHT}px)`;
    rowsEl.innerHTML = html;
  }

  let scrollPending = false;
  viewport.addEventListener("scroll", () => {
    if (scrollPending) return;
    scrollPending = true;
    requestAnimationFrame(() => {
      scrollPending = false;
      renderRows();
    });
  });

  rowsEl.addEventListener("click", (event) => {
    const row = event.target.closest(".row");
    if (row) select(Number(row.dataset.index));
  });

  $("list").addEventListener("keydown", (event) => {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    event.preventDefault();
    const position = state.shown.indexOf(state.selected);
    const next = Math.min(state.shown.length - 1, Math.max(0, position + (event.key === "ArrowDown" ? 1 : -1)));
    if (next < 0) return;
    const top = next * ROW_HEIGHT;
    if (top < viewport.scrollTop) viewport.scrollTop = top;
    else if (top + ROW_HEIGHT > viewport.scrollTop + viewport.clientHeight) viewport.scrollTop = top + ROW_HEIGHT - viewport.clientHeight;
    select(state.shown[next]);
  });

  // ---- episode detail ----------------------------------------------------------------------
  function loadDetail(index) {
    const row = episodes[index];
    const offset = row[C.detail_offset];
    return JSON.parse(detailsText.slice(offset, offset + row[C.detail_length]));
  }

  function decodeRouting(routing) {
    if (!routing || !routing.b64) return null;
    const binary = atob(routing.b64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    const [rows, layers, topk] = routing.shape;
    return { data: new TYPED_ARRAYS[routing.type](bytes.buffer), rows, layers, topk };
  }

  function select(index) {
    state.selected = index;
    renderRows();
    const detail = loadDetail(index);
    state.current = { index, detail, routing: decodeRouting(detail.routing) };
    state.layer = 0;
    state.expert = null;
    renderDetail();
  }

  function facts(pairs) {
    return `<dl class="facts">${pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => `<dt>${esc(k)}</dt><dd>${v}</dd>`).join("")}</dl>`;
  }

  function rewardTable(row) {
    const components = Object.entries(row[C.reward_components]);
    if (!components.length) return "";
    const cells = components.map(([name, value]) => `<tr><td>${esc(name)}</td><td>${fmt(value)}</td></tr>`).join("");
    return `<table class="grid" id="reward-components"><tr><th>component</th><th>value</th></tr>${cells}</table>`;
  }

  function turnsTable(turns) {
    if (!turns.length) return "";
    const cells = turns
      .map(([kind, start, end, finish, version, accepted, drafted]) =>
        `<tr class="turn-${esc(kind)}"><td>${esc(kind)}</td><td>${start}–${end}</td><td>${esc(finish ?? "")}</td><td>${esc(version ?? "")}</td><td>${drafted ? `${accepted}/${drafted}` : ""}</td></tr>`)
      .join("");
    return `<h3>Turns</h3><table class="grid" id="turns"><tr><th>kind</th><th>response tokens</th><th>finish</th><th>weights</th><th>spec accepted</th></tr>${cells}</table>`;
  }

  function toolCallText(call) {
    const fn = call.function || {};
    const args = typeof fn.arguments === "string" ? fn.arguments : JSON.stringify(fn.arguments);
    return `${call.id ? `${call.id} → ` : ""}${fn.name}(${args ?? ""})`;
  }

  function messageHtml(message) {
    const content = message.content;
    const text = content === null || content === undefined ? "" : typeof content === "string" ? content : JSON.stringify(content, null, 2);
    const extra = [message.name && `name ${message.name}`, message.tool_call_id && `reply to ${message.tool_call_id}`].filter(Boolean).join(" · ");
    const reasoning = message.reasoning_content ? `<pre class="reasoning">${esc(message.reasoning_content)}</pre>` : "";
    const calls = message.tool_calls ? `<pre class="tool-calls">${esc(message.tool_calls.map(toolCallText).join("\n"))}</pre>` : "";
    return (
      `<div class="message role-${esc(message.role)}"><div class="role"><span class="name">${esc(message.role)}</span>${extra ? ` · ${esc(extra)}` : ""}</div>` +
      `${reasoning}${text ? `<pre>${esc(text)}</pre>` : ""}${calls}</div>`
    );
  }

  function tokenControls(routing) {
    const routingControls = routing
      ? `<label>layer <input id="routing-layer" type="number" min="0" max="${routing.layers - 1}" value="0" size="3"></label>` +
        `<label>expert <input id="routing-expert" type="number" min="0" placeholder="any" size="4"></label>`
      : "";
    return (
      `<div class="token-controls">` +
      `<label><input id="show-ids" type="checkbox"${state.showIds ? " checked" : ""}${vocab ? "" : " disabled"}> ids</label>` +
      `<label><input id="show-heat" type="checkbox"${state.heat ? " checked" : ""}> logprob heat</label>` +
      `<label><input id="show-routing" type="checkbox"${state.routing ? " checked" : ""}> routed tokens</label>${routingControls}` +
      `<span class="legend"><span class="tok prompt">prompt</span><span class="tok model">model</span><span class="tok env">env</span>` +
      `<span class="tok tool">tool call</span><span class="tok hit">expert hit</span></span></div>`
    );
  }

  function renderDetail() {
    const { index, detail, routing } = state.current;
    const row = episodes[index];
    const tokens = `${row[C.prompt_tokens]} prompt + ${row[C.response_tokens]} response (${row[C.model_tokens]} model)`;
    const routingShape = detail.routing ? detail.routing.shape.join(" × ") : null;
    detailEl.innerHTML =
      `<h2>${badge(row[C.status])}<span>episode ${index}</span><code>${esc(row[C.id])}</code></h2>` +
      (detail.error ? `<div class="error-box" id="error">${esc(detail.error)}</div>` : "") +
      `<div class="summary">` +
      facts([
        ["env", esc(envOf(row))],
        ["reward", `<span id="reward">${fmt(row[C.reward])}</span>`],
        ["agent", row[C.agent_id] && esc(row[C.agent_id])],
        ["group", row[C.group_id] && esc(row[C.group_id])],
        ["episode", detail.episode_id && esc(detail.episode_id)],
        ["seed", row[C.seed]],
        ["tokens", tokens],
        ["routing", routingShape && `${routingShape}${routing ? "" : " (experts not embedded)"}`],
        ["flags", row[C.flags].length ? flagChips(row[C.flags]) : null],
      ]) +
      `<div>${rewardTable(row)}</div></div>` +
      `<h3>Tokens</h3>${tokenControls(routing)}<div id="tokens"></div>` +
      `<h3>Conversation</h3><div id="conversation">${detail.messages.map(messageHtml).join("")}</div>` +
      turnsTable(detail.turns) +
      (Object.keys(detail.metadata).length ? `<h3>Metadata</h3><pre id="metadata">${esc(JSON.stringify(detail.metadata, null, 2))}</pre>` : "");
    bindTokenControls();
    renderTokens();
  }

  function bindTokenControls() {
    const on = (id, handler) => {
      const element = $(id);
      if (element) element.addEventListener("input", () => { handler(element); renderTokens(); });
    };
    on("show-ids", (el) => (state.showIds = el.checked));
    on("show-heat", (el) => (state.heat = el.checked));
    on("show-routing", (el) => (state.routing = el.checked));
    on("routing-layer", (el) => (state.layer = Math.max(0, Number(el.value) || 0)));
    on("routing-expert", (el) => (state.expert = el.value === "" ? null : Number(el.value)));
  }

  // ---- token view (built when an episode is opened) ----------------------------------------
  function tokenText(id) {
    if (state.showIds || !vocab) return String(id);
    const text = vocab[id];
    if (text === undefined) return `⟨${id}⟩`;
    if (text === "") return "∅";
    return esc(text).replace(/\n/g, '<span class="nl">↵</span>\n');
  }

  function heatOf(logprob) {
    const heat = 1 - Math.exp(logprob);
    return Number.isFinite(heat) ? Math.min(1, Math.max(0, heat)).toFixed(2) : "1";
  }

  function renderTokens() {
    const t0 = performance.now();
    const { detail, routing } = state.current;
    const prompt = detail.prompt;
    const promptLength = prompt.length;
    const total = promptLength + detail.response.length;
    const inToolCall = new Uint8Array(total);
    for (const [start, end] of detail.tool_spans) inToolCall.fill(1, start, end);
    const routedRows = detail.routing ? detail.routing.shape[0] : 0;
    const layer = routing ? Math.min(state.layer, routing.layers - 1) : 0;
    const parts = new Array(total);
    let logprobIndex = 0;
    for (let i = 0; i < total; i++) {
      const id = i < promptLength ? prompt[i] : detail.response[i - promptLength];
      let cls;
      let title = `#${i} id ${id}`;
      let style = "";
      if (i < promptLength) cls = "tok prompt";
      else if (detail.mask.charCodeAt(i - promptLength) === 49) {
        const logprob = num(detail.logprobs[logprobIndex++]);
        cls = "tok model";
        style = ` style="--heat:${heatOf(logprob)}"`;
        title += ` · logprob ${fmt(logprob)}`;
      } else cls = "tok env";
      if (inToolCall[i]) cls += " tool";
      if (i < routedRows) {
        cls += " routed";
        if (routing) {
          const start = (i * routing.layers + layer) * routing.topk;
          const experts = Array.from(routing.data.subarray(start, start + routing.topk));
          title += ` · layer ${layer} experts ${experts.join(",")}`;
          if (state.expert !== null && experts.includes(state.expert)) cls += " hit";
        }
      }
      parts[i] = `<span class="${cls}" data-i="${i}"${style} title="${title}">${tokenText(id)}</span>`;
    }
    const view = $("tokens");
    view.className = [state.showIds || !vocab ? "ids" : "text", state.heat ? "heat" : "", state.routing ? "show-routing" : ""].join(" ");
    view.innerHTML = parts.join("");
    stats.tokenViewMs.push(performance.now() - t0);
  }

  // ---- start -------------------------------------------------------------------------------
  $("title").textContent = summary.title;
  fillSelect(filters.env, [...new Set(episodes.map(envOf))].sort());
  const statuses = new Set(episodes.map((row) => row[C.status]));
  fillSelect(filters.status, STATUS_ORDER.filter((s) => statuses.has(s)));
  for (const input of Object.values(filters)) input.addEventListener("input", applyFilters);
  window.addEventListener("resize", renderRows);
  stats.scriptMs = performance.now() - started;
  stats.readyMs = performance.now();
  applyFilters();
  stats.filterMs.length = 0;
  document.body.dataset.ready = "true";
  window.viewer = { stats, select, applyFilters };
})();
