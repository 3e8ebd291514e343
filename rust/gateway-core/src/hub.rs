//! The hub: sharded maps of connections, users and rooms; presence; ordered fan-out.
//!
//! Fan-out keeps per-room order and corks: a room has one drainer task at a time. It takes
//! every message published since its last run and queues all of them to each member under
//! one lock per member, so a busy room costs one writer wake-up per member per round, not
//! per message. Rooms larger than `fanout_chunk` are split across worker threads; the
//! drainer waits for every chunk before the next round, which keeps the order.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::runtime::Handle;

use crate::conn::{Conn, Direct, Frame, PRIO_LOW};
use crate::metrics::{self, Counters, Histograms};
use crate::protocol::frame::OP_TEXT;
use crate::protocol::frames;

const SHARDS: usize = 64;

/// Per-room delivery options, matched by the longest room-name prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomOptions {
    /// Merge window: messages published within it go out as one batch frame. 0 = off.
    pub merge_ms: u32,
    /// Most messages per batch frame.
    pub merge_max: u32,
}

#[derive(Default)]
struct Members {
    list: Vec<Arc<Conn>>,
    index: HashMap<u64, usize>,
    users: HashMap<Arc<str>, u32>,
    /// Shared copy of `list` for fan-out, rebuilt lazily after membership changes.
    snapshot: Option<Arc<Vec<Arc<Conn>>>>,
}

#[derive(Default)]
struct Pending {
    msgs: Vec<(Arc<Frame>, u8)>,
    scheduled: bool,
}

pub struct Room {
    pub name: Arc<str>,
    opts: RoomOptions,
    members: Mutex<Members>,
    pending: Mutex<Pending>,
    /// Deliveries to this room's members that were not queued (backpressure drops).
    pub dropped: std::sync::atomic::AtomicU64,
}

impl Room {
    fn snapshot(&self) -> Arc<Vec<Arc<Conn>>> {
        let mut m = self.members.lock();
        if let Some(s) = &m.snapshot {
            return s.clone();
        }
        let s = Arc::new(m.list.clone());
        m.snapshot = Some(s.clone());
        s
    }

    /// (connections, distinct users) in this room on this node.
    pub fn counts(&self) -> (usize, usize) {
        let m = self.members.lock();
        (m.list.len(), m.users.len())
    }
}

/// One member in a presence listing.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    pub conn: u64,
    pub user: Option<Arc<str>>,
    pub meta: Option<Arc<str>>,
}

/// Outcome of a join.
#[derive(Debug, PartialEq, Eq)]
pub enum Join {
    Joined,
    AlreadyMember,
    /// No such connection, or it is closing.
    NoSuchConn,
    /// The connection is in `max_rooms_per_conn` rooms already.
    ConnRoomsFull,
    /// The room does not exist and the node has `max_rooms` rooms.
    NodeRoomsFull,
}

/// How a fan-out to `n` members is cut: (pieces, members per piece). Pieces of at most
/// `chunk` members, equal in size and as many as a multiple of the worker count, so that
/// every worker ends about when the others do (3 pieces on 2 workers would leave one of
/// them a third round alone).
fn split(n: usize, chunk: usize, workers: usize) -> (usize, usize) {
    let workers = workers.max(1);
    let pieces = n.div_ceil(chunk.max(1)).div_ceil(workers) * workers;
    let pieces = pieces.clamp(1, n.max(1));
    (pieces, n.div_ceil(pieces))
}

/// A cache prefetch hint (nothing on other architectures); never faults.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it does not dereference in the language's sense and
    // never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

type Shards<K, V> = Box<[Mutex<HashMap<K, V>>]>;

