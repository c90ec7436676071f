//! The embedding's gradient: each looked-up row of the table gets the sum of the gradients
//! of the positions that looked it up,
//!
//!   d_embed[id] += Σ_{r : ids[r] = id} dx[r],
//!
//! the positions of one id added in row order — the same sum on the CPU and on the GPU, and
//! on every run (no atomics). [`Lookups`] groups the positions by id on the host, where the
//! batch's ids are known before the step starts; the padding id gets nothing (transformers'
//! `padding_idx`).

use rayon::prelude::*;

/// The positions of a batch grouped by the id they looked up: `ids[k]`'s positions are
/// `rows[starts[k] .. starts[k + 1]]`, ascending; ids ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookups {
    pub ids: Vec<u32>,
    pub starts: Vec<u32>,
    pub rows: Vec<u32>,
}

impl Lookups {
    /// The lookups of `ids` (one per position), leaving out `pad`.
    pub fn new(ids: &[u32], pad: Option<u32>) -> Self {
        let mut order: Vec<u32> = (0..ids.len() as u32)
            .filter(|&r| Some(ids[r as usize]) != pad)
            .collect();
        // Stable: each id's positions stay in row order.
        order.sort_by_key(|&r| ids[r as usize]);
        let (mut uniq, mut starts) = (Vec::new(), Vec::new());
        for (i, &r) in order.iter().enumerate() {
            let id = ids[r as usize];
            if uniq.last() != Some(&id) {
                uniq.push(id);
                starts.push(i as u32);
            }
        }
        starts.push(order.len() as u32);
        Lookups {
            ids: uniq,
            starts,
            rows: order,
        }
    }
}

/// CPU reference: d_embed [vocab, width] += the gradients dx [positions, width] of the
/// lookups, each id's positions in row order.
pub fn backward(d_embed: &mut [f32], dx: &[f32], l: &Lookups, width: usize) {
    // Distinct ids own distinct rows of the table: one task each, over rows taken in id order.
    let mut targets: Vec<(usize, &mut [f32])> = Vec::with_capacity(l.ids.len());
    let mut rest = d_embed;
    let mut at = 0usize;
    for &id in &l.ids {
        let (_, tail) = rest.split_at_mut((id as usize - at) * width);
        let (row, tail) = tail.split_at_mut(width);
        targets.push((targets.len(), row));
        rest = tail;
        at = id as usize + 1;
    }
    targets.into_par_iter().for_each(|(k, row)| {
        for &r in &l.rows[l.starts[k] as usize..l.starts[k + 1] as usize] {
            row.iter_mut()
                .zip(&dx[r as usize * width..][..width])
                .for_each(|(a, g)| *a += g);
        }
    });
}

/// The launcher of `embed_bwd` (`cuda/pass.cu`).
#[cfg(feature = "cuda")]
pub mod cuda {
    use crate::cuda::{launch_pass, u32_arg, Act, Dev, DevMut};
    use candle_core::{CudaDevice, Result};

    /// [`Lookups`](super::Lookups) on the device.
    pub struct DevLookups {
        pub ids: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
        pub starts: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
        pub rows: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
        pub distinct: usize,
        /// The largest id (the table must hold its row) and the largest position.
        pub max_id: usize,
        pub max_row: usize,
    }

    impl DevLookups {
        pub fn new(dev: &CudaDevice, l: &super::Lookups) -> Result<Self> {
            // An empty upload is not allowed: keep one harmless element.
            let up = |v: &[u32]| dev.clone_htod(if v.is_empty() { &[0u32][..] } else { v });
            Ok(DevLookups {
                ids: up(&l.ids)?,
                starts: up(&l.starts)?,
                rows: up(&l.rows)?,
                distinct: l.ids.len(),
                max_id: l.ids.last().map_or(0, |&i| i as usize),
                max_row: l.rows.iter().max().map_or(0, |&r| r as usize),
            })
        }
    }

    /// [`super::backward`].
    pub fn backward<T: Act>(
        dev: &CudaDevice,
        d_embed: DevMut<T>,
        dx: Dev<T>,
        l: &DevLookups,
        width: usize,
    ) -> Result<()> {
        if l.distinct == 0 {
            return Ok(());
        }
        let d = d_embed.at_least((l.max_id + 1) * width, "embedding gradient: table")?;
        let g = dx.at_least((l.max_row + 1) * width, "embedding gradient: dx")?;
        let (ids, starts, rows) = (
            Dev::of(&l.ids, dev).at_least(l.distinct, "ids")?,
            Dev::of(&l.starts, dev).at_least(l.distinct + 1, "starts")?,
            Dev::of(&l.rows, dev).at_least(1, "rows")?,
        );
        let w = u32_arg(width, "width")?;
        launch_pass!(dev, T, "embed_bwd", (u32_arg(l.distinct, "ids")?, 1); g, ids, starts, rows, d, w);
        Ok(())
    }
}
