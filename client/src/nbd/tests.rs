//! Client tests against the in-process loopback server.

use bytes::Bytes;

use super::loopback::{Loopback, LoopbackConfig};
use super::*;

async fn server(cfg: LoopbackConfig) -> (Loopback, NbdClient) {
    let srv = Loopback::start(cfg).await.unwrap();
    let c = NbdClient::connect(&srv.uri()).await.unwrap();
    (srv, c)
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect::<Vec<u8>>()
        .into()
}

async fn round_trip(c: &NbdClient) {
    let data = pattern(64 * 1024, 7);
    c.write(4096, data.clone(), false).await.unwrap();
    assert_eq!(c.read(4096, data.len()).await.unwrap(), data);
    // A large write goes out as its own segment, not copied.
    let big = pattern(1 << 20, 9);
    c.write(1 << 20, big.clone(), true).await.unwrap();
    assert_eq!(c.read(1 << 20, big.len()).await.unwrap(), big);
    c.write_zeroes(4096, 8192, false).await.unwrap();
    let r = c.read(0, 16384).await.unwrap();
    assert!(r[..12288].iter().all(|&b| b == 0));
    assert_eq!(&r[12288..], &data[8192..12288]);
    c.trim(1 << 20, 4096).await.unwrap();
    c.flush().await.unwrap();
}

#[tokio::test]
async fn structured_round_trip_with_fragmented_and_reordered_replies() {
    let (_s, c) = server(LoopbackConfig {
        fragment_reads: true,
        reverse_batches: true,
        ..LoopbackConfig::default()
    })
    .await;
    assert!(c.negotiated().structured_replies);
    assert_eq!(c.negotiated().entered_by, "NBD_OPT_GO");
    assert_eq!(c.size(), 64 << 20);
    assert!(c.flags().can_multi_conn());
    round_trip(&c).await;
    let ext = c.block_status(0, 3 * 4096).await.unwrap();
    assert!(!ext.is_empty());
    assert!(ext[0].is_zero());
    c.disconnect().await.unwrap();
    assert!(!c.is_open());
    assert!(matches!(
        c.read(0, 512).await,
        Err(NbdError::Disconnected(_))
    ));
}

#[tokio::test]
async fn falls_back_to_export_name_and_simple_replies() {
    let (_s, c) = server(LoopbackConfig {
        go: false,
        structured: false,
        ..LoopbackConfig::default()
    })
    .await;
    assert_eq!(c.negotiated().entered_by, "NBD_OPT_EXPORT_NAME");
    assert!(!c.negotiated().structured_replies);
    round_trip(&c).await;
    assert!(matches!(
        c.block_status(0, 4096).await,
        Err(NbdError::Unsupported(_))
    ));
}

#[tokio::test]
async fn many_concurrent_requests_complete_by_handle() {
    let (_s, c) = server(LoopbackConfig {
        reverse_batches: true,
        ..LoopbackConfig::default()
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..256u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let d = pattern(4096, i as u8);
            c.write(i * 4096, d.clone(), false).await.unwrap();
            assert_eq!(c.read(i * 4096, 4096).await.unwrap(), d);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn errors_name_the_errno() {
    for structured in [true, false] {
        let (_s, c) = server(LoopbackConfig {
            structured,
            fail_at: Some(48 << 20),
            ..LoopbackConfig::default()
        })
        .await;
        let e = c.read(48 << 20, 512).await.unwrap_err();
        assert_eq!(e.errno(), Some(NbdErrno::Eio), "{e}");
        assert!(
            e.to_string().contains("NBD_CMD_READ") && e.to_string().contains("NBD_EIO"),
            "{e}"
        );
        let e = c
            .write((48 << 20) - 100, Bytes::from(vec![1u8; 512]), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), Some(NbdErrno::Eio));
        // The connection stays usable after a failed request.
        round_trip(&c).await;
        // Out of range is refused before anything is sent.
        let e = c.read(c.size() - 10, 512).await.unwrap_err();
        assert!(matches!(e, NbdError::InvalidRequest(_)), "{e}");
    }
}

#[tokio::test]
async fn refused_connection_and_bad_uri() {
    let e = NbdClient::connect("nbd://127.0.0.1:1/").await.unwrap_err();
    assert!(matches!(e, NbdError::Connect { .. }), "{e}");
    let e = NbdClient::connect("http://x").await.unwrap_err();
    assert!(matches!(e, NbdError::InvalidUri { .. }), "{e}");
}

#[tokio::test]
async fn dropping_the_client_closes_the_connection() {
    let (_s, c) = server(LoopbackConfig::default()).await;
    c.write(0, pattern(512, 1), false).await.unwrap();
    drop(c);
    // The server side sees NBD_CMD_DISC; nothing to assert beyond no hang/panic.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}
