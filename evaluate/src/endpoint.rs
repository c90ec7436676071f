//! OpenAI-compatible endpoints (vLLM, llama.cpp's server, hosted APIs): a model served
//! elsewhere as a judge or as the model under evaluation. One chat completion (or, for a
//! prompt rendered here, one completion) per request, temperature 0; HTTP 429, 5xx, timeouts and dropped connections are retried a
//! bounded number of times with exponential backoff (or the server's Retry-After); anything
//! else (a refused connection, another status, a body that is no completion) is an
//! error that names the endpoint and what was expected. [`ask_all`] keeps a bounded number
//! of requests in flight behind a progress bar and reads and writes an on-disk [`Cache`],
//! into which only answers the caller accepts go.

use anyhow::{anyhow, bail, Context, Result};
use basin_lm::chat::Conversation;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// One chat message as the endpoint reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

impl Message {
    pub fn system(content: &str) -> Self {
        Self {
            role: "system",
            content: content.to_string(),
        }
    }
    pub fn user(content: &str) -> Self {
        Self {
            role: "user",
            content: content.to_string(),
        }
    }
    pub fn assistant(content: &str) -> Self {
        Self {
            role: "assistant",
            content: content.to_string(),
        }
    }
}

/// What the endpoint answered: the text, its new tokens (the server's count; 0 when it
/// sends no usage) and whether it ended by itself (finish_reason "stop") rather than at
/// the token budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Completion {
    pub text: String,
    pub new_tokens: usize,
    pub stopped: bool,
}

/// What is asked: chat messages (the server renders them with the model's chat template;
/// the chat completions API) or a prompt rendered here (the completions API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

impl Prompt {
    /// A conversation as chat messages: its system turn, the user's, and the reply when
    /// it has one (a judge reads it).
    pub fn chat(conv: &Conversation) -> Self {
        let system = conv.system.as_deref().map(Message::system);
        let assistant = conv.assistant.as_deref().map(Message::assistant);
        let user = Some(Message::user(&conv.user));
        Self::Chat(system.into_iter().chain(user).chain(assistant).collect())
    }
}

/// The body of a chat completion or completion request.
#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a [Message]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    max_tokens: usize,
    temperature: f64,
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

/// The fields of a request that [`Endpoint::with_extra`] may not set.
const OWN_FIELDS: [&str; 5] = ["model", "messages", "prompt", "max_tokens", "temperature"];

/// The parts of a (chat) completion response that are read (others are ignored: servers
/// add their own fields).
#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    usage: Option<Usage>,
}
#[derive(Deserialize)]
struct Choice {
    /// A chat completion's.
    message: Option<ChoiceMessage>,
    /// A completion's.
    text: Option<String>,
    finish_reason: Option<String>,
}
#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
}
#[derive(Deserialize)]
struct Usage {
    completion_tokens: usize,
}

/// Why one try failed: worth another try, or not.
enum Failure {
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Fatal(anyhow::Error),
}

/// A served model behind an OpenAI-compatible API.
pub struct Endpoint {
    /// The API's base URL, up to and including /v1 (requests go to `<base>/chat/completions`
    /// or `<base>/completions`).
    base: String,
    model: String,
    /// Fields sent with every request beside the standard ones (a server's own sampling
    /// settings, such as llama.cpp's repeat_penalty).
    extra: serde_json::Map<String, serde_json::Value>,
    key: Option<String>,
    key_env: String,
    agent: ureq::Agent,
    timeout: Duration,
    /// Tries after the first one for a retryable failure.
    pub retries: u32,
    /// The wait before the first retry; it doubles with each one.
    pub backoff: Duration,
}

/// The longest wait between two tries, whatever Retry-After asks.
const MAX_WAIT: Duration = Duration::from_secs(60);

