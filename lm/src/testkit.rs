//! What tests share: real assets (found, or SKIPPED and counted), a tiny data set, a
//! prepared directory's manifest.
//!
//! A test that needs a fetched asset (the SmolLM2 GGUF, a data set of the mirror) asks
//! [`real_asset`] for it. When the asset is there the test runs and is counted; when it is
//! missing the test says SKIPPED and returns — unless `BASIN_REQUIRE_ASSETS` is set (CI sets
//! it), where a missing asset is a failure naming the asset. With `BASIN_TEST_LOG=FILE`
//! every such test appends one line `ran|skipped <TAB> test <TAB> asset` to FILE, from which
//! `just test` prints how many real-asset tests ran. [`write_manifest`] gives command tests
//! a prepared directory's manifest.

use crate::fsutil::locate_asset;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Set (to anything but empty) where a missing asset must fail the test.
pub const REQUIRE_ASSETS: &str = "BASIN_REQUIRE_ASSETS";
/// The file each real-asset test appends its line to.
pub const TEST_LOG: &str = "BASIN_TEST_LOG";
/// A Python with torch and transformers, for the export checks ([`hf_python`]).
pub const HF_PYTHON: &str = "BASIN_HF_PYTHON";
/// A Python with llama-cpp-python's server, for the endpoint tests ([`llamacpp_python`]).
pub const LLAMACPP_PYTHON: &str = "BASIN_LLAMACPP_PYTHON";

/// The workspace root, from a crate's `CARGO_MANIFEST_DIR` (every crate sits one level down).
pub fn workspace_root(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir).join("..")
}

/// What the environment says: whether a missing asset fails, and where lines go.
struct Env {
    required: bool,
    log: Option<PathBuf>,
}

impl Env {
    fn from_process() -> Self {
        let set = |k| std::env::var_os(k).filter(|v| !v.is_empty());
        Self {
            required: set(REQUIRE_ASSETS).is_some(),
            log: set(TEST_LOG).map(PathBuf::from),
        }
    }

    /// Appends `status <TAB> test <TAB> what` to the log (when there is one).
    fn log(&self, status: &str, what: &str) {
        let Some(path) = &self.log else { return };
        let line = format!("{status}\t{}\t{what}\n", test_name());
        // One short append per line: concurrent tests do not interleave within it.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("cannot append to {TEST_LOG}={}: {e}", path.display());
        }
    }

    fn asset(&self, root: &Path, rel: &str) -> Option<PathBuf> {
        match locate_asset(root, rel) {
            Some(p) => {
                self.log("ran", rel);
                Some(p)
            }
            None if self.required => panic!(
                "asset {rel} is missing from data/cache and DATA_MIRROR, and {REQUIRE_ASSETS} is set: \
                 fetch it (`cargo run -p prepare -- fetch`) or point DATA_MIRROR at the data mirror"
            ),
            None => {
                eprintln!(
                    "SKIPPED {}: asset {rel} not fetched (run `just setup`)",
                    test_name()
                );
                self.log("skipped", rel);
                None
            }
        }
    }
}

/// The running test's name: its binary and the thread libtest names after the test.
fn test_name() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // Test binaries are named <target>-<hash>.
    let binary = exe.rsplit_once('-').map_or(exe.as_str(), |(b, _)| b);
    let thread = std::thread::current();
    format!("{binary}::{}", thread.name().unwrap_or("main"))
}

/// A fetched asset (path relative to data/cache, as in data/sources.toml), found in
/// `<root>/data/cache` or `$DATA_MIRROR`. Missing: panics when `BASIN_REQUIRE_ASSETS` is
/// set, else prints SKIPPED and returns None. Every call is logged (see the module doc).
pub fn real_asset(root: &Path, rel: &str) -> Option<PathBuf> {
    Env::from_process().asset(root, rel)
}

/// Several assets, all or none (a test that needs every one of them).
pub fn real_assets<const N: usize>(root: &Path, rels: [&str; N]) -> Option<[PathBuf; N]> {
    let env = Env::from_process();
    let found: Vec<Option<PathBuf>> = rels.iter().map(|r| env.asset(root, r)).collect();
    let found: Option<Vec<PathBuf>> = found.into_iter().collect();
    found.map(|v| v.try_into().expect("one path per asset"))
}

/// The Python that has torch and transformers (`$BASIN_HF_PYTHON`; `just test` installs a
/// venv and sets it) for the checks that transformers loads basin's exports. Unset: panics
/// when `BASIN_REQUIRE_ASSETS` is set, else SKIPPED (logged) and None.
pub fn hf_python() -> Option<PathBuf> {
    python_from(HF_PYTHON, "a Python with torch and transformers")
}

