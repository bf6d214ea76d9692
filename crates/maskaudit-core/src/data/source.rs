//! Opening a dataset, whatever its format, as one iterator of rows.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{
    display_path, reader_from_bytes, DataError, FieldNames, Format, JsonlReader, ParquetReader,
    Row, Unit,
};

/// Counts the bytes read through it, so progress can follow a compressed file.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A directory, or a named pipe (FIFO): opening a FIFO waits, without end, for a writer.
/// The pipe of a process substitution (`<(zcat d.gz)`, a `/dev/fd/N` link to `pipe:[…]`)
/// has its writer already and is read like a file.
fn refuse_special_files(path: &Path, display: &str) -> Result<(), DataError> {
    // A path that cannot be inspected is left to File::open, which says why.
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(());
    };
    let refuse = |message: &str| {
        Err(DataError::Format {
            path: display.to_string(),
            message: message.to_string(),
        })
    };
    if metadata.is_dir() {
        return refuse("is a directory: DATA is a JSONL, .jsonl.gz or Parquet file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if metadata.file_type().is_fifo() && !is_anonymous_pipe(path) {
            return refuse(
                "is a named pipe (FIFO), which would block until a writer opens it: pipe it into standard input instead (`maskaudit ... - < FIFO`)",
            );
        }
    }
    Ok(())
}

/// Whether `path` is, through its symbolic links, a `pipe:[…]` of /proc/PID/fd.
fn is_anonymous_pipe(path: &Path) -> bool {
    let mut current = path.to_path_buf();
    // A few hops: /dev/stdin -> /proc/self/fd/0 -> pipe:[123].
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&current) else {
            return false;
        };
        if target.to_string_lossy().starts_with("pipe:[") {
            return true;
        }
        current = match current.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    false
}

/// Buffer of the file and of the decompressor. Small under the fuzzer (`cfg(fuzzing)`, set by
/// cargo-fuzz): a megabyte allocated for each input slowed it a hundredfold, and small buffers
/// put line ends across buffer boundaries more often.
const READ_BUFFER_BYTES: usize = if cfg!(fuzzing) { 64 } else { 1 << 20 };

const PARQUET_MAGIC: &[u8] = b"PAR1";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];

/// Rows of a dataset, whatever its format: JSONL, gzip-compressed JSONL or Parquet.
pub struct RowSource {
    path: String,
    format: Format,
    inner: Inner,
    /// Bytes of the file consumed, when counted below the decompressor.
    compressed_bytes: Option<Arc<AtomicU64>>,
}

enum Inner {
    Jsonl(JsonlReader),
    Parquet(ParquetReader),
}

