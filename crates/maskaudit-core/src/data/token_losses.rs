//! The per-token losses a capture recorded (`maskaudit.capture` with `token_losses=True`): a
//! column of T-1 float32 values a row, each position's next-token cross-entropy against the
//! next input id, unmasked, as the run's model produced it. `check --captured-losses` audits
//! them in place of a model's.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use super::echo::echo;
use super::guard;

/// The column's name.
pub const COLUMN: &str = "maskaudit_token_losses";

/// Every row's recorded losses, in file order. Errors are one line: no such column, a row
/// without losses (the capture could not reach the logits), a value that is not a float.
pub fn read(path: &Path) -> Result<Vec<Vec<f32>>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    guard::catch(move || read_file(file)).unwrap_or_else(|panic| {
        Err(format!(
            "cannot read {COLUMN}: the decoder failed ({})",
            echo(&panic)
        ))
    })
}

fn read_file(file: File) -> Result<Vec<Vec<f32>>, String> {
    let reader = SerializedFileReader::new(file)
        .map_err(|e| format!("not a readable Parquet file: {}", echo(&e.to_string())))?;
    let schema = reader.metadata().file_metadata().schema();
    let Some(field) = schema.get_fields().iter().find(|f| f.name() == COLUMN) else {
        return Err(format!(
            "a capture without its {COLUMN} column: capture the run with token_losses=True (the default of maskaudit.capture)"
        ));
    };
    let projection = Type::group_type_builder(schema.name())
        .with_fields(vec![field.clone()])
        .build()
        .map_err(|e| echo(&e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| echo(&e.to_string()))?;
    let mut out = vec![];
    for (n, row) in rows.enumerate() {
        let row = row.map_err(|e| format!("row {}: {}", n + 1, echo(&e.to_string())))?;
        let Some((_, field)) = row.get_column_iter().next() else {
            return Err(format!("row {}: no {COLUMN}", n + 1));
        };
        out.push(floats(field).map_err(|e| format!("row {}: {COLUMN}: {e}", n + 1))?);
    }
    Ok(out)
}

fn floats(field: &Field) -> Result<Vec<f32>, String> {
    match field {
        Field::ListInternal(list) => list
            .elements()
            .iter()
            .map(|v| match v {
                Field::Float(x) => Ok(*x),
                Field::Double(x) => Ok(*x as f32),
                other => Err(format!("not a float ({other})")),
            })
            .collect(),
        Field::Null => Err(
            "none recorded: the capture reached no logits for this micro-batch (its settings' token_losses say why)"
                .to_string(),
        ),
        other => Err(format!("not a list of floats ({other})")),
    }
}
