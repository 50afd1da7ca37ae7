// One room: the live timeline (a WebSocket following the log), the folded view (floor lanes,
// handoffs, participants, conversation, session and its patches), time travel and search.
// Everything from the room is put into the page with textContent; only the floor lanes arrive as
// SVG markup, built and escaped by the server (the same drawing as `ledger replay --html`).
"use strict";

const TIMELINE_MAX = 500;
// New rows are added in batches this often: a busy room (1,000 events/s) is ten layouts a second, not sixty.
const FLUSH_MS = 100;
const REFRESH_MS = 1000;

const room = new URLSearchParams(location.search).get("room") || "";
const $ = (id) => document.getElementById(id);

let live = true;
let travelledTo = null;
let lastSeq = 0;
let firstSeq = null;
let received = 0;
let refreshing = false;
let refreshDue = false;
let lastRefresh = 0;
let pending = [];
let flushScheduled = false;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text != null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function hms(iso) {
  if (!iso) return "–";
  return new Date(iso).toISOString().slice(11, 23);
}

function duration(s) {
  if (s == null) return "unknown";
  if (s < 1) return `${Math.round(s * 1000)}ms`;
  if (s < 60) return `${s.toFixed(1)}s`;
  return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`;
}

async function api(path, query) {
  const response = await fetch(`${path}?${new URLSearchParams(query).toString()}`, { cache: "no-store" });
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: the message is the text */ }
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${text}`);
  return data;
}

function rows(tbodyId, list, make, empty, columns) {
  const body = $(tbodyId);
  const out = list.map(make);
  if (!out.length) {
    const tr = el("tr");
    const td = el("td", empty, "muted");
    td.colSpan = columns;
    tr.appendChild(td);
    out.push(tr);
  }
  body.replaceChildren(...out);
}

function tr(...cells) {
  const row = el("tr");
  for (const c of cells) row.appendChild(c instanceof Node ? wrap(c) : el("td", c));
  return row;
}

function wrap(node) {
  if (node.tagName === "TD") return node;
  const td = el("td");
  td.appendChild(node);
  return td;
}

// The JSON each section was last drawn from: a refresh redraws only what changed.
const drawn = {};

function changed(section, data) {
  const text = JSON.stringify(data);
  if (drawn[section] === text) return false;
  drawn[section] = text;
  return true;
}

function render(view) {
  $("room-name").textContent = view.room;
  document.title = `${view.room} · ledger serve`;
  firstSeq = view.first_seq;
  $("summary").textContent = `${view.events.toLocaleString("en")} events, #${view.first_seq || 0}–#${view.last_seq}` +
    (view.start ? ` · ${view.start.replace("T", " ").slice(0, 19)} → ${hms(view.end)} UTC` : "");
  const holder = $("floor-holder");
  holder.replaceChildren();
  if (view.floor.holder) {
    holder.appendChild(el("span", view.floor.holder, "pill hold"));
    if (view.floor.task) holder.appendChild(document.createTextNode(` (${view.floor.task})`));
  } else {
    holder.textContent = "free";
  }
  $("floor-queue").textContent = view.floor.queue.map((c) => c.agent_id).join(", ") || "empty";
  const gapWarning = $("gap-warning");
  gapWarning.hidden = !view.gaps.length;
  gapWarning.textContent = view.gaps.length ? ` · ${view.gaps.length} bridge gap(s): events may be missing` : "";

  // The server's SVG: every name in it escaped by room_ledger/web/html.py.
  if (changed("svg", view.floor_svg)) $("floor-lanes").innerHTML = view.floor_svg;
  if (changed("speech", view.speech_svg)) $("speech-lanes").innerHTML = view.speech_svg;
  if (changed("tenures", view.tenures)) rows("tenures", view.tenures, (t) => tr(`#${t.start_seq} ${hms(t.start)}`, el("strong", t.holder), t.task || "",
    t.end_seq ? `#${t.end_seq} ${hms(t.end)}` : "holding", t.end_reason || ""), "Nobody held the floor.", 5);
  if (changed("handoffs", view.handoffs)) rows("handoff-rows", view.handoffs, (h) => {
    const dead = el("td", duration(h.dead_air_s), h.dead_air_s >= 2 ? "dead-bad" : "");
    return tr(`#${h.seq} ${hms(h.time)}`, h.from, h.to, h.outcome || "",
      (h.outcome === "failed" ? h.error : h.reason) || "", dead, duration(h.waited_s));
  }, "No handoffs.", 7);
  if (changed("participants", view.participants)) rows("participant-rows", view.participants, (p) => {
    const lock = p.lock === "holds" ? el("td", "🔒 holds the floor") : p.lock === "queued" ?
      el("td", "queued") : el("td", p.note, "muted");
    const row = tr(p.identity, p.kind, el("span", p.present ? "present" : "left", p.present ? "pill yes" : "pill"),
      p.agent_state || "", p.status || "", p.task || "", lock);
    row.dataset.identity = p.identity;
    return row;
  }, "No participants.", 7);

  $("conversation-count").textContent = `(${view.conversation_total} items` +
    (view.conversation.length < view.conversation_total ? `, the latest ${view.conversation.length} shown)` : ")");
  if (changed("conversation", view.conversation)) drawConversation(view);
  if (changed("session", [view.session, view.session_changes])) drawSession(view);
  if (changed("gaps", view.gaps)) drawGaps(view);
  drawSlider(view);
}

