// The other adapters against a real gateway: Alipay (`my`, data at event.data.data, needs
// `multiple: true`), uni-app (a SocketTask only when a callback is passed), Douyin (`tt`,
// through the single-file build) and the browser WebSocket.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { Client, miniProgramMessageText } from "../../clients/js/src/index.js";
import { Gateway, fakeMiniProgram, waitFor, record } from "./helpers.mjs";

const require = createRequire(import.meta.url);
let gw;
const clients = [];

before(async () => {
  gw = await new Gateway({ name: "platforms" }).start();
});

after(async () => {
  for (const c of clients) c.close();
  if (gw) await gw.stop();
});

/** Connect two clients of `make()`, chat between them, check delivery. */
async function roundTrip(make, room) {
  const a = make("a-" + room);
  const b = make("b-" + room);
  clients.push(a, b);
  const ea = record(a);
  const eb = record(b);
  await Promise.all([a.join(room), b.join(room)]);
  const ack = await a.publish(room, { text: "from a" });
  assert.equal(ack.seq, 1);
  await b.publish(room, { gift: "car" }, { type: "gift" });
  await waitFor(() => eb.message.some((e) => e.v.data.text === "from a"), 3000, "b receives a's chat");
  await waitFor(() => ea.message.some((e) => e.v.type === "gift" && e.v.prio === 2), 3000, "a receives b's gift");
  return { a, b, ea, eb };
}

test("Alipay: my.connectSocket gets multiple: true and messages are read from event.data.data", async () => {
  const my = fakeMiniProgram("my");
  const make = (user) => new Client({ url: gw.wsUrl, platform: "my", api: my, query: { user } });
  const { a } = await roundTrip(make, "live:alipay");
  assert.ok(my.calls.every((c) => c.multiple === true), "multiple: true on every connectSocket");
  assert.equal(my.tasks.length, 2);
  // The shape the fake delivers is Alipay's: {data: {data, isBuffer}}.
  assert.equal(a.state, "open");
});

test("Alipay shapes: text, base64 binary (isBuffer), ArrayBuffer, plain {data}", () => {
  const frame = '{"op":"pong","ts":1,"t":"é漢😀"}';
  assert.equal(miniProgramMessageText({ data: { data: frame, isBuffer: false } }), frame);
  assert.equal(miniProgramMessageText({ data: { data: Buffer.from(frame).toString("base64"), isBuffer: true } }), frame);
  const u8 = new Uint8Array(Buffer.from(frame));
  assert.equal(miniProgramMessageText({ data: u8.buffer }), frame);
  assert.equal(miniProgramMessageText({ data: frame }), frame);
});

test("without multiple: true Alipay returns no SocketTask: the adapter reports it instead of hanging", async () => {
  const my = fakeMiniProgram("my");
  const { miniProgramAdapter } = await import("../../clients/js/src/index.js");
  const broken = miniProgramAdapter({ connectSocket: (p) => my.connectSocket({ ...p, multiple: false }) }, "my");
  assert.throws(() => broken.connect({ url: gw.wsUrl, protocols: [] }), /returned no SocketTask/);
});

test("uni-app: uni.connectSocket is given a callback so it returns a SocketTask", async () => {
  const uni = fakeMiniProgram("uni");
  const make = (user) => new Client({ url: gw.wsUrl, platform: "uni", api: uni, query: { user } });
  await roundTrip(make, "live:uni");
  assert.ok(uni.calls.every((c) => typeof c.complete === "function"), "complete callback passed");
  assert.ok(uni.calls.every((c) => c.multiple === true), "multiple passed for uni-app on Alipay");
  assert.deepEqual(uni.calls[0].protocols, ["gateway.v1"]);
});

test("tt through the single-file build (dist/livegate.js, CommonJS)", async () => {
  const L = require("../../clients/js/dist/livegate.js");
  assert.equal(typeof L.Client, "function");
  const tt = fakeMiniProgram("tt");
  const make = (user) => new L.Client({ url: gw.wsUrl, platform: "tt", api: tt, query: { user } });
  await roundTrip(make, "live:tt");
  assert.deepEqual(tt.calls[0].protocols, ["gateway.v1"]);
});

test("browser WebSocket adapter", async () => {
  const make = (user) => new Client({ url: gw.wsUrl, platform: "browser", query: { user } });
  const { a } = await roundTrip(make, "live:browser");
  assert.equal(a.adapter.name, "browser");
  const left = await a.leave("live:browser");
  assert.equal(left.op, "ack");
  assert.deepEqual(a.rooms(), []);
});

test("platform detection picks the global mini-program object", async () => {
  const { detectPlatform, createAdapter } = await import("../../clients/js/src/index.js");
  assert.equal(detectPlatform()[0], "browser");
  const wx = fakeMiniProgram("wx");
  globalThis.wx = wx;
  try {
    assert.equal(detectPlatform()[0], "wx");
    const c = new Client({ url: gw.wsUrl, query: { user: "detected" } });
    clients.push(c);
    assert.equal(c.adapter.name, "wx");
    await c.connect();
    assert.equal(wx.calls.length, 1);
    assert.equal(createAdapter("wx").name, "wx");
  } finally {
    delete globalThis.wx;
  }
});
