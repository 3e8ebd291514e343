// The wx adapter against a real gateway, through a fake `wx` backed by a real WebSocket:
// connect and join, acks and error codes, a batch, a simulated background (socket cut with
// no close frame, heartbeat quiet) and foreground with resume, then a server drain.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, ErrorCodes } from "../../clients/js/src/index.js";
import { Gateway, TcpProxy, fakeMiniProgram, waitFor, sleep, record, MERGE_CONFIG } from "./helpers.mjs";

let gw;
let proxy;
let wx;
let client;
let ev;

before(async () => {
  gw = await new Gateway({ name: "wx", config: MERGE_CONFIG }).start();
  proxy = await new TcpProxy(gw.port).start();
  wx = fakeMiniProgram("wx");
  client = new Client({
    url: `ws://127.0.0.1:${proxy.port}/ws`,
    platform: "wx",
    api: wx,
    query: { user: "alice" },
    showProbeTimeout: 1000,
    backoffInitial: 200,
    backoffMax: 2000,
  });
  client.bindLifecycle();
  ev = record(client);
});

after(async () => {
  if (client) client.close();
  if (proxy) await proxy.close();
  if (gw) await gw.stop();
});

const msgsOf = (room) => ev.message.map((e) => e.v).filter((m) => m.room === room);

test("connect offers gateway.v1 and gets it echoed; join delivers history; publish resolves with its ack", async () => {
  // Two messages before anyone joins, for the history.
  await gw.publish("live:wx1", "chat", { text: "before-1" });
  await gw.publish("live:wx1", "chat", { text: "before-2" });

  const opened = new Promise((resolve) => client.once("open", resolve));
  const connected = await client.connect();
  assert.equal(connected.op, "connected");
  assert.equal(connected.user, "alice");
  assert.equal(connected.heartbeat, 1);
  assert.deepEqual(wx.calls[0].protocols, ["gateway.v1"]);
  assert.equal(wx.calls[0].tcpNoDelay, true);
  assert.match(wx.calls[0].url, /\?user=alice$/);
  assert.equal((await opened).protocol, "gateway.v1", "the server echoes the offered subprotocol");
  assert.equal(client.state, "open");

  const ack = await client.join("live:wx1", { history: 10 });
  assert.equal(ack.op, "ack");
  assert.equal(ack.room, "live:wx1");
  assert.equal(ack.seq, 2);
  assert.deepEqual(msgsOf("live:wx1").map((m) => m.data.text), ["before-1", "before-2"], "history arrives as messages");

  const pub = await client.publish("live:wx1", { text: "hello" });
  assert.equal(pub.op, "ack");
  assert.equal(pub.seq, 3);
  await waitFor(() => msgsOf("live:wx1").some((m) => m.data.text === "hello"), 3000, "own message echoed");
  const like = await client.publish("live:wx1", { n: 3 }, { type: "like" });
  assert.equal(like.seq, 0, "likes are not recoverable");
  assert.deepEqual(client.position("live:wx1").seq, 3);

  // The same room joined twice resolves at once without a second join frame.
  const joinsBefore = wx.sent.filter((f) => f.op === "join").length;
  await client.join("live:wx1");
  assert.equal(wx.sent.filter((f) => f.op === "join").length, joinsBefore);
});

test("requests are rejected with the server's error code", async () => {
  await assert.rejects(client.publish("live:not-joined", { text: "x" }), (e) => e.code === 4004 && e.name === "GatewayError");
  await assert.rejects(client.join("nocolon"), (e) => e.code === 4005);
  assert.ok(!client.rooms().includes("nocolon"), "a refused join is forgotten");
  await assert.rejects(client.request("frobnicate", {}), (e) => e.code === 4001);
  // 5 msgs/s per user, burst 10: a burst of 14 is partly refused with 4029.
  const results = await Promise.allSettled(Array.from({ length: 14 }, (_, i) => client.publish("live:wx1", { text: "burst " + i })));
  const limited = results.filter((r) => r.status === "rejected");
  assert.ok(limited.length >= 2, `some publishes rate limited (${limited.length})`);
  assert.ok(limited.every((r) => r.reason.code === 4029), "rate limit code 4029");
  assert.equal(client.state, "open");
  await sleep(1200); // let the bucket refill
});

