//! Model weights in and out: GGUF files (dequantized into trainable variables) and Hugging
//! Face directories (config.json + safetensors), saved back as a Hugging Face directory.

use crate::architecture::{check_tensors, to_checkpoint, to_internal, ModelConfig};
use crate::gguf_meta::GgufMeta;
use crate::source::ModelText;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Reads the architecture and all weights of a model (GGUF file or HF directory) as
/// trainable variables of `dtype` on `device`, under basin's names
/// ([`ModelConfig::tensors`]). Strict: every tensor the architecture needs is there with its
/// shape and every tensor of the files is used, or the error names those that are not.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<(ModelConfig, VarMap)> {
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

/// A model's shape without its weights: a GGUF file's metadata, a Hugging Face directory's
/// config.json, or a config.json file on its own (configs/models/), read as strictly as
/// [`load`] reads them.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let json = if path.is_dir() {
        path.join("config.json")
    } else if path.extension().is_some_and(|e| e == "json") {
        path.to_path_buf()
    } else {
        return gguf_config(&GgufMeta::open(path)?);
    };
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("cannot read {}", json.display()))?;
    ModelConfig::from_hf_json(&text).with_context(|| format!("{}", json.display()))
}

/// GGUF `llama.*` keys basin reads; any other one is refused (it may change the maths).
const GGUF_KEYS: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "vocab_size",
];

fn gguf_config(meta: &GgufMeta) -> Result<ModelConfig> {
    let path = meta.path.display();
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        bail!(
            "{path}: GGUF architecture '{arch}' is not supported (basin reads llama GGUF files; give other families as a Hugging Face directory)"
        );
    }
    let unknown: Vec<&String> = meta
        .content
        .metadata
        .keys()
        .filter(|k| {
            k.strip_prefix("llama.")
                .is_some_and(|k| !GGUF_KEYS.contains(&k))
        })
        .collect();
    if !unknown.is_empty() {
        bail!("{path}: metadata {unknown:?} not known to basin (it may change what the model computes)");
    }
    if let Some(t) = meta.opt_string("llama.rope.scaling.type") {
        if t != "none" {
            bail!("{path}: llama.rope.scaling.type '{t}' is not implemented for GGUF files");
        }
    }
    let u = |key: &str| {
        meta.opt_u32(&format!("llama.{key}"))
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("{path}: metadata key 'llama.{key}' is missing"))
    };
    let f = |key: &str| match meta.get(&format!("llama.{key}")) {
        Some(v) => v
            .to_f32()
            .map(|x| x as f64)
            .map_err(|e| anyhow!("{path}: llama.{key}: {e}")),
        None => bail!("{path}: metadata key 'llama.{key}' is missing"),
    };
    let vocab_size = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => meta.string_array("tokenizer.ggml.tokens")?.len(),
    };
    let heads = u("attention.head_count")?;
    let mut c = ModelConfig::llama(
        vocab_size,
        u("embedding_length")?,
        u("feed_forward_length")?,
        u("block_count")?,
        heads,
        u("attention.head_count_kv").unwrap_or(heads),
        f("rope.freq_base").unwrap_or(10_000.0),
        f("attention.layer_norm_rms_epsilon")?,
        !meta.content.tensor_infos.contains_key("output.weight"),
        u("context_length").unwrap_or(2048),
    );
    if let Ok(k) = u("attention.key_length") {
        c.head_dim = k;
    }
    for key in ["attention.value_length", "rope.dimension_count"] {
        if let Ok(v) = u(key) {
            if v != c.head_dim {
                bail!(
                    "{path}: llama.{key} {v} differs from the head size {}: not implemented",
                    c.head_dim
                );
            }
        }
    }
    c.validate().with_context(|| format!("{path}"))?;
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

