//! The console in a real headless Chromium, driven through chromedriver
//! (WebDriver), against the service on a real MongoDB-wire server and the
//! CML simulator. Each story saves a screenshot under target/screenshots/.

use std::process::Stdio;

use cml_sim::LabSpec;
use fantoccini::{Client, ClientBuilder, Locator};
use labsync_application::domain::{Actor, LabId};
use labsync_application::{RefreshAll, RefreshOptions};
use labsync_test_support::eventually;
use serde_json::json;

use crate::helpers::{OPERATOR_TOKEN, TestApi, TestApp, VIEWER_TOKEN};

/// A headless Chromium behind its own chromedriver, gone when dropped.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: tokio::process::Child,
}

impl Browser {
    pub(crate) async fn start() -> Self {
        let port = crate::helpers::free_port();
        // In a process group of its own, so that dropping the browser (a
        // test that failed half-way) takes Chromium down with its driver.
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver runs (scripts/install-tools.sh installs chromium-driver)");
        let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(json!({
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }))
        .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        eventually("chromedriver listens", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("chromedriver starts a headless Chromium");
        Self { client, driver }
    }

    pub(crate) async fn sign_in(&self, api: &TestApi, token: &str) {
        let c = &self.client;
        c.goto(&api.url("/login")).await.unwrap();
        c.find(Locator::Css("#token"))
            .await
            .unwrap()
            .send_keys(token)
            .await
            .unwrap();
        c.find(Locator::Css("form[action='/login'] button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("meta[name='csrf-token']"))
            .await
            .expect("signed in");
    }

    /// Clicks the element `css` finds.
    pub(crate) async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Saves what the page shows to target/screenshots/`name`.png.
    pub(crate) async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// The rows of the labs table, as (lab id, state).
    pub(crate) async fn rows(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in self
            .client
            .find_all(Locator::Css("table.labs tbody tr"))
            .await
            .unwrap()
        {
            out.push((
                r.attr("data-lab").await.unwrap().unwrap_or_default(),
                r.attr("data-state").await.unwrap().unwrap_or_default(),
            ));
        }
        out
    }

    pub(crate) async fn has_row(&self, lab: &LabId) -> bool {
        self.client
            .find_all(Locator::Css(&format!("tr[data-lab='{lab}']")))
            .await
            .unwrap()
            .len()
            == 1
    }

    /// The text of the first element `css` finds, or "" when there is
    /// none (yet), read in one step: a live redraw cannot pull the
    /// element away between finding and reading it.
    pub(crate) async fn text(&self, css: &str) -> String {
        self.read(css, "innerText").await
    }

    /// `property` of the first element `css` finds (`data-*` as its
    /// attribute), or "".
    pub(crate) async fn read(&self, css: &str, property: &str) -> String {
        self.client
            .execute(
                "const [css, p] = arguments; const e = document.querySelector(css); \
                 return e ? String(p.startsWith('data-') ? e.getAttribute(p) : e[p]) : '';",
                vec![json!(css), json!(property)],
            )
            .await
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Types `text` into the field `css` finds.
    pub(crate) async fn fill(&self, css: &str, text: &str) {
        let field = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Waits until the element `css` finds says `what`.
    pub(crate) async fn until_says(&self, css: &str, what: &str) {
        eventually(&format!("{css} to say {what:?}"), || async {
            self.text(css).await.contains(what)
        })
        .await;
    }

    pub(crate) async fn stop(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and every Chromium process it started.
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// Two simulated workers, both refreshed.
async fn fleet() -> TestApp {
    let t = TestApp::spawn_with(2, &[]).await;
    refresh_all(&t).await;
    t
}

async fn refresh_all(t: &TestApp) {
    RefreshAll::new(t.services().clone())
        .execute(&Actor::api("admin"), RefreshOptions::default())
        .await
        .unwrap();
}

fn add_lab(t: &TestApp, title: &str, state: &str) -> LabId {
    let lab = t
        .sim()
        .add_lab(LabSpec {
            state: Some(state.into()),
            lab_title: Some(title.into()),
            ..LabSpec::default()
        })
        .unwrap();
    LabId::parse(&lab.id).unwrap()
}

#[tokio::test]
async fn a_person_signs_in_and_sees_the_fleet_synced_and_the_labs_filtered() {
    let t = fleet().await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, OPERATOR_TOKEN).await;
    b.client.goto(&api.url("/fleet")).await.unwrap();
    let mut synced = Vec::new();
    for row in b
        .client
        .find_all(Locator::Css("table.fleet tbody tr"))
        .await
        .unwrap()
    {
        let worker = row.attr("data-worker").await.unwrap().unwrap_or_default();
        let sync = row
            .find(Locator::Css("[data-sync]"))
            .await
            .unwrap()
            .attr("data-sync")
            .await
            .unwrap()
            .unwrap_or_default();
        synced.push((worker, sync));
    }
    assert_eq!(
        synced,
        [
            ("cml-1".to_owned(), "synced".to_owned()),
            ("cml-2".to_owned(), "synced".to_owned())
        ]
    );
    b.screenshot("fleet").await;

    b.client
        .goto(&api.url("/labs?state=STARTED"))
        .await
        .unwrap();
    let rows = b.rows().await;
    assert!(!rows.is_empty(), "the seeded fleet has started labs");
    assert!(rows.iter().all(|(_, state)| state == "STARTED"), "{rows:?}");
    let target = add_lab(&t, "Needle in the fleet", "STOPPED");
    refresh_all(&t).await;
    b.client.goto(&api.url("/labs?q=needle")).await.unwrap();
    assert_eq!(b.rows().await, [(target.to_string(), "STOPPED".to_owned())]);
    b.screenshot("labs-filtered").await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_person_pages_through_five_hundred_labs_seeing_each_once() {
    let t = fleet().await;
    for n in 0..500 {
        add_lab(&t, &format!("bulk lab {n:03}"), "STOPPED");
    }
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, VIEWER_TOKEN).await;
    b.client.goto(&api.url("/labs?q=bulk")).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut pages = 0;
    loop {
        pages += 1;
        for (lab, _) in b.rows().await {
            assert!(seen.insert(lab.clone()), "{lab} shown twice");
        }
        let next = b.client.find_all(Locator::Css("a.next")).await.unwrap();
        let Some(next) = next.into_iter().next() else {
            break;
        };
        let before = b.client.current_url().await.unwrap();
        next.click().await.unwrap();
        eventually("the next page", || async {
            b.client.current_url().await.unwrap() != before
        })
        .await;
    }
    assert_eq!((seen.len(), pages), (500, 5));
    b.screenshot("labs-paged").await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_hostile_title_shows_as_text_and_runs_nothing() {
    let t = fleet().await;
    let hostile = "<img src=x onerror=alert(1)><script>alert(2)</script>";
    let lab = add_lab(&t, hostile, "STOPPED");
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, OPERATOR_TOKEN).await;
    b.client.goto(&api.url("/labs?q=onerror")).await.unwrap();
    let cell = b
        .client
        .find(Locator::Css(&format!("tr[data-lab='{lab}'] td.title")))
        .await
        .unwrap();
    assert_eq!(cell.text().await.unwrap(), hostile);
    assert!(
        cell.find_all(Locator::Css("img, script"))
            .await
            .unwrap()
            .is_empty(),
        "no element was made from the title"
    );
    assert!(b.client.get_alert_text().await.is_err(), "no dialog opened");
    // The dialog names the lab as text too.
    cell.find(Locator::XPath("..//button[@data-delete]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let named = b.client.find(Locator::Css("#c-title")).await.unwrap();
    assert_eq!(named.text().await.unwrap(), hostile);
    assert!(b.client.get_alert_text().await.is_err(), "no dialog opened");
    b.screenshot("hostile-title").await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn an_operator_deletes_a_wiped_lab_and_a_running_one_after_stop_and_wipe() {
    let t = fleet().await;
    let wiped = add_lab(&t, "Wiped, to delete", "DEFINED_ON_CORE");
    let running = add_lab(&t, "Running, to delete", "STARTED");
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, OPERATOR_TOKEN).await;

    b.client.goto(&api.url("/labs?q=to+delete")).await.unwrap();
    let delete = |lab: &LabId| format!("tr[data-lab='{lab}'] button[data-delete]");
    b.click(&delete(&wiped)).await;
    b.click("#c-delete").await;
    eventually("the wiped lab's row goes", || async {
        !b.has_row(&wiped).await
    })
    .await;
    assert!(
        t.sim().lab(wiped.as_str()).is_none(),
        "CML no longer has it"
    );

    b.click(&delete(&running)).await;
    b.click("#c-delete").await;
    let force = b.client.find(Locator::Css("#c-force")).await.unwrap();
    eventually("the refusal offers stop, wipe and delete", || async {
        force.is_displayed().await.unwrap_or(false)
    })
    .await;
    let said = b
        .client
        .find(Locator::Css("#c-message"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        said.contains("request"),
        "the problem's detail and request id: {said}"
    );
    b.screenshot("delete-running-refused").await;
    force.click().await.unwrap();
    eventually("the running lab's row goes", || async {
        !b.has_row(&running).await
    })
    .await;
    assert!(
        t.sim().lab(running.as_str()).is_none(),
        "CML no longer has it"
    );
    b.screenshot("deleted").await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn three_labs_deleted_at_once_each_say_how_they_ended() {
    let t = fleet().await;
    let first = add_lab(&t, "Batch one", "DEFINED_ON_CORE");
    let refused = add_lab(&t, "Batch two", "STARTED");
    let third = add_lab(&t, "Batch three", "DEFINED_ON_CORE");
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, OPERATOR_TOKEN).await;
    b.client.goto(&api.url("/labs?q=batch")).await.unwrap();
    for lab in [&first, &refused, &third] {
        b.click(&format!("tr[data-lab='{lab}'] input[data-select]"))
            .await;
    }
    b.click("#delete-selected").await;
    eventually("the two wiped labs' rows go", || async {
        !b.has_row(&first).await && !b.has_row(&third).await
    })
    .await;
    let reason = b
        .client
        .find(Locator::Css(&format!(
            "tr[data-lab='{refused}'] td.outcome"
        )))
        .await
        .unwrap();
    eventually("the refused lab says why", || async {
        reason.text().await.unwrap_or_default().contains("STARTED")
    })
    .await;
    assert!(t.sim().lab(first.as_str()).is_none() && t.sim().lab(third.as_str()).is_none());
    assert!(
        t.sim().lab(refused.as_str()).is_some(),
        "CML keeps the refused lab"
    );
    b.screenshot("batch-delete").await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn the_audit_page_answers_who_deleted_a_lab_that_is_gone() {
    let t = fleet().await;
    let lab = add_lab(&t, "Deleted, then asked about", "DEFINED_ON_CORE");
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    api.delete_lab(&lab).await;
    let b = Browser::start().await;
    b.sign_in(&api, VIEWER_TOKEN).await;
    b.client.goto(&api.url("/audit")).await.unwrap();
    b.client
        .find(Locator::Css("input[name='lab_id']"))
        .await
        .unwrap()
        .send_keys(lab.as_str())
        .await
        .unwrap();
    b.click("form.filters button").await;
    b.client
        .wait()
        .for_element(Locator::Css("table.audit"))
        .await
        .unwrap();
    let mut rows = Vec::new();
    for r in b
        .client
        .find_all(Locator::Css("table.audit tbody tr"))
        .await
        .unwrap()
    {
        let cell = |css: &'static str| {
            let r = r.clone();
            async move {
                r.find(Locator::Css(css))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            }
        };
        rows.push((
            cell("td.actor").await,
            cell("td.action").await,
            cell("td.outcome").await,
        ));
    }
    assert!(
        rows.contains(&(
            "API token operator".into(),
            "delete".into(),
            "deleted".into()
        )),
        "{rows:?}"
    );
    b.screenshot("audit").await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn an_open_labs_page_follows_a_prune_and_another_replicas_delete_without_a_reload() {
    let t = fleet().await;
    let pruned = add_lab(&t, "Live: gone from CML", "STOPPED");
    let deleted = add_lab(&t, "Live: deleted elsewhere", "DEFINED_ON_CORE");
    refresh_all(&t).await;
    let first = TestApi::start(&t).await;
    let second = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&first, VIEWER_TOKEN).await;
    b.client.goto(&first.url("/labs?q=live")).await.unwrap();
    assert_eq!(b.rows().await.len(), 2);
    eventually("the page's event stream is open", || async {
        b.client
            .find(Locator::Css("body[data-live='open']"))
            .await
            .is_ok()
    })
    .await;
    // Behind labsync's back, then a refresh prunes it.
    assert!(t.sim().remove_lab(pruned.as_str()));
    refresh_all(&t).await;
    eventually("the pruned lab's row goes", || async {
        !b.has_row(&pruned).await
    })
    .await;
    // Deleted through the other replica.
    second.delete_lab(&deleted).await;
    eventually("the deleted lab's row goes", || async {
        !b.has_row(&deleted).await
    })
    .await;
    // A lab that appears shows up too.
    let new = add_lab(&t, "Live: new in CML", "STOPPED");
    refresh_all(&t).await;
    eventually("the new lab's row comes", || async {
        b.has_row(&new).await
    })
    .await;
    b.screenshot("live").await;
    b.stop().await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_held_prune_is_shown_with_its_labs_and_applied_by_an_admin() {
    let t = fleet().await;
    // Most of cml-1's labs gone from CML at once: the prune guard holds.
    let gone: Vec<String> = t
        .sim()
        .labs()
        .iter()
        .take(20)
        .map(|l| l.id.clone())
        .collect();
    for id in &gone {
        assert!(t.sim().remove_lab(id));
    }
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, crate::helpers::ADMIN_TOKEN).await;
    b.client.goto(&api.url("/fleet")).await.unwrap();
    let held = b
        .client
        .find(Locator::Css("tr[data-worker='cml-1'] .held"))
        .await
        .unwrap();
    assert!(held.text().await.unwrap().contains("20 prunes held"));
    let mut listed = Vec::new();
    for li in held
        .find_all(Locator::Css("ul.held-labs li"))
        .await
        .unwrap()
    {
        listed.push(li.html(true).await.unwrap());
    }
    assert_eq!(listed.len(), 20, "every held lab is named");
    assert!(
        gone.iter()
            .all(|id| listed.iter().any(|l| l.contains(id.as_str())))
    );
    b.screenshot("held-prune").await;
    held.find(Locator::Css("button.apply-prune"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("the prune is applied and the page says so", || async {
        b.client
            .find_all(Locator::Css("tr[data-worker='cml-1'] .held"))
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let left = t.records().await;
    assert!(
        left.iter().all(|r| !gone.contains(&r.lab_id.to_string())),
        "the held labs are pruned"
    );
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_viewer_sees_no_delete_and_a_forged_or_tokenless_change_is_refused() {
    let t = fleet().await;
    let lab = add_lab(&t, "Viewer's view", "DEFINED_ON_CORE");
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, VIEWER_TOKEN).await;
    b.client.goto(&api.url("/labs?q=viewer")).await.unwrap();
    assert_eq!(b.rows().await.len(), 1);
    assert!(
        b.client
            .find_all(Locator::Css("button[data-delete]"))
            .await
            .unwrap()
            .is_empty(),
        "a viewer has no Delete button"
    );
    b.screenshot("viewer").await;
    // A delete forged from the viewer's own session, with its CSRF token.
    let path = format!("/api/v1/workers/cml-1/labs/{lab}");
    let forged = b
        .client
        .execute_async(
            "const [path, done] = arguments;
             const csrf = document.querySelector('meta[name=\"csrf-token\"]').content;
             fetch(path, {method: 'DELETE', headers: {'x-csrf-token': csrf}})
               .then(r => done(r.status));",
            vec![json!(path)],
        )
        .await
        .unwrap();
    assert_eq!(forged, json!(403));
    // Nor may it refresh, or see the admin's worker form.
    let forged = b
        .client
        .execute_async(
            "const [done] = arguments;
             const csrf = document.querySelector('meta[name=\"csrf-token\"]').content;
             fetch('/api/v1/labs/refresh', {method: 'POST', headers: {'x-csrf-token': csrf}})
               .then(r => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(forged, json!(403));
    b.client.goto(&api.url("/workers/new")).await.unwrap();
    assert!(
        b.client
            .find_all(Locator::Css("#worker-form"))
            .await
            .unwrap()
            .is_empty(),
        "no worker form for a viewer"
    );
    b.stop().await;

    // An operator's session without the CSRF token changes nothing either.
    let b = Browser::start().await;
    b.sign_in(&api, OPERATOR_TOKEN).await;
    b.client.goto(&api.url("/labs")).await.unwrap();
    let tokenless = b
        .client
        .execute_async(
            "const [path, done] = arguments;
             fetch(path, {method: 'DELETE'}).then(r => done(r.status));",
            vec![json!(path)],
        )
        .await
        .unwrap();
    assert_eq!(tokenless, json!(403));
    assert!(t.sim().lab(lab.as_str()).is_some(), "CML still has the lab");
    // Signed out, the session opens nothing.
    b.click("form.signout button").await;
    b.client
        .wait()
        .for_element(Locator::Css("#token"))
        .await
        .unwrap();
    b.client.goto(&api.url("/labs")).await.unwrap();
    assert!(
        b.client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/login")
    );
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_session_ends_on_the_server_at_sign_out_and_sign_in_refuses_other_sites() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |origin: Option<&'static str>, token: &'static str| {
        let mut r = http.post(api.url("/login")).form(&[("token", token)]);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    // A wrong token: the form again, as a page, saying why.
    let wrong = login(None, "not-a-token").await.unwrap();
    assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(
        wrong.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = wrong.text().await.unwrap();
    assert!(
        page.contains("id=\"token\"") && page.contains("unknown API token"),
        "{page}"
    );
    // Another site's form signs no one in.
    let forged = login(Some("https://elsewhere.example"), OPERATOR_TOKEN)
        .await
        .unwrap();
    assert_eq!(forged.status(), reqwest::StatusCode::FORBIDDEN);
    assert!(!forged.headers().contains_key("set-cookie"));

    let ok = login(None, OPERATOR_TOKEN).await.unwrap();
    assert_eq!(ok.status(), reqwest::StatusCode::SEE_OTHER);
    let cookie = ok.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let labs = http
        .get(api.url("/labs"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(labs.status(), reqwest::StatusCode::OK);
    assert_eq!(labs.headers()["cache-control"], "no-store");
    let html = labs.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let out = http
        .post(api.url("/logout"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), reqwest::StatusCode::SEE_OTHER);
    // The old cookie, replayed, opens nothing: the session is gone.
    let replay = http
        .get(api.url("/api/v1/workers"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), reqwest::StatusCode::UNAUTHORIZED);
    api.stop().await;
}

#[tokio::test]
async fn every_answer_forbids_inline_script_framing_and_sniffing() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    for path in ["/login", "/api/v1/healthz", "/assets/console.js"] {
        let r = api.http.get(api.url(path)).send().await.unwrap();
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
    }
    // A page without a session sends the browser to sign in.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(api.url("/labs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/login");
    api.stop().await;
}

#[tokio::test]
async fn an_admin_refreshes_one_worker_then_the_fleet_and_sees_each_run_end() {
    let t = fleet().await;
    add_lab(&t, "New in CML", "STOPPED");
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, crate::helpers::ADMIN_TOKEN).await;
    b.client.goto(&api.url("/fleet")).await.unwrap();
    let counts = b.text("tr[data-worker='cml-1'] td.counts").await;
    assert!(
        counts.contains(&format!("{} labs", crate::helpers::SEEDED_LABS)),
        "{counts}"
    );
    assert!(
        b.text("p.schedule").await.contains("next"),
        "the next scheduled refresh is shown"
    );
    b.click("tr[data-worker='cml-1'] button.refresh").await;
    b.until_says("#fleet-message", "Refresh of cml-1 succeeded (created 1")
        .await;
    // The page is drawn again with the run's effect.
    b.until_says(
        "tr[data-worker='cml-1'] td.counts",
        &format!("{} labs", crate::helpers::SEEDED_LABS + 1),
    )
    .await;
    b.click("#refresh-all").await;
    b.until_says("#fleet-message", "Refresh of cml-2 succeeded")
        .await;
    b.screenshot("fleet-refresh").await;
    b.client
        .goto(&api.url("/runs?worker_id=cml-1&status=succeeded"))
        .await
        .unwrap();
    let runs = b
        .client
        .find_all(Locator::Css("table.runs tbody tr"))
        .await
        .unwrap();
    assert!(
        runs.len() >= 2,
        "the fleet's first run and the two of this story"
    );
    for r in &runs {
        assert_eq!(
            r.attr("data-worker").await.unwrap().as_deref(),
            Some("cml-1")
        );
    }
    b.screenshot("runs").await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_run_made_elsewhere_shows_on_an_open_fleet_page_without_a_reload() {
    let t = fleet().await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, VIEWER_TOKEN).await;
    b.client.goto(&api.url("/fleet")).await.unwrap();
    assert!(
        b.client
            .find_all(Locator::Css("button.refresh"))
            .await
            .unwrap()
            .is_empty(),
        "a viewer has no refresh button"
    );
    eventually("the stream to open", || async {
        b.client
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .attr("data-live")
            .await
            .unwrap()
            .as_deref()
            == Some("open")
    })
    .await;
    // As the CLI or another replica would: a run not started by this
    // page, which changes no lab (so only the run's own event tells).
    let run = labsync_application::RefreshWorkerLabs::new(t.services().clone())
        .execute(
            &labsync_application::domain::WorkerId::parse("cml-2").unwrap(),
            &Actor::cli("ops"),
            RefreshOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!((run.created, run.updated, run.pruned), (0, 0, 0));
    eventually("the page shows the new run", || async {
        b.read("tr[data-worker='cml-2'] td.last-run", "data-run")
            .await
            == run.run_id
    })
    .await;
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_labs_page_sorted_by_title_pages_in_that_order() {
    let t = fleet().await;
    // Titles whose order is neither the lab ids' nor the workers'.
    let mut titles: Vec<String> = (0..130)
        .map(|n| format!("sorted {:03}", (n * 37) % 130))
        .collect();
    for title in &titles {
        add_lab(&t, title, "STOPPED");
    }
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, VIEWER_TOKEN).await;
    b.client
        .goto(&api.url("/labs?q=sorted&sort=title"))
        .await
        .unwrap();
    let mut shown = Vec::new();
    loop {
        for cell in b
            .client
            .find_all(Locator::Css("table.labs td.title"))
            .await
            .unwrap()
        {
            shown.push(cell.text().await.unwrap());
        }
        let next = b.client.find_all(Locator::Css("a.next")).await.unwrap();
        let Some(next) = next.into_iter().next() else {
            break;
        };
        let before = b.client.current_url().await.unwrap();
        next.click().await.unwrap();
        eventually("the next page", || async {
            b.client.current_url().await.unwrap() != before
        })
        .await;
    }
    titles.sort();
    assert_eq!(
        shown, titles,
        "every lab once, in title order, across pages"
    );
    b.client
        .goto(&api.url("/labs?q=sorted&sort=modified"))
        .await
        .unwrap();
    assert_eq!(
        b.client
            .find_all(Locator::Css("table.labs tbody tr"))
            .await
            .unwrap()
            .len(),
        100,
        "a page of the newest"
    );
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_labs_own_page_shows_its_fields_and_history_and_outlives_its_delete() {
    let t = fleet().await;
    let lab = add_lab(&t, "Detailed <b>lab</b>", "DEFINED_ON_CORE");
    refresh_all(&t).await;
    t.sim()
        .update_lab(
            lab.as_str(),
            LabSpec {
                lab_title: Some("Detailed, renamed".into()),
                lab_notes: Some("line one\nline <two>".into()),
                ..LabSpec::default()
            },
        )
        .unwrap();
    refresh_all(&t).await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, OPERATOR_TOKEN).await;
    b.client.goto(&api.url("/labs?q=Detailed")).await.unwrap();
    b.click(&format!("tr[data-lab='{lab}'] td.title a")).await;
    b.until_says("article.lab h1", "Detailed, renamed").await;
    let fields = b.text("dl.fields").await;
    assert!(
        fields.contains("line <two>") && fields.contains("DEFINED_ON_CORE"),
        "{fields}"
    );
    let history = b.text("table.history").await;
    assert!(
        history.contains("title")
            && history.contains("Detailed <b>lab</b>")
            && history.contains("first seen"),
        "{history}"
    );
    b.screenshot("lab-page").await;
    b.click("article.lab button[data-delete]").await;
    b.click("#c-delete").await;
    b.until_says("p.gone", "not in the inventory").await;
    let trail = b.text("table.audit").await;
    assert!(
        trail.contains("delete") && trail.contains("API token operator"),
        "the trail names who deleted it: {trail}"
    );
    assert!(t.sim().lab(lab.as_str()).is_none(), "CML no longer has it");
    b.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn an_admin_adds_tests_edits_disables_and_removes_a_worker() {
    let t = fleet().await;
    let api = TestApi::start(&t).await;
    let b = Browser::start().await;
    b.sign_in(&api, crate::helpers::ADMIN_TOKEN).await;
    b.client.goto(&api.url("/fleet")).await.unwrap();
    b.click("a[href='/workers/new']").await;
    // The second simulated server again, under another id.
    let url = t.sim.worker("cml-2").unwrap().base_url();
    b.fill("input[name=id]", "cml-3").await;
    b.fill("input[name=base_url]", &url).await;
    b.fill("input[name=username]", "admin").await;
    b.fill("input[name=password]", "not the password").await;
    b.click("input[name=allow_http]").await;
    b.click("#w-test").await;
    b.until_says("#w-message", "Failed (credentials)").await;
    b.screenshot("worker-test-failed").await;
    b.fill("input[name=password]", crate::helpers::ADMIN_PASSWORD)
        .await;
    b.click("#w-test").await;
    b.until_says("#w-message", "Connection works").await;
    b.click("#w-save").await;
    b.until_says("tr[data-worker='cml-3']", "cml-3").await;
    assert!(
        t.services()
            .workers
            .get(&labsync_application::domain::WorkerId::parse("cml-3").unwrap())
            .await
            .unwrap()
            .is_some()
    );

    b.click("tr[data-worker='cml-3'] a.edit").await;
    b.fill("input[name=name]", "Third server").await;
    b.click("#w-save").await;
    b.until_says("tr[data-worker='cml-3']", "Third server")
        .await;
    b.click("tr[data-worker='cml-3'] button.toggle").await;
    eventually("the worker shows disabled", || async {
        b.client
            .find_all(Locator::Css(
                "tr[data-worker='cml-3'] [data-sync='disabled']",
            ))
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    b.screenshot("fleet-workers").await;
    b.click("tr[data-worker='cml-3'] button.remove").await;
    b.click("#r-remove").await;
    eventually("the worker's row goes", || async {
        b.client
            .find_all(Locator::Css("tr[data-worker='cml-3']"))
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let audit = t
        .services()
        .audit
        .search(&labsync_application::ports::AuditQuery {
            worker: Some(labsync_application::domain::WorkerId::parse("cml-3").unwrap()),
            lab: None,
            actor: None,
            action: None,
            since: None,
            before: None,
            limit: 10,
        })
        .await
        .unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.entry.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "worker_removed",
            "worker_updated",
            "worker_updated",
            "worker_added"
        ]
    );
    b.stop().await;
    api.stop().await;
}
