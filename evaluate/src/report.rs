//! `evaluate report`: the paper's table and plots over a set of runs.
//!
//! Each run directory (train's `runs/<name>/`) gives up to two rows: its trained weights θ
//! (`eval/model/`) and its EMA θ̄ (`eval/ema/`), each with the settings of its
//! `config.toml`, the safety scores of `evaluate safety` (scores.json), the validation loss
//! of `evaluate utility` (utility.json) and the distance from the start (metrics.jsonl).
//! Rows whose resolved configs differ only in the seed (and in what changes neither weights
//! nor scores: [`NOT_A_SETTING`]) are pooled: the rates add their counts (one Wilson
//! interval over all replies) and the spread over seeds is reported beside them. Settings
//! that differ between the table's rows but have no column of their own are shown in one.

use crate::plots::{Chart, Mark, Series};
use crate::safety::{mcnemar_exact, Rate};
use anyhow::{bail, Result};
use basin_lm::artifacts::{self, Generation, MetricsRecord, Scores, SetKind, TrainConfig, Utility};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One evaluated model.
#[derive(Clone, Debug)]
pub struct Row {
    /// The run directory's name, or the reference's label.
    pub run: String,
    /// "θ" (the trained weights) or "EMA".
    pub weights: &'static str,
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
    pub asr_calibrated: Option<Rate>,
    pub overrefusal: Option<Rate>,
    pub val_loss: Option<f64>,
    /// ‖θ−θ₀‖ for θ, ‖θ̄−θ₀‖ for the EMA.
    pub distance: Option<f64>,
    pub commit: Option<String>,
    /// Where the numbers come from (the scores file).
    pub source: PathBuf,
    /// Keyword ASR on every other harmful set the scores file holds.
    pub other_harmful: BTreeMap<String, Rate>,
}

/// What one eval directory says.
struct EvalScores {
    keyword: Option<Rate>,
    calibrated: Option<Rate>,
    overrefusal: Option<Rate>,
    val_loss: Option<f64>,
    commit: Option<String>,
    other_harmful: BTreeMap<String, Rate>,
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
    Ok(EvalScores {
        keyword: Some(h.keyword.clone()),
        calibrated: Some(h.refusal.clone()),
        overrefusal,
        val_loss,
        commit: Some(s.git_commit),
        other_harmful,
    })
}

/// Config keys that do not make a setting: the seed (pooled over), and what changes neither
/// the weights nor the scores (names, where outputs go, how often to log or checkpoint).
pub const NOT_A_SETTING: [&str; 6] = [
    "seed",
    "name",
    "out_dir",
    "eval_every",
    "val_batches",
    "checkpoint_every",
];

/// Config keys with a column of their own in the table.
const SHOWN: [&str; 3] = ["lr", "batch_size", "steps"];

/// The rows of a run directory (θ and, when evaluated, the EMA).
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
    let last = MetricsRecord::last_step(&records);
    let mut setting = basin_lm::config::flatten(&config)?;
    setting.retain(|k, _| !NOT_A_SETTING.contains(&k.as_str()));
    let mut rows = Vec::new();
    for (which, weights) in [("model", "θ"), ("ema", "EMA")] {
        let dir = run.join("eval").join(which);
        if !Scores::path(&dir).exists() {
            continue;
        }
        let sc = scores(&dir, harmful)?;
        rows.push(Row {
            run: name.clone(),
            weights,
            dataset: dataset.clone(),
            lr: Some(config.lr),
            batch: Some(config.batch_size as u64),
            steps: last.map(|l| l.step as u64),
            seed: Some(config.seed),
            ema_beta: config.ema.enabled.then_some(config.ema.beta),
            setting: setting.clone(),
            asr_keyword: sc.keyword,
            asr_calibrated: sc.calibrated,
            overrefusal: sc.overrefusal,
            val_loss: sc.val_loss,
            distance: last.and_then(|l| {
                if which == "model" {
                    l.dist_theta
                } else {
                    l.dist_ema
                }
            }),
            commit: sc.commit,
            other_harmful: sc.other_harmful,
            source: Scores::path(&dir),
        });
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
        weights: "θ",
        dataset: String::new(),
        lr: None,
        batch: None,
        steps: None,
        seed: None,
        ema_beta: None,
        setting: BTreeMap::new(),
        asr_keyword: sc.keyword,
        asr_calibrated: sc.calibrated,
        overrefusal: sc.overrefusal,
        val_loss: sc.val_loss,
        distance: None,
        commit: sc.commit,
        other_harmful: sc.other_harmful,
        source: Scores::path(dir),
    })
}

