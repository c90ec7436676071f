//! Model weights in and out: GGUF files (dequantized into trainable variables) and Hugging
//! Face directories (config.json + safetensors), saved back as a Hugging Face directory.

use crate::gguf_meta::GgufMeta;
use crate::llama::LlamaConfig;
use crate::source::ModelText;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// Reads the architecture and all weights of a model (GGUF file or HF directory) as
/// trainable variables of `dtype` on `device`, under Hugging Face names.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<(LlamaConfig, VarMap)> {
    let (config, tensors) = if path.is_dir() {
        load_hf_dir(path, device)?
    } else {
        load_gguf(path, device)?
    };
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("fresh varmap");
        for (name, t) in tensors {
            data.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
    }
    Ok((config, varmap))
}

fn gguf_config(meta: &GgufMeta) -> Result<LlamaConfig> {
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        bail!(
            "{}: architecture '{arch}' is not supported (only llama)",
            meta.path.display()
        );
    }
    let u = |key: &str| {
        meta.opt_u32(&format!("llama.{key}"))
            .map(|v| v as usize)
            .ok_or_else(|| {
                anyhow!(
                    "{}: metadata key 'llama.{key}' is missing",
                    meta.path.display()
                )
            })
    };
    let f = |key: &str| match meta.get(&format!("llama.{key}")) {
        Some(v) => v
            .to_f32()
            .map(|x| x as f64)
            .map_err(|e| anyhow!("llama.{key}: {e}")),
        None => bail!(
            "{}: metadata key 'llama.{key}' is missing",
            meta.path.display()
        ),
    };
    let vocab_size = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => meta.string_array("tokenizer.ggml.tokens")?.len(),
    };
    let heads = u("attention.head_count")?;
    let c = LlamaConfig {
        vocab_size,
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
        rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
        rms_norm_eps: f("attention.layer_norm_rms_epsilon")?,
        tie_word_embeddings: !meta.content.tensor_infos.contains_key("output.weight"),
        max_position_embeddings: u("context_length").unwrap_or(2048),
    };
    c.validate()?;
    Ok(c)
}

/// The Hugging Face name of a GGUF llama tensor.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// llama.cpp's converter reorders each head's Q/K rows for interleaved RoPE: row
/// (pair i, half j) of the HF weight is stored at (i, j) → (j, i). Undo it, so that the
/// half-split RoPE of Hugging Face applies: [heads, hd/2, 2, in] → [heads, 2, hd/2, in].
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn load_gguf(path: &Path, device: &Device) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let meta = GgufMeta::open(path)?;
    let config = gguf_config(&meta)?;
    let mut file = std::fs::File::open(path)?;
    let mut tensors = HashMap::new();
    for name in meta.content.tensor_infos.keys() {
        let hf = hf_name(name)
            .ok_or_else(|| anyhow!("{}: unexpected tensor '{name}'", path.display()))?;
        let q = meta
            .content
            .tensor(&mut file, name, device)
            .with_context(|| format!("{}: cannot read tensor '{name}'", path.display()))?;
        let mut t = q.dequantize(device)?;
        if hf.ends_with("q_proj.weight") {
            t = unpermute_rows(&t, config.num_attention_heads)?;
        } else if hf.ends_with("k_proj.weight") {
            t = unpermute_rows(&t, config.num_key_value_heads)?;
        }
        tensors.insert(hf, t);
    }
    Ok((config, tensors))
}

fn load_hf_dir(dir: &Path, device: &Device) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config =
        LlamaConfig::from_hf_json(&text).with_context(|| format!("{}", config_path.display()))?;
    let single = dir.join("model.safetensors");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else {
        let index_path = dir.join("model.safetensors.index.json");
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index_path).with_context(|| {
                format!(
                    "{}: neither model.safetensors nor model.safetensors.index.json",
                    dir.display()
                )
            })?)
            .with_context(|| format!("{}: not valid JSON", index_path.display()))?;
        let mut shards: Vec<String> = index["weight_map"]
            .as_object()
            .ok_or_else(|| anyhow!("{}: no weight_map", index_path.display()))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    };
    let mut tensors = HashMap::new();
    for f in files {
        tensors.extend(
            candle_core::safetensors::load(&f, device)
                .with_context(|| format!("cannot read {}", f.display()))?,
        );
    }
    // A tied model may still ship lm_head.weight; the embeddings are what it uses.
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    Ok((config, tensors))
}

/// Writes a Hugging Face model directory: model.safetensors (HF names, `dtype`),
/// config.json, tokenizer.json, tokenizer_config.json (with the chat template). Each file
/// is written to a temporary name and renamed.
pub fn save_hf_dir(
    dir: &Path,
    config: &LlamaConfig,
    varmap: &VarMap,
    text: &ModelText,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    save_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let tok = &text.tokenizer;
    let id = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_id(t));
    let hf_config = config.to_hf_json(dtype, id(&tok.bos_token), id(&tok.eos_token));
    let write_json = |name: &str, v: &serde_json::Value| {
        crate::fsutil::write_bytes_atomic(
            &dir.join(name),
            serde_json::to_string_pretty(v)?.as_bytes(),
        )
    };
    write_json("config.json", &hf_config)?;
    crate::fsutil::write_bytes_atomic(&dir.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
    write_json(
        "tokenizer_config.json",
        &serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.eos_token,
            "chat_template": text.chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": config.max_position_embeddings,
        }),
    )?;
    Ok(())
}

/// safetensors written through a temporary file beside `path`.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_undoes_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2) — build it and undo it.
        let (heads, hd, cols) = (3, 4, 2);
        let w = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let back = unpermute_rows(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").unwrap(),
            "model.layers.12.self_attn.k_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.1.something").is_none());
    }
}
