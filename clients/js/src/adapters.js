// Socket adapters: each turns a platform's WebSocket API into one small interface.
//
//   adapter.connect({url, protocols, header}) -> socket
//   socket.onopen(), socket.onmessage(text), socket.onclose({code, reason}), socket.onerror(err)
//     (set by the client; each socket reports onclose at most once)
//   socket.send(text) -> boolean, socket.close(code, reason), socket.protocol (string or null)
//   adapter.watchLifecycle(onShow, onHide) -> unbind   (optional)
//   adapter.storage: {get(key) -> string|null, set(key, string), remove(key)} (optional; the
//     platform's key-value storage, used by conversations to keep the list across launches)
//   adapter.upload({url, file, name, fileName, fields, header, kind, onProgress}) -> {promise, abort}
//     (optional; media uploads, see media.js): a multipart POST of `file` (a temp file path on
//     mini-programs, a Blob/File in browsers) as part `name`, with the form `fields` (strings)
//     and the request `header`; `onProgress(loaded, total)`; `promise` resolves with
//     {status, data} (the HTTP status and the body as a string) whatever the status, and
//     rejects only when there is no answer (network error, the platform's API failed).

import { noop, payloadText, utf8Decode, base64Decode, clientCloseCode, truncateUtf8 } from "./util.js";
import { CloseCode, ABNORMAL_CLOSURE } from "./codes.js";

function newSocket() {
  return { onopen: noop, onmessage: noop, onclose: noop, onerror: noop, protocol: null, send: noop, close: noop };
}

/** Report a close once, asynchronously (some runtimes call `fail` synchronously, before the
 * client has set its handlers). */
function closer(sock) {
  let done = false;
  return function (code, reason, extra) {
    if (done) return;
    done = true;
    const info = { code: typeof code === "number" && code > 0 ? code : ABNORMAL_CLOSURE, reason: reason ? String(reason) : "" };
    if (extra) info.detail = extra;
    setTimeout(() => sock.onclose(info), 0);
  };
}

function errText(e) {
  if (!e) return "";
  if (typeof e === "string") return e;
  return e.errMsg || e.errorMessage || e.message || (e.data && e.data.errMsg) || "";
}

/** The text of a mini-program `onMessage` event: `{data}` on wx/tt/uni, `{data: {data,
 * isBuffer}}` on Alipay (`isBuffer`: the payload is base64 of binary data). */
export function miniProgramMessageText(res) {
  let d = res && typeof res === "object" && "data" in res ? res.data : res;
  if (d && typeof d === "object" && typeof d.byteLength !== "number" && "data" in d) {
    if (d.isBuffer) return utf8Decode(base64Decode(d.data) || []);
    d = d.data;
  }
  return payloadText(d);
}

function closeInfo(res) {
  if (!res || typeof res !== "object") return { code: ABNORMAL_CLOSURE, reason: "" };
  const src = typeof res.code === "number" ? res : res.data && typeof res.data.code === "number" ? res.data : res;
  return { code: src.code, reason: src.reason || "" };
}

function headerValue(headers, name) {
  if (!headers || typeof headers !== "object") return null;
  const lower = name.toLowerCase();
  for (const k in headers) if (k.toLowerCase() === lower) return headers[k];
  return null;
}

/** Key-value storage in memory (lost when the app is closed). */
export function memoryStorage() {
  const m = new Map();
  return {
    get: (k) => (m.has(k) ? m.get(k) : null),
    set: (k, v) => {
      m.set(k, String(v));
    },
    remove: (k) => {
      m.delete(k);
    },
  };
}

/** The synchronous storage of a mini-program API (`wx`, `tt`, `uni`: `getStorageSync(key)`,
 * `setStorageSync(key, data)`; Alipay `my`: `getStorageSync({key})` -> `{data}`,
 * `setStorageSync({key, data})`), or null when it has none. Values are strings. */
export function miniProgramStorage(api, kind) {
  if (!api || typeof api.getStorageSync !== "function" || typeof api.setStorageSync !== "function") return null;
  if (kind === "my") {
    return {
      get(k) {
        const r = api.getStorageSync({ key: k });
        const v = r && typeof r === "object" ? r.data : r;
        return typeof v === "string" && v ? v : null;
      },
      set(k, v) {
        api.setStorageSync({ key: k, data: String(v) });
      },
      remove(k) {
        if (typeof api.removeStorageSync === "function") api.removeStorageSync({ key: k });
      },
    };
  }
  return {
    get(k) {
      const v = api.getStorageSync(k); // "" when the key is missing
      return typeof v === "string" && v ? v : null;
    },
    set(k, v) {
      api.setStorageSync(k, String(v));
    },
    remove(k) {
      if (typeof api.removeStorageSync === "function") api.removeStorageSync(k);
    },
  };
}

