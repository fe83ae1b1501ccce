//! Request and response bodies of Docker's volume plugin protocol.
//!
//! Docker's plugin client POSTs JSON to `/Plugin.Activate` and
//! `/VolumeDriver.*` over the plugin's unix socket. Field names are Go's
//! exported struct fields (`Name`, `Opts`, `ID`, `Mountpoint`, `Err`, ...),
//! so every type here renames its fields explicitly; the unit tests pin the
//! exact JSON. Failures travel in the `Err` field of an ordinary response,
//! never as a bare HTTP error, because that is what Docker shows the user
//! (`Error response from daemon: ... VolumeDriver.Create: <Err>`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The media type Docker's plugin protocol uses for requests and responses.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// `/Plugin.Activate` response: which subsystems this plugin implements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateResponse {
    #[serde(rename = "Implements")]
    pub implements: Vec<String>,
}

impl ActivateResponse {
    /// A volume driver and nothing else.
    pub fn volume_driver() -> Self {
        ActivateResponse {
            implements: vec!["VolumeDriver".to_string()],
        }
    }
}

/// `/VolumeDriver.Create` request. `Opts` is `null` when the user passed no
/// `-o` options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CreateRequest {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Opts", default, deserialize_with = "null_as_default")]
    pub opts: BTreeMap<String, String>,
}

/// A request that names one volume: Remove, Path, Get.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NameRequest {
    #[serde(rename = "Name", default)]
    pub name: String,
}

/// `/VolumeDriver.Mount` and `/VolumeDriver.Unmount` request. `ID` names the
/// caller (a container); Docker sends one Mount and one Unmount per caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MountRequest {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "ID", default)]
    pub id: String,
}

/// A response that carries only an error: Create, Remove, Unmount. An empty
/// `Err` means success.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrResponse {
    #[serde(rename = "Err")]
    pub err: String,
}

/// `/VolumeDriver.Mount` and `/VolumeDriver.Path` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountpointResponse {
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
    #[serde(rename = "Err")]
    pub err: String,
}

/// One volume as Docker sees it. `Mountpoint` is empty while the volume is
/// not mounted on this host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
    /// RFC 3339; omitted when unknown.
    #[serde(
        rename = "CreatedAt",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub created_at: String,
    /// Free-form details shown by `docker volume inspect` (Get only).
    #[serde(rename = "Status", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<String, serde_json::Value>,
}

/// `/VolumeDriver.Get` response. `Volume` is omitted together with a
/// non-empty `Err`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetResponse {
    #[serde(rename = "Volume", default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeInfo>,
    #[serde(rename = "Err")]
    pub err: String,
}

/// `/VolumeDriver.List` response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    #[serde(rename = "Volumes")]
    pub volumes: Vec<VolumeInfo>,
    #[serde(rename = "Err")]
    pub err: String,
}

/// Where a volume can be used: `local` (this host only) or `global` (the
/// same volume from every host of a cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(rename = "Scope")]
    pub scope: String,
}

/// `/VolumeDriver.Capabilities` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilitiesResponse {
    #[serde(rename = "Capabilities")]
    pub capabilities: Capabilities,
}

/// Docker sends `"Opts": null` when no options were given.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Parse a request body. Docker sends `{}` or nothing at all for requests
/// without arguments (Activate, List, Capabilities), so an empty or `null`
/// body is the default value.
pub fn parse_body<T: Default + serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, serde_json::Error> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn activate_implements_volume_driver() {
        let j = serde_json::to_value(ActivateResponse::volume_driver()).unwrap();
        assert_eq!(j, json!({"Implements": ["VolumeDriver"]}));
    }

    #[test]
    fn create_request_with_and_without_opts() {
        let r: CreateRequest =
            parse_body(br#"{"Name":"v1","Opts":{"size":"1G","fs":"xfs"}}"#).unwrap();
        assert_eq!(r.name, "v1");
        assert_eq!(r.opts.get("size").map(String::as_str), Some("1G"));
        assert_eq!(r.opts.get("fs").map(String::as_str), Some("xfs"));
        let r: CreateRequest = parse_body(br#"{"Name":"v1","Opts":null}"#).unwrap();
        assert!(r.opts.is_empty());
        let r: CreateRequest = parse_body(br#"{"Name":"v1"}"#).unwrap();
        assert!(r.opts.is_empty());
    }

    #[test]
    fn mount_request_fields() {
        let r: MountRequest = parse_body(br#"{"Name":"v1","ID":"abc123"}"#).unwrap();
        assert_eq!(
            r,
            MountRequest {
                name: "v1".into(),
                id: "abc123".into()
            }
        );
    }

    #[test]
    fn empty_and_null_bodies_are_defaults() {
        let r: NameRequest = parse_body(b"").unwrap();
        assert_eq!(r.name, "");
        let r: NameRequest = parse_body(b" null\n").unwrap();
        assert_eq!(r.name, "");
        let r: NameRequest = parse_body(b"{}").unwrap();
        assert_eq!(r.name, "");
        assert!(parse_body::<NameRequest>(b"{not json").is_err());
    }

    #[test]
    fn responses_use_docker_field_names() {
        assert_eq!(
            serde_json::to_value(ErrResponse::default()).unwrap(),
            json!({"Err": ""})
        );
        assert_eq!(
            serde_json::to_value(MountpointResponse {
                mountpoint: "/m/v".into(),
                err: String::new()
            })
            .unwrap(),
            json!({"Mountpoint": "/m/v", "Err": ""})
        );
        let mut status = BTreeMap::new();
        status.insert("size".to_string(), json!(1024));
        let get = GetResponse {
            volume: Some(VolumeInfo {
                name: "v".into(),
                mountpoint: String::new(),
                created_at: "2026-01-02T03:04:05Z".into(),
                status,
            }),
            err: String::new(),
        };
        assert_eq!(
            serde_json::to_value(get).unwrap(),
            json!({"Volume": {"Name": "v", "Mountpoint": "", "CreatedAt": "2026-01-02T03:04:05Z",
                              "Status": {"size": 1024}}, "Err": ""})
        );
        let err = GetResponse {
            volume: None,
            err: "no such volume".into(),
        };
        assert_eq!(
            serde_json::to_value(err).unwrap(),
            json!({"Err": "no such volume"})
        );
        let list = ListResponse {
            volumes: vec![VolumeInfo {
                name: "a".into(),
                mountpoint: "/m/a".into(),
                ..Default::default()
            }],
            err: String::new(),
        };
        assert_eq!(
            serde_json::to_value(list).unwrap(),
            json!({"Volumes": [{"Name": "a", "Mountpoint": "/m/a"}], "Err": ""})
        );
        let caps = CapabilitiesResponse {
            capabilities: Capabilities {
                scope: "local".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(caps).unwrap(),
            json!({"Capabilities": {"Scope": "local"}})
        );
    }
}