function drawConversation(view) {
  const items = view.conversation.map((i) => {
    const li = el("li");
    li.dataset.seq = i.seq;
    li.appendChild(el("span", `#${i.seq} ${hms(i.time)} `, "muted"));
    li.appendChild(el("span", i.speaker || i.role, `role role-${i.role}`));
    li.appendChild(el("span", i.text, "text"));
    return li;
  });
  const convo = $("conversation-items");
  convo.replaceChildren(...items);
  convo.scrollTop = convo.scrollHeight;
}

function drawSession(view) {
  $("session-version").textContent = `(version #${view.session_version}, ${Object.keys(view.session).length} fields)`;
  $("session-doc").textContent = JSON.stringify(view.session, null, 2);
  $("session-changes-count").textContent = `(${view.session_changes_total})`;
  $("session-changes").replaceChildren(...view.session_changes.slice().reverse().map((c) => {
    const set = Object.keys(c.patch).filter((k) => c.patch[k] !== null);
    const removed = Object.keys(c.patch).filter((k) => c.patch[k] === null);
    const li = el("li");
    li.appendChild(el("span", `#${c.seq}`, "seq"));
    li.appendChild(el("span", `${hms(c.time)} ${c.sender || "-"}: ` + (set.length ? `set ${set.join(", ")}` : "") +
      (removed.length ? ` removed ${removed.join(", ")}` : "")));
    li.title = JSON.stringify(c.patch);
    return li;
  }));
}

function drawGaps(view) {
  $("gap-rows").replaceChildren(...view.gaps.map((g) => el("li",
    `#${g.seq} bridge ${g.bridge_id}: ${hms(g.started_at)} → ${hms(g.ended_at)} ${g.reason || ""}`, "bridge-gap")));
  if (!view.gaps.length) $("gap-rows").appendChild(el("li", "No gaps.", "muted"));
}

function drawSlider(view) {
  const slider = $("slider");
  slider.min = String(view.first_seq || 1);
  if (live) {
    lastSeq = Math.max(lastSeq, view.last_seq);
    slider.max = String(lastSeq);
    slider.value = String(lastSeq);
    $("slider-label").textContent = `#${lastSeq} (now)`;
  }
  document.body.dataset.viewSeq = String(view.seq);
}

async function refresh() {
  if (refreshing) { refreshDue = true; return; }
  refreshing = true;
  refreshDue = false;
  lastRefresh = Date.now();
  try {
    const view = await api("/api/room", { room });
    if (live) render(view);
  } catch (err) {
    $("summary").textContent = `cannot read the room: ${err.message}`;
  } finally {
    refreshing = false;
    if (refreshDue) setTimeout(refresh, Math.max(0, REFRESH_MS - (Date.now() - lastRefresh)));
  }
}

function scheduleRefresh() {
  if (!live) return;
  if (refreshing) { refreshDue = true; return; }
  const wait = REFRESH_MS - (Date.now() - lastRefresh);
  if (wait <= 0) refresh();
  else if (!refreshDue) { refreshDue = true; setTimeout(refresh, wait); }
}

// One element and one text node per row (a busy room draws a thousand rows a second; the type's
// colour comes from the row's class).
function eventItem(e) {
  const li = el("li", `#${e.seq}  ${hms(e.time)}  ${e.type.padEnd(20)} ${e.sender || "-"}: ${e.text}`,
    `t-${e.type.split(".")[0]}` + (e.type === "bridge.gap" ? " bridge-gap" : ""));
  li.dataset.seq = e.seq;
  li.dataset.type = e.type;
  if (travelledTo !== null && e.seq > travelledTo) li.classList.add("future");
  return li;
}

// One listener per list (not per row: a busy room adds a thousand rows a second).
function travelOnClick(list) {
  list.addEventListener("click", (event) => {
    const li = event.target.closest("li[data-seq]");
    if (li && list.contains(li)) travel(Number(li.dataset.seq));
  });
}

