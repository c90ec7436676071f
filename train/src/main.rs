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
    let opts = train::Options {
        resume: cli.resume,
        progress: !cli.quiet,
        crash_after: cli.crash_after_step,
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
