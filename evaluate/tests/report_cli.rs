//! `evaluate report` over run directories laid out as train and evaluate write them:
//! the table pools seeds, pairs θ with its EMA, names its sources, and bad input fails
//! cleanly without leaving a report behind.

use basin_lm::artifacts::{Decoding, Rate, Scores, SetKind, SetScores, Utility, ValLoss};
use std::path::Path;
use std::process::Command;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn scores(asr_k: usize, over_k: usize) -> String {
    let set = |kind, n, k_kw, k_ref| SetScores {
        kind,
        n,
        empty_replies: 0,
        keyword: Rate::new(k_kw, n),
        refusal: Rate::new(k_ref, n),
        model_judge: None,
    };
    let s = Scores {
        model: "m".into(),
        git_commit: "abc123".into(),
        decoding: Decoding {
            greedy: true,
            max_new_tokens: 8,
        },
        limit: None,
        prepared_sha256: Default::default(),
        sets: [
            (
                "advbench".to_string(),
                set(SetKind::Harmful, 20, asr_k, asr_k + 1),
            ),
            (
                "xstest".to_string(),
                set(SetKind::Overrefusal, 10, over_k, over_k),
            ),
        ]
        .into(),
    };
    serde_json::to_string_pretty(&s).unwrap()
}

fn utility(val_loss: f64) -> String {
    let u = Utility {
        model: "m".into(),
        git_commit: "abc123".into(),
        val: [(
            "dolly".to_string(),
            ValLoss {
                val_loss,
                perplexity: val_loss.exp(),
                rows: 4,
                reply_tokens: 40,
                prepared_sha256: "0".repeat(64),
            },
        )]
        .into(),
        replies: Default::default(),
    };
    serde_json::to_string_pretty(&u).unwrap()
}

/// A run with θ and EMA scores; `seed` varies, the setting does not.
fn run(root: &Path, name: &str, seed: u64, asr_theta: usize, asr_ema: usize) {
    let d = root.join(name);
    write(
        &d.join("config.toml"),
        &format!("data = [\"data/prepared/dolly.parquet\"]\nlr = 0.0001\nbatch_size = 8\nseed = {seed}\n[ema]\nenabled = true\nbeta = 0.99\n"),
    );
    write(
        &d.join("metrics.jsonl"),
        "{\"step\":0,\"val_loss\":2.5}\n{\"step\":12,\"loss\":2.0,\"dist_theta\":1.5,\"dist_ema\":0.25}\n",
    );
    write(&d.join("eval/model/scores.json"), &scores(asr_theta, 1));
    write(&d.join("eval/ema/scores.json"), &scores(asr_ema, 5));
    write(&d.join("eval/model/utility.json"), &utility(2.25));
}

fn report(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .arg("report")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn pools_seeds_and_pairs_each_run_with_its_ema() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    run(root, "a-s0", 0, 10, 2);
    run(root, "a-s1", 1, 14, 4);
    let reference = root.join("aligned");
    write(&reference.join("scores.json"), &scores(1, 2));
    let out = root.join("report");
    let o = report(&[
        root.join("a-s0").to_str().unwrap(),
        root.join("a-s1").to_str().unwrap(),
        "--reference",
        &format!("aligned={}", reference.display()),
        "--out",
        out.to_str().unwrap(),
        "--title",
        "T",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    // θ pooled over 2 seeds: 24/40 = 60%, spread of 50% and 70% = ±14.1.
    assert!(
        md.contains("| dolly | 1e-4 | 8 | 12 | θ | 2 | 60.0 ["),
        "{md}"
    );
    assert!(md.contains("±14.1"), "{md}");
    // EMA: 6/40 = 15%, over-refusal 10/20 = 50%, distance 0.25.
    assert!(md.contains("| EMA β=0.99 | 2 | 15.0 ["), "{md}");
    assert!(md.contains("| 50.0 ["), "{md}");
    assert!(
        md.contains("| 2.2500 | 1.500 |"),
        "θ: val loss and distance: {md}"
    );
    assert!(md.contains("| aligned | 5.0 ["), "{md}");
    assert!(
        md.contains("a-s1/eval/ema/scores.json") && md.contains("abc123"),
        "provenance: {md}"
    );
    if md.contains("## Plots") {
        for stem in ["asr_vs_lr", "ema_vs_no_ema", "asr_vs_distance"] {
            assert!(
                out.join(format!("{stem}.svg")).exists()
                    && out.join(format!("{stem}.png")).exists()
            );
        }
    } else {
        assert!(md.contains("Plots skipped"), "{md}");
    }
}

#[test]
fn a_directory_that_is_not_a_run_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let o = report(&[dir.path().to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not a run directory (no config.toml)"),
        "{err}"
    );
    assert!(!out.exists());
    // A run not evaluated yet says what to run.
    write(&dir.path().join("r/config.toml"), "lr = 0.001\n");
    let o = report(&[
        dir.path().join("r").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("evaluate safety --model"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_file_of_another_layout_is_an_error_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    run(root, "a", 0, 10, 2);
    let out = root.join("report");
    let args = [
        root.join("a").to_str().unwrap().to_string(),
        "--out".into(),
        out.to_str().unwrap().into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // A renamed key: before typed files it gave an empty report column.
    let utility = root.join("a/eval/model/utility.json");
    let text = std::fs::read_to_string(&utility).unwrap();
    std::fs::write(&utility, text.replace("\"val_loss\"", "\"loss\"")).unwrap();
    let o = report(&args);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("utility.json") && err.contains("val_loss"),
        "{err}"
    );
    assert!(!out.exists());
    // A metrics line of another layout names its line.
    std::fs::write(&utility, text).unwrap();
    std::fs::write(
        root.join("a/metrics.jsonl"),
        "{\"step\":0,\"val_loss\":2.5}\n{\"step\":\"12\"}\n",
    )
    .unwrap();
    let o = report(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("metrics.jsonl:2"), "{err}");
    assert!(!out.exists());
}
