// The ClearSkies web UI: plain JavaScript over the daemon's HTTP API (protocol/http-api.md).
"use strict";

const state = { csrf: null, shares: [], progress: {}, refreshing: false, again: false };
const $ = (id) => document.getElementById(id);
const MAX_EVENTS_SHOWN = 50;

function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function say(text) { $("message").textContent = text; }

async function api(command, args) {
  const options = { credentials: "same-origin", headers: {} };
  if (args !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.headers["X-CSRF-Token"] = state.csrf;
    options.body = JSON.stringify(args);
  }
  const response = await fetch("/rest/" + command, options);
  const body = await response.json();
  if (!response.ok) {
    const error = new Error(body.message || body.error || ("HTTP " + response.status));
    error.status = response.status;
    throw error;
  }
  return body;
}

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function shareItem(share) {
  const progress = state.progress[share.path];
  const items = progress ? progress.items : share.items_to_download;
  const bytes = progress ? progress.bytes : share.bytes_to_download;
  const inSync = share.in_sync;
  const label = inSync ? "in sync" : share.status;
  const facts = [
    (share.files || 0) + " files", formatBytes(share.bytes || 0),
    (share.peers_connected || 0) + " of " + (share.peers_known || 0) + " peers connected",
    share.access,
  ];
  const item = el("li", { "data-path": share.path },
    el("div", { class: "share-path" }, share.path, " ",
       el("span", { class: "state" + (inSync ? " in-sync" : "") +
                    (share.status === "error" ? " error" : "") }, label)),
    el("div", { class: "share-facts" }, facts.join(" · ")));
  if (items) {
    const bar = el("progress", { max: "100", value: "0",
                                 "aria-label": "download progress of " + share.path });
    const known = state.progress[share.path] && state.progress[share.path].started;
    if (known && known > 0) bar.value = Math.max(0, Math.min(100, 100 * (1 - bytes / known)));
    item.append(el("div", {}, items + " items, " + formatBytes(bytes) + " to download"), bar);
  }
  if (share.problem) item.append(el("p", { role: "alert" }, share.problem));
  if (share.conflicts_waiting && share.conflicts_waiting.length) {
    item.append(el("details", {}, el("summary", {}, share.conflicts_waiting.length +
      " change(s) from peers waiting (conflicts)"),
      el("ul", {}, ...share.conflicts_waiting.map((p) => el("li", {}, p)))));
  }
  if (share.peers && share.peers.length) {
    item.append(el("ul", { class: "peers" }, ...share.peers.map((p) =>
      el("li", {}, (p.name || p.peer_id.slice(0, 8)) + ": " +
         (p.connected ? (p.in_sync ? "connected, in sync" : "connected, syncing")
                      : "not connected")))));
  }
  if (share.share_id) {
    item.append(el("div", { class: "actions" },
      el("button", { type: "button", onclick: () => makeCode(share.path, "read_write") },
         "Code (read and write)"),
      el("button", { type: "button", onclick: () => makeCode(share.path, "read_only") },
         "Code (read only)"),
      el("button", { type: "button", onclick: () => showPeers(share.path) }, "Peers"),
      el("button", { type: "button", "aria-label": "Browse files of " + share.path,
                     onclick: () => browse(share.path, "") }, "Files"),
      el("button", { type: "button", onclick: () => detach(share.path) }, "Detach")));
  } else {
    item.append(el("div", { class: "actions" },
      el("button", { type: "button", onclick: () => detach(share.path) }, "Cancel attach")));
  }
  return item;
}

function render() {
  const list = $("shares");
  list.replaceChildren(...state.shares.map(shareItem));
  $("no-shares").hidden = state.shares.length > 0;
}

async function refresh() {
  if (state.refreshing) { state.again = true; return; }
  state.refreshing = true;
  try {
    const [status, list] = await Promise.all([api("status"), api("list_shares")]);
    const peers = {};
    for (const share of state.shares) if (share.peers) peers[share.path] = share.peers;
    state.shares = list.shares.map((s) => Object.assign(s, peers[s.path] ? { peers: peers[s.path] } : {}));
    $("daemon").textContent = (status.paused ? "Paused · " : "") + "↑ " +
      formatBytes(status.upload_rate) + "/s ↓ " + formatBytes(status.download_rate) + "/s · " +
      status.name;
    $("pause").textContent = status.paused ? "Resume" : "Pause";
    $("pause").dataset.paused = status.paused ? "yes" : "no";
    $("pause").hidden = false;
    render();
  } catch (error) {
    if (error.status === 401) return showLogin();
    say(error.message);
  } finally {
    state.refreshing = false;
    if (state.again) { state.again = false; setTimeout(refresh, 200); }
  }
}

