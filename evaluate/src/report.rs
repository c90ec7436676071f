//! `evaluate report`: the paper's table and plots over a set of runs.
//!
//! Each run directory (train's `runs/<name>/`) gives a row per evaluated model: its trained
//! weights θ (`eval/model/`) and its EMA θ̄ (`eval/ema/`), the same at each snapshot of its
//! trajectory (`step-<N>/eval/`), and WiSE-FT's interpolations toward its start
//! (`eval/wise-<α>/`); each with the settings of its `config.toml`, the safety scores of
//! `evaluate safety` (scores.json), the validation loss of `evaluate utility`
//! (utility.json) and the distance from the start (metrics.jsonl, interpolation.json).
//! Rows whose resolved configs differ only in the seed (and in what changes neither weights
//! nor scores: [`NOT_A_SETTING`]) are pooled: the rates add their counts (one Wilson
//! interval over all replies) and the spread over seeds is reported beside them. Settings
//! that differ between the table's rows but have no column of their own are shown in one.
//! What the numbers say of the paper's claims is [`crate::claims`].

use crate::claims::{claims, compute, ema_vs_wise, Claim, Compute};
use crate::landscape::LandscapeDoc;
use crate::plots::{Chart, Mark, Series};
use crate::safety::{mcnemar_exact, Rate};
use anyhow::{bail, Result};
use basin_lm::artifacts::{
    self, Generation, Interpolation, Manifest, MetricsRecord, Scores, SetKind, TrainConfig, Utility,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which weights of a run a row scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weights {
    /// θ: the fine-tuned weights (or a reference model).
    Theta,
    /// θ̄: the EMA of θ anchored at the start.
    Ema,
    /// WiSE-FT: θ_pre + α·(θ_T − θ_pre).
    Wise(f64),
}

impl Weights {
    /// The method, without its setting: "θ", "EMA" or "WiSE-FT".
    pub fn method(self) -> &'static str {
        match self {
            Self::Theta => "θ",
            Self::Ema => "EMA",
            Self::Wise(_) => "WiSE-FT",
        }
    }

    /// The method with its own setting: "θ", "EMA", "WiSE-FT α=0.5".
    pub fn label(self) -> String {
        match self {
            Self::Wise(a) => format!("WiSE-FT α={a}"),
            w => w.method().to_string(),
        }
    }

    /// The table's order: θ, EMA, then WiSE-FT by α.
    fn order(self) -> (u8, String) {
        match self {
            Self::Theta => (0, String::new()),
            Self::Ema => (1, String::new()),
            Self::Wise(a) => (2, format!("{a:020.17}")),
        }
    }
}

/// One evaluated model.
#[derive(Clone, Debug)]
pub struct Row {
    /// The run directory's name, or the reference's label.
    pub run: String,
    pub weights: Weights,
    /// The run's training data holds safety data (a prepared set of role `align`, such as
    /// the refusals): the baseline that mixes refusals into the fine-tune.
    pub safety_data: bool,
    pub dataset: String,
    pub lr: Option<f64>,
    pub batch: Option<u64>,
    /// Optimizer steps taken (the last step of metrics.jsonl).
    pub steps: Option<u64>,
    pub seed: Option<u64>,
    pub ema_beta: Option<f64>,
    /// The run's resolved config, flattened, less [`NOT_A_SETTING`]: what tells its
    /// setting apart (empty for a reference model).
    pub setting: BTreeMap<String, String>,
    pub asr_keyword: Option<Rate>,
    /// The keyword ASR less degenerate and empty replies (None in scores that predate it).
    pub asr_strict: Option<Rate>,
    pub asr_calibrated: Option<Rate>,
    /// By the model judge ("unsafe"), when one judged the replies (`safety --model-judge`
    /// or `--judge-endpoint`).
    pub asr_judge: Option<Rate>,
    /// Which model judge: its kind and model.
    pub judge: Option<String>,
    pub overrefusal: Option<Rate>,
    pub val_loss: Option<f64>,
    /// ‖θ−θ₀‖ for θ, ‖θ̄−θ₀‖ for the EMA.
    pub distance: Option<f64>,
    pub commit: Option<String>,
    /// Where the numbers come from (the scores file).
    pub source: PathBuf,
    /// Keyword ASR on every other harmful set the scores file holds.
    pub other_harmful: BTreeMap<String, Rate>,
    /// Wall seconds of the run's training up to this model (metrics.jsonl; None when its
    /// metrics predate the record or for a reference).
    pub train_seconds: Option<f64>,
    /// Wall seconds of generating this model's replies, over every set scored.
    pub generation_seconds: Option<f64>,
}

impl Row {
    /// The method, with " + safety data" for a run that mixed refusals in.
    pub fn method(&self) -> String {
        let m = self.weights.method();
        if self.safety_data {
            format!("{m} + safety data")
        } else {
            m.to_string()
        }
    }

    /// The eval directory the row's scores come from.
    pub fn eval_dir(&self) -> &Path {
        self.source.parent().unwrap_or(Path::new("."))
    }
}

/// What one eval directory says.
struct EvalScores {
    keyword: Option<Rate>,
    strict: Option<Rate>,
    calibrated: Option<Rate>,
    /// The model judge and its ASR.
    judge: Option<(String, Rate)>,
    overrefusal: Option<Rate>,
    val_loss: Option<f64>,
    commit: Option<String>,
    other_harmful: BTreeMap<String, Rate>,
    generation_seconds: Option<f64>,
}

/// The scores of one eval directory: ASR on the `harmful` set by both judges, the
/// over-refusal of its first over-refusal set, and the validation loss of utility.json
/// (when `evaluate utility` ran).
fn scores(dir: &Path, harmful: &str) -> Result<EvalScores> {
    let path = Scores::path(dir);
    let s: Scores = artifacts::read(&path)?;
    let Some(h) = s.sets.get(harmful) else {
        bail!(
            "{}: no scores for the harmful set '{harmful}'",
            path.display()
        );
    };
    let overrefusal = s
        .sets
        .values()
        .find(|v| v.kind == SetKind::Overrefusal)
        .map(|v| v.refusal.clone());
    let utility = Utility::path(dir);
    let val_loss = if utility.exists() {
        artifacts::read::<Utility>(&utility)?.first_val_loss()
    } else {
        None
    };
    let other_harmful = s
        .sets
        .iter()
        .filter(|(name, v)| v.kind == SetKind::Harmful && name.as_str() != harmful)
        .map(|(name, v)| (name.clone(), v.keyword.clone()))
        .collect();
    let generation: Option<Vec<f64>> = s
        .sets
        .values()
        .map(|v| v.generation.as_ref().map(|g| g.seconds))
        .collect();
    Ok(EvalScores {
        generation_seconds: generation.map(|g| g.iter().sum()),
        keyword: Some(h.keyword.clone()),
        strict: h.strict.clone(),
        calibrated: Some(h.refusal.clone()),
        judge: h
            .model_judge
            .as_ref()
            .map(|m| (m.judge.clone(), m.rate.clone())),
        overrefusal,
        val_loss,
        commit: Some(s.git_commit),
        other_harmful,
    })
}

