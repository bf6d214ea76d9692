//! `--format json`: the report as one JSON document.
//!
//! The schema is documented in docs/json.md and tested from the consumer's side
//! in `tests/cli.rs`, which decodes the real binary's output.

use std::io::Write;

use serde::Serialize;

pub fn write<W: Write, T: Serialize>(out: &mut W, report: &T) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report)?;
    writeln!(out)
}
