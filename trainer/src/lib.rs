//! forge-trainer: recipes, the training loop, checkpoints, export, evaluation and launch, as a
//! library (typed errors, no printing); the `forge` binary (forge/) is its command line.

pub mod artifacts;
pub mod bench_train;
pub mod checkpoint;
pub mod checkpointer;
pub mod data;
pub mod drafter;
pub mod engines;
pub mod error;
pub mod eval;
pub mod host_memory;
pub mod launch;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod predict;
pub mod progress;
pub mod recipe;
pub mod regenerate;
pub mod schedule;
pub mod target;
pub mod target_check;
pub mod train;