/** `localStorage` of a browser page, or null (none, or blocked). */
export function browserStorage() {
  let ls = null;
  try {
    ls = typeof localStorage !== "undefined" ? localStorage : null;
  } catch (e) {
    ls = null; // access denied (sandboxed iframe, privacy settings)
  }
  if (!ls) return null;
  return {
    get: (k) => ls.getItem(k),
    set: (k, v) => ls.setItem(k, String(v)),
    remove: (k) => ls.removeItem(k),
  };
}

/** Alipay's `fileType` of `my.uploadFile` (required; 'image' | 'video' | 'audio') for a media
 * kind. Alipay has no type for other files: they go as 'image' (the runtime does not look at
 * the bytes; the server takes the kind from the `kind` field and checks the content). */
export function alipayFileType(kind) {
  if (kind === "voice") return "audio";
  if (kind === "video") return "video";
  return "image";
}

/** The upload of a mini-program API object (`api.uploadFile`), see the interface above:
 * wx/tt/uni `{url, filePath, name, header, formData}`, Alipay `{url, filePath, fileName,
 * fileType, header, formData}`; uni-app gets callbacks (so it returns an UploadTask, not a
 * Promise) and, in an H5 build, a Blob/File as `file`. Results: `{statusCode, data}` (data a
 * string); Alipay may call `fail` for a non-2xx status (error 19) with the status and data. */
export function miniProgramUpload(api, kind, o) {
  if (!api || typeof api.uploadFile !== "function") throw new Error("livegate: " + (kind || "platform") + ".uploadFile is not available");
  if (typeof o.file !== "string" && !(kind === "uni" && o.file && typeof o.file === "object")) {
    throw new Error("livegate: " + kind + ".uploadFile needs a temp file path (a string)");
  }
  const formData = {};
  for (const k in o.fields || {}) formData[k] = String(o.fields[k]);
  const params = { url: o.url, header: o.header || {}, formData: formData };
  if (typeof o.file === "string") params.filePath = o.file;
  else params.file = o.file; // uni-app H5: a File/Blob
  if (kind === "my") {
    params.fileName = o.name;
    params.fileType = alipayFileType(o.kind);
  } else params.name = o.name;
  if (kind === "uni") params.fileType = alipayFileType(o.kind); // uni passes it on to Alipay (required there)
  let task = null;
  const promise = new Promise((resolve, reject) => {
    params.success = (res) => resolve({ status: res && typeof res.statusCode === "number" ? res.statusCode : 200, data: res ? res.data : "" });
    params.fail = (e) => {
      const status = e && typeof e.statusCode === "number" ? e.statusCode : e && typeof e.status === "number" ? e.status : 0;
      if (status > 0) resolve({ status: status, data: e.data });
      else {
        const err = new Error(errText(e) || kind + ".uploadFile failed");
        err.detail = e;
        reject(err);
      }
    };
    task = api.uploadFile(params);
    if (task && typeof task.onProgressUpdate === "function") {
      task.onProgressUpdate((p) => {
        p = p || {};
        const loaded = typeof p.totalBytesSent === "number" ? p.totalBytesSent : p.totalBytesWritten;
        const total = typeof p.totalBytesExpectedToSend === "number" ? p.totalBytesExpectedToSend : p.totalBytesExpectedToWrite;
        o.onProgress(typeof loaded === "number" ? loaded : -1, typeof total === "number" ? total : -1, p.progress);
      });
    }
  });
  return {
    promise: promise,
    abort() {
      if (task && typeof task.abort === "function") task.abort();
    },
  };
}

/** The upload of a browser (see the interface above): XMLHttpRequest + FormData, with
 * progress from `xhr.upload.onprogress`; where there is no XMLHttpRequest (Node, workers),
 * `fetch` (progress only at the end). `file`: a Blob or File. */
