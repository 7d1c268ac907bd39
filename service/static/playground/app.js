// fairdiff playground: plain JavaScript, no dependencies. Talks only to the gateway that served it.
// The API key and the admin token live in these variables only (never in storage, never in a URL).
"use strict";

let apiKey = "";
let adminToken = "";
let model = null;
let genTarget = null;
let ftTarget = null;
let ftTimer = null;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function authHeaders(token) {
  const t = token === undefined ? apiKey : token;
  return t ? { Authorization: "Bearer " + t } : {};
}

async function api(method, path, body, token) {
  const headers = { ...authHeaders(token) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error((data && data.error && data.error.message) || resp.status + " " + resp.statusText);
    err.status = resp.status;
    err.body = data;
    throw err;
  }
  return { status: resp.status, data };
}

function fmt(x, digits) {
  return typeof x === "number" ? x.toFixed(digits === undefined ? 2 : digits) : String(x);
}

function showError(box, err) {
  box.hidden = !err;
  box.textContent = err ? (err.status ? "HTTP " + err.status + ": " : "") + err.message : "";
}

// -- tabs ---------------------------------------------------------------------------------------
function selectTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== "tab-" + name;
  if (name === "adaptors") loadAdaptors();
  if (name === "admin" && adminToken) loadFinetunes();
}

// -- fairness target editor: per attribute, inputs that keep the classes summing to 1 -------------
function targetEditor(container, attributes, enabledByDefault) {
  container.replaceChildren();
  const state = {};
  for (const [attr, classes] of Object.entries(attributes || {})) {
    const values = Object.fromEntries(classes.map((c) => [c, 1 / classes.length]));
    const row = el("div", { class: "attr", "data-attribute": attr });
    const enable = el("input", { type: "checkbox", "data-role": "enable" });
    enable.checked = enabledByDefault.includes(attr);
    row.classList.toggle("off", !enable.checked);
    enable.addEventListener("change", () => row.classList.toggle("off", !enable.checked));
    const sum = el("span", { class: "sum" });
    const head = el("label", { class: "cls" }, enable, el("b", { text: attr }));
    const box = el("div", { class: "classes" });
    const inputs = {};
    const refresh = () => {
      for (const c of classes) {
        inputs[c].num.value = fmt(values[c], 3);
        inputs[c].range.value = String(values[c]);
      }
      sum.textContent = "sum " + fmt(classes.reduce((s, c) => s + values[c], 0), 3);
    };
    const set = (cls, v) => {
      v = Math.min(1, Math.max(0, Number.isFinite(v) ? v : 0));
      const others = classes.filter((c) => c !== cls);
      const rest = 1 - v;
      const otherSum = others.reduce((s, c) => s + values[c], 0);
      for (const c of others) values[c] = otherSum > 1e-9 ? (values[c] * rest) / otherSum : rest / others.length;
      values[cls] = v;
      refresh();
    };
    for (const c of classes) {
      const num = el("input", { type: "number", min: "0", max: "1", step: "0.05", "data-class": c, "aria-label": attr + " " + c });
      const range = el("input", { type: "range", min: "0", max: "1", step: "0.05", tabindex: "-1" });
      num.addEventListener("change", () => set(c, parseFloat(num.value)));
      range.addEventListener("input", () => set(c, parseFloat(range.value)));
      inputs[c] = { num, range };
      box.append(el("label", { class: "cls" }, el("span", { text: c }), range, num));
    }
    box.append(sum);
    row.append(head, box);
    container.append(row);
    refresh();
    state[attr] = { enable, values, classes };
  }
  return {
    get() {
      const target = {};
      for (const [attr, s] of Object.entries(state)) {
        if (!s.enable.checked) continue;
        const out = {};
        let acc = 0;
        s.classes.forEach((c, i) => {
          const v = i === s.classes.length - 1 ? Math.max(0, 1 - acc) : Math.round(s.values[c] * 1e4) / 1e4;
          out[c] = Math.round(v * 1e4) / 1e4;
          acc += out[c];
        });
        target[attr] = out;
      }
      return Object.keys(target).length ? target : null;
    },
  };
}

