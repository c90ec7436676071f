//! The training stage as a user runs it, on the tiny model: it learns, the EMA keeps its
//! anchor, `--resume` after an abort gives bitwise the same weights, and a divergence
//! stops the run with the last checkpoint kept.

use basin_lm::schema::{write_parquet, PreparedRow};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    /// A tiny random model as a HF directory and a prepared file of byte-token rows.
    fn new() -> Self {
        Self::with_model(|model| {
            basin_lm::tiny::write_tiny_model(model, &basin_lm::tiny::tiny_config(), 21).unwrap()
        })
    }

    /// The same, with the model directory written by `write`.
    fn with_model(write: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        write(&model);
        let text = basin_lm::source::ModelText::open(&model).unwrap();
        let rows: Vec<PreparedRow> = (0..40)
            .map(|i| {
                let prompt = format!(
                    "<|im_start|>user\nsay {}<|im_end|>\n<|im_start|>assistant\n",
                    i % 5
                );
                let reply = format!("the answer is {}{}<|im_end|>", i % 5, "!".repeat(i % 3));
                let mut ids = text.tokenizer.encode(&prompt).unwrap();
                let prompt_len = ids.len() as u32;
                ids.extend(text.tokenizer.encode(&reply).unwrap());
                PreparedRow {
                    id: format!("t-{i}"),
                    source: "t".into(),
                    split: if i % 8 == 0 { "val" } else { "train" }.into(),
                    system: None,
                    user: prompt,
                    assistant: Some(reply),
                    label: None,
                    input_ids: ids,
                    prompt_len,
                    truncated: false,
                }
            })
            .collect();
        write_parquet(&dir.path().join("data.parquet"), &rows).unwrap();
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn train(&self, name: &str, extra: &[&str]) -> Output {
        self.train_with(&[], name, extra)
    }

    /// `train --quiet FLAGS` with the setup's paths, a small batch, and `extra` overrides.
    fn train_with(&self, flags: &[&str], name: &str, extra: &[&str]) -> Output {
        let q = |p: PathBuf| format!("{:?}", p.display().to_string());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
        cmd.arg("--quiet")
            .args(flags)
            .args(["--set", &format!("name={name}")])
            .args(["--set", &format!("out_dir={}", q(self.path("runs")))])
            .args(["--set", &format!("model={}", q(self.path("model")))])
            .args(["--set", &format!("data=[{}]", q(self.path("data.parquet")))])
            .args([
                "--set",
                "batch_size=4",
                "--set",
                "micro_batch=2",
                "--set",
                "lr=3e-3",
                "--set",
                "steps=8",
            ]);
        for e in extra {
            cmd.args(["--set", e]);
        }
        cmd.output().unwrap()
    }
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn learns_and_writes_its_outputs() {
    let s = Setup::new();
    ok(&s.train("a", &["ema.enabled=true", "ema.beta=0.9", "eval_every=4"]));
    let run = s.path("runs/a");
    for f in [
        "config.toml",
        "run.json",
        "metrics.jsonl",
        "model/model.safetensors",
        "model/config.json",
        "ema/model.safetensors",
        "ema/tokenizer.json",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let m = metrics(&run);
    let first = m[0]["val_loss"].as_f64().unwrap();
    let last = m.last().unwrap()["val_loss"].as_f64().unwrap();
    assert!(last < first, "validation loss {first} -> {last}");
    let last = m.last().unwrap();
    assert_eq!(last["step"], 8);
    let (dt, de) = (
        last["dist_theta"].as_f64().unwrap(),
        last["dist_ema"].as_f64().unwrap(),
    );
    assert!(
        de > 0.0 && de < dt,
        "the EMA moves less than the weights: {de} vs {dt}"
    );
    assert!(last["val_loss_ema"].is_number());
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(cfg.contains("lr = 0.003") && cfg.contains("[ema]"), "{cfg}");
    // Running the same name again starts the run anew.
    ok(&s.train("a", &["steps=2"]));
    let steps: Vec<u64> = metrics(&run)
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(steps, [0, 1, 2]);
    assert!(!run.join("ema").exists(), "the earlier run's EMA is gone");
}

#[test]
fn other_families_train_and_save_in_their_own_layout() {
    // transformers' tiny Phi-3 (fused projections) and Qwen2 (q/k/v biases, tied), with the
    // tiny tokenizer (lm/tests/fixtures/families/).
    for (family, fused) in [
        ("phi3", "model.layers.0.self_attn.qkv_proj.weight"),
        ("qwen2", "model.layers.0.self_attn.q_proj.bias"),
    ] {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../lm/tests/fixtures/families")
            .join(family);
        let s = Setup::with_model(|model| {
            std::fs::create_dir_all(model).unwrap();
            for f in ["config.json", "model.safetensors"] {
                std::fs::copy(fixture.join(f), model.join(f)).unwrap();
            }
            basin_lm::tiny::write_tiny_model_dir(model).unwrap();
        });
        ok(&s.train(
            "f",
            &[
                "ema.enabled=true",
                "ema.beta=0.9",
                "steps=4",
                "eval_every=4",
            ],
        ));
        let m = metrics(&s.path("runs/f"));
        let val = |r: &serde_json::Value| r["val_loss"].as_f64().unwrap();
        assert!(
            val(m.last().unwrap()) < val(&m[0]),
            "{family} did not learn"
        );
        for out in ["model", "ema"] {
            let dir = s.path("runs/f").join(out);
            let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
            assert!(
                config.contains(&format!("\"model_type\": \"{family}\"")),
                "{config}"
            );
            let saved = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                .unwrap();
            assert!(saved.contains_key(fused), "{family} {out}: no {fused}");
            let start =
                candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)
                    .unwrap();
            assert_eq!(
                saved.keys().collect::<std::collections::BTreeSet<_>>(),
                start.keys().collect(),
                "{family} {out}: the tensors differ from the checkpoint's"
            );
            let moved = (&saved[fused] - &start[fused])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(moved > 0.0, "{family} {out}: {fused} did not train");
            basin_lm::model::Model::open(&dir, DType::F32, &Device::Cpu).unwrap();
        }
    }
}

#[test]
fn ema_with_beta_one_stays_at_the_pretrained_weights() {
    let s = Setup::new();
    ok(&s.train("anchor", &["ema.enabled=true", "ema.beta=1.0", "steps=3"]));
    let ema =
        candle_core::safetensors::load(s.path("runs/anchor/ema/model.safetensors"), &Device::Cpu)
            .unwrap();
    let start =
        candle_core::safetensors::load(s.path("model/model.safetensors"), &Device::Cpu).unwrap();
    let raw =
        candle_core::safetensors::load(s.path("runs/anchor/model/model.safetensors"), &Device::Cpu)
            .unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let v = |m: &std::collections::HashMap<String, candle_core::Tensor>| {
        m[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(v(&ema), v(&start));
    assert_ne!(v(&raw), v(&start));
}

#[test]
fn resume_after_abort_gives_bitwise_the_same_weights() {
    let s = Setup::new();
    let common = ["checkpoint_every=3", "ema.enabled=true", "ema.beta=0.8"];
    ok(&s.train("whole", &common));
    // Abort after step 5: the checkpoint of step 3 is the last one on disk.
    let crashed = s.train_with(&["--crash-after-step", "5"], "broken", &common);
    assert!(!crashed.status.success(), "the run should have aborted");
    assert!(!s.path("runs/broken/model").exists());
    ok(&s.train_with(&["--resume"], "broken", &common));
    for f in ["model/model.safetensors", "ema/model.safetensors"] {
        let a = std::fs::read(s.path("runs/whole").join(f)).unwrap();
        let b = std::fs::read(s.path("runs/broken").join(f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }
    assert!(
        !s.path("runs/broken/checkpoint").exists(),
        "a finished run drops its checkpoint"
    );
    let steps: Vec<u64> = metrics(&s.path("runs/broken"))
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(
        steps,
        (0..=8).collect::<Vec<_>>(),
        "metrics replayed once each"
    );
}

#[test]
fn divergence_stops_with_a_clear_message_and_keeps_the_checkpoint() {
    let s = Setup::new();
    let out = s.train(
        "nan",
        &["lr=1e30", "grad_clip=0.0", "checkpoint_every=1", "steps=6"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("non-finite loss") && err.contains("last good checkpoint"),
        "{err}"
    );
    assert!(s.path("runs/nan/checkpoint/state.safetensors").exists());
    assert!(!s.path("runs/nan/model").exists());
}

#[test]
fn bf16_trains_on_f32_master_weights_and_resumes_bitwise() {
    let s = Setup::new();
    let common = [
        "dtype=\"bf16\"",
        "ema.enabled=true",
        "ema.beta=0.8",
        "ema.feedback_every=6",
        "eval_every=4",
        "checkpoint_every=3",
    ];
    ok(&s.train("whole", &common));
    let m = metrics(&s.path("runs/whole"));
    let first = m[0]["val_loss"].as_f64().unwrap();
    let last = m.last().unwrap();
    assert!(
        last["val_loss"].as_f64().unwrap() < first,
        "bf16 learns: {m:?}"
    );
    assert!(last["val_loss_ema"].is_number());
    let crashed = s.train_with(&["--crash-after-step", "4"], "broken", &common);
    assert!(!crashed.status.success());
    ok(&s.train_with(&["--resume"], "broken", &common));
    for f in ["model/model.safetensors", "ema/model.safetensors"] {
        let a = std::fs::read(s.path("runs/whole").join(f)).unwrap();
        let b = std::fs::read(s.path("runs/broken").join(f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }
    let w =
        candle_core::safetensors::load(s.path("runs/whole/model/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(w["model.norm.weight"].dtype(), DType::BF16);
}

#[test]
fn max_seq_len_cuts_the_training_rows() {
    let s = Setup::new();
    ok(&s.train("whole", &["steps=1"]));
    // The tiny rows have prompts of about 30 tokens and replies of about 15.
    ok(&s.train("cut", &["steps=1", "max_seq_len=36"]));
    let tokens = |run: &str| metrics(&s.path(run))[1]["tokens"].as_u64().unwrap();
    let (whole, cut) = (tokens("runs/whole"), tokens("runs/cut"));
    assert!(
        cut > 0 && cut < whole,
        "reply tokens trained on: {cut} cut vs {whole} whole"
    );
    // No reply token left at all: a clear error, not a silent run.
    let out = s.train("none", &["steps=1", "max_seq_len=4"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no reply token is left"), "{err}");
}
