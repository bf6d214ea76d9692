//! From parsed arguments to an exit status: each command's options built from its
//! arguments, the command run, its report written in the asked format and to the asked
//! files. What `main` calls; the only place that knows both the arguments and the commands.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::outputs::{self, Input, Output, Outputs};
use crate::cli::{CheckArgs, Cli, ColorWhen, Command, Format, LintArgs, ReportArgs};
use crate::commands::check::{self, CheckOptions, WeightsFile};
use crate::commands::{self, lint::LintCommandOptions};
use crate::data::{guard, Pos};
use crate::findings::SeverityOverrides;
use crate::lint::tokenizer::HfTokenizer;
use crate::lint::view::{self, Ids, TokenText, ViewOptions};
use crate::lint::LintOptions;
use crate::loss::steps::StepConfig;
use crate::report::baseline::Baseline;
use crate::report::token_rows;
use crate::report::{self, markdown};
use crate::report::{Outcome, Verdict};

/// Runs the parsed command line: the command, its report on stdout in the asked format, the
/// side reports, and the exit status of its verdict.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check(args) => check(*args),
        Command::Lint(args) => lint(*args),
        Command::Explain { code } => {
            let text = crate::commands::explain::explain(&code)?;
            io::stdout().write_all(text.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `maskaudit check`, a model on a dataset or a run's recorded losses (`--captured-losses`).
/// Long because it is the command's outline: inputs and outputs staged, options, the run,
/// the report written, each a step.
fn check(args: CheckArgs) -> Result<ExitCode> {
    args.micro_batches_per_step().map_err(|e| anyhow!(e))?;
    let inputs = [
        ("MODEL", args.model.as_deref()),
        ("--loss file", args.user_loss.loss.as_deref()),
        ("--tokenizer file", args.tokenizer.as_deref()),
    ];
    let weights = args.user_loss.weights_out.as_deref();
    // clap requires DATA unless --captured-losses names the data.
    let data = args
        .captured_losses
        .clone()
        .or(args.data.clone())
        .unwrap_or_default();
    let mut outputs = stage_outputs(&data, &inputs, &args.reports, weights)?;
    let weights_out = weights_file(&args, &outputs)?;
    let baseline = load_baseline(&args.reports)?;
    // Load the tokenizer before the model: a bad path fails fast.
    let text = token_text(args.tokenizer.as_deref())?;
    let fields = args.data_opts.fields().map_err(|e| anyhow!(e))?;
    let opts = CheckOptions {
        model: args.model.clone().unwrap_or_default(),
        data,
        device: args.device,
        batch_size: args.data_opts.batch_size as usize,
        pad_id: args.data_opts.pad_id,
        max_contamination: args.max_contamination,
        eos_id: args.eos_id,
        fields,
        max_line_bytes: args.data_opts.limits.max_line_bytes,
        overrides: SeverityOverrides::new(
            &args.severity.deny,
            &args.severity.warn,
            &args.severity.allow,
        ),
        loss: args.user_loss.options(weights_out),
        forward_args: (!args.forward_args.is_empty()).then(|| args.forward_args.clone()),
        model_probe: !args.no_model_probe,
        token_rows: if args.reports.html.is_some() {
            args.reports.html_rows
        } else {
            0
        },
        dtype: args.dtype,
        tf32: args.tf32,
        steps: (args.accum.is_some() || args.world_size.is_some()).then(|| StepConfig {
            accum: args.accum.unwrap_or(1) as usize,
            world_size: args.world_size.unwrap_or(1) as usize,
            drop_last: args.drop_last,
        }),
    };
    let progress = progress_bar(args.output.quiet);
    // The model's and the loss's own prints go to stderr, not into the report.
    let redirect = crate::sys::StdoutToStderr::new()?;
    let report = match &args.captured_losses {
        Some(_) => check::ranks::run(&opts, args.model.is_some(), &progress),
        None => check::run(&opts, &progress),
    };
    drop(redirect);
    let mut report = report?;
    progress.finish_and_clear();
    outputs.write(Output::WriteBaseline, |w| {
        Baseline::of(&report.findings, &report.data.path).write(w)
    })?;
    if let Some(baseline) = &baseline {
        baseline.apply(&mut report.findings, &report.data.path);
        report.verdict = Verdict::of(&report.findings);
    }

    let mut stdout = io::stdout().lock();
    let written = match args.output.format {
        Format::Table => report::table::write(&mut stdout, &report),
        Format::Json => report::json::write(&mut stdout, &report),
        Format::Markdown => markdown::write(&mut stdout, &markdown::check(&report)),
    }
    .and_then(|()| stdout.flush());
    drop(stdout);
    let outcome = report.outcome();
    let verdict = finish_output(written.map_err(Into::into), report.verdict)?;
    outputs.write(Output::Html, |w| {
        w.write_all(report::html::check(&report, text.as_ref()).as_bytes())
    })?;
    side_reports(&mut outputs, &outcome, || markdown::check(&report))?;
    outputs.commit()?;
    Ok(verdict)
}

/// `--weights-out`'s staged file, for the loss audit to stream into.
fn weights_file(args: &CheckArgs, outputs: &Outputs) -> Result<Option<WeightsFile>> {
    let path = args.user_loss.weights_out.as_deref();
    Ok(match (path, outputs.handle(Output::WeightsOut)?) {
        (Some(path), Some(file)) => Some(WeightsFile {
            shown: path.display().to_string(),
            file: Arc::new(file),
        }),
        _ => None,
    })
}

fn lint(args: LintArgs) -> Result<ExitCode> {
    let show = args.show.unwrap_or(0);
    if show > 0 && args.output.format != Format::Table {
        anyhow::bail!("--show prints rows for people: use it with --format table");
    }
    let inputs = [("--tokenizer file", args.tokenizer.as_deref())];
    let mut outputs = stage_outputs(&args.data, &inputs, &args.reports, None)?;
    let baseline = load_baseline(&args.reports)?;
    // Load the tokenizer before reading the data: a bad path fails fast.
    let text = token_text(args.tokenizer.as_deref())?;
    let html_rows = if args.reports.html.is_some() {
        args.reports.html_rows
    } else {
        0
    };
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
        show: show.max(html_rows),
        overrides: SeverityOverrides::new(
            &args.severity.deny,
            &args.severity.warn,
            &args.severity.allow,
        ),
    };
    let progress = progress_bar(args.output.quiet);
    // Off the main thread: a decoder that stalls is then an error (`data::guard`).
    let mut run = {
        let progress = progress.clone();
        guard::off_thread(move || commands::lint::run(&opts, &progress))
            .map_err(|l| anyhow!(l))??
    };
    progress.finish_and_clear();
    let report = &mut run.report;
    outputs.write(Output::WriteBaseline, |w| {
        Baseline::of(&report.findings, &report.data.path).write(w)
    })?;
    if let Some(baseline) = &baseline {
        baseline.apply(&mut report.findings, &report.data.path);
        report.verdict = Verdict::of(&report.findings);
    }

    let written = write_lint(&args, &run, text.as_ref(), show);
    let report = &run.report;
    let verdict = finish_output(written, report.verdict)?;
    if args.reports.html.is_some() {
        let unit = report.data.records;
        let rows: Vec<_> = run
            .shown
            .iter()
            .take(html_rows)
            .map(|row| token_rows::from_row(row, unit, args.pad_id, args.eos_id, args.shifted))
            .collect();
        outputs.write(Output::Html, |w| {
            w.write_all(report::html::lint(report, &rows, text.as_ref()).as_bytes())
        })?;
    }
    side_reports(&mut outputs, &report.outcome(), || markdown::lint(report))?;
    outputs.commit()?;
    Ok(verdict)
}

/// The lint report on stdout in the asked format; for a table, the rows of `--show` first.
fn write_lint(
    args: &LintArgs,
    run: &commands::lint::LintRun,
    text: &dyn TokenText,
    show: usize,
) -> Result<()> {
    let mut stdout = io::stdout().lock();
    match args.output.format {
        Format::Table => {
            let view_opts = ViewOptions {
                pad_id: args.pad_id,
                eos_id: args.eos_id,
                shifted: args.shifted,
                color: use_color(args.color),
            };
            let unit = run.report.data.records;
            for row in run.shown.iter().take(show) {
                let at = Pos { unit, n: row.line };
                stdout.write_all(view::render_row(row, at, text, &view_opts).as_bytes())?;
                writeln!(stdout)?;
            }
            report::lint_table::write(&mut stdout, &run.report)?
        }
        Format::Json => report::json::write(&mut stdout, &run.report)?,
        Format::Markdown => markdown::write(&mut stdout, &markdown::lint(&run.report))?,
    }
    Ok(stdout.flush()?)
}

/// The verdict's exit status once the report is written. A reader that stopped early
/// (`maskaudit lint d.jsonl | head`) closes the pipe: no error line, but a failed check
/// still exits 1.
fn finish_output(written: Result<()>, verdict: Verdict) -> Result<ExitCode> {
    match written {
        Ok(()) => Ok(exit_code(verdict)),
        Err(e) if is_broken_pipe(&e) => Ok(exit_code(verdict)),
        Err(e) => Err(e),
    }
}

/// Ids, or the pieces of a tokenizer.json.
fn token_text(tokenizer: Option<&Path>) -> Result<Box<dyn TokenText>> {
    Ok(match tokenizer {
        Some(path) => Box::new(HfTokenizer::load(path)?),
        None => Box::new(Ids),
    })
}

/// maskaudit never writes to its inputs: every output is checked against them (and against
/// the other outputs) and staged before the run; see [`outputs`].
fn stage_outputs(
    data: &Path,
    inputs: &[(&'static str, Option<&Path>)],
    reports: &ReportArgs,
    weights_out: Option<&Path>,
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
    let summary = step_summary();
    let asked: Vec<(Output, &Path)> = [
        (Output::WeightsOut, weights_out),
        (Output::Junit, reports.junit.as_deref()),
        (Output::Html, reports.html.as_deref()),
        (Output::WriteBaseline, reports.write_baseline.as_deref()),
        (Output::StepSummary, summary.as_deref()),
    ]
    .into_iter()
    .filter_map(|(output, path)| Some((output, path?)))
    .collect();
    Outputs::stage(&asked, &inputs)
}

/// The file GitHub Actions collects the job summary from, when set.
fn step_summary() -> Option<PathBuf> {
    std::env::var_os("GITHUB_STEP_SUMMARY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

fn load_baseline(reports: &ReportArgs) -> Result<Option<Baseline>> {
    reports.baseline.as_deref().map(Baseline::load).transpose()
}

/// The JUnit file, and in GitHub Actions the annotations (on stderr) and the job summary
/// (appended to the file `GITHUB_STEP_SUMMARY` names).
fn side_reports(
    outputs: &mut Outputs,
    outcome: &Outcome<'_>,
    summary: impl FnOnce() -> String,
) -> Result<()> {
    outputs.write(Output::Junit, |w| report::junit::write(w, outcome))?;
    if std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true") {
        let mut stderr = io::stderr().lock();
        report::github::write(&mut stderr, outcome)?;
    }
    outputs.write(Output::StepSummary, |w| {
        w.write_all(markdown::capped(summary(), markdown::SUMMARY_LIMIT).as_bytes())
    })
}

/// `--color auto` colours when standard output is a terminal and NO_COLOR is unset
/// (CLICOLOR_FORCE forces it), as anstream decides for every stream.
fn use_color(when: ColorWhen) -> bool {
    match when {
        ColorWhen::Always => true,
        ColorWhen::Never => false,
        ColorWhen::Auto => {
            anstream::AutoStream::choice(&io::stdout()) != anstream::ColorChoice::Never
        }
    }
}

fn exit_code(verdict: Verdict) -> ExitCode {
    match verdict {
        Verdict::Pass => ExitCode::SUCCESS,
        Verdict::Fail => ExitCode::from(1),
    }
}

fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {bytes}/{total_bytes} {elapsed}")
            .expect("static template"),
    );
    bar
}

/// A closed pipe on stdout (`maskaudit … | head`) is not an error.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