function flush() {
  flushScheduled = false;
  const list = $("timeline");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const batch = pending.slice(-TIMELINE_MAX);
  pending = [];
  const fragment = document.createDocumentFragment();
  for (const e of batch) fragment.appendChild(eventItem(e));
  list.appendChild(fragment);
  let extra = list.childElementCount - TIMELINE_MAX;
  while (extra-- > 0) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
  $("timeline-count").textContent = `(${received.toLocaleString("en")} received, latest #${lastSeq})`;
  const slider = $("slider");
  slider.max = String(lastSeq);
  if (live) {
    slider.value = String(lastSeq);
    $("slider-label").textContent = `#${lastSeq} (now)`;
  }
}

// The live timeline arrives over a WebSocket (an EventSource would hold one of the six connections
// a browser opens per server, so a seventh tab would hang); on a drop it reconnects after the last
// event it has, so nothing is missed or shown twice.
let lastReceived = null;

function receive(e) {
  if (lastReceived !== null && e.seq <= lastReceived) return;
  lastReceived = e.seq;
  // bench/serve.py sets this array to time each event's arrival in the page.
  if (window.__ledgerArrivals) window.__ledgerArrivals.push([e.seq, Date.now() / 1000]);
  received += 1;
  if (e.seq > lastSeq) lastSeq = e.seq;
  pending.push(e);
}

function follow() {
  const query = { room };
  if (lastReceived !== null) query.after = String(lastReceived);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/api/live?${new URLSearchParams(query).toString()}`);
  socket.addEventListener("open", () => { $("conn").textContent = "following the log"; });
  socket.addEventListener("message", (message) => {
    for (const e of JSON.parse(message.data)) receive(e);
    if (!flushScheduled) { flushScheduled = true; setTimeout(flush, FLUSH_MS); }
    scheduleRefresh();
  });
  socket.addEventListener("close", () => {
    $("conn").textContent = "reconnecting…";
    setTimeout(follow, 1000);
  });
}

async function travel(seq) {
  live = false;
  travelledTo = seq;
  $("live-badge").textContent = `at #${seq}`;
  $("live-badge").className = "badge past";
  $("back-to-live").hidden = false;
  $("slider").value = String(seq);
  $("slider-label").textContent = `#${seq}`;
  for (const li of $("timeline").children) li.classList.toggle("future", Number(li.dataset.seq) > seq);
  try {
    const view = await api("/api/room", { room, at: String(seq) });
    if (travelledTo !== seq) return;
    render(view);
    const banner = $("at-banner");
    banner.hidden = false;
    banner.textContent = `The room as it was at #${view.seq} (${view.last_activity ? view.last_activity.replace("T", " ").slice(0, 23) : ""}), ` +
      "folded from the log as `ledger replay --at` does. New events keep arriving in the timeline.";
  } catch (err) {
    $("at-banner").hidden = false;
    $("at-banner").textContent = `cannot show #${seq}: ${err.message}`;
  }
}

function backToLive() {
  live = true;
  travelledTo = null;
  $("live-badge").textContent = "live";
  $("live-badge").className = "badge live";
  $("back-to-live").hidden = true;
  $("at-banner").hidden = true;
  for (const li of $("timeline").children) li.classList.remove("future");
  refresh();
}

async function search(event) {
  event.preventDefault();
  const q = $("search").value.trim();
  if (!q) return;
  const box = $("search-results");
  box.hidden = false;
  $("search-clear").hidden = false;
  $("search-summary").textContent = "searching…";
  try {
    const result = await api("/api/search", { room, q });
    $("search-summary").textContent = `${result.hits.length}${result.more ? "+" : ""} event(s) contain “${result.q}” ` +
      `(${result.scanned} read); click one to see the room at that moment`;
    $("search-hits").replaceChildren(...result.hits.map(eventItem));
  } catch (err) {
    $("search-summary").textContent = `search failed: ${err.message}`;
  }
}

function start() {
  $("room-name").textContent = room;
  document.title = `${room} · ledger serve`;
  if (!room) { $("summary").textContent = "No room given: open a room from the rooms page."; return; }
  const slider = $("slider");
  slider.addEventListener("input", () => { $("slider-label").textContent = `#${slider.value}`; });
  slider.addEventListener("change", () => {
    const seq = Number(slider.value);
    if (seq >= lastSeq && travelledTo === null) return;
    travel(seq);
  });
  $("back-to-live").addEventListener("click", backToLive);
  travelOnClick($("timeline"));
  travelOnClick($("search-hits"));
  $("search-form").addEventListener("submit", search);
  $("search-clear").addEventListener("click", () => {
    $("search-results").hidden = true; $("search-clear").hidden = true; $("search").value = "";
  });
  refresh();
  follow();
}

start();
