//! maskaudit's core: everything that needs no libtorch. Rows are read, validated and batched
//! (`data`), linted (`lint`), per-token losses become aggregates, formulas, a diagnosis and
//! step weights (`loss`), and a run's conclusions become findings (`findings`) and a report in
//! each format (`report`). The model and the per-token losses are `maskaudit_torch`'s.
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod data;
pub mod escape;
pub mod findings;
pub mod lint;
pub mod loss;
pub mod model;
pub mod report;
pub mod sys;

/// The member of `all` called `wanted`, or else the known names joined by ", ": the parsing of
/// every closed set of names on the command line (finding codes, loss arguments).
pub fn by_name<T: Copy>(all: &[T], name: fn(T) -> &'static str, wanted: &str) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|&t| name(t) == wanted)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|&t| name(t)).collect();
            names.join(", ")
        })
}

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
