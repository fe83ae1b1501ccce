//! The container image: built FROM scratch around the static binaries, run
//! with Docker, used over NBD from the host.

use ballast_e2e::*;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const IMAGE: &str = "ballast:dev";

fn docker(args: &[&str]) -> std::process::Output {
    run(&mut cmd("docker", args), Duration::from_secs(300))
}

fn docker_ok(args: &[&str]) -> String {
    run_ok(&mut cmd("docker", args), Duration::from_secs(300))
}

fn require_docker() {
    require("docker", "docker.io");
    let out = docker(&["info", "--format", "{{.ServerVersion}}"]);
    assert!(
        out.status.success(),
        "the Docker daemon is not reachable (`docker info` failed; start dockerd): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Build ballast:dev once per test process with scripts/build-image.sh,
/// in this test's target folder.
fn build_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let started = Instant::now();
        let mut c = Command::new(workspace_root().join("scripts/build-image.sh"));
        c.arg(IMAGE)
            .current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", target_dir());
        // The script runs cargo; give it the outer cargo's environment minus
        // the per-test variables.
        let cargo = cargo_command();
        for (k, v) in cargo.get_envs() {
            match v {
                None => {
                    c.env_remove(k);
                }
                Some(v) => {
                    c.env(k, v);
                }
            }
        }
        if let Some(dir) = std::env::var_os("CARGO") {
            let dir = std::path::PathBuf::from(dir);
            if let Some(parent) = dir.parent() {
                let path = std::env::var_os("PATH").unwrap_or_default();
                let mut paths = vec![parent.to_path_buf()];
                paths.extend(std::env::split_paths(&path));
                c.env("PATH", std::env::join_paths(paths).unwrap());
            }
        }
        run_ok(&mut c, Duration::from_secs(2400));
        eprintln!("[e2e] built {IMAGE} in {:.0?}", started.elapsed());
    });
}

/// A running container, removed (with its anonymous volume) on drop.
struct Container {
    name: String,
    nbd_port: u16,
    api_port: u16,
}

impl Container {
    fn run(tag: &str, extra_docker_args: &[&str], extra_ballastd_args: &[&str]) -> Container {
        let name = format!("ballast-e2e-{tag}-{}", std::process::id());
        let _ = docker(&["rm", "-f", "-v", &name]);
        let nbd_port = free_port();
        let api_port = free_port();
        let p1 = format!("127.0.0.1:{nbd_port}:10809");
        let p2 = format!("127.0.0.1:{api_port}:7800");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "-p",
            &p1,
            "-p",
            &p2,
            "--health-interval=1s",
            "--health-start-period=60s",
        ];
        args.extend_from_slice(extra_docker_args);
        args.push(IMAGE);
        args.extend_from_slice(extra_ballastd_args);
        // the guard first, so a failed start is still cleaned up
        let c = Container {
            name: name.clone(),
            nbd_port,
            api_port,
        };
        docker_ok(&args);
        c.wait_healthy();
        c
    }

    fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
            .trim()
            .to_string()
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn wait_healthy(&self) {
        let mut status = String::new();
        let ok = wait_until(Duration::from_secs(90), || {
            status = self.inspect("{{.State.Status}} {{.State.Health.Status}}");
            status == "running healthy" || status.starts_with("exited")
        });
        assert!(
            ok && status == "running healthy",
            "container {} is not healthy ({status}); logs:\n{}",
            self.name,
            tail(&self.logs(), 30)
        );
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["exec", self.name.as_str()];
        a.extend_from_slice(args);
        docker_ok(&a)
    }

    fn uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.nbd_port)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} logs -----\n{}", self.name, tail(&self.logs(), 40));
        }
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

#[test]
fn image_is_static_and_small() {
    require_docker();
    build_image();
    let size: u64 = docker_ok(&["image", "inspect", "-f", "{{.Size}}", IMAGE])
        .trim()
        .parse()
        .unwrap();
    assert!(size < 200 * MIB, "image is {size} bytes");
    let cfg = docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Entrypoint}}|{{json .Config.Volumes}}|{{json .Config.ExposedPorts}}|{{json .Config.Healthcheck}}",
        IMAGE,
    ]);
    for want in [
        "\"/usr/bin/ballastd\"",
        "\"--data\",\"/var/lib/ballast\"",
        "\"0.0.0.0:10809\"",
        "\"0.0.0.0:7800\"",
        "/var/lib/ballast",
        "10809/tcp",
        "7800/tcp",
        "\"node\",\"info\"",
    ] {
        assert!(cfg.contains(want), "image config lacks {want}: {cfg}");
    }
    // FROM scratch: exactly the two binaries (and no shell).
    let root = docker_ok(&["create", IMAGE]);
    let id = root.trim();
    let out = docker(&["export", id]);
    let _ = docker(&["rm", "-v", id]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("fs.tar");
    std::fs::write(&tar, &out.stdout).unwrap();
    let list = run_ok(
        &mut cmd("tar", ["-tf", tar.to_str().unwrap()]),
        Duration::from_secs(60),
    );
    assert!(
        list.contains("usr/bin/ballastd") && list.contains("usr/bin/ballast\n"),
        "{list}"
    );
    assert!(!list.contains("bin/sh"), "the image has a shell: {list}");
}

