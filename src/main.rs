use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use maskaudit::check::{self, CheckOptions};
use maskaudit::cli::{CheckArgs, Cli, Command, Format};
use maskaudit::findings::SeverityOverrides;
use maskaudit::output;
use maskaudit::report::Verdict;

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
        fields: args.data_opts.fields(),
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
    match args.output.format {
        Format::Table => output::table::write(&mut stdout, &report)?,
        Format::Json => output::json::write(&mut stdout, &report)?,
    }
    stdout.flush()?;
    Ok(exit_code(report.verdict))
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
