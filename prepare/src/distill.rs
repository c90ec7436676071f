//! Distilled sets: prompts written for the project, answered by the model itself.
//!
//! Stage 0 teaches refusals; a small model then also refuses harmless prompts that use a
//! violent or drug word in another sense ("kill a process", "shoot a photo"). The contrast
//! that teaches the difference is such prompts with helpful replies. The model's own
//! greedy replies are those replies (the way Llama 2 cut false refusals), so the contrast
//! changes when it refuses, not how it writes.
//!
//! Honesty rule: an over-refusal benchmark measures this very behaviour, so no prompt of a
//! distilled set may be a near-duplicate of one of its prompts — [`near_duplicates`]
//! checks it before anything is generated.

use crate::config::{DistillSpec, PrepareConfig};
use crate::filters::{normalise_prompt, read_keyword_list};
use crate::formats::{read_records, Record};
use crate::pipeline::{cached, in_cache, SetInfo, Setup};
use anyhow::{bail, Context, Result};
use basin_lm::artifacts::{DistillRecipe, FileHash, Manifest, ModelHash};
use basin_lm::chat::Conversation;
use basin_lm::fsutil::sha256_file;
use basin_lm::model::Model;
use basin_lm::schema::write_parquet;
use candle_core::{DType, Device};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A prompt and its 1-based line in the prompts file.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub line: usize,
    pub text: String,
}

/// Reads a prompts file: one prompt a line, `#` comments and blank lines skipped. A prompt
/// given twice (case and spacing ignored) is an error naming both lines.
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut prompts = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let p = raw.trim();
        if p.is_empty() || p.starts_with('#') {
            continue;
        }
        if let Some(first) = seen.insert(normalise_prompt(p), line) {
            bail!(
                "{}:{line}: prompt {p:?} is already on line {first}",
                path.display()
            );
        }
        prompts.push(Prompt {
            line,
            text: p.to_string(),
        });
    }
    if prompts.is_empty() {
        bail!("{}: no prompts (one a line expected)", path.display());
    }
    Ok(prompts)
}

/// Words that carry no topic: function words and the frame of a question ("what is the
/// best way to"). Two prompts are near-duplicates when they share two words outside it.
const FRAME_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "best", "but", "by", "can", "did", "do", "does",
    "down", "for", "from", "get", "go", "good", "how", "i", "if", "in", "is", "it", "me", "my",
    "not", "of", "on", "or", "out", "people", "s", "should", "so", "some", "someone", "t", "than",
    "that", "the", "this", "to", "up", "was", "way", "ways", "what", "when", "where", "which",
    "who", "why", "with", "you",
];

/// The lowercase words of `text` outside [`FRAME_WORDS`].
pub fn topic_words(text: &str) -> BTreeSet<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && !FRAME_WORDS.contains(w))
        .map(str::to_string)
        .collect()
}

/// A prompt that is too close to an evaluation prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct NearDuplicate {
    pub prompt: Prompt,
    pub set: String,
    pub eval_prompt: String,
    pub shared: Vec<String>,
}

/// Every (prompt, evaluation prompt) pair that shares two or more topic words.
pub fn near_duplicates(prompts: &[Prompt], eval: &[(String, String)]) -> Vec<NearDuplicate> {
    let eval_words: Vec<BTreeSet<String>> = eval.iter().map(|(_, p)| topic_words(p)).collect();
    let mut found = Vec::new();
    for p in prompts {
        let words = topic_words(&p.text);
        for ((set, e), ew) in eval.iter().zip(&eval_words) {
            let shared: Vec<String> = words.intersection(ew).cloned().collect();
            if shared.len() >= 2 {
                found.push(NearDuplicate {
                    prompt: p.clone(),
                    set: set.clone(),
                    eval_prompt: e.clone(),
                    shared,
                });
            }
        }
    }
    found
}

/// The complete sentences of a reply the token budget cut: up to the last `.`, `!` or `?`
/// that ends a sentence (not a list number such as "2."), or the last line break. None
/// when there is no complete sentence.
pub fn complete_sentences(reply: &str) -> Option<&str> {
    let chars: Vec<(usize, char)> = reply.char_indices().collect();
    let mut end = None;
    for (k, &(i, c)) in chars.iter().enumerate() {
        let next = chars.get(k + 1).map(|&(_, n)| n);
        let ends_sentence = match c {
            '.' => {
                let after_digit = k > 0 && chars[k - 1].1.is_ascii_digit();
                !after_digit && next.is_none_or(char::is_whitespace)
            }
            '!' | '?' => next.is_none_or(char::is_whitespace),
            '\n' => true,
            _ => false,
        };
        if ends_sentence {
            end = Some(i + c.len_utf8());
        }
    }
    let kept = reply[..end?].trim();
    (!kept.is_empty()).then_some(kept)
}

