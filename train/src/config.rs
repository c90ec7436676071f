//! The training run as plain data: configs/*.toml, then `--set key=value` overrides. The
//! type lives with the other files that pass between stages ([`basin_lm::artifacts`]):
//! `evaluate report` reads a run's config.toml through it too.

pub use basin_lm::artifacts::{EmaConfig, TrainConfig};