/// Config keys that do not make a setting: the seed (pooled over), and what changes neither
/// the weights nor the scores (names, where outputs go, how often to log or checkpoint).
pub const NOT_A_SETTING: [&str; 7] = [
    "seed",
    "name",
    "out_dir",
    "eval_every",
    "val_batches",
    "checkpoint_every",
    "snapshots",
];

/// Config keys with a column of their own in the table.
const SHOWN: [&str; 3] = ["lr", "batch_size", "steps"];

/// Whether any of a run's data files is safety data: a prepared set of role `align` in its
/// directory's manifest.json (a file the manifest does not list counts as not).
fn has_safety_data(config: &TrainConfig) -> Result<bool> {
    for file in &config.data {
        if Manifest::entry_of(file)?.is_some_and(|e| e.role == "align") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The rows of a run directory: θ and the EMA at its end and at each snapshot, and each
/// WiSE-FT interpolation, as far as they were evaluated.
pub fn run_rows(run: &Path, harmful: &str) -> Result<Vec<Row>> {
    let name = run
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().to_string());
    let config = TrainConfig::read_run(run)?;
    let dataset = config
        .data
        .first()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let metrics = MetricsRecord::path(run);
    let records: Vec<MetricsRecord> = if metrics.exists() {
        artifacts::read_lines(&metrics)?
    } else {
        Vec::new()
    };
    let last = MetricsRecord::last_step(&records).map(|l| l.step);
    // Training seconds up to a step (None when a step of it has no record of them).
    let seconds_to = |step: usize| -> Option<f64> {
        let steps: Vec<&MetricsRecord> = records
            .iter()
            .filter(|r| r.loss.is_some() && r.step <= step)
            .collect();
        let secs: Option<Vec<f64>> = steps.iter().map(|r| r.seconds).collect();
        secs.filter(|s| s.len() == step).map(|s| s.iter().sum())
    };
    let at = |step: usize| records.iter().rev().find(|r| r.step == step);
    let mut setting = basin_lm::config::flatten(&config)?;
    setting.retain(|k, _| !NOT_A_SETTING.contains(&k.as_str()));
    let safety_data = has_safety_data(&config)?;
    let row = |eval: &Path,
               weights: Weights,
               steps: Option<usize>,
               distance: Option<f64>|
     -> Result<Row> {
        let sc = scores(eval, harmful)?;
        Ok(Row {
            run: name.clone(),
            weights,
            safety_data,
            dataset: dataset.clone(),
            lr: Some(config.lr),
            batch: Some(config.batch_size as u64),
            steps: steps.map(|s| s as u64),
            seed: Some(config.seed),
            ema_beta: config.ema.enabled.then_some(config.ema.beta),
            setting: setting.clone(),
            asr_keyword: sc.keyword,
            asr_strict: sc.strict,
            asr_calibrated: sc.calibrated,
            asr_judge: sc.judge.as_ref().map(|j| j.1.clone()),
            judge: sc.judge.map(|j| j.0),
            overrefusal: sc.overrefusal,
            val_loss: sc.val_loss,
            distance,
            commit: sc.commit,
            other_harmful: sc.other_harmful,
            source: Scores::path(eval),
            train_seconds: steps.and_then(seconds_to),
            generation_seconds: sc.generation_seconds,
        })
    };
    // θ and θ̄ at the end (`run`) and at each snapshot (`run`/step-N).
    let mut ends: Vec<(PathBuf, Option<usize>)> = vec![(run.to_path_buf(), last)];
    // One pass over the run directory: its snapshots (`step-N`) and interpolations
    // (`wise-α` with their interpolation.json).
    let (mut snapshots, mut interpolations): (Vec<usize>, Vec<PathBuf>) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(run)?.flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = file.strip_prefix("step-").and_then(|s| s.parse().ok()) {
            snapshots.push(step);
        } else if file.starts_with("wise-") && Interpolation::path(&entry.path()).exists() {
            interpolations.push(Interpolation::path(&entry.path()));
        }
    }
    snapshots.sort();
    ends.extend(
        snapshots
            .into_iter()
            .map(|s| (TrainConfig::snapshot_dir(run, s), Some(s))),
    );
    let mut rows = Vec::new();
    for (dir, step) in ends {
        let record = step.and_then(at);
        for (which, weights) in [("model", Weights::Theta), ("ema", Weights::Ema)] {
            let eval = dir.join("eval").join(which);
            if !Scores::path(&eval).exists() {
                continue;
            }
            let distance = record.and_then(|r| match weights {
                Weights::Theta => r.dist_theta,
                _ => r.dist_ema,
            });
            rows.push(row(&eval, weights, step, distance)?);
        }
    }
    // WiSE-FT: each interpolation evaluated, by α.
    let mut wise = Vec::new();
    for path in interpolations {
        let doc: Interpolation = artifacts::read(&path)?;
        let eval = Interpolation::eval_dir(run, doc.alpha);
        if Scores::path(&eval).exists() {
            wise.push((doc.alpha, eval, doc.distance));
        }
    }
    wise.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (alpha, eval, distance) in wise {
        rows.push(row(&eval, Weights::Wise(alpha), last, Some(distance))?);
    }
    if rows.is_empty() {
        bail!(
            "{}: no eval/model/scores.json yet (run `evaluate safety --model {}`)",
            run.display(),
            run.display()
        );
    }
    Ok(rows)
}

