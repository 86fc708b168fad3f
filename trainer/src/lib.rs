//! forge-trainer: recipes, the training loop, checkpoints, export, and the `forge` CLI.

pub mod recipe;
pub mod target_check;
