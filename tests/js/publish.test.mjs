// Idempotent publish against a real gateway that records every publish it receives
// (tests/js/cidapp.py): each publish carries a `cid`; one whose ack was lost with the
// connection is sent again, with the same `cid`, after the reconnect and rejoin. Pending
// publishes are bounded and time out.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { Client, ErrorCodes } from "../../clients/js/src/index.js";
import { Gateway, TcpProxy, fakeMiniProgram, waitFor, sleep, LOG_DIR } from "./helpers.mjs";

const CID_LOG = join(LOG_DIR, `cids-${process.pid}.jsonl`);
let gw;
let proxy;
const clients = [];

before(async () => {
  gw = await new Gateway({ name: "cid", app: "tests.js.cidapp:make_app", sets: [`plugins.cidlog.path="${CID_LOG}"`] }).start();
  proxy = await new TcpProxy(gw.port).start();
});

after(async () => {
  for (const c of clients) c.close();
  if (proxy) await proxy.close();
  if (gw) await gw.stop();
});

/** Publish frames the gateway received (in order). */
function received(filter = () => true) {
  if (!existsSync(CID_LOG)) return [];
  return readFileSync(CID_LOG, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l)).filter(filter);
}

function newClient(user, opts = {}) {
  const wx = fakeMiniProgram("wx");
  const c = new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user }, backoffInitial: 100, backoffMax: 500, ...opts });
  clients.push(c);
  return { c, wx };
}

/** Publish `data` with the connection cut right after the gateway acknowledged it, the ack
 * never reaching the SDK. Returns the publish promise's result and the cid. */
async function publishLosingTheAck(c, wx, room, data) {
  let lost = null;
  wx.intercept = (f) => {
    const sent = wx.sent.find((s) => s.op === "publish" && s.id === f.id && s.data && s.data.k === data.k);
    if (f.op === "ack" && sent && !lost) {
      lost = f;
      setImmediate(() => proxy.cutAll()); // the network drops before the ack is read
      return true;
    }
    return false;
  };
  const p = c.publish(room, data);
  await waitFor(() => lost, 3000, "the first ack (swallowed)");
  wx.intercept = null;
  return { ack: await p, lost };
}

test("every publish carries a cid: 16 random base36 characters, or the caller's", async () => {
  const { c, wx } = newClient("cidform");
  await c.join("live:cidform");
  await c.publish("live:cidform", { k: "a" });
  await c.publish("live:cidform", { k: "b" });
  await c.publish("live:cidform", { k: "c" }, { cid: "order-42-msg-1" });
  const cids = wx.sent.filter((f) => f.op === "publish").map((f) => f.cid);
  assert.match(cids[0], /^[0-9a-z]{16}$/);
  assert.match(cids[1], /^[0-9a-z]{16}$/);
  assert.notEqual(cids[0], cids[1]);
  assert.equal(cids[2], "order-42-msg-1");
  assert.deepEqual(received((r) => r.room === "live:cidform").map((r) => r.cid), cids, "the gateway received them");
  await assert.rejects(c.publish("live:cidform", {}, { cid: "" }), TypeError);
  await assert.rejects(c.publish("live:cidform", {}, { cid: "x".repeat(65) }), TypeError);
});

test("a publish whose ack is lost with the connection is sent again after the reconnect and rejoin, with the same cid", async () => {
  const room = "live:resend";
  const { c, wx } = newClient("resender");
  const reconnected = [];
  c.on("connected", () => reconnected.push(Date.now()));
  await c.join(room);
  const { ack, lost } = await publishLosingTheAck(c, wx, room, { k: "once" });
  assert.equal(ack.op, "ack");
  assert.ok(ack.seq > 0);
  assert.equal(reconnected.length, 2, "resolved on the second connection");

  const got = received((r) => r.room === room);
  assert.equal(got.length, 2, "the gateway received the publish twice");
  assert.equal(got[0].cid, got[1].cid, "with the same cid");
  assert.match(got[0].cid, /^[0-9a-z]{16}$/);
  const wire = wx.sent.filter((f) => f.op === "publish" && f.cid === got[0].cid);
  assert.equal(wire.length, 2, "two publish frames went out with that cid");
  assert.notEqual(wire[0].id, wire[1].id, "the resend is a new request");
  assert.equal(lost.id, wire[0].id);
  // The resend went out after the room was rejoined on the new connection.
  const frames = wx.sent.map((f) => `${f.op}:${f.room || ""}:${f.cid || ""}`);
  const rejoin = frames.findIndex((x, i) => i > frames.indexOf(`publish:${room}:${got[0].cid}`) && x === `join:${room}:`);
  assert.ok(rejoin > 0 && frames.lastIndexOf(`publish:${room}:${got[0].cid}`) > rejoin, frames.join(" "));
  assert.equal(c.queued, 0);
});

// A repeated cid (within broker.idempotency_ttl) is answered with the original seq and
// "dup": true, without publishing again.
test(
  "the server answers the resent cid with the original seq (dup: true) and publishes once",
  async () => {
    const room = "live:dedup";
    const { c, wx } = newClient("deduper");
    await c.join(room);
    const { ack, lost } = await publishLosingTheAck(c, wx, room, { k: "dedup" });
    assert.equal(ack.dup, true, "the resend was recognised");
    assert.equal(ack.seq, lost.seq, "with the original seq");
    const { c: reader } = newClient("dedup-reader");
    const msgs = [];
    await reader.join(room, { history: 50, onMessage: (m) => msgs.push(m) });
    assert.equal(msgs.filter((m) => m.data && m.data.k === "dedup").length, 1, "exactly one message in the history");
  }
);

test("pending publishes time out (publishTimeout) with a clear error, and are bounded (maxPendingPublishes)", async () => {
  const room = "live:pending";
  const { c, wx } = newClient("pending", { publishTimeout: 1200, maxPendingPublishes: 2, connectTimeout: 1000 });
  await c.join(room);
  proxy.blackholeAll(); // the publish goes out, nothing comes back
  const p1 = c.publish(room, { k: 1 });
  const p2 = c.publish(room, { k: 2 });
  await assert.rejects(c.publish(room, { k: 3 }), (e) => e.code === ErrorCodes.QUEUE_FULL && /too many publishes waiting/.test(e.message));
  proxy.refuse = true; // and reconnects fail
  await sleep(50);
  proxy.cutAll();
  const t0 = Date.now();
  const [r1, r2] = await Promise.allSettled([p1, p2]);
  for (const r of [r1, r2]) {
    assert.equal(r.status, "rejected");
    assert.equal(r.reason.code, ErrorCodes.TIMEOUT);
    assert.match(r.reason.message, /no ack for the publish into live:pending \(cid [0-9a-z]{16}\) within 1200 ms, sent 1 time\(s\): it may or may not have been published/);
  }
  assert.ok(Date.now() - t0 < 2000);
  assert.equal(c.queued, 0, "nothing left to resend");
  proxy.refuse = false;
  await waitFor(() => c.state === "open", 5000, "reconnected");
  const ack = await c.publish(room, { k: 4 });
  assert.ok(ack.seq > 0, "publishing works again (the bound counts settled publishes out)");
  assert.equal(wx.sent.filter((f) => f.op === "publish" && f.data.k === 1).length, 1, "the timed-out publish is not resent");
});
