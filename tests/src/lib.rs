//! Helpers for end-to-end tests that run the real binaries against real clients.
//!
//! * [`Node`]: a `ballastd` on free loopback ports with its own data folder,
//!   killed on drop; `stop()` (SIGTERM, exit 0 asserted), `kill9()`, `restart()`.
//! * [`require`]: fail (never skip) when a client tool is missing, naming the
//!   Debian package that provides it.
//! * [`run`]: run a command with a time limit and capture its output.
//! * [`python`]: run a libnbd script with `/usr/bin/python3` (Debian's python,
//!   where `python3-libnbd` installs the `nbd` module).
//! * [`raw`]: a minimal hand-written NBD client for hostile-client tests.
//!
//! The binaries are the workspace's own: on first use the helpers run
//! `cargo build --workspace --bins` in the same profile and target folder as
//! the running test (cargo does not build a dependency's binaries for
//! another package's tests), so a test never runs a stale `ballastd`. Set
//! `BALLAST_BIN_DIR` to use prebuilt binaries instead.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use serde_json::Value as Json;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Debian's python: `python3-libnbd` installs `nbd` for it, not for a pyenv
/// or venv python that may come first on PATH.
pub const PYTHON: &str = "/usr/bin/python3";

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where a build for the running test puts its outputs.
struct BuildLayout {
    target_dir: PathBuf,
    triple: Option<String>,
    profile_dir: PathBuf,
    profile: String,
}

fn build_layout() -> BuildLayout {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/[<triple>/]<profile>/deps/<test>-<hash>
    let mut dir = exe.parent().expect("test exe has a parent").to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let profile_dir = dir.clone();
    let dir_name = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let profile = match dir_name.as_str() {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    };
    let parent = profile_dir
        .parent()
        .expect("profile dir has a parent")
        .to_path_buf();
    // A --target build nests one more level; the target folder is the one
    // cargo tags with CACHEDIR.TAG.
    let (target_dir, triple) = if parent.join("CACHEDIR.TAG").exists() || parent.parent().is_none()
    {
        (parent, None)
    } else if parent
        .parent()
        .is_some_and(|p| p.join("CACHEDIR.TAG").exists())
    {
        let triple = parent
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string);
        (parent.parent().unwrap().to_path_buf(), triple)
    } else {
        (parent, None)
    };
    BuildLayout {
        target_dir,
        triple,
        profile_dir,
        profile,
    }
}

/// A `cargo` command with the variables cargo sets for a running test
/// removed, so a nested build sees what the outer `cargo test` saw.
pub fn cargo_command() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                k.as_str(),
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            cmd.env_remove(&k);
        }
    }
    cmd.current_dir(workspace_root());
    cmd
}

/// The folder holding `ballastd` and `ballast`, built on first use.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("BALLAST_BIN_DIR") {
            let d = PathBuf::from(d);
            for b in ["ballastd", "ballast"] {
                assert!(
                    d.join(b).is_file(),
                    "BALLAST_BIN_DIR={} has no {b}",
                    d.display()
                );
            }
            return d;
        }
        let l = build_layout();
        let mut cmd = cargo_command();
        // The same package selection as `cargo build --release --bins` (what
        // .ci/run and the acceptance scripts run): feature unification then
        // matches, and this build is a no-op after theirs.
        cmd.args(["build", "--profile", &l.profile, "--workspace", "--bins"]);
        if let Some(t) = &l.triple {
            cmd.args(["--target", t]);
        }
        cmd.env("CARGO_TARGET_DIR", &l.target_dir);
        let started = Instant::now();
        let out = run(&mut cmd, Duration::from_secs(1800));
        assert!(
            out.status.success(),
            "building ballastd/ballast failed ({:?}):\n{}",
            cmd,
            tail(&String::from_utf8_lossy(&out.stderr), 40)
        );
        if started.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "[e2e] built ballastd/ballast ({}) in {:.0?}",
                l.profile,
                started.elapsed()
            );
        }
        l.profile_dir
    })
}

