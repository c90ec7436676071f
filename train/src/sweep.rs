//! A sweep: a base train config, a grid of overrides, and how to evaluate each point
//! (configs/all.toml, configs/paper.toml). Every grid point is an independent job —
//! `train`, then `evaluate safety` and `evaluate utility` on its run directory — so the
//! same list runs one after another here (`sweep --run`) or as a Slurm job array
//! (`sweep --slurm FILE`, one array task per point).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Runs are named `<name>-<point>`; the report goes to reports/<name>.
    pub name: String,
    /// The train config every point starts from.
    pub train_config: PathBuf,
    /// Overrides for every point (`key=value`, as `train --set`).
    #[serde(default)]
    pub set: Vec<String>,
    /// The cartesian product of these keys' values (each a list).
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<toml::Value>>,
    /// Explicit points, in addition to the grid.
    #[serde(default)]
    pub point: Vec<Point>,
    #[serde(default)]
    pub evaluate: EvaluateConfig,
    /// Methods beside each point's θ and EMA, evaluated as they are.
    #[serde(default)]
    pub baselines: Baselines,
    #[serde(default)]
    pub report: ReportConfig,
    /// Stage 0: the model the points fine-tune, trained (and the original evaluated) first.
    pub stage0: Option<Stage0Config>,
}

/// `[stage0]`: how the points' starting model is made. Skipped with your own aligned model
/// (`--aligned-model`, `ALIGNED_MODEL`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage0Config {
    /// The train config of the alignment run (configs/align.toml); its run is evaluated as
    /// the points are, and is the report's "aligned" reference.
    pub train_config: PathBuf,
    /// The original model, evaluated as it is (the report's "original" reference).
    pub base_model: Option<PathBuf>,
    /// Where the original model's scores go (default runs/base/eval/model).
    pub base_eval: Option<PathBuf>,
    /// Arguments of `evaluate safety` for the two stage-0 models in place of
    /// `[evaluate] safety`: more harmful sets, so that the report shows how far the
    /// aligned model's refusals reach beyond the set the points are scored on.
    pub safety: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub label: String,
    #[serde(default)]
    pub set: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    /// Arguments of `evaluate safety` after `--model runs/<run>` (sets, limit, device...).
    #[serde(default)]
    pub safety: Vec<String>,
    /// Arguments of `evaluate utility` after `--model runs/<run>`.
    #[serde(default)]
    pub utility: Vec<String>,
}

/// `[baselines]`: what a reader compares the EMA with at equal utility. Lower learning
/// rates and fewer steps are the grid itself; mixing safety data into the fine-tune is a
/// point whose `data` adds the refusals (`data_rows` sets how many).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baselines {
    /// WiSE-FT: each point's θ interpolated toward its start, θ_pre + α·(θ_T − θ_pre), at
    /// these α (`evaluate interpolate`; no training), each evaluated as θ is.
    #[serde(default)]
    pub wise_ft: Vec<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// `LABEL=EVAL_DIR` models shown before fine-tuning (e.g. aligned=runs/align/eval/model).
    #[serde(default)]
    pub references: Vec<String>,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub note: String,
    /// The harmful set whose ASR the table shows (`evaluate report --harmful`; default
    /// advbench).
    pub harmful: Option<String>,
    /// landscape.json files of `evaluate landscape` the Claims section reads the basins'
    /// widths from (each left out, with a line saying so, until it exists).
    #[serde(default)]
    pub landscapes: Vec<PathBuf>,
}

/// One grid point: its run name and its overrides (on top of the sweep's `set`).
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub run: String,
    pub set: Vec<String>,
}

/// A value in a run name: file stems for paths, 1e-5 for small floats.
fn short(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.rsplit('/').next().unwrap_or(s).replace(".parquet", ""),
        toml::Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e6 => format!("{f}"),
        toml::Value::Float(f) => format!("{f:e}"),
        toml::Value::Array(a) => a.iter().map(short).collect::<Vec<_>>().join("+"),
        other => other.to_string(),
    }
}

