//! The prepare stage: records -> filters -> chat template -> token ids -> split -> Parquet.

use crate::assets::{Asset, Sources, EVAL_ROLES, TRAIN_ROLES};
use crate::filters::{normalise_prompt, KeywordFilter};
use crate::formats::{read_records, Record};
use anyhow::{bail, Context, Result};
use basin_lm::chat::ChatTemplate;
use basin_lm::fsutil::{sha256_file, write_bytes_atomic};
use basin_lm::rng::mix64;
use basin_lm::schema::{write_parquet, PreparedRow};
use basin_lm::source::{ModelText, TemplateChoice};
use basin_lm::tokenizer::TextTokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

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
    pub distill: Vec<crate::distill::DistillSpec>,
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
        }
    }
}

/// Counts for one prepared set, written to manifest.json.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SetStats {
    pub records_read: usize,
    pub dropped_safety_keyword: usize,
    pub dropped_eval_overlap: usize,
    pub dropped_prompt_too_long: usize,
    pub rows_train: usize,
    pub rows_val: usize,
    pub rows_eval: usize,
    pub truncated: usize,
    pub eval_over_max_len: usize,
    pub tokens_total: usize,
    pub reply_tokens_total: usize,
    pub tokens_max: usize,
}

/// Renders and tokenizes one conversation: prompt ids then reply ids, each encoded on its
/// own so the boundary is exact; the reply is cut at `max_len` for training rows.
pub fn encode_conversation(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    record: &Record,
) -> Result<(Vec<u32>, u32)> {
    let conv = &record.conversation;
    if conv.assistant.is_some() {
        let (prompt, completion) = template.render_split(conv)?;
        let mut ids = tok.encode(&prompt)?;
        let prompt_len = ids.len() as u32;
        ids.extend(tok.encode(&completion)?);
        Ok((ids, prompt_len))
    } else {
        let ids = tok.encode(&template.render_prompt(conv)?)?;
        let n = ids.len() as u32;
        Ok((ids, n))
    }
}

/// Indices (into `n` rows) that go to validation: the `round(n * fraction)` rows with the
/// smallest seeded hash of their record index — the same draw whatever the thread count.
pub fn validation_indices(record_ids: &[usize], fraction: f64, seed: u64) -> HashSet<usize> {
    let n_val = (record_ids.len() as f64 * fraction).round() as usize;
    let mut order: Vec<(u64, usize)> = record_ids
        .iter()
        .enumerate()
        .map(|(pos, &id)| (mix64(mix64(seed) ^ id as u64), pos))
        .collect();
    order.sort_unstable();
    order.into_iter().take(n_val).map(|(_, pos)| pos).collect()
}

pub struct Prepared {
    pub outputs: Vec<(String, PathBuf, SetStats)>,
    pub manifest: PathBuf,
}

/// What every prepared set is built with: the asset list, the model's tokenizer and chat
/// template, and the filters that keep records out of training sets.
pub struct Setup {
    pub sources: Sources,
    pub model_path: PathBuf,
    pub model: ModelText,
    pub template: ChatTemplate,
    pub tokenizer_sha: String,
    /// Every evaluation prompt basin knows of and has fetched (normalised).
    eval_prompts: HashSet<String>,
    eval_sets_used: Vec<String>,
    safety: Option<KeywordFilter>,
}

/// An asset's file in the cache, or an error that says how to get it there.
pub fn cached(config: &PrepareConfig, a: &Asset) -> Result<PathBuf> {
    let p = config.cache.join(&a.file);
    if !p.is_file() {
        bail!(
            "asset '{}' is not in the cache ({}): run `prepare fetch` (or `just setup`) first",
            a.name,
            p.display()
        );
    }
    Ok(p)
}

impl Setup {
    /// Checks `config` and opens what it names.
    pub fn open(config: &PrepareConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&config.val_fraction) {
            bail!("val_fraction = {} must be in [0, 1)", config.val_fraction);
        }
        if config.max_seq_len < 2 {
            bail!("max_seq_len = {} is too small", config.max_seq_len);
        }
        let sources = Sources::load(&config.sources)?;
        let model_path = match sources.get(&config.model) {
            Ok(asset) => cached(config, asset)?,
            Err(_) if Path::new(&config.model).exists() => PathBuf::from(&config.model),
            Err(_) => bail!(
                "model '{}' is neither an asset in {} nor an existing path",
                config.model,
                config.sources.display()
            ),
        };
        let model = ModelText::open(&model_path)?;
        let choice: TemplateChoice = config.template.parse()?;
        let template = model.template(&choice, config.system_prompt.clone())?;
        let tokenizer_sha = model.tokenizer.sha256()?;

