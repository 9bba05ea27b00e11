//! People sign in to the console through a real OpenID Connect provider
//! (oidc-provider, with its own login page): in headless Chromium, and by
//! an agent that follows the same redirects and posts the same forms. Every
//! delete names the person; a self-service person deletes only their own
//! labs; a session lives in MongoDB, so any replica serves it, and ends
//! idle, at sign-out, everywhere.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;

use cml_sim::LabSpec;
use fantoccini::Locator;
use labsync_application::domain::LabId;
use labsync_test_support::eventually;
use mongodb::bson::doc;
use reqwest::StatusCode;

use crate::console::Browser;
use crate::helpers::free_port;
use crate::helpers::{TestApi, TestApp};
use crate::oidc::{DirGuard, Provider, dir_guard, tempdir};

/// The people of devtools/oidc/provider.mjs, as labsync's audit names them.
const OLIVIA: &str = "person:7f3a9c2e-olivia (olivia)";
const STUDENT: &str = "person:c41d0b7a-student (student)";

/// labsync with console sign-in through a provider of its own.
struct Setup {
    t: TestApp,
    api: TestApi,
    provider: Provider,
    /// The settings that point a replica at the provider.
    oidc: Vec<(String, String)>,
    _dir: DirGuard,
}

impl Setup {
    async fn start(extra: &[(&str, &str)]) -> Self {
        Self::start_with(extra, &[]).await
    }

    /// With settings for labsync (`extra`) and for the provider.
    async fn start_with(extra: &[(&str, &str)], provider_env: &[(&str, &str)]) -> Self {
        let dir = tempdir();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let provider =
            Provider::start_with(&dir.join("keys.json"), &[base.as_str()], provider_env).await;
        let mut oidc: Vec<(String, String)> = [
            ("LABSYNC__OIDC__ISSUER", provider.issuer()),
            ("LABSYNC__OIDC__AUDIENCE", "labsync".into()),
            ("LABSYNC__OIDC__CLIENT_ID", "labsync-console".into()),
            (
                "LABSYNC__OIDC__CLIENT_SECRET",
                "labsync-console-secret".into(),
            ),
            (
                "LABSYNC__OIDC__REDIRECT_URL",
                format!("{base}/auth/callback"),
            ),
            (
                "LABSYNC__OIDC__ROLES",
                "labsync-viewer=viewer,labsync-self-service=self-service,\
                 labsync-operator=operator,labsync-admin=admin"
                    .into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        oidc.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let pairs: Vec<(&str, &str)> = oidc.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let t = TestApp::spawn_with(1, &pairs).await;
        t.refresh().await;
        let api = TestApi::start_on(&t, listener).await;
        Self {
            t,
            api,
            provider,
            oidc,
            _dir: dir_guard(dir),
        }
    }

    fn lab(&self, title: &str, owner: &str) -> LabId {
        self.t.sim().add_user(owner);
        let lab = self
            .t
            .sim()
            .add_lab(LabSpec {
                state: Some("DEFINED_ON_CORE".into()),
                lab_title: Some(title.into()),
                owner_username: Some(owner.into()),
                ..LabSpec::default()
            })
            .unwrap();
        LabId::parse(&lab.id).unwrap()
    }

    async fn stop(self) {
        self.api.stop().await;
        self.provider.stop().await;
    }
}

/// A person without a browser: follows redirects itself and keeps each
/// host's cookies, as a browser would (paths aside).
struct Agent {
    http: reqwest::Client,
    jar: HashMap<String, BTreeMap<String, String>>,
}

fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| format!("{}:{}", u.host_str().unwrap_or(""), u.port().unwrap_or(80)))
        .unwrap()
}

