// ecgmon central station page: the bed wall, the alarm list, acknowledgements and review strips.
// Everything arrives on one WebSocket (/ws) from `ecgmon station`; nothing is fetched from elsewhere.
"use strict";

const PX_PER_MM = 96 / 25.4;          // CSS pixels per millimetre
const SWEEP_MM_S = 25;                // paper speed (mm/s)
const GAIN_MM_MV = 10;                // amplitude (mm/mV)
const PX_PER_S = SWEEP_MM_S * PX_PER_MM;
const DELAY_S = 1.5;                  // the trace runs this far behind the newest sample (windows come each second)
const TRACE_W = 230, TRACE_H = 110;   // trace size (px)
const TRACE_COLOUR = "#3ee07a";
const PRIORITY_RANK = { high: 3, medium: 2, low: 1 };
const TECHNICAL = new Set(["signal_loss", "leads_off", "saturation", "poor_signal", "lead_fault", "data_gap",
                           "windows_dropped"]);
const BEAT_COLOURS = { N: "#555", S: "#1f5fd0", V: "#d01f2a", F: "#d07a1f", Q: "#8a3fd0" };

const beds = new Map();       // device -> bed state (see makeBed)
const alarmLog = [];          // every alarm message seen, oldest first
const openAlarms = new Map(); // alarm_id -> its last message, while open
let socket = null, user = "", brokerUp = true, socketUp = false;
const daemons = new Map();    // daemon id -> state
window.stationStats = { frames: 0, ecgMessages: 0, frameMs: [] };  // read by `ecgmon bench --station`

// --- the connection ---------------------------------------------------------------------------------
function connect() {
  socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  socket.onopen = () => { socketUp = true; renderBanners(); };
  socket.onclose = (event) => {
    socketUp = false;
    if (event.code === 1008) { location.href = "/login"; return; }
    renderBanners();
    setTimeout(connect, 1000);
  };
  socket.onmessage = (event) => handle(JSON.parse(event.data));
}

function send(doc) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(doc));
}

function handle(msg) {
  switch (msg.type) {
    case "snapshot":
      user = msg.user; document.getElementById("who").textContent = user;
      brokerUp = msg.broker_up;
      for (const [d, s] of Object.entries(msg.daemons)) daemons.set(d, s);
      alarmLog.length = 0; openAlarms.clear();
      for (const a of msg.alarms) noteAlarm(a);
      for (const b of msg.beds) updateBed(b);
      renderAlarms(); renderBanners();
      break;
    case "ecg": addEcg(msg); break;
    case "bed": updateBed(msg.bed); break;
    case "alarm": noteAlarm(msg.alarm); renderAlarmsSoon(); break;
    case "broker": brokerUp = msg.up; renderBanners(); break;
    case "daemon": daemons.set(msg.daemon, msg.state); renderBanners(); break;
  }
}

// --- beds -------------------------------------------------------------------------------------------
function makeBed(device) {
  const tile = document.createElement("article");
  tile.className = "tile";
  tile.dataset.device = device;
  tile.innerHTML = `
    <div class="top"><span class="label" title="name this bed"></span><span class="patient"></span>
      <select class="lead" title="lead shown"></select></div>
    <div class="body"><canvas width="${TRACE_W}" height="${TRACE_H}"></canvas>
      <div class="side"><span class="hr">--<small> bpm</small></span><span class="rhythm">—</span></div></div>
    <div class="alarm-line"></div><div class="tech-line"></div>
    <div class="nosignal">NO SIGNAL</div>`;
  const bed = { device, tile, canvas: tile.querySelector("canvas"), chunks: [], lead: null, leadChosen: false,
                playhead: null, lastX: null, lastY: null, info: null };
  bed.ctx = bed.canvas.getContext("2d");
  tile.querySelector(".label").addEventListener("click", () => openRename(bed));
  tile.querySelector(".lead").addEventListener("change", (e) => { bed.lead = e.target.value; bed.leadChosen = true; });
  beds.set(device, bed);
  placeTiles();
  const option = document.createElement("option");
  option.value = option.textContent = device;
  document.getElementById("filter-bed").append(option);
  return bed;
}

