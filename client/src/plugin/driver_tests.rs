//! Driver tests against the in-memory control plane and host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::plugin::options::DEFAULT_SIZE;
use crate::plugin::testing::{volume, FakeControl, FakeHost};

struct Env {
    dir: tempfile::TempDir,
    control: FakeControl,
    host: FakeHost,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::new(&dir.path().join("attach"));
        Env {
            control: FakeControl::default(),
            host,
            dir,
        }
    }

    fn mount_root(&self) -> PathBuf {
        self.dir.path().join("mounts")
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.mount_root().join(name)
    }

    fn store(&self) -> StateStore {
        StateStore::new(self.dir.path().join("state"))
    }

    async fn driver(&self) -> Driver<FakeControl, FakeHost> {
        Driver::start(
            self.control.clone(),
            self.host.clone(),
            DriverConfig {
                mount_root: self.mount_root(),
                attach_root: self.dir.path().join("attach"),
                default_size: DEFAULT_SIZE,
                scope: "local".into(),
            },
            self.store(),
        )
        .await
        .unwrap()
    }
}

fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn create_refuses_bad_options_before_touching_anything() {
    let env = Env::new();
    let d = env.driver().await;
    for (o, want) in [
        (vec![("size", "lots")], "option size: invalid size \"lots\""),
        (vec![("color", "blue")], "unknown option \"color\""),
        (vec![("fs", "btrfs")], "pass ext4 or xfs"),
        (
            vec![("fs", "xfs")],
            "`mkfs.xfs` is not installed: install the xfsprogs package",
        ),
    ] {
        let e = d.create("v1", &opts(&o)).await.unwrap_err().to_string();
        assert!(e.contains(want), "{o:?}: {e}");
    }
    let e = d
        .create("../etc", &opts(&[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("invalid volume name \"../etc\""), "{e}");
    assert!(env.control.names().is_empty());
    assert!(env.host.log().is_empty());
}

#[tokio::test]
async fn create_makes_the_volume_and_remembers_the_fs() {
    let env = Env::new();
    let mut host = env.host.clone();
    host.have_xfs = true;
    let env = Env { host, ..env };
    let d = env.driver().await;
    d.create(
        "v1",
        &opts(&[
            ("size", "1G"),
            ("fs", "xfs"),
            ("dedup", "off"),
            ("block-size", "64K"),
        ]),
    )
    .await
    .unwrap();
    let v = env.control.volumes.lock().unwrap()["v1"].clone();
    assert_eq!(v.size_bytes, 1 << 30);
    assert!(!v.dedup);
    assert_eq!(v.block_size, 65536);
    assert_eq!(d.snapshot().await.volumes["v1"].fs, Fs::Xfs);
    // Saved, not only in memory.
    assert_eq!(env.store().load().unwrap().volumes["v1"].fs, Fs::Xfs);

    // Without options a volume gets the default size and ext4.
    d.create("v2", &opts(&[])).await.unwrap();
    assert_eq!(
        env.control.volumes.lock().unwrap()["v2"].size_bytes,
        DEFAULT_SIZE
    );
    assert_eq!(d.snapshot().await.volumes["v2"].fs, Fs::Ext4);
}

#[tokio::test]
async fn create_adopts_existing_volumes_and_refuses_contradictions() {
    let env = Env::new();
    env.control.insert(volume("old", 2 << 30));
    let mut snap = volume("snap", 2 << 30);
    snap.read_only = true;
    env.control.insert(snap);
    let d = env.driver().await;
    // Docker calls Create for volumes that exist; same or no options adopt.
    d.create("old", &opts(&[])).await.unwrap();
    d.create("old", &opts(&[("size", "2G")])).await.unwrap();
    assert_eq!(env.control.names(), vec!["old", "snap"]);
    let e = d
        .create("old", &opts(&[("size", "1G")]))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "Ballast volume \"old\" already exists with size 2G (asked 1G); drop those -o options \
         to use it as it is, or choose another name"
    );
    let e = d.create("snap", &opts(&[])).await.unwrap_err().to_string();
    assert!(e.contains("read-only Ballast snapshot"), "{e}");
    assert!(e.contains("ballast volume clone snap NEW"), "{e}");
}

#[tokio::test]
async fn create_reports_control_plane_errors() {
    let env = Env::new();
    let d = env.driver().await;
    let e = d
        .create("r", &opts(&[("replicas", "2")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("creating Ballast volume \"r\": 2 replicas requested"),
        "{e}"
    );
    *env.control.unreachable.lock().unwrap() = true;
    let e = d.create("x", &opts(&[])).await.unwrap_err().to_string();
    assert!(e.contains("cannot reach ballastd"), "{e}");
}

#[tokio::test]
async fn first_mount_formats_later_mounts_reuse_last_unmount_detaches() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[("size", "1G")])).await.unwrap();
    let mp = d.mount("v", "c1").await.unwrap();
    assert_eq!(mp, env.mountpoint("v"));
    let attach_dir = env.dir.path().join("attach/v");
    assert_eq!(
        env.host.log(),
        vec![
            "attach v".to_string(),
            format!("loop_attach {}", attach_dir.join("v").display()),
            "probe /dev/loop0".into(),
            "mkfs /dev/loop0 ext4".into(),
            format!("mount /dev/loop0 {} ext4", mp.display()),
        ]
    );
    assert_eq!(d.path("v").await.unwrap(), mp);

    // A second container: same mount, nothing new on the host.
    env.host.clear_log();
    assert_eq!(d.mount("v", "c2").await.unwrap(), mp);
    assert!(env.host.log().is_empty(), "{:?}", env.host.log());
    let rec = d.snapshot().await.volumes["v"].mount.clone().unwrap();
    assert_eq!(rec.ids.len(), 2);

    // The first leaves: still mounted.
    d.unmount("v", "c1").await.unwrap();
    assert!(env.host.log().is_empty());
    assert_eq!(d.path("v").await.unwrap(), mp);

    // The last leaves: unmount, loop device, detach — in that order.
    d.unmount("v", "c2").await.unwrap();
    assert_eq!(
        env.host.log(),
        vec![
            format!("unmount {}", mp.display()),
            "loop_detach /dev/loop0".into(),
            format!("detach {}", attach_dir.display()),
        ]
    );
    assert_eq!(d.path("v").await.unwrap(), PathBuf::new());
    assert!(d.snapshot().await.volumes["v"].mount.is_none());
    assert!(env.host.m.lock().unwrap().attachments.is_empty());

    // Mounting again does not format again.
    env.host.clear_log();
    d.mount("v", "c3").await.unwrap();
    assert_eq!(env.host.count("mkfs"), 0);
    assert_eq!(env.host.count("mount"), 1);
}

