// Test helpers: a real gateway process, a TCP proxy that can cut or black-hole connections,
// and fake mini-program APIs (wx, tt, my, uni) backed by Node's real WebSocket.
// Run with: node --experimental-websocket --test tests/js/

import { spawn, execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync, existsSync } from "node:fs";
import net from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

export { sleep };
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const LOG_DIR = join(ROOT, "target", "js-test-logs");

if (typeof WebSocket === "undefined") {
  throw new Error("no global WebSocket: run with `node --experimental-websocket --test tests/js/` (Node 20) or Node >= 22");
}

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Poll `fn` until it returns a truthy value (returned) or `timeout` ms pass (throws). */
export async function waitFor(fn, timeout = 5000, what = "condition") {
  const end = Date.now() + timeout;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** Default routes plus a merge-window route (`merge:{id}`, 50 ms), as a TOML config. */
export const MERGE_CONFIG = `
[[routes]]
pattern = "merge:{id}"
merge_ms = 50
merge_max = 20
user_rate = 0.0
room_rate = 0.0

[[routes]]
pattern = "live:{room_id}"

[[routes]]
pattern = "user:{user_id}"
join = "owner"
publish = "none"

[[routes]]
pattern = "cs:{session_id}"
join = "acl"
publish = "acl"
room_rate = 20.0
room_burst = 40

[[routes]]
pattern = "*"
`;

/** Conversation routes (protocol 1.1) as in tests/integration/test_conversations.py: dms and
 * groups without rate limits (`rated = true`: the dm route keeps the default 5 msgs/s per
 * user, burst 10), notices, a live room route and the catch-all. */
export function convConfig({ rated = false, groupMax = 50, recallSeconds = 60 } = {}) {
  const rate = rated ? "" : "user_rate = 0\nroom_rate = 0\n";
  return `
[[routes]]
pattern = "dm:{a}:{b}"
kind = "dm"
join = "none"
store = "durable"
members_max = 2
${rate}
[[routes]]
pattern = "group:{group_id}"
kind = "group"
join = "none"
store = "durable"
members_max = ${groupMax}
user_rate = 0
room_rate = 0
recall_seconds = ${recallSeconds}

[[routes]]
pattern = "notice:{user_id}"
kind = "notice"
join = "none"
publish = "none"
store = "durable"
members_max = 1

[[routes]]
pattern = "live:{room_id}"

[[routes]]
pattern = "*"
`;
}

export const BASE_SETS = [
  "auth.mode=dev",
  "log.json=false",
  "log.level=info",
  "heartbeat.interval=1",
  "heartbeat.idle_timeout=3",
  "presence.interval=1",
  "drain.timeout=5",
  "drain.retry_ms=1500",
];

let gwCount = 0;

/** The Python that runs gateways (and the test-certificate helper). */
export function pythonPath() {
  const python = process.env.LIVEGATE_PYTHON || join(ROOT, ".venv", "bin", "python");
  if (!existsSync(python)) throw new Error(`${python} not found: build the project first (make build)`);
  return python;
}

/** A throw-away root CA, intermediate and server certificate for localhost, 127.0.0.1 and
 * ::1 in `dir` (Node has no certificate generator: tests/support/certs.py, run as a module):
 * {root, cert, key} file paths. `cert` is the chain (leaf + intermediate); clients must
 * trust `root` only. */
export function makeTestCerts(dir) {
  mkdirSync(dir, { recursive: true });
  const out = execFileSync(pythonPath(), ["-m", "support.certs", dir], { cwd: join(ROOT, "tests"), encoding: "utf8", timeout: 30000 });
  return JSON.parse(out.trim().split("\n").pop());
}

/** Resolves once something accepts TCP connections on 127.0.0.1:`port`. */
function tcpOpen(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.on("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.on("error", () => resolve(false));
  });
}

