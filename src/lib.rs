//! maskaudit: audit how padding and loss masks enter a causal language model's training loss.
//!
//! The pure parts (rows → batches, per-token losses → aggregates, findings, the report) need
//! no libtorch; the model sits behind [`model::LanguageModel`].
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod aggregate;
pub mod batch;
pub mod check;
pub mod cli;
pub mod data;
pub mod diagnosis;
pub mod explain;
pub mod findings;
pub mod lint;
pub mod lint_command;
pub mod model;
pub mod output;
pub mod report;
pub mod stats;
pub mod tokenizer;
pub mod userloss;
pub mod view;

/// An error chain on one line: the messages joined by ": ", newlines folded, repeats dropped.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = vec![];
    for cause in e.chain() {
        let text = cause
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
