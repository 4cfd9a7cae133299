// Live input sources: a webcam or a captured screen/tab, each shown as a layer of the drawing.

const CAPTURE = {
  camera: () => navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 }, height: { ideal: 720 } }, audio: false }),
  screen: () => navigator.mediaDevices.getDisplayMedia({ video: true, audio: false }),
};

export class Sources {
  constructor(doc, notify) {
    this.doc = doc;
    this.notify = notify;
    this.active = new Map(); // kind → {layer, stream, video}
  }

  isOn(kind) {
    return this.active.has(kind);
  }

  async toggle(kind) {
    if (this.active.has(kind)) {
      this.stop(kind);
      return false;
    }
    let stream;
    try {
      stream = await CAPTURE[kind]();
    } catch (error) {
      this.notify(`Could not start the ${kind}: ${error.message || error.name}`);
      return false;
    }
    const video = document.createElement("video");
    video.muted = true;
    video.playsInline = true;
    video.srcObject = stream;
    await video.play().catch(() => undefined);
    const layer = this.doc.addLiveLayer(kind === "camera" ? "Camera" : "Screen", kind);
    layer.video = video;
    const track = stream.getVideoTracks()[0];
    track.addEventListener("ended", () => this.stop(kind)); // e.g. the browser's "stop sharing"
    this.active.set(kind, { layer, stream, video, label: track.label });
    this.doc.changed("sources");
    return true;
  }

  stop(kind) {
    const source = this.active.get(kind);
    if (!source) return;
    this.active.delete(kind);
    for (const track of source.stream.getTracks()) track.stop();
    source.video.srcObject = null;
    this.doc.removeLayer(source.layer);
    this.doc.changed("sources");
  }

  label(kind) {
    return this.active.get(kind)?.label || "";
  }
}
