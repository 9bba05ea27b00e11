//! [`Sessions`] on MongoDB: the console's sign-ins, one document each.
//!
//! # Expected flow
//! 1. Sign-in stores a session under the SHA-256 of the cookie's secret,
//!    with whom it speaks for (an API token's hash, or a person as the
//!    OpenID Connect provider described them), its CSRF token, and its two
//!    ends: absolute and idle.
//! 2. Every console request finds it by the same hash, ignoring one past
//!    either end, and now and then moves the idle end on; sign-out deletes
//!    it.
//! 3. A sign-in through the provider is kept (`sign_ins`) from leaving
//!    labsync until the callback takes it, once.
//!
//! # Guarantees
//! - The cookie's secret is never stored: a copy of the database signs no
//!   one in. Nor is a sign-in's `state`: only its hash.
//! - Every replica sees every session (they share the database), and a
//!   session ends everywhere at sign-out.
//! - An expired session signs no one in, even before MongoDB's TTL monitor
//!   (which runs about once a minute) removes it.
//! - A pending sign-in is taken by one callback at most
//!   (`findOneAndDelete`), so a replayed callback finds nothing.
//!
//! # Assumptions
//! The replicas' clocks agree to within seconds (expiry is judged by the
//! caller's `now`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_application::RepoError;
use labsync_application::ports::{
    ConsoleSession, PendingSignIn, SessionOf, Sessions, SignedInPerson,
};
use mongodb::bson::{Document, doc};
use mongodb::{Collection, Database};

use super::convert::date;
use super::{collections, map_error};

#[derive(Debug, Clone)]
pub struct MongoSessions {
    sessions: Collection<Document>,
    sign_ins: Collection<Document>,
}

impl MongoSessions {
    pub fn new(db: &Database) -> Self {
        Self {
            sessions: db.collection(collections::SESSIONS),
            sign_ins: db.collection(collections::SIGN_INS),
        }
    }
}

fn corrupt(what: &str, k: &str, e: impl std::fmt::Display) -> RepoError {
    RepoError::Corrupt(format!("{what} {k}: {e}"))
}

fn text(d: &Document, what: &str, k: &str) -> Result<String, RepoError> {
    d.get_str(k)
        .map(str::to_owned)
        .map_err(|e| corrupt(what, k, e))
}

fn time(d: &Document, what: &str, k: &str) -> Result<DateTime<Utc>, RepoError> {
    d.get_datetime(k)
        .map(|t| t.to_chrono())
        .map_err(|e| corrupt(what, k, e))
}

fn who_doc(who: &SessionOf) -> Document {
    match who {
        SessionOf::Token { sha256 } => doc! {"kind": "token", "sha256": sha256},
        SessionOf::Person(p) => doc! {
            "kind": "person",
            "subject": &p.subject,
            "display": &p.display,
            "username": p.username.as_deref(),
            "roles": &p.roles,
            "id_token": &p.id_token,
        },
    }
}

fn who_of(d: &Document) -> Result<SessionOf, RepoError> {
    let w = d
        .get_document("who")
        .map_err(|e| corrupt("session", "who", e))?;
    match w.get_str("kind") {
        Ok("token") => Ok(SessionOf::Token {
            sha256: text(w, "session", "sha256")?,
        }),
        Ok("person") => Ok(SessionOf::Person(SignedInPerson {
            subject: text(w, "session", "subject")?,
            display: text(w, "session", "display")?,
            username: w.get_str("username").ok().map(str::to_owned),
            roles: w
                .get_array("roles")
                .map_err(|e| corrupt("session", "roles", e))?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            id_token: text(w, "session", "id_token")?,
        })),
        other => Err(corrupt("session", "who.kind", format!("{other:?}"))),
    }
}

#[async_trait]
impl Sessions for MongoSessions {
    async fn create(&self, s: &ConsoleSession) -> Result<(), RepoError> {
        self.sessions
            .insert_one(doc! {
                "_id": &s.key,
                "who": who_doc(&s.who),
                "csrf": &s.csrf,
                "created_at": date(s.created_at),
                "expires_at": date(s.expires_at),
                "idle_until": date(s.idle_until),
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
        // A session stored before sessions had an idle end (and a `who`)
        // has ended: its person signs in again, once.
        let Some(d) = found.filter(|d| d.contains_key("idle_until")) else {
            return Ok(None);
        };
        let expires_at = time(&d, "session", "expires_at")?;
        let idle_until = time(&d, "session", "idle_until")?;
        if idle_until <= now {
            return Ok(None);
        }
        Ok(Some(ConsoleSession {
            key: text(&d, "session", "_id")?,
            who: who_of(&d)?,
            csrf: text(&d, "session", "csrf")?,
            created_at: time(&d, "session", "created_at")?,
            expires_at,
            idle_until,
        }))
    }

    async fn touch(&self, key: &str, idle_until: DateTime<Utc>) -> Result<(), RepoError> {
        self.sessions
            .update_one(
                doc! {"_id": key},
                doc! {"$max": {"idle_until": date(idle_until)}},
            )
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn end(&self, key: &str) -> Result<(), RepoError> {
        self.sessions
            .delete_one(doc! {"_id": key})
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn begin_sign_in(&self, p: &PendingSignIn) -> Result<(), RepoError> {
        self.sign_ins
            .insert_one(doc! {
                "_id": &p.key,
                "browser": &p.browser,
                "verifier": &p.verifier,
                "nonce": &p.nonce,
                "expires_at": date(p.expires_at),
            })
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn take_sign_in(
        &self,
        key: &str,
        browser: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<PendingSignIn>, RepoError> {
        // Taken whether or not it has expired: an expired one is of no use
        // to anyone later either.
        let Some(d) = self
            .sign_ins
            .find_one_and_delete(doc! {"_id": key, "browser": browser})
            .await
            .map_err(map_error)?
        else {
            return Ok(None);
        };
        let expires_at = time(&d, "sign-in", "expires_at")?;
        if expires_at <= now {
            return Ok(None);
        }
        Ok(Some(PendingSignIn {
            key: text(&d, "sign-in", "_id")?,
            browser: text(&d, "sign-in", "browser")?,
            verifier: text(&d, "sign-in", "verifier")?,
            nonce: text(&d, "sign-in", "nonce")?,
            expires_at,
        }))
    }
}
