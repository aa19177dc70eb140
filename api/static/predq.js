// The predq web page: models, jobs and uploads, all fetched from the API by this script.
// Every value from the API reaches the page through textContent or a property, never as HTML.
"use strict";

(() => {
  const KEY_ITEM = "predq.apiKey";  // sessionStorage: the key lives as long as this browser tab
  const TERMINAL = new Set(["succeeded", "partially_succeeded", "failed", "cancelled"]);
  const POLL_MS = 1000;
  const RETRY_MS = 5000;
  const keysRequired = document.body.dataset.keysRequired === "true";
  const $ = (id) => document.getElementById(id);

  const jobs = new Map();  // job id -> {job, row, timer}

  class ApiError extends Error {
    constructor(status, code, message, details, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details || null;
      this.retryAfter = retryAfter;
    }
  }

  // -- the key -------------------------------------------------------------------------------------

  function apiKey() {
    return sessionStorage.getItem(KEY_ITEM);
  }

  function showKeyStatus() {
    $("key-status").hidden = !(keysRequired && apiKey());
  }

  function askForKey(message) {
    $("key-message").textContent = message || "This service needs an API key. It is kept for this browser tab only.";
    $("key-prompt").hidden = false;
    showKeyStatus();
    $("key-input").focus();
  }

  function onAuthRefused(error) {
    if (!keysRequired) {  // no keys to give: the service refuses this address, say why
      showNotice(error.message);
      return;
    }
    if (error.status === 401) {  // the key is missing or wrong: forget it and stop everything that used it
      sessionStorage.removeItem(KEY_ITEM);
      stopPolling();
      $("content").hidden = true;
    }
    askForKey(error.message);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_ITEM, key);
    $("key-input").value = "";
    $("key-prompt").hidden = true;
    start();
  });

  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    stopPolling();
    $("content").hidden = true;
    askForKey();
  });

  // -- talking to the API --------------------------------------------------------------------------

  function authHeaders() {
    const key = apiKey();
    return key ? {Authorization: "Bearer " + key} : {};
  }

  function errorFrom(status, body, retryAfter) {
    const err = body && typeof body.error === "object" && body.error ? body.error : {};
    const message = typeof err.message === "string" ? err.message : `The service answered HTTP ${status}.`;
    return new ApiError(status, err.code || "http_error", message, err.details, retryAfter);
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, {...options, headers: {...authHeaders(), ...(options.headers || {})},
                                    cache: "no-store", credentials: "omit"});
    } catch (e) {
      throw new ApiError(0, "unreachable", "The service did not answer; is it running?");
    }
    if (response.ok) return response;
    let body = null;
    try {
      body = await response.json();
    } catch (e) { /* not JSON: the status alone tells */ }
    const error = errorFrom(response.status, body, Number(response.headers.get("Retry-After")) || 0);
    if (error.status === 401 || error.status === 403) onAuthRefused(error);
    throw error;
  }

  async function apiJson(path, options) {
    return (await api(path, options)).json();
  }

  function describe(error) {
    const fields = error.details && Array.isArray(error.details.fields) ? error.details.fields : [];
    const parts = fields.map((f) => `${f.name}: ${f.message}`);
    return parts.length ? `${error.message} (${parts.join("; ")})` : error.message;
  }

  function showNotice(message) {
    $("notice").textContent = message;
    $("notice").hidden = false;
  }

  function clearNotice() {
    $("notice").hidden = true;
  }

  // -- small DOM helpers ---------------------------------------------------------------------------

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else if (name === "data") Object.assign(node.dataset, value);
      else node[name] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  function number(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }

  function when(timestamp) {
    // The time alone for today, the date too for other days.
    const date = new Date(timestamp);
    if (isNaN(date)) return "";
    if (date.toDateString() === new Date().toDateString()) return date.toLocaleTimeString();
    return date.toLocaleString(undefined, {dateStyle: "short", timeStyle: "short"});
  }

  function sameOrigin(path, params) {
    const url = new URL(path, window.location.origin);
    if (url.origin !== window.location.origin) throw new Error("link to another origin");
    for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
    return url.pathname + url.search;
  }

  // -- models --------------------------------------------------------------------------------------

  function renderModels(models) {
    const body = $("models").tBodies[0];
    const select = $("upload-model");
    const chosen = select.value;
    body.replaceChildren();
    select.replaceChildren();
    for (const m of models) {
      const features = Array.isArray(m.features) ? m.features : [];
      body.append(el("tr", {data: {model: String(m.name)}}, [
        el("td", {class: "name", text: String(m.name)}),
        el("td", {text: String(m.version)}),
        el("td", {text: String(m.task)}),
        el("td", {text: String(features.length), title: features.map((f) => `${f.name} (${f.dtype})`).join(", ")}),
        el("td", {text: Array.isArray(m.classes) ? m.classes.map(String).join(", ") : "–"}),
        el("td", {text: (m.versions || []).map(String).join(", ")}),
      ]));
      select.append(el("option", {value: String(m.name), text: `${m.name} (${m.version})`}));
    }
    if (models.some((m) => String(m.name) === chosen)) select.value = chosen;
    $("models-empty").hidden = models.length > 0;
    $("upload-submit").disabled = models.length === 0;
  }

  async function loadModels() {
    const answer = await apiJson("/v1/models");
    renderModels(answer.data);
  }

  // -- jobs ----------------------------------------------------------------------------------------

  function jobRow(job) {
    const progress = el("progress", {max: 1, class: "job-progress"});
    return el("tr", {data: {jobId: String(job.id)}}, [
      el("td", {class: "job-id"}, [el("code", {text: String(job.id)}), el("div", {class: "sub schedule"}),
                                   el("div", {class: "sub job-error"})]),
      el("td", {class: "job-model"}),
      el("td", {class: "job-status"}, [el("span", {class: "status"})]),
      el("td", {class: "job-progress-cell"}, [progress, el("span", {class: "percent"})]),
      el("td", {class: "job-counts"}, [
        el("div", {class: "nowrap"}, [el("span", {class: "count-succeeded"}), " succeeded, ",
                                      el("span", {class: "count-failed"}), " failed"]),
        el("div", {class: "sub"}, ["of ", el("span", {class: "count-total"}), " rows",
                                   el("span", {class: "skipped-part"}, [", ", el("span", {class: "count-skipped"}),
                                                                        " skipped"])]),
      ]),
      el("td", {class: "job-speed"}, [el("span", {class: "rows-per-second"}), el("div", {class: "sub eta"})]),
      el("td", {class: "job-created"}),
      el("td", {class: "job-actions"}),
    ]);
  }

  function downloadLink(job, kind, label) {
    const format = $("download-format").value;
    const href = sameOrigin(job.links[kind], {format});
    const link = el("a", {href, text: label, class: `download download-${kind}`,
                          download: `${job.id}-${kind}.${format}`});
    if (keysRequired) link.addEventListener("click", (event) => {
      event.preventDefault();
      download(href, link.download);
    });
    return link;
  }

  async function download(href, filename) {
    // A link cannot carry the Authorization header: fetch with it, then save what came back.
    try {
      const blob = await (await api(href)).blob();
      const url = URL.createObjectURL(blob);
      const save = el("a", {href: url, download: filename, hidden: true});
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (error) {
      if (error.status !== 401) showNotice(`Download failed: ${describe(error)}`);
    }
  }

  function renderActions(entry) {
    const {job, row} = entry;
    const cell = row.querySelector(".job-actions");
    cell.replaceChildren();
    if (TERMINAL.has(job.status)) {
      if (job.counts.succeeded > 0) cell.append(downloadLink(job, "results", "Results"));
      if (job.counts.failed > 0) cell.append(downloadLink(job, "errors", "Errors"));
    } else {
      const button = el("button", {type: "button", class: "cancel", text: "Cancel"});
      button.addEventListener("click", () => cancel(entry, button));
      cell.append(button);
    }
  }

  function renderJob(entry) {
    const {job, row} = entry;
    const q = (selector) => row.querySelector(selector);
    const model = job.model || {};
    q(".job-model").textContent = `${model.name} ${model.version}`;
    q(".schedule").textContent = job.schedule ? `schedule ${job.schedule.name}, ${job.schedule.date}` : "";
    const status = q(".status");
    status.textContent = String(job.status).replace("_", " ");
    status.className = `status status-${job.status}`;
    row.dataset.status = String(job.status);
    q(".job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    const bar = q("progress");
    if (typeof job.progress === "number") {
      bar.value = job.progress;
      q(".percent").textContent = `${Math.floor(job.progress * 100)}%`;
    } else {
      bar.removeAttribute("value");  // indeterminate until the whole input has been read
      q(".percent").textContent = "";
    }
    const counts = job.counts || {};
    q(".count-succeeded").textContent = number(counts.succeeded);
    q(".count-failed").textContent = number(counts.failed);
    q(".count-total").textContent = counts.total === null ? "?" : number(counts.total);
    q(".count-skipped").textContent = number(counts.skipped);
    q(".skipped-part").hidden = !counts.skipped;
    q(".rows-per-second").textContent = job.rows_per_second ? number(Math.round(job.rows_per_second)) : "–";
    q(".eta").textContent = !TERMINAL.has(job.status) && job.eta_seconds ? `${Math.ceil(job.eta_seconds)} s left` : "";
    q(".job-created").textContent = when(job.created_at);
    q(".job-created").title = String(job.created_at);
    renderActions(entry);
  }

  function schedulePoll(entry, delay) {
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => poll(entry), delay);
  }

  function pollDelay() {
    // One request a second per running job, slower when many run: the page must not spend a key's rate limit.
    const running = [...jobs.values()].filter((e) => !TERMINAL.has(e.job.status)).length;
    return POLL_MS * Math.max(1, Math.ceil(running / 5));
  }

  async function poll(entry) {
    entry.timer = null;
    const version = entry.version;
    let job;
    try {
      job = await apiJson(sameOrigin(entry.job.links.self));
    } catch (error) {
      if (entry.version !== version) return;  // a newer answer (a cancel) came first: it decides what follows
      if (error.status === 404) {  // deleted or expired: nothing more will change
        entry.row.querySelector(".job-error").textContent = error.message;
        return;
      }
      if (error.status === 401) return;
      schedulePoll(entry, error.retryAfter ? error.retryAfter * 1000 : RETRY_MS);
      return;
    }
    if (entry.version !== version) return;  // sent before a cancel answered: older than what the page shows
    entry.job = job;
    renderJob(entry);
    if (!TERMINAL.has(entry.job.status)) schedulePoll(entry, pollDelay());
  }

  function track(job, {first = false} = {}) {
    const previous = jobs.get(job.id);
    if (previous) {
      clearTimeout(previous.timer);
      previous.row.remove();
    }
    const entry = {job, row: jobRow(job), timer: null, version: 0};  // version: bumped by each cancel's answer
    jobs.set(job.id, entry);
    const body = $("jobs").tBodies[0];
    if (first) body.prepend(entry.row); else body.append(entry.row);
    renderJob(entry);
    if (!TERMINAL.has(job.status)) schedulePoll(entry, pollDelay());
    $("jobs-empty").hidden = true;
  }

  function stopPolling() {
    for (const entry of jobs.values()) clearTimeout(entry.timer);
  }

  async function loadJobs() {
    const answer = await apiJson("/v1/jobs?limit=50");
    stopPolling();
    jobs.clear();
    $("jobs").tBodies[0].replaceChildren();
    for (const job of answer.data) track(job);
    $("jobs-empty").hidden = answer.data.length > 0;
  }

  async function cancel(entry, button) {
    button.disabled = true;
    try {
      entry.job = await apiJson(sameOrigin(entry.job.links.self) + "/cancel", {method: "POST"});
      entry.version += 1;  // a poll still in flight answers with the job as it was before the cancel
      clearTimeout(entry.timer);
      renderJob(entry);
      if (!TERMINAL.has(entry.job.status)) schedulePoll(entry, pollDelay());
    } catch (error) {
      button.disabled = false;
      if (error.code === "job_finished") poll(entry);
      else if (error.status !== 401) showNotice(`Cancel failed: ${describe(error)}`);
    }
  }

  $("download-format").addEventListener("change", () => {
    for (const entry of jobs.values()) renderActions(entry);
  });

  $("jobs-refresh").addEventListener("click", () => {
    loadJobs().then(clearNotice, (error) => reportLoadError(error));
  });

  // -- uploads -------------------------------------------------------------------------------------

  function showUploadMessage(text, isError) {
    const message = $("upload-message");
    message.textContent = text;
    message.className = isError ? "message error" : "message";
    message.hidden = false;
  }

  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("upload-file").files[0];
    if (!file) {
      showUploadMessage("Choose a file to upload.", true);
      return;
    }
    // The contract wants the options before the file part; FormData keeps the order they are added in.
    const form = new FormData();
    form.append("model", $("upload-model").value);
    const idColumn = $("upload-id-column").value.trim();
    if (idColumn) form.append("id_column", idColumn);
    if ($("upload-probabilities").checked) form.append("probabilities", "true");
    form.append("file", file, file.name);

    // XMLHttpRequest rather than fetch: only it reports how much of a large upload has been sent.
    const request = new XMLHttpRequest();
    const bar = $("upload-progress");
    const submit = $("upload-submit");
    request.open("POST", "/v1/jobs");
    for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
    request.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) bar.value = e.loaded / e.total;
    });
    request.addEventListener("load", () => {
      submit.disabled = false;
      bar.hidden = true;
      let body = null;
      try {
        body = JSON.parse(request.responseText);
      } catch (e) { /* the status alone tells */ }
      if (request.status === 200 || request.status === 202) {
        showUploadMessage(`Job ${body.id} created from ${file.name}.`, false);
        $("upload-file").value = "";
        track(body, {first: true});
        return;
      }
      const error = errorFrom(request.status, body, 0);
      if (error.status === 401 || error.status === 403) onAuthRefused(error);
      showUploadMessage(describe(error), true);
    });
    request.addEventListener("error", () => {
      submit.disabled = false;
      bar.hidden = true;
      showUploadMessage("The upload did not reach the service; is it running?", true);
    });
    submit.disabled = true;
    bar.value = 0;
    bar.hidden = false;
    $("upload-message").hidden = true;
    request.send(form);
  });

  // -- start ---------------------------------------------------------------------------------------

  function reportLoadError(error) {
    if (error.status !== 401 && error.status !== 403) showNotice(describe(error));
  }

  async function start() {
    showKeyStatus();
    if (keysRequired && !apiKey()) {
      $("content").hidden = true;
      askForKey();
      return;
    }
    $("content").hidden = false;
    clearNotice();
    const outcomes = await Promise.allSettled([loadModels(), loadJobs()]);
    for (const outcome of outcomes) {
      if (outcome.status === "rejected") reportLoadError(outcome.reason);
    }
  }

  start();
})();
