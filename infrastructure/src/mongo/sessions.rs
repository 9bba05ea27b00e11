//! [`Sessions`] on MongoDB: the console's sign-ins, one document each.
//!
//! # Expected flow
//! 1. Sign-in stores a session under the SHA-256 of the cookie's secret,
//!    with who signed in, its CSRF token and when it expires.
//! 2. Every console request finds it by the same hash, ignoring an
//!    expired one; sign-out deletes it.
//!
//! # Guarantees
//! - The cookie's secret is never stored: a copy of the database signs no
//!   one in.
//! - Every replica sees every session (they share the database), and a
//!   session ends everywhere at sign-out.
//! - An expired session signs no one in, even before MongoDB's TTL monitor
//!   (which runs about once a minute) removes it.
//!
//! # Assumptions
//! The replicas' clocks agree to within seconds (expiry is judged by the
//! caller's `now`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_application::RepoError;
use labsync_application::ports::{ConsoleSession, Sessions};
use mongodb::bson::{Document, doc};
use mongodb::{Collection, Database};

use super::convert::date;
use super::{collections, map_error};

#[derive(Debug, Clone)]
pub struct MongoSessions {
    sessions: Collection<Document>,
}

impl MongoSessions {
    pub fn new(db: &Database) -> Self {
        Self {
            sessions: db.collection(collections::SESSIONS),
        }
    }
}

#[async_trait]
impl Sessions for MongoSessions {
    async fn create(&self, s: &ConsoleSession) -> Result<(), RepoError> {
        self.sessions
            .insert_one(doc! {
                "_id": &s.key,
                "subject": &s.subject,
                "csrf": &s.csrf,
                "created_at": date(s.created_at),
                "expires_at": date(s.expires_at),
            })
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn find(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ConsoleSession>, RepoError> {
        let found = self
            .sessions
            .find_one(doc! {"_id": key, "expires_at": {"$gt": date(now)}})
            .await
            .map_err(map_error)?;
        let Some(d) = found else {
            return Ok(None);
        };
        let text = |k: &str| {
            d.get_str(k)
                .map(str::to_owned)
                .map_err(|e| RepoError::Corrupt(format!("session {k}: {e}")))
        };
        let time = |k: &str| {
            d.get_datetime(k)
                .map(|t| t.to_chrono())
                .map_err(|e| RepoError::Corrupt(format!("session {k}: {e}")))
        };
        Ok(Some(ConsoleSession {
            key: text("_id")?,
            subject: text("subject")?,
            csrf: text("csrf")?,
            created_at: time("created_at")?,
            expires_at: time("expires_at")?,
        }))
    }

    async fn end(&self, key: &str) -> Result<(), RepoError> {
        self.sessions
            .delete_one(doc! {"_id": key})
            .await
            .map_err(map_error)?;
        Ok(())
    }
}