/// Path of a workspace binary (`ballastd` or `ballast`).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} does not exist", p.display());
    p
}

/// The target folder of the running test (for builds the tests start).
pub fn target_dir() -> PathBuf {
    build_layout().target_dir
}

// ---------------------------------------------------------------------------
// Tools and commands
// ---------------------------------------------------------------------------

fn find_in_path(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Fail the test (never skip it) when `tool` is missing, naming the Debian
/// package to install. `.ci/run` installs all of them.
pub fn require(tool: &str, debian_package: &str) {
    if find_in_path(tool).is_none() {
        panic!(
            "`{tool}` is required by this test but is not installed: \
             run `apt-get install {debian_package}` (.ci/run does)"
        );
    }
}

/// Fail unless `/usr/bin/python3` can `import nbd` (package python3-libnbd).
pub fn require_python_nbd() {
    require(PYTHON, "python3");
    let out = run(
        Command::new(PYTHON).args(["-c", "import nbd"]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "`{PYTHON} -c 'import nbd'` failed: run `apt-get install python3-libnbd` (.ci/run does): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Fail unless running as root (loop devices and mounts need it).
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test must run as root: {why}");
}

/// The libnbd tools every NBD test uses.
pub fn require_nbd_tools() {
    require("nbdinfo", "libnbd-bin");
    require("nbdcopy", "libnbd-bin");
    require("qemu-img", "qemu-utils");
}

/// Run `cmd` to completion with captured output; kill it and fail the test
/// after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    run_reporting(cmd, timeout, |_| String::new())
}

/// [`run`], and when `cmd` hangs, `report(its pid)` (taken before it is
/// killed) goes into the failure message: what a rare hang was waiting on.
pub fn run_reporting(
    cmd: &mut Command,
    timeout: Duration,
    report: impl FnOnce(u32) -> String,
) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let ho = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let he = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let report = report(child.id());
            let _ = child.kill();
            let _ = child.wait();
            let stdout = ho.join().unwrap_or_default();
            let stderr = he.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout: {}\nstderr: {}\n{report}",
                tail(&String::from_utf8_lossy(&stdout), 20),
                tail(&String::from_utf8_lossy(&stderr), 20)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: ho.join().unwrap_or_default(),
        stderr: he.join().unwrap_or_default(),
    }
}

/// [`run`], asserting success; returns stdout as text.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let out = run(cmd, timeout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 20),
        tail(&String::from_utf8_lossy(&out.stderr), 30)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What each thread of process `pid` is doing: name, state, kernel wait
/// channel and kernel stack (the stack needs root, which CI has).
pub fn threads_report(pid: u32) -> String {
    let mut out = format!("threads of pid {pid}:\n");
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out + "  (gone)\n";
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat_state(&stat).unwrap_or_default();
        out += &format!(
            "  {} {} state {state} wchan {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim()
        );
        for line in read("stack").lines().take(12) {
            out += &format!("      {line}\n");
        }
    }
    out
}

