//! What the report's numbers say of the paper's claims, each stated as supported,
//! contradicted or inconclusive at the sample size at hand, with the evidence; EMA against
//! WiSE-FT prompt by prompt; and the compute each method spent.
//!
//! The settings the claims name are picked by rules, not by hand (among the plain θ rows:
//! fine-tuned without safety data):
//! - **aggressive**: the highest learning rate, then the most steps, then the smallest batch;
//! - **tuned**: the lowest keyword ASR, then the lowest validation loss. Picking the lowest of
//!   several rates favours it; the tests do not correct for that.
//!
//! A difference counts when its test says p < 0.05 (two-sided) after Holm's adjustment over
//! the claims that a test decides (up to four: (a) to (d)), so that the section as a whole
//! calls a chance difference a finding at most 5% of the time: the exact McNemar test on the
//! prompts both models answered for two models ([`Paired`]); for the ≥3x claim, the test of
//! the log ratio of two rates against log 3 (Katz's standard error), whose 95% interval the
//! evidence gives.

use crate::landscape::{Basins, LandscapeDoc};
use crate::report::{paired_groups, Group, Paired, Row, Weights};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// How a claim stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Supported,
    Contradicted,
    /// Measured, but the difference is within what chance gives at this sample size.
    Inconclusive,
    /// Nothing to decide it on (the runs, baselines or landscape it needs are absent).
    NotMeasured,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Self::Supported => "supported",
            Self::Contradicted => "contradicted",
            Self::Inconclusive => "inconclusive",
            Self::NotMeasured => "not measured",
        }
    }
}

/// One claim, its verdict, and the numbers behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    /// (a) to (e).
    pub id: char,
    pub statement: &'static str,
    pub verdict: Verdict,
    pub evidence: String,
    /// The two-sided p of the test that decides it, before [`holm`]'s adjustment (None:
    /// no test decides it).
    pub p: Option<f64>,
}

const SIGNIFICANT: f64 = 0.05;

/// The verdict of "the second model has a lower ASR than the first" from their pairs.
fn lower(p: &Paired) -> Verdict {
    let (a, b) = p.rates();
    if p.pairs == 0 {
        Verdict::NotMeasured
    } else if p.p() >= SIGNIFICANT {
        Verdict::Inconclusive
    } else if b < a {
        Verdict::Supported
    } else {
        Verdict::Contradicted
    }
}

/// The opposite claim of [`lower`]: the second model's ASR is higher.
fn higher(p: &Paired) -> Verdict {
    match lower(p) {
        Verdict::Supported => Verdict::Contradicted,
        Verdict::Contradicted => Verdict::Supported,
        v => v,
    }
}

/// Two models' pairs in words: "x% vs y% on n prompts (a only, b only), McNemar p".
fn pairs_text(p: &Paired, a: &str, b: &str) -> String {
    let (ra, rb) = p.rates();
    format!(
        "{a} {:.1}% vs {b} {:.1}% on the {} prompts both answered ({} unsafe under {a} only, {} under {b} only; exact McNemar p = {})",
        100.0 * ra,
        100.0 * rb,
        p.pairs,
        p.a_only,
        p.b_only,
        crate::report::format_p(p.p())
    )
}

/// The ratio of two rates k1/n1 over k2/n2 and its 95% interval by Katz's log method (half
/// a count added to each cell when either count is zero).
pub fn rate_ratio(k1: usize, n1: usize, k2: usize, n2: usize) -> (f64, f64, f64) {
    let (ratio, se) = log_ratio(k1, n1, k2, n2);
    let z = 1.959_963_984_540_054;
    (ratio, ratio * (-z * se).exp(), ratio * (z * se).exp())
}