/** One `python -m gateway run` process on `port`/`apiPort` (free ones when omitted). */
export class Gateway {
  /** `app`: a `module:attr` for `--app` (e.g. "tests.js.cidapp:make_app"; the gateway runs
   * from the repository root). `tls`: {cert, key} PEM files (see makeTestCerts): a wss://
   * listener on `tlsPort` (a free one when omitted) besides the plain one. */
  constructor({ name = "gw", port, apiPort, sets = [], config = null, app = null, tls = null, tlsPort } = {}) {
    this.name = `${name}-${process.pid}-${++gwCount}`;
    this.port = port;
    this.apiPort = apiPort;
    this.sets = [...BASE_SETS, ...sets];
    this.config = config;
    this.app = app;
    this.tls = tls;
    this.tlsPort = tlsPort;
    this.proc = null;
    this.exitCode = null;
    mkdirSync(LOG_DIR, { recursive: true });
    this.logPath = join(LOG_DIR, this.name + ".log");
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** wss://localhost:<tlsPort>/ws: the name the test certificates carry. */
  get wssUrl() {
    if (!this.tls) throw new Error("gateway started without tls");
    return `wss://localhost:${this.tlsPort}/ws`;
  }

  async start(timeout = 40000) {
    if (!this.port) this.port = await freePort();
    if (!this.apiPort) this.apiPort = await freePort();
    const python = pythonPath();
    const args = ["-m", "gateway", "run", "--host", "127.0.0.1", "--port", String(this.port), "--api-port", String(this.apiPort)];
    if (this.tls) {
      if (!this.tlsPort) this.tlsPort = await freePort();
      args.push("--tls-cert", this.tls.cert, "--tls-key", this.tls.key, "--tls-port", String(this.tlsPort));
    }
    if (this.config) {
      const p = join(LOG_DIR, this.name + ".toml");
      writeFileSync(p, this.config);
      args.push("--config", p);
    }
    if (this.app) args.push("--app", this.app);
    // Each gateway keeps its messages in its own file (routes with store = "durable").
    args.push("--set", `store.path=${join(LOG_DIR, this.name + "-store.db")}`);
    for (const s of this.sets) args.push("--set", s);
    const env = {};
    for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("GATEWAY_")) env[k] = v;
    env.PYTHONUNBUFFERED = "1";
    const { openSync } = await import("node:fs");
    const fd = openSync(this.logPath, "a");
    this.proc = spawn(python, args, { cwd: ROOT, env, stdio: ["ignore", fd, fd] });
    this.exited = new Promise((resolve) =>
      this.proc.on("exit", (code, signal) => {
        this.exitCode = code === null ? signal : code;
        resolve(this.exitCode);
      })
    );
    const end = Date.now() + timeout;
    while (Date.now() < end) {
      if (this.exitCode !== null) throw new Error(`gateway exited (${this.exitCode}) during start-up:\n${this.logTail()}`);
      try {
        const r = await fetch(this.httpUrl + "/healthz");
        const a = await fetch(`http://127.0.0.1:${this.apiPort}/readyz`);
        if (r.status === 200 && a.status === 200 && (!this.tls || (await tcpOpen(this.tlsPort)))) return this;
      } catch (e) {
        // not up yet
      }
      await sleep(50);
    }
    this.proc.kill("SIGKILL");
    throw new Error(`gateway not ready within ${timeout} ms:\n${this.logTail()}`);
  }

  logTail(lines = 40) {
    try {
      return readFileSync(this.logPath, "utf8").split("\n").slice(-lines).join("\n");
    } catch (e) {
      return "";
    }
  }

