//! Parquet rows, through the parquet crate's record API (no Arrow: it is a far lighter build).
//!
//! Only the columns a row is built from are read (a projection), so a wide file with text
//! columns costs little. Token columns are lists of any integer type (`list<int64>`,
//! `list<int32>`, …; booleans read as 0/1); a null column value is an absent field, as JSON
//! `null` is. The record API decodes row groups a batch at a time, so memory stays bounded.
//!
//! The parquet crate panics on some corrupt files; opening and every row fetch run under
//! [`guard::catch`], and a reader that panicked reads no further. It also trusts the counts
//! in page headers: a 6 kB file whose dictionary page claimed 1.7 billion values made it
//! fill 14 GB. The rows are read through [`CheckedFile`], which refuses such a page first.

use std::fs::File;
use std::path::Path;

use parquet::basic::Type as Physical;
use parquet::bloom_filter::Sbbf;
use parquet::column::page::{Page, PageMetadata, PageReader};
use parquet::errors::{ParquetError, Result as ParquetResult};
use parquet::file::metadata::{ParquetMetaData, RowGroupMetaData};
use parquet::file::reader::{ChunkReader, FileReader, RowGroupReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;
use parquet::schema::types::{ColumnDescriptor, Type};

use super::documents;
use super::echo::echo;
use super::guard;
use super::{validate, DataError, FieldNames, Pos, RawRow, Row};

/// Column names listed when the token column is missing.
const LISTED_COLUMNS: usize = 20;

pub struct ParquetReader {
    path: String,
    /// `None` after a panic.
    rows: Option<RowIter<'static>>,
    fields: FieldNames,
    row_no: usize,
    total_rows: u64,
    file_len: u64,
}

impl ParquetReader {
    pub fn open(path: &Path, display: String, fields: FieldNames) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|source| DataError::Open {
            path: display.clone(),
            source,
        })?;
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        Self::from_chunks(display, file, file_len, fields)
    }

    /// A Parquet file held in memory.
    pub fn from_bytes(
        display: String,
        bytes: Vec<u8>,
        fields: FieldNames,
    ) -> Result<Self, DataError> {
        let len = bytes.len() as u64;
        Self::from_chunks(display, bytes::Bytes::from(bytes), len, fields)
    }

    fn from_chunks<R: ChunkReader + 'static>(
        display: String,
        file: R,
        file_len: u64,
        fields: FieldNames,
    ) -> Result<Self, DataError> {
        let format_err = |message: String| DataError::Format {
            path: display.clone(),
            message,
        };
        let opened = guard::stall_limited(
            || {
                format!(
                    "{display}: not a readable Parquet file: the decoder stalls on its metadata"
                )
            },
            || guard::catch(|| Self::open_rows(file, &fields)),
        );
        let (rows, total_rows) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(message)) => return Err(format_err(message)),
            Err(panic) => {
                return Err(format_err(format!(
                    "not a readable Parquet file: the decoder failed on corrupt metadata ({})",
                    echo(&panic)
                )))
            }
        };
        Ok(Self {
            path: display,
            rows: Some(rows),
            fields,
            row_no: 0,
            total_rows,
            file_len,
        })
    }

    /// The row iterator over the columns a row is built from, and the number of rows.
    fn open_rows<R: ChunkReader + 'static>(
        file: R,
        fields: &FieldNames,
    ) -> Result<(RowIter<'static>, u64), String> {
        let reader = SerializedFileReader::new(file)
            .map_err(|e| format!("not a readable Parquet file: {}", echo(&e.to_string())))?;
        let metadata = reader.metadata().file_metadata();
        let schema = metadata.schema();
        let total_rows = u64::try_from(metadata.num_rows()).unwrap_or(0);
        let wanted = fields.all();
        let selected: Vec<_> = schema
            .get_fields()
            .iter()
            .filter(|f| wanted.contains(&f.name()))
            .cloned()
            .collect();
        if !selected.iter().any(|f| f.name() == fields.input_ids) {
            let all = schema.get_fields();
            let mut columns: Vec<String> = all
                .iter()
                .take(LISTED_COLUMNS)
                .map(|f| echo(f.name()))
                .collect();
            if all.len() > LISTED_COLUMNS {
                columns.push(format!("and {} more", all.len() - LISTED_COLUMNS));
            }
            return Err(format!(
                "{}: no such column (columns: {}); --input-field names it",
                fields.input_ids,
                columns.join(", ")
            ));
        }
        let projection = Type::group_type_builder(schema.name())
            .with_fields(selected)
            .build()
            .map_err(|e| format!("cannot select columns: {}", echo(&e.to_string())))?;
        let rows = RowIter::from_file_into(Box::new(CheckedFile(reader)))
            .project(Some(projection))
            .map_err(|e| format!("cannot read columns: {}", echo(&e.to_string())))?;
        Ok((rows, total_rows))
    }

    /// Estimated from the rows read: the record API does not expose byte offsets.
    pub fn bytes_read(&self) -> u64 {
        match self.total_rows {
            0 => 0,
            n => (self.file_len as f64 * self.row_no as f64 / n as f64) as u64,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.file_len
    }

    fn convert(&self, row: parquet::record::Row, at: Pos) -> Result<Row, DataError> {
        let mut raw = RawRow::default();
        let mut from_mask = None;
        for (name, field) in row.get_column_iter() {
            let Some(slot) = raw.slot(&self.fields, name) else {
                continue;
            };
            if slot.is_some() {
                continue;
            }
            let field_error = |message| DataError::Field {
                path: self.path.clone(),
                at,
                field: name.clone(),
                message,
            };
            *slot = if *name == self.fields.attention_mask && is_nested(field) {
                let (attention, cu) = block_mask(field).map_err(field_error)?;
                from_mask = Some(cu);
                Some(attention)
            } else {
                int_list(field).map_err(field_error)?
            };
        }
        if raw.cu_seqlens.is_none() {
            raw.cu_seqlens = from_mask.filter(|cu| cu.len() > 2);
        }
        validate(raw, &self.path, at, &self.fields)
    }
}

