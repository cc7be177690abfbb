// The web app's page logic: it talks to the JSON API only (/api/...), with the token of ?token= if the server has one.
"use strict";

const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("nst-token", params.get("token"));
const token = sessionStorage.getItem("nst-token") || "";
const withToken = (url) => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
const $ = (id) => document.getElementById(id);
const ACTIVE = ["queued", "running"];
// A command-line run (nst-lightning ... --watch): its server marks the page with the one job it shows.
const WATCHED = document.body.dataset.watch || null;

let contentFile = null;
let styleFiles = [];
let current = null;      // the job shown in the live panel
let pinned = false;      // shown because "Watch" was clicked: kept until it finishes (else the panel follows the queue)
let source = null;       // its EventSource
let losses = [];         // [step, loss] of the job shown
let messageFrom = null;  // what the banner is about: "form" (cleared by a change) or "list" (by the next refresh)

function say(text, from = "form") {
  $("message").textContent = text;
  $("message").hidden = !text;
  messageFrom = text ? from : null;
}

// The field each API key is shown in, for marking the one at fault.
const FIELD_OF_KEY = { "data.image_size": "size", "trainer.max_steps": "steps", "model.style_weight": "style-weight",
  "model.preserve_color": "preserve-color", "model.backbone": "backbone", "model.weights": "weights",
  content: "content-drop", style: "style-drop" };

function markBad(key) {
  const id = FIELD_OF_KEY[key] || (key && key.startsWith("style") ? "style-drop" : null);
  if (id) { $(id).classList.add("bad"); $(id).setAttribute("aria-invalid", "true"); }
}

// The user changed something: an error about the form is old news.
function fixed() {
  if (messageFrom === "form") say("");
  for (const element of document.querySelectorAll(".bad")) {
    element.classList.remove("bad");
    element.removeAttribute("aria-invalid");
  }
}

class ApiError extends Error {
  constructor(message, key) { super(message); this.key = key; }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch("/api" + path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let detail = response.statusText, key = null;
    try { ({ detail = detail, key = null } = await response.json()); } catch (e) { /* not JSON */ }
    throw new ApiError(detail, key);
  }
  return response.json();
}

// ------------------------------------------------------------------ picking images (kept for a reload)

function thumbs(element, files) {
  element.replaceChildren(...files.map((file) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = img.title = file.name;
    return img;
  }));
}

function setContent(files, keep = true) {
  contentFile = files[0] || null;
  thumbs($("content-thumbs"), contentFile ? [contentFile] : []);
  if (keep) { keepFiles(); fixed(); }
}

function setStyles(files, keep = true) {
  styleFiles = Array.from(files);
  thumbs($("style-thumbs"), styleFiles);
  if (keep) { keepFiles(); fixed(); }
}

// The files chosen live in this browser's IndexedDB (sessionStorage holds text only, and too little of it).
function filesStore(mode) {
  return new Promise((resolve, reject) => {
    if (typeof indexedDB === "undefined") { reject(new Error("no IndexedDB")); return; }
    const opened = indexedDB.open("nst-lightning-page", 1);
    opened.onupgradeneeded = () => opened.result.createObjectStore("files");
    opened.onerror = () => reject(opened.error);
    opened.onsuccess = () => resolve(opened.result.transaction("files", mode).objectStore("files"));
  });
}

const done = (request) => new Promise((resolve, reject) => {
  request.onsuccess = () => resolve(request.result);
  request.onerror = () => reject(request.error);
});

function cannotKeepFiles() {
  $("files-note").textContent = "This browser does not keep the images chosen: after a reload, choose them again.";
}

async function keepFiles() {
  try { await done((await filesStore("readwrite")).put({ content: contentFile, styles: styleFiles }, "chosen")); }
  catch (err) { cannotKeepFiles(); }
}

