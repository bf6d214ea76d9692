//! Command-line arguments.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::commands::check::{LossOptions, LossSource, WeightsFile};
use crate::data::{FieldNames, CU_SEQLENS_FIELD, DEFAULT_MAX_LINE_BYTES, SEQ_LENS_FIELD};
use crate::findings::Code;
use crate::model::{DeviceChoice, DtypeChoice, ForwardArg, Tf32};
use maskaudit_core::loss::diagnosis::DEFAULT_RTOL;
use maskaudit_core::loss::policy_aggregation::Aggregation;
use maskaudit_core::loss::user::LossArg;

#[derive(Debug, Parser)]
#[command(
    name = "maskaudit",
    version,
    about = "Audit how padding and loss masks enter a causal language model's training loss",
    after_help = "Exit status: 0 pass, 1 a check failed (an error finding), 2 usage or input error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the model over the dataset and compare the loss with and without the mask.
    Check(Box<CheckArgs>),
    /// Check how the dataset's labels and masks were built, without a model; --show prints rows.
    Lint(Box<LintArgs>),
    /// Print the long explanation of a finding code, with a fix.
    Explain {
        /// A finding code, e.g. padding-contamination; `all` lists every code.
        code: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    /// GitHub-flavoured Markdown, the same as the GitHub Actions job summary
    Markdown,
}

/// When the token view uses colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorWhen {
    /// When standard output is a terminal and NO_COLOR is not set
    Auto,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// TorchScript causal LM: forward(input_ids[, attention_mask]) -> logits [B,T,V]
    #[arg(required_unless_present = "captured_losses")]
    pub model: Option<PathBuf>,
    /// Pre-tokenized dataset: JSONL, .jsonl.gz or Parquet; `-` reads JSONL on standard input
    #[arg(
        required_unless_present = "captured_losses",
        conflicts_with = "captured_losses"
    )]
    pub data: Option<PathBuf>,
    /// A run captured on every rank with per-token losses: a directory of one run's
    /// <name>.rank<r>.parquet files, one of them, or a single capture; audited without a
    /// model (MODEL, if given, is cross-checked against the recorded losses)
    #[arg(long, value_name = "PATH")]
    pub captured_losses: Option<PathBuf>,

    #[command(flatten)]
    pub data_opts: DataArgs,

    /// cpu, cuda, cuda:N, or auto (CUDA when available)
    #[arg(long, default_value = "auto", value_parser = parsed::<DeviceChoice>, help_heading = "Model")]
    pub device: DeviceChoice,
    /// The forward's tensors, in order, for a model without a maskaudit-export record: input_ids,
    /// attention_mask, position_ids, labels [default: probed, and an error when unclear]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parsed::<ForwardArg>, help_heading = "Model")]
    pub forward_args: Vec<ForwardArg>,
    /// The dtype the forward runs in: auto (the model's own: its export record's, else its
    /// parameters'), float32, bfloat16 or float16; the losses and sums stay float32/float64
    #[arg(long, default_value = "auto", value_parser = parsed::<DtypeChoice>, help_heading = "Model")]
    pub dtype: DtypeChoice,
    /// TF32 for float32 matrix products on CUDA (tensor cores; inputs rounded to a 10-bit
    /// mantissa, float32 accumulation): on or off; no effect on the CPU or in other dtypes
    #[arg(long, default_value = "on", value_parser = parsed::<Tf32>, help_heading = "Model")]
    pub tf32: Tf32,
    /// Skip the trace-consistency probe (padding appended, rows alone) on the first batch
    #[arg(long, help_heading = "Model")]
    pub no_model_probe: bool,

    /// Fail (exit 1) when |all_positions_mean − masked_token_mean| / masked_token_mean exceeds this
    #[arg(long, value_name = "RELATIVE", allow_negative_numbers = true, value_parser = parse_fraction, help_heading = "Checks")]
    pub max_contamination: Option<f64>,

    /// EOS token id, for the eos-masked, eos-missing and pad-is-eos checks
    #[arg(long, allow_negative_numbers = true, value_parser = parse_token_id, help_heading = "Checks")]
    pub eos_id: Option<i64>,

    #[command(flatten)]
    pub user_loss: UserLossArgs,

    /// Simulate optimizer steps of K micro-batches (gradient accumulation) per rank; K × W is
    /// at most 1048576 (2^20)
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=MAX_STEP_MICRO_BATCHES as i64), help_heading = "Training step")]
    pub accum: Option<u32>,
    /// Simulate W data-parallel ranks; micro-batch i of a step goes to rank i mod W; K × W is
    /// at most 1048576 (2^20)
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u32).range(1..=MAX_STEP_MICRO_BATCHES as i64), help_heading = "Training step")]
    pub world_size: Option<u32>,
    /// Leave out the last, partial step, as a trainer with drop_last does
    #[arg(long, help_heading = "Training step")]
    pub drop_last: bool,

    #[command(flatten)]
    pub severity: SeverityArgs,

    #[command(flatten)]
    pub output: OutputArgs,

    #[command(flatten)]
    pub reports: ReportArgs,

    /// Decode the HTML report's tokens through this Hugging Face tokenizer.json
    #[arg(long, value_name = "FILE", requires = "html", help_heading = "Reports")]
    pub tokenizer: Option<PathBuf>,
}