fn load_gguf(path: &Path, device: &Device) -> Result<(ModelConfig, HashMap<String, Tensor>)> {
    let meta = GgufMeta::open(path)?;
    let config = gguf_config(&meta)?;
    let mut found = BTreeMap::new();
    for (name, info) in &meta.content.tensor_infos {
        // A GGUF name basin cannot place keeps its own name: the check reports it unexpected.
        let hf = hf_name(name).unwrap_or_else(|| name.clone());
        found.insert(hf, info.shape.dims().to_vec());
    }
    check_tensors(&config.tensors(), &found, &path.display().to_string())?;
    let mut file = std::fs::File::open(path)?;
    let mut tensors = HashMap::new();
    for name in meta.content.tensor_infos.keys() {
        let hf = hf_name(name).expect("checked above");
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

/// The safetensors files of a Hugging Face directory: model.safetensors, or the shards its
/// index names.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        // PyTorch's pickle checkpoints can run code when they are read: never loaded here.
        let pickles: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
            .collect();
        if !pickles.is_empty() {
            bail!(
                "{}: holds {} but no safetensors. basin reads only safetensors and GGUF, which \
                 cannot run code when loaded (a PyTorch pickle can). Convert it once, where you \
                 trust the file: python -c \"from transformers import AutoModelForCausalLM as M; \
                 M.from_pretrained('{dir}').save_pretrained('{dir}-safetensors')\"",
                dir.display(),
                pickles.join(", "),
                dir = dir.display()
            );
        }
    }
    let text = std::fs::read_to_string(&index_path).with_context(|| {
        format!(
            "{}: neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected {{\"weight_map\": {{...}}}}",
            index_path.display()
        )
    })?;
    let shards: BTreeSet<&String> = index.weight_map.values().collect();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

fn load_hf_dir(dir: &Path, device: &Device) -> Result<(ModelConfig, HashMap<String, Tensor>)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config =
        ModelConfig::from_hf_json(&text).with_context(|| format!("{}", config_path.display()))?;
    let files = safetensors_files(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, device)
            .with_context(|| format!("cannot read {}", f.display()))?;
        for (name, t) in part {
            if tensors.insert(name.clone(), t).is_some() {
                bail!("{}: tensor '{name}' appears in two files", f.display());
            }
        }
    }
    let origin = match files.as_slice() {
        [one] => one.display().to_string(),
        _ => format!("{} (sharded)", dir.display()),
    };
    // A tied model may still ship lm_head.weight: accepted only as the embeddings' copy.
    if config.tie_word_embeddings {
        if let Some(head) = tensors.remove("lm_head.weight") {
            let same = match tensors.get("model.embed_tokens.weight") {
                Some(e) => identical(e, &head)?,
                None => true, // reported missing below
            };
            if !same {
                bail!(
                    "{origin}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
                );
            }
        }
    }
    let found = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    check_tensors(&config.checkpoint_tensors(), &found, &origin)?;
    Ok((config.clone(), to_internal(&config, tensors)?))
}

/// Whether two tensors hold the same shape and values.
fn identical(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    let v =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?) };
    Ok(v(a)? == v(b)?)
}

/// Writes a Hugging Face model directory in the model's own family and layout (a Phi-3 stays
/// fused): model.safetensors (`dtype`), config.json, generation_config.json (its end-of-turn
/// ids), tokenizer.json, tokenizer_config.json (with the chat template). Each file is
/// written to a temporary name and renamed.
pub fn save_hf_dir(
    dir: &Path,
    config: &ModelConfig,
    varmap: &VarMap,
    text: &ModelText,
    dtype: DType,
) -> Result<()> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().clone())))
        .collect::<Result<_>>()?;
    save_hf_tensors(dir, config, tensors, text, dtype)
}

/// [`save_hf_dir`] of `tensors` (by the varmap's names), each converted to `dtype`.
pub fn save_hf_tensors(
    dir: &Path,
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    text: &ModelText,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    save_safetensors(
        &dir.join("model.safetensors"),
        &to_checkpoint(config, tensors)?,
    )?;
    let tok = &text.tokenizer;
    let bos = tok.bos_token.as_deref().and_then(|t| tok.token_id(t));
    let hf_config = config.to_hf_json(dtype, bos, &text.stop_ids);
    let write_json = |name: &str, v: &serde_json::Value| {
        crate::fsutil::write_bytes_atomic(
            &dir.join(name),
            serde_json::to_string_pretty(v)?.as_bytes(),
        )
    };
    write_json("config.json", &hf_config)?;
    write_json(
        "generation_config.json",
        &serde_json::json!({"bos_token_id": bos, "eos_token_id": hf_config["eos_token_id"]}),
    )?;
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
