//! A Parquet file, read from memory through the same reader as a file on disk.
//!
//! libfuzzer-sys installs, before the first input, a panic hook that aborts on every panic.
//! The reader's guard (crates/maskaudit-core/src/data/guard.rs) wraps the hook installed before its first use and
//! silences it only while inside the guard, so a panic the reader catches is no crash, while
//! one that escapes still aborts and is reported.
#![no_main]

// Not everything the binary uses is exercised here.
#[allow(dead_code, unused_imports)]
#[path = "../../crates/maskaudit-core/src/data/mod.rs"]
mod data;

#[allow(dead_code)]
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    common::read_parquet(bytes);
});