/// Reports beside the output, for CI and for people (both commands).
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Write the findings as JUnit XML (one test case per check) to FILE
    #[arg(long, value_name = "FILE", help_heading = "Reports")]
    pub junit: Option<PathBuf>,
    /// Write a self-contained HTML report, with a per-token view of the first rows, to FILE
    #[arg(long, value_name = "FILE", help_heading = "Reports")]
    pub html: Option<PathBuf>,
    /// Rows in the HTML report's token view
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        requires = "html",
        help_heading = "Reports"
    )]
    pub html_rows: usize,
    /// Accept the findings listed in FILE (code and data path): they stay in the report,
    /// downgraded and marked baselined, and no longer fail the run
    #[arg(long, value_name = "FILE", help_heading = "Reports")]
    pub baseline: Option<PathBuf>,
    /// Write this run's findings to FILE as a baseline (JSON) for --baseline
    #[arg(long, value_name = "FILE", help_heading = "Reports")]
    pub write_baseline: Option<PathBuf>,
}

/// The user's own loss, to be audited. Its other options need one of `--loss` and
/// `--loss-method`: without, they would be ignored.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("loss_source").args(["loss", "loss_method"])))]
pub struct UserLossArgs {
    /// TorchScript loss module: forward(<--loss-args>) -> scalar tensor (or a tuple, loss first)
    #[arg(long, value_name = "FILE", help_heading = "Your loss")]
    pub loss: Option<PathBuf>,
    /// A method of the model computing the loss (an @torch.jit.export method, or `forward` for
    /// models that return the loss first when given labels)
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "loss",
        help_heading = "Your loss"
    )]
    pub loss_method: Option<String>,
    /// Tensors passed to the loss, in order: logits, input_ids, labels, attention_mask,
    /// shift_logits, targets, loss_mask, num_items_in_batch; for a policy loss logprobs,
    /// old_logprobs, ref_logprobs, advantages, response_mask; for a preference loss
    /// chosen_logprobs, rejected_logprobs, chosen_mask, rejected_mask, ref_chosen_logprobs,
    /// ref_rejected_logprobs [default: logits,labels; input_ids,labels with --loss-method]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parsed::<LossArg>, requires = "loss_source", help_heading = "Your loss")]
    pub loss_args: Vec<LossArg>,
    /// Extra relative tolerance for matching your loss to a formula, in [0, 0.5), on top of the
    /// float32 rounding bound derived for each batch (raise it for a loss computed in half
    /// precision)
    #[arg(long, default_value_t = DEFAULT_RTOL, allow_negative_numbers = true, value_parser = parse_rtol, requires = "loss_source", help_heading = "Your loss")]
    pub rtol: f64,
    /// Skip the padding and masked-logit invariance probes
    #[arg(long, requires = "loss_source", help_heading = "Your loss")]
    pub no_probes: bool,
    /// Write every row's per-target gradient weights (JSON lines) to this file
    #[arg(
        long,
        value_name = "FILE",
        requires = "loss_source",
        help_heading = "Your loss"
    )]
    pub weights_out: Option<PathBuf>,
    /// The aggregation your policy loss should compute (token_mean, seq_mean_token_mean,
    /// seq_mean_token_sum, seq_mean_token_sum_norm): another one fails the run
    #[arg(long, value_name = "MODE", value_parser = parsed::<Aggregation>, requires = "loss_source", help_heading = "Your loss")]
    pub expect_aggregation: Option<Aggregation>,
}

