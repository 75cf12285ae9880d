// Reading a server-sent event stream of the Vercel AI data-stream protocol: one JSON object per `data:` line,
// `data: [DONE]` at the end.

/** Parse one line of the stream: the event object, `{type: '[DONE]'}`, or null for anything that is not data. */
export function parseLine(line) {
  if (!line.startsWith('data:')) return null;
  const data = line.slice(5).trim();
  if (data === '[DONE]') return { type: '[DONE]' };
  try {
    return JSON.parse(data);
  } catch {
    return { type: 'invalid-line', raw: data };
  }
}

/**
 * Call `onEvents` with the events of `body` (a ReadableStream of bytes) as they arrive, a batch for each chunk the
 * network delivered (so a page updates its layout once per chunk, not once per event); resolves at its end, also
 * when the connection is cut before it (the server went away: the caller sees a stream without its `finish`).
 * Rejects with the AbortError of a stopped request, and with any error of `onEvents`.
 */
export async function readEventStream(body, onEvents) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      // A network error mid-stream (Chromium: "TypeError: network error"): it was shown as "This page failed".
      if (error.name === 'AbortError') throw error;
      return; // the rest of the last line is cut off too: not an event
    }
    const { value, done } = chunk;
    if (done) break;
    buffer += value;
    const lines = buffer.split('\n');
    buffer = lines.pop();
    const events = lines.map((line) => parseLine(line.replace(/\r$/, ''))).filter(Boolean);
    if (events.length) onEvents(events);
  }
  const last = parseLine(buffer.trim());
  if (last) onEvents([last]);
}
