// The SDK over wss:// against a gateway's own TLS listener (issue 13), with certificate
// verification on: a throw-away root CA and intermediate (tests/support/certs.py), a server
// chain for localhost, and Node trusting that root only.
//
// How Node is made to trust it: Node 20's global WebSocket (undici) connects with
// tls.connect and Node's default trust store, and has no documented way to take a CA (the
// SDK takes only a WebSocket constructor; Node 20 exports no undici Agent to build a
// dispatcher with). NODE_EXTRA_CA_CERTS adds certificates to that default store, but Node
// reads it once at start-up, so each check runs tests/js/tls-client.mjs in a child Node
// started with it (and without NODE_TLS_REJECT_UNAUTHORIZED, which would turn verification
// off). A second child started without it must fail to connect: that proves the chain
// really is verified and that nothing else makes the connection succeed.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { Gateway, LOG_DIR, ROOT, makeTestCerts } from "./helpers.mjs";

let gw;
let certs;
let rooms = 0;

before(async () => {
  certs = makeTestCerts(join(LOG_DIR, `tls-${process.pid}`));
  gw = await new Gateway({ name: "tls", tls: { cert: certs.cert, key: certs.key } }).start();
});

after(async () => {
  if (gw) await gw.stop();
});

/** Run tls-client.mjs in a child Node with `env` added; resolves with its JSON result.
 * `connectTimeout`: the SDK's, in ms. */
function child(env, connectTimeout = 8000) {
  const childEnv = { ...process.env, ...env };
  delete childEnv.NODE_TLS_REJECT_UNAUTHORIZED; // never: it turns verification off
  if (!("NODE_EXTRA_CA_CERTS" in env)) delete childEnv.NODE_EXTRA_CA_CERTS;
  // The child needs the global WebSocket as this process has it (run.sh's flag on Node 20).
  const flags = process.execArgv.filter((f) => f === "--experimental-websocket");
  const arg = { url: gw.wssUrl, host: "localhost", port: gw.tlsPort, api: gw.apiPort, room: `live:tls${++rooms}`, connectTimeout };
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ["--no-warnings", ...flags, join(ROOT, "tests", "js", "tls-client.mjs"), JSON.stringify(arg)],
      { cwd: ROOT, env: childEnv, timeout: 30000 },
      (err, stdout, stderr) => {
        const line = stdout.trim().split("\n").pop();
        try {
          resolve(JSON.parse(line));
        } catch (e) {
          reject(new Error(`tls-client.mjs printed no result (${err ? err.message : "exit 0"}):\n${stdout}\n${stderr}`));
        }
      }
    );
  });
}

test("the SDK connects, joins, publishes and receives over wss:// with Node trusting the test root CA", async () => {
  const r = await child({ NODE_EXTRA_CA_CERTS: certs.root });
  const why = `\n${JSON.stringify(r, null, 1)}\ngateway log:\n${gw.logTail(20)}`;
  // The chain (leaf + intermediate) verifies against the root, for the name localhost.
  assert.equal(r.probe.authorized, true, "Node's default store (with NODE_EXTRA_CA_CERTS) verifies the served chain" + why);
  assert.equal(r.probe.alpn, "http/1.1");
  assert.match(r.probe.peer, /^localhost/);
  assert.equal(r.probe.issuer, "livegate test intermediate");
  assert.equal(r.ok, true, "SDK round trip over wss" + why);
  assert.deepEqual(r.adapters, ["browser", "wx"]);
  assert.equal(r.urls[1], gw.wssUrl + "?user=tls-b", "the wx adapter opened the wss:// URL");
  assert.equal(r.protocol, "gateway.v1");
  assert.deepEqual(r.seqs, [1, 2]);
  for (const who of ["a", "b"]) {
    assert.deepEqual(r.received[who], ["hello from a over wss", "hello from b over wss", "from the API"], `${who} received every message once, in order`);
  }
});

test("without the root CA the same client cannot connect: the chain is verified, not waved through", async () => {
  // Node 20's WebSocket fires `error` but no `close` when the TLS handshake fails (undici
  // issue 3546), so the SDK notices the failure only at its connect timeout: keep it short.
  const r = await child({}, 2000);
  const why = `\n${JSON.stringify(r, null, 1)}`;
  assert.equal(r.probe.authorized, false, why);
  assert.match(r.probe.authorizationError, /UNABLE_TO_GET_ISSUER_CERT|SELF_SIGNED|UNABLE_TO_VERIFY/, why);
  assert.equal(r.ok, false, "the SDK must not connect to an untrusted server" + why);
  assert.deepEqual(r.received, { a: [], b: [] });
});
