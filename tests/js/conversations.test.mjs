// Conversations (protocol 1.1) in the SDK against a real gateway: the list and its badges
// kept current live across users and devices, read receipts, typing, recall (live and after
// a sync from a saved cursor), groups with their error codes, and sends made while
// disconnected, delivered in order and exactly once (a lost ack re-sent with its cid).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, ErrorCode, ErrorCodes, dmId, memoryStorage } from "../../clients/js/src/index.js";
import { Gateway, TcpProxy, fakeMiniProgram, waitFor, sleep, convConfig } from "./helpers.mjs";

let gw;
const clients = [];
const proxies = [];
let n = 0;
const uid = (p) => `${p}${process.pid}x${++n}`;

before(async () => {
  gw = await new Gateway({ name: "conv", config: convConfig({ groupMax: 4 }), sets: ["limits.client_rate=0"] }).start();
});

after(async () => {
  for (const c of clients) c.close();
  for (const p of proxies) await p.close();
  if (gw) await gw.stop();
});

/** A client of `name` with conversations on (the browser adapter: Node's WebSocket). */
function client(name, extra = {}) {
  const c = new Client({ url: gw.wsUrl, platform: "browser", query: { user: name }, conversations: true, backoffInitial: 100, backoffMax: 400, ...extra });
  clients.push(c);
  return c;
}

/** Connect and wait for the connection's first sync. */
async function online(c) {
  const synced = new Promise((resolve) => c.conversations.once("synced", resolve));
  await c.connect();
  await synced;
  return c;
}

/** Collect events of `emitter`. */
function events(emitter, names) {
  const ev = {};
  for (const name of names) {
    ev[name] = [];
    emitter.on(name, (a, b) => ev[name].push(b === undefined ? a : [a, b]));
  }
  return ev;
}

test("dmId is the server's: byte order, either side", () => {
  assert.equal(dmId("bob", "alice"), "dm:alice:bob");
  assert.equal(dmId("alice", "bob"), "dm:alice:bob");
  assert.equal(dmId("B", "a"), "dm:B:a", "byte order: upper case first");
  assert.equal(dmId("u10", "u9"), "dm:u10:u9");
});

test("live: a message shows as unread 1 on both of B's devices; B reads: A gets a receipt, B's other device clears its badge; typing", async () => {
  const A = uid("alice");
  const B = uid("bob");
  const a = await online(client(A));
  const phone = await online(client(B));
  const pc = await online(client(B));
  const room = dmId(A, B);
  assert.equal(phone.conversations.dm(A), room);
  const pev = events(phone.conversations, ["change", "message"]);
  const aev = events(a.conversations, ["receipt", "typing", "sent"]);
  const pcev = events(pc.conversations, ["read", "typing"]);

  const ack = await a.conversations.send(room, { text: "hi" });
  assert.equal(ack.seq, 1);
  assert.equal(ack.room, room);
  assert.match(ack.cid, /^[0-9a-z]{14,}$/, "a generated cid: time + random");
  assert.equal(ack.msg.cid, ack.cid);
  assert.deepEqual(aev.sent.map((e) => [e.cid, e.seq, e.dup]), [[ack.cid, 1, false]]);

  for (const dev of [phone, pc]) {
    await waitFor(() => dev.conversations.get(room) && dev.conversations.get(room).unread === 1, 5000, "unread 1 live");
    const conv = dev.conversations.get(room);
    assert.equal(conv.kind, "dm");
    assert.equal(conv.peer, A);
    assert.equal(conv.last.data.text, "hi");
    assert.equal(conv.last.from, A);
    assert.equal(dev.conversations.totalUnread(), 1);
    assert.equal(dev.conversations.list()[0].room, room);
  }
  await waitFor(() => pev.change.some((e) => e.rooms.includes(room) && e.total === 1), 2000, "a change event with the badge");
  assert.equal(pev.message.filter(([m]) => m.room === room).length, 1, "one message event");
  assert.equal(pev.message[0][1].source, "live");
  // The sender's own message counts as read for her.
  const mine = a.conversations.get(room);
  assert.equal(mine.unread, 0);
  assert.equal(mine.last_seq, 1);
  assert.equal(a.conversations.messages(room).length, 1, "the echo and the ack: one message");

  const read = await phone.conversations.read(room);
  assert.equal(read.read_seq, 1);
  assert.equal(read.unread, 0);
  assert.equal(phone.conversations.get(room).unread, 0);
  await waitFor(() => aev.receipt.length === 1, 5000, "the read receipt");
  assert.deepEqual(aev.receipt[0], { room, user: B, seq: 1 });
  assert.equal(a.conversations.get(room).peer_read_seq, 1);
  await waitFor(() => pc.conversations.get(room).unread === 0, 5000, "the other device clears its badge");
  assert.ok(pcev.read.some((e) => e.room === room && e.user === B && e.seq === 1));
  assert.equal(pc.conversations.totalUnread(), 0);

  // Typing: the others get it; the sender's own devices do not get their own.
  assert.equal(phone.conversations.typing(room), true);
  assert.equal(phone.conversations.typing(room), false, "at most one per typingInterval");
  await waitFor(() => aev.typing.length === 1, 5000, "typing");
  assert.deepEqual(aev.typing[0], { room, user: B });
  await sleep(200);
  assert.equal(pcev.typing.length, 0);
});

