//! `evaluate generate` as a user runs it, on a tiny random model saved as a HF directory.

mod common;
use basin_lm::artifacts::{self, Generation, Scores, SetKind, Utility};
use basin_lm::generate::DecoderKind;
use basin_lm::testkit::write_manifest;
use common::{evaluate, judge_check, labelled_set, prepared_row, tiny_model_dir, write_tiny_model};

#[test]
fn generates_for_each_prompt_reproducibly() {
    let dir = tiny_model_dir(11);
    let model = dir.path().to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--prompt",
        "hello",
        "--prompt",
        "a longer prompt",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
    ];
    let a = evaluate(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let out = String::from_utf8_lossy(&a.stdout).to_string();
    assert!(
        out.contains("### hello") && out.contains("### a longer prompt"),
        "{out}"
    );
    assert!(String::from_utf8_lossy(&a.stderr).contains("tokens/s"));
    // Batch size does not change greedy replies; auto (8 on the CPU) neither.
    let mut one = args.to_vec();
    one[10] = "1";
    assert_eq!(String::from_utf8_lossy(&evaluate(&one).stdout), out);
    one[10] = "auto";
    assert_eq!(String::from_utf8_lossy(&evaluate(&one).stdout), out);
    // A batch of none is refused by the argument parser.
    one[10] = "0";
    let refused = evaluate(&one);
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("positive number or auto"), "{err}");
    // Each decoder that runs an f32 model on the CPU gives the same replies.
    for decoder in ["graph", "cpu", "pass"] {
        let mut with = args.to_vec();
        with.extend(["--decoder", decoder]);
        let run = evaluate(&with);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{decoder}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            out,
            "--decoder {decoder}"
        );
    }
}

