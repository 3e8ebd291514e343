// Conversations (protocol 1.1, docs/protocol.md "Conversations"): a conversation list with
// unread counts kept current by live frames and by `sync` on every (re)connect; sends with a
// client message id (`cid`) queued while offline and sent in order after the sync; read,
// recall, typing, history paging; groups. Reached through `client.conversations`: nothing
// here runs (no `sync` is sent) until an app turns it on. Plain ES2017, like client.js.

import { noop, now, randomId, Timers } from "./util.js";
import { ErrorCode } from "./codes.js";
import { Emitter } from "./emitter.js";
import { ErrorCodes, GatewayError } from "./errors.js";
import { memoryStorage } from "./adapters.js";

/** Defaults of the `conversations` option (an object; `true` takes these). */
export const CONVERSATION_DEFAULTS = {
  /** {get(key) -> string|null, set(key, string), remove(key)}; null: the platform's
   * (wx/tt/uni setStorageSync, my.setStorageSync({key, data}), localStorage), else memory */
  storage: null,
  storageKey: "livegate.conv", // + "." + user id
  persist: true, // keep the list, the sync cursor and unsent messages in `storage`
  user: null, // load this user's saved list before the first connection (offline start)
  syncLimit: 100, // conversations per sync page (1-200)
  syncMsgs: 20, // newest unread messages per conversation in a sync (0-50)
  cacheSize: 200, // messages kept in memory per conversation (the newest)
  maxStored: 500, // conversations saved in `storage` (the most recently active)
  maxQueue: 100, // sends not yet acknowledged (queued, in flight, failed)
  sendTimeout: 60000, // from a send's first attempt to its ack, across retries and reconnects
  retryDelay: 1000, // first delay after 4029/5030/5000 (doubles, up to 16 s)
  typingInterval: 1000, // least ms between two typing frames per conversation
  saveDelay: 300, // writes to storage are grouped within this
  prefixes: { dm: "dm", group: "group", notice: "notice" }, // id prefix -> kind (the server's routes)
};

const CONV_CID_MAX = 64;
const CONV_MISSING_MAX = 1024; // seqs remembered per conversation as skipped by a live gap
const CONV_FILL_PAGE = 100;
const CONV_STATE_VERSION = 1;

/** Code-point (= UTF-8 byte) order of two strings: -1, 0, 1. */
function byteOrder(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.codePointAt(i);
    const y = b.codePointAt(i);
    if (x !== y) return x < y ? -1 : 1;
    if (x > 0xffff) i++;
  }
  return a.length === b.length ? 0 : a.length < b.length ? -1 : 1;
}

/** The id of the dm between users `a` and `b`: `dm:<lower>:<higher>` in byte order (what the
 * server expects; either side computes the same id). `prefix`: the dm route's, "dm". */
export function dmId(a, b, prefix) {
  a = String(a);
  b = String(b);
  const p = prefix || "dm";
  return byteOrder(a, b) <= 0 ? p + ":" + a + ":" + b : p + ":" + b + ":" + a;
}

function max(a, b) {
  if (typeof a !== "number") return typeof b === "number" ? b : 0;
  return typeof b === "number" && b > a ? b : a;
}

function isConnectionError(e) {
  return !!e && (e.code === ErrorCodes.CONNECTION_LOST || e.code === ErrorCodes.OFFLINE || e.code === ErrorCodes.TIMEOUT);
}

/** Server errors after which a send is tried again (same cid) after a delay. */
function isRetryableServerError(e) {
  return !!e && (e.code === ErrorCode.RATE_LIMITED || e.code === ErrorCode.STORE_UNAVAILABLE || e.code === ErrorCode.INTERNAL);
}

/** Index of `seq` in the ascending array `msgs`, or -(insertion point) - 1. */
function findSeq(msgs, seq) {
  let lo = 0;
  let hi = msgs.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const s = msgs[mid].seq;
    if (s === seq) return mid;
    if (s < seq) lo = mid + 1;
    else hi = mid - 1;
  }
  return -lo - 1;
}

/**
 * The conversations of the client's user. Events (`on(name, fn)`):
 * - `change` ({rooms, total}): the list or a badge changed (rooms: the ones that changed;
 *   total: totalUnread()); once per batch of changes
 * - `message` (msg, {room, source, conv}): a message not seen before (source "live",
 *   "sync", "history" or "sent"); each (room, seq) once
 * - `read` ({room, user, seq}): this user read up to seq (on another device, or here)
 * - `receipt` ({room, user, seq}): the dm's peer read up to seq
 * - `recall` ({room, seq, by, ts, source}): a message was recalled (tombstoned)
 * - `typing` ({room, user}): someone else is typing
 * - `added` ({room, role}), `removed` ({room}): this user joined or left a conversation
 * - `synced` ({count, full}): a sync finished (count: conversations it brought)
 * - `sent` ({cid, room, seq, dup, msg}), `sendFailed` ({cid, room, error}),
 *   `pending` ({room}): the unsent messages of room changed (see pending())
 * - `error` (GatewayError): a sync or a background request failed
 */
export class Conversations extends Emitter {
  constructor(client, options) {
    super();
    const o = {};
    for (const k in CONVERSATION_DEFAULTS) o[k] = CONVERSATION_DEFAULTS[k];
    for (const k in options || {}) if (options[k] !== undefined) o[k] = options[k];
    this.options = o;
    this.client = client;
    this.storage = o.storage || (client.adapter && client.adapter.storage) || memoryStorage();
    this.user = null; // whose list this is
    this._convs = new Map(); // room -> conversation (see _blank)
    this._cursor = null;
    this._outbox = []; // sends not yet acknowledged, in order
    this._inflight = {}; // room -> the send in flight (one per room: order kept)
    this._reads = {}; // room -> {want, busy, waiters}
    this._watchers = new Map(); // room -> [watcher]
    this._typingAt = {};
    this._ready = false; // open and this connection's sync done
    this._syncing = null;
    this._syncAgain = false;
    this._syncRound = 0;
    this._syncRetry = 0;
    this._openWaiters = [];
    this._dirty = new Set();
    this._changeScheduled = false;
    this._timers = new Timers();
    this._closed = false;
    if (o.user) this._load(String(o.user));
    if (client.state === "open" && client.user) this._onConnected();
  }