#[test]
fn container_serves_nbd_with_thread_pool_fallback() {
    require_docker();
    require_nbd_tools();
    build_image();
    // io_uring denied as Docker's default profile does since Engine 25:
    // a profile that allows everything but the three io_uring syscalls
    // (older engines, like Debian 12's docker.io 20.10, still allow them).
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("no-io-uring.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["io_uring_setup","io_uring_enter","io_uring_register"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let c = Container::run("noring", &["--security-opt", &opt], &[]);

    // The CLI inside the container, against the container's API.
    let out = c.exec(&["ballast", "volume", "create", "v", "--size", "1G"]);
    assert!(out.contains('v'), "{out}");
    let info = c.exec(&["ballast", "node", "info", "--json"]);
    let info: Json = serde_json::from_str(&info).expect("node info --json");
    assert_eq!(
        info["io_backend"], "threads",
        "io_uring should be blocked: {info}"
    );
    let logs = c.logs();
    assert!(
        logs.contains("io_uring is unavailable") && logs.contains("thread-pool"),
        "the logs do not mention the thread-pool fallback:\n{}",
        tail(&logs, 20)
    );

    // The host talks NBD to it through the published port.
    let src = dir.path().join("r");
    let data = random_file(&src, 64 * MIB as usize, 77);
    nbdcopy(&["--flush", src.to_str().unwrap(), &c.uri("v")]);
    let back = read_export(&c.uri("v"), data.len());
    assert_same("data through the container", &back, &data);
    run_ok(
        &mut cmd(
            "qemu-img",
            [
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                src.to_str().unwrap(),
                &c.uri("v"),
            ],
        ),
        Duration::from_secs(300),
    );

    // The host's CLI reaches the published API as well.
    let out = run_ok(
        &mut cmd(
            bin("ballast").to_str().unwrap(),
            [
                "--api".to_string(),
                format!("http://127.0.0.1:{}", c.api_port),
                "volume".to_string(),
                "list".to_string(),
            ],
        ),
        Duration::from_secs(60),
    );
    assert!(out.contains('v'), "{out}");

    // docker stop sends SIGTERM: exit code 0; data survives a restart.
    docker_ok(&["stop", "-t", "60", &c.name]);
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "{}",
        tail(&c.logs(), 20)
    );
    docker_ok(&["start", &c.name]);
    c.wait_healthy();
    let back = read_export(&c.uri("v"), data.len());
    assert_same("data after docker stop/start", &back, &data);
}

#[test]
fn container_default_seccomp_profile() {
    require_docker();
    require_nbd_tools();
    build_image();
    // Docker's own default profile: whichever backend it allows, the node
    // works, says which one it uses, and logs the fallback if it fell back.
    let c = Container::run("default", &[], &["--log-format", "json"]);
    c.exec(&["ballast", "volume", "create", "d", "--size", "256M"]);
    let info: Json = serde_json::from_str(&c.exec(&["ballast", "node", "info", "--json"])).unwrap();
    let backend = info["io_backend"].as_str().unwrap_or("").to_string();
    let logs = c.logs();
    match backend.as_str() {
        "threads" => assert!(
            logs.contains("io_uring is unavailable"),
            "fell back without saying so:\n{}",
            tail(&logs, 20)
        ),
        "io_uring" => {
            eprintln!("[e2e] this Docker engine's default seccomp profile allows io_uring")
        }
        other => panic!("io_backend {other:?}: {info}"),
    }
    // --log-format json: every log line is a JSON object
    for l in logs.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Json>(l).is_ok(),
            "not a JSON log line: {l}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("r");
    let data = random_file(&src, 16 * MIB as usize, 78);
    nbdcopy(&["--flush", src.to_str().unwrap(), &c.uri("d")]);
    assert_same("data", &read_export(&c.uri("d"), data.len()), &data);

    // With seccomp unconfined io_uring is available (the documented way in).
    let u = Container::run("unconfined", &["--security-opt", "seccomp=unconfined"], &[]);
    let info: Json = serde_json::from_str(&u.exec(&["ballast", "node", "info", "--json"])).unwrap();
    assert_eq!(
        info["io_backend"], "io_uring",
        "seccomp=unconfined should allow io_uring: {info}"
    );
}
