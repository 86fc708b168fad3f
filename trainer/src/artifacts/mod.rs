//! What a drafter section needs built from the target and the data before its spec resolves
//! (the knowledge drafter's cache), for `forge train` (which builds what is missing), `forge
//! check` and data preparation. The trainer never names a kind: a kind that needs such an
//! artifact has its file here and one line in [`KINDS`]; a kind without one needs nothing.

pub mod knowledge;

use crate::error::Result;
use crate::parallel::Comm;
use crate::recipe::{DrafterSection, Recipe};

/// One kind's artifacts.
pub(crate) struct Artifacts {
    /// The drafter kind (`DrafterSection::kind`).
    pub kind: &'static str,
    /// The section with the artifacts' paths filled in: what resolves into the spec.
    pub resolved: fn(&Recipe) -> Result<DrafterSection>,
    /// The section for what never reads the artifacts (the target features a drafter needs,
    /// its data preparation), so that artifacts not built yet are no obstacle.
    pub without: fn(&Recipe) -> DrafterSection,
    /// Builds missing artifacts (rank 0 builds, the other ranks wait) and checks them.
    pub prepare: fn(&Recipe, &mut dyn Comm) -> Result<Prepared>,
}

/// One line per kind that builds artifacts.
const KINDS: &[Artifacts] = &[knowledge::ARTIFACTS];

fn of(recipe: &Recipe) -> Option<&'static Artifacts> {
    KINDS.iter().find(|a| a.kind == recipe.drafter.kind())
}

/// What [`prepare`] did, for the person running the job.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// Lines of information (an artifact built or reused) and warnings.
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

/// Before training: builds the drafter's missing artifacts and checks them (nothing for kinds
/// without any).
pub fn prepare(recipe: &Recipe, dp: &mut dyn Comm) -> Result<Prepared> {
    match of(recipe) {
        Some(a) => (a.prepare)(recipe, dp),
        None => Ok(Prepared::default()),
    }
}

/// The recipe's drafter section with its artifacts' paths filled in (the recipe's own
/// section for kinds without any).
pub fn resolved_section(recipe: &Recipe) -> Result<DrafterSection> {
    match of(recipe) {
        Some(a) => (a.resolved)(recipe),
        None => Ok(recipe.drafter.clone()),
    }
}

/// The recipe's drafter section for what never reads its artifacts.
pub fn section_without_artifacts(recipe: &Recipe) -> DrafterSection {
    match of(recipe) {
        Some(a) => (a.without)(recipe),
        None => recipe.drafter.clone(),
    }
}