/// Every thread's user-space backtrace of process `pid`, from gdb where it
/// is installed (`.ci/run` installs it): the kernel stacks of
/// [`threads_report`] end where a thread runs or waits in user space.
pub fn user_stacks(pid: u32) -> String {
    if find_in_path("gdb").is_none() {
        return "(no user-space stacks: gdb is not installed)\n".into();
    }
    let out = run(
        Command::new("gdb").args([
            "-batch",
            "-nx",
            "-p",
            &pid.to_string(),
            "-ex",
            "thread apply all bt 30",
        ]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // gdb's banner and symbol-loading chatter precede the first thread.
    let stacks = text.find("\nThread ").map_or(&*text, |i| &text[i + 1..]);
    format!("user-space stacks of pid {pid}:\n{stacks}\n")
}

/// The state letter of a /proc/PID/stat line: the first field after the
/// parenthesised name (which may itself hold spaces and parentheses).
fn stat_state(stat: &str) -> Option<&str> {
    stat.rsplit_once(')')?.1.split_whitespace().next()
}

/// Every process in uninterruptible sleep, system-wide (a hung `sync` or a
/// FUSE request nobody answers shows up here).
pub fn blocked_processes() -> String {
    let mut out = String::from("processes in D state:\n");
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat_state(&stat) == Some("D") {
            // pid and (name), before the state.
            let head = stat.rsplit_once(')').map_or("", |(h, _)| h);
            out += &format!("  {head})\n");
        }
    }
    out
}

/// Shorthand: a command from a program and arguments.
pub fn cmd<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run a Python script with Debian's python3 and the libnbd bindings; the
/// script gets [`PY_PRELUDE`] prepended and `args` as `sys.argv[1:]`.
/// Returns stdout; fails the test with the script's traceback.
pub fn python(script: &str, args: &[&str]) -> String {
    let full = format!("{PY_PRELUDE}\n{script}");
    let out = run(
        Command::new(PYTHON).arg("-c").arg(full).args(args),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "python libnbd script failed ({}) with {args:?}:\n{}\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 20),
        tail(&String::from_utf8_lossy(&out.stderr), 30)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Helpers available to every [`python`] script.
pub const PY_PRELUDE: &str = r#"
import nbd, os, sys, errno, random
def conn(uri, meta=True):
    h = nbd.NBD()
    h.set_strict_mode(0)          # let the server, not libnbd, judge bad requests
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h
def expect_err(what, f, *names):
    try:
        f()
    except nbd.Error as e:
        assert e.errno in names, "%s: got %s (%s), want one of %s" % (what, e.errno, e.string, names)
        return e.errno
    raise AssertionError(what + " succeeded but must fail with " + "/".join(names))
def extents(h, length, offset, flags=0):
    out = []
    def cb(ctx, off, ents, err):
        if ctx == "base:allocation":
            out.append((off, list(ents)))
        return 0
    h.block_status(length, offset, cb, flags)
    assert len(out) == 1, "want exactly one base:allocation chunk, got %d" % len(out)
    off, ents = out[0]
    assert off == offset, (off, offset)
    pairs = [(ents[i], ents[i + 1]) for i in range(0, len(ents), 2)]
    assert pairs, "block status returned no extent"
    assert all(l > 0 for l, _ in pairs), "zero-length extent: %r" % pairs
    return pairs
"#;

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

/// Deterministic incompressible bytes (splitmix64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Write `len` random bytes to `path`, returning them.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    fs::write(path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    data
}

/// Assert two byte strings are equal, reporting the first difference
/// instead of dumping megabytes.
#[track_caller]
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: contents differ (got {} bytes, want {} bytes, first difference at offset {first})",
        got.len(),
        want.len()
    );
}

/// Copy with `nbdcopy` (source and destination: files, `-`, NBD URIs).
pub fn nbdcopy(args: &[&str]) {
    run_ok(&mut cmd("nbdcopy", args), Duration::from_secs(600));
}

/// Read the first `len` bytes of an export with nbdcopy.
pub fn read_export(uri: &str, len: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("out");
    File::create(&f).expect("create");
    nbdcopy(&[uri, f.to_str().unwrap()]);
    let mut v = fs::read(&f).expect("read back");
    assert!(
        v.len() >= len,
        "export {uri} is {} bytes, want at least {len}",
        v.len()
    );
    v.truncate(len);
    v
}

