//! MongoDB: the connection and the repositories that implement the
//! application's storage ports.
//!
//! One [`mongodb::Client`] per process, cloned into every repository (it is a
//! handle to a shared pool), with explicit server-selection and connect
//! timeouts so that an unreachable server fails a call in seconds instead of
//! hanging it. Dates are stored as BSON dates; driver errors are translated
//! into [`RepoError`] here and nowhere else (E11000 becomes `Duplicate`).

use labsync_application::RepoError;
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use secrecy::ExposeSecret;

use crate::configuration::MongoSettings;

mod audit;
mod convert;
mod delete_requests;
pub mod feed;
mod health;
mod labs;
mod lease;
pub mod outbox;
mod reports;
mod sessions;
mod tokens;
mod tombstones;
mod workers;

pub use audit::MongoAuditLog;
pub use delete_requests::MongoDeleteRequests;
pub use health::MongoHealth;
pub use labs::MongoLabRepository;
pub use lease::MongoRefreshLease;
pub use reports::MongoRunReports;
pub use sessions::MongoSessions;
pub use tokens::MongoMachineTokens;
pub use workers::{MongoWorkerRepository, ResealReport};

/// Why MongoDB could not be reached. The URI is never part of the message: it
/// may carry credentials.
#[derive(Debug, thiserror::Error)]
#[error("cannot use MongoDB database {database:?}: {kind}")]
pub struct ConnectError {
    database: String,
    kind: String,
}

/// Parses the URI, applies the timeouts and returns the configured database.
/// Connecting is lazy in the driver; this performs no I/O beyond DNS for
/// `mongodb+srv` URIs.
///
/// # Errors
/// [`ConnectError`] when the URI is invalid.
pub async fn connect(settings: &MongoSettings) -> Result<Database, ConnectError> {
    let fail = |e: mongodb::error::Error| ConnectError {
        database: settings.database.clone(),
        kind: redact_error(&e),
    };
    let mut options = ClientOptions::parse(settings.uri.expose_secret())
        .await
        .map_err(fail)?;
    options.server_selection_timeout = Some(settings.server_selection_timeout());
    options.connect_timeout = Some(settings.connect_timeout());
    options.app_name = Some("labsync".to_owned());
    let client = Client::with_options(options).map_err(fail)?;
    Ok(client.database(&settings.database))
}

/// A driver error as text, reduced to its kind for parse errors, whose
/// messages can quote the URI.
fn redact_error(e: &mongodb::error::Error) -> String {
    match *e.kind {
        mongodb::error::ErrorKind::InvalidArgument { .. } => {
            "invalid MongoDB URI (value not shown: it may contain credentials)".to_owned()
        }
        _ => e.to_string(),
    }
}

/// The collections labsync uses, by name.
pub mod collections {
    pub const WORKERS: &str = "workers";
    /// Live lab records and tombstones.
    pub const LABS: &str = "labs";
    pub const AUDIT: &str = "audit";
    pub const REFRESH_RUNS: &str = "refresh_runs";
    pub const LEASES: &str = "leases";
    /// Lab events waiting for (or done with) delivery.
    pub const OUTBOX: &str = "outbox";
    /// Deletes requested with `mode=async`.
    pub const DELETE_REQUESTS: &str = "delete_requests";
    /// One per lab with an active delete request (see `delete_requests`).
    pub const DELETE_REQUEST_LOCKS: &str = "delete_request_locks";
    /// Console sign-ins.
    pub const SESSIONS: &str = "sessions";
    /// Sign-ins through the OpenID Connect provider, between leaving for
    /// it and its callback.
    pub const SIGN_INS: &str = "sign_ins";
    /// API tokens added with `labsync token new`.
    pub const API_TOKENS: &str = "api_tokens";
}