  // ------------------------------------------------------------------ list

  /** The conversations, most recently active first (plain objects, safe to `setData`).
   * `{includeLeft: false}` leaves out the ones this user was removed from or left. */
  list(opts) {
    const includeLeft = !opts || opts.includeLeft !== false;
    const out = [];
    this._convs.forEach((c) => {
      if (c.placeholder && !c.last) return;
      if (includeLeft || c.member) out.push(this._view(c));
    });
    out.sort((x, y) => y.updated - x.updated || (x.room < y.room ? -1 : x.room > y.room ? 1 : 0));
    return out;
  }

  /** One conversation (a plain object) or null. */
  get(room) {
    const c = this._convs.get(room);
    return c ? this._view(c) : null;
  }

  /** Unread messages over the conversations this user is a member of (the tab bar badge). */
  totalUnread() {
    let n = 0;
    this._convs.forEach((c) => {
      if (c.member) n += this._unread(c);
    });
    return n;
  }

  /** Messages of `room` held in memory (the newest `cacheSize`, from sync, live frames,
   * history and sends), oldest first. */
  messages(room) {
    const c = this._convs.get(room);
    return c ? c.msgs.slice() : [];
  }

  /** The sync cursor (server time in ms) of the last complete sync, or null. */
  get cursor() {
    return this._cursor;
  }

  /** The dm id between this user and `peer`. */
  dm(peer) {
    if (!this.user && !this.client.user) throw new Error("livegate: the user id is not known yet (connect first, or pass conversations.user)");
    return dmId(this.user || this.client.user, peer, this.options.prefixes && this._prefixOf("dm"));
  }

  /** The other user of a dm id (null for other conversations). */
  peer(room) {
    const parts = String(room).split(":");
    if (parts.length !== 3 || this._kindOfRoom(room) !== "dm") return null;
    const me = this.user || this.client.user;
    return parts[1] === me ? parts[2] : parts[1];
  }

  // ------------------------------------------------------------------ requests

  /** Fetch the conversations changed since the last sync (all of them the first time),
   * page by page, and merge them. Done automatically on every (re)connect. */
  sync() {
    if (this._syncing) {
      this._syncAgain = true;
      return this._syncing;
    }
    this.client._autoConnect();
    const p = this._whenOpen().then(() => this._runSync());
    this._syncing = p;
    const done = () => {
      if (this._syncing === p) this._syncing = null;
      if (this._syncAgain && !this._closed) {
        this._syncAgain = false;
        if (this._isOpen()) this.sync().catch(noop);
      }
    };
    p.then(done, done);
    return p;
  }

  /**
   * Send `data` into conversation `room` (a dm is created by its first message). Every send
   * carries a client message id, `opts.cid` or a generated one (time + random). While
   * disconnected, sends wait (in order, saved in storage) and go out after the reconnect's
   * sync; one whose ack was lost is sent again with the same cid, which the server answers
   * with the original seq (`dup: true`): a retry never duplicates. Resolves with the ack
   * (`seq`, `dup`, plus `cid`, `room` and `msg`, the message as stored).
   */
  send(room, data, opts) {
    opts = opts || {};
    const cid = opts.cid !== undefined && opts.cid !== null ? opts.cid : this.newCid();
    if (typeof cid !== "string" || !cid || cid.length > CONV_CID_MAX) {
      return Promise.reject(new TypeError("livegate: `cid` must be a non-empty string of at most " + CONV_CID_MAX + " characters"));
    }
    if (this._stoppedClient()) return Promise.reject(this._closedError());
    for (let i = 0; i < this._outbox.length; i++) {
      const it = this._outbox[i];
      if (it.cid === cid && it.room === room) {
        // The same message again (e.g. a retry button): one entry, one message.
        if (it.state === "failed") this._requeue(it);
        return it.promise;
      }
    }
    if (this._outbox.length >= this.options.maxQueue) {
      return Promise.reject(new GatewayError(ErrorCodes.QUEUE_FULL, "too many unsent messages (" + this.options.maxQueue + ")"));
    }
    const item = this._newItem(room, opts.type || "chat", data === undefined ? null : data, cid, now());
    this._outbox.push(item);
    this._pendingChanged(room);
    this._scheduleSave();
    this.client._autoConnect();
    this._pump();
    return item.promise;
  }

  /** A new client message id: time (base36) + 10 random characters. */
  newCid() {
    return now().toString(36) + randomId(10, this.client.options.random);
  }

  /** Unsent messages of `room` (all rooms when omitted), in order: {cid, room, type, data,
   * ts, state: "queued" | "sending" | "failed", error}. */
  pending(room) {
    const out = [];
    for (let i = 0; i < this._outbox.length; i++) {
      const it = this._outbox[i];
      if (room === undefined || it.room === room) out.push({ cid: it.cid, room: it.room, type: it.type, data: it.data, ts: it.ts, state: it.state, error: it.error });
    }
    return out;
  }

  /** Send a failed message again (same cid). Resolves like send(). */
  resend(cid) {
    for (let i = 0; i < this._outbox.length; i++) {
      const it = this._outbox[i];
      if (it.cid === cid) {
        if (it.state === "failed") this._requeue(it);
        return it.promise;
      }
    }
    return Promise.reject(new GatewayError(ErrorCodes.CLOSED, "no unsent message with cid " + cid));
  }

  /** Forget an unsent message (its promise is rejected with E_CLOSED unless settled). */
  discard(cid) {
    for (let i = 0; i < this._outbox.length; i++) {
      const it = this._outbox[i];
      if (it.cid === cid && it.state !== "sending") {
        this._outbox.splice(i, 1);
        it.reject(new GatewayError(ErrorCodes.CLOSED, "discarded"));
        this._pendingChanged(it.room);
        this._scheduleSave();
        return true;
      }
    }
    return false;
  }

