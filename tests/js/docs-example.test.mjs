// The conversations mini-program example of docs/sdk-js.md, run as written: its app.js,
// utils/chat.js and the two pages are taken from the page's code blocks and run with the
// built dist/livegate.js against a real gateway (JWT auth, as the example's getToken), under
// a fake `wx` plus App/Page/getApp. The list page shows the badges and the tab bar badge; the
// chat page pages back, reads on show, sends with an optimistic bubble, shows receipts,
// typing and recalls; a new group opens its chat.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join, posix } from "node:path";
import vm from "node:vm";
import { Client, dmId } from "../../clients/js/src/index.js";
import { Gateway, fakeMiniProgram, waitFor, sleep, convConfig, makeJwt, ROOT } from "./helpers.mjs";

const SECRET = "docs-example-secret-of-at-least-32-bytes";
const A = `alice${process.pid}`;
const B = `bob${process.pid}`;
const DM = dmId(A, B);

/** The files of the example: {"app.js": code, "pages/chat/chat.wxml": code, ...}. */
function exampleFiles() {
  const md = readFileSync(join(ROOT, "docs", "sdk-js.md"), "utf8");
  const start = md.indexOf("## Mini-program example: conversations");
  assert.ok(start > 0, "the example section exists");
  const end = md.indexOf("\n## ", start + 10);
  const files = {};
  for (const m of md.slice(start, end).matchAll(/^`([\w/.]+)`[^\n]*\n\n```\w+\n([\s\S]*?)^```/gm)) files[m[1]] = m[2];
  return files;
}

/** A mini-program runtime: CommonJS modules from `files` (utils/livegate.js is the bundle),
 * App/Page/getApp, and page instances whose setData copies data as the runtime does (JSON). */
