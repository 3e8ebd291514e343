// Conversations in the SDK against a scripted server (an adapter object, no gateway): the
// orderings a real gateway does not produce on demand. The echo of a send before or after
// its ack (one message, with its cid), sync paging and a sync again when a conversation is
// added during one, a read made offline sent after the sync, a chat page's gap filled with
// history, rooms that are not conversations, and a change of user.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Client, ErrorCodes, memoryStorage, miniProgramStorage, createAdapter } from "../../clients/js/src/index.js";
import { waitFor, sleep, fakeMiniProgram } from "./helpers.mjs";

/** A server scripted by the test: `handlers[op](frame)` answer requests (defaults: an empty
 * sync, empty history pages); `push(frame)` sends a frame; `drop()` cuts the connection. */
function scriptedServer(user = "me") {
  const srv = { user, sent: [], sock: null, connects: 0, cursor: 1000 };
  srv.handlers = {
    sync: (f) => srv.push({ op: "ack", id: f.id, cursor: ++srv.cursor, more: false, next: null, convs: [] }),
    history: (f) => srv.push({ op: "ack", id: f.id, room: f.room, epoch: "e", msgs: [], more: false }),
  };
  srv.adapter = {
    name: "scripted",
    connect() {
      srv.connects++;
      const sock = {
        protocol: "gateway.v1",
        onopen() {},
        onmessage() {},
        onclose() {},
        onerror() {},
        send(text) {
          const f = JSON.parse(text);
          srv.sent.push(f);
          const h = srv.handlers[f.op];
          if (h) setTimeout(() => h(f), 0);
          return true;
        },
        close() {},
      };
      srv.sock = sock;
      setTimeout(() => {
        sock.onopen();
        srv.push({ op: "connected", session: "s" + srv.connects, user: srv.user, heartbeat: 30, ts: Date.now() });
      }, 0);
      return sock;
    },
  };
  srv.push = (f) => srv.sock && srv.sock.onmessage(JSON.stringify(f));
  srv.drop = () => {
    const s = srv.sock;
    srv.sock = null;
    if (s) s.onclose({ code: 1006, reason: "" });
  };
  srv.ops = (op) => srv.sent.filter((f) => f.op === op);
  return srv;
}

const msg = (room, seq, from, data, extra = {}) => ({ op: "msg", room, seq, epoch: "e", type: "chat", prio: 1, from, data, ts: 1000 + seq, ...extra });
const conv = (room, fields = {}) => ({ room, kind: room.split(":")[0], meta: {}, role: "member", member: true, last_seq: 0, read_seq: 0, unread: 0, muted_until: null, updated: 1, last: null, msgs: [], more_msgs: false, recalled: [], peer_read_seq: null, ...fields });

const made = [];
after(() => made.forEach((c) => c.close()));

function make(srv, conversations = true, extra = {}) {
  return track(new Client({ url: "ws://scripted/ws", platform: srv.adapter, conversations, backoffInitial: 10, backoffMax: 20, requestTimeout: 2000, ...extra }));
}

function track(c) {
  made.push(c);
  return c;
}

async function online(c) {
  const synced = new Promise((resolve) => c.conversations.once("synced", resolve));
  await c.connect();
  await synced;
}

test("the echo before the ack: held a moment, one message with its cid; the ack before the echo: the echo is dropped", async () => {
  const srv = scriptedServer("me");
  const c = make(srv);
  await online(c);
  const room = "dm:me:you";
  const got = [];
  c.conversations.on("message", (m, info) => got.push([m.seq, m.cid, info.source]));
  const page = [];
  c.conversations.watch(room, { after: 0, onMessage: (m) => page.push([m.seq, m.cid]) });

  srv.handlers.publish = (f) => {
    srv.push(msg(room, 1, "me", f.data)); // the echo first (what the gateway does)
    srv.push({ op: "ack", id: f.id, seq: 1 });
  };
  const a1 = await c.conversations.send(room, { t: 1 }, { cid: "c1" });
  assert.equal(a1.msg.cid, "c1");
  srv.handlers.publish = (f) => {
    srv.push({ op: "ack", id: f.id, seq: 2 });
    setTimeout(() => srv.push(msg(room, 2, "me", f.data)), 5); // the echo after the ack
  };
  const a2 = await c.conversations.send(room, { t: 2 }, { cid: "c2" });
  assert.equal(a2.msg.cid, "c2");
  await sleep(30);
  assert.deepEqual(got, [[1, "c1", "sent"], [2, "c2", "sent"]], "one message event each, with the cid");
  assert.deepEqual(page, [[1, "c1"], [2, "c2"]]);
  assert.deepEqual(c.conversations.messages(room).map((m) => [m.seq, m.cid]), [[1, "c1"], [2, "c2"]]);
  assert.equal(c.conversations.get(room).unread, 0, "own messages are read");
  c.close();
});

