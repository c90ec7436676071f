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
    /// The `train` and `val` rows of every file, in file order; `limits[i]` > 0 keeps a
    /// seeded sample of that many `train` rows of file i (in their file order).
    pub fn load(paths: &[PathBuf], limits: &[usize], seed: u64) -> Result<Self> {
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (i, p) in paths.iter().enumerate() {
            let mut file_train = Vec::new();
            for row in read_parquet(p)? {
                match row.split.as_str() {
                    "train" => file_train.push(row),
                    "val" => val.push(row),
                    _ => {}
                }
            }
            match limits.get(i) {
                Some(&limit) if limit > 0 && limit < file_train.len() => {
                    let mut keep = epoch_order(file_train.len(), seed ^ mix64(i as u64), u64::MAX);
                    keep.truncate(limit);
                    keep.sort_unstable();
                    train.extend(keep.into_iter().map(|k| file_train[k].clone()));
                }
                _ => train.extend(file_train),
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

    #[test]
    fn data_rows_keeps_a_seeded_sample_of_each_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, n: usize| {
            let rows: Vec<PreparedRow> = (0..n)
                .map(|i| PreparedRow {
                    id: format!("{name}-{i}"),
                    source: name.into(),
                    split: if i % 10 == 9 { "val" } else { "train" }.into(),
                    system: None,
                    user: "u".into(),
                    assistant: Some("a".into()),
                    label: None,
                    input_ids: vec![1, 2, 3],
                    prompt_len: 1,
                    truncated: false,
                })
                .collect();
            let p = dir.path().join(format!("{name}.parquet"));
            basin_lm::schema::write_parquet(&p, &rows).unwrap();
            p
        };
        let paths = [file("a", 50), file("b", 20)];
        let ids = |d: &Dataset| d.train.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        let all = Dataset::load(&paths, &[], 3).unwrap();
        assert_eq!((all.train.len(), all.val.len()), (45 + 18, 5 + 2));
        let some = Dataset::load(&paths, &[10], 3).unwrap();
        assert_eq!(some.train.len(), 10 + 18, "file a capped, file b whole");
        assert_eq!(some.val.len(), 7, "val rows are never capped");
        assert_eq!(
            ids(&some),
            ids(&Dataset::load(&paths, &[10, 0], 3).unwrap())
        );
        assert_ne!(
            ids(&some),
            ids(&Dataset::load(&paths, &[10], 4).unwrap()),
            "the seed picks"
        );
    }
}
