// Helpers that mini-program runtimes lack (no TextEncoder/TextDecoder/atob everywhere).

import { CloseCode } from "./codes.js";

export function noop() {}

export function now() {
  return Date.now();
}

/** Bytes of `s` in UTF-8. */
export function utf8Length(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n += 4;
        i++;
      } else n += 3;
    } else n += 3;
  }
  return n;
}

/** `s` cut to at most `max` UTF-8 bytes without splitting a character (close reasons:
 * RFC 6455 allows 123 bytes; longer ones make browsers throw and servers fail 1002). */
export function truncateUtf8(s, max) {
  s = s == null ? "" : String(s);
  if (max === undefined) max = 123;
  if (utf8Length(s) <= max) return s;
  let n = 0;
  let i = 0;
  while (i < s.length) {
    const c = s.charCodeAt(i);
    let w = 1;
    let len = 3;
    if (c < 0x80) len = 1;
    else if (c < 0x800) len = 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        len = 4;
        w = 2;
      }
    }
    if (n + len > max) break;
    n += len;
    i += w;
  }
  return s.slice(0, i);
}

/** Decode UTF-8 bytes (array-like of numbers) to a string. Invalid sequences become U+FFFD. */
export function utf8Decode(bytes) {
  let out = "";
  let chunk = [];
  const flush = () => {
    out += String.fromCharCode.apply(null, chunk);
    chunk = [];
  };
  for (let i = 0; i < bytes.length; ) {
    const b = bytes[i];
    let cp = 0xfffd;
    let need = 0;
    if (b < 0x80) {
      cp = b;
    } else if (b >= 0xc2 && b < 0xe0) {
      need = 1;
      cp = b & 0x1f;
    } else if (b >= 0xe0 && b < 0xf0) {
      need = 2;
      cp = b & 0x0f;
    } else if (b >= 0xf0 && b < 0xf5) {
      need = 3;
      cp = b & 0x07;
    }
    i++;
    if (need) {
      let ok = i + need <= bytes.length;
      for (let k = 0; ok && k < need; k++) {
        const c = bytes[i + k];
        if ((c & 0xc0) !== 0x80) ok = false;
        else cp = (cp << 6) | (c & 0x3f);
      }
      if (ok && !(cp < [0, 0x80, 0x800, 0x10000][need] || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)) i += need;
      else cp = 0xfffd;
    }
    if (cp > 0xffff) {
      cp -= 0x10000;
      chunk.push(0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
    } else chunk.push(cp);
    if (chunk.length > 4096) flush();
  }
  flush();
  return out;
}

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/** Decode base64 or base64url (padding optional) to an array of bytes; null if invalid. */
export function base64Decode(s) {
  s = String(s).replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  const out = [];
  let acc = 0;
  let bits = 0;
  for (let i = 0; i < s.length; i++) {
    const v = B64.indexOf(s.charAt(i));
    if (v < 0) return null;
    acc = (acc << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push((acc >> bits) & 0xff);
    }
  }
  return out;
}

/** The `exp` claim (Unix seconds) of a JWT, read WITHOUT verifying it; null if absent or
 * not a JWT. Only used to decide when to ask the app for a fresh token. */
export function jwtExp(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const bytes = base64Decode(parts[1]);
  if (!bytes) return null;
  try {
    const claims = JSON.parse(utf8Decode(bytes));
    return claims && typeof claims.exp === "number" ? claims.exp : null;
  } catch (e) {
    return null;
  }
}

/** Text of a received WebSocket payload: a string, an ArrayBuffer or a typed array. */
export function payloadText(data) {
  if (typeof data === "string") return data;
  if (data && typeof data.byteLength === "number") {
    const view = data.buffer ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : new Uint8Array(data);
    return utf8Decode(view);
  }
  return data == null ? "" : String(data);
}

/** `url` with the query parameters of `params` (null/undefined values skipped) appended. */
export function withQuery(url, params) {
  const parts = [];
  for (const k in params) {
    if (Object.prototype.hasOwnProperty.call(params, k) && params[k] !== undefined && params[k] !== null) {
      parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(String(params[k])));
    }
  }
  if (!parts.length) return url;
  const hash = url.indexOf("#");
  const base = hash >= 0 ? url.slice(0, hash) : url;
  const frag = hash >= 0 ? url.slice(hash) : "";
  return base + (base.indexOf("?") >= 0 ? "&" : "?") + parts.join("&") + frag;
}

/** Close codes an application may send (browsers throw on others): normal, or the range
 * RFC 6455 leaves to libraries and applications. */
export function clientCloseCode(code) {
  return code === CloseCode.NORMAL || (code >= APP_CLOSE_CODES_FROM && code <= APP_CLOSE_CODES_TO) ? code : CloseCode.NORMAL;
}

const APP_CLOSE_CODES_FROM = 3000;
const APP_CLOSE_CODES_TO = 4999;

const ID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz";

/** `n` random base36 characters, from `crypto.getRandomValues` where the runtime has it
 * (browsers, Node), else from `random` (Math.random; mini-program runtimes). */
export function randomId(n, random) {
  let s = "";
  const c = typeof crypto !== "undefined" && crypto && typeof crypto.getRandomValues === "function" ? crypto : null;
  if (c) {
    try {
      const bytes = new Uint8Array(n * 2);
      c.getRandomValues(bytes);
      // 252 = 7 * 36: skipping the bytes above keeps every character equally likely.
      for (let i = 0; i < bytes.length && s.length < n; i++) if (bytes[i] < 252) s += ID_CHARS.charAt(bytes[i] % 36);
    } catch (e) {
      // fall back below
    }
  }
  const r = random || Math.random;
  while (s.length < n) s += ID_CHARS.charAt(Math.floor(r() * 36) % 36);
  return s;
}

/** Named one-shot timers (the client's and the conversations'): `set(name, ms, fn)` replaces
 * the timer of that name; a timer that fired is gone (`has` is false while `fn` runs). */
export class Timers {
  constructor() {
    this._t = {};
  }

  set(name, ms, fn) {
    this.clear(name);
    this._t[name] = setTimeout(() => {
      this._t[name] = null;
      fn();
    }, Math.max(0, ms));
  }

  clear(name) {
    if (this._t[name]) {
      clearTimeout(this._t[name]);
      this._t[name] = null;
    }
  }

  has(name) {
    return !!this._t[name];
  }

  clearAll() {
    for (const k in this._t) this.clear(k);
  }
}
