//! forge-trainer: recipes, the training loop, checkpoints, export, and the `forge` CLI.

pub mod bench_train;
pub mod checkpoint;
pub mod checkpointer;
pub mod data;
pub mod drafter;
pub mod engines;
pub mod error;
pub mod eval;
pub mod launch;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod recipe;
pub mod regenerate;
pub mod schedule;
pub mod target_check;
pub mod train;