/// The two-sided p of "the ratio of rates k1/n1 over k2/n2 is `against`": the log ratio's
/// distance from log `against` in Katz's standard errors, under the normal. p < 0.05 exactly
/// where [`rate_ratio`]'s 95% interval leaves out `against`.
pub fn rate_ratio_p(k1: usize, n1: usize, k2: usize, n2: usize, against: f64) -> f64 {
    let (ratio, se) = log_ratio(k1, n1, k2, n2);
    if se == 0.0 {
        return if ratio == against { 1.0 } else { 0.0 };
    }
    let z = (ratio.ln() - against.ln()).abs() / se;
    erfc(z / std::f64::consts::SQRT_2)
}

/// The ratio of two rates and the standard error of its log (Katz), half a count added to
/// each cell when either count is zero.
fn log_ratio(k1: usize, n1: usize, k2: usize, n2: usize) -> (f64, f64) {
    let (mut k1, mut n1, mut k2, mut n2) = (k1 as f64, n1 as f64, k2 as f64, n2 as f64);
    if k1 == 0.0 || k2 == 0.0 {
        (k1, n1, k2, n2) = (k1 + 0.5, n1 + 1.0, k2 + 0.5, n2 + 1.0);
    }
    let se = (1.0 / k1 - 1.0 / n1 + 1.0 / k2 - 1.0 / n2).max(0.0).sqrt();
    ((k1 / n1) / (k2 / n2), se)
}

/// The complementary error function, to a relative 1.2e-7 everywhere (the Chebyshev fit
/// `erfcc` of Press et al., Numerical Recipes, §6.2).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * (-z * z + poly).exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Holm's step-down adjustment over the claims a test decides: the k-th smallest of their m
/// p values is multiplied by m − k + 1 (at most 1) and kept at least as large as those
/// before it. A claim whose adjusted p is not below [`SIGNIFICANT`] is inconclusive,
/// whatever its own p; each tested claim's evidence gives its adjusted p when there are
/// several.
fn holm(claims: &mut [Claim]) {
    let mut tested: Vec<usize> = (0..claims.len())
        .filter(|&i| claims[i].p.is_some())
        .collect();
    let p = |c: &Claim| c.p.unwrap_or(1.0);
    tested.sort_by(|&a, &b| p(&claims[a]).total_cmp(&p(&claims[b])));
    let m = tested.len();
    let mut adjusted = 0f64;
    for (k, &i) in tested.iter().enumerate() {
        let c = &mut claims[i];
        adjusted = adjusted.max(((m - k) as f64 * p(c)).min(1.0));
        if m > 1 {
            // One more digit than the report's p values: an adjusted p near 0.05 decides.
            c.evidence.push_str(&format!(
                " Holm-adjusted over the {m} tested claims: p = {}.",
                crate::report::format_p_digits(adjusted, 3)
            ));
        }
        if adjusted >= SIGNIFICANT
            && matches!(c.verdict, Verdict::Supported | Verdict::Contradicted)
        {
            c.verdict = Verdict::Inconclusive;
        }
    }
}

/// A group's setting in words: "lr 1e-4, batch 4, 12 steps".
fn setting(g: &Group) -> String {
    let r = &g.rows[0];
    let mut s = r.lr.map_or(String::new(), |lr| format!("lr {lr:e}"));
    if let Some(b) = r.batch {
        s.push_str(&format!(", batch {b}"));
    }
    if let Some(n) = r.steps {
        s.push_str(&format!(", {n} steps"));
    }
    if !g.other.is_empty() {
        s.push_str(&format!(" ({})", g.other));
    }
    s
}

fn is_plain(g: &Group, w: Weights) -> bool {
    g.rows[0].weights == w && !g.rows[0].safety_data
}

/// The aggressive θ group of the rules in the module doc.
fn aggressive(groups: &[Group]) -> Option<&Group> {
    let key = |g: &&Group| {
        let r = &g.rows[0];
        (
            r.lr.unwrap_or(0.0),
            r.steps.unwrap_or(0),
            std::cmp::Reverse(r.batch.unwrap_or(0)),
        )
    };
    groups
        .iter()
        .filter(|g| is_plain(g, Weights::Theta) && g.asr_keyword.is_some())
        .max_by(|a, b| {
            let (a, b) = (key(a), key(b));
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        })
}

