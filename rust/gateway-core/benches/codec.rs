//! Frame parse and encode: the per-message cost of the sans-I/O codec.
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway_core::protocol::deflate::deflate;
use gateway_core::protocol::frame::{encode, encode_client, Decoder, DecoderConfig, OP_TEXT};

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for size in [32usize, 512, 8192] {
        let payload = vec![b'x'; size];
        // 64 masked frames in one buffer, as one read would return them.
        let mut buf = Vec::new();
        for _ in 0..64 {
            buf.extend(encode_client(OP_TEXT, true, &payload, [1, 2, 3, 4]));
        }
        g.throughput(Throughput::Elements(64));
        g.bench_function(format!("64x{size}B_text"), |b| {
            let mut dec = Decoder::new(DecoderConfig::default(), None);
            let mut out = Vec::with_capacity(64);
            b.iter_batched_ref(
                || buf.clone(),
                |input| {
                    out.clear();
                    dec.decode(input, &mut out).unwrap();
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn encode_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for size in [32usize, 512, 8192] {
        let payload = vec![b'x'; size];
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{size}B"), |b| b.iter(|| encode(OP_TEXT, false, std::hint::black_box(&payload))));
    }
    let chat = br#"{"op":"msg","room":"live:42","seq":121,"epoch":"k3j9","type":"chat","prio":1,"from":"u1","data":{"text":"hello everyone, this is a chat line of typical size"},"ts":1732262400123}"#;
    g.bench_function("deflate_chat_once", |b| b.iter(|| deflate(std::hint::black_box(chat), 15, 5)));
    g.finish();
}

criterion_group!(benches, parse, encode_frames);
criterion_main!(benches);