impl Endpoint {
    /// `url`: the API's base (`http://127.0.0.1:8000/v1`; a URL ending in
    /// /chat/completions or /completions is taken as well); `model`: the name the server
    /// knows the model by; the key, when the API wants one, from environment variable
    /// `key_env`.
    pub fn new(url: &str, model: &str, key_env: &str, timeout: Duration) -> Result<Self> {
        let trimmed = url.trim_end_matches('/');
        let base = trimmed
            .strip_suffix("/chat/completions")
            .or_else(|| trimmed.strip_suffix("/completions"))
            .unwrap_or(trimmed)
            .to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("endpoint '{url}': expected an http:// or https:// URL such as http://127.0.0.1:8000/v1");
        }
        if model.trim().is_empty() {
            bail!("endpoint {base}: the model name is empty (the name the server serves it under)");
        }
        let key = std::env::var(key_env).ok().filter(|k| !k.trim().is_empty());
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            base,
            model: model.to_string(),
            extra: serde_json::Map::new(),
            key,
            key_env: key_env.to_string(),
            agent,
            timeout,
            retries: 5,
            backoff: Duration::from_millis(500),
        })
    }

    /// Sends the fields of `extra` (a JSON object, e.g. `{"repeat_penalty": 1.0}`) with every
    /// request. llama.cpp's server penalises repeats by default (repeat_penalty 1.1), so
    /// temperature 0 alone is not greedy there; hosted APIs refuse fields they do not know.
    pub fn with_extra(mut self, extra: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(extra)
            .with_context(|| format!("extra request fields '{extra}': not JSON"))?;
        let serde_json::Value::Object(map) = value else {
            bail!("extra request fields '{extra}': expected a JSON object such as {{\"repeat_penalty\": 1.0}}");
        };
        if let Some(own) = OWN_FIELDS.iter().find(|f| map.contains_key(**f)) {
            bail!("extra request fields '{extra}': '{own}' is set by basin itself");
        }
        self.extra = map;
        Ok(self)
    }

    /// The extra request fields, when there are any.
    pub fn extra(&self) -> Option<serde_json::Value> {
        (!self.extra.is_empty()).then(|| serde_json::Value::Object(self.extra.clone()))
    }

    /// The cache key of asking this endpoint's model `prompt` with budget `max_tokens`
    /// for `purpose` (see [`Cache`]).
    pub fn cache_key(&self, purpose: &str, prompt: &Prompt, max_tokens: usize) -> String {
        let asked = serde_json::json!({
            "purpose": purpose, "model": self.model, "prompt": prompt,
            "max_tokens": max_tokens, "extra": self.extra,
        });
        basin_lm::fsutil::sha256_bytes(asked.to_string().as_bytes())
    }

    /// "<model> at <base URL>" (and " with <extra fields>" when there are any), for logs
    /// and score files.
    pub fn describe(&self) -> String {
        match self.extra() {
            Some(extra) => format!("{} at {} with {extra}", self.model, self.base),
            None => format!("{} at {}", self.model, self.base),
        }
    }

    fn url(&self, prompt: &Prompt) -> String {
        match prompt {
            Prompt::Chat(_) => format!("{}/chat/completions", self.base),
            Prompt::Text(_) => format!("{}/completions", self.base),
        }
    }

    /// The endpoint's greedy answer to `prompt`, at most `max_tokens` new tokens; retried
    /// with backoff on failures that may pass.
    pub fn ask(&self, prompt: &Prompt, max_tokens: usize) -> Result<Completion> {
        let body = Request {
            model: &self.model,
            messages: match prompt {
                Prompt::Chat(m) => Some(m),
                Prompt::Text(_) => None,
            },
            prompt: match prompt {
                Prompt::Chat(_) => None,
                Prompt::Text(t) => Some(t),
            },
            max_tokens,
            temperature: 0.0,
            extra: &self.extra,
        };
        let url = self.url(prompt);
        let mut wait = self.backoff;
        for attempt in 0..=self.retries {
            match self.try_once(&url, &body) {
                Ok(c) => return Ok(c),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { why, after }) => {
                    if attempt == self.retries {
                        bail!(
                            "{url}: gave up after {} tries; the last: {why}",
                            self.retries + 1
                        );
                    }
                    std::thread::sleep(after.unwrap_or(wait).min(MAX_WAIT));
                    wait = wait.saturating_mul(2);
                }
            }
        }
        unreachable!("the loop returns on its last try")
    }

    fn try_once(&self, url: &str, body: &Request) -> std::result::Result<Completion, Failure> {
        let mut request = self.agent.post(url);
        if let Some(key) = &self.key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = match request.send_json(body) {
            Ok(r) => r,
            Err(e) => return Err(self.transport_failure(url, e)),
        };
        let status = response.status().as_u16();
        let after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = match response.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Err(self.transport_failure(url, e)),
        };
        let head: String = text.chars().take(300).collect();
        if status == 429 || status >= 500 {
            return Err(Failure::Retry {
                why: format!("HTTP {status}: {head}"),
                after,
            });
        }
        if !(200..300).contains(&status) {
            let hint = match status {
                401 | 403 => format!(
                    " (the key comes from ${}, which is {})",
                    self.key_env,
                    if self.key.is_some() { "set" } else { "not set" }
                ),
                404 => format!(
                    " (is the base URL the API's, ending in /v1, and does the server serve a model named '{}'?)",
                    self.model
                ),
                _ => String::new(),
            };
            return Err(Failure::Fatal(anyhow!(
                "{url}: HTTP {status}{hint}: {head}"
            )));
        }
        let parsed: ChatResponse = serde_json::from_str(&text).map_err(|e| {
            Failure::Fatal(anyhow!(
                "{url}: malformed response, expected an OpenAI (chat) completion ({e}): {head}"
            ))
        })?;
        let Some(choice) = parsed.choices.into_iter().next() else {
            return Err(Failure::Fatal(anyhow!(
                "{url}: malformed response, no choices: {head}"
            )));
        };
        let text = match body.messages {
            Some(_) => choice.message.and_then(|m| m.content),
            None => choice.text,
        };
        let Some(text) = text else {
            return Err(Failure::Fatal(anyhow!(
                "{url}: malformed response, the first choice has no text: {head}"
            )));
        };
        Ok(Completion {
            new_tokens: parsed.usage.map_or(0, |u| u.completion_tokens),
            stopped: choice.finish_reason.as_deref() == Some("stop"),
            text,
        })
    }

    fn transport_failure(&self, url: &str, e: ureq::Error) -> Failure {
        match e {
            ureq::Error::Timeout(_) => Failure::Retry {
                why: format!("no answer within {:.0} s", self.timeout.as_secs_f64()),
                after: None,
            },
            ureq::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => Failure::Fatal(anyhow!(
                    "{url}: connection refused (is the server running and listening there?)"
                )),
                std::io::ErrorKind::TimedOut => Failure::Retry {
                    why: format!("no answer within {:.0} s", self.timeout.as_secs_f64()),
                    after: None,
                },
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => Failure::Retry {
                    why: format!("the connection dropped: {io}"),
                    after: None,
                },
                _ => Failure::Fatal(anyhow!("{url}: {io}")),
            },
            other => Failure::Fatal(anyhow!("{url}: {other}")),
        }
    }
}