// -- model info ---------------------------------------------------------------------------------
async function loadModel() {
  try {
    const { data } = await api("GET", "/v1/models");
    $("keybox").hidden = !apiKey;
    model = data.data[0] || null;
    if (!model) {
      $("model").textContent = "no inference worker has registered a base model yet; retrying…";
      setTimeout(loadModel, 2000);
      return;
    }
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      $("keybox").hidden = false;
      $("model").textContent = err.status === 401 ? "enter an API key" : "that API key is not valid";
      return;
    }
    $("model").textContent = "could not read /v1/models: " + err.message;
    return;
  }
  const attrs = model.attributes || {};
  $("model").textContent = `base model ${model.id} · ${model.width}×${model.height} · attributes: ${Object.keys(attrs).join(", ") || "none"}`;
  const first = Object.keys(attrs).includes("gender") ? ["gender"] : Object.keys(attrs).slice(0, 1);
  genTarget = targetEditor($("target"), attrs, first);
  ftTarget = targetEditor($("ft-target"), attrs, first);
  const strategy = $("strategy");
  strategy.replaceChildren(...model.strategies.map((s) => el("option", { value: s, text: s })));
  strategy.value = "auto";
  $("ft-promptset").replaceChildren(...model.prompt_sets.map((s) => el("option", { value: s, text: s })));
  const train = model.prompt_sets.find((s) => s.endsWith("-train")) || model.prompt_sets.find((s) => s.includes("train"));
  if (train) $("ft-promptset").value = train;
}

// -- generate -----------------------------------------------------------------------------------
function generateBody() {
  const body = { prompt: $("prompt").value.trim(), num_images: parseInt($("num").value, 10) || 1, strategy: $("strategy").value };
  const target = genTarget && genTarget.get();
  if (target) body.fairness_target = target;
  const enforce = $("enforce").value;
  if (enforce !== "false") body.enforce = enforce === "strict" ? "strict" : true;
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  if ($("format").value !== "png") body.output_format = $("format").value;
  return body;
}

function showProgress(job) {
  const p = job.progress;
  let line = "job " + job.id + " · " + job.state;
  if (job.state === "queued" && job.queue_position !== null && job.queue_position !== undefined) line += " · position " + job.queue_position;
  if (p && p.total) {
    line += ` · step ${p.step} of ${p.total}`;
    $("progress").max = p.total;
    $("progress").value = p.step;
  }
  $("state-line").textContent = line;
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
async function streamEvents(path, token, onEvent) {
  const resp = await fetch(path, { headers: { Accept: "text/event-stream", ...authHeaders(token) } });
  if (!resp.ok || !resp.body) {
    const err = new Error("event stream: HTTP " + resp.status);
    err.status = resp.status;
    throw err;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      // after the last event the server closes the stream; reading on to its end leaves no aborted request
      if (data.length && !finished && onEvent(event, JSON.parse(data.join("\n"))) === false) finished = true;
    }
  }
}

async function pollJob(url, token, onUpdate) {
  for (;;) {
    const { data } = await api("GET", url, undefined, token);
    onUpdate(data);
    if (["succeeded", "failed", "cancelled"].includes(data.state)) return data;
    await new Promise((r) => setTimeout(r, 500));
  }
}

// An image the worker has written, shown as it arrives; the finished job's result (with the audit) replaces the grid.
function showArrivedImage(data) {
  $("result").hidden = false;
  const card = el("figure", { class: "img arriving", "data-index": String(data.index) });
  const pic = el("img", { alt: "image " + data.index });
  card.append(pic);
  for (const [attr, cls] of Object.entries(data.assigned || {})) card.append(el("div", { class: "reading", text: `${attr}: assigned ${cls}` }));
  card.append(el("div", { class: "muted", text: "auditing…" }));
  $("grid").append(card);
  imageSource({ url: data.url }, null).then((src) => { if (src) pic.src = src; });
}

async function followJob(accepted, onImage) {
  let final = null;
  try {
    await streamEvents(accepted.url + "/events", apiKey, (event, data) => {
      if (event === "state" || event === "progress") showProgress(data);
      if (event === "image" && onImage) onImage(data);
      if (event === "done") { final = data; return false; }
      return true;
    });
  } catch (err) {
    final = null; // no event stream: poll instead
  }
  return final || pollJob(accepted.url, apiKey, showProgress);
}

async function onGenerate(ev) {
  ev.preventDefault();
  const go = $("go");
  go.disabled = true;
  showError($("error"), null);
  $("result").hidden = true;
  for (const id of ["summary", "charts", "grid"]) $(id).replaceChildren();
  $("status").hidden = false;
  $("progress").value = 0;
  $("state-line").textContent = "submitting…";
  try {
    const { status, data } = await api("POST", "/v1/generate", generateBody());
    const job = status === 200 ? data : await followJob(data, showArrivedImage);
    showProgress(job);
    if (job.state !== "succeeded") throw new Error("job " + job.state + (job.error ? ": " + job.error.message : ""));
    await renderResult(job, null);
    if ($("baseline").checked) {
      $("state-line").textContent += " · running the base model for comparison…";
      const body = { prompt: job.request.prompt, num_images: job.request.num_images, seed: job.request.seed, strategy: "none" };
      const { status, data } = await api("POST", "/v1/generate", body);
      const baseJob = status === 200 ? data : await followJob(data);
      showProgress(job);
      if (baseJob.state === "succeeded") await renderResult(job, baseJob);
    }
  } catch (err) {
    showError($("error"), err);
  } finally {
    go.disabled = false;
  }
}