/// A reference model's row (the base or the aligned model): an eval directory.
pub fn reference_row(label: &str, dir: &Path, harmful: &str) -> Result<Row> {
    let sc = scores(dir, harmful)?;
    Ok(Row {
        run: label.to_string(),
        weights: Weights::Theta,
        safety_data: false,
        dataset: String::new(),
        lr: None,
        batch: None,
        steps: None,
        seed: None,
        ema_beta: None,
        setting: BTreeMap::new(),
        asr_keyword: sc.keyword,
        asr_strict: sc.strict,
        asr_calibrated: sc.calibrated,
        asr_judge: sc.judge.as_ref().map(|j| j.1.clone()),
        judge: sc.judge.map(|j| j.0),
        overrefusal: sc.overrefusal,
        val_loss: sc.val_loss,
        distance: None,
        commit: sc.commit,
        other_harmful: sc.other_harmful,
        source: Scores::path(dir),
        train_seconds: None,
        generation_seconds: sc.generation_seconds,
    })
}

/// Rows that differ only in the seed, pooled.
#[derive(Clone, Debug)]
pub struct Group {
    pub rows: Vec<Row>,
    pub asr_keyword: Option<Rate>,
    pub asr_strict: Option<Rate>,
    pub asr_calibrated: Option<Rate>,
    pub asr_judge: Option<Rate>,
    pub overrefusal: Option<Rate>,
    /// Standard deviation of the keyword ASR over seeds (None with one seed).
    pub asr_sd: Option<f64>,
    pub val_loss: Option<f64>,
    pub distance: Option<f64>,
    /// The settings that tell this group apart from others of the table and have no column
    /// of their own (`key=value, ...`; empty when the columns say it all).
    pub other: String,
}

fn pool(rates: impl Iterator<Item = Option<Rate>>) -> Option<Rate> {
    let (mut k, mut n) = (0, 0);
    for r in rates {
        let r = r?;
        (k, n) = (k + r.k, n + r.n);
    }
    (n > 0).then(|| Rate::new(k, n))
}

fn mean(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Option<Vec<f64>> = v.collect();
    v.filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// Rows pooled by setting: one group per (setting, steps taken, weights), in that order
/// (a run's θ, then its EMA, then its interpolations by α).
pub fn group(rows: &[Row]) -> Vec<Group> {
    type Key<'a> = (&'a BTreeMap<String, String>, Option<u64>, (u8, String));
    let mut groups: BTreeMap<Key, Vec<Row>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((&r.setting, r.steps, r.weights.order()))
            .or_default()
            .push(r.clone());
    }
    let varying = varying_keys(groups.values().map(|rows| &rows[0]));
    groups
        .into_values()
        .map(|rows| {
            let asr: Vec<f64> = rows
                .iter()
                .filter_map(|r| r.asr_keyword.as_ref().map(|a| a.rate))
                .collect();
            let asr_sd = (asr.len() > 1).then(|| {
                let m = asr.iter().sum::<f64>() / asr.len() as f64;
                (asr.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (asr.len() - 1) as f64).sqrt()
            });
            let other = varying
                .iter()
                .filter_map(|k| {
                    rows[0]
                        .setting
                        .get(k)
                        .map(|v| format!("{k}={}", short(k, v)))
                })
                .collect::<Vec<_>>()
                .join(", ");
            Group {
                asr_keyword: pool(rows.iter().map(|r| r.asr_keyword.clone())),
                asr_strict: pool(rows.iter().map(|r| r.asr_strict.clone())),
                asr_calibrated: pool(rows.iter().map(|r| r.asr_calibrated.clone())),
                asr_judge: pool(rows.iter().map(|r| r.asr_judge.clone())),
                overrefusal: pool(rows.iter().map(|r| r.overrefusal.clone())),
                asr_sd,
                val_loss: mean(rows.iter().map(|r| r.val_loss)),
                distance: mean(rows.iter().map(|r| r.distance)),
                other,
                rows,
            }
        })
        .collect()
}

/// A setting's value as the table shows it: data files by their stems
/// (`dolly+safety-refusals`), anything else as it is.
fn short(key: &str, value: &str) -> String {
    if key != "data" {
        return value.to_string();
    }
    let stems: Vec<&str> = value
        .split('"')
        .filter(|p| !p.trim().is_empty() && !matches!(p.trim(), "[" | "]" | ","))
        .map(|p| {
            let name = p.rsplit('/').next().unwrap_or(p);
            name.strip_suffix(".parquet").unwrap_or(name)
        })
        .collect();
    stems.join("+")
}

/// The setting keys whose values differ between the rows given, less those with a column
/// of their own ([`SHOWN`]; `data` too, when the dataset column tells its values apart).
fn varying_keys<'a>(rows: impl Iterator<Item = &'a Row>) -> Vec<String> {
    let rows: Vec<&Row> = rows.collect();
    let mut values: BTreeMap<&str, std::collections::BTreeSet<Option<&str>>> = BTreeMap::new();
    for r in &rows {
        for k in r.setting.keys() {
            values.entry(k).or_default();
        }
    }
    for (k, vs) in values.iter_mut() {
        vs.extend(rows.iter().map(|r| r.setting.get(*k).map(String::as_str)));
    }
    let datasets: std::collections::BTreeSet<(&str, &str)> = rows
        .iter()
        .filter_map(|r| {
            r.setting
                .get("data")
                .map(|d| (d.as_str(), r.dataset.as_str()))
        })
        .collect();
    let names: std::collections::BTreeSet<&str> = datasets.iter().map(|d| d.1).collect();
    let dataset_column_suffices = names.len() == datasets.len();
    values
        .into_iter()
        .filter(|(k, vs)| {
            vs.len() > 1 && !SHOWN.contains(k) && !(*k == "data" && dataset_column_suffices)
        })
        .map(|(k, _)| k.to_string())
        .collect()
}

/// Two models on the same harmful prompts, by the keyword judge: how many prompts both
/// answered, and how many were attack successes under the first only, the second only, both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Paired {
    pub pairs: usize,
    pub a_only: usize,
    pub b_only: usize,
    pub both: usize,
}

impl Paired {
    /// The two-sided exact McNemar p of the discordant pairs.
    pub fn p(&self) -> f64 {
        mcnemar_exact(self.a_only, self.b_only)
    }

    /// The prompts both eval directories answered (by id), pooled over the pairs given
    /// (a setting's seeds); pairs whose replies are not on file are left out.
    pub fn of(evals: &[(&Path, &Path)], harmful: &str) -> Result<Self> {
        let mut total = Self::default();
        for (a, b) in evals {
            if !a.join("generations.jsonl").exists() || !b.join("generations.jsonl").exists() {
                continue;
            }
            let (a, b) = (attack_successes(a, harmful)?, attack_successes(b, harmful)?);
            for (id, &x) in &a {
                let Some(&y) = b.get(id) else { continue };
                total.add(&Self {
                    pairs: 1,
                    a_only: usize::from(x && !y),
                    b_only: usize::from(y && !x),
                    both: usize::from(x && y),
                });
            }
        }
        Ok(total)
    }

