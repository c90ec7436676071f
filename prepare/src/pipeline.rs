//! The prepare stage: records -> filters -> chat template -> token ids -> split -> Parquet.

use crate::assets::{Asset, Sources, EVAL_ROLES, TRAIN_ROLES};
use crate::config::PrepareConfig;
use crate::filters::{normalise_prompt, KeywordFilter};
use crate::formats::{for_each_record, read_records, Record};
use anyhow::{bail, Context, Result};
use basin_lm::artifacts::{FileHash, Manifest, ManifestSet, TemplateInfo, TokenizerInfo};
use basin_lm::chat::ChatTemplate;
use basin_lm::fsutil::sha256_file;
use basin_lm::rng::mix64;
use basin_lm::schema::{self, PreparedRow};
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
        let mut b = self.builder(config, set, records.len() as u64, progress);
        let mut rows = b.push(records)?;
        let (val, stats) = b.finish()?;
        mark_val(&mut rows, &val, &mut 0);
        Ok((rows, stats))
    }

    fn builder<'a>(
        &'a self,
        config: &'a PrepareConfig,
        set: SetInfo<'a>,
        records: u64,
        progress: bool,
    ) -> SetBuilder<'a> {
        SetBuilder {
            set,
            config,
            tokenizer: &self.model.tokenizer,
            template: &self.template,
            filters: self.filters(),
            is_train: TRAIN_ROLES.contains(&set.role),
            stats: SetStats::default(),
            row_record_index: Vec::new(),
            bar: crate::progress_bar(progress, records, set.name),
        }
    }

    /// One set streamed from its input into `out` (a file in the output directory, renamed
    /// into place by the caller): chunks of records built and written as they are read to a
    /// first file, then copied with the validation rows marked. Memory: a chunk, a row group,
    /// and the index of every row.
    fn stream(
        &self,
        config: &PrepareConfig,
        set: SetInfo,
        spec: &crate::formats::ReadSpec,
        records: Option<u64>,
        out: &mut std::fs::File,
        progress: bool,
    ) -> Result<SetStats> {
        let mut b = self.builder(config, set, records.unwrap_or(0), progress);
        let first = basin_lm::fsutil::staged_file(&config.out)?;
        let mut w = schema::RowWriter::new(first.as_file().try_clone()?)?;
        let mut chunk = Vec::with_capacity(CHUNK_RECORDS);
        for_each_record(set.input, spec, |r| {
            chunk.push(r);
            if chunk.len() == CHUNK_RECORDS {
                w.write(&b.push(std::mem::take(&mut chunk))?)?;
            }
            Ok(())
        })?;
        w.write(&b.push(chunk)?)?;
        w.close()?;
        let (val, stats) = b.finish()?;
        let mut w = schema::RowWriter::new(out.try_clone()?)?;
        let mut seen = 0;
        schema::for_each_batch(first.path(), |mut rows| {
            mark_val(&mut rows, &val, &mut seen);
            w.write(&rows)
        })?;
        w.close()?;
        Ok(stats)
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
    let created_out = !config.out.exists();
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("cannot create {}", config.out.display()))?;
    // Every set is built into a file of its own beside its output, and only when all are
    // built are they renamed into place: bad input anywhere leaves the directory as it was.
    let mut built = Vec::new();
    let staged: Result<()> = selected.iter().try_for_each(|asset| {
        let input = cached(config, asset)?;
        let spec = asset
            .read
            .as_ref()
            .expect("only sets with a read spec are selected");
        let mut file = basin_lm::fsutil::staged_file(&config.out)?;
        let set = SetInfo::of(asset, &input);
        let stats = setup.stream(
            config,
            set,
            spec,
            asset.records,
            file.as_file_mut(),
            progress,
        )?;
        built.push((*asset, input, file, stats));
        Ok(())
    });
    if let Err(e) = staged {
        drop(built);
        if created_out {
            let _ = std::fs::remove_dir(&config.out);
        }
        return Err(e);
    }

    let mut outputs = Vec::new();
    for (asset, input, file, stats) in built {
        let out = config.out.join(format!("{}.parquet", asset.name));
        basin_lm::fsutil::publish(file, &out)?;
        let entry = setup.manifest_entry(
            config,
            SetInfo::of(asset, &input),
            FileHash {
                file: asset.file.clone(),
                // `in_cache` checked it against the pin; only an allowed edit needs hashing.
                sha256: if config.allow_modified {
                    sha256_file(&input)?
                } else {
                    asset.sha256.clone()
                },
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

/// Builds one set's rows chunk by chunk: records filtered, tokenized and cut to length
/// ([`Self::push`]); the validation rows are drawn once every chunk is in
/// ([`Self::finish`]), so a set of any size goes through with memory bounded by a chunk.
struct SetBuilder<'a> {
    set: SetInfo<'a>,
    config: &'a PrepareConfig,
    tokenizer: &'a TextTokenizer,
    template: &'a ChatTemplate,
    filters: Filters<'a>,
    is_train: bool,
    stats: SetStats,
    /// The record index of every row so far, in row order (what the validation draw needs).
    row_record_index: Vec<usize>,
    bar: indicatif::ProgressBar,
}

impl<'a> SetBuilder<'a> {
    /// The rows of a chunk of records (split `train` or `eval`; `val` comes at the end).
    fn push(&mut self, records: Vec<Record>) -> Result<Vec<PreparedRow>> {
        let (set, stats, filters) = (self.set, &mut self.stats, self.filters);
        stats.records_read += records.len();
        let kept: Vec<Record> = records
            .into_iter()
            .filter(|r| {
                if let (true, Some(f)) = (set.role == "instruct", filters.safety) {
                    if f.hit(&r.conversation).is_some() {
                        stats.dropped_safety_keyword += 1;
                        return false;
                    }
                }
                if self.is_train
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
        let encoded: Vec<(Vec<u32>, u32)> = kept
            .par_iter()
            .map(|r| {
                let out = encode_conversation(self.tokenizer, self.template, r)
                    .with_context(|| format!("{}: record {}", set.input.display(), r.index));
                self.bar.inc(1);
                out
            })
            .collect::<Result<_>>()?;

        let mut rows = Vec::with_capacity(kept.len());
        for (r, (mut ids, prompt_len)) in kept.into_iter().zip(encoded) {
            let mut truncated = false;
            if self.is_train {
                if prompt_len as usize >= self.config.max_seq_len {
                    self.stats.dropped_prompt_too_long += 1;
                    continue;
                }
                if ids.len() > self.config.max_seq_len {
                    ids.truncate(self.config.max_seq_len);
                    truncated = true;
                    self.stats.truncated += 1;
                }
            } else if ids.len() > self.config.max_seq_len {
                self.stats.eval_over_max_len += 1;
            }
            self.stats.tokens_total += ids.len();
            self.stats.reply_tokens_total += ids.len() - prompt_len as usize;
            self.stats.tokens_max = self.stats.tokens_max.max(ids.len());
            self.row_record_index.push(r.index);
            rows.push(PreparedRow {
                id: format!("{}-{}", set.name, r.index),
                source: set.name.to_string(),
                split: if self.is_train { "train" } else { "eval" }.into(),
                system: r.conversation.system,
                user: r.conversation.user,
                assistant: r.conversation.assistant,
                label: r.label,
                input_ids: ids,
                prompt_len,
                truncated,
            });
        }
        Ok(rows)
    }

    /// The positions (in row order) of the validation rows, and the set's counts.
    fn finish(mut self) -> Result<(HashSet<usize>, SetStats)> {
        self.bar.finish_and_clear();
        let n = self.row_record_index.len();
        if n == 0 {
            bail!(
                "set '{}': every record was dropped; nothing to write",
                self.set.name
            );
        }
        let val = if self.is_train {
            validation_indices(
                &self.row_record_index,
                self.config.val_fraction,
                self.config.seed,
            )
        } else {
            HashSet::new()
        };
        let s = &mut self.stats;
        if self.is_train {
            (s.rows_train, s.rows_val) = (n - val.len(), val.len());
        } else {
            s.rows_eval = n;
        }
        Ok((val, self.stats))
    }
}

/// The rows of a chunk marked `val` where `val` says, counting positions from `*seen`.
fn mark_val(rows: &mut [PreparedRow], val: &HashSet<usize>, seen: &mut usize) {
    for r in rows {
        if val.contains(seen) {
            r.split = "val".into();
        }
        *seen += 1;
    }
}

/// Records read and built per chunk by [`run`].
const CHUNK_RECORDS: usize = 16_384;
