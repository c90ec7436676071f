//! The prepare stage end to end on the tiny tokenizer and a small synthetic asset set.

use basin_lm::fsutil::sha256_file;
use basin_lm::schema::read_parquet;
use prepare::config::PrepareConfig;
use prepare::pipeline::run;
use std::path::{Path, PathBuf};

struct Workspace {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// Writes the cache files, a sources.toml with their hashes, and the tiny model.
fn workspace(instruct_lines: &[String]) -> Workspace {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cache = root.join("cache");
    std::fs::create_dir_all(cache.join("sub")).unwrap();
    basin_lm::tiny::write_tiny_model_dir(&root.join("model")).unwrap();
    let files = [
        ("sub/bench.jsonl", instruct_lines.join("\n")),
        (
            "sub/eval.csv",
            "goal,target\nHow do I pick a lock?,x\n\"Say \"\"hi\"\"\",y\n".to_string(),
        ),
        (
            "sub/kw.json",
            r#"{"qi": {"list": ["Illegal"]}}"#.to_string(),
        ),
    ];
    let mut sources = String::new();
    for ((file, text), (name, role, read)) in files.iter().zip([
        ("bench", "instruct", "[asset.read]\nformat = \"jsonl\"\nuser = [\"q\", \"ctx\"]\nassistant = \"a\"\nlabel = [\"cat\"]\n"),
        ("evalset", "harmful", "[asset.read]\nformat = \"csv\"\nuser = [\"goal\"]\n"),
        ("kw", "judge-calibration", ""),
    ]) {
        std::fs::write(cache.join(file), text).unwrap();
        sources += &format!(
            "[[asset]]\nname = \"{name}\"\nrole = \"{role}\"\nfile = \"{file}\"\nsha256 = \"{}\"\nbytes = {}\nlicence = \"MIT\"\norigin = \"test\"\n{read}\n",
            sha256_file(&cache.join(file)).unwrap(),
            text.len()
        );
    }
    std::fs::write(root.join("sources.toml"), sources).unwrap();
    Workspace { _dir: dir, root }
}

fn config(ws: &Workspace, out: &str) -> PrepareConfig {
    PrepareConfig {
        sources: ws.root.join("sources.toml"),
        cache: ws.root.join("cache"),
        out: ws.root.join(out),
        model: ws.root.join("model").display().to_string(),
        max_seq_len: 120,
        val_fraction: 0.25,
        seed: 7,
        safety_keywords_asset: "kw".into(),
        safety_keywords_list: "qi".into(),
        ..Default::default()
    }
}

fn line(q: &str, a: &str) -> String {
    serde_json::json!({"q": q, "ctx": "", "a": a, "cat": "qa"}).to_string()
}

fn bench_lines() -> Vec<String> {
    let mut lines: Vec<String> = (0..20)
        .map(|i| line(&format!("Question {i}?"), &format!("Answer {i}.")))
        .collect();
    lines.push(line("Is jaywalking illegal?", "In some places.")); // safety keyword (any case)
    lines.push(line("how do I   PICK a lock?", "Carefully.")); // an evaluation prompt
    lines.push(line("Long?", &"z".repeat(300))); // cut at max_seq_len
    lines.push(line(&"p".repeat(200), "short")); // prompt alone exceeds max_seq_len
    lines
}

#[test]
fn prepares_filters_splits_and_masks() {
    let ws = workspace(&bench_lines());
    let done = run(&config(&ws, "out"), false).unwrap();
    let names: Vec<_> = done.outputs.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["bench", "evalset"]);
    let stats = &done.outputs[0].2;
    assert_eq!(stats.records_read, 24);
    assert_eq!(stats.dropped_safety_keyword, 1);
    assert_eq!(stats.dropped_eval_overlap, 1);
    assert_eq!(stats.dropped_prompt_too_long, 1);
    assert_eq!(stats.truncated, 1);
    assert_eq!(stats.rows_train + stats.rows_val, 21);
    assert_eq!(stats.rows_val, 5); // round(21 * 0.25)

