// Canopy's dashboard: one event stream (/v1/events) and one poll (/v1/dashboard, every 2 s).
"use strict";

const $ = (s) => document.querySelector(s);
const POLL_MS = 2000;
const WINDOW_MS = 10 * 60 * 1000;
const MAX_EVENTS = 2000;

const view = {
  events: [],
  eventNodes: new Set(),
  eventKinds: new Set(),
  samples: [],
  last: null,
  latest: null,
  charts: {},
  chat: [],
  abort: null,
};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

const short = (id) => (id || "").slice(0, 8);
const time = (ms) => new Date(ms).toISOString().slice(11, 23);
function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  if (response.status === 401) { location.reload(); throw new Error("unauthorized"); }
  return response;
}

// ---- events ------------------------------------------------------------------------------

function connectEvents() {
  const stream = new EventSource("/v1/events");
  stream.onopen = () => { $("#stream").textContent = "events: live"; $("#stream").className = "pill live"; };
  stream.onerror = () => { $("#stream").textContent = "events: reconnecting"; $("#stream").className = "pill down"; };
  stream.onmessage = (m) => addEvent(JSON.parse(m.data));
  stream.addEventListener("missed", (m) => {
    const n = JSON.parse(m.data).missed;
    addEvent({ id: 0, time_ms: Date.now(), node: "", path: "dashboard", kind: "missed", failure: true,
      message: `${n} events were dropped by the node before this page read them` });
  });
}

function addEvent(e) {
  view.events.push(e);
  if (view.events.length > MAX_EVENTS) view.events.splice(0, view.events.length - MAX_EVENTS);
  for (const [set, value, select] of [[view.eventNodes, e.node, "#filter-node"], [view.eventKinds, e.kind, "#filter-kind"]]) {
    if (value && !set.has(value)) {
      set.add(value);
      $(select).append(el("option", { value }, select === "#filter-node" ? short(value) : value));
    }
  }
  scheduleTimeline();
}

let timelinePending = false;
function scheduleTimeline() {
  if (timelinePending) return;
  timelinePending = true;
  requestAnimationFrame(() => { timelinePending = false; renderTimeline(); });
}

function shown(e) {
  const node = $("#filter-node").value;
  const kind = $("#filter-kind").value;
  if (node && e.node !== node) return false;
  if (kind === "failures") return e.failure;
  return !kind || e.kind === kind;
}

function renderTimeline() {
  const events = view.events.filter(shown);
  $("#event-count").textContent = `${events.length} shown, ${events.filter((e) => e.failure).length} failures`;
  const list = $("#events");
  list.replaceChildren(...events.slice(-300).reverse().map((e) =>
    el("li", { class: e.failure ? "failure" : "", "data-kind": e.kind, "data-id": e.id },
      el("span", { class: "t" }, `${time(e.time_ms)} ${short(e.node)} `), `${e.path}: ${e.message}`)));
  const strip = $("#strip");
  const now = Date.now();
  const svg = "http://www.w3.org/2000/svg";
  strip.replaceChildren();
  for (const e of events) {
    const age = now - e.time_ms;
    if (age > WINDOW_MS) continue;
    const c = document.createElementNS(svg, "circle");
    c.setAttribute("cx", String(1000 - (age / WINDOW_MS) * 1000));
    c.setAttribute("cy", e.failure ? "12" : "28");
    c.setAttribute("r", e.failure ? "5" : "3");
    c.setAttribute("fill", e.failure ? "#c0392b" : "#2f7d4f");
    const title = document.createElementNS(svg, "title");
    title.textContent = `${time(e.time_ms)} ${e.message}`;
    c.append(title);
    strip.append(c);
  }
}

// ---- state -------------------------------------------------------------------------------

async function poll() {
  try {
    const response = await api("/v1/dashboard");
    if (response.ok) render(await response.json());
  } catch (err) {
    $("#summary").textContent = `cannot reach the node: ${err.message}`;
  }
  setTimeout(poll, POLL_MS);
}

function heartbeatAges(actors, me) {
  const ages = {};
  const mine = (actors.nodes || []).find((n) => n.node === me) || (actors.nodes || [])[0];
  (function walk(a) {
    if (!a) return;
    if (a.kind === "peer-monitor" && a.details && a.details.peer) ages[a.details.peer] = a.details.heartbeat_age_ms;
    (a.children || []).forEach(walk);
  })(mine && mine.tree);
  return ages;
}

