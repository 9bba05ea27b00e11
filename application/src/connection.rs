//! "Test connection": what an admin learns about a worker's settings
//! before saving them, in words that say what to fix.
//!
//! # Expected flow
//! Log in with the settings as given (a connection of their own, see
//! [`CmlGateway::check`]), then, for an admin account, list the labs.
//!
//! # Guarantees
//! - Nothing is stored and no worker's connection is touched.
//! - Every failure is one [`ConnectionProblem`]: unreachable, TLS, wrong
//!   credentials, not an admin, or an answer that is not CML's.
//!
//! # Caveats
//! A check says how the server answered now; a later refresh may differ.

use serde::Serialize;

use crate::errors::CmlError;
use crate::ports::{CmlGateway, WorkerAccess};

/// What failed when labsync tried the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionProblem {
    /// No answer: wrong address or port, a firewall, a controller down.
    Unreachable,
    /// The certificate was refused or the TLS handshake failed.
    Tls,
    /// CML refused the username or password.
    Credentials,
    /// The account is not a CML administrator: it would see only its own
    /// labs, and labsync refuses to sync from it.
    NotAdmin,
    /// Something answered, but not as CML does.
    NotCml,
}

impl ConnectionProblem {
    /// What to do about it, for the person testing.
    pub const fn advice(self) -> &'static str {
        match self {
            Self::Unreachable => "check the URL and that this server can reach it",
            Self::Tls => {
                "check the certificate: give the CA bundle that signed it, or the URL its name is for"
            }
            Self::Credentials => "check the username and password",
            Self::NotAdmin => "give the account admin rights in CML, or use an admin account",
            Self::NotCml => {
                "check that the URL is the CML server's, not a proxy's or another service's"
            }
        }
    }
}

/// The answer of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionCheck {
    pub ok: bool,
    pub problem: Option<ConnectionProblem>,
    /// What happened, in words.
    pub detail: String,
    /// The account CML said it is, when the login worked.
    pub username: Option<String>,
    /// How many labs CML listed, when it did.
    pub labs: Option<usize>,
}

/// How a failed check is told.
pub fn problem_of(e: &CmlError) -> ConnectionProblem {
    match e {
        CmlError::Unreachable(_) => ConnectionProblem::Unreachable,
        CmlError::Tls(_) => ConnectionProblem::Tls,
        CmlError::Auth(_) => ConnectionProblem::Credentials,
        CmlError::NotFound
        | CmlError::Refused { .. }
        | CmlError::Server { .. }
        | CmlError::Protocol(_) => ConnectionProblem::NotCml,
    }
}

/// Tries `access` against its CML server.
pub async fn check_connection(cml: &dyn CmlGateway, access: &WorkerAccess) -> ConnectionCheck {
    match cml.check(access).await {
        Ok((account, _)) if !account.admin => ConnectionCheck {
            ok: false,
            problem: Some(ConnectionProblem::NotAdmin),
            detail: format!(
                "logged in as {:?}, which is not a CML administrator: {}",
                account.username,
                ConnectionProblem::NotAdmin.advice()
            ),
            username: Some(account.username),
            labs: None,
        },
        Ok((account, list)) => ConnectionCheck {
            ok: true,
            problem: None,
            detail: format!(
                "logged in as {:?} (an administrator); CML lists {} labs",
                account.username,
                list.ids.len()
            ),
            username: Some(account.username),
            labs: Some(list.ids.len()),
        },
        Err(e) => {
            let problem = problem_of(&e);
            ConnectionCheck {
                ok: false,
                problem: Some(problem),
                detail: format!("{e}: {}", problem.advice()),
                username: None,
                labs: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{FakeCml, test_worker};

    fn access() -> WorkerAccess {
        WorkerAccess {
            worker: test_worker(),
            password: "pw".into(),
        }
    }

    #[tokio::test]
    async fn an_admin_that_lists_is_ok_and_a_non_admin_is_told_why_not() {
        let cml = FakeCml::default();
        let ok = check_connection(&cml, &access()).await;
        assert!(
            ok.ok && ok.problem.is_none() && ok.labs == Some(0),
            "{ok:?}"
        );
        *crate::fakes::lock(&cml.not_admin) = true;
        let no = check_connection(&cml, &access()).await;
        assert_eq!(
            (no.ok, no.problem),
            (false, Some(ConnectionProblem::NotAdmin))
        );
        assert!(
            no.detail.contains("not a CML administrator"),
            "{}",
            no.detail
        );
    }

    #[test]
    fn each_cml_error_is_one_problem() {
        let cases = [
            (
                CmlError::Unreachable("refused".into()),
                ConnectionProblem::Unreachable,
            ),
            (
                CmlError::Tls("UnknownIssuer".into()),
                ConnectionProblem::Tls,
            ),
            (CmlError::Auth("403".into()), ConnectionProblem::Credentials),
            (CmlError::Protocol("html".into()), ConnectionProblem::NotCml),
            (CmlError::NotFound, ConnectionProblem::NotCml),
        ];
        for (e, p) in cases {
            assert_eq!(problem_of(&e), p, "{e}");
        }
    }
}
