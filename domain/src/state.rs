//! The overall state of a lab, as CML reports it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// CML 2.x knows three lab states. A value from an older or newer server is
/// kept verbatim as `Unknown` rather than failing the whole refresh: a lab we
/// cannot classify is still a lab that exists.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabState {
    /// Stopped and wiped: the only state in which CML deletes a lab.
    DefinedOnCore,
    Stopped,
    Started,
    Unknown(String),
}

impl LabState {
    pub fn parse(s: &str) -> Self {
        match s {
            "DEFINED_ON_CORE" => Self::DefinedOnCore,
            "STOPPED" => Self::Stopped,
            "STARTED" => Self::Started,
            other => Self::Unknown(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::DefinedOnCore => "DEFINED_ON_CORE",
            Self::Stopped => "STOPPED",
            Self::Started => "STARTED",
            Self::Unknown(s) => s,
        }
    }

    /// Whether CML will accept a delete of a lab in this state.
    pub fn is_deletable(&self) -> bool {
        matches!(self, Self::DefinedOnCore)
    }
}

impl fmt::Display for LabState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl Serialize for LabState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LabState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_states_round_trip_and_unknown_ones_are_kept() {
        for s in ["DEFINED_ON_CORE", "STOPPED", "STARTED", "QUEUED"] {
            assert_eq!(LabState::parse(s).as_str(), s);
        }
        assert_eq!(
            LabState::parse("QUEUED"),
            LabState::Unknown("QUEUED".into())
        );
        assert!(LabState::DefinedOnCore.is_deletable());
        assert!(!LabState::Stopped.is_deletable());
        assert!(!LabState::Unknown("DEFINED_ON_CORE ".into()).is_deletable());
    }
}
