//! Running a sweep as an experiment: stage 0 (the original model evaluated, the aligned
//! model trained and evaluated), every grid point (trained, then evaluated), the report.
//! `just align`, `just all`, `just paper` and the Slurm array tasks all come through here.
//!
//! Every piece of work is a [`Step`]: a stage binary with its arguments and the files it
//! owes. **One skip-if-done rule**: a step is done when every file it owes exists and no
//! checkpoint of its run is left to resume ([`Step::done`]). A point whose training runs
//! again has its evaluations run again too (the old scores belong to other weights).

use crate::config::TrainConfig;
use crate::sweep::{shell_quote, slurm_script, EvaluateConfig, SweepConfig};
use anyhow::{bail, Context, Result};
use basin_lm::artifacts::Interpolation;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// The `sweep` command's arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The sweep (configs/all.toml, configs/paper.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// An override for every point's train config (repeatable), e.g. --set lr=1e-5.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Your own aligned model (a .gguf or Hugging Face directory): stage 0 is skipped and
    /// every point fine-tunes this model (default: $ALIGNED_MODEL when set and not empty).
    #[arg(long)]
    pub aligned_model: Option<PathBuf>,
    /// Print the steps (and whether each is done) and stop.
    #[arg(long)]
    pub list: bool,
    /// Print each training's memory plan (`train --plan`) and stop.
    #[arg(long, conflicts_with = "list")]
    pub plan: bool,
    /// With --plan: plan for a GPU of this many GiB, not the one here.
    #[arg(long, requires = "plan")]
    pub memory_gib: Option<f64>,
    /// Run stage 0 only (`just align`).
    #[arg(long, conflicts_with_all = ["index", "report_only"])]
    pub stage0: bool,
    /// Run only grid point I (0-based; what a Slurm array task runs). Stage 0 must be done.
    #[arg(long)]
    pub index: Option<usize>,
    /// Write a Slurm job-array script for the grid points to this file and stop.
    #[arg(long)]
    pub slurm: Option<PathBuf>,
    /// Only write the report from the runs already done.
    #[arg(long)]
    pub report_only: bool,
    /// Train again (from the start) the runs whose directory holds another config than the
    /// sweep resolves now; without it such a run stops the sweep before anything runs.
    #[arg(long)]
    pub force: bool,
}

/// A stage binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Train,
    Evaluate,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Evaluate => "evaluate",
        }
    }
}

/// One piece of work: a stage binary, its arguments, and what it owes.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub what: String,
    pub stage: Stage,
    pub args: Vec<String>,
    /// Every file the step writes that later steps or the report read.
    pub owes: Vec<PathBuf>,
    /// A training run's checkpoint: while it exists the run is unfinished (and resumes).
    pub checkpoint: Option<PathBuf>,
    /// A training run's resolved config, which its directory's config.toml must equal for
    /// anything there to count as done.
    pub config: Option<Box<TrainConfig>>,
}

/// The arguments an `evaluate` step ran with, which the sweep keeps beside its first output
/// once it has run (`<output's stem>.args.json`, e.g. eval/model/scores.args.json): the
/// outputs count as done only while the sweep would run the step with the same arguments,
/// so a changed `[evaluate]` (another --limit, set, judge or decoder) evaluates again
/// instead of reporting scores made another way.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatedWith {
    pub args: Vec<String>,
}

impl Step {
    /// The one skip-if-done rule: every output exists, no checkpoint is left to resume, and
    /// an evaluation was made with the arguments it would run with now ([`EvaluatedWith`]:
    /// outputs without that record are evaluated again).
    pub fn done(&self) -> bool {
        self.owes.iter().all(|p| p.exists())
            && !self.checkpoint.as_ref().is_some_and(|c| c.exists())
            && self.record().is_none_or(|r| {
                basin_lm::artifacts::read::<EvaluatedWith>(&r).is_ok_and(|w| w.args == self.args)
            })
    }

    /// Where an evaluation's [`EvaluatedWith`] is kept (None for a training run, whose
    /// config.toml says how it was made).
    pub fn record(&self) -> Option<PathBuf> {
        let first = self
            .owes
            .first()
            .filter(|_| self.stage == Stage::Evaluate)?;
        let stem = first.file_stem()?.to_string_lossy();
        Some(first.with_file_name(format!("{stem}.args.json")))
    }

    /// Keeps the arguments a step that has just run was made with (an evaluation's).
    fn recorded(&self) -> Result<()> {
        match self.record() {
            Some(r) => basin_lm::artifacts::write(
                &r,
                &EvaluatedWith {
                    args: self.args.clone(),
                },
            ),
            None => Ok(()),
        }
    }

    /// The arguments to run it with: a training run with a checkpoint resumes.
    fn run_args(&self) -> Vec<String> {
        let mut a = self.args.clone();
        if self.checkpoint.as_ref().is_some_and(|c| c.exists()) {
            a.push("--resume".into());
        }
        a
    }

