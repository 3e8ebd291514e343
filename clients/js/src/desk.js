// The customer-service desk (docs/customer-service.md): the `cs.*` plugin ops over the
// client's request/ack machinery, and the sessions as conversations (`cs:<id>`, its
// transcript; `csi:<id>`, the agents' internal notes). Reached through `client.desk`; it
// turns the client's conversations on (a session is a conversation: synced on every
// connection, so a shopper whose mini-program was in the background gets the agent's
// replies on return). Plain ES2017, like client.js.

import { noop } from "./util.js";
import { ErrorCode } from "./codes.js";
import { Emitter } from "./emitter.js";
import { ErrorCodes, GatewayError } from "./errors.js";

/** Prefixes of the desk's conversations (the routes of docs/customer-service.md). */
export const DESK_ROOMS = { session: "cs:", notes: "csi:" };

/** Error codes of the desk's ops (docs/customer-service.md "Errors"). */
export const DeskError = {
  BAD_FIELDS: ErrorCode.BAD_REQUEST,
  FORBIDDEN: ErrorCode.FORBIDDEN, // not an agent / not your session
  NO_SESSION: ErrorCode.NOT_JOINED, // the protocol's 4004, here: no such session
  TAKEN: 4090, // accept lost the race
  AT_CAPACITY: 4091,
  CLOSED: 4092,
};

const STATUSES = { online: 1, away: 1, offline: 1 };
const TRANSCRIPT_MAX = 10 * 100; // messages transcript() fetches at most by default

function sessionId(s) {
  if (s && typeof s === "object") s = s.session;
  return typeof s === "string" && s ? s : null;
}

/**
 * The desk for the client's user: a shopper (open, handoff, close, rate, submitForm) or an
 * agent (setStatus, queue, mine, accept, transfer, note, info, watch). Events:
 * - `state` ({session, room, state, agent, department, by, seq, source, msg}): a `cs.state`
 *   message of a session this user is in (source: "live", "sync", "history", ...)
 * - `rating` ({session, room, msg}): the rating card (`cs.rating`) arrived: ask for stars
 * - `message` (msg, {session, room, notes, source}): any message of a session (`notes`:
 *   from the internal channel `csi:<id>`)
 * - agents: `queue` ({department, waiting}), `assigned` (session), `unassigned`
 *   ({session, reason}): the desk's `push` frames `cs.queue`, `cs.assigned`, `cs.unassigned`
 * - `error` (GatewayError): re-asserting the agent status after a reconnect failed
 */
export class Desk extends Emitter {
  constructor(client) {
    super();
    this.client = client;
    this.current = null; // the shopper's session: the last cs.open ack, updated by cs.state
    this.status = null; // the agent's status as last acknowledged: {status, capacity, load}
    this._wantStatus = null; // what setStatus asked for (re-sent after a reconnect)
    const conv = client.conversations;
    this.conversations = conv;
    client.on("frame", (f) => {
      if (f && f.op === "push" && typeof f.type === "string" && f.type.indexOf("cs.") === 0) this._onPush(f);
    });
    conv.on("message", (m, info) => this._onMessage(m, info));
    client.on("connected", () => this._reassert());
  }

  // ------------------------------------------------------------------ rooms

  /** The conversation of session `s` (an id or a session object): `cs:<id>`. */
  room(s) {
    return DESK_ROOMS.session + sessionId(s);
  }

  /** The internal channel of session `s`: `csi:<id>` (agents and supervisors). */
  noteRoom(s) {
    return DESK_ROOMS.notes + sessionId(s);
  }

  /** The session id of a desk room (`cs:<id>` or `csi:<id>`), else null. */
  sessionOf(room) {
    room = String(room || "");
    if (room.indexOf(DESK_ROOMS.notes) === 0) return room.slice(DESK_ROOMS.notes.length);
    if (room.indexOf(DESK_ROOMS.session) === 0) return room.slice(DESK_ROOMS.session.length);
    return null;
  }

  // ------------------------------------------------------------------ shopper