test("recall: seen live (tombstone, event), refused to others with 4032, and after a sync from a saved cursor", async () => {
  const A = uid("alice");
  const B = uid("bob");
  const room = dmId(A, B);
  const storage = memoryStorage();
  const a = await online(client(A));
  const b = await online(client(B));
  let away = await online(client(B, { conversations: { storage } }));
  const bev = events(b.conversations, ["recall", "change"]);

  const m1 = await a.conversations.send(room, { text: "one" });
  const m2 = await a.conversations.send(room, { text: "two (oops)" });
  await waitFor(() => b.conversations.get(room) && b.conversations.get(room).last_seq === 2, 5000, "both messages");
  await waitFor(() => away.conversations.get(room) && away.conversations.get(room).last_seq === 2, 5000, "both messages on the other device");
  away.close(); // saves the list and the cursor

  await assert.rejects(b.conversations.recall(room, m1.seq), (e) => e.code === ErrorCode.RECALL_DENIED && e.name === "GatewayError");
  const ack = await a.conversations.recall(room, m2.seq);
  assert.equal(ack.seq, m2.seq);
  await waitFor(() => bev.recall.length === 1, 5000, "the recall event");
  assert.deepEqual(bev.recall[0], { room, seq: m2.seq, by: A, ts: bev.recall[0].ts, source: "live" });
  const cached = b.conversations.messages(room);
  assert.deepEqual(cached.map((m) => m.type), ["chat", "recalled"]);
  assert.equal(b.conversations.get(room).last.type, "recalled", "the list shows the last message as recalled");
  assert.equal(a.conversations.get(room).last.type, "recalled");
  assert.equal(a.conversations.messages(room)[1].data.by, A);

  // The device that was away: the saved list, then the sync's `recalled`.
  away = client(B, { conversations: { storage, user: B } });
  assert.equal(away.conversations.get(room).last.data.text, "two (oops)", "the saved list, before connecting");
  const aev = events(away.conversations, ["recall"]);
  await online(away);
  assert.equal(aev.recall.length, 1);
  assert.equal(aev.recall[0].seq, m2.seq);
  assert.equal(aev.recall[0].source, "sync");
  assert.equal(away.conversations.get(room).last.type, "recalled");
  const page = await away.conversations.history(room);
  assert.deepEqual(page.msgs.map((m) => m.type), ["chat", "recalled"]);
  assert.equal(page.msgs[1].data.by, A);
});