impl UserLossArgs {
    /// The options of the loss audit; `weights_out` is `--weights-out`'s staged file.
    pub fn options(&self, weights_out: Option<WeightsFile>) -> Option<LossOptions> {
        // clap rejects --loss together with --loss-method.
        let source = match (&self.loss, &self.loss_method) {
            (Some(file), _) => LossSource::File(file.clone()),
            (None, Some(method)) => LossSource::Method(method.clone()),
            (None, None) => return None,
        };
        let args = if !self.loss_args.is_empty() {
            self.loss_args.clone()
        } else if let LossSource::Method(_) = source {
            vec![LossArg::InputIds, LossArg::Labels]
        } else {
            vec![LossArg::Logits, LossArg::Labels]
        };
        Some(LossOptions {
            source,
            args,
            args_given: !self.loss_args.is_empty(),
            rtol: self.rtol,
            probes: !self.no_probes,
            weights_out,
            expect_aggregation: self.expect_aggregation,
        })
    }
}

/// `maskaudit lint`: `check`'s data options, without a model.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("token_view").args(["show", "html"]).multiple(true)))]
// Not `#[command(flatten)] DataArgs`: only the field names and the limits are the same
// (flattened: `FieldArgs`, `LimitArgs`). `lint`'s `--batch-size` is optional and only for a
// statistic, with no default and no `--micro-batch` alias, and its `--pad-id` is described for
// a model-free run; flattening would change `lint --help` and the option's meaning.
pub struct LintArgs {
    /// Pre-tokenized dataset: JSONL, .jsonl.gz or Parquet; `-` reads JSONL on standard input
    pub data: PathBuf,

    /// With it, statistics include the padding that batching rows in file order would add (1
    /// to 1048576 rows)
    #[arg(long, allow_negative_numbers = true, value_parser = parse_batch_size, help_heading = "Data")]
    pub batch_size: Option<u32>,
    /// Pad token id: a row's trailing run of it is padding when the row has no attention_mask
    #[arg(long, allow_negative_numbers = true, value_parser = parse_token_id, help_heading = "Data")]
    pub pad_id: Option<i64>,
    #[command(flatten)]
    pub fields: FieldArgs,
    #[command(flatten)]
    pub limits: LimitArgs,

    /// EOS token id, for the eos-masked, eos-missing and pad-is-eos checks
    #[arg(long, allow_negative_numbers = true, value_parser = parse_token_id, help_heading = "Checks")]
    pub eos_id: Option<i64>,
    /// Labels and masks are already aligned with the targets (labels[t] == input_ids[t+1]) for a loss that does not shift
    #[arg(long, help_heading = "Checks")]
    pub shifted: bool,
    #[command(flatten)]
    pub severity: SeverityArgs,

    /// Print the first N rows as strips of tokens, trained targets highlighted (table format)
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count, help_heading = "Token view")]
    pub show: Option<usize>,
    /// Decode the token view (--show, --html) through this Hugging Face tokenizer.json
    #[arg(
        long,
        value_name = "FILE",
        requires = "token_view",
        help_heading = "Token view"
    )]
    pub tokenizer: Option<PathBuf>,
    /// Colour the token view: auto follows the terminal and NO_COLOR
    #[arg(long, value_enum, default_value_t = ColorWhen::Auto, help_heading = "Token view")]
    pub color: ColorWhen,

    #[command(flatten)]
    pub output: OutputArgs,

    #[command(flatten)]
    pub reports: ReportArgs,
}

/// How rows are read and batched.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Rows per batch (a micro-batch of the training step), in file order, from 1 to 1048576
    /// (2^20); the last batch may be partial
    #[arg(long, alias = "micro-batch", default_value_t = 8, allow_negative_numbers = true, value_parser = parse_batch_size, help_heading = "Data")]
    pub batch_size: u32,
    /// Token id used to right-pad rows to the longest row of their batch (padding gets mask 0)
    #[arg(long, allow_negative_numbers = true, value_parser = parse_token_id, help_heading = "Data")]
    pub pad_id: Option<i64>,
    #[command(flatten)]
    pub fields: FieldArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl DataArgs {
    pub fn fields(&self) -> Result<FieldNames, String> {
        self.fields.names()
    }
}

/// Bounds on what one record of the input may cost.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Longest JSONL line read, in bytes. A line is held whole while it is parsed, so this
    /// bounds memory; the default, 256 MiB, is ten times a row of a million tokens with
    /// labels and masks, and stops a file with no newlines (the wrong file, a decompression
    /// bomb) before it fills memory
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_LINE_BYTES, allow_negative_numbers = true, value_parser = parse_line_bytes, help_heading = "Data")]
    pub max_line_bytes: usize,
}

