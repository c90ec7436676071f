//! `evaluate landscape`: utility and safety loss along a line between two models, or along
//! random directions around one (1-D or 2-D), with the basin width of each: landscape.csv,
//! landscape.json and plots, written into a fresh directory renamed into place.

use super::{model_path, prepared_rows};
use crate::landscape::{
    basins, charts_1d, csv, filter_normalised_direction, grid, heatmaps, spread, walk, AlphaRange,
    Basins, Directions, Grid, LandscapeDoc, Params, Point, ProbeSet, ProbeSets, Probes, Slice,
};
use crate::plots::{load_font, render, render_heatmap};
use anyhow::{bail, Result};
use basin_lm::artifacts::{Decoding, ModelHash};
use basin_lm::model::{parse_device, parse_dtype, Model};
use basin_lm::schema::PreparedRow;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The model at α = 0: the start of the line, or the centre of the random slices (a
    /// .gguf file, a Hugging Face directory, or a run directory: its model/).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Measure nothing: recompute the basins (with --basin-pct) and draw the plots again
    /// from DIR/landscape.json, e.g. after a run on a machine without a font.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub replot: Option<PathBuf>,
    /// The model at α = 1: interpolate from --from to it. Without it, random directions.
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// Random directions: 1 (a line) or 2 (a plane).
    #[arg(long, default_value_t = 1)]
    pub directions: usize,
    /// Grid points per axis.
    #[arg(long, default_value_t = 21)]
    pub points: usize,
    /// The first α (default: −0.5 on a line between models, −span for random slices).
    #[arg(long, allow_hyphen_values = true)]
    pub alpha_min: Option<f64>,
    /// The last α (default: 1.5 on a line between models, +span for random slices).
    #[arg(long, allow_hyphen_values = true)]
    pub alpha_max: Option<f64>,
    /// Random slices: how far along each filter-normalised direction (1 = a step as long as
    /// each weight row).
    #[arg(long, default_value_t = 0.1)]
    pub span: f64,
    /// Seed of the random directions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The basin: where the loss stays within this many percent of its minimum.
    #[arg(long, default_value_t = 5.0)]
    pub basin_pct: f64,
    #[arg(long, default_value = "data/prepared")]
    pub prepared: PathBuf,
    /// Utility loss: the val rows of this prepared set.
    #[arg(long, default_value = "dolly")]
    pub utility_set: String,
    /// Safety loss: the val rows (held out from training) of this set of refusals.
    #[arg(long, default_value = "safety-refusals")]
    pub safety_set: String,
    /// Rows of each loss set (the first N).
    #[arg(long, default_value_t = 32)]
    pub limit: usize,
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Measure the attack success rate at this many α, spread evenly (1-D only; 0: never).
    #[arg(long, default_value_t = 5)]
    pub asr_points: usize,
    /// The harmful prompts of the attack success rate.
    #[arg(long, default_value = "advbench")]
    pub asr_set: String,
    #[arg(long, default_value_t = 32)]
    pub asr_limit: usize,
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Prompts a generation batch takes: a number, or auto (as evaluate safety's).
    #[arg(long, default_value = "16")]
    pub batch_size: basin_lm::generate::BatchSize,
    /// f32 or bf16 (points are built in f32 either way).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The decoder of the ASR probe's replies: auto, graph, cpu or pass (as evaluate
    /// safety's).
    #[arg(long, default_value = "auto")]
    pub decoder: basin_lm::generate::DecoderKind,
    /// Output directory (default: runs/landscape-<kind>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub struct Summary {
    pub out: PathBuf,
    pub doc: LandscapeDoc,
}

/// Measures every point, then writes landscape.csv, landscape.json and the plots.
pub fn run(args: &Args) -> Result<Summary> {
    if let Some(dir) = &args.replot {
        return replot(dir, args.basin_pct);
    }
    let Some(from) = &args.from else {
        bail!("--from MODEL is required (or --replot DIR)");
    };
    if args.points < 2 {
        bail!(
            "--points {}: a landscape needs at least 2 points per axis",
            args.points
        );
    }
    if args.to.is_none() && !(1..=2).contains(&args.directions) {
        bail!("--directions {}: expected 1 or 2", args.directions);
    }
    if args.basin_pct.is_nan() || args.basin_pct <= 0.0 {
        bail!(
            "--basin-pct {}: expected a positive percentage",
            args.basin_pct
        );
    }
    let (dtype, device) = (parse_dtype(&args.dtype)?, parse_device(&args.device)?);
    // The sets first: a typo fails before a model is loaded.
    let read =
        |set: &str, split: Option<&str>, limit: usize| -> Result<(Vec<PreparedRow>, ProbeSet)> {
            let (file, rows) = prepared_rows(&args.prepared, set, split, limit)?;
            if rows.is_empty() {
                bail!("{}: no rows", file.display());
            }
            let info = ProbeSet {
                set: set.to_string(),
                rows: rows.len(),
                sha256: basin_lm::fsutil::sha256_file(&file)?,
            };
            Ok((rows, info))
        };
    let (utility, utility_info) = read(&args.utility_set, Some("val"), args.limit)?;
    let (safety, safety_info) = read(&args.safety_set, Some("val"), args.limit)?;
    if safety.iter().any(|r| r.example().1 >= r.input_ids.len()) {
        bail!(
            "{}: the safety set needs replies (refusals) to compute a loss on",
            args.safety_set
        );
    }
    let two_d = args.to.is_none() && args.directions == 2;
    let asr_points = if two_d { 0 } else { args.asr_points };
    let (harmful, harmful_info) = if asr_points > 0 {
        let (rows, info) = read(&args.asr_set, None, args.asr_limit)?;
        (rows, Some(info))
    } else {
        (Vec::new(), None)
    };
    let probes = Probes {
        utility,
        safety,
        harmful,
        micro_batch: args.micro_batch,
        batch_size: args.batch_size,
        max_new_tokens: args.max_new_tokens,
    };

    let from = model_path(from);
    let model = Model::open(&from, dtype, &device)?.with_decoder(args.decoder)?;
    let params = Params::of(&model)?;
    let centre = params.snapshot()?;
    let (kind, slice, lo, hi, to) = match &args.to {
        Some(to) => {
            let to = model_path(to);
            let end = params.other(&Model::open(&to, dtype, &device)?)?;
            ("interpolation", Slice::Line { end }, -0.5, 1.5, Some(to))
        }
        None => {
            let dirs = (0..args.directions as u64)
                .map(|k| {
                    filter_normalised_direction(&params.names, &centre, args.seed.wrapping_add(k))
                })
                .collect::<Result<Vec<_>>>()?;
            let kind = if two_d { "random-2d" } else { "random-1d" };
            (kind, Slice::Random { dirs }, -args.span, args.span, None)
        }
    };
    // Hashed before the walk: a model that cannot be hashed fails now, not after it.
    let from_info = ModelHash::of(&from)?;
    let to_info = to.as_deref().map(ModelHash::of).transpose()?;
    let (lo, hi) = (args.alpha_min.unwrap_or(lo), args.alpha_max.unwrap_or(hi));
    if lo.is_nan() || hi.is_nan() || lo >= hi {
        bail!("the α range [{lo}, {hi}] is empty: --alpha-min must be below --alpha-max");
    }
    let xs = grid(lo, hi, args.points);
    let ys = two_d.then(|| xs.clone());
    let asr_at = spread(xs.len(), asr_points);
    let total = xs.len() * ys.as_ref().map_or(1, Vec::len);
    eprintln!(
        "{kind}: {total} points, each {} utility + {} safety rows{}",
        probes.utility.len(),
        probes.safety.len(),
        if asr_at.is_empty() {
            String::new()
        } else {
            format!(
                "; ASR on {} prompts at {} of them",
                probes.harmful.len(),
                asr_at.len()
            )
        }
    );
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_message(kind);
    let started = Instant::now();
    let points = walk(
        &model,
        &params,
        &centre,
        &slice,
        &xs,
        ys.as_deref(),
        &asr_at,
        &probes,
        |d| bar.set_position(d as u64),
    )?;
    bar.finish_and_clear();
    eprintln!("{total} points in {:.1}s", started.elapsed().as_secs_f64());

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("landscape-{kind}")));
    let grid = Grid::of(&points)?;
    let doc = LandscapeDoc {
        kind: kind.to_string(),
        from: from_info,
        to: to_info,
        directions: to.is_none().then(|| Directions {
            count: args.directions,
            seed: args.seed,
            normalisation: "filter (rows), 1-D tensors zero".into(),
        }),
        alpha: AlphaRange {
            min: lo,
            max: hi,
            points: args.points,
        },
        sets: ProbeSets {
            utility: utility_info,
            safety: safety_info,
            asr: harmful_info,
        },
        asr_decoding: Decoding {
            greedy: true,
            max_new_tokens: args.max_new_tokens,
            decoder: Some(model.decoder_used()?),
        },
        dtype: args.dtype.clone(),
        device: args.device.clone(),
        git_commit: basin_lm::provenance::git_commit(),
        command: std::env::args().collect(),
        basin_pct: args.basin_pct,
        basins: basins(&grid, &points, args.basin_pct),
        plots: Vec::new(),
        points,
    };
    write(&out, doc, args.basin_pct)
}