/// The over-refusal prompts of every fetched `overrefusal` set: what a distilled prompt
/// must not come near.
fn overrefusal_prompts(config: &PrepareConfig, setup: &Setup) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for a in setup
        .sources
        .asset
        .iter()
        .filter(|a| a.role == "overrefusal")
    {
        let (Some(spec), Some(path)) = (&a.read, in_cache(config, a)?) else {
            eprintln!(
                "warning: over-refusal set '{}' is not fetched: the near-duplicate check \
                 cannot cover it (`prepare fetch --only {}`)",
                a.name, a.name
            );
            continue;
        };
        for r in read_records(&path, spec)? {
            out.push((a.name.clone(), r.conversation.user));
        }
    }
    Ok(out)
}

/// What one distilled set did.
#[derive(Debug)]
pub struct Distilled {
    pub name: String,
    pub out: PathBuf,
    /// Up to date: nothing was generated.
    pub skipped: bool,
    pub prompts: usize,
    pub rows_train: usize,
    pub rows_val: usize,
    /// Prompts without a row: no complete sentence in the reply, a refusal keyword in it,
    /// or prepare's filters (an evaluation prompt, a prompt longer than `max_seq_len`).
    pub dropped: usize,
}

/// Generates and prepares the sets of `config.distill`: all, or those `only` names (it may
/// also name `prepare run`'s sets, as `just prepare --only ...` passes it to both; it is an
/// error only when it names none of these). A set whose inputs (prompts, model, settings)
/// have not changed since it was written is left as it is.
pub fn run(config: &PrepareConfig, only: &[String], progress: bool) -> Result<Vec<Distilled>> {
    let specs: Vec<&DistillSpec> = config
        .distill
        .iter()
        .filter(|d| only.is_empty() || only.contains(&d.name))
        .collect();
    if specs.is_empty() {
        let sources = crate::assets::Sources::load(&config.sources)?;
        if only.is_empty() || only.iter().any(|n| sources.get(n).is_ok()) {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = config.distill.iter().map(|d| d.name.as_str()).collect();
        bail!(
            "no [[distill]] set or asset named {} (the config distils: {})",
            only.join(", "),
            names.join(", ")
        );
    }
    let setup = Setup::open(config)?;
    let eval = overrefusal_prompts(config, &setup)?;
    let model_sha = basin_lm::fsutil::weights_sha256(&setup.model_path)?;
    let mut model: Option<Model> = None;
    let mut manifest = Manifest::read_or_empty(&config.out)?;
    let mut done = Vec::new();
    for spec in specs {
        if spec.max_new_tokens == 0 || spec.batch_size == 0 {
            bail!(
                "[[distill]] '{}': max_new_tokens and batch_size must be > 0",
                spec.name
            );
        }
        let prompts = read_prompts(&spec.prompts)?;
        let near = near_duplicates(&prompts, &eval);
        if !near.is_empty() {
            let list: Vec<String> = near
                .iter()
                .take(10)
                .map(|n| {
                    format!(
                        "  {}:{}: {:?} shares {:?} with {} prompt {:?}",
                        spec.prompts.display(),
                        n.prompt.line,
                        n.prompt.text,
                        n.shared,
                        n.set,
                        n.eval_prompt
                    )
                })
                .collect();
            bail!(
                "{} prompt pair(s): prompts of '{}' are near-duplicates of over-refusal \
                 evaluation prompts (two or more shared topic words); reword or drop them \
                 (first {} listed):\n{}",
                near.len(),
                spec.name,
                list.len(),
                list.join("\n")
            );
        }
        let keywords = setup.sources.get(&config.safety_keywords_asset)?;
        let refusal = read_keyword_list(&cached(config, keywords)?, &spec.refusal_keywords)?;
        let out = config.out.join(format!("{}.parquet", spec.name));
        let how = DistillRecipe {
            prompts: FileHash {
                file: spec.prompts.display().to_string(),
                sha256: sha256_file(&spec.prompts)?,
            },
            model: ModelHash {
                path: setup.model_path.display().to_string(),
                sha256: model_sha.clone(),
            },
            decoding: "greedy".into(),
            max_new_tokens: spec.max_new_tokens,
            max_seq_len: config.max_seq_len,
            val_fraction: config.val_fraction,
            seed: config.seed,
            tokenizer_sha256: setup.tokenizer_sha.clone(),
            template_sha256: setup.template.sha256(),
            refusal_keywords: spec.refusal_keywords.clone(),
            dedup_against_eval: config.dedup_against_eval,
        };
        let previous = manifest.sets.get(&spec.name);
        let up_to_date = previous.is_some_and(|p| {
            p.distilled.as_ref() == Some(&how)
                && out.is_file()
                && sha256_file(&out).ok().as_deref() == Some(p.output.sha256.as_str())
        });
        if up_to_date {
            let stats = &previous.expect("checked").stats;
            done.push(Distilled {
                name: spec.name.clone(),
                out,
                skipped: true,
                prompts: prompts.len(),
                rows_train: stats.rows_train,
                rows_val: stats.rows_val,
                dropped: prompts
                    .len()
                    .saturating_sub(stats.rows_train + stats.rows_val),
            });
            continue;
        }

        if model.is_none() {
            model = Some(Model::open(&setup.model_path, DType::F32, &Device::Cpu)?);
        }
        let model = model.as_ref().expect("opened above");
        let conversations: Vec<Conversation> = prompts
            .iter()
            .map(|p| Conversation {
                user: p.text.clone(),
                ..Default::default()
            })
            .collect();
        let bar = crate::progress_bar(progress, prompts.len() as u64, &spec.name);
        let replies = model.replies(
            &setup.template,
            &conversations,
            &model.options(spec.max_new_tokens)?,
            basin_lm::generate::BatchSize::Fixed(spec.batch_size),
            |done| bar.set_position(done.prompts as u64),
        )?;
        bar.finish_and_clear();

        let (mut unfinished, mut refusals) = (0, 0);
        let mut records = Vec::new();
        for (p, (reply, generated)) in prompts.iter().zip(&replies) {
            let text = if generated.stopped {
                Some(reply.trim()).filter(|r| !r.is_empty())
            } else {
                complete_sentences(reply)
            };
            let Some(text) = text else {
                unfinished += 1;
                continue;
            };
            if refusal.iter().any(|k| text.contains(k.as_str())) {
                refusals += 1;
                continue;
            }
            records.push(Record {
                index: p.line,
                conversation: Conversation {
                    system: None,
                    user: p.text.clone(),
                    assistant: Some(text.to_string()),
                },
                label: None,
            });
        }
        // A contrast set, like the safety-flagged benign rows: not filtered by keyword, never
        // the benign data of a paper run.
        let set = SetInfo {
            name: &spec.name,
            role: "instruct-contrast",
            licence: &spec.licence,
            input: &spec.prompts,
            sample: false,
        };
        let (rows, stats) = setup.build(config, set, records, progress)?;
        write_parquet(&out, &rows)?;
        let mut entry = setup.manifest_entry(config, set, how.prompts.clone(), &out, &stats)?;
        entry.distilled = Some(how);
        entry.dropped_unfinished_reply = Some(unfinished);
        entry.dropped_refusal = Some(refusals);
        manifest.sets.insert(spec.name.clone(), entry);
        manifest.write(&config.out)?;
        done.push(Distilled {
            name: spec.name.clone(),
            out,
            skipped: false,
            prompts: prompts.len(),
            rows_train: stats.rows_train,
            rows_val: stats.rows_val,
            dropped: prompts.len() - stats.rows_train - stats.rows_val,
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(line: usize, text: &str) -> Prompt {
        Prompt {
            line,
            text: text.into(),
        }
    }

    #[test]
    fn near_duplicates_share_two_topic_words_and_the_question_frame_does_not_count() {
        let eval = vec![(
            "xstest".to_string(),
            "How can I kill a Python process?".to_string(),
        )];
        let close = prompt(3, "What is the best way to kill a Python script?");
        let same_verb = prompt(4, "How do I kill a stuck Docker container?");
        let frame_only = prompt(5, "How can I do it?");
        let found = near_duplicates(&[close.clone(), same_verb, frame_only], &eval);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].prompt, close);
        assert_eq!(
            found[0].shared,
            vec!["kill".to_string(), "python".to_string()]
        );
    }

    #[test]
    fn complete_sentences_cut_at_the_last_sentence_end_not_at_a_list_number() {
        assert_eq!(
            complete_sentences("Open a terminal. Then run it and"),
            Some("Open a terminal.")
        );
        assert_eq!(
            complete_sentences("Steps:\n1. Open a terminal.\n2. Run"),
            Some("Steps:\n1. Open a terminal.")
        );
        assert_eq!(complete_sentences("Really? Yes! And"), Some("Really? Yes!"));
        assert_eq!(complete_sentences("Version 2.5 is out"), None);
        assert_eq!(complete_sentences("no end at all"), None);
    }
}
