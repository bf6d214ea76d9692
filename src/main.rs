use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use maskaudit::check::{self, CheckOptions};
use maskaudit::cli::{CheckArgs, Cli, ColorWhen, Command, Format, LintArgs};
use maskaudit::data::Pos;
use maskaudit::findings::SeverityOverrides;
use maskaudit::lint::LintOptions;
use maskaudit::lint_command::{self, LintCommandOptions};
use maskaudit::output;
use maskaudit::report::Verdict;
use maskaudit::steps::StepConfig;
use maskaudit::tokenizer::HfTokenizer;
use maskaudit::view::{self, Ids, TokenText, ViewOptions};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("maskaudit: error: {}", maskaudit::one_line(&e));
            ExitCode::from(2)
        }
    }
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
    let opts = CheckOptions {
        model: args.model,
        data: args.data,
        device: args.device,
        batch_size: args.data_opts.batch_size as usize,
        pad_id: args.data_opts.pad_id,
        max_contamination: args.max_contamination,
        eos_id: args.eos_id,
        fields: args.data_opts.fields(),
        overrides: SeverityOverrides::new(
            &args.severity.deny,
            &args.severity.warn,
            &args.severity.allow,
        ),
        loss: args.user_loss.options(),
        forward_args: (!args.forward_args.is_empty()).then(|| args.forward_args.clone()),
        model_probe: !args.no_model_probe,
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
    let redirect = maskaudit::sys::StdoutToStderr::new()?;
    let report = check::run(&opts, &progress);
    drop(redirect);
    let report = report?;
    progress.finish_and_clear();

    let mut stdout = io::stdout().lock();
    match args.output.format {
        Format::Table => output::table::write(&mut stdout, &report)?,
        Format::Json => output::json::write(&mut stdout, &report)?,
    }
    stdout.flush()?;
    Ok(exit_code(report.verdict))
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
        data: args.data,
        fields: args.fields.names(),
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
                stdout
                    .write_all(view::render_row(row, at, text.as_ref(), &view_opts).as_bytes())?;
                writeln!(stdout)?;
            }
            output::lint_table::write(&mut stdout, &run.report)?
        }
        Format::Json => output::json::write(&mut stdout, &run.report)?,
    }
    stdout.flush()?;
    Ok(exit_code(run.report.verdict))
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
