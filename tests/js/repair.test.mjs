// Gap repair on a live connection and late messages, against a real gateway:
// - a real gap: the client stops reading (TCP proxy paused) while messages are published,
//   the gateway's bounded outbound queue drops some, and the SDK repairs the hole with a
//   `resume` re-join on the same connection;
// - deliveries delayed in the (fake) mini-program runtime: the missing message arrives
//   after the repair, or before its ack, or after the SDK gave the gap up (trimmed history):
//   it is delivered exactly once, never dropped as a duplicate when it was missing.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client } from "../../clients/js/src/index.js";
import { Gateway, TcpProxy, fakeMiniProgram, waitFor, sleep, record } from "./helpers.mjs";

const CONFIG = `
[[routes]]
pattern = "gap:{id}"
history_size = 2000
user_rate = 0.0
room_rate = 0.0

[[routes]]
pattern = "trim:{id}"
history_size = 2

[[routes]]
pattern = "*"
`;

let gw;
let proxy;
const clients = [];

before(async () => {
  gw = await new Gateway({
    name: "repair",
    config: CONFIG,
    // A small outbound queue and socket buffer, no compression: a client that does not read
    // overflows the queue quickly and the gateway drops normal-priority messages.
    sets: ["limits.queue_bytes=32768", "limits.socket_send_buffer=4096", "deflate.enabled=false", "heartbeat.interval=3", "heartbeat.idle_timeout=9"],
  }).start();
  proxy = await new TcpProxy(gw.port).start();
});

after(async () => {
  for (const c of clients) c.close();
  if (proxy) await proxy.close();
  if (gw) await gw.stop();
});

function newClient(user, opts = {}) {
  const wx = fakeMiniProgram("wx");
  const c = new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user }, backoffInitial: 100, ...opts });
  clients.push(c);
  const ev = record(c, ["message", "gap", "resync", "disconnect", "error"]);
  return { c, wx, ev, seqs: (room) => ev.message.map((e) => e.v).filter((m) => m.room === room && m.seq > 0).map((m) => m.seq) };
}

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

test("a gap on a live connection (the gateway dropped messages for a slow reader) is repaired by a resume re-join, in order, once", async () => {
  const room = "gap:slow";
  const { c, wx, ev, seqs } = newClient("slow");
  await c.join(room);
  await gw.publish(room, "chat", { n: 1 });
  await gw.publish(room, "chat", { n: 2 });
  await waitFor(() => c.position(room).seq === 2, 3000, "seq 2");
  const engine0 = (await gw.stats()).engine.dropped_normal;

  proxy.pauseDownstream(); // the client stops reading: buffers and then the queue fill up
  const pad = "x".repeat(8000);
  let last = 2;
  for (let i = 0; i < 400; i++) {
    last = (await gw.publish(room, "chat", { n: last + 1, pad })).seq;
    if (i % 5 === 4 && (await gw.stats()).engine.dropped_normal > engine0) break;
  }
  assert.ok((await gw.stats()).engine.dropped_normal > engine0, "the gateway dropped messages for the paused client");
  for (let i = 0; i < 3; i++) last = (await gw.publish(room, "chat", { n: last + 1 })).seq;
  proxy.resumeDownstream();

  await waitFor(() => c.position(room).seq === last, 8000, `position ${last}`);
  await sleep(200);
  const onWire = wx.received.filter((f) => f.op === "msg" && f.room === room).map((f) => f.seq);
  const missing = range(1, last).filter((s) => !onWire.includes(s));
  assert.ok(missing.length > 0, "some seqs never reached the client live");
  assert.deepEqual(seqs(room), range(1, last), "every message delivered once, in order");
  const repairs = wx.sent.filter((f) => f.op === "join" && f.room === room && f.resume);
  assert.ok(repairs.length >= 1, "re-joined with resume");
  assert.equal(repairs[0].resume.seq, missing[0] - 1, "resumed from the last contiguous seq");
  assert.equal(ev.disconnect.length, 0, "on the same connection");
  const gaps = ev.gap.map((e) => e.v);
  assert.ok(gaps.length >= 1 && gaps.every((g) => g.recovered === true && g.room === room), JSON.stringify(gaps));
  assert.equal(gaps[0].from, missing[0]);
  assert.equal(ev.resync.length, 0);
  assert.equal(c.state, "open");
});

