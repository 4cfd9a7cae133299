// The streamcanvas wire protocol, version 1 (docs/protocol.md): MsgPack maps over a WebSocket.
import { encode, decode } from "/vendor/msgpack/index.mjs";

export const PROTOCOL_VERSIONS = [1];

export function pack(message) {
  return encode(message);
}

export function unpack(data) {
  const message = decode(new Uint8Array(data));
  if (message === null || typeof message !== "object" || typeof message.type !== "string") {
    throw new Error("the server sent something that is not a protocol message");
  }
  return message;
}

export function hello({ width, height, codec = "jpeg", quality, params, apiKey, model, resume, seq }) {
  const message = { type: "hello", protocol: PROTOCOL_VERSIONS, width, height, codec, quality, params, queue: true, seq };
  if (apiKey) message.api_key = apiKey;
  if (model) message.model = model;
  if (resume) message.resume = resume; // {session_id, token}: continue that session under its id
  return message;
}

// `layer`: "image" (the img2img input, the default) or "control" (the control layer ControlNets read).
export function canvasMessage(seq, format, bytes, layer = "image") {
  return { type: "canvas", seq, image: { format, data: bytes }, layer };
}

export function deltaMessage(seq, patches) {
  return {
    type: "delta",
    seq,
    patches: patches.map(({ x, y, format, bytes }) => ({ x, y, image: { format, data: bytes } })),
  };
}

export function paramsMessage(seq, changes) {
  return { type: "params", seq, changes };
}

export function pingMessage(seq) {
  return { type: "ping", seq, t: Date.now() / 1000 };
}

export function recordMessage(seq, action) {
  return { type: "record", seq, action };
}

export function renewTokensMessage(seq) {
  return { type: "renew_tokens", seq };
}
