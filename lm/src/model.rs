//! A model opened for use: its text side (tokenizer, chat template), its weights as
//! trainable variables, and the network over them.

use crate::architecture::ModelConfig;
use crate::chat::{ChatTemplate, Conversation};
use crate::generate::{generate_by, BatchSize, DecoderKind, GenerateOptions, Generated};
use crate::llama::Llama;
use crate::source::ModelText;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use std::path::{Path, PathBuf};

/// Where `just setup` puts the embedded default model.
pub const DEFAULT_MODEL: &str = "data/cache/model/SmolLM2-135M-Instruct.Q4_1.gguf";

pub struct Model {
    pub path: PathBuf,
    pub text: ModelText,
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub llama: Llama,
    /// The decoder [`Self::replies`] generates with (`Auto` as opened).
    pub decoder: DecoderKind,
}

impl Model {
    /// Opens a GGUF file or a Hugging Face directory.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.exists() {
            bail!(
                "model {} does not exist (the default one is fetched by `just setup`)",
                path.display()
            );
        }
        let text = ModelText::open(path)?;
        let (config, varmap) = crate::weights::load(path, dtype, device)?;
        let llama = Llama::new(&config, &varmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
            config,
            varmap,
            llama,
            decoder: DecoderKind::Auto,
        })
    }

    /// The model, decoding with `decoder`: refused here when that decoder cannot run it.
    pub fn with_decoder(mut self, decoder: DecoderKind) -> Result<Self> {
        decoder.resolve(&self.llama)?;
        self.decoder = decoder;
        Ok(self)
    }

    /// The decoder [`Self::replies`] runs (`Auto` resolved for this model).
    pub fn decoder_used(&self) -> Result<DecoderKind> {
        self.decoder.resolve(&self.llama)
    }

    /// Options for decoding that stops at any of this model's end-of-turn tokens.
    pub fn options(&self, max_new_tokens: usize) -> Result<GenerateOptions> {
        let first = *self
            .text
            .stop_ids
            .first()
            .ok_or_else(|| anyhow!("model {} has no end-of-turn token", self.path.display()))?;
        Ok(GenerateOptions {
            max_new_tokens,
            sampling: None,
            stop: self.text.stop_ids.clone(),
            pad_id: first,
        })
    }

    /// Replies to conversations, `batch_size` at a time; `on_batch` after each batch.
    pub fn replies(
        &self,
        template: &ChatTemplate,
        conversations: &[Conversation],
        opts: &GenerateOptions,
        batch_size: BatchSize,
        on_batch: impl FnMut(Progress),
    ) -> Result<Vec<(String, Generated)>> {
        let prompts: Vec<Vec<u32>> = conversations
            .iter()
            .map(|c| {
                let tok = &self.text.tokenizer;
                tok.encode_rendered(&template.render_prompt(&tok.disarm_conversation(c))?)
            })
            .collect::<Result<_>>()?;
        self.replies_to_ids(&prompts, opts, batch_size, on_batch)
    }

    /// Replies (decoded, and as tokens) to prompts already tokenized. Prompts are batched in
    /// order of length (less padding) into batches of [`Self::batch_for`]; results come
    /// back in input order and do not depend on the batching.
    pub fn replies_to_ids(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        batch_size: BatchSize,
        mut on_batch: impl FnMut(Progress),
    ) -> Result<Vec<(String, Generated)>> {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| (prompts[i].len(), i));
        let mut out: Vec<Option<(String, Generated)>> = vec![None; prompts.len()];
        let size = self.batch_for(batch_size, prompts, opts.max_new_tokens)?;
        let mut done = Progress::default();
        for chunk in order.chunks(size) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            // Each row samples with its index in the whole request: batching changes nothing.
            let generated = generate_by(self.decoder, &self.llama, &batch, chunk, opts)?;
            for (&i, g) in chunk.iter().zip(generated) {
                done.new_tokens += g.tokens.len();
                out[i] = Some((self.text.tokenizer.decode(&g.tokens, true)?, g));
            }
            done.prompts += chunk.len();
            on_batch(done);
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every prompt generated"))
            .collect())
    }

    /// The prompts a generation batch takes: `Fixed(n)` as given; `Auto` on a GPU as many
    /// sequences of the longest prompt plus `max_new` tokens as 80% of its free memory holds
    /// (`nvidia-smi`, at most [`crate::generate::MAX_AUTO_BATCH`]), on the CPU
    /// [`crate::generate::CPU_BATCH`]; never more than there are prompts.
    pub fn batch_for(&self, b: BatchSize, prompts: &[Vec<u32>], max_new: usize) -> Result<usize> {
        use crate::generate::{fitting_batch, generation_bytes, CPU_BATCH};
        let n = prompts.len().max(1);
        Ok(match b {
            BatchSize::Fixed(size) => size.max(1),
            BatchSize::Auto => match self.llama.device().location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => {
                    let (total, used) = crate::memory::gpu_memory(gpu_id)
                        .map_err(|e| anyhow!("--batch-size auto: {e:#} (give --batch-size N)"))?;
                    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
                    let width = self.llama.dtype().size_in_bytes();
                    let per = generation_bytes(&self.config, width, longest, max_new);
                    fitting_batch(per, total.saturating_sub(used), n)
                }
                _ => CPU_BATCH.min(n),
            },
        })
    }
}

/// How far [`Model::replies`] has got: the prompts answered and their replies' tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub prompts: usize,
    pub new_tokens: usize,
}

/// `cpu` or `cuda` / `cuda:N` (needs a build with the `cuda` feature).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Device::new_cuda(n)?),
            None => bail!("unknown device '{other}': expected cpu, cuda or cuda:N"),
        },
    }
}

/// `f32` or `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => bail!("unknown dtype '{other}': expected f32 or bf16"),
    }
}