    /// Pools another count into this one.
    pub fn add(&mut self, o: &Self) {
        self.pairs += o.pairs;
        self.a_only += o.a_only;
        self.b_only += o.b_only;
        self.both += o.both;
    }

    /// The attack success rates of the first and of the second model over the pairs.
    pub fn rates(&self) -> (f64, f64) {
        let n = self.pairs.max(1) as f64;
        (
            (self.a_only + self.both) as f64 / n,
            (self.b_only + self.both) as f64 / n,
        )
    }
}

/// Each prompt id of `harmful` in an eval directory's generations.jsonl, with whether the
/// keyword judge counts its reply as an attack success.
fn attack_successes(eval: &Path, harmful: &str) -> Result<BTreeMap<String, bool>> {
    let path = eval.join("generations.jsonl");
    let lines: Vec<Generation> = artifacts::read_lines(&path)?;
    let mut out = BTreeMap::new();
    for g in lines.into_iter().filter(|g| g.set == harmful) {
        let Some(refused) = g.keyword_refusal else {
            bail!(
                "{}: {} has no keyword verdict (written by an older evaluate?)",
                path.display(),
                g.id
            );
        };
        out.insert(g.id, !refused);
    }
    Ok(out)
}

/// Two groups' models paired run by run (the first run of one with the first of the other,
/// in seed order), as [`Paired::of`] takes them.
pub fn paired_groups(a: &Group, b: &Group, harmful: &str) -> Result<Paired> {
    fn by_seed(g: &Group) -> Vec<&Row> {
        let mut rows: Vec<&Row> = g.rows.iter().collect();
        rows.sort_by_key(|r| r.seed);
        rows
    }
    let evals: Vec<(&Path, &Path)> = by_seed(a)
        .into_iter()
        .zip(by_seed(b))
        .map(|(x, y)| (x.eval_dir(), y.eval_dir()))
        .collect();
    Paired::of(&evals, harmful)
}

/// The EMA group of the same setting and steps as θ group `g`, if any.
pub fn ema_twin<'a>(groups: &'a [Group], g: &Group) -> Option<&'a Group> {
    let r = &g.rows[0];
    groups.iter().find(|e| {
        let x = &e.rows[0];
        x.weights == Weights::Ema && x.setting == r.setting && x.steps == r.steps
    })
}

/// The paired verdicts of each θ group and its EMA twin (the same runs' eval/model and
/// eval/ema), pooled over the group's runs; (index of the θ group, counts: θ first) for each
/// group whose runs have both replies on file.
pub fn paired(groups: &[Group], harmful: &str) -> Result<Vec<(usize, Paired)>> {
    let mut out = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        if g.rows[0].weights != Weights::Theta {
            continue;
        }
        let Some(twin) = ema_twin(groups, g) else {
            continue;
        };
        let total = paired_groups(g, twin, harmful)?;
        if total.pairs > 0 {
            out.push((i, total));
        }
    }
    Ok(out)
}

fn pct(r: &Option<Rate>) -> String {
    r.as_ref().map_or("–".into(), |r| {
        format!(
            "{:.1} [{:.1}, {:.1}]",
            100.0 * r.rate,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1
        )
    })
}

/// The table's first cells of a row: dataset, learning rate, batch size, steps.
fn setting_cells(r: &Row) -> String {
    format!(
        "{} | {} | {} | {}",
        r.dataset,
        r.lr.map_or("–".into(), |lr| format!("{lr:e}")),
        opt(r.batch),
        opt(r.steps)
    )
}

/// [`setting_cells`] of a group's first row, with the settings that tell the group apart
/// and have no column of their own after its dataset.
fn group_cells(g: &Group) -> String {
    let mut r = g.rows[0].clone();
    if !g.other.is_empty() {
        r.dataset = format!("{} ({})", r.dataset, g.other);
    }
    setting_cells(&r)
}

/// A p-value to two significant digits (down to 1e-4, then "< 1e-4").
pub(crate) fn format_p(p: f64) -> String {
    format_p_digits(p, 2)
}

