//! A CML server registered with labsync.

use serde::{Deserialize, Serialize};

use crate::WorkerId;

/// Which certificates labsync trusts when it talks TLS to a worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateTrust {
    /// The system's roots.
    #[default]
    SystemRoots,
    /// A PEM bundle of CAs, in addition to the system's roots (CML servers
    /// usually have self-signed certificates).
    CaBundle(String),
    /// No verification at all. Logged as a warning on every use.
    Insecure,
}

/// How labsync reaches a worker: which certificates it trusts, and whether
/// plain HTTP was accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    pub trust: CertificateTrust,
    /// Accepts a plain `http://` URL, whose traffic (the CML password
    /// included) anyone on the path can read. Never implied: an `http://`
    /// URL without it is refused, and a worker with it is shown with a
    /// warning wherever it is listed.
    #[serde(default)]
    pub allow_http: bool,
}

impl TlsSettings {
    /// The settings from the separate fields that the API, the CLI and the
    /// store use: a CA bundle must be PEM, and a worker has a CA bundle or
    /// is insecure, not both.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn from_parts(
        ca_cert_pem: Option<String>,
        insecure: bool,
        allow_http: bool,
    ) -> Result<Self, String> {
        let trust = match (ca_cert_pem, insecure) {
            (Some(_), true) => {
                return Err("a worker has a CA bundle or is insecure, not both".into());
            }
            (Some(pem), false) if !pem.contains("-----BEGIN CERTIFICATE-----") => {
                return Err("ca_cert_pem is not a PEM certificate bundle".into());
            }
            (Some(pem), false) => CertificateTrust::CaBundle(pem),
            (None, true) => CertificateTrust::Insecure,
            (None, false) => CertificateTrust::SystemRoots,
        };
        Ok(Self { trust, allow_http })
    }

    /// The settings as labsync stored them, not checked again (a bundle
    /// stored before bundles were checked fails that worker's requests,
    /// not the read). Stored with both a bundle and no verification, it
    /// is what applied then: no verification.
    pub fn from_stored(ca_cert_pem: Option<String>, insecure: bool, allow_http: bool) -> Self {
        let trust = match (ca_cert_pem, insecure) {
            (_, true) => CertificateTrust::Insecure,
            (Some(pem), false) => CertificateTrust::CaBundle(pem),
            (None, false) => CertificateTrust::SystemRoots,
        };
        Self { trust, allow_http }
    }

    /// The CA bundle, if the worker has one.
    pub fn ca_cert_pem(&self) -> Option<&str> {
        match &self.trust {
            CertificateTrust::CaBundle(pem) => Some(pem),
            _ => None,
        }
    }

    /// Whether certificate verification is off.
    pub fn insecure(&self) -> bool {
        self.trust == CertificateTrust::Insecure
    }
}

/// A worker's URL: `http` or `https`, a host and an optional port, without
/// a trailing slash (see [`BaseUrl::parse`]). The client appends `/api/v0`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct BaseUrl(String);

