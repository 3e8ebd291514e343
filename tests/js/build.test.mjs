// The committed single-file build and demo page match the sources.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import vm from "node:vm";
import { buildBundle, buildPage, PAGES } from "../../clients/js/build.mjs";
import { ROOT } from "./helpers.mjs";

test("dist/livegate.js and python/gateway/static/index.html are up to date (node clients/js/build.mjs)", () => {
  const bundle = buildBundle();
  assert.equal(readFileSync(join(ROOT, "clients/js/dist/livegate.js"), "utf8"), bundle, "dist/livegate.js is stale: run node clients/js/build.mjs");
  const page = buildPage(bundle);
  assert.equal(readFileSync(join(ROOT, "python/gateway/static/index.html"), "utf8"), page, "index.html is stale: run node clients/js/build.mjs");
  assert.equal(page.split("__WS_PATH__").length - 1, 1, "the page keeps exactly one __WS_PATH__ placeholder");
  // The desk's pages (/console, /shop) are built the same way.
  for (const [tpl, out] of PAGES) {
    const p = buildPage(bundle, tpl);
    assert.equal(readFileSync(join(ROOT, "python/gateway/static", out), "utf8"), p, `${out} is stale: run node clients/js/build.mjs`);
    assert.equal(p.split("__WS_PATH__").length - 1, 1, `${out} keeps exactly one __WS_PATH__ placeholder`);
  }
});

test("the bundle runs as a plain script (global LiveGate) and as CommonJS", () => {
  const code = readFileSync(join(ROOT, "clients/js/dist/livegate.js"), "utf8");
  const sandbox = { setTimeout, clearTimeout, console };
  sandbox.globalThis = sandbox;
  vm.runInNewContext(code, sandbox);
  assert.equal(typeof sandbox.LiveGate.Client, "function");
  const mod = { exports: {} };
  vm.runInNewContext(code, { module: mod, exports: mod.exports, setTimeout, clearTimeout });
  assert.equal(typeof mod.exports.Client, "function");
  assert.equal(mod.exports.VERSION, JSON.parse(readFileSync(join(ROOT, "clients/js/package.json"), "utf8")).version);
});
