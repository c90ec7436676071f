//! `sweep`: runs a grid of training runs and their evaluation (configs/all.toml,
//! configs/paper.toml), skipping what is done, then writes the report. `--index I` runs one
//! point (a Slurm array task); `--slurm FILE` writes the job-array script; `--list` prints
//! the jobs.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use train::config::TrainConfig;
use train::sweep::{shell_quote, slurm_script, Job, SweepConfig};

#[derive(Parser)]
#[command(
    name = "sweep",
    version,
    about = "basin: a grid of fine-tuning runs, each trained and evaluated, then the report"
)]
struct Cli {
    /// The sweep (configs/all.toml, configs/paper.toml).
    #[arg(long)]
    config: PathBuf,
    /// An override for every point's train config (repeatable), e.g. --set model=my/aligned.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the jobs (run name and train command) and stop.
    #[arg(long)]
    list: bool,
    /// Run only job I (0-based; what a Slurm array task runs).
    #[arg(long)]
    index: Option<usize>,
    /// Write a Slurm job-array script for the sweep to this file and stop.
    #[arg(long)]
    slurm: Option<PathBuf>,
    /// Only write the report from the runs already done.
    #[arg(long)]
    report_only: bool,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// train and evaluate, next to this executable.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {} (build the stages: `just build`)",
            name,
            exe.display()
        );
    }
    Ok(p)
}

fn call(exe: &Path, args: &[String], what: &str) -> Result<()> {
    let status = Command::new(exe)
        .args(args)
        .status()
        .with_context(|| format!("cannot start {}", exe.display()))?;
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

struct Plan<'a> {
    sweep: &'a SweepConfig,
    jobs: Vec<Job>,
    /// Each job's run directory, from its resolved train config.
    dirs: Vec<PathBuf>,
    overrides: &'a [String],
}

impl<'a> Plan<'a> {
    /// Resolves and checks every point's train config before anything runs.
    fn new(sweep: &'a SweepConfig, config_path: &Path, overrides: &'a [String]) -> Result<Self> {
        let jobs = sweep.jobs()?;
        let dirs = jobs
            .iter()
            .map(|job| {
                let sets: Vec<String> = sweep
                    .set
                    .iter()
                    .chain(overrides)
                    .chain(&job.set)
                    .cloned()
                    .collect();
                let c: TrainConfig = basin_lm::config::load(Some(&sweep.train_config), &sets)
                    .with_context(|| format!("{}: point {}", config_path.display(), job.run))?;
                c.validate().with_context(|| format!("point {}", job.run))?;
                Ok(c.out_dir.join(&job.run))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            sweep,
            jobs,
            dirs,
            overrides,
        })
    }

    /// Trains and evaluates one job, skipping the parts already done.
    fn run_job(&self, i: usize) -> Result<()> {
        let (job, dir, n) = (&self.jobs[i], &self.dirs[i], self.jobs.len());
        let eval = dir.join("eval").join("model");
        let trained = dir.join("model").join("model.safetensors").exists()
            && !dir.join("checkpoint").exists();
        let safety_done = eval.join("scores.json").exists();
        let utility_done =
            self.sweep.evaluate.utility.is_empty() || eval.join("utility.json").exists();
        let tag = format!("[{}/{n}] {}", i + 1, job.run);
        if trained && safety_done && utility_done {
            eprintln!("{tag}: done already, skipped");
            return Ok(());
        }
        if !trained {
            eprintln!("{tag}: train");
            let resume = dir.join("checkpoint").exists();
            let mut args = self.sweep.train_args(job, self.overrides);
            if resume {
                args.push("--resume".into());
            }
            call(&sibling("train")?, &args, &format!("training {}", job.run))?;
        }
        let evaluate = |what: &str, args: &[String]| -> Result<()> {
            eprintln!("{tag}: evaluate {what}");
            let mut a = vec![
                what.to_string(),
                "--model".into(),
                dir.display().to_string(),
            ];
            a.extend(args.iter().cloned());
            call(
                &sibling("evaluate")?,
                &a,
                &format!("evaluating {}", job.run),
            )
        };
        // A fresh training makes the old scores stale.
        if !safety_done || !trained {
            evaluate("safety", &self.sweep.evaluate.safety)?;
        }
        if !self.sweep.evaluate.utility.is_empty() && (!utility_done || !trained) {
            evaluate("utility", &self.sweep.evaluate.utility)?;
        }
        Ok(())
    }

    fn report(&self) -> Result<()> {
        let mut args = vec!["report".to_string()];
        let mut any = false;
        for d in &self.dirs {
            if d.join("eval").join("model").join("scores.json").exists() {
                args.push(d.display().to_string());
                any = true;
            }
        }
        if !any {
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
        if !r.note.is_empty() {
            args.extend(["--note".into(), r.note.clone()]);
        }
        call(&sibling("evaluate")?, &args, "the report")
    }
}

fn run(cli: Cli) -> Result<()> {
    let sweep = SweepConfig::load(&cli.config)?;
    let plan = Plan::new(&sweep, &cli.config, &cli.overrides)?;
    let jobs = &plan.jobs;
    if cli.list {
        for (i, j) in jobs.iter().enumerate() {
            let args: Vec<String> = sweep
                .train_args(j, &cli.overrides)
                .iter()
                .map(|a| shell_quote(a))
                .collect();
            println!("{i}\t{}\ttrain {}", j.run, args.join(" "));
        }
        return Ok(());
    }
    if let Some(path) = &cli.slurm {
        let exe = std::env::current_exe()?;
        let root = std::env::current_dir()?;
        let script = slurm_script(
            &exe,
            &cli.config,
            &root,
            jobs.len(),
            &sweep.name,
            &cli.overrides,
        );
        basin_lm::fsutil::write_bytes_atomic(path, script.as_bytes())?;
        println!(
            "wrote {} ({} array tasks): sbatch {}",
            path.display(),
            jobs.len(),
            path.display()
        );
        return Ok(());
    }
    if cli.report_only {
        return plan.report();
    }
    if let Some(i) = cli.index {
        if i >= jobs.len() {
            bail!(
                "--index {i}: the sweep has {} jobs (0..{})",
                jobs.len(),
                jobs.len()
            );
        }
        return plan.run_job(i);
    }
    for i in 0..jobs.len() {
        plan.run_job(i)?;
    }
    plan.report()
}
