//! From parsed arguments to an exit status: each command's options built from its
//! arguments, the command run, its report written in the asked format and to the asked
//! files. What `main` calls; the only place that knows both the arguments and the commands.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{CheckArgs, Cli, ColorWhen, Command, Format, LintArgs, ReportArgs};
use crate::commands::check::{self, CheckOptions};
use crate::commands::{self, lint::LintCommandOptions};
use crate::data::Pos;
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

fn check(args: CheckArgs) -> Result<ExitCode> {
    let mut inputs = vec![args.model.clone(), args.data.clone()];
    inputs.extend(args.user_loss.loss.clone());
    inputs.extend(args.tokenizer.clone());
    refuse_to_overwrite(&args.reports, &inputs)?;
    let baseline = load_baseline(&args.reports)?;
    // Load the tokenizer before the model: a bad path fails fast.
    let text = token_text(args.tokenizer.as_deref())?;
    let fields = args.data_opts.fields().map_err(|e| anyhow!(e))?;
    let opts = CheckOptions {
        model: args.model,
        data: args.data,
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
        loss: args.user_loss.options(),
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
    let report = check::run(&opts, &progress);
    drop(redirect);
    let mut report = report?;
    progress.finish_and_clear();
    if let Some(path) = &args.reports.write_baseline {
        write_baseline(path, &report.findings, &report.data.path)?;
    }
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
    if let Some(path) = &args.reports.html {
        write_file(path, "HTML report", |w| {
            w.write_all(report::html::check(&report, text.as_ref()).as_bytes())
        })?;
    }
    side_reports(&args.reports, &outcome, || markdown::check(&report))?;
    finish_output(written.map_err(Into::into), report.verdict)
}

fn lint(args: LintArgs) -> Result<ExitCode> {
    let show = args.show.unwrap_or(0);
    if show > 0 && args.output.format != Format::Table {
        anyhow::bail!("--show prints rows for people: use it with --format table");
    }
    let mut inputs = vec![args.data.clone()];
    inputs.extend(args.tokenizer.clone());
    refuse_to_overwrite(&args.reports, &inputs)?;
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
    let mut run = commands::lint::run(&opts, &progress)?;
    progress.finish_and_clear();
    let report = &mut run.report;
    if let Some(path) = &args.reports.write_baseline {
        write_baseline(path, &report.findings, &report.data.path)?;
    }
    if let Some(baseline) = &baseline {
        baseline.apply(&mut report.findings, &report.data.path);
        report.verdict = Verdict::of(&report.findings);
    }

    let written = write_lint(&args, &run, text.as_ref(), show);
    let report = &run.report;
    if let Some(path) = &args.reports.html {
        let unit = report.data.records;
        let rows: Vec<_> = run
            .shown
            .iter()
            .take(html_rows)
            .map(|row| token_rows::from_row(row, unit, args.pad_id, args.eos_id, args.shifted))
            .collect();
        write_file(path, "HTML report", |w| {
            w.write_all(report::html::lint(report, &rows, text.as_ref()).as_bytes())
        })?;
    }
    side_reports(&args.reports, &report.outcome(), || markdown::lint(report))?;
    finish_output(written, report.verdict)
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

/// maskaudit never writes to its inputs: an output path naming one is refused before the run.
/// `--baseline` is an input too, except to `--write-baseline`, which may update it.
fn refuse_to_overwrite(reports: &ReportArgs, inputs: &[PathBuf]) -> Result<()> {
    let same = |a: &Path, b: &Path| {
        std::fs::canonicalize(a)
            .ok()
            .zip(std::fs::canonicalize(b).ok())
            .is_some_and(|(a, b)| a == b)
    };
    let outputs = [
        (&reports.junit, true),
        (&reports.html, true),
        (&reports.write_baseline, false),
    ];
    for (output, baseline_is_input) in outputs {
        let Some(output) = output else { continue };
        let baseline = reports.baseline.iter().filter(|_| baseline_is_input);
        if inputs
            .iter()
            .chain(baseline)
            .any(|input| same(output, input))
        {
            anyhow::bail!(
                "{}: is an input of this run (refusing to overwrite it); choose another output file",
                output.display()
            );
        }
    }
    Ok(())
}

fn load_baseline(reports: &ReportArgs) -> Result<Option<Baseline>> {
    reports.baseline.as_deref().map(Baseline::load).transpose()
}

fn write_baseline(path: &Path, findings: &[crate::findings::Finding], data: &str) -> Result<()> {
    write_file(path, "baseline", |w| Baseline::of(findings, data).write(w))
}

/// Creates (or replaces) `path` and writes it through `write`.
fn write_file(
    path: &Path,
    what: &str,
    write: impl FnOnce(&mut io::BufWriter<std::fs::File>) -> io::Result<()>,
) -> Result<()> {
    let context = || format!("{}: cannot write the {what}", path.display());
    let file = std::fs::File::create(path).with_context(context)?;
    let mut out = io::BufWriter::new(file);
    write(&mut out)
        .and_then(|()| out.flush())
        .with_context(context)
}

/// The JUnit file, and in GitHub Actions the annotations (on stderr) and the job summary
/// (appended to the file `GITHUB_STEP_SUMMARY` names).
fn side_reports(
    reports: &ReportArgs,
    outcome: &Outcome<'_>,
    summary: impl FnOnce() -> String,
) -> Result<()> {
    if let Some(path) = &reports.junit {
        write_file(path, "JUnit report", |w| report::junit::write(w, outcome))?;
    }
    if std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true") {
        let mut stderr = io::stderr().lock();
        report::github::write(&mut stderr, outcome)?;
    }
    if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        let text = markdown::capped(summary(), markdown::SUMMARY_LIMIT);
        let context = || {
            format!(
                "{}: cannot append the job summary (GITHUB_STEP_SUMMARY)",
                path.display()
            )
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(context)?;
        file.write_all(text.as_bytes()).with_context(context)?;
    }
    Ok(())
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
