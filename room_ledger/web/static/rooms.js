// The rooms page: every room in the log, refreshed every two seconds. Room data goes into the page
// with textContent only (never parsed as HTML).
"use strict";

const REFRESH_MS = 2000;

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const ago = Math.max(0, (Date.now() - d.getTime()) / 1000);
  const span = ago < 60 ? `${ago.toFixed(0)}s` : ago < 3600 ? `${(ago / 60).toFixed(0)}m` :
    ago < 172800 ? `${(ago / 3600).toFixed(0)}h` : `${(ago / 86400).toFixed(0)}d`;
  return `${d.toISOString().replace("T", " ").slice(0, 19)} (${span} ago)`;
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/rooms", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    const rooms = await response.json();
    const body = document.getElementById("rooms");
    const rows = [];
    for (const r of rooms) {
      const tr = document.createElement("tr");
      tr.dataset.room = r.room;
      const name = document.createElement("td");
      const link = document.createElement("a");
      link.href = "/room?" + new URLSearchParams({ room: r.room }).toString();
      link.textContent = r.room;
      link.className = "room-link";
      name.appendChild(link);
      tr.appendChild(name);
      cell(tr, r.events.toLocaleString("en"), "num");
      cell(tr, when(r.last_activity));
      const shown = r.participants.slice(0, 8).join(", ");
      cell(tr, r.participants.length > 8 ? `${shown} +${r.participants.length - 8}` : shown);
      cell(tr, r.gaps, r.gaps ? "num gap" : "num");
      cell(tr, r.watchers, "num");
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    document.getElementById("rooms-empty").hidden = rooms.length > 0;
    status.textContent = `${rooms.length} room(s) · ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    status.textContent = `cannot read the rooms: ${err.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
