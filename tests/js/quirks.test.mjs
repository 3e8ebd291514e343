// Mini-program quirks against a real gateway: half-open sockets, failing reconnect attempts
// (backoff), the offline publish queue, close reasons over 123 bytes, token refresh before
// `exp`; plus unit checks of the helpers.

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, ErrorCodes, backoffDelay, DEFAULTS, jwtExp, truncateUtf8, utf8Length, utf8Decode } from "../../clients/js/src/index.js";
import { Gateway, TcpProxy, fakeMiniProgram, waitFor, sleep, record, makeJwt } from "./helpers.mjs";

const SECRET = "js-test-secret-0123456789abcdef0123456789abcdef";

describe("against a dev-auth gateway", () => {
  let gw;
  let proxy;
  const clients = [];
  const track = (c) => (clients.push(c), c);

  before(async () => {
    gw = await new Gateway({ name: "quirks" }).start();
    proxy = await new TcpProxy(gw.port).start();
  });

  after(async () => {
    for (const c of clients) c.close();
    await proxy.close();
    await gw.stop();
  });

  test("half-open socket: no frames, no onClose; 2 missed pongs declare it dead; reconnect and resume", async () => {
    const wx = fakeMiniProgram("wx");
    const c = track(new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user: "half" }, backoffInitial: 100 }));
    const ev = record(c);
    await c.join("live:half");
    await c.publish("live:half", { gift: "a" }, { type: "gift" });
    await waitFor(() => c.position("live:half").seq === 1, 3000, "seq 1");
    proxy.blackholeAll(); // TCP stays up, nothing gets through in either direction
    wx.muteAll(); // and the runtime never reports a close for that socket
    const cutAt = Date.now();
    await gw.publish("live:half", "gift", { gift: "b" });
    await gw.publish("live:half", "gift", { gift: "c" });
    await waitFor(() => ev.disconnect.length === 1, 5000, "declared dead");
    const took = Date.now() - cutAt;
    const d = ev.disconnect[0].v;
    assert.match(d.reason, /heartbeat timeout: 2 pongs missed/);
    // Two ticks (1 s apart) that each find no frame since the previous ping: 1-3 intervals.
    assert.ok(took >= 900 && took < 4500, `detected after 1-3 heartbeat intervals (${took} ms)`);
    await waitFor(() => c.position("live:half").seq === 3, 5000, "resumed to seq 3");
    assert.deepEqual(
      ev.message.map((e) => e.v.data.gift),
      ["a", "b", "c"]
    );
    assert.equal(c.state, "open");
  });

  test("onShow after a background longer than the idle timeout reconnects at once, without probing", async () => {
    const wx = fakeMiniProgram("wx");
    const c = track(new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user: "longbg" }, showProbeTimeout: 5000 }));
    c.bindLifecycle();
    await c.join("live:longbg");
    wx.background(); // the server closes the socket after 3 s idle; the app never hears of it
    const seq = (await gw.publish("live:longbg", "admin", { action: "pin" })).seq;
    await sleep(3500);
    const pings = wx.sent.filter((f) => f.op === "ping").length;
    const shown = Date.now();
    wx.foreground();
    await waitFor(() => wx.calls.length === 2, 1000, "immediate reconnect");
    assert.ok(Date.now() - shown < 500, "no probe wait");
    assert.equal(wx.sent.filter((f) => f.op === "ping").length, pings, "no probe ping on the dead socket");
    await waitFor(() => c.position("live:longbg").seq === seq, 3000, "admin message recovered");
  });

  test("failing reconnect attempts back off exponentially (capped, with jitter); queued publishes go out after", async () => {
    const wx = fakeMiniProgram("wx");
    const c = track(
      new Client({
        url: `ws://127.0.0.1:${proxy.port}/ws`,
        platform: "wx",
        api: wx,
        query: { user: "retry" },
        backoffInitial: 100,
        backoffMax: 800,
        backoffJitter: 0.2,
        offlineQueueSize: 3,
        connectTimeout: 400, // a handshake the network swallows never reports anything
      })
    );
    const ev = record(c);
    await c.join("live:retry");
    proxy.refuse = true; // later attempts: the TCP connection is reset during the handshake
    wx.failNext = 2; // first two attempts: connectSocket fails (fail + onError + onClose)
    proxy.cutAll(); // the runtime sees the close (1006)
    await waitFor(() => ev.disconnect.length === 1, 3000, "disconnect seen");
    // Publishes while disconnected are queued (bounded).
    const queued = [c.publish("live:retry", { text: "q1" }), c.publish("live:retry", { text: "q2" }), c.publish("live:retry", { text: "q3" })];
    await assert.rejects(c.publish("live:retry", { text: "q4" }), (e) => e.code === ErrorCodes.QUEUE_FULL);
    assert.equal(c.queued, 3);
    await waitFor(() => wx.calls.length >= 6, 8000, "several failed attempts");
    proxy.refuse = false;
    const acks = await Promise.all(queued);
    assert.deepEqual(acks.map((a) => a.seq), [1, 2, 3], "queued publishes sent in order after the resume");
    const delays = ev.reconnecting.map((e) => e.v.delay);
    for (let i = 0; i < delays.length; i++) {
      const base = Math.min(800, 100 * 2 ** i);
      assert.ok(delays[i] >= base * 0.8 - 1 && delays[i] <= base, `attempt ${i}: ${delays[i]} ms within [${base * 0.8}, ${base}]`);
    }
    assert.ok(delays.some((x) => x >= 640), "reached the cap");
    // Measured gaps between connectSocket calls follow the delays.
    const retries = wx.calls.slice(1); // calls[0] is the first connection
    const gaps = retries.slice(1).map((x, i) => x.time - retries[i].time);
    assert.ok(gaps[gaps.length - 1] >= gaps[0], `gaps grow: ${gaps.join(",")}`);
    assert.equal(c.state, "open");
  });

  test('offline: "reject" rejects publishes with E_OFFLINE while disconnected', async () => {
    const wx = fakeMiniProgram("wx");
    const c = track(new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user: "rej" }, offline: "reject", backoffInitial: 300 }));
    await c.join("live:rej");
    proxy.cutAll();
    await waitFor(() => c.state === "reconnecting", 3000, "reconnecting");
    await assert.rejects(c.publish("live:rej", { text: "x" }), (e) => e.code === ErrorCodes.OFFLINE && /not connected/.test(e.message));
    await waitFor(() => c.state === "open", 5000, "back");
    await waitFor(async () => (await c.publish("live:rej", { text: "y" }).then(() => true, () => false)), 3000, "publish after reconnect");
  });

  test("a publish in flight when the connection drops is sent again (same cid) after the reconnect, not rejected", async () => {
    const wx = fakeMiniProgram("wx");
    const c = track(new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user: "inflight" }, backoffInitial: 100 }));
    await c.join("live:inflight");
    proxy.blackholeAll();
    const p = c.publish("live:inflight", { text: "lost?" });
    await sleep(50);
    proxy.cutAll();
    const ack = await p;
    assert.ok(ack.seq > 0);
    const sends = wx.sent.filter((f) => f.op === "publish");
    assert.equal(sends.length, 2);
    assert.equal(sends[0].cid, sends[1].cid);
  });

  test("close reasons are cut to 123 UTF-8 bytes; invalid close codes become 1000", async () => {
    const wx = fakeMiniProgram("wx");
    const c = new Client({ url: gw.wsUrl, platform: "wx", api: wx, query: { user: "closer" } });
    await c.connect();
    c.close(1006, "é".repeat(100) + "😀".repeat(20));
    const { code, reason } = wx.closes[0];
    assert.equal(code, 1000);
    assert.ok(utf8Length(reason) <= 123, `reason is ${utf8Length(reason)} bytes`);
    assert.equal(reason, "é".repeat(61), "cut on a character boundary");
    assert.equal(wx.badCloses || 0, 0);
    const b = new Client({ url: gw.wsUrl, platform: "browser", query: { user: "closer2" } });
    await b.connect();
    b.close(4321, "x".repeat(500)); // the real WebSocket throws on > 123 bytes; the SDK cuts
    assert.equal(b.state, "closed");
  });

  test("banned from a room / room closed by the API: the room is forgotten and not rejoined", async () => {
    const wx = fakeMiniProgram("wx");
    const c = track(new Client({ url: `ws://127.0.0.1:${proxy.port}/ws`, platform: "wx", api: wx, query: { user: "banme" }, backoffInitial: 50 }));
    const removed = [];
    c.on("removed", (e) => removed.push(e));
    await c.join("live:ban");
    await c.join("live:closeme");
    await c.join("live:stay");
    const api = (path, body) =>
      fetch(`http://127.0.0.1:${gw.apiPort}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body || {}) });
    assert.equal((await api("/v1/ban", { room: "live:ban", user: "banme", seconds: 60 })).status, 200);
    assert.equal((await api("/v1/rooms/live:closeme/close")).status, 200);
    await waitFor(() => removed.length === 2, 3000, "two removed events");
    assert.deepEqual(removed.map((e) => [e.room, e.reason]).sort(), [["live:ban", "banned"], ["live:closeme", "closed"]]);
    assert.deepEqual(c.rooms(), ["live:stay"]);
    await assert.rejects(c.join("live:ban"), (e) => e.code === 4010);
    proxy.cutAll();
    await waitFor(() => wx.calls.length === 2 && c.state === "open", 5000, "reconnected");
    await waitFor(() => wx.sent.filter((f) => f.op === "join" && f.resume).length >= 1, 3000, "resumed");
    const resumed = wx.sent.filter((f) => f.op === "join" && f.resume).map((f) => f.room);
    assert.deepEqual(resumed, ["live:stay"], "only the remaining room is resumed");
  });

  test("the server's kick (close 4003) ends the client without reconnect loops", async () => {
    const wx = fakeMiniProgram("wx");
    const c = new Client({ url: gw.wsUrl, platform: "wx", api: wx, query: { user: "kickme" }, backoffInitial: 50 });
    const ev = record(c, ["close"]);
    await c.join("live:kick");
    const r = await fetch(`http://127.0.0.1:${gw.apiPort}/v1/kick`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: "kickme", reason: "bye" }),
    });
    assert.equal(r.status, 200, await r.text());
    await waitFor(() => ev.close.length === 1, 3000, "close event");
    assert.equal(ev.close[0].v.code, 4003);
    await sleep(300);
    assert.equal(wx.calls.length, 1, "no reconnect after a kick");
    assert.equal(c.state, "closed");
  });
});

