//! Configuration: `config/default.toml` (compiled in), then an optional file
//! named by `LABSYNC_CONFIG`, then `LABSYNC__SECTION__KEY` environment
//! variables, later sources winning.
//!
//! Loading fails with a [`ConfigError`] that names the offending key, so that a
//! typo is reported at start-up rather than discovered at the first refresh.
//! Values that may carry credentials are [`SecretString`]s: their `Debug`
//! prints `[REDACTED]` and they have no `Display`.

use std::path::PathBuf;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use labsync_application::domain::PrunePolicy;
use labsync_application::retry::Backoff;
use labsync_application::{CoreSettings, DeleteQueueSettings};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::mongo::outbox::{RELAY_BACKOFF_BASE, RelaySettings};

/// The defaults shipped with the binary; the same file is checked in as
/// `config/default.toml` so that operators can read it.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// A secret as `labsync config` prints it: whether it is set, never what.
fn redacted<S: serde::Serializer>(v: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.expose_secret().is_empty() {
        ""
    } else {
        "[redacted]"
    })
}

/// A MongoDB URI as `labsync config` prints it: its hosts and options, the
/// credentials redacted.
fn redacted_uri<S: serde::Serializer>(v: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&uri_without_credentials(v.expose_secret()))
}

/// `uri` with any `user:password@` and its options (which may carry
/// secrets too, such as AWS session tokens) replaced. Everything up to
/// the last `@` is taken for credentials, so that a password with an
/// unescaped `?`, `/` or `@` in it shows nothing either.
pub fn uri_without_credentials(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return "[redacted]".into();
    };
    let (user, rest) = match rest.rsplit_once('@') {
        Some((_, hosts)) => ("[redacted]@", hosts),
        None => ("", rest),
    };
    match rest.split_once('?') {
        Some((hosts, _)) => format!("{scheme}://{user}{hosts}?[redacted]"),
        None => format!("{scheme}://{user}{rest}"),
    }
}

/// API token entries as `labsync config` prints them: name and role, not
/// the token's hash.
fn redacted_tokens<S: serde::Serializer>(tokens: &[String], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(tokens.len()))?;
    for t in tokens {
        let shown = match t.rsplit_once(':') {
            Some((name_role, _)) => format!("{name_role}:[redacted]"),
            None => "[redacted]".to_owned(),
        };
        seq.serialize_element(&shown)?;
    }
    seq.end()
}

impl Settings {
    /// The settings as TOML, secrets redacted (`labsync config`).
    ///
    /// # Errors
    /// When a value cannot be written as TOML (none can today).
    pub fn to_redacted_toml(&self) -> Result<String, String> {
        toml::to_string_pretty(self).map_err(|e| e.to_string())
    }
}

/// Environment variable naming an extra configuration file (TOML or YAML).
pub const CONFIG_FILE_ENV: &str = "LABSYNC_CONFIG";

/// Where systemd puts a service's credentials (`LoadCredential=`).
pub const CREDENTIALS_DIRECTORY_ENV: &str = "CREDENTIALS_DIRECTORY";

/// The settings a credential file may set, each by a file of its own name
/// in `$CREDENTIALS_DIRECTORY`: the secrets, which belong neither in a
/// configuration file nor in the environment.
pub const CREDENTIAL_KEYS: [&str; 5] = [
    "mongodb.uri",
    "security.encryption_key",
    "security.previous_encryption_key",
    "oidc.client_secret",
    "events.sink_url",
];

/// The credentials found in `dir`, as (setting, value) with a final line
/// break removed; other files are ignored.
///
/// # Errors
/// A credential that is there but cannot be read (permissions, not UTF-8,
/// a directory): the setting and why. Falling back to the default would
/// start labsync without, say, its encryption key.
pub fn credentials_in(
    dir: &std::path::Path,
) -> Result<Vec<(&'static str, String)>, (&'static str, String)> {
    let mut found = Vec::new();
    for key in CREDENTIAL_KEYS {
        match std::fs::read_to_string(dir.join(key)) {
            Ok(value) => found.push((key, value.trim_end_matches(['\n', '\r']).to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err((
                    key,
                    format!("the credential file in $CREDENTIALS_DIRECTORY cannot be read: {e}"),
                ));
            }
        }
    }
    Ok(found)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub mongodb: MongoSettings,
    pub refresh: RefreshSettings,
    pub cml: CmlSettings,
    pub delete: DeleteSettings,
    pub api: ApiSettings,
    pub events: EventSettings,
    pub security: SecuritySettings,
    pub oidc: OidcSettings,
    pub log: LogSettings,
}

/// Bearer JWTs from an OpenID Connect provider (off while `issuer` is
/// empty); see [`crate::oidc`].
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The provider's issuer URL, exactly as its tokens' `iss` says it.
    pub issuer: String,
    /// What the tokens' `aud` must hold.
    pub audience: String,
    /// The dotted path of the claim that holds the roles, e.g.
    /// `realm_access.roles` (Keycloak) or `groups`.
    pub roles_claim: String,
    /// `claim-value=role` entries (role: viewer, operator or admin); the
    /// highest match wins, no match is no access.
    pub roles: Vec<String>,
    /// Slack allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// The claim whose value is a person's CML username (what a
    /// self-service person may delete is judged by it).
    pub username_claim: String,
    /// The console's client at the provider: console sign-in is on while
    /// it is set (with `issuer`).
    pub client_id: String,
    /// Its secret (a confidential client); set it in the environment
    /// (`LABSYNC__OIDC__CLIENT_SECRET`).
    #[serde(serialize_with = "redacted")]
    pub client_secret: SecretString,
    /// Where the provider sends people back: labsync's own
    /// `/auth/callback`, as the people's browsers reach it.
    pub redirect_url: String,
}

