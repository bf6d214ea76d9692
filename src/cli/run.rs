//! From resolved settings to an exit status: the command run, its report written in the asked
//! format and to the asked files. What `main` calls with the [`Settings`]; the only place
//! that knows both the settings and the commands.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::outputs::Output;
use crate::cli::settings::{CheckSettings, LintSettings, ReportSettings, Settings};
use crate::cli::{ColorWhen, Format};
use crate::commands::{self, check};
use crate::data::{guard, Pos};
use crate::findings::Finding;
use crate::lint::view::{self, TokenText, ViewOptions};
use crate::report::baseline::Baseline;
use crate::report::token_rows;
use crate::report::{self, markdown};
use crate::report::{Outcome, Verdict};

/// Runs the resolved command line: the command, its report on stdout in the asked format, the
/// side reports, and the exit status of its verdict.
pub fn run(settings: Settings) -> Result<ExitCode> {
    match settings {
        Settings::Check(s) => run_check(*s),
        Settings::Lint(s) => run_lint(*s),
        Settings::Explain(code) => {
            let text = crate::commands::explain::explain(&code)?;
            io::stdout().write_all(text.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_check(settings: CheckSettings) -> Result<ExitCode> {
    let CheckSettings {
        opts,
        mut reports,
        captured_losses,
        has_model,
    } = settings;
    let progress = progress_bar(reports.quiet);
    // The model's and the loss's own prints go to stderr, not into the report.
    let redirect = crate::sys::StdoutToStderr::new()?;
    let report = if captured_losses {
        check::ranks::run(&opts, has_model, &progress)
    } else {
        check::run(&opts, &progress)
    };
    drop(redirect);
    let mut report = report?;
    progress.finish_and_clear();
    let path = report.data.path.clone();
    report.verdict = baseline(&mut reports, &mut report.findings, &path)?.unwrap_or(report.verdict);

    let mut stdout = io::stdout().lock();
    let written = match reports.format {
        Format::Table => report::table::write(&mut stdout, &report),
        Format::Json => report::json::write(&mut stdout, &report),
        Format::Markdown => markdown::write(&mut stdout, &markdown::check(&report)),
    }
    .and_then(|()| stdout.flush());
    drop(stdout);
    finish(
        reports,
        written.map_err(Into::into),
        report.verdict,
        &report.outcome(),
        |text| report::html::check(&report, text),
        || markdown::check(&report),
    )
}

fn run_lint(settings: LintSettings) -> Result<ExitCode> {
    let LintSettings {
        opts,
        mut reports,
        show,
        color,
        shifted,
    } = settings;
    let progress = progress_bar(reports.quiet);
    // Off the main thread: a decoder that stalls is then an error (`data::guard`).
    let mut run = {
        let progress = progress.clone();
        let opts = opts.clone();
        guard::off_thread(move || commands::lint::run(&opts, &progress))
            .map_err(|l| anyhow!(l))??
    };
    progress.finish_and_clear();
    let path = run.report.data.path.clone();
    if let Some(verdict) = baseline(&mut reports, &mut run.report.findings, &path)? {
        run.report.verdict = verdict;
    }

    let view_opts = ViewOptions {
        pad_id: opts.lint.pad_id,
        eos_id: opts.lint.eos_id,
        shifted,
        color: use_color(color),
    };
    let written = write_lint(
        reports.format,
        &run,
        reports.text.as_ref(),
        show,
        &view_opts,
    );
    let report = &run.report;
    let unit = report.data.records;
    let html_rows = reports.html_rows;
    finish(
        reports,
        written,
        report.verdict,
        &report.outcome(),
        |text| {
            let rows: Vec<_> = run
                .shown
                .iter()
                .take(html_rows)
                .map(|row| {
                    token_rows::from_row(row, unit, opts.lint.pad_id, opts.lint.eos_id, shifted)
                })
                .collect();
            report::html::lint(report, &rows, text)
        },
        || markdown::lint(report),
    )
}

/// `--write-baseline` (the findings as they came), then `--baseline` applied: the verdict of
/// what is left, when a baseline was given.
fn baseline(
    reports: &mut ReportSettings,
    findings: &mut [Finding],
    path: &str,
) -> Result<Option<Verdict>> {
    reports.outputs.write(Output::WriteBaseline, |w| {
        Baseline::of(findings, path).write(w)
    })?;
    Ok(reports.baseline.as_ref().map(|baseline| {
        baseline.apply(findings, path);
        Verdict::of(findings)
    }))
}

/// After the report on stdout: the exit status, the HTML, the JUnit file, in GitHub Actions
/// the annotations (on stderr) and the job summary (appended to the file
/// `GITHUB_STEP_SUMMARY` names), and the outputs renamed into place.
fn finish(
    mut reports: ReportSettings,
    written: Result<()>,
    verdict: Verdict,
    outcome: &Outcome<'_>,
    html: impl FnOnce(&dyn TokenText) -> String,
    summary: impl FnOnce() -> String,
) -> Result<ExitCode> {
    let code = finish_output(written, verdict)?;
    let text = reports.text;
    reports.outputs.write(Output::Html, |w| {
        w.write_all(html(text.as_ref()).as_bytes())
    })?;
    reports
        .outputs
        .write(Output::Junit, |w| report::junit::write(w, outcome))?;
    if reports.github_actions {
        let mut stderr = io::stderr().lock();
        report::github::write(&mut stderr, outcome)?;
    }
    reports.outputs.write(Output::StepSummary, |w| {
        w.write_all(markdown::capped(summary(), markdown::SUMMARY_LIMIT).as_bytes())
    })?;
    reports.outputs.commit()?;
    Ok(code)
}

/// The lint report on stdout in the asked format; for a table, the rows of `--show` first.
fn write_lint(
    format: Format,
    run: &commands::lint::LintRun,
    text: &dyn TokenText,
    show: usize,
    view_opts: &ViewOptions,
) -> Result<()> {
    let mut stdout = io::stdout().lock();
    match format {
        Format::Table => {
            let unit = run.report.data.records;
            for row in run.shown.iter().take(show) {
                let at = Pos { unit, n: row.line };
                stdout.write_all(view::render_row(row, at, text, view_opts).as_bytes())?;
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
