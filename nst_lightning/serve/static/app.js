// The web app's page logic: it talks to the JSON API only (/api/...), with the token of ?token= if the server has one.
"use strict";

const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("nst-token", params.get("token"));
const token = sessionStorage.getItem("nst-token") || "";
const withToken = (url) => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
const $ = (id) => document.getElementById(id);

let contentFile = null;
let styleFiles = [];
let current = null;      // the job shown in the live panel
let source = null;       // its EventSource
let losses = [];         // [step, loss] of the job shown

function say(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch("/api" + path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response.json();
}

// ------------------------------------------------------------------ picking images

function thumbs(element, files) {
  element.replaceChildren(...files.map((file) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.title = file.name;
    return img;
  }));
}

function setContent(files) {
  contentFile = files[0] || null;
  thumbs($("content-thumbs"), contentFile ? [contentFile] : []);
}

function setStyles(files) {
  styleFiles = Array.from(files);
  thumbs($("style-thumbs"), styleFiles);
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

// ------------------------------------------------------------------ settings

function fill(select, values, chosen) {
  select.replaceChildren(...values.map((value) => new Option(value, value, false, value === chosen)));
}

let weightsBackbones = {};  // each offered weights name: the backbones it loads with (the server's list)

// The backbone choices are those the chosen weights load with (a file: the backbone read from it).
function syncBackbone(preferred) {
  const allowed = weightsBackbones[$("weights").value] || [];
  fill($("backbone"), allowed, allowed.includes(preferred) ? preferred : allowed[0]);
}

function applySettings(settings) {
  const fields = { "data.image_size": "size", "trainer.max_steps": "steps", "model.style_weight": "style-weight",
    "model.preserve_color": "preserve-color", "model.weights": "weights" };
  for (const [key, id] of Object.entries(fields)) {
    if (settings[key] !== undefined && settings[key] !== null) $(id).value = settings[key];
  }
  syncBackbone(settings["model.backbone"]);
}

function chosenSettings() {
  const number = (id) => Number($(id).value);
  return {
    data: { image_size: number("size") },
    trainer: { max_steps: number("steps") },
    model: { style_weight: number("style-weight"), preserve_color: $("preserve-color").value,
      backbone: $("backbone").value, weights: $("weights").value },
  };
}

async function start(event) {
  event.preventDefault();
  if (!contentFile || !styleFiles.length) { say("Pick a content image and at least one style image first."); return; }
  const form = new FormData();
  form.append("content", contentFile, contentFile.name);
  for (const file of styleFiles) form.append("style", file, file.name);
  form.append("settings", JSON.stringify(chosenSettings()));
  $("start").disabled = true;
  try {
    const { id } = await api("/jobs", { method: "POST", body: form });
    say("");
    watch(id);
    refresh();
  } catch (err) {
    say(err.message);
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

function showStats(job) {
  const state = $("live-state");
  state.textContent = job.state;
  state.className = "state " + job.state;
  const eta = job.eta_s == null ? "" : ` · about ${Math.ceil(job.eta_s)} s left`;
  const loss = job.loss == null ? "" : ` · loss ${Number(job.loss).toPrecision(4)}`;
  const queue = job.state === "queued" && job.position ? ` · number ${job.position} in the queue` : "";
  const error = job.error ? ` · ${job.error}` : "";
  $("stats").textContent = `step ${job.step} of ${job.max_steps}${loss}${eta}${queue}${error}`;
  $("cancel").disabled = !["queued", "running"].includes(job.state);
}

function watch(id) {
  if (source) source.close();
  current = { id, step: 0, max_steps: 0, state: "queued" };
  losses = [];
  drawCurve();
  $("preview").removeAttribute("src");
  source = new EventSource(withToken(`/api/jobs/${id}/events`));
  source.addEventListener("state", (event) => {
    current = Object.assign(current, JSON.parse(event.data));
    showStats(current);
    if (!["queued", "running"].includes(current.state)) { source.close(); refresh(); }
  });
  source.addEventListener("progress", (event) => {
    const data = JSON.parse(event.data);
    losses.push(...data.losses);
    Object.assign(current, { step: data.step, max_steps: data.max_steps, loss: data.loss, eta_s: data.eta_s });
    showStats(current);
    drawCurve();
  });
  source.addEventListener("preview", (event) => {
    const { step } = JSON.parse(event.data);
    $("preview").src = withToken(`/api/jobs/${id}/preview?step=${step}`);
    $("preview").dataset.step = step;
  });
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) refresh(); };
}

async function cancel() {
  if (!current) return;
  try { await api(`/jobs/${current.id}/cancel`, { method: "POST" }); } catch (err) { say(err.message); }
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
    say("");
    $("new").scrollIntoView({ behavior: "smooth" });
  } catch (err) {
    say(err.message);
  }
}