/// True when every byte is zero.
pub fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// A loopback port that was free a moment ago and that this process has not
/// handed out before.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let p = l.local_addr().unwrap().port();
        if given.lock().unwrap().insert(p) {
            return p;
        }
    }
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Poll `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------

/// A `ballastd` process with its own temporary data folder and loopback
/// ports. Dropping it SIGKILLs the process (and prints the log tail when the
/// test is failing).
pub struct Node {
    dir: tempfile::TempDir,
    /// The `--data` folder.
    pub data: PathBuf,
    pub nbd_port: u16,
    pub api_port: u16,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    /// A node with one 2 GiB sparse disk file.
    pub fn start() -> Node {
        Node::start_with(&["--disk", "{dir}/disk0.img:2G"])
    }

    /// A node with extra `ballastd` arguments; `{dir}` in them becomes the
    /// node's temporary folder. Without a `--disk`, ballastd makes its
    /// default 16 GiB sparse disk.
    pub fn start_with(extra: &[&str]) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("ballast-e2e-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        let dir_s = dir.path().to_str().expect("utf-8 temp path").to_string();
        let args = extra.iter().map(|a| a.replace("{dir}", &dir_s)).collect();
        let log = dir.path().join("ballastd.log");
        let mut n = Node {
            data,
            nbd_port: free_port(),
            api_port: free_port(),
            args,
            child: None,
            log,
            dir,
        };
        n.spawn();
        n
    }

    /// The node's temporary folder (holds `data/`, the disk file and the log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        self.spawn_no_wait();
        self.wait_ready(Duration::from_secs(90));
    }

    fn spawn_no_wait(&mut self) {
        assert!(self.child.is_none(), "ballastd is already running");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        writeln!(log, "===== [e2e] starting ballastd {:?}", self.args).unwrap();
        let mut cmd = Command::new(bin("ballastd"));
        cmd.arg("--data")
            .arg(&self.data)
            .arg("--listen-nbd")
            .arg(format!("127.0.0.1:{}", self.nbd_port))
            .arg("--listen-api")
            .arg(format!("127.0.0.1:{}", self.api_port))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        self.child = Some(child);
    }

    /// Start ballastd on the node's data and SIGKILL it `after` later,
    /// whatever it is doing then (recovering, say).
    pub fn start_and_kill9_after(&mut self, after: Duration) {
        if self.is_running() {
            panic!("start_and_kill9_after() needs a stopped node");
        }
        self.child = None;
        self.spawn_no_wait();
        thread::sleep(after);
        self.kill9();
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut nbd_ok = false;
        let mut api_ok = false;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "ballastd exited during start-up ({st}); log:\n{}",
                    tail(&self.log(), 30)
                );
            }
            nbd_ok = nbd_ok || port_open(self.nbd_port);
            api_ok = api_ok || port_open(self.api_port);
            if nbd_ok && api_ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "ballastd did not listen on NBD {} (up: {nbd_ok}) and API {} (up: {api_ok}) \
                     within {timeout:?}; log:\n{}",
                    self.nbd_port,
                    self.api_port,
                    tail(&self.log(), 30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of the running ballastd.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("ballastd is not running").id() as i32
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().unwrap().is_none(),
        }
    }

    /// Everything ballastd logged (all runs).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`, for `ballast --api`.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, name)
    }

    /// Run `ballast --api URL ARGS...` (60 s limit). A hang fails with the
    /// threads of the CLI and of ballastd (kernel and, with gdb, user-space
    /// stacks), the blocked processes and ballastd's log. What it found
    /// once: CLI calls stuck in `exec` for 60 s, closing a FUSE file they
    /// inherited from this process while another test's ballastd was down.
    pub fn cli(&self, args: &[&str]) -> Output {
        let server = self.child.as_ref().map(Child::id);
        run_reporting(
            Command::new(bin("ballast"))
                .arg("--api")
                .arg(self.api_url())
                .args(args),
            Duration::from_secs(60),
            |cli| {
                let mut r = threads_report(cli);
                r += &user_stacks(cli);
                if let Some(pid) = server {
                    r += &format!("ballastd: {}", threads_report(pid));
                    r += &user_stacks(pid);
                }
                r += &blocked_processes();
                r + &format!("ballastd log:\n{}", tail(&self.log(), 40))
            },
        )
    }

    /// [`Node::cli`], asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`ballast {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Node::cli_ok`] with `--json` appended, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Json {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "`ballast {}` printed invalid JSON ({e}): {out}",
                a.join(" ")
            )
        })
    }

    /// `ballast volume create NAME --size SIZE [more...]`.
    pub fn create_volume(&self, name: &str, size: &str, more: &[&str]) {
        let mut a = vec!["volume", "create", name, "--size", size];
        a.extend_from_slice(more);
        self.cli_ok(&a);
    }

    /// `ballast node info --json`.
    pub fn node_info(&self) -> Json {
        self.cli_json(&["node", "info"])
    }

    /// Send `sig` to ballastd.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// SIGKILL ballastd and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Send `sig` and wait for the exit status (fails after `timeout`).
    pub fn terminate(&mut self, sig: i32, timeout: Duration) -> ExitStatus {
        self.signal(sig);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "ballastd did not exit within {timeout:?} of signal {sig}; log:\n{}",
                    tail(&self.log(), 30)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: ballastd must finish, flush and exit 0.
    pub fn stop(&mut self) {
        let st = self.terminate(libc::SIGTERM, Duration::from_secs(60));
        assert!(
            st.success(),
            "ballastd exited with {st} after SIGTERM (want 0); log:\n{}",
            tail(&self.log(), 30)
        );
    }

    /// Replace the extra arguments for the next [`Node::restart`] (`{dir}`
    /// is the node's temporary folder, as for [`Node::start_with`]).
    pub fn set_args(&mut self, extra: &[&str]) {
        let dir_s = self.dir.path().to_str().unwrap().to_string();
        self.args = extra.iter().map(|a| a.replace("{dir}", &dir_s)).collect();
    }

    /// Start ballastd again on the same data folder, disks and ports.
    pub fn restart(&mut self) {
        if self.is_running() {
            panic!("restart() needs a stopped node: call stop() or kill9() first");
        }
        self.child = None;
        self.spawn();
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM, VmSize, ...).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- ballastd log (nbd {}, api {}) -----\n{}\n-----",
                self.nbd_port,
                self.api_port,
                tail(&self.log(), 40)
            );
        }
        self.kill9();
    }
}

