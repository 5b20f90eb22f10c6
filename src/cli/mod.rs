//! Subcommands of the `philo` binary that live in their own files (the rest are in main.rs).

pub mod bench;
pub mod export;
pub mod monitor;
pub mod plan;
pub mod serve;
