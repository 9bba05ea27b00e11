//! A CML server registered with labsync.

use serde::{Deserialize, Serialize};

use crate::WorkerId;

/// How labsync trusts a worker's TLS certificate, or goes without TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    /// A PEM bundle of CAs to trust for this worker, in addition to the
    /// system's roots (CML servers usually have self-signed certificates).
    pub ca_cert_pem: Option<String>,
    /// Skips certificate verification. Logged as a warning on every use.
    pub insecure: bool,
    /// Accepts a plain `http://` URL, whose traffic (the CML password
    /// included) anyone on the path can read. Never implied: an `http://`
    /// URL without it is refused, and a worker with it is shown with a
    /// warning wherever it is listed.
    #[serde(default)]
    pub allow_http: bool,
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

impl Worker {
    /// Whether the worker is reached over plain HTTP.
    pub fn plain_http(&self) -> bool {
        self.base_url.starts_with("http://")
    }

    /// Refuses an `http://` URL that was not explicitly accepted.
    ///
    /// # Errors
    /// A message saying what to do.
    pub fn check_transport(&self) -> Result<(), String> {
        if self.plain_http() && !self.tls.allow_http {
            return Err(format!(
                "{} is plain http://: the CML password would cross the network unencrypted; \
                 use https://, or accept it explicitly (API \"allow_http\": true, CLI --allow-http)",
                self.base_url
            ));
        }
        Ok(())
    }

    /// Checks everything about a worker that does not need the network:
    /// a name and a username of printable text, a CA bundle that is PEM,
    /// not both a CA bundle and no verification, and no plain `http://`
    /// without an explicit yes. The one check for every way a worker is
    /// registered or changed (API, CLI), so that a change cannot store
    /// what a registration would refuse.
    ///
    /// # Errors
    /// A message naming the field and what it must be.
    pub fn validate(&self) -> Result<(), String> {
        text_field("name", &self.name)?;
        text_field("username", &self.username)?;
        if let Some(pem) = &self.tls.ca_cert_pem
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err("ca_cert_pem is not a PEM certificate bundle".into());
        }
        if self.tls.insecure && self.tls.ca_cert_pem.is_some() {
            return Err("a worker has a CA bundle or is insecure, not both".into());
        }
        self.check_transport()
    }

    /// What the password is sealed to: a ciphertext opens only for the
    /// same worker id, URL and user, so that changing where the password
    /// goes needs the password again, and a ciphertext copied to another
    /// worker's document does not open.
    pub fn credential_binding(&self) -> String {
        format!("{}\n{}\n{}", self.id, self.base_url, self.username)
    }
}

/// The longest name or username a worker may have, in characters.
pub const MAX_TEXT_CHARS: usize = 200;