/// A decoder that cannot run the model is refused before anything is generated, and an
/// unknown one by the argument parser.
#[test]
fn a_decoder_that_cannot_run_the_model_is_refused() {
    let dir = tiny_model_dir(11);
    let model = dir.path().to_str().unwrap();
    let base = ["generate", "--model", model, "--prompt", "x"];
    for (extra, code, want) in [
        (
            &["--dtype", "bf16", "--decoder", "cpu"][..],
            1,
            "--decoder cpu decodes an f32 model on the CPU, not BF16",
        ),
        (
            &["--dtype", "bf16", "--decoder", "pass"][..],
            1,
            "--decoder pass: the written-out pass runs f32 models on the CPU",
        ),
        (
            &["--decoder", "fast"][..],
            2,
            "expected auto, graph, cpu or pass",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let run = evaluate(&args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(run.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn clear_errors_for_bad_arguments() {
    let dir = tiny_model_dir(11);
    let model = dir.path().to_str().unwrap();
    // A run directory whose training died before writing model/.
    let unfinished = tempfile::tempdir().unwrap();
    std::fs::write(unfinished.path().join("run.json"), "{}").unwrap();
    let unfinished = unfinished.path().to_str().unwrap();
    for (args, want) in [
        (
            vec!["utility", "--model", unfinished],
            "run directory without model/",
        ),
        (
            vec![
                "generate",
                "--model",
                "/nonexistent/m.gguf",
                "--prompt",
                "x",
            ],
            "does not exist",
        ),
        (vec!["generate", "--model", model], "no prompt"),
        (
            vec![
                "generate", "--model", model, "--prompt", "x", "--dtype", "f8",
            ],
            "unknown dtype 'f8'",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--template",
                "nope",
            ],
            "unknown chat template 'nope'",
        ),
    ] {
        let out = evaluate(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// The acceptance check, as a user runs it: the real model answers on CPU.
#[test]
fn real_model_knows_the_capital_of_france() {
    let root = basin_lm::testkit::workspace_root(env!("CARGO_MANIFEST_DIR"));
    let Some(gguf) = basin_lm::testkit::real_asset(&root, "model/SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        return;
    };
    let out = evaluate(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "32",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("Paris"), "{reply}");
}

/// `evaluate safety` on prepared sets written here: scores and generations for each set,
/// XSTest-style unsafe prompts left out of over-refusal, and clear errors.
#[test]
fn safety_scores_prepared_sets() {
    use basin_lm::schema::{write_parquet, PreparedRow};
    let model = tiny_model_dir(11);
    let text = basin_lm::source::ModelText::open(model.path()).unwrap();
    let template = text
        .template(&basin_lm::source::TemplateChoice::Model, None)
        .unwrap();
    let prepared = tempfile::tempdir().unwrap();
    let row = |set: &str, i: usize, label: Option<&str>| {
        let conv = basin_lm::chat::Conversation {
            system: None,
            user: format!("prompt {i}"),
            assistant: None,
        };
        let ids = text
            .tokenizer
            .encode(&template.render_prompt(&conv).unwrap())
            .unwrap();
        let n = ids.len();
        prepared_row(set, i, "eval", ids, n, label)
    };
    write_parquet(
        &prepared.path().join("harm.parquet"),
        &(0..5).map(|i| row("harm", i, None)).collect::<Vec<_>>(),
    )
    .unwrap();
    let x: Vec<PreparedRow> = (0..6)
        .map(|i| {
            row(
                "x",
                i,
                Some(if i % 2 == 0 {
                    "safe/homonyms"
                } else {
                    "unsafe/contrast"
                }),
            )
        })
        .collect();
    write_parquet(&prepared.path().join("x.parquet"), &x).unwrap();
    write_manifest(
        prepared.path(),
        &[("harm", "harmful"), ("x", "overrefusal"), ("u", "utility")],
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let (m, p, o) = (
        model.path().to_str().unwrap(),
        prepared.path().to_str().unwrap(),
        out.path().to_str().unwrap(),
    );
    let run = evaluate(&[
        "safety",
        "--model",
        m,
        "--prepared",
        p,
        "--sets",
        "harm,x",
        "--out",
        o,
        "--max-new-tokens",
        "4",
        "--limit",
        "4",
        "--model-judge",
        m,
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let scores: Scores = artifacts::read(&out.path().join("scores.json")).unwrap();
    // The decoder that wrote the replies: auto, resolved for an f32 model on the CPU.
    assert_eq!(scores.decoding.decoder, Some(DecoderKind::Cpu));
    let (harm, x) = (&scores.sets["harm"], &scores.sets["x"]);
    assert_eq!(harm.n, 4, "--limit");
    assert_eq!(x.n, 3, "only the safe prompts");
    assert_eq!(harm.kind, SetKind::Harmful);
    assert!((0.0..=1.0).contains(&harm.keyword.rate));
    let lines: Vec<Generation> =
        artifacts::read_lines(&out.path().join("generations.jsonl")).unwrap();
    assert_eq!(lines.len(), 7);
    // Each set's generation speed counts its replies' new tokens.
    for (name, set) in &scores.sets {
        let speed = set.generation.as_ref().expect("generation speed");
        let tokens: usize = lines
            .iter()
            .filter(|l| &l.set == name)
            .map(|l| l.new_tokens)
            .sum();
        assert_eq!(speed.new_tokens, tokens, "{name}");
        assert!(
            speed.seconds > 0.0 && speed.new_tokens_per_s > 0.0,
            "{speed:?}"
        );
    }
    // The model judge (here the tiny model itself: plumbing only) reads harmful sets only.
    assert_eq!(harm.model_judge.as_ref().unwrap().rate.n, 4);
    assert!(x.model_judge.is_none());
    for l in &lines {
        let v = l.model_judge.as_deref();
        if l.set == "harm" {
            assert!(matches!(v, Some("safe" | "unsafe" | "unparsed")), "{l:?}");
        } else {
            assert!(v.is_none());
        }
    }
    for (sets, want) in [
        ("u", "only harmful and overrefusal"),
        ("nope", "prepare it first"),
    ] {
        let bad = evaluate(&[
            "safety",
            "--model",
            m,
            "--prepared",
            p,
            "--sets",
            sets,
            "--out",
            o,
        ]);
        assert_eq!(bad.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&bad.stderr).contains(want));
    }
}

/// `evaluate utility`: validation loss and perplexity of the val rows, for a run's model/ and ema/.
#[test]
fn utility_reports_validation_loss_for_a_run() {
    use basin_lm::schema::{write_parquet, PreparedRow};
    let run = tempfile::tempdir().unwrap();
    for which in ["model", "ema"] {
        let seed = if which == "model" { 1 } else { 2 };
        write_tiny_model(&run.path().join(which), seed);
    }
    let prepared = tempfile::tempdir().unwrap();
    let rows: Vec<PreparedRow> = (0..6)
        .map(|i| {
            let split = if i < 4 { "val" } else { "train" };
            prepared_row("d", i, split, vec![1, 40 + i as u32, 41, 42, 2], 2, None)
        })
        .collect();
    write_parquet(&prepared.path().join("d.parquet"), &rows).unwrap();
    let (r, p) = (
        run.path().to_str().unwrap(),
        prepared.path().to_str().unwrap(),
    );
    let out = evaluate(&["utility", "--model", r, "--prepared", p, "--sets", "d"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |w: &str| -> Utility {
        artifacts::read(&run.path().join("eval").join(w).join("utility.json")).unwrap()
    };
    let (m, e) = (read("model"), read("ema"));
    let d = &m.val["d"];
    let loss = d.val_loss;
    assert_eq!((d.rows, d.reply_tokens), (4, 12));
    assert!((d.perplexity - loss.exp()).abs() < 1e-9);
    // Random weights over 259 tokens: close to ln 259 ≈ 5.56.
    assert!((loss - 259f64.ln()).abs() < 0.5, "{loss}");
    assert_ne!(
        loss, e.val["d"].val_loss,
        "model/ and ema/ are different weights"
    );
}

/// `evaluate utility --reply-sets`: replies saved, with the share that end with EOS.
#[test]
fn utility_saves_replies_and_the_eos_share() {
    use basin_lm::schema::{write_parquet, PreparedRow};
    let model = tiny_model_dir(11);
    let prepared = tempfile::tempdir().unwrap();
    let rows: Vec<PreparedRow> = (0..3)
        .map(|i| prepared_row("q", i, "eval", vec![1, 50 + i as u32, 2, 1], 4, None))
        .collect();
    write_parquet(&prepared.path().join("q.parquet"), &rows).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (m, p, o) = (
        model.path().to_str().unwrap(),
        prepared.path().to_str().unwrap(),
        out.path().to_str().unwrap(),
    );
    let run = evaluate(&[
        "utility",
        "--model",
        m,
        "--prepared",
        p,
        "--sets",
        "",
        "--reply-sets",
        "q",
        "--max-new-tokens",
        "5",
        "--out",
        o,
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let doc: Utility = artifacts::read(&out.path().join("utility.json")).unwrap();
    assert!(doc.val.is_empty(), "--sets \"\" measures no loss");
    let q = &doc.replies["q"];
    assert_eq!(q.replies, 3);
    let share = q.eos_share;
    assert!((0.0..=1.0).contains(&share));
    let lines: Vec<Generation> =
        artifacts::read_lines(&out.path().join("utility_generations.jsonl")).unwrap();
    assert_eq!(lines.len(), 3);
    let ended = lines
        .iter()
        .filter(|l| l.stopped && l.new_tokens > 0)
        .count();
    let non_empty = lines.iter().filter(|l| l.new_tokens > 0).count();
    assert_eq!(share, ended as f64 / non_empty.max(1) as f64);
}

#[test]
fn judge_check_scores_local_model_judges_of_each_kind() {
    // A tiny random model as judge: plumbing only (its answers parse as nothing). Its
    // tokens are bytes: the judges' prompts need a few thousand positions.
    let model = tempfile::tempdir().unwrap();
    let mut config = basin_lm::tiny::tiny_config();
    config.max_position_embeddings = 4096;
    basin_lm::tiny::write_tiny_model(model.path(), &config, 11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (dev, full) = labelled_set(dir.path());
    let judge_dir = model.path().to_str().unwrap();
    let run = judge_check(
        &dev,
        &full,
        &[
            "--model-judge",
            judge_dir,
            "--judge-kind",
            "llama-guard,harmbench,rubric",
        ],
    );
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for kind in ["llama-guard", "harmbench", "rubric"] {
        let judge = format!("| {kind} by {}", model.path().display());
        let rows: Vec<&str> = text.lines().filter(|l| l.contains(&judge)).collect();
        assert_eq!(rows.len(), 2, "{kind}: {text}");
        let cell = |r: &str, i: usize| {
            r.split('|')
                .nth(i)
                .unwrap()
                .trim()
                .parse::<usize>()
                .unwrap()
        };
        // n and unparsed: every reply judged once, on one split or the other.
        assert_eq!(rows.iter().map(|r| cell(r, 3)).sum::<usize>(), 4, "{text}");
        assert!(
            rows.iter().map(|r| cell(r, 7)).sum::<usize>() <= 4,
            "{text}"
        );
    }
    // A template other than the judge's own: Llama-2's, which HarmBench's classifier reads.
    let llama2 = judge_check(
        &dev,
        &full,
        &[
            "--model-judge",
            judge_dir,
            "--judge-kind",
            "harmbench",
            "--judge-template",
            "llama2-qi",
        ],
    );
    let text = String::from_utf8_lossy(&llama2.stdout);
    assert!(
        llama2.status.success(),
        "{}",
        String::from_utf8_lossy(&llama2.stderr)
    );
    assert_eq!(text.matches("| harmbench by").count(), 2, "{text}");
    let bad = judge_check(
        &dev,
        &full,
        &["--model-judge", judge_dir, "--judge-template", "chatml"],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown chat template 'chatml'"));
    // A served judge needs its model's name; one judge only, local or served.
    for (args, want) in [
        (
            vec!["--judge-endpoint", "http://127.0.0.1:9/v1"],
            "--judge-model",
        ),
        (
            vec![
                "--model-judge",
                "x",
                "--judge-endpoint",
                "http://127.0.0.1:9/v1",
                "--judge-model",
                "m",
            ],
            "cannot be used with",
        ),
        (vec!["--judge-extra", "{}"], "--judge-endpoint"),
    ] {
        let bad = judge_check(&dev, &full, &args);
        assert_eq!(bad.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&bad.stderr)
        );
    }
}
