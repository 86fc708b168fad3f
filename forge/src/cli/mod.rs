//! One file per subcommand: argument parsing, progress bars and printing, errors with
//! context (`anyhow`), over the forge-trainer library.

pub mod build_knowledge;
pub mod dist;
pub mod prepare;
pub mod progress;
pub mod regenerate;
pub mod train;