async function imageSource(img, job) {
  if (img.b64_json) return `data:image/${(job.request.extra && job.request.extra.output_format) || "png"};base64,${img.b64_json}`;
  const resp = await fetch(img.url, { headers: authHeaders() });
  if (!resp.ok) return "";
  return URL.createObjectURL(await resp.blob());
}

function missedClasses(img) {
  const missed = [];
  for (const [attr, cls] of Object.entries(img.assigned || {})) {
    const read = img.attributes && img.attributes[attr];
    if (read && read.class !== cls) missed.push(`${attr}: assigned ${cls}, read ${read.class}`);
  }
  return missed;
}

async function renderResult(job, baseJob) {
  const r = job.result;
  const target = (job.request && job.request.fairness_target) || {};
  $("result").hidden = false;
  // summary
  const s = r.strategy || {};
  const kv = el("dl", { class: "kv" });
  const add = (k, v) => kv.append(el("dt", { text: k }), el("dd", {}, v));
  add("strategy", el("span", {}, el("b", { text: s.used || "?" }), ` (requested ${s.requested || "?"})`));
  add("why", s.reason || "—");
  add("guarantee", el("span", { class: "badge " + (r.guarantee || ""), text: r.guarantee || "none (no target)" }));
  if (r.adaptor) add("adaptor", r.adaptor);
  if (s.fit) add("measured fit", JSON.stringify(s.fit));
  if (r.enforcement && r.enforcement.applied) {
    add("enforcement", `${r.enforcement.satisfied ? "satisfied" : "short"} after ${r.enforcement.rounds} round(s), ${r.enforcement.regenerated} regenerated`);
  }
  for (const [attr, d] of Object.entries(r.target_distance || {})) add(`distance (${attr})`, `TV ${fmt(d.total_variation, 3)} · KL ${fmt(d.kl, 3)}`);
  const t = r.timings || {};
  add("timings", Object.entries(t).map(([k, v]) => `${k.replace(/_s$/, "")} ${fmt(v, 2)} s`).join(" · "));
  add("seed", String(job.request && job.request.seed));
  $("summary").replaceChildren(el("h2", { text: "Job " + job.id }), kv);
  // charts
  const charts = $("charts");
  charts.replaceChildren();
  const attrs = (model && model.attributes) || {};
  for (const [attr, classes] of Object.entries(attrs)) {
    const delivered = (r.realised || {})[attr];
    if (!delivered) continue;
    const base = baseJob && baseJob.result && baseJob.result.realised ? baseJob.result.realised[attr] : null;
    charts.append(barChart(attr, classes, target[attr] || null, delivered, (r.counts || {})[attr] || {}, base));
  }
  if (!charts.children.length) charts.append(el("p", { class: "muted", text: "no audit: nothing to chart" }));
  // images
  const grid = $("grid");
  grid.replaceChildren();
  for (const img of r.images) {
    const missed = missedClasses(img);
    const card = el("figure", { class: "img" + (missed.length ? " missed" : ""), "data-index": String(img.seed_index) });
    const pic = el("img", { alt: "image " + img.seed_index });
    card.append(pic);
    for (const [attr, read] of Object.entries(img.attributes || {})) {
      const assigned = img.assigned && img.assigned[attr];
      card.append(el("div", { class: "reading", text: `${attr}: ${read.class} ${fmt(read.confidence)}` + (assigned ? ` (assigned ${assigned})` : "") }));
    }
    if (img.person === false) card.append(el("div", { class: "miss", text: "no person found" }));
    if (missed.length) card.append(el("div", { class: "miss", text: "✗ missed its assigned class" }));
    else if (img.assigned) card.append(el("div", { class: "ok", text: "✓ as assigned" }));
    grid.append(card);
    imageSource(img, job).then((src) => { if (src) pic.src = src; });
  }
}

