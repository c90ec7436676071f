//! Stage configs: a TOML file from configs/, then `key=value` overrides from the command
//! line (nanoGPT style), deserialised into the stage's plain config struct.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;
use toml::{Table, Value};

/// Parses one override: `a.b=3` sets key `b` of table `a` to the integer 3. The value is
/// read as TOML (numbers, booleans, arrays, quoted strings) and otherwise kept as a string;
/// the bare words `nan` and `inf` stay strings (run names), `+inf`/`-inf` are numbers.
pub fn apply_override(table: &mut Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("override '{assignment}' should look like key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("override '{assignment}' has an empty key");
    }
    let bare_word = matches!(raw.trim(), "nan" | "inf");
    let value = match format!("v = {raw}").parse::<Table>() {
        Ok(mut t) if !bare_word => t.remove("v").expect("parsed key"),
        _ => Value::String(raw.to_string()),
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("split yields one part");
    let mut node = table;
    for part in parts {
        node = node
            .entry(part)
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .ok_or_else(|| anyhow!("override '{assignment}': '{part}' is not a table"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// Reads `path` (if given), applies `overrides`, and deserialises the result; unknown keys
/// are errors when `T` is marked `#[serde(deny_unknown_fields)]`.
pub fn load<T: DeserializeOwned>(path: Option<&Path>, overrides: &[String]) -> Result<T> {
    let mut table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            text.parse::<Table>()
                .with_context(|| format!("{}: not valid TOML", p.display()))?
        }
        None => Table::new(),
    };
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    let name = path.map_or("<defaults>".to_string(), |p| p.display().to_string());
    T::deserialize(Value::Table(table)).map_err(|e| anyhow!("{name}: {e}"))
}

/// A path from the environment variable `name`, when it is set and not empty (the justfile
/// exports an empty one for "none").
pub fn env_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}

/// The resolved config as TOML, written next to a stage's outputs.
pub fn to_toml<T: serde::Serialize>(config: &T) -> Result<String> {
    Ok(toml::to_string_pretty(config)?)
}

/// A config as `dotted.key -> value` (TOML syntax), every table flattened: what the report
/// groups runs by and what a changed config is told apart by.
pub fn flatten<T: serde::Serialize>(
    config: &T,
) -> Result<std::collections::BTreeMap<String, String>> {
    fn walk(prefix: &str, v: &Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", &Value::try_from(config)?, &mut out);
    Ok(out)
}

/// The keys on which two configs differ, each as `key: A -> B` (a key one lacks shows `–`).
pub fn differences<T: serde::Serialize>(a: &T, b: &T) -> Result<Vec<String>> {
    let (a, b) = (flatten(a)?, flatten(b)?);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &std::collections::BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_else(|| "–".into())
            };
            format!("{k}: {} -> {}", show(&a), show(&b))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        lr: f64,
        name: String,
        #[serde(default)]
        ema: Ema,
    }
    #[derive(Debug, Default, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Ema {
        beta: f64,
    }

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "lr = 1e-5\nname = \"a\"\n").unwrap();
        let c: Cfg = load(
            Some(&p),
            &["lr=3e-4".into(), "ema.beta=0.99".into(), "name=b c".into()],
        )
        .unwrap();
        assert_eq!(
            c,
            Cfg {
                lr: 3e-4,
                name: "b c".into(),
                ema: Ema { beta: 0.99 }
            }
        );
    }

    #[test]
    fn unknown_key_and_bad_override_are_errors() {
        let err = load::<Cfg>(None, &["lr=1".into(), "name=x".into(), "lrr=2".into()]).unwrap_err();
        assert!(err.to_string().contains("lrr"), "{err}");
        assert!(load::<Cfg>(None, &["novalue".into()]).is_err());
    }

    #[test]
    fn flatten_and_differences_name_dotted_keys() {
        #[derive(Clone, Serialize)]
        struct Ema {
            beta: f64,
            every: usize,
        }
        #[derive(Clone, Serialize)]
        struct Run {
            lr: f64,
            data: Vec<String>,
            ema: Ema,
        }
        let a = Run {
            lr: 1e-4,
            data: vec!["d.parquet".into()],
            ema: Ema {
                beta: 0.99,
                every: 1,
            },
        };
        let flat = flatten(&a).unwrap();
        assert_eq!(
            flat.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            [
                "data=[\"d.parquet\"]",
                "ema.beta=0.99",
                "ema.every=1",
                "lr=0.0001"
            ]
        );
        let b = Run {
            ema: Ema {
                beta: 0.999,
                every: 1,
            },
            ..a.clone()
        };
        assert_eq!(differences(&a, &b).unwrap(), ["ema.beta: 0.99 -> 0.999"]);
        assert!(differences(&a, &a).unwrap().is_empty());
    }
}
