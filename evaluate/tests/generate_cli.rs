//! `evaluate generate` as a user runs it, on a tiny random model saved as a HF directory.

use basin_lm::tiny::{tiny_config, write_tiny_model_dir};
use candle_core::{DType, Device};
use std::process::Command;

fn tiny_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model_dir(dir.path()).unwrap();
    let text = basin_lm::source::ModelText::open(dir.path()).unwrap();
    let varmap =
        basin_lm::llama::random_weights(&tiny_config(), 11, DType::F32, &Device::Cpu).unwrap();
    basin_lm::weights::save_hf_dir(dir.path(), &tiny_config(), &varmap, &text, DType::F32).unwrap();
    dir
}

fn evaluate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generates_for_each_prompt_reproducibly() {
    let dir = tiny_model_dir();
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
    // Batch size does not change greedy replies.
    let mut one = args.to_vec();
    one[10] = "1";
    assert_eq!(String::from_utf8_lossy(&evaluate(&one).stdout), out);
}

#[test]
fn clear_errors_for_bad_arguments() {
    let dir = tiny_model_dir();
    let model = dir.path().to_str().unwrap();
    for (args, want) in [
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
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Some(gguf) = basin_lm::fsutil::locate_asset(&root, "model/SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        eprintln!("SKIPPED: SmolLM2 GGUF not fetched (run `just setup`)");
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
