//! The endpoint judges and endpoint generation against a real OpenAI-compatible server:
//! llama-cpp-python's, from PyPI (`$BASIN_LLAMACPP_PYTHON`, which `just test` installs),
//! serving the shipped SmolLM2 GGUF on 127.0.0.1, started and stopped here. A 135M model
//! is no judge of anything: these tests check the plumbing (requests, parsing, the cache,
//! the files written, errors once the server is gone), not the verdicts.

mod common;
use basin_lm::artifacts::{self, Generation, Scores};
use basin_lm::schema::{write_parquet, PreparedRow};
use basin_lm::testkit::{llamacpp_python, real_asset, workspace_root, write_manifest};
use common::{evaluate, judge_check, labelled_set, prepared_row};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const MODEL_NAME: &str = "smollm2";
/// llama.cpp's server penalises repeats unless told not to.
const EXTRA: &str = r#"{"repeat_penalty": 1.0}"#;
/// [`EXTRA`] as serde_json writes it back.
const EXTRA_JSON: &str = r#"{"repeat_penalty":1.0}"#;

/// The server process, killed when dropped (a failing test leaves no server behind).
struct Server {
    child: Child,
    base: String,
    log: tempfile::NamedTempFile,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Serves `gguf` under [`MODEL_NAME`] on a free port of 127.0.0.1; waits until it lists
    /// its models (loading takes seconds).
    fn start(python: &Path, gguf: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(gguf)
            .args(["--model_alias", MODEL_NAME, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--n_ctx", "2048"])
            .args(["--n_threads", "2", "--verbose", "false"])
            .stdout(append(log.path()))
            .stderr(append(log.path()))
            .spawn()
            .unwrap();
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}/v1"),
            log,
        };
        let started = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && ureq::get(format!("{}/models", server.base)).call().is_ok()
            {
                return server;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "llama_cpp.server did not come up in 120 s: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

/// `path` opened for appending: the server's stdout (uvicorn's access log) and stderr
/// share one file without writing over each other.
fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().append(true).open(path).unwrap()
}

/// The real server and GGUF, or None (SKIPPED, or a failure where assets are required).
fn server() -> Option<Server> {
    let python = llamacpp_python()?;
    let gguf = real_asset(
        &workspace_root(env!("CARGO_MANIFEST_DIR")),
        "model/SmolLM2-135M-Instruct.Q4_1.gguf",
    )?;
    Some(Server::start(&python, &gguf))
}

/// A prepared row whose only read field is its text (the endpoint gets text, not tokens).
fn text_row(set: &str, i: usize, user: &str, label: Option<&str>) -> PreparedRow {
    let mut row = prepared_row(set, i, "eval", vec![1], 1, label);
    row.user = user.to_string();
    row
}

fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn safety_generates_and_judges_through_a_served_model() {
    let Some(mut server) = server() else { return };
    let root = workspace_root(env!("CARGO_MANIFEST_DIR"));
    let Some(reference) = real_asset(&root, "reference/llamacpp_smollm2_greedy48.jsonl") else {
        return;
    };
    // The mirror's replies of the same GGUF by llama-cpp-python's own chat completion
    // (temperature 0, repeat penalty off, 48 new tokens): 3 AdvBench and 2 XSTest-safe prompts.
    let reference: Vec<serde_json::Value> = std::fs::read_to_string(reference)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of_set = |set: &str, n: usize| -> Vec<(String, String)> {
        let rows = reference.iter().filter(|r| r["set"] == set).take(n);
        rows.map(|r| {
            (
                r["prompt"].as_str().unwrap().to_string(),
                r["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect()
    };
    let (harmful, safe) = (of_set("advbench", 3), of_set("xstest_safe", 2));
    let prepared = tempfile::tempdir().unwrap();
    let rows = |set: &str, texts: &[(String, String)], label| -> Vec<PreparedRow> {
        let rows = texts.iter().enumerate();
        rows.map(|(i, (t, _))| text_row(set, i, t, label)).collect()
    };
    write_parquet(
        &prepared.path().join("harm.parquet"),
        &rows("harm", &harmful, None),
    )
    .unwrap();
    write_parquet(
        &prepared.path().join("x.parquet"),
        &rows("x", &safe, Some("safe/homonyms")),
    )
    .unwrap();
    write_manifest(
        prepared.path(),
        &[("harm", "harmful"), ("x", "overrefusal")],
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out1 = tempfile::tempdir().unwrap();
    let base = server.base.clone();
    let args = |out: &Path, judge_url: &str| -> Vec<String> {
        [
            "safety",
            "--endpoint",
            &base,
            "--model-name",
            MODEL_NAME,
            "--prepared",
            prepared.path().to_str().unwrap(),
            "--sets",
            "harm,x",
            "--max-new-tokens",
            "48",
            "--endpoint-extra",
            EXTRA,
            "--concurrency",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--judge-endpoint",
            judge_url,
            "--judge-model",
            MODEL_NAME,
            "--judge-kind",
            "harmbench",
            "--judge-concurrency",
            "2",
            "--judge-cache",
            cache.path().to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |args: Vec<String>| evaluate(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let first = run(args(out1.path(), &base));
    assert!(
        first.status.success(),
        "{}\n{}",
        out_text(&first),
        server.log()
    );
    let scores: Scores = artifacts::read(&out1.path().join("scores.json")).unwrap();
    assert_eq!(
        scores.model,
        format!("{MODEL_NAME} at {base} with {EXTRA_JSON}")
    );
    let (harm, x) = (&scores.sets["harm"], &scores.sets["x"]);
    assert_eq!((harm.n, x.n), (3, 2));
    let lines: Vec<Generation> =
        artifacts::read_lines(&out1.path().join("generations.jsonl")).unwrap();
    assert_eq!(lines.len(), 5);
    for l in &lines {
        // The served model answered each prompt, within the budget, with its token count.
        assert!(!l.reply.trim().is_empty(), "{l:?}");
        assert!((1..=48).contains(&l.new_tokens), "{l:?}");
        assert_eq!(l.model_judge.is_some(), l.set == "harm", "{l:?}");
    }
    // Greedy through the endpoint is llama.cpp's greedy: the replies are the reference's
    // (llama.cpp may reorder a float sum when it reuses a cached prompt prefix, hence one
    // reply in five may part from it).
    let same = lines
        .iter()
        .zip(harmful.iter().chain(&safe))
        .filter(|(l, (_, answer))| &l.reply == answer)
        .count();
    assert!(
        same >= 4,
        "{same} of 5 replies are the reference's: {lines:#?}"
    );
    let speed = harm.generation.as_ref().unwrap();
    let harm_tokens: usize = lines
        .iter()
        .filter(|l| l.set == "harm")
        .map(|l| l.new_tokens)
        .sum();
    assert_eq!(speed.new_tokens, harm_tokens);
    let mj = harm.model_judge.as_ref().expect("the served judge's score");
    assert_eq!(mj.judge, format!("harmbench by {MODEL_NAME} at {base}"));
    assert_eq!(mj.rate.n, 3);
    // Only verdicts that parsed were cached: one file each.
    let parsed = 3 - mj.unparsed;
    let cached = count_files(cache.path());
    assert_eq!(cached, parsed, "cache files against parsed verdicts");

    // The server gone: a clear error, exit 1, nothing written.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let out3 = tempfile::tempdir().unwrap();
    let gone = run(args(out3.path(), &base));
    assert_eq!(gone.status.code(), Some(1), "{}", out_text(&gone));
    assert!(
        out_text(&gone).contains("connection refused"),
        "{}",
        out_text(&gone)
    );
    assert!(!out3.path().join("scores.json").exists());
    assert!(!out3.path().join("generations.jsonl").exists());
}

#[test]
fn judge_check_scores_served_judges_beside_the_string_judges() {
    let Some(server) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (dev, full) = labelled_set(dir.path());
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "--judge-endpoint",
        &server.base,
        "--judge-model",
        MODEL_NAME,
        "--judge-kind",
        "harmbench,rubric,llama-guard",
        "--judge-cache",
        cache.path().to_str().unwrap(),
    ];
    let run = judge_check(&dev, &full, &args);
    let text = out_text(&run);
    assert!(run.status.success(), "{text}\n{}", server.log());
    for judge in [
        "keyword (Qi et al.)",
        "calibrated + degenerate flag",
        &format!("harmbench by {MODEL_NAME} at"),
        &format!("rubric by {MODEL_NAME} at"),
        &format!("llama-guard by {MODEL_NAME} at"),
    ] {
        // One row on each split; the four replies split between them.
        let rows: Vec<&str> = text.lines().filter(|l| l.contains(judge)).collect();
        assert_eq!(rows.len(), 2, "{judge}: {text}");
        let n: usize = rows
            .iter()
            .map(|r| {
                r.split('|')
                    .nth(3)
                    .unwrap()
                    .trim()
                    .parse::<usize>()
                    .unwrap()
            })
            .sum();
        assert_eq!(n, 4, "{judge}: {text}");
    }
    // Again: the cached verdicts (those that parsed) are not asked again. (The same
    // replies are judged; a served model's own replies may part from the greedy path
    // when llama.cpp reuses a cached prompt prefix, so this is checked on fixed replies.)
    let cached = count_files(cache.path());
    let asked = |log: &str| log.matches("POST /v1/chat/completions").count();
    let asked_before = asked(&server.log());
    let again = judge_check(&dev, &full, &args);
    let text = out_text(&again);
    assert!(again.status.success(), "{text}");
    let from_cache: usize = text
        .lines()
        .filter_map(|l| l.strip_suffix(" of 4 verdicts from the cache"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(from_cache, cached, "{text}");
    assert_eq!(
        asked(&server.log()) - asked_before,
        3 * 4 - cached,
        "{text}"
    );
    // HarmBench's classifier prompt in Llama-2's format, rendered here: the completions API.
    let before = count_files(cache.path());
    let rendered = judge_check(
        &dev,
        &full,
        &[
            "--judge-endpoint",
            &server.base,
            "--judge-model",
            MODEL_NAME,
            "--judge-kind",
            "harmbench",
            "--judge-template",
            "llama2-qi",
            "--no-judge-cache",
        ],
    );
    let text = out_text(&rendered);
    assert!(rendered.status.success(), "{text}\n{}", server.log());
    assert_eq!(text.matches("| harmbench by").count(), 2, "{text}");
    assert!(
        server.log().contains("POST /v1/completions"),
        "{}",
        server.log()
    );
    assert_eq!(
        count_files(cache.path()),
        before,
        "--no-judge-cache writes nothing"
    );
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}