/// Answers on disk, one JSON file each, named by the sha256 of what was asked
/// ([`Endpoint::cache_key`]: the purpose, such as a judge's name, the model's name, the
/// messages, the token budget and any extra fields): asking again costs nothing. The URL
/// is not part of it: the same model served elsewhere answers the same.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// The cached answer; a file that cannot be read as one is a miss (it is rewritten).
    pub fn get(&self, key: &str) -> Option<Completion> {
        let text = std::fs::read_to_string(self.path(key)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn put(&self, key: &str, answer: &Completion) -> Result<()> {
        let path = self.path(key);
        basin_lm::fsutil::write_bytes_atomic(&path, &serde_json::to_vec(answer)?)
            .with_context(|| format!("cannot write the cached answer {}", path.display()))
    }
}

/// What [`ask_all`] got: the answers in the order asked, and how many came from the cache.
pub struct Answers {
    pub answers: Vec<Completion>,
    pub cached: usize,
}

/// How [`ask_all`] asks: where answers are cached and for what, and how many at a time.
pub struct Asking<'a> {
    pub cache: Option<&'a Cache>,
    /// The cache's purpose (see [`Endpoint::cache_key`]).
    pub purpose: &'a str,
    /// Requests in flight at once (at least 1).
    pub concurrency: usize,
    /// The progress bar's label.
    pub label: &'a str,
}