async function restoreFiles() {
  try {
    const kept = await done((await filesStore("readonly")).get("chosen"));
    if (kept && kept.content && !contentFile) setContent([kept.content], false);
    if (kept && kept.styles && kept.styles.length && !styleFiles.length) setStyles(kept.styles, false);
  } catch (err) { cannotKeepFiles(); }
}

function dropZone(zone, input, take) {
  input.addEventListener("change", () => take(input.files));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    take(Array.from(event.dataTransfer.files).filter((file) => file.type.startsWith("image/")));
  });
}

// ------------------------------------------------------------------ settings (kept for a reload)

function fill(select, values, chosen) {
  select.replaceChildren(...values.map((value) => new Option(value, value, false, value === chosen)));
}

const offers = (select, value) => Array.from(select.options).some((option) => option.value === value);
let weightsBackbones = {};  // each offered weights name: the backbones it loads with (the server's list)

// The backbone choices are those the chosen weights load with (a file: the backbone read from it).
function syncBackbone(preferred) {
  const allowed = weightsBackbones[$("weights").value] || [];
  fill($("backbone"), allowed, allowed.includes(preferred) ? preferred : allowed[0]);
}

const FIELDS = { "data.image_size": "size", "trainer.max_steps": "steps", "model.style_weight": "style-weight",
  "model.preserve_color": "preserve-color", "model.weights": "weights" };

function applySettings(settings) {
  for (const [key, id] of Object.entries(FIELDS)) {
    const value = settings[key];
    if (value === undefined || value === null) continue;
    if ($(id).tagName !== "SELECT" || offers($(id), String(value))) $(id).value = value;
  }
  syncBackbone(settings["model.backbone"]);
}

function keepFields() {
  const kept = Object.fromEntries([...Object.entries(FIELDS), ["model.backbone", "backbone"]]
    .map(([key, id]) => [key, $(id).value]));
  sessionStorage.setItem("nst-fields", JSON.stringify(kept));
}

function restoreFields() {
  let kept = null;
  try { kept = JSON.parse(sessionStorage.getItem("nst-fields") || "null"); } catch (e) { /* none kept */ }
  if (kept && typeof kept === "object") applySettings(kept);
}

// The settings as config keys; an empty field is left out, so that the server takes its default.
function chosenSettings() {
  const settings = {};
  const numbers = { "data.image_size": "size", "trainer.max_steps": "steps", "model.style_weight": "style-weight" };
  for (const [key, id] of Object.entries(numbers)) {
    if ($(id).value.trim() !== "") settings[key] = Number($(id).value);
  }
  for (const [key, id] of [["model.preserve_color", "preserve-color"], ["model.backbone", "backbone"],
    ["model.weights", "weights"]]) {
    if ($(id).value) settings[key] = $(id).value;
  }
  return settings;
}

async function start(event) {
  event.preventDefault();
  fixed();
  if (!contentFile || !styleFiles.length) {
    say("Pick a content image and at least one style image first.");
    markBad(contentFile ? "style" : "content");
    return;
  }
  for (const [key, id] of Object.entries(FIELDS)) {
    if ($(id).validity && $(id).validity.badInput) {
      say(`${key}: not a number (leave the field empty for the default)`);
      markBad(key);
      return;
    }
  }
  const form = new FormData();
  form.append("content", contentFile, contentFile.name);
  for (const file of styleFiles) form.append("style", file, file.name);
  form.append("settings", JSON.stringify(chosenSettings()));
  $("start").disabled = true;
  try {
    await api("/jobs", { method: "POST", body: form });
    say("");
    await refresh();  // the live panel shows it if nothing runs; else it keeps the running job
  } catch (err) {
    say(err.message);
    markBad(err.key);
  } finally {
    $("start").disabled = false;
  }
}

// ------------------------------------------------------------------ the live panel