/// Rows that differ only in the seed, pooled.
#[derive(Clone, Debug)]
pub struct Group {
    pub rows: Vec<Row>,
    pub asr_keyword: Option<Rate>,
    pub asr_calibrated: Option<Rate>,
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
/// (a run's θ, then its EMA).
pub fn group(rows: &[Row]) -> Vec<Group> {
    type Key<'a> = (
        &'a BTreeMap<String, String>,
        Option<u64>,
        bool,
        &'static str,
    );
    let mut groups: BTreeMap<Key, Vec<Row>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((&r.setting, r.steps, r.weights != "θ", r.weights))
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
                .filter_map(|k| rows[0].setting.get(k).map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(", ");
            Group {
                asr_keyword: pool(rows.iter().map(|r| r.asr_keyword.clone())),
                asr_calibrated: pool(rows.iter().map(|r| r.asr_calibrated.clone())),
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

/// θ against its EMA on the same harmful prompts, by the keyword judge: how many prompts
/// both answered, and how many were attack successes under θ only, the EMA only, both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Paired {
    pub pairs: usize,
    pub theta_only: usize,
    pub ema_only: usize,
    pub both: usize,
}

impl Paired {
    /// The two-sided exact McNemar p of the discordant pairs.
    pub fn p(&self) -> f64 {
        mcnemar_exact(self.theta_only, self.ema_only)
    }

    fn add(&mut self, o: &Paired) {
        self.pairs += o.pairs;
        self.theta_only += o.theta_only;
        self.ema_only += o.ema_only;
        self.both += o.both;
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

/// The paired verdicts of each θ group and its EMA twin (the same runs' eval/model and
/// eval/ema), pooled over the group's runs; (index of the θ group, counts) for each group
/// whose runs have both replies on file.
pub fn paired(groups: &[Group], harmful: &str) -> Result<Vec<(usize, Paired)>> {
    let mut out = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        if g.rows[0].weights != "θ" {
            continue;
        }
        let mut total = Paired::default();
        for r in &g.rows {
            let Some(eval) = r.source.parent() else {
                continue;
            };
            let ema = eval.with_file_name("ema");
            if !eval.join("generations.jsonl").exists() || !ema.join("generations.jsonl").exists() {
                continue;
            }
            let (theta, ema) = (
                attack_successes(eval, harmful)?,
                attack_successes(&ema, harmful)?,
            );
            for (id, &t) in &theta {
                let Some(&e) = ema.get(id) else { continue };
                total.add(&Paired {
                    pairs: 1,
                    theta_only: usize::from(t && !e),
                    ema_only: usize::from(e && !t),
                    both: usize::from(t && e),
                });
            }
        }
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

/// A p-value to two significant digits (down to 1e-4, then "< 1e-4").
fn format_p(p: f64) -> String {
    if p < 1e-4 {
        "< 1e-4".into()
    } else if p >= 0.1 {
        format!("{p:.2}")
    } else {
        format!("{p:.1e}")
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
         over-refusal: refusals of XSTest's safe prompts. Rates in %, with a 95% Wilson interval over \
         all replies of all seeds (± the spread over seeds when there are several). \
         `θ` is the fine-tuned model, `EMA` the average of its weights anchored at the start.\n\n"
    ));
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
    s.push_str(&format!("| dataset | lr | batch | steps | weights |{other_head} seeds | keyword ASR % | calibrated ASR % | over-refusal % (calibrated) | val loss | ‖Δ‖ from start |\n"));
    s.push_str(&format!(
        "| --- | --- | --- | --- | --- |{other_rule} --- | --- | --- | --- | --- | --- |\n"
    ));
    for g in groups {
        let r = &g.rows[0];
        let weights = match r.ema_beta {
            Some(b) if r.weights == "EMA" => format!("EMA β={b}"),
            _ => r.weights.to_string(),
        };
        let sd = g
            .asr_sd
            .map_or(String::new(), |sd| format!(" ±{:.1}", 100.0 * sd));
        let other_cell = if other {
            format!(" {} |", g.other)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "| {} | {} |{other_cell} {} | {}{} | {} | {} | {} | {} |\n",
            setting_cells(r),
            weights,
            g.rows.len(),
            pct(&g.asr_keyword),
            sd,
            pct(&g.asr_calibrated),
            pct(&g.overrefusal),
            g.val_loss.map_or("–".into(), |v| format!("{v:.4}")),
            g.distance.map_or("–".into(), |v| format!("{v:.3}")),
        ));
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
            let r = &g.rows[0];
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                setting_cells(r),
                g.rows.len(),
                p.pairs,
                p.theta_only,
                p.ema_only,
                p.both,
                format_p(p.p())
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
        s.push_str(&format!("\nReference models (before fine-tuning):\n\n| model | keyword ASR % | calibrated ASR % | over-refusal % (calibrated) | val loss |{head}\n| --- | --- | --- | --- | --- |{rule}\n"));
        for r in references {
            let cells: String = others
                .iter()
                .map(|o| format!(" {} |", pct(&r.other_harmful.get(*o).cloned())))
                .collect();
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |{cells}\n",
                r.run,
                pct(&r.asr_keyword),
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
            r.weights,
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

/// What the report compares beyond the table: methods at matched utility, and each θ
/// against its EMA on the same prompts.
pub struct Comparisons {
    pub matched: Option<(f64, Vec<Matched>)>,
    pub paired: Vec<(usize, Paired)>,
}

impl Comparisons {
    pub fn of(groups: &[Group], harmful: &str) -> Result<Self> {
        Ok(Self {
            matched: matched_utility(groups),
            paired: paired(groups, harmful)?,
        })
    }
}

/// One method's keyword ASR at the target validation loss, read off its Pareto front.
#[derive(Clone, Debug, PartialEq)]
pub struct Matched {
    /// "θ" (plain fine-tuning) or "EMA".
    pub method: &'static str,
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
    let mut by_method: BTreeMap<&'static str, Vec<(f64, Rate)>> = BTreeMap::new();
    for g in groups {
        if let (Some(loss), Some(a)) = (g.val_loss, &g.asr_keyword) {
            by_method
                .entry(g.rows[0].weights)
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

/// The frontier: keyword ASR (%) against the validation loss of every evaluated model, a
/// point per run (seeds shown) for θ and for the EMA, and the Pareto front over them all.
fn frontier(groups: &[Group], harmful: &str) -> Chart {
    let mut by_weights: BTreeMap<&str, Vec<Marked>> = BTreeMap::new();
    for r in groups.iter().flat_map(|g| &g.rows) {
        if let (Some(loss), Some(a)) = (r.val_loss, &r.asr_keyword) {
            by_weights
                .entry(r.weights)
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
/// weights), the steps, the distance from the start, the validation loss (the frontier);
/// and each run's EMA against its θ.
pub fn charts(groups: &[Group], harmful: &str) -> Vec<Chart> {
    type ByName = BTreeMap<String, Vec<Marked>>;
    let asr = |g: &Group| g.asr_keyword.as_ref().map(|r| 100.0 * r.rate);
    let (mut by_lr, mut by_steps, mut by_dist) = (ByName::new(), ByName::new(), ByName::new());
    for g in groups {
        let r = &g.rows[0];
        let Some(a) = asr(g) else { continue };
        let m = mark(r, &g.asr_keyword);
        // Groups that differ in a setting without a column stay on lines of their own.
        let weights = if g.other.is_empty() {
            r.weights.to_string()
        } else {
            format!("{} ({})", r.weights, g.other)
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
    for g in groups.iter().filter(|g| g.rows[0].weights == "θ") {
        let r = &g.rows[0];
        let twin = groups.iter().find(|e| {
            let x = &e.rows[0];
            x.weights == "EMA" && x.setting == r.setting && x.steps == r.steps
        });
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
        frontier(groups, harmful),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of setting `lr` with `k` of 100 attack successes at validation loss `loss`.
    fn row(weights: &'static str, lr: &str, loss: f64, k: usize) -> Row {
        Row {
            run: format!("run-{lr}"),
            weights,
            dataset: "dolly".into(),
            lr: lr.parse().ok(),
            batch: None,
            steps: None,
            seed: None,
            ema_beta: None,
            setting: [("lr".to_string(), lr.to_string())].into(),
            asr_keyword: Some(Rate::new(k, 100)),
            asr_calibrated: None,
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
        let mut r = row("θ", "1e-4", 2.0, 90);
        (r.batch, r.steps) = (Some(4), Some(12));
        let m = mark(&r, &r.asr_keyword);
        let ci = Rate::new(90, 100).ci95;
        assert_eq!(m.interval, Some((100.0 * ci.0, 100.0 * ci.1)));
        assert_eq!(m.label, "lr 1e-4 b4 s12");
        // A reference has no setting: no label.
        let r = Row {
            lr: None,
            ..row("θ", "x", 2.0, 90)
        };
        assert_eq!(mark(&r, &None).label, "");
        assert_eq!(mark(&r, &None).interval, None);
    }

    #[test]
    fn matched_utility_reads_each_methods_front_at_the_best_plain_fine_tunes_loss() {
        let groups = group(&[
            row("θ", "1e-4", 2.0, 90),
            row("θ", "1e-5", 2.4, 10),
            // On θ's front too: a higher loss, but a lower ASR.
            row("θ", "3e-5", 2.2, 50),
            row("EMA", "1e-4", 1.8, 60),
            row("EMA", "1e-5", 2.3, 10),
            // Beaten by (2.3, 10%) on both axes: not on the EMA's front.
            row("EMA", "3e-5", 2.35, 20),
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
        let groups = group(&[row("θ", "1e-4", 2.0, 90), row("EMA", "1e-4", 2.1, 60)]);
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
