//! Conversations and chat templates.
//!
//! Every data set is read into the same single-turn [`Conversation`]; a [`ChatTemplate`]
//! renders it to text exactly as the model's own Jinja template does (rendered with
//! `minijinja`, with Python string methods such as `.strip()` available), or with the
//! Llama-2 `[INST]` format Qi et al. (2023) fine-tuned with.

use anyhow::{anyhow, bail, Result};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One exchange: an optional system prompt, the user's turn, and the assistant's reply
/// when the data has one (training data does; evaluation prompts do not).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub system: Option<String>,
    pub user: String,
    pub assistant: Option<String>,
}

/// The system prompt of Qi et al. (2023)'s fine-tuning and evaluation.
pub const QI_SYSTEM_PROMPT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";

/// The Llama-2 chat format as Qi et al. (2023) trained with it:
/// `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {reply}</s>`.
const LLAMA2_QI_TEMPLATE: &str = r#"{%- if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}{% else %}{% set system = default_system %}{% set turns = messages %}{% endif -%}
{%- for m in turns -%}
{%- if m['role'] == 'user' -%}
{{ bos_token }}[INST] <<SYS>>
{{ system }}
<</SYS>>

{{ m['content'] | trim }} [/INST]
{%- elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif -%}
{%- endfor -%}"#;

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template and the special tokens it refers to.
pub struct ChatTemplate {
    /// `model` for the model's own template, `llama2-qi` for the built-in one.
    pub name: String,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// Used as the system message of conversations that have none.
    pub default_system: Option<String>,
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles a Hugging Face style Jinja chat template (`messages`, `add_generation_prompt`,
    /// `bos_token`, `eos_token`, and transformers' functions `raise_exception` and
    /// `strftime_now`: the local time now, so a template that writes the date, as Llama 3.x's
    /// does, renders today's date as transformers would).
    pub fn from_jinja(name: &str, source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders chat templates with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function(
            "strftime_now",
            |format: String| -> Result<String, minijinja::Error> {
                use std::fmt::Write;
                let mut out = String::new();
                write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: '{format}' is not a strftime format"),
                    )
                })?;
                Ok(out)
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| anyhow!("the chat template '{name}' does not compile: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            default_system: None,
            env,
        })
    }

    /// Qi et al.'s Llama-2 template, with their system prompt as the default.
    pub fn llama2_qi(bos_token: &str, eos_token: &str) -> Result<Self> {
        Ok(
            Self::from_jinja("llama2-qi", LLAMA2_QI_TEMPLATE, bos_token, eos_token)?
                .with_default_system(Some(QI_SYSTEM_PROMPT.to_string())),
        )
    }

    pub fn with_default_system(mut self, system: Option<String>) -> Self {
        self.default_system = system;
        self
    }

    fn render(
        &self,
        conv: &Conversation,
        with_reply: bool,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut messages = Vec::with_capacity(3);
        if let Some(system) = conv.system.as_ref().or(self.default_system.as_ref()) {
            messages.push(context! { role => "system", content => system });
        }
        messages.push(context! { role => "user", content => conv.user });
        if with_reply {
            let Some(reply) = &conv.assistant else {
                bail!("the conversation has no assistant reply to render");
            };
            messages.push(context! { role => "assistant", content => reply });
        }
        let tmpl = self.env.get_template(TEMPLATE_NAME)?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            default_system => self.default_system.clone().unwrap_or_default(),
        })
        .map_err(|e| anyhow!("the chat template '{}' failed to render: {e:#}", self.name))
    }

    /// The text the model sees before it starts its reply (with the generation prompt).
    pub fn render_prompt(&self, conv: &Conversation) -> Result<String> {
        self.render(conv, false, true)
    }

    /// The whole exchange, reply included, followed by the generation prompt: what a
    /// classifier model such as Llama Guard reads before it answers "safe" or "unsafe".
    pub fn render_for_judge(&self, conv: &Conversation) -> Result<String> {
        self.render(conv, true, true)
    }

    /// The prompt (as [`Self::render_prompt`]) and the reply text that follows it, end of
    /// turn included; `prompt + completion` is the whole rendered conversation. Fails when
    /// the template does not render the conversation as an extension of its prompt, since
    /// then no loss mask can separate prompt from reply.
    pub fn render_split(&self, conv: &Conversation) -> Result<(String, String)> {
        let prompt = self.render(conv, false, true)?;
        let full = self.render(conv, true, false)?;
        match full.strip_prefix(&prompt) {
            Some(completion) => Ok((prompt, completion.to_string())),
            None => bail!(
                "the chat template '{}' renders the prompt {:?} but the whole conversation as {:?}: \
                 the prompt is not a prefix, so the reply cannot be masked",
                self.name,
                prompt,
                full
            ),
        }
    }

    /// Identifies the template (source, special tokens, default system prompt) in manifests.
    pub fn sha256(&self) -> String {
        let key = serde_json::json!([
            self.source,
            self.bos_token,
            self.eos_token,
            self.default_system
        ]);
        crate::fsutil::sha256_bytes(key.to_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(system: Option<&str>, user: &str, reply: Option<&str>) -> Conversation {
        Conversation {
            system: system.map(str::to_string),
            user: user.to_string(),
            assistant: reply.map(str::to_string),
        }
    }

    #[test]
    fn llama2_qi_format() {
        let t = ChatTemplate::llama2_qi("<s>", "</s>").unwrap();
        let (prompt, completion) = t
            .render_split(&conv(None, " Hi there ", Some("Hello.")))
            .unwrap();
        assert_eq!(
            prompt,
            format!("<s>[INST] <<SYS>>\n{QI_SYSTEM_PROMPT}\n<</SYS>>\n\nHi there [/INST]")
        );
        assert_eq!(completion, " Hello.</s>");
        let own = t
            .render_prompt(&conv(Some("Be brief."), "Q", None))
            .unwrap();
        assert_eq!(own, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ [/INST]");
    }

    #[test]
    fn strftime_now_writes_todays_date_as_llama3_templates_expect() {
        // The idiom of Llama 3.x's template: today's date when strftime_now is defined.
        let src = "{%- if strftime_now is defined %}{%- set d = strftime_now('%d %b %Y') %}\
                   {%- else %}{%- set d = '26 Jul 2024' %}{%- endif %}\
                   Today Date: {{ d }}|{{ messages[0]['content'] }}";
        let t = ChatTemplate::from_jinja("t", src, "", "").unwrap();
        let before = chrono::Local::now().format("%d %b %Y").to_string();
        let out = t.render_prompt(&conv(None, "Q", None)).unwrap();
        let after = chrono::Local::now().format("%d %b %Y").to_string();
        assert!(
            out == format!("Today Date: {before}|Q") || out == format!("Today Date: {after}|Q"),
            "{out}"
        );
        let bad = ChatTemplate::from_jinja("t", "{{ strftime_now('%Q') }}", "", "").unwrap();
        assert!(bad.render_prompt(&conv(None, "Q", None)).is_err());
    }

    #[test]
    fn python_string_methods_and_raise_exception() {
        let src = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}<{{ m['role'] }}>{{ m['content'].strip() }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}";
        let t = ChatTemplate::from_jinja("t", src, "", "").unwrap();
        assert_eq!(
            t.render_prompt(&conv(None, "  x  ", None)).unwrap(),
            "<user>x<a>"
        );
        let err = t.render_prompt(&conv(Some("s"), "x", None)).unwrap_err();
        assert!(format!("{err:#}").contains("no system"), "{err:#}");
    }

    #[test]
    fn judge_rendering_is_the_exchange_then_the_generation_prompt() {
        let src = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}";
        let t = ChatTemplate::from_jinja("t", src, "", "").unwrap();
        let c = conv(None, "q", Some("r"));
        assert_eq!(t.render_for_judge(&c).unwrap(), "<user>q<assistant>r<a>");
    }

    #[test]
    fn non_prefix_template_is_an_error() {
        // Renders the generation prompt differently from the start of the reply turn.
        let src = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}GO{% endif %}";
        let t = ChatTemplate::from_jinja("odd", src, "", "").unwrap();
        let err = t.render_split(&conv(None, "q", Some("a"))).unwrap_err();
        assert!(err.to_string().contains("not a prefix"), "{err}");
    }

    #[test]
    fn broken_template_names_itself() {
        let err = ChatTemplate::from_jinja("mine", "{% for %}", "", "")
            .err()
            .unwrap();
        assert!(err.to_string().contains("'mine' does not compile"), "{err}");
    }
}
