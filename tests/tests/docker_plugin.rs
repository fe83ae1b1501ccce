//! `ballast plugin docker` against the real Docker engine: a ballastd on
//! free ports, the plugin on its own socket in /run/docker/plugins (so Docker
//! discovers it under a unique driver name), a tiny busybox image imported
//! offline, and containers that write and read Ballast volumes.
//!
//! Skipped, saying why, when the Docker daemon is not reachable.
//!
//! Volume names have more than one character on purpose: the Docker CLI
//! reads `-v v:/data` as a Windows drive letter (`v:`) and makes an
//! anonymous local volume at "v:/data" instead.

use ballast_e2e::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DOCKER_TIMEOUT: Duration = Duration::from_secs(300);

fn docker(args: &[&str]) -> Output {
    run(&mut cmd("docker", args), DOCKER_TIMEOUT)
}

fn docker_ok(args: &[&str]) -> String {
    run_ok(&mut cmd("docker", args), DOCKER_TIMEOUT)
}

/// Print a skip notice straight to stderr: `eprintln!` would be captured
/// by the test harness and hidden in a passing run.
fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// True when the Docker daemon answers; otherwise prints why the test is
/// skipped.
fn docker_available(test: &str) -> bool {
    if Command::new("docker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        skip(
            test,
            "the docker client is not installed (apt-get install docker.io)",
        );
        return false;
    }
    let out = docker(&["info", "--format", "{{.ServerVersion}}"]);
    if !out.status.success() {
        skip(
            test,
            &format!(
                "the Docker daemon is not reachable (`docker info` failed: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
        return false;
    }
    true
}

/// A busybox image built offline: a rootfs holding Debian's static
/// /bin/busybox and its applet links, `docker import`ed. Removed on drop.
struct Image {
    tag: String,
}

impl Image {
    fn build(tag: &str) -> Image {
        require("busybox", "busybox-static");
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file(),
            "/bin/busybox is missing: apt-get install busybox-static"
        );
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("rootfs/bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy(busybox, bin.join("busybox")).unwrap();
        for applet in [
            "sh", "cat", "cp", "dd", "echo", "ls", "md5sum", "mkdir", "rm", "sleep", "sync",
            "test", "touch", "wc", "seq", "true", "head",
        ] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        for d in ["data", "in", "tmp", "proc", "sys", "dev", "etc"] {
            fs::create_dir_all(dir.path().join("rootfs").join(d)).unwrap();
        }
        let tar = dir.path().join("rootfs.tar");
        run_ok(
            &mut cmd(
                "tar",
                [
                    "-C",
                    dir.path().join("rootfs").to_str().unwrap(),
                    "-cf",
                    tar.to_str().unwrap(),
                    ".",
                ],
            ),
            Duration::from_secs(60),
        );
        let _ = docker(&["rmi", "-f", tag]);
        docker_ok(&["import", tar.to_str().unwrap(), tag]);
        let img = Image { tag: tag.into() };
        // A dynamically linked busybox (Debian's `busybox` package) cannot
        // run in an empty rootfs: say so instead of failing obscurely later.
        let out = docker(&["run", "--rm", tag, "true"]);
        assert!(
            out.status.success(),
            "the imported busybox does not run ({}); /bin/busybox must be static: \
             apt-get install busybox-static",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        img
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.tag]);
    }
}

/// `ballast plugin docker` on /run/docker/plugins/NAME.sock with its own
/// mount root, attach root and state directories. On drop, removes the
/// test's containers and volumes, stops the plugin and releases anything
/// still mounted, loop-attached or attached under its directories.
struct Plugin {
    name: String,
    api: String,
    tmp: tempfile::TempDir,
    child: Option<Child>,
    label: String,
}

impl Plugin {
    fn start(node: &Node, name: &str) -> Plugin {
        require_root("the plugin mounts filesystems and sets up loop devices");
        require("losetup", "mount");
        require("mkfs.ext4", "e2fsprogs");
        require("fusermount3", "fuse3");
        let tmp = tempfile::Builder::new()
            .prefix("ballast-plugin-")
            .tempdir()
            .unwrap();
        let mut p = Plugin {
            name: name.into(),
            api: node.api_url(),
            label: format!("ballast-e2e={name}"),
            tmp,
            child: None,
        };
        p.spawn();
        p
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/docker/plugins/{}.sock", self.name))
    }

    fn mount_root(&self) -> PathBuf {
        self.tmp.path().join("mounts")
    }

    fn attach_root(&self) -> PathBuf {
        self.tmp.path().join("attach")
    }

    fn attach_state(&self) -> PathBuf {
        self.tmp.path().join("attach-state")
    }

    fn log_path(&self) -> PathBuf {
        self.tmp.path().join("plugin.log")
    }

