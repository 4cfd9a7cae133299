// One WebSocket session with the server: states, automatic reconnection with backoff, and pacing
// (a bounded number of inputs in flight, released by the frames that answer them).
import { hello, pack, unpack, pingMessage, renewTokensMessage } from "./protocol.js";

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
const MAX_IN_FLIGHT = 2; // two keep the server's stream batch busy without building a backlog
const IN_FLIGHT_TIMEOUT_MS = 3000; // an input the server skipped (similar-frame filter) must not stall us
const RENEW_TIMEOUT_MS = 5000;
// A hello refused with one of these would be refused again as it is: the connection does not retry it
// by itself but reports "refused", and the page changes the hello (or the person does).
const REFUSALS = new Set(["invalid_field", "invalid_value", "unknown_name", "unsupported_image_format", "unsupported_version", "unauthorized"]);

export class Connection extends EventTarget {
  constructor({ url, helloFields, holdAfterIdle = () => false }) {
    super();
    this.url = url;
    this.helloFields = helloFields; // () => fields for hello, read at every (re)connect
    // () => true while a session the server ended for idling should not be opened again by itself
    // (a hidden tab): the connection is then "paused" until `restart()`.
    this.holdAfterIdle = holdAfterIdle;
    this.idledOut = false;
    // The last session and its newest control token: every reconnect resumes it (hello.resume), so
    // its id, and the viewer links made for it, stay the same.
    this.resume = null;
    this.state = "idle";
    this.socket = null;
    this.seq = 0;
    this.inFlight = []; // [{seq, sentAt}]
    this.attempt = 0;
    this.retryTimer = null;
    this.closedByUs = false;
    this.ready = null;
    this.refusal = null; // the error that refused this connection's hello
    this.full = null; // the server's `busy` without a place in line: it closes, and says when to come back
  }

  setState(state, detail = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }

  nextSeq() {
    this.seq += 1;
    return this.seq;
  }

  open() {
    this.closedByUs = false;
    this.refusal = null;
    this.full = null;
    this.idledOut = false;
    this.ready = null; // the session of a socket being replaced is over for this connection
    clearTimeout(this.retryTimer);
    this.setState(this.attempt ? "reconnecting" : "connecting");
    const socket = new WebSocket(this.url);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("open", () => {
      if (socket !== this.socket) return;
      socket.send(pack(hello({ ...this.helloFields(), resume: this.resume, seq: this.nextSeq() })));
    });
    socket.addEventListener("message", (event) => {
      if (socket !== this.socket) return;
      if (!(event.data instanceof ArrayBuffer)) return;
      let message;
      try {
        message = unpack(event.data);
      } catch (error) {
        this.dispatchEvent(new CustomEvent("error-message", { detail: { code: "client", message: String(error) } }));
        return;
      }
      this.receive(message);
    });
    socket.addEventListener("close", (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.inFlight = [];
      this.ready = null;
      if (this.closedByUs) {
        this.setState("closed");
        return;
      }
      if (this.refusal) {
        this.attempt = 0;
        this.setState("refused", { error: this.refusal });
        return;
      }
      if (this.idledOut && this.holdAfterIdle()) {
        this.attempt = 0;
        this.setState("paused");
        return;
      }
      if (this.full) {
        // Full up, no room in line: come back when the server said, still showing why.
        const delay = Math.max(this.full.retry_after_s || 0, BACKOFF_MS[0] / 1000) * 1000;
        this.setState("busy", { position: null, retryAfter: delay / 1000 });
        this.retryTimer = setTimeout(() => this.open(), delay);
        return;
      }
      this.scheduleReconnect(event.code);
    });
  }

