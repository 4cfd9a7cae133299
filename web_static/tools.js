// Drawing tools driven by pointer events (mouse, pen and touch alike).
import { makeCanvas, unionRect } from "./document.js";

export const TOOLS = ["brush", "eraser", "line", "rect", "ellipse", "fill", "picker", "mask"];

function hexToRgb(hex) {
  const value = parseInt(hex.slice(1), 16);
  return [(value >> 16) & 255, (value >> 8) & 255, value & 255];
}

export function rgbToHex([r, g, b]) {
  return "#" + [r, g, b].map((c) => c.toString(16).padStart(2, "0")).join("");
}

export class ToolController {
  constructor(doc, view, settings, mask) {
    this.doc = doc;
    this.mask = mask; // the inpainting mask (mask.js): the Mask tool paints there, not on a layer
    this.view = view;
    this.settings = settings; // { tool, color, size, opacity } read live
    this.edit = null;
    this.points = [];
    this.stroke = null; // full-size scratch canvas: the whole stroke at full opacity
    this.pointerId = null;
    view.addEventListener("pointerdown", (event) => this.down(event));
    view.addEventListener("pointermove", (event) => this.move(event));
    view.addEventListener("pointerup", (event) => this.up(event));
    view.addEventListener("pointercancel", (event) => this.up(event));
  }

