// The client: one socket for every room, requests matched to acks, heartbeat, reconnect
// with backoff, resume by (seq, epoch), background/foreground handling, token refresh.
// Protocol: docs/protocol.md. Written in plain ES2017 (no async/await, no optional chaining)
// so mini-program runtimes run it without a transpiler.

import { noop, now, truncateUtf8, jwtExp, withQuery, clientCloseCode, randomId, Timers } from "./util.js";
import { ErrorCode, CloseCode, ABNORMAL_CLOSURE } from "./codes.js";
import { Emitter } from "./emitter.js";
import { ErrorCodes, GatewayError } from "./errors.js";
import { createAdapter } from "./adapters.js";
import { Conversations } from "./conversations.js";
import { Desk } from "./desk.js";
import { uploadMedia, sendMedia, mediaUrls, refreshMedia } from "./media.js";

export const VERSION = "1.1.0";

/** Defaults of every option (see docs/sdk-js.md). Times are in milliseconds. */
export const DEFAULTS = {
  url: "",
  platform: null, // "wx" | "tt" | "my" | "uni" | "browser" | adapter object; null = detect
  api: null, // the platform object (wx, tt, my, uni) or a WebSocket constructor
  protocols: ["gateway.v1"], // the server echoes the first it supports (WeChat needs an echo)
  query: null, // extra query parameters, e.g. {user: "u1"} for dev auth
  header: null, // extra handshake headers (mini-programs only; browsers cannot set them)
  token: null, // a JWT
  tokenIn: "query", // "query" (?token=) | "header" (Authorization: Bearer) | "protocol" (token.<JWT>)
  tokenParam: "token",
  getToken: null, // function(oldToken) -> token or Promise<token>: called before `exp`
  tokenRefreshMargin: 60000, // refresh this long before exp (at most half the lifetime)
  heartbeatInterval: 0, // 0 = the interval announced by the server; else min(this, server's)
  maxMissedPongs: 2, // intervals without any frame before the connection is declared dead
  showProbeTimeout: 3000, // after onShow(): a pong must arrive within this
  connectTimeout: 10000, // from connectSocket to the `connected` frame
  requestTimeout: 10000, // from sending a request to its ack/error
  reconnect: true,
  maxReconnectAttempts: Infinity, // consecutive failed attempts before giving up
  backoffInitial: 500,
  backoffMax: 30000,
  backoffFactor: 2,
  backoffJitter: 0.5, // 0 = none; 1 = delay uniformly in [0, base]
  offline: "queue", // publish while disconnected: "queue" (bounded) or "reject"
  offlineQueueSize: 100,
  publishTimeout: 30000, // from the first send of a publish to its ack, across reconnects and resends
  maxPendingPublishes: 200, // publishes not yet settled (queued, in flight, waiting to be resent)
  maxHeldMessages: 500, // per room: messages held behind a missing seq while the gap is repaired
  lateWindow: 1024, // per room: seqs below the position remembered as missing (late arrivals)
  history: 0, // default `history` of join()
  autoConnect: true, // join()/publish() connect when idle
  conversations: false, // true or an options object (CONVERSATION_DEFAULTS): sync conversations on every connect
  mediaUrl: null, // the upload URL (POST /media/upload); null = derived from `url` (wss://h/ws -> https://h/media/upload)
  random: Math.random,
};

/** Close codes after which the client does not reconnect: kicked, replaced by a newer
 * login of the same user. */
const FINAL_CLOSE_CODES = {};
FINAL_CLOSE_CODES[CloseCode.KICKED] = "kicked";
FINAL_CLOSE_CODES[CloseCode.REPLACED] = "replaced by a newer login";
const MAX_EARLY = 1000;
/** Client message ids (`cid` of publish): generated ones have this many base36 characters;
 * caller-supplied ones may have up to MAX_CID_LENGTH. */
const CID_LENGTH = 16;
const MAX_CID_LENGTH = 64;
const MAX_TIMER = 0x7fffffff;

/** Exponential backoff with jitter: attempt 0, 1, 2... -> a delay in ms. */
export function backoffDelay(attempt, o, random) {
  const base = Math.min(o.backoffMax, o.backoffInitial * Math.pow(o.backoffFactor, Math.max(0, attempt)));
  const j = Math.min(1, Math.max(0, o.backoffJitter));
  return Math.max(0, Math.round(base * (1 - j + j * (random || Math.random)())));
}

/**
 * A gateway client. Events (`client.on(name, fn)`):
 * - `message` (msg): a room message (`msg` frames and entries of `batch` frames, history and
 *   recovered messages included; in seq order and once each, late arrivals of missing seqs
 *   included)
 * - `presence` (frame), `push` (frame)
 * - `state` (state, previous): "idle" | "connecting" | "open" | "reconnecting" | "closed"
 * - `connected` (connected frame), `ready` (after every room was rejoined/resumed)
 * - `disconnect` ({code, reason}), `close` ({code, reason}) when the client stops for good
 * - `joined` ({room, ack, resumed}), `resync` ({room, ack, reason}): messages were lost,
 *   reload the room's state; `gap` ({room, from, to, recovered}): seqs from..to were missing
 *   on a live connection and were repaired (recovered) or given up (then `resync`)
 * - `removed` ({room, reason}): the server took this connection out of a room ("banned",
 *   "closed"); the room is not rejoined
 * - `drain` (frame), `error` (GatewayError for error frames without a request, or Error),
 *   `token` (new token), `frame` (every frame received)
 * - `upload` ({id, kind, room, state: "progress" | "done" | "failed", loaded, total,
 *   progress, result?, error?}): media uploads (see upload())
 * Conversations (protocol 1.1) are in `client.conversations` (their own events), the
 * customer-service desk in `client.desk`.
 */