pub struct Hub {
    rooms: Shards<Arc<str>, Arc<Room>>,
    conns: Shards<u64, Arc<Conn>>,
    users: Shards<Arc<str>, Vec<Arc<Conn>>>,
    room_opts: RwLock<Vec<(String, RoomOptions)>>,
    pub counters: Arc<Counters>,
    pub hist: Histograms,
    /// Engine clock origin, for frame timestamps (lag histogram).
    pub epoch: std::time::Instant,
    pub queue_bytes: usize,
    pub fanout_chunk: usize,
    pub min_deflate: usize,
    pub deflate_level: u32,
    /// Rooms one connection may be in, and rooms on this node.
    pub max_rooms_per_conn: usize,
    pub max_rooms: usize,
    /// Upgrades accepted for a user whose connection is not registered yet (the
    /// per-user cap counts them with the registered ones).
    user_pending: Shards<Arc<str>, u32>,
    rt: OnceLock<Handle>,
    hasher: std::collections::hash_map::RandomState,
}

fn shards<T: Default>() -> Box<[Mutex<T>]> {
    (0..SHARDS).map(|_| Mutex::new(T::default())).collect()
}

impl Hub {
    pub fn new(
        counters: Arc<Counters>,
        queue_bytes: usize,
        fanout_chunk: usize,
        min_deflate: usize,
        deflate_level: u32,
    ) -> Self {
        Self {
            rooms: shards(),
            conns: shards(),
            users: shards(),
            room_opts: RwLock::new(Vec::new()),
            counters,
            hist: Histograms::default(),
            epoch: std::time::Instant::now(),
            queue_bytes,
            fanout_chunk: fanout_chunk.max(64),
            min_deflate,
            deflate_level,
            max_rooms_per_conn: usize::MAX,
            max_rooms: usize::MAX,
            user_pending: shards(),
            rt: OnceLock::new(),
            hasher: Default::default(),
        }
    }

    /// Caps on rooms per connection and per node (unlimited by default).
    pub fn with_room_caps(mut self, per_conn: usize, node: usize) -> Self {
        self.max_rooms_per_conn = per_conn;
        self.max_rooms = node;
        self
    }

    /// Give the hub the runtime it spawns fan-out tasks on.
    pub fn set_runtime(&self, h: Handle) {
        let _ = self.rt.set(h);
    }

    fn shard_of(&self, s: &str) -> usize {
        (self.hasher.hash_one(s) as usize) % SHARDS
    }

    fn conn_shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Conn>>> {
        &self.conns[(id as usize) % SHARDS]
    }

    // ---- connections and users ------------------------------------------------------

    pub fn add_conn(&self, c: Arc<Conn>) {
        if let Some(u) = &c.user {
            self.users[self.shard_of(u)].lock().entry(u.clone()).or_default().push(c.clone());
        }
        self.conn_shard(c.id).lock().insert(c.id, c);
    }

    pub fn conn(&self, id: u64) -> Option<Arc<Conn>> {
        self.conn_shard(id).lock().get(&id).cloned()
    }

    /// Forget a closed connection; returns the rooms it was still in.
    pub fn remove_conn(&self, c: &Arc<Conn>) -> Vec<String> {
        self.conn_shard(c.id).lock().remove(&c.id);
        if let Some(u) = &c.user {
            let mut users = self.users[self.shard_of(u)].lock();
            if let Some(v) = users.get_mut(u) {
                v.retain(|x| x.id != c.id);
                if v.is_empty() {
                    users.remove(u);
                }
            }
        }
        let rooms: Vec<Arc<str>> = std::mem::take(&mut *c.rooms.lock());
        for r in &rooms {
            self.remove_member(r, c);
        }
        rooms.iter().map(|r| r.to_string()).collect()
    }

    /// Hold a place for one more connection of `user` (accepted, not yet registered),
    /// unless the user has `cap` already: open ones not closing, plus places held.
    /// A place is given back with [`Hub::unreserve_user`] once the connection is
    /// registered or its upgrade failed.
    pub fn reserve_user(&self, user: &Arc<str>, cap: usize) -> bool {
        let open = self.user_conns(user).iter().filter(|c| !c.is_closing()).count();
        let mut pending = self.user_pending[self.shard_of(user)].lock();
        let held = pending.get(&**user).copied().unwrap_or(0) as usize;
        if open + held >= cap {
            return false;
        }
        *pending.entry(user.clone()).or_insert(0) += 1;
        true
    }