    /// How the run directory's config.toml differs from the config this step trains with
    /// (empty when it matches, or when there is no run there yet).
    pub fn changed(&self) -> Vec<String> {
        let Some(want) = &self.config else {
            return Vec::new();
        };
        let dir = want.run_dir();
        if !dir.join("config.toml").exists() {
            return Vec::new();
        }
        match TrainConfig::read_run(&dir) {
            Ok(have) => basin_lm::config::differences(&have, want.as_ref())
                .unwrap_or_else(|e| vec![format!("cannot compare the configs: {e:#}")]),
            Err(e) => vec![format!("{e:#}")],
        }
    }
}

/// A unit of the experiment: an optional training run, then its evaluations.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub name: String,
    pub train: Option<Step>,
    pub evaluate: Vec<Step>,
}

impl Job {
    pub fn done(&self) -> bool {
        self.changed().is_empty() && self.train.iter().chain(&self.evaluate).all(Step::done)
    }

    /// How its run directory's config differs from the one the sweep resolves now.
    pub fn changed(&self) -> Vec<String> {
        self.train.as_ref().map_or(Vec::new(), Step::changed)
    }
}

/// The whole experiment, resolved and checked before anything runs.
pub struct Plan {
    pub sweep: SweepConfig,
    /// Stage 0 (absent without a `[stage0]` table, or with your own aligned model).
    pub stage0: Vec<Job>,
    /// The grid points, in the sweep's order.
    pub points: Vec<Job>,
    /// Each point's run directory.
    pub dirs: Vec<PathBuf>,
    /// The overrides every point gets on top of the sweep's own (`--set`, and the aligned
    /// model's `model=` when one is given).
    pub overrides: Vec<String>,
}

/// The evaluation steps of a model: `evaluate safety` (and `utility` when the sweep has
/// arguments for it). A run directory owes scores for each of its weights (model/, and
/// ema/ when it trains an EMA); a single model owes them in `out`.
fn evaluations(e: &EvaluateConfig, name: &str, target: Target) -> Vec<Step> {
    let kinds = [
        ("safety", &e.safety, "scores.json"),
        ("utility", &e.utility, "utility.json"),
    ];
    kinds
        .into_iter()
        .filter(|(what, args, _)| *what == "safety" || !args.is_empty())
        .map(|(what, args, file)| {
            let (model, out, dirs) = match &target {
                Target::Run { dir, ema } => {
                    let mut dirs = vec![dir.join("eval").join("model")];
                    if *ema {
                        dirs.push(dir.join("eval").join("ema"));
                    }
                    (dir.clone(), None, dirs)
                }
                Target::Model { path, out } => (path.clone(), Some(out.clone()), vec![out.clone()]),
            };
            let mut a = vec![
                what.to_string(),
                "--model".into(),
                model.display().to_string(),
            ];
            if let Some(out) = out {
                a.extend(["--out".into(), out.display().to_string()]);
            }
            a.extend(args.iter().cloned());
            Step {
                what: format!("{name}: evaluate {what}"),
                stage: Stage::Evaluate,
                args: a,
                owes: dirs.iter().map(|d| d.join(file)).collect(),
                checkpoint: None,
                config: None,
            }
        })
        .collect()
}

enum Target {
    /// A run directory of train: its model/ (and ema/).
    Run { dir: PathBuf, ema: bool },
    /// One model, its results in `out`.
    Model { path: PathBuf, out: PathBuf },
}

/// A training run's step, from its resolved config.
fn training(name: &str, config: &TrainConfig, args: Vec<String>) -> (Step, PathBuf) {
    let dir = config.run_dir();
    let mut owes = Vec::new();
    let snapshots = config.snapshots.iter();
    for d in
        std::iter::once(dir.clone()).chain(snapshots.map(|&s| TrainConfig::snapshot_dir(&dir, s)))
    {
        owes.push(d.join("model").join("model.safetensors"));
        if config.ema.enabled {
            owes.push(d.join("ema").join("model.safetensors"));
        }
    }
    let step = Step {
        what: format!("{name}: train"),
        stage: Stage::Train,
        args,
        owes,
        checkpoint: Some(dir.join("checkpoint")),
        config: Some(Box::new(config.clone())),
    };
    (step, dir)
}

/// `evaluate interpolate`: the run's θ toward its start at each α (WiSE-FT).
fn interpolation(name: &str, dir: &Path, alphas: &[f64]) -> Step {
    let list: Vec<String> = alphas.iter().map(f64::to_string).collect();
    Step {
        what: format!("{name}: interpolate (WiSE-FT)"),
        stage: Stage::Evaluate,
        args: vec![
            "interpolate".into(),
            "--run".into(),
            dir.display().to_string(),
            "--alpha".into(),
            list.join(","),
        ],
        owes: alphas
            .iter()
            .map(|&a| Interpolation::path(&Interpolation::dir(dir, a)))
            .collect(),
        checkpoint: None,
        config: None,
    }
}