/// The tuned θ group of the rules in the module doc.
fn tuned(groups: &[Group]) -> Option<&Group> {
    let key = |g: &Group| {
        (
            g.asr_keyword.as_ref().map_or(f64::INFINITY, |r| r.rate),
            g.val_loss.unwrap_or(f64::INFINITY),
        )
    };
    groups
        .iter()
        .filter(|g| is_plain(g, Weights::Theta) && g.asr_keyword.is_some())
        .min_by(|a, b| {
            let (a, b) = (key(a), key(b));
            a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1))
        })
}

/// Each EMA group with the same run's WiSE-FT group nearest it in validation loss:
/// (EMA group, WiSE-FT group, pairs with the EMA first).
pub fn ema_vs_wise(groups: &[Group], harmful: &str) -> Result<Vec<(usize, usize, Paired)>> {
    let mut out = Vec::new();
    for (i, e) in groups.iter().enumerate() {
        let r = &e.rows[0];
        let Some(loss) = e.val_loss.filter(|_| r.weights == Weights::Ema) else {
            continue;
        };
        let nearest = groups
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                let x = &w.rows[0];
                matches!(x.weights, Weights::Wise(_))
                    && x.setting == r.setting
                    && x.steps == r.steps
                    && w.val_loss.is_some()
            })
            .min_by(|(_, a), (_, b)| {
                let d = |g: &Group| (g.val_loss.unwrap_or(f64::INFINITY) - loss).abs();
                d(a).total_cmp(&d(b))
            });
        if let Some((j, w)) = nearest {
            let p = paired_groups(e, w, harmful)?;
            if p.pairs > 0 {
                out.push((i, j, p));
            }
        }
    }
    Ok(out)
}

fn claim(id: char, statement: &'static str, verdict: Verdict, evidence: String) -> Claim {
    Claim {
        id,
        statement,
        verdict,
        evidence,
        p: None,
    }
}

/// [`claim`] decided by a test of two-sided p `p`.
fn tested(claim: Claim, p: f64) -> Claim {
    Claim {
        p: Some(p),
        ..claim
    }
}

/// [`claim`] decided by the McNemar test of `pairs` (when there are any).
fn paired(claim: Claim, pairs: &Paired) -> Claim {
    if pairs.pairs == 0 {
        claim
    } else {
        tested(claim, pairs.p())
    }
}