    pub fn unreserve_user(&self, user: &str) {
        let mut pending = self.user_pending[self.shard_of(user)].lock();
        if let Some(n) = pending.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                pending.remove(user);
            }
        }
    }

    pub fn user_conns(&self, user: &str) -> Vec<Arc<Conn>> {
        self.users[self.shard_of(user)].lock().get(user).cloned().unwrap_or_default()
    }

    /// Every connection (for broadcast, heartbeats and drain).
    pub fn all_conns(&self) -> Vec<Arc<Conn>> {
        let mut v = Vec::new();
        for s in self.conns.iter() {
            v.extend(s.lock().values().cloned());
        }
        v
    }

    /// Visit every connection, one shard lock at a time.
    pub fn for_each_conn(&self, mut f: impl FnMut(&Arc<Conn>)) {
        for s in self.conns.iter() {
            for c in s.lock().values() {
                f(c);
            }
        }
    }

    // ---- rooms ----------------------------------------------------------------------

    /// Set delivery options for rooms whose name starts with `prefix` ("" = every room).
    /// Applies to rooms created afterwards.
    pub fn set_room_options(&self, prefix: &str, opts: RoomOptions) {
        let mut v = self.room_opts.write();
        v.retain(|(p, _)| p != prefix);
        v.push((prefix.to_owned(), opts));
        v.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    }

    fn options_for(&self, room: &str) -> RoomOptions {
        self.room_opts.read().iter().find(|(p, _)| room.starts_with(p.as_str())).map(|(_, o)| *o).unwrap_or_default()
    }

    pub fn room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms[self.shard_of(name)].lock().get(name).cloned()
    }

    pub fn join(&self, conn_id: u64, room: &str) -> Join {
        self.join_capped(conn_id, room, self.max_rooms_per_conn)
    }

    /// [`Hub::join`] with another cap on the connection's rooms: the app attaches a
    /// user's conversations to its connections beyond the cap of rooms a client may
    /// join by itself (and raises that cap by what it attached).
    pub fn join_capped(&self, conn_id: u64, room: &str, cap: usize) -> Join {
        let Some(c) = self.conn(conn_id) else { return Join::NoSuchConn };
        if c.is_closing() {
            return Join::NoSuchConn;
        }
        {
            let rooms = c.rooms.lock();
            if rooms.iter().any(|r| &**r == room) {
                return Join::AlreadyMember;
            }
            if rooms.len() >= cap {
                metrics::inc(&self.counters.rooms_refused_conn);
                return Join::ConnRoomsFull;
            }
        }
        let mut shard = self.rooms[self.shard_of(room)].lock();
        let r = match shard.get(room) {
            Some(r) => r.clone(),
            None => {
                if self.counters.rooms_current.load(Relaxed) as usize >= self.max_rooms {
                    metrics::inc(&self.counters.rooms_refused_node);
                    return Join::NodeRoomsFull;
                }
                let name: Arc<str> = Arc::from(room);
                let r = Arc::new(Room {
                    name: name.clone(),
                    opts: self.options_for(room),
                    members: Mutex::default(),
                    pending: Mutex::default(),
                    dropped: Default::default(),
                });
                shard.insert(name, r.clone());
                metrics::inc(&self.counters.rooms_current);
                r
            }
        };
        let mut m = r.members.lock();
        if m.index.contains_key(&conn_id) {
            return Join::AlreadyMember;
        }
        let at = m.list.len();
        m.list.push(c.clone());
        m.index.insert(conn_id, at);
        if let Some(u) = &c.user {
            *m.users.entry(u.clone()).or_insert(0) += 1;
        }
        m.snapshot = None;
        drop(m);
        drop(shard);
        c.rooms.lock().push(r.name.clone());
        Join::Joined
    }

    /// Whether `conn_id` is in `room` (a scan of its at most `max_rooms_per_conn` rooms).
    pub fn is_member(&self, conn_id: u64, room: &str) -> bool {
        self.conn(conn_id).is_some_and(|c| c.rooms.lock().iter().any(|r| &**r == room))
    }

    pub fn leave(&self, conn_id: u64, room: &str) -> bool {
        let Some(c) = self.conn(conn_id) else { return false };
        let removed = {
            let mut rooms = c.rooms.lock();
            let before = rooms.len();
            rooms.retain(|r| &**r != room);
            rooms.len() != before
        };
        removed && self.remove_member(room, &c)
    }

    fn remove_member(&self, room: &str, c: &Conn) -> bool {
        let mut shard = self.rooms[self.shard_of(room)].lock();
        let Some(r) = shard.get(room).cloned() else { return false };
        let mut m = r.members.lock();
        let Some(at) = m.index.remove(&c.id) else { return false };
        m.list.swap_remove(at);
        if at < m.list.len() {
            let moved = m.list[at].id;
            m.index.insert(moved, at);
        }
        if let Some(u) = &c.user {
            if let Some(n) = m.users.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    m.users.remove(u);
                }
            }
        }
        m.snapshot = None;
        if m.list.is_empty() {
            drop(m);
            shard.remove(room);
            metrics::dec(&self.counters.rooms_current);
        }
        true
    }

    /// Deliveries to `room` not queued since the room was created on this node.
    pub fn room_dropped(&self, room: &str) -> u64 {
        self.room(room).map(|r| r.dropped.load(Relaxed)).unwrap_or(0)
    }

    pub fn room_counts(&self, room: &str) -> (usize, usize) {
        self.room(room).map(|r| r.counts()).unwrap_or((0, 0))
    }

    pub fn room_members(&self, room: &str, offset: usize, limit: usize) -> Vec<MemberInfo> {
        let Some(r) = self.room(room) else { return Vec::new() };
        let m = r.members.lock();
        m.list
            .iter()
            .skip(offset)
            .take(limit)
            .map(|c| MemberInfo { conn: c.id, user: c.user.clone(), meta: c.meta.clone() })
            .collect()
    }

    /// (room, connections, users) for every room on this node.
    pub fn rooms(&self) -> Vec<(String, usize, usize)> {
        let mut out = Vec::new();
        for s in self.rooms.iter() {
            let rooms: Vec<Arc<Room>> = s.lock().values().cloned().collect();
            for r in rooms {
                let (c, u) = r.counts();
                out.push((r.name.to_string(), c, u));
            }
        }
        out
    }

    // ---- fan-out ----------------------------------------------------------------------

    /// Queue `frame` to every member of `room`, in publish order. Returns the member count
    /// at the time of the call. Never blocks on a member.
    pub fn publish(self: &Arc<Self>, room: &str, frame: Arc<Frame>, prio: u8) -> usize {
        metrics::inc(&self.counters.publishes);
        let Some(r) = self.room(room) else { return 0 };
        let n = r.counts().0;
        let spawn = {
            let mut p = r.pending.lock();
            p.msgs.push((frame, prio));
            !std::mem::replace(&mut p.scheduled, true)
        };
        if spawn {
            let hub = self.clone();
            match self.rt.get() {
                Some(h) => {
                    h.spawn(async move { hub.run_room(r).await });
                }
                None => {
                    // No runtime (unit tests): deliver inline, without merging.
                    let msgs = std::mem::take(&mut r.pending.lock().msgs);
                    r.pending.lock().scheduled = false;
                    let missed = hub.deliver(&r.snapshot(), &msgs, false);
                    r.dropped.fetch_add(missed, Relaxed);
                }
            }
        }
        n
    }

    async fn run_room(self: Arc<Self>, r: Arc<Room>) {
        loop {
            if r.opts.merge_ms > 0 {
                tokio::time::sleep(Duration::from_millis(u64::from(r.opts.merge_ms))).await;
            }
            let msgs = {
                let mut p = r.pending.lock();
                if p.msgs.is_empty() {
                    p.scheduled = false;
                    return;
                }
                std::mem::take(&mut p.msgs)
            };
            let frames = if r.opts.merge_ms > 0 { self.merge(&r, msgs) } else { msgs };
            let members = r.snapshot();
            let t0 = std::time::Instant::now();
            let missed = self.clone().fan_out(members, frames).await;
            r.dropped.fetch_add(missed, Relaxed);
            self.hist.fanout.observe_ns(t0.elapsed().as_nanos() as u64);
            if r.opts.merge_ms == 0 {
                // Let other rooms' drainers run between rounds of a busy room.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Deliver `frames` to `members`, splitting large rooms across worker threads.
    /// Returns how many (frame, member) deliveries were not queued (dropped or closing).
    async fn fan_out(self: Arc<Self>, members: Arc<Vec<Arc<Conn>>>, frames: Vec<(Arc<Frame>, u8)>) -> u64 {
        let n = members.len();
        if n <= self.fanout_chunk {
            return self.deliver(&members, &frames, true);
        }
        let workers = self.rt.get().map_or(1, |h| h.metrics().num_workers());
        let (pieces, chunk) = split(n, self.fanout_chunk, workers);
        let frames = Arc::new(frames);
        // Every piece is a task, none runs inline: tokio keeps the last task spawned from a
        // worker in that worker's LIFO slot, which other workers cannot steal, so a piece
        // run inline plus one in the slot would both land on this thread.
        let mut tasks = Vec::with_capacity(pieces);
        for start in (0..n).step_by(chunk) {
            let (hub, members, frames) = (self.clone(), members.clone(), frames.clone());
            tasks.push(tokio::spawn(async move {
                hub.deliver(&members[start..(start + chunk).min(members.len())], &frames, true)
            }));
        }
        let mut missed = 0;
        for t in tasks {
            missed += t.await.unwrap_or(0);
        }
        missed
    }

    /// Queue every frame to every member, one lock per member. Returns how many
    /// (frame, member) deliveries were not queued (dropped by the policy or closing).
    /// `direct`: write to idle members' sockets here (runtime threads only; a caller
    /// holding the GIL only queues and wakes).
    pub fn deliver(&self, members: &[Arc<Conn>], frames: &[(Arc<Frame>, u8)], direct: bool) -> u64 {
        let c = &self.counters;
        let mut d = direct.then(|| Direct::new(self.deflate_level, self.epoch));
        let mut frames_queued = 0u64;
        let mut logical = 0u64;
        let per_round_logical: u64 = frames.iter().map(|(f, _)| u64::from(f.logical)).sum();
        for (i, m) in members.iter().enumerate() {
            if let Some(ahead) = members.get(i + 2) {
                // Members live all over the heap: start loading a later one's hot lines.
                prefetch(Arc::as_ptr(ahead).cast::<u8>());
                prefetch(Arc::as_ptr(ahead).cast::<u8>().wrapping_add(64));
            }
            let q = m.push_all(frames, self.queue_bytes, c, d.as_mut()) as u64;
            frames_queued += q;
            logical += if q == frames.len() as u64 { per_round_logical } else { q };
        }
        if let Some(d) = d {
            d.finish(c, &self.hist.flush_lag);
        }
        metrics::add(&c.deliveries, frames_queued);
        metrics::add(&c.deliveries_logical, logical);
        (members.len() * frames.len()) as u64 - frames_queued
    }

    /// Merge a window's messages into batch frames of at most `merge_max` messages:
    /// `{"op":"batch","room":"…","msgs":[m1,m2,…]}`. A lone message goes out as itself.
    fn merge(&self, r: &Room, msgs: Vec<(Arc<Frame>, u8)>) -> Vec<(Arc<Frame>, u8)> {
        let max = r.opts.merge_max.max(1) as usize;
        let mut out = Vec::with_capacity(msgs.len() / max + 1);
        for group in msgs.chunks(max) {
            if group.len() == 1 {
                out.push(group[0].clone());
                continue;
            }
            let p = frames::batch(&r.name, group.iter().map(|(f, _)| f.payload()));
            let prio = group.iter().map(|(_, p)| *p).max().unwrap_or(PRIO_LOW);
            metrics::inc(&self.counters.batches);
            let born = group.iter().map(|(f, _)| f.born_us).filter(|b| *b > 0).min().unwrap_or(0);
            out.push((Frame::stamped(OP_TEXT, &p, self.min_deflate, group.len() as u32, born), prio));
        }
        out
    }

    /// Queue a frame to every connection of `user`. Returns how many got it.
    pub fn send_user(&self, user: &str, frame: &Arc<Frame>, prio: u8) -> usize {
        let conns = self.user_conns(user);
        self.deliver(&conns, &[(frame.clone(), prio)], false);
        conns.len()
    }

    /// Queue a frame to every connection on this node.
    pub fn broadcast(self: &Arc<Self>, frame: Arc<Frame>, prio: u8) -> usize {
        let all = Arc::new(self.all_conns());
        let n = all.len();
        match self.rt.get() {
            Some(h) => {
                let hub = self.clone();
                h.spawn(async move {
                    hub.fan_out(all, vec![(frame, prio)]).await;
                });
            }
            None => {
                self.deliver(&all, &[(frame, prio)], false);
            }
        }
        n
    }

    /// Microseconds since the engine started (never 0), stamped on frames.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    pub fn conn_count(&self) -> usize {
        self.counters.connections_current.load(Relaxed) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::PRIO_NORMAL;

    fn hub() -> Arc<Hub> {
        Arc::new(Hub::new(Arc::new(Counters::default()), 1 << 20, 64, usize::MAX, 5))
    }

    fn add(h: &Hub, id: u64, user: &str) -> Arc<Conn> {
        let c = Arc::new(Conn::new(id, Some(Arc::from(user)), None, None, 0));
        h.add_conn(c.clone());
        c
    }

    #[test]
    fn presence_counts_conns_and_distinct_users() {
        let h = hub();
        add(&h, 1, "a");
        add(&h, 2, "a");
        add(&h, 3, "b");
        for id in 1..=3 {
            assert_eq!(h.join(id, "live:1"), Join::Joined);
        }
        assert_eq!(h.join(1, "live:1"), Join::AlreadyMember);
        assert_eq!(h.join(99, "live:1"), Join::NoSuchConn);
        assert_eq!(h.room_counts("live:1"), (3, 2));
        assert!(h.leave(2, "live:1"));
        assert!(!h.leave(2, "live:1"));
        assert_eq!(h.room_counts("live:1"), (2, 2));
        assert_eq!(h.room_members("live:1", 0, 10).len(), 2);
        assert_eq!(h.counters.rooms_current.load(Relaxed), 1);
        let c1 = h.conn(1).unwrap();
        assert_eq!(h.remove_conn(&c1), vec!["live:1".to_string()]);
        h.leave(3, "live:1");
        assert_eq!(h.room_counts("live:1"), (0, 0));
        assert!(h.room("live:1").is_none(), "empty rooms are removed");
        assert_eq!(h.counters.rooms_current.load(Relaxed), 0);
    }

    #[test]
    fn join_capped_lets_the_app_go_past_the_per_connection_cap() {
        let h =
            Arc::new(Hub::new(Arc::new(Counters::default()), 1 << 20, 64, usize::MAX, 5).with_room_caps(2, usize::MAX));
        add(&h, 1, "u1");
        assert_eq!(h.join(1, "a:1"), Join::Joined);
        assert_eq!(h.join(1, "a:2"), Join::Joined);
        assert_eq!(h.join(1, "a:3"), Join::ConnRoomsFull);
        assert_eq!(h.join_capped(1, "a:3", 3), Join::Joined);
        assert_eq!(h.join_capped(1, "a:4", 3), Join::ConnRoomsFull);
        assert_eq!(h.join_capped(1, "a:3", 0), Join::AlreadyMember);
    }

    #[test]
    fn publish_queues_one_shared_frame_per_member_in_order() {
        let h = hub();
        let conns: Vec<_> = (0..200).map(|i| add(&h, i, &format!("u{i}"))).collect();
        for i in 0..200 {
            h.join(i, "r");
        }
        let f1 = Frame::text(b"one", usize::MAX);
        let f2 = Frame::text(b"two", usize::MAX);
        assert_eq!(h.publish("r", f1.clone(), PRIO_NORMAL), 200);
        h.publish("r", f2.clone(), PRIO_NORMAL);
        for c in &conns {
            let q = c.out.lock();
            assert_eq!(q.items.len(), 2);
            assert!(Arc::ptr_eq(&q.items[0].frame, &f1), "shared, not copied");
            assert!(Arc::ptr_eq(&q.items[1].frame, &f2));
        }
        assert_eq!(h.counters.deliveries.load(Relaxed), 400);
        assert_eq!(h.publish("nobody", f1, PRIO_NORMAL), 0);
    }

    #[test]
    fn deliveries_not_queued_are_counted_per_room() {
        let h = hub();
        let a = add(&h, 1, "a");
        add(&h, 2, "b");
        h.join(1, "live:d");
        h.join(2, "live:d");
        a.close(1000, "", true); // a closing connection takes nothing more
        h.publish("live:d", Frame::text(b"x", usize::MAX), PRIO_NORMAL);
        h.publish("live:d", Frame::text(b"y", usize::MAX), PRIO_NORMAL);
        assert_eq!(h.room_dropped("live:d"), 2);
        assert_eq!(h.counters.deliveries.load(Relaxed), 2);
        assert_eq!(h.room_dropped("nope"), 0);
    }

    #[test]
    fn large_rooms_split_into_equal_pieces_per_worker() {
        assert_eq!(split(5000, 2048, 2), (4, 1250));
        assert_eq!(split(4000, 2048, 2), (2, 2000));
        assert_eq!(split(10_000, 2048, 2), (6, 1667));
        assert_eq!(split(10_000, 2048, 4), (8, 1250));
        assert_eq!(split(5000, 2048, 1), (3, 1667));
        assert_eq!(split(3, 2048, 8), (3, 1), "never more pieces than members");
        for (n, chunk, w) in [(5000, 2048, 2), (12_345, 1000, 3), (100_000, 2048, 2)] {
            let (p, c) = split(n, chunk, w);
            assert!(c <= chunk && p * c >= n && (p - 1) * c < n, "{n} {chunk} {w}: {p} x {c}");
        }
    }

    #[test]
    fn merge_builds_batch_frames() {
        let h = hub();
        h.set_room_options("live:", RoomOptions { merge_ms: 50, merge_max: 2 });
        add(&h, 1, "a");
        h.join(1, "live:9");
        let r = h.room("live:9").unwrap();
        let msgs: Vec<_> = (0..3)
            .map(|i| (Frame::text(format!("{{\"op\":\"msg\",\"seq\":{i}}}").as_bytes(), usize::MAX), PRIO_NORMAL))
            .collect();
        let out = h.merge(&r, msgs);
        assert_eq!(out.len(), 2);
        let v: serde_json::Value = serde_json::from_slice(out[0].0.payload()).unwrap();
        assert_eq!(v["op"], "batch");
        assert_eq!(v["room"], "live:9");
        assert_eq!(v["msgs"].as_array().unwrap().len(), 2);
        assert_eq!(out[0].0.logical, 2);
        assert_eq!(out[1].0.payload(), b"{\"op\":\"msg\",\"seq\":2}");
    }

    #[test]
    fn send_user_reaches_every_connection_of_the_user() {
        let h = hub();
        let a1 = add(&h, 1, "alice");
        let a2 = add(&h, 2, "alice");
        let b = add(&h, 3, "bob");
        assert_eq!(h.send_user("alice", &Frame::text(b"x", usize::MAX), PRIO_NORMAL), 2);
        assert_eq!(a1.out.lock().items.len(), 1);
        assert_eq!(a2.out.lock().items.len(), 1);
        assert_eq!(b.out.lock().items.len(), 0);
        h.remove_conn(&a1);
        assert_eq!(h.user_conns("alice").len(), 1);
    }
}
