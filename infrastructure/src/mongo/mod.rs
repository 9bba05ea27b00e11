//! The MongoDB connection: one [`mongodb::Client`] per process, cloned into
//! every repository (it is a handle to a shared pool), with explicit
//! server-selection and connect timeouts so that an unreachable server fails a
//! call in seconds instead of hanging it.

use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use secrecy::ExposeSecret;

use crate::configuration::MongoSettings;

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