        let mut eval_prompts = HashSet::new();
        let mut eval_sets_used = Vec::new();
        if config.dedup_against_eval {
            for a in sources
                .asset
                .iter()
                .filter(|a| EVAL_ROLES.contains(&a.role.as_str()))
            {
                let (Some(spec), Ok(path)) = (&a.read, cached(config, a)) else {
                    continue;
                };
                for r in read_records(&path, spec)? {
                    eval_prompts.insert(normalise_prompt(&r.conversation.user));
                }
                eval_sets_used.push(a.name.clone());
            }
        }
        let safety = if config.safety_filter {
            let a = sources.get(&config.safety_keywords_asset)?;
            Some(KeywordFilter::from_lists_file(
                &cached(config, a)?,
                &config.safety_keywords_list,
            )?)
        } else {
            None
        };
        Ok(Self {
            sources,
            model_path,
            model,
            template,
            tokenizer_sha,
            eval_prompts,
            eval_sets_used,
            safety,
        })
    }

    fn filters(&self) -> Filters<'_> {
        Filters {
            safety: self.safety.as_ref(),
            eval_prompts: &self.eval_prompts,
        }
    }

    /// Filters, tokenizes, cuts and splits the records of one set (see [`build_set`]).
    pub fn build(
        &self,
        config: &PrepareConfig,
        set: SetInfo,
        records: Vec<Record>,
        progress: bool,
    ) -> Result<(Vec<PreparedRow>, SetStats)> {
        build_set(
            set,
            records,
            config,
            &self.model.tokenizer,
            &self.template,
            self.filters(),
            progress,
        )
    }

    /// The manifest entry of a set written to `out`: where its rows came from and how they
    /// were made. `extra` (an object) adds keys, e.g. how a distilled set was generated.
    pub fn manifest_entry(
        &self,
        config: &PrepareConfig,
        set: SetInfo,
        input: serde_json::Value,
        out: &Path,
        stats: &SetStats,
        extra: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let mut entry = json!({
            "role": set.role,
            "licence": set.licence,
            "input": input,
            "output": {"file": out.file_name().map(|f| f.to_string_lossy().into_owned()),
                       "sha256": sha256_file(out)?},
            "tokenizer": {"model": self.model_path.display().to_string(), "sha256": self.tokenizer_sha},
            "template": {"name": self.template.name, "sha256": self.template.sha256(),
                         "default_system": self.template.default_system},
            "max_seq_len": config.max_seq_len,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "safety_filter": self.safety.as_ref().map(|f| f.list_name.clone()),
            "dedup_against": self.eval_sets_used,
            "git_commit": basin_lm::provenance::git_commit(),
            "stats": stats,
        });
        if let (Some(entry), Some(extra)) = (entry.as_object_mut(), extra.as_object()) {
            entry.extend(extra.clone());
        }
        Ok(entry)
    }
}

/// The sets manifest.json in `out` lists (empty when there is none yet).
pub fn read_manifest_sets(out: &Path) -> BTreeMap<String, serde_json::Value> {
    match std::fs::read_to_string(out.join("manifest.json")) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| serde_json::from_value(v["sets"].clone()).ok())
            .unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    }
}

/// Writes manifest.json in `out` (atomically); returns its path.
pub fn write_manifest(out: &Path, sets: BTreeMap<String, serde_json::Value>) -> Result<PathBuf> {
    let path = out.join("manifest.json");
    let manifest = json!({
        "schema": "basin prepared data v1 (see basin_lm::schema)",
        "sets": sets,
    });
    write_bytes_atomic(&path, serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(path)
}

/// Runs the prepare stage as `config` says.
pub fn run(config: &PrepareConfig, progress: bool) -> Result<Prepared> {
    let setup = Setup::open(config)?;
    let selected: Vec<&Asset> = if config.sets.is_empty() {
        setup
            .sources
            .asset
            .iter()
            .filter(|a| a.read.is_some())
            .collect()
    } else {
        setup.sources.select(&config.sets)?
    };
    for a in &selected {
        if a.read.is_none() {
            bail!(
                "asset '{}' (role {}) is not a data set prepare can read",
                a.name,
                a.role
            );
        }
    }

    let mut manifest_sets = read_manifest_sets(&config.out);
    // Read, filter and tokenize every set before writing any: bad input anywhere leaves
    // the output directory as it was.
    let mut built = Vec::new();
    for asset in selected {
        let input = cached(config, asset)?;
        let found = sha256_file(&input)?;
        if found != asset.sha256 {
            bail!(
                "{}: sha256 {found} is not the {} that {} gives for '{}': run `prepare fetch` again",
                input.display(),
                asset.sha256,
                config.sources.display(),
                asset.name
            );
        }
        let spec = asset
            .read
            .as_ref()
            .expect("only sets with a read spec are selected");
        let records = read_records(&input, spec)?;
        let (rows, stats) = setup.build(config, SetInfo::of(asset, &input), records, progress)?;
        built.push((asset, input, rows, stats));
    }

    let mut outputs = Vec::new();
    for (asset, input, rows, stats) in built {
        let out = config.out.join(format!("{}.parquet", asset.name));
        write_parquet(&out, &rows)?;
        let entry = setup.manifest_entry(
            config,
            SetInfo::of(asset, &input),
            json!({"file": asset.file, "sha256": asset.sha256}),
            &out,
            &stats,
            json!({}),
        )?;
        manifest_sets.insert(asset.name.clone(), entry);
        outputs.push((asset.name.clone(), out, stats));
    }
    let manifest = write_manifest(&config.out, manifest_sets)?;
    Ok(Prepared { outputs, manifest })
}

/// A set's name, role and licence, and the file its records were read from (for errors).
#[derive(Clone, Copy)]
pub struct SetInfo<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub licence: &'a str,
    pub input: &'a Path,
}

