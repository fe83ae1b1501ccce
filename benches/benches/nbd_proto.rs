//! NBD wire encoding and decoding: request headers into a batch buffer, and
//! reply headers (simple and structured) out of a receive buffer.

use ballast_client::nbd::proto::{self, cmd, reply_type, Decoded, ReplyHeader, Request};
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

const BATCH: usize = 32;

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_encode");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    g.bench_function("read_request_x32", |b| {
        b.iter(|| {
            buf.clear();
            for i in 0..BATCH as u64 {
                Request {
                    flags: 0,
                    kind: cmd::READ,
                    handle: black_box(i << 32 | i),
                    offset: black_box(i * 4096),
                    length: 4096,
                }
                .encode(&mut buf);
            }
            black_box(buf.len())
        })
    });
    let payload = vec![0xa5u8; 4096];
    g.throughput(Throughput::Bytes(
        (BATCH * (proto::REQUEST_LEN + 4096)) as u64,
    ));
    g.bench_function("write_request_4k_x32", |b| {
        b.iter(|| {
            buf.clear();
            for i in 0..BATCH as u64 {
                Request {
                    flags: 0,
                    kind: cmd::WRITE,
                    handle: black_box(i),
                    offset: black_box(i * 4096),
                    length: 4096,
                }
                .encode(&mut buf);
                buf.extend_from_slice(&payload);
            }
            black_box(buf.len())
        })
    });
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_decode");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut simple = BytesMut::new();
    let mut structured = BytesMut::new();
    for i in 0..BATCH as u64 {
        ReplyHeader::encode_simple(0, i, &mut simple);
        ReplyHeader::encode_structured(
            proto::REPLY_FLAG_DONE,
            reply_type::OFFSET_DATA,
            i,
            8 + 4096,
            &mut structured,
        );
    }
    for (name, buf) in [("simple_x32", &simple), ("structured_x32", &structured)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut at = 0;
                let mut sum = 0u64;
                while let Decoded::Header(h, n) = ReplyHeader::decode(black_box(&buf[at..])) {
                    sum = sum.wrapping_add(h.handle());
                    at += n;
                }
                black_box(sum)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