/// The claims (a) to (e) from the table's groups, the aligned model (the reference the
/// points start from), EMA-vs-WiSE-FT pairs of [`ema_vs_wise`] and the landscapes given.
pub fn claims(
    groups: &[Group],
    aligned: Option<&Row>,
    wise: &[(usize, usize, Paired)],
    landscapes: &[(String, LandscapeDoc)],
    harmful: &str,
) -> Result<Vec<Claim>> {
    let mut out = Vec::new();
    let (agg, tun) = (aggressive(groups), tuned(groups));

    // (a) Aggressive settings raise the ASR above the aligned model's.
    const A: &str = "Fine-tuning on benign data with aggressive settings raises the ASR above the aligned model's.";
    out.push(match (agg, aligned) {
        (Some(g), Some(refr)) => {
            let evals: Vec<(&Path, &Path)> =
                g.rows.iter().map(|r| (refr.eval_dir(), r.eval_dir())).collect();
            let p = Paired::of(&evals, harmful)?;
            let v = higher(&p);
            let text = format!(
                "The aggressive θ ({}) against the aligned model: {}.",
                setting(g),
                pairs_text(&p, "aligned", "θ")
            );
            paired(claim('a', A, v, text), &p)
        }
        _ => claim(
            'a',
            A,
            Verdict::NotMeasured,
            "Needs a plain fine-tune and the aligned model as a reference (`--reference aligned=...`).".into(),
        ),
    });

    // (b) Tuning cuts the ASR at least 3x.
    const B: &str = "Tuning the learning rate, batch size and steps cuts the ASR at least 3x.";
    out.push(match (agg, tun) {
        (Some(a), Some(t)) if !std::ptr::eq(a, t) => {
            let (ra, rt) = (a.asr_keyword.as_ref().unwrap(), t.asr_keyword.as_ref().unwrap());
            let (ratio, lo, hi) = rate_ratio(ra.k, ra.n, rt.k, rt.n);
            let p = rate_ratio_p(ra.k, ra.n, rt.k, rt.n, 3.0);
            let v = if lo >= 3.0 {
                Verdict::Supported
            } else if hi < 3.0 {
                Verdict::Contradicted
            } else {
                Verdict::Inconclusive
            };
            let c = claim(
                'b',
                B,
                v,
                format!(
                    "The aggressive θ ({}) {:.1}% ({}/{}) against the tuned θ ({}) {:.1}% ({}/{}): {ratio:.1}x, 95% interval [{lo:.1}, {hi:.1}], p = {} against 3x.",
                    setting(a),
                    100.0 * ra.rate,
                    ra.k,
                    ra.n,
                    setting(t),
                    100.0 * rt.rate,
                    rt.k,
                    rt.n,
                    crate::report::format_p(p)
                ),
            );
            tested(c, p)
        }
        _ => claim(
            'b',
            B,
            Verdict::NotMeasured,
            "Needs at least two plain fine-tuning settings.".into(),
        ),
    });

    // (c) The EMA cuts it further, at no loss of utility.
    const C: &str = "The EMA cuts the ASR below the tuned θ's at no loss of utility.";
    out.push(match tun {
        None => claim('c', C, Verdict::NotMeasured, "Needs a plain fine-tune.".into()),
        Some(t) => match t.val_loss {
            None => claim(
                'c',
                C,
                Verdict::NotMeasured,
                "The tuned θ has no validation loss (`evaluate utility`).".into(),
            ),
            Some(loss) => {
                let best = groups
                    .iter()
                    .filter(|g| is_plain(g, Weights::Ema) && g.val_loss.is_some_and(|l| l <= loss))
                    .min_by(|a, b| {
                        let r = |g: &Group| g.asr_keyword.as_ref().map_or(f64::INFINITY, |r| r.rate);
                        r(a).total_cmp(&r(b))
                    });
                match best {
                    None => claim(
                        'c',
                        C,
                        Verdict::Inconclusive,
                        format!(
                            "No EMA model is as useful as the tuned θ ({}, validation loss {loss:.4}): none has a loss at or below it.",
                            setting(t)
                        ),
                    ),
                    Some(e) => {
                        let p = paired_groups(t, e, harmful)?;
                        let c = claim(
                            'c',
                            C,
                            lower(&p),
                            format!(
                                "The safest EMA at least as useful as the tuned θ ({}, loss {loss:.4}) is that of {} (loss {:.4}): {}.",
                                setting(t),
                                setting(e),
                                e.val_loss.unwrap_or(f64::NAN),
                                pairs_text(&p, "tuned θ", "EMA")
                            ),
                        );
                        paired(c, &p)
                    }
                }
            }
        },
    });

    // (d) EMA against interpolation at equal utility.
    const D: &str = "The EMA keeps more safety than weight interpolation toward the start (WiSE-FT) at equal utility.";
    out.push(if wise.is_empty() {
        claim(
            'd',
            D,
            Verdict::NotMeasured,
            "No WiSE-FT models with replies and validation losses (`[baselines] wise_ft` in the sweep).".into(),
        )
    } else {
        let mut total = Paired::default();
        for (_, _, p) in wise {
            total.add(p);
        }
        let gap: Vec<f64> = wise
            .iter()
            .filter_map(|(e, w, _)| Some((groups[*e].val_loss? - groups[*w].val_loss?).abs()))
            .collect();
        let max_gap = gap.iter().copied().fold(0.0, f64::max);
        let c = claim(
            'd',
            D,
            higher(&total),
            format!(
                "Each EMA against its run's interpolation nearest in validation loss (largest gap {max_gap:.4}), pooled over {} pairs of models: {}.",
                wise.len(),
                pairs_text(&total, "EMA", "WiSE-FT")
            ),
        );
        paired(c, &total)
    });

    // (e) The utility basin is wider than the safety basin.
    const E: &str =
        "Around the aligned model the utility loss's basin is wider than the safety loss's.";
    out.push(if landscapes.is_empty() {
        claim(
            'e',
            E,
            Verdict::NotMeasured,
            "No landscape given: `just landscape` measures one, `evaluate report --landscape runs/landscape-random-1d/landscape.json` reads it.".into(),
        )
    } else {
        let mut verdicts = Vec::new();
        let mut texts = Vec::new();
        for (path, doc) in landscapes {
            // (utility, its lower-bound flag, safety, its flag, unit)
            let (u, u_open, s, s_open, unit) = match &doc.basins {
                Basins::Line { utility, safety } => (
                    utility.width,
                    utility.open_lo || utility.open_hi,
                    safety.width,
                    safety.open_lo || safety.open_hi,
                    "width",
                ),
                Basins::Plane { utility, safety } => {
                    (utility.area, utility.open, safety.area, safety.open, "area")
                }
            };
            // An open basin's size is a lower bound: it decides only in its own favour.
            let v = if u > s && !s_open {
                Verdict::Supported
            } else if u < s && !u_open {
                Verdict::Contradicted
            } else {
                Verdict::Inconclusive
            };
            verdicts.push(v);
            let bound = |open: bool| if open { " (at least: open at the grid's edge)" } else { "" };
            texts.push(format!(
                "{} ({}, within {}% of each minimum): utility {unit} {u:.3}{}, safety {unit} {s:.3}{}",
                path,
                doc.kind,
                doc.basin_pct,
                bound(u_open),
                bound(s_open)
            ));
        }
        let v = if verdicts.iter().all(|v| *v == Verdict::Supported) {
            Verdict::Supported
        } else if verdicts.iter().all(|v| *v == Verdict::Contradicted) {
            Verdict::Contradicted
        } else {
            Verdict::Inconclusive
        };
        claim('e', E, v, format!("{}.", texts.join("; ")))
    });
    holm(&mut out);
    Ok(out)
}

