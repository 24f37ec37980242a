// lorakit web UI: five screens over the server's JSON routes (/ui/api/..., /admin/adapters,
// /v1/chat/completions). Plain DOM, no framework; text always goes in via textContent.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const state = {run: null, metrics: [], info: null, report: null};

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

const pct = (x) => (x === null || x === undefined ? "" : `${(100 * x).toFixed(1)}%`);
const num = (x, d = 4) => (x === null || x === undefined ? "" : Number(x).toFixed(d));

function toast(msg) {
  const t = $("#toast");
  t.textContent = msg;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 8000);
}

// -- HTTP: the server's key (kept for this tab only) and its error body ----------------------

function headers(json) {
  const hd = json ? {"content-type": "application/json"} : {};
  const key = sessionStorage.getItem("lorakit-key");
  if (key) hd.authorization = `Bearer ${key}`;
  return hd;
}

class ApiFailure extends Error {}

async function api(path, opts = {}) {
  const init = {method: opts.method || (opts.body !== undefined ? "POST" : "GET"),
    headers: headers(opts.body !== undefined)};
  if (opts.body !== undefined) init.body = JSON.stringify(opts.body);
  const r = await fetch(path, init);
  if (r.status === 401) $("#keybar").hidden = false;
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!r.ok) {
    const msg = data && data.error ? data.error.message : `${r.status} ${text}`;
    throw new ApiFailure(msg);
  }
  return data;
}

async function blobUrl(path) {
  const r = await fetch(path, {headers: headers(false)});
  if (!r.ok) throw new ApiFailure(`${path}: ${r.status}`);
  return URL.createObjectURL(await r.blob());
}

// -- tabs ------------------------------------------------------------------------------------

const loaders = {};

function showTab(name) {
  if (!$(`#tab-${name}`)) name = "runs";
  for (const s of $$(".tab")) s.hidden = s.id !== `tab-${name}`;
  for (const a of $$("nav a")) a.classList.toggle("active", a.dataset.tab === name);
  if (loaders[name]) loaders[name]().catch((e) => toast(e.message));
}

window.addEventListener("hashchange", () => showTab(location.hash.slice(1).split("/")[0]));

// -- Runs ------------------------------------------------------------------------------------

async function loadRuns() {
  const {data} = await api("/ui/api/runs");
  const body = $("#runs-table tbody");
  body.replaceChildren(...data.map((r) => h("tr", {"data-run": r.name, class: r.name === state.run ? "selected" : null},
    h("td", {}, h("a", {href: "#runs", on: {click: () => openRun(r.name)}}, r.name)),
    h("td", {}, h("span", {class: `badge ${r.status}`}, r.status + (r.resumable ? " (resumable)" : ""))),
    h("td", {}, r.total_steps ? `${r.step} / ${r.total_steps}` : r.step),
    h("td", {}, num(r.loss)), h("td", {}, num(r.val_loss)),
    h("td", {}, r.has_eval ? h("a", {href: "#eval", on: {click: () => { state.report = `${r.name}/eval/report.json`; }}}, "evaluation") : ""))));
  if (!state.run && data.length) openRun(data[0].name);
}

function drawRunCharts() {
  const rows = state.metrics;
  const loss = rows.filter((r) => "loss" in r).map((r) => [r.step, r.loss]);
  const val = rows.filter((r) => "val_loss" in r).map((r) => [r.step, r.val_loss]);
  lineChart($("#chart-loss"), [{name: "loss", points: loss}].concat(val.length ? [{name: "val_loss", points: val}] : []));
  lineChart($("#chart-lr"), [{name: "lr", points: rows.filter((r) => "lr" in r).map((r) => [r.step, r.lr])}]);
  lineChart($("#chart-tps"), [{name: "tokens/s", points: rows.filter((r) => "tokens_per_s" in r).map((r) => [r.step, r.tokens_per_s])}]);
}

