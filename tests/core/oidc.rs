//! Bearer JWTs from a real OpenID Connect provider (the npm package
//! oidc-provider, run with the machine's node from devtools/oidc): who
//! they name, with which role, and each refusal saying which check failed.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApi, TestApp, VIEWER_TOKEN, eventually};
use labsync_test_support::eventually_within;

/// The module oidc-provider is resolved from, as scripts/install-tools.sh
/// installs it.
fn provider_module() -> PathBuf {
    let tools = std::env::var_os("LABSYNC_TOOLS_DIR").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".local/share/labsync-tools"),
        PathBuf::from,
    );
    let module = tools.join("oidc/package.json");
    assert!(
        module.is_file(),
        "oidc-provider is installed by scripts/install-tools.sh"
    );
    module
}

/// A running provider, stopped when dropped.
pub(crate) struct Provider {
    child: tokio::process::Child,
    port: u16,
}

/// How long node may take to load oidc-provider and bind, on a CI machine
/// whose two cores are busy with the rest of the suite.
const PROVIDER_START: std::time::Duration = std::time::Duration::from_secs(60);

impl Provider {
    /// A provider on a port of its own choosing (never one another process
    /// could take between our choice and its bind).
    pub(crate) async fn start(keys: &Path) -> Self {
        Self::start_for(keys, &[]).await
    }

    /// A provider whose console client sends people back to labsync at
    /// `consoles` (base URLs).
    pub(crate) async fn start_for(keys: &Path, consoles: &[&str]) -> Self {
        Self::start_with(keys, consoles, &[]).await
    }

    /// As [`Provider::start_for`], with more of provider.mjs's settings
    /// (`ID_TOKEN_CLAIMS=minimal`).
    pub(crate) async fn start_with(keys: &Path, consoles: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(keys, 0, consoles, env).await
    }

    /// A provider again on `port`, as one restarted in place is. (Another
    /// process could take the port in the moment between; unlikely, and a
    /// start that fails says so at once, with the provider's output.)
    pub(crate) async fn restart_on(keys: &Path, port: u16) -> Self {
        Self::spawn(keys, port, &[], &[]).await
    }

