//! The report's plots, each written as SVG and PNG (plotters). Text needs a TrueType font:
//! `BASIN_FONT`, else a common system one (DejaVu Sans, Liberation Sans); without one the
//! plots are skipped and the report says so.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

#[derive(Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Join the points with a line (sorted by x).
    pub line: bool,
    /// A mark for each point (none when empty): its interval and label.
    pub marks: Vec<Mark>,
}

/// What a point shows beside its dot: a vertical interval (a 95% interval of a rate) and a
/// short label (its setting).
#[derive(Clone, Debug, Default)]
pub struct Mark {
    pub interval: Option<(f64, f64)>,
    pub label: String,
}

pub struct Chart {
    /// File stem of the SVG and PNG.
    pub stem: String,
    pub title: String,
    pub x: String,
    pub y: String,
    pub series: Vec<Series>,
    /// Draw the diagonal y = x (for "with vs without" plots).
    pub diagonal: bool,
}

/// Registers a TrueType font as "sans-serif"; the path found, or None.
pub fn load_font() -> Option<String> {
    let candidates = std::env::var("BASIN_FONT").into_iter().chain(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/Library/Fonts/Arial.ttf",
        ]
        .map(String::from),
    );
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Some(path);
            }
        }
    }
    None
}

fn bounds(chart: &Chart) -> (f64, f64, f64, f64) {
    // The points, and the ends of their intervals.
    let ends: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().zip(&s.marks))
        .filter_map(|(p, m)| m.interval.map(|(lo, hi)| [(p.0, lo), (p.0, hi)]))
        .flatten()
        .collect();
    let pts = || chart.series.iter().flat_map(|s| &s.points).chain(&ends);
    let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if chart.diagonal {
        (x0, y0) = (x0.min(y0), x0.min(y0));
        (x1, y1) = (x1.max(y1), x1.max(y1));
    }
    let pad = |a: f64, b: f64| ((b - a).abs() * 0.08).max(1e-3);
    let (px, py) = (pad(x0, x1), pad(y0, y1));
    // Room on the right for the labels of the rightmost points.
    let labelled = chart
        .series
        .iter()
        .any(|s| s.marks.iter().any(|m| !m.label.is_empty()));
    let right = if labelled { 3.0 * px } else { px };
    (x0 - px, x1 + right, y0 - py, y1 + py)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plot {}: {e:?}", chart.stem);
    root.fill(&WHITE).map_err(e)?;
    let (x0, x1, y0, y1) = bounds(chart);
    let mut c = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    c.configure_mesh()
        .x_desc(&chart.x)
        .y_desc(&chart.y)
        .draw()
        .map_err(e)?;
    if chart.diagonal {
        let (a, b) = (x0.max(y0), x1.min(y1));
        c.draw_series(LineSeries::new([(a, a), (b, b)], BLACK.mix(0.3)))
            .map_err(e)?;
    }
    for (i, s) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut pts = s.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if s.line {
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(e)?;
        }
        let intervals = s
            .points
            .iter()
            .zip(&s.marks)
            .filter_map(|(p, m)| m.interval.map(|(lo, hi)| (p.0, lo, hi)));
        c.draw_series(
            intervals
                .map(|(x, lo, hi)| PathElement::new(vec![(x, lo), (x, hi)], color.stroke_width(1))),
        )
        .map_err(e)?;
        let labels = s
            .points
            .iter()
            .zip(&s.marks)
            .filter(|(_, m)| !m.label.is_empty());
        c.draw_series(labels.map(|(&p, m)| {
            EmptyElement::at(p) + Text::new(m.label.clone(), (7, -14), ("sans-serif", 11))
        }))
        .map_err(e)?;
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(e)?
            .label(&s.name)
            .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Writes `<dir>/<stem>.svg` and `<dir>/<stem>.png`.
pub fn render(dir: &Path, chart: &Chart) -> Result<()> {
    let size = (720, 480);
    let svg = dir.join(format!("{}.svg", chart.stem));
    draw(SVGBackend::new(&svg, size).into_drawing_area(), chart)?;
    let png = dir.join(format!("{}.png", chart.stem));
    draw(BitMapBackend::new(&png, size).into_drawing_area(), chart)?;
    Ok(())
}

