// Media in the SDK without a gateway: the upload URL, each platform's uploadFile arguments
// (wx, tt, my, uni) and result shapes, the browser's XMLHttpRequest path (a fake XHR),
// progress, errors (status, code, limit), abort, a 401 retried with a fresh token, the
// publish that follows (plain or through conversations), and the URL helpers.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Client, UploadError, GatewayError, ErrorCodes, ErrorCode, mediaUploadUrl, mediaBase, alipayFileType, miniProgramUpload, parseUploadResult } from "../../clients/js/src/index.js";
import { waitFor, sleep } from "./helpers.mjs";

const OK_BODY = { file_id: "m_abc", kind: "image", mime: "image/png", size: 6, name: "a.png", w: 2, h: 1, duration: null, thumb: false, url: "/media/f/m_abc?e=1&s=x", thumb_url: null, expires: 1 };

/**
 * A fake mini-program API whose uploadFile records its params and answers with
 * `respond(params, task)` (default: progress 50% then 100%, then `success` with
 * `{statusCode: 200, data: <JSON string>}`). Tasks have onProgressUpdate and abort (which
 * makes the runtime call `fail`, as WeChat does). uni without callbacks returns a Promise.
 */
function fakeApi(kind, respond) {
  const api = {
    calls: [],
    tasks: [],
    connectSocket() {
      throw new Error("no socket in these tests");
    },
    uploadFile(params) {
      api.calls.push(params);
      if (kind === "uni" && !params.success && !params.fail && !params.complete) return Promise.resolve([null, {}]);
      const task = {
        aborted: false,
        progress: [],
        onProgressUpdate(cb) {
          task.progress.push(cb);
        },
        abort() {
          task.aborted = true;
          setTimeout(() => params.fail && params.fail({ errMsg: "uploadFile:fail abort" }), 0);
        },
        emit(p) {
          for (const cb of task.progress) cb(p);
        },
      };
      api.tasks.push(task);
      setTimeout(() => (respond || defaultRespond)(params, task), 0);
      return task;
    },
  };
  return api;
}

function defaultRespond(params, task) {
  task.emit({ progress: 50, totalBytesSent: 3, totalBytesExpectedToSend: 6 });
  task.emit({ progress: 100, totalBytesSent: 6, totalBytesExpectedToSend: 6 });
  params.success({ statusCode: 200, data: JSON.stringify(OK_BODY), errMsg: "uploadFile:ok" });
}

const made = [];
after(() => made.forEach((c) => c.close()));
function client(opts) {
  const c = new Client({ url: "wss://chat.example.com:8443/ws", requestTimeout: 2000, ...opts });
  made.push(c);
  return c;
}

test("the upload URL is derived from the WebSocket URL (scheme, host, port, a /ws path's prefix); mediaUrl overrides it", () => {
  assert.equal(mediaUploadUrl("wss://chat.example.com/ws"), "https://chat.example.com/media/upload");
  assert.equal(mediaUploadUrl("wss://chat.example.com:8443/ws"), "https://chat.example.com:8443/media/upload");
  assert.equal(mediaUploadUrl("ws://127.0.0.1:8080/ws?user=u1"), "http://127.0.0.1:8080/media/upload");
  assert.equal(mediaUploadUrl("wss://h.example/live/ws"), "https://h.example/live/media/upload");
  assert.equal(mediaUploadUrl("wss://h.example"), "https://h.example/media/upload");
  assert.equal(mediaUploadUrl("WSS://H.example/other"), "https://H.example/media/upload");
  assert.equal(mediaBase("https://cdn.example/media/upload"), "https://cdn.example");
  assert.throws(() => mediaUploadUrl("not a url"), /mediaUrl/);
});

