//! forge's integration tests: one binary, a module per area.

mod cli;
mod data;
mod dist;
mod eagle;
mod eval;
mod hybrid;
mod recipes;
mod train;
mod regenerate;
mod target;
mod templates;