export function browserUpload(o) {
  const XHR = typeof XMLHttpRequest !== "undefined" ? XMLHttpRequest : null;
  if (!XHR && typeof fetch !== "function") throw new Error("livegate: no XMLHttpRequest or fetch to upload with");
  if (typeof FormData === "undefined") throw new Error("livegate: no FormData to upload with");
  if (!o.file || typeof o.file !== "object" || typeof o.file.size !== "number") throw new Error("livegate: the file to upload must be a Blob or File");
  const form = new FormData();
  for (const k in o.fields || {}) form.append(k, String(o.fields[k]));
  form.append(o.name, o.file, o.fileName || o.file.name || "blob");
  const header = o.header || {};
  if (XHR) {
    const xhr = new XHR();
    const promise = new Promise((resolve, reject) => {
      xhr.open("POST", o.url, true);
      for (const k in header) xhr.setRequestHeader(k, header[k]);
      if (xhr.upload) xhr.upload.onprogress = (e) => o.onProgress(e.loaded, e.lengthComputable ? e.total : -1);
      xhr.onload = () => resolve({ status: xhr.status, data: xhr.responseText });
      xhr.onerror = () => reject(new Error("network error"));
      xhr.ontimeout = () => reject(new Error("timed out"));
      xhr.onabort = () => reject(new Error("aborted"));
      xhr.send(form);
    });
    return { promise: promise, abort: () => xhr.abort() };
  }
  const ctl = typeof AbortController !== "undefined" ? new AbortController() : null;
  const size = o.file.size;
  const promise = fetch(o.url, { method: "POST", body: form, headers: header, signal: ctl ? ctl.signal : undefined }).then((r) =>
    r.text().then((t) => {
      o.onProgress(size, size);
      return { status: r.status, data: t };
    })
  );
  return { promise: promise, abort: () => ctl && ctl.abort() };
}

/**
 * Adapter for a mini-program API object: `wx` (WeChat), `tt` (Douyin/ByteDance), `my`
 * (Alipay), `uni` (uni-app), or anything with the same `connectSocket` + SocketTask shape.
 * `kind` selects the quirks: Alipay needs `multiple: true` to get a SocketTask and nests the
 * payload at `event.data.data`; uni-app returns a Promise instead of a SocketTask unless a
 * callback is passed.
 */
export function miniProgramAdapter(api, kind) {
  if (!api || typeof api.connectSocket !== "function") throw new Error("livegate: " + (kind || "platform") + ".connectSocket is not available");
  kind = kind || "wx";
  return {
    name: kind,
    storage: miniProgramStorage(api, kind),
    upload: (o) => miniProgramUpload(api, kind, o),
    connect(o) {
      const sock = newSocket();
      const close = closer(sock);
      const params = {
        url: o.url,
        header: o.header || {},
        success: noop,
        fail: (e) => {
          sock.onerror(e);
          close(ABNORMAL_CLOSURE, errText(e) || "connectSocket failed");
        },
        complete: noop,
      };
      if (o.protocols && o.protocols.length) params.protocols = o.protocols.slice();
      if (kind === "my" || kind === "uni") params.multiple = true; // uni passes it on to Alipay
      if (kind === "wx") params.tcpNoDelay = true;
      const task = api.connectSocket(params);
      if (!task || typeof task.onOpen !== "function") {
        throw new Error("livegate: " + kind + ".connectSocket returned no SocketTask");
      }
      task.onOpen((res) => {
        const p = headerValue(res && res.header, "sec-websocket-protocol");
        sock.protocol = p || (o.protocols && o.protocols[0]) || null;
        sock.onopen(res);
      });
      task.onMessage((res) => sock.onmessage(miniProgramMessageText(res)));
      task.onError((e) => {
        sock.onerror(e);
      });
      task.onClose((res) => {
        const i = closeInfo(res);
        close(i.code, i.reason);
      });
      sock.send = (text) => {
        try {
          task.send({
            data: text,
            fail: (e) => {
              // A failed send means the socket is gone, whether or not onClose follows.
              sock.onerror(e);
              try {
                task.close({ code: CloseCode.NORMAL, reason: "send failed", fail: noop });
              } catch (e2) {
                // already closed
              }
              close(ABNORMAL_CLOSURE, errText(e) || "send failed");
            },
          });
          return true;
        } catch (e) {
          return false;
        }
      };
      sock.close = (code, reason) => {
        try {
          task.close({ code: clientCloseCode(code), reason: truncateUtf8(reason || ""), fail: noop });
        } catch (e) {
          // already closed
        }
      };
      sock.task = task;
      return sock;
    },
    watchLifecycle(onShow, onHide) {
      if (typeof api.onAppShow !== "function" || typeof api.onAppHide !== "function") return noop;
      api.onAppShow(onShow);
      api.onAppHide(onHide);
      return () => {
        if (typeof api.offAppShow === "function") api.offAppShow(onShow);
        if (typeof api.offAppHide === "function") api.offAppHide(onHide);
      };
    },
  };
}