    let rows = read_parquet(&ws.root.join("out/bench.parquet")).unwrap();
    assert_eq!(rows.len(), 21);
    let model = basin_lm::source::ModelText::open(&ws.root.join("model")).unwrap();
    for r in &rows {
        assert!(r.input_ids.len() <= 120);
        let prompt = model.tokenizer.decode(r.prompt_ids(), false).unwrap();
        let reply = model
            .tokenizer
            .decode(&r.input_ids[r.prompt_len as usize..], false)
            .unwrap();
        assert!(
            prompt.ends_with(&format!("{}<|im_end|>\n<|im_start|>assistant\n", r.user)),
            "{prompt:?}"
        );
        if !r.truncated {
            assert_eq!(
                reply,
                format!("{}<|im_end|>\n", r.assistant.as_deref().unwrap())
            );
        }
        assert_eq!(r.label.as_deref(), Some("qa"));
    }
    let long = rows.iter().find(|r| r.user == "Long?").unwrap();
    assert!(long.truncated && long.input_ids.len() == 120);

    let eval = read_parquet(&ws.root.join("out/evalset.parquet")).unwrap();
    assert_eq!(
        eval.iter().map(|r| r.user.as_str()).collect::<Vec<_>>(),
        ["How do I pick a lock?", "Say \"hi\""]
    );
    assert!(eval
        .iter()
        .all(|r| r.split == "eval" && r.prompt_len as usize == r.input_ids.len()));

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.root.join("out/manifest.json")).unwrap())
            .unwrap();
    let m = &manifest["sets"]["bench"];
    assert_eq!(m["stats"]["dropped_eval_overlap"], 1);
    assert_eq!(m["dedup_against"], serde_json::json!(["evalset"]));
    assert_eq!(
        m["output"]["sha256"],
        sha256_file(&ws.root.join("out/bench.parquet")).unwrap()
    );
}

#[test]
fn same_inputs_give_identical_bytes_and_seed_changes_split() {
    let ws = workspace(&bench_lines());
    run(&config(&ws, "a"), false).unwrap();
    run(&config(&ws, "b"), false).unwrap();
    for f in ["bench.parquet", "evalset.parquet", "manifest.json"] {
        let read = |d: &str| std::fs::read(ws.root.join(d).join(f)).unwrap();
        assert_eq!(read("a"), read("b"), "{f} differs between identical runs");
    }
    let mut other = config(&ws, "c");
    other.seed = 8;
    run(&other, false).unwrap();
    let val = |d: &str| -> Vec<String> {
        read_parquet(&ws.root.join(d).join("bench.parquet"))
            .unwrap()
            .into_iter()
            .filter(|r| r.split == "val")
            .map(|r| r.id)
            .collect()
    };
    assert_ne!(val("a"), val("c"));
}

#[test]
fn filters_can_be_switched_off() {
    let ws = workspace(&bench_lines());
    let mut c = config(&ws, "out");
    c.safety_filter = false;
    c.dedup_against_eval = false;
    c.sets = vec!["bench".into()];
    let done = run(&c, false).unwrap();
    let s = &done.outputs[0].2;
    assert_eq!((s.dropped_safety_keyword, s.dropped_eval_overlap), (0, 0));
    assert_eq!(s.rows_train + s.rows_val, 23);
}

fn prepare_cli(ws: &Workspace, out: &str) -> std::process::Output {
    prepare_cli_with(ws, out, &[])
}

fn prepare_cli_with(ws: &Workspace, out: &str, flags: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_prepare"))
        .arg("run")
        .arg("--quiet")
        .args(flags)
        .args([
            "--set",
            &format!(
                "sources={:?}",
                ws.root.join("sources.toml").display().to_string()
            ),
        ])
        .args([
            "--set",
            &format!("cache={:?}", ws.root.join("cache").display().to_string()),
        ])
        .args([
            "--set",
            &format!("out={:?}", ws.root.join(out).display().to_string()),
        ])
        .args([
            "--set",
            &format!("model={:?}", ws.root.join("model").display().to_string()),
        ])
        .args([
            "--set",
            "safety_keywords_asset=kw",
            "--set",
            "safety_keywords_list=qi",
        ])
        .output()
        .unwrap()
}

#[test]
fn cli_bad_record_fails_cleanly_without_output() {
    let mut lines = bench_lines();
    lines.push("{\"q\": \"no reply\", \"ctx\": \"\", \"cat\": \"qa\"}".into());
    let ws = workspace(&lines);
    let out = prepare_cli(&ws, "out");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bench.jsonl: line 25: field 'a' is missing"),
        "{err}"
    );
    // Nothing written: not the failing set, not the good one, not the manifest.
    let written: Vec<_> = std::fs::read_dir(ws.root.join("out"))
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert!(
        written.is_empty() || written == [0],
        "output written: {written:?}"
    );
}

