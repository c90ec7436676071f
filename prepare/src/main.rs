//! `prepare`: fetch data assets and turn data sets into tokenized Parquet.

use anyhow::Result;
use clap::{Parser, Subcommand};
use prepare::assets::{Fetched, Fetcher, Sources};
use prepare::config::PrepareConfig;
use prepare::pipeline;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "prepare",
    version,
    about = "basin stage 1: data assets -> chat template -> token ids -> Parquet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The config and the sets of `run` and `distill`.
#[derive(clap::Args)]
struct StageArgs {
    /// TOML config (configs/prepare.toml); defaults apply without one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key: --set max_seq_len=256 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Only these sets (comma-separated names; run: same as --set sets=[...]).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Use cached assets that differ from the sha256 in sources.toml (edited on purpose);
    /// the manifest records it. Same as --set allow_modified=true.
    #[arg(long)]
    allow_modified: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Copy every asset of data/sources.toml into the cache, checking its sha256.
    Fetch {
        #[arg(long, default_value = "data/sources.toml")]
        sources: PathBuf,
        #[arg(long, default_value = "data/cache")]
        cache: PathBuf,
        /// Directory laid out like the cache, tried first (default: $DATA_MIRROR when it is
        /// set and not empty).
        #[arg(long)]
        mirror: Option<PathBuf>,
        /// Use only the mirror (no PyPI, no URLs).
        #[arg(long)]
        offline: bool,
        /// Only these assets (comma-separated names); optional assets (the full data sets)
        /// are fetched only when named.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Fetch these assets again and pin what arrives in sources.lock (a deliberate
        /// update of an asset pinned on first use).
        #[arg(long, value_delimiter = ',')]
        update: Vec<String>,
    },
    /// Tokenize data sets into Parquet (data/prepared/<set>.parquet + manifest.json).
    Run(StageArgs),
    /// Answer the prompts of configs/prepare.toml's [[distill]] sets with the model itself
    /// and prepare the conversations like any set (skipped when nothing changed).
    Distill(StageArgs),
    /// List the assets: name, role, licence, and whether the cache has them.
    List {
        #[arg(long, default_value = "data/sources.toml")]
        sources: PathBuf,
        #[arg(long, default_value = "data/cache")]
        cache: PathBuf,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch {
            sources,
            cache,
            mirror,
            offline,
            only,
            update,
        } => {
            let sources_path = sources;
            let mut sources = Sources::load(&sources_path)?;
            for name in &update {
                let a = sources.asset.iter_mut().find(|a| &a.name == name);
                let Some(a) = a else {
                    anyhow::bail!(
                        "--update {name}: no such asset in {}",
                        sources_path.display()
                    );
                };
                if !a.pinned_in_lock && !a.sha256.is_empty() {
                    anyhow::bail!(
                        "--update {name}: its sha256 is written in {} itself; edit it there",
                        sources_path.display()
                    );
                }
                a.sha256.clear();
            }
            let mirror = mirror.or_else(|| basin_lm::config::env_path("DATA_MIRROR"));
            let mut fetcher = Fetcher::new(cache, mirror, !offline)?;
            let names: Vec<String> = only.iter().chain(&update).cloned().collect();
            let assets = sources.select(&names)?;
            let mut failures = Vec::new();
            for a in &assets {
                let fetched = fetcher.fetch(a).and_then(|how| {
                    if a.sha256.is_empty() {
                        // Pinned on first use (or --update): what arrived is now the asset.
                        let path = fetcher.path(a);
                        let sha = basin_lm::fsutil::sha256_file(&path)?;
                        let bytes = std::fs::metadata(&path)?.len();
                        prepare::assets::Lock::record(&sources_path, a, &sha, bytes)?;
                        eprintln!(
                            "pin {:<28} sha256 {sha} ({bytes} bytes) in {}: commit it",
                            a.name,
                            prepare::assets::Lock::path(&sources_path).display()
                        );
                    }
                    Ok(how)
                });
                match fetched {
                    Ok(how) => {
                        let how = match how {
                            Fetched::Cached => "cached",
                            Fetched::Mirror => "from mirror",
                            Fetched::Pypi => "from PyPI",
                            Fetched::Url => "from URL",
                        };
                        eprintln!("ok  {:<28} {how}", a.name);
                    }
                    Err(e) => {
                        eprintln!("ERR {:<28} {e:#}", a.name);
                        failures.push(a.name.clone());
                    }
                }
            }
            if !failures.is_empty() {
                anyhow::bail!(
                    "{} of {} assets missing: {}",
                    failures.len(),
                    assets.len(),
                    failures.join(", ")
                );
            }
            eprintln!(
                "{} assets verified in {}",
                assets.len(),
                fetcher.cache.display()
            );
            Ok(())
        }
        Command::Run(StageArgs {
            config,
            mut overrides,
            only,
            quiet,
            allow_modified,
        }) => {
            if allow_modified {
                overrides.push("allow_modified=true".into());
            }
            if !only.is_empty() {
                let list: Vec<String> = only.iter().map(|s| format!("{s:?}")).collect();
                overrides.push(format!("sets=[{}]", list.join(",")));
            }
            let config: PrepareConfig = basin_lm::config::load(config.as_deref(), &overrides)?;
            let done = pipeline::run(&config, !quiet)?;
            println!(
                "{:<28} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9}",
                "set", "train", "val", "eval", "tokens", "truncated", "dropped"
            );
            for (name, _, s) in &done.outputs {
                let dropped =
                    s.dropped_safety_keyword + s.dropped_eval_overlap + s.dropped_prompt_too_long;
                println!(
                    "{name:<28} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9}",
                    s.rows_train, s.rows_val, s.rows_eval, s.tokens_total, s.truncated, dropped
                );
            }
            println!("manifest: {}", done.manifest.display());
            Ok(())
        }
        Command::Distill(StageArgs {
            config,
            mut overrides,
            only,
            quiet,
            allow_modified,
        }) => {
            if allow_modified {
                overrides.push("allow_modified=true".into());
            }
            let config: PrepareConfig = basin_lm::config::load(config.as_deref(), &overrides)?;
            for d in prepare::distill::run(&config, &only, !quiet)? {
                let what = if d.skipped { "up to date" } else { "written" };
                println!(
                    "{}: {} prompts -> {} train + {} val rows ({} dropped), {what}: {}",
                    d.name,
                    d.prompts,
                    d.rows_train,
                    d.rows_val,
                    d.dropped,
                    d.out.display()
                );
            }
            Ok(())
        }
        Command::List { sources, cache } => {
            let sources = Sources::load(&sources)?;
            for a in &sources.asset {
                let here = match (cache.join(&a.file).is_file(), a.optional) {
                    (true, _) => "cached",
                    (false, true) => "optional",
                    (false, false) => "-",
                };
                let pin = if a.sha256.is_empty() {
                    " (not pinned yet)"
                } else if a.pinned_in_lock {
                    " (pinned in sources.lock)"
                } else {
                    ""
                };
                println!(
                    "{:<28} {:<18} {:<16} {:>8} {}{pin}",
                    a.name, a.role, a.licence, here, a.file
                );
            }
            Ok(())
        }
    }
}
