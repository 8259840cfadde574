//! The `ytrainer` binary: parses the command line and hands over to the library crates. Errors end here as one
//! paragraph on stderr and a non-zero exit code, never as a panic or a backtrace.

mod bench;
mod board_cmd;
mod cli;
mod config_file;
mod convert;
mod curve_cmd;
mod eval_cmd;
mod export;
mod format;
mod generate;
mod interop;
mod merge;
mod plugins_cmd;
mod progress;
mod render;
mod run;
mod score;
mod sort;
mod sweep_cmd;

use std::process::ExitCode;

use clap::Parser;

// Keep the built-in plugins linked: a crate nothing references is dropped together with its `inventory`
// registrations.
use ytrainer_plugin_asft as _;
use ytrainer_plugin_bll as _;
use ytrainer_plugin_ce as _;
use ytrainer_plugin_chord as _;
use ytrainer_plugin_dft as _;
use ytrainer_plugin_dpo as _;
use ytrainer_plugin_eaft as _;
use ytrainer_plugin_focal as _;
use ytrainer_plugin_iwsft as _;
use ytrainer_plugin_nlirg as _;
use ytrainer_plugin_profit as _;
use ytrainer_plugin_rho1 as _;
use ytrainer_plugin_truncation as _;

/// Burn allocates and frees large buffers (logits, activations) every step. By default glibc serves those with
/// mmap and returns them to the OS on free, so every step re-faults and zeroes its pages (measured: ~18% of the
/// CPU time in the kernel's `clear_page`). Serving them from the heap and never trimming it keeps the pages.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called once at startup before any threads exist.
    unsafe {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
        mallopt(M_TOP_PAD, 256 << 20);
        // One arena for every thread: the kernels allocate their outputs on rayon's workers and free them on
        // whichever thread drops the tensor, and with per-thread arenas (each padded and never trimmed, as set
        // above) that memory was stranded across arenas (small/full peak RSS 814 -> 934 MiB when the linear
        // layer's products moved onto the pool). Two cores' worth of threads barely contend for the lock.
        mallopt(M_ARENA_MAX, 1);
    }
}

/// Rust ignores SIGPIPE, so `ytrainer ... | head` would end with a "failed printing to stdout" panic; restoring
/// the default makes a closed pipe end the process quietly, as for any Unix tool.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to its default at startup, before any other thread exists.
    unsafe {
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        unsafe extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        signal(SIGPIPE, SIG_DFL);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    default_sigpipe();
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
        // Colour only on a terminal: escape codes in a redirected log file are noise.
        .with_ansi(progress::stderr_is_terminal())
        .without_time()
        .init();
    // `--plugin-dir` before the command name and after it count alike; a command that loads no plugin has no
    // use for it.
    let mut plugin_dirs = args.plugin_dirs.clone();
    match args.command.plugin_dirs() {
        Some(own) => plugin_dirs.extend(own.iter().cloned()),
        None if !plugin_dirs.is_empty() => eprintln!(
            "warning: --plugin-dir is ignored here: only run, sweep, bench, curve, plugins and board load loss plugins"
        ),
        None => {}
    }
    plugins_cmd::set_cli_plugin_dirs(plugin_dirs);
    // Under mpirun / srun the process joins its data-parallel group (MPI lives until `membership` drops).
    let membership = match ytrainer_dist::join() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let world = membership.world_size();
    let rank = membership.group.get().rank();
    if world > 1 && !matches!(args.command, cli::Command::Run(_)) {
        eprintln!(
            "error: only `ytrainer run` trains data-parallel; start other commands without mpirun / srun"
        );
        membership.abort(2);
        return ExitCode::FAILURE;
    }
    run::set_group(membership.group.clone());
    // The board's server waits on its socket for as long as it runs: not on one of rayon's workers, which the
    // scoring its requests start needs.
    let result = if matches!(args.command, cli::Command::Board(_)) {
        dispatch(args)
    } else {
        on_worker(move || dispatch(args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            if world > 1 {
                eprintln!("error: rank {rank} of {world}: {}", chain.join(": "));
                // The other ranks may wait for this one in a collective call: end them all now.
                membership.abort(1);
            } else {
                eprintln!("error: {}", chain.join(": "));
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the command on a worker of rayon's global pool instead of the main thread.
///
/// Every kernel is a handful of parallel regions, and a window of windowed training is a few hundred of them.
/// Entered from a thread outside the pool, each region injects its jobs, wakes the workers and puts the caller to
/// sleep until they finish: two or three context switches per region, which on this VM cost more than a small
/// region's work. From a worker, a region is a `join` on the caller's own deque: the caller works on it too and
/// wakes at most the other worker. `YTRAINER_POOL_MAIN=1` keeps the old way, for A/B measurements.
fn on_worker<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if std::env::var("YTRAINER_POOL_MAIN").as_deref() == Ok("1") {
        return f();
    }
    // Workers get the main thread's usual 8 MiB of stack: the command now runs on one.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    rayon::scope(|_| f())
}

fn dispatch(args: cli::Cli) -> anyhow::Result<()> {
    match args.command {
        cli::Command::Run(a) => run::run(*a),
        cli::Command::Plugins(p) => match p.command {
            cli::PluginsCommand::List { format } => plugins_cmd::list(format),
            cli::PluginsCommand::Describe { name, format } => plugins_cmd::describe(&name, format),
        },
        cli::Command::Bench(b) => bench::bench(b),
        cli::Command::Curve(c) => curve_cmd::curve(c),
        cli::Command::Init(i) => run::init_preset(i),
        cli::Command::Convert(a) => convert::convert(a),
        cli::Command::Score(a) => score::score(*a),
        cli::Command::Sort(a) => sort::sort(*a),
        cli::Command::Render(a) => render::render(*a),
        cli::Command::Generate(a) => generate::generate(*a),
        cli::Command::Chat(a) => generate::chat(*a),
        cli::Command::Merge(a) => merge::merge(a),
        cli::Command::Export(a) => export::export(a),
        cli::Command::Eval(a) => eval_cmd::eval(a),
        cli::Command::Sweep(a) => sweep_cmd::sweep(a),
        cli::Command::Plot(a) => sweep_cmd::plot(a),
        cli::Command::Board(a) => board_cmd::board(a),
    }
}
