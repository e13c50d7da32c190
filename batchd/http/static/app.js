"use strict";
// batchd's page: try a model, and watch batching happen. Talks only to this server.

const $ = (id) => document.getElementById(id);
let token = null; // in this page's memory only: never stored
const POLL_MS = 2000;

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModels() {
  const response = await fetch("/models", { headers: headers() });
  if (response.status === 401) {
    $("token-form").hidden = false;
    showError(token ? "That token was refused." : "");
    return;
  }
  $("token-form").hidden = true;
  const body = await response.json();
  const select = $("model");
  select.replaceChildren();
  for (const model of body.models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = model.ready ? model.name : `${model.name} (${model.state})`;
    option.selected = model.name === body.default;
    select.append(option);
  }
}

function parseTiming(header) {
  const timing = {};
  for (const part of (header || "").split(",")) {
    const [name, ...params] = part.trim().split(";");
    for (const param of params) {
      const [key, value] = param.trim().split("=");
      timing[`${name}.${key}`] = (value || "").replace(/"/g, "");
    }
  }
  return timing;
}

function showAnswer(body, response) {
  const list = $("predictions");
  list.replaceChildren();
  for (const { label, prob } of body.predictions) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(prob * 100, 0.5)}%`;
    const value = document.createElement("span");
    value.className = "prob";
    value.textContent = prob.toFixed(3);
    item.append(name, bar, value);
    list.append(item);
  }
  const timing = parseTiming(response.headers.get("server-timing"));
  $("t-queue").textContent = `${timing["queue.dur"] || "?"} ms`;
  $("t-compute").textContent = `${timing["compute.dur"] || "?"} ms`;
  $("t-batch").textContent = timing["batch.desc"] || "?";
  $("request-id").textContent = response.headers.get("x-request-id") || "";
  $("answer").hidden = false;
}

async function predict(file) {
  if (!file) return;
  showError("");
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("file", file);
  const model = encodeURIComponent($("model").value);
  const response = await fetch(`/models/${model}/predict?top_k=5`, {
    method: "POST", body: form, headers: headers(),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401) $("token-form").hidden = false;
    showError(`${response.status} ${body.reason || ""}: ${body.error || "request failed"}`);
    $("answer").hidden = true;
    return;
  }
  showAnswer(body, response);
}

// -- the live panel: Prometheus text from /metrics ----------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2];
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

function summarise(samples) {
  const models = {};
  const model = (name) => (models[name] ??= { requests: 0, buckets: {}, batchSum: 0,
                                               batchCount: 0, queue: 0 });
  for (const { name, labels, value } of samples) {
    if (!labels.model) continue;
    const entry = model(labels.model);
    if (name === "batchd_requests_total") entry.requests += value;
    else if (name === "batchd_request_duration_seconds_bucket") {
      entry.buckets[labels.le] = (entry.buckets[labels.le] || 0) + value;
    } else if (name === "batchd_batch_size_sum") entry.batchSum = value;
    else if (name === "batchd_batch_size_count") entry.batchCount = value;
    else if (name === "batchd_queue_depth") entry.queue = value;
  }
  return models;
}

function quantile(q, now, before) {
  const bounds = Object.keys(now).map((le) => [le === "+Inf" ? Infinity : Number(le), le])
    .sort((a, b) => a[0] - b[0]);
  const counts = bounds.map(([, le]) => now[le] - ((before && before[le]) || 0));
  const total = counts[counts.length - 1];
  if (!total) return null;
  const rank = q * total;
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i] >= rank) {
      const upper = bounds[i][0];
      return Number.isFinite(upper) ? upper : bounds[i - 1][0];
    }
  }
  return null;
}

let previous = null;

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

async function pollMetrics() {
  try {
    const response = await fetch("/metrics");
    const now = { at: performance.now(), models: summarise(parseMetrics(await response.text())) };
    const rows = [];
    for (const [name, entry] of Object.entries(now.models)) {
      const before = previous && previous.models[name];
      const seconds = previous ? (now.at - previous.at) / 1000 : 0;
      const rate = before && seconds ? (entry.requests - before.requests) / seconds : 0;
      const p99 = quantile(0.99, entry.buckets, before && before.buckets);
      const batches = entry.batchCount - ((before && before.batchCount) || 0);
      const items = entry.batchSum - ((before && before.batchSum) || 0);
      const meanBatch = batches ? items / batches
        : (entry.batchCount ? entry.batchSum / entry.batchCount : 0);
      const row = document.createElement("tr");
      row.dataset.model = name;
      row.append(cell(name), cell(String(entry.requests)), cell(rate.toFixed(1)),
                 cell(p99 === null ? "–" : `≤ ${(p99 * 1000).toFixed(0)}`),
                 cell(meanBatch.toFixed(1)), cell(String(entry.queue)));
      rows.push(row);
    }
    $("live-rows").replaceChildren(...rows);
    $("live-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    previous = now;
  } catch (error) {
    $("live-updated").textContent = "metrics unavailable";
  }
}

async function pollReady() {
  const status = $("server-status");
  try {
    const response = await fetch("/ready");
    status.textContent = response.ok ? "ready" : "not ready";
    status.className = `status ${response.ok ? "ok" : "bad"}`;
  } catch (error) {
    status.textContent = "unreachable";
    status.className = "status bad";
  }
}

function setUp() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim() || null;
    loadModels();
  });
  $("file").addEventListener("change", async (event) => {
    await predict(event.target.files[0]);
    event.target.value = ""; // the same file again is a new prediction
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    predict(event.dataTransfer.files[0]);
  });
  loadModels();
  pollReady();
  pollMetrics();
  setInterval(pollMetrics, POLL_MS);
  setInterval(pollReady, POLL_MS);
}

setUp();