impl Iterator for ParquetReader {
    type Item = Result<Row, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        let rows = self.rows.as_mut()?;
        let at = Pos::row(self.row_no + 1);
        let path = &self.path;
        let next = guard::stall_limited(
            || format!("{path}:{at}: cannot decode: the decoder stalls on corrupt data"),
            || guard::catch(|| rows.next()),
        );
        let next = match next {
            Ok(next) => next?,
            Err(panic) => {
                self.rows = None;
                return Some(Err(DataError::Record {
                    path: self.path.clone(),
                    at,
                    message: format!(
                        "cannot decode: the decoder failed on corrupt data ({})",
                        echo(&panic)
                    ),
                }));
            }
        };
        self.row_no += 1;
        Some(match next {
            Ok(row) => self.convert(row, at),
            Err(e) => Err(DataError::Record {
                path: self.path.clone(),
                at,
                message: format!("cannot decode: {}", echo(&e.to_string())),
            }),
        })
    }
}

/// A file reader whose pages are checked before they are decoded: everything else is the
/// parquet crate's own.
pub(super) struct CheckedFile<R: ChunkReader>(pub(super) SerializedFileReader<R>);

impl<R: ChunkReader + 'static> FileReader for CheckedFile<R> {
    fn metadata(&self) -> &ParquetMetaData {
        self.0.metadata()
    }

    fn num_row_groups(&self) -> usize {
        self.0.num_row_groups()
    }

    fn get_row_group(&self, i: usize) -> ParquetResult<Box<dyn RowGroupReader + '_>> {
        Ok(Box::new(CheckedRowGroup(self.0.get_row_group(i)?)))
    }

    fn get_row_iter(&self, projection: Option<Type>) -> ParquetResult<RowIter<'_>> {
        RowIter::from_file(projection, self)
    }
}

struct CheckedRowGroup<'a>(Box<dyn RowGroupReader + 'a>);

impl RowGroupReader for CheckedRowGroup<'_> {
    fn metadata(&self) -> &RowGroupMetaData {
        self.0.metadata()
    }

    fn num_columns(&self) -> usize {
        self.0.num_columns()
    }

    fn get_column_page_reader(&self, i: usize) -> ParquetResult<Box<dyn PageReader>> {
        let column = self.0.metadata().column(i).column_descr();
        Ok(Box::new(CheckedPages {
            pages: self.0.get_column_page_reader(i)?,
            value_bits: min_value_bits(column),
        }))
    }

    fn get_column_bloom_filter(&self, i: usize) -> Option<&Sbbf> {
        self.0.get_column_bloom_filter(i)
    }

    fn get_row_iter(&self, projection: Option<Type>) -> ParquetResult<RowIter<'_>> {
        RowIter::from_row_group(projection, self)
    }
}

/// Fewest bits a PLAIN-encoded value of the column takes (dictionary pages are PLAIN).
fn min_value_bits(column: &ColumnDescriptor) -> u64 {
    match column.physical_type() {
        Physical::BOOLEAN => 1,
        // A byte array carries a 4-byte length.
        Physical::INT32 | Physical::FLOAT | Physical::BYTE_ARRAY => 32,
        Physical::INT64 | Physical::DOUBLE => 64,
        Physical::INT96 => 96,
        Physical::FIXED_LEN_BYTE_ARRAY => 8 * column.type_length().max(1) as u64,
    }
}

/// The pages of one column chunk. The decoder sizes a dictionary by the count its page
/// header gives, before reading the values, so a count its bytes cannot hold is refused.
struct CheckedPages {
    pages: Box<dyn PageReader>,
    value_bits: u64,
}