/// Each of `requests` asked of `endpoint` (at most `max_tokens` new tokens), at most
/// `how.concurrency` in flight, behind a progress bar. A cached answer is not asked again;
/// a new one is cached only when `keep` accepts it (an unparsed verdict is asked again
/// next time). The first failure stops the rest and is the error; answers already cached
/// stay cached.
pub fn ask_all(
    endpoint: &Endpoint,
    requests: &[Prompt],
    max_tokens: usize,
    how: &Asking,
    keep: impl Fn(&Completion) -> bool + Sync,
) -> Result<Answers> {
    let keys: Vec<Option<String>> = requests
        .iter()
        .map(|m| {
            how.cache
                .map(|_| endpoint.cache_key(how.purpose, m, max_tokens))
        })
        .collect();
    let found: Vec<Option<Completion>> = keys
        .iter()
        .map(|k| k.as_ref().and_then(|k| how.cache?.get(k)))
        .collect();
    let todo: Vec<usize> = (0..requests.len())
        .filter(|&i| found[i].is_none())
        .collect();
    let cached = requests.len() - todo.len();
    let slots: Vec<Mutex<Option<Completion>>> = found.into_iter().map(Mutex::new).collect();
    let bar = crate::progress_bar(requests.len());
    bar.set_message(format!("{} ({})", how.label, endpoint.describe()));
    bar.set_position(cached as u64);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<(usize, anyhow::Error)>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..how.concurrency.clamp(1, todo.len().max(1)) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let done = endpoint.ask(&requests[i], max_tokens).and_then(|c| {
                        if let (Some(cache), Some(key), true) = (how.cache, &keys[i], keep(&c)) {
                            cache.put(key, &c)?;
                        }
                        Ok(c)
                    });
                    match done {
                        Ok(c) => {
                            *slots[i].lock().expect("no poisoned slot") = Some(c);
                            bar.inc(1);
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            let mut first = first_error.lock().expect("no poisoned error");
                            if first.as_ref().is_none_or(|(j, _)| i < *j) {
                                *first = Some((i, e));
                            }
                        }
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some((i, e)) = first_error.into_inner().expect("no poisoned error") {
        return Err(e.context(format!(
            "{}: request {} of {}",
            how.label,
            i + 1,
            requests.len()
        )));
    }
    let answers = slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .expect("no poisoned slot")
                .expect("every request answered")
        })
        .collect();
    Ok(Answers { answers, cached })
}

#[cfg(test)]
mod tests {
    //! Against a scripted server on 127.0.0.1 (a thread answering each connection with the
    //! next canned HTTP response): each failure's error or retry, and what gets cached. The
    //! real server (llama.cpp's, through llama-cpp-python) is tests/endpoint_server.rs.
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    type Received = std::sync::Arc<Mutex<Vec<String>>>;

