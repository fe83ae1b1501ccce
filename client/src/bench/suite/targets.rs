//! Starting and stopping suite targets (NBD servers as child processes).

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::config::{TargetKind, TargetSpec};
use crate::nbd::{NbdClient, NbdUri};

/// Why a target is not available.
#[derive(Debug)]
pub enum StartError {
    /// Its program is not installed / not built: not an error of the target.
    Skipped(String),
    /// It was there but did not come up.
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Skipped(m) => write!(f, "skipped: {m}"),
            StartError::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

/// Where targets keep their files.
#[derive(Debug, Clone)]
pub struct StartCtx {
    /// Export size in bytes.
    pub size: u64,
    /// Scratch folder of the suite (one subfolder per target).
    pub scratch: PathBuf,
    /// Folder of server logs.
    pub logs: PathBuf,
    /// How long a server may take to listen.
    pub timeout: Duration,
}

/// A started target; its processes are killed when this is dropped.
#[derive(Debug)]
pub struct Running {
    /// Target name.
    pub name: String,
    /// Where to connect.
    pub uri: NbdUri,
    /// Server log.
    pub log: PathBuf,
    procs: Procs,
}

/// Child processes killed when dropped (also on early returns while starting).
#[derive(Debug, Default)]
struct Procs(Vec<Child>);

impl Procs {
    fn stop(&mut self) {
        for p in self.0.iter_mut().rev() {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.0.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Running {
    /// Whether every process of the target is still alive.
    pub fn alive(&mut self) -> bool {
        self.procs
            .0
            .iter_mut()
            .all(|p| matches!(p.try_wait(), Ok(None)))
    }

    /// Stop the target's processes.
    pub fn stop(&mut self) {
        self.procs.stop();
    }
}

/// Find an executable by name on PATH (or a path as given).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| is_exec(p))
    })
}

/// A program next to the running executable (`ballastd`, `ballast`).
fn sibling_program(name: &str) -> Result<PathBuf, StartError> {
    let exe = std::env::current_exe()
        .map_err(|e| StartError::Skipped(format!("cannot locate the running executable: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(StartError::Skipped(format!(
            "{name} not found next to {} (build it: cargo build --release --bins)",
            exe.display()
        )))
    }
}

fn free_port() -> Result<u16, StartError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StartError::Failed(format!("no free port: {e}")))
}

struct Vars {
    port: u16,
    size: u64,
    dir: PathBuf,
    file: PathBuf,
}