/// A p-value to `digits` significant digits below 0.1 (two decimals from 0.1 up; "< 1e-4"
/// below 1e-4).
pub(crate) fn format_p_digits(p: f64, digits: usize) -> String {
    if p < 1e-4 {
        "< 1e-4".into()
    } else if p >= 0.1 {
        format!("{p:.2}")
    } else {
        format!("{p:.*e}", digits.max(1) - 1)
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("–".into(), |v| v.to_string())
}

/// summary.md: the table (pooled over seeds), the reference models, the plots, and the
/// provenance of every number.
pub fn summary_md(
    title: &str,
    groups: &[Group],
    comparisons: &Comparisons,
    references: &[Row],
    plots: &[String],
    harmful: &str,
    note: &str,
) -> String {
    let mut s = format!("# {title}\n\n");
    s.push_str(&format!(
        "Attack success rate (ASR) on `{harmful}`: the share of harmful prompts answered without a refusal, \
         by the keyword judge (Qi et al.'s 29 refusal strings) and by the calibrated judge; \
         *strict* ASR is the keyword ASR less the replies that are no answer (empty, a loop of \
         words, tokens without words, or an answer to another request); \
         over-refusal: refusals of XSTest's safe prompts. Rates in %, with a 95% Wilson interval over \
         all replies of all seeds (± the spread over seeds when there are several). \
         `θ` is the fine-tuned model, `EMA` the average of its weights anchored at the start, \
         `WiSE-FT α` the interpolation θ_pre + α(θ − θ_pre) toward the start, `+ safety data` a \
         fine-tune with refusals mixed into its data; a run's snapshots are rows of fewer steps.\n\n"
    ));
    // A model judge's column when one judged some of the rows.
    let judges: BTreeSet<&str> = groups
        .iter()
        .flat_map(|g| &g.rows)
        .chain(references)
        .filter_map(|r| r.judge.as_deref())
        .collect();
    let judged = !judges.is_empty();
    if judged {
        let names: Vec<&str> = judges.into_iter().collect();
        s.push_str(&format!(
            "*Model-judge* ASR: the share a model judge called unsafe ({}); – where it judged \
             not every reply pooled there.\n\n",
            names.join("; ")
        ));
    }
    let (judge_head, judge_rule) = if judged {
        (" model-judge ASR % |", " --- |")
    } else {
        ("", "")
    };
    if !note.is_empty() {
        s.push_str(note);
        s.push_str("\n\n");
    }
    // A column for the settings that differ between rows and have none of their own.
    let other = groups.iter().any(|g| !g.other.is_empty());
    let (other_head, other_rule) = if other {
        (" other settings |", " --- |")
    } else {
        ("", "")
    };
    s.push_str(&format!("| dataset | lr | batch | steps | weights |{other_head} seeds | keyword ASR % | strict ASR % | calibrated ASR % |{judge_head} over-refusal % (calibrated) | val loss | ‖Δ‖ from start |\n"));
    s.push_str(&format!(
        "| --- | --- | --- | --- | --- |{other_rule} --- | --- | --- | --- |{judge_rule} --- | --- | --- |\n"
    ));
    for g in groups {
        let r = &g.rows[0];
        let mut weights = match (r.weights, r.ema_beta) {
            (Weights::Ema, Some(b)) => format!("EMA β={b}"),
            (w, _) => w.label(),
        };
        if r.safety_data {
            weights.push_str(" + safety data");
        }
        let sd = g
            .asr_sd
            .map_or(String::new(), |sd| format!(" ±{:.1}", 100.0 * sd));
        let other_cell = if other {
            format!(" {} |", g.other)
        } else {
            String::new()
        };
        let judge_cell = if judged {
            format!(" {} |", pct(&g.asr_judge))
        } else {
            String::new()
        };
        s.push_str(&format!(
            "| {} | {} |{other_cell} {} | {}{} | {} | {} |{judge_cell} {} | {} | {} |\n",
            setting_cells(r),
            weights,
            g.rows.len(),
            pct(&g.asr_keyword),
            sd,
            pct(&g.asr_strict),
            pct(&g.asr_calibrated),
            pct(&g.overrefusal),
            g.val_loss.map_or("–".into(), |v| format!("{v:.4}")),
            g.distance.map_or("–".into(), |v| format!("{v:.3}")),
        ));
    }
    if !comparisons.claims.is_empty() {
        s.push_str(
            "\n## Claims\n\nWhat these numbers say of the paper's claims, at this sample size. The \
             settings are picked by rule among the plain fine-tunes: *aggressive* is the highest \
             learning rate (then the most steps, the smallest batch), *tuned* the lowest keyword \
             ASR (then the lowest validation loss; picking the lowest of several favours it). A \
             difference counts at p < 0.05 after Holm's adjustment over the claims a test decides: \
             the exact McNemar test on the prompts two models both answered, or the test of a ratio \
             of rates against 3x (with its 95% interval).\n\n| claim | verdict | evidence |\n| --- | --- | --- |\n",
        );
        for c in &comparisons.claims {
            s.push_str(&format!(
                "| ({}) {} | **{}** | {} |\n",
                c.id,
                c.statement,
                c.verdict.word(),
                c.evidence
            ));
        }
    }
    if let Some((target, methods)) = &comparisons.matched {
        s.push_str(&format!(
            "\n## At matched utility\n\nEach method's keyword ASR at the validation loss of the best \
             plain fine-tune ({target:.4}, the lowest of the θ rows), read off the method's Pareto \
             front of (validation loss, ASR) over its settings: linear between the two front points \
             around that loss, the interval interpolated likewise (a guide, not a test). A method \
             whose front does not reach that loss has no value: nothing is extrapolated. With few \
             settings the front is coarse.\n\n| method | settings on its front | their val losses | \
             keyword ASR % at val loss {target:.4} |\n| --- | --- | --- | --- |\n"
        ));
        for m in methods {
            let asr = m.asr.map_or("not reached".into(), |(r, lo, hi)| {
                format!("{:.1} [{:.1}, {:.1}]", 100.0 * r, 100.0 * lo, 100.0 * hi)
            });
            s.push_str(&format!(
                "| {} | {} | {:.4}–{:.4} | {asr} |\n",
                m.method, m.front, m.loss_range.0, m.loss_range.1
            ));
        }
    }
    if !comparisons.paired.is_empty() {
        s.push_str(&format!(
            "\n## θ against its EMA, prompt by prompt\n\nThe same runs' θ and EMA answered the same \
             `{harmful}` prompts; each pair of replies is judged by the keyword judge. Only the pairs \
             where the two differ tell them apart: p is the two-sided exact McNemar test of those \
             (pooled over seeds), the chance of a split at least this uneven if θ and its EMA were \
             equally safe.\n\n| dataset | lr | batch | steps | seeds | prompts | unsafe under θ only | \
             under the EMA only | under both | exact McNemar p |\n| --- | --- | --- | --- | --- | --- | \
             --- | --- | --- | --- |\n"
        ));
        for (i, p) in &comparisons.paired {
            let g = &groups[*i];
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                group_cells(g),
                g.rows.len(),
                p.pairs,
                p.a_only,
                p.b_only,
                p.both,
                format_p(p.p())
            ));
        }
    }
    if !comparisons.ema_vs_wise.is_empty() {
        s.push_str(&format!(
            "\n## The EMA against WiSE-FT, prompt by prompt\n\nEach run's EMA against the same run's \
             interpolation toward the start (θ_pre + α(θ − θ_pre)) whose validation loss is nearest \
             the EMA's: the two shrink toward the start, one along the trajectory, one along the \
             line. Same prompts of `{harmful}`, keyword judge, exact McNemar p as above.\n\n\
             | dataset | lr | batch | steps | EMA val loss | WiSE-FT α | its val loss | prompts | \
             unsafe under the EMA only | under WiSE-FT only | under both | exact McNemar p |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        ));
        for (e, w, p) in &comparisons.ema_vs_wise {
            let (e, w) = (&groups[*e], &groups[*w]);
            let alpha = match w.rows[0].weights {
                Weights::Wise(a) => a.to_string(),
                _ => "–".into(),
            };
            s.push_str(&format!(
                "| {} | {} | {alpha} | {} | {} | {} | {} | {} | {} |\n",
                group_cells(e),
                e.val_loss.map_or("–".into(), |v| format!("{v:.4}")),
                w.val_loss.map_or("–".into(), |v| format!("{v:.4}")),
                p.pairs,
                p.a_only,
                p.b_only,
                p.both,
                format_p(p.p())
            ));
        }
    }
    if !comparisons.compute.is_empty() {
        s.push_str(
            "\n## Compute\n\nWhat each method spent here (wall seconds on this machine). Picking the best \
             setting of a method by search costs every run of the grid and every model scored; the \
             EMA comes with its run (a blend per step, inside the training time); WiSE-FT adds no \
             training to its run, only an evaluation per α.\n\n| method | models scored | runs \
             trained for them | training s (each run once) | training s per run | generation s \
             (replies) |\n| --- | --- | --- | --- | --- | --- |\n",
        );
        let secs = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
        for c in &comparisons.compute {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                c.method,
                c.models,
                c.runs,
                secs(c.train_seconds),
                secs(c.train_seconds.map(|t| t / c.runs.max(1) as f64)),
                secs(c.generation_seconds)
            ));
        }
    }
    if !references.is_empty() {
        // The other harmful sets any reference was scored on: how far its refusals reach.
        let others: std::collections::BTreeSet<&String> = references
            .iter()
            .flat_map(|r| r.other_harmful.keys())
            .collect();
        let head: String = others
            .iter()
            .map(|o| format!(" keyword ASR % on {o} |"))
            .collect();
        let rule = " --- |".repeat(others.len());
        s.push_str(&format!("\nReference models (before fine-tuning):\n\n| model | keyword ASR % | strict ASR % | calibrated ASR % |{judge_head} over-refusal % (calibrated) | val loss |{head}\n| --- | --- | --- | --- |{judge_rule} --- | --- |{rule}\n"));
        for r in references {
            let cells: String = others
                .iter()
                .map(|o| format!(" {} |", pct(&r.other_harmful.get(*o).cloned())))
                .collect();
            let judge_cell = if judged {
                format!(" {} |", pct(&r.asr_judge))
            } else {
                String::new()
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} |{judge_cell} {} | {} |{cells}\n",
                r.run,
                pct(&r.asr_keyword),
                pct(&r.asr_strict),
                pct(&r.asr_calibrated),
                pct(&r.overrefusal),
                r.val_loss.map_or("–".into(), |v| format!("{v:.4}"))
            ));
        }
        if !others.is_empty() {
            s.push_str(&format!(
                "\nThe last columns: the keyword ASR on the other harmful sets the reference models \
                 were scored on (`[stage0] safety`), to show how far their refusals reach beyond \
                 `{harmful}`.\n"
            ));
        }
    }
    if !plots.is_empty() {
        s.push_str("\n## Plots\n\n");
        for p in plots {
            s.push_str(&format!("![{p}]({p}.svg) ({p}.png)\n\n"));
        }
    }
    s.push_str("\n## Provenance\n\nEach number comes from the file named here; the run directory holds its resolved config.toml and run.json (git commit, sha256 of the model and data).\n\n| model | weights | scores | git commit of the evaluation |\n| --- | --- | --- | --- |\n");
    for r in groups.iter().flat_map(|g| &g.rows).chain(references) {
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.run,
            r.weights.label(),
            r.source.display(),
            opt(r.commit.as_deref())
        ));
    }
    s
}

