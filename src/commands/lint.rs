//! `maskaudit lint`: stream the dataset through the lint checks, no model involved.
//!
//! The I/O around [`crate::lint`]: open the row source, feed every row to the accumulator,
//! keep the first `--show` rows for the token view, and build the report.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::ProgressBar;

use crate::data::{DataError, FieldNames, Row, RowSource};
use crate::findings::SeverityOverrides;
use crate::lint::{LintOptions, LintState};
use crate::report::{LintDataInfo, LintReport, Verdict, SCHEMA_VERSION};

#[derive(Debug, Clone)]
pub struct LintCommandOptions {
    pub data: PathBuf,
    pub fields: FieldNames,
    /// Longest JSONL line read (`--max-line-bytes`).
    pub max_line_bytes: usize,
    /// `unit` is set from the file that is opened.
    pub lint: LintOptions,
    /// Rows to keep for the token view.
    pub show: usize,
    pub overrides: SeverityOverrides,
}

/// The report, and the first rows for the token view.
pub struct LintRun {
    pub report: LintReport,
    pub shown: Vec<Row>,
}

pub fn run(opts: &LintCommandOptions, progress: &ProgressBar) -> Result<LintRun> {
    let mut source =
        RowSource::open(&opts.data, opts.fields.clone())?.with_max_line_bytes(opts.max_line_bytes);
    if let Some(total) = source.total_bytes() {
        progress.set_length(total);
    }
    let mut lint_opts = opts.lint.clone();
    lint_opts.unit = source.unit();
    let mut state = LintState::new(lint_opts.clone());
    let mut shown = Vec::with_capacity(opts.show.min(1024));
    let mut since_update = 0u32;
    while let Some(row) = source.next() {
        let row = row?;
        state.observe(&row);
        if shown.len() < opts.show {
            shown.push(row);
        }
        since_update += 1;
        if since_update == 1024 {
            progress.set_position(source.bytes_read());
            since_update = 0;
        }
    }
    progress.set_position(source.bytes_read());
    if state.rows() == 0 {
        return Err(DataError::Empty {
            path: source.path().to_string(),
        }
        .into());
    }
    let (statistics, mut findings) = state.finish();
    opts.overrides.apply(&mut findings);
    let verdict = Verdict::of(&findings);
    Ok(LintRun {
        report: LintReport {
            schema_version: SCHEMA_VERSION,
            data: LintDataInfo {
                path: source.path().to_string(),
                format: source.format(),
                records: source.unit(),
                pad_id: lint_opts.pad_id,
                eos_id: lint_opts.eos_id,
                shifted: lint_opts.shifted,
                batch_size: lint_opts.batch_size,
            },
            statistics,
            findings,
            verdict,
        },
        shown,
    })
}