impl Vars {
    fn expand(&self, s: &str) -> Result<String, StartError> {
        if s.contains("{file}") && !self.file.exists() {
            let f = File::create(&self.file).and_then(|f| f.set_len(self.size));
            f.map_err(|e| {
                StartError::Failed(format!("cannot create {}: {e}", self.file.display()))
            })?;
        }
        Ok(s.replace("{port}", &self.port.to_string())
            .replace("{size}", &self.size.to_string())
            .replace("{dir}", &self.dir.to_string_lossy())
            .replace("{file}", &self.file.to_string_lossy()))
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        format!("no output (log {})", path.display())
    } else {
        format!("{tail} (log {})", path.display())
    }
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Child, StartError> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| StartError::Failed(format!("cannot open log {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| StartError::Failed(format!("cannot open log: {e}")))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| StartError::Failed(format!("cannot run {}: {e}", program.display())))
}

async fn wait_listening(
    child: &mut Child,
    port: u16,
    timeout: Duration,
    log: &Path,
) -> Result<(), StartError> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(StartError::Failed(format!(
                "exited with {st}: {}",
                log_tail(log)
            )));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(StartError::Failed(format!(
                "not listening on port {port} after {timeout:?}: {}",
                log_tail(log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Start a target and check that its export answers.
pub async fn start(spec: &TargetSpec, ctx: &StartCtx) -> Result<Running, StartError> {
    let dir = ctx.scratch.join(&spec.name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| StartError::Failed(format!("cannot create {}: {e}", dir.display())))?;
    let log = ctx.logs.join(format!("{}.log", spec.name));
    let port = free_port()?;
    let vars = Vars {
        port,
        size: ctx.size,
        file: dir.join("disk.raw"),
        dir: dir.clone(),
    };
    let need = |p: &str, pkg: &str| {
        find_program(p).ok_or_else(|| {
            StartError::Skipped(format!("{p} is not installed (Debian package {pkg})"))
        })
    };
    let mut procs = Procs::default();
    let uri = match &spec.kind {
        TargetKind::Nbdkit {
            plugin,
            args,
            filters,
        } => {
            let program = need("nbdkit", "nbdkit")?;
            let mut a: Vec<String> = ["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.push(port.to_string());
            a.extend(filters.iter().map(|f| format!("--filter={f}")));
            a.push(plugin.clone());
            let plugin_args = match (args.is_empty(), plugin.as_str()) {
                (true, "memory" | "null" | "zero" | "sparse-random") => vec!["{size}".to_string()],
                (true, "file") => vec!["{file}".to_string()],
                _ => args.clone(),
            };
            for p in &plugin_args {
                a.push(vars.expand(p)?);
            }
            let mut child = spawn(&program, &a, &log)?;
            let r = wait_listening(&mut child, port, ctx.timeout, &log).await;
            procs.0.push(child);
            r?;
            format!("nbd://127.0.0.1:{port}/")
        }
        TargetKind::QemuNbd { cache, aio, args } => {
            let program = need("qemu-nbd", "qemu-utils")?;
            let mut a = vec![
                "--persistent".to_string(),
                "--shared=64".to_string(),
                "--format=raw".to_string(),
                format!("--cache={cache}"),
                format!("--aio={aio}"),
                "--discard=unmap".to_string(),
                "--bind=127.0.0.1".to_string(),
                format!("--port={port}"),
            ];
            for x in args {
                a.push(vars.expand(x)?);
            }
            a.push(vars.expand("{file}")?);
            let mut child = spawn(&program, &a, &log)?;
            let r = wait_listening(&mut child, port, ctx.timeout, &log).await;
            procs.0.push(child);
            r?;
            format!("nbd://127.0.0.1:{port}/")
        }
        TargetKind::Command { program, args, uri } => {
            let prog = find_program(program)
                .ok_or_else(|| StartError::Skipped(format!("{program} is not installed")))?;
            let a = args
                .iter()
                .map(|x| vars.expand(x))
                .collect::<Result<Vec<_>, _>>()?;
            let mut child = spawn(&prog, &a, &log)?;
            let r = wait_listening(&mut child, port, ctx.timeout, &log).await;
            procs.0.push(child);
            r?;
            vars.expand(uri)?
        }
        TargetKind::Ballast {
            daemon_args,
            volume_args,
        } => {
            let ballastd = sibling_program("ballastd")?;
            let ballast = sibling_program("ballast")?;
            let api_port = free_port()?;
            let data = dir.join("data");
            let mut a = vec![
                "--data".to_string(),
                data.to_string_lossy().into_owned(),
                "--listen-nbd".to_string(),
                format!("127.0.0.1:{port}"),
                "--listen-api".to_string(),
                format!("127.0.0.1:{api_port}"),
            ];
            for x in daemon_args {
                a.push(vars.expand(x)?);
            }
            let mut child = spawn(&ballastd, &a, &log)?;
            let r = async {
                wait_listening(&mut child, port, ctx.timeout, &log).await?;
                wait_listening(&mut child, api_port, ctx.timeout, &log).await
            }
            .await;
            procs.0.push(child);
            r?;
            let mut v = vec![
                "--api".to_string(),
                format!("http://127.0.0.1:{api_port}"),
                "volume".to_string(),
                "create".to_string(),
                "bench".to_string(),
                "--size".to_string(),
                ctx.size.to_string(),
            ];
            for x in volume_args {
                v.push(vars.expand(x)?);
            }
            let out = Command::new(&ballast)
                .args(&v)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| StartError::Failed(format!("cannot run ballast: {e}")))?;
            if !out.status.success() {
                return Err(StartError::Failed(format!(
                    "ballast volume create failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            format!("nbd://127.0.0.1:{port}/bench")
        }
    };
    let uri = NbdUri::parse(&uri).map_err(|e| StartError::Failed(e.to_string()))?;
    let running = Running {
        name: spec.name.clone(),
        uri,
        log,
        procs,
    };
    // The export must answer and be large enough.
    let c = NbdClient::connect_with(&running.uri, &Default::default())
        .await
        .map_err(|e| StartError::Failed(format!("export does not answer: {e}")))?;
    let size = c.size();
    let _ = c.disconnect().await;
    if size < ctx.size {
        return Err(StartError::Failed(format!(
            "export is {size} bytes, smaller than settings.size ({})",
            ctx.size
        )));
    }
    Ok(running)
}