/** Adapter for the standard `WebSocket` (browsers, Node >= 22, or Node 20 with
 * `--experimental-websocket`). Pass a constructor to use another implementation. */
export function browserAdapter(WebSocketImpl) {
  const WS = WebSocketImpl || (typeof WebSocket !== "undefined" ? WebSocket : null);
  if (!WS) throw new Error("livegate: no WebSocket implementation available");
  return {
    name: "browser",
    storage: browserStorage(),
    upload: browserUpload,
    connect(o) {
      const sock = newSocket();
      const close = closer(sock);
      const ws = o.protocols && o.protocols.length ? new WS(o.url, o.protocols) : new WS(o.url);
      try {
        ws.binaryType = "arraybuffer";
      } catch (e) {
        // not supported
      }
      ws.onopen = () => {
        sock.protocol = ws.protocol || null;
        sock.onopen();
      };
      ws.onmessage = (e) => sock.onmessage(payloadText(e.data));
      ws.onerror = (e) => sock.onerror(e);
      ws.onclose = (e) => close(e.code, e.reason);
      sock.send = (text) => {
        if (ws.readyState !== 1) return false;
        ws.send(text);
        return true;
      };
      sock.close = (code, reason) => {
        try {
          ws.close(clientCloseCode(code), truncateUtf8(reason || ""));
        } catch (e) {
          try {
            ws.close();
          } catch (e2) {
            // ignore
          }
        }
      };
      sock.ws = ws;
      return sock;
    },
    watchLifecycle(onShow, onHide) {
      if (typeof document === "undefined" || !document.addEventListener) return noop;
      const f = () => (document.visibilityState === "hidden" ? onHide() : onShow());
      document.addEventListener("visibilitychange", f);
      return () => document.removeEventListener("visibilitychange", f);
    },
  };
}

/* global uni, wx, tt, my */
/** The platform object called `name` in this runtime (mini-programs expose `wx` & co. as
 * free variables, not always as properties of the global object). */
function globalApi(name) {
  const g = typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : {};
  let v;
  if (name === "uni") v = typeof uni !== "undefined" ? uni : undefined;
  else if (name === "wx") v = typeof wx !== "undefined" ? wx : undefined;
  else if (name === "tt") v = typeof tt !== "undefined" ? tt : undefined;
  else if (name === "my") v = typeof my !== "undefined" ? my : undefined;
  return v || g[name];
}

/** The platform of this runtime: [kind, api] or null. uni-app is preferred (it also defines
 * `wx` on WeChat), then wx, tt, my, then the standard WebSocket. */
export function detectPlatform() {
  const names = ["uni", "wx", "tt", "my"];
  for (let i = 0; i < names.length; i++) {
    const api = globalApi(names[i]);
    if (api && typeof api.connectSocket === "function") return [names[i], api];
  }
  return typeof WebSocket !== "undefined" ? ["browser", null] : null;
}

/** Build the adapter for `platform` ("wx" | "tt" | "my" | "uni" | "browser" | an adapter
 * object | undefined = detect) using `api` (the platform object, or a WebSocket constructor
 * for "browser"; default: the global one). */
export function createAdapter(platform, api) {
  if (platform && typeof platform === "object" && typeof platform.connect === "function") return platform;
  if (!platform) {
    const found = detectPlatform();
    if (!found) throw new Error("livegate: no WebSocket API found; pass `platform`");
    platform = found[0];
    if (!api) api = found[1];
  }
  if (platform === "browser") return browserAdapter(api || undefined);
  if (platform === "wx" || platform === "tt" || platform === "my" || platform === "uni") {
    return miniProgramAdapter(api || globalApi(platform), platform);
  }
  throw new Error("livegate: unknown platform " + platform);
}
