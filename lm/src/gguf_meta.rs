//! Typed access to a GGUF file's metadata (the tensors are read elsewhere).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;

/// The metadata and tensor table of a GGUF file.
pub struct GgufMeta {
    pub path: std::path::PathBuf,
    pub content: Content,
}

impl GgufMeta {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let content = Content::read(&mut file).map_err(|e| {
            anyhow!(
                "{}: not a readable GGUF file (expected the 'GGUF' magic and a v1-v3 header): {e}",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: metadata key '{key}' is missing", self.path.display()))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        match self.require(key)? {
            Value::String(s) => Ok(s.clone()),
            v => bail!(
                "{}: key '{key}' should be a string, found {v:?}",
                self.path.display()
            ),
        }
    }

    pub fn opt_string(&self, key: &str) -> Option<String> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// An unsigned integer of any width.
    pub fn opt_u32(&self, key: &str) -> Option<u32> {
        match self.get(key)? {
            Value::U8(v) => Some(*v as u32),
            Value::U16(v) => Some(*v as u32),
            Value::U32(v) => Some(*v),
            Value::U64(v) => u32::try_from(*v).ok(),
            Value::I32(v) => u32::try_from(*v).ok(),
            Value::I64(v) => u32::try_from(*v).ok(),
            _ => None,
        }
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<String>> {
        let Value::Array(items) = self.require(key)? else {
            bail!("{}: key '{key}' should be an array", self.path.display());
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                v => bail!(
                    "{}: {key}[{i}] should be a string, found {v:?}",
                    self.path.display()
                ),
            })
            .collect()
    }

    pub fn int_array(&self, key: &str) -> Result<Vec<i64>> {
        let Value::Array(items) = self.require(key)? else {
            bail!("{}: key '{key}' should be an array", self.path.display());
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                Value::U8(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                v => bail!(
                    "{}: {key}[{i}] should be an integer, found {v:?}",
                    self.path.display()
                ),
            })
            .collect()
    }
}
