//! The text tokenizer: a Hugging Face `tokenizers::Tokenizer`, read from `tokenizer.json`
//! or built from the `tokenizer.ggml.*` keys of a GGUF file.

use crate::gguf_meta::GgufMeta;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::path::Path;

/// A tokenizer plus the special tokens the pipeline needs by role.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The same tokenizer with special tokens read as plain text (for content).
    plain: tokenizers::Tokenizer,
    /// The special (control) tokens' strings, longest first, with their ids.
    special: Vec<(String, u32)>,
    /// The characters they start with: [`Self::disarm`] looks for a token only there.
    special_starts: Vec<char>,
}

/// Marks a control token's string inside content so that no tokenizer matches it: the
/// character goes after the token's first character, and is taken out again before the
/// content is tokenized as plain text (a private-use code point no data set uses as text).
const DISARM: char = '\u{E000}';

/// GGUF token type of control tokens (llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`).
const GGUF_TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type of user-defined tokens, also matched whole before BPE.
const GGUF_TOKEN_TYPE_USER_DEFINED: i64 = 4;

impl TextTokenizer {
    /// Reads a `tokenizer.json`; the special tokens' roles come from `bos`/`eos` if given.
    pub fn from_json_file(
        path: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
        Ok(Self::new(inner, bos_token, eos_token))
    }

    fn new(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let mut special: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        special.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut special_starts: Vec<char> = special
            .iter()
            .filter_map(|(s, _)| s.chars().next())
            .collect();
        special_starts.sort_unstable();
        special_starts.dedup();
        Self {
            inner,
            bos_token,
            eos_token,
            plain,
            special,
            special_starts,
        }
    }

    /// Builds the tokenizer a GGUF file describes (GPT-2-style byte-level BPE only).
    pub fn from_gguf(meta: &GgufMeta) -> Result<Self> {
        let json = tokenizer_json_from_gguf(meta)?;
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json)?).map_err(|e| {
            anyhow!(
                "{}: the tokenizer built from GGUF metadata does not load: {e}",
                meta.path.display()
            )
        })?;
        let tokens = meta.string_array("tokenizer.ggml.tokens")?;
        let token_at = |key: &str| {
            meta.opt_u32(key)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        Ok(Self::new(
            inner,
            token_at("tokenizer.ggml.bos_token_id"),
            token_at("tokenizer.ggml.eos_token_id"),
        ))
    }

    /// Token ids of `text`; special tokens written in the text map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `text` as content: every control token written in it (`<|im_end|>`, `<s>`) is
    /// marked so that it stays text when a chat template renders it and
    /// [`Self::encode_rendered`] tokenizes the result. Text without one comes back as it is.
    pub fn disarm(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let token = match self.special_starts.binary_search(&c) {
                Ok(_) => self
                    .special
                    .iter()
                    .find(|(s, _)| rest.starts_with(s.as_str())),
                Err(_) => None,
            };
            match token {
                Some((s, _)) => {
                    out.push(c);
                    out.push(DISARM);
                    out.push_str(&s[c.len_utf8()..]);
                    rest = &rest[s.len()..];
                }
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }

    /// A conversation whose every text is [`Self::disarm`]ed: render it, then tokenize with
    /// [`Self::encode_rendered`], and only the template's own markup becomes control tokens.
    pub fn disarm_conversation(
        &self,
        conv: &crate::chat::Conversation,
    ) -> crate::chat::Conversation {
        crate::chat::Conversation {
            system: conv.system.as_deref().map(|s| self.disarm(s)),
            user: self.disarm(&conv.user),
            assistant: conv.assistant.as_deref().map(|s| self.disarm(s)),
        }
    }

    /// Token ids of a chat template's rendering of a [`Self::disarm_conversation`]: the
    /// control tokens in it are the template's own; each stretch of text between them is
    /// tokenized with its disarmed control tokens put back as plain text. Without any
    /// disarmed token this is exactly [`Self::encode`].
    pub fn encode_rendered(&self, rendered: &str) -> Result<Vec<u32>> {
        if !rendered.contains(DISARM) {
            return self.encode(rendered);
        }
        let enc = self
            .inner
            .encode(rendered, false)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        let is_control = |id: u32| self.special.iter().any(|(_, s)| *s == id);
        let mut ids = Vec::with_capacity(enc.len());
        let mut text_from: Option<usize> = None;
        let mut text_to = 0;
        let flush = |from: Option<usize>, to: usize, ids: &mut Vec<u32>| -> Result<()> {
            if let Some(from) = from {
                let piece = self.rearm(&rendered[from..to]);
                let enc = self
                    .plain
                    .encode_fast(piece.as_str(), false)
                    .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Ok(())
        };
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            if is_control(id) {
                flush(text_from.take(), text_to, &mut ids)?;
                ids.push(id);
            } else {
                text_from.get_or_insert(start);
                text_to = end;
            }
        }
        flush(text_from, text_to, &mut ids)?;
        Ok(ids)
    }

    /// Disarmed control tokens back to their text.
    fn rearm(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (s, _) in &self.special {
            let c = s.chars().next().expect("not empty");
            let disarmed = format!("{c}{DISARM}{}", &s[c.len_utf8()..]);
            if out.contains(&disarmed) {
                out = out.replace(&disarmed, s);
            }
        }
        out
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// The tokenizer in `tokenizer.json` form (what `transformers` loads).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))
    }

    /// sha256 of the `tokenizer.json` form: identifies the tokenizer in manifests.
    pub fn sha256(&self) -> Result<String> {
        Ok(crate::fsutil::sha256_bytes(self.to_json()?.as_bytes()))
    }
}

/// The `tokenizer.json` document equivalent to a GGUF file's tokenizer metadata.
///
/// Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizers
/// llama.cpp names `smollm` (digits split one by one, then GPT-2's regex) and
/// `default`/`gpt2` (GPT-2's regex). Control and user-defined tokens become special added
/// tokens, matched whole before BPE, as llama.cpp does.
pub fn tokenizer_json_from_gguf(meta: &GgufMeta) -> Result<Value> {
    let path = meta.path.display();
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "{path}: tokenizer.ggml.model = '{model}' is not supported from GGUF metadata \
             (only 'gpt2' byte-level BPE is); give the model as a Hugging Face directory with a tokenizer.json"
        );
    }
    let pre = meta
        .opt_string("tokenizer.ggml.pre")
        .unwrap_or_else(|| "default".into());
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre.as_str() {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "default" | "gpt2" => byte_level,
        other => bail!(
            "{path}: tokenizer.ggml.pre = '{other}' is not supported from GGUF metadata \
             (supported: smollm, gpt2, default); give the model as a Hugging Face directory with a tokenizer.json"
        ),
    };
    let tokens = meta.string_array("tokenizer.ggml.tokens")?;
    let types = match meta.get("tokenizer.ggml.token_type") {
        Some(_) => meta.int_array("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        bail!(
            "{path}: tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}",
            types.len(),
            tokens.len()
        );
    }
    let merges = meta.string_array("tokenizer.ggml.merges")?;
    let merges: Vec<[&str; 2]> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok([a, b]),
            None => Err(anyhow!(
                "{path}: tokenizer.ggml.merges[{i}] = {m:?} should be two symbols separated by a space"
            )),
        })
        .collect::<Result<_>>()?;
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == GGUF_TOKEN_TYPE_CONTROL || ty == GGUF_TOKEN_TYPE_USER_DEFINED)
        .map(|(id, (t, &ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": ty == GGUF_TOKEN_TYPE_CONTROL})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}