#[tokio::test]
async fn kernel_attach_uses_the_nbd_device_directly() {
    let env = Env::new();
    let mut host = env.host.clone();
    host.kernel = true;
    let env = Env { host, ..env };
    let d = env.driver().await;
    d.create("k", &opts(&[])).await.unwrap();
    let mp = d.mount("k", "c1").await.unwrap();
    assert_eq!(
        env.host.log(),
        vec![
            "attach k".to_string(),
            "probe /dev/nbd0".into(),
            "mkfs /dev/nbd0 ext4".into(),
            format!("mount /dev/nbd0 {} ext4", mp.display()),
        ]
    );
    env.host.clear_log();
    d.unmount("k", "c1").await.unwrap();
    assert_eq!(
        env.host.log(),
        vec![
            format!("unmount {}", mp.display()),
            "detach /dev/nbd0".into()
        ]
    );
}

#[tokio::test]
async fn unmount_edge_cases_are_harmless() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    // Not mounted: nothing to do.
    d.unmount("v", "nobody").await.unwrap();
    d.mount("v", "c1").await.unwrap();
    env.host.clear_log();
    // An ID that never mounted does not take the mount from c1.
    d.unmount("v", "stranger").await.unwrap();
    assert!(env.host.log().is_empty());
    assert!(d.snapshot().await.volumes["v"].mount.is_some());
}