function showRunState(d) {
  const st = $("#run-status");
  st.textContent = d.status + (d.resumable ? " (resumable)" : "");
  st.className = `badge ${d.status}`;
  $("#run-detail").dataset.status = d.status;
  $("#run-stop").hidden = d.status !== "running";
  $("#run-resume").hidden = !d.resumable;
  $("#run-eval").hidden = !d.has_eval;
}

async function openRun(name) {
  state.run = name;
  state.metrics = [];
  const d = await api(`/ui/api/runs/${encodeURIComponent(name)}`);
  $("#run-detail").hidden = false;
  $("#run-name").textContent = name;
  $("#run-config").textContent = d.config || "";
  $("#run-log").textContent = d.log || "";
  showRunState(d);
  for (const tr of $$("#runs-table tbody tr")) tr.classList.toggle("selected", tr.dataset.run === name);
  await pollRun();
}

async function pollRun() {
  // One poll at a time, and only for the run still shown: rows are appended exactly once.
  if (state.polling || !state.run || $("#tab-runs").hidden) return;
  state.polling = true;
  try { await pollOnce(); } finally { state.polling = false; }
}

async function pollOnce() {
  const name = state.run, since = state.metrics.length, shown = state.metrics;
  const m = await api(`/ui/api/runs/${encodeURIComponent(name)}/metrics?since=${since}`);
  if (name !== state.run || shown !== state.metrics || since !== shown.length) return;
  state.metrics.push(...m.rows);
  drawRunCharts();
  const last = state.metrics.filter((r) => "step" in r).pop();
  $("#run-progress").textContent = last ? `step ${last.step}` : "";
  if (m.status !== $("#run-detail").dataset.status || m.status === "running") {
    const d = await api(`/ui/api/runs/${encodeURIComponent(name)}`);
    showRunState(d);
    $("#run-log").textContent = d.log || "";
    if (d.total_steps && last) $("#run-progress").textContent = `step ${last.step} of ${d.total_steps}`;
  }
}

$("#run-stop").addEventListener("click", async () => {
  try { showRunState(await api(`/ui/api/runs/${encodeURIComponent(state.run)}/stop`, {method: "POST"})); } catch (e) { toast(e.message); }
  loadRuns().catch(() => {});
});
$("#run-resume").addEventListener("click", async () => {
  try { showRunState(await api(`/ui/api/runs/${encodeURIComponent(state.run)}/resume`, {method: "POST"})); } catch (e) { toast(e.message); }
});
$("#run-eval").addEventListener("click", () => { state.report = `${state.run}/eval/report.json`; location.hash = "#eval"; });

loaders.runs = async () => { await loadRuns(); if (state.run) await openRun(state.run); };
setInterval(() => { if (!$("#tab-runs").hidden) pollRun().catch(() => {}); }, 250);
setInterval(() => { if (!$("#tab-runs").hidden) loadRuns().catch(() => {}); }, 2500);

// -- New run ---------------------------------------------------------------------------------

function formConfig() {
  const config = {};
  for (const el of $$("#new-form [data-type]")) {
    const [section, key] = el.name.split(".");
    let v;
    if (el.dataset.type === "bool") v = el.checked;
    else {
      const text = el.value.trim();
      if (text === "") continue;
      if (el.dataset.type === "num") v = text !== "" && !Number.isNaN(Number(text)) ? Number(text) : text;
      else if (el.dataset.type === "list") v = text === "all-linear" ? text : text.split(",").map((s) => s.trim()).filter(Boolean);
      else v = text;
    }
    (config[section] = config[section] || {})[key] = v;
  }
  for (const el of $$("#new-form select")) {
    const [section, key] = el.name.split(".");
    (config[section] = config[section] || {})[key] = el.value;
  }
  const overrides = $("#new-form [name=overrides]").value.split("\n").map((x) => x.trim()).filter(Boolean);
  return {name: $("#new-form [name=name]").value.trim(), config, overrides};
}

