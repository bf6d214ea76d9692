//! The command line and the environment, resolved once (ripgrep's `LowArgs` → `HiArgs`): clap's
//! arguments ([`super::Cli`]) and the variables below become one [`Settings`] value, with
//! every option checked, every output path checked against the inputs and staged
//! ([`super::outputs`]), and the baseline and tokenizer loaded, before any command runs.
//! This is the one module that reads (or writes) the process's environment
//! (tests/architecture.rs holds the rest of the code to that); the libraries get what they need
//! passed in.
//!
//! | variable | effect |
//! |---|---|
//! | `GITHUB_STEP_SUMMARY` | the job summary is appended to this file (an output, staged) |
//! | `GITHUB_ACTIONS=true` | findings also as GitHub annotations on stderr |
//! | `MASKAUDIT_TIMING=1` | the wall time of each phase of `check` on stderr |
//! | `MASKAUDIT_OVERLAP=0` | no batch kept in flight on a GPU |
//! | `MASKAUDIT_SHAPE_BUCKETS=0` | on a GPU, batches run at their own length, not rounded up |
//! | `MASKAUDIT_FUSED_CE=0` | libtorch's CUDA cross-entropy instead of the fused kernel |
//! | `MASKAUDIT_CACHE`, `XDG_CACHE_HOME`, `HOME` | where compiled CUDA kernels are kept (`off`: nowhere) |
//! | `MASKAUDIT_DECODE_STALL_SECS` | seconds a decoder call may stall (tests), else 30 |
//! | `THP_MEM_ALLOC_ENABLE` | set to 1 for `check` unless given (`model::configure_libtorch` says why) |

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};

use super::outputs::{self, Input, Output, Outputs};
use super::{
    CheckArgs, Cli, ColorWhen, Command, Format, LintArgs, OutputArgs, ReportArgs, SeverityArgs,
};
use crate::commands::check::{CheckOptions, WeightsFile};
use crate::commands::lint::LintCommandOptions;
use crate::findings::SeverityOverrides;
use crate::lint::tokenizer::HfTokenizer;
use crate::lint::view::{Ids, TokenText};
use crate::lint::LintOptions;
use crate::report::baseline::Baseline;
use maskaudit_core::loss::steps::StepConfig;

/// What the environment says, read once.
#[derive(Debug, Clone)]
pub struct Env {
    /// `GITHUB_STEP_SUMMARY`, when set and not empty.
    pub step_summary: Option<PathBuf>,
    /// `GITHUB_ACTIONS=true`.
    pub github_actions: bool,
    /// `MASKAUDIT_TIMING=1`.
    pub timing: bool,
    /// Not `MASKAUDIT_OVERLAP=0`.
    pub overlap: bool,
    /// Not `MASKAUDIT_SHAPE_BUCKETS=0`.
    pub shape_buckets: bool,
    /// Not `MASKAUDIT_FUSED_CE=0`.
    pub fused_ce: bool,
    /// The CUDA kernel cache's folder: `MASKAUDIT_CACHE` (`off` or `0`: none), else under
    /// `XDG_CACHE_HOME` or `HOME`.
    pub kernel_cache: Option<PathBuf>,
    /// `MASKAUDIT_DECODE_STALL_SECS`, else 30 s.
    pub decode_stall: Duration,
    /// `THP_MEM_ALLOC_ENABLE` is unset: `check` sets it.
    thp_unset: bool,
}

/// Seconds a decoder call may stall before the run ends, unless the environment says otherwise.
const DECODE_STALL_SECS: f64 = 30.0;

impl Env {
    pub fn read() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        let is = |k: &str, v: &str| std::env::var_os(k).is_some_and(|x| x == v);
        let stall = var("MASKAUDIT_DECODE_STALL_SECS")
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(DECODE_STALL_SECS);
        Env {
            step_summary: std::env::var_os("GITHUB_STEP_SUMMARY")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            github_actions: is("GITHUB_ACTIONS", "true"),
            timing: is("MASKAUDIT_TIMING", "1"),
            overlap: !is("MASKAUDIT_OVERLAP", "0"),
            shape_buckets: !is("MASKAUDIT_SHAPE_BUCKETS", "0"),
            fused_ce: !is("MASKAUDIT_FUSED_CE", "0"),
            kernel_cache: maskaudit_torch::loss::cuda_ce::cache_folder(
                var("MASKAUDIT_CACHE").as_deref(),
                var("XDG_CACHE_HOME").as_deref(),
                var("HOME").as_deref(),
            ),
            decode_stall: Duration::from_secs_f64(stall),
            thp_unset: std::env::var_os(THP).is_none(),
        }
    }

    /// The process-wide switches, handed to the libraries that act on them; for `check`, the
    /// environment libtorch reads at its first allocation. Before any thread of ours exists.
    pub fn apply(&self, command: &Command) {
        maskaudit_core::data::guard::set_stall_limit(self.decode_stall);
        maskaudit_torch::loss::cuda_ce::configure(self.fused_ce, self.kernel_cache.clone());
        if matches!(command, Command::Check(_)) && self.thp_unset {
            std::env::set_var(THP, "1");
        }
    }
}