function updateBed(info) {
  const bed = beds.get(info.device) || makeBed(info.device);
  const moved = !bed.info || bed.info.order !== info.order;
  bed.info = info;
  const t = bed.tile;
  t.querySelector(".label").textContent = info.label;
  t.querySelector(".patient").textContent = info.patient;
  const hr = info.heart_rate_bpm;
  t.querySelector(".hr").firstChild.textContent = hr == null || info.silent ? "--" : String(Math.round(hr));
  t.querySelector(".rhythm").textContent = info.rhythm;
  const select = t.querySelector(".lead");
  if (select.options.length !== info.leads.length || [...select.options].some((o, i) => o.value !== info.leads[i])) {
    select.innerHTML = info.leads.map((l) => `<option>${escapeHtml(l)}</option>`).join("");
  }
  const faulty = faultyLeads(info.alarms);
  if (!bed.leadChosen || !info.leads.includes(bed.lead)) {
    bed.lead = info.leads.find((l) => !faulty.has(l)) || info.leads[0] || null;
  }
  select.value = bed.lead || "";
  const physiological = info.alarms.filter((a) => !TECHNICAL.has(a.type));
  const technical = info.alarms.filter((a) => TECHNICAL.has(a.type));
  const top = [...info.alarms].sort((a, b) => PRIORITY_RANK[b.priority] - PRIORITY_RANK[a.priority])[0];
  t.dataset.priority = top ? top.priority : "";
  t.dataset.acknowledged = String(!top || info.alarms.filter((a) => a.priority === top.priority)
    .every((a) => !sounding(a)));
  t.dataset.silent = String(info.silent || info.alarms.some((a) => a.type === "signal_loss"));
  t.querySelector(".alarm-line").textContent = physiological.map((a) => a.message).join(" · ");
  t.querySelector(".tech-line").textContent = technical.map((a) => a.message.split(":")[0]).join(" · ");
  if (moved) placeTiles();
}

function faultyLeads(alarms) {
  const faulty = new Set();
  for (const a of alarms) {
    if (a.type === "lead_fault" && a.evidence && a.evidence.leads) Object.keys(a.evidence.leads).forEach((l) => faulty.add(l));
  }
  return faulty;
}

function placeTiles() {
  const wall = document.getElementById("wall");
  const sorted = [...beds.values()].sort((a, b) => ((a.info && a.info.order) || 0) - ((b.info && b.info.order) || 0)
    || a.device.localeCompare(b.device));
  for (const bed of sorted) wall.append(bed.tile);
}

function openRename(bed) {
  const dialog = document.getElementById("rename");
  document.getElementById("rename-device").textContent = bed.device;
  document.getElementById("rename-label").value = bed.info ? bed.info.label : bed.device;
  document.getElementById("rename-patient").value = bed.info ? bed.info.patient : "";
  document.getElementById("rename-order").value = bed.info ? bed.info.order : 0;
  dialog.onclose = () => {
    if (dialog.returnValue !== "save") return;
    send({ action: "rename", device: bed.device, label: document.getElementById("rename-label").value,
           patient: document.getElementById("rename-patient").value,
           order: parseInt(document.getElementById("rename-order").value, 10) || 0 });
  };
  dialog.showModal();
}

// --- traces -----------------------------------------------------------------------------------------
function addEcg(msg) {
  window.stationStats.ecgMessages++;
  const bed = beds.get(msg.device) || makeBed(msg.device);
  bed.chunks.push({ t0: msg.t0, fs: msg.fs, leads: msg.leads, samples: msg.samples_uv,  // µV
                    end: msg.t0 + msg.samples_uv[0].length / msg.fs });
  const newest = bed.chunks[bed.chunks.length - 1].end;
  if (bed.playhead === null || bed.playhead < newest - DELAY_S - 30) bed.playhead = newest - DELAY_S;  // (re)start
  while (bed.chunks.length && bed.chunks[0].end < bed.playhead - 1) bed.chunks.shift();
}