test("wx: uploadFile gets url (+ the socket's query), filePath, name 'file', the Bearer token, formData kind/room/duration; progress events; the JSON string is parsed", async () => {
  const wx = fakeApi("wx");
  const c = client({ platform: "wx", api: wx, token: "TOKEN1", query: { user: "alice" } });
  const progress = [];
  const events = [];
  c.on("upload", (e) => events.push(e));
  const res = await c.upload("wxfile://tmp_1.silk", { kind: "voice", room: "dm:alice:bob", duration: 1234.4, onProgress: (p) => progress.push(p) });
  assert.deepEqual(res, OK_BODY);
  assert.equal(wx.calls.length, 1);
  const p = wx.calls[0];
  assert.equal(p.url, "https://chat.example.com:8443/media/upload?user=alice&kind=voice&room=dm%3Aalice%3Abob&duration=1234");
  assert.equal(p.filePath, "wxfile://tmp_1.silk");
  assert.equal(p.name, "file");
  assert.deepEqual(p.header, { Authorization: "Bearer TOKEN1" });
  assert.deepEqual(p.formData, { kind: "voice", room: "dm:alice:bob", duration: "1234" });
  assert.equal(p.fileType, undefined, "no Alipay fields on wx");
  assert.deepEqual(progress, [
    { loaded: 3, total: 6, progress: 50 },
    { loaded: 6, total: 6, progress: 100 },
  ]);
  assert.deepEqual(events.map((e) => [e.state, e.kind, e.room, e.progress]), [
    ["progress", "voice", "dm:alice:bob", 50],
    ["progress", "voice", "dm:alice:bob", 100],
    ["done", "voice", "dm:alice:bob", 100],
  ]);
  assert.deepEqual(events[2].result, OK_BODY);
  assert.equal(events[0].id, events[2].id);
});

test("tt: the same shape as wx; mediaUrl replaces the derived URL", async () => {
  const tt = fakeApi("tt");
  const c = client({ platform: "tt", api: tt, token: "T", mediaUrl: "https://upload.example/media/upload" });
  await c.upload("ttfile://temp/a.jpg", { kind: "image" });
  const p = tt.calls[0];
  assert.equal(p.url, "https://upload.example/media/upload?kind=image");
  assert.equal(p.name, "file");
  assert.equal(p.filePath, "ttfile://temp/a.jpg");
  assert.deepEqual(p.formData, { kind: "image" });
});

test("Alipay: fileName 'file' and a fileType per kind (voice: audio, video, file/image: image); a non-2xx reported through fail (error 19) is the server's answer", async () => {
  assert.deepEqual(["image", "voice", "video", "file", undefined].map(alipayFileType), ["image", "audio", "video", "image", "image"]);
  const my = fakeApi("my", (params) => params.fail({ error: 19, errorMessage: "http status error", status: 413, data: JSON.stringify({ error: "voice larger than 2097152 bytes", code: "too_large", limit: 2097152 }) }));
  const c = client({ platform: "my", api: my, token: "T" });
  const err = await c.upload("https://resource/apml1.amr", { kind: "voice", duration: 3000 }).then(
    () => null,
    (e) => e
  );
  const p = my.calls[0];
  assert.equal(p.fileName, "file");
  assert.equal(p.fileType, "audio");
  assert.equal(p.name, undefined);
  assert.equal(p.filePath, "https://resource/apml1.amr");
  assert.ok(err instanceof UploadError && err instanceof GatewayError, String(err));
  assert.equal(err.status, 413);
  assert.equal(err.code, "too_large");
  assert.equal(err.limit, 2097152);
  assert.match(err.message, /larger than/);

  const my2 = fakeApi("my", (params) => params.success({ statusCode: 200, data: JSON.stringify(OK_BODY) }));
  const c2 = client({ platform: "my", api: my2 });
  await c2.upload("https://resource/a.mp4", { kind: "video" });
  await c2.upload("https://resource/a.pdf", { kind: "file" });
  assert.deepEqual(my2.calls.map((x) => x.fileType), ["video", "image"]);
  assert.deepEqual(my2.calls[0].header, {}, "no token, no Authorization header");
});

test("uni-app: callbacks are passed (an UploadTask, not a Promise), fileType for Alipay builds, a Blob goes as `file` (H5)", async () => {
  const uni = fakeApi("uni");
  const c = client({ platform: "uni", api: uni, token: "T" });
  const progress = [];
  await c.upload("_doc/uniapp_temp/a.png", { kind: "image", onProgress: (p) => progress.push(p.progress) });
  assert.equal(typeof uni.calls[0].success, "function");
  assert.equal(uni.calls[0].name, "file");
  assert.equal(uni.calls[0].fileType, "image");
  assert.deepEqual(progress, [50, 100]);
  const blob = new Blob([new Uint8Array([1, 2, 3])], { type: "image/png" });
  await c.upload(blob, { kind: "image" });
  assert.equal(uni.calls[1].file, blob);
  assert.equal(uni.calls[1].filePath, undefined);
});

