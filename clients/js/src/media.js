// Media messages (images, voice, video, files): the bytes go out of band, in a multipart POST
// to the gateway's `/media/upload` (the platform's upload API: wx/tt/my/uni.uploadFile, or
// XMLHttpRequest in browsers; see adapters.js), then a publish names the file:
// `{type: kind, data: {file_id, caption?}}`. Delivered media messages carry signed URLs
// (`data.url`, `data.thumb_url`) that expire at `data.expires` (ms); paging (history, sync)
// signs them again. Protocol: docs/protocol.md; SDK: docs/sdk-js.md ("Media messages").

import { noop, now, withQuery, randomId } from "./util.js";
import { ErrorCodes, UploadError } from "./errors.js";

/** The kinds of media (each is also the `type` of its message). */
export const MEDIA_KINDS = ["image", "voice", "video", "file"];

const MEDIA_CID_LENGTH = 16;
/** The fields of an upload's answer that describe the file in a message's data. */
const MEDIA_FIELDS = ["kind", "mime", "size", "name", "w", "h", "duration", "thumb", "url", "thumb_url", "expires"];

/** The upload URL of a gateway WebSocket URL: `wss://host[:port]/ws` ->
 * `https://host[:port]/media/upload` (`ws:` -> `http:`; a path ending in `/ws` keeps its
 * prefix, `wss://h/live/ws` -> `https://h/live/media/upload`; the query is dropped). */
export function mediaUploadUrl(wsUrl) {
  return mediaBase(wsUrl) + "/media/upload";
}

/** `scheme://host[:port][prefix]` of a gateway URL (ws/wss/http/https), the base of the
 * media paths. */