test("a batch frame is unpacked into single messages, in order", async () => {
  const presence = [];
  client.on("presence", (p) => presence.push(p));
  await client.join("merge:1");
  const before = wx.received.filter((f) => f.op === "batch").length;
  await Promise.all([1, 2, 3, 4, 5, 6].map((i) => gw.publish("merge:1", "chat", { i })));
  await waitFor(() => msgsOf("merge:1").length >= 6, 3000, "6 messages from merge:1");
  const batches = wx.received.filter((f) => f.op === "batch").slice(before);
  assert.ok(batches.length >= 1, "the gateway sent at least one batch frame");
  assert.ok(batches.some((b) => b.msgs.length > 1), "a batch carried several messages");
  const got = msgsOf("merge:1");
  assert.deepEqual(got.map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  assert.ok(got.every((m) => m.op === "msg" && m.room === "merge:1"));
  assert.equal(client.position("merge:1").seq, 6);
  // Batches may also carry the room's presence events: those come out as presence events.
  const inBatch = batches.flatMap((b) => b.msgs).filter((m) => m.op === "presence");
  for (const p of inBatch) assert.ok(presence.some((q) => q.room === p.room && q.event === p.event && q.user === p.user), "presence from a batch emitted");
});

test("background (socket cut, no close frame, heartbeat quiet) then foreground: reconnect and resume, no gift lost", async () => {
  await client.join("live:bg", { history: 0 });
  await client.publish("live:bg", { gift: "start" }, { type: "gift" });
  await waitFor(() => client.position("live:bg").seq === 1, 3000, "seq 1 seen");
  const tasksBefore = wx.tasks.length;
  const disconnectsBefore = ev.disconnect.length;
  const oldTask = wx.lastTask;

  wx.background(); // onAppHide -> client.onHide(); the task goes silent for good
  proxy.cutAll(); // the network drops the TCP connection: no close frame either way
  const pingsAtHide = wx.sent.filter((f) => f.op === "ping").length;

  const sent = [];
  for (let i = 1; i <= 3; i++) sent.push((await gw.publish("live:bg", "gift", { gift: "rocket", n: i })).seq);
  await gw.publish("live:bg", "like", { n: 5 }); // not recoverable
  await gw.publish("live:bg", "chat", { text: "while away" });
  await sleep(1500);
  assert.equal(wx.sent.filter((f) => f.op === "ping").length, pingsAtHide, "no heartbeat while hidden");
  assert.equal(wx.tasks.length, tasksBefore, "no reconnect attempt while hidden");
  assert.equal(ev.disconnect.length, disconnectsBefore, "onClose never arrived");

  const shownAt = Date.now();
  wx.foreground(); // onAppShow -> client.onShow(): probe, then reconnect + resume
  await waitFor(() => wx.tasks.length > tasksBefore, 3000, "a new connectSocket after onShow");
  assert.ok(Date.now() - shownAt < 2500, "reconnected promptly after the probe");
  await waitFor(() => client.position("live:bg").seq >= 5, 5000, "resumed to seq 5");
  assert.notEqual(wx.lastTask, oldTask);

  const resumeJoin = wx.sent.filter((f) => f.op === "join" && f.room === "live:bg" && f.resume).pop();
  assert.ok(resumeJoin, "rejoined with resume");
  assert.equal(resumeJoin.resume.seq, 1);
  const bg = msgsOf("live:bg");
  const gifts = bg.filter((m) => m.type === "gift").map((m) => m.seq);
  assert.deepEqual(gifts, [1, ...sent], "every gift delivered once, in order");
  assert.ok(bg.some((m) => m.data && m.data.text === "while away"));
  const seqs = bg.filter((m) => m.seq > 0).map((m) => m.seq);
  assert.deepEqual(seqs, [...new Set(seqs)], "no duplicates");
  assert.equal(ev.resync.filter((e) => e.v.room === "live:bg").length, 0, "nothing to resync");
  // The other rooms were resumed on the same new socket.
  const joinsAfter = wx.sent.filter((f) => f.op === "join" && f.resume);
  for (const room of ["live:wx1", "merge:1"]) assert.ok(joinsAfter.some((f) => f.room === room), `${room} resumed`);
  // And the connection works.
  const ack = await client.publish("live:bg", { text: "back" });
  assert.equal(ack.seq, 6);
});

test("server drain: the SDK waits retry_ms, then reconnects to the restarted gateway", async () => {
  const port = gw.port;
  const apiPort = gw.apiPort;
  const tasksBefore = wx.tasks.length;
  const drained = new Promise((resolve) => client.once("drain", (f) => resolve({ f, t: Date.now() })));
  gw.signal("SIGTERM");
  const { f, t } = await drained;
  assert.equal(f.retry_ms, 1500);
  assert.equal(await gw.exited, 0, "the old gateway drained and exited cleanly");
  gw = await new Gateway({ name: "wx-restarted", port, apiPort, config: MERGE_CONFIG }).start();
  await waitFor(() => wx.tasks.length > tasksBefore, 6000, "a reconnect attempt after the drain");
  const attempt = wx.calls[tasksBefore].time;
  assert.ok(attempt - t >= 1450, `waited retry_ms before reconnecting (${attempt - t} ms)`);
  await waitFor(() => client.state === "open", 8000, "reconnected");
  // The new gateway has a fresh history: the rooms are rejoined and flagged for resync.
  await waitFor(() => ev.resync.some((e) => e.v.room === "live:bg" && e.t > t), 5000, "resync of live:bg");
  const ack = await client.publish("live:bg", { text: "after restart" });
  assert.equal(ack.seq, 1);
  await waitFor(() => msgsOf("live:bg").some((m) => m.data && m.data.text === "after restart"), 3000, "message after restart");
  assert.equal(wx.badCloses || 0, 0, "every close call had a valid code and reason");
});

test("close() rejects queued publishes and stops for good", async () => {
  client.close(1000, "bye");
  assert.equal(client.state, "closed");
  await assert.rejects(client.publish("live:bg", { text: "late" }), (e) => e.code === ErrorCodes.CLOSED);
  const n = wx.tasks.length;
  await sleep(500);
  assert.equal(wx.tasks.length, n, "no reconnect after close()");
  client = null;
});