describe("against a JWT gateway", () => {
  let gw;
  let proxy;

  before(async () => {
    gw = await new Gateway({ name: "jwt", sets: ["auth.mode=jwt", `auth.secret=${SECRET}`] }).start();
    proxy = await new TcpProxy(gw.port).start();
  });

  after(async () => {
    await proxy.close();
    await gw.stop();
  });

  test("getToken is called before exp; the next connection uses the fresh token", async () => {
    const wx = fakeMiniProgram("wx");
    const issued = [];
    const mint = (ttl) => {
      const t = makeJwt(SECRET, { sub: "tok-user", exp: Math.floor(Date.now() / 1000) + ttl });
      issued.push({ t, at: Date.now() });
      return t;
    };
    const first = mint(7); // refreshed at about half its lifetime (margin 60 s > lifetime / 2)
    const calls = [];
    const c = new Client({
      url: `ws://127.0.0.1:${proxy.port}/ws`,
      platform: "wx",
      api: wx,
      token: first,
      getToken: (old) => {
        calls.push({ old, at: Date.now() });
        return new Promise((resolve) => setTimeout(() => resolve(mint(60)), 20));
      },
      backoffInitial: 100,
    });
    try {
      const f = await c.connect();
      assert.equal(f.user, "tok-user");
      assert.ok(wx.calls[0].url.includes("token=" + first));
      await waitFor(() => calls.length === 1, 5000, "getToken called");
      const expMs = jwtExp(first) * 1000;
      assert.ok(calls[0].at < expMs, "refreshed before exp");
      assert.equal(calls[0].old, first);
      // At exp the gateway closes the connection with 4001 (token expired); the SDK
      // reconnects at once with a fresh token, never the expired one.
      await sleep(Math.max(0, expMs - Date.now() + 300));
      await waitFor(() => wx.calls.length >= 2 && c.state === "open", 5000, "reconnected");
      const fresh = issued.slice(1).map((x) => x.t);
      assert.ok(fresh.some((t) => wx.calls[1].url.includes("token=" + t)), "reconnected with a fresh token");
      assert.ok(!wx.calls[1].url.includes("token=" + first), "not with the expired one");
    } finally {
      c.close();
    }
  });

  test("token sent as a subprotocol entry (token.<JWT>) next to gateway.v1, which is echoed", async () => {
    const wx = fakeMiniProgram("wx");
    const token = makeJwt(SECRET, { sub: "proto-user", exp: Math.floor(Date.now() / 1000) + 60 });
    const c = new Client({ url: gw.wsUrl, platform: "wx", api: wx, token, tokenIn: "protocol" });
    try {
      const opened = new Promise((resolve) => c.once("open", resolve));
      const f = await c.connect();
      assert.equal(f.user, "proto-user");
      assert.deepEqual(wx.calls[0].protocols, ["gateway.v1", "token." + token]);
      assert.equal((await opened).protocol, "gateway.v1");
    } finally {
      c.close();
    }
  });

  test("an expired token without getToken: attempts fail (401) and keep backing off", async () => {
    const wx = fakeMiniProgram("wx");
    const token = makeJwt(SECRET, { sub: "old", exp: Math.floor(Date.now() / 1000) - 10 });
    const c = new Client({ url: gw.wsUrl, platform: "wx", api: wx, token, backoffInitial: 50, backoffMax: 200, maxReconnectAttempts: 3, connectTimeout: 1000 });
    await assert.rejects(c.connect(), (e) => e.code === ErrorCodes.CLOSED && /gave up after 3/.test(e.message));
    assert.equal(wx.calls.length, 4);
    assert.equal(c.state, "closed");
  });
});

