// Media messages in the pages built from demo/*.template.html (the demo, the agent console,
// the shop page): clients/js/build.mjs inlines this file into each, after the SDK, at the
// LIVEGATE_MEDIA_UI marker (and media-ui.css at LIVEGATE_MEDIA_CSS). Plain ES5 on the global
// LiveGate; it defines the global LiveGateMedia:
//
//   html(client, m, onExpired)  the bubble of an image / voice / video / file message, or null
//   refresher(client, onFresh)  a function(m) that pages m again once (fresh signed URLs)
//   picker(opts)                a file input that sends the picked file into a room, with
//                               progress and cancel (sendImage for photos, else sendFile)
//   label(m), sizeOf(n), errorText(e), isMedia(m)
//
// See docs/sdk-js.md, "Media messages".
var LiveGateMedia = (function () {
  "use strict";
  var KINDS = ["image", "voice", "video", "file"];
  /** What the server takes as kind "image" (other images go as files). */
  var IMAGE_TYPES = /^image\/(jpeg|png|gif|webp|bmp|heic|heif)$/;
  var noop = function () {};
  var esc = function (s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  };

  function isMedia(m) { return !!m && KINDS.indexOf(m.type) >= 0; }

  function sizeOf(n) {
    if (typeof n !== "number") return "";
    return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KB" : (n / 1048576).toFixed(1) + " MB";
  }

  /** A one-line text of a media message (lists, previews), or null for other messages. */
  function label(m) {
    if (!isMedia(m)) return null;
    var d = m.data || {}, cap = d.caption ? " " + d.caption : "";
    if (m.type === "image") return "[photo]" + cap;
    if (m.type === "voice") return "[voice" + (d.duration ? " " + Math.round(d.duration / 1000) + "s" : "") + "]";
    if (m.type === "video") return "[video]" + cap;
    return "[file] " + (d.name || "") + cap;
  }

  /** The inside of the bubble of media message `m`, or null (not one, or no URL yet: an
   * unsent one). URLs are signed and expire: for an expired one `onExpired(m)` is called
   * (see refresher) and the old URL is shown meanwhile. */
  function html(client, m, onExpired) {
    if (!isMedia(m)) return null;
    var u = client.mediaUrl(m), d = m.data || {};
    if (!u || !u.url) return null;
    if (u.expired && m.seq > 0 && onExpired) onExpired(m);
    var cap = d.caption ? '<div class="caption">' + esc(d.caption) + "</div>" : "";
    if (m.type === "image") {
      return '<a href="' + esc(u.url) + '" target="_blank" rel="noopener"><img class="media-img" src="' + esc(u.thumbUrl) + '" alt="' + esc(d.name || "photo") + '"></a>' + cap;
    }
    if (m.type === "voice") {
      return '<audio class="media-voice" controls preload="none" src="' + esc(u.url) + '"></audio>' + (d.duration ? '<span class="dur">' + Math.round(d.duration / 1000) + " s</span>" : "") + cap;
    }
    if (m.type === "video") return '<video class="media-video" controls preload="metadata" src="' + esc(u.url) + '"></video>' + cap;
    return '<a class="media-file" href="' + esc(u.url) + '" download="' + esc(d.name || "file") + '" target="_blank" rel="noopener">📄 ' + esc(d.name || "file") + '</a><span class="size">' + esc(sizeOf(d.size)) + "</span>" + cap;
  }

  /** A function(m) that fetches message `m` again (the server signs its URLs anew), once per
   * room and seq, and calls `onFresh(fresh)` with it. */
  function refresher(client, onFresh) {
    var asked = {};
    return function (m) {
      var key = m.room + "#" + m.seq;
      if (asked[key]) return;
      asked[key] = true;
      client.refreshMedia(m).then(function (fresh) { if (fresh) onFresh(fresh); }, noop);
    };
  }

  var HINTS = { 413: "too large", 415: "not a file of that kind", 429: "upload quota or too many uploads" };
  HINTS[LiveGate.ErrorCode.MEDIA_KIND] = "this kind of file is not allowed here";
  HINTS[LiveGate.ErrorCode.TOO_LARGE] = "too large for this conversation";

  /** Why an upload or its message failed: "HTTP 413 too_large ... (limit 20.0 MB)", "4037 ...". */
  function errorText(e) {
    if (!e) return "";
    var hint = HINTS[e.status] || HINTS[e.code];
    return (e.status ? "HTTP " + e.status + " " : "") + (e.code !== undefined ? e.code + " " : "") + (e.reason || e.message || "") +
      (e.limit ? " (limit " + sizeOf(e.limit) + ")" : "") + (hint ? " — " + hint : "");
  }

  /**
   * Sends the file picked in `opts.input` (an <input type="file">) into `opts.room()` (the
   * room, or null: nothing is sent), one upload at a time: a photo with client.sendImage,
   * anything else with client.sendFile, named as picked. Options:
   *   client        the LiveGate.Client (or a function that returns the current one)
   *   input, room   as above
   *   progress      {box, label, bar, cancel}: elements shown while it uploads (box hidden
   *                 otherwise; bar a <progress max=100>; cancel aborts the upload)
   *   onError(text, e)   a failure (not a cancel), or a second pick while one uploads
   *   onSent(ack)        the message was stored (ack.seq, ack.media)
   * Returns {busy(), abort()}.
   */
  function picker(opts) {
    var el = opts.progress || {}, current = null;
    var onError = opts.onError || noop, onSent = opts.onSent || noop;
    function finish(p) {
      if (current !== p) return;
      current = null;
      if (el.box) el.box.hidden = true;
    }
    opts.input.addEventListener("change", function () {
      var file = opts.input.files && opts.input.files[0];
      opts.input.value = "";
      var room = opts.room();
      if (!file || !room) return;
      if (current) { onError("one upload at a time", null); return; }
      if (el.label) el.label.textContent = "uploading " + file.name + " (" + sizeOf(file.size) + ")";
      if (el.bar) el.bar.value = 0;
      if (el.box) el.box.hidden = false;
      var client = typeof opts.client === "function" ? opts.client() : opts.client;
      var send = IMAGE_TYPES.test(file.type) ? client.sendImage : client.sendFile;
      var p = current = send.call(client, room, file, {
        name: file.name,
        onProgress: function (e) { if (current === p && el.bar) el.bar.value = e.progress; },
      });
      p.then(function (ack) { finish(p); onSent(ack); }, function (e) {
        finish(p);
        if (e && e.code === LiveGate.ErrorCodes.ABORTED) return;
        onError(errorText(e), e);
      });
    });
    if (el.cancel) el.cancel.addEventListener("click", function () { if (current) current.abort(); });
    return {
      busy: function () { return !!current; },
      abort: function () { if (current) current.abort(); },
    };
  }

  return { KINDS: KINDS, isMedia: isMedia, sizeOf: sizeOf, label: label, html: html, refresher: refresher, errorText: errorText, picker: picker };
})();