  /** Mark `room` read up to `seq` (default: its last seq). The badge clears at once; the
   * server is told when connected (after the sync), and the user's other devices clear
   * theirs. Resolves with the ack (`read_seq`, `unread`). */
  read(room, seq) {
    const c = this._convs.get(room);
    if (seq === undefined || seq === null) seq = c ? c.last_seq : 0;
    if (typeof seq !== "number" || seq < 0) return Promise.reject(new TypeError("livegate: `seq` must be a number >= 0"));
    if (c && seq > c.read_seq) {
      c.read_seq = seq;
      this._changed(room);
      this._scheduleSave();
    }
    const r = this._reads[room] || (this._reads[room] = { want: 0, busy: false, waiters: [] });
    if (seq > r.want) r.want = seq;
    const p = new Promise((resolve, reject) => r.waiters.push({ seq: seq, resolve: resolve, reject: reject }));
    this._pumpRead(room);
    return p;
  }

  /** Recall message `seq` of `room` (the sender within the route's limit, or a group's
   * owner/admin). Resolves with the ack; rejects with 4032 (RECALL_DENIED) otherwise. */
  recall(room, seq) {
    return this._call({ op: "recall", room: room, seq: seq }).then((ack) => {
      this._tombstone(room, seq, this.client.user, now(), "local");
      this._flushSoon();
      return ack;
    });
  }

  /** A page of `room`: the newest, the one before `beforeSeq`, or (paging forward) the one
   * after `afterSeq`; `limit` 1-100 (200 forward). Resolves with the ack (`msgs` oldest
   * first, `more`). The messages are merged into the list (and the memory cache). A dm of
   * this user without any message yet is an empty page. */
  history(room, opts) {
    opts = opts || {};
    const frame = { op: "history", room: room, limit: opts.limit || 50 };
    if (opts.beforeSeq != null) frame.before_seq = opts.beforeSeq;
    if (opts.afterSeq != null) frame.after_seq = opts.afterSeq;
    return this._call(frame).then(
      (ack) => {
        this._ingestPage(room, ack.msgs, "history");
        return ack;
      },
      (e) => {
        // A dm of this user that has no message yet does not exist on the server (its first
        // message creates it), which answers 4031: that is an empty conversation.
        if (e.code === ErrorCode.NOT_MEMBER && this._ownDm(room)) return { op: "ack", room: room, msgs: [], more: false, local: true };
        throw e;
      }
    );
  }

  /** Tell the others in `room` that this user is typing (at most one frame per
   * `typingInterval`; nothing when offline or before the conversation exists). Returns
   * whether a frame was sent. */
  typing(room) {
    const t = now();
    // Not before the conversation exists (a new dm): nobody would get it, the server says 4033.
    if (!this._convs.has(room) || !this._isOpen() || t - (this._typingAt[room] || 0) < this.options.typingInterval) return false;
    this._typingAt[room] = t;
    return this.client._sendFrame({ op: "typing", room: room });
  }

  /** Create a group with `members` (besides this user, its owner) and `meta` (name,
   * avatar: a JSON object). `opts.id`: the group id (default: the server picks one).
   * Resolves with the ack (`room`) once the group is in the list. */
  createGroup(members, meta, opts) {
    const frame = { op: "create", kind: "group", members: members || [], meta: meta || {} };
    if (opts && opts.id) frame.room = opts.id;
    return this._call(frame).then((ack) => {
      if (ack.room && !this._convs.has(ack.room)) {
        const c = this._blank(ack.room, "group");
        c.role = "owner";
        c.meta = frame.meta;
        c.updated = now();
        c.placeholder = false;
        this._convs.set(ack.room, c);
        this._changed(ack.room);
        this._flushSoon();
      }
      return this.sync().then(
        () => ack,
        () => ack
      );
    });
  }

  /** Add `users` to group `room` (per the route's invite rule). Resolves with the ack
   * (`added`: the users that were not members yet). */
  invite(room, users) {
    return this._call({ op: "invite", room: room, users: users });
  }

  /** Remove `user` from group `room` (owner/admin; anyone may remove themselves). */
  remove(room, user) {
    return this._call({ op: "remove", room: room, user: user });
  }

  /** Leave group `room`. */
  leave(room) {
    return this.remove(room, this.user || this.client.user);
  }

  /**
   * Follow `room` message by message, in seq order, with no hole (a chat page): `onMessage`
   * gets every message after `opts.after` (default: the last one known), live ones and, after
   * a reconnect or a gap, the missing ones fetched with `history`. Own messages come with
   * their `cid`. Returns a function that stops it.
   */
  watch(room, opts) {
    opts = opts || {};
    const c = this._convs.get(room);
    const w = {
      room: room,
      pos: typeof opts.after === "number" ? opts.after : c ? c.last_seq : 0,
      held: new Map(),
      filling: false,
      fn: opts.onMessage || noop,
      active: true,
    };
    const list = this._watchers.get(room) || [];
    list.push(w);
    this._watchers.set(room, list);
    if (c) for (let i = 0; i < c.msgs.length; i++) this._feedOne(w, c.msgs[i]);
    this._fill(w);
    return () => {
      w.active = false;
      const l = this._watchers.get(room);
      if (!l) return;
      const i = l.indexOf(w);
      if (i >= 0) l.splice(i, 1);
      if (!l.length) this._watchers.delete(room);
    };
  }

  /** Load the saved list of `user` (to show it before connecting). */
  load(user) {
    this._load(String(user));
  }

  /** Forget everything (memory and storage) for this user, e.g. on logout. */
  clear() {
    const key = this._key();
    this._reset();
    this._cursor = null;
    this._rejectOutbox(new GatewayError(ErrorCodes.CLOSED, "conversations cleared"));
    if (key) {
      try {
        this.storage.remove(key);
      } catch (e) {
        // ignore
      }
    }
    this._flushSoon();
  }

  // ------------------------------------------------------------------ from the client

  _onConnected() {
    this._closed = false; // connect() after close() starts over
    const user = this.client.user;
    if (user && user !== this.user) this._load(user);
    this._ready = false;
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (let i = 0; i < waiters.length; i++) {
      clearTimeout(waiters[i].timer);
      waiters[i].resolve();
    }
    this._syncRetry = 0;
    this._connectionSync();
  }

