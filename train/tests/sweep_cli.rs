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
