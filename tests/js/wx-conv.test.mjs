// Conversations in a WeChat mini-program, through the fake `wx` (tests/js/helpers.mjs): the
// app goes to the background and its socket is cut; messages arrive meanwhile (a dm, a new
// group, a notice, a recall); back in the foreground the SDK reconnects and syncs: the list,
// the badges (tab bar included) and a chat page's messages are right, each message once.
// Then sends made in the background on a rate-limited route (5 msgs/s per user, burst 10),
// flushed in order after the sync, and an app restart that shows the saved list before
// connecting and sends what the previous run could not.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, dmId } from "../../clients/js/src/index.js";
import { Gateway, TcpProxy, fakeMiniProgram, waitFor, sleep, convConfig } from "./helpers.mjs";

const A = `alice${process.pid}`;
const B = `bob${process.pid}`;
const DM = dmId(A, B);

let gw;
let proxy;
let wx;
let bob;
let alice;
const closers = [];

/** What the docs' app.js does: the tab bar badge follows totalUnread(). */
function wireTabBar(api, conversations) {
  conversations.on("change", (e) => {
    if (e.total > 0) api.setTabBarBadge({ index: 0, text: e.total > 99 ? "99+" : String(e.total) });
    else api.removeTabBarBadge({ index: 0 });
  });
}

function bobClient(api) {
  const c = new Client({
    url: `ws://127.0.0.1:${proxy.port}/ws`,
    platform: "wx",
    api,
    query: { user: B },
    conversations: { user: B, syncMsgs: 3 },
    showProbeTimeout: 1000,
    backoffInitial: 200,
    backoffMax: 1000,
  });
  c.bindLifecycle();
  wireTabBar(api, c.conversations);
  closers.push(c);
  return c;
}

before(async () => {
  gw = await new Gateway({ name: "wxconv", config: convConfig({ rated: true }) }).start();
  proxy = await new TcpProxy(gw.port).start();
  wx = fakeMiniProgram("wx");
  bob = bobClient(wx);
  alice = new Client({ url: gw.wsUrl, platform: "browser", query: { user: A }, conversations: true });
  closers.push(alice);
});

after(async () => {
  for (const c of closers) c.close();
  if (proxy) await proxy.close();
  if (gw) await gw.stop();
});

const synced = (c) => new Promise((resolve) => c.conversations.once("synced", resolve));

