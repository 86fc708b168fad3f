//! Typed reading of YAML with every problem collected, each with its key path and the line
//! and column it came from (or the `--set` override that produced it).
//!
//! Its own crate because both the recipe (forge-trainer) and every drafter kind's recipe
//! section (forge-models, one file per kind) are read with it: a kind declares its section
//! with [`section!`] next to its spec.

mod typed;
pub mod yaml;

pub use typed::*;
pub use yaml::{Loc, Node, NodeKind};