function calcTable(c) {
  const gb = (b) => (b >= 1e7 ? `${(b / 2 ** 30).toFixed(3)} GB` : `${(b / 1e6).toFixed(2)} MB`);
  const m = c.training_memory, p = c.parameters;
  const rows = [["trainable parameters", `${p.trainable.toLocaleString()} (${p.trainable_percent.toFixed(4)}%)`],
    ["weights", gb(m.weights)], ["gradients", gb(m.gradients)], ["optimizer states", gb(m.optimizer_states)],
    ["activations", gb(m.activations)], ["total", gb(m.total)],
    ["total, gradient checkpointing", gb(m.total_checkpointed)], ["adapter file", gb(c.adapter_file_bytes)]];
  return h("table", {class: "grid", id: "calc-table"}, h("tbody", {}, rows.map(([k, v]) =>
    h("tr", {"data-key": k}, h("td", {}, k), h("td", {class: "num"}, v)))));
}

async function checkForm() {
  const f = formConfig();
  const errors = $("#form-errors");
  try {
    await api("/ui/api/validate", {body: {name: f.name || "new-run", config: f.config, overrides: f.overrides}});
    errors.hidden = true;
    $("#form-check").textContent = "the config is valid";
  } catch (e) {
    errors.hidden = false;
    errors.textContent = e.message;
    $("#form-check").textContent = "the config has problems:";
  }
  try {
    $("#calc").replaceChildren(calcTable(await api("/ui/api/calc", {body: {config: f.config, overrides: f.overrides}})));
  } catch (e) {
    $("#calc").replaceChildren(h("p", {class: "error"}, e.message));
  }
}

let formTimer = null;
$("#new-form").addEventListener("input", () => { clearTimeout(formTimer); formTimer = setTimeout(checkForm, 250); });
$("#new-form").addEventListener("change", () => { clearTimeout(formTimer); formTimer = setTimeout(checkForm, 250); });
$("#new-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = formConfig();
  try {
    await api("/ui/api/runs", {body: f});
    state.run = f.name;
    location.hash = "#runs";
  } catch (e) {
    $("#form-errors").hidden = false;
    $("#form-errors").textContent = e.message;
  }
});

function fillDefaults(defaults) {
  for (const el of $$("#new-form [name]")) {
    const [section, key] = el.name.split(".");
    if (!key || !defaults[section] || el.dataset.filled) continue;
    const v = defaults[section][key];
    el.dataset.filled = "1";
    if (el.type === "checkbox") el.checked = !!v;
    else if (v !== null && v !== undefined) el.value = Array.isArray(v) ? v.join(",") : v;
  }
}

loaders.new = async () => { checkForm(); };

// -- Evaluation ------------------------------------------------------------------------------

function reportColumns(rep) {
  const cols = [];
  if (rep.base) cols.push(["base", rep.base]);
  for (const c of (rep.baselines && rep.baselines.columns) || []) if (c.name !== "adapter") cols.push([c.name, c]);
  if (rep.adapter) cols.push(["adapter", rep.adapter]);
  if (!cols.length && rep.task) cols.push(["model", rep]);
  return cols;
}