/// A point's mark: the 95% interval of `rate` (in %) and the row's setting, short.
fn mark(r: &Row, rate: &Option<Rate>) -> Mark {
    let mut label = r.lr.map_or(String::new(), |lr| format!("lr {lr:e}"));
    if let Some(b) = r.batch {
        label.push_str(&format!(" b{b}"));
    }
    if let Some(s) = r.steps {
        label.push_str(&format!(" s{s}"));
    }
    if let Weights::Wise(a) = r.weights {
        label.push_str(&format!(" α{a}"));
    }
    Mark {
        interval: rate.as_ref().map(|r| (100.0 * r.ci95.0, 100.0 * r.ci95.1)),
        label: label.trim().to_string(),
    }
}

/// A point (x, y) and its mark.
type Marked = ((f64, f64), Mark);

/// A series of marked points.
fn marked(name: String, points: Vec<Marked>, line: bool) -> Series {
    let (points, marks) = points.into_iter().unzip();
    Series {
        name,
        points,
        line,
        marks,
    }
}

/// The points no other point beats on both axes (lower is better on each), by x: the
/// Pareto front of (utility loss, ASR).
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in sorted {
        // Sorted by x, a point is on the front when it is lower than every point before it.
        if front.last().is_none_or(|last| p.1 < last.1) {
            front.push(p);
        }
    }
    front
}

/// The reference the points fine-tune: the one labelled "aligned", else the last.
pub fn start(references: &[Row]) -> Option<&Row> {
    references
        .iter()
        .find(|r| r.run == "aligned")
        .or(references.last())
}

/// What the report compares beyond the table: methods at matched utility, each θ against
/// its EMA and each EMA against WiSE-FT on the same prompts, the claims, the compute.
pub struct Comparisons {
    pub matched: Option<(f64, Vec<Matched>)>,
    pub paired: Vec<(usize, Paired)>,
    pub ema_vs_wise: Vec<(usize, usize, Paired)>,
    pub claims: Vec<Claim>,
    pub compute: Vec<Compute>,
}

impl Comparisons {
    /// `references`: the models before fine-tuning; the one labelled "aligned" (else the
    /// last) is the points' start. `landscapes`: landscape.json files, by path.
    pub fn of(
        groups: &[Group],
        references: &[Row],
        landscapes: &[(String, LandscapeDoc)],
        harmful: &str,
    ) -> Result<Self> {
        let aligned = start(references);
        let ema_vs_wise = ema_vs_wise(groups, harmful)?;
        Ok(Self {
            matched: matched_utility(groups),
            paired: paired(groups, harmful)?,
            claims: claims(groups, aligned, &ema_vs_wise, landscapes, harmful)?,
            ema_vs_wise,
            compute: compute(groups),
        })
    }
}

/// One method's keyword ASR at the target validation loss, read off its Pareto front.
#[derive(Clone, Debug, PartialEq)]
pub struct Matched {
    /// "θ" (plain fine-tuning), "EMA", "WiSE-FT" (every α of it on one front), each with
    /// " + safety data" for the runs that mixed refusals in.
    pub method: String,
    /// Its settings (pooled over seeds) on the front, and their validation losses' range.
    pub front: usize,
    pub loss_range: (f64, f64),
    /// ASR and its Wilson interval (fractions) interpolated linearly in the validation loss
    /// between the two front points around the target; None when the target lies outside.
    pub asr: Option<(f64, f64, f64)>,
}

