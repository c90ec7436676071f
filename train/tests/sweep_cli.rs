//! `sweep` as the justfile runs it: `ALIGNED_MODEL` empty means "none" (the justfile's
//! default), set means stage 0 is skipped; `--list` shows each step and whether it is done.

use std::path::Path;
use std::process::Command;

fn sweep_dir(dir: &Path) -> std::path::PathBuf {
    let runs = dir.join("runs").display().to_string();
    std::fs::write(
        dir.join("align.toml"),
        format!("name = \"align\"\nout_dir = {runs:?}\n"),
    )
    .unwrap();
    std::fs::write(dir.join("smoke.toml"), format!("out_dir = {runs:?}\n")).unwrap();
    let sweep = dir.join("s.toml");
    std::fs::write(
        &sweep,
        format!(
            "name = \"s\"\ntrain_config = {:?}\n[[point]]\nlabel = \"a\"\n[stage0]\ntrain_config = {:?}\n",
            dir.join("smoke.toml").display().to_string(),
            dir.join("align.toml").display().to_string()
        ),
    )
    .unwrap();
    sweep
}

fn list(sweep: &Path, aligned: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sweep"))
        .args(["--config"])
        .arg(sweep)
        .arg("--list")
        .env("ALIGNED_MODEL", aligned)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_empty_aligned_model_runs_stage0_and_a_set_one_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_dir(dir.path());
    let (ok, stdout, stderr) = list(&sweep, "");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("todo\tstage 0: train"), "{stdout}");
    assert!(stdout.contains("todo\ts-a: train"), "{stdout}");
    let mine = dir.path().join("mine.gguf");
    std::fs::write(&mine, "").unwrap();
    let (ok, stdout, stderr) = list(&sweep, mine.to_str().unwrap());
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("stage 0"), "{stdout}");
    assert!(stderr.contains("stage 0 skipped"), "{stderr}");
    assert!(
        stdout.contains(&format!("model={}", mine.display())),
        "{stdout}"
    );
}

