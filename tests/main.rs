//! forge's integration tests: one binary, a module per area.

mod cli;
mod recipes;
mod target;
