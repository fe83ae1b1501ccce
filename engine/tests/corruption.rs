//! A flipped byte in a stored record is an I/O error for that block only,
//! never wrong data, and it is counted.

mod common;

use ballast_engine::{Compression, EngineError, VolumeOptions};
use bytes::Bytes;
use common::{block, corrupt_record_of, Backend, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_an_error_not_wrong_data() {
    for compression in [Compression::None, Compression::Lz4] {
        let h = Harness::new(Backend::Sim);
        let e = h.open().await;
        let mut o = VolumeOptions::new(1 << 20);
        o.compression = compression;
        e.create_volume("v", o).await.unwrap();
        let v = e.open_volume("v").unwrap();
        let mut victim = block(99, 4096, 1);
        victim[..16].copy_from_slice(b"VICTIM-BLOCK-#1!");
        let other = block(100, 4096, 0);
        v.write(0, Bytes::from(victim.clone()), false)
            .await
            .unwrap();
        v.write(8192, Bytes::from(other.clone()), false)
            .await
            .unwrap();
        drop(v);
        e.shutdown().await.unwrap();
        drop(e);

        corrupt_record_of(&h, 0, &victim).await;

        let e = h.open().await;
        let v = e.open_volume("v").unwrap();
        let err = v.read(0, 4096).await.unwrap_err();
        assert!(matches!(err, EngineError::Checksum { .. }), "{err}");
        assert_eq!(&v.read(8192, 4096).await.unwrap().data[..], &other[..]);
        assert!(e.node_stats().checksum_errors >= 1);
        // A read spanning both fails as a whole rather than return bad bytes.
        assert!(v.read(0, 12288).await.is_err());
        e.shutdown().await.unwrap();
    }
}
