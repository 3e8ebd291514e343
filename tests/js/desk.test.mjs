// The customer-service desk in a WeChat mini-program, through the fake `wx`
// (tests/js/helpers.mjs) and a real gateway with the desk plugin (docs/customer-service.md):
// the shopper opens a session from a product page (the product card first); an agent (the
// console's SDK calls) takes it from the queue; the shopper's app goes to the background
// and its socket is cut; meanwhile the agent is assigned... and answers; back in the
// foreground the SDK reconnects and syncs: the session's badge (and the tab bar's), the
// `assigned` state and the agent's answer, each once, in order.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client } from "../../clients/js/src/index.js";
import { Gateway, TcpProxy, fakeMiniProgram, waitFor, sleep } from "./helpers.mjs";

const SHOPPER = `shopper${process.pid}`;
const AGENT = `agent${process.pid}`;

/** The desk's routes and settings of docs/customer-service.md: no bot, manual claim. */
export const DESK_CONFIG = `
[[routes]]
pattern = "cs:{session}"
kind = "group"
join = "none"
store = "durable"
members_max = 20
create = "none"
invite = "none"
user_rate = 0
room_rate = 0

[[routes]]
pattern = "csi:{session}"
kind = "group"
join = "none"
store = "durable"
create = "none"
invite = "none"

[[routes]]
pattern = "*"

[plugins.desk]
enabled = true
strategy = "manual"
sticky = false
grace = 60
bot_turns = 0
handoff_words = ["人工", "human"]
agents_from = "role"

[[plugins.desk.departments]]
name = "presales"
title = "售前咨询"
canned = ["您好，请问有什么可以帮您？", "稍等，我帮您查一下。"]

[[plugins.desk.agents]]
user = "${AGENT}"
departments = ["presales"]
capacity = 5
`;

const CARD = { kind: "product", id: "sku-1001", title: "降噪蓝牙耳机 Pro", price: "¥899.00", image: "https://img.example.com/sku-1001.png", url: "/pages/item/item?id=1001" };

let gw;
let proxy;
let wx;
let shopper;
let agent;
const closers = [];

/** What the docs' product page does (docs/customer-service.md "In a mini-program"): the
 * "咨询" button opens (or resumes) a session with the product card, then follows it. */
function productPage(client, api) {
  const page = {
    data: { session: null, state: null, msgs: [] },
    setData(d) {
      Object.assign(this.data, d);
    },
    onConsult() {
      return client.desk.open({ department: "presales", card: CARD }).then((ack) => {
        this.setData({ session: ack.session, state: ack.state });
        this.stop = client.desk.follow(ack.session, (m) => this.setData({ msgs: this.data.msgs.concat([m]) }));
        client.desk.on("state", (e) => e.session === ack.session && this.setData({ state: e.state }));
        return ack;
      });
    },
  };
  client.conversations.on("change", (e) => {
    if (e.total > 0) api.setTabBarBadge({ index: 0, text: String(e.total) });
    else api.removeTabBarBadge({ index: 0 });
  });
  return page;
}

before(async () => {
  gw = await new Gateway({ name: "desk", config: DESK_CONFIG }).start();
  proxy = await new TcpProxy(gw.port).start();
  wx = fakeMiniProgram("wx");
  shopper = new Client({
    url: `ws://127.0.0.1:${proxy.port}/ws`,
    platform: "wx",
    api: wx,
    query: { user: SHOPPER },
    conversations: { user: SHOPPER },
    showProbeTimeout: 1000,
    backoffInitial: 200,
    backoffMax: 1000,
  });
  shopper.bindLifecycle();
  agent = new Client({ url: gw.wsUrl, platform: "browser", query: { user: AGENT, role: "agent" }, conversations: { user: AGENT } });
  closers.push(shopper, agent);
});

after(async () => {
  for (const c of closers) c.close();
  if (proxy) await proxy.close();
  if (gw) await gw.stop();
});

