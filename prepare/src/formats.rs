//! Readers: every data format in the mirror, turned into [`Record`]s of one shape.
//!
//! A file is first read as a sequence of JSON objects (a CSV row becomes an object of its
//! columns, a text line the object `{"line": ...}`), then the asset's [`ReadSpec`] picks
//! the conversation's fields out of each object. Every error names the file, the line (or
//! record) and the field.

use anyhow::{anyhow, bail, Context, Result};
use basin_lm::chat::Conversation;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// A JSON array of objects.
    Json,
    /// CSV with a header row.
    Csv,
    /// One prompt per non-empty line, as the field `line`.
    Lines,
    /// A JSON object whose field `user[0]` is an array of prompt strings.
    JsonFieldList,
}

/// How to read an asset's records into conversations (the `[asset.read]` table).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReadSpec {
    pub format: Format,
    /// Field paths joined by a blank line into the user turn (empty fields skipped).
    pub user: Vec<String>,
    pub system: Option<String>,
    pub assistant: Option<String>,
    /// Field paths joined by "/" into the label.
    #[serde(default)]
    pub label: Vec<String>,
    /// Keep only the records whose field equals a value.
    #[serde(rename = "where")]
    pub keep_if: Option<KeepIf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeepIf {
    pub field: String,
    pub equals: String,
}

/// One record of a data set as a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// 0-based position among the file's records (before `where`): a stable id.
    pub index: usize,
    pub conversation: Conversation,
    pub label: Option<String>,
}

/// Reads every record of `path` as `spec` says.
pub fn read_records(path: &Path, spec: &ReadSpec) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for_each_record(path, spec, |r| {
        records.push(r);
        Ok(())
    })?;
    Ok(records)
}

/// Hands every record of `path` to `f`, in file order. JSONL and line files are read a line
/// at a time (memory bounded by a record, whatever the file's size); the other formats are
/// parsed whole. Returns how many records `f` got.
pub fn for_each_record(
    path: &Path,
    spec: &ReadSpec,
    mut f: impl FnMut(Record) -> Result<()>,
) -> Result<usize> {
    if spec.user.is_empty() {
        bail!("{}: the read spec names no user field", path.display());
    }
    let empty = || {
        anyhow!(
            "{} is empty: expected {:?} records",
            path.display(),
            spec.format
        )
    };
    let (mut index, mut given) = (0, 0);
    let mut take = |at: String, object: Value| -> Result<()> {
        let at = format!("{}: {at}", path.display());
        let i = index;
        index += 1;
        if let Some(k) = &spec.keep_if {
            if string_field(&object, &k.field, &at)? != k.equals {
                return Ok(());
            }
        }
        given += 1;
        f(to_record(i, &object, spec, &at)?)
    };
    match spec.format {
        Format::Jsonl | Format::Lines => {
            use std::io::BufRead;
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
            let mut seen_text = false;
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line =
                    line.with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                seen_text = true;
                let at = format!("line {}", i + 1);
                let object = if spec.format == Format::Lines {
                    obj([("line", line.trim_end())])
                } else {
                    jsonl_object(path, &at, &line)?
                };
                take(at, object)?;
            }
            if !seen_text {
                return Err(empty());
            }
        }
        _ => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
            if text.trim().is_empty() {
                return Err(empty());
            }
            let objects = match spec.format {
                Format::Json => json_objects(path, &text)?,
                Format::Csv => csv_objects(path, &text)?,
                _ => field_list_objects(path, &text, &spec.user[0])?,
            };
            for (at, object) in objects {
                take(at, object)?;
            }
        }
    }
    if given == 0 {
        bail!("{}: no record left to read", path.display());
    }
    Ok(given)
}

