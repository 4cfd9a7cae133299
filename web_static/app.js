// The live canvas page: wires the drawing, the controls and the connection together.
import { Connection } from "./connection.js";
import { CanvasDocument, makeCanvas } from "./document.js";
import { describeProgress, renderFullQuality } from "./batch.js";
import { canvasMessage, deltaMessage, paramsMessage, recordMessage } from "./protocol.js";
import { Sources } from "./sources.js";
import { MaskLayer } from "./mask.js";
import { TOOLS, ToolController } from "./tools.js";

const $ = (selector) => document.querySelector(selector);
const PROMPT_DEBOUNCE_MS = 250;
const PING_INTERVAL_MS = 30000;
const JPEG_QUALITY = 0.9;
const MAX_SEED = 4294967295;

const query = new URLSearchParams(location.search);
// ?resolution=N asks for an N×N session: null when absent, NaN when it is no size a server takes.
const askedResolution = (() => {
  const text = query.get("resolution");
  if (text === null) return null;
  const side = Number(text);
  return Number.isInteger(side) && side >= 64 && side <= 4096 && side % 8 === 0 ? side : NaN;
})();
const state = {
  tool: "brush",
  color: $("#color").value,
  size: Number($("#size").value),
  opacity: Number($("#opacity").value) / 100,
  // The session's parameters as the server holds them: ready.params, then each change this page sends,
  // applied the server's way (predict). The next hello sends the ones in `touched`, so a reconnect gets
  // the same session back and a model switch keeps what the person chose, not the old model's defaults.
  params: { prompt: "", transition_frames: Number($("#transition").value) },
  touched: new Set(["prompt", "transition_frames"]),
  setAside: {}, // LoRAs, controls and a style the person chose that the session's model lacks (helloParams)
  defaults: null, // ready.defaults: where a style change puts the old preset's fields back
  resolution: askedResolution > 0 ? askedResolution : Number($("#resolution").value),
  quality: Number($("#quality").value),
  styles: {}, // style name → the fields it sets (GET /v1/styles)
  models: {}, // model id → its LoRAs, ControlNets and depth network (GET /v1/models)
  defaultModel: null, // the id of the server's default model (GET /v1/models)
  lastGood: null, // the hello settings of the last session the server accepted
  fixes: 0, // hellos changed after a refusal since the last ready (bounded: no loop)
  linesLayer: null, // the layer "Line layer as control" made the control layer
  recording: null, // the recording running in this session: {url, token} for its link if the session ends
  needFull: true, // the server's copy must be replaced: after (re)connect, resize, camera frames
  sending: false,
  promptPending: false,
  lastInputSeq: 0,
  outputUrl: null,
};
$("#resolution").value = String(state.resolution);

const view = $("#draw");
const doc = new CanvasDocument(view, state.resolution, state.resolution);
doc.compose();
const sources = new Sources(doc, (text) => showError({ code: "source", message: text }, true));

const settings = {
  get tool() { return state.tool; },
  get color() { return state.color; },
  get size() { return state.size; },
  get opacity() { return state.opacity; },
  pickColor(hex) { state.color = hex; $("#color").value = hex; selectTool("brush"); },
  notify(text) { showError({ code: "canvas", message: text }, true); },
};
const mask = new MaskLayer($("#mask-overlay"), state.resolution, state.resolution);
new ToolController(doc, view, settings, {
  stroke(points, size) { mask.stroke(points, size); $("#clear-mask").hidden = false; },
});
$("#clear-mask").addEventListener("click", () => { mask.clear(); $("#clear-mask").hidden = true; });