impl Plan {
    pub fn new(config_path: &Path, overrides: &[String], aligned: Option<&Path>) -> Result<Self> {
        let sweep = SweepConfig::load(config_path)?;
        let mut overrides = overrides.to_vec();
        if let Some(m) = aligned {
            if !m.exists() {
                bail!(
                    "ALIGNED_MODEL / --aligned-model {}: no such file or directory",
                    m.display()
                );
            }
            overrides.push(format!("model={}", m.display()));
        }
        let mut stage0 = Vec::new();
        match (&sweep.stage0, aligned) {
            (Some(_), Some(m)) => {
                eprintln!("aligned model {}: stage 0 skipped", m.display());
            }
            (Some(s), None) => {
                let e = EvaluateConfig {
                    safety: s.safety.clone().unwrap_or(sweep.evaluate.safety.clone()),
                    ..sweep.evaluate.clone()
                };
                if let Some(base) = &s.base_model {
                    let out = s
                        .base_eval
                        .clone()
                        .unwrap_or_else(|| "runs/base/eval/model".into());
                    stage0.push(Job {
                        name: "original".into(),
                        train: None,
                        evaluate: evaluations(
                            &e,
                            "original",
                            Target::Model {
                                path: base.clone(),
                                out,
                            },
                        ),
                    });
                }
                let c: TrainConfig = basin_lm::config::load(Some(&s.train_config), &[])
                    .with_context(|| format!("{}: [stage0]", config_path.display()))?;
                c.validate()
                    .with_context(|| format!("stage 0 ({})", s.train_config.display()))?;
                let args = vec!["--config".into(), s.train_config.display().to_string()];
                let (train, dir) = training("stage 0", &c, args);
                let ema = c.ema.enabled;
                stage0.push(Job {
                    name: "stage 0".into(),
                    train: Some(train),
                    evaluate: evaluations(&e, "stage 0", Target::Run { dir, ema }),
                });
            }
            (None, _) => {}
        }
        let mut points = Vec::new();
        let mut dirs = Vec::new();
        for job in sweep.jobs()? {
            let sets: Vec<String> = sweep
                .set
                .iter()
                .chain(&overrides)
                .chain(&job.set)
                .cloned()
                .chain([format!("name={}", job.run)])
                .collect();
            let c: TrainConfig = basin_lm::config::load(Some(&sweep.train_config), &sets)
                .with_context(|| format!("{}: point {}", config_path.display(), job.run))?;
            c.validate().with_context(|| format!("point {}", job.run))?;
            let (train, dir) = training(&job.run, &c, sweep.train_args(&job, &overrides));
            let ema = c.ema.enabled;
            // The end, then each snapshot of its trajectory, then the interpolations.
            let mut evaluate = evaluations(
                &sweep.evaluate,
                &job.run,
                Target::Run {
                    dir: dir.clone(),
                    ema,
                },
            );
            for &step in &c.snapshots {
                let dir = TrainConfig::snapshot_dir(&dir, step);
                let name = format!("{} step {step}", job.run);
                evaluate.extend(evaluations(
                    &sweep.evaluate,
                    &name,
                    Target::Run { dir, ema },
                ));
            }
            let alphas = &sweep.baselines.wise_ft;
            if !alphas.is_empty() {
                evaluate.push(interpolation(&job.run, &dir, alphas));
                for &alpha in alphas {
                    let target = Target::Model {
                        path: Interpolation::dir(&dir, alpha),
                        out: Interpolation::eval_dir(&dir, alpha),
                    };
                    let name = format!("{} WiSE-FT α={alpha}", job.run);
                    evaluate.extend(evaluations(&sweep.evaluate, &name, target));
                }
            }
            points.push(Job {
                name: job.run.clone(),
                train: Some(train),
                evaluate,
            });
            dirs.push(dir);
        }
        Ok(Self {
            sweep,
            stage0,
            points,
            dirs,
            overrides,
        })
    }

    /// One line per data file the points fine-tune on: its set, how many records it was
    /// prepared from, and whether that is the whole public set or the data mirror's sample
    /// (from prepare's manifest).
    pub fn data_lines(&self) -> Vec<String> {
        let mut files: Vec<&PathBuf> = self
            .points
            .iter()
            .filter_map(|j| j.train.as_ref()?.config.as_deref())
            .flat_map(|c| &c.data)
            .collect();
        files.sort();
        files.dedup();
        files
            .into_iter()
            .map(|f| {
                let set = f
                    .file_stem()
                    .map_or(String::new(), |s| s.to_string_lossy().into());
                let dir = f.parent().unwrap_or(Path::new("."));
                match basin_lm::artifacts::Manifest::entry_of(f).ok().flatten() {
                    None => format!(
                        "data {}: not prepared yet (no entry in {})",
                        f.display(),
                        basin_lm::artifacts::Manifest::path(dir).display()
                    ),
                    Some(e) => format!(
                        "data {set}: {} records of {} ({}) -> {} training rows",
                        e.stats.records_read,
                        e.input.file,
                        if e.sample {
                            "a SAMPLE of the public set, from the data mirror"
                        } else {
                            "the whole file"
                        },
                        e.stats.rows_train
                    ),
                }
            })
            .collect()
    }

