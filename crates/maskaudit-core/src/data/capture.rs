//! A training run captured by `maskaudit.capture` (python/maskaudit): where its micro-batches
//! begin and end, and what the trainer said of each.
//!
//! A capture is a Parquet file, a row per sequence, whose metadata holds the run's settings
//! under `maskaudit.capture` and whose `maskaudit_*` columns place each row in the run (rank,
//! optimizer step, micro-batch within the step) beside the trainer's `num_items_in_batch` and
//! loss. `check` batches a capture exactly as the trainer did, micro-batch by micro-batch,
//! whatever `--batch-size` says. Only those columns are read here; the rows themselves come
//! through [`super::ParquetReader`] like any Parquet dataset's.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use super::echo::echo;
use super::guard;

/// What the report says of a captured run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureSummary {
    /// `trainer` (maskaudit.capture) or `forward` (maskaudit.capture_forward).
    pub source: String,
    pub micro_batches: u64,
    /// Optimizer steps, over every rank in the file.
    pub steps: u64,
    /// Steps whose `num_items_in_batch` was compared with the trained count.
    pub counts_compared: u64,
    /// The trainer's loss over the captured micro-batches as a token mean: each micro-batch's
    /// loss times its normaliser (`num_items_in_batch` where the trainer passed it to the
    /// loss, else the micro-batch's own trained count), summed, over the trained targets.
    pub trainer_token_mean: Option<f64>,
    /// Which formula the trainer's loss computes, as a sentence (the next-token formulas of
    /// `--loss`, held to the same derived tolerance); null when it was not compared.
    pub trainer_verdict: Option<String>,
    /// Each captured step the trainer logged a loss for (at `logging_steps` 1): the loss it
    /// logged (rounded to 4 decimals by transformers) and the step's true token mean.
    pub logged_steps: Vec<LoggedStep>,
}

/// One step's logged loss beside its token mean.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoggedStep {
    pub step: i64,
    pub logged: f64,
    pub token_mean: f64,
}

/// The metadata key a capture's settings are under.
pub const META_KEY: &str = "maskaudit.capture";

const RANK: &str = "maskaudit_rank";
const STEP: &str = "maskaudit_step";
const MICRO: &str = "maskaudit_micro_batch";
const NUM_ITEMS: &str = "maskaudit_num_items_in_batch";
const LOSS: &str = "maskaudit_trainer_loss";

/// One captured micro-batch: consecutive rows of one (rank, step, micro-batch).
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub rank: i64,
    pub step: i64,
    pub micro: i64,
    pub rows: usize,
    /// The trainer's `num_items_in_batch` for the step, when it passed one.
    pub num_items: Option<f64>,
    /// The loss the trainer computed for this micro-batch.
    pub trainer_loss: Option<f64>,
}

/// A capture's layout and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    pub micro_batches: Vec<MicroBatch>,
    /// The run's settings as the capture recorded them (JSON).
    pub settings: serde_json::Value,
}

impl Capture {
    /// The rows of each micro-batch, in order: the batch boundaries.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.micro_batches.iter().map(|m| m.rows).collect()
    }

    /// A boolean setting of the run, false when absent.
    pub fn setting(&self, name: &str) -> bool {
        self.settings[name].as_bool().unwrap_or(false)
    }

    /// The loss the trainer logged for each captured step (0-based), where it logged one every
    /// step.
    pub fn logged_losses(&self) -> Vec<(i64, f64)> {
        if self.settings["logging_steps"].as_f64() != Some(1.0) {
            return vec![];
        }
        let Some(logged) = self.settings["logged_losses"].as_object() else {
            return vec![];
        };
        let mut out: Vec<(i64, f64)> = logged
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_f64()?)))
            .collect();
        out.sort_by_key(|&(step, _)| step);
        out
    }

    /// The run's world size (1 when absent).
    pub fn world_size(&self) -> i64 {
        self.settings["world_size"].as_i64().unwrap_or(1)
    }
}

/// Whether the file at `path` is a Parquet file (its magic bytes), which may be a capture.
pub fn is_parquet(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"PAR1"
}

/// The capture in the Parquet file at `path`, or `None` for a file that is not one. Errors are
/// one line, for a capture whose placing columns are missing or corrupt.
pub fn read(path: &Path) -> Result<Option<Capture>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    guard::catch(move || read_file(file)).unwrap_or_else(|panic| {
        Err(format!(
            "cannot read the capture's layout: the decoder failed ({})",
            echo(&panic)
        ))
    })
}

fn read_file(file: File) -> Result<Option<Capture>, String> {
    let reader = SerializedFileReader::new(file)
        .map_err(|e| format!("not a readable Parquet file: {}", echo(&e.to_string())))?;
    let metadata = reader.metadata().file_metadata();
    let Some(settings) = metadata
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|entry| entry.key == META_KEY))
        .and_then(|entry| entry.value.clone())
    else {
        return Ok(None);
    };
    let settings: serde_json::Value = serde_json::from_str(&settings)
        .map_err(|e| format!("{META_KEY}: not JSON: {}", echo(&e.to_string())))?;
    let schema = metadata.schema();
    let wanted = [RANK, STEP, MICRO, NUM_ITEMS, LOSS];
    let selected: Vec<_> = schema
        .get_fields()
        .iter()
        .filter(|f| wanted.contains(&f.name()))
        .cloned()
        .collect();
    for needed in [STEP, MICRO] {
        if !selected.iter().any(|f| f.name() == needed) {
            return Err(format!("a capture without its {needed} column"));
        }
    }
    let projection = Type::group_type_builder(schema.name())
        .with_fields(selected)
        .build()
        .map_err(|e| echo(&e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| echo(&e.to_string()))?;
    let mut micro_batches: Vec<MicroBatch> = vec![];
    for (n, row) in rows.enumerate() {
        let row = row.map_err(|e| format!("row {}: {}", n + 1, echo(&e.to_string())))?;
        let mut placed = MicroBatch {
            rank: 0,
            step: 0,
            micro: 0,
            rows: 1,
            num_items: None,
            trainer_loss: None,
        };
        for (name, field) in row.get_column_iter() {
            let int = || match field {
                Field::Long(v) => Ok(*v),
                Field::Int(v) => Ok(i64::from(*v)),
                other => Err(format!("row {}: {name}: not an integer ({other})", n + 1)),
            };
            let real = match field {
                Field::Double(v) => Some(*v),
                Field::Float(v) => Some(f64::from(*v)),
                Field::Long(v) => Some(*v as f64),
                _ => None,
            };
            match name.as_str() {
                RANK => placed.rank = int()?,
                STEP => placed.step = int()?,
                MICRO => placed.micro = int()?,
                NUM_ITEMS => placed.num_items = real,
                LOSS => placed.trainer_loss = real,
                _ => {}
            }
        }
        match micro_batches.last_mut() {
            Some(last)
                if (last.rank, last.step, last.micro)
                    == (placed.rank, placed.step, placed.micro) =>
            {
                last.rows += 1;
            }
            _ => micro_batches.push(placed),
        }
    }
    Ok(Some(Capture {
        micro_batches,
        settings,
    }))
}