function sampleAt(bed, t) {
  for (const c of bed.chunks) {
    if (t >= c.t0 && t < c.end) {
      const lead = Math.max(c.leads.indexOf(bed.lead), 0);
      return c.samples[lead][Math.floor((t - c.t0) * c.fs)] / 1000;  // mV
    }
  }
  return null;
}

function drawTrace(bed, dt) {
  if (bed.playhead === null || !bed.chunks.length) return;
  const newest = bed.chunks[bed.chunks.length - 1].end;
  const from = bed.playhead;
  // Real time, faster while behind (a replay sped up, a burst after a stall), never past the data (a gap pauses it).
  const lag = newest - DELAY_S - bed.playhead;
  bed.playhead = Math.min(bed.playhead + dt * (lag > 0.5 ? 1 + lag : 1), newest);
  const ctx = bed.ctx, mid = TRACE_H / 2, scale = GAIN_MM_MV * PX_PER_MM;
  const x0 = from * PX_PER_S, x1 = bed.playhead * PX_PER_S;
  ctx.strokeStyle = TRACE_COLOUR;
  ctx.lineWidth = 1.4;
  for (let x = Math.floor(x0) + 1; x <= x1; x++) {
    const col = ((x % TRACE_W) + TRACE_W) % TRACE_W;
    ctx.clearRect(col, 0, 10, TRACE_H);                   // the sweep's erase bar
    if (col + 10 > TRACE_W) ctx.clearRect(0, 0, col + 10 - TRACE_W, TRACE_H);
    const v = sampleAt(bed, x / PX_PER_S);
    const y = v == null ? null : mid - v * scale;
    if (y !== null && bed.lastY !== null && col > 0) {
      ctx.beginPath(); ctx.moveTo(col - 1, bed.lastY); ctx.lineTo(col, y); ctx.stroke();
    }
    bed.lastY = y;
  }
  bed.tile.dataset.playhead = bed.playhead.toFixed(3);
}

let lastFrame = performance.now();
function frame(now) {
  const dt = Math.min((now - lastFrame) / 1000, 0.5);
  const stats = window.stationStats;
  if (stats.frameMs.length < 100000) stats.frameMs.push(now - lastFrame);
  lastFrame = now;
  for (const bed of beds.values()) drawTrace(bed, dt);
  stats.frames++;
  requestAnimationFrame(frame);
}

// --- alarms -----------------------------------------------------------------------------------------
function noteAlarm(a) {
  alarmLog.push(a);
  if (alarmLog.length > 5000) alarmLog.shift();
  if (a.state === "cleared") openAlarms.delete(a.alarm_id); else openAlarms.set(a.alarm_id, a);
}

function evidenceText(e) {
  if (!e) return "";
  const parts = [];
  if (e.heart_rate_bpm != null) parts.push(`HR ${Math.round(e.heart_rate_bpm)}`);
  for (const k of ["seconds_without_qrs", "seconds_without_data", "p_af", "v_beats_last_minute", "reason"]) {
    if (e[k] != null) parts.push(`${k.replace(/_/g, " ")} ${e[k]}`);
  }
  if (e.leads) parts.push(Object.entries(e.leads).map(([l, f]) => `${l} ${f}`).join(", "));
  return parts.join("; ");
}

let alarmsDue = false;
function renderAlarmsSoon() {  // at most one rebuild of the list per frame, however many alarms arrive
  if (alarmsDue) return;
  alarmsDue = true;
  requestAnimationFrame(() => { alarmsDue = false; renderAlarms(); });
}