  _connectionSync() {
    const gen = this.client._gen;
    (this._syncing || this.sync()).then(
      () => {
        if (gen === this.client._gen && this._isOpen()) this._onReady();
      },
      (e) => {
        if (gen !== this.client._gen || !this._isOpen() || this._closed) return;
        if (isConnectionError(e) && e.code !== ErrorCodes.TIMEOUT) return; // the next connection syncs
        this.emit("error", e);
        // Send anyway (the server decides); sync again later.
        this._onReady();
        if (e.code !== ErrorCode.UNKNOWN_OP) {
          const d = Math.min(30000, this.options.retryDelay * Math.pow(2, this._syncRetry++));
          this._timers.set("sync", d, () => {
            if (gen === this.client._gen && this._isOpen()) this.sync().catch(noop);
          });
        }
      }
    );
  }

  _onReady() {
    this._ready = true;
    this._pump();
    for (const room in this._reads) this._pumpRead(room);
    this._watchers.forEach((list) => list.forEach((w) => this._fill(w)));
  }

  _onDisconnected() {
    this._ready = false;
    this._timers.clear("sync");
  }

  _onHide() {
    this._saveNow();
  }

  /** The client closed for good: unsent messages are rejected (and forgotten). */
  _onClose(err) {
    this._ready = false;
    this._closed = true;
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (let i = 0; i < waiters.length; i++) {
      clearTimeout(waiters[i].timer);
      waiters[i].reject(err);
    }
    for (const room in this._reads) {
      const r = this._reads[room];
      const w = r.waiters;
      r.waiters = [];
      for (let i = 0; i < w.length; i++) w[i].reject(err);
    }
    this._rejectOutbox(err);
    this._saveNow();
    this._timers.clearAll();
  }

  _onFrame(f) {
    switch (f.op) {
      case "msg":
        this._onLiveMessage(f);
        break;
      case "read":
        this._onRead(f);
        break;
      case "recall":
        if (typeof f.seq === "number") this._tombstone(f.room, f.seq, f.by, f.ts, "live");
        break;
      case "typing":
        if (f.user !== this.client.user) this.emit("typing", { room: f.room, user: f.user });
        break;
      case "conv":
        this._onConvEvent(f);
        break;
      default:
        break;
    }
    this._flushSoon();
  }

  // ------------------------------------------------------------------ frames

  _onLiveMessage(m) {
    if (!m.room) return;
    const c = this._convs.get(m.room) || this._placeholder(m.room, m);
    if (!c) return; // not a conversation (e.g. a room left a moment ago)
    const item = this._inflight[m.room];
    if (item && m.from === this.client.user && m.from) {
      // Probably the echo of the send in flight: hold it until its ack (a moment), so that it
      // comes out once, with its cid.
      item.held.push(m);
      return;
    }
    this._accept(m, "live");
  }

  _onRead(f) {
    const c = this._convs.get(f.room);
    if (!c || typeof f.seq !== "number") return;
    if (f.user === this.client.user) {
      c.server_read = max(c.server_read, f.seq);
      if (f.seq > c.read_seq) {
        c.read_seq = f.seq;
        this._changed(f.room);
        this._scheduleSave();
      }
      this.emit("read", { room: f.room, user: f.user, seq: f.seq });
    } else {
      if (f.seq > (c.peer_read_seq || 0)) {
        c.peer_read_seq = f.seq;
        this._changed(f.room);
        this._scheduleSave();
      }
      this.emit("receipt", { room: f.room, user: f.user, seq: f.seq });
    }
  }

  _onConvEvent(f) {
    if (!f.room) return;
    let c = this._convs.get(f.room);
    if (f.event === "added") {
      if (!c) {
        c = this._blank(f.room, this._kindOfRoom(f.room));
        c.updated = now();
        c.placeholder = true;
        c.placeholderRound = this._syncRound;
        this._convs.set(f.room, c);
      }
      c.member = true;
      if (f.role) c.role = f.role;
      this._changed(f.room);
      this.emit("added", { room: f.room, role: f.role || null });
      this._syncSoon();
    } else if (f.event === "removed") {
      if (c && c.member) {
        c.member = false;
        this._changed(f.room);
        this._scheduleSave();
      }
      this.emit("removed", { room: f.room });
    }
  }

  // ------------------------------------------------------------------ merging

  /** Accept one message: merge it into its conversation, then to the watchers. */
  _accept(m, source) {
    this._ingest(m, source);
    this._feed(m);
  }

  _ingestPage(room, msgs, source) {
    if (!Array.isArray(msgs)) return;
    for (let i = 0; i < msgs.length; i++) {
      const m = msgs[i];
      if (!m || typeof m !== "object") continue;
      if (m.room === undefined) m.room = room;
      this._accept(m, source);
    }
    this._flushSoon();
  }

  /** Merge message `m` into its conversation: cache, last message, last_seq, read_seq (a
   * message of this user counts as read, as on the server), the `message` event once per
   * (room, seq). */
  _ingest(m, source) {
    if (!m || typeof m !== "object" || !m.room) return;
    const c = this._convs.get(m.room) || this._placeholder(m.room, m);
    if (!c) return;
    const seq = typeof m.seq === "number" ? m.seq : 0;
    if (seq <= 0) {
      this.emit("message", m, { room: m.room, source: source, conv: this._view(c) });
      return;
    }
    const i = findSeq(c.msgs, seq);
    if (i >= 0) {
      const old = c.msgs[i];
      if (m.cid && !old.cid) old.cid = m.cid;
      if (m.type === "recalled" && old.type !== "recalled") {
        const by = m.data && m.data.by;
        const at = m.data && m.data.at;
        this._tombstone(m.room, seq, by, at, source);
      }
      return;
    }
    c.msgs.splice(-i - 1, 0, m);
    if (m.type === "recalled") c.recalled.add(seq);
    if (c.msgs.length > this.options.cacheSize) c.msgs.splice(0, c.msgs.length - this.options.cacheSize);
    let fresh = false;
    if (seq > c.last_seq) {
      if (source === "live" && c.last_seq > 0 && seq > c.last_seq + 1) {
        for (let s = Math.max(c.last_seq + 1, seq - CONV_MISSING_MAX); s < seq; s++) c.missing.add(s);
        if (c.missing.size > CONV_MISSING_MAX) c.missing.forEach((s) => s < seq - CONV_MISSING_MAX && c.missing.delete(s));
      }
      c.last_seq = seq;
      fresh = true;
    } else if (c.missing.delete(seq)) {
      fresh = true;
    }
    if (!c.last || seq >= c.last.seq) c.last = m;
    if (typeof m.ts === "number" && m.ts > c.updated) c.updated = m.ts;
    if (m.from && m.from === this.client.user && seq > c.read_seq) c.read_seq = seq;
    if (fresh) {
      this._changed(m.room);
      this._scheduleSave();
      this.emit("message", m, { room: m.room, source: source, conv: this._view(c) });
    }
  }