function instancesOf(state) {
  const rows = state.instances || (state.local && state.local.instances) || [];
  return rows.map((i) => ({
    id: i.id || i.instance, model: i.model, node: i.node, state: i.state,
    status: i.status, restarts: i.restarts || 0, last_failure: i.last_failure,
  }));
}

function render(d) {
  view.latest = d;
  const s = d.state;
  const cluster = Array.isArray(s.nodes);
  $("#summary").textContent = cluster
    ? `node ${short(s.node)} · master ${short(s.master) || "none"} · term ${s.term}${s.quorum ? "" : " · NO QUORUM"} · ${s.nodes.length} nodes`
    : "standalone node";

  const ages = heartbeatAges(d.actors || {}, d.node);
  const nodes = cluster ? s.nodes : [{ id: d.node, self: true, master: false }];
  $("#nodes tbody").replaceChildren(...nodes.map((n) => el("tr", { "data-node": n.id },
    el("td", {}, short(n.id) + (n.self ? " (this node)" : "")),
    el("td", {}, n.master ? "master" : cluster ? "member" : "standalone"),
    el("td", {}, n.api || ""),
    el("td", {}, bytes(n.mem_available)),
    el("td", {}, n.self ? "" : ages[n.id] != null ? `${ages[n.id]} ms ago` : ""))));

  const instances = instancesOf(s);
  $("#instances tbody").replaceChildren(...instances.map((i) => el("tr", { "data-instance": i.id },
    el("td", {}, i.id),
    el("td", {}, i.model),
    el("td", {}, short(i.node)),
    el("td", { class: `status-${i.status}` }, i.state && i.state !== "active" ? `${i.status} (${i.state})` : i.status),
    el("td", { class: "restarts" }, String(i.restarts)),
    el("td", { class: "fail" }, i.last_failure || ""),
    el("td", {}, cluster ? el("button", { onclick: () => removeInstance(i.id) }, "Remove") : ""))));

  const models = [...new Set(instances.map((i) => i.model))];
  const select = $("#chat-model");
  if ([...select.options].map((o) => o.value).join() !== models.join()) {
    const keep = select.value;
    select.replaceChildren(...models.map((m) => el("option", { value: m }, m)));
    if (models.includes(keep)) select.value = keep;
  }

  renderTree(d.actors || {});
  sample(d);
}

function renderTree(actors) {
  const nodes = actors.nodes || [];
  const select = $("#tree-node");
  const ids = nodes.map((n) => n.node);
  if ([...select.options].map((o) => o.value).join() !== ids.join()) {
    const keep = select.value;
    select.replaceChildren(...nodes.map((n) => el("option", { value: n.node }, short(n.node) + (n.master ? " (master)" : ""))));
    if (ids.includes(keep)) select.value = keep;
  }
  const chosen = nodes.find((n) => n.node === select.value) || nodes[0];
  if (!chosen) return;
  if (!chosen.tree) { $("#tree").replaceChildren(el("p", {}, chosen.error || "no tree")); return; }
  const item = (a) => {
    const details = a.details && typeof a.details === "object" && Object.keys(a.details).length
      ? " " + Object.entries(a.details).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ") : "";
    const up = a.uptime_ms != null ? ` up ${(a.uptime_ms / 1000).toFixed(0)}s` : "";
    return el("li", {},
      el("span", {}, a.child_id || a.name || a.id), " ", el("span", { class: "kind" }, a.kind),
      ` ${a.status}${up}${a.restarts ? ` restarts=${a.restarts}` : ""}`,
      el("span", { class: "details" }, details),
      a.children && a.children.length ? el("ul", {}, ...a.children.map(item)) : "");
  };
  $("#tree").replaceChildren(el("ul", {}, item(chosen.tree)));
}

// ---- charts ------------------------------------------------------------------------------