test("errors: a status in success (415: code 'type'), no JSON (502), a network failure (E_UPLOAD), a 2xx without file_id", async () => {
  const answers = [
    { statusCode: 415, data: JSON.stringify({ error: "not an image", code: "type" }) },
    { statusCode: 502, data: "<html>bad gateway</html>" },
    null,
    { statusCode: 200, data: "{}" },
  ];
  const wx = fakeApi("wx", (params) => {
    const a = answers.shift();
    if (a) params.success(a);
    else params.fail({ errMsg: "uploadFile:fail url not in domain list" });
  });
  const c = client({ platform: "wx", api: wx });
  const failed = [];
  c.on("upload", (e) => e.state === "failed" && failed.push(e.error));
  const errs = [];
  for (let i = 0; i < 4; i++) errs.push(await c.upload("wxfile://x").then(() => null, (e) => e));
  assert.deepEqual(errs.map((e) => [e.status, e.code]), [
    [415, "type"],
    [502, ErrorCodes.UPLOAD_FAILED],
    [0, ErrorCodes.UPLOAD_FAILED],
    [200, ErrorCodes.UPLOAD_FAILED],
  ]);
  assert.match(errs[2].message, /url not in domain list/);
  assert.equal(errs[0].limit, null);
  assert.equal(failed.length, 4);
  assert.deepEqual(wx.calls[0].formData, {}, "no kind: the server detects it");
  assert.throws(() => parseUploadResult(401, JSON.stringify({ error: "bad token", code: "auth" })), (e) => e.code === "auth" && e.status === 401);
});

test("abort(): the platform task is aborted, the promise rejects with E_ABORTED, a later answer is ignored", async () => {
  let finish = null;
  const wx = fakeApi("wx", (params, task) => {
    task.emit({ progress: 10, totalBytesSent: 1, totalBytesExpectedToSend: 10 });
    finish = () => params.success({ statusCode: 200, data: JSON.stringify(OK_BODY) });
  });
  const c = client({ platform: "wx", api: wx });
  const events = [];
  c.on("upload", (e) => events.push(e.state));
  const up = c.upload("wxfile://big.mp4", { kind: "video" });
  await waitFor(() => finish, 1000, "the upload started");
  up.abort();
  const err = await up.then(() => null, (e) => e);
  assert.equal(err.code, ErrorCodes.ABORTED);
  assert.ok(wx.tasks[0].aborted, "task.abort() was called");
  finish();
  await sleep(20);
  assert.deepEqual(events, ["progress", "failed"]);
});

test("a 401 with getToken: one retry with a fresh token", async () => {
  const wx = fakeApi("wx", (params) => {
    if (params.header.Authorization === "Bearer old") params.success({ statusCode: 401, data: JSON.stringify({ error: "expired", code: "auth" }) });
    else params.success({ statusCode: 200, data: JSON.stringify(OK_BODY) });
  });
  let n = 0;
  const c = client({ platform: "wx", api: wx, token: "old", getToken: () => "fresh" + ++n });
  const res = await c.upload("wxfile://a.jpg", { kind: "image" });
  assert.equal(res.file_id, "m_abc");
  assert.deepEqual(wx.calls.map((p) => p.header.Authorization), ["Bearer old", "Bearer fresh1"]);
  assert.equal(c.token, "fresh1");
});

/** A fake XMLHttpRequest (the browser path), installed globally for one test. */
class FakeXHR {
  constructor() {
    FakeXHR.made.push(this);
    this.headers = {};
    this.upload = {};
  }
  open(method, url) {
    this.method = method;
    this.url = url;
  }
  setRequestHeader(k, v) {
    this.headers[k] = v;
  }
  send(body) {
    this.body = body;
    setTimeout(() => {
      this.upload.onprogress({ loaded: 2, total: 4, lengthComputable: true });
      this.upload.onprogress({ loaded: 4, total: 4, lengthComputable: true });
      this.status = 200;
      this.responseText = JSON.stringify(OK_BODY);
      this.onload();
    }, 0);
  }
  abort() {
    this.aborted = true;
  }
}
FakeXHR.made = [];

test("browser: XMLHttpRequest + FormData (fields first, then the file part 'file'), the Bearer header, upload.onprogress", async () => {
  globalThis.XMLHttpRequest = FakeXHR;
  try {
    const c = client({ url: "ws://127.0.0.1:9/ws", platform: "browser", api: function () {}, token: "TB", query: { user: "u" } });
    const file = new File([new Uint8Array([137, 80, 78, 71])], "photo.png", { type: "image/png" });
    const progress = [];
    const res = await c.upload(file, { kind: "image", room: "dm:u:v", onProgress: (p) => progress.push(p.progress) });
    assert.equal(res.file_id, "m_abc");
    const x = FakeXHR.made[0];
    assert.equal(x.method, "POST");
    assert.equal(x.url, "http://127.0.0.1:9/media/upload?user=u&kind=image&room=dm%3Au%3Av");
    assert.deepEqual(x.headers, { Authorization: "Bearer TB" });
    assert.deepEqual([...x.body.keys()], ["kind", "room", "file"]);
    assert.equal(x.body.get("kind"), "image");
    assert.equal(x.body.get("file").name, "photo.png");
    assert.deepEqual(progress, [50, 100]);
    // A Blob without a name: opts.name.
    await c.upload(new Blob([new Uint8Array([1])]), { kind: "file", name: "notes.txt" });
    assert.equal(FakeXHR.made[1].body.get("file").name, "notes.txt");
  } finally {
    delete globalThis.XMLHttpRequest;
  }
});

