// Child process of tls.test.mjs: the SDK over wss:// in a Node whose trust store was set at
// start-up (NODE_EXTRA_CA_CERTS is read once, before any script runs, which is why this is
// a process of its own). Not a test file: node --test does not pick it up by its name.
//
//   node --experimental-websocket tests/js/tls-client.mjs '{"url", "host", "port", "api", "room", "connectTimeout"}'
//
// It prints one JSON line and exits 0 whatever happened; the parent asserts on it:
// - probe: {authorized, authorizationError, protocol, alpn, peer} of a plain tls.connect to
//   host:port with Node's default trust store (the store the global WebSocket's undici
//   connector uses too): shows which trust is in effect, independently of the SDK;
// - ok, error: two SDK clients (the browser adapter on the global WebSocket, and the wx
//   adapter on a fake wx.connectSocket backed by the same WebSocket) joined `room` over
//   `url`, published to each other, and both received a message published through the
//   HTTP API on `api`;
// - received: what each client received.

import tls from "node:tls";
import { Client } from "../../clients/js/src/index.js";
import { fakeMiniProgram, record, waitFor } from "./helpers.mjs";

const { url, host, port, api, room, connectTimeout } = JSON.parse(process.argv[2]);

function probe() {
  return new Promise((resolve) => {
    const s = tls.connect({ host, port, servername: host, ALPNProtocols: ["http/1.1"] });
    const done = (r) => {
      s.destroy();
      resolve(r);
    };
    s.setTimeout(5000, () => done({ authorized: false, authorizationError: "timeout" }));
    s.on("secureConnect", () => {
      const peer = s.getPeerCertificate(true);
      done({
        authorized: s.authorized,
        authorizationError: s.authorizationError ? String(s.authorizationError) : null,
        protocol: s.getProtocol(),
        alpn: s.alpnProtocol,
        peer: peer && peer.subject ? peer.subject.CN : null,
        issuer: peer && peer.issuer ? peer.issuer.CN : null,
      });
    });
    // Only when verification is off would secureConnect come with authorized: false; with
    // it on (the default), an untrusted chain ends here.
    s.on("error", (e) => done({ authorized: false, authorizationError: e.code || e.message }));
  });
}

async function sdkRoundTrip() {
  const opts = { url, reconnect: false, connectTimeout, requestTimeout: 8000 };
  const wx = fakeMiniProgram("wx");
  const a = new Client({ ...opts, platform: "browser", query: { user: "tls-a" } });
  const b = new Client({ ...opts, platform: "wx", api: wx, query: { user: "tls-b" } });
  const ea = record(a);
  const eb = record(b);
  const texts = (ev) => ev.message.map((e) => (e.v.data && e.v.data.text) || null);
  try {
    const [ja, jb] = await Promise.all([a.join(room), b.join(room)]);
    const ackA = await a.publish(room, { text: "hello from a over wss" });
    const ackB = await b.publish(room, { text: "hello from b over wss" });
    const r = await fetch(`http://127.0.0.1:${api}/v1/publish`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ room, type: "chat", data: { text: "from the API" } }),
    });
    if (r.status !== 200) throw new Error(`API publish answered ${r.status}: ${await r.text()}`);
    for (const [ev, name] of [
      [ea, "a"],
      [eb, "b"],
    ]) {
      for (const t of ["hello from a over wss", "hello from b over wss", "from the API"]) {
        await waitFor(() => texts(ev).includes(t), 5000, `${name} receives "${t}"`);
      }
    }
    return {
      ok: true,
      joined: [ja && ja.room, jb && jb.room],
      seqs: [ackA.seq, ackB.seq],
      adapters: [a.adapter.name, b.adapter.name],
      protocol: wx.lastTask.ws.protocol,
      urls: [a.adapter.name === "browser" ? url : null, wx.calls[0].url],
      received: { a: texts(ea), b: texts(eb) },
    };
  } catch (e) {
    return {
      ok: false,
      error: String((e && e.message) || e),
      disconnects: [...ea.disconnect, ...eb.disconnect].map((d) => d.v),
      received: { a: texts(ea), b: texts(eb) },
    };
  } finally {
    a.close();
    b.close();
  }
}

const result = { probe: await probe(), ...(await sdkRoundTrip()) };
process.stdout.write(JSON.stringify(result) + "\n");
// The closes above complete in the background; do not wait for the sockets to linger.
setTimeout(() => process.exit(0), 200);
