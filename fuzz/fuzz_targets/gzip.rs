//! gzip-compressed JSONL through the reader of standard input. The input is a gzip stream;
//! a missing magic number is put in front so that every input takes the gzip path.
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
    if bytes.starts_with(&[0x1f, 0x8b]) {
        common::read_stream(bytes);
    } else {
        let mut with_magic = vec![0x1f, 0x8b];
        with_magic.extend_from_slice(bytes);
        common::read_stream(&with_magic);
    }
});
