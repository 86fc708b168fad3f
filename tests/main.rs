//! forge's integration tests: one binary, a module per area.

mod bench;
mod cli;
mod cuda;
mod data;
mod device_check;
mod dist;
mod eagle;
mod eval;
mod fp8;
mod hybrid;
mod knowledge;
mod layout;
mod predict;
mod recipes;
mod regenerate;
mod spaf;
mod target;
mod templates;
mod train;
mod tree;