/// libtorch's switch for transparent huge pages under its large CPU allocations.
const THP: &str = "THP_MEM_ALLOC_ENABLE";

/// A command line resolved: what to run, with everything it needs.
pub enum Settings {
    Check(Box<CheckSettings>),
    Lint(Box<LintSettings>),
    Explain(String),
}

/// What every report-writing command shares: its staged outputs, the baseline, the token text,
/// the format.
pub struct ReportSettings {
    pub outputs: Outputs,
    pub baseline: Option<Baseline>,
    pub text: Box<dyn TokenText>,
    pub format: Format,
    pub quiet: bool,
    /// Rows of the HTML token view; 0 without `--html`.
    pub html_rows: usize,
    pub github_actions: bool,
}

pub struct CheckSettings {
    pub opts: CheckOptions,
    pub reports: ReportSettings,
    /// `--captured-losses`: the run's recorded losses are the data; `opts.model` is optional.
    pub captured_losses: bool,
    pub has_model: bool,
}

pub struct LintSettings {
    pub opts: LintCommandOptions,
    pub reports: ReportSettings,
    /// `--show`: rows printed before the table.
    pub show: usize,
    pub color: ColorWhen,
    pub shifted: bool,
}

impl Settings {
    /// Resolves the command line against the environment, in the order the errors are
    /// reported: the options, the outputs, the baseline, the tokenizer (before the model or the
    /// data: a bad path fails fast), the field names.
    pub fn resolve(cli: Cli, env: &Env) -> Result<Self> {
        Ok(match cli.command {
            Command::Check(args) => Settings::Check(Box::new(check(*args, env)?)),
            Command::Lint(args) => Settings::Lint(Box::new(lint(*args, env)?)),
            Command::Explain { code } => Settings::Explain(code),
        })
    }
}

fn check(args: CheckArgs, env: &Env) -> Result<CheckSettings> {
    args.micro_batches_per_step().map_err(|e| anyhow!(e))?;
    let captured = args
        .captured_losses
        .as_deref()
        .map(captured_files)
        .unwrap_or_default();
    let mut inputs = vec![
        ("MODEL", args.model.as_deref()),
        ("--loss file", args.user_loss.loss.as_deref()),
        ("--tokenizer file", args.tokenizer.as_deref()),
    ];
    inputs.extend(
        captured
            .iter()
            .map(|f| ("--captured-losses file", Some(f.as_path()))),
    );
    let weights = args.user_loss.weights_out.as_deref();
    // clap requires DATA unless --captured-losses names the data.
    let data = args
        .captured_losses
        .clone()
        .or(args.data.clone())
        .unwrap_or_default();
    let outputs = stage_outputs(&data, &inputs, &args.reports, weights, env)?;
    let weights_out = weights_file(weights, &outputs)?;
    let reports = report_settings(
        outputs,
        &args.reports,
        args.tokenizer.as_deref(),
        &args.output,
        env,
    )?;
    let fields = args.data_opts.fields().map_err(|e| anyhow!(e))?;
    let captured_losses = args.captured_losses.is_some();
    let has_model = args.model.is_some();
    let opts = CheckOptions {
        model: args.model.unwrap_or_default(),
        data,
        device: args.device,
        batch_size: args.data_opts.batch_size as usize,
        pad_id: args.data_opts.pad_id,
        max_contamination: args.max_contamination,
        eos_id: args.eos_id,
        fields,
        max_line_bytes: args.data_opts.limits.max_line_bytes,
        overrides: severity(&args.severity),
        loss: args.user_loss.options(weights_out),
        forward_args: (!args.forward_args.is_empty()).then(|| args.forward_args.clone()),
        model_probe: !args.no_model_probe,
        token_rows: reports.html_rows,
        dtype: args.dtype,
        tf32: args.tf32,
        steps: (args.accum.is_some() || args.world_size.is_some()).then(|| StepConfig {
            accum: args.accum.unwrap_or(1) as usize,
            world_size: args.world_size.unwrap_or(1) as usize,
            drop_last: args.drop_last,
        }),
        timing: env.timing,
        overlap: env.overlap,
        shape_buckets: env.shape_buckets,
    };
    Ok(CheckSettings {
        opts,
        reports,
        captured_losses,
        has_model,
    })
}