export function mediaBase(url) {
  const m = /^(wss?|https?):\/\/([^/?#]+)([^?#]*)/i.exec(String(url || ""));
  if (!m) throw new Error("livegate: cannot derive the media URL from " + url + ": pass `mediaUrl`");
  const scheme = m[1].toLowerCase();
  const http = scheme === "wss" || scheme === "https" ? "https" : "http";
  let path = m[3] || "";
  if (/\/media\/upload\/?$/.test(path)) path = path.replace(/\/media\/upload\/?$/, "");
  else if (/\/ws\/?$/.test(path)) path = path.replace(/\/ws\/?$/, "");
  else path = "";
  return http + "://" + m[2] + path;
}

/** The server's answer to an upload: its JSON (2xx), or an UploadError (`status`, `code`
 * the server's code word, `limit` for 413). */
export function parseUploadResult(status, data) {
  let body = null;
  if (data && typeof data === "object" && typeof data.byteLength !== "number") body = data; // a runtime that parsed it already
  else {
    try {
      body = JSON.parse(typeof data === "string" ? data : String(data));
    } catch (e) {
      body = null;
    }
  }
  if (status >= 200 && status < 300) {
    if (!body || typeof body.file_id !== "string") throw new UploadError(ErrorCodes.UPLOAD_FAILED, "the upload's answer has no file_id (HTTP " + status + ")", status, body);
    return body;
  }
  const code = body && typeof body.code === "string" ? body.code : ErrorCodes.UPLOAD_FAILED;
  const msg = (body && (body.error || body.message)) || "HTTP " + status;
  throw new UploadError(code, msg, status, body);
}

/** Whether the client sends into `room` through its conversations (a conversation room the
 * client has not joined as a live room) rather than with a plain publish. */
function viaConversations(client, room, via) {
  if (via === "conversations") return true;
  if (via === "publish") return false;
  const conv = client._conv;
  return !!(conv && conv._kindOfRoom(room) && !client._rooms.has(room));
}

function uploadToken(client) {
  const o = client.options;
  if (o.getToken && (!client._token || client._tokenExpiresWithin(5000))) return client._refreshToken();
  return Promise.resolve(client._token);
}

/** A promise with `abort()`. */
function abortable(promise, abort) {
  promise.abort = abort;
  return promise;
}

/**
 * Upload `file` (see Client.upload). Returns a Promise of the server's JSON with `abort()`.
 */
export function uploadMedia(client, file, opts) {
  opts = opts || {};
  const o = client.options;
  const kind = opts.kind || null;
  let current = null; // the platform upload in flight
  let aborted = false;
  let settled = false;
  let abortNow = noop;
  const id = ++client._uploads;
  const info = { id: id, kind: kind, room: opts.room || null, state: "progress", loaded: 0, total: -1, progress: 0 };
  const emit = (state, extra) => {
    const e = {};
    for (const k in info) e[k] = info[k];
    e.state = state;
    for (const k in extra || {}) e[k] = extra[k];
    client.emit("upload", e);
  };
  const onProgress = (loaded, total, pct) => {
    if (aborted || settled) return;
    info.loaded = loaded;
    info.total = total;
    info.progress = typeof pct === "number" ? Math.max(0, Math.min(100, Math.round(pct))) : total > 0 ? Math.min(100, Math.round((loaded * 100) / total)) : 0;
    const p = { loaded: info.loaded, total: info.total, progress: info.progress };
    if (opts.onProgress) {
      try {
        opts.onProgress(p);
      } catch (e) {
        client.emit("listenerError", e, "upload");
      }
    }
    emit("progress");
  };
  const promise = new Promise((resolve, reject) => {
    abortNow = () => {
      if (aborted || settled) return;
      aborted = true;
      if (current) {
        try {
          current.abort();
        } catch (e) {
          // already finished
        }
      }
      settled = true;
      const err = new UploadError(ErrorCodes.ABORTED, "upload aborted", 0, null);
      emit("failed", { error: err });
      reject(err);
    };
    if (!client.adapter || typeof client.adapter.upload !== "function") {
      settled = true;
      reject(new UploadError(ErrorCodes.UPLOAD_FAILED, "the platform adapter " + ((client.adapter && client.adapter.name) || "") + " cannot upload (no adapter.upload)", 0, null));
      return;
    }
    let url;
    try {
      url = o.mediaUrl || mediaUploadUrl(o.url);
    } catch (e) {
      settled = true;
      reject(e);
      return;
    }
    url = withQuery(url, o.query || {}); // e.g. {user} in auth.mode = "dev", as the socket sends it
    const fields = {};
    if (kind) fields.kind = kind;
    if (opts.room) fields.room = opts.room;
    if (typeof opts.duration === "number" && opts.duration >= 0) fields.duration = String(Math.round(opts.duration));
    // The platforms' upload APIs cannot name the part's file: the name goes as a field.
    if (opts.name) fields.name = String(opts.name);
    // kind, room and duration also ride in the query string: the server knows them
    // before the first byte of the file whatever order a platform writes the fields in
    // (the room's limits then hold while the bytes stream in).
    const early = {};
    for (const k of ["kind", "room", "duration"]) if (fields[k] !== undefined) early[k] = fields[k];
    url = withQuery(url, early);
    for (const k in opts.fields || {}) fields[k] = String(opts.fields[k]);
    let retried = false;
    const attempt = (tok) => {
      if (aborted) return;
      const header = {};
      if (tok) header.Authorization = "Bearer " + tok;
      try {
        current = client.adapter.upload({ url: url, file: file, name: "file", fileName: opts.name || null, fields: fields, header: header, kind: kind || "file", onProgress: onProgress });
      } catch (e) {
        fail(new UploadError(ErrorCodes.UPLOAD_FAILED, (e && e.message) || String(e), 0, null));
        return;
      }
      current.promise.then(
        (res) => {
          if (aborted) return;
          let body;
          try {
            body = parseUploadResult(res.status, res.data);
          } catch (e) {
            if (e.status === 401 && o.getToken && !retried) {
              // The token expired meanwhile: once more with a fresh one.
              retried = true;
              client._refreshToken().then(attempt, (e2) => fail(e));
              return;
            }
            fail(e);
            return;
          }
          settled = true;
          if (!info.kind && body.kind) info.kind = body.kind;
          if (info.total < 0 && typeof body.size === "number") info.total = body.size;
          info.loaded = info.total >= 0 ? info.total : info.loaded;
          info.progress = 100;
          emit("done", { result: body });
          resolve(body);
        },
        (e) => {
          if (aborted) return;
          const err = new UploadError(ErrorCodes.UPLOAD_FAILED, "upload failed: " + ((e && e.message) || e), 0, null);
          err.detail = e;
          fail(err);
        }
      );
    };
    const fail = (err) => {
      if (settled) return;
      settled = true;
      emit("failed", { error: err });
      reject(err);
    };
    uploadToken(client).then(attempt, (e) => fail(new UploadError(ErrorCodes.UPLOAD_FAILED, "no token for the upload: " + ((e && e.message) || e), 0, null)));
  });
  return abortable(promise, () => abortNow());
}

/**
 * Upload `file` as `kind`, then publish `{type: kind, data: {file_id, caption?}}` into `room`
 * (see Client.sendImage). Returns a Promise of the publish ack (plus `media`: the upload's
 * JSON) with `abort()` (effective while the upload runs).
 */
export function sendMedia(client, room, kind, file, opts) {
  opts = opts || {};
  if (MEDIA_KINDS.indexOf(kind) < 0) return Promise.reject(new TypeError("livegate: media kind must be one of " + MEDIA_KINDS.join(", ")));
  const cid = opts.cid !== undefined && opts.cid !== null ? opts.cid : client._conv && viaConversations(client, room, opts.via) ? client._conv.newCid() : randomId(MEDIA_CID_LENGTH, client.options.random);
  const up = uploadMedia(client, file, { kind: kind, room: room, duration: opts.duration, name: opts.name, fields: opts.fields, onProgress: opts.onProgress });
  const p = up.then((media) => {
    const data = { file_id: media.file_id };
    if (typeof opts.caption === "string" && opts.caption) data.caption = opts.caption;
    const conv = viaConversations(client, room, opts.via);
    const send = conv ? client.conversations.send(room, data, { type: kind, cid: cid }) : client.publish(room, data, { type: kind, cid: cid });
    return send.then((ack) => {
      ack.media = media;
      // The sender's copy of the message (conversations) is the server's echo, or, when the
      // ack came first, built from what was sent ({file_id}): then it gets the upload's
      // description and URLs (the same the server stores), and the list a `change`.
      const m = ack.msg;
      if (m && m.data && typeof m.data === "object" && !m.data.url && m.data.file_id === media.file_id) {
        for (let i = 0; i < MEDIA_FIELDS.length; i++) {
          const k = MEDIA_FIELDS[i];
          if (media[k] !== undefined && m.data[k] === undefined) m.data[k] = media[k];
        }
        if (conv && client._conv) client._conv._changed(room);
      }
      return ack;
    });
  });
  return abortable(p, up.abort);
}

/** The URLs of a media message (see Client.mediaUrl). */
export function mediaUrls(client, msg, opts) {
  const d = msg && msg.data;
  if (!d || typeof d !== "object" || (!d.url && !d.thumb_url && !d.file_id)) return null;
  const margin = opts && typeof opts.margin === "number" ? opts.margin : 0;
  const o = client.options;
  let base = null;
  const abs = (u) => {
    if (typeof u !== "string" || !u) return null;
    // Only http(s) URLs and the server's own paths: a message from a room the server does
    // not check media in could carry `javascript:` or `data:` links.
    if (u.charAt(0) !== "/" || u.charAt(1) === "/") return /^https?:\/\//i.test(u) ? u : null;
    if (base === null) {
      try {
        base = o.mediaUrl ? mediaBase(o.mediaUrl) : mediaBase(o.url);
      } catch (e) {
        base = "";
      }
    }
    return base + u;
  };
  const expires = typeof d.expires === "number" ? d.expires : null;
  return {
    url: abs(d.url),
    thumbUrl: abs(d.thumb_url) || abs(d.url),
    expires: expires,
    expired: !d.url || (expires !== null && now() + margin >= expires),
  };
}

/** The message `msg` again, from the server (a history page of one: URLs signed anew). */
export function refreshMedia(client, msg) {
  const room = msg.room;
  const q = { beforeSeq: msg.seq + 1, limit: 1 };
  const page = client._conv && viaConversations(client, room) ? client.conversations.history(room, q) : client.history(room, q);
  return page.then((ack) => {
    const msgs = (ack && ack.msgs) || [];
    for (let i = 0; i < msgs.length; i++) if (msgs[i] && msgs[i].seq === msg.seq) return msgs[i];
    return null;
  });
}