function renderReport(data) {
  const rep = data.report, cols = reportColumns(rep), out = [];
  const classification = rep.task === "classification" || (cols.length && cols[0][1].report);
  out.push(h("p", {class: "muted"}, `${data.path}: ${rep.rows} rows, task ${rep.task}` +
    (rep.agreement ? `; only the adapter right on ${rep.agreement.adapter_only}, only the base on ${rep.agreement.base_only}` : "")));
  const metrics = classification ? [["accuracy", (r) => r.report && pct(r.report.accuracy)], ["macro-F1", (r) => r.report && pct(r.report.macro_f1)],
    ["weighted-F1", (r) => r.report && pct(r.report.weighted_f1)]] : [];
  metrics.push(["loss", (r) => num(r.loss)], ["perplexity", (r) => num(r.perplexity, 3)]);
  out.push(h("h3", {}, "Summary"), h("table", {class: "grid", id: "eval-summary"},
    h("thead", {}, h("tr", {}, h("th", {}, "metric"), cols.map(([n]) => h("th", {}, n)))),
    h("tbody", {}, metrics.map(([m, f]) => h("tr", {}, h("td", {}, m),
      cols.map(([n, r]) => h("td", {class: "num", "data-col": n, "data-metric": m}, f(r) ?? "")))))));
  if (!classification) return out;
  const labels = rep.labels || cols[cols.length - 1][1].labels;
  out.push(h("h3", {}, "Per class"), h("table", {class: "grid", id: "eval-per-class"},
    h("thead", {}, h("tr", {}, h("th", {}, "class"), h("th", {}, "support"),
      cols.map(([n]) => ["P", "R", "F1"].map((m) => h("th", {}, `${n} ${m}`))))),
    h("tbody", {}, labels.map((lab) => h("tr", {}, h("td", {}, lab),
      h("td", {class: "num"}, cols[cols.length - 1][1].report.per_class[lab].support),
      cols.map(([n, r]) => { const c = r.report.per_class[lab]; return [["P", c.precision], ["R", c.recall], ["F1", c.f1]].map(([m, v]) =>
        h("td", {class: "num", "data-col": n, "data-class": lab, "data-metric": m}, pct(v))); }))))));
  const [lastName, last] = cols[cols.length - 1];
  const hm = h("div", {id: "eval-heatmap"});
  heatmap(hm, labels, last.report.confusion_matrix);
  out.push(h("h3", {}, `Confusion matrix (${lastName}; rows true, columns predicted)`), hm);
  const wrong = last.y_true.map((t, i) => ({i, t, p: last.predictions[i]})).filter((r) => r.t !== r.p);
  const filter = h("select", {id: "wrong-filter"}, h("option", {value: ""}, "every class"), labels.map((l) => h("option", {value: l}, l)));
  const body = h("tbody");
  const fill = () => body.replaceChildren(...wrong.filter((r) => !filter.value || r.t === filter.value).map((r) =>
    h("tr", {"data-true": r.t}, h("td", {class: "num"}, r.i + 1), h("td", {}, data.inputs ? data.inputs[r.i] : ""),
      h("td", {}, r.t), h("td", {}, r.p), rep.base && lastName === "adapter" ? h("td", {}, rep.base.predictions[r.i]) : null)));
  filter.addEventListener("change", fill);
  fill();
  out.push(h("h3", {}, `Rows the ${lastName} got wrong (${wrong.length}) `, filter),
    h("table", {class: "grid", id: "eval-wrong"}, h("thead", {}, h("tr", {}, h("th", {}, "row"), h("th", {}, "input"),
      h("th", {}, "true"), h("th", {}, lastName), rep.base && lastName === "adapter" ? h("th", {}, "base") : null)), body));
  return out;
}

async function loadEval() {
  const {data} = await api("/ui/api/reports");
  const pick = $("#report-pick");
  pick.replaceChildren(...data.map((p) => h("option", {value: p}, p)));
  if (!data.length) { $("#eval-body").replaceChildren(h("p", {class: "muted"}, "no report.json under the runs folder yet")); return; }
  if (!state.report || !data.includes(state.report)) state.report = data[0];
  pick.value = state.report;
  const rep = await api(`/ui/api/report?path=${encodeURIComponent(state.report)}`);
  $("#eval-body").replaceChildren(...renderReport(rep));
}
$("#report-pick").addEventListener("change", () => { state.report = $("#report-pick").value; loadEval().catch((e) => toast(e.message)); });
loaders.eval = loadEval;

// -- Compare and chat ------------------------------------------------------------------------

async function loadModels() {
  const {data} = await api("/v1/models");
  const box = $("#chat-models");
  const was = new Set($$("input:checked", box).map((i) => i.value));
  box.replaceChildren(h("span", {class: "muted"}, "base and up to 3 adapters: "), ...data.map((m, i) =>
    h("label", {class: "inline"}, h("input", {type: "checkbox", value: m.id, "data-base": m.parent ? null : "1",
      checked: was.size ? was.has(m.id) : i === 0, on: {change: limitModels}}), m.parent ? m.id : `${m.id} (base)`)));
}

