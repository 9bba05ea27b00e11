//! Bytes, as a CML server might answer them, into every parser of CML's
//! JSON: the lab list and the lab details. Whatever the bytes, the answer
//! is a value or a protocol error of bounded size, never a panic; a list
//! that parses holds only valid lab ids.
//!
//! The unit tests in `infrastructure/src/cml/wire.rs` run the same
//! properties on generated input in every `cargo test`.

#![no_main]

use labsync_application::CmlError;
use labsync_domain::LabId;
use labsync_infrastructure::cml::{parse_lab_details, parse_lab_ids};
use libfuzzer_sys::fuzz_target;

/// Well above the parsers' clipped message and their own words; far below
/// the inputs that would show an unclipped one.
const MAX_ERROR: usize = 1024;

fn bounded<T>(r: &Result<T, CmlError>) {
    match r {
        Ok(_) => {}
        Err(CmlError::Protocol(m)) => assert!(m.len() <= MAX_ERROR, "{} bytes", m.len()),
        Err(other) => panic!("not a protocol error: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let list = parse_lab_ids(data);
    bounded(&list);
    if let Ok(list) = &list {
        for id in &list.ids {
            assert_eq!(LabId::parse(id.as_str()), Ok(*id));
        }
        assert!(list.first_invalid.as_ref().is_none_or(|t| t.len() <= 83));
    }

    // A fixed lab, as most bodies will not name it...
    let fixed = LabId::parse("a6a334de-b497-47ae-bbff-44a83f890114").unwrap();
    bounded(&parse_lab_details(&fixed, data));
    // ...and the first lab id the body holds, so that the fuzzer gets past
    // the id check into the rest of the lab.
    let named = data.windows(36).find_map(|w| {
        std::str::from_utf8(w)
            .ok()
            .and_then(|s| LabId::parse(s).ok())
    });
    if let Some(id) = named {
        let details = parse_lab_details(&id, data);
        bounded(&details);
        if let Ok(s) = details {
            assert!(!s.state.as_str().is_empty());
        }
    }
});
