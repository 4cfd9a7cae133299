// The inpainting mask: where "Render full quality" repaints. Painted with the Mask tool on a canvas of
// its own (never part of the picture sent to the live stream), shown as a red tint over the drawing.
import { makeCanvas } from "./document.js";

export class MaskLayer {
  constructor(overlay, width, height) {
    this.overlay = overlay; // the <canvas> stacked over the drawing, for display only
    this.resize(width, height);
  }

  resize(width, height) {
    this.mask = makeCanvas(width, height); // white where painted, transparent elsewhere
    this.overlay.width = width;
    this.overlay.height = height;
    this.painted = false;
    this.show();
  }

  // Draw the newest segment of a stroke (the whole stroke is the union of its segments).
  stroke(points, size) {
    const context = this.mask.getContext("2d");
    context.strokeStyle = context.fillStyle = "#fff";
    context.lineWidth = size;
    context.lineCap = context.lineJoin = "round";
    const last = points.at(-1);
    const before = points.at(-2) || last;
    context.beginPath();
    if (before === last) {
      context.arc(last.x, last.y, size / 2, 0, Math.PI * 2);
      context.fill();
    } else {
      context.moveTo(before.x, before.y);
      context.lineTo(last.x, last.y);
      context.stroke();
    }
    this.painted = true;
    this.show();
  }

  clear() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
    this.show();
  }

  show() {
    const context = this.overlay.getContext("2d");
    context.clearRect(0, 0, this.overlay.width, this.overlay.height);
    context.globalCompositeOperation = "source-over";
    context.drawImage(this.mask, 0, 0);
    context.globalCompositeOperation = "source-in";
    context.fillStyle = "rgba(255, 40, 40, 0.45)";
    context.fillRect(0, 0, this.overlay.width, this.overlay.height);
    context.globalCompositeOperation = "source-over";
  }

  // The mask as the batch API takes it: a base64 PNG, white where to repaint on black.
  toBase64() {
    const flat = makeCanvas(this.mask.width, this.mask.height);
    const context = flat.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, flat.width, flat.height);
    context.drawImage(this.mask, 0, 0);
    return flat.toDataURL("image/png").split(",")[1];
  }
}
