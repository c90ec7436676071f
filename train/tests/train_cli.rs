//! The training stage as a user runs it, on the tiny model: it learns, the EMA keeps its
//! anchor, `--resume` after an abort gives bitwise the same weights, and a divergence
//! stops the run with the last checkpoint kept.

use basin_lm::schema::write_parquet;
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
        let rows = basin_lm::testkit::tiny_training_rows(&model, 40).unwrap();
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
        let mut cmd = self.train_command(name, extra);
        cmd.args(flags);
        cmd.output().unwrap()
    }

    /// The `train` command of [`Self::train_with`], not run yet.
    fn train_command(&self, name: &str, extra: &[&str]) -> Command {
        let q = |p: PathBuf| format!("{:?}", p.display().to_string());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
        cmd.arg("--quiet")
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
        cmd
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
    // Resuming with another config is refused (the checkpoint belongs to the first).
    let crashed = s.train_with(&["--crash-after-step", "4"], "again", &common);
    assert!(!crashed.status.success());
    let other = s.train_with(
        &["--resume"],
        "again",
        &[&common[..], &["lr=1e-2"]].concat(),
    );
    assert_eq!(other.status.code(), Some(1));
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("made with a different config"), "{err}");
    assert!(s.path("runs/again/checkpoint/state.safetensors").exists());
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

/// A bf16 run with the EMA, its feedback, validation and checkpoints on.
const BF16_EMA: [&str; 6] = [
    "dtype=\"bf16\"",
    "ema.enabled=true",
    "ema.beta=0.8",
    "ema.feedback_every=6",
    "eval_every=4",
    "checkpoint_every=3",
];