describe("helpers", () => {
  test("jwtExp reads exp without verifying (base64url, unicode claims)", () => {
    const t = makeJwt("x", { sub: "用户", exp: 1893456000 });
    assert.equal(jwtExp(t), 1893456000);
    assert.equal(jwtExp("not.a.jwt"), null);
    assert.equal(jwtExp("abc"), null);
    assert.equal(jwtExp(makeJwt("x", { sub: "no-exp" })), null);
  });

  test("truncateUtf8 and utf8Decode", () => {
    assert.equal(truncateUtf8("abc", 123), "abc");
    assert.equal(truncateUtf8("😀😀", 5), "😀");
    assert.equal(truncateUtf8("a".repeat(200)).length, 123);
    const s = "héllo 漢字 😀";
    assert.equal(utf8Decode(Buffer.from(s)), s);
    assert.equal(utf8Length(s), Buffer.byteLength(s));
    assert.equal(utf8Decode([0xff, 0x41]), "\ufffdA");
  });

  test("backoffDelay: exponential, capped, jittered downwards", () => {
    const o = { ...DEFAULTS, backoffInitial: 500, backoffMax: 30000, backoffFactor: 2, backoffJitter: 0.5 };
    assert.equal(backoffDelay(0, o, () => 1), 500);
    assert.equal(backoffDelay(0, o, () => 0), 250);
    assert.equal(backoffDelay(3, o, () => 1), 4000);
    assert.equal(backoffDelay(20, o, () => 1), 30000);
    assert.equal(backoffDelay(20, o, () => 0), 15000);
  });
});
