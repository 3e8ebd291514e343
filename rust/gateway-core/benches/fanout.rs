//! Fan-out into member queues: the engine's per-delivery cost without sockets.
//! Each iteration queues one batch to every member, then drains the queues (as the
//! writers would) before the timer stops, so queues never fill up across iterations.
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway_core::conn::{Conn, Frame, PRIO_NORMAL};
use gateway_core::hub::Hub;
use gateway_core::metrics::Counters;

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for (members, batch) in [(5000usize, 1usize), (5000, 8), (10000, 1)] {
        let hub = Arc::new(Hub::new(Arc::new(Counters::default()), 1 << 20, 2048, usize::MAX, 5));
        let conns: Vec<Arc<Conn>> = (0..members as u64)
            .map(|i| {
                let c = Arc::new(Conn::new(i, Some(Arc::from(format!("u{i}").as_str())), None, None, 0));
                hub.add_conn(c.clone());
                hub.join(i, "live:bench");
                c
            })
            .collect();
        let frames: Vec<_> = (0..batch)
            .map(|i| {
                (
                    Frame::text(
                        format!("{{\"op\":\"msg\",\"seq\":{i},\"data\":{{\"text\":\"hello\"}}}}").as_bytes(),
                        usize::MAX,
                    ),
                    PRIO_NORMAL,
                )
            })
            .collect();
        g.throughput(Throughput::Elements((members * batch) as u64));
        g.bench_function(format!("{members}_members_x{batch}"), |b| {
            b.iter(|| {
                hub.deliver(&conns, &frames, false);
                for c in &conns {
                    let mut q = c.out.lock();
                    q.items.clear();
                    q.bytes = 0;
                    q.woken = false;
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