/// `--replot DIR`: the basins and plots again from DIR/landscape.json (another
/// --basin-pct, or a machine with a font), without measuring anything.
fn replot(dir: &Path, pct: f64) -> Result<Summary> {
    let file = dir.join("landscape.json");
    let doc: LandscapeDoc = basin_lm::artifacts::read(&file)?;
    if doc.points.is_empty() {
        bail!("{}: field points is empty", file.display());
    }
    write(dir, doc, pct)
}

/// Basins at `pct`, plots, landscape.csv and landscape.json, written into a fresh directory
/// beside `out` and renamed into place.
fn write(out: &Path, mut doc: LandscapeDoc, pct: f64) -> Result<Summary> {
    let points: Vec<Point> = std::mem::take(&mut doc.points);
    let grid = Grid::of(&points)?;
    let basins = basins(&grid, &points, pct);
    let edge = |open: bool| {
        if open {
            ", reaches the grid's edge"
        } else {
            ""
        }
    };
    let (line, plane) = match &basins {
        Basins::Line { utility, safety } => {
            (vec![("utility", utility), ("safety", safety)], vec![])
        }
        Basins::Plane { utility, safety } => {
            (vec![], vec![("utility", utility), ("safety", safety)])
        }
    };
    for (which, b) in line {
        eprintln!(
            "{which} basin (+{pct}%): width {:.4}{} (α {:.3} to {:.3}; minimum {:.4} at α = {:.3})",
            b.width,
            edge(b.open_lo || b.open_hi),
            b.lo,
            b.hi,
            b.min,
            b.argmin
        );
    }
    for (which, b) in plane {
        eprintln!(
            "{which} basin (+{pct}%): area {:.4} ({} cells){}",
            b.area,
            b.cells,
            edge(b.open)
        );
    }
    basin_lm::fsutil::replace_dir(out, |tmp| {
        let mut plots = Vec::new();
        if load_font().is_some() {
            match &grid.ys {
                None => {
                    let axis = if doc.to.is_none() {
                        "α along the random direction"
                    } else {
                        "α (0: --from, 1: --to)"
                    };
                    for c in charts_1d(&points, axis, pct) {
                        render(tmp, &c)?;
                        plots.push(c.stem);
                    }
                }
                Some(ys) => {
                    for h in heatmaps(&grid.xs, ys, &points, pct) {
                        render_heatmap(tmp, &h)?;
                        plots.push(h.stem);
                    }
                }
            }
        } else {
            eprintln!("plots skipped: no TrueType font found (set BASIN_FONT=/path/to/font.ttf)");
        }
        std::fs::write(tmp.join("landscape.csv"), csv(&points))?;
        doc.basin_pct = pct;
        doc.basins = basins;
        doc.plots = plots;
        doc.points = points;
        basin_lm::artifacts::write(&tmp.join("landscape.json"), &doc)
    })?;
    eprintln!("wrote {}", out.display());
    Ok(Summary {
        out: out.to_path_buf(),
        doc,
    })
}