    /// Starts provider.mjs and waits for the line in which it names its
    /// issuer; its output goes to a log beside `keys`, quoted if it fails.
    async fn spawn(keys: &Path, port: u16, consoles: &[&str], env: &[(&str, &str)]) -> Self {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = keys.with_file_name(format!("provider-{n}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("devtools/oidc/provider.mjs");
        let mut child = tokio::process::Command::new("node")
            .arg(script)
            .env("PORT", port.to_string())
            .env("JWKS_FILE", keys)
            .env("OIDC_PROVIDER_MODULE", provider_module())
            .env("CONSOLE_URLS", consoles.join(","))
            .envs(env.iter().copied())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .expect("node runs the provider");
        // Whole lines only: a line still being written could be a prefix
        // of the port.
        let announced = |text: &str| {
            text.split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .find_map(|l| {
                    l.strip_prefix("oidc-provider port ")
                        .and_then(|p| p.trim().parse::<u16>().ok())
                })
        };
        let mut exited = None;
        let started = labsync_test_support::poll_until(
            std::time::Duration::from_millis(20),
            PROVIDER_START,
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                std::future::ready(exited.is_some() || announced(&text).is_some())
            },
        )
        .await;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let Some(port) = announced(&text).filter(|_| started.is_ok() && exited.is_none()) else {
            panic!(
                "the provider did not start ({}); its output:\n{text}",
                exited.map_or_else(
                    || format!("nothing within {PROVIDER_START:?}"),
                    |s| s.to_string()
                )
            );
        };
        Self { child, port }
    }

    pub(crate) fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An access token of the machine client `client`.
    pub(crate) async fn token(&self, client: &str) -> String {
        let r: Value = reqwest::Client::new()
            .post(format!("{}/token", self.issuer()))
            .basic_auth(client, Some(format!("{client}-secret")))
            .form(&[("grant_type", "client_credentials"), ("scope", "api")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("a token for {client}: {r}"))
            .to_owned()
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `token` with its header replaced by `header` (and no signature when
/// `signature` is empty).
fn reheader(token: &str, header: &Value, signature: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    format!(
        "{}.{payload}.{signature}",
        b64(header.to_string().as_bytes())
    )
}

async fn app_for(provider: &Provider) -> TestApp {
    TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__OIDC__ISSUER", &provider.issuer()),
            ("LABSYNC__OIDC__AUDIENCE", "labsync"),
            ("LABSYNC__OIDC__LEEWAY_SECS", "0"),
        ],
    )
    .await
}

/// The status of `GET /api/v1/workers` with `token`, and its problem's
/// detail.
async fn call(api: &TestApi, token: &str) -> (StatusCode, String) {
    let (s, body) = api.get("/api/v1/workers", token).await;
    assert!(!body.to_string().contains(token), "the token is not echoed");
    (s, body["detail"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn a_providers_token_names_its_caller_with_the_role_of_its_claims_and_every_bad_one_says_why()
{
    let dir = tempdir();
    let keys = dir.join("keys.json");
    let provider = Provider::start(&keys).await;
    let t = app_for(&provider).await;
    t.refresh().await;
    let api = TestApi::start(&t).await;

    // Roles from realm_access.roles, the highest match.
    let admin = provider.token("labsync-admin").await;
    assert_eq!(call(&api, &admin).await.0, StatusCode::OK);
    let operator = provider.token("labsync-operator").await;
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    let (s, body) = api
        .send(api.req(Method::POST, "/api/v1/labs/refresh", Some(&operator)))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, body) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{lab}"),
            Some(&operator),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let audit = t.audit(&lab).await;
    assert!(
        audit
            .iter()
            .any(|a| a.actor.to_string() == "person:labsync-operator (labsync-operator)"),
        "the audit names the token's person and subject: {audit:?}"
    );
    // ES256, signed with the provider's P-256 key, verifies as well; a
    // changed signature of it does not.
    let es = provider.token("es256-operator").await;
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(es.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ES256", "{header}");
    assert_eq!(call(&api, &es).await.0, StatusCode::OK);
    let mut bad = es.clone().into_bytes();
    let at = bad.len() - 10;
    bad[at] = if bad[at] == b'A' { b'B' } else { b'A' };
    let (s, detail) = call(&api, &String::from_utf8(bad).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{detail}");
    assert!(detail.contains("signature"), "{detail}");
    let (s, detail) = call(&api, &provider.token("labsync-nobody").await).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(detail.contains("no labsync role"), "{detail}");

    // Each refusal names its check.
    let refused = [
        (provider.token("other-audience").await, "another audience"),
        (
            {
                // A character in the middle of the signature: still
                // base64, no longer the signature.
                let mut t = admin.clone().into_bytes();
                let at = t.len() - 20;
                t[at] = if t[at] == b'A' { b'B' } else { b'A' };
                String::from_utf8(t).unwrap()
            },
            "signature",
        ),
        (
            reheader(&admin, &json!({"alg": "none", "typ": "JWT"}), ""),
            "\"none\"",
        ),
        (
            hs256_with_the_public_key(&provider, &admin).await,
            "\"HS256\"",
        ),
        ("not.a.jwt".to_owned(), "not a JWT"),
    ];
    for (token, why) in &refused {
        let (s, detail) = call(&api, token).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{why}: {detail}");
        assert!(detail.contains(why), "{why}: {detail}");
    }
    // The sign-in form takes API tokens only: a session would outlive the JWT.
    let form = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(api.url("/login"))
        .form(&[("token", admin.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), StatusCode::UNAUTHORIZED);
    assert!(form.headers().get("set-cookie").is_none());
    // A flood of unknown key ids reads the provider's key set at most
    // once per 10 s, however many requests ask.
    let reads = || async {
        reqwest::get(format!("{}/test/key-set-reads", provider.issuer()))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["reads"]
            .as_u64()
            .unwrap()
    };
    let before = reads().await;
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let forged = reheader(
                &admin,
                &json!({"alg": "RS256", "typ": "JWT", "kid": uuid::Uuid::new_v4().to_string()}),
                admin.split('.').nth(2).unwrap(),
            );
            let api = &api;
            async move { call(api, &forged).await }
        })
        .collect();
    for (s, detail) in futures::future::join_all(flood).await {
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(detail.contains("does not publish"), "{detail}");
    }
    let after = reads().await;
    assert!(
        after - before <= 1,
        "{} reads of the key set",
        after - before
    );
    let short = provider.token("short-lived").await;
    eventually("the short-lived token to expire", || async {
        call(&api, &short).await.1.contains("expired")
    })
    .await;

    // Another issuer with the very same keys: its signature verifies, its
    // issuer does not.
    let other = Provider::start(&keys).await;
    let (s, detail) = call(&api, &other.token("labsync-admin").await).await;
    assert_eq!(
        (s, detail.contains("another issuer")),
        (StatusCode::UNAUTHORIZED, true),
        "{detail}"
    );
    other.stop().await;

    // The provider rotates its key: new tokens work without a restart.
    let port = provider.port;
    provider.stop().await;
    std::fs::remove_file(&keys).unwrap();
    let provider = Provider::restart_on(&keys, port).await;
    let rotated = provider.token("labsync-admin").await;
    eventually("a token signed with the new key to be taken", || async {
        call(&api, &rotated).await.0 == StatusCode::OK
    })
    .await;

    // Stopped: API tokens still work, and readiness names the provider.
    provider.stop().await;
    assert_eq!(call(&api, VIEWER_TOKEN).await.0, StatusCode::OK);
    eventually_within(
        std::time::Duration::from_secs(30),
        "readiness to name the provider",
        || async {
            let (s, ready) = api.get("/api/v1/readyz", ADMIN_TOKEN).await;
            assert_eq!(
                s,
                StatusCode::OK,
                "API tokens keep the service ready: {ready}"
            );
            ready["oidc"]
                .as_str()
                .is_some_and(|o| o.contains("OpenID Connect provider cannot be read"))
        },
    )
    .await;
    assert_eq!(
        call(&api, &rotated).await.0,
        StatusCode::OK,
        "kept keys go on verifying"
    );
    api.stop().await;
    drop(dir_guard(dir));
}

/// An HS256 token whose secret is the provider's public key: what a
/// verifier that takes the key for a secret would accept.
async fn hs256_with_the_public_key(provider: &Provider, like: &str) -> String {
    let jwks: Value = reqwest::get(format!("{}/jwks", provider.issuer()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let public = jwks["keys"][0].to_string();
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": jwks["keys"][0]["kid"]});
    let payload = like.split('.').nth(1).unwrap();
    let signing = format!("{}.{payload}", b64(header.to_string().as_bytes()));
    let key = jsonwebtoken::EncodingKey::from_secret(public.as_bytes());
    let signature =
        jsonwebtoken::crypto::sign(signing.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
            .unwrap();
    format!("{signing}.{signature}")
}

pub(crate) fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("labsync-oidc-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes `dir` when dropped.
pub(crate) struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
pub(crate) fn dir_guard(dir: PathBuf) -> DirGuard {
    DirGuard(dir)
}
