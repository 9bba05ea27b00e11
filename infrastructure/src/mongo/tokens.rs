//! [`MachineTokens`] on MongoDB: API tokens added and revoked while
//! labsync runs (`labsync token new|list|revoke`).
//!
//! # Expected flow
//! 1. `token new` stores the token's name, role, the SHA-256 of its
//!    secret, when it was made and, if asked, when it expires; the secret
//!    is printed once and never stored.
//! 2. A request whose bearer token is not in the configuration is looked
//!    up by the SHA-256 of its secret (unique index); an expired one is
//!    refused. Its use is noted at most once a minute.
//! 3. `token revoke` deletes it: the next request, on any replica, is
//!    refused.
//!
//! # Guarantees
//! - A copy of the database signs no one in: it holds hashes only.
//! - Names and secrets are unique (indexes); revoking frees the name.
//!
//! # Caveats
//! Every request with a stored token reads the store once; tokens in the
//! configuration are checked first and need no read. A console session
//! made with a revoked token ends at its next request.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_application::RepoError;
use labsync_application::ports::{MachineToken, MachineTokens};
use mongodb::bson::{Bson, Document, doc};
use mongodb::{Collection, Database};

use super::convert::date;
use super::{collections, find_sorted, map_error};

#[derive(Debug, Clone)]
pub struct MongoMachineTokens {
    tokens: Collection<Document>,
}

impl MongoMachineTokens {
    pub fn new(db: &Database) -> Self {
        Self {
            tokens: db.collection(collections::API_TOKENS),
        }
    }
}

fn optional_date(t: Option<DateTime<Utc>>) -> Bson {
    t.map_or(Bson::Null, |t| Bson::DateTime(date(t)))
}

fn from_doc(d: &Document) -> Result<MachineToken, RepoError> {
    let text = |k: &str| {
        d.get_str(k)
            .map(str::to_owned)
            .map_err(|_| RepoError::Corrupt(format!("api token without {k}")))
    };
    let time = |k: &str| d.get_datetime(k).ok().map(|t| t.to_chrono());
    Ok(MachineToken {
        name: text("name")?,
        role: text("role")?,
        sha256: text("sha256")?,
        created_at: time("created_at")
            .ok_or_else(|| RepoError::Corrupt("api token without created_at".into()))?,
        expires_at: time("expires_at"),
        last_used_at: time("last_used_at"),
    })
}

#[async_trait]
impl MachineTokens for MongoMachineTokens {
    async fn add(&self, t: &MachineToken) -> Result<(), RepoError> {
        self.tokens
            .insert_one(doc! {
                "name": &t.name,
                "role": &t.role,
                "sha256": &t.sha256,
                "created_at": date(t.created_at),
                "expires_at": optional_date(t.expires_at),
                "last_used_at": optional_date(t.last_used_at),
            })
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn find(&self, sha256: &str) -> Result<Option<MachineToken>, RepoError> {
        self.tokens
            .find_one(doc! {"sha256": sha256})
            .await
            .map_err(map_error)?
            .as_ref()
            .map(from_doc)
            .transpose()
    }

    async fn list(&self) -> Result<Vec<MachineToken>, RepoError> {
        let docs = find_sorted(&self.tokens, doc! {}, doc! {"name": 1}, None).await?;
        docs.iter().map(from_doc).collect()
    }

    async fn revoke(&self, name: &str) -> Result<bool, RepoError> {
        let r = self
            .tokens
            .delete_one(doc! {"name": name})
            .await
            .map_err(map_error)?;
        Ok(r.deleted_count > 0)
    }

    async fn used(
        &self,
        sha256: &str,
        now: DateTime<Utc>,
        unless_after: DateTime<Utc>,
    ) -> Result<(), RepoError> {
        self.tokens
            .update_one(
                doc! {"sha256": sha256, "$or": [
                    {"last_used_at": Bson::Null},
                    {"last_used_at": {"$lt": date(unless_after)}},
                ]},
                doc! {"$set": {"last_used_at": date(now)}},
            )
            .await
            .map_err(map_error)?;
        Ok(())
    }
}
