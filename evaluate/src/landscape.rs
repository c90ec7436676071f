//! The safety basin: utility and safety losses along lines and planes in weight space.
//!
//! The paper explains forgetting by the shape of two loss landscapes around the aligned
//! model: the utility loss (benign validation rows) has a wide, flat basin, the safety loss
//! (refusal replies to held-out harmful prompts) a narrow one, so a large update leaves the
//! safety basin first. Here both are measured at the same points:
//!
//! - **interpolation**: θ(α) = θ_A + α·(θ_B − θ_A), computed by the EMA kernel's lerp
//!   θ̄ ← β·θ̄ + (1−β)·θ with θ̄ = θ_A, θ = θ_B and β = 1 − α;
//! - **random slices**: θ(a, b) = θ₀ + a·d₁ + b·d₂ along seeded, filter-normalised random
//!   directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"): every row
//!   of d is rescaled to the norm of the same row of θ₀, and the 1-D tensors (norm gains)
//!   get d = 0, as Li et al. do for biases and normalisation layers;
//! - **basin width**: the connected range around a curve's minimum where the loss stays
//!   within (1 + x/100) of that minimum, its ends interpolated linearly between grid points.

use crate::plots::{Chart, Heatmap, Series};
use anyhow::{bail, Context, Result};
use basin_kernels::optim::multi::MultiTensor;
use basin_lm::artifacts::{Decoding, ModelHash};
use basin_lm::model::Model;
use basin_lm::rng::{mix64, SplitMix64};
use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};

/// The model's parameters sorted by name, with an f32 working copy the points are built in
/// (the model's own variable when it computes in f32).
pub struct Params {
    pub names: Vec<String>,
    /// The model's variables.
    model: Vec<Var>,
    /// f32 buffers θ(α) is written into; the same variables as `model` for an f32 model.
    point: Vec<Var>,
}

impl Params {
    pub fn of(model: &Model) -> Result<Self> {
        let data = model.varmap.data().lock().expect("varmap lock");
        let mut named: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        drop(data);
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, model_vars): (Vec<String>, Vec<Var>) = named.into_iter().unzip();
        let point = model_vars
            .iter()
            .map(|v| match v.dtype() {
                DType::F32 => Ok(v.clone()),
                _ => Ok(Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            names,
            model: model_vars,
            point,
        })
    }