impl OidcSettings {
    /// Whether bearer JWTs are accepted at all.
    pub fn enabled(&self) -> bool {
        !self.issuer.is_empty()
    }

    /// Whether the console signs people in through the provider.
    pub fn console_sign_in(&self) -> bool {
        self.enabled() && !self.client_id.is_empty()
    }

    /// The role map.
    ///
    /// # Errors
    /// The first entry that is not `claim-value=role`.
    pub fn role_map(&self) -> Result<Vec<(String, Role)>, String> {
        self.roles
            .iter()
            .map(|e| {
                let (value, role) = e
                    .rsplit_once('=')
                    .ok_or_else(|| format!("{e:?} is not claim-value=role"))?;
                let role = Role::parse(role.trim()).ok_or_else(|| {
                    format!("{e:?}: the role must be viewer, self-service, operator or admin")
                })?;
                if value.trim().is_empty() {
                    return Err(format!("{e:?}: the claim value is empty"));
                }
                Ok((value.trim().to_owned(), role))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub listen: String,
    /// Marks the console's session cookie `Secure`: set it when labsync is
    /// reached over HTTPS (a proxy in front of it).
    pub secure_cookie: bool,
    /// A console session ends after this long without a request...
    pub session_idle_secs: u64,
    /// ...and this long after sign-in, however active.
    pub session_max_secs: u64,
    /// Event streams (`/api/v1/events/stream`) open at once in this
    /// process; one more is a 503.
    pub max_event_streams: usize,
    pub body_limit_bytes: usize,
    pub shutdown_grace_secs: u64,
    /// `name:role:sha256hex` entries; see [`ApiToken::parse`].
    #[serde(serialize_with = "redacted_tokens")]
    pub tokens: Vec<String>,
    /// Who may read `/metrics` (its labels name every worker).
    pub metrics_auth: MetricsAuth,
    /// A request's header must be complete within this long of its
    /// connection being ready for it (new, or after the previous answer).
    pub header_read_timeout_secs: u64,
    /// A connection with no request running on which nothing is read or
    /// written for this long is closed.
    pub idle_timeout_secs: u64,
    /// Connections open at once; at the limit the longest idle one makes
    /// room for a new one.
    pub max_connections: usize,
    /// Requests handled at once (probes of liveness aside); more get a 503.
    pub max_requests_in_flight: usize,
}

/// Who may read `/metrics`: anyone, a token of at least a role, or no one
/// (the route answers 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAuth {
    Open,
    Viewer,
    Operator,
    Admin,
    Off,
}

impl MetricsAuth {
    /// The role a token needs; `None` when no token is needed or when the
    /// metrics are off.
    pub fn role(self) -> Option<Role> {
        match self {
            Self::Viewer => Some(Role::Viewer),
            Self::Operator => Some(Role::Operator),
            Self::Admin => Some(Role::Admin),
            Self::Open | Self::Off => None,
        }
    }
}

/// Who may call the API, and what they may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    /// A viewer who may also delete the labs CML says they own.
    SelfService,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::SelfService => "self-service",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "self-service" => Some(Self::SelfService),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// A configured API token: its name (for the audit log), role, and the
/// SHA-256 of the token (the token itself is never stored).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    /// Parses `name:role:sha256hex`.
    ///
    /// # Errors
    /// A reason naming the entry by its name (never its hash).
    pub fn parse(entry: &str) -> Result<Self, String> {
        let mut parts = entry.trim().splitn(3, ':');
        let (Some(name), Some(role), Some(hash)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err("each entry must be name:role:sha256-hex".into());
        };
        if name.is_empty()
            || name.len() > labsync_application::domain::MAX_ACTOR_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "token name {name:?} must be letters, digits, - _ ."
            ));
        }
        let role = Role::parse(role)
            .filter(|r| *r != Role::SelfService)
            .ok_or_else(|| {
                format!(
                    "token {name}: role must be viewer, operator or admin, not {role:?} \
                     (self-service is for people signed in through the provider)"
                )
            })?;
        let bytes = hex::decode(hash)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| format!("token {name}: the hash must be 64 hex digits (SHA-256)"))?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&bytes);
        Ok(Self {
            name: name.to_owned(),
            role,
            sha256,
        })
    }
}

