// The OBS Browser Source page: shows one session's MJPEG stream and reconnects on its own.
// Address: /obs.html?session=SESSION_ID&token=VIEWER_TOKEN
//
// The stream is read with fetch() rather than handed to <img>: an <img> neither says when a
// multipart stream has ended nor when a part arrives, and this page must notice both to reconnect.
const query = new URLSearchParams(location.search);
const session = query.get("session");
const token = query.get("token");
const output = document.querySelector("#output");
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
const HEADER_END = new Uint8Array([13, 10, 13, 10]);

function indexOf(haystack, needle, from) {
  outer: for (let i = from; i <= haystack.length - needle.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

function concat(a, b) {
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a, 0);
  joined.set(b, a.length);
  return joined;
}

let shownUrl = null;
function show(jpeg) {
  const url = URL.createObjectURL(new Blob([jpeg], { type: "image/jpeg" }));
  output.src = url;
  if (shownUrl) URL.revokeObjectURL(shownUrl);
  shownUrl = url;
  output.dataset.frames = String(Number(output.dataset.frames || 0) + 1);
}

// Yield each part's body: headers up to a blank line, then Content-Length bytes.
async function* parts(body) {
  const reader = body.getReader();
  let buffer = new Uint8Array(0);
  while (true) {
    const end = indexOf(buffer, HEADER_END, 0);
    if (end >= 0) {
      const headers = new TextDecoder().decode(buffer.subarray(0, end));
      const match = /content-length:\s*(\d+)/i.exec(headers);
      if (!match) throw new Error("a part without Content-Length");
      const length = Number(match[1]);
      const start = end + HEADER_END.length;
      if (buffer.length >= start + length) {
        yield buffer.slice(start, start + length);
        buffer = buffer.slice(start + length);
        continue;
      }
    }
    const { value, done } = await reader.read();
    if (done) return;
    buffer = concat(buffer, value);
  }
}

async function watch() {
  let attempt = 0;
  while (true) {
    output.dataset.attempts = String(Number(output.dataset.attempts || 0) + 1);
    try {
      const url = `/v1/sessions/${encodeURIComponent(session)}/mjpeg`;
      const response = await fetch(url, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
      if (response.ok) {
        for await (const jpeg of parts(response.body)) {
          attempt = 0;
          show(jpeg);
        }
      }
    } catch {
      // the server went away mid-stream: reconnect below
    }
    const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
    attempt += 1;
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

if (session && token) watch();
else document.body.textContent = "Add ?session=…&token=… (the viewer link from the canvas page).";