test("a late message (delayed past the repair) is not delivered twice; one arriving before the repair's ack fills the hole", async () => {
  const room = "gap:late";
  const { c, wx, ev, seqs } = newClient("late");
  await c.join(room);
  await gw.publish(room, "chat", { n: 1 });
  await waitFor(() => c.position(room).seq === 1, 3000, "seq 1");

  // Seq 2 is delayed by the runtime; 3 and 4 arrive: the SDK holds them and repairs.
  const delayed = [];
  wx.intercept = (f, text, task) => (f.op === "msg" && f.room === room && f.seq === 2 ? (delayed.push({ text, task }), true) : false);
  for (let i = 2; i <= 4; i++) await gw.publish(room, "chat", { n: i });
  await waitFor(() => c.position(room).seq === 4, 3000, "repaired to 4");
  assert.deepEqual(seqs(room), [1, 2, 3, 4]);
  assert.equal(delayed.length, 1);
  delayed[0].task.deliver(delayed[0].text); // the late copy of 2: already delivered
  await sleep(100);
  assert.deepEqual(seqs(room), [1, 2, 3, 4], "the late copy is a duplicate");
  assert.deepEqual(ev.gap.map((e) => e.v), [{ room, from: 2, to: 2, recovered: true }]);

  // Seq 6 delayed; 7 arrives; the repair's ack is held back until 6 has arrived.
  delayed.length = 0;
  const acks = [];
  wx.intercept = (f, text, task) => {
    if (f.op === "msg" && f.room === room && f.seq === 6) return delayed.push({ text, task }), true;
    if (f.op === "ack" && f.room === room && Array.isArray(f.msgs)) return acks.push({ text, task }), true;
    return false;
  };
  for (let i = 5; i <= 7; i++) await gw.publish(room, "chat", { n: i });
  await waitFor(() => acks.length === 1, 3000, "the repair's ack");
  assert.deepEqual(seqs(room), [1, 2, 3, 4, 5], "7 is held behind the hole");
  wx.intercept = null;
  delayed[0].task.deliver(delayed[0].text);
  assert.deepEqual(seqs(room), [1, 2, 3, 4, 5, 6, 7], "6 fills the hole, 7 follows");
  acks[0].task.deliver(acks[0].text);
  await sleep(100);
  assert.deepEqual(seqs(room), range(1, 7), "the ack's messages are duplicates");
  assert.equal(ev.gap.length, 2);
  assert.deepEqual(ev.gap[1].v, { room, from: 6, to: 6, recovered: true });
  assert.equal(ev.resync.length, 0);
});

test("a gap the server cannot fill (history trimmed) is reported and passed; the missing messages arriving late are still delivered, once", async () => {
  const room = "trim:1"; // history_size = 2
  const { c, wx, ev, seqs } = newClient("trim");
  await c.join(room);
  await gw.publish(room, "chat", { n: 1 });
  await waitFor(() => c.position(room).seq === 1, 3000, "seq 1");

  const delayed = [];
  wx.intercept = (f, text, task) => (f.op === "msg" && f.room === room && f.seq >= 2 && f.seq <= 4 ? (delayed.push({ text, task }), true) : false);
  for (let i = 2; i <= 5; i++) await gw.publish(room, "chat", { n: i });
  // 5 arrives: 2-4 missing; the server keeps only 4 and 5.
  await waitFor(() => c.position(room).seq === 5, 3000, "moved on to 5");
  assert.deepEqual(seqs(room), [1, 4, 5]);
  assert.deepEqual(ev.gap.map((e) => e.v), [{ room, from: 2, to: 4, recovered: false }]);
  assert.equal(ev.resync.length, 1, "resync: messages were lost");
  assert.equal(ev.resync[0].v.room, room);
  const repair = wx.sent.filter((f) => f.op === "join" && f.room === room && f.resume).pop();
  assert.deepEqual(repair.resume, { seq: 1, epoch: c.position(room).epoch });

  wx.intercept = null;
  for (const d of delayed) d.task.deliver(d.text); // 2, 3 were never delivered; 4 was
  assert.deepEqual(seqs(room), [1, 4, 5, 2, 3], "late messages delivered, not dropped as duplicates");
  for (const d of delayed) d.task.deliver(d.text);
  assert.deepEqual(seqs(room), [1, 4, 5, 2, 3], "and only once");
  await gw.publish(room, "chat", { n: 6 });
  await waitFor(() => c.position(room).seq === 6, 3000, "live again");
  assert.deepEqual(seqs(room), [1, 4, 5, 2, 3, 6]);
});

test("held messages are bounded: beyond maxHeldMessages the SDK stops waiting and delivers what it holds", async () => {
  const room = "gap:bound";
  const { c, wx, ev, seqs } = newClient("bound", { maxHeldMessages: 3 });
  await c.join(room);
  await gw.publish(room, "chat", { n: 1 });
  await waitFor(() => c.position(room).seq === 1, 3000, "seq 1");
  // Seq 2 is delayed and every repair ack is held back: the SDK can only wait.
  const delayed = [];
  wx.intercept = (f, text, task) => (f.op === "msg" && f.seq === 2) || (f.op === "ack" && Array.isArray(f.msgs) && f.room === room) ? (delayed.push({ f, text, task }), true) : false;
  for (let i = 2; i <= 6; i++) await gw.publish(room, "chat", { n: i });
  await waitFor(() => c.position(room).seq === 6, 3000, "passed the gap after 4 held");
  assert.deepEqual(seqs(room), [1, 3, 4, 5, 6]);
  assert.deepEqual(ev.gap.map((e) => e.v), [{ room, from: 2, to: 2, recovered: false }]);
  wx.intercept = null;
  for (const d of delayed) d.task.deliver(d.text); // 2 (late), then the repair's ack
  await sleep(100);
  assert.deepEqual(seqs(room), [1, 3, 4, 5, 6, 2], "2 delivered late, once");
});
