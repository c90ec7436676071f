//! `evaluate interpolate` as a user runs it: a run directory of two tiny random models
//! (its start and its fine-tuned θ), interpolated at several α.

mod common;
use candle_core::{DType, Device};
use common::{evaluate, write_tiny_model};
use std::collections::BTreeMap;
use std::path::Path;

fn weights(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            (k, v.to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// A run directory: config.toml naming `start` as its model, and model/ (another model).
fn run_dir(root: &Path) -> std::path::PathBuf {
    let (start, run) = (root.join("start"), root.join("runs/r"));
    write_tiny_model(&start, 1);
    write_tiny_model(&run.join("model"), 2);
    let config = format!("name = \"r\"\nmodel = {:?}\n", start.display().to_string());
    std::fs::write(run.join("config.toml"), config).unwrap();
    run
}

#[test]
fn interpolation_runs_from_the_start_to_the_fine_tuned_weights() {
    let root = tempfile::tempdir().unwrap();
    let run = run_dir(root.path());
    let out = evaluate(&[
        "interpolate",
        "--run",
        run.to_str().unwrap(),
        "--alpha",
        "0,0.25,1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (start, end) = (
        weights(&root.path().join("start")),
        weights(&run.join("model")),
    );
    let mut norm = 0.0f64;
    for (k, s) in &start {
        norm += s
            .iter()
            .zip(&end[k])
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>();
    }
    let norm = norm.sqrt();
    assert!(norm > 0.0);
    for alpha in [0.0f32, 0.25, 1.0] {
        let dir = run.join(format!("wise-{alpha}"));
        let w = weights(&dir);
        assert_eq!(
            w.keys().collect::<Vec<_>>(),
            start.keys().collect::<Vec<_>>()
        );
        for (k, got) in &w {
            for ((g, s), t) in got.iter().zip(&start[k]).zip(&end[k]) {
                let want = s + alpha * (t - s);
                if alpha == 0.0 {
                    // s + 0·(t − s) is s itself.
                    assert_eq!(g.to_bits(), s.to_bits(), "{k} at α = 0");
                }
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{k} α {alpha}: {g} vs {want}"
                );
            }
        }
        let doc: basin_lm::artifacts::Interpolation =
            basin_lm::artifacts::read(&dir.join("interpolation.json")).unwrap();
        assert_eq!(doc.alpha, f64::from(alpha));
        assert!(
            (doc.distance - f64::from(alpha) * norm).abs() < 1e-5 * norm,
            "{} vs {}",
            doc.distance,
            norm
        );
        assert_eq!(doc.end.path, run.join("model").display().to_string());
        // A model directory the other commands open: its tokenizer and config came along.
        assert!(dir.join("tokenizer.json").exists() && dir.join("config.json").exists());
    }
}

#[test]
fn bad_weights_and_unfinished_runs_are_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let run = run_dir(root.path());
    let r = run.to_str().unwrap();
    for bad in ["1.5", "-0.1"] {
        let out = evaluate(&["interpolate", "--run", r, &format!("--alpha={bad}")]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("--alpha {bad}")) && err.contains("[0, 1]"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(run.join("model")).unwrap();
    let out = evaluate(&["interpolate", "--run", r, "--alpha", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has not finished"), "{err}");
    let written: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(written, ["config.toml"], "nothing written");
}