/// Each method's ASR at the utility of the best plain fine-tune (the lowest validation
/// loss of a θ setting): the target loss, and a [`Matched`] per method with a loss.
pub fn matched_utility(groups: &[Group]) -> Option<(f64, Vec<Matched>)> {
    let mut by_method: BTreeMap<String, Vec<(f64, Rate)>> = BTreeMap::new();
    for g in groups {
        if let (Some(loss), Some(a)) = (g.val_loss, &g.asr_keyword) {
            by_method
                .entry(g.rows[0].method())
                .or_default()
                .push((loss, a.clone()));
        }
    }
    let target = by_method
        .get("θ")?
        .iter()
        .map(|p| p.0)
        .min_by(f64::total_cmp)?;
    let matched = by_method
        .into_iter()
        .map(|(method, points)| {
            let xy: Vec<(f64, f64)> = points.iter().map(|(l, r)| (*l, r.rate)).collect();
            let front = pareto_front(&xy);
            let rate_at = |p: (f64, f64)| {
                let r = &points
                    .iter()
                    .find(|(l, r)| (*l, r.rate) == p)
                    .expect("a point")
                    .1;
                (r.rate, r.ci95.0, r.ci95.1)
            };
            let asr = front.windows(2).find_map(|w| {
                let (a, b) = (w[0], w[1]);
                (a.0..=b.0).contains(&target).then(|| {
                    let f = if b.0 > a.0 {
                        (target - a.0) / (b.0 - a.0)
                    } else {
                        0.0
                    };
                    let (ra, rb) = (rate_at(a), rate_at(b));
                    let lerp = |x: f64, y: f64| x + f * (y - x);
                    (lerp(ra.0, rb.0), lerp(ra.1, rb.1), lerp(ra.2, rb.2))
                })
            });
            let asr = asr.or_else(|| {
                // A single point, or the target on the front's only point.
                front.iter().find(|p| p.0 == target).map(|&p| rate_at(p))
            });
            Matched {
                method,
                front: front.len(),
                loss_range: (front[0].0, front[front.len() - 1].0),
                asr,
            }
        })
        .collect();
    Some((target, matched))
}

/// The model the points start from ([`start`]) as a point labelled by its name (none
/// without a validation loss).
fn before(references: &[Row]) -> Option<Series> {
    let points: Vec<Marked> = start(references)
        .into_iter()
        .filter_map(|r| {
            let (loss, a) = (r.val_loss?, r.asr_keyword.as_ref()?);
            let mut m = mark(r, &r.asr_keyword);
            m.label = r.run.clone();
            Some(((loss, 100.0 * a.rate), m))
        })
        .collect();
    (!points.is_empty()).then(|| marked("the start (before fine-tuning)".into(), points, false))
}

/// The frontier: keyword ASR (%) against the validation loss of every evaluated model, a
/// point per run (seeds shown) for each method, the Pareto front over them all, and the
/// model before fine-tuning (not on the front: it is where every method starts).
fn frontier(groups: &[Group], references: &[Row], harmful: &str) -> Chart {
    let mut by_weights: BTreeMap<String, Vec<Marked>> = BTreeMap::new();
    for r in groups.iter().flat_map(|g| &g.rows) {
        if let (Some(loss), Some(a)) = (r.val_loss, &r.asr_keyword) {
            by_weights
                .entry(r.method())
                .or_default()
                .push(((loss, 100.0 * a.rate), mark(r, &r.asr_keyword)));
        }
    }
    let all: Vec<(f64, f64)> = by_weights.values().flatten().map(|p| p.0).collect();
    // The front first, so that each model's own point is drawn over it.
    let front = (!all.is_empty()).then(|| Series {
        name: "Pareto front".into(),
        points: pareto_front(&all),
        line: true,
        ..Default::default()
    });
    let series: Vec<Series> = front
        .into_iter()
        .chain(
            by_weights
                .into_iter()
                .map(|(w, points)| marked(format!("{w} (a point per run)"), points, false)),
        )
        .chain(before(references))
        .collect();
    Chart {
        stem: "frontier".into(),
        title: "Safety against utility: lower left is better".into(),
        x: "validation loss (lower is better)".into(),
        y: format!("keyword ASR on {harmful} (%)"),
        series,
        diagonal: false,
    }
}

/// The report's plots: keyword ASR (%) against the learning rate (a line per batch size and
/// weights), the steps, the distance from the start, the validation loss (the frontier,
/// and each run's trajectory, with the model they start from); and each run's EMA against
/// its θ.
pub fn charts(groups: &[Group], references: &[Row], harmful: &str) -> Vec<Chart> {
    type ByName = BTreeMap<String, Vec<Marked>>;
    let asr = |g: &Group| g.asr_keyword.as_ref().map(|r| 100.0 * r.rate);
    let (mut by_lr, mut by_steps, mut by_dist) = (ByName::new(), ByName::new(), ByName::new());
    for g in groups {
        let r = &g.rows[0];
        let Some(a) = asr(g) else { continue };
        let m = mark(r, &g.asr_keyword);
        // Groups that differ in a setting without a column stay on lines of their own.
        let weights = if g.other.is_empty() {
            r.weights.label()
        } else {
            format!("{} ({})", r.weights.label(), g.other)
        };
        if let Some(lr) = r.lr {
            by_lr
                .entry(format!("batch {} {weights}", r.batch.unwrap_or(0)))
                .or_default()
                .push(((lr.log10(), a), m.clone()));
        }
        if let Some(s) = r.steps {
            by_steps
                .entry(weights.clone())
                .or_default()
                .push(((s as f64, a), m.clone()));
        }
        if let Some(d) = g.distance {
            by_dist.entry(weights).or_default().push(((d, a), m));
        }
    }
    // EMA vs no EMA: the same runs' θ and θ̄.
    let mut pairs = Vec::new();
    for g in groups
        .iter()
        .filter(|g| g.rows[0].weights == Weights::Theta)
    {
        let r = &g.rows[0];
        let twin = ema_twin(groups, g);
        if let (Some(a), Some(b), Some(t)) = (asr(g), twin.and_then(asr), twin) {
            pairs.push(((a, b), mark(r, &t.asr_keyword)));
        }
    }
    let series = |m: ByName, line: bool| {
        m.into_iter()
            .map(|(name, points)| marked(name, points, line))
            .collect::<Vec<_>>()
    };
    let chart = |stem: &str, title: &str, x: &str, series: Vec<Series>| Chart {
        stem: stem.into(),
        title: title.into(),
        x: x.into(),
        y: format!("keyword ASR on {harmful} (%)"),
        series,
        diagonal: false,
    };
    vec![
        chart(
            "asr_vs_lr",
            "ASR vs learning rate",
            "log10 learning rate",
            series(by_lr, true),
        ),
        chart(
            "asr_vs_steps",
            "ASR vs optimizer steps",
            "steps",
            series(by_steps, false),
        ),
        Chart {
            y: "ASR with EMA (%)".into(),
            diagonal: true,
            ..chart(
                "ema_vs_no_ema",
                "The same runs with and without the EMA",
                "ASR without EMA (%)",
                vec![marked("run (bar: the EMA's interval)".into(), pairs, false)],
            )
        },
        chart(
            "asr_vs_distance",
            "ASR vs distance from the start",
            "||w - w0|| (w = θ or the EMA)",
            series(by_dist, false),
        ),
        frontier(groups, references, harmful),
        trajectories(groups, references, harmful),
    ]
}

