//! `ytrainer board`: flags in, [`ytrainer_board`] serves the local, read-only web page of runs, sweeps and
//! per-token weights until the process is stopped.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// `ytrainer board`
#[derive(Debug, Args)]
pub struct BoardArgs {
    /// Folders holding runs and sweeps (searched a few levels deep).
    #[arg(value_name = "RUNS_DIR", default_value = "runs")]
    pub dirs: Vec<PathBuf>,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on. Anything but a loopback address needs --token and prints a warning.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Secret every data request must carry (the page's address ends in ?token=...).
    #[arg(long, env = "YTRAINER_BOARD_TOKEN")]
    pub token: Option<String>,
    /// Device the tokens view scores on: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub plugins: crate::cli::PluginDirArgs,
}

/// `ytrainer board`
pub fn board(a: BoardArgs) -> Result<()> {
    let bound = ytrainer_board::bind(&ytrainer_board::BoardOptions {
        roots: a.dirs.clone(),
        host: a.host.clone(),
        port: a.port,
        token: a.token.clone(),
        plugin_dirs: crate::plugins_cmd::cli_plugin_dirs(),
        device: a.device.clone(),
    })?;
    if let Some(w) = &bound.warning {
        eprintln!("warning: {w}");
    }
    println!("ytrainer board: {}", bound.url);
    std::io::stdout().flush()?;
    bound.serve();
    Ok(())
}
