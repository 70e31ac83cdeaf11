// Decoder conformance: app.py's streams, read by the client's own strict decoders and accumulator.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";
import { decode, post, startApp, textOf, userSays } from "./harness.mjs";

/** A model server that streams one token and then an error event, as the OpenAI API does mid-stream. */
async function startFailingModel() {
  const server = createServer((request, response) => {
    request.resume();
    response.writeHead(200, { "Content-Type": "text/event-stream" });
    const chunk = { id: "c", object: "chat.completion.chunk", created: 1, model: "m",
      choices: [{ index: 0, delta: { role: "assistant", content: "Partial" }, finish_reason: null }] };
    response.write(`data: ${JSON.stringify(chunk)}\n\n`);
    response.end(`data: ${JSON.stringify({ error: { message: "The model crashed", type: "server_error" } })}\n\n`);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}/v1`, stop: () => server.close() };
}

for (const protocol of ["data-stream", "assistant-transport"]) {
  describe(`${protocol} stream`, () => {
    let app;
    before(async () => (app = await startApp({ STREAM_PROTOCOL: protocol })));
    after(() => app.stop());

    /** One request; its reply decoded whole, in 1-byte and in 5-byte pieces, all alike and silent. */
    async function converse(state, commands, target = app) {
      const bytes = await post(target, { commands, state });
      const whole = await decode(bytes, { protocol, state });
      for (const pieceSize of [1, 5]) {
        assert.deepEqual(await decode(bytes, { protocol, state, pieceSize }), whole, `${pieceSize}-byte pieces`);
      }
      assert.deepEqual(whole.warnings, [], "the decoder dropped or warned about a frame");
      return { ...whole, bytes };
    }

    test("a plain reply", async () => {
      const { state, error } = await converse(null, [userSays("hello there")]);
      assert.equal(error, undefined);
      assert.deepEqual(state.messages.map((message) => message.type), ["human", "ai"]);
      assert.equal(textOf(state.messages[1]), 'You said: "hello there".');
    });

    test("the weather tool round trip", async () => {
      const asked = await converse(null, [userSays("What's the weather like in San Francisco today?")]);
      const [call] = asked.state.messages[1].tool_calls;
      assert.equal(call.name, "get_weather");
      assert.deepEqual(call.args, { location: "San Francisco" });
      assert.deepEqual(JSON.parse(call.partial_json), call.args);
      const result = { type: "add-tool-result", toolCallId: call.id, toolName: call.name,
        result: { temperature: 21, unit: "celsius" }, isError: false };
      const answered = await converse(asked.state, [result]);
      const [, , tool, closing] = answered.state.messages;
      assert.deepEqual(tool, { ...tool, type: "tool", tool_call_id: call.id, content: { temperature: 21, unit: "celsius" } });
      assert.equal(closing.content, 'get_weather answered: {"temperature": 21, "unit": "celsius"}');
      assert.equal(answered.state.messages.length, 4, "the tool was called again");
    });

    test("an edit branches the thread", async () => {
      const first = await converse(null, [userSays("one")]);
      const second = await converse(first.state, [userSays("two", { parentId: first.state.messages[1].id })]);
      const edit = userSays("two, edited", { parentId: first.state.messages[1].id, sourceId: second.state.messages[2].id });
      const edited = await converse(second.state, [edit]);
      assert.deepEqual(edited.state.messages.map(textOf), ["one", 'You said: "one".', "two, edited", 'You said: "two, edited".']);
    });

    test("a custom command changes nothing", async () => {
      const first = await converse(null, [userSays("one")]);
      const { state, error } = await converse(first.state, [{ type: "set-mood", mood: "cheerful" }]);
      assert.equal(error, undefined);
      assert.deepEqual(state, first.state);
    });

    test("keep-alives during a slow run are benign", async () => {
      const slow = await startApp({ STREAM_PROTOCOL: protocol, MOCK_DELAY: "0.3", HEARTBEAT_SECONDS: "0.05" });
      try {
        const { state, bytes } = await converse(null, [userSays("slow")], slow);
        const keepalive = protocol === "data-stream" ? "\n\n" : ": heartbeat";
        assert.ok(new TextDecoder().decode(bytes).includes(keepalive), "no keep-alive was sent");
        assert.equal(textOf(state.messages[1]), 'You said: "slow".');
      } finally {
        await slow.stop();
      }
    });

    test("an error mid-run reaches the client, and the conversation stays", async () => {
      const model = await startFailingModel();
      const withModel = await startApp({ STREAM_PROTOCOL: protocol, OPENAI_API_KEY: "sk-test", OPENAI_BASE_URL: model.url });
      try {
        const { state, error } = await converse(null, [userSays("hi")], withModel);
        assert.equal(error, "The model request failed: The model crashed");
        assert.equal(textOf(state.messages[0]), "hi");
        assert.equal(textOf(state.messages[1]), "Partial");
      } finally {
        await withModel.stop();
        model.stop();
      }
    });
  });
}
