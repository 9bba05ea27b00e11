//! [`WorkerRepository`] on MongoDB. The worker id is the document `_id`;
//! the CML password is stored sealed with AES-256-GCM (see
//! [`crate::crypto`]) and only decrypted for the CML gateway. It is sealed
//! to the worker's id, URL and user ([`Worker::credential_binding`]): a
//! change of URL or user without the password again is refused here too,
//! and could not decrypt anyway. Documents sealed before the binding
//! (no `sealed_to`) open with the id alone, until their password is next
//! set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use labsync_application::RepoError;
use labsync_application::ports::{WorkerAccess, WorkerRepository};
use labsync_domain::{BaseUrl, TlsSettings, Worker, WorkerId};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, doc};
use mongodb::{Collection, Database};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::convert::date;
use super::{collections, map_error};
use crate::crypto::{PasswordCipher, Sealed};

/// What `reseal_with` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Sealed under the new key now.
    pub resealed: usize,
    /// Under the new key already (an earlier run's work).
    pub already: usize,
    /// Workers left as they were, and why.
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SealedDoc {
    nonce: Binary,
    ciphertext: Binary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerDoc {
    #[serde(rename = "_id")]
    id: String,
    name: String,
    base_url: String,
    username: String,
    password: SealedDoc,
    ca_cert_pem: Option<String>,
    insecure: bool,
    enabled: bool,
    /// Absent in documents written before the option existed.
    #[serde(default)]
    lab_tiles: bool,
    #[serde(default)]
    allow_http: bool,
    /// What the password is sealed to: `id+url+user`, or absent for the id
    /// alone (documents from before the binding).
    #[serde(default)]
    sealed_to: Option<String>,
    created_at: mongodb::bson::DateTime,
}

impl WorkerDoc {
    fn worker(&self) -> Result<Worker, RepoError> {
        Ok(Worker {
            id: WorkerId::parse(&self.id).map_err(|e| RepoError::Corrupt(e.to_string()))?,
            name: self.name.clone(),
            base_url: BaseUrl::from_stored(self.base_url.clone()),
            username: self.username.clone(),
            tls: TlsSettings::from_stored(self.ca_cert_pem.clone(), self.insecure, self.allow_http),
            enabled: self.enabled,
            lab_tiles: self.lab_tiles,
        })
    }
}

fn binary(bytes: Vec<u8>) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes,
    }
}

/// The `sealed_to` of a password sealed to [`Worker::credential_binding`].
const BINDING: &str = "id+url+user";

/// How long a worker read from the database is reused. Deletes and
/// refreshes read their worker on every call; a change made through another
/// process is seen within this time (changes made here are seen at once).
pub const WORKER_CACHE_TTL: Duration = Duration::from_secs(5);

/// Workers read recently, and a generation that every change moves on: a
/// read that began before a change must not put what it read back after
/// the change forgot it.
#[derive(Debug, Default)]
struct CacheState {
    entries: HashMap<WorkerId, (Instant, WorkerAccess)>,
    generation: u64,
}

type Cache = Arc<Mutex<CacheState>>;

#[derive(Debug, Clone)]
pub struct MongoWorkerRepository {
    workers: Collection<WorkerDoc>,
    cipher: Option<PasswordCipher>,
    cache: Cache,
}