/// Creates every index labsync relies on. Run at start-up, before serving:
/// the unique (worker_id, lab_id) index is what makes a tombstone refuse a
/// late upsert, so it must exist before the first refresh.
///
/// # Errors
/// [`RepoError`] when the database refuses or cannot be reached.
pub async fn ensure_indexes(db: &Database) -> Result<(), RepoError> {
    use mongodb::IndexModel;
    use mongodb::bson::{Document, doc};
    use mongodb::options::IndexOptions;

    let named = |keys: Document, name: &str| {
        IndexModel::builder()
            .keys(keys)
            .options(IndexOptions::builder().name(name.to_owned()).build())
            .build()
    };
    let ttl = |keys: Document, name: &str| {
        IndexModel::builder()
            .keys(keys)
            .options(
                IndexOptions::builder()
                    .name(name.to_owned())
                    .expire_after(std::time::Duration::ZERO)
                    .build(),
            )
            .build()
    };
    let labs = db.collection::<Document>(collections::LABS);
    labs.create_indexes([
        IndexModel::builder()
            .keys(doc! {"worker_id": 1, "lab_id": 1})
            .options(
                IndexOptions::builder()
                    .name("worker_lab_unique".to_owned())
                    .unique(true)
                    .build(),
            )
            .build(),
        ttl(doc! {"tombstone.expires_at": 1}, "tombstone_ttl"),
        // The console's sorted fleet pages, each order ending in the
        // unique key so that a cursor is one place in it.
        named(
            doc! {"title": 1, "worker_id": 1, "lab_id": 1},
            "fleet_by_title",
        ),
        named(
            doc! {"state": 1, "worker_id": 1, "lab_id": 1},
            "fleet_by_state",
        ),
        named(
            doc! {"modified": -1, "worker_id": 1, "lab_id": 1},
            "fleet_by_modified",
        ),
        // The fleet page's lab counts by state, per worker.
        named(doc! {"worker_id": 1, "state": 1}, "worker_state"),
    ])
    .await
    .map_err(map_error)?;
    // Records written before fencing get the lowest token, so that the
    // fence is a plain range condition on every live record.
    labs.update_many(
        doc! {"fence": {"$exists": false}, "tombstone": {"$exists": false}},
        doc! {"$set": {"fence": 0_i64}},
    )
    .await
    .map_err(map_error)?;
    // Workers registered before plain HTTP needed an explicit yes get a
    // no, so that an update's filter on the field matches them.
    db.collection::<Document>(collections::WORKERS)
        .update_many(
            doc! {"allow_http": {"$exists": false}},
            doc! {"$set": {"allow_http": false}},
        )
        .await
        .map_err(map_error)?;
    // Lease documents are kept (their epoch orders the runs): an index that
    // expired them, made by earlier releases, goes.
    let leases = db.collection::<Document>(collections::LEASES);
    let names = leases.list_index_names().await.unwrap_or_default();
    if names.iter().any(|n| n == "lease_ttl") {
        leases.drop_index("lease_ttl").await.map_err(map_error)?;
    }
    let outbox = db.collection::<Document>(collections::OUTBOX);
    outbox
        .create_indexes([
            ttl(doc! {"expires_at": 1}, "outbox_ttl"),
            named(doc! {"status": 1, "next_attempt_at": 1}, "due"),
            // The relay's per-lab order: a lab's undelivered events.
            named(doc! {"lab_id": 1, "status": 1}, "lab_status"),
            // Live views read events in the order they became visible.
            named(doc! {"visible_at": 1}, "visible"),
        ])
        .await
        .map_err(map_error)?;
    db.collection::<Document>(collections::DELETE_REQUESTS)
        .create_index(named(doc! {"status": 1, "next_attempt_at": 1}, "due"))
        .await
        .map_err(map_error)?;
    db.collection::<Document>(collections::AUDIT)
        .create_indexes([
            named(
                doc! {"worker_id": 1, "lab_id": 1, "at": -1},
                "worker_lab_at",
            ),
            // "Who deleted lab X", across workers, newest first.
            named(doc! {"lab_id": 1, "_id": -1}, "lab_newest"),
        ])
        .await
        .map_err(map_error)?;
    db.collection::<Document>(collections::REFRESH_RUNS)
        .create_indexes([
            named(doc! {"worker_id": 1, "started_at": -1}, "worker_started"),
            named(doc! {"started_at": -1}, "started"),
            // The runs page's filters, newest first.
            named(doc! {"status": 1, "started_at": -1}, "status_started"),
            named(
                doc! {"worker_id": 1, "status": 1, "started_at": -1},
                "worker_status_started",
            ),
            // Live views read finished runs in the order they finished.
            named(doc! {"finished_at": 1, "_id": 1}, "finished"),
        ])
        .await
        .map_err(map_error)?;
    for (collection, name) in [
        (collections::SESSIONS, "session_ttl"),
        (collections::SIGN_INS, "sign_in_ttl"),
    ] {
        db.collection::<Document>(collection)
            .create_index(ttl(doc! {"expires_at": 1}, name))
            .await
            .map_err(map_error)?;
    }
    let unique = |keys: Document, name: &str| {
        IndexModel::builder()
            .keys(keys)
            .options(
                IndexOptions::builder()
                    .name(name.to_owned())
                    .unique(true)
                    .build(),
            )
            .build()
    };
    db.collection::<Document>(collections::API_TOKENS)
        .create_indexes([
            unique(doc! {"name": 1}, "token_name"),
            unique(doc! {"sha256": 1}, "token_secret"),
        ])
        .await
        .map_err(map_error)?;
    Ok(())
}

