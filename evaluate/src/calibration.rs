//! Judges against human labels: PyRIT's refusal set (objective, assistant_response,
//! human_score; 1 = refusal). The development split (the calibrated judge was tuned on it)
//! is PyRIT's small sample plus half of the remaining replies, drawn by a hash of the reply
//! text; the other half is the test split we report.

use anyhow::{anyhow, Context, Result};
use std::collections::HashSet;
use std::path::Path;

/// A reply and whether people judged it a refusal.
#[derive(Clone, Debug)]
pub struct Labelled {
    /// What was asked (PyRIT's objective).
    pub request: String,
    pub reply: String,
    pub refusal: bool,
}

/// Reads a PyRIT scorer CSV (lines starting with '#' before the header are comments).
pub fn read_labelled(path: &Path) -> Result<Vec<Labelled>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let body: String = text
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut reader = csv::Reader::from_reader(body.as_bytes());
    let headers = reader.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| anyhow!("{}: no column '{name}'", path.display()))
    };
    let (request_col, reply_col, score_col) = (
        col("objective")?,
        col("assistant_response")?,
        col("human_score")?,
    );
    reader
        .records()
        .map(|r| {
            let r = r.with_context(|| format!("{}: malformed CSV", path.display()))?;
            let line = r.position().map_or(0, |p| p.line());
            let refusal = match &r[score_col] {
                "1" => true,
                "0" => false,
                other => anyhow::bail!(
                    "{}: line {line}: human_score '{other}', expected 0 or 1",
                    path.display()
                ),
            };
            Ok(Labelled {
                request: r[request_col].to_string(),
                reply: r[reply_col].to_string(),
                refusal,
            })
        })
        .collect()
}

/// (development, test): `sample` plus the replies of `full` whose hash is even, and the
/// replies of `full` not in `sample` whose hash is odd.
pub fn split(full: Vec<Labelled>, sample: Vec<Labelled>) -> (Vec<Labelled>, Vec<Labelled>) {
    let seen: HashSet<String> = sample.iter().map(|l| l.reply.clone()).collect();
    let mut dev = sample;
    let mut test = Vec::new();
    for l in full.into_iter().filter(|l| !seen.contains(&l.reply)) {
        let h = basin_lm::fsutil::sha256_bytes(l.reply.as_bytes());
        if u8::from_str_radix(&h[..2], 16)
            .unwrap_or(0)
            .is_multiple_of(2)
        {
            dev.push(l);
        } else {
            test.push(l);
        }
    }
    (dev, test)
}

/// Confusion counts with refusal as the positive class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

impl Confusion {
    /// `refuses(request, reply)` against each reply's label.
    pub fn of(set: &[Labelled], refuses: impl Fn(&str, &str) -> bool) -> Self {
        let mut c = Self::default();
        for l in set {
            match (refuses(&l.request, &l.reply), l.refusal) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
            }
        }
        c
    }
    pub fn n(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }
    pub fn accuracy(&self) -> f64 {
        (self.tp + self.tn) as f64 / self.n().max(1) as f64
    }
    pub fn precision(&self) -> f64 {
        self.tp as f64 / (self.tp + self.fp).max(1) as f64
    }
    pub fn recall(&self) -> f64 {
        self.tp as f64 / (self.tp + self.fn_).max(1) as f64
    }
}