impl ApiSettings {
    /// The configured tokens (validated at load).
    pub fn parsed_tokens(&self) -> Vec<ApiToken> {
        self.tokens
            .iter()
            .filter_map(|t| ApiToken::parse(t).ok())
            .collect()
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// May carry a token in its query string: a secret.
    #[serde(serialize_with = "redacted")]
    pub sink_url: SecretString,
    pub retention_secs: u64,
    pub poll_interval_ms: u64,
    pub request_timeout_ms: u64,
    pub max_backoff_secs: u64,
    /// Deliveries in flight at once, each for a different lab.
    pub max_in_flight: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    #[serde(serialize_with = "redacted_uri")]
    pub uri: SecretString,
    pub database: String,
    pub server_selection_timeout_ms: u64,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSettings {
    pub cron: String,
    pub run_at_startup: bool,
    pub max_concurrent_workers: usize,
    pub max_concurrent_labs_per_worker: usize,
    pub max_prune_share: f64,
    pub prune_floor: usize,
    pub lease_ttl_secs: u64,
    pub run_deadline_secs: u64,
    pub history_limit: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteSettings {
    pub tombstone_ttl_secs: u64,
    pub converge_timeout_secs: u64,
    pub converge_poll_ms: u64,
    pub async_retry_base_ms: u64,
    pub async_max_backoff_secs: u64,
    pub async_poll_ms: u64,
    pub async_claim_secs: u64,
    /// Attempts after which an async delete that keeps failing fails.
    pub async_max_attempts: u64,
    /// Age after which an async delete is not attempted any more.
    pub async_max_age_secs: u64,
    /// Async deletes carried out at once (one per worker).
    pub async_max_parallel: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySettings {
    /// Base64 of a 32-byte AES-256-GCM key; empty when not configured.
    #[serde(serialize_with = "redacted")]
    pub encryption_key: SecretString,
    /// The key before it, while a rotation is under way; empty otherwise.
    #[serde(serialize_with = "redacted")]
    pub previous_encryption_key: SecretString,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CmlSettings {
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// A configuration that cannot be used, with the key at fault where known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Source(#[from] config::ConfigError),
    #[error("invalid configuration: `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The settings as the parts of labsync take them: every `*_secs` and
/// `*_ms` becomes a [`Duration`] here and nowhere else, and every default
/// comes from config/default.toml.
impl Settings {
    /// The use cases' tunables, with a new lease holder id for this process.
    pub fn core(&self) -> CoreSettings {
        let r = &self.refresh;
        let d = &self.delete;
        CoreSettings {
            max_concurrent_workers: r.max_concurrent_workers,
            max_concurrent_labs_per_worker: r.max_concurrent_labs_per_worker,
            prune: PrunePolicy {
                max_prune_share: r.max_prune_share,
                prune_floor: r.prune_floor,
                force: false,
            },
            lease_ttl: Duration::from_secs(r.lease_ttl_secs),
            run_deadline: Duration::from_secs(r.run_deadline_secs),
            history_limit: r.history_limit,
            tombstone_ttl: Duration::from_secs(d.tombstone_ttl_secs),
            converge_timeout: Duration::from_secs(d.converge_timeout_secs),
            converge_poll: Duration::from_millis(d.converge_poll_ms),
            instance_id: format!("labsync-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The asynchronous deletes' tunables.
    pub fn delete_queue(&self) -> DeleteQueueSettings {
        let d = &self.delete;
        DeleteQueueSettings {
            backoff: Backoff {
                base: Duration::from_millis(d.async_retry_base_ms),
                max: Duration::from_secs(d.async_max_backoff_secs),
            },
            poll: Duration::from_millis(d.async_poll_ms),
            claim: Duration::from_secs(d.async_claim_secs),
            max_attempts: u32::try_from(d.async_max_attempts).unwrap_or(u32::MAX),
            max_age: Duration::from_secs(d.async_max_age_secs),
            max_parallel: usize::try_from(d.async_max_parallel).unwrap_or(1),
        }
    }

    /// The event relay's tunables; the sink is the configured one (none
    /// when it is empty).
    pub fn relay(&self) -> RelaySettings {
        let e = &self.events;
        RelaySettings {
            sink_url: Some(e.sink_url.clone()).filter(|s| !s.expose_secret().is_empty()),
            poll_interval: Duration::from_millis(e.poll_interval_ms),
            request_timeout: Duration::from_millis(e.request_timeout_ms),
            backoff: Backoff {
                base: RELAY_BACKOFF_BASE,
                max: Duration::from_secs(e.max_backoff_secs),
            },
            max_in_flight: usize::try_from(e.max_in_flight).unwrap_or(1),
        }
    }
}

impl EventSettings {
    /// How long a delivered event is kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_secs)
    }
}

impl MongoSettings {
    pub fn server_selection_timeout(&self) -> Duration {
        Duration::from_millis(self.server_selection_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

impl CmlSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl Settings {
    /// Loads from the process environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key when a value is missing, mistyped,
    /// unknown or out of range, or when `LABSYNC_CONFIG` names an unreadable
    /// file.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_with(None)
    }

    /// As [`Settings::load`], with `file` (`--config`) instead of the one
    /// `LABSYNC_CONFIG` names, when given.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_with(file: Option<PathBuf>) -> Result<Self, ConfigError> {
        let file = file.or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
        Self::load_from(file, Environment::with_prefix("LABSYNC"))
    }

    /// Loads from the defaults, an optional file and the given environment
    /// source; tests pass an explicit `source` map instead of the process
    /// environment.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_from(file: Option<PathBuf>, env: Environment) -> Result<Self, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_CONFIG, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        builder = builder.add_source(
            env.prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("api.tokens")
                .with_list_parse_key("oidc.roles"),
        );
        if let Some(dir) = std::env::var_os(CREDENTIALS_DIRECTORY_ENV) {
            let found = credentials_in(std::path::Path::new(&dir))
                .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;
            for (key, value) in found {
                builder = builder.set_override(key, value)?;
            }
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The defaults with `LABSYNC__...` style overrides given as pairs
    /// instead of read from the environment (for tests and tools).
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn from_overrides(pairs: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<std::collections::HashMap<_, _>>();
        Self::load_from(None, Environment::with_prefix("LABSYNC").source(Some(map)))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if let Err(e) = validate_cron(&self.refresh.cron) {
            return Err(ConfigError::Invalid {
                key: "refresh.cron",
                reason: e,
            });
        }
        if self.oidc.enabled() {
            if let Err(e) = self.oidc.role_map() {
                return invalid("oidc.roles", &e);
            }
            if self.oidc.audience.is_empty() {
                return invalid("oidc.audience", "must be set with oidc.issuer");
            }
            // Keys over plain http could be anyone's: only on this machine.
            let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| {
                    self.oidc.issuer.strip_prefix(p).is_some_and(|rest| {
                        rest.is_empty() || rest.starts_with(':') || rest.starts_with('/')
                    })
                });
            if !(self.oidc.issuer.starts_with("https://") || loopback) {
                return invalid(
                    "oidc.issuer",
                    "must be an https:// URL (http:// only on the loopback address)",
                );
            }
            if self.oidc.leeway_secs > 300 {
                return invalid("oidc.leeway_secs", "must be at most 300");
            }
            if self.oidc.console_sign_in() {
                if self.oidc.client_secret.expose_secret().is_empty() {
                    return invalid("oidc.client_secret", "must be set with oidc.client_id");
                }
                let r = &self.oidc.redirect_url;
                if !(r.starts_with("https://") || r.starts_with("http://"))
                    || !r.ends_with("/auth/callback")
                {
                    return invalid(
                        "oidc.redirect_url",
                        "must be labsync's own http(s)://.../auth/callback",
                    );
                }
            }
        }
        if !(self.refresh.max_prune_share > 0.0 && self.refresh.max_prune_share <= 1.0) {
            return invalid("refresh.max_prune_share", "must be in (0, 1]");
        }
        // Every duration and size is bounded on both sides, so that no
        // value can make time arithmetic overflow later (a tombstone's
        // expiry computed after CML already deleted the lab must not panic).
        const DAY: u64 = 24 * 3600;
        let ten_years = 3650 * DAY;
        for (key, v, min, max) in [
            (
                "refresh.lease_ttl_secs",
                self.refresh.lease_ttl_secs,
                1,
                DAY,
            ),
            (
                "refresh.run_deadline_secs",
                self.refresh.run_deadline_secs,
                1,
                7 * DAY,
            ),
            (
                "refresh.history_limit",
                self.refresh.history_limit as u64,
                1,
                10_000,
            ),
            (
                "refresh.max_concurrent_workers",
                self.refresh.max_concurrent_workers as u64,
                1,
                1024,
            ),
            (
                "refresh.max_concurrent_labs_per_worker",
                self.refresh.max_concurrent_labs_per_worker as u64,
                1,
                1024,
            ),
            (
                "delete.tombstone_ttl_secs",
                self.delete.tombstone_ttl_secs,
                1,
                ten_years,
            ),
            (
                "delete.converge_timeout_secs",
                self.delete.converge_timeout_secs,
                1,
                DAY,
            ),
            (
                "delete.converge_poll_ms",
                self.delete.converge_poll_ms,
                1,
                60_000,
            ),
            (
                "delete.async_retry_base_ms",
                self.delete.async_retry_base_ms,
                1,
                DAY * 1000,
            ),
            (
                "delete.async_max_backoff_secs",
                self.delete.async_max_backoff_secs,
                1,
                DAY,
            ),
            ("delete.async_poll_ms", self.delete.async_poll_ms, 1, 60_000),
            (
                "delete.async_claim_secs",
                self.delete.async_claim_secs,
                1,
                DAY,
            ),
            (
                "delete.async_max_attempts",
                self.delete.async_max_attempts,
                1,
                1000,
            ),
            (
                "delete.async_max_age_secs",
                self.delete.async_max_age_secs,
                1,
                7 * DAY,
            ),
            (
                "delete.async_max_parallel",
                self.delete.async_max_parallel,
                1,
                64,
            ),
            (
                "events.retention_secs",
                self.events.retention_secs,
                1,
                ten_years,
            ),
            (
                "events.poll_interval_ms",
                self.events.poll_interval_ms,
                1,
                3_600_000,
            ),
            (
                "events.request_timeout_ms",
                self.events.request_timeout_ms,
                1,
                3_600_000,
            ),
            (
                "events.max_backoff_secs",
                self.events.max_backoff_secs,
                1,
                DAY,
            ),
            ("events.max_in_flight", self.events.max_in_flight, 1, 64),
            (
                "api.shutdown_grace_secs",
                self.api.shutdown_grace_secs,
                0,
                3600,
            ),
            (
                "api.header_read_timeout_secs",
                self.api.header_read_timeout_secs,
                1,
                300,
            ),
            ("api.idle_timeout_secs", self.api.idle_timeout_secs, 1, DAY),
            ("api.session_idle_secs", self.api.session_idle_secs, 1, DAY),
            (
                "api.session_max_secs",
                self.api.session_max_secs,
                1,
                30 * DAY,
            ),
            (
                "api.max_connections",
                self.api.max_connections as u64,
                2,
                65_536,
            ),
            (
                "api.max_requests_in_flight",
                self.api.max_requests_in_flight as u64,
                1,
                65_535,
            ),
            (
                "mongodb.server_selection_timeout_ms",
                self.mongodb.server_selection_timeout_ms,
                1,
                3_600_000,
            ),
            (
                "mongodb.connect_timeout_ms",
                self.mongodb.connect_timeout_ms,
                1,
                3_600_000,
            ),
            (
                "cml.connect_timeout_ms",
                self.cml.connect_timeout_ms,
                1,
                3_600_000,
            ),
            (
                "cml.request_timeout_ms",
                self.cml.request_timeout_ms,
                1,
                3_600_000,
            ),
            (
                "cml.max_response_bytes",
                self.cml.max_response_bytes as u64,
                1024,
                1 << 30,
            ),
        ] {
            if !(min..=max).contains(&v) {
                return invalid(key, &format!("must be between {min} and {max}, not {v}"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for entry in &self.api.tokens {
            let token = ApiToken::parse(entry).map_err(|reason| ConfigError::Invalid {
                key: "api.tokens",
                reason,
            })?;
            if !names.insert(token.name.clone()) {
                return invalid(
                    "api.tokens",
                    &format!("token name {} is used twice", token.name),
                );
            }
        }
        if self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("api.listen", "must be host:port, e.g. 127.0.0.1:8080");
        }
        // A connection that is not running a request is always left for a
        // probe: requests beyond the in-flight limit are answered at once.
        if self.api.max_requests_in_flight >= self.api.max_connections {
            return invalid(
                "api.max_requests_in_flight",
                &format!(
                    "must be below api.max_connections ({})",
                    self.api.max_connections
                ),
            );
        }
        if self.api.body_limit_bytes < 1024 {
            return invalid("api.body_limit_bytes", "must be at least 1024");
        }
        let sink = self.events.sink_url.expose_secret();
        if !(sink.is_empty() || sink.starts_with("http://") || sink.starts_with("https://")) {
            return invalid(
                "events.sink_url",
                "must be an http:// or https:// URL, or empty",
            );
        }
        if let Err(reason) =
            crate::crypto::PasswordCipher::from_setting(&self.security.encryption_key)
        {
            return Err(ConfigError::Invalid {
                key: "security.encryption_key",
                reason,
            });
        }
        if !self
            .security
            .previous_encryption_key
            .expose_secret()
            .is_empty()
        {
            if self.security.encryption_key.expose_secret().is_empty() {
                return invalid(
                    "security.previous_encryption_key",
                    "needs security.encryption_key (the key it was rotated to)",
                );
            }
            if let Err(reason) =
                crate::crypto::PasswordCipher::from_setting(&self.security.previous_encryption_key)
            {
                return Err(ConfigError::Invalid {
                    key: "security.previous_encryption_key",
                    reason,
                });
            }
        }
        if self.mongodb.database.is_empty()
            || self
                .mongodb
                .database
                .contains(['/', '\\', '.', ' ', '"', '$', '\0'])
        {
            return invalid(
                "mongodb.database",
                "must be a non-empty MongoDB database name without / \\ . space \" $",
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(ConfigError::Invalid {
                key: "log.filter",
                reason: e.to_string(),
            });
        }
        Ok(())
    }
}

/// Checks a six-field cron expression the way the scheduler will parse it.
fn validate_cron(expr: &str) -> Result<(), String> {
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| format!("not a valid six-field cron expression ({e}): {expr:?}"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use secrecy::ExposeSecret;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Environment::with_prefix("LABSYNC").source(Some(map))
    }

    #[test]
    fn the_printed_configuration_is_toml_that_shows_no_secret() {
        let s = Settings::from_overrides(&[
            (
                "LABSYNC__MONGODB__URI",
                "mongodb://app:hunter2@db1,db2/?replicaSet=rs0",
            ),
            (
                "LABSYNC__SECURITY__ENCRYPTION_KEY",
                "c2VjcmV0LWtleS0xMjM0NTY3ODkwMTIzNDU2Nzg5MDE=",
            ),
            (
                "LABSYNC__API__TOKENS",
                "ui:operator:abababababababababababababababababababababababababababababababab",
            ),
            (
                "LABSYNC__EVENTS__SINK_URL",
                "https://sink.example.net/?token=s3cr3t",
            ),
        ])
        .unwrap();
        let text = s.to_redacted_toml().unwrap();
        assert!(text.contains("ui:operator:[redacted]"), "{text}");
        for secret in [
            "hunter2",
            "app:",
            "c2VjcmV0",
            "s3cr3t",
            "abababababababababababababababababababababababababababababababab",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            text.contains("uri = \"mongodb://[redacted]@db1,db2/?[redacted]\""),
            "{text}"
        );
        let back: toml::Table = toml::from_str(&text).expect("it is TOML");
        assert_eq!(
            back["refresh"]["cron"].as_str(),
            Some(s.refresh.cron.as_str())
        );
        assert_eq!(
            uri_without_credentials("mongodb://db:27017"),
            "mongodb://db:27017"
        );
        assert_eq!(uri_without_credentials("not a uri"), "[redacted]");
        assert_eq!(
            uri_without_credentials("mongodb://u:pa?ss@h/"),
            "mongodb://[redacted]@h/",
            "a ? in the password is the password's"
        );
        assert_eq!(
            uri_without_credentials("mongodb://u:p@ss@h:1/db?x=1"),
            "mongodb://[redacted]@h:1/db?[redacted]"
        );
    }

    #[test]
    fn credentials_set_only_the_secret_settings_each_from_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mongodb.uri"), "mongodb://db:27017\n").unwrap();
        std::fs::write(dir.path().join("security.encryption_key"), "a2V5").unwrap();
        std::fs::write(dir.path().join("api.listen"), "0.0.0.0:1").unwrap();
        let mut found = credentials_in(dir.path()).unwrap();
        found.sort_unstable();
        assert_eq!(
            found,
            vec![
                ("mongodb.uri", "mongodb://db:27017".to_owned()),
                ("security.encryption_key", "a2V5".to_owned()),
            ],
            "a line break is dropped; a file that is no secret's name is ignored"
        );
        std::fs::create_dir(dir.path().join("events.sink_url")).unwrap();
        let (key, why) = credentials_in(dir.path()).unwrap_err();
        assert_eq!(key, "events.sink_url");
        assert!(why.contains("cannot be read"), "{why}");
    }

    #[test]
    fn roles_read_and_print_as_their_words_only() {
        for (word, role) in [
            ("viewer", Role::Viewer),
            ("operator", Role::Operator),
            ("admin", Role::Admin),
        ] {
            assert_eq!(Role::parse(word), Some(role));
            assert_eq!(role.as_str(), word);
        }
        assert_eq!(Role::parse("Admin"), None);
        assert_eq!(Role::parse(""), None);
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }

    #[test]
    fn a_token_entry_needs_a_plain_name_a_role_and_a_sha256() {
        let hash = "ab".repeat(32);
        let t = ApiToken::parse(&format!("ui-1_a.b:operator:{hash}")).unwrap();
        assert_eq!((t.name.as_str(), t.role), ("ui-1_a.b", Role::Operator));
        assert_eq!(t.sha256, [0xab; 32]);
        for bad in [
            format!(":admin:{hash}"),
            format!("a b:admin:{hash}"),
            format!("é:admin:{hash}"),
            format!("ui:root:{hash}"),
            "ui:admin:abcd".to_owned(),
            "ui:admin".to_owned(),
        ] {
            assert!(ApiToken::parse(&bad).is_err(), "{bad}");
        }
        let shown = format!("{t:?}");
        assert!(
            shown.contains("ui-1_a.b") && shown.contains("Operator"),
            "{shown}"
        );
        assert!(!shown.contains("abab") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn defaults_refresh_every_30_minutes_against_local_mongodb() {
        let s = Settings::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(s.refresh.cron, "0 */30 * * * *");
        assert_eq!(s.mongodb.uri.expose_secret(), "mongodb://127.0.0.1:27017");
        assert_eq!(s.mongodb.database, "labsync");
        assert_eq!(s.log.format, LogFormat::Human);
        assert_eq!(s.api.metrics_auth, MetricsAuth::Viewer);
    }

    #[test]
    fn oidc_is_off_by_default_and_its_roles_map_claim_values_to_roles() {
        let s = Settings::load_from(None, env(&[])).expect("defaults load");
        assert!(!s.oidc.enabled());
        let s = Settings::load_from(
            None,
            env(&[
                (
                    "LABSYNC__OIDC__ISSUER",
                    "https://sso.example.net/realms/lab",
                ),
                ("LABSYNC__OIDC__AUDIENCE", "labsync"),
                ("LABSYNC__OIDC__ROLES_CLAIM", "groups"),
                ("LABSYNC__OIDC__ROLES", "cml-admins=admin,cml-users=viewer"),
            ]),
        )
        .expect("oidc loads");
        assert_eq!(
            s.oidc.role_map().unwrap(),
            [
                ("cml-admins".to_owned(), Role::Admin),
                ("cml-users".to_owned(), Role::Viewer)
            ]
        );
        for (key, value) in [
            ("LABSYNC__OIDC__ROLES", "cml-admins=root"),
            ("LABSYNC__OIDC__AUDIENCE", ""),
            ("LABSYNC__OIDC__ISSUER", "sso.example.net"),
            ("LABSYNC__OIDC__ISSUER", "http://sso.example.net/realms/lab"),
            ("LABSYNC__OIDC__ISSUER", "http://localhost.example.net"),
            ("LABSYNC__OIDC__LEEWAY_SECS", "100000"),
            ("LABSYNC__OIDC__ROLES", "=admin"),
        ] {
            let mut pairs = vec![
                (
                    "LABSYNC__OIDC__ISSUER",
                    "https://sso.example.net/realms/lab",
                ),
                ("LABSYNC__OIDC__AUDIENCE", "labsync"),
            ];
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            let e = Settings::load_from(None, env(&pairs)).expect_err(value);
            assert!(e.to_string().contains("oidc."), "{e}");
        }
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load_from(
            None,
            env(&[
                ("LABSYNC__MONGODB__URI", "mongodb://db.example:27018"),
                ("LABSYNC__REFRESH__CRON", "0 */5 * * * *"),
                ("LABSYNC__REFRESH__MAX_CONCURRENT_WORKERS", "3"),
                ("LABSYNC__LOG__FORMAT", "json"),
            ]),
        )
        .expect("overrides load");
        assert_eq!(s.mongodb.uri.expose_secret(), "mongodb://db.example:27018");
        assert_eq!(s.refresh.cron, "0 */5 * * * *");
        assert_eq!(s.refresh.max_concurrent_workers, 3);
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn a_file_overrides_defaults_and_the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labsync.toml");
        std::fs::write(
            &path,
            "[mongodb]\ndatabase = \"from_file\"\n[refresh]\nprune_floor = 3\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(path), env(&[("LABSYNC__REFRESH__PRUNE_FLOOR", "7")]))
            .unwrap();
        assert_eq!(s.mongodb.database, "from_file");
        assert_eq!(s.refresh.prune_floor, 7);
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Settings::load_from(Some("/nonexistent/labsync.toml".into()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("labsync.toml"), "{err}");
    }

    #[test]
    fn bad_values_fail_naming_the_key() {
        let cases = [
            ("LABSYNC__REFRESH__CRON", "every half hour", "refresh.cron"),
            (
                "LABSYNC__REFRESH__MAX_CONCURRENT_WORKERS",
                "many",
                "max_concurrent_workers",
            ),
            (
                "LABSYNC__REFRESH__MAX_CONCURRENT_WORKERS",
                "0",
                "refresh.max_concurrent_workers",
            ),
            (
                "LABSYNC__REFRESH__MAX_PRUNE_SHARE",
                "1.5",
                "refresh.max_prune_share",
            ),
            ("LABSYNC__LOG__FORMAT", "xml", "format"),
            ("LABSYNC__MONGODB__DATABASE", "a/b", "mongodb.database"),
            ("LABSYNC__MONGODB__TYPO", "x", "typo"),
            (
                "LABSYNC__SECURITY__ENCRYPTION_KEY",
                "c2hvcnQ=",
                "security.encryption_key",
            ),
            ("LABSYNC__API__TOKENS", "ui:superuser:00", "api.tokens"),
            ("LABSYNC__API__LISTEN", "everywhere", "api.listen"),
            ("LABSYNC__EVENTS__SINK_URL", "ftp://x", "events.sink_url"),
            ("LABSYNC__API__METRICS_AUTH", "everyone", "metrics_auth"),
            (
                "LABSYNC__API__HEADER_READ_TIMEOUT_SECS",
                "0",
                "api.header_read_timeout_secs",
            ),
            (
                "LABSYNC__API__IDLE_TIMEOUT_SECS",
                "99999999999",
                "api.idle_timeout_secs",
            ),
            ("LABSYNC__API__MAX_CONNECTIONS", "1", "api.max_connections"),
            (
                "LABSYNC__API__MAX_REQUESTS_IN_FLIGHT",
                "0",
                "api.max_requests_in_flight",
            ),
            // The default connection limit is 512.
            (
                "LABSYNC__API__MAX_REQUESTS_IN_FLIGHT",
                "512",
                "api.max_requests_in_flight",
            ),
            (
                "LABSYNC__SECURITY__ENCRYPTION_KEY",
                "not base64!",
                "security.encryption_key",
            ),
            // Values that would overflow time arithmetic later.
            (
                "LABSYNC__DELETE__TOMBSTONE_TTL_SECS",
                "18446744073709551615",
                "delete.tombstone_ttl_secs",
            ),
            (
                "LABSYNC__REFRESH__LEASE_TTL_SECS",
                "9223372036854775807",
                "refresh.lease_ttl_secs",
            ),
            (
                "LABSYNC__DELETE__ASYNC_MAX_BACKOFF_SECS",
                "99999999999",
                "delete.async_max_backoff_secs",
            ),
            (
                "LABSYNC__EVENTS__RETENTION_SECS",
                "99999999999999",
                "events.retention_secs",
            ),
            (
                "LABSYNC__CML__MAX_RESPONSE_BYTES",
                "10",
                "cml.max_response_bytes",
            ),
        ];
        for (key, value, named) in cases {
            let err = Settings::load_from(None, env(&[(key, value)]))
                .expect_err(key)
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
    }

    #[test]
    fn api_tokens_come_from_the_environment_as_a_list() {
        let h = "ab".repeat(32);
        let list = format!("ui:operator:{h},ops:admin:{h}");
        let s = Settings::load_from(None, env(&[("LABSYNC__API__TOKENS", &list)])).unwrap();
        let tokens = s.api.parsed_tokens();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            (tokens[0].name.as_str(), tokens[0].role),
            ("ui", Role::Operator)
        );
        assert_eq!(
            (tokens[1].name.as_str(), tokens[1].role),
            ("ops", Role::Admin)
        );
        assert!(
            !format!("{tokens:?}").contains(&h[..8]),
            "the hash is not printed"
        );
        let dup = format!("ui:operator:{h},ui:admin:{h}");
        let err = Settings::load_from(None, env(&[("LABSYNC__API__TOKENS", &dup)])).unwrap_err();
        assert!(err.to_string().contains("used twice"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_mongodb_uri() {
        let s = Settings::load_from(
            None,
            env(&[(
                "LABSYNC__MONGODB__URI",
                "mongodb://labsync:hunter2-s3cret@db:27017",
            )]),
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2-s3cret"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }
}
