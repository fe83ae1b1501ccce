//! The HTTP side: Docker's plugin endpoints on a unix socket (axum).
//!
//! Docker POSTs a JSON body (without a JSON content type: it sends only an
//! `Accept: application/vnd.docker.plugins.v1.x+json` header), so bodies
//! are read as bytes and parsed here rather than by axum's `Json`
//! extractor, which would reject them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::control::ControlPlane;
use super::driver::{Driver, DriverError};
use super::host::Host;
use super::protocol::{
    parse_body, ActivateResponse, Capabilities, CapabilitiesResponse, CreateRequest, ErrResponse,
    GetResponse, ListResponse, MountRequest, MountpointResponse, NameRequest, CONTENT_TYPE,
};

type Shared<C, H> = State<Arc<Driver<C, H>>>;

fn reply<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).expect("protocol types serialize");
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response()
}

fn ok<T: Serialize>(body: &T) -> Response {
    reply(StatusCode::OK, body)
}

/// A body that is not the JSON the endpoint expects.
fn bad_request(endpoint: &str, e: serde_json::Error) -> Response {
    warn!(endpoint, error = %e, "malformed request");
    reply(
        StatusCode::BAD_REQUEST,
        &ErrResponse {
            err: format!("malformed {endpoint} request: {e}"),
        },
    )
}

macro_rules! parse_or_400 {
    ($endpoint:expr, $body:expr) => {
        match parse_body(&$body) {
            Ok(r) => r,
            Err(e) => return bad_request($endpoint, e),
        }
    };
}

/// Log a verb's outcome and turn its error into Docker's `Err` text.
fn outcome<T>(verb: &str, name: &str, r: Result<T, DriverError>) -> (Option<T>, String) {
    match r {
        Ok(v) => (Some(v), String::new()),
        // Docker asks Get for names it is about to create: not an incident.
        Err(e @ DriverError::NotFound { .. }) => {
            debug!(verb, volume = name, error = %e, "no such volume");
            (None, e.to_string())
        }
        Err(e) => {
            warn!(verb, volume = name, error = %e, "request failed");
            (None, e.to_string())
        }
    }
}

async fn activate() -> Response {
    info!("activated by Docker");
    ok(&ActivateResponse::volume_driver())
}

async fn create<C: ControlPlane, H: Host>(State(d): Shared<C, H>, body: Bytes) -> Response {
    let req: CreateRequest = parse_or_400!("VolumeDriver.Create", body);
    info!(volume = %req.name, opts = ?req.opts, "Create");
    let (_, err) = outcome("Create", &req.name, d.create(&req.name, &req.opts).await);
    ok(&ErrResponse { err })
}

async fn remove<C: ControlPlane, H: Host>(State(d): Shared<C, H>, body: Bytes) -> Response {
    let req: NameRequest = parse_or_400!("VolumeDriver.Remove", body);
    info!(volume = %req.name, "Remove");
    let (_, err) = outcome("Remove", &req.name, d.remove(&req.name).await);
    ok(&ErrResponse { err })
}

fn path_string(p: Option<PathBuf>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

async fn mount<C: ControlPlane, H: Host>(State(d): Shared<C, H>, body: Bytes) -> Response {
    let req: MountRequest = parse_or_400!("VolumeDriver.Mount", body);
    info!(volume = %req.name, id = %req.id, "Mount");
    let (mp, err) = outcome("Mount", &req.name, d.mount(&req.name, &req.id).await);
    ok(&MountpointResponse {
        mountpoint: path_string(mp),
        err,
    })
}

async fn unmount<C: ControlPlane, H: Host>(State(d): Shared<C, H>, body: Bytes) -> Response {
    let req: MountRequest = parse_or_400!("VolumeDriver.Unmount", body);
    info!(volume = %req.name, id = %req.id, "Unmount");
    let (_, err) = outcome("Unmount", &req.name, d.unmount(&req.name, &req.id).await);
    ok(&ErrResponse { err })
}

async fn path<C: ControlPlane, H: Host>(State(d): Shared<C, H>, body: Bytes) -> Response {
    let req: NameRequest = parse_or_400!("VolumeDriver.Path", body);
    debug!(volume = %req.name, "Path");
    let (mp, err) = outcome("Path", &req.name, d.path(&req.name).await);
    ok(&MountpointResponse {
        mountpoint: path_string(mp),
        err,
    })
}

async fn get<C: ControlPlane, H: Host>(State(d): Shared<C, H>, body: Bytes) -> Response {
    let req: NameRequest = parse_or_400!("VolumeDriver.Get", body);
    debug!(volume = %req.name, "Get");
    let (volume, err) = outcome("Get", &req.name, d.get(&req.name).await);
    ok(&GetResponse { volume, err })
}

async fn list<C: ControlPlane, H: Host>(State(d): Shared<C, H>) -> Response {
    debug!("List");
    let (volumes, err) = outcome("List", "", d.list().await);
    ok(&ListResponse {
        volumes: volumes.unwrap_or_default(),
        err,
    })
}

async fn capabilities<C: ControlPlane, H: Host>(State(d): Shared<C, H>) -> Response {
    debug!("Capabilities");
    ok(&CapabilitiesResponse {
        capabilities: Capabilities {
            scope: d.scope().to_string(),
        },
    })
}

async fn unknown(uri: axum::http::Uri) -> Response {
    warn!(path = %uri.path(), "request for an endpoint this plugin does not implement");
    reply(
        StatusCode::NOT_FOUND,
        &ErrResponse {
            err: format!(
                "{} is not implemented: this plugin implements VolumeDriver only",
                uri.path()
            ),
        },
    )
}

/// The plugin's HTTP routes.
pub fn router<C: ControlPlane, H: Host>(driver: Arc<Driver<C, H>>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Create", post(create::<C, H>))
        .route("/VolumeDriver.Remove", post(remove::<C, H>))
        .route("/VolumeDriver.Mount", post(mount::<C, H>))
        .route("/VolumeDriver.Unmount", post(unmount::<C, H>))
        .route("/VolumeDriver.Path", post(path::<C, H>))
        .route("/VolumeDriver.Get", post(get::<C, H>))
        .route("/VolumeDriver.List", post(list::<C, H>))
        .route("/VolumeDriver.Capabilities", post(capabilities::<C, H>))
        .fallback(unknown)
        .with_state(driver)
}

/// Binding the plugin socket failed.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another process already serves {path} (a second plugin?); stop it or pass another --socket")]
    InUse { path: PathBuf },
    #[error("cannot {op} socket {path}: {source} (the plugin must run as root to use /run/docker/plugins)")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Bind the unix socket at `path`, replacing a stale socket file left by a
/// plugin that died (but never one a live process still serves).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| SocketError::Io { op, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io("remove the stale"))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("bind"))?;
    // Only root (dockerd) may drive the plugin: it mounts and formats.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("set permissions of"))?;
    Ok(listener)
}

/// Serve `router` on `listener` until `shutdown` completes, then remove the
/// socket file so Docker stops finding a dead plugin.
pub async fn serve(
    listener: tokio::net::UnixListener,
    socket: &Path,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let r = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    r
}