test("sync pages with `before` = next and the same `since`; the first page's cursor is kept; a conversation added during the sync is synced again", async () => {
  const srv = scriptedServer("me");
  let calls = 0;
  srv.handlers.sync = (f) => {
    calls++;
    if (calls === 1) {
      // While the first page is answered, a group is added on another node.
      srv.push({ op: "conv", room: "group:new", event: "added", role: "member" });
      srv.push({ op: "ack", id: f.id, cursor: 5000, more: true, next: [40, "dm:a:me"], convs: [conv("dm:me:z", { last_seq: 3, read_seq: 1, unread: 2, updated: 50 })] });
    } else if (calls === 2) {
      srv.push({ op: "ack", id: f.id, cursor: 5001, more: false, next: null, convs: [conv("dm:a:me", { last_seq: 1, unread: 1, updated: 40 })] });
    } else {
      srv.push({ op: "ack", id: f.id, cursor: 6000, more: false, next: null, convs: [conv("group:new", { updated: 60, meta: { name: "New" } })] });
    }
  };
  const c = make(srv);
  await c.connect();
  await waitFor(() => calls === 3 && c.conversations.cursor === 6000, 2000, "the third sync");
  const syncs = srv.ops("sync");
  assert.equal(syncs[0].since, undefined, "the first sync has no cursor");
  assert.deepEqual(syncs[1].before, [40, "dm:a:me"]);
  assert.equal(syncs[1].since, undefined);
  assert.equal(syncs[2].since, 5000, "the cursor of the first page");
  assert.deepEqual(c.conversations.list().map((x) => [x.room, x.unread]), [["group:new", 0], ["dm:me:z", 2], ["dm:a:me", 1]]);
  assert.equal(c.conversations.get("group:new").meta.name, "New");
  c.close();
});

test("read offline: the badge clears at once; the read is sent after the reconnect's sync, once", async () => {
  const srv = scriptedServer("me");
  const room = "dm:me:you";
  srv.handlers.sync = (f) => srv.push({ op: "ack", id: f.id, cursor: ++srv.cursor, more: false, next: null, convs: [conv(room, { last_seq: 4, read_seq: 1, unread: 3, updated: 9 })] });
  srv.handlers.read = (f) => srv.push({ op: "ack", id: f.id, room, read_seq: f.seq, unread: 4 - f.seq });
  const c = make(srv);
  await online(c);
  assert.equal(c.conversations.totalUnread(), 3);
  srv.drop();
  await waitFor(() => c.state !== "open", 1000, "disconnected");
  const r1 = c.conversations.read(room, 3);
  const r2 = c.conversations.read(room); // up to the last seq (4)
  assert.equal(c.conversations.get(room).unread, 0, "cleared at once");
  const ack = await r2;
  assert.equal(ack.read_seq, 4);
  assert.equal((await r1).read_seq, 4);
  const reads = srv.ops("read");
  assert.deepEqual(reads.map((f) => f.seq), [4], "one read, with the highest seq");
  const all = srv.sent.filter((f) => f.op !== "ping").map((f) => f.op);
  assert.ok(all.lastIndexOf("sync") < all.indexOf("read"), "after the sync");
  assert.equal(c.conversations.get(room).unread, 0);
  // Nothing to send when the server has it already.
  const local = await c.conversations.read(room, 2);
  assert.equal(local.local, true);
  assert.equal(srv.ops("read").length, 1);
  c.close();
});

test("a watched conversation with a hole: held messages wait for the history page that fills it", async () => {
  const srv = scriptedServer("me");
  const room = "group:g";
  srv.handlers.sync = (f) => srv.push({ op: "ack", id: f.id, cursor: ++srv.cursor, more: false, next: null, convs: [conv(room, { last_seq: 2, read_seq: 2, updated: 5 })] });
  srv.handlers.history = (f) => {
    assert.equal(f.after_seq, 2);
    srv.push({ op: "ack", id: f.id, room, epoch: "e", msgs: [msg(room, 3, "x", 3), msg(room, 4, "y", 4, { type: "recalled", data: { by: "y", at: 1 } })], more: false });
  };
  const c = make(srv);
  await online(c);
  const page = [];
  c.conversations.watch(room, { onMessage: (m) => page.push([m.seq, m.type]) });
  srv.push(msg(room, 5, "x", 5)); // 3 and 4 were lost on the way
  await waitFor(() => page.length === 3, 2000, "3, 4, 5");
  assert.deepEqual(page, [[3, "chat"], [4, "recalled"], [5, "chat"]]);
  assert.equal(srv.ops("history").length, 1);
  assert.equal(c.conversations.get(room).unread, 3);
  c.close();
});