test("groups: create, invite, remove; errors carry the codes 4003, 4031, 4033, 4034", async () => {
  const [O, M, X] = [uid("own"), uid("mem"), uid("out")];
  const o = await online(client(O));
  const m = await online(client(M));
  const x = await online(client(X));
  const mev = events(m.conversations, ["added", "removed", "sendFailed"]);
  const xev = events(x.conversations, ["added"]);

  const created = await o.conversations.createGroup([M], { name: "Study group" });
  const room = created.room;
  assert.match(room, /^group:/);
  const og = o.conversations.get(room);
  assert.equal(og.kind, "group");
  assert.equal(og.role, "owner");
  assert.equal(og.meta.name, "Study group");
  await waitFor(() => m.conversations.get(room) && m.conversations.get(room).kind === "group" && m.conversations.get(room).meta.name === "Study group", 5000, "the member's list has the group");
  assert.deepEqual(mev.added.map((e) => e.room), [room]);
  assert.equal(m.conversations.get(room).role, "member");

  await o.conversations.send(room, { text: "welcome" });
  await waitFor(() => m.conversations.get(room).unread === 1, 5000, "the member's badge");

  // Not a member: 4031; no such group: 4033; a member may not invite (admin rule): 4003.
  await assert.rejects(x.conversations.history(room), (e) => e.code === ErrorCode.NOT_MEMBER);
  await assert.rejects(x.conversations.read(room, 1), (e) => e.code === ErrorCode.NOT_MEMBER);
  await assert.rejects(x.conversations.history("group:nosuch" + n), (e) => e.code === ErrorCode.NO_CONVERSATION);
  await assert.rejects(m.conversations.invite(room, [X]), (e) => e.code === ErrorCode.FORBIDDEN);
  // members_max = 4 on this gateway: the owner and 4 others are too many.
  await assert.rejects(o.conversations.createGroup([uid("a"), uid("b"), uid("c"), uid("d")], {}), (e) => e.code === ErrorCode.TOO_MANY_MEMBERS);

  const inv = await o.conversations.invite(room, [X]);
  assert.deepEqual(inv.added, [X]);
  await waitFor(() => x.conversations.get(room) && x.conversations.get(room).member, 5000, "the invited user's list");
  assert.deepEqual(xev.added.map((e) => e.room), [room]);
  await waitFor(() => m.conversations.get(room).last_seq === 2, 5000, "the system message of the invite");
  assert.equal(m.conversations.get(room).last.type, "system");
  assert.equal(m.conversations.get(room).last.from, null);

  await o.conversations.remove(room, M);
  await waitFor(() => mev.removed.length === 1, 5000, "the removed event");
  assert.equal(m.conversations.get(room).member, false);
  assert.ok(!m.conversations.list({ includeLeft: false }).some((c) => c.room === room));
  // A send into a group one was removed from fails for good: 4031, kept as failed.
  await assert.rejects(m.conversations.send(room, { text: "let me back" }, { cid: "back-1" }), (e) => e.code === ErrorCode.NOT_MEMBER);
  assert.deepEqual(mev.sendFailed.map((e) => [e.cid, e.error.code]), [["back-1", ErrorCode.NOT_MEMBER]]);
  assert.deepEqual(m.conversations.pending(room).map((p) => [p.cid, p.state]), [["back-1", "failed"]]);
  assert.equal(m.conversations.discard("back-1"), true);
  assert.equal(m.conversations.pending(room).length, 0);
  // A member may leave.
  await x.conversations.leave(room);
  await waitFor(() => x.conversations.get(room).member === false, 5000, "left");
});