  /** Merge a sync page. */
  _mergeSync(ack) {
    const convs = Array.isArray(ack.convs) ? ack.convs : [];
    for (let i = 0; i < convs.length; i++) {
      const s = convs[i];
      if (!s || typeof s.room !== "string") continue;
      const room = s.room;
      let c = this._convs.get(room);
      if (!c) {
        c = this._blank(room, s.kind);
        this._convs.set(room, c);
      }
      c.placeholder = false;
      if (s.kind) c.kind = s.kind;
      if (s.meta && typeof s.meta === "object") c.meta = s.meta;
      if (s.role !== undefined) c.role = s.role;
      if (typeof s.member === "boolean") c.member = s.member;
      if (s.muted_until !== undefined) c.muted_until = s.muted_until;
      // Messages first (the `message` events of the ones not seen), then the positions.
      this._ingestPage(room, s.msgs, "sync");
      if (s.last && typeof s.last === "object") {
        if (s.last.room === undefined) s.last.room = room;
        this._accept(s.last, "sync");
      }
      c.last_seq = max(c.last_seq, s.last_seq);
      c.read_seq = max(c.read_seq, s.read_seq);
      c.server_read = max(c.server_read, s.read_seq);
      if (typeof s.updated === "number" && s.updated > c.updated) c.updated = s.updated;
      if (typeof s.peer_read_seq === "number") c.peer_read_seq = max(c.peer_read_seq, s.peer_read_seq);
      const rec = Array.isArray(s.recalled) ? s.recalled : [];
      for (let k = 0; k < rec.length; k++) if (typeof rec[k] === "number") this._tombstone(room, rec[k], null, null, "sync");
      this._changed(room);
    }
    this._flushSoon();
    return convs.length;
  }

  /** Message `seq` of `room` was recalled: its cached copy (and the last message) become
   * `{"type": "recalled", "data": {"by", "at"}}`, as the server shows it; `recall` event
   * unless it was known already. */
  _tombstone(room, seq, by, ts, source) {
    const c = this._convs.get(room);
    let known = false;
    if (c) {
      known = c.recalled.has(seq);
      c.recalled.add(seq);
      if (c.recalled.size > CONV_MISSING_MAX) c.recalled.delete(c.recalled.values().next().value);
      const i = findSeq(c.msgs, seq);
      const tomb = (m) => {
        const t = {};
        for (const k in m) t[k] = m[k];
        t.type = "recalled";
        t.data = { by: by === undefined ? null : by, at: ts === undefined ? null : ts };
        return t;
      };
      if (i >= 0) {
        if (c.msgs[i].type === "recalled") known = true;
        else c.msgs[i] = tomb(c.msgs[i]);
      }
      if (c.last && c.last.seq === seq) {
        if (c.last.type === "recalled") known = true;
        else c.last = i >= 0 ? c.msgs[i] : tomb(c.last);
        this._changed(room);
        this._scheduleSave();
      }
    }
    if (!known) this.emit("recall", { room: room, seq: seq, by: by === undefined ? null : by, ts: ts === undefined ? null : ts, source: source });
  }

  /** A conversation for a message or event of a room not in the list yet (a new dm, a group
   * joined on another device): kept until the sync that follows says what it is. */
  _placeholder(room, m) {
    const kind = this._kindOfRoom(room);
    if (!kind) return null;
    const c = this._blank(room, kind);
    c.placeholder = true;
    c.placeholderRound = this._syncRound;
    c.updated = m && typeof m.ts === "number" ? m.ts : now();
    this._convs.set(room, c);
    this._changed(room);
    this._syncSoon();
    return c;
  }

  _blank(room, kind) {
    return {
      room: room,
      kind: kind || null,
      meta: {},
      role: null,
      member: true,
      last_seq: 0,
      read_seq: 0,
      server_read: 0,
      peer_read_seq: null,
      muted_until: null,
      updated: 0,
      last: null,
      msgs: [],
      missing: new Set(),
      recalled: new Set(), // seqs known to be recalled (one `recall` event each)
      placeholder: false,
      placeholderRound: 0,
    };
  }

  _unread(c) {
    return Math.max(0, c.last_seq - c.read_seq);
  }

  _view(c) {
    return {
      room: c.room,
      kind: c.kind,
      meta: c.meta,
      role: c.role,
      member: c.member,
      unread: this._unread(c),
      last_seq: c.last_seq,
      read_seq: c.read_seq,
      peer_read_seq: c.peer_read_seq,
      muted_until: c.muted_until,
      updated: c.updated,
      last: c.last,
      peer: c.kind === "dm" ? this.peer(c.room) : null,
    };
  }

  /** Whether `room` is a dm id that names this user. */
  _ownDm(room) {
    const me = this.user || this.client.user;
    if (!me || this._kindOfRoom(room) !== "dm") return false;
    const parts = String(room).split(":");
    return parts.length === 3 && (parts[1] === me || parts[2] === me);
  }

  _prefixOf(kind) {
    const p = this.options.prefixes || {};
    for (const k in p) if (p[k] === kind) return k;
    return kind;
  }

  _kindOfRoom(room) {
    const i = String(room).indexOf(":");
    if (i <= 0) return null;
    const p = this.options.prefixes || {};
    const kind = p[room.slice(0, i)];
    return kind || null;
  }

  // ------------------------------------------------------------------ watchers