function runtime(files, wx) {
  const modules = {};
  const pageDefs = {};
  let app = null;
  let loading = null;
  const bundle = readFileSync(join(ROOT, "clients", "js", "dist", "livegate.js"), "utf8");
  const App = (def) => {
    app = def;
  };
  const Page = (def) => {
    pageDefs[loading] = def;
  };
  const getApp = () => app;
  function load(path) {
    if (modules[path]) return modules[path].exports;
    const code = path === "utils/livegate.js" ? bundle : files[path];
    if (code === undefined) throw new Error(`the example requires ${path}, which it does not show`);
    const module = { exports: {} };
    modules[path] = module;
    const fn = vm.runInThisContext(`(function (require, module, exports, wx, App, Page, getApp) {${code}\n})`, { filename: path });
    const require = (spec) => load(posix.normalize(posix.join(posix.dirname(path), spec)));
    const prev = loading;
    loading = path;
    fn(require, module, module.exports, wx, App, Page, getApp);
    loading = prev;
    return module.exports;
  }
  function page(path) {
    load(path);
    const def = pageDefs[path];
    assert.ok(def, `${path} calls Page()`);
    const p = { route: path };
    for (const k in def) p[k] = k === "data" ? JSON.parse(JSON.stringify(def.data)) : def[k];
    p.setData = function (patch) {
      for (const k in patch) {
        if (/[.[]/.test(k)) throw new Error("path keys are not simulated here: " + k);
        this.data[k] = patch[k] === undefined ? undefined : JSON.parse(JSON.stringify(patch[k]));
      }
    };
    return p;
  }
  return { load, page, app: () => app };
}

let gw;
let wx;
let mp;
let alice;

before(async () => {
  gw = await new Gateway({ name: "docs", config: convConfig(), sets: ["auth.mode=jwt", `auth.secret=${SECRET}`, "limits.client_rate=0"] }).start();
  wx = fakeMiniProgram("wx");
  // What the example calls besides sockets and storage.
  const real = wx.connectSocket;
  Object.assign(wx, {
    toasts: [],
    navigations: [],
    titles: [],
    sheet: { tapIndex: 0 },
    modal: null,
    connectSocket: (p) => real({ ...p, url: p.url.replace("wss://live.example.com/ws", gw.wsUrl) }),
    request: (o) => setTimeout(() => o.success({ data: { token: makeJwt(SECRET, { sub: wx.getStorageSync("userId"), exp: Math.floor(Date.now() / 1000) + 600 }) } }), 0),
    vibrateShort: () => {},
    setNavigationBarTitle: (o) => wx.titles.push(o.title),
    showToast: (o) => wx.toasts.push(o.title),
    navigateTo: (o) => wx.navigations.push(o.url),
    showActionSheet: (o) => setTimeout(() => o.success(wx.sheet), 0),
    showModal: (o) => setTimeout(() => o.success(wx.modal), 0),
  });
  wx.setStorageSync("userId", B);
  mp = runtime(exampleFiles(), wx);
  alice = new Client({ url: gw.wsUrl, platform: "browser", token: makeJwt(SECRET, { sub: A, exp: Math.floor(Date.now() / 1000) + 600 }), conversations: true });
});

after(async () => {
  if (alice) alice.close();
  const app = mp && mp.app();
  if (app && app.live) app.live.close();
  if (gw) await gw.stop();
});

const query = (url) => Object.fromEntries(url.split("?")[1].split("&").map((kv) => kv.split("=")));

test("the example's files are all there and its JavaScript parses", () => {
  const files = exampleFiles();
  for (const f of ["app.json", "app.js", "utils/chat.js", "pages/chats/chats.js", "pages/chats/chats.wxml", "pages/chats/chats.wxss", "pages/chat/chat.js", "pages/chat/chat.wxml", "pages/chat/chat.wxss"]) {
    assert.ok(files[f], `${f} is shown`);
  }
  JSON.parse(files["app.json"]);
  for (const f of Object.keys(files).filter((f) => f.endsWith(".js"))) new vm.Script(files[f], { filename: f });
  // Every handler the WXML binds exists in its page.
  for (const pageName of ["chats", "chat"]) {
    const js = files[`pages/${pageName}/${pageName}.js`];
    for (const m of files[`pages/${pageName}/${pageName}.wxml`].matchAll(/bind\w+="(\w+)"/g)) assert.match(js, new RegExp(`\\n  ${m[1]}\\(`), `${pageName}.js defines ${m[1]}`);
  }
});

test("the list page and the chat page against a real gateway", async () => {
  // While bob's app is not running, alice writes 25 messages: his first sync brings the
  // newest 20 of them (syncMsgs), the chat page pages back to the others.
  await alice.connect();
  for (let i = 1; i <= 25; i++) await alice.conversations.send(DM, { text: "m" + i });
  const synced = new Promise((resolve) => {
    // The app creates its client in onLaunch: listen right after.
    const launch = mp.load("app.js") && mp.app();
    launch.onLaunch();
    launch.live.conversations.once("synced", resolve);
    launch.onShow();
  });
  await synced;
  const app = mp.app();
  assert.equal(app.live.user, B, "the token from getToken names bob");

  const list = mp.page("pages/chats/chats.js");
  list.onLoad();
  list.onShow();
  assert.equal(list.data.offline, false);
  assert.equal(list.data.convs.length, 1);
  assert.deepEqual(
    { ...list.data.convs[0], time: undefined },
    { room: DM, kind: "dm", title: A, initial: "A", preview: "m25", unread: 25, badge: "25", time: undefined }
  );
  await waitFor(() => wx.badges[wx.badges.length - 1] === "25", 2000, "the tab bar badge");

  // Tap the row: the chat page opens with the newest 20, reads on show.
  list.open({ currentTarget: { dataset: { room: DM } } });
  const url = wx.navigations.pop();
  assert.match(url, /^\/pages\/chat\/chat\?room=/);
  const chat = mp.page("pages/chat/chat.js");
  chat.onLoad(query(url));
  list.onHide();
  chat.onShow();
  assert.equal(wx.titles.pop(), A);
  await waitFor(() => chat.data.items.length === 20 && chat.unwatch, 5000, "the newest page");
  assert.equal(chat.data.items[0].text, "m6");
  assert.equal(chat.data.more, true);
  assert.equal(chat.data.scrollTo, "s25");
  assert.deepEqual(chat.data.items.map((i) => i.text), Array.from({ length: 20 }, (_, i) => "m" + (i + 6)));
  await waitFor(() => app.live.conversations.totalUnread() === 0, 5000, "read on show");
  await waitFor(() => wx.badges[wx.badges.length - 1] === "", 2000, "the tab bar badge removed");

  chat.loadOlder();
  await waitFor(() => chat.data.items.length === 25, 5000, "the older page");
  assert.deepEqual(chat.data.items.map((i) => i.text), Array.from({ length: 25 }, (_, i) => "m" + (i + 1)));
  assert.equal(chat.data.more, false);
  assert.equal(chat.data.scrollTo, "s6", "kept at the message that was first");

  // Bob types and sends: alice sees typing; the bubble shows at once, then becomes the message.
  const typing = new Promise((resolve) => alice.conversations.once("typing", resolve));
  chat.onInput({ detail: { value: "hi alice" } });
  assert.deepEqual(await typing, { room: DM, user: B });
  chat.send();
  const bubble = chat.data.items[chat.data.items.length - 1];
  assert.ok(bubble.key.startsWith("c") && bubble.mine && bubble.text === "hi alice" && ["queued", "sending"].includes(bubble.state), JSON.stringify(bubble));
  assert.equal(chat.data.text, "");
  await waitFor(() => chat.data.items[chat.data.items.length - 1].key === "s26", 5000, "the bubble became message 26");
  assert.equal(chat.data.items.filter((i) => i.text === "hi alice").length, 1, "once");
  // Alice reads it: the receipt shows.
  await waitFor(() => alice.conversations.get(DM) && alice.conversations.get(DM).last_seq === 26, 5000, "alice has it");
  await alice.conversations.read(DM);
  await waitFor(() => chat.data.items[chat.data.items.length - 1].read === true, 5000, "read receipt on the bubble");

  // Alice types and answers while the page is shown: typing, the message, read at once.
  alice.conversations.typing(DM);
  await waitFor(() => chat.data.typing === `${A} is typing…`, 5000, "the typing indicator");
  await alice.conversations.send(DM, { text: "hello bob" });
  await waitFor(() => chat.data.items.some((i) => i.text === "hello bob"), 5000, "alice's answer");
  assert.equal(chat.data.typing, "", "the indicator ends with her message");
  await waitFor(() => alice.conversations.get(DM).peer_read_seq === 27, 5000, "read while shown: alice gets the receipt");

  // Long press on bob's message: recall.
  const recalled = new Promise((resolve) => alice.conversations.once("recall", resolve));
  chat.onLongPress({ currentTarget: { dataset: { seq: 26, mine: true } } });
  assert.equal((await recalled).seq, 26);
  await waitFor(() => chat.data.items.find((i) => i.seq === 26).recalled, 5000, "the tombstone on the page");
  await sleep(50);
  assert.deepEqual(wx.toasts, [], "no error toast");

  // Back to the list; a new group from the list page opens its chat.
  chat.onUnload();
  list.onShow();
  assert.equal(list.data.convs[0].preview, "hello bob");
  wx.modal = { confirm: true, content: A };
  list.newGroup();
  await waitFor(() => wx.navigations.length === 1, 5000, "the new group's chat");
  const groupRoom = decodeURIComponent(query(wx.navigations.pop()).room);
  assert.match(groupRoom, /^group:/);
  await waitFor(() => list.data.convs.some((c) => c.room === groupRoom && c.title === "Group of 2" && c.kind === "group"), 5000, "the group in the list");
  await waitFor(() => alice.conversations.get(groupRoom), 5000, "alice is in it");
  const chat2 = mp.page("pages/chat/chat.js");
  chat2.onLoad({ room: encodeURIComponent(groupRoom) });
  chat2.onShow();
  await waitFor(() => chat2.data.more === false, 5000, "an empty group loads");
  assert.deepEqual(chat2.data.items, []);
  chat2.onUnload();
  list.onUnload();
});