/// A key's name in a run name: its last part, with the long ones shortened.
fn key_tag(key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    match last {
        "batch_size" => "bs".into(),
        "seed" => "s".into(),
        "enabled" => key.split('.').next().unwrap_or(last).into(),
        "data" => String::new(),
        "epochs" => "ep".into(),
        other => other.replace('_', ""),
    }
}

impl SweepConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read sweep config {}", path.display()))?;
        let c: Self = toml::from_str(&text)
            .with_context(|| format!("{}: not a sweep config", path.display()))?;
        if c.grid.values().any(Vec::is_empty) {
            bail!(
                "{}: every [grid] key needs at least one value",
                path.display()
            );
        }
        if let Some(a) = c
            .baselines
            .wise_ft
            .iter()
            .find(|a| !(0.0..=1.0).contains(*a))
        {
            bail!(
                "{}: [baselines] wise_ft has {a}; expected weights in [0, 1]",
                path.display()
            );
        }
        if c.grid.is_empty() && c.point.is_empty() {
            bail!(
                "{}: no [grid] and no [[point]]: nothing to run",
                path.display()
            );
        }
        Ok(c)
    }

    /// Every job, grid points first (in key order, last key fastest), then explicit points.
    pub fn jobs(&self) -> Result<Vec<Job>> {
        let mut jobs = Vec::new();
        if !self.grid.is_empty() {
            let keys: Vec<&String> = self.grid.keys().collect();
            let mut index = vec![0usize; keys.len()];
            loop {
                let mut set = Vec::new();
                let mut tags = Vec::new();
                for (k, &i) in keys.iter().zip(&index) {
                    let v = &self.grid[*k][i];
                    set.push(format!("{k}={v}"));
                    if self.grid[*k].len() > 1 {
                        let tag = key_tag(k);
                        tags.push(if tag.is_empty() {
                            short(v)
                        } else {
                            format!("{tag}{}", short(v))
                        });
                    }
                }
                let label = if tags.is_empty() {
                    "point".into()
                } else {
                    tags.join("-")
                };
                jobs.push(Job {
                    run: format!("{}-{label}", self.name),
                    set,
                });
                // Next index, like an odometer.
                let mut d = keys.len();
                loop {
                    if d == 0 {
                        break;
                    }
                    d -= 1;
                    index[d] += 1;
                    if index[d] < self.grid[keys[d]].len() {
                        break;
                    }
                    index[d] = 0;
                }
                if index.iter().all(|&i| i == 0) {
                    break;
                }
            }
        }
        for p in &self.point {
            jobs.push(Job {
                run: format!("{}-{}", self.name, p.label),
                set: p.set.clone(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(j) = jobs.iter().find(|j| !seen.insert(j.run.clone())) {
            bail!(
                "two points of sweep '{}' share the run name {}",
                self.name,
                j.run
            );
        }
        Ok(jobs)
    }

    /// `train` arguments of a job (after the executable).
    pub fn train_args(&self, job: &Job, extra: &[String]) -> Vec<String> {
        let mut a = vec![
            "--quiet".into(),
            "--config".into(),
            self.train_config.display().to_string(),
        ];
        for s in self.set.iter().chain(extra).chain(&job.set) {
            a.extend(["--set".into(), s.clone()]);
        }
        a.extend(["--set".into(), format!("name={}", job.run)]);
        a
    }
}

/// Quotes an argument for a POSIX shell when it needs it.
pub fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// A Slurm job-array script that runs job `$SLURM_ARRAY_TASK_ID` of the sweep.
pub fn slurm_script(
    sweep_exe: &Path,
    config: &Path,
    root: &Path,
    n_jobs: usize,
    name: &str,
    extra: &[String],
) -> String {
    let extra: String = extra
        .iter()
        .map(|s| format!(" --set {}", shell_quote(s)))
        .collect();
    format!(
        "#!/bin/bash\n\
         # basin sweep '{name}': {n_jobs} independent jobs, one Slurm array task each.\n\
         # Submit: sbatch {{this file}}; then `sweep --config {cfg} --report-only` for the report.\n\
         # Edit the resources below for your cluster; every task trains one grid point and\n\
         # evaluates it, and skips what is already done (resubmitting is safe).\n\
         # Preempted, or 2 minutes before its time limit (SIGTERM), a task checkpoints, exits\n\
         # with 75 and is requeued; the next attempt resumes from the checkpoint.\n\
         #SBATCH --job-name=basin-{name}\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --gres=gpu:1\n\
         #SBATCH --cpus-per-task=8\n\
         #SBATCH --mem=64G\n\
         #SBATCH --time=04:00:00\n\
         #SBATCH --requeue\n\
         #SBATCH --signal=B:TERM@120\n\
         #SBATCH --open-mode=append\n\
         #SBATCH --output=runs/slurm-{name}-%A_%a.log\n\
         set -uo pipefail\n\
         cd {root}\n\
         {exe} --config {cfg} --index \"$SLURM_ARRAY_TASK_ID\"{extra} &\n\
         pid=$!\n\
         trap 'kill -TERM \"$pid\" 2>/dev/null' TERM INT\n\
         wait \"$pid\"; rc=$?\n\
         # wait returns when a trapped signal arrives: wait for the sweep to checkpoint.\n\
         while kill -0 \"$pid\" 2>/dev/null; do wait \"$pid\"; rc=$?; done\n\
         if [ \"$rc\" -eq 75 ]; then scontrol requeue \"$SLURM_JOB_ID\"; fi\n\
         exit \"$rc\"\n",
        last = n_jobs.saturating_sub(1),
        root = shell_quote(&root.display().to_string()),
        exe = shell_quote(&sweep_exe.display().to_string()),
        cfg = shell_quote(&config.display().to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> SweepConfig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, text).unwrap();
        SweepConfig::load(&p).unwrap()
    }

    #[test]
    fn the_grid_is_a_cartesian_product_with_readable_names() {
        let c = config(
            r#"name = "g"
train_config = "configs/smoke.toml"
[grid]
lr = [1e-5, 1e-4]
batch_size = [8, 32]
seed = [0]
data = [["d/dolly.parquet"]]
[[point]]
label = "extra"
set = ["lr=3e-4"]
"#,
        );
        let jobs = c.jobs().unwrap();
        let runs: Vec<&str> = jobs.iter().map(|j| j.run.as_str()).collect();
        assert_eq!(
            runs,
            [
                "g-bs8-lr1e-5",
                "g-bs8-lr1e-4",
                "g-bs32-lr1e-5",
                "g-bs32-lr1e-4",
                "g-extra"
            ]
        );
        assert_eq!(
            jobs[1].set,
            [
                "batch_size=8",
                "data=[\"d/dolly.parquet\"]",
                "lr=0.0001",
                "seed=0"
            ]
        );
        let args = c.train_args(&jobs[4], &["model=m".into()]);
        assert_eq!(
            args.join(" "),
            "--quiet --config configs/smoke.toml --set model=m --set lr=3e-4 --set name=g-extra"
        );
    }

    #[test]
    fn empty_or_clashing_sweeps_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "name = \"g\"\ntrain_config = \"x\"\n").unwrap();
        assert!(SweepConfig::load(&p)
            .unwrap_err()
            .to_string()
            .contains("nothing to run"));
        std::fs::write(&p, "name = \"g\"\ntrain_config = \"x\"\n[grid]\nlr = []\n").unwrap();
        assert!(SweepConfig::load(&p)
            .unwrap_err()
            .to_string()
            .contains("at least one value"));
        let c = config("name = \"g\"\ntrain_config = \"x\"\n[[point]]\nlabel = \"a\"\n[[point]]\nlabel = \"a\"\n");
        assert!(c
            .jobs()
            .unwrap_err()
            .to_string()
            .contains("share the run name"));
    }

    #[test]
    fn the_slurm_script_runs_one_point_per_array_task() {
        let s = slurm_script(
            Path::new("/x/sweep"),
            Path::new("configs/paper.toml"),
            Path::new("/repo"),
            12,
            "paper",
            &["model=my model".into()],
        );
        assert!(s.contains("#SBATCH --array=0-11"), "{s}");
        assert!(s.contains("/x/sweep --config configs/paper.toml --index \"$SLURM_ARRAY_TASK_ID\" --set 'model=my model' &"), "{s}");
        assert!(
            s.contains("#SBATCH --requeue") && s.contains("scontrol requeue"),
            "{s}"
        );
    }
}