  _feed(m) {
    const list = this._watchers.get(m.room);
    if (!list) return;
    const copy = list.slice();
    for (let i = 0; i < copy.length; i++) this._feedOne(copy[i], m);
  }

  _feedOne(w, m) {
    if (!w.active || typeof m.seq !== "number" || m.seq <= w.pos) return;
    if (m.seq === w.pos + 1) {
      this._deliver(w, m);
      this._drainWatcher(w);
      return;
    }
    if (!w.held.has(m.seq)) w.held.set(m.seq, m);
    this._fill(w);
  }

  _deliver(w, m) {
    w.pos = m.seq;
    try {
      w.fn(m);
    } catch (e) {
      this.emit("listenerError", e, "watch");
    }
  }

  _drainWatcher(w) {
    while (w.active && w.held.has(w.pos + 1)) {
      const m = w.held.get(w.pos + 1);
      w.held.delete(w.pos + 1);
      this._deliver(w, m);
    }
    w.held.forEach((m, s) => s <= w.pos && w.held.delete(s));
  }

  /** Fetch what `w` misses (seqs after its position up to the conversation's last) with
   * `history` pages, one request at a time. */
  _fill(w) {
    if (!w.active || w.filling || !this._ready || !this._isOpen() || this._inflight[w.room]) return;
    const c = this._convs.get(w.room);
    let top = c ? c.last_seq : 0;
    w.held.forEach((m, s) => {
      if (s > top) top = s;
    });
    if (top <= w.pos) return;
    w.filling = true;
    const from = w.pos;
    this.client._request({ op: "history", room: w.room, after_seq: from, limit: CONV_FILL_PAGE }, "conv").then(
      (ack) => {
        w.filling = false;
        this._ingestPage(w.room, ack.msgs, "history");
        if (!w.active) return;
        if (w.pos > from && ack.more) {
          this._fill(w);
          return;
        }
        if (w.held.size) {
          // The server has nothing for the seqs before the held ones: go on without them.
          let lo = Infinity;
          w.held.forEach((m, s) => {
            if (s < lo) lo = s;
          });
          if (lo > w.pos + 1) w.pos = lo - 1;
          this._drainWatcher(w);
        }
      },
      (e) => {
        w.filling = false;
        if (!isConnectionError(e)) this.emit("error", e);
      }
    );
  }

  // ------------------------------------------------------------------ sync

  _runSync() {
    const o = this.options;
    const since = this._cursor;
    const round = ++this._syncRound;
    let cursor = null;
    let count = 0;
    const page = (before) => {
      const frame = { op: "sync", limit: Math.max(1, Math.min(200, o.syncLimit)), msgs: Math.max(0, Math.min(50, o.syncMsgs)) };
      if (since) frame.since = since;
      if (before) frame.before = before;
      return this.client._request(frame, "conv").then((ack) => {
        if (cursor === null) cursor = ack.cursor;
        count += this._mergeSync(ack);
        if (ack.more && ack.next) return page(ack.next);
        return null;
      });
    };
    return page(null).then(() => {
      if (typeof cursor === "number") this._cursor = cursor;
      // Placeholders without a message that the sync did not confirm are not conversations
      // of this user (one with a message stays: a message is stored before it is delivered,
      // and a later sync names it).
      const gone = [];
      this._convs.forEach((c) => {
        if (c.placeholder && c.placeholderRound < round && !c.last) gone.push(c.room);
      });
      for (let i = 0; i < gone.length; i++) {
        this._convs.delete(gone[i]);
        this._changed(gone[i]);
      }
      this._syncRetry = 0;
      this._saveNow();
      this._flushSoon();
      const info = { count: count, full: !since };
      this.emit("synced", info);
      return info;
    });
  }

  _syncSoon() {
    if (this._syncing) {
      this._syncAgain = true; // the running sync may have been answered before the change
      return;
    }
    if (!this._ready) return; // the connection's own sync comes
    this._timers.set("syncSoon", 30, () => {
      if (this._isOpen()) this.sync().catch((e) => isConnectionError(e) || this.emit("error", e));
    });
  }

  // ------------------------------------------------------------------ sends

  _newItem(room, type, data, cid, ts) {
    const item = { cid: cid, room: room, type: type, data: data, ts: ts, state: "queued", error: null, first: 0, tries: 0, waitUntil: 0, held: [] };
    item.promise = new Promise((resolve, reject) => {
      item.resolve = resolve;
      item.reject = reject;
    });
    item.promise.catch(noop); // restored items have nobody listening; failures are events too
    return item;
  }

  _requeue(it) {
    it.state = "queued";
    it.error = null;
    it.first = 0;
    it.tries = 0;
    it.waitUntil = 0;
    it.promise = new Promise((resolve, reject) => {
      it.resolve = resolve;
      it.reject = reject;
    });
    it.promise.catch(noop);
    this._pendingChanged(it.room);
    this._scheduleSave();
    this.client._autoConnect();
    this._pump();
  }

  /** Send the head of each room's queue (one in flight per room keeps the order; failed
   * ones do not block). */
  _pump() {
    if (!this._ready || !this._isOpen()) return;
    const blocked = {};
    const t = now();
    let wake = Infinity;
    for (let i = 0; i < this._outbox.length; i++) {
      const it = this._outbox[i];
      if (it.state === "failed" || blocked[it.room]) continue;
      blocked[it.room] = true;
      if (it.state !== "queued" || this._inflight[it.room]) continue;
      if (it.waitUntil > t) {
        wake = Math.min(wake, it.waitUntil);
        continue;
      }
      this._sendItem(it);
      if (!this._ready) return; // the send dropped the connection
    }
    if (wake !== Infinity) this._timers.set("pump", wake - t, () => this._pump());
  }

  _sendItem(it) {
    it.state = "sending";
    it.tries++;
    if (!it.first) it.first = now();
    this._inflight[it.room] = it;
    this._pendingChanged(it.room);
    const frame = { op: "publish", room: it.room, type: it.type, data: it.data, cid: it.cid };
    this.client._request(frame, "conv").then(
      (ack) => this._onSent(it, ack),
      (e) => this._onSendError(it, e)
    );
  }

