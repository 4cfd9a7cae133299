// The drawing: layers composited onto the visible canvas, undo/redo, and the dirty rectangle that
// tells the sender which part of the canvas changed since it last sent.

const HISTORY_LIMIT = 40;

export function makeCanvas(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

export function unionRect(a, b) {
  if (!a) return b;
  if (!b) return a;
  const x = Math.min(a.x, b.x);
  const y = Math.min(a.y, b.y);
  return { x, y, w: Math.max(a.x + a.w, b.x + b.w) - x, h: Math.max(a.y + a.h, b.y + b.h) - y };
}

export function clampRect(rect, width, height) {
  const x = Math.max(0, Math.floor(rect.x));
  const y = Math.max(0, Math.floor(rect.y));
  const right = Math.min(width, Math.ceil(rect.x + rect.w));
  const bottom = Math.min(height, Math.ceil(rect.y + rect.h));
  if (right <= x || bottom <= y) return null;
  return { x, y, w: right - x, h: bottom - y };
}

let nextLayerId = 1;

export class Layer {
  constructor(width, height, { name, kind = "paint" } = {}) {
    this.id = nextLayerId++;
    this.name = name || `Layer ${this.id}`;
    this.kind = kind; // "paint" | "camera" | "screen"
    this.canvas = makeCanvas(width, height);
    this.context = this.canvas.getContext("2d", { willReadFrequently: true });
    this.visible = true;
    this.opacity = 1;
    this.video = null; // live sources draw their video here every frame
  }
}

export class CanvasDocument extends EventTarget {
  constructor(view, width, height) {
    super();
    this.view = view; // the visible <canvas>: the composite the server receives
    this.viewContext = view.getContext("2d", { willReadFrequently: true });
    this.width = width;
    this.height = height;
    this.layers = [];
    this.active = null;
    this.undoStack = [];
    this.redoStack = [];
    this.dirty = null;
    this.controlLayer = null; // a paint layer sent as the control image instead of as input
    this.beforeResize = null; // the layers and history as they were before the last resize, until an edit
    this.resizeView();
    const paper = this.addLayer("Background");
    paper.context.fillStyle = "#ffffff"; // white paper: layers moved below it are covered
    paper.context.fillRect(0, 0, width, height);
    this.paper = paper;
    this.compose();
  }

  resizeView() {
    this.view.width = this.width;
    this.view.height = this.height;
  }

  changed(kind) {
    this.dispatchEvent(new CustomEvent("change", { detail: { kind } }));
  }

  markDirty(rect) {
    const clamped = rect ? clampRect(rect, this.width, this.height) : { x: 0, y: 0, w: this.width, h: this.height };
    if (clamped) this.dirty = unionRect(this.dirty, clamped);
  }

  takeDirty() {
    const dirty = this.dirty;
    this.dirty = null;
    return dirty;
  }

  compose() {
    const context = this.viewContext;
    context.save();
    context.globalAlpha = 1;
    context.globalCompositeOperation = "source-over";
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, this.width, this.height);
    for (const layer of this.layers) {
      if (!layer.visible || layer.opacity <= 0) continue;
      context.globalAlpha = layer.opacity;
      context.drawImage(layer.canvas, 0, 0);
    }
    context.restore();
  }

  // The img2img input: every visible layer but the control layer, on white paper.
  composeInput() {
    const canvas = makeCanvas(this.width, this.height);
    const context = canvas.getContext("2d");
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, this.width, this.height);
    for (const layer of this.layers) {
      if (layer === this.controlLayer || !layer.visible || layer.opacity <= 0) continue;
      context.globalAlpha = layer.opacity;
      context.drawImage(layer.canvas, 0, 0);
    }
    return canvas;
  }

  // The control image: the control layer's strokes in white on black, as line ControlNets take them.
  composeControl() {
    const strokes = makeCanvas(this.width, this.height);
    const context = strokes.getContext("2d");
    if (this.controlLayer) context.drawImage(this.controlLayer.canvas, 0, 0);
    context.globalCompositeOperation = "source-in";
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, this.width, this.height);
    const canvas = makeCanvas(this.width, this.height);
    const target = canvas.getContext("2d");
    target.fillStyle = "#000000";
    target.fillRect(0, 0, this.width, this.height);
    target.drawImage(strokes, 0, 0);
    return canvas;
  }

  setControlLayer(layer) {
    this.controlLayer = layer && layer.kind === "paint" ? layer : null;
    this.afterStructureChange();
  }

  // ---- layers (structure changes are not in the undo history; pixel edits are) ----

  addLayer(name, kind = "paint") {
    const layer = new Layer(this.width, this.height, { name, kind });
    const index = this.active ? this.layers.indexOf(this.active) + 1 : this.layers.length;
    this.layers.splice(index, 0, layer);
    if (kind === "paint") this.active = layer;
    this.afterStructureChange();
    return layer;
  }

  // A live source (camera, screen) goes right above the paper, under every layer painted on: the
  // opaque paper would hide it, and strokes on the layers above go over the video. Strokes on the paper
  // itself would go under it, so if the paper is the active layer a new one above the source takes
  // the next strokes.
  addLiveLayer(name, kind) {
    const layer = new Layer(this.width, this.height, { name, kind });
    const above = this.layers.indexOf(this.paper) + 1; // 0 (the bottom) once the paper is removed
    this.layers.splice(above, 0, layer);
    if (this.active === this.paper) {
      this.active = new Layer(this.width, this.height, { name: "Drawing" });
      this.layers.splice(above + 1, 0, this.active);
    }
    this.afterStructureChange();
    return layer;
  }

  removeLayer(layer) {
    const index = this.layers.indexOf(layer);
    if (index < 0) return;
    if (layer.kind === "paint" && this.layers.filter((item) => item.kind === "paint").length === 1) return;
    this.layers.splice(index, 1);
    if (this.controlLayer === layer) this.controlLayer = null;
    this.undoStack = this.undoStack.filter((entry) => entry.layer !== layer);
    this.redoStack = this.redoStack.filter((entry) => entry.layer !== layer);
    if (this.active === layer) this.active = this.layers.filter((item) => item.kind === "paint").at(-1);
    this.afterStructureChange();
  }

  moveLayer(layer, step) {
    const index = this.layers.indexOf(layer);
    const target = index + step;
    if (index < 0 || target < 0 || target >= this.layers.length) return;
    this.layers.splice(index, 1);
    this.layers.splice(target, 0, layer);
    this.afterStructureChange();
  }

  setVisible(layer, visible) {
    layer.visible = visible;
    this.afterStructureChange();
  }

  setOpacity(layer, opacity) {
    layer.opacity = opacity;
    this.compose();
    this.markDirty(null);
    this.changed("opacity"); // the same layers: the list stays as it is, with the slider being dragged
  }

  select(layer) {
    if (layer.kind !== "paint") return;
    this.active = layer;
    this.changed("layers");
  }

  afterStructureChange() {
    this.beforeResize = null;
    this.compose();
    this.markDirty(null);
    this.changed("layers");
  }

  // ---- pixel edits ----

  // Begin an edit of the active layer; returns an object the tool updates and then commits.
  beginEdit(layer = this.active) {
    const before = layer.context.getImageData(0, 0, this.width, this.height);
    return { layer, before, rect: null };
  }

  restoreBefore(edit) {
    edit.layer.context.putImageData(edit.before, 0, 0);
  }

  commitEdit(edit) {
    const rect = edit.rect && clampRect(edit.rect, this.width, this.height);
    if (!rect) return;
    const scratch = makeCanvas(this.width, this.height).getContext("2d");
    scratch.putImageData(edit.before, 0, 0);
    const before = scratch.getImageData(rect.x, rect.y, rect.w, rect.h);
    const after = edit.layer.context.getImageData(rect.x, rect.y, rect.w, rect.h);
    this.undoStack.push({ layer: edit.layer, rect, before, after });
    if (this.undoStack.length > HISTORY_LIMIT) this.undoStack.shift();
    this.redoStack = [];
    this.beforeResize = null; // drawn on at this size: going back scales what is here now
    this.changed("history");
  }

  undo() {
    const entry = this.undoStack.pop();
    if (!entry) return false;
    entry.layer.context.putImageData(entry.before, entry.rect.x, entry.rect.y);
    this.redoStack.push(entry);
    this.refresh(entry.rect);
    this.changed("history");
    return true;
  }

  redo() {
    const entry = this.redoStack.pop();
    if (!entry) return false;
    entry.layer.context.putImageData(entry.after, entry.rect.x, entry.rect.y);
    this.undoStack.push(entry);
    this.refresh(entry.rect);
    this.changed("history");
    return true;
  }

  refresh(rect) {
    this.compose();
    this.markDirty(rect);
  }

  clearActive() {
    const edit = this.beginEdit();
    edit.layer.context.clearRect(0, 0, this.width, this.height);
    edit.rect = { x: 0, y: 0, w: this.width, h: this.height };
    this.commitEdit(edit);
    this.refresh(edit.rect);
  }

  drawImageOnActive(image) {
    const edit = this.beginEdit();
    const scale = Math.max(this.width / image.width, this.height / image.height); // cover the canvas
    const w = image.width * scale;
    const h = image.height * scale;
    edit.layer.context.drawImage(image, (this.width - w) / 2, (this.height - h) / 2, w, h);
    edit.rect = { x: 0, y: 0, w: this.width, h: this.height };
    this.commitEdit(edit);
    this.refresh(edit.rect);
  }

  // Live sources: copy the current video frame into each visible camera/screen layer.
  drawLiveSources() {
    let drew = false;
    for (const layer of this.layers) {
      const video = layer.video;
      if (!video || !layer.visible || video.readyState < 2 || !video.videoWidth) continue;
      const scale = Math.max(this.width / video.videoWidth, this.height / video.videoHeight);
      const w = video.videoWidth * scale;
      const h = video.videoHeight * scale;
      layer.context.clearRect(0, 0, this.width, this.height);
      layer.context.drawImage(video, (this.width - w) / 2, (this.height - h) / 2, w, h);
      drew = true;
    }
    if (drew) this.refresh(null);
    return drew;
  }

  hasLiveSource() {
    return this.layers.some((layer) => layer.video && layer.visible);
  }

  // New resolution: every layer is scaled; history is dropped (its rectangles no longer fit). Going back
  // to the size before, with nothing drawn in between, brings the layers and history back as they were
  // instead of scaling twice (which blurred every stroke for good).
  resize(width, height) {
    if (width === this.width && height === this.height) return;
    const back = this.beforeResize;
    const restore = back && back.width === width && back.height === height && this.layers.every((layer) => back.canvases.has(layer));
    this.beforeResize = {
      width: this.width,
      height: this.height,
      canvases: new Map(this.layers.map((layer) => [layer, layer.canvas])),
      undoStack: this.undoStack,
      redoStack: this.redoStack,
    };
    for (const layer of this.layers) {
      const old = layer.canvas;
      layer.canvas = restore ? back.canvases.get(layer) : makeCanvas(width, height);
      layer.context = layer.canvas.getContext("2d", { willReadFrequently: true });
      if (!restore) layer.context.drawImage(old, 0, 0, width, height);
    }
    this.width = width;
    this.height = height;
    this.undoStack = restore ? back.undoStack : [];
    this.redoStack = restore ? back.redoStack : [];
    this.resizeView();
    this.refresh(null);
    this.changed("history");
  }

  pixelAt(x, y) {
    const data = this.viewContext.getImageData(Math.floor(x), Math.floor(y), 1, 1).data;
    return [data[0], data[1], data[2]];
  }
}
