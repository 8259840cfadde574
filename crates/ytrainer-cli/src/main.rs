//! The `ytrainer` binary: parses the command line and hands over to the library crates. Errors end here as one
//! paragraph on stderr and a non-zero exit code, never as a panic or a backtrace.

mod bench;
mod cli;
mod config_file;
mod plugins_cmd;
mod progress;
mod run;

use std::process::ExitCode;

use clap::Parser;

// Keep the built-in plugins linked: a crate nothing references is dropped together with its `inventory`
// registrations.
use ytrainer_plugin_ce as _;
use ytrainer_plugin_nlirg as _;

// Burn allocates and frees large buffers every step; glibc's malloc hands them back to the OS each time
// (hundreds of thousands of page faults per run). mimalloc keeps them, which was measured at +34% tokens/s.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        eprintln!(
            "error: internal error: {msg}. This is a bug in ytrainer; please report it with the command you ran."
        );
    }));
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("YTRAINER_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if args.verbose { "info" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let result = match args.command {
        cli::Command::Run(a) => run::run(*a),
        cli::Command::Plugins(p) => match p.command {
            cli::PluginsCommand::List { format } => plugins_cmd::list(format),
        },
        cli::Command::Bench(b) => bench::bench(b),
        cli::Command::Init(i) => run::init_preset(i),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