  /** POST /v1/publish on the internal API (no rate limits): {room, seq, epoch}. */
  async publish(room, type, data, extra = {}) {
    const r = await fetch(`http://127.0.0.1:${this.apiPort}/v1/publish`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ room, type, data, ...extra }),
    });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`publish failed (${r.status}): ${JSON.stringify(body)}`);
    return body;
  }

  /** POST /v1/send on the internal API: a notice to `user` (stored in notice:<user>). */
  async send(user, type, data) {
    const r = await fetch(`http://127.0.0.1:${this.apiPort}/v1/send`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user, type, data }),
    });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`send failed (${r.status}): ${JSON.stringify(body)}`);
    return body;
  }

  /** GET /v1/stats on the internal API. */
  async stats() {
    const r = await fetch(`http://127.0.0.1:${this.apiPort}/v1/stats`);
    return r.json();
  }

  signal(sig = "SIGTERM") {
    if (this.proc && this.exitCode === null) this.proc.kill(sig);
  }

  /** SIGTERM (graceful drain), SIGKILL after `timeout` ms; resolves with the exit code.
   * Throws if the gateway did not exit 0 or logged a Python traceback. */
  async stop(timeout = 15000) {
    if (!this.proc) return null;
    if (this.exitCode === null) {
      this.proc.kill("SIGTERM");
      const t = setTimeout(() => this.proc.kill("SIGKILL"), timeout);
      await this.exited;
      clearTimeout(t);
    }
    let log = "";
    try {
      log = readFileSync(this.logPath, "utf8");
    } catch (e) {
      // no log
    }
    if (this.exitCode !== 0 || log.includes("Traceback")) {
      throw new Error(`gateway ${this.name} exited with ${this.exitCode}${log.includes("Traceback") ? " and logged a traceback" : ""}:\n${this.logTail(60)}`);
    }
    return this.exitCode;
  }
}

export async function startGateway(opts) {
  return new Gateway(opts).start();
}

/**
 * A TCP proxy in front of the gateway, to break connections the way networks do:
 * - `cutAll()`: destroy every connection (no WebSocket close frame, like a lost network);
 * - `blackholeAll()`: keep the TCP connections but drop all bytes (a half-open socket);
 * - `refuse = true`: new connections are closed at once (failing reconnect attempts);
 * - `pauseDownstream()` / `resumeDownstream()`: stop reading from the gateway (a client that
 *   does not read: the gateway's socket buffer and outbound queue fill up) and resume.
 */