fn obj<const N: usize>(pairs: [(&str, &str); N]) -> Value {
    Value::Object(
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

fn to_record(index: usize, object: &Value, spec: &ReadSpec, at: &str) -> Result<Record> {
    let mut parts = Vec::new();
    for f in &spec.user {
        let s = string_field(object, f, at)?;
        if !s.trim().is_empty() {
            parts.push(s);
        }
    }
    if parts.is_empty() {
        bail!(
            "{at}: the user turn is empty (fields {})",
            spec.user.join(", ")
        );
    }
    let optional = |f: &Option<String>| -> Result<Option<String>> {
        match f {
            None => Ok(None),
            Some(f) => match lookup(object, f) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => string_field(object, f, at).map(Some),
            },
        }
    };
    let assistant = match &spec.assistant {
        Some(f) => Some(string_field(object, f, at)?),
        None => None,
    };
    let label = if spec.label.is_empty() {
        None
    } else {
        let parts: Vec<String> = spec
            .label
            .iter()
            .map(|f| match lookup(object, f) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
                Some(Value::Null) | None => Ok(String::new()),
                Some(v) => Err(anyhow!(
                    "{at}: field '{f}': expected a string, found {}",
                    kind(v)
                )),
            })
            .collect::<Result<_>>()?;
        Some(parts.join("/"))
    };
    Ok(Record {
        index,
        conversation: Conversation {
            system: optional(&spec.system)?.filter(|s| !s.trim().is_empty()),
            user: parts.join("\n\n"),
            assistant,
        },
        label,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Follows a dot-separated path: object keys, array indices, or `key=value` to pick the
/// array element whose `key` is `value`.
pub fn lookup<'a>(mut v: &'a Value, path: &str) -> Option<&'a Value> {
    for seg in path.split('.') {
        v = match (v, seg.split_once('=')) {
            (Value::Array(items), Some((k, want))) => items
                .iter()
                .find(|it| it.get(k).and_then(Value::as_str) == Some(want))?,
            (Value::Array(items), None) => items.get(seg.parse::<usize>().ok()?)?,
            (Value::Object(map), _) => map.get(seg)?,
            _ => return None,
        };
    }
    Some(v)
}

fn string_field(object: &Value, field: &str, at: &str) -> Result<String> {
    match lookup(object, field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => bail!(
            "{at}: field '{field}': expected a string, found {}",
            kind(v)
        ),
        None => bail!("{at}: field '{field}' is missing"),
    }
}

/// One line of a JSONL file as its object.
fn jsonl_object(path: &Path, at: &str, line: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| anyhow!("{}: {at}: not valid JSON: {e}", path.display()))?;
    if !v.is_object() {
        bail!(
            "{}: {at}: expected a JSON object, found {}",
            path.display(),
            kind(&v)
        );
    }
    Ok(v)
}

fn json_objects(path: &Path, text: &str) -> Result<Vec<(String, Value)>> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    let Value::Array(items) = v else {
        bail!(
            "{}: expected a JSON array of objects, found {}",
            path.display(),
            kind(&v)
        );
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("record {i} (0-based)");
            if v.is_object() {
                Ok((at, v))
            } else {
                bail!(
                    "{}: {at}: expected a JSON object, found {}",
                    path.display(),
                    kind(&v)
                )
            }
        })
        .collect()
}

fn csv_objects(path: &Path, text: &str) -> Result<Vec<(String, Value)>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| {
            anyhow!(
                "{}: line 1: cannot read the CSV header: {e}",
                path.display()
            )
        })?
        .clone();
    let mut out = Vec::new();
    for row in reader.records() {
        let row = row.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            anyhow!("{}: line {line}: malformed CSV: {e}", path.display())
        })?;
        let line = row.position().map_or(0, |p| p.line());
        let map: Map<String, Value> = headers
            .iter()
            .zip(row.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        out.push((format!("line {line}"), Value::Object(map)));
    }
    Ok(out)
}

fn field_list_objects(path: &Path, text: &str, field: &str) -> Result<Vec<(String, Value)>> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    let items = match lookup(&v, field) {
        Some(Value::Array(items)) => items,
        Some(other) => bail!(
            "{}: field '{field}': expected an array of strings, found {}",
            path.display(),
            kind(other)
        ),
        None => bail!("{}: field '{field}' is missing", path.display()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{field}[{i}]");
            match item {
                Value::String(s) => Ok((at, obj([(field, s.as_str())]))),
                other => bail!(
                    "{}: {at}: expected a string, found {}",
                    path.display(),
                    kind(other)
                ),
            }
        })
        .collect()
}
