//! The NBD client's pipeline: batches of 4 KiB reads and writes kept 32 deep
//! on one connection, against the in-process loopback server in null mode
//! (measures the client plus a trivial server) and against `nbdkit null`
//! when nbdkit is installed (Debian package `nbdkit`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ballast_client::nbd::loopback::{Loopback, LoopbackConfig};
use ballast_client::nbd::NbdClient;
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;

const OPS: usize = 2048;
const QD: usize = 32;

async fn reads(c: &NbdClient) {
    join_all((0..QD).map(|w| async move {
        let mut buf = BytesMut::zeroed(4096);
        for i in 0..OPS / QD {
            let off = (((w * 7919 + i * 104_729) % 16_384) * 4096) as u64;
            buf = c.read_into(off, buf).await.expect("read");
        }
    }))
    .await;
}

async fn writes(c: &NbdClient, data: &Bytes) {
    join_all((0..QD).map(|w| async move {
        for i in 0..OPS / QD {
            let off = (((w * 7919 + i * 104_729) % 16_384) * 4096) as u64;
            c.write(off, data.clone(), false).await.expect("write");
        }
    }))
    .await;
}

struct Kit(Child);
impl Drop for Kit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit_null() -> Option<(Kit, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("nbdkit")
        .args([
            "-f",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "null",
            "1G",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!(
            "nbdkit not found (Debian package nbdkit): skipping the nbdkit null pipeline bench"
        );
        return None;
    };
    let kit = Kit(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((kit, format!("nbd://127.0.0.1:{port}/")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn pipeline(c: &mut Criterion) {
    // The server gets its own runtime thread; the client runs on a
    // single-threaded runtime like `ballast bench`.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let loopback = server_rt
        .block_on(Loopback::start(LoopbackConfig {
            size: 64 << 20,
            null: true,
            ..LoopbackConfig::default()
        }))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kit = nbdkit_null();
    let mut targets = vec![("loopback_null", loopback.uri())];
    if let Some((_, uri)) = &kit {
        targets.push(("nbdkit_null", uri.clone()));
    }
    let data = Bytes::from(vec![0x5au8; 4096]);
    let mut g = c.benchmark_group("nbd_pipeline_qd32");
    g.throughput(Throughput::Elements(OPS as u64));
    g.sample_size(20);
    for (name, uri) in targets {
        let client = rt.block_on(NbdClient::connect(&uri)).unwrap();
        g.bench_function(format!("{name}/read4k"), |b| {
            b.to_async(&rt).iter(|| reads(&client))
        });
        g.bench_function(format!("{name}/write4k"), |b| {
            b.to_async(&rt).iter(|| writes(&client, &data))
        });
        rt.block_on(client.disconnect()).unwrap();
    }
    g.finish();
    drop(loopback);
    drop(kit);
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
