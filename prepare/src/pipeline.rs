//! The prepare stage: records -> filters -> chat template -> token ids -> split -> Parquet.

use crate::assets::{Asset, Sources, EVAL_ROLES, TRAIN_ROLES};
use crate::config::PrepareConfig;
use crate::filters::{normalise_prompt, KeywordFilter};
use crate::formats::{read_records, Record};
use anyhow::{bail, Context, Result};
use basin_lm::artifacts::{FileHash, Manifest, ManifestSet, TemplateInfo, TokenizerInfo};
use basin_lm::chat::ChatTemplate;
use basin_lm::fsutil::sha256_file;
use basin_lm::rng::mix64;
use basin_lm::schema::{write_parquet, PreparedRow};
use basin_lm::source::{ModelText, TemplateChoice};
use basin_lm::tokenizer::TextTokenizer;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use basin_lm::artifacts::SetStats;

/// Renders and tokenizes one conversation: prompt ids then reply ids, each encoded on its
/// own so the boundary is exact. Control tokens written in the data stay text: only the
/// template's own markup becomes control tokens.
pub fn encode_conversation(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    record: &Record,
) -> Result<(Vec<u32>, u32)> {
    let conv = &tok.disarm_conversation(&record.conversation);
    if conv.assistant.is_some() {
        let (prompt, completion) = template.render_split(conv)?;
        let mut ids = tok.encode_rendered(&prompt)?;
        let prompt_len = ids.len() as u32;
        ids.extend(tok.encode_rendered(&completion)?);
        Ok((ids, prompt_len))
    } else {
        let ids = tok.encode_rendered(&template.render_prompt(conv)?)?;
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

/// An asset's file in the cache, or an error that says how to get it there. The file must
/// still be what `sources.toml` lists ([`in_cache`]).
pub fn cached(config: &PrepareConfig, a: &Asset) -> Result<PathBuf> {
    match in_cache(config, a)? {
        Some(p) => Ok(p),
        None => bail!(
            "asset '{}' is not in the cache ({}): run `prepare fetch` (or `just setup`) first",
            a.name,
            config.cache.join(&a.file).display()
        ),
    }
}

/// An asset's file in the cache (None when it was not fetched), checked against the sha256
/// `sources.toml` lists for it: a file changed since `prepare fetch` is an error, unless
/// `allow_modified` (then a warning, and the manifest says so).
pub fn in_cache(config: &PrepareConfig, a: &Asset) -> Result<Option<PathBuf>> {
    let p = config.cache.join(&a.file);
    if !p.is_file() {
        return Ok(None);
    }
    if a.sha256.is_empty() {
        bail!(
            "asset '{}' is not pinned: `prepare fetch --only {}` fetches it and pins its sha256 \
             in {}",
            a.name,
            a.name,
            crate::assets::Lock::path(&config.sources).display()
        );
    }
    let found = sha256_file(&p)?;
    if found != a.sha256 {
        let what = format!(
            "{}: sha256 {found} is not the {} that {} lists for '{}'",
            p.display(),
            a.sha256,
            config.sources.display(),
            a.name
        );
        if !config.allow_modified {
            bail!(
                "{what}: run `prepare fetch` again to restore it, update the asset's sha256 if \
                 the change is meant, or pass --allow-modified to use it as it is (recorded \
                 in the manifest)"
            );
        }
        eprintln!("warning: {what}; used as it is (--allow-modified)");
    }
    Ok(Some(p))
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
                let (Some(spec), Some(path)) = (&a.read, in_cache(config, a)?) else {
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
    /// were made.
    pub fn manifest_entry(
        &self,
        config: &PrepareConfig,
        set: SetInfo,
        input: FileHash,
        out: &Path,
        stats: &SetStats,
    ) -> Result<ManifestSet> {
        Ok(ManifestSet {
            role: set.role.to_string(),
            licence: set.licence.to_string(),
            input,
            output: FileHash {
                file: out
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                sha256: sha256_file(out)?,
            },
            tokenizer: TokenizerInfo {
                model: self.model_path.display().to_string(),
                sha256: self.tokenizer_sha.clone(),
            },
            template: TemplateInfo {
                name: self.template.name.clone(),
                sha256: self.template.sha256(),
                default_system: self.template.default_system.clone(),
            },
            max_seq_len: config.max_seq_len,
            val_fraction: config.val_fraction,
            seed: config.seed,
            safety_filter: self.safety.as_ref().map(|f| f.list_name.clone()),
            dedup_against: self.eval_sets_used.clone(),
            git_commit: basin_lm::provenance::git_commit(),
            stats: stats.clone(),
            distilled: None,
            dropped_unfinished_reply: None,
            dropped_refusal: None,
            allow_modified: config.allow_modified,
            sample: set.sample,
        })
    }
}

/// Runs the prepare stage as `config` says.
pub fn run(config: &PrepareConfig, progress: bool) -> Result<Prepared> {
    let setup = Setup::open(config)?;
    let selected: Vec<&Asset> = if config.sets.is_empty() {
        setup
            .sources
            .asset
            .iter()
            .filter(|a| a.read.is_some() && !a.optional)
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

    let mut manifest = Manifest::read_or_empty(&config.out)?;
    // Read, filter and tokenize every set before writing any: bad input anywhere leaves
    // the output directory as it was.
    let mut built = Vec::new();
    for asset in selected {
        let input = cached(config, asset)?;
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
            FileHash {
                file: asset.file.clone(),
                sha256: sha256_file(&input)?,
            },
            &out,
            &stats,
        )?;
        manifest.sets.insert(asset.name.clone(), entry);
        outputs.push((asset.name.clone(), out, stats));
    }
    let manifest = manifest.write(&config.out)?;
    Ok(Prepared { outputs, manifest })
}

/// A set's name, role and licence, and the file its records were read from (for errors).
#[derive(Clone, Copy)]
pub struct SetInfo<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub licence: &'a str,
    pub input: &'a Path,
    /// The asset is a sample of a larger public set.
    pub sample: bool,
}

impl<'a> SetInfo<'a> {
    pub fn of(asset: &'a Asset, input: &'a Path) -> Self {
        Self {
            name: &asset.name,
            role: &asset.role,
            licence: &asset.licence,
            input,
            sample: asset.sample,
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