const connection = new Connection({
  url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`,
  helloFields: () => ({
    width: state.resolution,
    height: state.resolution,
    codec: query.get("codec") || "jpeg", // ?codec=png for lossless frames
    quality: state.quality,
    params: helloParams(),
    apiKey: query.get("key") || undefined,
    model: state.model || undefined,
  }),
  // A hidden tab that idled out gives its slot up until it is looked at again (visibilitychange below).
  holdAfterIdle: () => document.visibilityState === "hidden",
});

// ---- connection state → the status pill -------------------------------------------------------

const statusText = {
  connecting: () => "Connecting…",
  ready: () => "Live",
  busy: ({ position, retryAfter }) =>
    position ? `Waiting for a free slot — position ${position} in line` : `Server busy — retrying in ${retryAfter}s`,
  waiting: ({ retryInMs }) => `Disconnected — reconnecting in ${retryInMs < 1000 ? (retryInMs / 1000).toFixed(1) : Math.round(retryInMs / 1000)}s`,
  reconnecting: () => "Reconnecting…",
  paused: () => "Paused while the tab is hidden — it reconnects when you come back",
  error: ({ error }) => `Error: ${error.message}`,
  refused: ({ error }) => `Refused: ${error.message}`,
  closed: () => "Closed",
};

connection.addEventListener("state", (event) => {
  const { state: name } = event.detail;
  const status = $("#status");
  status.dataset.state = name;
  status.textContent = (statusText[name] || (() => name))(event.detail);
  const live = name === "ready";
  for (const id of ["#viewer-link", "#record", "#render-hd"]) $(id).disabled = !live;
  if (name === "refused") handleRefusal(event.detail.error);
  if (live) {
    const ready = event.detail.ready;
    state.needFull = true;
    state.params = { ...ready.params };
    state.defaults = ready.defaults || null;
    state.lastGood = { resolution: state.resolution, quality: state.quality, model: state.model };
    state.fixes = 0;
    offerControlsOf(ready.model.id);
    showParams(state.params);
    endRecording();
    $("#model-name").textContent = ready.model.toy_model ? `${ready.model.toy_model} toy model` : ready.model.name;
    $("#model-name").title = `${ready.model.name} · ${ready.model.device} · ${ready.model.vae}`;
    showViewerLink(ready);
  }
});

function showViewerLink(ready) {
  const viewer = new URL("/obs.html", location.href);
  viewer.search = new URLSearchParams({ session: ready.session_id, token: ready.viewer_token }).toString();
  $("#viewer-url").value = viewer.href;
  $("#viewer-url").dataset.mjpeg = new URL(
    `/v1/sessions/${ready.session_id}/mjpeg?token=${encodeURIComponent(ready.viewer_token)}`, location.href,
  ).href;
}

// Tokens expire (the server's token lifetime, 12 h by default): what hands one out — the viewer link,
// a full-quality render, a recording's download — asks for new ones first, so a session open for
// longer than that still makes links that work. If that fails, the ones from `ready` are tried.
async function freshTokens() {
  try {
    await connection.renewTokens();
  } catch {
    // not connected, or no answer: what `ready` gave may still be valid
  }
  return connection.ready;
}

connection.addEventListener("tokens", () => {
  const ready = connection.ready;
  showViewerLink(ready);
  if (state.recording) state.recording.token = ready.token;
  const link = $("#recording-link");
  if (!link.hidden && link.dataset.session === ready.session_id) link.href = withToken(link.dataset.url, ready.token);
});

// A hello the server refused (a setting this model or server does not take): go back to what worked
// last, or drop the parameter it names, and try again; at most three times before the next ready.
function handleRefusal(error) {
  if (state.fixes >= 3) return;
  state.fixes += 1;
  const good = state.lastGood;
  const helloChanged = good && (good.model !== state.model || good.resolution !== state.resolution || good.quality !== state.quality);
  if (helloChanged) {
    state.model = good.model;
    state.resolution = good.resolution;
    state.quality = good.quality;
    if (good.model) $("#model").value = good.model;
    $("#resolution").value = String(good.resolution);
    $("#quality").value = String(good.quality);
    doc.resize(state.resolution, state.resolution);
    mask.resize(state.resolution, state.resolution);
    showError({ code: "note", message: "Went back to the last settings that worked." }, true);
  } else if (error.field && error.field in state.params) {
    state.touched.delete(error.field);
    delete state.params[error.field];
    showError({ code: "note", message: `Left out ${error.field} and reconnected.` }, true);
  } else {
    return;
  }
  connection.restart();
}

connection.addEventListener("frame", (event) => {
  const frame = event.detail;
  const blob = new Blob([frame.image], { type: `image/${frame.codec}` });
  const url = URL.createObjectURL(blob);
  const output = $("#output");
  output.src = url;
  if (state.outputUrl) URL.revokeObjectURL(state.outputUrl);
  state.outputUrl = url;
  output.dataset.frameSeq = String(frame.seq);
  output.dataset.inputSeq = String(frame.input_seq ?? "");
  output.dataset.frames = String(Number(output.dataset.frames || 0) + 1);
});

connection.addEventListener("stats", (event) => {
  const stats = event.detail;
  $("#stat-fps").textContent = stats.fps.toFixed(1);
  $("#stat-latency").textContent = `${Math.round(stats.latency_ms.p50)} ms`;
  $("#stat-dropped").textContent = String(stats.dropped_inputs + stats.dropped_frames);
});

connection.addEventListener("error-message", (event) => showError(event.detail));

function showError(error, isNote = false) {
  const list = $("#errors");
  const item = document.createElement("li");
  item.dataset.code = error.code;
  if (isNote) item.classList.add("note");
  item.textContent = describeError(error);
  list.prepend(item);
  while (list.children.length > 5) list.lastElementChild.remove();
  setTimeout(() => item.remove(), 15000);
}

function describeError(error) {
  const words = {
    busy: "The server is busy.",
    unauthorized: "The server needs an API key: add ?key=… to the page's address.",
    idle_timeout: "The session was idle for too long; reconnecting.",
    invalid_value: "The server refused a setting:",
    unknown_name: "The server does not have that:",
    inference_failed: "A frame failed on the server:",
  };
  const lead = words[error.code];
  return lead ? `${lead} ${error.message}` : error.message;
}

// ---- sending: paced by the frames that come back -----------------------------------------------

// Drawings go as PNG, so the server's canvas is exactly what is on screen (undo gives back the very
// same frame); live camera and screen frames go as JPEG, which is ~10x faster to encode.
function encodeRegion(rect, format) {
  const region = makeCanvas(rect.w, rect.h);
  region.getContext("2d").drawImage(view, rect.x, rect.y, rect.w, rect.h, 0, 0, rect.w, rect.h);
  return new Promise((resolve) => region.toBlob(resolve, `image/${format}`, JPEG_QUALITY))
    .then((blob) => blob.arrayBuffer())
    .then((buffer) => new Uint8Array(buffer));
}

function encodeCanvas(canvas, format) {
  return new Promise((resolve) => canvas.toBlob(resolve, `image/${format}`, JPEG_QUALITY))
    .then((blob) => blob.arrayBuffer())
    .then((buffer) => new Uint8Array(buffer));
}

async function pump() {
  if (state.sending || !connection.canSendInput()) return;
  const dirty = doc.takeDirty();
  if (!state.needFull && !dirty) return;
  state.sending = true;
  try {
    const live = doc.hasLiveSource();
    const format = live ? "jpeg" : "png";
    if (doc.controlLayer) {
      // The line layer goes to the control layer and the rest to the canvas, each whole: a stroke
      // changes one or the other, and both are cheap to send at these sizes.
      state.needFull = false;
      const image = await encodeCanvas(doc.composeInput(), format);
      const control = await encodeCanvas(doc.composeControl(), "png");
      if (connection.isReady) {
        connection.sendInput((seq) => canvasMessage(seq, format, image));
        state.lastInputSeq = connection.sendInput((seq) => canvasMessage(seq, "png", control, "control"));
      } else {
        state.needFull = true;
      }
    } else if (state.needFull || live) {
      state.needFull = false;
      const bytes = await encodeRegion({ x: 0, y: 0, w: doc.width, h: doc.height }, format);
      if (connection.isReady) state.lastInputSeq = connection.sendInput((seq) => canvasMessage(seq, format, bytes));
      else state.needFull = true;
    } else {
      const bytes = await encodeRegion(dirty, format);
      if (connection.isReady) {
        state.lastInputSeq = connection.sendInput((seq) => deltaMessage(seq, [{ x: dirty.x, y: dirty.y, format, bytes }]));
      } else {
        doc.markDirty(dirty);
      }
    }
  } finally {
    state.sending = false;
  }
}

function loop() {
  if (doc.hasLiveSource()) doc.drawLiveSources(); // the live layers follow their video on screen
  pump().catch((error) => showError({ code: "client", message: String(error) }));
  requestAnimationFrame(loop);
}

function sendParams(changes) {
  state.params = predict(state.params, changes); // kept for the next hello, so a reconnect restores them
  for (const name of Object.keys(changes)) state.touched.add(name);
  if ("style" in changes) showParams(state.params);
  const seq = connection.sendControl((seq) => paramsMessage(seq, changes));
  if (seq !== null) state.lastInputSeq = seq;
}

// What the server makes of `changes` (pipelines/styles.py apply_style): a new style first puts the
// fields the old one set back to the defaults, then sets its own, under the other changes.
function predict(current, changes) {
  if (!("style" in changes)) return { ...current, ...changes };
  const merged = {};
  const old = state.styles[current.style];
  if (old && state.defaults) {
    for (const name of Object.keys(old)) if (name in state.defaults) merged[name] = state.defaults[name];
  }
  const preset = state.styles[changes.style] || {};
  for (const [name, value] of Object.entries(preset)) if (name !== "control_scale") merged[name] = value;
  const next = { ...current, ...merged, ...changes };
  if ("control_scale" in preset && !("controls" in changes) && Array.isArray(next.controls)) {
    next.controls = next.controls.map((control) => ({ ...control, scale: preset.control_scale }));
  }
  return next;
}

// The parameters a hello sends: those the person chose, less what the chosen model cannot take. That
// is set aside rather than dropped, so that going back to a model that takes it brings it back.
function helloParams() {
  const params = {};
  for (const name of state.touched) if (name in state.params) params[name] = state.params[name];
  const offer = state.models[state.model || state.defaultModel];
  if (!offer) return params;
  const aside = state.setAside;
  state.setAside = {};
  const loras = { ...aside.loras, ...params.loras };
  if (Object.keys(loras).length) {
    const [takes, lacks] = partition(Object.entries(loras), ([name]) => offer.loras.includes(name));
    params.loras = Object.fromEntries(takes);
    if (lacks.length) state.setAside.loras = Object.fromEntries(lacks);
  }
  const usable = (control) => offer.controlnets.includes(control.model) && (control.preprocessor !== "depth" || offer.depth);
  const controls = params.controls?.length ? params.controls : aside.controls || [];
  if (controls.length) {
    const [takes, lacks] = partition(controls, usable);
    params.controls = takes;
    if (lacks.length) state.setAside.controls = lacks;
  }
  const styleName = params.style || aside.style;
  const style = state.styles[styleName];
  const styleFits = !style || (Object.keys(style.loras || {}).every((name) => offer.loras.includes(name)) && (style.controls || []).every(usable));
  if (styleFits && styleName) params.style = styleName;
  if (!styleFits) {
    delete params.style;
    state.setAside.style = styleName;
  }
  return params;
}

function partition(items, test) {
  const yes = [];
  const no = [];
  for (const item of items) (test(item) ? yes : no).push(item);
  return [yes, no];
}

// ---- controls ------------------------------------------------------------------------------------

function selectTool(tool) {
  state.tool = tool;
  for (const button of document.querySelectorAll("[data-tool]")) {
    button.setAttribute("aria-pressed", String(button.dataset.tool === tool));
  }
}
for (const button of document.querySelectorAll("[data-tool]")) {
  button.addEventListener("click", () => selectTool(button.dataset.tool));
}
$("#color").addEventListener("input", (event) => { state.color = event.target.value; });
$("#size").addEventListener("input", (event) => { state.size = Number(event.target.value); });
$("#opacity").addEventListener("input", (event) => { state.opacity = Number(event.target.value) / 100; });
$("#undo").addEventListener("click", () => doc.undo());
$("#redo").addEventListener("click", () => doc.redo());
$("#clear").addEventListener("click", () => doc.clearActive());

let promptTimer = null;
$("#prompt").addEventListener("input", (event) => {
  clearTimeout(promptTimer);
  state.promptPending = true;
  promptTimer = setTimeout(() => {
    state.promptPending = false;
    const changes = { prompt: event.target.value };
    if ($("#seed-mode").value === "random") changes.seed = randomSeed();
    sendParams(changes);
  }, PROMPT_DEBOUNCE_MS);
});

$("#strength").addEventListener("input", (event) => {
  $("#strength-value").textContent = Number(event.target.value).toFixed(2);
});
$("#strength").addEventListener("change", (event) => sendParams({ strength: Number(event.target.value) }));
$("#steps").addEventListener("change", (event) => sendParams({ steps: Number(event.target.value) }));
$("#seed").addEventListener("change", (event) => {
  const seed = Math.max(0, Math.min(MAX_SEED, Math.floor(Number(event.target.value) || 0)));
  event.target.value = String(seed);
  sendParams({ seed });
});
$("#new-seed").addEventListener("click", () => sendParams({ seed: randomSeed() }));

function randomSeed() {
  const seed = crypto.getRandomValues(new Uint32Array(1))[0];
  $("#seed").value = String(seed);
  return seed;
}

$("#resolution").addEventListener("change", (event) => {
  state.resolution = Number(event.target.value);
  doc.resize(state.resolution, state.resolution);
  mask.resize(state.resolution, state.resolution);
  $("#clear-mask").hidden = true;
  connection.restart(); // the size is part of hello
});
$("#quality").addEventListener("change", (event) => {
  state.quality = Number(event.target.value);
  connection.restart(); // so is the frame quality
});

$("#save").addEventListener("click", async () => {
  const output = $("#output");
  if (!output.src) return;
  const canvas = makeCanvas(output.naturalWidth, output.naturalHeight);
  canvas.getContext("2d").drawImage(output, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `streamcanvas-${Date.now()}.png`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
});

$("#record").addEventListener("click", () => {
  const recording = $("#record").getAttribute("aria-pressed") === "true";
  connection.sendControl((seq) => recordMessage(seq, recording ? "stop" : "start"));
});
connection.addEventListener("recording", (event) => {
  const recording = event.detail;
  const started = recording.state === "started";
  $("#record").setAttribute("aria-pressed", String(started));
  $("#record").textContent = started ? "Stop recording" : "Record";
  const ready = connection.ready;
  if (started) {
    // Where it will be if the session ends first (the server finishes and keeps it): for the link then.
    state.recording = {
      url: `/v1/sessions/${ready.session_id}/recordings/${recording.recording_id}.mp4`, token: ready.token, session: ready.session_id,
    };
  } else if (recording.url) {
    state.recording = null;
    showRecordingLink({ url: recording.url, token: ready.token, session: ready.session_id },
      `Download recording (${recording.frames} frames, ${recording.duration_s.toFixed(1)} s)`);
  } else {
    state.recording = null;
    showError({ code: "note", message: "Nothing was recorded: no frame came while recording." }, true);
  }
});

function withToken(url, token) {
  return `${url}?token=${encodeURIComponent(token)}`;
}

function showRecordingLink({ url, token, session }, text) {
  const link = $("#recording-link");
  link.href = withToken(url, token);
  link.dataset.url = url;
  link.dataset.session = session;
  link.textContent = text;
  link.hidden = false;
}

// A recording of this session is downloaded with a token asked for at the click; one of an earlier
// session (the connection dropped) keeps the token that session had.
$("#recording-link").addEventListener("click", async (event) => {
  const link = event.currentTarget;
  if (link.dataset.renewed === "yes" || link.dataset.session !== connection.ready?.session_id || !connection.isReady) {
    delete link.dataset.renewed;
    return;
  }
  event.preventDefault();
  const ready = await freshTokens();
  link.href = withToken(link.dataset.url, ready.token);
  link.dataset.renewed = "yes";
  link.click();
});

// A new session records nothing; a recording the old one was making ended with it, and is kept.
function endRecording() {
  $("#record").setAttribute("aria-pressed", "false");
  $("#record").textContent = "Record";
  if (state.recording) {
    showRecordingLink(state.recording, "Download recording (it ended when the connection did)");
    state.recording = null;
  }
}

$("#render-hd").addEventListener("click", async () => {
  const button = $("#render-hd");
  const status = $("#render-hd-status");
  button.disabled = true;
  try {
    const ready = await freshTokens();
    if (!ready) throw new Error("not connected to the server; try again once the page is live");
    const { job, url } = await renderFullQuality({
      sessionId: ready.session_id,
      token: ready.token,
      apiKey: query.get("key") || undefined,
      mask: mask.painted ? mask.toBase64() : null,
      onProgress: (progress) => { status.textContent = describeProgress(progress); },
    });
    const link = $("#render-hd-link");
    if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
    link.href = url;
    link.download = `streamcanvas-${job.id}.png`;
    link.textContent = `Download full-quality render (${job.params.width}×${job.params.height}, seed ${job.params.seed})`;
    link.hidden = false;
    status.textContent = "Done";
  } catch (error) {
    status.textContent = "";
    showError({ code: "render_failed", message: `Full-quality render: ${error.message}` });
  } finally {
    button.disabled = false;
  }
});

$("#viewer-link").addEventListener("click", async () => {
  const field = $("#viewer-url");
  await freshTokens(); // the field now holds a link that lasts the whole token lifetime
  try {
    await navigator.clipboard.writeText(field.value);
    showError({ code: "note", message: "Viewer link copied. In OBS: Sources → Browser, paste it as the URL." }, true);
  } catch {
    field.select(); // no clipboard access (e.g. plain http on another host): select it for Ctrl+C
  }
});

// ---- live controls: styles, LoRAs, ControlNets and the rest of what the server offers ---------------

async function loadOffer() {
  const [info, styles, models] = await Promise.all([
    fetch("/v1/info").then((response) => response.json()),
    fetch("/v1/styles").then((response) => response.json()),
    fetch("/v1/models").then((response) => response.json()),
  ]);
  for (const style of styles.styles) {
    const option = new Option(style.name, style.name);
    option.title = style.description;
    $("#style").append(option);
    state.styles[style.name] = style.fields;
  }
  for (const model of models.models) {
    state.models[model.id] = {
      loras: model.loras.names,
      controlnets: model.controlnets.map((controlnet) => controlnet.name),
      depth: Boolean(model.depth_model),
    };
    if (model.default) state.defaultModel = model.id;
  }
  for (const name of info.model.loras.names) {
    const label = document.createElement("label");
    label.dataset.loraLabel = name;
    label.textContent = `LoRA ${name} `;
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: "0", max: "1.5", step: "0.05", value: "0" });
    slider.dataset.lora = name;
    const value = document.createElement("output");
    value.dataset.loraValue = name;
    value.textContent = "0.00";
    slider.addEventListener("input", () => { value.textContent = Number(slider.value).toFixed(2); });
    slider.addEventListener("change", () => sendParams({ loras: loraWeights() }));
    label.append(slider, " ", value);
    $("#loras").append(label);
  }
  for (const controlnet of info.model.controlnets) $("#controlnet").append(new Option(controlnet.name, controlnet.name));
  if (info.model.depth_model) $("#preprocessor").append(new Option("depth", "depth"));
  for (const model of models.models) {
    const label = model.toy_model ? `${model.id} (${model.toy_model} toy model)` : model.id;
    $("#model").append(new Option(label, model.id, model.default, model.default));
  }
  $("#model").disabled = models.models.length < 2;
  // The session size: the server's own unless the address asks for one it takes; none above its maximum.
  const [maxWidth, maxHeight] = String(info.max_resolution).split("x").map(Number);
  const limit = Math.min(maxWidth, maxHeight);
  let side = Math.min(info.resolution.width, info.resolution.height);
  if (askedResolution > 0 && askedResolution <= limit) {
    side = askedResolution;
  } else if (askedResolution !== null) {
    const message = `?resolution=${query.get("resolution")} is not a size this server takes (a multiple of 8, 64 … ${limit}): using ${side}.`;
    showError({ code: "note", message }, true);
  }
  if (![...$("#resolution").options].some((option) => Number(option.value) === side)) {
    $("#resolution").append(new Option(String(side), String(side)));
  }
  for (const option of $("#resolution").options) option.disabled = Number(option.value) > limit;
  $("#resolution").value = String(side);
  if (side !== state.resolution) {
    state.resolution = side;
    doc.resize(side, side);
    mask.resize(side, side);
  }
}

// LoRAs and ControlNets load on the default model only: the controls offer what the session's model has.
function offerControlsOf(modelId) {
  const offer = state.models[modelId];
  if (!offer) return;
  for (const label of document.querySelectorAll("[data-lora-label]")) label.hidden = !offer.loras.includes(label.dataset.loraLabel);
  for (const option of $("#controlnet").options) option.disabled = option.value !== "" && !offer.controlnets.includes(option.value);
  for (const option of $("#preprocessor").options) option.disabled = option.value === "depth" && !offer.depth;
}

$("#model").addEventListener("change", (event) => {
  state.model = event.target.value;
  connection.restart(); // the model is part of hello
});

function loraWeights() {
  const weights = {};
  for (const slider of document.querySelectorAll("[data-lora]")) {
    if (Number(slider.value) !== 0) weights[slider.dataset.lora] = Number(slider.value);
  }
  return weights;
}

function controls() {
  const model = $("#controlnet").value;
  if (!model) return [];
  const lines = Boolean(doc.controlLayer);
  return [{
    model,
    scale: Number($("#control-scale").value),
    preprocessor: lines ? "none" : $("#preprocessor").value,
    source: lines ? "layer" : "canvas",
  }];
}

$("#style").addEventListener("change", (event) => sendParams({ style: event.target.value }));

// The controls show the session's parameters (the ones this page has a control for).
function showParams(params) {
  const set = (selector, value) => { if (value !== undefined && value !== null) $(selector).value = String(value); };
  set("#strength", params.strength);
  if (params.strength !== undefined) $("#strength-value").textContent = Number(params.strength).toFixed(2);
  set("#guidance", params.guidance_scale);
  if (params.guidance_scale !== undefined) $("#guidance-value").textContent = Number(params.guidance_scale).toFixed(1);
  set("#negative-prompt", params.negative_prompt);
  set("#cfg-type", params.cfg_type);
  set("#transition", params.transition_frames);
  set("#steps", params.steps);
  set("#seed", params.seed);
  set("#style", params.style);
  if (typeof params.prompt === "string" && document.activeElement !== $("#prompt") && !state.promptPending) $("#prompt").value = params.prompt;
  if (params.similar_filter !== undefined) $("#similar-filter").checked = Boolean(params.similar_filter);
  if (params.loras) {
    for (const slider of document.querySelectorAll("[data-lora]")) {
      slider.value = String(params.loras[slider.dataset.lora] || 0);
      document.querySelector(`[data-lora-value="${slider.dataset.lora}"]`).textContent = Number(slider.value).toFixed(2);
    }
  }
  if (Array.isArray(params.controls)) {
    const control = params.controls[0];
    $("#controlnet").value = control ? control.model : "";
    if (control) {
      $("#control-scale").value = String(control.scale);
      $("#control-scale-value").textContent = Number(control.scale).toFixed(2);
      if (control.source !== "layer") $("#preprocessor").value = control.preprocessor;
    }
  }
}
$("#negative-prompt").addEventListener("change", (event) => sendParams({ negative_prompt: event.target.value }));
$("#guidance").addEventListener("input", (event) => { $("#guidance-value").textContent = Number(event.target.value).toFixed(1); });
$("#guidance").addEventListener("change", (event) => sendParams({ guidance_scale: Number(event.target.value) }));
$("#cfg-type").addEventListener("change", (event) => sendParams({ cfg_type: event.target.value }));
$("#similar-filter").addEventListener("change", (event) => sendParams({ similar_filter: event.target.checked }));
$("#transition").addEventListener("change", (event) => {
  const frames = Math.max(0, Math.min(240, Math.floor(Number(event.target.value) || 0)));
  event.target.value = String(frames);
  sendParams({ transition_frames: frames });
});
$("#control-scale").addEventListener("input", (event) => { $("#control-scale-value").textContent = Number(event.target.value).toFixed(2); });
for (const id of ["#controlnet", "#control-scale", "#preprocessor"]) {
  $(id).addEventListener("change", () => sendParams({ controls: controls() }));
}
$("#lines-as-control").addEventListener("change", (event) => {
  if (event.target.checked) {
    // Strokes on the background would take the paper with them: lines get a layer of their own.
    doc.setControlLayer(doc.active === doc.paper ? doc.addLayer("Lines") : doc.active);
    state.linesLayer = doc.controlLayer;
  } else {
    state.linesLayer = null;
    doc.setControlLayer(null);
  }
  state.needFull = true;
  sendParams({ controls: controls() });
});

// ---- sources and images --------------------------------------------------------------------------

for (const kind of ["camera", "screen"]) {
  $(`#${kind}`).addEventListener("click", async () => {
    await sources.toggle(kind);
  });
}
doc.addEventListener("change", (event) => {
  for (const kind of ["camera", "screen"]) $(`#${kind}`).setAttribute("aria-pressed", String(sources.isOn(kind)));
  if (event.detail.kind !== "opacity") renderLayers(); // rebuilt, it would drop a slider from under the pointer
  $("#undo").disabled = doc.undoStack.length === 0;
  $("#redo").disabled = doc.redoStack.length === 0;
  if (state.linesLayer && !doc.controlLayer) {
    state.linesLayer = null; // its layer was removed: the lines no longer steer the frames
    $("#lines-as-control").checked = false;
    state.needFull = true;
    sendParams({ controls: controls() });
  }
});

