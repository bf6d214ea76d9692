//! Text made safe for each output format, one function a format: HTML, XML (JUnit), a
//! Markdown table cell, a GitHub annotation, and a terminal (the token view).

use std::fmt::Write;

/// Text for HTML content and attribute values.
pub fn html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text escaped for an attribute value or element content.
pub fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Attribute values normalise raw whitespace to spaces: keep it as references.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if is_xml_char(c) => out.push(c),
            _ => out.push('\u{fffd}'),
        }
    }
    out
}

/// Element content: like [`xml`], but tab and newline stay as they are, for people reading
/// the file.
pub fn xml_text(text: &str) -> String {
    xml(text).replace("&#10;", "\n").replace("&#9;", "\t")
}

/// XML 1.0's `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
}

/// A table cell: no line breaks, no column separators, no HTML.
pub fn markdown_cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '\n' | '\r' => out.push(' '),
            '<' => out.push_str("&lt;"),
            '&' => out.push_str("&amp;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes control characters so that a piece cannot break the line or the terminal.
pub fn terminal(piece: &str) -> String {
    let mut out = String::with_capacity(piece.len());
    for c in piece.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A GitHub annotation's message (the part after `::`), as `@actions/core` escapes it.
pub fn github_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A GitHub annotation's property value (`file=`, `title=`).
pub fn github_property(text: &str) -> String {
    github_data(text).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            html("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

    #[test]
    fn escape_covers_markup_quotes_whitespace_and_forbidden_characters() {
        assert_eq!(
            xml("a<b>&\"c' \n\t\r\u{1b}\u{7f}é"),
            "a&lt;b&gt;&amp;&quot;c&apos; &#10;&#9;&#13;\u{fffd}\u{7f}é"
        );
        assert_eq!(xml("\u{fffe}"), "\u{fffd}");
        assert_eq!(xml_text("a\n\tb\r&"), "a\n\tb&#13;&amp;");
    }

    #[test]
    fn cells_escape_separators_lines_and_html() {
        assert_eq!(markdown_cell("a|b\nc <d> & e"), "a\\|b c &lt;d> &amp; e");
    }

    #[test]
    fn escaping_follows_github() {
        assert_eq!(
            github_data("100% of a:b,c\r\nnext"),
            "100%25 of a:b,c%0D%0Anext"
        );
        assert_eq!(
            github_property("dir,x/a:b%\n.jsonl"),
            "dir%2Cx/a%3Ab%25%0A.jsonl"
        );
        // `%` first: an escape is never escaped twice.
        assert_eq!(github_data("%0A"), "%250A");
    }
}