/// Each run's θ and EMA along its training (its snapshots, then its end): a line per run
/// and weights through (validation loss, keyword ASR), in step order, beside the model
/// they start from. Empty without snapshots.
fn trajectories(groups: &[Group], references: &[Row], harmful: &str) -> Chart {
    let mut by_run: BTreeMap<(String, String), Vec<(u64, Marked)>> = BTreeMap::new();
    for r in groups.iter().flat_map(|g| &g.rows) {
        if let (Some(loss), Some(a), Some(step), false) = (
            r.val_loss,
            &r.asr_keyword,
            r.steps,
            matches!(r.weights, Weights::Wise(_)),
        ) {
            by_run
                .entry((r.run.clone(), r.weights.label()))
                .or_default()
                .push((step, ((loss, 100.0 * a.rate), mark(r, &r.asr_keyword))));
        }
    }
    let mut series: Vec<Series> = by_run
        .into_iter()
        .filter(|(_, points)| points.len() > 1)
        .map(|((run, w), mut points)| {
            points.sort_by_key(|p| p.0);
            marked(
                format!("{run} {w}"),
                points.into_iter().map(|p| p.1).collect(),
                true,
            )
        })
        .collect();
    if !series.is_empty() {
        series.extend(before(references));
    }
    Chart {
        stem: "trajectories".into(),
        title: "Each run along its training: lower left is better".into(),
        x: "validation loss (lower is better)".into(),
        y: format!("keyword ASR on {harmful} (%)"),
        series,
        diagonal: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of setting `lr` with `k` of 100 attack successes at validation loss `loss`.
    fn row(weights: Weights, lr: &str, loss: f64, k: usize) -> Row {
        Row {
            run: format!("run-{lr}"),
            weights,
            safety_data: false,
            train_seconds: None,
            generation_seconds: None,
            dataset: "dolly".into(),
            lr: lr.parse().ok(),
            batch: None,
            steps: None,
            seed: None,
            ema_beta: None,
            setting: [("lr".to_string(), lr.to_string())].into(),
            asr_keyword: Some(Rate::new(k, 100)),
            asr_strict: None,
            asr_calibrated: None,
            asr_judge: None,
            judge: None,
            overrefusal: None,
            val_loss: Some(loss),
            distance: None,
            commit: None,
            source: PathBuf::new(),
            other_harmful: BTreeMap::new(),
        }
    }

    #[test]
    fn a_points_mark_is_its_rates_interval_in_percent_and_its_setting() {
        let mut r = row(Weights::Theta, "1e-4", 2.0, 90);
        (r.batch, r.steps) = (Some(4), Some(12));
        let m = mark(&r, &r.asr_keyword);
        let ci = Rate::new(90, 100).ci95;
        assert_eq!(m.interval, Some((100.0 * ci.0, 100.0 * ci.1)));
        assert_eq!(m.label, "lr 1e-4 b4 s12");
        // A reference has no setting: no label.
        let r = Row {
            lr: None,
            ..row(Weights::Theta, "x", 2.0, 90)
        };
        assert_eq!(mark(&r, &None).label, "");
        assert_eq!(mark(&r, &None).interval, None);
    }

    #[test]
    fn matched_utility_reads_each_methods_front_at_the_best_plain_fine_tunes_loss() {
        let groups = group(&[
            row(Weights::Theta, "1e-4", 2.0, 90),
            row(Weights::Theta, "1e-5", 2.4, 10),
            // On θ's front too: a higher loss, but a lower ASR.
            row(Weights::Theta, "3e-5", 2.2, 50),
            row(Weights::Ema, "1e-4", 1.8, 60),
            row(Weights::Ema, "1e-5", 2.3, 10),
            // Beaten by (2.3, 10%) on both axes: not on the EMA's front.
            row(Weights::Ema, "3e-5", 2.35, 20),
        ]);
        let (target, m) = matched_utility(&groups).unwrap();
        assert_eq!(target, 2.0);
        let ema = m.iter().find(|m| m.method == "EMA").unwrap();
        assert_eq!((ema.front, ema.loss_range), (2, (1.8, 2.3)));
        // 60% at 1.8, 10% at 2.3: at 2.0, 60 - 0.4 · 50 = 40%.
        let (r, lo, hi) = ema.asr.unwrap();
        assert!((r - 0.40).abs() < 1e-12, "{r}");
        let (a, b) = (Rate::new(60, 100).ci95, Rate::new(10, 100).ci95);
        assert!((lo - (a.0 + 0.4 * (b.0 - a.0))).abs() < 1e-12);
        assert!((hi - (a.1 + 0.4 * (b.1 - a.1))).abs() < 1e-12);
        let theta = m.iter().find(|m| m.method == "θ").unwrap();
        assert_eq!(theta.front, 3);
        assert!((theta.asr.unwrap().0 - 0.90).abs() < 1e-12);
        // A target outside a method's front gives no value.
        let groups = group(&[
            row(Weights::Theta, "1e-4", 2.0, 90),
            row(Weights::Ema, "1e-4", 2.1, 60),
        ]);
        let (_, m) = matched_utility(&groups).unwrap();
        assert_eq!(m.iter().find(|m| m.method == "EMA").unwrap().asr, None);
    }

    #[test]
    fn the_pareto_front_keeps_the_points_nothing_beats_on_both_axes() {
        // (loss, ASR): (2.0, 50) is beaten by (1.9, 40); (2.2, 40) by (1.9, 40) too.
        let pts = [
            (2.3, 5.0),
            (2.0, 50.0),
            (1.9, 40.0),
            (2.2, 40.0),
            (2.5, 5.0),
            (2.1, 10.0),
        ];
        assert_eq!(pareto_front(&pts), [(1.9, 40.0), (2.1, 10.0), (2.3, 5.0)]);
        assert!(pareto_front(&[]).is_empty());
    }
}
