//! `evaluate`: attack success rate and over-refusal (`safety`), utility (`utility`), the
//! judges against human labels (`judge-check`), the report over runs (`report`), the loss
//! landscapes of the safety basin (`landscape`); WiSE-FT's interpolation (`interpolate`); trying a model (`generate`, `export`).
//! Each command is a library module of [`evaluate::commands`]; this is clap and dispatch.

use clap::{Parser, Subcommand};
use evaluate::commands::{
    export, generate, interpolate, judge_check, landscape, report, safety, utility,
};

#[derive(Parser)]
#[command(
    name = "evaluate",
    version,
    about = "basin stage 3: generate replies and measure safety"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's replies to prompts (greedy unless --temperature is given).
    Generate(generate::Args),
    /// Attack success rate on harmful prompt sets and refusal rate on XSTest's safe prompts,
    /// by both judges. Given a run directory, evaluates its model/ and ema/ in one go.
    Safety(safety::Args),
    /// Utility: loss and perplexity of the model on the held-out (val) rows of prepared
    /// training sets. Given a run directory, evaluates its model/ and ema/.
    Utility(utility::Args),
    /// Score both judges against human-labelled replies (PyRIT): accuracy, precision, recall.
    JudgeCheck(judge_check::Args),
    /// The table and plots over a set of evaluated runs: reports/<name>/{summary.md, *.svg, *.png}.
    Report(report::Args),
    /// Utility and safety loss along a line between two models, or along random directions
    /// around one (1-D or 2-D), with the basin width of each: CSV, JSON and plots.
    Landscape(landscape::Args),
    /// WiSE-FT's baseline: a run's fine-tuned θ interpolated toward its start,
    /// θ_pre + α·(θ_T − θ_pre), into <run>/wise-<α>/ for each --alpha.
    Interpolate(interpolate::Args),
    /// Write a model (GGUF or HF directory) as a Hugging Face directory that
    /// `transformers` loads: model.safetensors, config.json, tokenizer files.
    Export(export::Args),
}

fn main() {
    let done = match Cli::parse().command {
        Command::Generate(a) => generate::run(&a).map(drop),
        Command::Safety(a) => safety::run(&a).map(drop),
        Command::Utility(a) => utility::run(&a).map(drop),
        Command::JudgeCheck(a) => judge_check::run(&a).map(drop),
        Command::Report(a) => report::run(&a).map(drop),
        Command::Landscape(a) => landscape::run(&a).map(drop),
        Command::Interpolate(a) => interpolate::run(&a).map(drop),
        Command::Export(a) => export::run(&a).map(drop),
    };
    if let Err(e) = done {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