impl MongoWorkerRepository {
    /// Without a cipher, workers can be listed and removed, but not added
    /// or used (their passwords cannot be sealed or opened).
    pub fn new(db: &Database, cipher: Option<PasswordCipher>) -> Self {
        Self {
            workers: db.collection(collections::WORKERS),
            cipher,
            cache: Arc::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn forget(&self, id: &WorkerId) {
        let mut cache = self.cache();
        cache.entries.remove(id);
        cache.generation += 1;
    }

    /// Seals every worker's password under this repository's key, opening
    /// it with `old` where this key cannot (`labsync security rotate-key`).
    ///
    /// # Guarantees
    /// - Per worker, atomic: the new seal replaces the old one only if the
    ///   stored seal is still the one read (a password changed meanwhile is
    ///   not overwritten; that worker is reported and a run again takes it).
    /// - Resumable: a worker already sealed under this key is left as it
    ///   is, so a run cut short is finished by the next.
    /// - What a seal is bound to (id, URL, user) stays the same.
    ///
    /// # Errors
    /// Without this repository's key; when the store fails.
    pub async fn reseal_with(&self, old: &PasswordCipher) -> Result<ResealReport, RepoError> {
        let new = self.cipher()?;
        let docs: Vec<WorkerDoc> = self
            .workers
            .find(doc! {})
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        let mut report = ResealReport::default();
        for d in docs {
            let sealed = Sealed {
                nonce: d.password.nonce.bytes.clone(),
                ciphertext: d.password.ciphertext.bytes.clone(),
            };
            // One document that does not read is that worker's failure,
            // not the end of the rotation.
            let context = match (d.sealed_to.as_deref(), d.worker()) {
                (Some(BINDING), Ok(w)) => w.credential_binding(),
                (None, _) => d.id.clone(),
                (Some(BINDING), Err(e)) => {
                    report.failed.push((d.id.clone(), e.to_string()));
                    continue;
                }
                (Some(other), _) => {
                    report.failed.push((
                        d.id.clone(),
                        format!("sealed to an unknown binding {other:?}"),
                    ));
                    continue;
                }
            };
            if new.open_with_current_key(&sealed, &context).is_ok() {
                report.already += 1;
                continue;
            }
            let password = match old.open(&sealed, &context) {
                Ok(p) => p,
                Err(e) => {
                    report
                        .failed
                        .push((d.id.clone(), format!("the old key does not open it: {e}")));
                    continue;
                }
            };
            let resealed = new.seal(&password, &context).map_err(RepoError::Other)?;
            let r = self
                .workers
                .update_one(
                    doc! {"_id": &d.id, "password.ciphertext": d.password.ciphertext.clone()},
                    doc! {"$set": {"password": {
                        "nonce": binary(resealed.nonce),
                        "ciphertext": binary(resealed.ciphertext),
                    }}},
                )
                .await
                .map_err(map_error)?;
            if r.matched_count == 1 {
                report.resealed += 1;
            } else {
                report.failed.push((
                    d.id.clone(),
                    "its password changed while it was resealed: run again".into(),
                ));
            }
        }
        let mut cache = self.cache();
        cache.entries.clear();
        cache.generation += 1;
        Ok(report)
    }

    fn cipher(&self) -> Result<&PasswordCipher, RepoError> {
        self.cipher.as_ref().ok_or_else(|| {
            RepoError::NotConfigured(
                "security.encryption_key is not set (LABSYNC__SECURITY__ENCRYPTION_KEY): \
                 worker passwords cannot be encrypted or decrypted"
                    .into(),
            )
        })
    }
}

/// Matches the worker's document only while every setting is still as in
/// `worker`: a compare-and-set, so that a change read before another
/// landed cannot overwrite it. Flags written after the first documents
/// (absent there) match as false.
fn unchanged_since(worker: &Worker) -> mongodb::bson::Document {
    let flag = |on: bool| {
        if on {
            mongodb::bson::Bson::Boolean(true)
        } else {
            doc! {"$ne": true}.into()
        }
    };
    doc! {
        "_id": worker.id.as_str(),
        "name": &worker.name,
        "base_url": worker.base_url.as_str(),
        "username": &worker.username,
        "ca_cert_pem": worker.tls.ca_cert_pem(),
        "insecure": worker.tls.insecure(),
        "enabled": worker.enabled,
        "lab_tiles": flag(worker.lab_tiles),
        "allow_http": flag(worker.tls.allow_http),
    }
}

#[async_trait]
impl WorkerRepository for MongoWorkerRepository {
    async fn add(&self, worker: &Worker, password: &SecretString) -> Result<(), RepoError> {
        let sealed = self
            .cipher()?
            .seal(password, &worker.credential_binding())
            .map_err(RepoError::Other)?;
        let doc = WorkerDoc {
            id: worker.id.to_string(),
            name: worker.name.clone(),
            base_url: worker.base_url.to_string(),
            username: worker.username.clone(),
            password: SealedDoc {
                nonce: binary(sealed.nonce),
                ciphertext: binary(sealed.ciphertext),
            },
            ca_cert_pem: worker.tls.ca_cert_pem().map(str::to_owned),
            insecure: worker.tls.insecure(),
            enabled: worker.enabled,
            lab_tiles: worker.lab_tiles,
            allow_http: worker.tls.allow_http,
            sealed_to: Some(BINDING.to_owned()),
            created_at: date(chrono::Utc::now()),
        };
        self.workers.insert_one(doc).await.map_err(map_error)?;
        Ok(())
    }

    async fn get(&self, id: &WorkerId) -> Result<Option<WorkerAccess>, RepoError> {
        let generation = {
            let cache = self.cache();
            if let Some((at, access)) = cache.entries.get(id)
                && at.elapsed() < WORKER_CACHE_TTL
            {
                return Ok(Some(access.clone()));
            }
            cache.generation
        };
        let Some(doc) = self
            .workers
            .find_one(doc! {"_id": id.as_str()})
            .await
            .map_err(map_error)?
        else {
            return Ok(None);
        };
        let sealed = Sealed {
            nonce: doc.password.nonce.bytes.clone(),
            ciphertext: doc.password.ciphertext.bytes.clone(),
        };
        let worker = doc.worker()?;
        let context = match doc.sealed_to.as_deref() {
            Some(BINDING) => worker.credential_binding(),
            None => id.to_string(),
            Some(other) => {
                return Err(RepoError::Corrupt(format!(
                    "worker {id}: password sealed to an unknown binding {other:?}"
                )));
            }
        };
        let password = self
            .cipher()?
            .open(&sealed, &context)
            .map_err(|e| RepoError::Corrupt(format!("worker {id}: {e}")))?;
        let access = WorkerAccess { worker, password };
        let mut cache = self.cache();
        // Kept only if nothing changed while it was read.
        if cache.generation == generation {
            cache
                .entries
                .insert(id.clone(), (Instant::now(), access.clone()));
        }
        Ok(Some(access))
    }

    async fn settings(&self, id: &WorkerId) -> Result<Option<Worker>, RepoError> {
        self.workers
            .find_one(doc! {"_id": id.as_str()})
            .await
            .map_err(map_error)?
            .map(|d| d.worker())
            .transpose()
    }

    async fn list(&self) -> Result<Vec<Worker>, RepoError> {
        let docs: Vec<WorkerDoc> = self
            .workers
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        docs.iter().map(WorkerDoc::worker).collect()
    }

    async fn update(
        &self,
        before: &Worker,
        worker: &Worker,
        password: Option<&SecretString>,
    ) -> Result<bool, RepoError> {
        self.forget(&worker.id);
        if before.id != worker.id {
            return Err(RepoError::Other(format!(
                "worker {}: an update cannot change the id (read {})",
                worker.id, before.id
            )));
        }
        // Without the password, where it goes and how it is protected on
        // the way must not change: the filter below pins the stored
        // document to `before`, so these pin it to `worker` too.
        if password.is_none()
            && (worker.base_url != before.base_url
                || worker.username != before.username
                || worker.tls != before.tls)
        {
            return Err(RepoError::Other(format!(
                "worker {}: changing its URL, user or TLS settings needs its password again",
                worker.id
            )));
        }
        let mut set = doc! {
            "name": &worker.name,
            "base_url": worker.base_url.as_str(),
            "username": &worker.username,
            "ca_cert_pem": worker.tls.ca_cert_pem(),
            "insecure": worker.tls.insecure(),
            "allow_http": worker.tls.allow_http,
            "enabled": worker.enabled,
            "lab_tiles": worker.lab_tiles,
        };
        if let Some(password) = password {
            let sealed = self
                .cipher()?
                .seal(password, &worker.credential_binding())
                .map_err(RepoError::Other)?;
            set.insert(
                "password",
                doc! {"nonce": binary(sealed.nonce), "ciphertext": binary(sealed.ciphertext)},
            );
            set.insert("sealed_to", BINDING);
        }
        let r = self
            .workers
            .update_one(unchanged_since(before), doc! {"$set": set})
            .await
            .map_err(map_error)?;
        // A read that raced with the write must not keep the old settings.
        self.forget(&worker.id);
        Ok(r.matched_count > 0)
    }

    async fn remove(&self, id: &WorkerId) -> Result<bool, RepoError> {
        self.forget(id);
        let r = self
            .workers
            .delete_one(doc! {"_id": id.as_str()})
            .await
            .map_err(map_error)?;
        Ok(r.deleted_count > 0)
    }
}