test("offline sends: queued while disconnected, sent in order after the reconnect's sync, a lost ack re-sent with its cid: each message once", async () => {
  const A = uid("alice");
  const B = uid("bob");
  const room = dmId(A, B);
  const proxy = await new TcpProxy(gw.port).start();
  proxies.push(proxy);
  const wx = fakeMiniProgram("wx");
  const a = new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user: A }, conversations: true, backoffInitial: 100, backoffMax: 300,
    // A refused attempt under the fake wx (Node 20's WebSocket) is noticed at connectTimeout only.
    connectTimeout: 500 });
  clients.push(a);
  await online(a);
  const b = await online(client(B));
  const first = await a.conversations.send(room, { n: 0 });
  assert.equal(first.seq, 1);

  // The next send reaches the server but its ack is lost with the connection.
  let lostId = null;
  wx.intercept = (f) => {
    if (f.op === "ack" && f.id === lostId) {
      setTimeout(() => proxy.cutAll(), 0);
      return true;
    }
    return false;
  };
  const sentBefore = wx.sent.length;
  const lost = a.conversations.send(room, { n: 1 }, { cid: "lost-ack-1" });
  await waitFor(() => wx.sent.slice(sentBefore).some((f) => f.op === "publish" && f.cid === "lost-ack-1"), 2000, "the publish on the wire");
  lostId = wx.sent.slice(sentBefore).find((f) => f.cid === "lost-ack-1").id;
  proxy.refuse = true; // and the reconnect attempts fail for a while
  await waitFor(() => a.state !== "open", 3000, "disconnected");

  // Sends while disconnected: queued, nothing on the wire.
  const queued = [];
  for (let i = 2; i <= 6; i++) queued.push(a.conversations.send(room, { n: i }, { cid: "q-" + i }));
  assert.deepEqual(a.conversations.pending(room).map((p) => [p.cid, p.state]), [["lost-ack-1", "queued"], ...[2, 3, 4, 5, 6].map((i) => ["q-" + i, "queued"])]);
  const onWire = wx.sent.length;
  await sleep(400);
  assert.equal(wx.sent.length, onWire, "nothing sent while disconnected");

  proxy.refuse = false;
  const acks = await Promise.all([lost, ...queued]);
  assert.equal(acks[0].dup, true, "the lost one was stored the first time: the server says dup");
  assert.equal(acks[0].seq, 2);
  assert.deepEqual(acks.map((x) => x.seq), [2, 3, 4, 5, 6, 7], "in order");
  // After the reconnect: the sync went first, then the publishes, in order, the lost one with its cid.
  const reconnected = wx.sent.slice(onWire);
  const syncAt = reconnected.findIndex((f) => f.op === "sync");
  const pubs = reconnected.map((f, i) => [f, i]).filter(([f]) => f.op === "publish");
  assert.ok(syncAt >= 0 && pubs.every(([, i]) => i > syncAt), "sync before the queued sends");
  assert.deepEqual(pubs.map(([f]) => f.cid), ["lost-ack-1", "q-2", "q-3", "q-4", "q-5", "q-6"]);
  assert.equal(a.conversations.pending(room).length, 0);

  const page = await b.conversations.history(room);
  assert.deepEqual(page.msgs.map((m) => [m.seq, m.data.n]), [[1, 0], [2, 1], [3, 2], [4, 3], [5, 4], [6, 5], [7, 6]], "each message once, in order");
  await waitFor(() => b.conversations.get(room).unread === 7, 5000, "B's badge");
  const mine = a.conversations.get(room);
  assert.equal(mine.last_seq, 7);
  assert.equal(mine.unread, 0);
  assert.deepEqual(a.conversations.messages(room).map((m) => m.seq), [1, 2, 3, 4, 5, 6, 7]);
});

test("without conversations the client stays 1.0: no sync, push frames as before", async () => {
  const U = uid("plain");
  const wx = fakeMiniProgram("wx");
  const c = new Client({ url: gw.wsUrl, platform: "wx", api: wx, query: { user: U } });
  clients.push(c);
  const pushes = [];
  c.on("push", (p) => pushes.push(p));
  await c.connect();
  await c.join("live:plain" + n);
  await gw.send(U, "order", { order: 1 });
  await waitFor(() => pushes.length === 1, 5000, "the push");
  assert.equal(pushes[0].room, "notice:" + U);
  assert.equal(wx.sent.filter((f) => f.op === "sync").length, 0, "no sync sent");
  assert.equal(c._conv, null, "the conversations module was never created");
});

test("a push that names a room is not surfaced twice: the notice conversation has it", async () => {
  const U = uid("shopper");
  const c = await online(client(U));
  const pushes = [];
  c.on("push", (p) => pushes.push(p));
  const ev = events(c.conversations, ["message"]);
  const r = await gw.send(U, "order", { order: 42, status: "shipped" });
  assert.equal(r.room, "notice:" + U);
  await waitFor(() => c.conversations.get(r.room) && c.conversations.get(r.room).unread === 1, 5000, "the notice in the list");
  assert.equal(c.conversations.get(r.room).kind, "notice");
  assert.deepEqual(ev.message.map(([m]) => m.data), [{ order: 42, status: "shipped" }]);
  await sleep(200);
  assert.equal(pushes.length, 0);
});

test("requests while closed are rejected with E_CLOSED", async () => {
  const c = await online(client(uid("closer")));
  c.close();
  await assert.rejects(c.conversations.send("dm:a:b", { x: 1 }), (e) => e.code === ErrorCodes.CLOSED);
  await assert.rejects(c.conversations.history("dm:a:b"), (e) => e.code === ErrorCodes.CLOSED);
});
