// Browser end to end: a React page with useAssistantTransportRuntime, served on another port than
// the app (so CORS is real), driven in Debian's Chromium by playwright-core.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { build, preview } from "vite";
import { freePort, startApp, startModel } from "./harness.mjs";

const HERE = fileURLToPath(new URL(".", import.meta.url));
const CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"];

let pageServer;
let browser;
before(async () => {
  await build({ configFile: `${HERE}vite.config.js` });
  pageServer = await preview({
    configFile: `${HERE}vite.config.js`,
    preview: { host: "127.0.0.1", port: await freePort(), strictPort: true },
  });
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: CHROMIUM_FLAGS });
});
after(async () => {
  await browser?.close();
  await new Promise((resolve) => pageServer?.httpServer.close(resolve));
});

/** The page's console errors and warnings, and its errors, as they come. */
function watch(page) {
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  page.on("console", (message) => {
    // The SSE decoder closes the stream itself at [DONE], which Chromium logs as an aborted request.
    if (["error", "warning"].includes(message.type()) && !message.text().includes("ERR_ABORTED")) {
      problems.push(message.text());
    }
  });
  return problems;
}

for (const protocol of ["data-stream", "assistant-transport"]) {
  describe(`the page, over ${protocol}`, () => {
    let app;
    let page;
    let problems;

    before(async () => {
      const pageOrigin = new URL(pageServer.resolvedUrls.local[0]).origin;
      app = await startApp({ STREAM_PROTOCOL: protocol, MOCK_DELAY: "0.05", CORS_ORIGINS: pageOrigin });
      page = await browser.newPage();
      problems = watch(page);
      await page.goto(`${pageOrigin}/?api=${encodeURIComponent(`${app.url}/assistant`)}&protocol=${protocol}`);
    });
    after(async () => {
      mkdirSync(`${HERE}screenshots`, { recursive: true });
      await page?.screenshot({ path: `${HERE}screenshots/${protocol}.png`, fullPage: true });
      await page?.close();
      await app?.stop();
    });

    /** Console errors, page errors, and any error the runtime reported (the page keeps the last one). */
    const allProblems = async () => [...problems, ...((await page.evaluate(() => window.lastError)) ?? [])];

    const send = async (text) => {
      await page.fill("textarea", text);
      await page.click("text=Send");
    };
    const lastReply = () => page.locator(".assistant").last().innerText();

    test("a message stays, and its reply streams in", async () => {
      await send("hello there");
      const seen = new Set();
      const deadline = Date.now() + 10_000;
      while (!seen.has('You said: "hello there".') && Date.now() < deadline) {
        if (await page.locator(".assistant").count()) seen.add((await lastReply()).trim());
        await page.waitForTimeout(10);
      }
      assert.ok(seen.has('You said: "hello there".'), `the reply never completed: ${[...seen]}`);
      assert.ok(seen.size >= 3, `the reply arrived in one lump: ${[...seen]}`);
      await page.locator("text=Send").waitFor({ timeout: 5_000 });
      assert.equal(await page.locator(".user", { hasText: "hello there" }).count(), 1, "the message vanished or doubled");
      // The provider's own header makes the browser ask first; the backend answered that preflight.
      assert.match(app.log(), /"OPTIONS \/assistant HTTP\/1.1" 204/);
      assert.deepEqual(await allProblems(), []);
    });

    test("the example's weather question runs the tool in the browser, and the reply uses its result", async () => {
      await send("What's the weather like in San Francisco today?");
      await page.locator(".tool", { hasText: "San Francisco: 21° celsius, sunny" }).waitFor({ timeout: 10_000 });
      const closing = 'get_weather answered: {"location": "San Francisco", "temperature": 21, "unit": "celsius", "condition": "sunny"}';
      await page.getByText(closing).waitFor({ timeout: 10_000 });
      await page.locator("text=Send").waitFor({ timeout: 5_000 });
      assert.equal(await page.evaluate(() => window.weatherRuns), 1);
      assert.equal(await page.locator(".tool").count(), 1, "the tool was called again");
      assert.equal(await page.locator(".user", { hasText: "San Francisco today" }).count(), 1);
      assert.deepEqual(await allProblems(), []);
      if (protocol === "data-stream") {
        // The README's picture: this conversation as the check sees it, not drawn by hand.
        await page.locator("#root").screenshot({ path: `${HERE}chat.png`, animations: "disabled" });
      }
    });

    test("the next message keeps the tool round before it", async () => {
      await send("thanks");
      await page.getByText('You said: "thanks".').waitFor({ timeout: 10_000 });
      await page.locator("text=Send").waitFor({ timeout: 5_000 });
      assert.equal(await page.locator(".tool").first().innerText(), "San Francisco: 21° celsius, sunny");
      assert.equal(await page.getByText("get_weather answered:").count(), 1, "the closing sentence was lost");
      assert.deepEqual(await allProblems(), []);
    });

    test("an edit replaces the message and the reply after it, and keeps what came before", async () => {
      await page.locator(".user", { hasText: "thanks" }).locator(".edit").click();
      await page.fill(".editing textarea", "thanks a lot");
      await page.click("text=Save");
      await page.getByText('You said: "thanks a lot".').waitFor({ timeout: 10_000 });
      await page.locator("text=Send").waitFor({ timeout: 5_000 });
      assert.equal(await page.getByText('You said: "thanks".').count(), 0, "the old reply stayed");
      const asked = (await page.locator(".user").allInnerTexts()).map((text) => text.replace(/\s*Edit$/, ""));
      assert.deepEqual(asked, ["hello there", "What's the weather like in San Francisco today?", "thanks a lot"]);
      assert.equal(await page.locator(".tool").first().innerText(), "San Francisco: 21° celsius, sunny");
      assert.deepEqual(await allProblems(), []);
    });

    test("the time question runs the backend's tool: its card with the result, then the sentence", async () => {
      const posts = () => app.log().match(/"POST \/assistant HTTP\/1.1" 200/g).length;
      const postsBefore = posts();
      await send("What time is it in Tokyo?");
      const card = page.locator(".tool-card", { hasText: 'get_current_time({"timezone": "Asia/Tokyo"}) → {' });
      await card.waitFor({ timeout: 10_000 });
      const result = JSON.parse((await card.innerText()).split(" → ")[1]);
      assert.equal(result.timezone, "Asia/Tokyo");
      assert.match(result.time, /\+09:00$/);
      await page.getByText(`get_current_time answered: {"timezone": "Asia/Tokyo", "time": "${result.time}"`).waitFor({ timeout: 10_000 });
      await page.locator("text=Send").waitFor({ timeout: 5_000 });
      assert.equal(posts() - postsBefore, 1, "the backend ran the tool inside the question's one request");
      assert.deepEqual(await allProblems(), []);
    });

  });
}