/// A name or username: 1 to [`MAX_TEXT_CHARS`] characters, none of them a
/// control character (they end up in logs, audit entries and terminals).
fn text_field(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if value.chars().count() > MAX_TEXT_CHARS {
        return Err(format!(
            "{field} may be at most {MAX_TEXT_CHARS} characters"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(())
}

/// Checks a worker's base URL: `http` or `https`, a host, an optional port,
/// and no path, query, credentials or fragment (the client appends
/// `/api/v0`). Returns it without a trailing slash.
///
/// The host is a DNS name (ASCII letters, digits, `-`, `.`, `_`; punycode
/// for international names), an IPv4 address or a bracketed IPv6 one; the
/// port, if any, 1 to 65535. Anything else is refused rather than left for
/// an HTTP library to interpret: a `\` (which some read as `/`), a
/// percent-escape (`%2f` is a `/` once decoded), spaces, tabs and other
/// control characters.
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
    if let Some(c) = rest.chars().find(|c| matches!(c, '/' | '?' | '#' | '@')) {
        return Err(format!(
            "worker URL must be scheme://host[:port] only (found {c:?}); labsync adds /api/v0 itself"
        ));
    }
    if let Some(c) = rest
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']')))
    {
        return Err(format!(
            "worker URL has {c:?} in its host or port: only letters, digits, '-', '.', '_' and \
             :port are allowed (no percent-escapes, backslashes, spaces or control characters; \
             punycode for international names, [brackets] for IPv6)"
        ));
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6
                .split_once(']')
                .ok_or("worker URL has an IPv6 host without its closing ']'")?;
            if addr.is_empty()
                || !addr
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
            {
                return Err(format!("worker URL has an invalid IPv6 host [{addr}]"));
            }
            match after {
                "" => (rest, None),
                _ => (
                    &rest[..addr.len() + 2],
                    Some(after.strip_prefix(':').ok_or_else(|| {
                        format!("worker URL has {after:?} after its IPv6 host; expected :port")
                    })?),
                ),
            }
        }
        None => match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        },
    };
    if host.is_empty() || (!host.starts_with('[') && host.contains(['[', ']'])) {
        return Err(format!("worker URL has an invalid host {host:?}"));
    }
    if let Some(port) = port
        && !(port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0))
    {
        return Err(format!(
            "worker URL has an invalid port {port:?}: expected a number from 1 to 65535"
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_needs_an_explicit_yes() {
        let mut w = Worker {
            id: WorkerId::parse("cml-1").unwrap(),
            name: "cml-1".into(),
            base_url: "http://cml1:80".into(),
            username: "admin".into(),
            tls: TlsSettings::default(),
            enabled: true,
            lab_tiles: false,
        };
        assert!(w.check_transport().unwrap_err().contains("--allow-http"));
        w.tls.allow_http = true;
        assert!(w.check_transport().is_ok());
        w.base_url = "https://cml1".into();
        w.tls.allow_http = false;
        assert!(w.check_transport().is_ok() && !w.plain_http());
        let mut other = w.clone();
        other.base_url = "https://elsewhere".into();
        assert_ne!(w.credential_binding(), other.credential_binding());
    }

    #[test]
    fn a_worker_is_valid_only_with_printable_names_and_a_pem_bundle() {
        let good = Worker {
            id: WorkerId::parse("cml-1").unwrap(),
            name: "Lab server 1 (Zürich)".into(),
            base_url: "https://cml1".into(),
            username: "admin".into(),
            tls: TlsSettings::default(),
            enabled: true,
            lab_tiles: false,
        };
        assert_eq!(good.validate(), Ok(()));
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let with = |f: &dyn Fn(&mut Worker)| {
            let mut w = good.clone();
            f(&mut w);
            w.validate()
        };
        assert_eq!(
            with(&|w| w.tls.ca_cert_pem = Some(pem.into())),
            Ok(()),
            "a PEM bundle"
        );
        for (bad, field) in [
            (with(&|w| w.name = String::new()), "name"),
            (with(&|w| w.name = "a\0b".into()), "name"),
            (with(&|w| w.name = "two\nlines".into()), "name"),
            (with(&|w| w.name = "\u{1b}[31mred".into()), "name"),
            (with(&|w| w.name = "n".repeat(201)), "name"),
            (with(&|w| w.username = String::new()), "username"),
            (with(&|w| w.username = "ad\u{7}min".into()), "username"),
            (
                with(&|w| w.tls.ca_cert_pem = Some("not a certificate".into())),
                "ca_cert_pem",
            ),
            (
                with(&|w| {
                    w.tls.ca_cert_pem = Some(pem.into());
                    w.tls.insecure = true;
                }),
                "insecure",
            ),
            (with(&|w| w.base_url = "http://cml1".into()), "http"),
        ] {
            let message = bad.expect_err(field);
            assert!(message.contains(field), "{field}: {message}");
        }
        assert_eq!(with(&|w| w.name = "n".repeat(200)), Ok(()));
    }

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
        for good in [
            "https://[::1]:8443",
            "https://[fe80::1]",
            "https://cml_1.lab-2.example.net:443",
            "http://10.0.0.7:80",
        ] {
            assert_eq!(parse_base_url(good).as_deref(), Ok(good));
        }
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

    #[test]
    fn base_urls_with_backslashes_tabs_or_percent_escapes_are_refused_saying_why() {
        for (bad, says) in [
            ("https://cml1\\evil.example", "'\\\\'"),
            ("https://cml1\\evil:443", "'\\\\'"),
            ("https://cml\t1", "'\\t'"),
            ("https://cml1.example%2fapi", "'%'"),
            ("https://cml1%2F..%2Fx", "'%'"),
            ("https://cml 1", "' '"),
            ("https://cml1\u{0}", "'\\0'"),
            ("https://cml1\n.example", "'\\n'"),
            ("https://caf\u{e9}.example", "'\u{e9}'"),
        ] {
            let e = parse_base_url(bad).expect_err(bad);
            assert!(
                e.contains(&format!("has {says} in its host or port"))
                    && e.contains("percent-escapes"),
                "{bad:?}: {e}"
            );
        }
        for (bad, says) in [
            ("https://x:99999", "invalid port"),
            ("https://x:", "invalid port"),
            ("https://x:0", "invalid port"),
            ("https://x:80:80", "invalid port"),
            ("https://[::1", "closing ']'"),
            ("https://[::1]x", "expected :port"),
            ("https://[zz]", "invalid IPv6 host"),
            ("https://[]", "invalid IPv6 host"),
            ("https://x[1]", "invalid host"),
            ("https://:80", "invalid host"),
        ] {
            let e = parse_base_url(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
