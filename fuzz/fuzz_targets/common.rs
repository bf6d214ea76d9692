//! What every target does with its input: read every row, as maskaudit would, until the
//! first error. Memory is bounded by a small line limit, as `--max-line-bytes` bounds it.

use crate::data::{FieldNames, RowSource};

/// Small, so that the fuzzer reaches the limit; large enough for real rows.
const MAX_LINE_BYTES: usize = 64 << 10;

/// JSONL, plain or gzip-compressed, through the reader of standard input.
pub fn read_stream(bytes: &[u8]) {
    let Ok(rows) = RowSource::from_stream("fuzz", std::io::Cursor::new(bytes.to_vec()), fields())
    else {
        return;
    };
    drain(rows.with_max_line_bytes(MAX_LINE_BYTES));
}

/// A Parquet file in memory, through the reader of Parquet files.
pub fn read_parquet(bytes: &[u8]) {
    if let Ok(rows) = RowSource::from_parquet_bytes("fuzz.parquet", bytes.to_vec(), fields()) {
        drain(rows);
    }
}

fn drain(rows: RowSource) {
    for row in rows {
        match row {
            Ok(row) => assert!(!row.input_ids.is_empty() && row.mask.len() == row.input_ids.len()),
            Err(e) => {
                // Every message is one line (the error printer's contract).
                let message = e.to_string();
                assert!(!message.contains('\n'), "{message}");
                // Lists what inputs run one by one trigger (docs/guide.md, "Fuzzing").
                if std::env::var_os("FUZZ_SHOW_ERRORS").is_some() {
                    eprintln!("maskaudit error: {message}");
                }
                break;
            }
        }
    }
}

/// The default names plus the fixed ones, so that every field is exercised.
fn fields() -> FieldNames {
    FieldNames::default()
}