function sample(d) {
  const t = d.time_ms / 1000;
  const st = d.stats;
  if (view.last) {
    const dt = Math.max(t - view.last.t, 0.001);
    const dc = st.ttft_count - view.last.ttft_count;
    view.samples.push({
      t,
      tps: Math.max(0, (st.tokens_generated - view.last.tokens_generated) / dt),
      running: st.running, queued: st.queued,
      ttft: dc > 0 ? ((st.ttft_sum - view.last.ttft_sum) / dc) * 1000 : null,
    });
  }
  view.last = Object.assign({ t }, st);
  while (view.samples.length && view.samples[0].t < t - WINDOW_MS / 1000) view.samples.shift();
  drawCharts();
}

function chart(id, title, series) {
  if (typeof uPlot === "undefined") return null;
  const target = $(id);
  const opts = {
    title, width: Math.max(target.clientWidth || 400, 200), height: 110,
    legend: { show: true }, cursor: { show: false },
    series: [{}].concat(series.map(([label, stroke]) => ({ label, stroke, width: 1.5, spanGaps: true }))),
    axes: [{}, { size: 45 }],
  };
  return new uPlot(opts, [[], ...series.map(() => [])], target);
}

function drawCharts() {
  const c = view.charts;
  if (!c.tps) {
    c.tps = chart("#chart-tps", "tokens / s", [["generated", "#2f7d4f"]]);
    c.queue = chart("#chart-queue", "sequences", [["running", "#2f7d4f"], ["queued", "#b7791f"]]);
    c.ttft = chart("#chart-ttft", "time to first token (ms)", [["mean", "#1f5fb7"]]);
  }
  if (!c.tps) return;
  const xs = view.samples.map((s) => s.t);
  c.tps.setData([xs, view.samples.map((s) => s.tps)]);
  c.queue.setData([xs, view.samples.map((s) => s.running), view.samples.map((s) => s.queued)]);
  c.ttft.setData([xs, view.samples.map((s) => s.ttft)]);
}

// ---- operations --------------------------------------------------------------------------

async function removeInstance(id) {
  if (!confirm(`Remove instance ${id}? Its runner stops and its requests end.`)) return;
  const response = await api(`/instances/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!response.ok) alert(`could not remove ${id}: ${await errorText(response)}`);
}

async function errorText(response) {
  const text = await response.text();
  try { return JSON.parse(text).error.message; } catch (_) { return text; }
}

$("#place-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const model = $("#place-model").value.trim();
  const instances = Number($("#place-count").value) || 1;
  if (!model || !confirm(`Place ${instances} instance(s) of ${model}?`)) return;
  $("#place-result").textContent = "placing…";
  const response = await api("/instances", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, instances, request_id: `dashboard-${Date.now()}-${Math.random().toString(16).slice(2)}` }),
  });
  $("#place-result").textContent = response.ok ? "placed" : `failed: ${await errorText(response)}`;
});

// ---- chat --------------------------------------------------------------------------------

$("#chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("#chat-input").value.trim();
  const model = $("#chat-model").value;
  if (!text || !model || view.abort) return;
  $("#chat-input").value = "";
  view.chat.push({ role: "user", content: text });
  const out = $("#chat-output");
  out.append(el("div", { class: "user" }, `> ${text}`));
  const answer = el("div", { class: "assistant" });
  out.append(answer);
  view.abort = new AbortController();
  $("#chat-stop").disabled = false;
  $("#chat-send").disabled = true;
  let reply = "";
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: view.abort.signal,
      body: JSON.stringify({ model, messages: view.chat, stream: true }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) { reply += delta.content; answer.textContent = reply; out.scrollTop = out.scrollHeight; }
      }
    }
    view.chat.push({ role: "assistant", content: reply });
  } catch (err) {
    view.chat.pop();
    answer.append(el("span", { class: "error" }, ` [${err.name === "AbortError" ? "stopped" : err.message}]`));
  } finally {
    view.abort = null;
    $("#chat-stop").disabled = true;
    $("#chat-send").disabled = false;
  }
});
$("#chat-stop").addEventListener("click", () => view.abort && view.abort.abort());

$("#filter-node").addEventListener("change", renderTimeline);
$("#filter-kind").addEventListener("change", renderTimeline);
$("#tree-node").addEventListener("change", () => view.latest && renderTree(view.latest.actors || {}));
setInterval(renderTimeline, 5000);

connectEvents();
poll();