async function showPeers(path) {
  try {
    const reply = await api(".clearskies.peers?path=" + encodeURIComponent(path));
    const share = state.shares.find((s) => s.path === path);
    if (share) { share.peers = reply.peers; render(); }
    if (!reply.peers.length) say("No peer knows " + path + " yet.");
  } catch (error) { say(error.message); }
}

async function makeCode(path, mode) {
  try {
    const reply = await api("create_access_code", { path, mode });
    showCode(path, reply.access_code);
  } catch (error) { say(error.message); }
}

async function showCode(path, code) {
  $("code").hidden = false;
  $("code-path").textContent = path;
  $("code-text").textContent = code;
  const image = $("code-qr");
  image.hidden = true;
  try {
    const qr = await api("qr", { text: "clearskies:" + code });
    image.src = "data:image/svg+xml;base64," + btoa(qr.svg);
    image.alt = "QR code of the access code " + code;
    image.hidden = false;
  } catch (error) { /* no QR library: the code as text is enough */ }
  $("code").scrollIntoView();
}

async function detach(path) {
  if (!window.confirm("Stop syncing " + path + "? Its files stay where they are.")) return;
  try { await api("remove_share", { path }); say(path + " is no longer synced."); }
  catch (error) { say(error.message); }
  refresh();
}

// -- the file browser: one folder of a share, a page at a time, with thumbnails --------

const BROWSE_PAGE = 100;
const browser = { share: null, dir: "", next: null };

async function browse(share, dir) {
  browser.share = share;
  browser.dir = dir;
  browser.next = null;
  $("entries").replaceChildren();
  $("browser").hidden = false;
  $("browser-title").textContent = "Files of " + share;
  crumbs();
  await browseMore();
  $("browser").scrollIntoView();
  const first = $("crumbs").querySelector("button:last-of-type");
  if (first) first.focus();
}

function crumbs() {
  const parts = browser.dir ? browser.dir.split("/") : [];
  const trail = [el("button", { type: "button", class: "crumb",
                                onclick: () => browse(browser.share, "") }, "Top")];
  parts.forEach((name, i) => {
    const dir = parts.slice(0, i + 1).join("/");
    trail.push(" / ", el("button", { type: "button", class: "crumb",
                                     onclick: () => browse(browser.share, dir) }, name));
  });
  const last = trail[trail.length - 1];
  last.setAttribute("aria-current", "location");
  $("crumbs").replaceChildren(...trail);
}

function thumbnailImage(entry) {
  const query = "path=" + encodeURIComponent(browser.share) + "&file=" +
    encodeURIComponent(entry.path) + (entry.sha256 ? "&sha256=" + entry.sha256 : "");
  const image = el("img", { class: "thumb", loading: "lazy", alt: "Thumbnail of " + entry.name,
                            width: "96", height: "96" });
  let tries = 0;
  image.addEventListener("error", () => {
    // Busy (503): the daemon makes a few at a time; ask again a little later.
    if (++tries <= 4) setTimeout(() => { image.src = "/rest/thumbnail?" + query + "&try=" + tries; },
                                 1500 * tries);
    else image.replaceWith(el("span", { class: "thumb none", "aria-hidden": "true" }, "IMG"));
  });
  image.src = "/rest/thumbnail?" + query;
  return image;
}

function kindOf(name) {
  const dot = name.lastIndexOf(".");
  return dot > 0 && name.length - dot <= 5 ? name.slice(dot + 1).toUpperCase() : "FILE";
}