  /** Open a session (or resume the shopper's open one: `resumed: true`) with `department`
   * and the context `card` ({kind, title, image, price, url, id, extra}). Resolves with the
   * ack: {session, room, state, department, agent?, resumed, offline?: {message, form}}. An
   * `offline` answer means outside business hours: show the form (submitForm). */
  open(opts) {
    opts = opts || {};
    const fields = {};
    if (opts.department) fields.department = opts.department;
    if (opts.card) fields.card = opts.card;
    return this._op("cs.open", fields).then((ack) => {
      if (ack.session) {
        this.current = { session: ack.session, room: ack.room || this.room(ack.session), state: ack.state, department: ack.department, agent: ack.agent || null };
      }
      if (ack.offline) this._offlineDepartment = ack.department || opts.department || null;
      return ack;
    });
  }

  /** The transcript of session `s` (default: the current one), message by message in seq
   * order with no hole, from `opts.after` (default 0: from the start), live ones and, after
   * a reconnect or a background period, the missed ones. Returns a function that stops it. */
  follow(s, onMessage, opts) {
    const id = sessionId(s) || this._currentId();
    return this.conversations.watch(this.room(id), { after: opts && typeof opts.after === "number" ? opts.after : 0, onMessage: onMessage });
  }

  /** The whole transcript of session `s` so far (`opts.notes`: of its internal channel),
   * oldest first, paged forward with `history` from seq 0 (at most `opts.max` messages,
   * default 1000) and merged into the conversation (so `follow` and the badges see it). An
   * agent who just accepted a session reads what was said before with it. */
  transcript(s, opts) {
    opts = opts || {};
    const id = sessionId(s) || this._currentId();
    const room = opts.notes ? this.noteRoom(id) : this.room(id);
    const max = opts.max || TRANSCRIPT_MAX;
    const out = [];
    const page = (after) =>
      this.conversations.history(room, { afterSeq: after, limit: 100 }).then((ack) => {
        const msgs = ack.msgs || [];
        for (let i = 0; i < msgs.length; i++) out.push(msgs[i]);
        const last = msgs.length ? msgs[msgs.length - 1].seq : after;
        if (ack.more && msgs.length && out.length < max) return page(last);
        return out;
      });
    return page(0);
  }

  /** Send a chat text into session `s` (shopper or agent). Queued while offline, sent once
   * (same cid) after the reconnect; resolves with the ack (seq). */
  send(s, text, opts) {
    const id = sessionId(s) || this._currentId();
    return this.conversations.send(this.room(id), { text: String(text) }, opts);
  }

  /** Mark session `s` read (its badge clears). */
  read(s, seq) {
    const id = sessionId(s) || this._currentId();
    return this.conversations.read(this.room(id), seq);
  }

  /** Unread messages of session `s` (the conversation's badge). */
  unread(s) {
    const c = this.conversations.get(this.room(sessionId(s) || this._currentId()));
    return c ? c.unread : 0;
  }

  /** Ask for a human (also: sending a handoff word as text). Resolves with {state}. */
  handoff(s) {
    return this._op("cs.handoff", { session: sessionId(s) || this._currentId() });
  }

  /** Close session `s` (the shopper's current one by default; agents name it). */
  close(s) {
    return this._op("cs.close", { session: sessionId(s) || this._currentId() });
  }

  /** Rate the session (the current one unless `opts.session`): `score` 1..5, `comment`. */
  rate(score, comment, opts) {
    const fields = { session: sessionId(opts && opts.session) || this._currentId(), score: score };
    if (comment) fields.comment = String(comment);
    return this._op("cs.rate", fields);
  }

  /** The offline form (outside business hours): `fields` (an object: name, phone, text...)
   * for `department` (default: the one the offline cs.open named). Resolves with {ticket}. */
  submitForm(fields, department) {
    return this._op("cs.form", { department: department || this._offlineDepartment || (this.current && this.current.department) || null, fields: fields || {} });
  }

  // ------------------------------------------------------------------ agent

  /** Set this agent's status (`online` | `away` | `offline`) and optionally `capacity`.
   * Kept: after a reconnect it is sent again. Resolves with {status, capacity, load}. */
  setStatus(status, capacity) {
    if (!STATUSES[status]) return Promise.reject(new TypeError('livegate: status must be "online", "away" or "offline"'));
    const fields = { status: status };
    if (typeof capacity === "number") fields.capacity = capacity;
    this._wantStatus = fields;
    return this._op("cs.status", fields).then((ack) => {
      this.status = { status: ack.status, capacity: ack.capacity, load: ack.load };
      return ack;
    });
  }