export class Client extends Emitter {
  constructor(options) {
    super();
    const o = {};
    for (const k in DEFAULTS) o[k] = DEFAULTS[k];
    for (const k in options || {}) if (options[k] !== undefined) o[k] = options[k];
    if (!o.url) throw new Error("livegate: `url` is required");
    if (o.offline !== "queue" && o.offline !== "reject") throw new Error('livegate: `offline` must be "queue" or "reject"');
    this.options = o;
    this.adapter = createAdapter(o.platform, o.api);
    this.state = "idle";
    this.session = null;
    this.user = null;
    this.connectedFrame = null;
    this._token = o.token || null;
    this._sock = null;
    this._gen = 0;
    this._nextId = 1;
    this._pending = new Map(); // id -> {kind, room, resolve, reject, timer}
    this._rooms = new Map(); // name -> room state
    this._queue = []; // publishes waiting for the connection or a resend: jobs (see publish)
    this._publishing = 0; // publishes not yet settled
    this._connectWaiters = [];
    this._attempts = 0; // consecutive failed attempts
    this._failedBeforeOpen = 0;
    this._hidden = false;
    this._lastRecv = 0;
    this._lastPing = 0;
    this._missed = 0;
    this._hbInterval = 30000;
    this._idleTimeout = 90000;
    this._drainRetry = null;
    this._forceRefresh = false;
    this._tokenPromise = null;
    this._timers = new Timers();
    this._unbindLifecycle = null;
    this._stopped = false;
    this._reconnectOnShow = false;
    this._conv = null;
    this._desk = null;
    this._uploads = 0;
    this._scheduleTokenRefresh();
    if (o.conversations) this._conversations();
  }

  /** The conversations of this user (protocol 1.1, see conversations.js): created on first
   * use (or by the `conversations` option); from then on every connection sends `sync`. */
  get conversations() {
    return this._conversations();
  }

  /** The customer-service desk (docs/customer-service.md, desk.js): created on first use;
   * turns the conversations on (a session is the conversation `cs:<id>`). */
  get desk() {
    if (!this._desk) this._desk = new Desk(this);
    return this._desk;
  }

  _conversations() {
    if (!this._conv) {
      const co = this.options.conversations;
      this._conv = new Conversations(this, co && typeof co === "object" ? co : {});
    }
    return this._conv;
  }

  // ------------------------------------------------------------------ public API

