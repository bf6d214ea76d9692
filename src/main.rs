//! `maskaudit`: parse the command line, resolve it with the environment (`cli::settings`), run it
//! (`cli::run`), report any error on one line.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

mod cli;

use cli::run::{is_broken_pipe, run};
use cli::Cli;
use maskaudit_core::data::echo;

// The paths the command line names the rest by.
use maskaudit::commands;
use maskaudit_core::{data, findings, lint, report, sys};
use maskaudit_torch::model;

/// Characters of an error line, past which its middle is cut: the values from the data in it
/// are cut to [`echo::ECHO_CHARS`] where they are quoted; this catches anything else.
const ERROR_LINE_CHARS: usize = 1000;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let env = cli::settings::Env::read();
    env.apply(&cli.command);
    match cli::settings::Settings::resolve(cli, &env).and_then(run) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => error(&maskaudit_core::one_line(&e)),
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