/// The Python that has llama-cpp-python's OpenAI-compatible server
/// (`$BASIN_LLAMACPP_PYTHON`; `just test` installs a venv and sets it) for the tests against
/// a real server. Unset: as [`hf_python`].
pub fn llamacpp_python() -> Option<PathBuf> {
    python_from(LLAMACPP_PYTHON, "a Python with llama-cpp-python[server]")
}

fn python_from(var: &str, has: &str) -> Option<PathBuf> {
    let env = Env::from_process();
    let what = format!("{var} ({has})");
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(p) => {
            env.log("ran", &what);
            Some(PathBuf::from(p))
        }
        None if env.required => {
            panic!("{what} is not set, and {REQUIRE_ASSETS} is set: run the tests with `just test`")
        }
        None => {
            eprintln!(
                "SKIPPED {}: {what} is not set (`just test` sets it)",
                test_name()
            );
            env.log("skipped", &what);
            None
        }
    }
}

/// A test that cannot run on this machine for a reason other than an asset (no CUDA
/// device): says SKIPPED and logs it. Never fails, even in CI.
pub fn skipped(reason: &str) {
    eprintln!("SKIPPED {}: {reason}", test_name());
    Env::from_process().log("skipped", reason);
}

/// A manifest.json in `prepared` naming these sets with these roles (the other fields are
/// placeholders the commands under test do not read).
pub fn write_manifest(prepared: &Path, roles: &[(&str, &str)]) -> anyhow::Result<()> {
    use crate::artifacts::{
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
                allow_modified: false,
                sample: false,
            };
            (name.to_string(), entry)
        })
        .collect();
    Manifest {
        schema: crate::artifacts::MANIFEST_SCHEMA.into(),
        sets,
    }
    .write(prepared)?;
    Ok(())
}

/// Training rows for the tiny model in `model_dir` (`tiny::write_tiny_model`): chat-template
/// prompts "say N" and replies "the answer is N" with 0-2 "!" (lengths differ), every
/// eighth row held out as `val`.
pub fn tiny_training_rows(
    model_dir: &Path,
    n: usize,
) -> anyhow::Result<Vec<crate::schema::PreparedRow>> {
    let text = crate::source::ModelText::open(model_dir)?;
    (0..n)
        .map(|i| {
            let prompt = format!(
                "<|im_start|>user\nsay {}<|im_end|>\n<|im_start|>assistant\n",
                i % 5
            );
            let reply = format!("the answer is {}{}<|im_end|>", i % 5, "!".repeat(i % 3));
            let mut ids = text.tokenizer.encode(&prompt)?;
            let prompt_len = ids.len() as u32;
            ids.extend(text.tokenizer.encode(&reply)?);
            Ok(crate::schema::PreparedRow {
                id: format!("t-{i}"),
                source: "t".into(),
                split: if i % 8 == 0 { "val" } else { "train" }.into(),
                system: None,
                user: prompt,
                assistant: Some(reply),
                label: None,
                input_ids: ids,
                prompt_len,
                truncated: false,
            })
        })
        .collect()
}

/// The architecture of a family fixture (lm/tests/fixtures/families/<name>/config.json,
/// saved by transformers): from this crate's sources where they were built, or — on a GPU
/// machine that got a test binary and a checkout — from `lm/` under the current folder.
pub fn family_config(name: &str) -> anyhow::Result<crate::architecture::ModelConfig> {
    let rel = Path::new("tests/fixtures/families")
        .join(name)
        .join("config.json");
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel);
    let path = if built.exists() {
        built
    } else {
        Path::new("lm").join(&rel)
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    crate::architecture::ModelConfig::from_hf_json(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_asset_skips_or_fails_and_every_call_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("data/cache/x")).unwrap();
        std::fs::write(root.join("data/cache/x/here.txt"), "hi").unwrap();
        let log_path = root.join("log.tsv");
        let env = Env {
            required: false,
            log: Some(log_path.clone()),
        };
        // A name no data mirror holds.
        let gone = "x/not-an-asset-of-any-mirror.txt";
        assert_eq!(
            env.asset(root, "x/here.txt"),
            Some(root.join("data/cache/x/here.txt"))
        );
        assert_eq!(env.asset(root, gone), None);
        let ci = Env {
            required: true,
            ..env
        };
        let err = std::panic::catch_unwind(|| ci.asset(root, gone)).unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains(&format!("asset {gone} is missing")), "{msg}");
        let log = std::fs::read_to_string(&log_path).unwrap();
        let lines: Vec<Vec<&str>> = log.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert_eq!((lines[0][0], lines[0][2]), ("ran", "x/here.txt"));
        assert_eq!((lines[1][0], lines[1][2]), ("skipped", gone));
        assert!(
            lines[0][1].ends_with(
                "::testkit::tests::a_missing_asset_skips_or_fails_and_every_call_is_logged"
            ),
            "{log}"
        );
    }
}
