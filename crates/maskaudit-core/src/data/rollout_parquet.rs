//! Rollouts and preference pairs from Parquet: each row becomes the JSON object a JSONL line
//! would be, so [`super::rollout`] reads both alike. Integers, floats, strings and lists of
//! them map to their JSON kinds, booleans to 0/1 (a boolean response mask), a null value to
//! JSON `null` (an absent field, or a NaN entry in a per-token list).
//!
//! Decoding runs off the main thread, under the panic guard, through the page-checking
//! [`CheckedFile`], as [`super::ParquetReader`] does.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;
use serde_json::{Number, Value};

use super::echo::echo;
use super::guard;
use super::parquet_file::CheckedFile;
use super::rollout::JsonObject;
use super::DataError;

/// Every row of the file, numbered from 1, as a JSON object.
pub fn records(path: &Path, shown: &str) -> Result<Vec<(usize, JsonObject)>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Open {
        path: shown.to_string(),
        source,
    })?;
    let format = |message: String| DataError::Format {
        path: shown.to_string(),
        message,
    };
    let decoded = guard::off_thread(move || {
        guard::stall_limited(
            || "not a readable Parquet file: the decoder stalls".to_string(),
            || guard::catch(|| decode(file)),
        )
    });
    let rows = match decoded {
        Err(stall) => return Err(format(stall)),
        Ok(Err(panic)) => {
            return Err(format(format!(
                "not a readable Parquet file: the decoder failed on corrupt data ({})",
                echo(&panic)
            )))
        }
        Ok(Ok(rows)) => rows.map_err(format)?,
    };
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: shown.to_string(),
        });
    }
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i + 1, r))
        .collect())
}

fn decode(file: File) -> Result<Vec<JsonObject>, String> {
    let reader = SerializedFileReader::new(file)
        .map_err(|e| format!("not a readable Parquet file: {}", echo(&e.to_string())))?;
    let checked: Box<dyn FileReader> = Box::new(CheckedFile(reader));
    let mut out = vec![];
    for (i, row) in RowIter::from_file_into(checked).enumerate() {
        let row =
            row.map_err(|e| format!("row {}: cannot decode: {}", i + 1, echo(&e.to_string())))?;
        let object = row
            .get_column_iter()
            .map(|(name, field)| {
                Ok((
                    name.clone(),
                    json(field).map_err(|m| format!("row {}: {name}: {m}", i + 1))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        out.push(object);
    }
    Ok(out)
}

fn json(field: &Field) -> Result<Value, String> {
    let float = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::from(u8::from(*b)),
        Field::Byte(x) => Value::from(*x),
        Field::Short(x) => Value::from(*x),
        Field::Int(x) => Value::from(*x),
        Field::Long(x) => Value::from(*x),
        Field::UByte(x) => Value::from(*x),
        Field::UShort(x) => Value::from(*x),
        Field::UInt(x) => Value::from(*x),
        Field::ULong(x) => Value::from(*x),
        Field::Float(x) => float(f64::from(*x)),
        Field::Double(x) => float(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(json).collect::<Result<_, _>>()?)
        }
        other => {
            return Err(format!(
                "unsupported Parquet value {}",
                echo(&other.to_string())
            ))
        }
    })
}