impl RowSource {
    /// Opens `path` (`-` is standard input: JSONL, plain or gzip-compressed).
    pub fn open(path: &Path, fields: FieldNames) -> Result<Self, DataError> {
        let display = display_path(path);
        let open_err = |source: io::Error| DataError::Open {
            path: display.clone(),
            source,
        };
        if display == "-" {
            return Self::from_stream(&display, io::stdin(), fields);
        }

        refuse_special_files(path, &display)?;
        let file = File::open(path).map_err(open_err)?;
        let metadata = file.metadata().map_err(open_err)?;
        let total = metadata.len();
        let count = Arc::new(AtomicU64::new(0));
        let mut reader = BufReader::with_capacity(
            READ_BUFFER_BYTES,
            CountingReader {
                inner: file,
                count: count.clone(),
            },
        );
        let head = reader.fill_buf().map_err(open_err)?;
        if head.starts_with(PARQUET_MAGIC) {
            drop(reader);
            let parquet = ParquetReader::open(path, display.clone(), fields)?;
            return Ok(RowSource {
                path: display,
                format: Format::Parquet,
                inner: Inner::Parquet(parquet),
                compressed_bytes: None,
            });
        }
        if head.starts_with(GZIP_MAGIC) {
            let decoder = flate2::read::MultiGzDecoder::new(reader);
            let jsonl = JsonlReader::from_reader(
                display.clone(),
                Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, decoder)),
                Some(total),
                fields,
            );
            return Ok(Self::jsonl(display, Format::JsonlGz, jsonl, Some(count)));
        }
        let jsonl =
            JsonlReader::from_reader(display.clone(), Box::new(reader), Some(total), fields);
        Ok(Self::jsonl(display, Format::Jsonl, jsonl, None))
    }

    /// Rows of a stream that cannot seek (standard input): JSONL, plain or gzip-compressed.
    pub fn from_stream(
        name: &str,
        stream: impl Read + Send + 'static,
        fields: FieldNames,
    ) -> Result<Self, DataError> {
        let display = name.to_string();
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        let head = reader.fill_buf().map_err(|source| DataError::Open {
            path: display.clone(),
            source,
        })?;
        if head.starts_with(GZIP_MAGIC) {
            let decoder = flate2::read::MultiGzDecoder::new(reader);
            let jsonl = JsonlReader::from_reader(
                display.clone(),
                Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, decoder)),
                None,
                fields,
            );
            return Ok(Self::jsonl(display, Format::JsonlGz, jsonl, None));
        }
        if head.starts_with(PARQUET_MAGIC) {
            return Err(DataError::Format {
                path: display,
                message: "Parquet cannot be read from standard input: pass the file's path".into(),
            });
        }
        let jsonl = JsonlReader::from_reader(display.clone(), Box::new(reader), None, fields);
        Ok(Self::jsonl(display, Format::Jsonl, jsonl, None))
    }

    /// Rows of a Parquet file held in memory (the fuzzer's way in).
    pub fn from_parquet_bytes(
        name: &str,
        bytes: Vec<u8>,
        fields: FieldNames,
    ) -> Result<Self, DataError> {
        let parquet = ParquetReader::from_bytes(name.to_string(), bytes, fields)?;
        Ok(RowSource {
            path: name.to_string(),
            format: Format::Parquet,
            inner: Inner::Parquet(parquet),
            compressed_bytes: None,
        })
    }

    /// Lines of JSONL longer than this are an error ([`DEFAULT_MAX_LINE_BYTES`](super::DEFAULT_MAX_LINE_BYTES) unless set);
    /// Parquet has no lines.
    pub fn with_max_line_bytes(mut self, max: usize) -> Self {
        if let Inner::Jsonl(r) = &mut self.inner {
            r.set_max_line_bytes(max);
        }
        self
    }

    /// JSONL rows from memory (tests, and callers that already hold the bytes).
    pub fn from_jsonl_bytes(name: &str, bytes: Vec<u8>, fields: FieldNames) -> Self {
        let reader = reader_from_bytes(name, bytes, fields);
        Self::jsonl(name.to_string(), Format::Jsonl, reader, None)
    }

    fn jsonl(
        path: String,
        format: Format,
        reader: JsonlReader,
        compressed_bytes: Option<Arc<AtomicU64>>,
    ) -> Self {
        RowSource {
            path,
            format,
            inner: Inner::Jsonl(reader),
            compressed_bytes,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// What the record numbers of this source count.
    pub fn unit(&self) -> Unit {
        self.format.unit()
    }

    /// Bytes of the input consumed so far (estimated from rows for Parquet), for progress.
    pub fn bytes_read(&self) -> u64 {
        if let Some(count) = &self.compressed_bytes {
            return count.load(Ordering::Relaxed);
        }
        match &self.inner {
            Inner::Jsonl(r) => r.bytes_read(),
            Inner::Parquet(r) => r.bytes_read(),
        }
    }

    /// Size of the input when known (not for standard input).
    pub fn total_bytes(&self) -> Option<u64> {
        match &self.inner {
            Inner::Jsonl(r) => r.total_bytes(),
            Inner::Parquet(r) => Some(r.total_bytes()),
        }
    }
}

impl Iterator for RowSource {
    type Item = Result<Row, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Jsonl(r) => r.next(),
            Inner::Parquet(r) => r.next(),
        }
    }
}
