//! maskaudit's commands: each reads its input, drives the core (`maskaudit_core`) and the
//! model side (`maskaudit_torch`) and returns a report. The command line is the binary's
//! (src/main.rs, src/cli/).
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod commands;

// The other crates' modules under the names the commands have always used for them.
use maskaudit_core::{data, findings, lint, report, sys};
use maskaudit_torch::model;

/// mimalloc, for Rust and, through the `override` feature (which defines `malloc`, `free`,
/// `posix_memalign`, … in the binary, ahead of glibc's), for libtorch too. With glibc's
/// allocator the free space inside the heap grew with every new sequence length (libtorch's
/// activations change size with each batch), so peak RSS was not flat in the number of rows;
/// with mimalloc it is, and the batches' large buffers are mostly reused instead of mapped and
/// zeroed afresh. Its own transparent huge pages are off (`no_thp`): with many threads on a GPU
/// host they raised peak RSS above the PyTorch script's (docs/performance.md, "The allocator");
/// libtorch still asks for huge pages for its large buffers (`model::configure_libtorch`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
