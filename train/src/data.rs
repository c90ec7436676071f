//! Training rows from prepare's Parquet files, in a seeded order per epoch.

use anyhow::{bail, Result};
use basin_lm::rng::{mix64, SplitMix64};
use basin_lm::schema::{read_parquet, PreparedRow};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub struct Dataset {
    pub train: Vec<PreparedRow>,
    pub val: Vec<PreparedRow>,
}

impl Dataset {
    /// The `train` and `val` rows of every file, in file order.
    pub fn load(paths: &[PathBuf]) -> Result<Self> {
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for p in paths {
            for row in read_parquet(p)? {
                match row.split.as_str() {
                    "train" => train.push(row),
                    "val" => val.push(row),
                    _ => {}
                }
            }
        }
        if train.is_empty() {
            bail!(
                "no training rows (split = train) in {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(Self { train, val })
    }
}

/// Where a run is in its data: the epoch and the next index into that epoch's order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: usize,
}

/// The order of `n` rows in `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(mix64(seed) ^ mix64(epoch));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The next `count` rows from `pos`, moving on to the next epoch when one runs out.
pub fn next_rows<'a>(
    rows: &'a [PreparedRow],
    pos: &mut DataPosition,
    count: usize,
    seed: u64,
) -> Vec<&'a PreparedRow> {
    let mut out = Vec::with_capacity(count);
    let mut order = epoch_order(rows.len(), seed, pos.epoch);
    while out.len() < count {
        if pos.index == rows.len() {
            pos.epoch += 1;
            pos.index = 0;
            order = epoch_order(rows.len(), seed, pos.epoch);
        }
        out.push(&rows[order[pos.index]]);
        pos.index += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let a = epoch_order(50, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(50, 1, 1));
        assert_eq!(a, epoch_order(50, 1, 0));
    }
}
