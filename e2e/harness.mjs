// Shared by the checks: start app.py under uvicorn, and decode its streams with the client's code.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { fileURLToPath } from "node:url";
import {
  AssistantMessageAccumulator,
  AssistantTransportDecoder,
  DataStreamDecoder,
  unstable_createInitialMessage,
} from "assistant-stream";

export const ROOT = fileURLToPath(new URL("..", import.meta.url));
const PYTHON = process.env.PYTHON ?? `${ROOT}.venv/bin/python`;

export async function freePort() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

// Every setting of app.py's, empty: an empty variable means the default and wins over a .env file, so neither
// the developer's environment nor a .env beside app.py changes what these checks see.
const DEFAULTS = Object.fromEntries(
  [...readFileSync(`${ROOT}.env.example`, "utf8").matchAll(/^([A-Z_]+)=/gm)].map(([, name]) => [name, ""]),
);

/** Start `uvicorn app:application` with these settings; resolves once /health answers. */
export async function startApp(settings = {}) {
  const port = await freePort();
  const child = spawn(
    PYTHON,
    ["-m", "uvicorn", "app:application", "--port", String(port), "--lifespan", "off"],
    { cwd: ROOT, env: { PATH: process.env.PATH, ...DEFAULTS, MOCK_DELAY: "0", ...settings } },
  );
  let log = "";
  child.stdout.on("data", (data) => (log += data));
  child.stderr.on("data", (data) => (log += data));
  const url = `http://127.0.0.1:${port}`;
  for (let attempt = 0; ; attempt++) {
    try {
      if ((await fetch(`${url}/health`)).ok) break;
    } catch {
      if (attempt > 200 || child.exitCode !== null) throw new Error(`app did not start:\n${log}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
  return {
    url,
    log: () => log,
    stop: () => new Promise((resolve) => (child.kill(), child.on("exit", resolve))),
  };
}

/**
 * A model server that streams these events (chunk deltas, or an {error}) as SSE, `delay` ms apart, then ends.
 * `closed` resolves when a client closes its request before the stream's end.
 */
export async function startModel(events, { delay = 0 } = {}) {
  let closedEarly;
  const closed = new Promise((resolve) => (closedEarly = resolve));
  const server = createServer(async (request, response) => {
    request.resume();
    response.writeHead(200, { "Content-Type": "text/event-stream" });
    let ended = false;
    response.on("close", () => ended || closedEarly());
    for (const event of events) {
      const chunk = event.error ? event : { id: "c", object: "chat.completion.chunk", created: 1, model: "m",
        choices: [{ index: 0, delta: event, finish_reason: null }] };
      if (response.destroyed) return;
      response.write(`data: ${JSON.stringify(chunk)}\n\n`);
      if (delay) await new Promise((resolve) => setTimeout(resolve, delay));
    }
    ended = true;
    response.end("data: [DONE]\n\n");
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}/v1`, closed, stop: () => server.close() };
}

/** POST a body to /assistant and return the raw bytes of the reply. */
export async function post(app, body) {
  const response = await fetch(`${app.url}/assistant`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`status ${response.status}: ${await response.text()}`);
  return new Uint8Array(await response.arrayBuffer());
}

/**
 * Decode bytes exactly as useAssistantTransportRuntime does: the strict decoder for the protocol,
 * then the accumulator starting from the state the request sent. Bytes arrive `pieceSize` at a time.
 * Every console.warn or console.error from the client code is returned as a warning.
 */
export async function decode(bytes, { protocol, state = null, pieceSize = bytes.length || 1 }) {
  const warnings = [];
  const { warn, error } = console;
  console.warn = (...args) => warnings.push(args.join(" "));
  console.error = (...args) => warnings.push(args.join(" "));
  try {
    const body = new ReadableStream({
      start(controller) {
        for (let at = 0; at < bytes.length; at += pieceSize) controller.enqueue(bytes.slice(at, at + pieceSize));
        controller.close();
      },
    });
    const decoder =
      protocol === "assistant-transport"
        ? new AssistantTransportDecoder({ strict: true })
        : new DataStreamDecoder({ strict: true });
    let failure;
    let last;
    const messages = body.pipeThrough(decoder).pipeThrough(
      new AssistantMessageAccumulator({
        initialMessage: unstable_createInitialMessage({ unstable_state: state }),
        strict: true,
        onError: (message) => (failure = message),
      }),
    );
    for await (const message of messages) last = message;
    return { state: last?.metadata.unstable_state ?? state, error: failure, warnings };
  } finally {
    console.warn = warn;
    console.error = error;
  }
}

export const userSays = (text, extra = {}) => ({
  type: "add-message",
  message: { role: "user", parts: [{ type: "text", text }] },
  parentId: null,
  sourceId: null,
  ...extra,
});

/** The text of a LangChain message's content: a string, or its text blocks. */
export const textOf = (message) =>
  typeof message.content === "string"
    ? message.content
    : message.content.filter((block) => block.type === "text").map((block) => block.text).join("");