/// Names of the fields rows are read from.
#[derive(Debug, Args)]
pub struct FieldArgs {
    /// Field holding the token ids
    #[arg(long, default_value = "input_ids", help_heading = "Data")]
    pub input_field: String,
    /// Field holding labels aligned with the ids (-100 = not trained)
    #[arg(long, default_value = "labels", help_heading = "Data")]
    pub labels_field: String,
    /// Field holding a 0/1 loss mask aligned with the ids
    #[arg(long, default_value = "loss_mask", help_heading = "Data")]
    pub mask_field: String,
    /// Field holding the 0/1 attention mask
    #[arg(long, default_value = "attention_mask", help_heading = "Data")]
    pub attention_mask_field: String,
    /// Field holding position ids (0 where a packed document starts); `seq_lens` and
    /// `cu_seqlens` are read under those names
    #[arg(long, default_value = "position_ids", help_heading = "Data")]
    pub position_ids_field: String,
}

impl FieldArgs {
    /// The names, each naming a different column: a column read for two fields would fill
    /// only the first, and the other would silently go missing.
    pub fn names(&self) -> Result<FieldNames, String> {
        let options = [
            ("--input-field", &self.input_field),
            ("--labels-field", &self.labels_field),
            ("--mask-field", &self.mask_field),
            ("--attention-mask-field", &self.attention_mask_field),
            ("--position-ids-field", &self.position_ids_field),
        ];
        for (i, (option, name)) in options.iter().enumerate() {
            if let Some((other, _)) = options[..i].iter().find(|(_, n)| n == name) {
                return Err(format!(
                    "{other} and {option} both name the column '{name}': each field needs a column of its own"
                ));
            }
            if [SEQ_LENS_FIELD, CU_SEQLENS_FIELD].contains(&name.as_str()) {
                return Err(format!(
                    "{option} {name}: '{name}' is always read as the packed rows' {name} field; name another column"
                ));
            }
        }
        Ok(FieldNames {
            input_ids: self.input_field.clone(),
            labels: self.labels_field.clone(),
            loss_mask: self.mask_field.clone(),
            attention_mask: self.attention_mask_field.clone(),
            position_ids: self.position_ids_field.clone(),
        })
    }
}

/// Severity overrides by finding code.
#[derive(Debug, Args)]
pub struct SeverityArgs {
    /// Make a finding code an error (exit 1); repeatable
    #[arg(long, value_name = "CODE", value_parser = parsed::<Code>, help_heading = "Checks")]
    pub deny: Vec<Code>,
    /// Make a finding code a warning; repeatable
    #[arg(long, value_name = "CODE", value_parser = parsed::<Code>, help_heading = "Checks")]
    pub warn: Vec<Code>,
    /// Make a finding code informational (never fails); repeatable
    #[arg(long, value_name = "CODE", value_parser = parsed::<Code>, help_heading = "Checks")]
    pub allow: Vec<Code>,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Table, help_heading = "Output")]
    pub format: Format,
    /// No progress bar
    #[arg(long, short, help_heading = "Output")]
    pub quiet: bool,
}

/// The options whose types parse themselves (`FromStr` with a message saying what is valid).
fn parsed<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

// Negative numbers reach these parsers (`allow_negative_numbers`) so that the message says
// what range is valid instead of clap's "unexpected argument '-1'".

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!(
            "'{s}' is not a non-negative number (0.05 means 5%)"
        )),
    }
}

/// Slack on top of the derived float32 tolerance, so 0 is fine; from 0.5 on a loss that is off
/// by half, as the padding bugs audited here make it, would still match.
fn parse_rtol(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..0.5).contains(&x) => Ok(x),
        _ => Err(format!(
            "'{s}' is not a relative tolerance in [0, 0.5) (1e-3 means 0.1%)"
        )),
    }
}

fn parse_token_id(s: &str) -> Result<i64, String> {
    match s.parse::<i64>() {
        Ok(id) if id >= 0 => Ok(id),
        _ => Err(format!("'{s}' is not a token id: expected an integer ≥ 0")),
    }
}

/// The most rows in a batch (`--batch-size`). Memory comes from the rows read, never from
/// the option, but a batch is held whole and sent through the model as one tensor: past a
/// million rows it is a mistyped number, not a batch.
pub const MAX_BATCH_SIZE: u32 = 1 << 20;

/// The most micro-batches in a simulated optimizer step (`--accum` × `--world-size`): a step
/// is held whole until it is weighed.
pub const MAX_STEP_MICRO_BATCHES: u32 = 1 << 20;

fn parse_batch_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_BATCH_SIZE).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a batch size: expected a number of rows from 1 to {MAX_BATCH_SIZE}"
        )),
    }
}

