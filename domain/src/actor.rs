//! Who asked labsync to do something: the name every audit entry, delete
//! request and history entry carries.
//!
//! Stored and shown as text (`api:<token>`, `cli:<user>`, `schedule`), so
//! that the audit log reads the same in MongoDB, the API and the CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Who asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Actor {
    /// An API client, by the name of its token.
    Api(String),
    /// Someone at the command line, by their login name.
    Cli(String),
    /// The periodic refresh, which no one asked for at the time.
    Schedule,
}

/// Text that names no actor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} names no actor: expected api:<name>, cli:<name> or schedule")]
pub struct ActorError(String);

/// The longest name an actor keeps; a longer one is cut, so that a huge
/// login name or token name never makes an audit entry huge.
pub const MAX_ACTOR_NAME: usize = 128;

fn clipped(name: &str) -> String {
    let name = if name.trim().is_empty() {
        "unknown"
    } else {
        name
    };
    name.chars().take(MAX_ACTOR_NAME).collect()
}

impl Actor {
    /// An API client, by its token's name.
    pub fn api(name: &str) -> Self {
        Self::Api(clipped(name))
    }

    /// Someone at the command line.
    pub fn cli(user: &str) -> Self {
        Self::Cli(clipped(user))
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Api(name) => write!(f, "api:{name}"),
            Self::Cli(user) => write!(f, "cli:{user}"),
            Self::Schedule => f.write_str("schedule"),
        }
    }
}

impl FromStr for Actor {
    type Err = ActorError;

    fn from_str(s: &str) -> Result<Self, ActorError> {
        match s.split_once(':') {
            Some(("api", name)) if !name.is_empty() => Ok(Self::api(name)),
            Some(("cli", user)) if !user.is_empty() => Ok(Self::cli(user)),
            // Prunes were audited as `refresh` before actors had a type;
            // those runs were the schedule's.
            None if s == "schedule" || s == "refresh" => Ok(Self::Schedule),
            _ => Err(ActorError(s.chars().take(MAX_ACTOR_NAME).collect())),
        }
    }
}

impl From<Actor> for String {
    fn from(a: Actor) -> Self {
        a.to_string()
    }
}

impl TryFrom<String> for Actor {
    type Error = ActorError;

    fn try_from(s: String) -> Result<Self, ActorError> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_actor_reads_back_as_it_was_written() {
        for a in [Actor::api("ui"), Actor::cli("ops:x"), Actor::Schedule] {
            assert_eq!(a.to_string().parse::<Actor>(), Ok(a.clone()));
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Actor>(&json).unwrap(), a);
        }
        assert_eq!(Actor::api("ui").to_string(), "api:ui");
        assert_eq!("refresh".parse::<Actor>(), Ok(Actor::Schedule));
    }

    #[test]
    fn text_that_names_no_actor_is_refused_and_huge_names_are_cut() {
        for bad in ["", "api:", "someone", "root:x", "cli"] {
            assert!(bad.parse::<Actor>().is_err(), "{bad:?}");
        }
        let long = Actor::cli(&"u".repeat(10_000));
        assert_eq!(long.to_string().len(), "cli:".len() + MAX_ACTOR_NAME);
        assert_eq!(Actor::cli(" "), Actor::Cli("unknown".into()));
    }
}
