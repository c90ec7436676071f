//! `sweep`: the experiment of a sweep config (configs/all.toml, configs/paper.toml):
//! stage 0, every grid point trained and evaluated, the report — skipping what is done.
//! `--stage0` runs stage 0 only; `--index I` one point (a Slurm array task); `--slurm FILE`
//! writes the job-array script; `--list` prints the steps. See [`train::experiment`].

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sweep",
    version,
    about = "basin: stage 0, a grid of fine-tuning runs each trained and evaluated, then the report"
)]
struct Cli {
    #[command(flatten)]
    args: train::experiment::Args,
}

fn main() {
    match train::experiment::run(&Cli::parse().args) {
        Ok(s) => {
            if let Some(r) = s.report {
                eprintln!("report: {}", r.display());
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            let stopped = e.downcast_ref::<train::experiment::Stopped>().is_some();
            std::process::exit(if stopped {
                train::Interrupted::EXIT_CODE
            } else {
                1
            });
        }
    }
}