    fn log(&self) -> String {
        let mut s = fs::read_to_string(self.log_path()).unwrap_or_default();
        if let Ok(rd) = fs::read_dir(self.attach_state().join("logs")) {
            for e in rd.flatten() {
                s.push_str(&format!(
                    "\n--- {}:\n{}",
                    e.path().display(),
                    tail(&fs::read_to_string(e.path()).unwrap_or_default(), 20)
                ));
            }
        }
        s
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(bin("ballast"))
            .env("BALLAST_STATE_DIR", self.attach_state())
            .env("RUST_LOG", "info")
            .arg("--api")
            .arg(&self.api)
            .args(["plugin", "docker", "--socket"])
            .arg(self.socket())
            .arg("--mount-root")
            .arg(self.mount_root())
            .arg("--attach-root")
            .arg(self.attach_root())
            .arg("--state-dir")
            .arg(self.tmp.path().join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ballast plugin docker");
        self.child = Some(child);
        let sock = self.socket();
        let up = wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        if !up {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            panic!(
                "the plugin did not serve {} within 30 s (exited: {exited:?}); log:\n{}",
                sock.display(),
                tail(&self.log(), 30)
            );
        }
    }

    /// SIGTERM: the plugin must exit 0 and remove its socket.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the plugin did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "the plugin exited with {status} after SIGTERM; log:\n{}",
            tail(&self.log(), 30)
        );
        assert!(!self.socket().exists(), "the plugin left its socket behind");
    }

    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// `docker run --rm --label L -v VOL:/data [more...] IMAGE sh -c SCRIPT`.
    fn run(&self, image: &Image, volume: &str, more: &[&str], script: &str) -> Output {
        let vol = format!("{volume}:/data");
        let mut args = vec!["run", "--rm", "--label", &self.label, "-v", &vol];
        args.extend_from_slice(more);
        args.extend_from_slice(&[&image.tag, "sh", "-c", script]);
        docker(&args)
    }

    fn run_ok(&self, image: &Image, volume: &str, more: &[&str], script: &str) -> Vec<u8> {
        let out = self.run(image, volume, more, script);
        assert!(
            out.status.success(),
            "container on {volume} failed ({}): {}\nplugin log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            tail(&self.log(), 30)
        );
        out.stdout
    }

    fn volume_create(&self, name: &str, opts: &[&str]) -> Output {
        let mut args = vec!["volume", "create", "--driver", self.name.as_str()];
        for o in opts {
            args.push("-o");
            args.push(o);
        }
        args.push(name);
        docker(&args)
    }

    fn inspect(&self, volume: &str) -> Json {
        let out = docker_ok(&["volume", "inspect", volume]);
        let v: Json = serde_json::from_str(&out).expect("inspect JSON");
        v[0].clone()
    }

    /// What the host still holds on the plugin's behalf.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = self.tmp.path().to_str().unwrap();
        for line in mountinfo.lines() {
            if let Some(mp) = line.split(' ').nth(4) {
                if mp.starts_with(root) {
                    found.push(format!("mount {mp}"));
                }
            }
        }
        for l in loops_under(&self.attach_root()) {
            found.push(format!("loop {l}"));
        }
        if let Ok(rd) = fs::read_dir(self.attach_state()) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.ends_with(".json") {
                    found.push(format!("attachment {n}"));
                }
            }
        }
        found
    }
}