test("background with the socket cut, messages meanwhile, foreground: sync brings the list, badges and every message", async () => {
  const first = Promise.all([synced(bob), synced(alice)]);
  await Promise.all([bob.connect(), alice.connect()]);
  await first;
  const pushes = [];
  bob.on("push", (p) => pushes.push(p));

  await alice.conversations.send(DM, { text: "hello" });
  await waitFor(() => bob.conversations.totalUnread() === 1, 5000, "bob's badge, live");
  await waitFor(() => wx.badges[wx.badges.length - 1] === "1", 2000, "the tab bar badge");

  // The chat page with alice is open: it follows the dm message by message.
  const page = [];
  const unwatch = bob.conversations.watch(DM, { after: 0, onMessage: (m) => page.push(m) });
  assert.deepEqual(page.map((m) => m.seq), [1]);

  const tasksBefore = wx.tasks.length;
  const sentBefore = wx.sent.length;
  wx.background(); // onAppHide: the SDK saves, stops the heartbeat; the task goes silent
  proxy.cutAll(); // and the network drops the connection: no close frame, no onClose
  assert.ok(wx.storage.get(`livegate.conv.${B}`), "the list was saved on hide");

  for (let i = 2; i <= 6; i++) await alice.conversations.send(DM, { text: "m" + i });
  const group = (await alice.conversations.createGroup([B], { name: "Weekend" })).room;
  await alice.conversations.send(group, { text: "g1" });
  await alice.conversations.send(group, { text: "g2" });
  await alice.conversations.recall(DM, 3);
  const notice = await gw.send(B, "order", { order: 7, status: "shipped" });
  assert.equal(notice.delivered, "stored", "bob is offline");
  await sleep(1200);
  assert.equal(wx.tasks.length, tasksBefore, "no reconnect while hidden");
  assert.equal(wx.sent.length, sentBefore, "nothing sent while hidden");
  assert.equal(bob.conversations.totalUnread(), 1, "nothing seen yet");

  const back = synced(bob);
  wx.foreground(); // onAppShow: probe, no pong, reconnect, sync
  const s = await back;
  assert.equal(s.full, false, "a sync from the saved cursor");
  assert.ok(s.count >= 3);
  const after = wx.sent.slice(sentBefore);
  assert.equal(after.find((f) => f.op !== "ping").op, "sync", "the first request after the reconnect is the sync");

  // The list: what changed while away, most recent first, with the right badges.
  const list = bob.conversations.list();
  assert.deepEqual(list.map((c) => c.room), [notice.room, DM, group]);
  assert.deepEqual(list.map((c) => c.unread), [1, 6, 2]);
  assert.deepEqual(list.map((c) => c.kind), ["notice", "dm", "group"]);
  assert.equal(list[0].last.data.status, "shipped");
  assert.equal(list[1].last.data.text, "m6");
  assert.equal(list[2].meta.name, "Weekend");
  assert.equal(bob.conversations.totalUnread(), 9);
  await waitFor(() => wx.badges[wx.badges.length - 1] === "9", 2000, "the tab bar badge after the sync");
  assert.equal(pushes.length, 0, "the notice came once, as a message of the notice conversation");

  // The open chat page got 2..6 in order, once each: 4..6 from the sync (syncMsgs = 3), 2..3
  // fetched with history; 3 as recalled.
  await waitFor(() => page.length === 6, 5000, "the chat page caught up");
  assert.deepEqual(page.map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(page.map((m) => m.type), ["chat", "chat", "recalled", "chat", "chat", "chat"]);
  unwatch();
  const all = await bob.conversations.history(DM, { afterSeq: 0 });
  assert.deepEqual(all.msgs.map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  assert.equal(all.more, false);

  // Reading the dm on the chat page: its badge and the tab bar follow.
  await bob.conversations.read(DM);
  assert.equal(bob.conversations.get(DM).unread, 0);
  assert.equal(bob.conversations.totalUnread(), 3);
  await waitFor(() => wx.badges[wx.badges.length - 1] === "3", 2000, "the tab bar badge after reading");
});

test("sends in the background on a rate-limited route: queued, flushed in order after the sync, 4029 retried with the same cid", async () => {
  wx.background();
  proxy.cutAll();
  const sends = [];
  for (let i = 0; i < 14; i++) sends.push(bob.conversations.send(DM, { n: i }, { cid: `bg-${i}` }));
  assert.equal(bob.conversations.pending(DM).length, 14);
  const back = synced(bob);
  wx.foreground();
  await back;
  const acks = await Promise.all(sends);
  assert.deepEqual(acks.map((a) => a.seq), Array.from({ length: 14 }, (_, i) => 7 + i), "in order, one seq each");
  const refused = wx.received.filter((f) => f.op === "error" && f.code === 4029).length;
  assert.ok(refused >= 1, `the burst of 14 met the 5/s, burst 10 limit (${refused} refusals), and was retried`);
  const publishes = wx.sent.filter((f) => f.op === "publish" && String(f.cid).startsWith("bg-")).map((f) => f.cid);
  assert.deepEqual([...new Set(publishes)], Array.from({ length: 14 }, (_, i) => `bg-${i}`), "first sends in order");
  const page = await bob.conversations.history(DM, { afterSeq: 6 });
  assert.deepEqual(page.msgs.map((m) => m.data.n), Array.from({ length: 14 }, (_, i) => i), "each once, in order");
  assert.equal(bob.conversations.get(DM).unread, 0, "own messages count as read");
  await waitFor(() => alice.conversations.get(DM).unread === 14, 5000, "alice's badge");
});

test("app restart: the saved list shows before connecting; a send the last run could not make goes out", async () => {
  wx.background();
  proxy.cutAll();
  const lastRun = bob.conversations.send(DM, { text: "sent from the background" }, { cid: "restart-1" });
  lastRun.catch(() => {});
  await sleep(500); // the save after the send (saveDelay 300 ms)
  const before = bob.conversations.list().map((c) => [c.room, c.unread]);

  // The app is killed in the background; the user opens it again (same phone, same storage).
  const wx2 = fakeMiniProgram("wx", { storage: wx.storage });
  const bob2 = bobClient(wx2);
  assert.deepEqual(bob2.conversations.list().map((c) => [c.room, c.unread]), before, "the saved list, offline");
  assert.deepEqual(bob2.conversations.pending(DM).map((p) => [p.cid, p.state]), [["restart-1", "queued"]]);
  const sent = new Promise((resolve) => bob2.conversations.once("sent", resolve));
  await bob2.connect();
  const s = await sent;
  assert.equal(s.cid, "restart-1");
  assert.equal(s.seq, 21);
  assert.equal(wx2.sent.find((f) => f.op !== "ping").op, "sync");
  const page = await bob2.conversations.history(DM, { afterSeq: 20 });
  assert.deepEqual(page.msgs.map((m) => [m.seq, m.data.text]), [[21, "sent from the background"]]);
  assert.equal(bob2.conversations.pending().length, 0);
});