#[test]
fn bf16_trains_on_f32_master_weights_and_resumes_bitwise() {
    let s = Setup::new();
    let common = BF16_EMA;
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

/// Pure bf16 (issue 22): θ as the model's bf16 weight plus a bf16 low half, bf16 moments,
/// the EMA as a bf16 pair, θ₀ on the host. It learns, resumes bit for bit (the checkpoint
/// holds both halves), and tracks the run with f32 state; the distance follows
/// `state.distance_every` and `state.theta0 = "off"`.
#[test]
fn pure_bf16_trains_resumes_bitwise_and_tracks_f32_state() {
    let s = Setup::new();
    let bf16 = BF16_EMA;
    let pure = [
        &bf16[..],
        &[
            "state.weights=\"pair\"",
            "state.moments=\"bf16\"",
            "state.ema=\"pair\"",
            "state.theta0=\"host\"",
            "state.distance_every=3",
        ],
    ]
    .concat();
    ok(&s.train("pure", &pure));
    ok(&s.train("f32-state", &bf16));
    let (p, f) = (
        metrics(&s.path("runs/pure")),
        metrics(&s.path("runs/f32-state")),
    );
    assert!(
        p.last().unwrap()["val_loss"].as_f64().unwrap() < p[0]["val_loss"].as_f64().unwrap(),
        "pure bf16 learns: {p:?}"
    );
    // The same losses to 1e-3 over the 8 steps (bf16 moments and the 16-bit θ round where
    // f32 state does not; measured: under 1e-4).
    for field in ["loss", "val_loss", "val_loss_ema"] {
        let (a, b) = (
            series(&s.path("runs/pure"), field),
            series(&s.path("runs/f32-state"), field),
        );
        assert_eq!(a.len(), b.len(), "{field}");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a.1 - b.1).abs() / b.1)
            .fold(0.0, f64::max);
        eprintln!("pure bf16 vs f32 state, {field}: worst relative difference {worst:.2e}");
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a.0, b.0);
            assert!(
                (a.1 - b.1).abs() < 1e-3 * b.1,
                "{field} at step {}: {} vs {}",
                a.0,
                a.1,
                b.1
            );
        }
    }
    let steps_with = |m: &[serde_json::Value], field: &str| -> Vec<u64> {
        m.iter()
            .filter(|r| r[field].is_number())
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        steps_with(&p, "dist_theta"),
        [3, 6, 8],
        "every 3 and the last"
    );
    assert_eq!(steps_with(&p, "dist_ema"), [3, 6, 8]);
    assert_eq!(steps_with(&f, "dist_theta"), (1..=8).collect::<Vec<_>>());
    // ‖θ − θ₀‖ from the host copy agrees with the device copy's run.
    let d = |m: &[serde_json::Value]| m.last().unwrap()["dist_theta"].as_f64().unwrap();
    eprintln!(
        "‖θ − θ₀‖ after 8 steps: pure bf16 {}, f32 state {}",
        d(&p),
        d(&f)
    );
    assert!(
        (d(&p) - d(&f)).abs() < 1e-2 * d(&f),
        "{} vs {}",
        d(&p),
        d(&f)
    );
    // An abort and a resume give the same bits; the checkpoint holds θ's two halves.
    let crashed = s.train_with(&["--crash-after-step", "4"], "broken", &pure);
    assert!(!crashed.status.success());
    let ckpt = candle_core::safetensors::load(
        s.path("runs/broken/checkpoint/state.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (kind, dtype) in [
        ("theta", DType::BF16),
        ("theta_lo", DType::BF16),
        ("m", DType::BF16),
        ("ema_lo", DType::BF16),
    ] {
        assert_eq!(
            ckpt[&format!("{kind}/model.norm.weight")].dtype(),
            dtype,
            "{kind}"
        );
    }
    ok(&s.train_with(&["--resume"], "broken", &pure));
    for f in ["model/model.safetensors", "ema/model.safetensors"] {
        let a = std::fs::read(s.path("runs/pure").join(f)).unwrap();
        let b = std::fs::read(s.path("runs/broken").join(f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }
    // Saved in f32 (`state.save`), θ̄ is the pair's sum: its distance from θ₀ (the model
    // rounded to bf16, where training starts) is the logged one; saved in bf16 it is less,
    // the drift below a weight's bf16 unit rounded away.
    ok(&s.train("f32-save", &[&pure[..], &["state.save=\"f32\""]].concat()));
    let theta0: std::collections::BTreeMap<String, Vec<f32>> =
        weights(&s.path("model/model.safetensors"))
            .into_iter()
            .map(|(k, v)| (k, v.iter().map(|&x| to_bf16(x)).collect()))
            .collect();
    let distance = |file: &str| -> f64 {
        weights(&s.path(file))
            .iter()
            .map(|(k, v)| {
                v.iter()
                    .zip(&theta0[k])
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let saved =
        candle_core::safetensors::load(s.path("runs/f32-save/ema/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(saved.values().all(|t| t.dtype() == DType::F32));
    let logged = metrics(&s.path("runs/f32-save")).last().unwrap()["dist_ema"]
        .as_f64()
        .unwrap();
    let (exact, rounded) = (
        distance("runs/f32-save/ema/model.safetensors"),
        distance("runs/pure/ema/model.safetensors"),
    );
    eprintln!("‖θ̄ − θ₀‖: logged {logged}, saved in f32 {exact}, saved in bf16 {rounded}");
    assert!(
        (exact - logged).abs() < 1e-6 * logged,
        "{exact} vs {logged}"
    );
    // θ₀ off: no distance at all.
    ok(&s.train(
        "off",
        &[&pure[..], &["state.theta0=\"off\"", "steps=2"]].concat(),
    ));
    assert!(steps_with(&metrics(&s.path("runs/off")), "dist_theta").is_empty());
    // What would lose updates, or cannot be, is refused before anything is written.
    for (bad, says) in [
        (vec!["state.weights=\"pair\""], "needs dtype = \"bf16\""),
        (vec!["dtype=\"bf16\"", "state.ema=\"bf16\""], "small steps"),
        (
            vec!["dtype=\"bf16\"", "state.weights=\"bf16\""],
            "lose most",
        ),
        (vec!["state.moments=\"pair\""], "state.moments"),
        (vec!["state.distance_every=0"], "distance_every"),
        (vec!["dtype=\"bf16\"", "recompute=true"], "recompute"),
        (vec!["pass=\"autograd\"", "recompute=true"], "recompute"),
        (
            vec!["dtype=\"bf16\"", "pass=\"written\""],
            "pass = \"written\"",
        ),
        (vec!["pass=\"fast\""], "unknown variant"),
        (vec!["state.weights=\"half\""], "unknown variant"),
    ] {
        let out = s.train("refused", &bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{bad:?}: {err}");
        assert!(!s.path("runs/refused").exists(), "{bad:?}");
    }
}

/// x rounded to the nearest bf16 (ties to even), as a model loaded in bf16 holds it.
fn to_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits(((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16)
}

/// Activation recompute in the written-out pass: the same weights, bit for bit.
#[test]
fn recompute_trains_the_same_weights() {
    let s = Setup::new();
    ok(&s.train("kept", &["steps=3"]));
    ok(&s.train("redone", &["steps=3", "recompute=true"]));
    let a = std::fs::read(s.path("runs/kept/model/model.safetensors")).unwrap();
    let b = std::fs::read(s.path("runs/redone/model/model.safetensors")).unwrap();
    assert!(a == b, "recompute changed the weights");
}

/// The two ways to the gradients (`pass`): the written-out pass (auto's choice on the CPU)
/// and candle's autograd give the same first step — its loss and gradient norm — to
/// rounding, and the resolved config says which ran.
#[test]
fn the_written_out_pass_and_autograd_train_alike() {
    let s = Setup::new();
    ok(&s.train("written", &["steps=1"]));
    ok(&s.train("autograd", &["steps=1", "pass=\"autograd\""]));
    let first = |run: &str, field: &str| metrics(&s.path(run))[1][field].as_f64().unwrap();
    for field in ["loss", "grad_norm"] {
        let (w, a) = (first("runs/written", field), first("runs/autograd", field));
        assert!(
            (w - a).abs() <= 1e-5 * a.abs(),
            "{field}: {w} written vs {a} autograd"
        );
    }
    let config = std::fs::read_to_string(s.path("runs/autograd/config.toml")).unwrap();
    assert!(config.contains("pass = \"autograd\""), "{config}");
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

/// Every tensor of a safetensors file, by name, as f32 values.
fn weights(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            (k, v.to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// A metrics field at every step that has it.
fn series(run: &Path, field: &str) -> Vec<(u64, f64)> {
    metrics(run)
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m[field].as_f64()?)))
        .collect()
}

/// "model/ is the setting without the EMA": turning the EMA on (with θ̄ swapped into the
/// model for every validation) leaves θ and its validation losses bit for bit as they are
/// without it.
#[test]
fn the_ema_leaves_theta_bitwise_as_a_run_without_it() {
    let s = Setup::new();
    ok(&s.train("plain", &["eval_every=2"]));
    ok(&s.train("ema", &["eval_every=2", "ema.enabled=true", "ema.beta=0.8"]));
    let (plain, ema) = (s.path("runs/plain"), s.path("runs/ema"));
    let a = std::fs::read(plain.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(ema.join("model/model.safetensors")).unwrap();
    assert!(a == b, "θ differs when the EMA is on");
    assert_eq!(series(&plain, "val_loss"), series(&ema, "val_loss"));
    assert_eq!(series(&plain, "loss"), series(&ema, "loss"));
    let steps: Vec<u64> = series(&ema, "val_loss_ema").iter().map(|p| p.0).collect();
    assert_eq!(steps, [2, 4, 6, 8]);
}

/// θ̄ blends on the steps `ema.start` and `ema.every` name, by θ̄ + (1−β)(θ − θ̄): with
/// start 1 and every 3 over 4 steps that is step 4 alone, so θ̄ = θ₀ + ¼(θ₄ − θ₀) bit for
/// bit. Before any blend θ̄ is θ₀, and `val_loss_ema` is θ₀'s validation loss.
#[test]
fn ema_start_and_every_blend_on_the_steps_they_name() {
    let s = Setup::new();
    let ema = ["ema.enabled=true", "ema.beta=0.75", "steps=4"];
    ok(&s.train(
        "blend",
        &[&ema[..], &["ema.start=1", "ema.every=3"]].concat(),
    ));
    let start = weights(&s.path("model/model.safetensors"));
    let theta = weights(&s.path("runs/blend/model/model.safetensors"));
    let bar = weights(&s.path("runs/blend/ema/model.safetensors"));
    assert_eq!(
        start.keys().collect::<Vec<_>>(),
        bar.keys().collect::<Vec<_>>()
    );
    for (name, t0) in &start {
        let want: Vec<f32> = t0
            .iter()
            .zip(&theta[name])
            .map(|(&s0, &t4)| 0.25f32.mul_add(t4 - s0, s0))
            .collect();
        assert!(bar[name] == want, "{name}: θ̄ is not θ₀ + ¼(θ₄ − θ₀)");
        assert!(theta[name] != *t0, "{name}: θ did not move");
    }
    // No step after the start: θ̄ stays θ₀ and its loss is the loss at step 0.
    ok(&s.train("none", &[&ema[..], &["ema.start=4"]].concat()));
    assert_eq!(weights(&s.path("runs/none/ema/model.safetensors")), start);
    let run = s.path("runs/none");
    let at_start = series(&run, "val_loss")[0];
    assert_eq!(at_start.0, 0);
    assert_eq!(series(&run, "val_loss_ema"), [(4, at_start.1)]);
    assert_ne!(series(&run, "val_loss").last().unwrap().1, at_start.1);
}

/// `ema.feedback_every` copies θ̄ into θ after the blend: at the last step θ is θ̄ (weights
/// and validation loss); an earlier copy changes the rest of θ's path.
#[test]
fn ema_feedback_copies_the_average_into_the_weights() {
    let s = Setup::new();
    let ema = ["ema.enabled=true", "ema.beta=0.75", "steps=4"];
    ok(&s.train("last", &[&ema[..], &["ema.feedback_every=4"]].concat()));
    let run = s.path("runs/last");
    let a = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(run.join("ema/model.safetensors")).unwrap();
    assert!(a == b, "after feedback at the last step θ is θ̄");
    assert_eq!(
        series(&run, "val_loss").last(),
        series(&run, "val_loss_ema").last()
    );
    ok(&s.train("none", &ema));
    ok(&s.train("mid", &[&ema[..], &["ema.feedback_every=2"]].concat()));
    let theta = |r: &str| std::fs::read(s.path(r).join("model/model.safetensors")).unwrap();
    assert!(theta("runs/none") != theta("runs/mid"));
    assert!(theta("runs/none") != theta("runs/last"));
}

/// The learning rate each step applied, against the schedule worked out by hand: warm-up
/// 2 steps, then linear or cosine from lr to min_lr_ratio·lr over the other 4.
#[test]
fn the_learning_rate_follows_warmup_then_the_schedule() {
    let s = Setup::new();
    let common = ["steps=6", "warmup_steps=2", "min_lr_ratio=0.1", "lr=3e-3"];
    ok(&s.train("linear", &[&common[..], &["schedule=\"linear\""]].concat()));
    ok(&s.train("cosine", &[&common[..], &["schedule=\"cosine\""]].concat()));
    let (lr, floor) = (3e-3f64, 3e-4f64);
    let warm = [lr / 2.0, lr];
    let linear: Vec<f64> = (1..=4)
        .map(|i| floor + (lr - floor) * (1.0 - i as f64 / 4.0))
        .collect();
    let cosine: Vec<f64> = (1..=4)
        .map(|i| floor + (lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * i as f64 / 4.0).cos()))
        .collect();
    for (run, tail) in [("runs/linear", linear), ("runs/cosine", cosine)] {
        let got = series(&s.path(run), "lr");
        let want: Vec<f64> = warm.iter().chain(&tail).copied().collect();
        assert_eq!(got.len(), 6, "{run}: {got:?}");
        for ((step, g), w) in got.iter().zip(&want) {
            // The step applies the rate in f32.
            assert!(
                (g - w).abs() <= 1e-7 * w,
                "{run} step {step}: lr {g}, by hand {w}"
            );
        }
    }
}

/// Gradient accumulation weighs each micro-batch by its share of the batch's reply tokens:
/// one micro-batch of 4 rows and four of 1 row (rows of different lengths) give the same
/// loss and gradient norm, and the same weights up to f32 rounding.
#[test]
fn micro_batches_weigh_by_their_share_of_reply_tokens() {
    let s = Setup::new();
    ok(&s.train("whole", &["micro_batch=4", "steps=2"]));
    ok(&s.train("split", &["micro_batch=1", "steps=2"]));
    let (whole, split) = (s.path("runs/whole"), s.path("runs/split"));
    let mut worst = 0f64;
    for field in ["loss", "grad_norm"] {
        for ((_, a), (_, b)) in series(&whole, field).iter().zip(series(&split, field)) {
            worst = worst.max((a - b).abs() / a.abs());
        }
    }
    eprintln!("micro-batches 1 vs 4: loss and gradient norm within {worst:.1e} (relative)");
    // About 10x the measured difference (2.2e-8: f32 sums in another order).
    assert!(worst < 2e-7, "loss or gradient norm differ by {worst:.1e}");
    let (a, b) = (
        weights(&whole.join("model/model.safetensors")),
        weights(&split.join("model/model.safetensors")),
    );
    let diff = a
        .iter()
        .flat_map(|(k, v)| v.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    eprintln!("micro-batches 1 vs 4: weights within {diff:.1e}");
    // About 10x the measured difference (2.5e-7).
    assert!(diff < 2.5e-6, "weights differ by {diff}");
}

/// Clipping scales the gradient by clip/‖g‖ before AdamW. With ε far above every |g| the
/// first AdamW step is nearly linear in the gradient (lr·g/(|g| + ε)), so the clipped run
/// moves the weights by clip/‖g‖ of the free run's move.
#[test]
fn gradient_clipping_scales_the_gradient_by_clip_over_its_norm() {
    let s = Setup::new();
    let common = ["steps=1", "lr=1.0", "eps=100.0", "weight_decay=0.0"];
    ok(&s.train("free", &[&common[..], &["grad_clip=0.0"]].concat()));
    let norm = series(&s.path("runs/free"), "grad_norm")[0].1;
    let clip = norm / 4.0;
    ok(&s.train(
        "clipped",
        &[&common[..], &[&format!("grad_clip={clip}")[..]]].concat(),
    ));
    assert_eq!(
        series(&s.path("runs/clipped"), "grad_norm")[0].1,
        norm,
        "the norm logged is before clipping"
    );
    let start = weights(&s.path("model/model.safetensors"));
    let moved = |run: &str| -> f64 {
        let w = weights(&s.path(run).join("model/model.safetensors"));
        start
            .iter()
            .flat_map(|(k, v)| v.iter().zip(&w[k]).map(|(a, b)| ((b - a) as f64).powi(2)))
            .sum::<f64>()
            .sqrt()
    };
    let ratio = moved("runs/clipped") / moved("runs/free");
    eprintln!("‖g‖ = {norm:.4}, clip = ‖g‖/4: the clipped step is {ratio:.5} of the free one");
    // About 10x the measured departure from 1/4 (2.7e-4: ε is finite).
    assert!((ratio - 0.25).abs() < 2.5e-3, "ratio {ratio}, want 0.25");
}

/// Two runs of one name: while a live process holds `runs/<name>/lock`, a second `train`
/// of that name refuses, naming the holder, and touches nothing of the run; once the
/// holder is gone its lock is taken over.
#[test]
fn a_run_in_use_by_another_process_is_refused_and_left_alone() {
    let s = Setup::new();
    ok(&s.train("busy", &["steps=2"]));
    let run = s.path("runs/busy");
    let before = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    // A live process on this host holds the run (as a running train would).
    let mut holder = Command::new("sleep").arg("30").spawn().unwrap();
    let host = basin_lm::runlock::host();
    let hold = |pid: u32, command: &str| {
        std::fs::write(
            run.join("lock"),
            format!(r#"{{"pid":{pid},"host":"{host}","since":1,"command":"{command}"}}"#),
        )
        .unwrap()
    };
    hold(holder.id(), "train");
    let out = s.train("busy", &["steps=3"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("in use by train (pid {} on {host}", holder.id())),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("model/model.safetensors")).unwrap(),
        before
    );
    assert_eq!(
        std::fs::read_to_string(run.join("config.toml")).unwrap(),
        config
    );
    // The holder ends without removing its lock (killed): the next run takes it over.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = s.train("busy", &["steps=3"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("taking over the lock"));
    assert!(!run.join("lock").exists(), "a finished run leaves no lock");
    // A sweep holds the run for the train it starts: the child goes ahead, the lock stays.
    let mut cmd = s.train_command("busy", &["steps=2"]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    cmd = Command::new("sh");
    cmd.args(["-c", &format!("sleep 1; {line}")]);
    let parent = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    hold(parent.id(), "sweep");
    ok(&parent.wait_with_output().unwrap());
    assert!(
        run.join("lock").exists(),
        "the sweep's lock is the sweep's to remove"
    );
    // A requeued attempt of the same Slurm job takes over its earlier attempt's lock (on
    // any node); another job is refused.
    let slurm = |job: &str| {
        std::fs::write(
            run.join("lock"),
            r#"{"pid":1,"host":"node-a","since":1,"command":"sweep","slurm_job":"77"}"#,
        )
        .unwrap();
        s.train_command("busy", &["steps=1"])
            .env("SLURM_JOB_ID", job)
            .output()
            .unwrap()
    };
    let out = slurm("78");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pid 1 on node-a"));
    let out = slurm("77");
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("an earlier attempt of this Slurm job"));
}

/// Preemption with a real signal: SIGTERM in the middle of training ends the current step,
/// writes a checkpoint and exits with 75 saying how to continue; `--resume` then gives
/// bitwise the weights of a run that was never stopped.
#[test]
fn sigterm_checkpoints_and_resume_gives_the_same_weights() {
    let s = Setup::new();
    let common = ["steps=150", "ema.enabled=true", "ema.beta=0.9"];
    ok(&s.train("whole", &common));
    let child = s
        .train_command("stopped", &common)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = s.path("runs/stopped");
    // Wait for a few steps of metrics, then send SIGTERM.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 4 {
        assert!(
            started.elapsed().as_secs() < 60,
            "no training steps within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("interrupted at step") && err.contains("--resume continues"),
        "{err}"
    );
    let progress: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoint/progress.json")).unwrap(),
    )
    .unwrap();
    let at = progress["step"].as_u64().unwrap();
    assert!(at > 0 && at < 150, "stopped at step {at}");
    assert!(
        err.contains(&format!("interrupted at step {at} of 150")),
        "{err}"
    );
    assert!(!run.join("model").exists() && !run.join("lock").exists());
    ok(&s.train_with(&["--resume"], "stopped", &common));
    for f in ["model/model.safetensors", "ema/model.safetensors"] {
        let a = std::fs::read(s.path("runs/whole").join(f)).unwrap();
        let b = std::fs::read(run.join(f)).unwrap();
        assert!(a == b, "{f} differs after the interruption and --resume");
    }
}

/// A run's trajectory: `snapshots = [4]` saves θ and θ̄ after step 4 of 8 into step-4/,
/// bit for bit what a run of 4 steps ends with (the schedule is constant); the end is
/// saved as ever, each step's seconds are in metrics.jsonl, and a snapshot at or after the
/// last step is refused before anything is written.
#[test]
fn snapshots_save_the_weights_of_the_steps_they_name() {
    let s = Setup::new();
    let ema = ["ema.enabled=true", "ema.beta=0.8"];
    ok(&s.train("long", &[&ema[..], &["snapshots=[4]"]].concat()));
    ok(&s.train("short", &[&ema[..], &["steps=4"]].concat()));
    for w in ["model", "ema"] {
        let f = format!("{w}/model.safetensors");
        let snap = std::fs::read(s.path("runs/long/step-4").join(&f)).unwrap();
        let short = std::fs::read(s.path("runs/short").join(&f)).unwrap();
        assert!(snap == short, "step-4/{f} differs from a 4-step run's");
        assert!(s.path("runs/long").join(&f).exists());
    }
    assert!(!s.path("runs/long/step-8").exists());
    let secs = series(&s.path("runs/long"), "seconds");
    assert_eq!(secs.len(), 8);
    assert!(secs.iter().all(|(_, t)| *t > 0.0), "{secs:?}");
    // Running the name again drops what derives from the old weights: snapshots, scores,
    // interpolations.
    for d in ["eval/model", "wise-0.5"] {
        std::fs::create_dir_all(s.path("runs/long").join(d)).unwrap();
    }
    ok(&s.train("long", &["steps=2"]));
    for d in ["step-4", "eval", "wise-0.5"] {
        assert!(!s.path("runs/long").join(d).exists(), "{d} left behind");
    }
    for bad in ["snapshots=[8]", "snapshots=[0]", "snapshots=[3, 2]"] {
        let out = s.train("bad", &[bad]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("snapshots"), "{bad}: {err}");
    }
    assert!(!s.path("runs/bad/config.toml").exists());
}

/// `train --plan` reads the model's shape (here a config.json alone: the paper's 7B) and
/// prints each part and whether it fits; a run that would not fit is refused before it
/// loads or writes anything.
#[test]
fn the_plan_says_whether_a_run_fits_and_a_run_that_does_not_is_refused() {
    let s = Setup::new();
    let shape =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/llama-2-7b-chat.json");
    let model = format!("model={:?}", shape.display().to_string());
    let seven_b = [
        "--set",
        &model,
        "--set",
        "max_seq_len=512",
        "--set",
        "ema.enabled=true",
    ];
    let plan = |extra: &[&str], gib: &str| {
        let mut cmd = s.train_command("plan", &[]);
        cmd.args(seven_b)
            .args(extra)
            .args(["--plan", "--memory-gib", gib]);
        cmd.output().unwrap()
    };
    // f32 with the EMA and accumulation: 28 bytes a parameter, ~176 GiB before activations.
    let out = plan(&[], "141");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for part in [
        "weights (f32)",
        "AdamW m (f32)",
        "EMA θ̄ (f32)",
        "θ₀",
        "activations (2 x 512 tokens, 32 layers, f32)",
        "memory: 141.00 GiB (--memory-gib)",
    ] {
        assert!(text.contains(part), "{part} not in {text}");
    }
    let last = text.lines().rfind(|l| l.starts_with("fits:")).unwrap();
    assert!(
        last.starts_with("fits: no (") && last.ends_with(" GiB of 141.00 GiB)"),
        "{text}"
    );
    assert!(
        text.contains("each of these would fit") || text.contains("no one setting"),
        "{text}"
    );
    // A card that holds it.
    let out = plan(&[], "400");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("fits: yes ("));
    assert!(!s.path("runs/plan").exists(), "a plan writes nothing");
    // A real run on the tiny model, told its device has 1 MiB: refused before it loads.
    let out = s.train_with(&["--memory-gib", "0.001"], "tight", &["max_seq_len=32"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not fit its device's memory") && err.contains("fits: no"),
        "{err}"
    );
    assert!(!s.path("runs/tight").exists());
    let out = s.train_with(&["--plan", "--memory-gib=-1"], "x", &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--memory-gib -1: expected a positive"));
    // On the CPU the plan is held against the host's available memory (Linux).
    if Path::new("/proc/meminfo").exists() {
        let out = s.train_with(&["--plan"], "cpu-plan", &["max_seq_len=32"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("GiB (available host memory, by /proc/meminfo)")
                && text.contains("fits: yes ("),
            "{text}"
        );
    }
}