  /** The waiting sessions (of `department`, else of this agent's departments), each
   * {session, department, shopper, state, waiting_ms, card}. Resolves with the array. */
  queue(department) {
    return this._op("cs.queue", department ? { department: department } : {}).then((ack) => ack.sessions || []);
  }

  /** This agent's assigned sessions (session objects). */
  mine() {
    return this._op("cs.mine", {}).then((ack) => ack.sessions || []);
  }

  /** Take session `s`. Resolves with {session, room, note_room}; rejects with 4090 (taken:
   * another agent was first) or 4091 (at capacity). */
  accept(s) {
    return this._op("cs.accept", { session: sessionId(s) }).then((ack) => {
      // The agent is now a member of both conversations: sync brings them into the list.
      this.conversations.sync().catch(noop);
      return ack;
    });
  }

  /** Hand session `s` to another agent (`to.agent`) or department (`to.department`), with
   * an internal `to.note`. Resolves with {state}. */
  transfer(s, to) {
    to = to || {};
    const fields = { session: sessionId(s) };
    if (to.agent) fields.agent = to.agent;
    if (to.department) fields.department = to.department;
    if (to.note) fields.note = String(to.note);
    return this._op("cs.transfer", fields);
  }

  /** An internal note on session `s` (into `csi:<id>`: agents and supervisors only, never
   * the shopper). Resolves with {seq}. */
  note(s, text) {
    return this._op("cs.note", { session: sessionId(s), text: String(text) });
  }

  /** Session `s` with `context` (the company's enrichment; not stored). */
  info(s) {
    return this._op("cs.info", { session: sessionId(s) });
  }

  /** Supervisors: observe session `s` (read only). */
  watch(s) {
    return this._op("cs.watch", { session: sessionId(s) });
  }

  /** The canned replies of a session's department, from `cs.info` (`canned`, or
   * `department.canned` when the server gives the department's settings). */
  canned(s) {
    return this.info(s).then((info) => {
      const d = info && info.department;
      const list = (info && info.canned) || (d && typeof d === "object" && d.canned) || [];
      return Array.isArray(list) ? list.slice() : [];
    });
  }

  // ------------------------------------------------------------------ internals

  _currentId() {
    if (!this.current) throw new GatewayError(ErrorCodes.CLOSED, "no customer-service session: call desk.open() first");
    return this.current.session;
  }

  /** A plugin op once connected (the client connects when idle). */
  _op(op, fields) {
    const c = this.client;
    if (c.state === "open" && c._sock) return c.request(op, fields);
    c._autoConnect();
    return c.connect().then(() => c.request(op, fields));
  }

  _reassert() {
    const want = this._wantStatus;
    if (!want || want.status === "offline") return;
    this.client.request("cs.status", want).then(
      (ack) => {
        this.status = { status: ack.status, capacity: ack.capacity, load: ack.load };
      },
      (e) => this.emit("error", e)
    );
  }

  _onPush(f) {
    const d = f.data && typeof f.data === "object" ? f.data : {};
    if (f.type === "cs.queue") this.emit("queue", d);
    else if (f.type === "cs.assigned") this.emit("assigned", d);
    else if (f.type === "cs.unassigned") this.emit("unassigned", d);
  }

  _onMessage(m, info) {
    const room = m.room || (info && info.room);
    const id = this.sessionOf(room);
    if (!id) return;
    const notes = room.indexOf(DESK_ROOMS.notes) === 0;
    const source = info && info.source;
    this.emit("message", m, { session: id, room: room, notes: notes, source: source });
    if (notes) return;
    const d = m.data && typeof m.data === "object" ? m.data : {};
    if (m.type === "cs.state") {
      const cur = this.current;
      if (cur && cur.session === id && (typeof m.seq !== "number" || !cur.stateSeq || m.seq > cur.stateSeq)) {
        cur.state = d.state;
        if (d.agent !== undefined) cur.agent = d.agent;
        if (d.department) cur.department = d.department;
        if (typeof m.seq === "number") cur.stateSeq = m.seq;
      }
      this.emit("state", { session: id, room: room, state: d.state, agent: d.agent === undefined ? null : d.agent, department: d.department || null, by: d.by || null, seq: m.seq, source: source, msg: m });
    } else if (m.type === "cs.rating") {
      this.emit("rating", { session: id, room: room, msg: m });
    }
  }
}
