//! Helpers of evaluate's command-line tests: a tiny model on disk, prepared rows, the binary.
#![allow(dead_code)] // each test file uses a part

use std::path::Path;
use std::process::Command;

/// A tiny random model (weights from `seed`) saved as a Hugging Face directory in `dir`.
pub fn write_tiny_model(dir: &Path, seed: u64) {
    basin_lm::tiny::write_tiny_model(dir, &basin_lm::tiny::tiny_config(), seed).unwrap();
}

/// [`write_tiny_model`] into a fresh temporary directory.
pub fn tiny_model_dir(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), seed);
    dir
}

pub fn evaluate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .args(args)
        .output()
        .unwrap()
}

/// A prepared row of set `set` (number `i`) with these tokens; the other text fields are
/// placeholders the commands under test do not read.
pub fn prepared_row(
    set: &str,
    i: usize,
    split: &str,
    input_ids: Vec<u32>,
    prompt_len: usize,
    label: Option<&str>,
) -> basin_lm::schema::PreparedRow {
    basin_lm::schema::PreparedRow {
        id: format!("{set}-{i}"),
        source: set.into(),
        split: split.into(),
        system: None,
        user: format!("prompt {i}"),
        assistant: (prompt_len < input_ids.len()).then(|| "reply".to_string()),
        label: label.map(str::to_string),
        input_ids,
        prompt_len: prompt_len as u32,
        truncated: false,
    }
}