// ---------------------------------------------------------------------------
// Guards for mounts, loop devices and FUSE
// ---------------------------------------------------------------------------

/// A `nbdfuse` process serving `<dir>/disk`; unmounted and killed on drop.
pub struct Fuse {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Fuse {
    /// Run `nbdfuse DIR/disk URI` and wait for the file to appear.
    pub fn mount(dir: &Path, uri: &str) -> Fuse {
        require("nbdfuse", "libnbd-bin");
        require("fusermount3", "fuse3");
        fs::create_dir_all(dir).unwrap();
        let file = dir.join("disk");
        let child = Command::new("nbdfuse")
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nbdfuse");
        let mut f = Fuse {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let ok = wait_until(Duration::from_secs(20), || {
            fs::metadata(&file).map(|m| m.len() > 0).unwrap_or(false)
        });
        if !ok {
            let exited = f.child.as_mut().unwrap().try_wait().unwrap();
            panic!(
                "nbdfuse did not present {} (exited: {exited:?})",
                file.display()
            );
        }
        f
    }

    /// The file that is the NBD export.
    pub fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// Unmount and wait for nbdfuse to exit (so all its requests are done).
    pub fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let out = run(
            Command::new("fusermount3").arg("-u").arg(&self.dir),
            Duration::from_secs(60),
        );
        let exited = wait_until(Duration::from_secs(60), || {
            child.try_wait().unwrap().is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            out.status.success() && exited,
            "fusermount3 -u {} failed ({}; nbdfuse exited: {exited}): {}",
            self.dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
            thread::sleep(Duration::from_millis(200));
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loop device over a file; detached on drop.
pub struct Loop {
    pub dev: String,
    attached: bool,
}

impl Loop {
    /// `losetup -f --show [-r] FILE`.
    pub fn attach(file: &Path, read_only: bool) -> Loop {
        require("losetup", "mount");
        let mut c = Command::new("losetup");
        c.arg("-f").arg("--show");
        if read_only {
            c.arg("-r");
        }
        c.arg(file);
        let dev = run_ok(&mut c, Duration::from_secs(60)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop {
            dev,
            attached: true,
        }
    }

    /// `losetup -d` (asserting success).
    pub fn detach(&mut self) {
        if self.attached {
            self.attached = false;
            run_ok(
                Command::new("losetup").arg("-d").arg(&self.dev),
                Duration::from_secs(60),
            );
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A mounted filesystem; lazily unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `mount [-o OPTS] DEV DIR`.
    pub fn new(dev: &str, dir: &Path, opts: Option<&str>) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let mut c = Command::new("mount");
        if let Some(o) = opts {
            c.args(["-o", o]);
        }
        c.arg(dev).arg(dir);
        run_ok(&mut c, Duration::from_secs(60));
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// `umount DIR` (asserting success).
    pub fn unmount(&mut self) {
        if self.mounted {
            self.mounted = false;
            run_ok(
                Command::new("umount").arg(&self.dir),
                Duration::from_secs(120),
            );
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------
// A raw NBD client for hostile-client tests
// ---------------------------------------------------------------------------

/// Just enough NBD (fixed newstyle, simple replies) to send well-formed and
/// malformed requests byte by byte. Real clients are used for everything
/// else.
pub mod raw {
    use std::io::{self, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_GO: u32 = 7;

    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
    pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_FLAG_FUA: u16 = 1;

    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;

    /// A TCP connection to 127.0.0.1:`port` with 10 s read/write timeouts.
    pub fn tcp(port: u16) -> io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn u16_at(b: &[u8]) -> u16 {
        u16::from_be_bytes(b[..2].try_into().unwrap())
    }
    fn u32_at(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }
    fn u64_at(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    /// Read the server greeting; returns the handshake flags.
    pub fn greeting(s: &mut TcpStream) -> io::Result<u16> {
        let mut b = [0u8; 18];
        s.read_exact(&mut b)?;
        if u64_at(&b) != NBDMAGIC || u64_at(&b[8..]) != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad greeting {b:02x?}"),
            ));
        }
        Ok(u16_at(&b[16..]))
    }

    /// Encode an option request.
    pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// One option reply: (option, reply type, data).
    pub fn option_reply(s: &mut TcpStream) -> io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        if u64_at(&h) != OPT_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option reply magic {h:02x?}"),
            ));
        }
        let len = u32_at(&h[16..]) as usize;
        if len > 1 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option reply of {len} bytes"),
            ));
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        Ok((u32_at(&h[8..]), u32_at(&h[12..]), data))
    }

    /// A connection in the transmission phase (simple replies only).
    pub struct Conn {
        pub s: TcpStream,
        pub size: u64,
        pub flags: u16,
        pub cookie: u64,
    }

    /// Greeting, client flags and the GO data for `export` (no info requests).
    pub fn go_bytes(export: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(OPT_GO, &d)
    }

    /// Full fixed-newstyle handshake with NBD_OPT_GO.
    pub fn handshake(port: u16, export: &str) -> io::Result<Conn> {
        let mut s = tcp(port)?;
        let flags = greeting(&mut s)?;
        let client = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        s.write_all(&client.to_be_bytes())?;
        s.write_all(&go_bytes(export))?;
        let mut size = None;
        let mut tflags = 0;
        loop {
            let (opt, typ, data) = option_reply(&mut s)?;
            if opt != OPT_GO {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply for option {opt}, want GO"),
                ));
            }
            match typ {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && u16_at(&data) == 0 => {
                    size = Some(u64_at(&data[2..]));
                    tflags = u16_at(&data[10..]);
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(io::Error::other(format!(
                        "GO {export:?} refused: reply type {t:#x} {:?}",
                        String::from_utf8_lossy(&data)
                    )))
                }
                t => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected GO reply type {t:#x}"),
                    ))
                }
            }
        }
        let size = size.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "GO succeeded without INFO_EXPORT",
            )
        })?;
        Ok(Conn {
            s,
            size,
            flags: tflags,
            cookie: 1,
        })
    }

    /// Encode a request header.
    pub fn request(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&typ.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    impl Conn {
        pub fn next_cookie(&mut self) -> u64 {
            self.cookie += 1;
            self.cookie
        }

        /// Send a request header and payload.
        pub fn send(
            &mut self,
            flags: u16,
            typ: u16,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) -> io::Result<u64> {
            let c = self.next_cookie();
            let mut v = request(flags, typ, c, offset, len).to_vec();
            v.extend_from_slice(payload);
            self.s.write_all(&v)?;
            Ok(c)
        }

        /// A simple reply header: (error, cookie).
        pub fn reply(&mut self) -> io::Result<(u32, u64)> {
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h)?;
            if u32_at(&h) != SIMPLE_REPLY_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply magic {h:02x?}"),
                ));
            }
            Ok((u32_at(&h[4..]), u64_at(&h[8..])))
        }

        fn expect_reply(&mut self, cookie: u64) -> io::Result<u32> {
            let (err, c) = self.reply()?;
            if c != cookie {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply cookie {c}, want {cookie}"),
                ));
            }
            Ok(err)
        }

        /// WRITE; returns the NBD error (0 = success).
        pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u32> {
            let f = if fua { CMD_FLAG_FUA } else { 0 };
            let c = self.send(f, CMD_WRITE, offset, data.len() as u32, data)?;
            self.expect_reply(c)
        }

        /// READ; `Err(errno)` inside for an NBD error.
        pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
            self.read_flags(0, offset, len)
        }

        /// READ with command flags.
        pub fn read_flags(
            &mut self,
            flags: u16,
            offset: u64,
            len: u32,
        ) -> io::Result<Result<Vec<u8>, u32>> {
            let c = self.send(flags, CMD_READ, offset, len, &[])?;
            let err = self.expect_reply(c)?;
            if err != 0 {
                return Ok(Err(err));
            }
            let mut v = vec![0u8; len as usize];
            self.s.read_exact(&mut v)?;
            Ok(Ok(v))
        }

        /// FLUSH; returns the NBD error.
        pub fn flush(&mut self) -> io::Result<u32> {
            let c = self.send(0, CMD_FLUSH, 0, 0, &[])?;
            self.expect_reply(c)
        }

        /// A command with no payload; returns the NBD error.
        pub fn command(&mut self, flags: u16, typ: u16, offset: u64, len: u32) -> io::Result<u32> {
            let c = self.send(flags, typ, offset, len, &[])?;
            self.expect_reply(c)
        }

        /// NBD_CMD_DISC and close.
        pub fn disconnect(mut self) {
            let _ = self.send(0, CMD_DISC, 0, 0, &[]);
            let _ = self.s.shutdown(Shutdown::Both);
        }
    }

    /// Wait up to `within` for the peer to close `s` (EOF or reset),
    /// discarding what it sends. True when it closed.
    pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }
}

