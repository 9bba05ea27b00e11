//! The errors the ports report and the use cases return. Adapters translate
//! their own errors (driver, HTTP) into these; nothing above this layer sees
//! a MongoDB or reqwest error.

use labsync_domain::{IdError, LabId, WorkerId};

/// What went wrong talking to a CML server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmlError {
    /// 404: the lab (or the server's API) is not there.
    #[error("not found in CML")]
    NotFound,
    /// No answer: connection refused, timeout, TLS failure, or the reverse
    /// proxy's 502/503/504 while the controller boots.
    #[error("CML unreachable: {0}")]
    Unreachable(String),
    /// The TLS connection failed: CML's certificate was refused (unknown
    /// issuer, wrong name, expired) or the handshake failed.
    #[error("CML's TLS connection failed: {0}")]
    Tls(String),
    /// Login refused (403), or 401 again after one re-authentication.
    #[error("CML refused the credentials: {0}")]
    Auth(String),
    /// A 4xx other than 401/403/404, with CML's description.
    #[error("CML refused the request ({status}): {description}")]
    Refused { status: u16, description: String },
    /// A 5xx other than the gateway errors.
    #[error("CML failed ({status}): {description}")]
    Server { status: u16, description: String },
    /// An answer that does not parse as the API says it should.
    #[error("CML answered something unexpected: {0}")]
    Protocol(String),
}

/// What went wrong in a repository.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    /// A unique key is taken (MongoDB E11000).
    #[error("already exists: {0}")]
    Duplicate(String),
    /// The database did not answer in time or refused the connection.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A stored document does not decode.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Other(String),
    /// labsync lacks a setting this needs (the encryption key for worker
    /// passwords); the message names it.
    #[error("{0}")]
    NotConfigured(String),
}

/// The error of a use case, as callers (CLI, HTTP) map it to exit codes and
/// statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    #[error("worker {0} has no lab {1}")]
    UnknownLab(WorkerId, LabId),
    #[error("no refresh run {0:?}")]
    UnknownRun(String),
    #[error("worker {0} is already registered")]
    WorkerExists(WorkerId),
    /// An admin disabled the worker: labsync neither refreshes it nor
    /// deletes its labs until it is enabled again.
    #[error(
        "worker {0} is disabled: labsync does not refresh it or delete its labs until an admin enables it"
    )]
    WorkerDisabled(WorkerId),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Other changes kept landing first; nothing of this one was written.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A self-service delete of a lab that CML says is someone else's.
    #[error("{0}")]
    NotLabOwner(String),
    #[error(transparent)]
    Cml(#[from] CmlError),
    #[error(transparent)]
    Repository(#[from] RepoError),
    /// The lab is gone in CML but its record could not be replaced by a
    /// tombstone; the next refresh prunes it.
    #[error(
        "the lab was deleted in CML, but its record could not be removed ({0}); the next refresh removes it"
    )]
    RecordCleanupPending(RepoError),
}