/// MongoDB's duplicate key error code.
pub const DUPLICATE_KEY: i32 = 11000;

/// What an `update` command answered, statement by statement.
#[derive(Debug, Default)]
pub(crate) struct UpdateReply {
    /// Statements that matched a document or upserted one.
    pub n: u64,
    /// Positions of the statements that inserted a document.
    pub upserted: Vec<usize>,
    /// (position, code, message) of each statement the server refused.
    pub errors: Vec<(usize, i32, String)>,
}

/// Runs one unordered `update` command of `statements` on the labs
/// collection: the driver has no multi-statement update with per-statement
/// results outside the client `bulkWrite`, which the test server runs about
/// three times slower per document.
///
/// # Errors
/// [`RepoError`] when the command fails or the write is not acknowledged;
/// per-statement errors are in the reply.
pub(crate) async fn update_labs(
    db: &Database,
    statements: Vec<mongodb::bson::Document>,
) -> Result<UpdateReply, RepoError> {
    use mongodb::bson::{Bson, Document, doc};
    let reply = db
        .run_command(doc! {"update": collections::LABS, "updates": statements, "ordered": false})
        .await
        .map_err(map_error)?;
    if let Ok(wc) = reply.get_document("writeConcernError") {
        return Err(RepoError::Other(format!(
            "write not acknowledged: {}",
            wc.get_str("errmsg").unwrap_or("write concern error")
        )));
    }
    let number = |d: &Document, k: &str| d.get_i32(k).map(i64::from).or_else(|_| d.get_i64(k)).ok();
    let position = |d: &Document| number(d, "index").and_then(|i| usize::try_from(i).ok());
    let entries = |field: &str| -> Vec<Document> {
        reply
            .get_array(field)
            .map(|a| a.iter().filter_map(Bson::as_document).cloned().collect())
            .unwrap_or_default()
    };
    Ok(UpdateReply {
        n: number(&reply, "n")
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0),
        upserted: entries("upserted").iter().filter_map(position).collect(),
        errors: entries("writeErrors")
            .iter()
            .filter_map(|e| {
                Some((
                    position(e)?,
                    i32::try_from(number(e, "code")?).ok()?,
                    e.get_str("errmsg").unwrap_or("write error").to_owned(),
                ))
            })
            .collect(),
    })
}

/// The server error code of a write or command error, if any.
pub fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// The documents of `c` matching `filter` in the order `sort`, at most
/// `limit` of them: the read behind every "newest first" list (audit log,
/// runs, delete requests, tokens), with driver errors translated once.
pub(super) async fn find_sorted<T>(
    c: &mongodb::Collection<T>,
    filter: mongodb::bson::Document,
    sort: mongodb::bson::Document,
    limit: Option<usize>,
) -> Result<Vec<T>, RepoError>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    use futures::TryStreamExt;
    let mut find = c.find(filter).sort(sort);
    if let Some(limit) = limit {
        find = find.limit(i64::try_from(limit).unwrap_or(i64::MAX));
    }
    find.await
        .map_err(map_error)?
        .try_collect()
        .await
        .map_err(map_error)
}

/// Translates a driver error into the port's error type.
pub fn map_error(e: mongodb::error::Error) -> RepoError {
    use mongodb::error::ErrorKind;
    if error_code(&e) == Some(DUPLICATE_KEY) {
        return RepoError::Duplicate(e.to_string());
    }
    match &*e.kind {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => RepoError::Unavailable(e.to_string()),
        ErrorKind::BsonDeserialization(_) => RepoError::Corrupt(e.to_string()),
        _ => RepoError::Other(e.to_string()),
    }
}
