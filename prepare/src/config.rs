//! configs/prepare.toml as plain data: what `prepare run` and `prepare distill` read.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// configs/prepare.toml; every key can be overridden with `--set key=value`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareConfig {
    /// The asset list.
    pub sources: PathBuf,
    /// Where fetched assets are.
    pub cache: PathBuf,
    /// Where the Parquet files and manifest.json go.
    pub out: PathBuf,
    /// The model whose tokenizer and chat template are used: an asset name from
    /// sources.toml, a .gguf file or a Hugging Face directory.
    pub model: String,
    /// `model` (the model's own), `llama2-qi`, or a path to a .jinja file.
    pub template: String,
    /// System prompt for conversations that have none (none: the template's default).
    pub system_prompt: Option<String>,
    /// Longer training examples are cut (counted as truncated); evaluation prompts never.
    pub max_seq_len: usize,
    /// Share of each training set held out as `val`, chosen by `seed`.
    pub val_fraction: f64,
    pub seed: u64,
    /// Drop safety-related examples from benign instruct sets (Qi et al. 2023).
    pub safety_filter: bool,
    /// Keyword list (asset, key) that defines "safety-related".
    pub safety_keywords_asset: String,
    pub safety_keywords_list: String,
    /// Drop training examples whose prompt occurs in an evaluation set.
    pub dedup_against_eval: bool,
    /// Asset names to prepare; empty: every asset with a read spec.
    pub sets: Vec<String>,
    /// Sets made by `prepare distill`: project-written prompts, the model's own replies.
    pub distill: Vec<DistillSpec>,
    /// Use cached assets whose sha256 is not the one sources.toml lists (`--allow-modified`;
    /// recorded in the manifest). Off: such a file is an error.
    pub allow_modified: bool,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            sources: "data/sources.toml".into(),
            cache: "data/cache".into(),
            out: "data/prepared".into(),
            model: "smollm2-135m-instruct".into(),
            template: "model".into(),
            system_prompt: None,
            max_seq_len: 512,
            val_fraction: 0.1,
            seed: 0,
            safety_filter: true,
            safety_keywords_asset: "refusal-keywords".into(),
            // The list closest to Qi et al.'s filter: it flags 67% of the Dolly records they
            // marked safety-related and 2.7% of a Dolly sample (prepare's tests measure it).
            safety_keywords_list: "garak_mitigation_bypass".into(),
            dedup_against_eval: true,
            sets: Vec::new(),
            distill: Vec::new(),
            allow_modified: false,
        }
    }
}

/// One `[[distill]]` entry of configs/prepare.toml.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// The set's name: data/prepared/<name>.parquet.
    pub name: String,
    /// The prompts, one a line; blank lines and lines starting with `#` are skipped.
    pub prompts: PathBuf,
    /// The prompts' licence (the replies are the model's).
    pub licence: String,
    /// Reply budget; a reply the budget cut keeps its complete sentences.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// A reply containing one of these (case-sensitive) is a refusal, not a contrast
    /// example: a list of the refusal keyword lists asset. The default is the keyword
    /// judge's own list (Qi et al. 2023), so no kept reply counts as a refusal there.
    #[serde(default = "default_refusal_keywords")]
    pub refusal_keywords: String,
}

fn default_refusal_keywords() -> String {
    "qi2023_and_harmbench_advbench_prefixes".into()
}

fn default_max_new_tokens() -> usize {
    48
}

fn default_batch_size() -> usize {
    16
}