test("miniProgramUpload refuses what the platform cannot upload", () => {
  assert.throws(() => miniProgramUpload({}, "wx", { file: "x" }), /uploadFile is not available/);
  const wx = fakeApi("wx");
  assert.throws(() => miniProgramUpload(wx, "wx", { file: new Blob([]), name: "file", onProgress() {} }), /temp file path/);
});

/** A scripted socket adapter (acks publishes with growing seqs; history answers with a
 * re-signed copy) plus a wx uploadFile. */
function scripted(user = "alice") {
  const wx = fakeApi("wx");
  const srv = { sent: [], seq: 0, sock: null };
  srv.adapter = {
    name: "scripted",
    upload: (o) => miniProgramUpload(wx, "wx", o),
    connect() {
      const sock = {
        protocol: "gateway.v1",
        onopen() {},
        onmessage() {},
        onclose() {},
        onerror() {},
        send(text) {
          const f = JSON.parse(text);
          srv.sent.push(f);
          setTimeout(() => {
            if (f.op === "publish") sock.onmessage(JSON.stringify({ op: "ack", id: f.id, room: f.room, seq: ++srv.seq, epoch: "e" }));
            else if (f.op === "sync") sock.onmessage(JSON.stringify({ op: "ack", id: f.id, cursor: 1, more: false, next: null, convs: [] }));
            else if (f.op === "history") {
              const m = { op: "msg", room: f.room, seq: f.before_seq - 1, type: "image", from: user, data: { ...OK_BODY, url: "https://x/media/f/m_abc?e=99&s=new", expires: Date.now() + 600000 } };
              sock.onmessage(JSON.stringify({ op: "ack", id: f.id, room: f.room, msgs: [m], more: true, epoch: "e" }));
            }
          }, 0);
          return true;
        },
        close() {},
      };
      srv.sock = sock;
      setTimeout(() => {
        sock.onopen();
        sock.onmessage(JSON.stringify({ op: "connected", session: "s", user, heartbeat: 30, ts: Date.now() }));
      }, 0);
      return sock;
    },
  };
  srv.wx = wx;
  return srv;
}

test("sendImage: upload, then publish {type: image, data: {file_id, caption}} with a cid; resolves with the ack (+ media); sendVoice sends duration; sendFile type file", async () => {
  const srv = scripted();
  const c = client({ url: "ws://127.0.0.1:9/ws", platform: srv.adapter });
  await c.connect();
  const progress = [];
  const ack = await c.sendImage("live:1", "wxfile://a.jpg", { caption: "look", onProgress: (p) => progress.push(p.progress) });
  assert.equal(ack.seq, 1);
  assert.deepEqual(ack.media, OK_BODY);
  assert.deepEqual(progress, [50, 100]);
  const pub = srv.sent.filter((f) => f.op === "publish");
  assert.equal(pub.length, 1);
  assert.equal(pub[0].type, "image");
  assert.deepEqual(pub[0].data, { file_id: "m_abc", caption: "look" });
  assert.match(pub[0].cid, /^[0-9a-z]{16}$/);
  assert.deepEqual(srv.wx.calls[0].formData, { kind: "image", room: "live:1" });

  await c.sendVoice("live:1", "wxfile://v.silk", { duration: 2500, cid: "my-cid-1" });
  assert.deepEqual(srv.wx.calls[1].formData, { kind: "voice", room: "live:1", duration: "2500" });
  const p2 = srv.sent.filter((f) => f.op === "publish")[1];
  assert.deepEqual([p2.type, p2.cid, p2.data], ["voice", "my-cid-1", { file_id: "m_abc" }]);
  await c.sendFile("live:1", "wxfile://f.pdf");
  assert.equal(srv.sent.filter((f) => f.op === "publish")[2].type, "file");
  await assert.rejects(c.sendImage("live:1", null), /temp file path/);
  assert.equal(srv.sent.filter((f) => f.op === "publish").length, 3, "nothing published for a file that could not be uploaded");
});