impl Agent {
    fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            jar: HashMap::new(),
        }
    }

    fn cookies(&self, url: &str) -> String {
        self.jar
            .get(&host_of(url))
            .map(|c| {
                c.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
    }

    /// The value of labsync's session cookie for `url`'s host.
    fn session(&self, url: &str) -> Option<String> {
        self.jar.get(&host_of(url))?.get("labsync_session").cloned()
    }

    fn keep(&mut self, url: &str, r: &reqwest::Response) {
        let jar = self.jar.entry(host_of(url)).or_default();
        for c in r.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let (name, value) = c.split(';').next().unwrap().split_once('=').unwrap();
            if value.is_empty() || c.contains("Max-Age=0") {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    async fn send(&mut self, r: reqwest::RequestBuilder, url: &str) -> reqwest::Response {
        let r = r.header("cookie", self.cookies(url)).send().await.unwrap();
        self.keep(url, &r);
        r
    }

    /// GETs `url` and every redirect after it; the last answer, and where
    /// it came from.
    async fn follow(&mut self, url: &str) -> (String, reqwest::Response) {
        let mut url = url.to_owned();
        for _ in 0..10 {
            let r = self.send(self.http.get(&url), &url).await;
            let Some(next) = r.headers().get("location") else {
                return (url, r);
            };
            url = reqwest::Url::parse(&url)
                .unwrap()
                .join(next.to_str().unwrap())
                .unwrap()
                .to_string();
        }
        panic!("more than 10 redirects from {url}");
    }

    /// From labsync's "Sign in with your organisation" to the provider's
    /// login page, filled in: where the provider sends the browser back.
    async fn through_the_provider(&mut self, base: &str, login: &str) -> String {
        let (at, page) = self.follow(&format!("{base}/auth/start")).await;
        let html = page.text().await.unwrap();
        let action = html
            .split("action=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("the provider's login page at {at}: {html}"));
        let post = reqwest::Url::parse(&at)
            .unwrap()
            .join(action)
            .unwrap()
            .to_string();
        let r = self
            .send(
                self.http
                    .post(&post)
                    .form(&[("login", login), ("password", &format!("{login}-password"))]),
                &post,
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::SEE_OTHER,
            "{login} signs in at the provider"
        );
        let mut url = post;
        let mut r = r;
        loop {
            let next = reqwest::Url::parse(&url)
                .unwrap()
                .join(r.headers()["location"].to_str().unwrap())
                .unwrap()
                .to_string();
            if next.starts_with(&format!("{base}/auth/callback")) {
                return next;
            }
            url = next;
            r = self.send(self.http.get(&url), &url).await;
            assert!(r.status().is_redirection(), "{url}: {}", r.status());
        }
    }

    /// Signs `login` in through the provider; the callback's answer.
    async fn sign_in(&mut self, base: &str, login: &str) -> reqwest::Response {
        let callback = self.through_the_provider(base, login).await;
        self.send(self.http.get(&callback), &callback).await
    }
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('/', "%2F")
}

/// The CSRF token a console page carries.
fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("a signed-in page: {html}"))
        .to_owned()
}

/// `GET path` on `base` with a session cookie only.
async fn with_cookie(base: &str, path: &str, session: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}{path}"))
        .header("cookie", format!("labsync_session={session}"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_person_signs_in_on_the_providers_page_lands_on_the_fleet_and_their_delete_names_them() {
    let s = Setup::start(&[]).await;
    let lab = s.lab("Olivia's wiped lab", "olivia");
    s.t.refresh().await;
    let b = Browser::start().await;

    b.client.goto(&s.api.url("/login")).await.unwrap();
    b.screenshot("sign-in-with-the-provider").await;
    b.click("#provider-sign-in").await;
    b.client
        .wait()
        .for_element(Locator::Css("#username"))
        .await
        .expect("the provider's own login page");
    assert!(
        b.client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .starts_with(&s.provider.issuer()),
        "the password is typed at the provider, never at labsync"
    );
    b.screenshot("provider-login").await;
    b.fill("#username", "olivia").await;
    b.fill("#password", "olivia-password").await;
    b.click("#submit").await;
    b.client
        .wait()
        .for_element(Locator::Css("meta[name='csrf-token']"))
        .await
        .expect("signed in");
    eventually("the fleet page", || async {
        b.client
            .current_url()
            .await
            .is_ok_and(|u| u.path() == "/fleet")
    })
    .await;
    let who = b.text("span.who").await;
    assert!(
        who.contains("olivia") && who.contains("operator"),
        "the person and the role their claims map to: {who}"
    );
    b.screenshot("signed-in-through-the-provider").await;

    // A delete from the console names the person in the audit log, the
    // lab's history and its event.
    b.client.goto(&s.api.url("/labs?q=Olivia")).await.unwrap();
    b.click(&format!("tr[data-lab='{lab}'] button[data-delete]"))
        .await;
    b.click("#c-delete").await;
    eventually("the lab's row goes", || async { !b.has_row(&lab).await }).await;
    assert!(
        s.t.sim().lab(lab.as_str()).is_none(),
        "CML no longer has it"
    );
    let audit = s.t.audit(&lab).await;
    assert!(
        audit.iter().any(|a| a.actor.to_string() == OLIVIA),
        "the audit names sub and display name: {audit:?}"
    );
    let event =
        s.t.app
            .db
            .collection::<mongodb::bson::Document>("outbox")
            .find_one(doc! {"lab_id": lab.as_str(), "kind": "deleted"})
            .await
            .unwrap()
            .expect("a deleted event");
    assert!(
        event.to_string().contains(OLIVIA),
        "the event names the person: {event}"
    );
    b.client
        .goto(&s.api.url(&format!("/labs/cml-1/{lab}")))
        .await
        .unwrap();
    let trail = b.text("td.actor").await;
    assert!(
        trail.contains("olivia") && trail.contains("7f3a9c2e-olivia"),
        "the lab's trail shows the person by name and sub: {trail}"
    );
    b.screenshot("a-delete-names-its-person").await;

    // Sign-out ends the session here and at the provider.
    let session = b
        .client
        .get_named_cookie("labsync_session")
        .await
        .unwrap()
        .value()
        .to_owned();
    b.click("form.signout button").await;
    b.client
        .wait()
        .for_element(Locator::Css("#sign-out"))
        .await
        .expect("the provider asks to end its own session");
    b.click("#sign-out").await;
    b.client
        .wait()
        .for_element(Locator::Css("#provider-sign-in"))
        .await
        .expect("back on labsync's sign-in page");
    assert_eq!(
        with_cookie(&s.api.base, "/api/v1/workers", &session)
            .await
            .status(),
        StatusCode::UNAUTHORIZED,
        "the old cookie opens nothing"
    );
    b.click("#provider-sign-in").await;
    b.client
        .wait()
        .for_element(Locator::Css("#username"))
        .await
        .expect("the provider asks for the password again: its session ended too");
    b.stop().await;
    s.stop().await;
}

#[tokio::test]
async fn a_session_made_on_one_replica_is_served_by_another_and_sign_out_there_ends_it_on_both() {
    let s = Setup::start(&[]).await;
    let port = free_port();
    let other = format!("http://127.0.0.1:{port}");
    let _replica = tokio::process::Command::new(env!("CARGO_BIN_EXE_labsync"))
        .arg("serve")
        .envs(s.t.env())
        .envs(s.oidc.clone())
        .env("LABSYNC__API__LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("a second labsync serve");
    eventually("the second replica answers", || async {
        reqwest::get(format!("{other}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;

    let mut olivia = Agent::new();
    let signed_in = olivia.sign_in(&s.api.base, "olivia").await;
    assert_eq!(signed_in.status(), StatusCode::OK);
    let session = olivia.session(&s.api.base).expect("a session cookie");

    let page = with_cookie(&other, "/fleet", &session).await;
    assert_eq!(page.status(), StatusCode::OK, "the other replica serves it");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("olivia") && html.contains("operator"),
        "{html}"
    );
    let out = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{other}/logout"))
        .header("cookie", format!("labsync_session={session}"))
        .form(&[("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::OK);
    let page = out.text().await.unwrap();
    let to = page
        .split("id=\"provider-sign-out\" href=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("a way on to the provider: {page}"));
    assert!(
        to.starts_with(&s.provider.issuer())
            && to.contains("id_token_hint=")
            && to.contains("post_logout_redirect_uri="),
        "on to the provider's end-session endpoint: {to}"
    );
    for base in [&s.api.base, &other] {
        assert_eq!(
            with_cookie(base, "/api/v1/workers", &session)
                .await
                .status(),
            StatusCode::UNAUTHORIZED,
            "ended on {base}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_callback_replayed_or_carried_to_another_browser_signs_no_one_in() {
    // The API's audience is the console's client id (one Keycloak client
    // for both): then the ID tokens the console keeps are for it too.
    let s = Setup::start(&[("LABSYNC__OIDC__AUDIENCE", "labsync-console")]).await;
    // Sent to someone else (a link in a mail): their browser did not
    // start this sign-in.
    let mut olivia = Agent::new();
    let callback = olivia.through_the_provider(&s.api.base, "olivia").await;
    let mut victim = Agent::new();
    let r = victim.send(victim.http.get(&callback), &callback).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(victim.session(&s.api.base).is_none());
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("not one this browser started")
    );
    // Nor did it spend the sign-in: its own browser still comes back in.
    let r = olivia.send(olivia.http.get(&callback), &callback).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(olivia.session(&s.api.base).is_some());

    // An answer that says another provider sent it (RFC 9207 `iss`).
    let mut mixed = Agent::new();
    let callback = mixed.through_the_provider(&s.api.base, "olivia").await;
    let elsewhere = callback.replace(
        &format!("iss={}", urlencode(&s.provider.issuer())),
        "iss=https%3A%2F%2Fsso.elsewhere.example",
    );
    assert_ne!(
        elsewhere, callback,
        "the provider says who it is: {callback}"
    );
    let r = mixed.send(mixed.http.get(&elsewhere), &elsewhere).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(mixed.session(&s.api.base).is_none());

    // A good sign-in, replayed: the second use finds nothing.
    let mut again = Agent::new();
    let callback = again.through_the_provider(&s.api.base, "olivia").await;
    let first = again.send(again.http.get(&callback), &callback).await;
    assert_eq!(first.status(), StatusCode::OK);
    let replay = again.send(again.http.get(&callback), &callback).await;
    assert_eq!(replay.status(), StatusCode::BAD_REQUEST);

    // The ID token kept for sign-out opens no API, whatever the audience.
    let stored =
        s.t.app
            .db
            .collection::<mongodb::bson::Document>("sessions")
            .find_one(doc! {})
            .await
            .unwrap()
            .unwrap();
    let id_token = stored
        .get_document("who")
        .unwrap()
        .get_str("id_token")
        .unwrap()
        .to_owned();
    let (status, body) = s.api.get("/api/v1/workers", &id_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["detail"].as_str().unwrap().contains("ID token"),
        "{body}"
    );

    // A person whose claims map to no labsync role gets no session.
    let mut nobody = Agent::new();
    let r = nobody.sign_in(&s.api.base, "nobody").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(nobody.session(&s.api.base).is_none());
    assert!(r.text().await.unwrap().contains("no labsync role"));
    s.stop().await;
}

#[tokio::test]
async fn a_self_service_person_deletes_their_own_wiped_lab_and_is_refused_someone_elses() {
    let s = Setup::start(&[]).await;
    let own = s.lab("The student's lab", "student");
    let theirs = s.lab("Olivia's lab", "olivia");
    s.t.refresh().await;
    let mut student = Agent::new();
    assert_eq!(
        student.sign_in(&s.api.base, "student").await.status(),
        StatusCode::OK
    );
    let session = student.session(&s.api.base).unwrap();
    let html = with_cookie(&s.api.base, "/labs", &session)
        .await
        .text()
        .await
        .unwrap();
    let row = |lab: &LabId| {
        html.split(&format!("data-lab=\"{lab}\""))
            .nth(1)
            .and_then(|r| r.split("</tr>").next())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        row(&own).contains("data-delete"),
        "a Delete for their own lab"
    );
    assert!(
        !row(&theirs).contains("data-delete"),
        "none for someone else's"
    );
    let csrf = csrf_of(&html);
    let delete = |lab: &LabId, mode: &str| {
        reqwest::Client::new()
            .delete(
                s.api
                    .url(&format!("/api/v1/workers/cml-1/labs/{lab}?mode={mode}")),
            )
            .header("cookie", format!("labsync_session={session}"))
            .header("x-csrf-token", &csrf)
            .send()
    };

    let refused = delete(&theirs, "sync").await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert!(
        problem["type"].as_str().unwrap().ends_with("not-lab-owner")
            && problem["detail"].as_str().unwrap().contains("\"olivia\""),
        "says whose it is: {problem}"
    );
    // Queued, it is refused before it is queued: it would hold the lab's
    // one active request.
    let queued = delete(&theirs, "async").await.unwrap();
    assert_eq!(queued.status(), StatusCode::FORBIDDEN);
    assert!(
        s.t.sim().lab(theirs.as_str()).is_some(),
        "CML still has someone else's lab"
    );
    // CML cannot say whose it is: nothing is queued to hold the lab.
    s.t.faults(serde_json::json!({"error_rate": {"lab_details": 1.0}}));
    let unknown = delete(&theirs, "async").await.unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_GATEWAY);
    assert!(
        s.t.app
            .delete_queue
            .recent(None, 10)
            .await
            .unwrap()
            .is_empty(),
        "no request holds someone else's lab"
    );
    s.t.faults(serde_json::json!({}));
    // Someone else's running lab, with force: refused before it is stopped.
    let running = s.lab("Olivia's running lab", "olivia");
    s.t.sim()
        .update_lab(
            running.as_str(),
            LabSpec {
                state: Some("STARTED".into()),
                ..LabSpec::default()
            },
        )
        .unwrap();
    let forced = reqwest::Client::new()
        .delete(
            s.api
                .url(&format!("/api/v1/workers/cml-1/labs/{running}?force=true")),
        )
        .header("cookie", format!("labsync_session={session}"))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        s.t.sim().lab(running.as_str()).unwrap().state,
        "STARTED",
        "not stopped, not wiped"
    );
    // Refusals leave someone else's lab's history alone.
    let history = s.t.record(&theirs).await.unwrap().history;
    assert!(
        history
            .iter()
            .all(|h| !format!("{h:?}").contains("not_owner")),
        "{history:?}"
    );

    let deleted = delete(&own, "sync").await.unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    assert!(s.t.sim().lab(own.as_str()).is_none(), "their own is gone");
    let audit = s.t.audit(&own).await;
    assert!(
        audit.iter().any(|a| a.actor.to_string() == STUDENT),
        "{audit:?}"
    );
    let refusals = s.t.audit(&theirs).await;
    assert!(
        refusals
            .iter()
            .any(|a| a.actor.to_string() == STUDENT && a.outcome == "not_owner"),
        "the refusal is audited with who asked: {refusals:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_session_unused_for_its_idle_time_ends_though_its_absolute_end_is_far() {
    let s = Setup::start(&[("LABSYNC__API__SESSION_IDLE_SECS", "2")]).await;
    let mut olivia = Agent::new();
    assert_eq!(
        olivia.sign_in(&s.api.base, "olivia").await.status(),
        StatusCode::OK
    );
    let session = olivia.session(&s.api.base).unwrap();
    let stored = || async {
        let key = labsync::http::session::key_of(&session);
        s.t.app
            .db
            .collection::<mongodb::bson::Document>("sessions")
            .find_one(doc! {"_id": key})
            .await
            .unwrap()
            .expect("stored")
    };
    let first = stored().await;
    let idle_end = |d: &mongodb::bson::Document| d.get_datetime("idle_until").unwrap().to_chrono();
    let absolute = first.get_datetime("expires_at").unwrap().to_chrono();
    assert!(absolute - idle_end(&first) > chrono::Duration::hours(11));
    // Used, it lives on past its first idle end...
    eventually("a request moves the idle end on", || async {
        with_cookie(&s.api.base, "/api/v1/workers", &session)
            .await
            .status()
            == StatusCode::OK
            && idle_end(&stored().await) > idle_end(&first)
    })
    .await;
    let first_end = idle_end(&first);
    eventually("its first idle end passes", || async {
        chrono::Utc::now() > first_end
    })
    .await;
    assert_eq!(
        with_cookie(&s.api.base, "/api/v1/workers", &session)
            .await
            .status(),
        StatusCode::OK,
        "past its first idle end, it lives on"
    );
    // A live stream of the session's ends with it, though nothing is sent.
    let stream = with_cookie(&s.api.base, "/api/v1/events/stream", &session).await;
    assert_eq!(stream.status(), StatusCode::OK);
    tokio::time::timeout(std::time::Duration::from_secs(30), stream.bytes())
        .await
        .expect("the stream ends by the session's idle end")
        .unwrap();
    // ...and left alone, it ends at its idle end.
    let end = idle_end(&stored().await);
    eventually("the idle end passes", || async { chrono::Utc::now() > end }).await;
    assert_eq!(
        with_cookie(&s.api.base, "/api/v1/workers", &session)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    s.stop().await;
}

#[tokio::test]
async fn a_provider_that_puts_roles_in_userinfo_only_still_signs_people_in_with_their_role() {
    let s = Setup::start_with(&[], &[("ID_TOKEN_CLAIMS", "minimal")]).await;
    let mut olivia = Agent::new();
    assert_eq!(
        olivia.sign_in(&s.api.base, "olivia").await.status(),
        StatusCode::OK,
        "roles read from userinfo"
    );
    let session = olivia.session(&s.api.base).unwrap();
    let html = with_cookie(&s.api.base, "/fleet", &session)
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("olivia · operator"), "{html}");
    s.stop().await;
}