export class TcpProxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.refuse = false;
    this.pairs = new Set();
    this.accepted = 0;
    this.server = net.createServer((c) => this._onConn(c));
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = this.server.address().port;
    return this;
  }

  _onConn(c) {
    this.accepted++;
    if (this.refuse) {
      c.destroy();
      return;
    }
    const u = net.connect(this.targetPort, "127.0.0.1");
    const pair = { c, u, hole: false };
    this.pairs.add(pair);
    const end = () => {
      this.pairs.delete(pair);
      c.destroy();
      u.destroy();
    };
    c.on("data", (d) => {
      if (!pair.hole) u.write(d);
    });
    u.on("data", (d) => {
      if (!pair.hole) c.write(d);
    });
    c.on("error", end);
    u.on("error", end);
    c.on("close", () => (pair.hole ? null : end()));
    u.on("close", () => (pair.hole ? null : end()));
  }

  get connections() {
    return this.pairs.size;
  }

  cutAll() {
    for (const p of this.pairs) {
      p.c.destroy();
      p.u.destroy();
    }
    this.pairs.clear();
  }

  blackholeAll() {
    for (const p of this.pairs) p.hole = true;
  }

  pauseDownstream() {
    for (const p of this.pairs) p.u.pause();
  }

  resumeDownstream() {
    for (const p of this.pairs) p.u.resume();
  }

  async close() {
    this.cutAll();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

function utf8Bytes(s) {
  return Buffer.byteLength(s, "utf8");
}

/**
 * A fake mini-program API object (`wx`, `tt`, `my` or `uni`) whose connectSocket opens a real
 * WebSocket. It reproduces each platform's SocketTask shape:
 * - wx/tt: `onMessage({data})`, `onOpen({header})`, `onClose({code, reason})`;
 * - my (Alipay): returns a SocketTask only with `multiple: true`; `onMessage({data: {data,
 *   isBuffer}})`;
 * - uni: returns a Promise (not a SocketTask) unless success/fail/complete is passed.
 * `close({reason})` fails like the real runtimes when the reason exceeds 123 bytes.
 *
 * `background()` simulates the app going to the background the way WeChat does it: every
 * existing task goes silent for good (no onMessage, no onClose ever again; sends are dropped)
 * and onAppHide listeners run. `foreground()` runs onAppShow listeners.
 *
 * Storage: `getStorageSync`/`setStorageSync`/`removeStorageSync` over `api.storage` (a Map;
 * pass `storage` to share one between two fakes: an app restarted on the same phone), with
 * each platform's shape (Alipay: `{key, data}` objects; a missing key reads as ""). Also
 * `setTabBarBadge`/`removeTabBarBadge` (recorded in `api.badges`).
 */
export function fakeMiniProgram(kind = "wx", { storage = null } = {}) {
  const showCbs = [];
  const hideCbs = [];
  const api = {
    kind,
    calls: [], // connectSocket params + time
    tasks: [],
    closes: [], // {code, reason} passed to task.close
    sent: [], // parsed frames sent by the SDK (all tasks)
    received: [], // parsed frames delivered to the SDK
    failNext: 0, // make the next N connectSocket calls fail
    // (frame, text, task) => true to keep a received frame from the SDK (a lost or delayed
    // delivery); `task.deliver(text)` hands it over later.
    intercept: null,
    onAppShow: (cb) => showCbs.push(cb),
    onAppHide: (cb) => hideCbs.push(cb),
    offAppShow: (cb) => showCbs.splice(showCbs.indexOf(cb), 1),
    offAppHide: (cb) => hideCbs.splice(hideCbs.indexOf(cb), 1),
    storage: storage || new Map(),
    badges: [], // setTabBarBadge texts ("" for removeTabBarBadge)
    getStorageSync(key) {
      const k = kind === "my" ? key.key : key;
      const v = api.storage.has(k) ? api.storage.get(k) : "";
      return kind === "my" ? { data: v } : v;
    },
    setStorageSync(key, data) {
      if (kind === "my") api.storage.set(key.key, key.data);
      else api.storage.set(key, data);
    },
    removeStorageSync(key) {
      api.storage.delete(kind === "my" ? key.key : key);
    },
    setTabBarBadge(o) {
      api.badges.push(o.text);
    },
    removeTabBarBadge() {
      api.badges.push("");
    },
    background() {
      for (const t of api.tasks) t._zombie = true;
      for (const cb of hideCbs.slice()) cb();
    },
    foreground() {
      for (const cb of showCbs.slice()) cb({ scene: 1001 });
    },
    /** Silence every existing task (no more events, sends dropped) without hiding the app. */
    muteAll() {
      for (const t of api.tasks) t._zombie = true;
    },
    get lastTask() {
      return api.tasks[api.tasks.length - 1];
    },
    connectSocket(params) {
      api.calls.push({ ...params, time: Date.now() });
      if (kind === "uni" && !params.success && !params.fail && !params.complete) {
        return Promise.resolve({ errMsg: "connectSocket:ok" }); // uni's promise form: no SocketTask
      }
      if (kind === "my" && params.multiple !== true) {
        return undefined; // Alipay's global-socket mode
      }
      const task = makeTask(api, kind, params);
      api.tasks.push(task);
      return task;
    },
  };
  return api;
}

function makeTask(api, kind, params) {
  const L = { open: [], message: [], close: [], error: [] };
  const task = { _zombie: false, ws: null, readyState: 0, params };
  const fire = (name, arg) => {
    if (task._zombie) return;
    for (const cb of L[name].slice()) cb(arg);
  };
  task.onOpen = (cb) => L.open.push(cb);
  task.onMessage = (cb) => L.message.push(cb);
  task.onClose = (cb) => L.close.push(cb);
  task.onError = (cb) => L.error.push(cb);
  const done = (o, ok, res) => {
    if (!o) return;
    const cb = ok ? o.success : o.fail;
    setTimeout(() => {
      if (cb) cb(res);
      if (o.complete) o.complete(res);
    }, 0);
  };
  if (api.failNext > 0) {
    api.failNext--;
    task.readyState = 3;
    setTimeout(() => {
      const res = { errMsg: "connectSocket:fail simulated" };
      if (params.fail) params.fail(res);
      if (params.complete) params.complete(res);
      fire("error", res);
      fire("close", { code: 1006, reason: "" });
    }, 5);
    task.send = (o) => done(o, false, { errMsg: "sendSocketMessage:fail not connected" });
    task.close = (o) => done(o, true, { errMsg: "closeSocket:ok" });
    return task;
  }
  const ws = new WebSocket(params.url, params.protocols || []);
  task.ws = ws;
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    task.readyState = 1;
    setTimeout(() => {
      if (params.success) params.success({ errMsg: "connectSocket:ok" });
      if (params.complete) params.complete({ errMsg: "connectSocket:ok" });
    }, 0);
    fire("open", { header: { "Sec-WebSocket-Protocol": ws.protocol }, profile: {} });
  };
  ws.onmessage = (e) => {
    if (task._zombie) return;
    const text = typeof e.data === "string" ? e.data : Buffer.from(e.data).toString("utf8");
    let frame = null;
    try {
      frame = JSON.parse(text);
    } catch (err) {
      // not JSON
    }
    if (frame && api.intercept && api.intercept(frame, text, task)) return;
    task.deliver(text);
  };
  task.deliver = (text) => {
    if (task._zombie) return;
    try {
      api.received.push(JSON.parse(text));
    } catch (err) {
      // not JSON
    }
    fire("message", kind === "my" ? { data: { data: text, isBuffer: false } } : { data: text });
  };
  ws.onerror = () => fire("error", { errMsg: "socket error" });
  ws.onclose = (e) => {
    task.readyState = 3;
    fire("close", { code: e.code, reason: e.reason });
  };
  task.send = (o) => {
    if (task._zombie) return; // the app is frozen / the socket is half-open: nothing happens
    if (ws.readyState !== 1) return done(o, false, { errMsg: "sendSocketMessage:fail WebSocket is not connected" });
    try {
      api.sent.push(JSON.parse(o.data));
    } catch (err) {
      // not JSON
    }
    ws.send(o.data);
    done(o, true, { errMsg: "sendSocketMessage:ok" });
  };
  task.close = (o = {}) => {
    const code = o.code === undefined ? 1000 : o.code;
    const reason = o.reason === undefined ? "" : o.reason;
    api.closes.push({ code, reason });
    if (utf8Bytes(reason) > 123 || !(code === 1000 || (code >= 3000 && code <= 4999))) {
      // What the runtimes do with an invalid close: fail (and the socket stays open).
      done(o, false, { errMsg: "closeSocket:fail invalid code or reason" });
      api.badCloses = (api.badCloses || 0) + 1;
      return;
    }
    try {
      ws.close(code, reason);
    } catch (err) {
      api.badCloses = (api.badCloses || 0) + 1;
    }
    done(o, true, { errMsg: "closeSocket:ok" });
  };
  return task;
}

/** An HS256 JWT (for gateways started with auth.mode=jwt). */
export function makeJwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Collect a client's events for assertions. */
export function record(client, names = ["message", "state", "disconnect", "resync", "drain", "joined", "error", "reconnecting", "connected"]) {
  const ev = {};
  for (const n of names) {
    ev[n] = [];
    client.on(n, (a) => ev[n].push({ t: Date.now(), v: a }));
  }
  return ev;
}