/// A filled contour map: `z[i][j]` at (xs[i], ys[j]) drawn as cells coloured by how far
/// the value is above the grid's minimum, in bands of `band_pct` percent.
pub struct Heatmap {
    pub stem: String,
    pub title: String,
    pub x: String,
    pub y: String,
    pub xs: Vec<f64>,
    pub ys: Vec<f64>,
    pub z: Vec<Vec<f64>>,
    pub band_pct: f64,
}

/// Band colours, dark (the basin) to light; the last one holds everything above.
const BANDS: [RGBColor; 8] = [
    RGBColor(13, 8, 135),
    RGBColor(84, 2, 163),
    RGBColor(139, 10, 165),
    RGBColor(185, 50, 137),
    RGBColor(219, 92, 104),
    RGBColor(244, 136, 73),
    RGBColor(254, 188, 43),
    RGBColor(240, 249, 33),
];

impl Heatmap {
    /// The band of each cell: ⌊(z − min)/min / band_pct%⌋, capped at the last colour.
    pub fn bands(&self) -> Vec<Vec<usize>> {
        let min = self
            .z
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f64::INFINITY, f64::min);
        let last = BANDS.len() - 1;
        self.z
            .iter()
            .map(|row| {
                row.iter()
                    .map(|&v| {
                        let rel = 100.0 * (v - min) / min.abs().max(1e-12);
                        if rel.is_finite() {
                            ((rel / self.band_pct).floor() as usize).min(last)
                        } else {
                            last
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

fn draw_heatmap<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, map: &Heatmap) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plot {}: {e:?}", map.stem);
    root.fill(&WHITE).map_err(e)?;
    let half = |v: &[f64]| {
        if v.len() > 1 {
            (v[v.len() - 1] - v[0]) / (v.len() - 1) as f64 / 2.0
        } else {
            0.5
        }
    };
    let (hx, hy) = (half(&map.xs), half(&map.ys));
    let (x0, x1) = (map.xs[0] - hx, map.xs[map.xs.len() - 1] + hx);
    let (y0, y1) = (map.ys[0] - hy, map.ys[map.ys.len() - 1] + hy);
    let mut c = ChartBuilder::on(&root)
        .caption(&map.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .right_y_label_area_size(10)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    c.configure_mesh()
        .disable_mesh()
        .x_desc(&map.x)
        .y_desc(&map.y)
        .draw()
        .map_err(e)?;
    let bands = map.bands();
    for (i, &x) in map.xs.iter().enumerate() {
        for (j, &y) in map.ys.iter().enumerate() {
            let colour = BANDS[bands[i][j]];
            c.draw_series(std::iter::once(Rectangle::new(
                [(x - hx, y - hy), (x + hx, y + hy)],
                colour.filled(),
            )))
            .map_err(e)?;
        }
    }
    // One legend entry per band that appears.
    let used: std::collections::BTreeSet<usize> = bands.iter().flatten().copied().collect();
    for k in used {
        let (lo, hi) = (k as f64 * map.band_pct, (k + 1) as f64 * map.band_pct);
        let label = if k + 1 == BANDS.len() {
            format!(">= +{lo}%")
        } else {
            format!("+{lo}% to +{hi}%")
        };
        let colour = BANDS[k];
        c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| {
                Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], colour.filled())
            });
    }
    // The centre of the slice (the model itself).
    c.draw_series(std::iter::once(Cross::new(
        (0.0, 0.0),
        6,
        WHITE.stroke_width(2),
    )))
    .map_err(e)?;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Writes `<dir>/<stem>.svg` and `<dir>/<stem>.png` of a contour map.
pub fn render_heatmap(dir: &Path, map: &Heatmap) -> Result<()> {
    let size = (640, 560);
    let svg = dir.join(format!("{}.svg", map.stem));
    draw_heatmap(SVGBackend::new(&svg, size).into_drawing_area(), map)?;
    let png = dir.join(format!("{}.png", map.stem));
    draw_heatmap(BitMapBackend::new(&png, size).into_drawing_area(), map)?;
    Ok(())
}