    /// The report's command line over the points evaluated so far; the points not in it
    /// are named in its note, with the error of those that `failed` in this sweep.
    pub fn report_args(&self, failed: &[(String, String)]) -> Result<Vec<String>> {
        let mut args = vec!["report".to_string()];
        let mut missing = Vec::new();
        for (d, job) in self.dirs.iter().zip(&self.points) {
            // Done: every file it owes (θ's scores among them) exists for this config.
            if job.done() {
                args.push(d.display().to_string());
            } else {
                let why = failed.iter().find(|(n, _)| *n == job.name).map_or(
                    "not trained and evaluated yet with these settings".to_string(),
                    |(_, e)| format!("failed: {}", e.lines().next().unwrap_or(e)),
                );
                missing.push(format!("- **{}** is missing: {why}", job.name));
            }
        }
        if args.len() == 1 {
            bail!("no evaluated runs of sweep '{}' yet", self.sweep.name);
        }
        let r = &self.sweep.report;
        for reference in &r.references {
            // A reference that was not evaluated (e.g. stage 0 skipped for your own model) is left out.
            let dir = reference
                .split_once('=')
                .map_or(reference.as_str(), |(_, d)| d);
            if Path::new(dir).join("scores.json").exists() {
                args.extend(["--reference".into(), reference.clone()]);
            } else {
                eprintln!("report: reference {reference} has no scores.json; left out");
            }
        }
        if let Some(h) = &r.harmful {
            args.extend(["--harmful".into(), h.clone()]);
        }
        for l in &r.landscapes {
            if l.exists() {
                args.extend(["--landscape".into(), l.display().to_string()]);
            } else {
                eprintln!(
                    "report: landscape {} does not exist yet; left out",
                    l.display()
                );
            }
        }
        let title = if r.title.is_empty() {
            format!("basin sweep {}", self.sweep.name)
        } else {
            r.title.clone()
        };
        args.extend([
            "--out".into(),
            format!("reports/{}", self.sweep.name),
            "--title".into(),
            title,
        ]);
        let mut note = r.note.clone();
        if !missing.is_empty() {
            note = format!(
                "{note}\n\n**Points of the sweep not in this report** ({} of {}):\n\n{}",
                missing.len(),
                self.points.len(),
                missing.join("\n")
            );
        }
        if !note.trim().is_empty() {
            args.extend(["--note".into(), note.trim().to_string()]);
        }
        Ok(args)
    }
}

/// A stage binary next to this executable.
fn sibling(stage: Stage) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(stage.name());
    if !p.exists() {
        bail!(
            "{} not found next to {} (build the stages: `just build`)",
            stage.name(),
            exe.display()
        );
    }
    Ok(p)
}

/// The sweep stopped on SIGTERM/SIGINT (its running stage checkpointed or stopped too);
/// `sweep` exits with [`crate::Interrupted::EXIT_CODE`].
#[derive(Debug)]
pub struct Stopped {
    pub during: String,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "interrupted during {}: run the same command again to continue (a training run \
             resumes from its checkpoint)",
            self.during
        )
    }
}

impl std::error::Error for Stopped {}

