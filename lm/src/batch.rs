//! Training batches and the loss: right-padded token rows, next-token targets, and a mask
//! that counts reply tokens only (the prompt is context, not something to learn).

use crate::llama::{attention_bias, Llama, Pass};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

pub struct Batch {
    /// [batch, time] token ids, right-padded.
    pub ids: Tensor,
    /// [batch, time] positions 0, 1, 2, ...
    pub positions: Tensor,
    /// [batch, 1, time, time] causal + padding attention bias.
    pub bias: Tensor,
    /// [batch, time] the id that should follow each position.
    pub targets: Tensor,
    /// [batch, time] 1 where the target is a reply token, else 0 (f32).
    pub loss_mask: Tensor,
    /// Reply tokens the loss averages over.
    pub n_loss_tokens: usize,
}

impl Batch {
    /// A batch of `(ids, prompt_len)` rows: the loss counts `ids[prompt_len..]`.
    pub fn new(
        rows: &[(&[u32], usize)],
        pad_id: u32,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if rows.is_empty() {
            bail!("an empty batch");
        }
        let t = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        if t < 2 {
            bail!("every row has fewer than 2 tokens: nothing to predict");
        }
        let b = rows.len();
        let (mut ids, mut targets, mut mask, mut valid) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b),
        );
        let mut n_loss_tokens = 0;
        for (row, prompt_len) in rows {
            let n = row.len();
            for i in 0..t {
                ids.push(if i < n { row[i] } else { pad_id });
                let counted = i + 1 < n && i + 1 >= *prompt_len;
                targets.push(if i + 1 < n { row[i + 1] } else { pad_id });
                mask.push(if counted { 1f32 } else { 0.0 });
                n_loss_tokens += usize::from(counted);
            }
            valid.push((0..t).map(|i| i < n).collect::<Vec<bool>>());
        }
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(positions, (b, t), device)?,
            bias: attention_bias(&valid, t, dtype, device)?,
            targets: Tensor::from_vec(targets, (b, t), device)?,
            loss_mask: Tensor::from_vec(mask, (b, t), device)?,
            n_loss_tokens,
        })
    }
}

/// Mean cross-entropy of `targets` under `logits` [batch, time, vocab] over the positions
/// where `mask` is 1 (computed in f32, or f64 for an f64 model).
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let nll = if dtype == DType::F32 {
        // One fused kernel each way over the [rows, vocab] logits (f64 keeps the plain ops).
        let (b, t, v) = logits.dims3()?;
        basin_kernels::cross_entropy::cross_entropy_rows(
            &logits.to_dtype(dtype)?.reshape((b * t, v))?,
            &targets.flatten_all()?,
        )?
        .reshape((b, t))?
    } else {
        candle_nn::ops::log_softmax(&logits.to_dtype(dtype)?, D::Minus1)?
            .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?
            .neg()?
    };
    let mask = mask.to_dtype(dtype)?;
    let count = mask.sum_all()?;
    Ok((nll * &mask)?.sum_all()?.broadcast_div(&count)?)
}

/// The training loss of `model` on `batch`: differentiable unless `pass` is `Infer`.
pub fn loss(model: &Llama, batch: &Batch, pass: Pass) -> Result<Tensor> {
    if batch.n_loss_tokens == 0 {
        bail!("the batch has no reply tokens to compute a loss on");
    }
    let hidden = model.hidden(&batch.ids, &batch.positions, &batch.bias, None, pass)?;
    masked_cross_entropy(&model.logits(&hidden)?, &batch.targets, &batch.loss_mask)
}

/// Token-weighted mean loss of `model` over `rows` of `(ids, prompt_len)`, `micro_batch`
/// rows per forward, without gradients; and the number of reply tokens it averaged.
pub fn mean_loss(
    model: &Llama,
    rows: &[(&[u32], usize)],
    micro_batch: usize,
    pad_id: u32,
) -> Result<(f64, usize)> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(micro_batch.max(1)) {
        let b = Batch::new(chunk, pad_id, model.dtype(), model.device())?;
        if b.n_loss_tokens > 0 {
            let l = loss(model, &b, Pass::Infer)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            sum += l * b.n_loss_tokens as f64;
            n += b.n_loss_tokens;
        }
    }
    if n == 0 {
        bail!("no reply tokens to compute a loss on");
    }
    Ok((sum / n as f64, n))
}
