//! Where to reach a volume over NBD: ballastd reports its NBD listen address
//! in `Node.Info`; an unspecified host there (0.0.0.0, [::]) means "any
//! address of the node", so the host the API was reached on is used instead.

use std::net::SocketAddr;

use super::AttachError;
use crate::api::normalize_url;
use crate::nbd::DEFAULT_PORT;

/// The host part of an API URL such as `http://10.0.0.5:7800/` (IPv6 hosts
/// keep their brackets: `[::1]`).
pub fn api_host(api_url: &str) -> Result<String, AttachError> {
    let url = normalize_url(api_url);
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(&url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => authority,
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(AttachError::NbdAddress(format!(
            "the API URL {api_url:?} has no host; pass --nbd HOST:PORT"
        )));
    }
    Ok(host.to_string())
}

/// `HOST:PORT` of ballastd's NBD server, from the address it reported
/// (`reported`, possibly empty for an older ballastd) and the API URL.
pub fn nbd_host_port(api_url: &str, reported: &str) -> Result<String, AttachError> {
    let reported = reported.trim();
    if reported.is_empty() {
        // An older ballastd does not say; assume the NBD default port.
        return Ok(format!("{}:{DEFAULT_PORT}", api_host(api_url)?));
    }
    match reported.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => Ok(format!("{}:{}", api_host(api_url)?, a.port())),
        Ok(a) => Ok(a.to_string()),
        Err(_) => Err(AttachError::NbdAddress(format!(
            "ballastd reported the NBD address {reported:?}, which is not HOST:PORT; pass --nbd HOST:PORT"
        ))),
    }
}

/// The NBD URI of `volume` at `host_port`.
pub fn volume_uri(host_port: &str, volume: &str) -> String {
    format!("nbd://{host_port}/{volume}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_api_urls() {
        assert_eq!(api_host("http://127.0.0.1:7800").unwrap(), "127.0.0.1");
        assert_eq!(api_host("storage-1:7800").unwrap(), "storage-1");
        assert_eq!(api_host("http://h.example/").unwrap(), "h.example");
        assert_eq!(api_host("http://[::1]:7800/x").unwrap(), "[::1]");
        assert!(api_host("http://:7800").is_err());
    }

    #[test]
    fn reported_addresses() {
        let api = "http://10.1.2.3:7800";
        assert_eq!(
            nbd_host_port(api, "127.0.0.1:10809").unwrap(),
            "127.0.0.1:10809"
        );
        assert_eq!(
            nbd_host_port(api, "0.0.0.0:10900").unwrap(),
            "10.1.2.3:10900"
        );
        assert_eq!(nbd_host_port(api, "[::]:10809").unwrap(), "10.1.2.3:10809");
        assert_eq!(
            nbd_host_port("http://[fd00::5]:7800", "[::]:1").unwrap(),
            "[fd00::5]:1"
        );
        assert_eq!(nbd_host_port(api, "").unwrap(), "10.1.2.3:10809");
        assert!(nbd_host_port(api, "nonsense").is_err());
        assert_eq!(
            volume_uri("10.1.2.3:10809", "v1"),
            "nbd://10.1.2.3:10809/v1"
        );
    }
}
