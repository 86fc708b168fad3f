//! `forge export`: a checkpoint for an inference engine or forge.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A step_<N> checkpoint folder, a checkpoint.dir (its newest checkpoint), or a forge export.
    checkpoint: PathBuf,
    /// vllm | sglang | speculators | medusa | forge (which ones fit depends on the drafter kind).
    #[arg(long)]
    format: String,
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype of the export: bf16, fp16 or fp32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

pub fn run(a: ExportArgs) -> Result<()> {
    // the export's printing lives in cli/train.rs for now (that file has another owner)
    super::train::run_export(a.checkpoint, a.format, a.out, a.dtype)
}