impl<'a> SetInfo<'a> {
    pub fn of(asset: &'a Asset, input: &'a Path) -> Self {
        Self {
            name: &asset.name,
            role: &asset.role,
            licence: &asset.licence,
            input,
        }
    }
}

/// What keeps records out of a training set.
#[derive(Clone, Copy)]
struct Filters<'a> {
    safety: Option<&'a KeywordFilter>,
    eval_prompts: &'a HashSet<String>,
}

/// One set's rows: records filtered, tokenized, cut to length and split.
fn build_set(
    set: SetInfo,
    records: Vec<Record>,
    config: &PrepareConfig,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    filters: Filters,
    progress: bool,
) -> Result<(Vec<PreparedRow>, SetStats)> {
    let is_train = TRAIN_ROLES.contains(&set.role);
    let mut stats = SetStats {
        records_read: records.len(),
        ..Default::default()
    };
    let kept: Vec<Record> = records
        .into_iter()
        .filter(|r| {
            if let (true, Some(f)) = (set.role == "instruct", filters.safety) {
                if f.hit(&r.conversation).is_some() {
                    stats.dropped_safety_keyword += 1;
                    return false;
                }
            }
            if is_train
                && filters
                    .eval_prompts
                    .contains(&normalise_prompt(&r.conversation.user))
            {
                stats.dropped_eval_overlap += 1;
                return false;
            }
            true
        })
        .collect();

    let bar = crate::progress_bar(progress, kept.len() as u64, set.name);
    let encoded: Vec<(Vec<u32>, u32)> = kept
        .par_iter()
        .map(|r| {
            let out = encode_conversation(tokenizer, template, r)
                .with_context(|| format!("{}: record {}", set.input.display(), r.index));
            bar.inc(1);
            out
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();

    let mut rows = Vec::with_capacity(kept.len());
    let mut row_record_index = Vec::with_capacity(kept.len());
    for (r, (mut ids, prompt_len)) in kept.iter().zip(encoded) {
        let mut truncated = false;
        if is_train {
            if prompt_len as usize >= config.max_seq_len {
                stats.dropped_prompt_too_long += 1;
                continue;
            }
            if ids.len() > config.max_seq_len {
                ids.truncate(config.max_seq_len);
                truncated = true;
                stats.truncated += 1;
            }
        } else if ids.len() > config.max_seq_len {
            stats.eval_over_max_len += 1;
        }
        stats.tokens_total += ids.len();
        stats.reply_tokens_total += ids.len() - prompt_len as usize;
        stats.tokens_max = stats.tokens_max.max(ids.len());
        row_record_index.push(r.index);
        rows.push(PreparedRow {
            id: format!("{}-{}", set.name, r.index),
            source: set.name.to_string(),
            split: if is_train { "train" } else { "eval" }.into(),
            system: r.conversation.system.clone(),
            user: r.conversation.user.clone(),
            assistant: r.conversation.assistant.clone(),
            label: r.label.clone(),
            input_ids: ids,
            prompt_len,
            truncated,
        });
    }
    if is_train {
        for pos in validation_indices(&row_record_index, config.val_fraction, config.seed) {
            rows[pos].split = "val".into();
        }
    }
    stats.rows_train = rows.iter().filter(|r| r.split == "train").count();
    stats.rows_val = rows.iter().filter(|r| r.split == "val").count();
    stats.rows_eval = rows.iter().filter(|r| r.split == "eval").count();
    if rows.is_empty() {
        bail!(
            "set '{}': every record was dropped; nothing to write",
            set.name
        );
    }
    Ok((rows, stats))
}