impl CheckArgs {
    /// `--accum` × `--world-size`, bounded: the micro-batches of one step are held together.
    pub fn micro_batches_per_step(&self) -> Result<usize, String> {
        let accum = self.accum.unwrap_or(1);
        let world = self.world_size.unwrap_or(1);
        match accum.checked_mul(world) {
            Some(n) if n <= MAX_STEP_MICRO_BATCHES => Ok(n as usize),
            _ => Err(format!(
                "--accum {accum} × --world-size {world} is more than {MAX_STEP_MICRO_BATCHES} micro-batches a step"
            )),
        }
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| format!("'{s}' is not a count: expected an integer ≥ 0"))
}

fn parse_line_bytes(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "'{s}' is not a size in bytes: expected an integer ≥ 1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_parsers_state_their_range() {
        assert_eq!(parse_rtol("1e-3"), Ok(1e-3));
        assert_eq!(parse_rtol("0"), Ok(0.0));
        for bad in ["0.5", "1e300", "-1", "nan", "inf", "x"] {
            assert!(parse_rtol(bad).unwrap_err().contains("[0, 0.5)"), "{bad}");
        }
        assert_eq!(parse_token_id("0"), Ok(0));
        assert!(parse_token_id("-1").unwrap_err().contains("≥ 0"));
        assert_eq!(parse_batch_size("4"), Ok(4));
        assert!(parse_batch_size("0").unwrap_err().contains("from 1"));
        assert!(parse_batch_size("-1").unwrap_err().contains("from 1"));
        assert_eq!(parse_batch_size("1048576"), Ok(1 << 20));
        for huge in ["1048577", "4294967295", "18446744073709551616"] {
            assert!(
                parse_batch_size(huge).unwrap_err().contains("to 1048576"),
                "{huge}"
            );
        }
        assert!(parse_line_bytes("0").is_err());
        assert!(parse_count("-2").is_err());
    }

    fn fields(args: &[&str]) -> Result<FieldNames, String> {
        let mut all = vec!["maskaudit", "lint", "d.jsonl"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Lint(lint) => lint.fields.names(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_column_mapped_to_two_fields_is_refused() {
        assert!(fields(&[]).is_ok());
        assert!(fields(&["--input-field", "tokens"]).is_ok());
        assert_eq!(
            fields(&["--labels-field", "input_ids"]).unwrap_err(),
            "--input-field and --labels-field both name the column 'input_ids': each field needs a column of its own"
        );
        assert!(
            fields(&["--mask-field", "m", "--attention-mask-field", "m"])
                .unwrap_err()
                .starts_with("--mask-field and --attention-mask-field")
        );
        assert!(fields(&["--position-ids-field", "seq_lens"])
            .unwrap_err()
            .starts_with("--position-ids-field seq_lens:"));
    }

    fn check_args(args: &[&str]) -> Result<Box<CheckArgs>, clap::Error> {
        let mut all = vec!["maskaudit", "check", "m.pt", "d.jsonl"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|cli| match cli.command {
            Command::Check(check) => check,
            _ => unreachable!(),
        })
    }

    #[test]
    fn a_step_is_bounded_each_option_and_their_product() {
        let per_step = |args: &[&str]| check_args(args).unwrap().micro_batches_per_step();
        assert_eq!(per_step(&[]), Ok(1));
        assert_eq!(per_step(&["--accum", "4", "--world-size", "8"]), Ok(32));
        assert_eq!(per_step(&["--accum", "1048576"]), Ok(1 << 20));
        assert_eq!(
            per_step(&["--accum", "1024", "--world-size", "1025"]).unwrap_err(),
            "--accum 1024 × --world-size 1025 is more than 1048576 micro-batches a step"
        );
        for option in ["--accum", "--world-size"] {
            let err = check_args(&[option, "4294967295"]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        }
    }

    #[test]
    fn loss_options_need_a_loss() {
        for args in [
            &["--loss-args", "logits,labels"][..],
            &["--rtol", "0.01"],
            &["--no-probes"],
            &["--weights-out", "w.jsonl"],
        ] {
            let mut all = vec!["maskaudit", "check", "m.pt", "d.jsonl"];
            all.extend_from_slice(args);
            let err = Cli::try_parse_from(all).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        }
        let ok = [
            "maskaudit",
            "check",
            "m.pt",
            "d.jsonl",
            "--loss-method",
            "forward",
            "--rtol",
            "0.01",
        ];
        assert!(Cli::try_parse_from(ok).is_ok());
    }
}