function card(job) {
  const element = document.createElement("div");
  element.className = "card";
  element.dataset.id = job.id;
  const img = document.createElement("img");
  if (job.state === "done") img.src = withToken(`/api/jobs/${job.id}/result`);
  else if (job.state !== "queued") img.src = withToken(`/api/jobs/${job.id}/preview`);
  img.alt = job.state;
  img.onerror = () => img.removeAttribute("src");
  const title = document.createElement("div");
  title.innerHTML = `<span class="state ${job.state}"></span> <b></b>`;
  title.querySelector(".state").textContent = job.state;
  title.querySelector("b").textContent = `${job.names.content} × ${job.names.styles.join(" + ")}`;
  const settings = document.createElement("div");
  settings.textContent = Object.entries(job.settings).map(([key, value]) => `${key.split(".").pop()} ${value}`)
    .join(" · ");
  const progress = document.createElement("div");
  progress.textContent = `step ${job.step} of ${job.max_steps}` + (job.loss == null ? "" : `, loss ${job.loss.toPrecision(4)}`);
  element.append(img, title, settings, progress);
  if (job.error) {
    const error = document.createElement("div");
    error.className = "error";
    error.textContent = job.error;
    element.append(error);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = (text, action) => {
    const b = document.createElement("button");
    b.className = "plain";
    b.textContent = text;
    b.addEventListener("click", action);
    actions.append(b);
  };
  if (job.state === "done") {
    const link = document.createElement("a");
    link.href = withToken(`/api/jobs/${job.id}/result`);
    link.download = `nst-${job.id.slice(0, 8)}.png`;
    link.textContent = "Download";
    link.className = "download";
    actions.append(link);
  }
  if (["queued", "running"].includes(job.state)) button("Watch", () => watch(job.id));
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
  try {
    const jobs = await api("/jobs");
    const key = JSON.stringify(jobs.map((job) => [job.id, job.state, job.step]));
    if (key !== shown) {
      shown = key;
      $("gallery").replaceChildren(...jobs.map(card));
    }
    if (!current) {
      const active = jobs.find((job) => job.state === "running") || jobs.find((job) => job.state === "queued");
      if (active) watch(active.id);
    }
  } catch (err) {
    say(err.message);
  }
}

async function init() {
  dropZone($("content-drop"), $("content"), setContent);
  dropZone($("style-drop"), $("style"), setStyles);
  $("settings").addEventListener("submit", start);
  $("cancel").addEventListener("click", cancel);
  try {
    const options = await api("/options");
    const d = options.defaults;
    fill($("preserve-color"), options.preserve_color, d["model.preserve_color"]);
    weightsBackbones = options.weights_backbones;
    fill($("weights"), options.weights, options.weights.includes(d["model.weights"]) ? d["model.weights"] : options.weights[0]);
    $("weights").addEventListener("change", () => syncBackbone($("backbone").value));
    applySettings(Object.assign({}, d, { "model.weights": $("weights").value }));
  } catch (err) {
    say(err.message + (token ? "" : " (open the address the server printed, with its ?token=)"));
  }
  refresh();
  setInterval(refresh, 3000);
}

init();
