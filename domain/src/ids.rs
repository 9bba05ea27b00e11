//! Identifiers that are checked once, at the edge, and trusted afterwards.
//!
//! A `LabId` is what CML's spec calls a UUID4: lowercase hex, version nibble 4,
//! variant nibble 8-b. Anything else (upper case, braces, `../`, percent
//! escapes) is refused, which is also what makes a `LabId` safe to put in a URL
//! path without escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid identifier. The message names the rule, never
/// echoes more than a short prefix of hostile input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "worker id must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit; got {0:?}"
    )]
    InvalidWorkerId(String),
    #[error(
        "lab id must be a lowercase UUID4 (xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx); got {0:?}"
    )]
    InvalidLabId(String),
}

/// Shortens input quoted back in an error so that an oversized id cannot blow
/// up a log line or a response.
fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        s.to_owned()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

/// A CML server's identifier in labsync: a slug `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(String);

impl WorkerId {
    /// # Errors
    /// [`IdError::InvalidWorkerId`] unless `s` is a slug of 1 to 63 characters.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::InvalidWorkerId(excerpt(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A CML lab identifier: a lowercase UUID4, exactly as the CML spec's pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabId([u8; 36]);

impl LabId {
    /// # Errors
    /// [`IdError::InvalidLabId`] unless `s` matches
    /// `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if is_uuid4(s.as_bytes()) {
            let mut raw = [0u8; 36];
            raw.copy_from_slice(s.as_bytes());
            Ok(Self(raw))
        } else {
            Err(IdError::InvalidLabId(excerpt(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII bytes were accepted by `parse`.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// True for exactly the lowercase UUID4 text form.
pub fn is_uuid4(b: &[u8]) -> bool {
    if b.len() != 36 {
        return false;
    }
    let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    b.iter().enumerate().all(|(i, &c)| match i {
        8 | 13 | 18 | 23 => c == b'-',
        14 => c == b'4',
        19 => matches!(c, b'8' | b'9' | b'a' | b'b'),
        _ => hex(c),
    })
}

macro_rules! string_id_impls {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id_impls!(WorkerId);
string_id_impls!(LabId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_id_accepts_the_recorded_cml_ids() {
        for s in [
            "a6a334de-b497-47ae-bbff-44a83f890114",
            "444a78d1-575c-4746-8469-696e580f17b6",
            "90f84e38-a71c-4d57-8d90-00fa8a197385",
        ] {
            assert_eq!(LabId::parse(s).map(|id| id.to_string()), Ok(s.to_owned()));
        }
    }

    #[test]
    fn lab_id_refuses_anything_but_lowercase_uuid4() {
        for s in [
            "",
            "A6A334DE-B497-47AE-BBFF-44A83F890114",
            "a6a334de-b497-17ae-bbff-44a83f890114", // version 1
            "a6a334de-b497-47ae-cbff-44a83f890114", // variant c
            "a6a334deb49747aebbff44a83f890114",
            "{a6a334de-b497-47ae-bbff-44a83f890114}",
            "a6a334de-b497-47ae-bbff-44a83f890114\n",
            "../../etc/passwd",
            "a6a334de%2Fb497-47ae-bbff-44a83f890114",
            "a6a334de-b497-47ae-bbff-44a83f89011é",
        ] {
            assert!(LabId::parse(s).is_err(), "accepted {s:?}");
        }
    }

    #[test]
    fn worker_id_is_a_slug() {
        for ok in ["cml-1", "a", "0", &"x".repeat(63)] {
            assert!(WorkerId::parse(ok).is_ok(), "refused {ok:?}");
        }
        for bad in ["", "-a", "A", "a_b", "a/b", "a.b", "é", &"x".repeat(64)] {
            assert!(WorkerId::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn errors_quote_only_an_excerpt_of_oversized_input() {
        let huge = "é".repeat(10_000);
        let msg = LabId::parse(&huge).unwrap_err().to_string();
        assert!(msg.len() < 400, "{} bytes", msg.len());
    }

    #[test]
    fn ids_round_trip_through_serde_and_refuse_bad_values() {
        let id: LabId = serde_json::from_str("\"a6a334de-b497-47ae-bbff-44a83f890114\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"a6a334de-b497-47ae-bbff-44a83f890114\""
        );
        assert!(serde_json::from_str::<LabId>("\"nope\"").is_err());
        assert!(serde_json::from_str::<WorkerId>("\"Bad Worker\"").is_err());
    }
}
