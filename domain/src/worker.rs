//! A CML server registered with labsync.

use serde::{Deserialize, Serialize};

use crate::WorkerId;

/// How labsync trusts a worker's TLS certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    /// A PEM bundle of CAs to trust for this worker, in addition to the
    /// system's roots (CML servers usually have self-signed certificates).
    pub ca_cert_pem: Option<String>,
    /// Skips certificate verification. Logged as a warning on every use.
    pub insecure: bool,
}

/// A registered worker, without its password (which only the CML adapter
/// ever sees, decrypted, through the worker repository).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub name: String,
    /// Scheme, host and port, e.g. `https://cml1.example.net`; `/api/v0` is
    /// appended by the client.
    pub base_url: String,
    pub username: String,
    pub tls: TlsSettings,
    pub enabled: bool,
    /// Fetch every lab's details with CML's one `populate_lab_tiles`
    /// request (internal in the API spec, used by CML's own clients)
    /// instead of one request per lab; labs it misses, or any failure of
    /// it, fall back to the per-lab requests. Off by default.
    #[serde(default)]
    pub lab_tiles: bool,
}

/// Checks a worker's base URL: `http` or `https`, a host, an optional port,
/// and no path, query, credentials or fragment (the client appends
/// `/api/v0`). Returns it without a trailing slash.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_base_url(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("worker URL must start with https:// or http://: {s:?}"))?;
    if rest.is_empty() {
        return Err("worker URL has no host".into());
    }
    if let Some(c) = rest
        .chars()
        .find(|c| matches!(c, '/' | '?' | '#' | '@' | ' '))
    {
        return Err(format!(
            "worker URL must be scheme://host[:port] only (found {c:?}); labsync adds /api/v0 itself"
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_scheme_host_and_port_only() {
        assert_eq!(
            parse_base_url("https://cml1.example.net/").unwrap(),
            "https://cml1.example.net"
        );
        assert_eq!(
            parse_base_url("http://127.0.0.1:19401").unwrap(),
            "http://127.0.0.1:19401"
        );
        for bad in [
            "cml1",
            "ftp://x",
            "https://",
            "https://x/api/v0",
            "https://user:pw@x",
            "https://x?a=1",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad}");
        }
    }
}
