//! Who asked labsync to do something: the name every audit entry, delete
//! request and history entry carries.
//!
//! Stored and shown as text (`person:<sub> (<name>)`, `api:<token>`,
//! `cli:<user>`, `schedule`), so
//! that the audit log reads the same in MongoDB, the API and the CLI.
//! Reading never fails: text stored before actors had a type (`refresh`
//! for every prune, `cli:` for an empty login name) reads back as it was
//! written, so one old entry cannot make a lab's history unreadable.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Who asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Actor {
    /// Someone the organisation's OpenID Connect provider signed in: its
    /// `sub`, which the provider keys on, and a name to show.
    Person { subject: String, display: String },
    /// An API client, by the name of its token.
    Api(String),
    /// Someone at the command line, by their login name.
    Cli(String),
    /// The periodic refresh, which no one asked for at the time.
    Schedule,
    /// Text stored before actors had a type, kept as it was (prunes were
    /// audited as `refresh`, whoever started the run).
    Recorded(String),
}

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

/// A subject as an actor keeps it: whitespace and parentheses (which no
/// provider labsync targets puts in a `sub`) become `_`, so that the text
/// form reads back unambiguously.
fn subject_of(sub: &str) -> String {
    clipped(sub)
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '(' || c == ')' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl Actor {
    /// A person, by the provider's `sub` and a name to show.
    pub fn person(subject: &str, display: &str) -> Self {
        Self::Person {
            subject: subject_of(subject),
            display: clipped(display),
        }
    }

    /// An API client, by its token's name.
    pub fn api(name: &str) -> Self {
        Self::Api(clipped(name))
    }

    /// Someone at the command line.
    pub fn cli(user: &str) -> Self {
        Self::Cli(clipped(user))
    }
}

impl Actor {
    /// Whether two actors are the same party: a person by their `sub`
    /// alone (a display name changes), anyone else by their whole name.
    pub fn same_party(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Person { subject: a, .. }, Self::Person { subject: b, .. }) => a == b,
            (a, b) => a == b,
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Person { subject, display } => write!(f, "person:{subject} ({display})"),
            Self::Api(name) => write!(f, "api:{name}"),
            Self::Cli(user) => write!(f, "cli:{user}"),
            Self::Schedule => f.write_str("schedule"),
            Self::Recorded(text) => f.write_str(text),
        }
    }
}

impl From<&str> for Actor {
    /// The actor a stored text names; any other text is kept as
    /// [`Actor::Recorded`].
    fn from(s: &str) -> Self {
        match s.split_once(':') {
            // Before people had their own kind, a provider's caller was
            // stored as `api:<sub> (<name>)`; a token's name has no space.
            Some(("api", rest)) => match rest.strip_suffix(')').and_then(|r| r.split_once(" (")) {
                Some((subject, display)) => Self::person(subject, display),
                None => Self::api(rest),
            },
            Some(("cli", user)) => Self::cli(user),
            Some(("person", rest)) => match rest.strip_suffix(')').and_then(|r| r.split_once(" ("))
            {
                Some((subject, display)) => Self::person(subject, display),
                None => Self::Recorded(s.chars().take(MAX_ACTOR_NAME * 2).collect()),
            },
            None if s == "schedule" => Self::Schedule,
            _ => Self::Recorded(s.chars().take(MAX_ACTOR_NAME).collect()),
        }
    }
}

impl From<Actor> for String {
    fn from(a: Actor) -> Self {
        a.to_string()
    }
}

impl From<String> for Actor {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_actor_reads_back_as_it_was_written() {
        for a in [
            Actor::api("ui"),
            Actor::cli("ops:x"),
            Actor::Schedule,
            Actor::person("f3a-1", "alex (ops) :)"),
        ] {
            assert_eq!(Actor::from(a.to_string()), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Actor>(&json).unwrap(), a);
        }
        assert_eq!(Actor::api("ui").to_string(), "api:ui");
        assert_eq!(
            Actor::person("a b(c)", "Alex").to_string(),
            "person:a_b_c_ (Alex)",
            "a subject cannot make its text form ambiguous"
        );
    }

    #[test]
    fn text_stored_before_actors_had_a_type_still_reads_and_huge_names_are_cut() {
        for old in ["refresh", "bench", "", "root:x"] {
            let a: Actor = serde_json::from_value(serde_json::json!(old)).unwrap();
            assert_eq!(a.to_string(), old, "kept as written");
        }
        assert_eq!(Actor::from("cli:"), Actor::Cli("unknown".into()));
        let long = Actor::cli(&"u".repeat(10_000));
        assert_eq!(long.to_string().len(), "cli:".len() + MAX_ACTOR_NAME);
        assert_eq!(Actor::cli(" "), Actor::Cli("unknown".into()));
        assert_eq!(
            Actor::from("api:7f3a (olivia)"),
            Actor::person("7f3a", "olivia"),
            "a provider's caller as stored before people had their own kind"
        );
        assert!(Actor::person("7f3a", "olivia").same_party(&Actor::person("7f3a", "Olivia O.")));
        assert!(!Actor::person("7f3a", "olivia").same_party(&Actor::person("7f3b", "olivia")));
        assert!(!Actor::api("ui").same_party(&Actor::cli("ui")));
    }
}