function entryItem(entry) {
  const facts = [];
  if (entry.type === "file") facts.push(formatBytes(entry.size || 0));
  if (entry.mtime) facts.push(new Date(entry.mtime * 1000).toLocaleString());
  if (!entry.held) facts.push("not downloaded yet");
  else if (entry.wanted) facts.push("a newer version is coming");
  const item = el("li", { "data-path": entry.path, class: entry.held ? "" : "coming" });
  if (entry.type === "dir") {
    item.append(el("span", { class: "thumb none folder", "aria-hidden": "true" }, "DIR"),
      el("button", { type: "button", class: "link", "aria-label": "Open folder " + entry.name,
                     onclick: () => browse(browser.share, entry.path) }, entry.name + "/"));
  } else {
    item.append(entry.thumbnail ? thumbnailImage(entry)
                                : el("span", { class: "thumb none", "aria-hidden": "true" },
                                     kindOf(entry.name)),
                el("span", { class: "name" }, entry.name));
  }
  item.append(el("span", { class: "facts" }, facts.join(" · ")));
  return item;
}

function arrived(event) {
  // A file the browser shows as coming is here now.
  if ($("browser").hidden || event.path !== browser.share) return;
  for (const item of $("entries").children) {
    if (item.dataset.path !== event.file || !item.classList.contains("coming")) continue;
    item.classList.remove("coming");
    const facts = item.querySelector(".facts");
    facts.textContent = facts.textContent.replace(" · not downloaded yet", "")
      .replace("not downloaded yet", "");
  }
}

async function browseMore() {
  const args = { path: browser.share, dir: browser.dir, limit: BROWSE_PAGE };
  if (browser.next) args.after = browser.next;
  try {
    const page = await api(".clearskies.browse", args);
    $("entries").append(...page.entries.map(entryItem));
    browser.next = page.next;
    $("browser-more").hidden = !page.next;
    $("browser-empty").hidden = $("entries").children.length > 0;
  } catch (error) { say(error.message); }
}

function version(side) {
  if (!side) return "not on disk";
  return formatBytes(side.size) + ", changed " + new Date(side.mtime * 1000).toLocaleString();
}

function conflictItem(share, conflict) {
  const peer = conflict.peer_name || (conflict.peer_id ? conflict.peer_id.slice(0, 8) : null);
  const settle = (keep, text, label) => el("button", {
    type: "button", "aria-label": text + " (" + label + ")",
    onclick: () => resolveConflict(share, conflict, keep) }, text);
  return el("li", { "data-conflict": conflict.id },
    el("div", { class: "share-path" }, conflict.file, " ", el("span", { class: "state error" },
       peer ? "conflict with " + peer : "conflict")),
    el("dl", {},
      el("dt", {}, "This one: ", conflict.file), el("dd", {}, version(conflict.file_version)),
      el("dt", {}, "The other: ", conflict.copy), el("dd", {}, version(conflict.copy_version))),
    el("div", { class: "actions" },
      settle("file", "Keep this one", "Keep " + conflict.file + ", remove the other"),
      settle("copy", "Keep the other", "Keep " + conflict.copy + " in its place"),
      settle("both", "Keep both", "Keep both versions")));
}

async function resolveConflict(share, conflict, keep) {
  try {
    await api(".clearskies.resolve_conflict", { path: share, id: conflict.id, keep });
    say(keep === "both" ? "Kept both versions of " + conflict.file + "."
                        : "Settled the conflict of " + conflict.file + ".");
  } catch (error) { say(error.message); }
  refreshDetails();
}

function changeItem(change) {
  const time = new Date(change.time * 1000).toLocaleTimeString();
  const peer = change.peer_name || (change.peer_id ? change.peer_id.slice(0, 8) : "");
  const how = { received: "from", sent: "to", deleted: "by", conflict: "with" }[change.kind];
  return el("li", {}, time + " " + change.kind.replace(/_/g, " ") + " " + (change.file || "") +
    (change.size ? " (" + formatBytes(change.size) + ")" : "") +
    (peer && how ? " " + how + " " + peer : ""));
}