#[tokio::test]
async fn remove_refuses_while_mounted_and_deletes_after() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    d.mount("v", "c1").await.unwrap();
    let e = d.remove("v").await.unwrap_err().to_string();
    assert!(e.starts_with("volume \"v\" is still mounted at"), "{e}");
    assert!(e.contains("(1 user)"), "{e}");
    assert!(e.contains("docker ps -a --filter volume=v"), "{e}");
    assert_eq!(env.control.names(), vec!["v"]);
    d.unmount("v", "c1").await.unwrap();
    d.remove("v").await.unwrap();
    assert!(env.control.names().is_empty());
    assert!(!d.snapshot().await.volumes.contains_key("v"));
    // Already deleted behind Docker's back: still removable.
    env.control.insert(volume("w", 1 << 30));
    d.create("w", &opts(&[])).await.unwrap();
    env.control.volumes.lock().unwrap().clear();
    d.remove("w").await.unwrap();
}

#[tokio::test]
async fn remove_releases_a_record_whose_mount_is_gone() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    let mp = d.mount("v", "c1").await.unwrap();
    // Docker lost the container (daemon crash) and an admin unmounted.
    env.host.external_umount(&mp);
    env.host.clear_log();
    d.remove("v").await.unwrap();
    assert_eq!(env.host.count("loop_detach"), 1);
    assert_eq!(env.host.count("detach"), 1);
    assert!(env.control.names().is_empty());
}

#[tokio::test]
async fn failed_mount_undoes_its_steps() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    env.host.fail_once("mkfs");
    let e = d.mount("v", "c1").await.unwrap_err().to_string();
    assert!(
        e.starts_with("making the filesystem for volume \"v\" failed:"),
        "{e}"
    );
    assert!(e.contains("injected mkfs failure"), "{e}");
    assert_eq!(env.host.count("loop_detach"), 1);
    assert_eq!(env.host.count("detach"), 1);
    assert!(d.snapshot().await.volumes["v"].mount.is_none());
    {
        let m = env.host.m.lock().unwrap();
        assert!(m.loops.is_empty() && m.attachments.is_empty() && m.mounts.is_empty());
    }
    // And the next try works.
    d.mount("v", "c1").await.unwrap();
}

#[tokio::test]
async fn failed_rollback_is_reported_and_finished_by_the_next_mount() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    env.host.fail_once("mount");
    env.host.fail_once("loop_detach");
    let e = d.mount("v", "c1").await.unwrap_err().to_string();
    assert!(e.starts_with("mounting for volume \"v\" failed:"), "{e}");
    assert!(
        e.contains("; undoing the earlier steps also failed: releasing the loop device"),
        "{e}"
    );
    // The record keeps what is left to undo ...
    let rec = d.snapshot().await.volumes["v"].mount.clone().unwrap();
    assert_eq!(rec.loop_device, Some("/dev/loop0".into()));
    assert!(!rec.mounted);
    // ... and the next Mount releases it before attaching again.
    env.host.clear_log();
    d.mount("v", "c1").await.unwrap();
    let log = env.host.log();
    assert_eq!(log[0], "loop_detach /dev/loop0");
    assert!(log[1].starts_with("detach "), "{log:?}");
    assert_eq!(log[2], "attach v");
    assert_eq!(env.host.count("mkfs"), 0, "formatted by the first try");
    assert_eq!(env.host.m.lock().unwrap().loops.len(), 1);
}

#[tokio::test]
async fn restarted_plugin_keeps_mounts_and_their_ids() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    let mp = d.mount("v", "c1").await.unwrap();
    d.mount("v", "c2").await.unwrap();
    drop(d);

    env.host.clear_log();
    let d = env.driver().await;
    assert!(
        env.host.log().is_empty(),
        "start changed nothing: {:?}",
        env.host.log()
    );
    // A new container reuses the mount: no second mount.
    assert_eq!(d.mount("v", "c3").await.unwrap(), mp);
    assert_eq!(env.host.count("attach"), 0);
    d.unmount("v", "c1").await.unwrap();
    d.unmount("v", "c2").await.unwrap();
    assert_eq!(env.host.count("unmount"), 0);
    d.unmount("v", "c3").await.unwrap();
    assert_eq!(env.host.count("unmount"), 1);
    assert_eq!(env.host.count("detach"), 1);
}