/// Runs a stage binary to its end. A signal to the sweep is passed on to the stage (SIGTERM:
/// train checkpoints and stops), and the sweep then stops with [`Stopped`].
fn call(stage: Stage, args: &[String], what: &str, stop: &AtomicBool) -> Result<()> {
    let exe = sibling(stage)?;
    let mut child = Command::new(&exe)
        .args(args)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let mut passed_on = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if stop.load(Ordering::Relaxed) && !passed_on {
            // The stage may have had the signal too (Ctrl-C, Slurm): a second TERM is harmless.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            passed_on = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if stop.load(Ordering::Relaxed) || status.code() == Some(crate::Interrupted::EXIT_CODE) {
        return Err(Stopped {
            during: what.to_string(),
        }
        .into());
    }
    if !status.success() {
        bail!(
            "{what} failed ({status}): {} {}",
            exe.display(),
            args.iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

/// Stops before anything runs when a job's run directory was made with another config
/// (its outputs would pass for this config's), unless `force` says to train it again.
fn check_unchanged<'a>(jobs: impl Iterator<Item = &'a Job>, force: bool) -> Result<()> {
    let mut report = String::new();
    for job in jobs {
        let changed = job.changed();
        if changed.is_empty() {
            continue;
        }
        let dir = job.train.as_ref().and_then(|t| t.config.as_ref());
        let dir = dir.map_or(PathBuf::new(), |c| c.run_dir());
        report.push_str(&format!(
            "\n  {} ({}): {}",
            job.name,
            dir.display(),
            changed.join("; ")
        ));
    }
    if report.is_empty() {
        return Ok(());
    }
    if force {
        eprintln!("--force: these runs are trained again from the start:{report}");
        return Ok(());
    }
    bail!(
        "runs made with another config than the sweep's now (on disk -> now):{report}\n\
         Their results would pass for the new settings. Train them again with --force (their \
         outputs are replaced), or restore the settings they were made with."
    )
}

/// Runs a job's steps that are not done; a training run that runs makes its evaluations
/// run again. A run whose directory holds another config (allowed by `--force`) is trained
/// again from the start.
fn run_job(job: &Job, tag: &str, stop: &AtomicBool) -> Result<()> {
    if job.done() {
        eprintln!("{tag} {}: done already, skipped", job.name);
        return Ok(());
    }
    // The run is this sweep's while its steps run (its `train` child goes ahead under it).
    let _lock = match job.train.as_ref().and_then(|t| t.config.as_ref()) {
        Some(c) => Some(basin_lm::runlock::RunLock::acquire(&c.run_dir(), "sweep")?),
        None => None,
    };
    let fresh = !job.changed().is_empty();
    let mut retrained = false;
    if let Some(t) = job.train.as_ref().filter(|t| fresh || !t.done()) {
        eprintln!("{tag} {}", t.what);
        let args = if fresh { t.args.clone() } else { t.run_args() };
        call(t.stage, &args, &t.what, stop)?;
        retrained = true;
    }
    for e in job.evaluate.iter().filter(|e| retrained || !e.done()) {
        eprintln!("{tag} {}", e.what);
        call(e.stage, &e.run_args(), &e.what, stop)?;
        e.recorded()?;
    }
    Ok(())
}

/// What the `sweep` command did.
pub struct Summary {
    /// Jobs whose steps all exist now.
    pub done: usize,
    pub report: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<Summary> {
    let aligned_env = basin_lm::config::env_path("ALIGNED_MODEL");
    let aligned = args
        .aligned_model
        .as_deref()
        .or(aligned_env.as_deref())
        .filter(|p| !p.as_os_str().is_empty());
    let plan = Plan::new(&args.config, &args.overrides, aligned)?;
    for line in plan.data_lines() {
        eprintln!("{line}");
    }
    let stop = crate::stop_flag()?;
    let report = PathBuf::from("reports")
        .join(&plan.sweep.name)
        .join("summary.md");
    if args.plan {
        let all = plan.stage0.iter().chain(&plan.points);
        for t in all.filter_map(|job| job.train.as_ref()) {
            let config = t.config.as_ref().expect("a training step has its config");
            config
                .validate()
                .with_context(|| format!("the config of {}", t.what))?;
            let (text, _) = crate::plan::plan(config, args.memory_gib)
                .with_context(|| format!("the memory plan of {}", t.what))?;
            println!("{}: {text}", t.what);
        }
        return Ok(Summary {
            done: 0,
            report: None,
        });
    }
    if args.list {
        let all = plan.stage0.iter().chain(&plan.points);
        for (i, job) in all.enumerate() {
            // One read of the run's config.toml per job, not per step.
            let changed = !job.changed().is_empty();
            for s in job.train.iter().chain(&job.evaluate) {
                let line: Vec<String> = s.args.iter().map(|a| shell_quote(a)).collect();
                let state = if changed {
                    "changed"
                } else if s.done() {
                    "done"
                } else {
                    "todo"
                };
                println!(
                    "{i}\t{state}\t{}\t{} {}",
                    s.what,
                    s.stage.name(),
                    line.join(" ")
                );
            }
        }
        return Ok(Summary {
            done: 0,
            report: None,
        });
    }
    if let Some(path) = &args.slurm {
        let exe = std::env::current_exe()?;
        let root = std::env::current_dir()?;
        let n = plan.points.len();
        let script = slurm_script(
            &exe,
            &args.config,
            &root,
            n,
            &plan.sweep.name,
            &plan.overrides,
        );
        basin_lm::fsutil::write_bytes_atomic(path, script.as_bytes())?;
        println!(
            "wrote {} ({n} array tasks): sbatch {}",
            path.display(),
            path.display()
        );
        if plan.stage0.iter().any(|j| !j.done()) {
            println!(
                "stage 0 is not done: run `sweep --config {} --stage0` first",
                args.config.display()
            );
        }
        return Ok(Summary {
            done: 0,
            report: None,
        });
    }
    if args.report_only {
        call(
            Stage::Evaluate,
            &plan.report_args(&[])?,
            "the report",
            &stop,
        )?;
        return Ok(Summary {
            done: 0,
            report: Some(report),
        });
    }
    let n = plan.points.len();
    if let Some(i) = args.index {
        // An array task runs its point alone: stage 0 ran before the array was submitted.
        let Some(job) = plan.points.get(i) else {
            bail!("--index {i}: the sweep has {n} points (0..{n})");
        };
        if plan.stage0.iter().any(|j| !j.done()) {
            bail!(
                "--index {i}: stage 0 is not done; run `sweep --config {} --stage0` first",
                args.config.display()
            );
        }
        check_unchanged(std::iter::once(job), args.force)?;
        run_job(job, &format!("[{}/{n}]", i + 1), &stop)?;
        return Ok(Summary {
            done: 1,
            report: None,
        });
    }
    let n0 = plan.stage0.len();
    let points = if args.stage0 {
        &[][..]
    } else {
        &plan.points[..]
    };
    check_unchanged(plan.stage0.iter().chain(points), args.force)?;
    // Stage 0 makes the points' model: a failure there stops the sweep.
    for (i, job) in plan.stage0.iter().enumerate() {
        run_job(job, &format!("[stage 0: {}/{n0}]", i + 1), &stop)?;
    }
    if args.stage0 {
        return Ok(Summary {
            done: n0,
            report: None,
        });
    }
    // A point that fails is recorded and the others go on; an interruption stops the sweep.
    let mut failed = Vec::new();
    for (i, job) in plan.points.iter().enumerate() {
        let tag = format!("[{}/{n}]", i + 1);
        match run_job(job, &tag, &stop) {
            Ok(()) => {}
            Err(e) if e.is::<Stopped>() => return Err(e),
            Err(e) => {
                eprintln!(
                    "{tag} {}: FAILED, going on with the other points: {e:#}",
                    job.name
                );
                failed.push((job.name.clone(), format!("{e:#}")));
            }
        }
    }
    call(
        Stage::Evaluate,
        &plan.report_args(&failed)?,
        "the report",
        &stop,
    )?;
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "{} of {n} points failed ({}); the report marks them. Run the same command again \
             to retry them (the done points are skipped)",
            failed.len(),
            names.join(", ")
        );
    }
    Ok(Summary {
        done: n0 + n,
        report: Some(report),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep with stage 0 and two points, in `dir` (runs go to dir/runs).
    fn plan(dir: &Path, aligned: Option<&Path>) -> Plan {
        let runs = dir.join("runs");
        std::fs::write(
            dir.join("align.toml"),
            format!(
                "name = \"align\"\nout_dir = {:?}\n",
                runs.display().to_string()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("smoke.toml"),
            format!("out_dir = {:?}\n", runs.display().to_string()),
        )
        .unwrap();
        let sweep = format!(
            r#"name = "s"
train_config = {smoke:?}
set = ["ema.enabled=true"]
[[point]]
label = "a"
set = ["lr=1e-4"]
[[point]]
label = "b"
[stage0]
train_config = {align:?}
base_model = "m.gguf"
base_eval = {base:?}
safety = ["--limit", "4", "--sets", "advbench,harmbench"]
[evaluate]
safety = ["--limit", "4"]
utility = ["--sets", "dolly"]
"#,
            smoke = dir.join("smoke.toml").display().to_string(),
            align = dir.join("align.toml").display().to_string(),
            base = runs.join("base").display().to_string(),
        );
        std::fs::write(dir.join("s.toml"), sweep).unwrap();
        Plan::new(&dir.join("s.toml"), &[], aligned).unwrap()
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "").unwrap();
    }

    #[test]
    fn stage0_evaluates_the_original_then_trains_and_evaluates_the_aligned_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), None);
        let runs = dir.path().join("runs");
        assert_eq!(p.stage0.len(), 2);
        let original = &p.stage0[0];
        assert!(original.train.is_none());
        assert_eq!(
            original.evaluate[0].args[..5],
            [
                "safety",
                "--model",
                "m.gguf",
                "--out",
                &runs.join("base").display().to_string()
            ]
        );
        let align = &p.stage0[1];
        assert_eq!(
            align.train.as_ref().unwrap().owes,
            [runs.join("align/model/model.safetensors")]
        );
        // No EMA in stage 0: only model/ is owed.
        assert_eq!(
            align.evaluate[0].owes,
            [runs.join("align/eval/model/scores.json")]
        );
        // Stage 0's own safety arguments (more harmful sets); the points keep [evaluate]'s.
        for job in [original, align] {
            assert!(job.evaluate[0]
                .args
                .ends_with(&["--limit", "4", "--sets", "advbench,harmbench"].map(String::from)));
        }
        assert_eq!(p.points.len(), 2);
        assert!(p.points[0].evaluate[0]
            .args
            .ends_with(&["--limit", "4"].map(String::from)));
        assert_eq!(align.evaluate[1].args[0], "utility");
    }

    #[test]
    fn a_point_is_done_only_when_every_output_it_owes_exists() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("runs/s-a");
        let owes = |p: &Plan| -> Vec<PathBuf> {
            let j = &p.points[0];
            j.train
                .iter()
                .chain(&j.evaluate)
                .flat_map(|s| s.owes.clone())
                .collect()
        };
        let p = plan(dir.path(), None);
        assert_eq!(
            owes(&p).len(),
            2 + 2 + 2,
            "θ and θ̄: weights, scores, utility"
        );
        for f in [
            "model/model.safetensors",
            "ema/model.safetensors",
            "eval/model/scores.json",
            "eval/model/utility.json",
            "eval/ema/utility.json",
        ] {
            touch(&run.join(f));
        }
        // Each evaluation as the sweep leaves it once it has run: with its arguments kept.
        for e in &p.points[0].evaluate {
            e.recorded().unwrap();
        }
        // The EMA's scores are missing (an evaluation cut off between model/ and ema/).
        assert!(!p.points[0].done());
        let missing: Vec<&Step> = p.points[0].evaluate.iter().filter(|s| !s.done()).collect();
        assert_eq!(missing.len(), 1);
        assert!(missing[0].args[0] == "safety");
        touch(&run.join("eval/ema/scores.json"));
        assert!(p.points[0].done());
        // A checkpoint left behind: training is unfinished, and resumes.
        touch(&run.join("checkpoint/progress.json"));
        let t = p.points[0].train.as_ref().unwrap();
        assert!(!t.done() && t.run_args().last().unwrap() == "--resume");
    }

    /// Scores made with other evaluation arguments than the sweep's now — or kept without
    /// them — are not done: the sweep evaluates again rather than report them.
    #[test]
    fn an_evaluation_made_with_other_arguments_is_not_done() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), None);
        let run = dir.path().join("runs/s-a");
        let safety = &p.points[0].evaluate[0];
        for f in ["eval/model/scores.json", "eval/ema/scores.json"] {
            touch(&run.join(f));
        }
        let record = safety.record().unwrap();
        assert_eq!(record, run.join("eval/model/scores.args.json"));
        // Outputs without the record of how they were made (an older sweep's, or copied in).
        assert!(!safety.done());
        safety.recorded().unwrap();
        assert!(safety.done());
        let kept: EvaluatedWith = basin_lm::artifacts::read(&record).unwrap();
        assert_eq!(kept.args, safety.args);
        assert!(kept.args.ends_with(&["--limit", "4"].map(String::from)));
        // The same point evaluated with another --limit.
        let mut other = safety.clone();
        *other.args.last_mut().unwrap() = "8".into();
        assert!(
            !other.done(),
            "scores made with --limit 4 are not --limit 8's"
        );
        // A record that is not one counts as missing.
        std::fs::write(&record, "{\"args\": 3}").unwrap();
        assert!(!safety.done());
        // A training run keeps none (its config.toml says how it was made).
        assert!(p.points[0].train.as_ref().unwrap().record().is_none());
    }

    #[test]
    fn a_run_made_with_another_config_is_not_done_and_stops_the_sweep_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), None);
        let run = dir.path().join("runs/s-a");
        let job = &p.points[0];
        let want = job
            .train
            .as_ref()
            .unwrap()
            .config
            .as_deref()
            .unwrap()
            .clone();
        for f in [
            "model/model.safetensors",
            "ema/model.safetensors",
            "eval/model/scores.json",
            "eval/ema/scores.json",
            "eval/model/utility.json",
            "eval/ema/utility.json",
        ] {
            touch(&run.join(f));
        }
        for e in &job.evaluate {
            e.recorded().unwrap();
        }
        // Every output is there; no config.toml is read as "nothing to compare".
        assert!(job.done());
        let write = |c: &TrainConfig| {
            std::fs::write(
                run.join("config.toml"),
                basin_lm::config::to_toml(c).unwrap(),
            )
            .unwrap()
        };
        write(&want);
        assert!(job.done() && job.changed().is_empty());
        // The same run name, made with another learning rate and EMA β.
        let mut old = want.clone();
        old.lr = 1e-3;
        old.ema.beta = 0.5;
        write(&old);
        assert_eq!(
            job.changed(),
            ["ema.beta: 0.5 -> 0.999", "lr: 0.001 -> 0.0001"]
        );
        assert!(!job.done(), "stale outputs do not count as done");
        let e = check_unchanged(p.points.iter(), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s-a") && e.contains("lr: 0.001 -> 0.0001") && e.contains("--force"),
            "{e}"
        );
        check_unchanged(p.points.iter(), true).unwrap();
        // A config.toml that is not a training config is a difference too.
        std::fs::write(run.join("config.toml"), "lr = \"fast\"\n").unwrap();
        assert!(
            job.changed()[0].contains("not a training config"),
            "{:?}",
            job.changed()
        );
    }

    #[test]
    fn the_plan_names_each_data_file_and_whether_it_is_a_sample() {
        let dir = tempfile::tempdir().unwrap();
        let prepared = dir.path().join("prepared");
        basin_lm::testkit::write_manifest(&prepared, &[("dolly", "instruct")]).unwrap();
        let mut m = basin_lm::artifacts::Manifest::read_or_empty(&prepared).unwrap();
        let e = m.sets.get_mut("dolly").unwrap();
        (e.sample, e.stats.records_read, e.stats.rows_train) = (true, 1259, 1069);
        m.write(&prepared).unwrap();
        let data = |f: &str| format!("data=[{:?}]", prepared.join(f).display().to_string());
        plan(dir.path(), None); // writes the sweep's files
        let sets = [data("dolly.parquet"), data("alpaca-full.parquet")];
        let with_sample = Plan::new(&dir.path().join("s.toml"), &sets[..1], None).unwrap();
        assert_eq!(
            with_sample.data_lines(),
            ["data dolly: 1259 records of input (a SAMPLE of the public set, from the data mirror) -> 1069 training rows"]
        );
        let missing = Plan::new(&dir.path().join("s.toml"), &sets[1..], None).unwrap();
        assert!(missing.data_lines()[0].contains("alpaca-full.parquet: not prepared yet"));
    }

    #[test]
    fn your_own_aligned_model_skips_stage0_and_is_every_points_model() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("mine.gguf");
        touch(&mine);
        let p = plan(dir.path(), Some(&mine));
        assert!(p.stage0.is_empty());
        let args = &p.points[1].train.as_ref().unwrap().args;
        let want = format!("model={}", mine.display());
        assert!(args.contains(&want), "{args:?}");
        let missing = dir.path().join("nope");
        let e = Plan::new(&dir.path().join("s.toml"), &[], Some(&missing))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no such file"), "{e}");
    }

    #[test]
    fn snapshots_and_wise_ft_add_their_evaluations_after_the_runs_own() {
        let dir = tempfile::tempdir().unwrap();
        plan(dir.path(), None); // writes the sweep's files
        let path = dir.path().join("s.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}[baselines]\nwise_ft = [0.5, 0.25]\n")).unwrap();
        let p = Plan::new(&path, &["snapshots=[3]".into()], None).unwrap();
        let run = dir.path().join("runs/s-a");
        let job = &p.points[0];
        let weights = |d: &str| run.join(d).join("model.safetensors");
        assert_eq!(
            job.train.as_ref().unwrap().owes,
            [
                weights("model"),
                weights("ema"),
                weights("step-3/model"),
                weights("step-3/ema")
            ]
        );
        let whats: Vec<&str> = job.evaluate.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "s-a: evaluate safety",
                "s-a: evaluate utility",
                "s-a step 3: evaluate safety",
                "s-a step 3: evaluate utility",
                "s-a: interpolate (WiSE-FT)",
                "s-a WiSE-FT α=0.5: evaluate safety",
                "s-a WiSE-FT α=0.5: evaluate utility",
                "s-a WiSE-FT α=0.25: evaluate safety",
                "s-a WiSE-FT α=0.25: evaluate utility",
            ]
        );
        assert_eq!(
            job.evaluate[2].owes,
            [
                run.join("step-3/eval/model/scores.json"),
                run.join("step-3/eval/ema/scores.json")
            ]
        );
        let interpolate = &job.evaluate[4];
        assert_eq!(
            interpolate.args[..3],
            ["interpolate", "--run", &run.display().to_string()]
        );
        assert_eq!(interpolate.args[3..], ["--alpha", "0.5,0.25"]);
        assert_eq!(
            interpolate.owes,
            [
                run.join("wise-0.5/interpolation.json"),
                run.join("wise-0.25/interpolation.json")
            ]
        );
        let wise = &job.evaluate[5];
        let out = run.join("eval/wise-0.5");
        assert_eq!(
            wise.args[..5],
            [
                "safety",
                "--model",
                &run.join("wise-0.5").display().to_string(),
                "--out",
                &out.display().to_string()
            ]
        );
        assert_eq!(wise.owes, [out.join("scores.json")]);
        // Stage 0 has neither.
        assert_eq!(p.stage0[1].evaluate.len(), 2);
        std::fs::write(&path, format!("{text}[baselines]\nwise_ft = [1.5]\n")).unwrap();
        let e = Plan::new(&path, &[], None).err().unwrap().to_string();
        assert!(e.contains("wise_ft has 1.5"), "{e}");
    }
}
