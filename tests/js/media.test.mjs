// Media messages end to end against a real gateway: fake mini-program APIs (wx, tt, my,
// uni) whose uploadFile performs a REAL multipart POST (fetch + FormData + a Blob of the
// file read from disk) to the gateway's /media/upload, with each platform's argument and
// result shapes (Alipay: fileName/fileType, error 19 for a non-2xx status; uni: a task only
// with callbacks) and onProgressUpdate calls. Alice sends a photo, a voice message and a
// file in a dm; bob receives each message and downloads `data.url` (same bytes) and the
// photo's thumbnail. Also: the server's errors as UploadErrors, publish refusals (4035,
// 4036, 4037), mediaUrl/refreshMedia, abort. The browser path (XMLHttpRequest) is covered
// by tests/integration/test_browser_media.py in Chromium.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { deflateSync } from "node:zlib";
import { randomFillSync } from "node:crypto";
import { Client, dmId, ErrorCode, ErrorCodes, UploadError } from "../../clients/js/src/index.js";
import { Gateway, fakeMiniProgram, waitFor, LOG_DIR } from "./helpers.mjs";

const DIR = join(LOG_DIR, `media-${process.pid}`);
const IMAGE_LIMIT = 200000;

// ---------------------------------------------------------------- test files

function crc32(buf) {
  let c;
  let crc = 0xffffffff;
  for (let n = 0; n < buf.length; n++) {
    c = (crc ^ buf[n]) & 0xff;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    crc = (crc >>> 8) ^ c;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

/** A real PNG (RGB gradient, w x h; `noise`: random pixels, which do not compress). */
function png(w, h, noise = false) {
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(td));
    return Buffer.concat([len, td, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const raw = Buffer.alloc((w * 3 + 1) * h);
  if (noise) randomFillSync(raw);
  for (let y = 0; y < h && !noise; y++) {
    raw[y * (w * 3 + 1)] = 0;
    for (let x = 0; x < w; x++) {
      const o = y * (w * 3 + 1) + 1 + x * 3;
      raw[o] = (x * 255) / w;
      raw[o + 1] = (y * 255) / h;
      raw[o + 2] = 128;
    }
  }
  if (noise) for (let y = 0; y < h; y++) raw[y * (w * 3 + 1)] = 0; // filter byte: none
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", ihdr), chunk("IDAT", deflateSync(raw)), chunk("IEND", Buffer.alloc(0))]);
}

/** A WAV file: `ms` of a 440 Hz tone, 8 kHz mono 16-bit. */
function wav(ms) {
  const rate = 8000;
  const n = Math.round((rate * ms) / 1000);
  const data = Buffer.alloc(n * 2);
  for (let i = 0; i < n; i++) data.writeInt16LE(Math.round(8000 * Math.sin((2 * Math.PI * 440 * i) / rate)), i * 2);
  const h = Buffer.alloc(44);
  h.write("RIFF", 0, "ascii");
  h.writeUInt32LE(36 + data.length, 4);
  h.write("WAVE", 8, "ascii");
  h.write("fmt ", 12, "ascii");
  h.writeUInt32LE(16, 16);
  h.writeUInt16LE(1, 20); // PCM
  h.writeUInt16LE(1, 22); // mono
  h.writeUInt32LE(rate, 24);
  h.writeUInt32LE(rate * 2, 28);
  h.writeUInt16LE(2, 32);
  h.writeUInt16LE(16, 34);
  h.write("data", 36, "ascii");
  h.writeUInt32LE(data.length, 40);
  return Buffer.concat([h, data]);
}

/** A small valid PDF. */
function pdf() {
  const objs = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>", "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"];
  let out = "%PDF-1.4\n";
  const offs = [];
  objs.forEach((o, i) => {
    offs.push(out.length);
    out += `${i + 1} 0 obj\n${o}\nendobj\n`;
  });
  const xref = out.length;
  out += `xref\n0 ${objs.length + 1}\n0000000000 65535 f \n` + offs.map((o) => String(o).padStart(10, "0") + " 00000 n \n").join("");
  out += `trailer\n<< /Size ${objs.length + 1} /Root 1 0 R >>\nstartxref\n${xref}\n%%EOF\n`;
  return Buffer.from(out, "latin1");
}

function tempFile(name, bytes) {
  mkdirSync(DIR, { recursive: true });
  const p = join(DIR, name);
  writeFileSync(p, bytes);
  return p;
}

// ---------------------------------------------------------------- fake uploadFile

/**
 * `api.uploadFile` of a fake mini-program `kind`: a real multipart POST (fetch + FormData,
 * the form fields first, then the file read from `filePath` as the part `name` (Alipay:
 * `fileName`), named after the path like the runtimes do), the task's onProgressUpdate
 * called with `{progress, totalBytesSent, totalBytesExpectedToSend}` (half way before the
 * POST, 100 after it), and the answer as the platform gives it: `success({statusCode, data:
 * <string>, header})`; Alipay calls `fail({error: 19, status, data})` for a non-2xx status;
 * uni returns a Promise unless a callback is passed. `api.uploads` records the params.
 */
function addUploadFile(api, kind) {
  api.uploads = [];
  api.uploadFile = (params) => {
    api.uploads.push(params);
    if (kind === "uni" && !params.success && !params.fail && !params.complete) return Promise.resolve([null, {}]);
    if (kind === "my" && !["image", "video", "audio"].includes(params.fileType)) throw new Error("my.uploadFile: fileType must be image, video or audio");
    const partName = kind === "my" ? params.fileName : params.name;
    const ctl = new AbortController();
    const progress = [];
    const task = {
      onProgressUpdate: (cb) => progress.push(cb),
      offProgressUpdate: (cb) => progress.splice(progress.indexOf(cb), 1),
      abort: () => ctl.abort(),
    };
    const emit = (sent, total) => {
      for (const cb of progress.slice()) cb({ progress: Math.round((sent * 100) / total), totalBytesSent: sent, totalBytesExpectedToSend: total });
    };
    setTimeout(async () => {
      try {
        const bytes = readFileSync(params.filePath);
        const form = new FormData();
        for (const [k, v] of Object.entries(params.formData || {})) form.append(k, v);
        form.append(partName, new Blob([bytes]), basename(params.filePath));
        emit(Math.floor(bytes.length / 2), bytes.length);
        const r = await fetch(params.url, { method: "POST", body: form, headers: params.header || {}, signal: ctl.signal });
        const text = await r.text();
        emit(bytes.length, bytes.length);
        if (kind === "my" && (r.status < 200 || r.status >= 300)) {
          params.fail({ error: 19, errorMessage: "http status error", status: r.status, data: text });
          return;
        }
        params.success({ statusCode: r.status, data: text, header: Object.fromEntries(r.headers), errMsg: "uploadFile:ok" });
      } catch (e) {
        const res = kind === "my" ? { error: 12, errorMessage: String(e.message || e) } : { errMsg: "uploadFile:fail " + (ctl.signal.aborted ? "abort" : e.message) };
        if (params.fail) params.fail(res);
      }
    }, 0);
    return task;
  };
  return api;
}

// ---------------------------------------------------------------- the gateway

let gw;
const clients = [];
before(async () => {
  // Images up to IMAGE_LIMIT bytes (the 413 test); the other limits are the defaults.
  gw = await new Gateway({ name: "media", sets: [`media.limits.image=${IMAGE_LIMIT}`] }).start();
});
after(async () => {
  clients.forEach((c) => c.close());
  if (gw) await gw.stop();
});

function mp(kind, user) {
  const api = addUploadFile(fakeMiniProgram(kind), kind);
  const c = new Client({ url: gw.wsUrl, platform: kind, api, query: { user }, conversations: { user }, requestTimeout: 5000 });
  clients.push(c);
  return { api, c };
}

function browserClient(user) {
  const c = new Client({ url: gw.wsUrl, platform: "browser", query: { user }, conversations: { user }, requestTimeout: 5000 });
  clients.push(c);
  return c;
}

/** The next media message of `room` that `c` receives (live or by sync), by seq. */
function received(c, room, seq) {
  return waitFor(() => c.conversations.messages(room).find((m) => m.seq === seq), 10000, `message ${seq} of ${room}`);
}

async function download(c, m) {
  const u = c.mediaUrl(m);
  assert.ok(u && !u.expired, `a fresh URL: ${JSON.stringify(m.data)}`);
  assert.match(u.url, /^http:\/\/127\.0\.0\.1:\d+\/media\/f\//);
  const r = await fetch(u.url);
  return { status: r.status, type: r.headers.get("content-type"), bytes: Buffer.from(await r.arrayBuffer()), u };
}

for (const kind of ["wx", "tt", "my", "uni"]) {
  test(`${kind}: a photo uploaded with ${kind}.uploadFile (progress), sent in a dm; the peer gets it and downloads the same bytes and a thumbnail`, async () => {
    const a = `a${kind}${process.pid}`;
    const b = `b${kind}${process.pid}`;
    const room = dmId(a, b);
    const { api, c: alice } = mp(kind, a);
    const bob = browserClient(b);
    await Promise.all([alice.connect(), bob.connect()]);
    const bytes = png(400, 300);
    const path = tempFile(`${kind}-photo.png`, bytes);
    const progress = [];
    const events = [];
    alice.on("upload", (e) => events.push(e.state));
    const ack = await alice.sendImage(room, path, { caption: "from " + kind, onProgress: (p) => progress.push(p) });
    assert.ok(ack.seq > 0, JSON.stringify(ack));
    assert.equal(ack.media.kind, "image");
    assert.equal(ack.media.size, bytes.length);
    assert.equal(ack.media.w, 400);
    assert.equal(ack.media.h, 300);
    assert.match(ack.media.file_id, /^m_/);
    assert.deepEqual(progress.map((p) => p.progress), [50, 100]);
    assert.equal(progress[1].loaded, bytes.length);
    assert.deepEqual(events, ["progress", "progress", "done"]);
    // The platform call, as the platform wants it.
    const call = api.uploads[0];
    assert.equal(call.url, `${gw.httpUrl}/media/upload?user=${a}&kind=image&room=${encodeURIComponent(room)}`);
    assert.equal(call.filePath, path);
    assert.deepEqual(call.formData, { kind: "image", room });
    if (kind === "my") assert.deepEqual([call.fileName, call.fileType, call.name], ["file", "image", undefined]);
    else assert.equal(call.name, "file");

    const m = await received(bob, room, ack.seq);
    assert.equal(m.type, "image");
    assert.equal(m.from, a);
    assert.equal(m.data.file_id, ack.media.file_id);
    assert.equal(m.data.caption, "from " + kind);
    assert.equal(m.data.mime, "image/png");
    assert.ok(m.data.expires > Date.now(), "expires in the future (ms)");
    const got = await download(bob, m);
    assert.equal(got.status, 200);
    assert.ok(got.bytes.equals(bytes), "the same bytes");
    if (m.data.thumb) {
      const t = await fetch(got.u.thumbUrl);
      assert.equal(t.status, 200);
      assert.match(t.headers.get("content-type"), /^image\//);
      assert.ok((await t.arrayBuffer()).byteLength > 0);
    }
    // The sender's own copy (the conversation's cache) has the URLs too.
    const mine = await received(alice, room, ack.seq);
    assert.equal(mine.data.file_id, ack.media.file_id);
  });
}

test("wx: a voice message (duration) and a file (PDF) in a dm; the peer downloads both", async () => {
  const a = `av${process.pid}`;
  const b = `bv${process.pid}`;
  const room = dmId(a, b);
  const { api, c: alice } = mp("wx", a);
  const { c: bob } = mp("wx", b);
  await Promise.all([alice.connect(), bob.connect()]);
  const voice = wav(1500);
  const ack = await alice.sendVoice(room, tempFile("voice.wav", voice), { duration: 1480 });
  assert.equal(api.uploads[0].formData.duration, "1480");
  assert.equal(ack.media.kind, "voice");
  const m = await received(bob, room, ack.seq);
  assert.equal(m.type, "voice");
  assert.ok(Math.abs(m.data.duration - 1500) <= 100, `the server's duration: ${m.data.duration}`);
  const got = await download(bob, m);
  assert.equal(got.status, 200);
  assert.ok(got.bytes.equals(voice));

  const doc = pdf();
  const ack2 = await alice.sendFile(room, tempFile("report.pdf", doc));
  const m2 = await received(bob, room, ack2.seq);
  assert.equal(m2.type, "file");
  assert.equal(m2.data.name, "report.pdf");
  assert.equal(m2.data.size, doc.length);
  const got2 = await download(bob, m2);
  assert.equal(got2.status, 200);
  assert.ok(got2.bytes.equals(doc));
});

test("the server's refusals: 401 without a user, 415 for a PDF as an image, 413 too large / too long (UploadError with status, code, limit), 4035/4036/4037 at publish; refreshMedia re-signs", async () => {
  const a = `ae${process.pid}`;
  const b = `be${process.pid}`;
  const room = dmId(a, b);
  const { c: alice } = mp("wx", a);
  const { c: bob } = mp("my", b);
  await Promise.all([alice.connect(), bob.connect()]);

  // No credentials: 401 "auth".
  const anon = addUploadFile(fakeMiniProgram("wx"), "wx");
  const nobody = new Client({ url: gw.wsUrl, platform: "wx", api: anon });
  clients.push(nobody);
  const e401 = await nobody.upload(tempFile("x.png", png(8, 8)), { kind: "image" }).catch((e) => e);
  assert.ok(e401 instanceof UploadError, String(e401));
  assert.deepEqual([e401.status, e401.code], [401, "auth"]);

  // Not an image: 415 "type" (Alipay: the status came through fail, error 19).
  const e415 = await bob.sendImage(room, tempFile("doc.pdf", pdf())).catch((e) => e);
  assert.ok(e415 instanceof UploadError, String(e415));
  assert.deepEqual([e415.status, e415.code], [415, "type"]);

  // Too large (413 "too_large", the limit in bytes) and too long (413 "too_long", in ms).
  const big = png(300, 300, true);
  assert.ok(big.length > IMAGE_LIMIT);
  const e413 = await alice.sendImage(room, tempFile("big-noise.png", big)).catch((e) => e);
  assert.deepEqual([e413.status, e413.code, e413.limit], [413, "too_large", IMAGE_LIMIT], String(e413));
  const eLong = await alice.sendVoice(room, tempFile("long.wav", wav(61500)), { duration: 61500 }).catch((e) => e);
  assert.deepEqual([eLong.status, eLong.code, eLong.limit], [413, "too_long", 60000], String(eLong));

  // Publish checks: an unknown file, someone else's, the wrong kind.
  const up = await alice.upload(tempFile("a.png", png(16, 16)), { kind: "image", room });
  await assert.rejects(alice.conversations.send(room, { file_id: "m_" + "x".repeat(22) }, { type: "image" }), (e) => e.code === ErrorCode.MEDIA_NOT_FOUND);
  await assert.rejects(bob.conversations.send(room, { file_id: up.file_id }, { type: "image" }), (e) => e.code === ErrorCode.MEDIA_NOT_YOURS);
  await assert.rejects(alice.conversations.send(room, { file_id: up.file_id }, { type: "file" }), (e) => e.code === ErrorCode.MEDIA_KIND);
  // ... and then the right one; the message pages again with fresh URLs.
  const ack = await alice.conversations.send(room, { file_id: up.file_id }, { type: "image" });
  const m = await received(bob, room, ack.seq);
  const fresh = await bob.refreshMedia(m);
  assert.equal(fresh.seq, m.seq);
  assert.equal(fresh.data.file_id, up.file_id);
  assert.ok(bob.mediaUrl(fresh).expires >= bob.mediaUrl(m).expires);
  assert.equal((await download(bob, fresh)).status, 200);
});

test("abort(): the upload stops, nothing is published", async () => {
  const a = `aa${process.pid}`;
  const room = dmId(a, `ba${process.pid}`);
  const { c: alice } = mp("wx", a);
  await alice.connect();
  const p = alice.sendImage(room, tempFile("big.png", png(800, 600)));
  p.abort();
  const e = await p.catch((x) => x);
  assert.equal(e.code, ErrorCodes.ABORTED);
  assert.equal(alice.conversations.pending(room).length, 0);
  assert.equal(alice.conversations.messages(room).length, 0);
});