test("messages of rooms that are not conversations (a room just left) make no entry; a push that names a room is not surfaced", async () => {
  const srv = scriptedServer("me");
  const c = make(srv);
  await online(c);
  const pushes = [];
  c.on("push", (p) => pushes.push(p));
  srv.push(msg("live:1", 1, "x", 1));
  srv.push({ op: "push", type: "order", data: {}, ts: 1, room: "notice:me", seq: 1 });
  srv.push({ op: "push", type: "kick-notice", data: {}, ts: 1 });
  await sleep(50);
  assert.deepEqual(c.conversations.list(), []);
  assert.deepEqual(pushes.map((p) => p.type), ["kick-notice"], "a push without a room is still a push");
  c.close();
});

test("another user on the same client: the previous user's list stays in storage, their unsent messages are rejected, never sent as the new user", async () => {
  const storage = memoryStorage();
  const srv = scriptedServer("u1");
  const c = make(srv, { storage }, { autoConnect: false });
  const early = c.conversations.send("dm:u1:u3", { t: "queued before connecting" }, { cid: "early" });
  srv.handlers.sync = (f) => srv.push({ op: "ack", id: f.id, cursor: ++srv.cursor, more: false, next: null, convs: [conv("dm:u1:u9", { last_seq: 1, unread: 1, updated: 3 })] });
  srv.handlers.publish = (f) => srv.push({ op: "ack", id: f.id, seq: 7 });
  await online(c);
  assert.equal((await early).seq, 7, "a send made before the user was known is sent as the user that connects");
  srv.handlers.publish = () => {}; // no ack: stays in flight
  const lost = c.conversations.send("dm:u1:u9", { t: "u1's" }, { cid: "u1-msg" });
  await waitFor(() => srv.ops("publish").some((f) => f.cid === "u1-msg"), 1000, "sent");
  srv.drop();
  await waitFor(() => c.state !== "open", 1000, "disconnected");
  srv.user = "u2";
  srv.handlers.sync = (f) => srv.push({ op: "ack", id: f.id, cursor: ++srv.cursor, more: false, next: null, convs: [] });
  await assert.rejects(lost, (e) => e.code === ErrorCodes.CLOSED);
  await waitFor(() => c.state === "open" && c.conversations.user === "u2", 2000, "u2 connected");
  assert.deepEqual(c.conversations.list(), []);
  const saved = JSON.parse(storage.get("livegate.conv.u1"));
  assert.deepEqual(saved.convs.map((x) => x.room).sort(), ["dm:u1:u3", "dm:u1:u9"]);
  assert.deepEqual(saved.outbox, []);
  await sleep(50);
  assert.equal(srv.ops("publish").filter((f) => f.cid === "u1-msg").length, 1, "not sent again as u2");
  c.close();
});

test("each platform's storage: wx, tt, uni (key, data) and Alipay ({key, data}); strings in, strings out, missing keys null", () => {
  for (const kind of ["wx", "tt", "my", "uni"]) {
    const api = fakeMiniProgram(kind);
    const st = createAdapter(kind, api).storage;
    assert.ok(st, kind);
    assert.equal(st.get("k"), null, `${kind}: a missing key`);
    st.set("k", '{"v":1}');
    assert.equal(st.get("k"), '{"v":1}');
    assert.equal(api.storage.get("k"), '{"v":1}', `${kind}: through the platform's API`);
    st.remove("k");
    assert.equal(st.get("k"), null);
  }
  assert.equal(miniProgramStorage({ connectSocket() {} }, "wx"), null, "no storage API: none (the SDK then keeps memory)");
  const c = new Client({ url: "ws://x/ws", platform: { connect() {} }, conversations: true, autoConnect: false });
  c.conversations.storage.set("a", "b");
  assert.equal(c.conversations.storage.get("a"), "b", "an adapter without storage: memory");
  c.close();
});

test("close() rejects unsent messages; connect() again works as before", async () => {
  const srv = scriptedServer("me");
  srv.handlers.publish = () => {}; // never acknowledged
  const c = make(srv);
  await online(c);
  const lost = c.conversations.send("dm:me:you", { t: 1 });
  c.close();
  await assert.rejects(lost, (e) => e.code === ErrorCodes.CLOSED);
  await assert.rejects(c.conversations.send("dm:me:you", { t: 2 }), (e) => e.code === ErrorCodes.CLOSED);
  assert.deepEqual(c.conversations.pending(), []);
  srv.handlers.publish = (f) => srv.push({ op: "ack", id: f.id, seq: 1 });
  await online(c);
  assert.equal((await c.conversations.send("dm:me:you", { t: 3 })).seq, 1);
  c.close();
});