/// A sweep whose point fails goes on with the others: the failed point is named on stderr
/// and in the report's note, the sweep exits non-zero, and the good point is reported.
#[test]
fn a_failing_point_is_recorded_and_the_others_go_on() {
    let sweep_exe = Path::new(env!("CARGO_BIN_EXE_sweep"));
    if !sweep_exe.with_file_name("evaluate").exists() {
        basin_lm::testkit::skipped(
            "the evaluate binary is not built next to sweep (`cargo test --workspace` builds it)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    basin_lm::tiny::write_tiny_model(&root.join("model"), &basin_lm::tiny::tiny_config(), 3)
        .unwrap();
    let rows = basin_lm::testkit::tiny_training_rows(&root.join("model"), 24).unwrap();
    basin_lm::schema::write_parquet(&root.join("data.parquet"), &rows).unwrap();
    // A harmful set to evaluate on: the rows' prompts.
    let prepared = root.join("prepared");
    std::fs::create_dir_all(&prepared).unwrap();
    let harm: Vec<_> = rows
        .iter()
        .take(3)
        .map(|r| basin_lm::schema::PreparedRow {
            split: "eval".into(),
            assistant: None,
            input_ids: r.input_ids[..r.prompt_len as usize].to_vec(),
            ..r.clone()
        })
        .collect();
    basin_lm::schema::write_parquet(&prepared.join("advbench.parquet"), &harm).unwrap();
    basin_lm::testkit::write_manifest(&prepared, &[("advbench", "harmful")]).unwrap();
    std::fs::write(
        root.join("smoke.toml"),
        "model = \"model\"\ndata = [\"data.parquet\"]\nbatch_size = 4\nmicro_batch = 2\nsteps = 2\nlr = 1e-3\n",
    )
    .unwrap();
    std::fs::write(
        root.join("s.toml"),
        r#"name = "s"
train_config = "smoke.toml"
[[point]]
label = "good"
[[point]]
label = "bad"
set = ["lr=1e30", "grad_clip=0.0"]
[evaluate]
safety = ["--prepared", "prepared", "--sets", "advbench", "--max-new-tokens", "4"]
"#,
    )
    .unwrap();
    let out = Command::new(sweep_exe)
        .args(["--config", "s.toml"])
        .current_dir(root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("s-bad: FAILED, going on with the other points")
            && err.contains("1 of 2 points failed (s-bad)"),
        "{err}"
    );
    let md = std::fs::read_to_string(root.join("reports/s/summary.md")).unwrap();
    assert!(md.contains("| θ |"), "the good point is reported: {md}");
    assert!(
        md.contains("**s-bad** is missing: failed: s-bad: train failed"),
        "the report marks the failed point: {md}"
    );
    assert!(root.join("runs/s-good/eval/model/scores.json").exists());
    assert!(
        !root.join("runs/s-good/lock").exists(),
        "no lock left behind"
    );
    // Again as it was: the good point is done. With another [evaluate]: it is evaluated
    // again (not trained again), and its scores say how they were made.
    let again = |config: &str| {
        std::fs::write(root.join("s.toml"), config).unwrap();
        let out = Command::new(sweep_exe)
            .args(["--config", "s.toml"])
            .current_dir(root)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let config = std::fs::read_to_string(root.join("s.toml")).unwrap();
    let err = again(&config);
    assert!(err.contains("s-good: done already, skipped"), "{err}");
    let err = again(&config.replace("\"--max-new-tokens\", \"4\"", "\"--max-new-tokens\", \"5\""));
    assert!(
        err.contains("s-good: evaluate safety") && !err.contains("s-good: train"),
        "{err}"
    );
    let kept: basin_lm::artifacts::Scores =
        basin_lm::artifacts::read(&root.join("runs/s-good/eval/model/scores.json")).unwrap();
    assert_eq!(kept.decoding.max_new_tokens, 5);
    let args =
        std::fs::read_to_string(root.join("runs/s-good/eval/model/scores.args.json")).unwrap();
    assert!(args.contains("\"5\""), "{args}");
}

/// The shipped sweeps resolve as the justfile runs them (from the repository root): every
/// point's config validates, and each has its snapshots' and WiSE-FT's steps.
#[test]
fn the_shipped_sweeps_list_their_baselines_and_trajectories() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let steps = |config: &str| -> Vec<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_sweep"))
            .current_dir(root)
            .args(["--config", config, "--list"])
            .env("ALIGNED_MODEL", "")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{config}: {stderr}");
        // index, state, what, command: the what.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').nth(2).unwrap_or_default().to_string())
            .collect()
    };
    let all = steps("configs/all.toml");
    for want in [
        "all-aggressive: train",
        "all-aggressive step 6: evaluate safety",
        "all-aggressive-mixed: interpolate (WiSE-FT)",
        "all-tuned WiSE-FT α=0.5: evaluate safety",
    ] {
        assert!(all.iter().any(|s| s == want), "{want} not in {all:#?}");
    }
    let paper = steps("configs/paper.toml");
    let trained = paper.iter().filter(|s| s.ends_with(": train")).count();
    assert_eq!(trained, 1 + 108 + 3, "stage 0, the grid, the mixed points");
    let wise = paper
        .iter()
        .filter(|s| s.contains("WiSE-FT α=0.75: evaluate safety"))
        .count();
    assert_eq!(wise, 111);
    let snapshots = paper
        .iter()
        .filter(|s| s.contains(" step 100: evaluate safety"))
        .count();
    assert_eq!(snapshots, 111);
}

/// configs/paper-7b.toml: two runs of Llama-2-7B-chat in pure bf16; `sweep --plan` on the
/// model's shape shows each fitting a 141 GiB card, and the same runs with f32 state not.
#[test]
fn the_7b_sweep_plans_to_fit_a_141_gib_card_in_pure_bf16() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let plan = |extra: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_sweep"))
            .current_dir(root)
            .args([
                "--config",
                "configs/paper-7b.toml",
                "--plan",
                "--memory-gib",
                "141",
            ])
            .args(["--set", "model=configs/models/llama-2-7b-chat.json"])
            .args(extra)
            .env("ALIGNED_MODEL", "")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let pure = plan(&[]);
    assert_eq!(pure.matches("fits: yes").count(), 2, "{pure}");
    for part in [
        "θ's low half (bf16",
        "AdamW m (bf16)",
        "EMA θ̄ (bf16 pair)",
        "in host memory",
    ] {
        assert!(pure.contains(part), "{part}: {pure}");
    }
    let f32_state = plan(&[
        "--set",
        "state.weights=f32",
        "--set",
        "state.moments=f32",
        "--set",
        "state.ema=f32",
        "--set",
        "state.theta0=device",
    ]);
    assert_eq!(f32_state.matches("fits: no").count(), 2, "{f32_state}");
}