    /// f32 copies of the current weights (θ at the centre or at an end of the line).
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        self.point
            .iter()
            .map(|v| Ok(v.as_tensor().copy()?))
            .collect()
    }

    /// f32 copies of another model's weights, on this model's device, checked to have the
    /// same names and shapes.
    pub fn other(&self, other: &Model) -> Result<Vec<Tensor>> {
        let data = other.varmap.data().lock().expect("varmap lock");
        if data.len() != self.names.len() {
            bail!(
                "{} has {} weight tensors, the first model {}: not the same architecture",
                other.path.display(),
                data.len(),
                self.names.len()
            );
        }
        self.names
            .iter()
            .zip(&self.point)
            .map(|(name, mine)| {
                let theirs = data
                    .get(name)
                    .with_context(|| format!("{} has no tensor {name}", other.path.display()))?;
                if theirs.shape() != mine.shape() {
                    bail!(
                        "{name}: shape {:?} in {}, {:?} in the first model",
                        theirs.shape().dims(),
                        other.path.display(),
                        mine.shape().dims()
                    );
                }
                Ok(theirs
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(mine.device())?)
            })
            .collect()
    }

    /// The model's weights ← θ_A + α·(θ_B − θ_A), by the EMA kernel (β = 1 − α).
    pub fn set_interpolated(
        &self,
        kernels: &mut MultiTensor,
        a: &[Tensor],
        b: &[Tensor],
        alpha: f64,
    ) -> Result<()> {
        for (p, t) in self.point.iter().zip(a) {
            p.set(t)?;
        }
        let pairs: Vec<(&Var, &Tensor)> = self.point.iter().zip(b).collect();
        kernels.ema_blend(&pairs, (1.0 - alpha) as f32)?;
        self.sync()
    }

    /// ‖θ − other‖ over every parameter, θ the weights set now (f32, in f64 sums).
    pub fn distance_to(&self, kernels: &mut MultiTensor, other: &[Tensor]) -> Result<f64> {
        let pairs: Vec<(&Tensor, Option<&Tensor>)> = self
            .point
            .iter()
            .zip(other)
            .map(|(p, o)| (p.as_tensor(), Some(o)))
            .collect();
        Ok(kernels.sum_squares(&pairs)?.sqrt())
    }

    /// The model's weights ← θ₀ + Σ cᵢ·dᵢ.
    pub fn set_offset(&self, centre: &[Tensor], dirs: &[(&[Tensor], f64)]) -> Result<()> {
        for (i, p) in self.point.iter().enumerate() {
            let mut t = centre[i].clone();
            for (d, c) in dirs {
                if *c != 0.0 {
                    t = (t + d[i].affine(*c, 0.0)?)?;
                }
            }
            p.set(&t)?;
        }
        self.sync()
    }

    fn sync(&self) -> Result<()> {
        for (m, p) in self.model.iter().zip(&self.point) {
            if m.dtype() != DType::F32 {
                m.set(&p.as_tensor().to_dtype(m.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// A seeded random direction, filter-normalised against `centre` (see the module doc).
/// The numbers come from the crate's own generator on the host, so a seed gives the same
/// direction on every device.
pub fn filter_normalised_direction(
    names: &[String],
    centre: &[Tensor],
    seed: u64,
) -> Result<Vec<Tensor>> {
    names
        .iter()
        .zip(centre)
        .enumerate()
        .map(|(i, (_, theta))| {
            if theta.rank() < 2 {
                return Ok(theta.zeros_like()?);
            }
            let n = theta.elem_count();
            let mut rng = SplitMix64::new(mix64(seed ^ mix64(i as u64)));
            let values: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let d = Tensor::from_vec(values, theta.shape(), &candle_core::Device::Cpu)?
                .to_device(theta.device())?;
            // Rows: the output units of a projection, the tokens of an embedding.
            let row_norm =
                |t: &Tensor| -> Result<Tensor> { Ok(t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?) };
            let scale = (row_norm(theta)? / (row_norm(&d)? + 1e-10)?)?;
            Ok(d.broadcast_mul(&scale)?)
        })
        .collect()
}

/// Evenly spaced values from `lo` to `hi`, both included.
pub fn grid(lo: f64, hi: f64, points: usize) -> Vec<f64> {
    if points < 2 {
        return vec![lo];
    }
    (0..points)
        .map(|i| lo + (hi - lo) * i as f64 / (points - 1) as f64)
        .collect()
}

/// The basin of a sampled curve (see the module doc).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Basin {
    /// Where the sampled minimum is, and its loss.
    pub argmin: f64,
    pub min: f64,
    /// (1 + x/100)·min.
    pub threshold: f64,
    pub lo: f64,
    pub hi: f64,
    pub width: f64,
    /// The loss was still under the threshold at this end of the grid: the basin reaches
    /// further, and the width is a lower bound.
    pub open_lo: bool,
    pub open_hi: bool,
}

/// The basin of `ys` sampled at increasing `xs` (see the module doc); `pct` is x.
pub fn basin_1d(xs: &[f64], ys: &[f64], pct: f64) -> Basin {
    assert!(
        !xs.is_empty() && xs.len() == ys.len(),
        "basin_1d: xs and ys differ"
    );
    let k = (0..ys.len())
        .filter(|&i| ys[i].is_finite())
        .min_by(|&i, &j| ys[i].total_cmp(&ys[j]))
        .unwrap_or(0);
    let min = ys[k];
    let threshold = min + min.abs() * pct / 100.0;
    let inside = |i: usize| ys[i] <= threshold;
    // Where the curve crosses the threshold between grid points i (inside) and j (outside).
    let cross = |i: usize, j: usize| {
        let t = (threshold - ys[i]) / (ys[j] - ys[i]);
        xs[i] + t.clamp(0.0, 1.0) * (xs[j] - xs[i])
    };
    let mut lo_i = k;
    while lo_i > 0 && inside(lo_i - 1) {
        lo_i -= 1;
    }
    let mut hi_i = k;
    while hi_i + 1 < ys.len() && inside(hi_i + 1) {
        hi_i += 1;
    }
    let (open_lo, open_hi) = (lo_i == 0, hi_i + 1 == ys.len());
    let lo = if open_lo {
        xs[0]
    } else {
        cross(lo_i, lo_i - 1)
    };
    let hi = if open_hi {
        xs[ys.len() - 1]
    } else {
        cross(hi_i, hi_i + 1)
    };
    Basin {
        argmin: xs[k],
        min,
        threshold,
        lo,
        hi,
        width: hi - lo,
        open_lo,
        open_hi,
    }
}

/// The basin of a 2-D grid of losses (`zs[i][j]` at (xs[i], ys[j])): the grid cells
/// connected (4-neighbours) to the minimum whose loss is within (1 + x/100) of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Basin2d {
    pub argmin: (f64, f64),
    pub min: f64,
    pub threshold: f64,
    pub cells: usize,
    /// cells × the area of one grid cell (in direction units²).
    pub area: f64,
    /// The region touches the grid's edge: the area is a lower bound.
    pub open: bool,
}

pub fn basin_2d(xs: &[f64], ys: &[f64], zs: &[Vec<f64>], pct: f64) -> Basin2d {
    let (nx, ny) = (xs.len(), ys.len());
    let mut best = (0, 0);
    for i in 0..nx {
        for j in 0..ny {
            let (z, b) = (zs[i][j], zs[best.0][best.1]);
            if z.is_finite() && (z < b || !b.is_finite()) {
                best = (i, j);
            }
        }
    }
    let min = zs[best.0][best.1];
    let threshold = min + min.abs() * pct / 100.0;
    let mut seen = vec![vec![false; ny]; nx];
    let mut stack = vec![best];
    seen[best.0][best.1] = true;
    let (mut cells, mut open) = (0, false);
    while let Some((i, j)) = stack.pop() {
        cells += 1;
        open |= i == 0 || j == 0 || i + 1 == nx || j + 1 == ny;
        let neighbours = [
            (i.wrapping_sub(1), j),
            (i + 1, j),
            (i, j.wrapping_sub(1)),
            (i, j + 1),
        ];
        for (a, b) in neighbours {
            if a < nx && b < ny && !seen[a][b] && zs[a][b] <= threshold {
                seen[a][b] = true;
                stack.push((a, b));
            }
        }
    }
    let step = |v: &[f64]| {
        if v.len() > 1 {
            (v[v.len() - 1] - v[0]) / (v.len() - 1) as f64
        } else {
            0.0
        }
    };
    Basin2d {
        argmin: (xs[best.0], ys[best.1]),
        min,
        threshold,
        cells,
        area: cells as f64 * step(xs) * step(ys),
        open,
    }
}

/// One point of a landscape.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Point {
    pub a: f64,
    /// The second coordinate of a 2-D slice.
    pub b: Option<f64>,
    pub utility_loss: f64,
    pub safety_loss: f64,
    /// Keyword and calibrated attack success rates where they were measured.
    pub asr_keyword: Option<f64>,
    pub asr_calibrated: Option<f64>,
}

/// The coordinates of a landscape's points: α along the first axis, and along the second
/// for a 2-D slice (points in row-major order: a outer, b inner).
pub struct Grid {
    pub xs: Vec<f64>,
    pub ys: Option<Vec<f64>>,
}

impl Grid {
    pub fn of(points: &[Point]) -> Result<Self> {
        let mut xs: Vec<f64> = Vec::new();
        for p in points {
            if xs.last() != Some(&p.a) {
                xs.push(p.a);
            }
        }
        let ys: Option<Vec<f64>> = match points.iter().filter(|p| p.b.is_some()).count() {
            0 => None,
            n if n == points.len() => Some(
                points
                    .iter()
                    .take_while(|p| p.a == points[0].a)
                    .filter_map(|p| p.b)
                    .collect(),
            ),
            _ => bail!("some points have a second coordinate and some do not"),
        };
        let ny = ys.as_ref().map_or(1, Vec::len);
        let regular = xs.len() * ny == points.len()
            && points.iter().enumerate().all(|(k, p)| {
                p.a == xs[k / ny] && ys.as_ref().is_none_or(|ys| p.b == Some(ys[k % ny]))
            });
        if !regular || !xs.windows(2).all(|w| w[0] < w[1]) {
            bail!("the points are not a grid in row-major order");
        }
        Ok(Self { xs, ys })
    }
}

/// The basin of each loss: widths for a line, areas for a plane.
pub fn basins(grid: &Grid, points: &[Point], pct: f64) -> Basins {
    let col = |f: fn(&Point) -> f64| points.iter().map(f).collect::<Vec<_>>();
    match &grid.ys {
        None => Basins::Line {
            utility: basin_1d(&grid.xs, &col(|p| p.utility_loss), pct),
            safety: basin_1d(&grid.xs, &col(|p| p.safety_loss), pct),
        },
        Some(ys) => {
            let table = |f: fn(&Point) -> f64| -> Vec<Vec<f64>> {
                points
                    .chunks(ys.len())
                    .map(|row| row.iter().map(f).collect())
                    .collect()
            };
            Basins::Plane {
                utility: basin_2d(&grid.xs, ys, &table(|p| p.utility_loss), pct),
                safety: basin_2d(&grid.xs, ys, &table(|p| p.safety_loss), pct),
            }
        }
    }
}

/// Both losses' basins: `{"utility": ..., "safety": ...}` in landscape.json.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Basins {
    Line { utility: Basin, safety: Basin },
    Plane { utility: Basin2d, safety: Basin2d },
}

/// `landscape.json`: what `evaluate landscape` measured and how, with the basins and the
/// points; `--replot` reads it back.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandscapeDoc {
    /// interpolation, random-1d or random-2d.
    pub kind: String,
    pub from: ModelHash,
    pub to: Option<ModelHash>,
    /// The random directions (None on a line between two models).
    pub directions: Option<Directions>,
    pub alpha: AlphaRange,
    pub sets: ProbeSets,
    pub asr_decoding: Decoding,
    pub dtype: String,
    pub device: String,
    pub git_commit: String,
    pub command: Vec<String>,
    pub basin_pct: f64,
    pub basins: Basins,
    /// The plots drawn (file stems).
    pub plots: Vec<String>,
    pub points: Vec<Point>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directions {
    pub count: usize,
    pub seed: u64,
    pub normalisation: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlphaRange {
    pub min: f64,
    pub max: f64,
    pub points: usize,
}

/// The prepared sets a landscape is measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSets {
    pub utility: ProbeSet,
    pub safety: ProbeSet,
    pub asr: Option<ProbeSet>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSet {
    pub set: String,
    pub rows: usize,
    pub sha256: String,
}

/// The points as CSV, one line each.
pub fn csv(points: &[Point]) -> String {
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    let mut out = String::from("a,b,utility_loss,safety_loss,asr_keyword,asr_calibrated\n");
    for p in points {
        out.push_str(&format!(
            "{:.6},{},{:.6},{:.6},{},{}\n",
            p.a,
            opt(p.b),
            p.utility_loss,
            p.safety_loss,
            opt(p.asr_keyword),
            opt(p.asr_calibrated)
        ));
    }
    out
}

/// The charts of a 1-D landscape: both losses, both relative to their minimum (with the
/// basin threshold), and the attack success rate where it was measured.
pub fn charts_1d(points: &[Point], axis: &str, pct: f64) -> Vec<Chart> {
    let series = |name: &str, f: &dyn Fn(&Point) -> Option<f64>| Series {
        name: name.into(),
        points: points
            .iter()
            .filter_map(|p| f(p).map(|y| (p.a, y)))
            .collect(),
        line: true,
        ..Default::default()
    };
    let rel = |f: fn(&Point) -> f64| {
        let min = points.iter().map(f).fold(f64::INFINITY, f64::min);
        move |p: &Point| Some(100.0 * (f(p) - min) / min.abs().max(1e-12))
    };
    let threshold = Series {
        name: format!("basin threshold (+{pct}%)"),
        points: points.iter().map(|p| (p.a, pct)).collect(),
        line: true,
        ..Default::default()
    };
    let mut charts = vec![
        Chart {
            stem: "losses".into(),
            title: "Utility and safety loss".into(),
            x: axis.into(),
            y: "cross-entropy".into(),
            series: vec![
                series("utility (benign val)", &|p| Some(p.utility_loss)),
                series("safety (refusals)", &|p| Some(p.safety_loss)),
            ],
            diagonal: false,
        },
        Chart {
            stem: "relative".into(),
            title: "Loss above its minimum".into(),
            x: axis.into(),
            y: "% above the minimum".into(),
            series: vec![
                series("utility", &rel(|p| p.utility_loss)),
                series("safety", &rel(|p| p.safety_loss)),
                threshold,
            ],
            diagonal: false,
        },
    ];
    if points.iter().any(|p| p.asr_keyword.is_some()) {
        charts.push(Chart {
            stem: "asr".into(),
            title: "Attack success rate".into(),
            x: axis.into(),
            y: "ASR (%)".into(),
            series: vec![
                series("keyword", &|p| p.asr_keyword.map(|v| 100.0 * v)),
                series("calibrated", &|p| p.asr_calibrated.map(|v| 100.0 * v)),
            ],
            diagonal: false,
        });
    }
    charts
}

/// The contour maps of a 2-D slice, one per loss: the loss above its minimum in bands of
/// x% (the first band is the basin).
pub fn heatmaps(xs: &[f64], ys: &[f64], points: &[Point], pct: f64) -> Vec<Heatmap> {
    let table = |f: fn(&Point) -> f64| -> Vec<Vec<f64>> {
        xs.iter()
            .enumerate()
            .map(|(i, _)| {
                (0..ys.len())
                    .map(|j| f(&points[i * ys.len() + j]))
                    .collect()
            })
            .collect()
    };
    [
        ("utility-contour", "Utility loss", table(|p| p.utility_loss)),
        ("safety-contour", "Safety loss", table(|p| p.safety_loss)),
    ]
    .into_iter()
    .map(|(stem, title, z)| Heatmap {
        stem: stem.into(),
        title: format!("{title} above its minimum (bands of {pct}%)"),
        x: "direction 1".into(),
        y: "direction 2".into(),
        xs: xs.to_vec(),
        ys: ys.to_vec(),
        z,
        band_pct: pct,
    })
    .collect()
}

/// What every point is measured on.
pub struct Probes {
    /// Benign rows with replies (a set's val split): the utility loss.
    pub utility: Vec<basin_lm::schema::PreparedRow>,
    /// Harmful prompts with refusal replies, held out from training: the safety loss.
    pub safety: Vec<basin_lm::schema::PreparedRow>,
    /// Harmful prompts answered (greedy) where the attack success rate is measured.
    pub harmful: Vec<basin_lm::schema::PreparedRow>,
    pub micro_batch: usize,
    pub batch_size: basin_lm::generate::BatchSize,
    pub max_new_tokens: usize,
}

impl Probes {
    /// (utility loss, safety loss) of the model as its weights are now.
    pub fn losses(&self, model: &Model) -> Result<(f64, f64)> {
        let pad = model.text.tokenizer.eos_id().unwrap_or(0);
        let loss = |rows: &[basin_lm::schema::PreparedRow]| -> Result<f64> {
            let r: Vec<(&[u32], usize)> = rows.iter().map(|r| r.example()).collect();
            Ok(basin_lm::batch::mean_loss(&model.llama, &r, self.micro_batch, pad)?.0)
        };
        Ok((loss(&self.utility)?, loss(&self.safety)?))
    }

    /// (keyword, calibrated) attack success rate on the harmful prompts.
    pub fn asr(&self, model: &Model) -> Result<(f64, f64)> {
        let judge = crate::judges::RefusalJudge::default();
        let prompts: Vec<Vec<u32>> = self
            .harmful
            .iter()
            .map(|r| r.prompt_ids().to_vec())
            .collect();
        let opts = model.options(self.max_new_tokens)?;
        let replies = model.replies_to_ids(&prompts, &opts, self.batch_size, |_| ())?;
        let verdicts: Vec<_> = replies
            .iter()
            .zip(&self.harmful)
            .map(|((reply, _), row)| crate::safety::verdicts(&judge, &row.user, reply))
            .collect();
        let s = crate::safety::score(crate::safety::SetKind::Harmful, &verdicts);
        Ok((s.keyword.rate, s.refusal.rate))
    }
}

/// The plane or line the points lie in.
pub enum Slice {
    /// θ_A + α·(θ_B − θ_A): `centre` is θ_A, this is θ_B.
    Line { end: Vec<Tensor> },
    /// θ₀ + a·d₁ (+ b·d₂).
    Random { dirs: Vec<Vec<Tensor>> },
}

/// Measures both losses at every point of `xs` (× `ys` for a 2-D slice), and the attack
/// success rate at the indices of `xs` in `asr_at` (1-D only); `on_point(done)` after each.
/// The model's weights are back at `centre` when it returns.
#[allow(clippy::too_many_arguments)]
pub fn walk(
    model: &Model,
    params: &Params,
    centre: &[Tensor],
    slice: &Slice,
    xs: &[f64],
    ys: Option<&[f64]>,
    asr_at: &[usize],
    probes: &Probes,
    mut on_point: impl FnMut(usize),
) -> Result<Vec<Point>> {
    let mut kernels = MultiTensor::new();
    let mut points = Vec::new();
    let rows: Vec<Option<f64>> = match ys {
        Some(ys) => ys.iter().copied().map(Some).collect(),
        None => vec![None],
    };
    for (i, &a) in xs.iter().enumerate() {
        for &b in &rows {
            match (slice, b) {
                (Slice::Line { end }, None) => {
                    params.set_interpolated(&mut kernels, centre, end, a)?
                }
                (Slice::Random { dirs }, b) if dirs.len() == 1 + usize::from(b.is_some()) => {
                    let mut offsets = vec![(dirs[0].as_slice(), a)];
                    if let Some(b) = b {
                        offsets.push((dirs[1].as_slice(), b));
                    }
                    params.set_offset(centre, &offsets)?
                }
                _ => bail!("walk: the slice and the grid differ in dimension"),
            }
            let (utility_loss, safety_loss) = probes.losses(model)?;
            let asr = if b.is_none() && asr_at.contains(&i) {
                Some(probes.asr(model)?)
            } else {
                None
            };
            points.push(Point {
                a,
                b,
                utility_loss,
                safety_loss,
                asr_keyword: asr.map(|r| r.0),
                asr_calibrated: asr.map(|r| r.1),
            });
            on_point(points.len());
        }
    }
    params.set_offset(centre, &[])?;
    Ok(points)
}

/// `k` indices spread evenly over `0..n`, both ends included (fewer when n is smaller).
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    let mut out: Vec<usize> = match k {
        0 => vec![],
        1 => vec![n / 2],
        _ => (0..k)
            .map(|i| ((i * (n - 1)) as f64 / (k - 1) as f64).round() as usize)
            .collect(),
    };
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basin_of_a_parabola_is_where_it_crosses_the_threshold() {
        // y = 1 + x²: within +5% where |x| <= sqrt(0.05) = 0.2236.
        let xs = grid(-1.0, 1.0, 201);
        let ys: Vec<f64> = xs.iter().map(|x| 1.0 + x * x).collect();
        let b = basin_1d(&xs, &ys, 5.0);
        assert!((b.argmin).abs() < 1e-12 && (b.min - 1.0).abs() < 1e-12);
        assert!((b.lo + 0.05f64.sqrt()).abs() < 1e-3, "{b:?}");
        assert!((b.hi - 0.05f64.sqrt()).abs() < 1e-3, "{b:?}");
        assert!(!b.open_lo && !b.open_hi);
        // A flatter curve has a wider basin; a threshold past the grid's ends is open.
        let flat: Vec<f64> = xs.iter().map(|x| 1.0 + 0.1 * x * x).collect();
        assert!(basin_1d(&xs, &flat, 5.0).width > b.width);
        let open = basin_1d(&xs, &flat, 50.0);
        assert!(open.open_lo && open.open_hi && (open.width - 2.0).abs() < 1e-12);
    }

    #[test]
    fn basin_stops_at_the_first_crossing_not_at_a_second_valley() {
        // Two valleys: the basin is the one around the lower minimum only.
        let xs = grid(0.0, 4.0, 41);
        let ys: Vec<f64> = xs
            .iter()
            .map(|&x| 1.0 + (x - 1.0).powi(2).min(0.01 + (x - 3.0).powi(2)))
            .collect();
        let b = basin_1d(&xs, &ys, 10.0);
        assert!((b.argmin - 1.0).abs() < 1e-9 && b.hi < 2.0, "{b:?}");
    }

    #[test]
    fn basin_2d_counts_the_connected_cells_under_the_threshold() {
        let xs = grid(-1.0, 1.0, 5);
        let ys = grid(-1.0, 1.0, 5);
        // Bowl around (0, 0) plus a low cell in a corner cut off by high cells.
        let mut zs: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| ys.iter().map(|y| 1.0 + x * x + y * y).collect())
            .collect();
        zs[0][0] = 1.01;
        let b = basin_2d(&xs, &ys, &zs, 30.0);
        // Under 1.3: (0,0) and its 4 neighbours at distance 0.5 (1.25); not the corner.
        assert_eq!(b.cells, 5, "{b:?}");
        assert!(!b.open && (b.area - 5.0 * 0.25).abs() < 1e-12);
    }

    #[test]
    fn filter_normalised_rows_have_the_weights_norms() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::new(&[[3.0f32, 4.0, 0.0], [1.0, 1.0, 1.0]], &dev).unwrap();
        let g = Tensor::new(&[2.0f32, 2.0, 2.0], &dev).unwrap();
        let names = vec!["w".to_string(), "norm".to_string()];
        let centre = [w, g];
        let d = filter_normalised_direction(&names, &centre, 7).unwrap();
        let rows = d[0].sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        let rows: Vec<f32> = rows.to_vec1().unwrap();
        assert!((rows[0] - 5.0).abs() < 1e-5 && (rows[1] - 3f32.sqrt()).abs() < 1e-5);
        assert_eq!(
            d[1].to_vec1::<f32>().unwrap(),
            vec![0.0; 3],
            "1-D: no offset"
        );
        // Seeded: the same seed gives the same direction, another seed another one.
        let values = |seed| -> Vec<Vec<f32>> {
            let d = filter_normalised_direction(&names, &centre, seed).unwrap();
            d[0].to_vec2().unwrap()
        };
        assert_eq!(values(7), d[0].to_vec2::<f32>().unwrap());
        assert_ne!(values(8), values(7));
    }

    #[test]
    fn grid_is_read_back_from_the_points() {
        let point = |a: f64, b: Option<f64>| Point {
            a,
            b,
            utility_loss: 1.0,
            safety_loss: 1.0,
            asr_keyword: None,
            asr_calibrated: None,
        };
        let line: Vec<Point> = [0.0, 0.5, 1.0].iter().map(|&a| point(a, None)).collect();
        let g = Grid::of(&line).unwrap();
        assert_eq!((g.xs, g.ys), (vec![0.0, 0.5, 1.0], None));
        let plane: Vec<Point> = [-1.0, 1.0]
            .iter()
            .flat_map(|&a| [-2.0, 0.0, 2.0].map(|b| point(a, Some(b))))
            .collect();
        let g = Grid::of(&plane).unwrap();
        assert_eq!((g.xs, g.ys), (vec![-1.0, 1.0], Some(vec![-2.0, 0.0, 2.0])));
        // A missing point, a mixed list, a line out of order: not grids.
        assert!(Grid::of(&plane[..5]).is_err());
        assert!(Grid::of(&[point(0.0, None), point(1.0, Some(0.0))]).is_err());
        assert!(Grid::of(&[point(1.0, None), point(0.0, None)]).is_err());
    }

    #[test]
    fn spread_covers_both_ends() {
        assert_eq!(spread(21, 5), vec![0, 5, 10, 15, 20]);
        assert_eq!(spread(3, 5), vec![0, 1, 2]);
        assert_eq!(spread(9, 0), Vec::<usize>::new());
    }
}