function drawCurve() {
  const canvas = $("curve");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const points = losses.filter(([, loss]) => loss !== null && loss > 0);
  ctx.fillStyle = "#667";
  ctx.font = "11px sans-serif";
  ctx.fillText("loss (log scale) by step", 8, 14);
  if (points.length < 2) return;
  const logs = points.map(([, loss]) => Math.log10(loss));
  const lo = Math.min(...logs), hi = Math.max(...logs);
  const first = points[0][0], last = Math.max(points[points.length - 1][0], current ? current.max_steps : 0);
  const x = (step) => 36 + (width - 46) * (step - first) / Math.max(1, last - first);
  const y = (value) => height - 20 - (height - 40) * (value - lo) / Math.max(1e-9, hi - lo);
  ctx.fillText(points[0][1].toPrecision(3), 2, y(logs[0]) + 4);
  ctx.fillText(points[points.length - 1][1].toPrecision(3), 2, y(logs[logs.length - 1]) + 4);
  ctx.strokeStyle = "#3d5af1";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([step], i) => (i ? ctx.lineTo(x(step), y(logs[i])) : ctx.moveTo(x(step), y(logs[i]))));
  ctx.stroke();
}

// The preview image, or "No image yet" (never a broken-image icon).
function showPreview(url, step) {
  const img = $("preview");
  const empty = (yes) => { img.hidden = yes; $("preview-empty").hidden = !yes; };
  if (!url) { img.removeAttribute("src"); delete img.dataset.step; empty(true); return; }
  img.onload = () => empty(false);
  img.onerror = () => empty(true);
  img.src = url;
  img.dataset.step = step;
}

function showStats(job) {
  const state = $("live-state");
  state.textContent = job.state;
  state.className = "state " + job.state;
  if (!WATCHED) {  // the panel keeps a finished job until another starts
    const title = { queued: "Next up ", running: "Now running " }[job.state] || "Last run ";
    document.querySelector("#live h2").firstChild.textContent = title;
  }
  if (job.names) $("live-name").textContent = `${job.names.content} × ${job.names.styles.join(" + ")}`;
  const eta = job.eta_s == null ? "" : ` · about ${Math.ceil(job.eta_s)} s left`;
  const seconds = Math.round(job.elapsed_s);
  const elapsed = job.elapsed_s == null ? "" : ACTIVE.includes(job.state) ? ` · ${seconds} s so far` : ` · in ${seconds} s`;
  const loss = job.loss == null ? "" : ` · loss ${Number(job.loss).toPrecision(4)}`;
  const queue = job.state === "queued" && job.position ? ` · number ${job.position} in the queue` : "";
  const error = job.error ? ` · ${job.error}` : "";
  $("stats").textContent = `step ${job.step} of ${job.max_steps}${loss}${elapsed}${eta}${queue}${error}`;
  $("live-note").textContent = job.note || "";
  $("live-note").hidden = !job.note;
  $("cancel").disabled = !ACTIVE.includes(job.state);
}

function watch(id, pin = false) {
  pinned = pin;
  if (current && current.id === id) return;
  if (source) source.close();
  current = { id, step: 0, max_steps: 0, state: "queued" };
  $("live").dataset.job = id;
  $("stats").textContent = "Waiting for the job's first report…";  // not "No job yet" while one is named
  losses = [];
  drawCurve();
  showPreview(null);
  source = new EventSource(withToken(`/api/jobs/${id}/events`));
  const mine = source;
  source.addEventListener("state", (event) => {
    if (source !== mine) return;
    current = Object.assign(current, JSON.parse(event.data));
    showStats(current);
    if (!ACTIVE.includes(current.state)) { source.close(); refresh(); }
  });
  source.addEventListener("progress", (event) => {
    if (source !== mine) return;
    const data = JSON.parse(event.data);
    for (const point of data.losses) {  // the run's last record repeats its last step with the finished image's loss
      if (losses.length && losses[losses.length - 1][0] === point[0]) losses[losses.length - 1] = point;
      else losses.push(point);
    }
    Object.assign(current, { step: data.step, max_steps: data.max_steps, loss: data.loss, eta_s: data.eta_s,
      elapsed_s: data.elapsed_s });
    showStats(current);
    drawCurve();
  });
  source.addEventListener("preview", (event) => {
    if (source !== mine) return;
    const { step } = JSON.parse(event.data);
    showPreview(withToken(`/api/jobs/${id}/preview?step=${step}`), step);
  });
  source.onerror = () => {
    if (source !== mine) return;
    if (WATCHED && ACTIVE.includes(current.state)) {  // the command ended before its page heard how
      source.close();
      $("live-note").textContent = "The command has ended: its terminal says how.";
      $("live-note").hidden = false;
    } else if (source.readyState === EventSource.CLOSED) refresh();
  };
}

