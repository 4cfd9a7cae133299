// "Render full quality": the live session's current canvas, prompt and seed as a batch job
// (POST /v1/jobs, kind live_session, with the mask if one is painted), polled until it ends. Polling rather than the SSE stream,
// because EventSource cannot send the API key header a server with --api-key asks for.

const POLL_MS = 400;

// With a mask (a base64 PNG, white where to repaint), only the masked area is rendered anew; every
// other pixel of the result is the canvas's own.
export async function renderFullQuality({ sessionId, token, apiKey, steps = 25, mask = null, onProgress }) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const created = await fetch("/v1/jobs", {
    method: "POST",
    headers,
    body: JSON.stringify({
      kind: "live_session",
      priority: "high",
      params: { session_id: sessionId, session_token: token, steps, preview: true, ...(mask ? { mask } : {}) },
    }),
  });
  let job = await created.json();
  if (!created.ok) throw new Error(job.message || `the server answered ${created.status}`);
  while (!["finished", "failed", "cancelled"].includes(job.status)) {
    onProgress(job);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    const response = await fetch(`/v1/jobs/${job.id}`, { headers });
    job = await response.json();
    if (!response.ok) throw new Error(job.message || `the server answered ${response.status}`);
  }
  if (job.status !== "finished") throw new Error(`the render ${job.status}: ${job.error || "no reason given"}`);
  const image = await fetch(job.results[0].url, { headers });
  if (!image.ok) throw new Error(`the result could not be downloaded (${image.status})`);
  return { job, url: URL.createObjectURL(await image.blob()) };
}

export function describeProgress(job) {
  if (job.status === "queued") return `Queued (position ${job.queue_position ?? "?"})`;
  const { step, steps } = job.progress;
  return steps ? `Rendering… step ${step} of ${steps}` : "Starting…";
}