    /// Serves `responses` in turn, one per connection (the scripted answer is written after
    /// `delay`), and returns the base URL and the bodies of the requests received so far.
    fn scripted(responses: Vec<(u16, String, Duration)>) -> (String, Received) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let served: Received = Default::default();
        let count = served.clone();
        std::thread::spawn(move || {
            for (stream, (status, body, delay)) in listener.incoming().zip(responses) {
                let count = count.clone();
                // A thread each: a slow answer does not hold up the next connection.
                std::thread::spawn(move || {
                    let mut stream = stream.unwrap();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        if let Some(v) = line.to_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" || line.is_empty() {
                            break;
                        }
                    }
                    let mut request = vec![0; length];
                    reader.read_exact(&mut request).unwrap();
                    count
                        .lock()
                        .unwrap()
                        .push(String::from_utf8(request).unwrap());
                    std::thread::sleep(delay);
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        (base, served)
    }

    fn ok(text: &str) -> (u16, String, Duration) {
        let body = serde_json::json!({
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"completion_tokens": 3, "prompt_tokens": 9},
        });
        (200, body.to_string(), Duration::ZERO)
    }

    fn status(code: u16, body: &str) -> (u16, String, Duration) {
        (code, body.to_string(), Duration::ZERO)
    }

    fn endpoint(base: &str) -> Endpoint {
        let mut e = Endpoint::new(
            base,
            "judge",
            "BASIN_TEST_NO_KEY",
            Duration::from_millis(500),
        )
        .unwrap();
        e.retries = 2;
        e.backoff = Duration::from_millis(10);
        e
    }

    fn ask() -> Prompt {
        Prompt::Chat(vec![Message::user("hello")])
    }

    #[test]
    fn answers_and_counts_its_tokens() {
        let (base, served) = scripted(vec![ok("yes")]);
        let c = endpoint(&base).ask(&ask(), 4).unwrap();
        assert_eq!((c.text.as_str(), c.new_tokens, c.stopped), ("yes", 3, true));
        assert_eq!(served.lock().unwrap().len(), 1);
    }

    #[test]
    fn sends_temperature_zero_and_the_extra_fields() {
        let (base, served) = scripted(vec![ok("yes")]);
        let e = endpoint(&base)
            .with_extra(r#"{"repeat_penalty": 1.0, "top_k": 1}"#)
            .unwrap();
        e.ask(&ask(), 4).unwrap();
        let body: serde_json::Value = serde_json::from_str(&served.lock().unwrap()[0]).unwrap();
        let want = serde_json::json!({
            "model": "judge", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4, "temperature": 0.0, "repeat_penalty": 1.0, "top_k": 1,
        });
        assert_eq!(body, want);
        for (extra, why) in [
            ("[1]", "expected a JSON object"),
            ("{\"temperature\": 1}", "'temperature' is set by basin"),
            ("{oops", "not JSON"),
        ] {
            let e = endpoint(&base).with_extra(extra).err().unwrap().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn retries_429_and_500_then_answers() {
        let (base, served) = scripted(vec![
            status(429, "slow down"),
            status(500, "oops"),
            ok("no"),
        ]);
        assert_eq!(endpoint(&base).ask(&ask(), 4).unwrap().text, "no");
        assert_eq!(served.lock().unwrap().len(), 3);
    }

    #[test]
    fn gives_up_after_its_retries_and_says_why() {
        let (base, served) = scripted(vec![status(503, "busy"); 5]);
        let e = endpoint(&base).ask(&ask(), 4).unwrap_err().to_string();
        assert!(
            e.contains("gave up after 3 tries") && e.contains("HTTP 503: busy"),
            "{e}"
        );
        assert_eq!(
            served.lock().unwrap().len(),
            3,
            "bounded: 1 try + 2 retries"
        );
    }

    #[test]
    fn a_timeout_is_retried() {
        let slow = (200, String::new(), Duration::from_millis(1500));
        let (base, served) = scripted(vec![slow, ok("yes")]);
        assert_eq!(endpoint(&base).ask(&ask(), 4).unwrap().text, "yes");
        assert_eq!(served.lock().unwrap().len(), 2);
    }

    #[test]
    fn malformed_json_and_other_statuses_fail_at_once() {
        for (response, want) in [
            (status(200, "{\"choices\": ["), "malformed response"),
            (status(200, "{\"choices\": []}"), "no choices"),
            (status(200, "<html>hi</html>"), "malformed response"),
            (
                status(401, "bad key"),
                "$BASIN_TEST_NO_KEY, which is not set",
            ),
            (status(404, "no such model"), "serve a model named 'judge'"),
        ] {
            let (base, served) = scripted(vec![response, ok("never")]);
            let e = endpoint(&base).ask(&ask(), 4).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert_eq!(served.lock().unwrap().len(), 1, "no retry: {e}");
        }
    }

    #[test]
    fn a_refused_connection_says_so() {
        // A port that was free a moment ago: nothing listens there now.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = endpoint(&format!("http://127.0.0.1:{port}/v1"))
            .ask(&ask(), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("connection refused"), "{e}");
    }

    #[test]
    fn bad_urls_are_refused_before_asking() {
        for (url, model, want) in [
            ("127.0.0.1:8000/v1", "m", "http:// or https://"),
            ("http://127.0.0.1:8000/v1", " ", "model name is empty"),
        ] {
            let e = Endpoint::new(url, model, "K", Duration::from_secs(1))
                .err()
                .unwrap();
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = Endpoint::new(
            "http://h:1/v1/chat/completions/",
            "m",
            "K",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(e.url(&ask()), "http://h:1/v1/chat/completions");
        assert_eq!(
            e.url(&Prompt::Text("x".into())),
            "http://h:1/v1/completions"
        );
    }

    #[test]
    fn a_rendered_prompt_goes_to_the_completions_api() {
        let body = serde_json::json!({
            "choices": [{"text": " yes", "finish_reason": "length"}],
            "usage": {"completion_tokens": 1},
        });
        let (base, served) = scripted(vec![
            (200, body.to_string(), Duration::ZERO),
            ok("a chat answer has no text field"),
        ]);
        let e = endpoint(&base);
        let c = e.ask(&Prompt::Text("[INST] hi [/INST]".into()), 1).unwrap();
        assert_eq!(
            (c.text.as_str(), c.new_tokens, c.stopped),
            (" yes", 1, false)
        );
        let sent: serde_json::Value = serde_json::from_str(&served.lock().unwrap()[0]).unwrap();
        let want = serde_json::json!({
            "model": "judge", "prompt": "[INST] hi [/INST]", "max_tokens": 1, "temperature": 0.0,
        });
        assert_eq!(sent, want);
        let err = e.ask(&Prompt::Text("x".into()), 1).unwrap_err().to_string();
        assert!(err.contains("the first choice has no text"), "{err}");
    }

    #[test]
    fn caches_only_what_is_kept_and_never_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let requests: Vec<Prompt> = ["a", "b", "c"]
            .iter()
            .map(|q| Prompt::Chat(vec![Message::user(q)]))
            .collect();
        let how = Asking {
            cache: Some(&cache),
            purpose: "test",
            concurrency: 1,
            label: "test",
        };
        let keep = |c: &Completion| c.text != "maybe";
        // First pass: "a" answered and kept, "b" answered but not kept, "c" fails.
        let (base, _) = scripted(vec![ok("yes"), ok("maybe"), status(400, "bad")]);
        let e = ask_all(&endpoint(&base), &requests, 4, &how, keep)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("request 3 of 3"), "{e:#}");
        let e = endpoint("http://127.0.0.1:1/v1");
        let key = |q: &Prompt| e.cache_key("test", q, 4);
        assert!(cache.get(&key(&requests[0])).is_some());
        assert!(cache.get(&key(&requests[1])).is_none(), "not kept");
        assert!(cache.get(&key(&requests[2])).is_none(), "failed");
        // Second pass: only "b" and "c" are asked again.
        let (base, served) = scripted(vec![ok("no"), ok("yes")]);
        let got = ask_all(&endpoint(&base), &requests, 4, &how, keep).unwrap();
        assert_eq!(got.cached, 1);
        assert_eq!(served.lock().unwrap().len(), 2);
        let texts: Vec<&str> = got.answers.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["yes", "no", "yes"]);
        // Another purpose, budget or extra field is another question.
        assert_ne!(key(&requests[0]), e.cache_key("other", &requests[0], 4));
        assert_ne!(key(&requests[0]), e.cache_key("test", &requests[0], 5));
        let e2 = endpoint("http://127.0.0.1:1/v1")
            .with_extra(r#"{"repeat_penalty": 1.0}"#)
            .unwrap();
        assert_ne!(key(&requests[0]), e2.cache_key("test", &requests[0], 4));
        let text = Prompt::Text("a".into());
        assert_ne!(key(&requests[0]), key(&text), "a chat is not a completion");
    }

    #[test]
    fn asks_concurrently_and_keeps_the_order() {
        let requests: Vec<Prompt> = (0..6)
            .map(|i| Prompt::Chat(vec![Message::user(&i.to_string())]))
            .collect();
        let (base, served) = scripted((0..6).map(|_| ok("x")).collect());
        let how = Asking {
            cache: None,
            purpose: "test",
            concurrency: 3,
            label: "test",
        };
        let got = ask_all(&endpoint(&base), &requests, 4, &how, |_| true).unwrap();
        assert_eq!((got.answers.len(), got.cached), (6, 0));
        assert_eq!(served.lock().unwrap().len(), 6);
    }
}