fn lint(args: LintArgs, env: &Env) -> Result<LintSettings> {
    let show = args.show.unwrap_or(0);
    if show > 0 && args.output.format != Format::Table {
        anyhow::bail!("--show prints rows for people: use it with --format table");
    }
    let inputs = [("--tokenizer file", args.tokenizer.as_deref())];
    let outputs = stage_outputs(&args.data, &inputs, &args.reports, None, env)?;
    let reports = report_settings(
        outputs,
        &args.reports,
        args.tokenizer.as_deref(),
        &args.output,
        env,
    )?;
    let opts = LintCommandOptions {
        data: args.data.clone(),
        fields: args.fields.names().map_err(|e| anyhow!(e))?,
        max_line_bytes: args.limits.max_line_bytes,
        lint: LintOptions {
            pad_id: args.pad_id,
            eos_id: args.eos_id,
            shifted: args.shifted,
            batch_size: args.batch_size.map(|b| b as usize),
            unit: Default::default(),
        },
        show: show.max(reports.html_rows),
        overrides: severity(&args.severity),
    };
    Ok(LintSettings {
        opts,
        reports,
        show,
        color: args.color,
        shifted: args.shifted,
    })
}

fn severity(args: &SeverityArgs) -> SeverityOverrides {
    SeverityOverrides::new(&args.deny, &args.warn, &args.allow)
}

/// The baseline and the tokenizer loaded, after the outputs were staged.
fn report_settings(
    outputs: Outputs,
    reports: &ReportArgs,
    tokenizer: Option<&Path>,
    output: &OutputArgs,
    env: &Env,
) -> Result<ReportSettings> {
    let baseline = reports
        .baseline
        .as_deref()
        .map(Baseline::load)
        .transpose()?;
    let text: Box<dyn TokenText> = match tokenizer {
        Some(path) => Box::new(HfTokenizer::load(path)?),
        None => Box::new(Ids),
    };
    Ok(ReportSettings {
        outputs,
        baseline,
        text,
        format: output.format,
        quiet: output.quiet,
        html_rows: if reports.html.is_some() {
            reports.html_rows
        } else {
            0
        },
        github_actions: env.github_actions,
    })
}

/// `--weights-out`'s staged file, for the loss audit to stream into.
fn weights_file(path: Option<&Path>, outputs: &Outputs) -> Result<Option<WeightsFile>> {
    Ok(match (path, outputs.handle(Output::WeightsOut)?) {
        (Some(path), Some(file)) => Some(WeightsFile {
            shown: path.display().to_string(),
            file: Arc::new(file),
        }),
        _ => None,
    })
}

/// maskaudit never writes to its inputs: every output is checked against them (and against
/// the other outputs) and staged before the run; see [`outputs`].
/// The files `--captured-losses PATH` may read: every Parquet file of the directory PATH names
/// or holds (a rank's file brings its siblings), so that no output lands on any of them.
fn captured_files(path: &Path) -> Vec<PathBuf> {
    let dir = if path.is_dir() {
        path
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    files
}

fn stage_outputs(
    data: &Path,
    inputs: &[(&'static str, Option<&Path>)],
    reports: &ReportArgs,
    weights_out: Option<&Path>,
    env: &Env,
) -> Result<Outputs> {
    let data = if data.as_os_str() == "-" {
        Input::stdin("DATA")
    } else {
        Input::file("DATA", data)
    };
    let baseline = [(outputs::BASELINE, reports.baseline.as_deref())];
    let inputs: Vec<Input> = data
        .into_iter()
        .chain(
            inputs
                .iter()
                .chain(&baseline)
                .filter_map(|&(what, path)| Input::file(what, path?)),
        )
        .collect();
    let asked: Vec<(Output, &Path)> = [
        (Output::WeightsOut, weights_out),
        (Output::Junit, reports.junit.as_deref()),
        (Output::Html, reports.html.as_deref()),
        (Output::WriteBaseline, reports.write_baseline.as_deref()),
        (Output::StepSummary, env.step_summary.as_deref()),
    ]
    .into_iter()
    .filter_map(|(output, path)| Some((output, path?)))
    .collect();
    Outputs::stage(&asked, &inputs)
}
