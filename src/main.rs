use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use clap::error::ErrorKind;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use maskaudit::check::{self, CheckOptions};
use maskaudit::cli::{CheckArgs, Cli, ColorWhen, Command, Format, LintArgs};
use maskaudit::data::echo;
use maskaudit::data::Pos;
use maskaudit::findings::SeverityOverrides;
use maskaudit::lint::LintOptions;
use maskaudit::lint_command::{self, LintCommandOptions};
use maskaudit::output;
use maskaudit::report::Verdict;
use maskaudit::tokenizer::HfTokenizer;
use maskaudit::view::{self, Ids, TokenText, ViewOptions};

/// Characters of an error line, past which its middle is cut: the values from the data in it
/// are cut to [`echo::ECHO_CHARS`] where they are quoted; this catches anything else.
const ERROR_LINE_CHARS: usize = 1000;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => error(&maskaudit::one_line(&e)),
    }
}

/// The one line every error is reported on, escaped and cut: it may quote the data.
fn error(message: &str) -> ExitCode {
    eprintln!(
        "maskaudit: error: {}",
        echo::clip(message, ERROR_LINE_CHARS)
    );
    ExitCode::from(2)
}

/// clap's usage errors on one line, like every other error; help and version as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let rendered = e.render().to_string();
    let mut line = String::new();
    for part in rendered.lines().map(str::trim) {
        if part.is_empty() || part.starts_with("For more information") {
            continue;
        }
        let part = part.trim_start_matches("error: ");
        let part = part.replacen("Usage: ", "usage: ", 1);
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(&part);
    }
    error(&line)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check(args) => check(*args),
        Command::Lint(args) => lint(*args),
        Command::Explain { code } => {
            let text = maskaudit::explain::explain(&code)?;
            io::stdout().write_all(text.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(args: CheckArgs) -> Result<ExitCode> {
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
    };
    let progress = progress_bar(args.output.quiet);
    let report = check::run(&opts, &progress)?;
    progress.finish_and_clear();

    let mut stdout = io::stdout().lock();
    let written = match args.output.format {
        Format::Table => output::table::write(&mut stdout, &report),
        Format::Json => output::json::write(&mut stdout, &report),
    };
    let written = written.and_then(|()| stdout.flush());
    finish_output(written.map_err(Into::into), report.verdict)
}

fn lint(args: LintArgs) -> Result<ExitCode> {
    let show = args.show.unwrap_or(0);
    if show > 0 && args.output.format == Format::Json {
        anyhow::bail!("--show prints rows for people: use it with --format table");
    }
    // Load the tokenizer before reading the data: a bad path fails fast.
    let text: Box<dyn TokenText> = match &args.tokenizer {
        Some(path) => Box::new(HfTokenizer::load(path)?),
        None => Box::new(Ids),
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
        show,
        overrides: SeverityOverrides::new(
            &args.severity.deny,
            &args.severity.warn,
            &args.severity.allow,
        ),
    };
    let progress = progress_bar(args.output.quiet);
    let run = lint_command::run(&opts, &progress)?;
    progress.finish_and_clear();

    let mut stdout = io::stdout().lock();
    let written = write_lint(&mut stdout, &args, &run, text.as_ref());
    finish_output(
        written.and_then(|()| Ok(stdout.flush()?)),
        run.report.verdict,
    )
}

fn write_lint(
    stdout: &mut impl Write,
    args: &LintArgs,
    run: &lint_command::LintRun,
    text: &dyn TokenText,
) -> Result<()> {
    match args.output.format {
        Format::Table => {
            let view_opts = ViewOptions {
                pad_id: args.pad_id,
                eos_id: args.eos_id,
                shifted: args.shifted,
                color: use_color(args.color),
            };
            let unit = run.report.data.records;
            for row in &run.shown {
                let at = Pos { unit, n: row.line };
                stdout.write_all(view::render_row(row, at, text, &view_opts).as_bytes())?;
                writeln!(stdout)?;
            }
            output::lint_table::write(stdout, &run.report)?
        }
        Format::Json => output::json::write(stdout, &run.report)?,
    }
    Ok(())
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

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
