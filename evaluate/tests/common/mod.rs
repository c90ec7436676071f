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

/// A manifest.json in `prepared` naming these sets with these roles (the other fields are
/// placeholders the commands under test do not read).
pub fn write_manifest(prepared: &Path, roles: &[(&str, &str)]) {
    use basin_lm::artifacts::{
        FileHash, Manifest, ManifestSet, SetStats, TemplateInfo, TokenizerInfo,
    };
    let hash = |file: &str| FileHash {
        file: file.into(),
        sha256: "0".repeat(64),
    };
    let sets = roles
        .iter()
        .map(|(name, role)| {
            let entry = ManifestSet {
                role: role.to_string(),
                licence: "test".into(),
                input: hash("input"),
                output: hash(&format!("{name}.parquet")),
                tokenizer: TokenizerInfo {
                    model: "tiny".into(),
                    sha256: "0".repeat(64),
                },
                template: TemplateInfo {
                    name: "tiny".into(),
                    sha256: "0".repeat(64),
                    default_system: None,
                },
                max_seq_len: 512,
                val_fraction: 0.1,
                seed: 0,
                safety_filter: None,
                dedup_against: Vec::new(),
                git_commit: "test".into(),
                stats: SetStats::default(),
                distilled: None,
                dropped_unfinished_reply: None,
                dropped_refusal: None,
            };
            (name.to_string(), entry)
        })
        .collect();
    Manifest {
        schema: basin_lm::artifacts::MANIFEST_SCHEMA.into(),
        sets,
    }
    .write(prepared)
    .unwrap();
}
