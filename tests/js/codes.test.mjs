// The protocol codes module (clients/js/src/codes.js): the values of docs/protocol.md, the
// only place in the SDK where codes are spelled as numbers, exported by both builds, and
// what a real gateway sends matches it.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { createRequire } from "node:module";
import { Client, ErrorCode, CloseCode, Priority, ABNORMAL_CLOSURE } from "../../clients/js/src/index.js";
import { Gateway, fakeMiniProgram, waitFor, ROOT } from "./helpers.mjs";

/** The codes of a `| code | meaning |` table under `heading` in docs/protocol.md. */
function docTable(heading) {
  const doc = readFileSync(join(ROOT, "docs/protocol.md"), "utf8");
  const start = doc.indexOf(heading);
  assert.ok(start >= 0, heading);
  const codes = [];
  for (const line of doc.slice(start).split("\n").slice(1)) {
    if (line.startsWith("## ")) break;
    const m = /^\|\s*(\d{4})\s*\|/.exec(line);
    if (m) codes.push(Number(m[1]));
  }
  return codes;
}

const values = (o) => Object.values(o).sort((a, b) => a - b);
// Announced by the server team, not yet in docs/protocol.md when this was written.
const PENDING_DOC = { error: [] };

test("the codes are those of docs/protocol.md (UPPER_SNAKE names, plain objects)", () => {
  const errors = docTable("## Error codes");
  const closes = docTable("## Close codes");
  assert.ok(errors.length >= 11 && closes.length >= 13);
  assert.deepEqual(values(ErrorCode), [...new Set([...errors, ...PENDING_DOC.error])].sort((a, b) => a - b));
  assert.equal(ErrorCode.LIMIT_REACHED, 4030);
  assert.deepEqual(values(CloseCode), closes.slice().sort((a, b) => a - b));
  assert.deepEqual(Priority, { LOW: 0, NORMAL: 1, HIGH: 2 });
  for (const o of [ErrorCode, CloseCode, Priority]) {
    assert.equal(Object.getPrototypeOf(o), Object.prototype);
    for (const k of Object.keys(o)) assert.match(k, /^[A-Z][A-Z0-9_]*$/);
    assert.equal(new Set(Object.values(o)).size, Object.keys(o).length, "no value twice");
  }
  assert.equal(ABNORMAL_CLOSURE, 1006);
});

test("the single-file build exports the same codes", () => {
  const L = createRequire(import.meta.url)(join(ROOT, "clients/js/dist/livegate.js"));
  assert.deepEqual(L.ErrorCode, ErrorCode);
  assert.deepEqual(L.CloseCode, CloseCode);
  assert.deepEqual(L.Priority, Priority);
});

test("no other SDK source spells a code as a number", () => {
  const codes = new Set([...values(ErrorCode), ...values(CloseCode), ABNORMAL_CLOSURE]);
  // Numbers that are not codes: milliseconds and bounds.
  const allowed = [/\* 1000\b/, /\b1000 \*/, /MAX_EARLY = 1000;/, /\(5000\)/, /"token", 5000,/, /^\s*(retryDelay|typingInterval): 1000,/];
  const dir = join(ROOT, "clients/js/src");
  const bad = [];
  for (const f of readdirSync(dir)) {
    if (!f.endsWith(".js") || f === "codes.js") continue;
    const code = readFileSync(join(dir, f), "utf8").replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "");
    code.split("\n").forEach((line, i) => {
      for (const m of line.matchAll(/\b\d{4}\b/g)) {
        if (codes.has(Number(m[0])) && !allowed.some((re) => re.test(line))) bad.push(`${f}:${i + 1}: ${line.trim()}`);
      }
    });
  }
  assert.deepEqual(bad, []);
});

let gw;
before(async () => {
  gw = await new Gateway({ name: "codes" }).start();
});
after(async () => {
  if (gw) await gw.stop();
});

test("what the gateway sends matches the codes: error codes, close codes, priorities", async () => {
  const wx = fakeMiniProgram("wx");
  const c = new Client({ url: gw.wsUrl, platform: "wx", api: wx, query: { user: "coder" } });
  const closes = [];
  c.on("close", (e) => closes.push(e));
  const msgs = [];
  await c.join("live:codes", { onMessage: (m) => msgs.push(m) });
  await assert.rejects(c.publish("live:elsewhere", {}), (e) => e.code === ErrorCode.NOT_JOINED);
  await assert.rejects(c.join("nocolon"), (e) => e.code === ErrorCode.INVALID_ROOM);
  await assert.rejects(c.request("frobnicate", {}), (e) => e.code === ErrorCode.UNKNOWN_OP);
  await assert.rejects(c.request("publish", { room: "live:codes" }), (e) => e.code === ErrorCode.BAD_REQUEST);
  await assert.rejects(c.request("join", { room: "user:someone-else" }), (e) => e.code === ErrorCode.FORBIDDEN);

  await c.publish("live:codes", { text: "chat" });
  await c.publish("live:codes", { gift: "rocket" }, { type: "gift" });
  await c.publish("live:codes", { n: 1 }, { type: "like" });
  await waitFor(() => msgs.length === 3, 3000, "3 messages");
  assert.deepEqual(msgs.map((m) => [m.type, m.prio]), [["chat", Priority.NORMAL], ["gift", Priority.HIGH], ["like", Priority.LOW]]);

  await fetch(`http://127.0.0.1:${gw.apiPort}/v1/mute`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ room: "live:codes", user: "coder" }) });
  await assert.rejects(c.publish("live:codes", { text: "muted" }), (e) => e.code === ErrorCode.MUTED);

  await fetch(`http://127.0.0.1:${gw.apiPort}/v1/kick`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user: "coder", reason: "bye" }) });
  await waitFor(() => closes.length === 1, 3000, "kicked");
  assert.equal(closes[0].code, CloseCode.KICKED);
  assert.equal(c.state, "closed");
});
