//! The token view (`lint --show N`): each row as a strip of tokens, trained targets
//! highlighted, the rest dimmed.
//!
//! A token is *trained* when it is a trained target after the shift (the row's first token
//! never is; under `--shifted`, token t+1 is trained when the mask at t is). Without colour
//! the trained runs are put in brackets, `1 5 [6 7 8] 0 0`; with colour, trained tokens are
//! bold green, trained padding bold red, everything else dimmed. A `|` marks where a packed
//! row's next document starts. Under `--shifted` the last label, which predicts past the
//! row's end, follows an arrow: `1 [5 6] → [2]`.
//!
//! Tokens are shown as their ids, or through a [`TokenText`] (a tokenizer) as decoded text:
//! then the pieces are joined with nothing between them, since they carry their own spaces,
//! and control characters are escaped (`\n`). Pure code: the caller decides on colour.

use std::fmt::Write as _;

use anstyle::{AnsiColor, Effects, Style};

use crate::data::{Pos, Row};
use crate::escape;
use crate::lint::{document_starts, padding, targets};

/// Turns token ids into the text shown for each.
pub trait TokenText {
    /// One piece per id, in order.
    fn pieces(&self, ids: &[i64]) -> Vec<String>;
    /// What goes between two pieces.
    fn separator(&self) -> &str;
}

/// Token ids as decimal numbers, separated by spaces.
pub struct Ids;

impl TokenText for Ids {
    fn pieces(&self, ids: &[i64]) -> Vec<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    fn separator(&self) -> &str {
        " "
    }
}

/// How rows are shown.
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewOptions {
    pub pad_id: Option<i64>,
    pub eos_id: Option<i64>,
    pub shifted: bool,
    pub color: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Untrained,
    Trained,
    TrainedPadding,
}

struct Token {
    text: String,
    class: Class,
    document_start: bool,
}

const TRAINED: Style = Style::new()
    .bold()
    .fg_color(Some(anstyle::Color::Ansi(AnsiColor::Green)));
const TRAINED_PADDING: Style = Style::new()
    .bold()
    .fg_color(Some(anstyle::Color::Ansi(AnsiColor::Red)));
const UNTRAINED: Style = Style::new().effects(Effects::DIMMED);

fn style(class: Class) -> Style {
    match class {
        Class::Untrained => UNTRAINED,
        Class::Trained => TRAINED,
        Class::TrainedPadding => TRAINED_PADDING,
    }
}

/// One row: a header line, then the strip. `at` names the row (`line 3`, `row 3`).
pub fn render_row(row: &Row, at: Pos, text: &dyn TokenText, opts: &ViewOptions) -> String {
    let len = row.input_ids.len();
    let span = padding(row, opts.pad_id, opts.eos_id);
    let mut trained = vec![false; len];
    let mut beyond: Option<(i64, bool)> = None;
    let (mut slots, mut trained_slots) = (0usize, 0usize);
    for target in targets(row, opts.shifted) {
        slots += 1;
        trained_slots += usize::from(target.trained);
        match target.token_index {
            Some(i) => trained[i] = target.trained,
            None => beyond = target.token.map(|t| (t, target.trained)),
        }
    }
    let starts = document_starts(row, span);
    let pieces = text.pieces(&row.input_ids);
    let tokens: Vec<Token> = pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| Token {
            text: escape::terminal(&piece),
            class: match (trained[i], span.contains(i)) {
                (false, _) => Class::Untrained,
                (true, false) => Class::Trained,
                (true, true) => Class::TrainedPadding,
            },
            document_start: starts.binary_search(&i).is_ok(),
        })
        .collect();

    let mut out = format!(
        "{}: {len} tokens, {trained_slots} of {slots} targets trained",
        at.named()
    );
    if span.tokens(len) > 0 {
        let _ = write!(out, ", {} padding", span.tokens(len));
    }
    if !starts.is_empty() {
        let _ = write!(out, ", {} documents", starts.len() + 1);
    }
    out.push('\n');
    let strip = if opts.color {
        colored(&tokens, text.separator())
    } else {
        plain(&tokens, text.separator())
    };
    out.push_str(&strip);
    if let Some((id, is_trained)) = beyond {
        let last = Token {
            text: escape::terminal(&text.pieces(&[id]).concat()),
            class: if is_trained {
                Class::Trained
            } else {
                Class::Untrained
            },
            document_start: false,
        };
        out.push_str(" → ");
        out.push_str(&if opts.color {
            colored(std::slice::from_ref(&last), "")
        } else {
            plain(std::slice::from_ref(&last), "")
        });
    }
    out.push('\n');
    out
}