  _release(it) {
    if (this._inflight[it.room] === it) delete this._inflight[it.room];
    const held = it.held;
    it.held = [];
    return held;
  }

  _onSent(it, ack) {
    const held = this._release(it);
    const i = this._outbox.indexOf(it);
    if (i >= 0) this._outbox.splice(i, 1);
    const seq = typeof ack.seq === "number" ? ack.seq : 0;
    let msg = null;
    for (let k = 0; k < held.length; k++) {
      if (held[k].seq === seq) {
        held[k].cid = it.cid;
        msg = held[k];
      }
    }
    const c = this._convs.get(it.room);
    if (!msg && seq > 0) {
      const k = c ? findSeq(c.msgs, seq) : -1;
      if (k >= 0) {
        msg = c.msgs[k];
        if (!msg.cid) msg.cid = it.cid;
      } else {
        msg = { op: "msg", room: it.room, seq: seq, type: it.type, from: this.client.user, data: it.data, ts: now(), cid: it.cid };
      }
    }
    // The echo and the ack's message in seq order, then whatever else was held.
    const all = held.slice();
    if (msg && all.indexOf(msg) < 0) all.push(msg);
    all.sort((x, y) => (x.seq || 0) - (y.seq || 0));
    for (let k = 0; k < all.length; k++) this._accept(all[k], all[k] === msg ? "sent" : "live");
    ack.cid = it.cid;
    ack.room = it.room;
    ack.msg = msg;
    this._pendingChanged(it.room);
    this._scheduleSave();
    this.emit("sent", { cid: it.cid, room: it.room, seq: seq, dup: !!ack.dup, msg: msg });
    this._flushSoon();
    it.resolve(ack);
    this._afterSend(it.room);
  }

  _onSendError(it, e) {
    const held = this._release(it);
    for (let k = 0; k < held.length; k++) this._accept(held[k], "live");
    if (this._outbox.indexOf(it) < 0) return; // discarded or closed meanwhile
    const expired = this.options.sendTimeout > 0 && it.first > 0 && now() - it.first > this.options.sendTimeout;
    if (!this._closed && !expired && (isConnectionError(e) || isRetryableServerError(e))) {
      it.state = "queued";
      // Time offline does not count against sendTimeout: the queue is there to wait.
      if (e.code === ErrorCodes.CONNECTION_LOST || e.code === ErrorCodes.OFFLINE) it.first = 0;
      if (isRetryableServerError(e)) it.waitUntil = now() + Math.min(16000, this.options.retryDelay * Math.pow(2, Math.min(4, it.tries - 1)));
      this._pendingChanged(it.room);
      this._flushSoon();
      this._pump();
      return;
    }
    it.state = "failed";
    it.error = e;
    if (expired && e.code === ErrorCodes.TIMEOUT) {
      it.error = new GatewayError(ErrorCodes.TIMEOUT, "no ack for the message (cid " + it.cid + ") within " + this.options.sendTimeout + " ms, sent " + it.tries + " time(s): resend() it (same cid: the server does not store it twice)");
    }
    this._pendingChanged(it.room);
    this._scheduleSave();
    this.emit("sendFailed", { cid: it.cid, room: it.room, error: it.error });
    this._flushSoon();
    it.reject(it.error);
    this._afterSend(it.room);
  }

  _afterSend(room) {
    this._pump();
    const list = this._watchers.get(room);
    if (list) list.forEach((w) => this._fill(w));
  }

  _rejectOutbox(err) {
    const q = this._outbox;
    this._outbox = [];
    this._inflight = {};
    const rooms = {};
    for (let i = 0; i < q.length; i++) {
      rooms[q[i].room] = true;
      q[i].reject(err);
    }
    for (const r in rooms) this._pendingChanged(r);
  }

  _pendingChanged(room) {
    this.emit("pending", { room: room });
  }

  // ------------------------------------------------------------------ reads

  _pumpRead(room) {
    const r = this._reads[room];
    if (!r || r.busy || !r.waiters.length || !this._ready || !this._isOpen()) return;
    const c = this._convs.get(room);
    const local = () => ({ op: "ack", room: room, read_seq: c ? c.read_seq : r.want, unread: c ? this._unread(c) : 0, local: true });
    if (r.want <= (c ? c.server_read : 0)) {
      const w = r.waiters;
      r.waiters = [];
      const a = local();
      for (let i = 0; i < w.length; i++) w[i].resolve(a);
      return;
    }
    r.busy = true;
    const seq = r.want;
    this.client._request({ op: "read", room: room, seq: seq }, "conv").then(
      (ack) => {
        r.busy = false;
        const cv = this._convs.get(room);
        if (cv) {
          cv.server_read = max(cv.server_read, ack.read_seq);
          cv.read_seq = max(cv.read_seq, ack.read_seq);
          const last = (ack.read_seq || 0) + (ack.unread || 0);
          if (last > cv.last_seq) this._syncSoon(); // messages this device has not seen yet
          this._changed(room);
          this._scheduleSave();
          this._flushSoon();
        }
        this._settleReads(r, seq, ack, null);
        this._pumpRead(room);
      },
      (e) => {
        r.busy = false;
        if (isConnectionError(e)) return; // sent again after the next sync
        this._settleReads(r, seq, null, e);
        if (r.want <= seq) r.want = 0;
        this._pumpRead(room);
      }
    );
  }

  _settleReads(r, seq, ack, err) {
    const keep = [];
    for (let i = 0; i < r.waiters.length; i++) {
      const w = r.waiters[i];
      if (w.seq > seq) keep.push(w);
      else if (err) w.reject(err);
      else w.resolve(ack);
    }
    r.waiters = keep;
  }

  // ------------------------------------------------------------------ helpers

  _isOpen() {
    return this.client.state === "open" && !!this.client._sock;
  }

  /** The client was closed (or gave up) and not connected again since. */
  _stoppedClient() {
    return this.client._stopped && this.client.state === "closed";
  }

  _closedError() {
    return new GatewayError(ErrorCodes.CLOSED, "client closed");
  }