impl BaseUrl {
    /// Checks a worker's base URL: `http` or `https`, a host, an optional
    /// port, and no path, query, credentials or fragment.
    ///
    /// The host is a DNS name (ASCII letters, digits, `-`, `.`, `_`;
    /// punycode for international names), an IPv4 address or a bracketed
    /// IPv6 one; the port, if any, 1 to 65535. Anything else is refused
    /// rather than left for an HTTP library to interpret: a `\` (which
    /// some read as `/`), a percent-escape (`%2f` is a `/` once decoded),
    /// spaces, tabs and other control characters. What passes is then
    /// parsed with the `url` crate, as the HTTP client will, and must mean
    /// the same there: that scheme, a host, no path.
    ///
    /// The text is kept as given (less a trailing slash): it is part of
    /// what a worker's password is sealed to.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = check_base_url(s)?;
        let parsed = url::Url::parse(s)
            .map_err(|e| format!("worker URL {s:?} does not parse as a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https")
            || !parsed.has_host()
            || parsed.path() != "/"
            || parsed.query().is_some()
            || !parsed.username().is_empty()
        {
            return Err(format!(
                "worker URL {s:?} must be scheme://host[:port] only"
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// A URL as labsync stored it, not checked again: a URL that an older
    /// release accepted still reads (one odd worker must not make the
    /// others unreadable), and the CML client refuses it at its first
    /// request if it is no URL.
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the worker is reached over plain HTTP.
    pub fn is_plain_http(&self) -> bool {
        self.0.starts_with("http://")
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<BaseUrl> for String {
    fn from(u: BaseUrl) -> Self {
        u.0
    }
}

impl TryFrom<String> for BaseUrl {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

/// A registered worker, without its password (which only the CML adapter
/// ever sees, decrypted, through the worker repository).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub name: String,
    pub base_url: BaseUrl,
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

/// Changes to a worker; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerChanges {
    pub name: Option<String>,
    pub base_url: Option<BaseUrl>,
    pub username: Option<String>,
    /// `Some(None)` removes the CA bundle.
    pub ca_cert_pem: Option<Option<String>>,
    pub insecure: Option<bool>,
    pub allow_http: Option<bool>,
    pub enabled: Option<bool>,
    pub lab_tiles: Option<bool>,
}

impl Worker {
    /// A new worker, enabled, with the per-lab fetch; checked as
    /// [`Worker::validate`] says.
    ///
    /// # Errors
    /// A message naming the field and what it must be.
    pub fn new(
        id: WorkerId,
        name: String,
        base_url: BaseUrl,
        username: String,
        tls: TlsSettings,
    ) -> Result<Self, String> {
        let worker = Self {
            id,
            name,
            base_url,
            username,
            tls,
            enabled: true,
            lab_tiles: false,
        };
        worker.validate()?;
        Ok(worker)
    }

    /// Whether the worker is reached over plain HTTP.
    pub fn plain_http(&self) -> bool {
        self.base_url.is_plain_http()
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
    /// and no plain `http://` without an explicit yes. The one check for
    /// every way a worker is registered or changed (API, CLI), so that a
    /// change cannot store what a registration would refuse.
    ///
    /// # Errors
    /// A message naming the field and what it must be.
    pub fn validate(&self) -> Result<(), String> {
        text_field("name", &self.name)?;
        text_field("username", &self.username)?;
        if let Some(pem) = self.tls.ca_cert_pem()
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err("ca_cert_pem is not a PEM certificate bundle".into());
        }
        self.check_transport()
    }

    /// This worker with `changes` applied, and the names of the fields
    /// they set; checked as a whole, as a registration is. `password_given`
    /// says whether the change comes with the password.
    ///
    /// # Errors
    /// A message for a worker that registration would refuse, or for a
    /// change of where or how the password goes without the password.
    pub fn changed(
        &self,
        changes: &WorkerChanges,
        password_given: bool,
    ) -> Result<(Self, Vec<&'static str>), String> {
        let mut worker = self.clone();
        let mut changed: Vec<&'static str> = Vec::new();
        if let Some(v) = &changes.name {
            worker.name.clone_from(v);
            changed.push("name");
        }
        if let Some(v) = &changes.base_url {
            worker.base_url = v.clone();
            changed.push("base_url");
        }
        if let Some(v) = &changes.username {
            worker.username.clone_from(v);
            changed.push("username");
        }
        let mut ca = self.tls.ca_cert_pem().map(str::to_owned);
        let mut insecure = self.tls.insecure();
        let mut allow_http = self.tls.allow_http;
        if let Some(v) = &changes.ca_cert_pem {
            ca.clone_from(v);
            changed.push("ca_cert_pem");
        }
        if let Some(v) = changes.insecure {
            insecure = v;
            changed.push("insecure");
        }
        if let Some(v) = changes.allow_http {
            allow_http = v;
            changed.push("allow_http");
        }
        worker.tls = TlsSettings::from_parts(ca, insecure, allow_http)?;
        if let Some(v) = changes.enabled {
            worker.enabled = v;
            changed.push("enabled");
        }
        if let Some(v) = changes.lab_tiles {
            worker.lab_tiles = v;
            changed.push("lab_tiles");
        }
        if password_given {
            changed.push("password");
        }
        worker.validate()?;
        // Whoever may change the URL must not thereby learn the password:
        // it goes to a new place (or as a new user) only when given again.
        // Nor by loosening how it is protected on the way (a CA of one's
        // own, no verification, plain HTTP): a man in the middle reads it.
        if (worker.base_url != self.base_url
            || worker.username != self.username
            || worker.tls != self.tls)
            && !password_given
        {
            return Err(
                "changing a worker's URL, username or TLS settings needs its password again".into(),
            );
        }
        Ok((worker, changed))
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

/// The checks of [`BaseUrl::parse`] on the text alone; returns it without
/// a trailing slash.
fn check_base_url(s: &str) -> Result<&str, String> {
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
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_url(s: &str) -> Result<String, String> {
        BaseUrl::parse(s).map(String::from)
    }

    #[test]
    fn plain_http_needs_an_explicit_yes() {
        let mut w = Worker {
            id: WorkerId::parse("cml-1").unwrap(),
            name: "cml-1".into(),
            base_url: BaseUrl::parse("http://cml1:80").unwrap(),
            username: "admin".into(),
            tls: TlsSettings::default(),
            enabled: true,
            lab_tiles: false,
        };
        assert!(w.check_transport().unwrap_err().contains("--allow-http"));
        w.tls.allow_http = true;
        assert!(w.check_transport().is_ok());
        w.base_url = BaseUrl::parse("https://cml1").unwrap();
        w.tls.allow_http = false;
        assert!(w.check_transport().is_ok() && !w.plain_http());
        let mut other = w.clone();
        other.base_url = BaseUrl::parse("https://elsewhere").unwrap();
        assert_ne!(w.credential_binding(), other.credential_binding());
    }

    #[test]
    fn a_worker_is_valid_only_with_printable_names_and_a_pem_bundle() {
        let good = Worker {
            id: WorkerId::parse("cml-1").unwrap(),
            name: "Lab server 1 (Zürich)".into(),
            base_url: BaseUrl::parse("https://cml1").unwrap(),
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
            with(&|w| w.tls.trust = CertificateTrust::CaBundle(pem.into())),
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
                with(&|w| w.tls.trust = CertificateTrust::CaBundle("not a certificate".into())),
                "ca_cert_pem",
            ),
            (
                TlsSettings::from_parts(Some(pem.into()), true, false).map(|_| ()),
                "insecure",
            ),
            (
                TlsSettings::from_parts(Some("x".into()), false, false).map(|_| ()),
                "ca_cert_pem",
            ),
            (
                with(&|w| w.base_url = BaseUrl::parse("http://cml1").unwrap()),
                "http",
            ),
        ] {
            let message = bad.expect_err(field);
            assert!(message.contains(field), "{field}: {message}");
        }
        assert_eq!(with(&|w| w.name = "n".repeat(200)), Ok(()));
    }

    #[test]
    fn base_urls_are_scheme_host_and_port_only() {
        assert_eq!(
            parse_url("https://cml1.example.net/").unwrap(),
            "https://cml1.example.net"
        );
        assert_eq!(
            parse_url("http://127.0.0.1:19401").unwrap(),
            "http://127.0.0.1:19401"
        );
        for good in [
            "https://[::1]:8443",
            "https://[fe80::1]",
            "https://cml_1.lab-2.example.net:443",
            "http://10.0.0.7:80",
        ] {
            assert_eq!(parse_url(good).as_deref(), Ok(good));
        }
        for bad in [
            "cml1",
            "ftp://x",
            "https://",
            "https://x/api/v0",
            "https://user:pw@x",
            "https://x?a=1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
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
            let e = parse_url(bad).expect_err(bad);
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
            let e = parse_url(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_change_is_checked_as_a_registration_and_moving_the_password_needs_it() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let w = Worker::new(
            WorkerId::parse("cml-1").unwrap(),
            "cml-1".into(),
            BaseUrl::parse("https://cml1").unwrap(),
            "admin".into(),
            TlsSettings::default(),
        )
        .unwrap();
        let rename = WorkerChanges {
            name: Some("one".into()),
            enabled: Some(false),
            ..WorkerChanges::default()
        };
        let (renamed, fields) = w.changed(&rename, false).unwrap();
        assert_eq!((renamed.name.as_str(), renamed.enabled), ("one", false));
        assert_eq!(fields, ["name", "enabled"]);
        let to_ca = WorkerChanges {
            ca_cert_pem: Some(Some(pem.into())),
            ..WorkerChanges::default()
        };
        assert!(
            w.changed(&to_ca, false)
                .unwrap_err()
                .contains("password again")
        );
        let (with_ca, _) = w.changed(&to_ca, true).unwrap();
        assert_eq!(with_ca.tls.ca_cert_pem(), Some(pem));
        // A PATCH of a bad bundle fails as a registration would.
        let bad_pem = WorkerChanges {
            ca_cert_pem: Some(Some("not PEM".into())),
            ..WorkerChanges::default()
        };
        assert!(
            w.changed(&bad_pem, true)
                .unwrap_err()
                .contains("ca_cert_pem")
        );
        let both = WorkerChanges {
            insecure: Some(true),
            ..WorkerChanges::default()
        };
        assert!(
            with_ca
                .changed(&both, true)
                .unwrap_err()
                .contains("not both")
        );
        let off = WorkerChanges {
            ca_cert_pem: Some(None),
            insecure: Some(true),
            ..WorkerChanges::default()
        };
        assert!(with_ca.changed(&off, true).unwrap().0.tls.insecure());
        let plain = WorkerChanges {
            base_url: Some(BaseUrl::parse("http://cml1").unwrap()),
            ..WorkerChanges::default()
        };
        assert!(
            w.changed(&plain, true)
                .unwrap_err()
                .contains("--allow-http")
        );
        assert!(
            Worker::new(
                WorkerId::parse("cml-1").unwrap(),
                "a\nb".into(),
                BaseUrl::parse("https://cml1").unwrap(),
                "admin".into(),
                TlsSettings::default(),
            )
            .is_err()
        );
    }

    #[test]
    fn a_base_url_reads_back_only_if_valid() {
        let u: BaseUrl = serde_json::from_str("\"https://cml1:8443\"").unwrap();
        assert_eq!(u.as_str(), "https://cml1:8443");
        assert!(serde_json::from_str::<BaseUrl>("\"https://cml1/x\"").is_err());
        assert_eq!(
            BaseUrl::parse("https://CML1.example/").unwrap().as_str(),
            "https://CML1.example",
            "kept as given: the password is sealed to it"
        );
    }
}
