//! `moellava`: run MoE-LLaVA vision-language models quantized, in little memory.
//!
//! One binary, one subcommand per job. Each subcommand lives in `src/commands/<name>.rs` and is a thin
//! layer over the library crates (`moellava-runtime`, `moellava-convert`).

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

mod commands;

/// Large buffers start on a cache line (ggml's AMX kernel is ~1.5× slower on misaligned outputs).
#[global_allocator]
static ALLOC: moellava_kernels::alloc::CacheAligned = moellava_kernels::alloc::CacheAligned;

#[derive(Parser)]
#[command(name = "moellava", version, about = "Run MoE-LLaVA vision-language models quantized, in little memory", long_about = None)]
#[command(propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Convert(commands::convert::ConvertArgs),
    Run(commands::run::RunArgs),
    Chat(commands::chat::ChatArgs),
    Pope(commands::pope::PopeArgs),
    Compare(commands::compare::CompareArgs),
    Bench(commands::bench::BenchArgs),
    ReplayRoute(commands::replay_route::ReplayRouteArgs),
    Inspect(commands::inspect::InspectArgs),
    Serve(commands::serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // Usage mistakes are one line and exit code 1, like every other bad input.
            eprintln!("error: {}", usage_line(&e.render().to_string()));
            return ExitCode::from(1);
        }
    };
    // Ctrl-C: remove half-written outputs (they are temp files until renamed), then exit as SIGINT would.
    let _ = ctrlc::set_handler(|| {
        moellava_runtime::gguf::writer::remove_incomplete_outputs();
        eprintln!("\ninterrupted");
        std::process::exit(130);
    });
    let result = match cli.command {
        Command::Convert(args) => commands::convert::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Pope(args) => commands::pope::run(args),
        Command::Compare(args) => commands::compare::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::ReplayRoute(args) => commands::replay_route::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Serve(args) => commands::serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// clap's multi-line usage error as one line (without the "try --help" footer).
fn usage_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .map(|l| l.trim_start_matches("error: "))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The error and its causes on one line: "outer: inner: root".
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}
