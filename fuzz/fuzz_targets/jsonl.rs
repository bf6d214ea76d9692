//! Plain JSONL through the reader of standard input: every row read until the first error.
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
    // Skip the gzip and Parquet magic: the other targets cover those.
    if bytes.starts_with(&[0x1f, 0x8b]) || bytes.starts_with(b"PAR1") {
        return;
    }
    common::read_stream(bytes);
});
