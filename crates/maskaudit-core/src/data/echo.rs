//! Text from the data, made safe to print on one terminal line.
//!
//! A message may quote a value from the file (a JSON string where ids were expected, a
//! Parquet value, a column name). Such a value can be megabytes long or hold escape
//! sequences that would drive the terminal, so it is [`echo`]ed: control and bidirectional
//! formatting characters are written as escapes (`\n`, `\x1b`, `\u{202e}`) and anything past
//! [`ECHO_CHARS`] characters is cut from the middle, saying how much was cut (the end of a
//! message often says what was expected). The error printer passes the whole line through
//! [`clip`] as well, with a larger limit, for whatever a value site missed.

use std::fmt::Write;

/// Characters of a value from the data that a message quotes.
pub const ECHO_CHARS: usize = 200;

/// A value from the data, escaped and cut to [`ECHO_CHARS`] characters.
pub fn echo(text: &str) -> String {
    clip(text, ECHO_CHARS)
}

/// `text` with control characters escaped and, beyond `max` characters, its middle replaced
/// by ` … [N characters cut] … `.
pub fn clip(text: &str, max: usize) -> String {
    let total = text.chars().count();
    if total <= max {
        return escape(text);
    }
    let head = max * 3 / 4;
    let tail = max - head;
    let cut = total - head - tail;
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(total - tail).collect();
    format!(
        "{} … [{cut} characters cut] … {}",
        escape(&start),
        escape(&end)
    )
}

/// Control characters (C0, DEL, C1) and bidirectional overrides as visible escapes.
pub fn escape(text: &str) -> String {
    if !text.chars().any(needs_escape) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    // The bidirectional controls can reorder what the terminal shows ("Trojan Source").
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("plain ü"), "plain ü");
        assert_eq!(
            escape("a\nb\x1b[31mred\r\t\x7f\u{85}\u{202e}"),
            "a\\nb\\x1b[31mred\\r\\t\\x7f\\x85\\u{202e}"
        );
    }

    #[test]
    fn long_values_are_cut_in_the_middle_saying_how_much() {
        let long = format!("{}{}", "a".repeat(1000), "tail");
        let short = echo(&long);
        assert!(short.starts_with(&"a".repeat(150)), "{short}");
        assert!(short.ends_with("atail"), "{short}");
        assert!(short.contains(" … [804 characters cut] … "), "{short}");
        assert!(short.chars().count() < ECHO_CHARS + 40);
        assert_eq!(echo(&"b".repeat(ECHO_CHARS)), "b".repeat(ECHO_CHARS));
        // Counted in characters, not bytes: no cut inside a UTF-8 sequence.
        let wide = "é".repeat(300);
        assert!(echo(&wide).contains("[100 characters cut]"));
    }
}