  /** Resolves when the client is connected (connecting it if idle); rejects with
   * E_OFFLINE after `requestTimeout`, or E_CLOSED. */
  _whenOpen() {
    if (this._isOpen()) return Promise.resolve();
    const c = this.client;
    if (this._stoppedClient()) return Promise.reject(this._closedError());
    c._autoConnect();
    return new Promise((resolve, reject) => {
      const w = { resolve: resolve, reject: reject, timer: null };
      w.timer = setTimeout(() => {
        const i = this._openWaiters.indexOf(w);
        if (i >= 0) this._openWaiters.splice(i, 1);
        reject(new GatewayError(ErrorCodes.OFFLINE, "not connected within " + c.options.requestTimeout + " ms"));
      }, c.options.requestTimeout);
      this._openWaiters.push(w);
    });
  }

  /** A request once connected (rejections carry the server's code: 4031 NOT_MEMBER, 4032
   * RECALL_DENIED, 4033 NO_CONVERSATION, 4034 TOO_MANY_MEMBERS, ...). */
  _call(frame) {
    return this._whenOpen().then(() => this.client._request(frame, "conv"));
  }

  _changed(room) {
    this._dirty.add(room);
    this._flushSoon();
  }

  /** Emit `change` once for the changes of the current turn. */
  _flushSoon() {
    if (this._changeScheduled || !this._dirty.size) return;
    this._changeScheduled = true;
    Promise.resolve().then(() => {
      this._changeScheduled = false;
      if (!this._dirty.size) return;
      const rooms = Array.from(this._dirty);
      this._dirty.clear();
      this.emit("change", { rooms: rooms, total: this.totalUnread() });
    });
  }

  _reset() {
    this._convs = new Map();
    this._cursor = null;
    this._reads = {};
  }

  // ------------------------------------------------------------------ storage

  _key() {
    return this.user ? this.options.storageKey + "." + this.user : null;
  }

  /** Switch to `user`'s list: the saved one (list, cursor, unsent messages), merged with
   * unsent messages made before the user was known. */
  _load(user) {
    if (this.user === user) return;
    let unsent = this._outbox;
    if (this.user !== null) {
      // Another user: the previous one's list stays in storage for their next login; their
      // unsent messages are rejected (and forgotten), never sent as this user.
      this._rejectOutbox(new GatewayError(ErrorCodes.CLOSED, "the user changed from " + this.user + " to " + user));
      this._saveNow();
      unsent = [];
    }
    this.user = user;
    this._reset();
    this._outbox = [];
    this._inflight = {};
    let state = null;
    if (this.options.persist) {
      try {
        const text = this.storage.get(this._key());
        state = text ? JSON.parse(text) : null;
      } catch (e) {
        state = null;
      }
    }
    if (state && state.v === CONV_STATE_VERSION && state.user === user) {
      this._cursor = typeof state.cursor === "number" ? state.cursor : null;
      const convs = Array.isArray(state.convs) ? state.convs : [];
      for (let i = 0; i < convs.length; i++) {
        const s = convs[i];
        if (!s || typeof s.room !== "string") continue;
        const c = this._blank(s.room, s.kind);
        for (const k of ["meta", "role", "member", "last_seq", "read_seq", "server_read", "peer_read_seq", "muted_until", "updated", "last"]) {
          if (s[k] !== undefined) c[k] = s[k];
        }
        if (c.last && typeof c.last.seq === "number") c.msgs.push(c.last);
        c.placeholder = s.placeholder === true;
        this._convs.set(s.room, c);
        this._dirty.add(s.room);
      }
      const out = Array.isArray(state.outbox) ? state.outbox : [];
      for (let i = 0; i < out.length; i++) {
        const s = out[i];
        if (!s || typeof s.cid !== "string" || typeof s.room !== "string") continue;
        const it = this._newItem(s.room, s.type || "chat", s.data === undefined ? null : s.data, s.cid, s.ts || now());
        if (s.state === "failed") {
          it.state = "failed";
          it.error = new GatewayError(s.code || ErrorCodes.TIMEOUT, s.reason || "not sent");
        }
        this._outbox.push(it);
      }
    }
    for (let i = 0; i < unsent.length; i++) {
      if (!this._outbox.some((x) => x.cid === unsent[i].cid && x.room === unsent[i].room)) this._outbox.push(unsent[i]);
    }
    const rooms = {};
    for (let i = 0; i < this._outbox.length; i++) rooms[this._outbox[i].room] = true;
    for (const r in rooms) this._pendingChanged(r);
    this._flushSoon();
  }

  _scheduleSave() {
    if (!this.options.persist || this._timers.has("save") || !this.user) return;
    this._timers.set("save", this.options.saveDelay, () => this._saveNow());
  }

  _saveNow() {
    this._timers.clear("save");
    const key = this._key();
    if (!this.options.persist || !key) return;
    const convs = [];
    this._convs.forEach((c) => {
      // A placeholder with a message is a conversation the next sync confirms (or drops).
      if (!c.placeholder || c.last) convs.push(c);
    });
    convs.sort((x, y) => y.updated - x.updated);
    const state = {
      v: CONV_STATE_VERSION,
      user: this.user,
      // A list cut to maxStored cannot continue from the cursor: the next start syncs it all.
      cursor: convs.length > this.options.maxStored ? null : this._cursor,
      convs: convs.slice(0, this.options.maxStored).map((c) => ({
        room: c.room,
        kind: c.kind,
        meta: c.meta,
        role: c.role,
        member: c.member,
        last_seq: c.last_seq,
        read_seq: c.read_seq,
        server_read: c.server_read,
        peer_read_seq: c.peer_read_seq,
        muted_until: c.muted_until,
        updated: c.updated,
        last: c.last,
        placeholder: c.placeholder || undefined,
      })),
      outbox: this._outbox.map((it) => ({
        cid: it.cid,
        room: it.room,
        type: it.type,
        data: it.data,
        ts: it.ts,
        state: it.state === "failed" ? "failed" : "queued",
        code: it.error ? it.error.code : undefined,
        reason: it.error ? it.error.reason : undefined,
      })),
    };
    try {
      this.storage.set(key, JSON.stringify(state));
    } catch (e) {
      this.emit("error", e instanceof Error ? e : new Error(String(e)));
    }
  }
}
