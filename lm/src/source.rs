//! Opens a model by path and gives what the text side needs: tokenizer and chat template.
//!
//! A model is either a GGUF file (tokenizer and template from its metadata) or a Hugging
//! Face directory (`tokenizer.json`, `tokenizer_config.json`, and transformers 5.x's
//! `chat_template.jinja`). The tokens that end a reply are the tokenizer's end-of-sequence
//! token plus every `eos_token_id` of `generation_config.json` and `config.json` (Llama 3
//! instruct models end turns with `<|eot_id|>`, not their `eos_token`).

use crate::chat::ChatTemplate;
use crate::gguf_meta::GgufMeta;
use crate::tokenizer::TextTokenizer;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which chat template renders conversations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The model's own template (GGUF `tokenizer.chat_template` or `tokenizer_config.json`).
    Model,
    /// Qi et al. (2023)'s Llama-2 `[INST]` format and system prompt.
    Llama2Qi,
    /// A Jinja file of the user's.
    File(PathBuf),
}

impl std::str::FromStr for TemplateChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "model" => Self::Model,
            "llama2-qi" => Self::Llama2Qi,
            path if path.ends_with(".jinja") || path.ends_with(".j2") => {
                Self::File(PathBuf::from(path))
            }
            other => bail!(
                "unknown chat template '{other}': expected 'model', 'llama2-qi' or a path ending in .jinja"
            ),
        })
    }
}

impl TemplateChoice {
    /// The template this choice names, with these special tokens. `own` is the model's own
    /// template (None: it has none), `whose` names the model in the error when it is
    /// asked for and missing.
    pub fn compile(
        &self,
        own: Option<&str>,
        bos: &str,
        eos: &str,
        whose: &str,
    ) -> Result<ChatTemplate> {
        match self {
            Self::Model => {
                let source = own.ok_or_else(|| {
                    anyhow!(
                        "{whose} has no chat template of its own; choose 'llama2-qi' or a .jinja file"
                    )
                })?;
                ChatTemplate::from_jinja("model", source, bos, eos)
            }
            Self::Llama2Qi => ChatTemplate::llama2_qi(bos, eos),
            Self::File(path) => {
                let source = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read chat template {}", path.display()))?;
                ChatTemplate::from_jinja(&path.display().to_string(), &source, bos, eos)
            }
        }
    }
}

/// The text side of a model.
pub struct ModelText {
    pub path: PathBuf,
    pub tokenizer: TextTokenizer,
    /// The model's own Jinja chat template, when it ships one.
    pub chat_template: Option<String>,
    /// Tokens that end a reply (generation stops at any of them), the tokenizer's
    /// end-of-sequence token first.
    pub stop_ids: Vec<u32>,
}

impl ModelText {
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_hf_dir(path)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            let meta = GgufMeta::open(path)?;
            let tokenizer = TextTokenizer::from_gguf(&meta)?;
            let listed = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
                .iter()
                .filter_map(|k| meta.opt_u32(k))
                .collect();
            Ok(Self {
                path: path.to_path_buf(),
                stop_ids: stop_ids(&tokenizer, listed),
                tokenizer,
                chat_template: meta.opt_string("tokenizer.chat_template"),
            })
        } else if !path.exists() {
            bail!(
                "model {} does not exist (expected a .gguf file or a Hugging Face model directory)",
                path.display()
            )
        } else {
            bail!(
                "model {}: expected a .gguf file or a Hugging Face model directory",
                path.display()
            )
        }
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", config_path.display()))?
        } else {
            Value::Null
        };
        let special = |key: &str| match &config[key] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let tokenizer = TextTokenizer::from_json_file(
            &dir.join("tokenizer.json"),
            special("bos_token"),
            special("eos_token"),
        )?;
        // transformers 5.x writes the template to its own file, which it reads first.
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("cannot read {}", jinja.display()))?,
            )
        } else {
            match &config["chat_template"] {
                Value::String(s) => Some(s.clone()),
                // A list of named templates; the one named "default" is the chat one.
                Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                Value::Null => None,
                other => bail!(
                    "{}: chat_template should be a string or a list of {{name, template}}, found {other}",
                    config_path.display()
                ),
            }
        };
        let mut listed = Vec::new();
        for name in ["generation_config.json", "config.json"] {
            listed.extend(eos_ids_of(&dir.join(name))?);
        }
        Ok(Self {
            path: dir.to_path_buf(),
            stop_ids: stop_ids(&tokenizer, listed),
            tokenizer,
            chat_template,
        })
    }

    /// The chat template `choice` names, compiled with this model's special tokens.
    pub fn template(
        &self,
        choice: &TemplateChoice,
        system_prompt: Option<String>,
    ) -> Result<ChatTemplate> {
        let bos = self.tokenizer.bos_token.clone().unwrap_or_default();
        let eos = self.tokenizer.eos_token.clone().unwrap_or_default();
        let whose = format!("model {}", self.path.display());
        let template = choice.compile(self.chat_template.as_deref(), &bos, &eos, &whose)?;
        Ok(match system_prompt {
            Some(s) => template.with_default_system(Some(s)),
            None => template,
        })
    }
}

/// The tokenizer's end-of-sequence token, then the `listed` ids, each once.
fn stop_ids(tokenizer: &TextTokenizer, listed: Vec<u32>) -> Vec<u32> {
    let mut out: Vec<u32> = tokenizer.eos_id().into_iter().collect();
    for id in listed {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// `eos_token_id` of a JSON file (one id or a list), none when the file or the key is absent.
fn eos_ids_of(path: &Path) -> Result<Vec<u32>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Ids {
        One(u32),
        Many(Vec<u32>),
    }
    #[derive(serde::Deserialize)]
    struct Eos {
        eos_token_id: Option<Ids>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let eos: Eos = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: eos_token_id should be a token id or a list of them",
            path.display()
        )
    })?;
    Ok(match eos.eos_token_id {
        None => vec![],
        Some(Ids::One(i)) => vec![i],
        Some(Ids::Many(v)) => v,
    })
}
