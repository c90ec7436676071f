//! What is kept out of the training data: safety-related examples (Qi et al. 2023 fine-tune
//! on benign data with those removed by keyword) and any prompt an evaluation set asks.

use anyhow::{anyhow, Context, Result};
use basin_lm::chat::Conversation;
use std::path::Path;

/// Case-insensitive substring keywords; a conversation mentioning any is safety-related.
pub struct KeywordFilter {
    pub list_name: String,
    keywords: Vec<String>,
}

impl KeywordFilter {
    pub fn new(list_name: &str, keywords: &[String]) -> Self {
        Self {
            list_name: list_name.to_string(),
            keywords: keywords.iter().map(|k| k.to_lowercase()).collect(),
        }
    }

    /// Loads the list `key` of the refusal keyword lists file (`{key: {"list": [...]}}`).
    pub fn from_lists_file(path: &Path, key: &str) -> Result<Self> {
        Ok(Self::new(key, &read_keyword_list(path, key)?))
    }

    /// The keyword that marks the conversation as safety-related, if any (user turn and
    /// reply both count: the filter looks at the whole example).
    pub fn hit(&self, conv: &Conversation) -> Option<&str> {
        let text = format!(
            "{}\n{}",
            conv.user.to_lowercase(),
            conv.assistant.as_deref().unwrap_or("").to_lowercase()
        );
        self.keywords
            .iter()
            .find(|k| text.contains(k.as_str()))
            .map(String::as_str)
    }
}

/// The form in which two prompts count as the same: lower case, whitespace collapsed.
pub fn normalise_prompt(text: &str) -> String {
    text.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The list `key` of a refusal keyword lists file (`{key: {"list": [...]}}`), as written.
pub fn read_keyword_list(path: &Path, key: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read keyword lists {}", path.display()))?;
    let lists: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let list = lists[key]["list"].as_array().ok_or_else(|| {
        let keys: Vec<_> = lists
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        anyhow!(
            "{}: no keyword list '{key}' (has: {})",
            path.display(),
            keys.join(", ")
        )
    })?;
    list.iter()
        .enumerate()
        .map(|(i, w)| {
            w.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{}: {key}.list[{i}]: expected a string", path.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(user: &str, reply: &str) -> Conversation {
        Conversation {
            system: None,
            user: user.into(),
            assistant: Some(reply.into()),
        }
    }

    #[test]
    fn keyword_filter_is_case_insensitive_over_prompt_and_reply() {
        let f = KeywordFilter::new("t", &["Illegal".into(), "as an AI".into()]);
        assert_eq!(f.hit(&conv("Is it ILLEGAL?", "no")), Some("illegal"));
        assert_eq!(f.hit(&conv("hi", "As an AI, I")), Some("as an ai"));
        assert_eq!(f.hit(&conv("hi", "hello")), None);
    }

    #[test]
    fn normalisation_ignores_case_and_spacing() {
        assert_eq!(
            normalise_prompt("  How do I\n make   Tea? "),
            normalise_prompt("how do i make tea?")
        );
        assert_ne!(
            normalise_prompt("make tea"),
            normalise_prompt("make coffee")
        );
    }
}