// The panel follows the queue: the running job, else the next queued one; a finished job stays until another starts.
// A job picked with "Watch" stays until it finishes.
function follow(jobs) {
  const mine = current && jobs.find((job) => job.id === current.id);
  if (pinned && mine && ACTIVE.includes(mine.state)) return;
  const next = jobs.find((job) => job.state === "running") || jobs.filter((job) => job.state === "queued").pop();
  if (next) watch(next.id);
}

async function cancel() {
  if (!current) return;
  try { await api(`/jobs/${current.id}/cancel`, { method: "POST" }); refresh(); } catch (err) { say(err.message); }
}

// ------------------------------------------------------------------ the gallery

async function runAgain(job) {
  applySettings(job.settings);
  try {
    const fetchInput = async (name, shown) => {
      const response = await fetch(withToken(`/api/jobs/${job.id}/inputs/${name}`));
      if (!response.ok) throw new Error(`the job's ${name} is no longer there`);
      return new File([await response.blob()], shown, { type: response.headers.get("content-type") || "image/png" });
    };
    setContent([await fetchInput("content", job.names.content)]);
    setStyles(await Promise.all(job.names.styles.map((shown, i) => fetchInput(`style${i}`, shown))));
    keepFields();
    say("");
    $("new").scrollIntoView({ behavior: "smooth" });
  } catch (err) {
    say(err.message);
  }
}

function downloadLink(job, url, text) {
  const link = document.createElement("a");
  link.href = withToken(url);
  link.download = "";  // the server names it after the photo and the painting (Content-Disposition)
  link.textContent = text;
  link.className = "download";
  return link;
}

// The job's image (the result, a stopped run's last image, or the preview), or a plain placeholder; a stopped
// run's image, once it has loaded, gets a download link.
function cardImage(job, actions) {
  const frame = document.createElement("div");
  const placeholder = () => {
    const shown = document.createElement("div");
    shown.className = "placeholder";
    shown.textContent = { queued: "waiting", running: "starting" }[job.state] || "no image";
    frame.replaceChildren(shown);
  };
  const base = `/api/jobs/${job.id}`;
  const urls = { done: [`${base}/result`], running: [`${base}/preview`], queued: [] }[job.state]
    || [`${base}/result?partial=true`, `${base}/preview`];
  if (!urls.length) { placeholder(); return frame; }
  const img = document.createElement("img");
  img.alt = `${job.state}: ${job.names.content} × ${job.names.styles.join(" + ")}`;
  let tried = 0;
  img.onerror = () => { tried += 1; if (tried < urls.length) img.src = withToken(urls[tried]); else placeholder(); };
  img.onload = () => {
    if (job.state !== "done" && urls[tried].includes("partial")) {
      actions.prepend(downloadLink(job, urls[tried], "Download last image"));
    }
  };
  img.src = withToken(urls[0]);
  frame.append(img);
  return frame;
}