for (const protocol of ["data-stream", "assistant-transport"]) {
  test(`Stop, over ${protocol}, ends the reply and the backend's request to the model`, async () => {
    const pageOrigin = new URL(pageServer.resolvedUrls.local[0]).origin;
    const model = await startModel([{ role: "assistant", content: "" }, ...Array(300).fill({ content: " word" })], { delay: 50 });
    const app = await startApp({ STREAM_PROTOCOL: protocol, OPENAI_API_KEY: "sk-test", OPENAI_BASE_URL: model.url, CORS_ORIGINS: pageOrigin });
    const page = await browser.newPage();
    const problems = watch(page);
    try {
      await page.goto(`${pageOrigin}/?api=${encodeURIComponent(`${app.url}/assistant`)}&protocol=${protocol}`);
      await page.fill("textarea", "talk to me");
      await page.click("text=Send");
      await page.locator(".assistant", { hasText: "word word word" }).waitFor({ timeout: 10_000 });
      await page.click("text=Stop");
      const closed = await Promise.race([model.closed.then(() => true), new Promise((resolve) => setTimeout(resolve, 2_000, false))]);
      assert.ok(closed, "the backend went on asking the model after Stop");
      await page.locator("text=Send").waitFor({ timeout: 5_000 });
      const shown = await page.locator(".assistant").last().innerText();
      assert.ok(shown.split("word").length - 1 < 300, "the whole reply arrived before Stop");
      await page.locator(".user", { hasText: "talk to me" }).waitFor();
      assert.equal(await page.locator(".assistant").last().innerText(), shown, "the reply grew after the model was closed");
      assert.deepEqual([...problems, ...((await page.evaluate(() => window.lastError)) ?? [])], []);
    } finally {
      await page.close();
      await app.stop();
      model.stop();
    }
  });
}

describe("a model that fails", () => {
  test("shows its error on the message where the reply would have been", async () => {
    const pageOrigin = new URL(pageServer.resolvedUrls.local[0]).origin;
    const nowhere = `http://127.0.0.1:${await freePort()}/v1`;
    const app = await startApp({ OPENAI_API_KEY: "sk-test", OPENAI_BASE_URL: nowhere, CORS_ORIGINS: pageOrigin });
    const page = await browser.newPage();
    try {
      await page.goto(`${pageOrigin}/?api=${encodeURIComponent(`${app.url}/assistant`)}`);
      await page.fill("textarea", "hello?");
      await page.click("text=Send");
      const error = page.locator(".assistant .message-error");
      await error.waitFor({ timeout: 10_000 });
      const shown = await error.innerText();
      assert.match(shown, /^The model request failed: .*Cannot connect to host 127\.0\.0\.1:\d+/);
      assert.equal(await page.locator(".user", { hasText: "hello?" }).count(), 1, "the user's message was lost");
      assert.deepEqual(await page.evaluate(() => window.lastError), [`Error: ${shown}`]);
    } finally {
      await page.close();
      await app.stop();
    }
  });
});
