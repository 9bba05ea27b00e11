//! Text from outside (CML, a provider's claims) as people see it: which
//! characters show nothing, or change how the rest shows, and so must not
//! reach a terminal, a log line or an identity unmarked.

/// Whether `c` is invisible or reorders what follows: control characters
/// (escapes, bells, line breaks), bidirectional formatting, zero-width and
/// joiner characters, the byte-order mark, line and paragraph separators
/// and the soft hyphen.
pub fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_shows_nothing_or_reorders_is_invisible_and_text_is_not() {
        for c in [
            '\u{1b}', '\n', '\u{7}', '\u{200B}', '\u{202E}', '\u{2066}', '\u{FEFF}', '\u{00AD}',
            '\u{2028}',
        ] {
            assert!(is_invisible(c), "{c:?}");
        }
        for c in ['a', ' ', 'é', '·', '(', '中'] {
            assert!(!is_invisible(c), "{c:?}");
        }
    }
}