  position(event) {
    const box = this.view.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) / box.width) * this.doc.width,
      y: ((event.clientY - box.top) / box.height) * this.doc.height,
    };
  }

  down(event) {
    if (this.pointerId !== null || event.button > 0) return;
    const point = this.position(event);
    const tool = this.settings.tool;
    if (tool === "picker") {
      this.settings.pickColor(rgbToHex(this.doc.pixelAt(point.x, point.y)));
      return;
    }
    if (tool === "mask") {
      this.capture(event);
      this.points = [point];
      this.mask.stroke(this.points, this.settings.size);
      return;
    }
    if (!this.doc.active || !this.doc.active.visible) {
      this.settings.notify("The active layer is hidden or missing; pick a visible paint layer first.");
      return;
    }
    if (tool === "fill") {
      this.fill(point);
      return;
    }
    this.capture(event);
    this.edit = this.doc.beginEdit();
    this.stroke = makeCanvas(this.doc.width, this.doc.height);
    this.points = [point];
    this.redraw();
  }

  capture(event) {
    event.preventDefault();
    try {
      this.view.setPointerCapture(event.pointerId); // keep the stroke when the pointer leaves the canvas
    } catch {
      // not a live pointer (a synthetic event): the stroke still works while over the canvas
    }
    this.pointerId = event.pointerId;
  }

  move(event) {
    if (event.pointerId !== this.pointerId) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const item of events.length ? events : [event]) {
      this.points.push(this.position(item));
      if (!this.edit) this.mask.stroke(this.points, this.settings.size);
    }
    if (this.edit) this.redraw();
  }

  up(event) {
    if (event.pointerId !== this.pointerId) return;
    this.pointerId = null;
    if (!this.edit) return; // a mask stroke: nothing to commit to the layers' history
    this.redraw();
    this.doc.commitEdit(this.edit);
    this.edit = null;
    this.stroke = null;
  }

  // Re-draw the whole stroke (or shape) over the layer as it was: opacity does not pile up where the
  // stroke crosses itself, and shapes follow the pointer.
  redraw() {
    const { tool, color, size, opacity } = this.settings;
    const context = this.stroke.getContext("2d");
    context.clearRect(0, 0, this.stroke.width, this.stroke.height);
    context.strokeStyle = color;
    context.fillStyle = color;
    context.lineWidth = size;
    context.lineCap = "round";
    context.lineJoin = "round";
    const first = this.points[0];
    const last = this.points.at(-1);
    context.beginPath();
    if (tool === "brush" || tool === "eraser") {
      if (this.points.length === 1) {
        context.arc(first.x, first.y, size / 2, 0, Math.PI * 2);
        context.fill();
      } else {
        context.moveTo(first.x, first.y);
        for (const point of this.points.slice(1)) context.lineTo(point.x, point.y);
        context.stroke();
      }
    } else if (tool === "line") {
      context.moveTo(first.x, first.y);
      context.lineTo(last.x, last.y);
      context.stroke();
    } else if (tool === "rect") {
      context.strokeRect(first.x, first.y, last.x - first.x, last.y - first.y);
    } else if (tool === "ellipse") {
      const rx = Math.abs(last.x - first.x) / 2;
      const ry = Math.abs(last.y - first.y) / 2;
      context.ellipse((first.x + last.x) / 2, (first.y + last.y) / 2, rx, ry, 0, 0, Math.PI * 2);
      context.stroke();
    }
    const xs = this.points.map((point) => point.x);
    const ys = this.points.map((point) => point.y);
    const pad = size / 2 + 2;
    const rect = {
      x: Math.min(...xs) - pad,
      y: Math.min(...ys) - pad,
      w: Math.max(...xs) - Math.min(...xs) + 2 * pad,
      h: Math.max(...ys) - Math.min(...ys) + 2 * pad,
    };
    // The area to refresh covers where the shape was drawn before this move too.
    const previous = this.edit.rect;
    this.doc.restoreBefore(this.edit);
    const layer = this.edit.layer.context;
    layer.save();
    layer.globalAlpha = tool === "eraser" ? 1 : opacity;
    layer.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
    layer.drawImage(this.stroke, 0, 0);
    layer.restore();
    this.edit.rect = unionRect(previous, rect);
    this.doc.refresh(this.edit.rect);
  }

  fill(point) {
    const edit = this.doc.beginEdit();
    const { width, height } = this.doc;
    const image = edit.layer.context.getImageData(0, 0, width, height);
    const data = image.data;
    const startX = Math.floor(point.x);
    const startY = Math.floor(point.y);
    const start = (startY * width + startX) * 4;
    const target = [data[start], data[start + 1], data[start + 2], data[start + 3]];
    const [r, g, b] = hexToRgb(this.settings.color);
    const a = Math.round(this.settings.opacity * 255);
    if (target[0] === r && target[1] === g && target[2] === b && target[3] === a) return;
    const tolerance = 32;
    const matches = (offset) =>
      Math.abs(data[offset] - target[0]) <= tolerance &&
      Math.abs(data[offset + 1] - target[1]) <= tolerance &&
      Math.abs(data[offset + 2] - target[2]) <= tolerance &&
      Math.abs(data[offset + 3] - target[3]) <= tolerance;
    const seen = new Uint8Array(width * height);
    const stack = [startX, startY];
    let minX = startX, minY = startY, maxX = startX, maxY = startY;
    while (stack.length) {
      const y = stack.pop();
      let x = stack.pop();
      while (x >= 0 && !seen[y * width + x] && matches((y * width + x) * 4)) x -= 1;
      x += 1;
      let spanUp = false, spanDown = false;
      while (x < width && !seen[y * width + x] && matches((y * width + x) * 4)) {
        const offset = (y * width + x) * 4;
        seen[y * width + x] = 1;
        data[offset] = r; data[offset + 1] = g; data[offset + 2] = b; data[offset + 3] = a;
        minX = Math.min(minX, x); maxX = Math.max(maxX, x); minY = Math.min(minY, y); maxY = Math.max(maxY, y);
        for (const [ny, flag] of [[y - 1, "up"], [y + 1, "down"]]) {
          if (ny < 0 || ny >= height) continue;
          const inside = !seen[ny * width + x] && matches((ny * width + x) * 4);
          if (flag === "up") {
            if (inside && !spanUp) { stack.push(x, ny); spanUp = true; } else if (!inside) spanUp = false;
          } else {
            if (inside && !spanDown) { stack.push(x, ny); spanDown = true; } else if (!inside) spanDown = false;
          }
        }
        x += 1;
      }
    }
    edit.layer.context.putImageData(image, 0, 0);
    edit.rect = { x: minX, y: minY, w: maxX - minX + 1, h: maxY - minY + 1 };
    this.doc.commitEdit(edit);
    this.doc.refresh(edit.rect);
  }
}

