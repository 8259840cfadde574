//! The `--format` flag shared by the commands that print (its own file, so a command's flags can use it without
//! importing `cli.rs`, which imports every command's flags).

use clap::ValueEnum;

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum Format {
    /// Human-readable table.
    #[default]
    Text,
    /// Machine-readable JSON.
    Json,
}