fn plain(tokens: &[Token], sep: &str) -> String {
    let mut out = String::new();
    let mut open = false;
    for (i, token) in tokens.iter().enumerate() {
        let is_trained = token.class != Class::Untrained;
        if i > 0 {
            if open && (!is_trained || token.document_start) {
                out.push(']');
                open = false;
            }
            out.push_str(sep);
            if token.document_start {
                out.push('|');
                out.push_str(sep);
            }
        }
        if is_trained && !open {
            out.push('[');
            open = true;
        }
        out.push_str(&token.text);
    }
    if open {
        out.push(']');
    }
    out
}

fn colored(tokens: &[Token], sep: &str) -> String {
    let mut out = String::new();
    let mut current: Option<Class> = None;
    for (i, token) in tokens.iter().enumerate() {
        if i > 0 {
            // A separator inside a run takes its style; between runs it is plain.
            if token.document_start || current != Some(token.class) {
                if let Some(class) = current.take() {
                    let _ = write!(out, "{}", style(class).render_reset());
                }
            }
            out.push_str(sep);
            if token.document_start {
                out.push('|');
                out.push_str(sep);
            }
        }
        if current != Some(token.class) {
            let _ = write!(out, "{}", style(token.class).render());
            current = Some(token.class);
        }
        out.push_str(&token.text);
    }
    if let Some(class) = current {
        let _ = write!(out, "{}", style(class).render_reset());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{parse_row, FieldNames};

    fn row(json: &str) -> Row {
        parse_row(json, "t", 1, &FieldNames::default()).unwrap()
    }

    fn show(json: &str, opts: ViewOptions) -> String {
        render_row(&row(json), Pos::line(1), &Ids, &opts)
    }

    #[test]
    fn plain_view_brackets_trained_runs() {
        let opts = ViewOptions {
            pad_id: Some(0),
            ..ViewOptions::default()
        };
        assert_eq!(
            show(
                r#"{"input_ids":[1,5,6,7,8,0,0],"labels":[-100,-100,6,7,8,-100,-100]}"#,
                opts
            ),
            "line 1: 7 tokens, 3 of 6 targets trained, 2 padding\n1 5 [6 7 8] 0 0\n"
        );
        // Token 0 is never a target, whatever its label says.
        assert_eq!(
            show(r#"{"input_ids":[1,5,6]}"#, opts),
            "line 1: 3 tokens, 2 of 2 targets trained\n1 [5 6]\n"
        );
        // Trained padding stays inside the brackets; documents are marked.
        assert_eq!(
            show(
                r#"{"input_ids":[1,5,1,6,0],"position_ids":[0,1,0,1,0]}"#,
                opts
            ),
            "line 1: 5 tokens, 4 of 4 targets trained, 1 padding, 2 documents\n1 [5] | [1 6 0]\n"
        );
    }

    #[test]
    fn shifted_view_shows_the_last_target_after_an_arrow() {
        let opts = ViewOptions {
            shifted: true,
            ..ViewOptions::default()
        };
        assert_eq!(
            show(
                r#"{"input_ids":[1,5,6],"labels":[5,6,2],"loss_mask":[0,1,1]}"#,
                opts
            ),
            "line 1: 3 tokens, 2 of 3 targets trained\n1 5 [6] → [2]\n"
        );
    }

    #[test]
    fn colour_view_styles_runs_and_resets() {
        let opts = ViewOptions {
            color: true,
            ..ViewOptions::default()
        };
        let out = show(r#"{"input_ids":[1,5,6],"labels":[-100,-100,6]}"#, opts);
        let strip = out.lines().nth(1).unwrap();
        assert_eq!(
            strip,
            format!(
                "{}1 5{} {}6{}",
                UNTRAINED.render(),
                UNTRAINED.render_reset(),
                TRAINED.render(),
                TRAINED.render_reset()
            )
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape::terminal("a\nb\tc\u{1b}"), "a\\nb\\tc\\u{1b}");
    }
}