#[tokio::test]
async fn restarted_plugin_without_state_adopts_its_mounts() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    let mp = d.mount("v", "c1").await.unwrap();
    drop(d);
    std::fs::remove_file(env.store().path()).unwrap();

    env.host.clear_log();
    let d = env.driver().await;
    let rec = d.snapshot().await.volumes["v"].mount.clone().unwrap();
    assert!(rec.mounted && rec.ids.is_empty());
    assert_eq!(rec.loop_device, Some("/dev/loop0".into()));
    assert!(rec.attachment.is_some());
    // Not mounted twice (the fake host asserts that too).
    assert_eq!(d.mount("v", "c2").await.unwrap(), mp);
    assert_eq!(env.host.count("mount"), 0);
    // c1's ID was lost with the state; c2 is the last known user.
    d.unmount("v", "c2").await.unwrap();
    assert_eq!(env.host.count("unmount"), 1);
    assert_eq!(env.host.count("loop_detach"), 1);
    assert_eq!(env.host.count("detach"), 1);
}

#[tokio::test]
async fn restarted_plugin_releases_what_a_vanished_mount_left() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    let mp = d.mount("v", "c1").await.unwrap();
    drop(d);
    env.host.external_umount(&mp);
    // And a leaked FUSE attachment + loop device of another volume.
    env.host.attach("leak").await.unwrap();
    let leak_file = env.dir.path().join("attach/leak/leak");
    env.host.loop_attach(&leak_file).await.unwrap();

    env.host.clear_log();
    let d = env.driver().await;
    let mut log = env.host.log();
    log.sort();
    assert_eq!(
        log,
        vec![
            format!("detach {}", env.dir.path().join("attach/leak").display()),
            format!("detach {}", env.dir.path().join("attach/v").display()),
            "loop_detach /dev/loop0".to_string(),
            "loop_detach /dev/loop1".to_string(),
        ]
    );
    assert!(d.snapshot().await.volumes["v"].mount.is_none());
    let m = env.host.m.lock().unwrap();
    assert!(m.loops.is_empty() && m.attachments.is_empty());
}