function limitModels() {
  const adapters = $$("#chat-models input:checked").filter((i) => !i.dataset.base);
  if (adapters.length > 3) { this.checked = false; toast("at most 3 adapters beside the base"); }
}

async function streamChat(model, messages, params, panel) {
  const out = $(".text", panel);
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(true),
    body: JSON.stringify({model, messages, stream: true, ...params})});
  if (!r.ok) {
    const data = await r.json().catch(() => null);
    throw new ApiFailure(data && data.error ? data.error.message : `${r.status}`);
  }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).trim();
      buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.error) throw new ApiFailure(ev.error.message);
      const delta = ev.choices && ev.choices[0] && ev.choices[0].delta;
      if (delta && delta.content) out.textContent += delta.content;
    }
  }
}

$("#chat-send").addEventListener("click", async () => {
  const models = $$("#chat-models input:checked").map((i) => i.value);
  const prompt = $("#chat-prompt").value;
  if (!models.length || !prompt.trim()) { toast("choose a model and write a prompt"); return; }
  const messages = ($("#chat-system").value.trim() ? [{role: "system", content: $("#chat-system").value}] : [])
    .concat([{role: "user", content: prompt}]);
  const params = {};
  for (const k of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    const v = $(`#s-${k}`).value.trim();
    if (v !== "") params[k] = Number.isNaN(Number(v)) ? v : Number(v);
  }
  const answers = $("#chat-answers");
  const panels = models.map((m) => h("div", {class: "answer", "data-model": m}, h("h4", {}, m), h("div", {class: "text"})));
  answers.replaceChildren(...panels);
  // All requests at once: the engine batches the base and the adapters together.
  await Promise.all(models.map((m, i) => streamChat(m, messages, params, panels[i])
    .catch((e) => { $(".text", panels[i]).append(h("span", {class: "error"}, ` [${e.message}]`)); })
    .finally(() => { panels[i].dataset.done = "1"; })));
});
loaders.compare = loadModels;

// -- Adapters --------------------------------------------------------------------------------

function kb(b) { return b >= 1e6 ? `${(b / 1e6).toFixed(1)} MB` : `${(b / 1e3).toFixed(1)} kB`; }

function evalCell(a, reports) {
  const ev = a.eval_results;
  if (ev) {
    const r = ev.adapter && ev.adapter.report ? ev.adapter.report : ev.report;
    return r && r.accuracy !== undefined ? `accuracy ${pct(r.accuracy)}` : JSON.stringify(ev).slice(0, 80);
  }
  // An adapter a run wrote (<run>/adapter): that run's evaluation report, when it has one.
  const root = state.info.runs_root + "/";
  const rel = a.path.startsWith(root) && a.path.endsWith("/adapter") ? a.path.slice(root.length, -7) + "eval/report.json" : null;
  if (!rel || !reports.includes(rel)) return "";
  const cell = h("a", {href: "#eval", on: {click: () => { state.report = rel; }}}, "report");
  api(`/ui/api/report?path=${encodeURIComponent(rel)}`).then((d) => {
    const r = d.report.adapter && d.report.adapter.report;
    if (r) cell.textContent = `accuracy ${pct(r.accuracy)}` + (d.report.base ? ` (base ${pct(d.report.base.report.accuracy)})` : "");
  }).catch(() => {});
  return cell;
}

async function adapterAction(name, action) {
  try {
    if (action === "remove") await api(`/admin/adapters/${encodeURIComponent(name)}`, {method: "DELETE"});
    else if (action === "load") await api(`/admin/adapters/${encodeURIComponent(name)}/load`, {body: {}});
    else if (action === "check") return showCheck(await api(`/ui/api/adapters/${encodeURIComponent(name)}/check`));
    else await api(`/admin/adapters/${encodeURIComponent(name)}/${action}`, {method: "POST"});
  } catch (e) { toast(e.message); }
  await loadAdapters();
}

