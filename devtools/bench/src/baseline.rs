//! The refresh of the service labsync replaces, written faithfully as the
//! benchmark's reference: five workers at a time; per worker, one lab at a
//! time; a new HTTP connection and a new login for every call; one
//! `find_one` and one full rewrite per lab, every run; one `delete_one` per
//! orphan.

use futures::StreamExt;
use mongodb::Database;
use mongodb::bson::{Document, doc};
use serde_json::Value;

use crate::fleet::ADMIN_PASSWORD;

async fn login(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    Ok(http
        .post(format!("{url}/api/v0/authenticate"))
        .json(&serde_json::json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// A fresh client: no pooled connection survives from one call to the next.
fn fresh_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?)
}

async fn get(url: &str, path: &str) -> anyhow::Result<Value> {
    let http = fresh_client()?;
    let token = login(&http, url).await?;
    Ok(http
        .get(format!("{url}/api/v0{path}"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn refresh_worker(db: &Database, name: &str, url: &str) -> anyhow::Result<u64> {
    let labs = db.collection::<Document>("baseline_labs");
    let ids: Vec<String> = serde_json::from_value(get(url, "/labs?show_all=true").await?)?;
    for id in &ids {
        let detail = get(url, &format!("/labs/{id}")).await?;
        let existing = labs.find_one(doc! {"worker": name, "lab_id": id}).await?;
        let mut d = mongodb::bson::to_document(&detail)?;
        d.insert("worker", name);
        d.insert("lab_id", id);
        if let Some(e) = existing {
            d.insert(
                "_id",
                e.get("_id").cloned().unwrap_or(mongodb::bson::Bson::Null),
            );
        }
        labs.replace_one(doc! {"worker": name, "lab_id": id}, d)
            .upsert(true)
            .await?;
    }
    let stored: Vec<Document> = {
        use futures::TryStreamExt;
        labs.find(doc! {"worker": name})
            .await?
            .try_collect()
            .await?
    };
    for s in stored {
        let id = s.get_str("lab_id").unwrap_or_default().to_owned();
        if !ids.contains(&id) {
            labs.delete_one(doc! {"worker": name, "lab_id": id}).await?;
        }
    }
    Ok(ids.len() as u64)
}

/// Refreshes every worker; returns how many labs were seen.
pub async fn refresh_all(db: &Database, workers: &[(String, String)]) -> anyhow::Result<u64> {
    let counts = futures::stream::iter(workers.iter())
        .map(|(name, url)| refresh_worker(db, name, url))
        .buffer_unordered(5)
        .collect::<Vec<_>>()
        .await;
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    Ok(total)
}
