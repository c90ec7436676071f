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
    /// [n_loss_tokens] u32: the positions (row · time + index) whose next token is a reply
    /// token, the only ones whose logits the loss needs.
    pub loss_positions: Tensor,
    /// [n_loss_tokens] u32: the token that should follow each of those positions.
    pub loss_targets: Tensor,
    /// Reply tokens the loss averages over.
    pub n_loss_tokens: usize,
    /// The same indices on the host, where they were made: the written-out pass reads them
    /// there (to check them, group the embedding's lookups, upload them) without waiting
    /// for the device.
    pub host: HostIndices,
}

/// A [`Batch`]'s ids, positions, loss positions and targets as host vectors (row-major).
#[derive(Clone, Debug, Default)]
pub struct HostIndices {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub loss_positions: Vec<u32>,
    pub loss_targets: Vec<u32>,
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
        let (mut ids, mut valid) = (Vec::with_capacity(b * t), Vec::with_capacity(b));
        let (mut loss_positions, mut loss_targets) = (Vec::new(), Vec::new());
        for (r, (row, prompt_len)) in rows.iter().enumerate() {
            let n = row.len();
            for i in 0..t {
                ids.push(if i < n { row[i] } else { pad_id });
                if i + 1 < n && i + 1 >= *prompt_len {
                    loss_positions.push((r * t + i) as u32);
                    loss_targets.push(row[i + 1]);
                }
            }
            valid.push((0..t).map(|i| i < n).collect::<Vec<bool>>());
        }
        let n_loss_tokens = loss_positions.len();
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        Ok(Self {
            ids: Tensor::from_slice(&ids, (b, t), device)?,
            positions: Tensor::from_slice(&positions, (b, t), device)?,
            bias: attention_bias(&valid, t, dtype, device)?,
            loss_positions: Tensor::from_slice(&loss_positions, n_loss_tokens, device)?,
            loss_targets: Tensor::from_slice(&loss_targets, n_loss_tokens, device)?,
            n_loss_tokens,
            host: HostIndices {
                ids,
                positions,
                loss_positions,
                loss_targets,
            },
        })
    }
}

/// Mean cross-entropy of `targets` [rows] under `logits` [rows, vocab] (computed in f32,
/// or f64 for an f64 model).
pub fn mean_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let nll = if logits.dtype() == DType::F64 {
        candle_nn::ops::log_softmax(logits, D::Minus1)?
            .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?
            .neg()?
    } else {
        // One fused kernel each way over the rows (f64, the gradient checks', keeps the
        // plain ops).
        basin_kernels::ops::cross_entropy::cross_entropy_rows(
            &logits.to_dtype(DType::F32)?,
            targets,
        )?
    };
    Ok(nll.mean_all()?)
}

/// The training loss of `model` on `batch`: differentiable unless `pass` is `Infer`.
///
/// Only the positions followed by a reply token go through the output projection and the
/// cross-entropy: in a chat row most positions are prompt, and the [positions, vocab]
/// logits are a fifth of the model's multiply-adds and most of its memory traffic.
pub fn loss(model: &Llama, batch: &Batch, pass: Pass) -> Result<Tensor> {
    if batch.n_loss_tokens == 0 {
        bail!("the batch has no reply tokens to compute a loss on");
    }
    let hidden = model.hidden(&batch.ids, &batch.positions, &batch.bias, None, pass)?;
    let (b, t, h) = hidden.dims3()?;
    let hidden = hidden.reshape((b * t, h))?;
    let hidden = if batch.n_loss_tokens == b * t {
        hidden
    } else {
        hidden.index_select(&batch.loss_positions, 0)?
    };
    mean_cross_entropy(&model.logits(&hidden, pass)?, &batch.loss_targets)
}

/// Token-weighted mean loss of `model` over `rows` of `(ids, prompt_len)`, `micro_batch`
/// rows per forward, without gradients; and the number of reply tokens it averaged.
pub fn mean_loss(
    model: &Llama,
    rows: &[(&[u32], usize)],
    micro_batch: usize,
    pad_id: u32,
) -> Result<(f64, usize)> {
    // Rows of similar length share a micro-batch: less padding to run through the model.
    let mut rows = rows.to_vec();
    rows.sort_by_key(|(ids, _)| ids.len());
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(micro_batch.max(1)) {
        let b = Batch::new(chunk, pad_id, model.dtype(), model.device())?;
        if b.n_loss_tokens > 0 {
            // The written-out forward for an f32 model on the CPU (what training runs;
            // keeping only each layer's input, as no backward follows), candle's graph
            // otherwise.
            let l = if crate::backprop::by_default(model) {
                crate::backprop::forward_with(model, &b, true)?.loss()
            } else {
                loss(model, &b, Pass::Infer)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
            };
            sum += l * b.n_loss_tokens as f64;
            n += b.n_loss_tokens;
        }
    }
    if n == 0 {
        bail!("no reply tokens to compute a loss on");
    }
    Ok((sum / n as f64, n))
}
