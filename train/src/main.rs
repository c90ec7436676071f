//! `train`: full fine-tuning with AdamW and the parameter-space EMA.

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "basin stage 2: full fine-tuning with AdamW and the weight EMA"
)]
struct Cli {
    /// TOML config (configs/*.toml); defaults apply without one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key: --set lr=1e-5 --set ema.enabled=true (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the run's last checkpoint (same config).
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Print the memory the run needs, part by part, against its device's (nothing is
    /// loaded or written), ending with `fits: yes|no`; exit 1 when it does not fit.
    #[arg(long)]
    plan: bool,
    /// Plan for a device with this much memory (GiB) in place of the GPU's free memory; a
    /// run that would not fit is refused before it loads.
    #[arg(long, value_name = "GIB")]
    memory_gib: Option<f64>,
    /// Testing aid: abort the process right after this step, as `kill -9` would.
    #[arg(long, hide = true)]
    crash_after_step: Option<usize>,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        let interrupted = e.downcast_ref::<train::Interrupted>().is_some();
        std::process::exit(if interrupted {
            train::Interrupted::EXIT_CODE
        } else {
            1
        });
    }
}

fn run(cli: Cli) -> Result<()> {
    let config: train::config::TrainConfig =
        basin_lm::config::load(cli.config.as_deref(), &cli.overrides)?;
    if let Some(g) = cli.memory_gib.filter(|g| g.is_nan() || *g <= 0.0) {
        anyhow::bail!("--memory-gib {g}: expected a positive number of GiB");
    }
    if cli.plan {
        config.validate()?;
        let (text, fits) = train::plan::plan(&config, cli.memory_gib)?;
        print!("{text}");
        if fits == Some(false) {
            std::process::exit(1);
        }
        return Ok(());
    }
    let opts = train::Options {
        resume: cli.resume,
        progress: !cli.quiet,
        crash_after: cli.crash_after_step,
        memory_gib: cli.memory_gib,
    };
    let s = train::run(&config, &opts)?;
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    println!(
        "{} steps; validation loss {} -> {}; outputs in {}",
        s.steps,
        fmt(s.first_val_loss),
        fmt(s.final_val_loss),
        s.run_dir.display()
    );
    Ok(())
}