function barChart(attr, classes, target, delivered, counts, base) {
  const series = [];
  if (target) series.push(["target", target, "#9aa5b1"]);
  series.push(["delivered", delivered, "#2b6cb0"]);
  if (base) series.push(["base", base, "#e8a33d"]);
  const group = series.length * 26 + 18;
  const W = 50 + classes.length * group, H = 180, top = 16, base0 = 140, scale = base0 - top;
  const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${attr}: target vs delivered` });
  for (const y of [0, 0.5, 1]) {
    const yy = base0 - y * scale;
    chart.append(svg("line", { x1: 30, x2: W - 5, y1: yy, y2: yy, stroke: "#e5e7eb" }));
    chart.append(svg("text", { x: 26, y: yy + 4, "text-anchor": "end", "font-size": 10, fill: "#6b7280" }, fmt(y, 1)));
  }
  classes.forEach((c, i) => {
    const x = 40 + i * group;
    series.forEach(([kind, values, color], j) => {
      const v = values[c] || 0;
      const h = Math.max(0, v) * scale;
      const bar = svg("rect", { x: x + j * 26, y: base0 - h, width: 24, height: h, fill: color, class: "bar-" + kind, "data-class": c, "data-value": v });
      bar.append(svg("title", {}, `${c} ${kind}: ${fmt(v, 3)}`));
      chart.append(bar);
      chart.append(svg("text", { x: x + j * 26 + 12, y: base0 - h - 3, "text-anchor": "middle", "font-size": 10 }, fmt(v, 2)));
    });
    const mid = x + (series.length * 26) / 2;
    chart.append(svg("text", { x: mid, y: base0 + 14, "text-anchor": "middle", "font-size": 11 }, c));
    if (counts[c] !== undefined) chart.append(svg("text", { x: mid, y: base0 + 28, "text-anchor": "middle", "font-size": 10, fill: "#6b7280", class: "count", "data-class": c }, `n=${counts[c]}`));
  });
  const legend = el("div", { class: "legend" });
  for (const [kind] of series) legend.append(el("span", {}, el("span", { class: "sw " + kind }), kind === "base" ? "base model" : kind));
  if (!target) legend.append(el("span", { class: "muted", text: "(not targeted)" }));
  return el("div", { class: "chart", "data-attribute": attr }, el("h3", { text: attr }), chart, legend);
}

// -- adaptors -----------------------------------------------------------------------------------
function targetText(t) {
  if (!t) return "—";
  return Object.entries(t).map(([a, cs]) => a + ": " + Object.entries(cs).map(([c, p]) => `${c} ${fmt(p)}`).join(" / ")).join("; ");
}

function fitText(m) {
  if (!m) return "—";
  const keys = Object.keys(m).filter((k) => typeof m[k] === "number");
  return keys.length ? keys.map((k) => `${k} ${fmt(m[k], 3)}`).join(", ") : JSON.stringify(m).slice(0, 120);
}

function sizeText(n) {
  if (typeof n !== "number") return "—";
  return n > 1 << 20 ? fmt(n / (1 << 20), 1) + " MiB" : n > 1024 ? fmt(n / 1024, 1) + " KiB" : n + " B";
}

async function loadAdaptors() {
  const body = $("adaptors").tBodies[0];
  try {
    const { data } = await api("GET", "/v1/adaptors");
    body.replaceChildren(...data.data.map((a) => el("tr", {},
      el("td", {}, el("code", { text: a.id })), el("td", { text: a.name || "" }), el("td", { text: a.kind }),
      el("td", { text: targetText(a.target) }), el("td", { text: fitText(a.metrics) }), el("td", { text: sizeText(a.size_bytes) }),
      el("td", { text: String(a.created || "").slice(0, 19) }))));
    $("adaptors-empty").hidden = data.data.length > 0;
  } catch (err) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: "7", class: "error", text: err.message })));
  }
}

// -- admin: finetunes ---------------------------------------------------------------------------
async function loadFinetunes() {
  const body = $("finetunes").tBodies[0];
  try {
    const { data } = await api("GET", "/v1/admin/finetunes?limit=20", undefined, adminToken);
    showError($("admin-error"), null);
    body.replaceChildren(...data.data.map((j) => {
      const watch = el("button", { type: "button", text: "watch" });
      watch.addEventListener("click", () => watchFinetune(j.id));
      return el("tr", {}, el("td", {}, el("code", { text: j.id.slice(0, 12) })), el("td", { text: j.state }),
        el("td", { text: (j.request && j.request.method) || "" }), el("td", { text: new Date(j.created * 1000).toLocaleString() }),
        el("td", { text: (j.result && (j.result.adaptor_id || j.result.id)) || "" }), el("td", {}, watch));
    }));
  } catch (err) {
    showError($("admin-error"), err);
  }
}

async function onLaunch(ev) {
  ev.preventDefault();
  showError($("admin-error"), null);
  try {
    const body = { method: $("ft-method").value, prompt_set: $("ft-promptset").value, fairness_target: ftTarget.get() };
    const hp = $("ft-hp").value.trim();
    if (hp) body.hyperparameters = JSON.parse(hp);
    if ($("ft-name").value.trim()) body.name = $("ft-name").value.trim();
    const { data } = await api("POST", "/v1/admin/finetunes", body, adminToken);
    watchFinetune(data.id);
    loadFinetunes();
  } catch (err) {
    showError($("admin-error"), err);
  }
}

function showFinetune(data) {
  const p = data.progress;
  $("ft-state").textContent = data.state + (p && p.total ? ` · step ${p.step} of ${p.total}` : "");
  if (p && p.total) { $("ft-progress").max = p.total; $("ft-progress").value = p.step; }
}

function finetuneDone(data) {
  $("ft-cancel").hidden = true;
  showFinetune(data);
  drawCurves(data.curve || []);
  $("ft-result").textContent = JSON.stringify(data.result || data.error, null, 2);
  loadFinetunes();
}

async function watchFinetune(id) {
  clearTimeout(ftTimer);
  const watching = (ftTimer = {});  // a newer watch replaces this one
  $("ft-watch").hidden = false;
  $("ft-cancel").hidden = false;
  $("ft-id").textContent = id;
  $("ft-result").textContent = "";
  drawCurves([]);
  const curve = [];
  let final = null;
  try {
    await streamEvents(`/v1/admin/finetunes/${id}/events`, adminToken, (event, data) => {
      if (ftTimer !== watching) return false;
      if (event === "state" || event === "progress") showFinetune(data);
      if (event === "curve") { curve.push(...data.points); drawCurves(curve); }
      if (event === "done") { final = data; return false; }
      return true;
    });
  } catch (err) {
    final = null;  // no event stream: poll
  }
  if (ftTimer !== watching) return;
  if (final) { finetuneDone(final); return; }
  const tick = async () => {
    try {
      const { data } = await api("GET", "/v1/admin/finetunes/" + id, undefined, adminToken);
      showFinetune(data);
      drawCurves(data.curve || []);
      if (["succeeded", "failed", "cancelled"].includes(data.state)) { finetuneDone(data); return; }
    } catch (err) {
      showError($("admin-error"), err);
    }
    ftTimer = setTimeout(tick, 1000);
  };
  tick();
}

function drawCurves(curve) {
  const box = $("ft-curve");
  box.replaceChildren();
  const skip = new Set(["step", "total", "t", "iteration"]);
  const keys = [...new Set(curve.flatMap((p) => Object.keys(p).filter((k) => !skip.has(k) && typeof p[k] === "number")))];
  for (const key of keys) {
    const pts = curve.filter((p) => typeof p[key] === "number").map((p, i) => [p.step !== undefined ? p.step : i, p[key]]);
    if (!pts.length) continue;
    const W = 260, H = 120, pad = 28;
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (W - pad - 6);
    const sy = (y) => H - 16 - ((y - y0) / (y1 - y0 || 1)) * (H - 30);
    const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
    chart.append(svg("polyline", { points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), fill: "none", stroke: "#2b6cb0", "stroke-width": 1.5 }));
    chart.append(svg("text", { x: 2, y: 12, "font-size": 10 }, fmt(y1, 3)));
    chart.append(svg("text", { x: 2, y: H - 16, "font-size": 10 }, fmt(y0, 3)));
    chart.append(svg("text", { x: W - 4, y: H - 2, "font-size": 10, "text-anchor": "end" }, `step ${x1}`));
    box.append(el("div", { class: "chart" }, el("h3", { text: key }), chart));
  }
}

async function onCancel() {
  try {
    await api("DELETE", "/v1/admin/finetunes/" + $("ft-id").textContent, undefined, adminToken);
  } catch (err) {
    showError($("admin-error"), err);
  }
}

// -- wiring -------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => selectTab(b.dataset.tab));
  $("gen-form").addEventListener("submit", onGenerate);
  $("ft-form").addEventListener("submit", onLaunch);
  $("ft-cancel").addEventListener("click", onCancel);
  $("ft-method").addEventListener("change", () => {
    $("ft-hp").value = JSON.stringify($("ft-method").value === "ida" ? { max_iterations: 4 } : { iterations: 20 });
  });
  $("ft-refresh").addEventListener("click", loadFinetunes);
  $("adaptors-refresh").addEventListener("click", loadAdaptors);
  $("apikey-use").addEventListener("click", () => { apiKey = $("apikey").value.trim(); loadModel(); });
  $("admintoken").addEventListener("change", () => { adminToken = $("admintoken").value.trim(); loadFinetunes(); });
  loadModel();
});