function renderAlarms() {
  const priority = document.getElementById("filter-priority").value;
  const state = document.getElementById("filter-state").value;
  const device = document.getElementById("filter-bed").value;
  const rows = (state === "open" ? [...openAlarms.values()] : [...alarmLog])
    .filter((a) => (!priority || a.priority === priority) && (!device || a.device === device))
    .sort((a, b) => b.time - a.time).slice(0, 300);
  const body = document.querySelector("#alarms tbody");
  body.innerHTML = "";
  for (const a of rows) {
    const tr = document.createElement("tr");
    tr.dataset.alarmId = a.alarm_id;
    tr.dataset.state = a.state;
    const bed = beds.get(a.device);
    const ack = a.acknowledged;
    const silenced = ack && ack.silenced_until && ack.silenced_until * 1000 > Date.now();
    tr.innerHTML = `<td>${clock(a.time)}</td><td>${escapeHtml(bed && bed.info ? bed.info.label : a.device)}</td>
      <td>${escapeHtml(a.message)}</td><td class="p-${a.priority}">${a.priority}</td><td>${a.state}</td>
      <td>${escapeHtml(evidenceText(a.evidence))}${ack ? `<div class="acked">ack ${escapeHtml(ack.by)} ${clock(ack.at)}${
        silenced ? ", silenced" : ""}</div>` : ""}</td><td></td>`;
    if (a.state !== "cleared" && openAlarms.get(a.alarm_id) === a) {
      const cell = tr.lastElementChild;
      for (const [action, text] of [["acknowledge", "Ack"], ["silence", "Silence 2 min"]]) {
        const b = document.createElement("button");
        b.textContent = text; b.className = action;
        b.addEventListener("click", (e) => { e.stopPropagation(); send({ action, device: a.device, alarm_id: a.alarm_id }); });
        cell.append(b);
      }
    }
    tr.addEventListener("click", () => openReview(a));
    body.append(tr);
  }
}

// --- sound: a tone pattern per priority while an open alarm sounds ------------------------------------
// An alarm sounds (and flashes) until acknowledged; "silence for 2 min" acknowledges it until the silence ends, then
// it sounds again if still open. An alarm that escalates (VT becoming VF) is a new alarm: it sounds.
function sounding(a) {
  const ack = a.acknowledged;
  return a.state !== "cleared" && (!ack || (ack.silenced_until != null && ack.silenced_until * 1000 < Date.now()));
}

let audio = null, nextTone = 0;
function soundTick() {
  if (!document.getElementById("sound").checked) return;
  const now = Date.now() / 1000;
  const top = [...openAlarms.values()].filter(sounding)
    .sort((a, b) => PRIORITY_RANK[b.priority] - PRIORITY_RANK[a.priority])[0];
  if (!top || now < nextTone) return;
  audio = audio || new AudioContext();
  const pulses = top.priority === "high" ? 5 : top.priority === "medium" ? 3 : 1;
  for (let i = 0; i < pulses; i++) {
    const osc = audio.createOscillator(), gain = audio.createGain();
    osc.frequency.value = top.priority === "high" ? 880 : 660;
    gain.gain.value = 0.15;
    osc.connect(gain).connect(audio.destination);
    const at = audio.currentTime + i * 0.2;
    osc.start(at); osc.stop(at + 0.12);
  }
  nextTone = now + (top.priority === "high" ? 4 : top.priority === "medium" ? 8 : 16);
}

// --- review -----------------------------------------------------------------------------------------
async function openReview(a) {
  const dialog = document.getElementById("review");
  const bed = beds.get(a.device);
  document.getElementById("review-title").textContent =
    `${bed && bed.info ? bed.info.label : a.device}: ${a.message} (${a.priority}), raised ${clock(a.evidence.raised_at || a.time)}`;
  const strips = document.getElementById("review-strips");
  strips.innerHTML = "";
  document.getElementById("review-note").textContent = "loading…";
  dialog.showModal();
  const response = await fetch(`/api/review/${encodeURIComponent(a.alarm_id)}`);
  if (!response.ok) { document.getElementById("review-note").textContent = "no ECG kept for this alarm"; return; }
  const strip = await response.json();
  document.getElementById("review-note").textContent =
    `10 s before to 10 s after; 25 mm/s, 10 mm/mV; beats marked by class (N S V F Q); the red line is the raise.`;
  strip.leads.forEach((lead, i) => {
    const title = document.createElement("p");
    title.className = "lead"; title.textContent = lead;
    const canvas = document.createElement("canvas");
    canvas.className = "strip"; canvas.dataset.lead = lead;
    drawStrip(canvas, strip, i);
    strips.append(title, canvas);
  });
  dialog.dataset.beats = String(strip.beats.length);
  dialog.dataset.leads = String(strip.leads.length);
}