function card(job) {
  const element = document.createElement("div");
  element.className = "card";
  element.dataset.id = job.id;
  element.dataset.state = job.state;
  const actions = document.createElement("div");
  actions.className = "actions";
  const title = document.createElement("div");
  title.innerHTML = `<span class="state ${job.state}"></span> <b></b>`;
  title.querySelector(".state").textContent = job.state;
  title.querySelector("b").textContent = `${job.names.content} × ${job.names.styles.join(" + ")}`;
  const settings = document.createElement("div");
  settings.textContent = Object.entries(job.settings).map(([key, value]) => `${key.split(".").pop()} ${value}`)
    .join(" · ");
  const progress = document.createElement("div");
  progress.textContent = `step ${job.step} of ${job.max_steps}` + (job.loss == null ? "" : `, loss ${job.loss.toPrecision(4)}`);
  element.append(cardImage(job, actions), title, settings, progress);
  for (const [text, kind] of [[job.note, "note"], [job.error, "error"]]) {
    if (!text) continue;
    const shown = document.createElement("div");
    shown.className = kind;
    shown.textContent = text;
    element.append(shown);
  }
  const button = (text, action) => {
    const b = document.createElement("button");
    b.className = "plain";
    b.textContent = text;
    b.addEventListener("click", action);
    actions.append(b);
  };
  if (job.state === "done") actions.append(downloadLink(job, `/api/jobs/${job.id}/result`, "Download"));
  if (ACTIVE.includes(job.state)) button("Watch", () => watch(job.id, true));
  button("Run again", () => runAgain(job));
  button("Delete", async () => {
    if (!confirm("Delete this job and its images?")) return;
    try { await api(`/jobs/${job.id}`, { method: "DELETE" }); refresh(); } catch (err) { say(err.message); }
  });
  element.append(actions);
  return element;
}

let shown = "";
async function refresh() {
  if (WATCHED) return;  // one run, no list
  try {
    const jobs = await api("/jobs");
    if (messageFrom === "list") say("");
    const key = JSON.stringify(jobs.map((job) => [job.id, job.state, job.step]));
    if (key !== shown) {
      shown = key;
      $("gallery").replaceChildren(...jobs.map(card));
    }
    follow(jobs);
  } catch (err) {
    say(err.message, "list");
  }
}

// The watch mode: the live panel of the one run, without the form, the gallery or Cancel (the page is read-only).
function initWatch() {
  for (const element of [$("new"), $("gallery").parentElement, $("cancel"), document.querySelector("header a")]) {
    element.hidden = true;
  }
  document.querySelector("main").classList.add("single");
  document.querySelector("#live h2").firstChild.textContent = "Command-line run ";
  watch(WATCHED, true);
}

async function init() {
  if (WATCHED) { initWatch(); return; }
  dropZone($("content-drop"), $("content"), setContent);
  dropZone($("style-drop"), $("style"), setStyles);
  $("settings").addEventListener("submit", start);
  $("settings").addEventListener("input", () => { keepFields(); fixed(); });
  $("settings").addEventListener("change", () => { keepFields(); fixed(); });
  $("cancel").addEventListener("click", cancel);
  restoreFiles();
  try {
    const options = await api("/options");
    const d = options.defaults;
    fill($("preserve-color"), options.preserve_color, d["model.preserve_color"]);
    weightsBackbones = options.weights_backbones;
    fill($("weights"), options.weights, options.weights.includes(d["model.weights"]) ? d["model.weights"] : options.weights[0]);
    $("weights").addEventListener("change", () => syncBackbone($("backbone").value));
    for (const [key, id] of [["data.image_size", "size"], ["trainer.max_steps", "steps"], ["model.style_weight", "style-weight"]]) {
      $(id).placeholder = `default ${d[key]}`;
    }
    applySettings(Object.assign({}, d, { "model.weights": $("weights").value }));
    restoreFields();
  } catch (err) {
    say(err.message + (token ? "" : " (open the address the server printed, with its ?token=)"), "list");
  }
  refresh();
  setInterval(refresh, 3000);
}

init();