function showCheck(c) {
  $("#check-out").replaceChildren(h("h3", {}, `check-adapter ${c.name}: ${c.findings.length} finding(s), ${c.blocking} blocking`),
    c.findings.length ? h("table", {class: "grid", id: "check-table"}, h("thead", {}, h("tr", {}, ["target", "severity", "key", "message", "action"].map((x) => h("th", {}, x)))),
      h("tbody", {}, c.findings.map((f) => h("tr", {}, [f.target, f.severity, f.key, f.message, f.action].map((x) => h("td", {}, x))))))
      : h("p", {}, `loads as written in ${c.targets.join(", ")}`));
}

async function loadAdapters() {
  const {data} = await api("/admin/adapters");
  const reports = (await api("/ui/api/reports")).data;
  $("#adapters-table tbody").replaceChildren(...data.map((a) => h("tr", {"data-adapter": a.name},
    h("td", {}, a.name), h("td", {class: "path"}, a.path), h("td", {}, a.base_model || ""), h("td", {class: "num"}, a.rank),
    h("td", {class: "num"}, a.lora_alpha), h("td", {}, (a.target_modules || []).join(", ")), h("td", {class: "num"}, kb(a.size_bytes || 0)),
    h("td", {}, [a.slot !== null && a.slot !== undefined ? `slot ${a.slot}` : a.cpu_resident ? "in memory" : "on disk", a.pinned ? ", pinned" : "", a.error ? ` (${a.error})` : ""].join("")),
    h("td", {"data-eval": a.name}, evalCell(a, reports)),
    h("td", {}, ["load", a.pinned ? "unpin" : "pin", "unload", "remove", "check"].map((x) =>
      h("button", {class: "small", "data-action": x, on: {click: () => adapterAction(a.name, x)}}, x))))));
}

async function loadSweeps() {
  const {data} = await api("/ui/api/sweeps");
  const box = $("#sweeps");
  if (!data.length) { box.replaceChildren(h("p", {class: "muted"}, "no sweep results.jsonl under the runs folder")); return; }
  box.replaceChildren(...data.map((s) => {
    const ok = s.rows.filter((r) => r.status === "ok");
    const div = h("div", {class: "sweep"}, h("h4", {}, `${s.path}: ${s.rows.length} trial(s), ${ok.length} ok`));
    const chart = h("div", {class: "chart"});
    const series = ok.filter((r) => r.val_curve || r.loss_curve).slice(0, 5).map((r) => ({name: r.id, points: r.val_curve || r.loss_curve}));
    if (series.length) { lineChart(chart, series); div.append(h("p", {class: "muted"}, "validation loss by step, per trial"), chart); }
    if (s.summary) div.append(h("pre", {}, s.summary));
    for (const p of s.plots) {
      const img = h("img", {alt: p, class: "plot"});
      blobUrl(`/ui/api/file?path=${encodeURIComponent(p)}`).then((u) => { img.src = u; }).catch(() => {});
      div.append(img);
    }
    return div;
  }));
}

$("#reg-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target, err = $("#reg-error");
  const body = {name: f.name.value.trim(), pin: f.pin.checked};
  if (f.path.value.trim()) body.path = f.path.value.trim();
  try {
    await api("/admin/adapters", {body});
    err.hidden = true;
    f.reset();
  } catch (e) {
    err.hidden = false;
    err.textContent = e.message;
  }
  await loadAdapters();
});

loaders.adapters = async () => { await loadAdapters(); await loadSweeps(); };

// -- start -----------------------------------------------------------------------------------

$("#key-save").addEventListener("click", () => {
  sessionStorage.setItem("lorakit-key", $("#key").value);
  $("#keybar").hidden = true;
  start();
});

async function start() {
  try {
    state.info = await api("/ui/api/info");
    $("#base").textContent = `base: ${state.info.base}`;
    $("#runs-root").textContent = state.info.runs_root;
    $("#adapters-root").textContent = `root: ${state.info.adapters_root}`;
    fillDefaults(state.info.defaults);
  } catch (e) { toast(e.message); return; }
  showTab(location.hash.slice(1) || "runs");
}
start();