test("an aborted sendImage publishes nothing", async () => {
  const srv = scripted();
  const c = client({ url: "ws://127.0.0.1:9/ws", platform: srv.adapter });
  await c.connect();
  const up = c.sendImage("live:1", "wxfile://a.jpg");
  up.abort();
  const e = await up.then(() => null, (x) => x);
  assert.equal(e.code, ErrorCodes.ABORTED);
  await sleep(20);
  assert.equal(srv.sent.filter((f) => f.op === "publish").length, 0);
});

test("a conversation room goes through conversations.send (pending, then sent with the same cid; the sender's copy has the URLs); via: 'publish' forces a plain publish", async () => {
  const srv = scripted("alice");
  const c = client({ url: "ws://127.0.0.1:9/ws", platform: srv.adapter, conversations: { user: "alice" } });
  const pending = [];
  c.conversations.on("pending", (e) => pending.push(c.conversations.pending(e.room).map((p) => p.type)));
  const sent = [];
  c.conversations.on("sent", (e) => sent.push(e));
  await c.connect();
  const ack = await c.sendImage("dm:alice:bob", "wxfile://a.jpg");
  assert.equal(ack.seq, 1);
  assert.ok(pending.some((l) => l.length === 1 && l[0] === "image"), JSON.stringify(pending));
  assert.equal(sent.length, 1);
  assert.equal(sent[0].cid, ack.cid);
  assert.equal(sent[0].msg.type, "image");
  // No echo before the ack here: the sender's copy gets the upload's description and URLs.
  assert.equal(ack.msg, sent[0].msg);
  assert.deepEqual(ack.msg.data, { file_id: "m_abc", kind: "image", mime: "image/png", size: 6, name: "a.png", w: 2, h: 1, duration: null, thumb: false, url: OK_BODY.url, thumb_url: null, expires: 1 });
  assert.equal(c.conversations.messages("dm:alice:bob")[0].data.url, OK_BODY.url);
  await c.sendImage("dm:alice:bob", "wxfile://b.jpg", { via: "publish" });
  assert.equal(sent.length, 1, "not through the conversations");
});

test("mediaUrl: absolute URLs (relative ones made so), thumb falls back to url, expired / margin; refreshMedia pages the message again", async () => {
  const srv = scripted();
  const c = client({ url: "wss://chat.example.com/ws", platform: srv.adapter });
  const t = Date.now();
  const m = { op: "msg", room: "live:1", seq: 7, type: "image", data: { file_id: "m_1", url: "/media/f/m_1?e=1&s=a", thumb_url: "/media/t/m_1?e=1&s=b", expires: t + 60000 } };
  assert.deepEqual(c.mediaUrl(m), { url: "https://chat.example.com/media/f/m_1?e=1&s=a", thumbUrl: "https://chat.example.com/media/t/m_1?e=1&s=b", expires: t + 60000, expired: false });
  assert.equal(c.mediaUrl(m, { margin: 120000 }).expired, true);
  const v = { room: "r", seq: 1, type: "voice", data: { file_id: "m_2", url: "https://s3.example/b/k?X-Amz=1", expires: t - 1 } };
  assert.deepEqual(c.mediaUrl(v), { url: "https://s3.example/b/k?X-Amz=1", thumbUrl: "https://s3.example/b/k?X-Amz=1", expires: t - 1, expired: true });
  assert.equal(c.mediaUrl({ type: "chat", data: { text: "hi" } }), null);
  // Only http(s) and the server's paths: a message from an unchecked room cannot smuggle a script link.
  for (const bad of ["javascript:alert(1)", "JAVASCRIPT:alert(1)", "data:text/html,<script>x</script>", "//evil.example/x.jpg"]) {
    const u = c.mediaUrl({ type: "image", data: { url: bad, thumb_url: bad } });
    assert.equal(u.url, null, bad);
    assert.equal(u.thumbUrl, null, bad);
  }
  assert.equal(c.mediaUrl(null), null);
  await c.connect();
  const fresh = await c.refreshMedia(m);
  assert.equal(fresh.seq, 7);
  assert.equal(c.mediaUrl(fresh).expired, false);
  const h = srv.sent.find((f) => f.op === "history");
  assert.deepEqual([h.room, h.before_seq, h.limit], ["live:1", 8, 1]);
  assert.equal(ErrorCode.MEDIA_NOT_FOUND, 4035);
});
