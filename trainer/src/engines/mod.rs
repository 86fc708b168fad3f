//! Drafts in and out: forge's own export format and the layouts inference engines load
//! (vLLM, SGLang, speculators, FasterDecoding Medusa). `export` writes, `import` reads an
//! engine-format folder, `load` finds and builds a drafter from any of them. The names per
//! format are each drafter kind's own tables (`Drafter::export`).

pub mod export;
pub mod import;
pub mod load;

pub use export::{export, ExportReport};
pub use load::{load_drafter, load_drafter_with_target};

use forge_models::drafters::{Drafter, DrafterSpec};
use std::path::PathBuf;

/// The description stored beside a forge-format export.
pub const FORGE_EXPORT: &str = "forge_drafter.json";

/// A drafter loaded from a checkpoint folder, a checkpoint.dir (newest checkpoint) or a forge
/// export, with where it came from.
pub struct LoadedDrafter {
    pub drafter: Box<dyn Drafter>,
    pub spec: DrafterSpec,
    pub target: PathBuf,
    pub target_config: serde_json::Value,
    pub source: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct ForgeExport {
    pub format: String,
    pub drafter: DrafterSpec,
    pub target: String,
    pub target_config: serde_json::Value,
    pub forge_version: String,
}