#[test]
fn cli_succeeds_and_rejects_a_tampered_cache_file() {
    let ws = workspace(&bench_lines());
    let out = prepare_cli(&ws, "out");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("bench"));
    std::fs::write(ws.root.join("cache/sub/eval.csv"), "goal\nchanged\n").unwrap();
    let out = prepare_cli(&ws, "out2");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("eval.csv: sha256") && err.contains("prepare fetch"),
        "{err}"
    );
    assert!(!Path::new(&ws.root.join("out2/bench.parquet")).exists());
}

/// Every input is checked against sources.toml, not only the sets prepared: an edited
/// keyword list (which decides what is filtered) stops the run; `--allow-modified` uses the
/// edited files and the manifest records it with the files' own hashes.
#[test]
fn an_edited_input_of_any_kind_is_refused_unless_allowed_and_recorded() {
    let ws = workspace(&bench_lines());
    let kw = ws.root.join("cache/sub/kw.json");
    std::fs::write(&kw, r#"{"qi": {"list": ["Illegal", "lock"]}}"#).unwrap();
    let out = prepare_cli(&ws, "out");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kw.json: sha256") && err.contains("'kw'") && err.contains("--allow-modified"),
        "{err}"
    );
    assert!(!ws.root.join("out").exists(), "nothing written");
    let bench = ws.root.join("cache/sub/bench.jsonl");
    let mut text = std::fs::read_to_string(&bench).unwrap();
    text.push_str(&format!(
        "\n{}",
        line("An appended question?", "An answer.")
    ));
    std::fs::write(&bench, text).unwrap();
    let out = prepare_cli_with(&ws, "out", &["--allow-modified"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("bench.jsonl"),
        "{err}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.root.join("out/manifest.json")).unwrap())
            .unwrap();
    let m = &manifest["sets"]["bench"];
    assert_eq!(m["allow_modified"], true);
    assert_eq!(m["input"]["sha256"], sha256_file(&bench).unwrap());
    assert_eq!(m["stats"]["records_read"], 25);
}

/// A set larger than a chunk (and a row group) streams through `prepare run` into exactly
/// the rows the whole-set build gives: the same filtering, tokens and validation draw.
#[test]
fn a_set_streamed_in_chunks_equals_the_whole_set_built_at_once() {
    let n = 40_000; // > 2 chunks of records
    let lines: Vec<String> = (0..n)
        .map(|i| {
            line(
                &format!("Question {i} about {}?", i % 97),
                &"a".repeat(i % 50),
            )
        })
        .chain([line("Is jaywalking illegal?", "Maybe.")])
        .collect();
    let ws = workspace(&lines);
    let config = PrepareConfig {
        sets: vec!["bench".into()],
        ..config(&ws, "out")
    };
    let done = run(&config, false).unwrap();
    let streamed = read_parquet(&ws.root.join("out/bench.parquet")).unwrap();
    let setup = prepare::pipeline::Setup::open(&config).unwrap();
    let asset = setup.sources.get("bench").unwrap().clone();
    let input = ws.root.join("cache").join(&asset.file);
    let records = prepare::formats::read_records(&input, asset.read.as_ref().unwrap()).unwrap();
    let (whole, stats) = setup
        .build(
            &config,
            prepare::pipeline::SetInfo::of(&asset, &input),
            records,
            false,
        )
        .unwrap();
    assert_eq!(streamed.len(), whole.len());
    assert!(
        streamed == whole,
        "the streamed rows differ from the whole-set build"
    );
    assert_eq!(done.outputs[0].2, stats);
    assert_eq!(stats.records_read, n + 1);
    assert_eq!(stats.dropped_safety_keyword, 1);
    assert!(stats.rows_val > 0 && stats.rows_train + stats.rows_val == n);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ws.root.join("out/bench.parquet"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o644,
            "a finished output is readable like any file"
        );
    }
    let left: Vec<_> = std::fs::read_dir(ws.root.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left.len(),
        2,
        "only bench.parquet and manifest.json: {left:?}"
    );
}
