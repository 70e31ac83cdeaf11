// Decoder conformance: app.py's streams, read by the client's own strict decoders and accumulator.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { decode, post, startApp, startModel, textOf, userSays } from "./harness.mjs";

/** The app, with the OpenAI agent talking to a model server that streams these events. */
async function withModel(protocol, events, check) {
  const model = await startModel(events);
  const app = await startApp({ STREAM_PROTOCOL: protocol, OPENAI_API_KEY: "sk-test", OPENAI_BASE_URL: model.url });
  try {
    await check(app);
  } finally {
    await app.stop();
    model.stop();
  }
}

for (const protocol of ["data-stream", "assistant-transport"]) {
  describe(`${protocol} stream`, () => {
    let app;
    before(async () => (app = await startApp({ STREAM_PROTOCOL: protocol })));
    after(() => app.stop());

    /**
     * One request; its reply decoded whole, in 1-byte and in 5-byte pieces, all alike and silent, and with no
     * error unless the case is one of a failing run.
     */
    async function converse(state, commands, target = app, { failing = false } = {}) {
      const bytes = await post(target, { commands, state });
      const whole = await decode(bytes, { protocol, state });
      for (const pieceSize of [1, 5]) {
        assert.deepEqual(await decode(bytes, { protocol, state, pieceSize }), whole, `${pieceSize}-byte pieces`);
      }
      assert.deepEqual(whole.warnings, [], "the decoder dropped or warned about a frame");
      if (!failing) assert.equal(whole.error, undefined, "an error came with the reply");
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

    test("the time question: the backend's tool and its result, and the reply, in one stream", async () => {
      const { state, error } = await converse(null, [userSays("What time is it in Tokyo?")]);
      assert.equal(error, undefined);
      assert.deepEqual(state.messages.map((message) => message.type), ["human", "ai", "tool", "ai"]);
      const [, asked, answer, closing] = state.messages;
      assert.deepEqual(asked.tool_calls[0].args, { timezone: "Asia/Tokyo" });
      assert.equal(answer.tool_call_id, asked.tool_calls[0].id);
      assert.match(answer.content.time, /\+09:00$/);
      assert.ok(closing.content.startsWith(`get_current_time answered: {"timezone": "Asia/Tokyo", "time": "${answer.content.time}"`));
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
      const slow = await startApp({ STREAM_PROTOCOL: protocol, MOCK_DELAY: "1.3", HEARTBEAT_SECONDS: "1" });
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
      const events = [{ role: "assistant", content: "Partial" }, { error: { message: "The model crashed" } }];
      await withModel(protocol, events, async (withAModel) => {
        const { state, error } = await converse(null, [userSays("hi")], withAModel, { failing: true });
        assert.equal(error, "The model request failed: The model crashed");
        assert.equal(textOf(state.messages[0]), "hi");
        assert.equal(textOf(state.messages[1]), "Partial");
        assert.deepEqual(state.messages[1].status, { type: "incomplete", reason: "error", error });
      });
    });

    test("reasoning a local model streams as `reasoning` becomes the message's reasoning part", async () => {
      const events = [{ role: "assistant", content: "" }, { reasoning: "Short" }, { reasoning: " question." }, { content: "Hi!" }];
      await withModel(protocol, events, async (withAModel) => {
        const { state, error } = await converse(null, [userSays("hi")], withAModel);
        assert.equal(error, undefined);
        assert.deepEqual(state.messages[1].additional_kwargs.reasoning.summary, [{ type: "summary_text", text: "Short question." }]);
        assert.equal(state.messages[1].content, "Hi!");
      });
    });

    const refused = [["NaN", '{"zoom": NaN}'], ["no object", "[1, 2]"]];
    for (const [name, text] of refused) {
      test(`tool arguments holding ${name} end in an error the decoder reads, not a broken stream`, async () => {
        const call = { index: 0, id: "call_m", type: "function", function: { name: "render_map", arguments: "" } };
        const events = [{ tool_calls: [call] }, { tool_calls: [{ index: 0, function: { arguments: text } }] }];
        await withModel(protocol, events, async (withAModel) => {
          const { state, error } = await converse(null, [userSays("map it")], withAModel, { failing: true });
          assert.match(error, /^The model request failed: The arguments for render_map are not a JSON object/);
          assert.equal(state.messages[1].tool_calls[0].partial_json, text);
        });
      });
    }
  });
}
