// Webcam over WebRTC: camera track in, rendered track out, protocol messages on a data channel.
import { encode, decode } from "/vendor/msgpack/index.mjs";

const $ = (selector) => document.querySelector(selector);
const query = new URLSearchParams(location.search);
// ?resolution=N asks for an N×N session; without it the session has the server's own size.
const size = query.get("resolution") ? { width: Number(query.get("resolution")), height: Number(query.get("resolution")) } : {};
let channel = null;
let seq = 0;

function setStatus(state, text) {
  $("#status").dataset.state = state;
  $("#status").textContent = text;
}

function showError(text, code = "client") {
  const item = document.createElement("li");
  item.dataset.code = code;
  item.textContent = text;
  $("#errors").prepend(item);
}

function onMessage(event) {
  const message = decode(new Uint8Array(event.data));
  if (message.type === "stats") {
    $("#stat-fps").textContent = message.fps.toFixed(1);
    $("#stat-latency").textContent = `${Math.round(message.latency_ms.p50)} ms`;
    $("#stat-dropped").textContent = String(message.dropped_inputs + message.dropped_frames);
  } else if (message.type === "error") {
    showError(message.message, message.code);
  }
}

function countFrames(video) {
  const tick = () => {
    video.dataset.frames = String(Number(video.dataset.frames) + 1);
    video.requestVideoFrameCallback(tick);
  };
  video.requestVideoFrameCallback(tick);
}

async function start() {
  const camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  $("#local").srcObject = camera;
  // No ICE servers unless the page is told otherwise: nothing leaves the networks this machine is on.
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver(camera.getVideoTracks()[0], { direction: "sendrecv" });
  channel = pc.createDataChannel("control");
  channel.binaryType = "arraybuffer";
  channel.addEventListener("message", onMessage);
  pc.addEventListener("track", (event) => {
    const remote = $("#remote");
    remote.srcObject = new MediaStream([event.track]);
    countFrames(remote);
  });
  pc.addEventListener("connectionstatechange", () => {
    const state = pc.connectionState;
    if (state === "connected") setStatus("ready", "Live");
    else if (state === "failed" || state === "closed") setStatus("error", `Connection ${state}`);
  });
  // Leaving the page ends the session at once: the server would otherwise wait for ICE to time out
  // (about half a minute) before giving the slot back.
  window.addEventListener("pagehide", () => pc.close());
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== "complete") {
    await new Promise((resolve) =>
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve()),
    );
  }
  const response = await fetch("/v1/webrtc/offer", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      type: "offer",
      sdp: pc.localDescription.sdp,
      hello: { protocol: [1], ...size, params: { prompt: $("#prompt").value } },
    }),
  });
  const answer = await response.json();
  if (!response.ok) {
    setStatus("error", `Refused: ${answer.message}`);
    showError(answer.message, answer.error);
    return;
  }
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  window.streamcanvasWebrtc = { pc, sessionId: answer.session_id };
}

let promptTimer = null;
$("#prompt").addEventListener("input", (event) => {
  clearTimeout(promptTimer);
  promptTimer = setTimeout(() => {
    if (channel && channel.readyState === "open") {
      seq += 1;
      channel.send(encode({ type: "params", seq, changes: { prompt: event.target.value } }));
    }
  }, 250);
});

start().catch((error) => {
  setStatus("error", "Could not start");
  showError(String(error));
});