/// A background process (nbdkit, ...) killed on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Start `cmd` with output discarded.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let c = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        ChildGuard(c)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nbdkit -f -p PORT memory SIZE` on a free port; returns the guard and
/// the export's URI.
pub fn nbdkit_memory(size: &str) -> (ChildGuard, String) {
    require("nbdkit", "nbdkit");
    let port = free_port();
    let g = ChildGuard::spawn(&mut cmd(
        "nbdkit",
        [
            "-f".to_string(),
            "-i".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            port.to_string(),
            "memory".to_string(),
            size.to_string(),
        ],
    ));
    assert!(
        wait_until(Duration::from_secs(20), || port_open(port)),
        "nbdkit did not listen on {port}"
    );
    (g, format!("nbd://127.0.0.1:{port}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command that outlives its limit fails with the report taken while
    /// it still ran: its threads, their states and wait channels.
    #[test]
    fn hangs_fail_with_what_the_process_was_doing() {
        let hung = std::panic::catch_unwind(|| {
            run_reporting(
                &mut cmd("sleep", ["30"]),
                Duration::from_millis(300),
                |pid| threads_report(pid) + &blocked_processes(),
            )
        });
        let msg = *hung
            .expect_err("sleep 30 cannot finish in 300 ms")
            .downcast::<String>()
            .expect("a formatted panic message");
        assert!(msg.contains("did not finish within 300ms"), "{msg}");
        assert!(msg.contains(" sleep state S wchan "), "{msg}");
        assert!(msg.contains("processes in D state:"), "{msg}");
    }
}