  /** Connect (idempotent). Resolves with the `connected` frame; rejects if `close()` is
   * called or the client gives up (final close code, maxReconnectAttempts). */
  connect() {
    if (this.state === "open" && this.connectedFrame) return Promise.resolve(this.connectedFrame);
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this.state === "idle" || this.state === "closed") {
      this._stopped = false;
      this._attempts = 0;
      this._openSocket();
    }
    return p;
  }

  /** Join `room` (kept across reconnects and resumed). Options: `history` (last K messages,
   * max 50), `onMessage` (called for this room's messages). History and recovered messages
   * are delivered as `message` events before the promise resolves with the server's ack. */
  join(room, opts) {
    opts = opts || {};
    let r = this._rooms.get(room);
    if (r) {
      if (opts.onMessage) r.handler = opts.onMessage;
      if (r.acked && r.active) return Promise.resolve(r.lastAck);
      return new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
    }
    if (this._stopped && this.state === "closed") return Promise.reject(this._closedError());
    r = {
      name: room,
      seq: 0,
      epoch: null,
      history: opts.history !== undefined ? opts.history : this.options.history,
      handler: opts.onMessage || null,
      active: false,
      joining: false,
      acked: false,
      lastAck: null,
      waiters: [],
      early: [],
      // Ordering by seq (see _accept): messages held behind a missing seq, seqs given up
      // (delivered late if they still come), the open gap, the repair in flight.
      held: new Map(),
      missed: new Set(),
      gap: null,
      lost: false,
      repairing: false,
      repairGen: 0,
    };
    this._rooms.set(room, r);
    const p = new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
    if (this.state === "open") this._sendJoin(r);
    else this._autoConnect();
    return p;
  }

  /**
   * A page of `room`'s messages, oldest first: the newest page, or the one before
   * `beforeSeq`. Resolves with the ack: `{msgs, more, epoch}`; `more` means older ones
   * remain (ask again with `beforeSeq: msgs[0].seq`). Rooms whose route keeps messages
   * page back without limit; others only through the broker's short history.
   */
  history(room, { beforeSeq = null, limit = 50 } = {}) {
    const frame = { op: "history", room: room, limit: limit };
    if (beforeSeq != null) frame.before_seq = beforeSeq;
    return this._request(frame, "history");
  }

  /** Leave `room`. Resolves with the ack (or at once when not connected). */
  leave(room) {
    const r = this._rooms.get(room);
    if (r) {
      this._rooms.delete(room);
      this._settleWaiters(r, null, new GatewayError(ErrorCodes.CLOSED, "left " + room + " before the join completed"));
    }
    const keep = [];
    for (let i = 0; i < this._queue.length; i++) {
      const item = this._queue[i];
      if (item.frame.room === room) item.reject(new GatewayError(ErrorCodes.CLOSED, "left " + room + " before the queued publish was sent"));
      else keep.push(item);
    }
    this._queue = keep;
    if (this.state === "open" && (!r || r.active || r.joining)) {
      return this._request({ op: "leave", room: room }, "leave");
    }
    return Promise.resolve({ op: "ack", room: room, local: true });
  }

  /** Publish `data` into `room` (type from `opts.type`, default "chat"). Every publish
   * carries a client message id `cid` (`opts.cid`, or 16 random base36 characters): when the
   * connection drops before the ack, the same frame is sent again after the reconnect, and
   * the server answers a repeated `cid` with the original `seq` and `dup: true` instead of
   * publishing twice. Resolves with the ack (`seq` > 0 for recoverable types); rejects with
   * the server's error code (`ErrorCode`, e.g. RATE_LIMITED), or E_OFFLINE / E_QUEUE_FULL /
   * E_TIMEOUT / E_CLOSED. */
  publish(room, data, opts) {
    const o = this.options;
    const cid = opts && opts.cid !== undefined && opts.cid !== null ? opts.cid : randomId(CID_LENGTH, o.random);
    if (typeof cid !== "string" || !cid || cid.length > MAX_CID_LENGTH) {
      return Promise.reject(new TypeError("livegate: `cid` must be a non-empty string of at most " + MAX_CID_LENGTH + " characters"));
    }
    const frame = { op: "publish", room: room, type: (opts && opts.type) || "chat", data: data === undefined ? null : data, cid: cid };
    return new Promise((resolve, reject) => {
      if (this._publishing >= o.maxPendingPublishes) {
        reject(new GatewayError(ErrorCodes.QUEUE_FULL, "too many publishes waiting for an ack (" + o.maxPendingPublishes + ")"));
        return;
      }
      const job = { frame: frame, sends: 0, id: null, timer: null, done: false, resolve: null, reject: null };
      const settle = (fn, v) => {
        if (job.done) return;
        job.done = true;
        this._publishing--;
        if (job.timer) clearTimeout(job.timer);
        fn(v);
      };
      job.resolve = (ack) => settle(resolve, ack);
      job.reject = (err) => settle(reject, err);
      this._publishing++;
      if (this._canSend(room)) this._sendPublish(job);
      else this._enqueue(job);
    });
  }

  // ------------------------------------------------------------------ media

  /**
   * Upload `file` to the gateway (POST /media/upload, multipart, out of band: the platform's
   * uploadFile, or XMLHttpRequest in browsers) with the socket's token. `file`: a temp file
   * path on mini-programs (wx.chooseMedia, RecorderManager, chooseMessageFile), a Blob/File
   * in browsers. Options: `kind` ("image" | "voice" | "video" | "file"; the server detects
   * it when omitted), `room` (its route's limits apply), `duration` (ms, voice/video), `name`
   * (browsers: the file name sent), `fields` (more form fields), `onProgress({loaded, total,
   * progress})` (progress 0-100; also `upload` events). Resolves with the server's JSON
   * (`file_id`, `kind`, `mime`, `size`, `name`, `w`, `h`, `duration`, `url`, ...); rejects with
   * an UploadError (`status`, `code`: the server's code word, `limit` for 413). The promise
   * has `abort()` (then E_ABORTED).
   */
  upload(file, opts) {
    return uploadMedia(this, file, opts);
  }

  /**
   * Send a photo: upload `file` (see upload()), then publish `{type: "image", data: {file_id,
   * caption?}}` into `room` with a cid (`opts.cid` or a new one). A conversation room
   * (dm/group/...: the `conversations` prefixes) that is not joined as a live room goes
   * through `client.conversations.send` (queued offline, `pending`/`sent` events), others
   * through `publish`; `opts.via` ("conversations" | "publish") decides otherwise.
   * Options: `caption`, `onProgress`, `cid`, `via`. Resolves with the publish ack (`seq`,
   * plus `media`: the upload's JSON); the promise has `abort()` (for the upload).
   */
  sendImage(room, file, opts) {
    return sendMedia(this, room, "image", file, opts);
  }

  /** Send a voice message (as sendImage; `opts.duration`: ms, as the recorder reported it). */
  sendVoice(room, file, opts) {
    return sendMedia(this, room, "voice", file, opts);
  }

  /** Send a video (as sendImage; `opts.duration`: ms). */
  sendVideo(room, file, opts) {
    return sendMedia(this, room, "video", file, opts);
  }

  /** Send a file (as sendImage; `opts.name`: its name, browsers). */
  sendFile(room, file, opts) {
    return sendMedia(this, room, "file", file, opts);
  }

  /** The URLs of media message `msg`: `{url, thumbUrl, expires, expired}` (relative URLs made
   * absolute; `thumbUrl` falls back to `url`; `expired`: past `data.expires`, or within
   * `opts.margin` ms of it), or null when `msg` is not a media message. An expired URL is
   * refreshed by paging the message again (refreshMedia(), or history/sync): the server
   * signs its URLs whenever it sends a message. */
  mediaUrl(msg, opts) {
    return mediaUrls(this, msg, opts);
  }

  /** Fetch `msg` again (a history page of one), with freshly signed URLs; resolves with the
   * message (null if it is gone). */
  refreshMedia(msg) {
    return refreshMedia(this, msg);
  }

  /** Send any request frame (`op` plus fields) and wait for its ack. */
  request(op, fields) {
    const frame = { op: op };
    for (const k in fields || {}) frame[k] = fields[k];
    return this._request(frame, "request");
  }

  /** Call when the app goes to the background (wx.onAppHide / Page onHide / hidden tab):
   * stops the heartbeat (timers are frozen anyway) and expects the socket to die. */
  onHide() {
    if (this._hidden) return;
    this._hidden = true;
    this._timers.clear("heartbeat");
    this._timers.clear("probe");
    if (this._timers.has("reconnect")) {
      this._timers.clear("reconnect");
      this._reconnectOnShow = true;
    }
    if (this._conv) this._conv._onHide(); // save now: the app may be killed in the background
    this.emit("hide");
  }

  /** Call when the app comes back (wx.onAppShow): checks the connection at once (a ping that
   * must be answered within `showProbeTimeout`, or a reconnect when the silence already
   * exceeds the server's idle timeout), then reconnects and resumes every room if needed. */
  onShow() {
    if (!this._hidden) return;
    this._hidden = false;
    this.emit("show");
    if (this._stopped || this.state === "idle" || this.state === "closed") return;
    this._maybeRefreshTokenSoon();
    if (this.state === "open" && this._sock) {
      if (now() - this._lastRecv > this._idleTimeout) {
        this._drop(ABNORMAL_CLOSURE, "silent for longer than the idle timeout while hidden", 0);
        return;
      }
      const sentAt = now();
      if (!this._sendFrame({ op: "ping" })) return;
      this._lastPing = sentAt;
      this._timers.set("probe", this.options.showProbeTimeout, () => {
        if (this._lastRecv < sentAt) this._drop(ABNORMAL_CLOSURE, "no pong after onShow", 0);
      });
      this._scheduleHeartbeat();
    } else if (this.state === "reconnecting" || this._reconnectOnShow) {
      this._reconnectOnShow = false;
      this._timers.clear("reconnect");
      this._openSocket();
    }
  }

  /** Call onShow/onHide automatically from the platform's app lifecycle events
   * (wx/tt/my/uni onAppShow/onAppHide, or the page's visibilitychange in browsers). */
  bindLifecycle() {
    if (this._unbindLifecycle || !this.adapter.watchLifecycle) return this;
    this._unbindLifecycle = this.adapter.watchLifecycle(() => this.onShow(), () => this.onHide());
    return this;
  }

  /** Replace the token (used from the next connection on). */
  setToken(token) {
    this._token = token || null;
    this._scheduleTokenRefresh();
  }

  get token() {
    return this._token;
  }

  /** The rooms this client is in (or joining). */
  rooms() {
    return Array.from(this._rooms.keys());
  }

  /** {seq, epoch} of the last recoverable message seen in `room` (what a resume sends). */
  position(room) {
    const r = this._rooms.get(room);
    return r ? { seq: r.seq, epoch: r.epoch } : null;
  }

  /** Publishes waiting for the connection. */
  get queued() {
    return this._queue.length;
  }

  /** Close for good: no reconnect; pending requests, queued publishes and unfinished joins
   * are rejected with E_CLOSED. `reason` is cut to 123 UTF-8 bytes. */
  close(code, reason) {
    this._stopped = true;
    const sock = this._sock;
    this._gen++;
    this._sock = null;
    this._timers.clearAll();
    if (sock) sock.close(clientCloseCode(code || CloseCode.NORMAL), truncateUtf8(reason || "client closed", 123));
    const err = this._closedError();
    this._failPending(err, true);
    this._failQueue(err);
    if (this._conv) this._conv._onClose(err);
    this._rooms.forEach((r) => this._settleWaiters(r, null, err));
    this._rooms.clear();
    this._rejectConnectWaiters(err);
    if (this._unbindLifecycle) {
      this._unbindLifecycle();
      this._unbindLifecycle = null;
    }
    const was = this.state;
    this._setState("closed");
    if (was !== "closed") this.emit("close", { code: code || CloseCode.NORMAL, reason: reason || "client closed", local: true });
  }

  // ------------------------------------------------------------------ connection

  _autoConnect() {
    if (this.options.autoConnect && (this.state === "idle" || (this.state === "closed" && !this._stopped))) {
      this.connect().catch(noop);
    }
  }

  _setState(s) {
    if (s === this.state) return;
    const prev = this.state;
    this.state = s;
    this.emit("state", s, prev);
  }

  _openSocket() {
    this._timers.clear("reconnect");
    if (this._stopped) return;
    if (this._hidden) {
      // A mini-program cannot connect from the background: wait for onShow().
      this._reconnectOnShow = true;
      this._setState("reconnecting");
      return;
    }
    this._setState("connecting");
    const gen = ++this._gen;
    const o = this.options;
    const needToken = o.getToken && (this._forceRefresh || !this._token || this._tokenExpiresWithin(5000));
    const ready = needToken ? this._refreshToken() : Promise.resolve(this._token);
    ready.then(
      (token) => {
        if (gen === this._gen && !this._stopped) this._openWith(token);
      },
      (e) => {
        if (gen !== this._gen || this._stopped) return;
        this.emit("error", e instanceof Error ? e : new Error(String(e)));
        this._onDisconnected({ code: ABNORMAL_CLOSURE, reason: "token refresh failed" });
      }
    );
  }

  _openWith(token) {
    const o = this.options;
    const gen = ++this._gen;
    const query = {};
    for (const k in o.query || {}) query[k] = o.query[k];
    const protocols = (o.protocols || []).slice();
    const header = {};
    for (const k in o.header || {}) header[k] = o.header[k];
    if (token) {
      if (o.tokenIn === "protocol") protocols.push("token." + token);
      else if (o.tokenIn === "header") header.Authorization = "Bearer " + token;
      else query[o.tokenParam] = token;
    }
    const url = withQuery(o.url, query);
    let sock;
    try {
      sock = this.adapter.connect({ url: url, protocols: protocols, header: header });
    } catch (e) {
      this.emit("error", e);
      this._onDisconnected({ code: ABNORMAL_CLOSURE, reason: String((e && e.message) || e) });
      return;
    }
    this._sock = sock;
    this._lastRecv = now();
    sock.onopen = () => {
      if (gen !== this._gen) return;
      this._lastRecv = now();
      this.emit("open", { protocol: sock.protocol });
    };
    sock.onmessage = (text) => {
      if (gen === this._gen) this._onText(text);
    };
    sock.onerror = (e) => {
      if (gen === this._gen) this.emit("socketError", e);
    };
    sock.onclose = (info) => {
      if (gen !== this._gen) return;
      this._gen++;
      this._sock = null;
      this._onDisconnected(info || { code: ABNORMAL_CLOSURE, reason: "" });
    };
    this._timers.set("connect", o.connectTimeout, () => {
      if (gen === this._gen) this._drop(ABNORMAL_CLOSURE, "no connected frame within " + o.connectTimeout + " ms");
    });
  }

  /** Declare the current socket dead without waiting for its onClose (which may never come
   * after a background period or on a half-open connection). */
  _drop(code, reason, delay) {
    const sock = this._sock;
    this._gen++;
    this._sock = null;
    if (sock) {
      try {
        sock.close(CloseCode.NORMAL, truncateUtf8(reason, 123));
      } catch (e) {
        // ignore
      }
    }
    this._onDisconnected({ code: code, reason: reason, local: true }, delay);
  }

  _onDisconnected(info, delay) {
    const wasOpen = this.state === "open";
    this._timers.clear("connect");
    this._timers.clear("heartbeat");
    this._timers.clear("probe");
    this.connectedFrame = null;
    this._failPending(new GatewayError(ErrorCodes.CONNECTION_LOST, "connection lost before the ack (" + info.code + ")"), false);
    this._rooms.forEach((r) => {
      r.active = false;
      r.joining = false;
      r.early = [];
      // A repair in flight is lost with the connection; the rejoin resumes from the same
      // position and fills the gap (held messages are kept for it).
      r.repairing = false;
      r.repairGen++;
    });
    if (this._conv) this._conv._onDisconnected();
    this.emit("disconnect", info);
    if (this._stopped) return;
    const final = FINAL_CLOSE_CODES[info.code];
    if (final || !this.options.reconnect) {
      this._giveUp(info, final ? "closed by the server: " + final : "disconnected (reconnect disabled)");
      return;
    }
    if (info.code === CloseCode.AUTH_FAILED) this._forceRefresh = true;
    if (!wasOpen) {
      this._failedBeforeOpen++;
      // A refused upgrade (bad token) looks like any network error: after two in a row,
      // fetch a fresh token before the next attempt.
      if (this.options.getToken && this._failedBeforeOpen >= 2) this._forceRefresh = true;
    }
    if (this._attempts >= this.options.maxReconnectAttempts) {
      this._giveUp(info, "gave up after " + this._attempts + " reconnect attempts");
      return;
    }
    let d = delay;
    if (d === undefined) {
      if (this._drainRetry !== null) {
        d = Math.round(this._drainRetry * (1 + Math.min(1, Math.max(0, this.options.backoffJitter)) * this.options.random() * 0.5));
      } else {
        d = backoffDelay(this._attempts, this.options, this.options.random);
      }
    }
    this._drainRetry = null;
    this._attempts++;
    this._setState("reconnecting");
    if (this._hidden) {
      this._reconnectOnShow = true;
      return;
    }
    this.emit("reconnecting", { attempt: this._attempts, delay: d });
    this._timers.set("reconnect", d, () => this._openSocket());
  }

  _giveUp(info, why) {
    this._stopped = true;
    this._timers.clearAll();
    const err = new GatewayError(ErrorCodes.CLOSED, why + " (" + info.code + (info.reason ? " " + info.reason : "") + ")");
    this._failQueue(err);
    if (this._conv) this._conv._onClose(err);
    this._rooms.forEach((r) => this._settleWaiters(r, null, err));
    this._rejectConnectWaiters(err);
    this._setState("closed");
    this.emit("close", { code: info.code, reason: info.reason, final: true });
  }

  _closedError() {
    return new GatewayError(ErrorCodes.CLOSED, "client closed");
  }

  _rejectConnectWaiters(err) {
    const w = this._connectWaiters;
    this._connectWaiters = [];
    for (let i = 0; i < w.length; i++) w[i].reject(err);
  }

  // ------------------------------------------------------------------ frames

  _sendFrame(frame) {
    const sock = this._sock;
    if (!sock) return false;
    let ok = false;
    try {
      ok = sock.send(JSON.stringify(frame)) !== false;
    } catch (e) {
      ok = false;
    }
    if (!ok) this._drop(ABNORMAL_CLOSURE, "send failed");
    return ok;
  }

  _onText(text) {
    this._lastRecv = now();
    this._missed = 0;
    let f;
    try {
      f = JSON.parse(text);
    } catch (e) {
      this.emit("error", new Error("livegate: invalid JSON frame"));
      return;
    }
    if (!f || typeof f !== "object") return;
    this.emit("frame", f);
    this._dispatch(f, false);
  }

  _dispatch(f, inBatch) {
    switch (f.op) {
      case "connected":
        if (!inBatch) this._onConnected(f);
        break;
      case "pong":
        break;
      case "msg":
        // Conversations cannot be joined: a message of a room not joined is theirs.
        if (this._conv && !this._rooms.has(f.room)) this._conv._onFrame(f);
        else this._onRoomMessage(f);
        break;
      case "read":
      case "recall":
      case "typing":
      case "conv":
        if (this._conv) this._conv._onFrame(f);
        break;
      case "batch": {
        // Entries are `msg` frames, and also the room's `presence` events of the window.
        if (inBatch) break;
        const msgs = Array.isArray(f.msgs) ? f.msgs : [];
        for (let i = 0; i < msgs.length; i++) {
          const m = msgs[i];
          if (!m || typeof m !== "object") continue;
          if (m.room === undefined) m.room = f.room;
          if (m.op === undefined) m.op = "msg";
          this._dispatch(m, true);
        }
        break;
      }
      case "ack":
      case "error":
        this._onReply(f);
        break;
      case "presence":
        // "banned"/"closed": the server removed this connection from the room.
        if ((f.event === "banned" || f.event === "closed") && f.room && (f.user === undefined || f.user === this.user)) this._onRemoved(f);
        this.emit("presence", f);
        break;
      case "push":
        // With conversations on, a push that names a room is a stored notice the list gets
        // as a message of that conversation: not surfaced twice.
        if (!(this._conv && f.room)) this.emit("push", f);
        break;
      case "drain":
        this._onDrain(f);
        break;
      default:
        break;
    }
  }

  _onConnected(f) {
    this._timers.clear("connect");
    this.connectedFrame = f;
    this.session = f.session;
    this.user = f.user;
    this._failedBeforeOpen = 0;
    this._forceRefresh = false;
    const hb = typeof f.heartbeat === "number" && f.heartbeat > 0 ? f.heartbeat * 1000 : 30000;
    this._idleTimeout = typeof f.idle_timeout === "number" && f.idle_timeout > 0 ? f.idle_timeout * 1000 : hb * 3;
    this._hbInterval = this.options.heartbeatInterval > 0 ? Math.min(this.options.heartbeatInterval, hb) : hb;
    this._missed = 0;
    this._lastPing = 0;
    this._setState("open");
    this._scheduleHeartbeat();
    this.emit("connected", f);
    const w = this._connectWaiters;
    this._connectWaiters = [];
    for (let i = 0; i < w.length; i++) w[i].resolve(f);
    if (this._conv) this._conv._onConnected(); // sync, then the queued sends
    // Rejoin (resume) every room, then flush the offline queue.
    const gen = this._gen;
    const rooms = Array.from(this._rooms.values());
    let left = rooms.length;
    const done = () => {
      if (--left > 0 || gen !== this._gen) return;
      this._attempts = 0;
      this._flushQueue();
      this.emit("ready");
    };
    if (!left) {
      left = 1;
      done();
      return;
    }
    for (let i = 0; i < rooms.length; i++) this._sendJoin(rooms[i], done);
  }

  _onDrain(f) {
    const ms = typeof f.retry_ms === "number" && f.retry_ms >= 0 ? f.retry_ms : null;
    this.emit("drain", f);
    this._drainRetry = ms;
    // The server closes with SERVICE_RESTART next; do not depend on that close arriving.
    this._drop(CloseCode.SERVICE_RESTART, "server draining");
  }

  // ------------------------------------------------------------------ heartbeat

  _scheduleHeartbeat() {
    this._timers.clear("heartbeat");
    if (this._hidden || this.state !== "open") return;
    this._timers.set("heartbeat", this._hbInterval, () => this._heartbeatTick());
  }

  _heartbeatTick() {
    if (this.state !== "open" || this._hidden) return;
    if (this._lastPing && this._lastRecv < this._lastPing) {
      this._missed++;
      if (this._missed >= this.options.maxMissedPongs) {
        this._drop(ABNORMAL_CLOSURE, "heartbeat timeout: " + this._missed + " pongs missed");
        return;
      }
    } else {
      this._missed = 0;
    }
    this._lastPing = now();
    if (this._sendFrame({ op: "ping" })) this._scheduleHeartbeat();
  }

  // ------------------------------------------------------------------ requests

  _request(frame, kind) {
    return new Promise((resolve, reject) => {
      if (this.state !== "open" || !this._sock) {
        reject(new GatewayError(ErrorCodes.OFFLINE, "not connected"));
        return;
      }
      this._sendRequest(frame, kind, resolve, reject);
    });
  }

  _sendRequest(frame, kind, resolve, reject, room, job) {
    const id = this._nextId++;
    frame.id = id;
    const entry = { kind: kind, room: room || null, resolve: resolve, reject: reject, timer: null, job: job || null };
    entry.timer = setTimeout(() => {
      if (this._pending.get(id) !== entry) return;
      this._pending.delete(id);
      this._onRequestTimeout(entry, frame);
    }, this.options.requestTimeout);
    this._pending.set(id, entry);
    this._sendFrame(frame);
    return id;
  }

  _onRequestTimeout(entry, frame) {
    const err = new GatewayError(ErrorCodes.TIMEOUT, "no reply to " + frame.op + " within " + this.options.requestTimeout + " ms", frame.id);
    entry.reject(err);
  }

  _onReply(f) {
    const entry = f.id === undefined || f.id === null ? null : this._pending.get(f.id);
    if (!entry) {
      if (f.op === "error") this.emit("error", new GatewayError(f.code, f.message || "", f.id, f));
      return;
    }
    this._pending.delete(f.id);
    clearTimeout(entry.timer);
    if (f.op === "ack") entry.resolve(f);
    else entry.reject(new GatewayError(f.code, f.message || "", f.id, f));
  }

  /** The connection ended (`all` false) or the client closed (`all`): settle the requests
   * waiting for a reply. On a lost connection, publishes are kept and sent again (same
   * `cid`) after the reconnect, ahead of the ones queued meanwhile, in their order. */
  _failPending(err, all) {
    const pending = this._pending;
    this._pending = new Map();
    const resend = [];
    pending.forEach((entry) => {
      clearTimeout(entry.timer);
      if (!all && (entry.kind === "join" || entry.kind === "repair")) return; // rooms are rejoined (resumed) on the next connection
      if (!all && entry.kind === "publish" && entry.job) {
        if (!entry.job.done) resend.push(entry.job);
        return;
      }
      if (entry.kind === "leave" && !all) entry.resolve({ op: "ack", local: true });
      else entry.reject(err);
    });
    if (resend.length) this._queue = resend.concat(this._queue);
  }

  // ------------------------------------------------------------------ rooms

  _sendJoin(r, done) {
    const frame = { op: "join", room: r.name };
    const resumed = r.epoch !== null;
    if (resumed) frame.resume = { seq: r.seq, epoch: r.epoch };
    else if (r.history > 0) frame.history = Math.min(50, r.history);
    r.joining = true;
    r.early = [];
    const gen = this._gen;
    const finish = () => {
      if (done) done();
    };
    const ok = (ack) => {
      if (this._rooms.get(r.name) !== r || gen !== this._gen) return finish();
      this._onJoinAck(r, ack, resumed);
      finish();
    };
    const fail = (err) => {
      if (this._rooms.get(r.name) !== r || gen !== this._gen) return finish();
      r.joining = false;
      if (err.code === ErrorCodes.TIMEOUT && r.acked) {
        // A resume that got no answer: the connection is not healthy.
        finish();
        this._drop(ABNORMAL_CLOSURE, "no reply to a resume join");
        return;
      }
      this._rooms.delete(r.name);
      if (r.acked) this.emit("error", new GatewayError(err.code, "rejoining " + r.name + " failed: " + (err.reason || ""), err.id, err.frame));
      this._settleWaiters(r, null, err);
      finish();
    };
    this._sendRequest(frame, "join", ok, fail, r);
  }

  _onJoinAck(r, ack, resumed) {
    r.joining = false;
    r.active = true;
    const resync = this._applyAck(r, ack, resumed);
    const early = r.early;
    r.early = [];
    for (let i = 0; i < early.length; i++) this._accept(r, early[i], true);
    r.acked = true;
    r.lastAck = ack;
    this.emit("joined", { room: r.name, ack: ack, resumed: resumed });
    if (resync) this.emit("resync", { room: r.name, ack: ack, reason: resync });
    this._settleWaiters(r, ack, null);
    this._flushQueue();
  }

  _onRemoved(f) {
    const r = this._rooms.get(f.room);
    if (!r) return;
    this._rooms.delete(f.room);
    const err = f.event === "banned" ? new GatewayError(ErrorCode.MUTED, "banned from " + f.room, null, f) : new GatewayError(ErrorCodes.CLOSED, f.room + " was closed", null, f);
    this._settleWaiters(r, null, err);
    const keep = [];
    for (let i = 0; i < this._queue.length; i++) {
      const item = this._queue[i];
      if (item.frame.room === f.room) item.reject(err);
      else keep.push(item);
    }
    this._queue = keep;
    this.emit("removed", { room: f.room, reason: f.event, frame: f });
  }

  _settleWaiters(r, ack, err) {
    const w = r.waiters;
    r.waiters = [];
    for (let i = 0; i < w.length; i++) {
      if (err) w[i].reject(err);
      else w[i].resolve(ack);
    }
  }

  // ------------------------------------------------------------------ ordering and gap repair
  //
  // Per room, `r.seq` is the contiguous position: every recoverable message up to it was
  // delivered or given up. A message with seq > position + 1 (same epoch) is held and the
  // gap repaired by re-joining with `resume` from the position; the ack's `msgs` fill it and
  // the held messages follow, in order, each once. Seqs the server cannot give back are
  // given up (`gap` with recovered: false, then `resync`) but remembered in `r.missed`
  // (the last `lateWindow` seqs below the position): if one still arrives, it is delivered
  // late instead of being dropped as a duplicate. Bounds: `maxHeldMessages` held per room
  // (beyond it the SDK stops waiting: it gives the gap up and delivers what it holds),
  // `lateWindow` missing seqs remembered, one repair in flight per room.

  _onRoomMessage(m) {
    const r = this._rooms.get(m.room);
    if (!r) return; // left, or never joined
    if (!r.active) {
      if (r.early.length < MAX_EARLY) r.early.push(m);
      return;
    }
    this._accept(r, m, true);
  }

  /** Order one room message by seq. `live`: from the socket (a gap starts a repair); else
   * from a join ack (history, resumed or repaired messages). */
  _accept(r, m, live) {
    const seq = typeof m.seq === "number" ? m.seq : 0;
    if (seq <= 0) {
      this._emitMessage(r, m); // not recoverable: no order to keep
      return;
    }
    if (live && m.epoch !== undefined && r.epoch !== null && m.epoch !== r.epoch) {
      // The room's history was lost (e.g. a server restart): positions start over.
      this._newEpoch(r, m.epoch, seq - 1);
      r.lost = false;
      this.emit("resync", { room: r.name, ack: null, reason: "epoch changed" });
    }
    if (seq <= r.seq) {
      if (r.missed.delete(seq)) this._emitMessage(r, m); // late, not a duplicate
      return;
    }
    if (seq === r.seq + 1) {
      r.seq = seq;
      this._emitMessage(r, m);
      this._drainHeld(r);
      return;
    }
    if (r.held.has(seq)) return; // duplicate of a held one
    r.held.set(seq, m);
    // from..to: the span of the missing seqs (seq - 1 is missing unless held).
    if (!r.gap) r.gap = { from: r.seq + 1, to: seq - 1, lost: false };
    else if (seq - 1 > r.gap.to && !r.held.has(seq - 1)) r.gap.to = seq - 1;
    if (r.held.size > this.options.maxHeldMessages) {
      // Waited long enough: give the missing seqs up and deliver what is held. A repair in
      // flight may still bring them: they are then delivered late.
      this._skip(r, this._lowestHeld(r) - 1);
      this._drainHeld(r);
      if (r.lost) {
        r.lost = false;
        this.emit("resync", { room: r.name, ack: null, reason: "gap on the live connection not repaired in time" });
      }
    }
    if (live) this._repair(r);
  }

  /** Apply a join ack (first join, rejoin after a reconnect, or repair): position, messages,
   * missing seqs. Returns a resync reason or null. */
  _applyAck(r, ack, resumed) {
    const epoch = ack.epoch === undefined ? null : ack.epoch;
    const msgs = Array.isArray(ack.msgs) ? ack.msgs : [];
    let resync = null;
    if (resumed && r.epoch !== null && epoch !== null && epoch !== r.epoch) resync = "epoch changed";
    else if (resumed && ack.recovered === false) resync = "history gap could not be filled";
    if (!resumed || epoch !== r.epoch) {
      // A new position: just before the first message given (history, or what is left of
      // the room after a lost epoch), else the room's current seq.
      let base = typeof ack.seq === "number" ? ack.seq : 0;
      for (let i = 0; i < msgs.length; i++) {
        if (msgs[i] && typeof msgs[i].seq === "number" && msgs[i].seq > 0) {
          base = msgs[i].seq - 1;
          break;
        }
      }
      this._newEpoch(r, epoch, base);
    }
    for (let i = 0; i < msgs.length; i++) {
      const m = msgs[i];
      if (m && typeof m === "object") {
        if (m.room === undefined) m.room = r.name;
        this._accept(r, m, false);
        if (this._rooms.get(r.name) !== r) return null; // a listener left the room
      }
    }
    // Every seq up to the room's position that the ack did not bring is lost.
    if (typeof ack.seq === "number") this._settle(r, ack.seq);
    if (r.lost) {
      r.lost = false;
      if (!resync) resync = "messages lost on the live connection";
    }
    if (r.held.size) this._repair(r); // seqs missing above the ack's position: a newer gap
    return resync;
  }

  /** A new epoch (or a first join): messages still held belong to the old one and are
   * delivered in order (what is missing between them is lost); position `base`. */
  _newEpoch(r, epoch, base) {
    if (r.held.size) {
      const seqs = Array.from(r.held.keys()).sort((x, y) => x - y);
      const held = r.held;
      r.held = new Map();
      for (let i = 0; i < seqs.length; i++) this._emitMessage(r, held.get(seqs[i]));
      r.lost = true;
    }
    if (r.gap) {
      r.gap.lost = true;
      this._endGap(r);
    }
    r.missed.clear();
    r.epoch = epoch;
    r.seq = Math.max(0, base);
    r.repairing = false;
    r.repairGen++;
  }

  /** Everything up to `upTo` has been answered by the server: give up what is missing. */
  _settle(r, upTo) {
    while (r.seq < upTo && this._rooms.get(r.name) === r) {
      if (!r.held.has(r.seq + 1)) this._skip(r, Math.min(this._lowestHeld(r) - 1, upTo));
      this._drainHeld(r);
    }
  }

  /** Give up seqs position+1 .. `to`: the position moves to `to`; they are remembered as
   * missing (the last `lateWindow` of them) so that a late arrival is still delivered. */
  _skip(r, to) {
    const from = r.seq + 1;
    if (to < from) return;
    const w = Math.max(0, this.options.lateWindow);
    for (let s = Math.max(from, to - w + 1); s <= to; s++) r.missed.add(s);
    r.seq = to;
    if (r.missed.size > w) r.missed.forEach((s) => s <= to - w && r.missed.delete(s));
    if (r.gap) r.gap.lost = true;
    r.lost = true;
  }

  _lowestHeld(r) {
    let lo = Infinity;
    r.held.forEach((m, s) => {
      if (s < lo) lo = s;
    });
    return lo;
  }

  /** Deliver the held messages that follow the position; end the gap when none is left. */
  _drainHeld(r) {
    while (r.held.size && r.held.has(r.seq + 1) && this._rooms.get(r.name) === r) {
      const m = r.held.get(r.seq + 1);
      r.held.delete(r.seq + 1);
      r.seq++;
      this._emitMessage(r, m);
    }
    if (!r.held.size && r.gap) this._endGap(r);
  }

  _endGap(r) {
    const g = r.gap;
    r.gap = null;
    this.emit("gap", { room: r.name, from: g.from, to: g.to, recovered: !g.lost });
  }

  /** Re-join `r` with `resume` from its position to fetch the missing seqs (one repair in
   * flight per room; a reconnect's rejoin does the same job). */
  _repair(r) {
    if (r.repairing || !r.active || r.epoch === null || this.state !== "open" || !this._sock) return;
    r.repairing = true;
    const gen = ++r.repairGen;
    const current = () => this._rooms.get(r.name) === r && r.repairGen === gen;
    const frame = { op: "join", room: r.name, resume: { seq: r.seq, epoch: r.epoch } };
    const ok = (ack) => {
      if (!current()) return;
      r.repairing = false;
      const resync = this._applyAck(r, ack, true);
      if (resync && this._rooms.get(r.name) === r) this.emit("resync", { room: r.name, ack: ack, reason: resync });
    };
    const fail = (err) => {
      if (!current() || this._stopped) return;
      r.repairing = false;
      if (err.code === ErrorCodes.TIMEOUT) {
        this._drop(ABNORMAL_CLOSURE, "no reply to a gap repair"); // the rejoin resumes from the same position
        return;
      }
      // Refused (e.g. rate limited): give the missing seqs up and move on.
      this.emit("error", new GatewayError(err.code, "repairing a gap in " + r.name + " failed: " + (err.reason || ""), err.id, err.frame));
      let hi = r.seq;
      r.held.forEach((m, s) => {
        if (s > hi) hi = s;
      });
      this._settle(r, hi);
      if (r.lost) {
        r.lost = false;
        this.emit("resync", { room: r.name, ack: null, reason: "gap repair refused" });
      }
    };
    this._sendRequest(frame, "repair", ok, fail, r);
  }

  _emitMessage(r, m) {
    this.emit("message", m);
    if (r.handler) {
      try {
        r.handler(m);
      } catch (e) {
        this.emit("listenerError", e, "message");
      }
    }
  }

  // ------------------------------------------------------------------ offline queue

  /** Whether a publish into `room` can go out now: connected, the room (if joined) is
   * joined on this connection, and no earlier publish into it is still queued. */
  _canSend(room) {
    if (!this._roomSendable(room)) return false;
    for (let i = 0; i < this._queue.length; i++) if (this._queue[i].frame.room === room) return false;
    return true;
  }

  _roomSendable(room) {
    if (this.state !== "open" || !this._sock) return false;
    const r = this._rooms.get(room);
    return !r || r.active;
  }

  /** Send a publish (again, with the same `cid`, after a reconnect). Its deadline
   * (`publishTimeout`) starts at the first send. */
  _sendPublish(job) {
    job.sends++;
    if (!job.timer) job.timer = setTimeout(() => this._publishTimedOut(job), this.options.publishTimeout);
    job.id = this._sendRequest(job.frame, "publish", job.resolve, job.reject, null, job);
  }

  _publishTimedOut(job) {
    job.timer = null;
    if (job.done) return;
    const entry = this._pending.get(job.id);
    if (entry && entry.job === job) {
      this._pending.delete(job.id);
      clearTimeout(entry.timer);
    }
    const i = this._queue.indexOf(job);
    if (i >= 0) this._queue.splice(i, 1);
    const f = job.frame;
    job.reject(
      new GatewayError(
        ErrorCodes.TIMEOUT,
        "no ack for the publish into " + f.room + " (cid " + f.cid + ") within " + this.options.publishTimeout + " ms, sent " + job.sends + " time(s): it may or may not have been published",
        f.id
      )
    );
  }

  _enqueue(item) {
    if (this._stopped && this.state === "closed") {
      item.reject(this._closedError());
      return;
    }
    if (this.options.offline === "reject") {
      item.reject(new GatewayError(ErrorCodes.OFFLINE, "not connected: publish rejected (offline: \"reject\")"));
      this._autoConnect();
      return;
    }
    if (this._queue.length >= this.options.offlineQueueSize) {
      item.reject(new GatewayError(ErrorCodes.QUEUE_FULL, "not connected and the offline queue is full (" + this.options.offlineQueueSize + ")"));
      return;
    }
    this._queue.push(item);
    this._autoConnect();
  }

  /** Send the queued publishes whose room is ready (order kept within each room). */
  _flushQueue() {
    if (!this._queue.length) return;
    const q = this._queue;
    const keep = [];
    const blocked = {};
    this._queue = [];
    for (let i = 0; i < q.length; i++) {
      const item = q[i];
      const room = item.frame.room;
      if (!blocked[room] && this._roomSendable(room)) this._sendPublish(item);
      else {
        blocked[room] = true;
        keep.push(item);
      }
    }
    // A send that failed dropped the connection and put the publishes in flight back into
    // the queue: they were sent before the ones kept here.
    this._queue = this._queue.concat(keep);
  }

  _failQueue(err) {
    const q = this._queue;
    this._queue = [];
    for (let i = 0; i < q.length; i++) q[i].reject(err);
  }

  // ------------------------------------------------------------------ token

  _tokenExpiresWithin(ms) {
    const exp = jwtExp(this._token);
    return exp !== null && exp * 1000 - now() <= ms;
  }

  _refreshToken() {
    if (this._tokenPromise) return this._tokenPromise;
    const old = this._token;
    const p = Promise.resolve()
      .then(() => this.options.getToken(old))
      .then(
        (token) => {
          if (this._tokenPromise === p) this._tokenPromise = null;
          if (!token || typeof token !== "string") throw new Error("livegate: getToken returned no token");
          this._token = token;
          this._forceRefresh = false;
          this.emit("token", token);
          this._scheduleTokenRefresh();
          return token;
        },
        (e) => {
          if (this._tokenPromise === p) this._tokenPromise = null;
          throw e;
        }
      );
    this._tokenPromise = p;
    p.catch((e) => {
      // Try again in a while (the connection logic also retries on its own).
      this.emit("error", e instanceof Error ? e : new Error(String(e)));
      if (!this._stopped) this._timers.set("token", 5000, () => this._refreshToken().catch(noop));
    });
    return p;
  }

  _scheduleTokenRefresh() {
    this._timers.clear("token");
    if (!this.options.getToken || this._stopped) return;
    const exp = jwtExp(this._token);
    if (exp === null) return;
    const left = exp * 1000 - now();
    const margin = Math.min(this.options.tokenRefreshMargin, left / 2);
    const delay = Math.min(MAX_TIMER, Math.max(0, left - margin));
    this._timers.set("token", delay, () => this._refreshToken().catch(noop));
  }

  _maybeRefreshTokenSoon() {
    if (this.options.getToken && this._tokenExpiresWithin(this.options.tokenRefreshMargin)) this._refreshToken().catch(noop);
  }
}

/** `new Client(options)` and start connecting. */
export function connect(options) {
  const c = new Client(options);
  c.connect().catch(noop);
  return c;
}