/// What one method spent.
#[derive(Clone, Debug, PartialEq)]
pub struct Compute {
    pub method: String,
    /// Models of the table scored for it, and the runs they came from.
    pub models: usize,
    pub runs: usize,
    /// Training seconds of those runs (each once), and their mean; None when a run's
    /// metrics have no step times.
    pub train_seconds: Option<f64>,
    /// Seconds generating the models' replies.
    pub generation_seconds: Option<f64>,
}

/// The compute of each method of the table, in the table's order of methods.
pub fn compute(groups: &[Group]) -> Vec<Compute> {
    let mut by_method: BTreeMap<(u8, String), Vec<&Row>> = BTreeMap::new();
    for r in groups.iter().flat_map(|g| &g.rows) {
        let order = match r.weights {
            Weights::Theta => 0,
            Weights::Ema => 1,
            Weights::Wise(_) => 2,
        };
        by_method.entry((order, r.method())).or_default().push(r);
    }
    by_method
        .into_iter()
        .map(|((_, method), rows)| {
            // A run's training once: the most seconds any of its rows records (its end).
            let mut runs: BTreeMap<&str, Option<f64>> = BTreeMap::new();
            for r in &rows {
                let e = runs.entry(r.run.as_str()).or_insert(r.train_seconds);
                *e = match (*e, r.train_seconds) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            let sum = |v: Vec<Option<f64>>| -> Option<f64> {
                v.into_iter()
                    .collect::<Option<Vec<f64>>>()
                    .map(|v| v.iter().sum())
            };
            Compute {
                method,
                models: rows.len(),
                runs: runs.len(),
                train_seconds: sum(runs.values().copied().collect()),
                generation_seconds: sum(rows.iter().map(|r| r.generation_seconds).collect()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_ratio_interval_is_katzs() {
        // 40/40 against 2/40: 20x, log-se √(1/40 − 1/40 + 1/2 − 1/40) = √0.475.
        let (r, lo, hi) = rate_ratio(40, 40, 2, 40);
        let se = 0.475f64.sqrt();
        assert!((r - 20.0).abs() < 1e-12);
        assert!((lo - 20.0 * (-1.959_963_984_540_054 * se).exp()).abs() < 1e-9);
        assert!((hi * lo - 400.0).abs() < 1e-6, "symmetric on the log scale");
        // A zero count: half a count added to each cell, not an infinite ratio.
        let (r, lo, hi) = rate_ratio(10, 20, 0, 20);
        assert!((r - (10.5 / 21.0) / (0.5 / 21.0)).abs() < 1e-12);
        assert!(lo.is_finite() && hi.is_finite() && lo < r && r < hi);
    }

    /// A landscape.json along a line with these basin widths (and open flags).
    fn line(utility: (f64, bool), safety: (f64, bool)) -> LandscapeDoc {
        let basin = |(w, open): (f64, bool)| {
            serde_json::json!({"argmin": 0.0, "min": 1.0, "threshold": 1.05, "lo": -w / 2.0,
                "hi": w / 2.0, "width": w, "open_lo": open, "open_hi": false})
        };
        let set = serde_json::json!({"set": "s", "rows": 4, "sha256": "0"});
        serde_json::from_value(serde_json::json!({
            "kind": "random-1d", "from": {"path": "m", "sha256": "0"}, "to": null,
            "directions": null, "alpha": {"min": -1.0, "max": 1.0, "points": 5},
            "sets": {"utility": set, "safety": set, "asr": null},
            "asr_decoding": {"greedy": true, "max_new_tokens": 8},
            "dtype": "f32", "device": "cpu", "git_commit": "abc", "command": [],
            "basin_pct": 5.0, "basins": {"utility": basin(utility), "safety": basin(safety)},
            "plots": [], "points": []
        }))
        .unwrap()
    }

    #[test]
    fn the_basin_claim_reads_the_widths_and_trusts_an_open_basin_only_in_its_favour() {
        let verdict = |docs: Vec<LandscapeDoc>| {
            let named: Vec<(String, LandscapeDoc)> = docs
                .into_iter()
                .map(|d| ("l.json".to_string(), d))
                .collect();
            let c = claims(&[], None, &[], &named, "advbench").unwrap();
            let e = c.iter().find(|c| c.id == 'e').unwrap().clone();
            (e.verdict, e.evidence)
        };
        let (v, text) = verdict(vec![line((0.8, false), (0.2, false))]);
        assert_eq!(v, Verdict::Supported);
        assert!(
            text.contains("utility width 0.800, safety width 0.200"),
            "{text}"
        );
        assert_eq!(
            verdict(vec![line((0.2, false), (0.8, false))]).0,
            Verdict::Contradicted
        );
        // The safety basin runs off the grid: its width is only a lower bound.
        let (v, text) = verdict(vec![line((0.8, false), (0.2, true))]);
        assert_eq!(v, Verdict::Inconclusive);
        assert!(
            text.contains("(at least: open at the grid's edge)"),
            "{text}"
        );
        // An open utility basin narrower than a closed safety one decides nothing either;
        // wider, it does.
        assert_eq!(
            verdict(vec![line((0.1, true), (0.2, false))]).0,
            Verdict::Inconclusive
        );
        assert_eq!(
            verdict(vec![line((0.9, true), (0.2, false))]).0,
            Verdict::Supported
        );
        // Two landscapes that disagree.
        let two = vec![
            line((0.8, false), (0.2, false)),
            line((0.2, false), (0.8, false)),
        ];
        assert_eq!(verdict(two).0, Verdict::Inconclusive);
        assert_eq!(verdict(vec![]).0, Verdict::NotMeasured);
    }

    #[test]
    fn without_runs_every_claim_says_what_it_needs() {
        let c = claims(&[], None, &[], &[], "advbench").unwrap();
        let ids: String = c.iter().map(|c| c.id).collect();
        assert_eq!(ids, "abcde");
        assert!(c.iter().all(|c| c.verdict == Verdict::NotMeasured), "{c:?}");
    }

    /// The ≥3x claim's p agrees with its interval: below 0.05 exactly where the interval
    /// leaves out 3; and the normal tail it reads is right (erfc to 1.2e-7).
    #[test]
    fn the_rate_ratio_test_agrees_with_its_interval() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        let z = 1.959_963_984_540_054;
        assert!((erfc(z / std::f64::consts::SQRT_2) - 0.05).abs() < 1e-7);
        assert!((erfc(-1.0) - (2.0 - erfc(1.0))).abs() < 1e-12);
        for (k1, n1, k2, n2) in [
            (40, 40, 2, 40),
            (30, 100, 5, 100),
            (20, 50, 6, 50),
            (9, 20, 0, 20),
        ] {
            let (_, lo, hi) = rate_ratio(k1, n1, k2, n2);
            let p = rate_ratio_p(k1, n1, k2, n2, 3.0);
            assert_eq!(
                p < 0.05,
                !(lo..=hi).contains(&3.0),
                "{k1}/{n1} vs {k2}/{n2}: p {p}"
            );
        }
        // At the interval's edge, p is 0.05.
        let (_, lo, _) = rate_ratio(40, 40, 2, 40);
        assert!((rate_ratio_p(40, 40, 2, 40, lo) - 0.05).abs() < 1e-6);
    }

    /// Holm's adjustment: of p = 0.01, 0.03, 0.04 and 0.5 only the first stays below 0.05
    /// (adjusted 0.04, then 0.09, 0.09 and 0.5), so the other two findings become
    /// inconclusive; a claim no test decides keeps its verdict; one tested claim alone is its
    /// own test.
    #[test]
    fn holm_keeps_what_survives_the_number_of_claims_tested() {
        let c = |id, verdict, p: Option<f64>| Claim {
            id,
            statement: "",
            verdict,
            evidence: "e.".into(),
            p,
        };
        let mut claims = vec![
            c('a', Verdict::Supported, Some(0.03)),
            c('b', Verdict::Contradicted, Some(0.01)),
            c('c', Verdict::Supported, Some(0.04)),
            c('d', Verdict::Inconclusive, Some(0.5)),
            c('e', Verdict::Supported, None),
        ];
        holm(&mut claims);
        let v: Vec<Verdict> = claims.iter().map(|c| c.verdict).collect();
        use Verdict::*;
        assert_eq!(
            v,
            [
                Inconclusive,
                Contradicted,
                Inconclusive,
                Inconclusive,
                Supported
            ]
        );
        assert!(
            claims[1]
                .evidence
                .ends_with("Holm-adjusted over the 4 tested claims: p = 4.00e-2."),
            "{}",
            claims[1].evidence
        );
        assert!(
            claims[0].evidence.ends_with("p = 9.00e-2."),
            "{}",
            claims[0].evidence
        );
        assert!(
            claims[2].evidence.ends_with("p = 9.00e-2."),
            "{}",
            claims[2].evidence
        );
        assert_eq!(claims[4].evidence, "e.");
        let mut one = vec![c('a', Verdict::Supported, Some(0.04))];
        holm(&mut one);
        assert_eq!(
            (one[0].verdict, one[0].evidence.as_str()),
            (Supported, "e.")
        );
    }

    #[test]
    fn a_split_within_chance_is_inconclusive_and_a_lopsided_one_decides() {
        let p = |a_only, b_only| Paired {
            pairs: 40,
            a_only,
            b_only,
            both: 0,
        };
        // 3 against 1 discordant pairs: p = 0.625.
        assert_eq!(lower(&p(3, 1)), Verdict::Inconclusive);
        // 9 against 0: p = 2/512.
        assert_eq!(lower(&p(9, 0)), Verdict::Supported);
        assert_eq!(higher(&p(9, 0)), Verdict::Contradicted);
        assert_eq!(lower(&p(0, 9)), Verdict::Contradicted);
        assert_eq!(lower(&Paired::default()), Verdict::NotMeasured);
    }
}