impl CheckedPages {
    fn check(&self, page: Option<Page>) -> ParquetResult<Option<Page>> {
        if let Some(Page::DictionaryPage {
            buf, num_values, ..
        }) = &page
        {
            if u64::from(*num_values) * self.value_bits > 8 * buf.len() as u64 {
                return Err(ParquetError::General(format!(
                    "corrupt dictionary page: {num_values} values declared in {} bytes",
                    buf.len()
                )));
            }
        }
        Ok(page)
    }
}

impl Iterator for CheckedPages {
    type Item = ParquetResult<Page>;

    fn next(&mut self) -> Option<Self::Item> {
        self.get_next_page().transpose()
    }
}

impl PageReader for CheckedPages {
    fn get_next_page(&mut self) -> ParquetResult<Option<Page>> {
        let page = self.pages.get_next_page()?;
        self.check(page)
    }

    fn peek_next_page(&mut self) -> ParquetResult<Option<PageMetadata>> {
        self.pages.peek_next_page()
    }

    fn skip_next_page(&mut self) -> ParquetResult<()> {
        self.pages.skip_next_page()
    }

    fn supports_deferred_dictionary(&self) -> bool {
        self.pages.supports_deferred_dictionary()
    }

    fn take_deferred_dictionary(&mut self) -> ParquetResult<Option<Page>> {
        let page = self.pages.take_deferred_dictionary()?;
        self.check(page)
    }

    fn at_record_boundary(&mut self) -> ParquetResult<bool> {
        self.pages.at_record_boundary()
    }
}

/// Whether a field is a list of lists: a 2D or 4D attention mask.
fn is_nested(field: &Field) -> bool {
    matches!(field, Field::ListInternal(list)
        if matches!(list.elements().first(), Some(Field::ListInternal(_))))
}

/// A packed row's 2D or 4D attention mask column (lists of lists of 0/1 or booleans), read
/// by [`documents::block_mask`] as in JSONL.
fn block_mask(field: &Field) -> Result<(Vec<i64>, Vec<i64>), String> {
    let expected = || documents::BLOCK_MASK_EXPECTED.to_string();
    let mut field = field;
    // [1, 1, T, T]: take off the leading dimensions of 1.
    while let Field::ListInternal(list) = field {
        match list.elements() {
            [inner] if is_nested(inner) => {
                field = inner;
            }
            _ => break,
        }
    }
    let Field::ListInternal(rows) = field else {
        return Err(expected());
    };
    let rows: Option<Vec<Vec<Option<bool>>>> = rows
        .elements()
        .iter()
        .map(|row| match row {
            Field::ListInternal(cells) => Some(
                cells
                    .elements()
                    .iter()
                    .map(|c| integer(c).and_then(documents::mask_cell))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    documents::block_mask(rows.ok_or_else(expected)?)
}

/// A list of integers; `None` for a null value.
fn int_list(field: &Field) -> Result<Option<Vec<i64>>, String> {
    match field {
        Field::Null => Ok(None),
        Field::ListInternal(list) => list
            .elements()
            .iter()
            .enumerate()
            .map(|(i, e)| {
                integer(e).ok_or_else(|| match e {
                    Field::Null => format!("null at index {i}: expected an integer"),
                    other => format!(
                        "value {} at index {i}: expected an integer",
                        echo(&other.to_string())
                    ),
                })
            })
            .collect::<Result<Vec<i64>, String>>()
            .map(Some),
        other => Err(format!(
            "expected a list of integers, found {}",
            echo(&other.to_string())
        )),
    }
}

fn integer(field: &Field) -> Option<i64> {
    Some(match *field {
        Field::Bool(b) => i64::from(b),
        Field::Byte(v) => i64::from(v),
        Field::Short(v) => i64::from(v),
        Field::Int(v) => i64::from(v),
        Field::Long(v) => v,
        Field::UByte(v) => i64::from(v),
        Field::UShort(v) => i64::from(v),
        Field::UInt(v) => i64::from(v),
        Field::ULong(v) => i64::try_from(v).ok()?,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_panicked_reads_no_further() {
        // Rows 1 to 6 decode; row 7 makes the parquet crate panic (tests/hostile.rs).
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/hostile/parquet/index_out_of_bounds.parquet"
        ));
        let mut reader = ParquetReader::open(path, "f.parquet".into(), FieldNames::default())
            .expect("the metadata reads");
        let mut good = 0;
        let err = loop {
            match reader.next().expect("an error before the end") {
                Ok(_) => good += 1,
                Err(e) => break e.to_string(),
            }
        };
        assert_eq!(good, 6);
        assert!(
            err.starts_with("f.parquet:row 7: cannot decode: the decoder failed on corrupt data ("),
            "{err}"
        );
        assert!(reader.next().is_none());
        assert!(reader.next().is_none());
    }
}