  scheduleReconnect(code) {
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this.setState("waiting", { retryInMs: delay, closeCode: code });
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  // Close and open again at once (new resolution or quality: they are fixed by hello).
  restart() {
    this.attempt = 0;
    if (this.socket) {
      const old = this.socket;
      this.socket = null;
      old.close(1000);
    }
    this.open();
  }

  close() {
    this.closedByUs = true;
    clearTimeout(this.retryTimer);
    if (this.socket) this.socket.close(1000);
  }

  receive(message) {
    switch (message.type) {
      case "ready":
        this.attempt = 0;
        this.ready = message;
        this.resume = { session_id: message.session_id, token: message.token };
        this.inFlight = [];
        this.setState("ready", { ready: message });
        break;
      case "busy":
        this.full = message.queue_position ? null : message;
        this.setState("busy", { position: message.queue_position, retryAfter: message.retry_after_s });
        break;
      case "frame":
        if (message.input_seq !== null && message.input_seq !== undefined) {
          this.inFlight = this.inFlight.filter((item) => item.seq > message.input_seq);
        }
        this.dispatchEvent(new CustomEvent("frame", { detail: message }));
        break;
      case "stats":
        this.dispatchEvent(new CustomEvent("stats", { detail: message }));
        break;
      case "error":
        this.dispatchEvent(new CustomEvent("error-message", { detail: message }));
        if (message.fatal && this.ready === null && REFUSALS.has(message.code)) this.refusal = message;
        if (message.fatal && message.code === "idle_timeout") this.idledOut = true;
        if (message.fatal && message.code === "replaced") this.refusal = message; // it goes on elsewhere: no retry
        if (message.fatal) this.setState("error", { error: message });
        break;
      case "recording":
        this.dispatchEvent(new CustomEvent("recording", { detail: message }));
        break;
      case "tokens":
        if (this.ready) Object.assign(this.ready, { token: message.token, viewer_token: message.viewer_token });
        if (this.ready) this.resume = { session_id: this.ready.session_id, token: message.token };
        this.dispatchEvent(new CustomEvent("tokens", { detail: message }));
        break;
      case "pong":
        break;
      default:
        this.dispatchEvent(
          new CustomEvent("error-message", { detail: { code: "client", message: `unknown message ${message.type}` } }),
        );
    }
  }

  get isReady() {
    return this.state === "ready" && this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  // May an input be sent now? Frames release inputs; old ones time out.
  canSendInput() {
    if (!this.isReady) return false;
    const now = performance.now();
    this.inFlight = this.inFlight.filter((item) => now - item.sentAt < IN_FLIGHT_TIMEOUT_MS);
    return this.inFlight.length < MAX_IN_FLIGHT;
  }

  sendInput(build) {
    const seq = this.nextSeq();
    this.socket.send(pack(build(seq)));
    this.inFlight.push({ seq, sentAt: performance.now() });
    return seq;
  }

  sendControl(build) {
    if (!this.isReady) return null;
    const seq = this.nextSeq();
    this.socket.send(pack(build(seq)));
    return seq;
  }

  ping() {
    return this.sendControl((seq) => pingMessage(seq));
  }

  // New tokens for this session (renew_tokens → tokens; `ready` then holds them): a link made with
  // them lasts the server's whole token lifetime, however long the session has been open.
  renewTokens() {
    return new Promise((resolve, reject) => {
      const seq = this.sendControl((next) => renewTokensMessage(next));
      if (seq === null) {
        reject(new Error("not connected"));
        return;
      }
      const finish = (settle, value) => {
        clearTimeout(timer);
        this.removeEventListener("tokens", onTokens);
        this.removeEventListener("error-message", onError);
        this.removeEventListener("state", onState);
        settle(value);
      };
      const onTokens = (event) => { if (event.detail.ref_seq === seq) finish(resolve, event.detail); };
      const onError = (event) => { if (event.detail.ref_seq === seq) finish(reject, new Error(event.detail.message)); };
      const onState = (event) => { if (event.detail.state !== "ready") finish(reject, new Error("the connection dropped")); };
      const timer = setTimeout(() => finish(reject, new Error("no answer from the server")), RENEW_TIMEOUT_MS);
      this.addEventListener("tokens", onTokens);
      this.addEventListener("error-message", onError);
      this.addEventListener("state", onState);
    });
  }
}