let detailsTimer = null;
function refreshDetails() {
  // At most one round of requests per second, however many events arrive.
  if (detailsTimer) return;
  detailsTimer = setTimeout(async () => {
    detailsTimer = null;
    const conflicts = [], changes = [];
    for (const share of state.shares.filter((s) => s.share_id)) {
      const q = "?path=" + encodeURIComponent(share.path);
      try {
        const [c, r] = await Promise.all([api(".clearskies.conflicts" + q),
                                          api(".clearskies.changes" + q)]);
        conflicts.push(...c.conflicts.map((x) => conflictItem(share.path, x)));
        changes.push(...r.changes.slice(0, MAX_EVENTS_SHOWN));
      } catch (error) { /* the share went meanwhile */ }
    }
    changes.sort((a, b) => b.time - a.time);
    $("conflicts").replaceChildren(...conflicts);
    $("no-conflicts").hidden = conflicts.length > 0;
    $("changes").replaceChildren(...changes.slice(0, MAX_EVENTS_SHOWN).map(changeItem));
    $("no-changes").hidden = changes.length > 0;
  }, 300);
}

const DETAIL_EVENTS = new Set(["conflict", "conflict_resolved", "download_finished", "deleted",
                               "upload_started", "share_added", "share_removed"]);

function describe(event) {
  const time = new Date(event.time * 1000).toLocaleTimeString();
  const what = event.file || event.path || "";
  let extra = "";
  if (event.type === "download_progress") extra = formatBytes(event.received) + " of " + formatBytes(event.size);
  if (event.type === "rates") extra = "↑ " + formatBytes(event.upload_rate) + "/s ↓ " + formatBytes(event.download_rate) + "/s";
  if (event.type === "share_status") extra = event.in_sync ? "in sync" : event.status;
  if (event.type === "peer_connected") extra = event.name || event.peer_id.slice(0, 8);
  if (event.message) extra = event.message;
  return time + " " + event.type.replace(/_/g, " ") + " " + what + (extra ? " — " + extra : "");
}

function onEvent(event) {
  if (event.type !== "rates" && event.type !== "download_progress") {
    const list = $("events");
    list.prepend(el("li", {}, describe(event)));
    while (list.children.length > MAX_EVENTS_SHOWN) list.lastChild.remove();
  }
  if (event.type === "share_progress") {
    const known = state.progress[event.path];
    const started = known && known.items > 0 ? Math.max(known.started, event.bytes_to_download)
                                             : event.bytes_to_download;
    const remaining = event.bytes_remaining === undefined ? event.bytes_to_download
                                                          : event.bytes_remaining;
    state.progress[event.path] = { items: event.items_to_download, bytes: remaining, started };
  }
  if (DETAIL_EVENTS.has(event.type)) refreshDetails();
  if (event.type === "download_finished") arrived(event);
  if (event.type === "rates" || event.type.startsWith("share_") || event.type.startsWith("peer_") ||
      event.type === "paused" || event.type === "resumed" || event.type === "download_finished") {
    refresh();
  }
}

function listen() {
  const source = new EventSource("/rest/events/stream");
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
  source.onerror = () => { /* the browser reconnects, with Last-Event-ID */ };
}

function showLogin() {
  $("login-needed").hidden = false;
  $("ui").hidden = true;
  $("pause").hidden = true;
}

async function start() {
  try {
    const session = await api("session");
    state.csrf = session.csrf_token;
  } catch (error) {
    return showLogin();
  }
  $("ui").hidden = false;
  $("pause").addEventListener("click", async () => {
    try { await api($("pause").dataset.paused === "yes" ? "resume" : "pause", {}); }
    catch (error) { say(error.message); }
    refresh();
  });
  $("browser-more").addEventListener("click", browseMore);
  $("browser-close").addEventListener("click", () => { $("browser").hidden = true; });
  $("share-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const path = $("share-path").value.trim();
    try {
      const created = await api("create_share", { path });
      if (created.warning) say(created.warning);
      const code = await api("create_access_code", { path: created.path, mode: $("share-mode").value });
      showCode(created.path, code.access_code);
    } catch (error) { say(error.message); }
    refresh();
  });
  $("attach-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const args = { code: $("attach-code").value.trim(), path: $("attach-path").value.trim() };
      const peer = $("attach-peer").value.trim();
      if (peer) args.peers = [peer];
      await api("add_share", args);
      say("Waiting for a peer that has this share…");
    } catch (error) { say(error.message); }
    refresh();
  });
  await refresh();
  refreshDetails();
  listen();
}

start();