async function loadImageFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError({ code: "canvas", message: "That file is not an image." }, true);
    return;
  }
  try {
    const bitmap = await createImageBitmap(file);
    doc.drawImageOnActive(bitmap);
    bitmap.close();
  } catch (error) {
    showError({ code: "canvas", message: `Could not read ${file.name}: ${error.message}` }, true);
  }
}
$("#image-file").addEventListener("change", (event) => {
  loadImageFile(event.target.files[0]);
  event.target.value = "";
});
const stage = view.parentElement;
stage.addEventListener("dragover", (event) => { event.preventDefault(); stage.classList.add("dropping"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dropping"));
stage.addEventListener("drop", (event) => {
  event.preventDefault();
  stage.classList.remove("dropping");
  loadImageFile(event.dataTransfer.files[0]);
});

// ---- layers panel --------------------------------------------------------------------------------

function renderLayers() {
  const list = $("#layers");
  list.replaceChildren();
  for (const layer of [...doc.layers].reverse()) {
    const item = document.createElement("li");
    item.dataset.layerId = String(layer.id);
    if (layer === doc.active) item.classList.add("active");
    const visible = document.createElement("input");
    visible.type = "checkbox";
    visible.checked = layer.visible;
    visible.title = "Visible";
    visible.addEventListener("change", () => doc.setVisible(layer, visible.checked));
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = layer.kind === "paint" ? layer.name : `${layer.name} (live)`;
    if (layer === doc.controlLayer) name.textContent += " (control)";
    const opacity = document.createElement("input");
    opacity.type = "range";
    opacity.min = "0";
    opacity.max = "100";
    opacity.value = String(Math.round(layer.opacity * 100));
    opacity.title = "Layer opacity";
    opacity.addEventListener("input", () => doc.setOpacity(layer, Number(opacity.value) / 100));
    item.append(visible, name, opacity);
    item.addEventListener("click", (event) => {
      if (event.target === item || event.target === name) doc.select(layer);
    });
    list.append(item);
  }
}
$("#add-layer").addEventListener("click", () => doc.addLayer());
$("#remove-layer").addEventListener("click", () => doc.active && doc.removeLayer(doc.active));
$("#layer-up").addEventListener("click", () => doc.active && doc.moveLayer(doc.active, 1));
$("#layer-down").addEventListener("click", () => doc.active && doc.moveLayer(doc.active, -1));

// ---- keyboard ------------------------------------------------------------------------------------

const TOOL_KEYS = { b: "brush", e: "eraser", l: "line", r: "rect", o: "ellipse", f: "fill", i: "picker", m: "mask" };
document.addEventListener("keydown", (event) => {
  const typing = event.target.matches("textarea, input[type=number], input[type=text], select");
  if (typing) return;
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && key === "z") {
    event.preventDefault();
    if (event.shiftKey) doc.redo();
    else doc.undo();
  } else if ((event.ctrlKey || event.metaKey) && key === "y") {
    event.preventDefault();
    doc.redo();
  } else if (!event.ctrlKey && !event.metaKey && !event.altKey && TOOL_KEYS[key]) {
    selectTool(TOOL_KEYS[key]);
  } else if (key === "[" || key === "]") {
    state.size = Math.max(1, Math.min(96, state.size + (key === "]" ? 4 : -4)));
    $("#size").value = String(state.size);
  } else if (key === "delete") {
    doc.clearActive();
  }
});

// Keep the session while the page is in view, pinging well within the server's idle timeout; a hidden
// tab may idle out, and then waits (paused) to reconnect until it is shown again.
let lastPing = performance.now();
setInterval(() => {
  const idleMs = (connection.ready?.limits?.idle_timeout_s || Infinity) * 1000;
  const every = Math.min(PING_INTERVAL_MS, idleMs / 3);
  if (document.visibilityState === "visible" && connection.isReady && performance.now() - lastPing >= every) {
    connection.ping();
    lastPing = performance.now();
  }
}, 500);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && ["waiting", "paused"].includes(connection.state)) connection.restart();
});

// A handle for people debugging in the console (and for the browser tests).
window.streamcanvas = {
  doc,
  connection,
  state,
  sources,
  // True once everything drawn has been sent and the newest frame fully shows the newest input.
  settled() {
    const answered = Number($("#output").dataset.inputSeq || 0) >= state.lastInputSeq;
    const pending = doc.dirty || state.sending || state.needFull || state.promptPending;
    return connection.isReady && !pending && state.lastInputSeq > 0 && answered;
  },
};

renderLayers();
selectTool("brush");
$("#undo").disabled = true; // nothing drawn yet
$("#redo").disabled = true;
// What the server offers decides the first hello (its size, what each model takes): read it first.
loadOffer()
  .catch((error) => showError({ code: "client", message: `Could not read what the server offers: ${error.message}` }))
  .finally(() => connection.open());
requestAnimationFrame(loop);