test("a session opened from a product page; the agent's answer comes while the app is in the background; on return, sync brings the badge and the answer", async () => {
  await Promise.all([shopper.connect(), agent.connect()]);
  const agentEvents = [];
  agent.desk.on("queue", (e) => agentEvents.push(["queue", e]));
  agent.desk.on("assigned", (e) => agentEvents.push(["assigned", e]));
  const st = await agent.desk.setStatus("online");
  assert.equal(st.status, "online");

  // The product page: "咨询" opens the session, the card is its first message.
  const page = productPage(shopper, wx);
  const ack = await page.onConsult();
  assert.ok(ack.session, "cs.open answers with the session id");
  assert.equal(ack.room, `cs:${ack.session}`);
  assert.equal(ack.resumed, false);
  assert.equal(ack.department, "presales");
  assert.equal(ack.state, "queued", "no bot (bot_turns = 0): queued at once");
  assert.equal(wx.sent.filter((f) => f.op === "cs.open").length, 1, "over the wx socket");
  await waitFor(() => page.data.msgs.some((m) => m.type === "cs.card"), 5000, "the card in the transcript");
  const card = page.data.msgs.find((m) => m.type === "cs.card");
  assert.equal(card.from, SHOPPER);
  assert.deepEqual({ title: card.data.title, price: card.data.price, image: card.data.image }, { title: CARD.title, price: CARD.price, image: CARD.image });
  await shopper.desk.send(ack.session, "这款耳机有白色吗？");

  // Opening again resumes the open session.
  const again = await shopper.desk.open({ department: "presales", card: CARD });
  assert.equal(again.session, ack.session);
  assert.equal(again.resumed, true);

  // The agent is told the queue changed and sees the session waiting, with its card.
  await waitFor(() => agentEvents.some(([k, e]) => k === "queue" && e.department === "presales"), 5000, "a cs.queue push to the agent");
  const queue = await agent.desk.queue("presales");
  const waiting = queue.find((s) => s.session === ack.session);
  assert.ok(waiting, `the session is in the queue: ${JSON.stringify(queue)}`);
  assert.equal(waiting.shopper, SHOPPER);
  assert.equal(waiting.card.title, CARD.title);
  assert.ok(waiting.waiting_ms >= 0);

  // The shopper has read everything so far, then the app goes to the background and the
  // network drops the socket (no close frame).
  await waitFor(() => shopper.conversations.get(ack.room), 5000, "the session in the shopper's list");
  await shopper.desk.read(ack.session);
  assert.equal(shopper.desk.unread(ack.session), 0);
  const seen = page.data.msgs.length;
  const sentBefore = wx.sent.length;
  wx.background();
  proxy.cutAll();

  // Meanwhile: the agent takes the session and answers.
  const accepted = await agent.desk.accept(ack.session);
  assert.equal(accepted.session, ack.session);
  assert.equal(accepted.room, ack.room);
  assert.equal(accepted.note_room, `csi:${ack.session}`);
  const mine = await agent.desk.mine();
  assert.ok(mine.some((s) => s.session === ack.session && s.state === "assigned" && s.agent === AGENT), "in the agent's chats");
  const transcript = await agent.desk.transcript(ack.session);
  assert.deepEqual(
    transcript.filter((m) => m.type === "cs.card" || m.type === "chat").map((m) => [m.type, m.from]),
    [["cs.card", SHOPPER], ["chat", SHOPPER]],
    "the agent reads what was said before the accept: the card, the question"
  );
  assert.equal(transcript.find((m) => m.type === "chat").data.text, "这款耳机有白色吗？");
  await agent.desk.send(ack.session, "有的，白色和黑色都有现货。");
  await sleep(500);
  assert.equal(wx.sent.length, sentBefore, "nothing sent while hidden");
  assert.equal(page.data.msgs.length, seen, "nothing seen while hidden");

  // Back in the foreground: reconnect, sync first, then the badge and the answer.
  const synced = new Promise((resolve) => shopper.conversations.once("synced", resolve));
  wx.foreground();
  await synced;
  assert.equal(wx.sent.slice(sentBefore).find((f) => f.op !== "ping").op, "sync", "the first request after the reconnect is the sync");
  // The badge counts every message missed (docs/protocol.md: system ones included): the
  // assigned state and the answer, and the conversation's own "added" line if the desk
  // adds the agent as a member.
  const unread = shopper.desk.unread(ack.session);
  assert.ok(unread >= 2, `the badge: at least the assigned state and the answer (${unread})`);
  await waitFor(() => wx.badges[wx.badges.length - 1] === String(unread), 3000, "the tab bar badge");
  await waitFor(() => page.data.msgs.length === seen + unread, 5000, "the chat page caught up");
  const missed = page.data.msgs.slice(seen).filter((m) => m.type !== "system");
  assert.deepEqual(missed.map((m) => m.type), ["cs.state", "chat"], "the desk's messages missed: the state, then the answer");
  assert.equal(missed[0].data.state, "assigned");
  assert.equal(missed[0].data.agent, AGENT);
  assert.equal(missed[1].from, AGENT);
  assert.equal(missed[1].data.text, "有的，白色和黑色都有现货。");
  const seqs = page.data.msgs.map((m) => m.seq);
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "in seq order");
  assert.equal(new Set(seqs).size, seqs.length, "each once");
  assert.equal(page.data.state, "assigned", "the page's state follows the cs.state message");
  assert.equal(shopper.desk.current.state, "assigned");
  assert.equal(shopper.desk.current.agent, AGENT);

  // Reading it clears the badges.
  await shopper.desk.read(ack.session);
  assert.equal(shopper.desk.unread(ack.session), 0);
  await waitFor(() => wx.badges[wx.badges.length - 1] === "", 3000, "the tab bar badge removed");
});

test("an internal note never reaches the shopper; close sends the rating card; the shopper rates", async () => {
  const sid = shopper.desk.current.session;
  const room = shopper.desk.room(sid);
  const note = await agent.desk.note(sid, "VIP 顾客，优先处理");
  assert.ok(note.seq > 0);
  await waitFor(() => agent.conversations.messages(`csi:${sid}`).some((m) => m.data && m.data.text === "VIP 顾客，优先处理"), 5000, "the note in the agent's internal channel");
  const info = await agent.desk.info(sid);
  assert.equal(info.session, sid);
  assert.equal(info.card.title, CARD.title);
  assert.ok("context" in info, "cs.info carries the context enrichment");
  await assert.rejects(shopper.desk.note(sid, "x"), (e) => e.code === 4003, "a shopper cannot write notes");
  await assert.rejects(shopper.conversations.history(`csi:${sid}`), (e) => e.code === 4031, "nor read them");

  const rating = new Promise((resolve) => shopper.desk.once("rating", resolve));
  const closed = await agent.desk.close(sid);
  assert.equal(closed.state, "closed");
  const r = await rating;
  assert.equal(r.session, sid);
  assert.equal(shopper.desk.current.state, "closed");
  await shopper.desk.rate(5, "很快就解决了");
  await waitFor(() => shopper.conversations.messages(room).some((m) => m.type === "cs.rated"), 5000, "the rating in the transcript");
  const after = await agent.desk.info(sid);
  assert.equal(after.state, "closed");
  // `rating` of the session object: {score, comment} (or the bare score).
  assert.equal(after.rating && typeof after.rating === "object" ? after.rating.score : after.rating, 5);
  assert.ok(shopper.conversations.messages(room).every((m) => !(m.data && m.data.text === "VIP 顾客，优先处理")), "the note is not in the shopper's transcript");
});
