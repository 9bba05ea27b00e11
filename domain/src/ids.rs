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
    use std::sync::LazyLock;

    use proptest::prelude::*;
    use regex::Regex;

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

    // The grammars again, written independently of the parsers (as the
    // regular expressions the docs state), so that the property tests below
    // compare two implementations instead of one with itself.
    static WORKER_GRAMMAR: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9-]{0,62}$").unwrap());
    static LAB_GRAMMAR: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            .unwrap()
    });

    /// Pieces hostile ids are made of: traversal, percent escapes (which
    /// must arrive here still escaped or already decoded, both refused),
    /// separators, control characters, lookalike and wide unicode, and the
    /// characters valid ids are made of, so that concatenations land near
    /// the grammar's edges too.
    const FRAGMENTS: &[&str] = &[
        "../",
        "..",
        "%2F",
        "%2f",
        "%00",
        "%",
        "/",
        "\\",
        "\0",
        "\n",
        " ",
        "é",
        "☃",
        "💥",
        "\u{202e}",
        "\u{feff}",
        "Ａ",
        "-",
        "4",
        "8",
        "a",
        "f",
        "g",
        "A",
        "0",
        "{",
        "a6a334de-b497-47ae-bbff-44a83f890114",
        "cml-1",
    ];

    fn valid_lab_id() -> impl Strategy<Value = String> {
        "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    }

    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            prop::collection::vec(prop::sample::select(FRAGMENTS), 0..24).prop_map(|v| v.concat()),
            // A valid lab id with one character replaced: one step off.
            (valid_lab_id(), 0usize..36, any::<char>()).prop_map(|(id, at, c)| {
                id.chars()
                    .enumerate()
                    .map(|(i, x)| if i == at { c } else { x })
                    .collect()
            }),
            valid_lab_id(),
            // Around the worker id's length limit.
            "[a-z0-9-]{0,70}",
            // Oversized: the error must still quote only an excerpt.
            (0usize..20_000, any::<char>()).prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
        ]
    }

    /// What an error may grow to: an 80-byte excerpt, quoted with escapes
    /// (a control character becomes six, `\u{7f}`), plus the rule.
    const MAX_ERROR: usize = 1024;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn worker_ids_are_exactly_the_documented_slugs(s in hostile()) {
            match WorkerId::parse(&s) {
                Ok(id) => {
                    prop_assert!(WORKER_GRAMMAR.is_match(&s), "accepted {:?}", s);
                    prop_assert_eq!(id.as_str(), s.as_str());
                    prop_assert_eq!(WorkerId::parse(&format!("{id}")), Ok(id.clone()));
                    let json = serde_json::to_string(&id).unwrap();
                    prop_assert_eq!(serde_json::from_str::<WorkerId>(&json).unwrap(), id);
                }
                Err(e) => {
                    prop_assert!(!WORKER_GRAMMAR.is_match(&s), "refused {:?}", s);
                    prop_assert!(e.to_string().len() < MAX_ERROR);
                    let json = serde_json::to_string(&s).unwrap();
                    prop_assert!(serde_json::from_str::<WorkerId>(&json).is_err());
                }
            }
        }

        #[test]
        fn lab_ids_are_exactly_the_documented_uuid4s(s in hostile()) {
            prop_assert_eq!(is_uuid4(s.as_bytes()), LAB_GRAMMAR.is_match(&s));
            match LabId::parse(&s) {
                Ok(id) => {
                    prop_assert!(LAB_GRAMMAR.is_match(&s), "accepted {:?}", s);
                    prop_assert_eq!(id.as_str(), s.as_str());
                    prop_assert_eq!(LabId::parse(&format!("{id}")), Ok(id));
                    let json = serde_json::to_string(&id).unwrap();
                    prop_assert_eq!(serde_json::from_str::<LabId>(&json).unwrap(), id);
                }
                Err(e) => {
                    prop_assert!(!LAB_GRAMMAR.is_match(&s), "refused {:?}", s);
                    prop_assert!(e.to_string().len() < MAX_ERROR);
                    let json = serde_json::to_string(&s).unwrap();
                    prop_assert!(serde_json::from_str::<LabId>(&json).is_err());
                }
            }
        }
    }
}