/// Loop devices whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
                if Path::new(b.trim()).starts_with(dir) {
                    out.push(format!("/dev/{name}"));
                }
            }
        }
    }
    out
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- plugin {} log -----\n{}\n-----",
                self.name,
                tail(&self.log(), 60)
            );
        }
        // Containers first (they hold mounts), then volumes while the plugin
        // still serves, then the plugin.
        let filter = format!("label={}", self.label);
        let ids = docker(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        let filter = format!("driver={}", self.name);
        let vols = docker(&["volume", "ls", "-q", "--filter", &filter]);
        for v in String::from_utf8_lossy(&vols.stdout).split_whitespace() {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = wait_until(Duration::from_secs(10), || {
                c.try_wait().ok().flatten().is_some()
            });
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(self.socket());
        // Whatever a failed test left behind.
        if let Ok(rd) = fs::read_dir(self.mount_root()) {
            for e in rd.flatten() {
                let _ = Command::new("umount").arg("-l").arg(e.path()).status();
            }
        }
        for l in loops_under(&self.attach_root()) {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        if let Ok(rd) = fs::read_dir(self.attach_root()) {
            for e in rd.flatten() {
                let _ = Command::new(bin("ballast"))
                    .env("BALLAST_STATE_DIR", self.attach_state())
                    .arg("detach")
                    .arg(e.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(e.path())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn ballast_volumes(node: &Node) -> Vec<String> {
    let v = node.cli_json(&["volume", "list"]);
    v.as_array()
        .expect("volume list is an array")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn unique(what: &str) -> String {
    format!("ballast-e2e-{what}-{}", std::process::id())
}

/// Plugin names are fixed, not per run: dockerd keeps every volume plugin it
/// has talked to until it restarts and retries dead ones on each volume
/// lookup, so a new name per run would pile up stale drivers and slow every
/// later `docker build`/`run` on the machine down to a crawl.
fn plugin_name(what: &str) -> String {
    format!("ballast-e2e-{what}")
}

#[test]
fn docker_volume_lifecycle() {
    if !docker_available("docker_volume_lifecycle") {
        return;
    }
    let node = Node::start_with(&["--disk", "{dir}/disk0.img:4G"]);
    let mut plugin = Plugin::start(&node, &plugin_name("life"));
    let image = Image::build(&format!("{}:busybox", unique("img-life")));

    // Bad options are refused at create, with the reason, and create nothing.
    for (opt, want) in [
        (
            "size=12Q",
            "option size: invalid size \"12Q\": unknown unit \"Q\"",
        ),
        (
            "fs=btrfs",
            "invalid value \"btrfs\" for option fs: pass ext4 or xfs",
        ),
        (
            "color=blue",
            "unknown option \"color\"; valid options are size",
        ),
        (
            "dedup=maybe",
            "invalid value \"maybe\" for option dedup: pass on or off",
        ),
    ] {
        let out = plugin.volume_create("bad", &[opt]);
        assert!(!out.status.success(), "-o {opt} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "-o {opt}: {err}");
    }
    assert!(ballast_volumes(&node).is_empty());

    // Create: a Ballast volume with the options asked for.
    let out = plugin.volume_create("lifevol", &["size=1G", "dedup=off", "compression=none"]);
    assert!(
        out.status.success(),
        "docker volume create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = node.cli_json(&["volume", "info", "lifevol"]);
    assert_eq!(info["size"], GIB);
    assert_eq!(info["dedup"], false);
    assert_eq!(info["compression"], "none");

    // ls and inspect show it, with Ballast's details.
    let ls = docker_ok(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(
        ls.lines().any(|l| l == format!("{} lifevol", plugin.name)),
        "docker volume ls:\n{ls}"
    );
    let ins = plugin.inspect("lifevol");
    assert_eq!(ins["Driver"], plugin.name.as_str());
    assert_eq!(ins["Scope"], "local");
    assert_eq!(ins["Mountpoint"], "");
    assert_eq!(ins["Status"]["size"], GIB);
    assert_eq!(ins["Status"]["fs"], "ext4");

    // A container writes bytes from the host; a second one reads them back.
    let input = tempfile::tempdir().unwrap();
    let data = random_file(&input.path().join("blob"), 3 * MIB as usize + 123, 11);
    let bind = format!("{}:/in:ro", input.path().display());
    plugin.run_ok(
        &image,
        "lifevol",
        &["-v", &bind],
        "mkdir -p /data/dir && cp /in/blob /data/dir/blob && echo hello > /data/hello && sync",
    );
    assert!(
        plugin.leftovers().is_empty(),
        "the last container left, so everything must be released: {:?}",
        plugin.leftovers()
    );
    let got = plugin.run_ok(&image, "lifevol", &[], "cat /data/dir/blob");
    assert_same("blob read back by a second container", &got, &data);
    let got = plugin.run_ok(&image, "lifevol", &[], "cat /data/hello");
    assert_eq!(got, b"hello\n");

    // Two containers at once share one mount; inspect shows the mountpoint.
    let filter_label = format!("--label={}", plugin.label);
    let long = |name: &str| {
        let vol = "lifevol:/data".to_string();
        docker_ok(&[
            "run",
            "-d",
            "--name",
            name,
            &filter_label,
            "-v",
            &vol,
            &image.tag,
            "sh",
            "-c",
            "while true; do echo tick >> /data/ticks; sleep 0.2; done",
        ]);
    };
    let c1 = unique("c1");
    let c2 = unique("c2");
    long(&c1);
    long(&c2);
    let mountpoint = plugin.mount_root().canonicalize().unwrap().join("lifevol");
    let ins = plugin.inspect("lifevol");
    assert_eq!(ins["Mountpoint"], mountpoint.to_str().unwrap());
    assert_eq!(ins["Status"]["mounts"], 2);
    let mounts_of_v = || {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == mountpoint.to_str())
            .count()
    };
    assert_eq!(mounts_of_v(), 1, "one mount for two containers");

    // The plugin restarts under running containers: it finds its mount
    // again (no second mount, IDs kept), and the last container out still
    // unmounts and detaches.
    plugin.restart();
    assert!(
        plugin.log().contains("mount found again"),
        "plugin log:\n{}",
        tail(&plugin.log(), 10)
    );
    assert_eq!(mounts_of_v(), 1);
    docker_ok(&["rm", "-f", &c1]);
    assert_eq!(mounts_of_v(), 1, "c2 still uses the volume");
    let got = plugin.run_ok(&image, "lifevol", &[], "test -s /data/ticks && echo ok");
    assert_eq!(got, b"ok\n");
    assert_eq!(mounts_of_v(), 1);
    docker_ok(&["rm", "-f", &c2]);
    assert_eq!(mounts_of_v(), 0);
    assert!(
        plugin.leftovers().is_empty(),
        "leftovers: {:?}",
        plugin.leftovers()
    );

    // fs=xfs: the container sees an xfs filesystem.
    require("mkfs.xfs", "xfsprogs");
    let out = plugin.volume_create("xfsvol", &["size=1G", "fs=xfs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(plugin.inspect("xfsvol")["Status"]["fs"], "xfs");
    let got = plugin.run_ok(
        &image,
        "xfsvol",
        &[],
        "echo x > /data/x && sync && while read dev mp fs rest; do            if [ \"$mp\" = /data ]; then echo $fs; fi; done < /proc/mounts",
    );
    assert_eq!(String::from_utf8_lossy(&got).trim(), "xfs");
    docker_ok(&["volume", "rm", "xfsvol"]);

    // rm deletes the Ballast volume.
    docker_ok(&["volume", "rm", "lifevol"]);
    assert!(
        !ballast_volumes(&node).contains(&"lifevol".to_string()),
        "{:?}",
        ballast_volumes(&node)
    );
    let ls = docker_ok(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("driver={}", plugin.name),
    ]);
    assert!(ls.trim().is_empty(), "docker volume ls still shows: {ls}");

    plugin.stop();
}

#[test]
fn container_keeps_writing_across_a_ballastd_restart() {
    if !docker_available("container_keeps_writing_across_a_ballastd_restart") {
        return;
    }
    let mut node = Node::start_with(&["--disk", "{dir}/disk0.img:4G"]);
    let plugin = Plugin::start(&node, &plugin_name("restart"));
    let image = Image::build(&format!("{}:busybox", unique("img-restart")));
    let out = plugin.volume_create("restartvol", &["size=1G"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The writer: 60 files of 256 KiB with their checksums, a marker after
    // the tenth so the test restarts ballastd in the middle, then a final
    // sync — which must succeed once ballastd is back.
    let name = unique("writer");
    let label = format!("--label={}", plugin.label);
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        &label,
        "-v",
        "restartvol:/data",
        &image.tag,
        "sh",
        "-c",
        "i=0; while [ $i -lt 60 ]; do \
           dd if=/dev/urandom of=/data/f$i bs=64k count=4 2>/dev/null || exit 2; \
           md5sum /data/f$i >> /data/sums || exit 3; \
           if [ $i -eq 10 ]; then sync; echo started; fi; \
           i=$((i+1)); sleep 0.1; \
         done; sync || exit 4; echo finished; echo done > /data/done; sync || exit 5",
    ]);
    let started = wait_until(Duration::from_secs(120), || {
        String::from_utf8_lossy(&docker(&["logs", &name]).stdout).contains("started")
    });
    assert!(
        started,
        "the writer did not start: {:?}",
        docker(&["logs", &name])
    );

    // SIGTERM (exit 0 asserted), down for two seconds, back on the same
    // ports and data.
    node.stop();
    std::thread::sleep(Duration::from_secs(2));
    node.restart();

    let out = docker_ok(&["wait", &name]);
    let logs = docker(&["logs", &name]);
    assert_eq!(
        out.trim(),
        "0",
        "the writer failed across the restart: stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(String::from_utf8_lossy(&logs.stdout).contains("finished"));
    docker_ok(&["rm", &name]);

    // A new container on the unmounted, re-attached volume: every file
    // matches its checksum.
    let got = plugin.run_ok(
        &image,
        "restartvol",
        &[],
        "cd /data && cat done && md5sum -c sums >/dev/null && wc -l < sums",
    );
    let got = String::from_utf8_lossy(&got);
    let mut lines = got.lines();
    assert_eq!(lines.next(), Some("done"), "{got}");
    assert_eq!(lines.next().map(str::trim), Some("60"), "{got}");
    assert!(
        plugin.leftovers().is_empty(),
        "leftovers: {:?}",
        plugin.leftovers()
    );
    docker_ok(&["volume", "rm", "restartvol"]);
    assert!(ballast_volumes(&node).is_empty());
}
