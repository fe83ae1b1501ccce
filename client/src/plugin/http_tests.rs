//! The HTTP layer: Docker's endpoints, status codes, content type and
//! bodies, through the router and through a real unix socket.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::driver::{Driver, DriverConfig};
use super::http::{bind, router, serve, SocketError};
use super::options::DEFAULT_SIZE;
use super::protocol::CONTENT_TYPE;
use super::state::StateStore;
use super::testing::{FakeControl, FakeHost};

async fn app(dir: &std::path::Path) -> (axum::Router, FakeControl) {
    let control = FakeControl::default();
    let d = Driver::start(
        control.clone(),
        FakeHost::new(&dir.join("attach")),
        DriverConfig {
            mount_root: dir.join("mounts"),
            attach_root: dir.join("attach"),
            default_size: DEFAULT_SIZE,
            scope: "local".into(),
        },
        StateStore::new(dir.join("state")),
    )
    .await
    .unwrap();
    (router(Arc::new(d)), control)
}

/// POST `body` to `path`; returns status, content type and JSON.
async fn call(app: &axum::Router, path: &str, body: &str) -> (StatusCode, String, Value) {
    let req = Request::post(path)
        // What Docker sends: an Accept header, no JSON content type.
        .header("Accept", "application/vnd.docker.plugins.v1.2+json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, ct, v)
}

#[tokio::test]
async fn docker_conversation_through_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let (app, control) = app(dir.path()).await;

    let (st, ct, v) = call(&app, "/Plugin.Activate", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ct, CONTENT_TYPE);
    assert_eq!(v, json!({"Implements": ["VolumeDriver"]}));

    let (_, _, v) = call(&app, "/VolumeDriver.Capabilities", "{}").await;
    assert_eq!(v, json!({"Capabilities": {"Scope": "local"}}));

    let (st, _, v) = call(
        &app,
        "/VolumeDriver.Create",
        r#"{"Name":"v1","Opts":{"size":"1G"}}"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v, json!({"Err": ""}));
    assert_eq!(control.names(), vec!["v1"]);

    // A bad option: 200 with the reason in Err (what Docker shows).
    let (st, _, v) = call(
        &app,
        "/VolumeDriver.Create",
        r#"{"Name":"v2","Opts":{"size":"1X"}}"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["Err"]
        .as_str()
        .unwrap()
        .starts_with("option size: invalid size \"1X\""));

    let (_, _, v) = call(&app, "/VolumeDriver.Mount", r#"{"Name":"v1","ID":"c1"}"#).await;
    let mp = dir.path().join("mounts/v1").display().to_string();
    assert_eq!(v, json!({"Mountpoint": mp, "Err": ""}));
    let (_, _, v) = call(&app, "/VolumeDriver.Path", r#"{"Name":"v1"}"#).await;
    assert_eq!(v, json!({"Mountpoint": mp, "Err": ""}));
    let (_, _, v) = call(&app, "/VolumeDriver.List", "{}").await;
    assert_eq!(
        v,
        json!({"Volumes": [{"Name": "v1", "Mountpoint": mp, "CreatedAt": "2023-11-14T22:13:20Z"}], "Err": ""})
    );
    let (_, _, v) = call(&app, "/VolumeDriver.Get", r#"{"Name":"v1"}"#).await;
    assert_eq!(v["Err"], "");
    assert_eq!(v["Volume"]["Name"], "v1");
    assert_eq!(v["Volume"]["Mountpoint"], mp.as_str());
    assert_eq!(v["Volume"]["Status"]["size"], 1u64 << 30);

    let (_, _, v) = call(&app, "/VolumeDriver.Remove", r#"{"Name":"v1"}"#).await;
    assert!(v["Err"].as_str().unwrap().contains("still mounted"), "{v}");
    let (_, _, v) = call(&app, "/VolumeDriver.Unmount", r#"{"Name":"v1","ID":"c1"}"#).await;
    assert_eq!(v, json!({"Err": ""}));
    let (_, _, v) = call(&app, "/VolumeDriver.Path", r#"{"Name":"v1"}"#).await;
    assert_eq!(v, json!({"Mountpoint": "", "Err": ""}));
    let (_, _, v) = call(&app, "/VolumeDriver.Remove", r#"{"Name":"v1"}"#).await;
    assert_eq!(v, json!({"Err": ""}));
    assert!(control.names().is_empty());

    let (_, _, v) = call(&app, "/VolumeDriver.Get", r#"{"Name":"v1"}"#).await;
    assert!(v.get("Volume").is_none(), "{v}");
    assert!(v["Err"]
        .as_str()
        .unwrap()
        .starts_with("no Ballast volume named"));
}

#[tokio::test]
async fn malformed_and_unknown_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path()).await;
    let (st, ct, v) = call(&app, "/VolumeDriver.Create", "{\"Name\": 5}").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(ct, CONTENT_TYPE);
    assert!(v["Err"]
        .as_str()
        .unwrap()
        .starts_with("malformed VolumeDriver.Create request"));
    let (st, _, v) = call(&app, "/NetworkDriver.CreateNetwork", "{}").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(v["Err"]
        .as_str()
        .unwrap()
        .contains("implements VolumeDriver only"));
}

#[tokio::test]
async fn serves_on_a_unix_socket_and_removes_it_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path()).await;
    let sock = dir.path().join("plugins/test.sock");
    // A stale socket file from a dead plugin is replaced.
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let listener = bind(&sock).unwrap();
    // A live one is not.
    assert!(matches!(bind(&sock), Err(SocketError::InUse { .. })));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sock2 = sock.clone();
    let server = tokio::spawn(async move {
        serve(listener, &sock2, app, async {
            let _ = stop_rx.await;
        })
        .await
    });

    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/Plugin.Activate")
        .header("Host", "plugin")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"Implements":["VolumeDriver"]}"#);
    drop(sender);

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!sock.exists(), "socket removed on shutdown");
}
