//! maskaudit: audit how padding and loss masks enter a causal language model's training loss.
//!
//! The pure parts (rows → batches, per-token losses → aggregates, findings, the report) need
//! no libtorch; the model sits behind [`model::LanguageModel`].
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod cli;
pub mod commands;
pub mod data;
pub mod findings;
pub mod lint;
pub mod loss;
pub mod model;
pub mod report;
pub mod sys;

/// mimalloc, for Rust and, through the `override` feature (which defines `malloc`, `free`,
/// `posix_memalign`, … in the binary, ahead of glibc's), for libtorch too. With glibc's
/// allocator the free space inside the heap grew with every new sequence length (libtorch's
/// activations change size with each batch) until, after about 40 batches, peak RSS stood 30 MB
/// higher than after the first few: not flat in the number of rows. With mimalloc it is flat,
/// and the batches' large buffers are mostly reused instead of mapped and zeroed afresh. Its own
/// transparent huge pages are off (`no_thp`): with 16 threads on a GPU host they put peak RSS
/// 160 MB above the PyTorch script's; libtorch still asks for huge pages for its large
/// buffers (`model::configure_libtorch`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
