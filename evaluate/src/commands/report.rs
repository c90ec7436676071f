//! `evaluate report`: the table and plots over a set of evaluated runs, written into a
//! fresh directory beside `out` and renamed into place: `summary.md`, `*.svg`, `*.png`.

use crate::landscape::LandscapeDoc;
use crate::plots::{load_font, render};
use crate::report::{charts, group, reference_row, run_rows, summary_md, Comparisons};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Run directories (train's runs/<name>, evaluated by `safety` and `utility`).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// A model before fine-tuning, as LABEL=EVAL_DIR (e.g. aligned=runs/align/eval/model).
    #[arg(long = "reference")]
    pub references: Vec<String>,
    /// The harmful set whose ASR the table and plots show.
    #[arg(long, default_value = "advbench")]
    pub harmful: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "basin report")]
    pub title: String,
    /// A paragraph put under the title (what was run, on what hardware).
    #[arg(long, default_value = "")]
    pub note: String,
    /// A landscape.json of `evaluate landscape` (repeatable): the claim that the utility
    /// basin is wider than the safety basin is read off it.
    #[arg(long = "landscape")]
    pub landscapes: Vec<PathBuf>,
}

pub struct Summary {
    /// The summary.md written.
    pub summary: PathBuf,
    /// Rows of the table (evaluated models, references included).
    pub models: usize,
    /// The plots drawn (file stems).
    pub plots: Vec<String>,
}

pub fn run(args: &Args) -> Result<Summary> {
    let mut rows = Vec::new();
    for r in &args.runs {
        rows.extend(run_rows(r, &args.harmful)?);
    }
    let refs = args
        .references
        .iter()
        .map(|spec| {
            let (label, dir) = spec
                .split_once('=')
                .with_context(|| format!("--reference {spec}: expected LABEL=EVAL_DIR"))?;
            reference_row(label, Path::new(dir), &args.harmful)
        })
        .collect::<Result<Vec<_>>>()?;
    let landscapes = args
        .landscapes
        .iter()
        .map(|p| Ok((p.display().to_string(), basin_lm::artifacts::read(p)?)))
        .collect::<Result<Vec<(String, LandscapeDoc)>>>()?;
    let groups = group(&rows);
    let comparisons = Comparisons::of(&groups, &refs, &landscapes, &args.harmful)?;
    let charts = charts(&groups, &refs, &args.harmful);
    let mut drawn = Vec::new();
    basin_lm::fsutil::replace_dir(&args.out, |tmp| {
        let mut note = args.note.clone();
        match load_font() {
            Some(_) => {
                for c in charts
                    .iter()
                    .filter(|c| c.series.iter().any(|s| !s.points.is_empty()))
                {
                    render(tmp, c)?;
                    drawn.push(c.stem.clone());
                }
            }
            None => note.push_str(
                "\n\nPlots skipped: no TrueType font found (set BASIN_FONT=/path/to/font.ttf).",
            ),
        }
        let md = summary_md(
            &args.title,
            &groups,
            &comparisons,
            &refs,
            &drawn,
            &args.harmful,
            note.trim(),
        );
        Ok(std::fs::write(tmp.join("summary.md"), md)?)
    })?;
    let summary = args.out.join("summary.md");
    let models = rows.len() + refs.len();
    eprintln!(
        "wrote {} ({models} models, {} plots)",
        summary.display(),
        drawn.len()
    );
    Ok(Summary {
        summary,
        models,
        plots: drawn,
    })
}