function drawStrip(canvas, strip, lead) {
  const seconds = strip.end - strip.start, h = 160;
  canvas.width = Math.ceil(seconds * PX_PER_S); canvas.height = h;
  const ctx = canvas.getContext("2d"), mid = h / 2 + 10, scale = GAIN_MM_MV * PX_PER_MM;
  ctx.fillStyle = "#fff8f8"; ctx.fillRect(0, 0, canvas.width, h);
  for (let mm = 0; mm * PX_PER_MM < Math.max(canvas.width, h); mm++) {  // ECG paper: 1 mm and 5 mm lines
    ctx.strokeStyle = mm % 5 ? "#f6d5d5" : "#eaa5a5";
    ctx.beginPath(); ctx.moveTo(mm * PX_PER_MM, 0); ctx.lineTo(mm * PX_PER_MM, h); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(0, mm * PX_PER_MM); ctx.lineTo(canvas.width, mm * PX_PER_MM); ctx.stroke();
  }
  ctx.strokeStyle = "#111"; ctx.lineWidth = 1.2; ctx.beginPath();
  let pen = false;
  strip.samples[lead].forEach((v, i) => {
    if (v === null) { pen = false; return; }
    const x = (i / strip.fs) * PX_PER_S, y = mid - v * scale;
    if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    pen = true;
  });
  ctx.stroke();
  ctx.font = "bold 12px sans-serif";
  for (const b of strip.beats) {
    const x = (b.time - strip.start) * PX_PER_S;
    ctx.fillStyle = BEAT_COLOURS[b.class] || "#000";
    ctx.fillText(b.class, x - 4, 14);
  }
  ctx.strokeStyle = "#e0202a"; ctx.lineWidth = 2;
  const ax = (strip.at - strip.start) * PX_PER_S;
  ctx.beginPath(); ctx.moveTo(ax, 18); ctx.lineTo(ax, h); ctx.stroke();
}

// --- banners: what nobody may miss ------------------------------------------------------------------
function renderBanners() {
  const lines = [];
  if (!socketUp) lines.push(["station", "STATION CONNECTION LOST: this page is not updating"]);
  else if (!brokerUp) lines.push(["broker", "STATION LOST THE BROKER: no ECG and no alarms are arriving"]);
  for (const [d, s] of daemons) {
    if (s === "offline") lines.push(["daemon", `MONITORING DAEMON ${d || ""} OFFLINE: no analysis, no new alarms`]);
  }
  const box = document.getElementById("banners");
  box.innerHTML = "";
  for (const [kind, text] of lines) {
    const div = document.createElement("div");
    div.className = "banner"; div.dataset.kind = kind; div.textContent = text;
    box.append(div);
  }
}

// --- helpers ----------------------------------------------------------------------------------------
function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : ""; }
function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

for (const id of ["filter-priority", "filter-state", "filter-bed"]) {
  document.getElementById(id).addEventListener("change", renderAlarms);
}
document.getElementById("review-close").addEventListener("click", () => document.getElementById("review").close());
setInterval(() => { document.getElementById("clock").textContent = clock(Date.now() / 1000); soundTick(); }, 500);
setInterval(() => {  // silences run out
  renderAlarms();
  for (const bed of beds.values()) if (bed.info) updateBed(bed.info);
}, 5000);
connect();
requestAnimationFrame(frame);