#[tokio::test]
async fn mount_after_an_external_umount_mounts_again() {
    let env = Env::new();
    let d = env.driver().await;
    d.create("v", &opts(&[])).await.unwrap();
    let mp = d.mount("v", "c1").await.unwrap();
    env.host.external_umount(&mp);
    env.host.clear_log();
    assert_eq!(d.mount("v", "c2").await.unwrap(), mp);
    let log = env.host.log();
    assert_eq!(log[0], "loop_detach /dev/loop0", "{log:?}");
    assert_eq!(env.host.count("attach"), 1);
    assert_eq!(env.host.count("mount"), 1);
    assert_eq!(
        d.snapshot().await.volumes["v"].mount.clone().unwrap().ids,
        ["c2".to_string()].into()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mounts_of_one_volume_attach_once() {
    let env = Env::new();
    let mut host = env.host.clone();
    host.attach_delay = Duration::from_millis(50);
    let env = Env { host, ..env };
    let d = Arc::new(env.driver().await);
    d.create("v", &opts(&[])).await.unwrap();
    d.create("w", &opts(&[])).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let d = d.clone();
        let name = if i % 2 == 0 { "v" } else { "w" };
        tasks.push(tokio::spawn(async move {
            d.mount(name, &format!("c{i}")).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(env.host.count("attach"), 2);
    assert_eq!(env.host.count("mount"), 2);
    let st = d.snapshot().await;
    assert_eq!(st.volumes["v"].mount.as_ref().unwrap().ids.len(), 4);
    assert_eq!(st.volumes["w"].mount.as_ref().unwrap().ids.len(), 4);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let d = d.clone();
        let name = if i % 2 == 0 { "v" } else { "w" };
        tasks.push(tokio::spawn(async move {
            d.unmount(name, &format!("c{i}")).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(env.host.count("unmount"), 2);
    assert!(env.host.m.lock().unwrap().mounts.is_empty());
}

#[tokio::test]
async fn get_and_list_report_volumes_and_mountpoints() {
    let env = Env::new();
    let mut snap = volume("snap", 1 << 30);
    snap.read_only = true;
    env.control.insert(snap);
    let d = env.driver().await;
    d.create("a", &opts(&[("size", "1G")])).await.unwrap();
    d.create("b", &opts(&[])).await.unwrap();
    let mp = d.mount("a", "c1").await.unwrap();
    let list = d.list().await.unwrap();
    let names: Vec<_> = list.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, vec!["a", "b"], "snapshots are not listed");
    assert_eq!(list[0].mountpoint, mp.display().to_string());
    assert_eq!(list[1].mountpoint, "");
    assert!(list[0].status.is_empty());

    let g = d.get("a").await.unwrap();
    assert_eq!(g.mountpoint, mp.display().to_string());
    assert_eq!(g.created_at, "2023-11-14T22:13:20Z");
    assert_eq!(g.status["size"], serde_json::json!(1u64 << 30));
    assert_eq!(g.status["fs"], serde_json::json!("ext4"));
    assert_eq!(g.status["mounts"], serde_json::json!(1));
    assert_eq!(g.status["attach"], serde_json::json!("fuse"));
    assert_eq!(g.status["device"], serde_json::json!("/dev/loop0"));
    let e = d.get("nope").await.unwrap_err().to_string();
    assert!(e.starts_with("no Ballast volume named \"nope\""), "{e}");

    // ballastd down: the mounted volume is still reported, the other is an
    // error that says what is wrong.
    *env.control.unreachable.lock().unwrap() = true;
    let g = d.get("a").await.unwrap();
    assert_eq!(g.mountpoint, mp.display().to_string());
    assert!(g.status["control_plane"]
        .as_str()
        .unwrap()
        .starts_with("unreachable: cannot reach ballastd"));
    let e = d.get("b").await.unwrap_err().to_string();
    assert!(
        e.starts_with("looking up Ballast volume \"b\": cannot reach"),
        "{e}"
    );
    let e = d.list().await.unwrap_err().to_string();
    assert!(
        e.starts_with("listing Ballast volumes: cannot reach"),
        "{e}"
    );
}

#[tokio::test]
async fn mount_of_a_volume_created_outside_docker_uses_ext4() {
    let env = Env::new();
    env.control.insert(volume("outside", 1 << 30));
    let d = env.driver().await;
    d.mount("outside", "c1").await.unwrap();
    assert_eq!(env.host.count("mkfs"), 1);
    assert!(env
        .host
        .log()
        .iter()
        .any(|l| l.ends_with(" ext4") && l.starts_with("mkfs")));
    let e = d.mount("missing", "c1").await.unwrap_err().to_string();
    assert!(e.starts_with("no Ballast volume named \"missing\""), "{e}");
}

#[test]
fn names_are_checked() {
    for ok in ["v", "db-1", "a.b_c", "0abc"] {
        assert!(validate_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", ".", "..", "-x", "a/b", "a b", &"x".repeat(129)] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn a_volume_holding_another_filesystem_is_mounted_as_what_it_holds() {
    let env = Env::new();
    env.control.insert(volume("old", 1 << 30));
    env.host
        .m
        .lock()
        .unwrap()
        .filesystems
        .insert("old".into(), "xfs".into());
    let d = env.driver().await;
    d.create("old", &opts(&[])).await.unwrap();
    let mp = d.mount("old", "c1").await.unwrap();
    assert_eq!(
        env.host.count("mkfs"),
        0,
        "never format a device with a signature"
    );
    assert!(
        env.host
            .log()
            .contains(&format!("mount /dev/loop0 {} xfs", mp.display())),
        "{:?}",
        env.host.log()
    );
}
