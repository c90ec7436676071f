//! `evaluate landscape` as a user runs it, on tiny random models and prepared sets
//! written here: the line between two models, random 2-D slices, and clear errors.

mod common;
use basin_lm::schema::{write_parquet, PreparedRow};
use candle_core::{DType, Device};
use common::{evaluate, prepared_row, tiny_model_dir, write_tiny_model};
use std::path::Path;

/// u: benign rows with replies (val), s: refusals (val and train), h: harmful prompts.
fn prepared() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let with_reply = |set: &str, base: u32| -> Vec<PreparedRow> {
        (0..6)
            .map(|i| {
                let split = if i < 4 { "val" } else { "train" };
                let ids = vec![1, base + i as u32, 41, base + 7, 60, 2];
                prepared_row(set, i, split, ids, 2, None)
            })
            .collect()
    };
    write_parquet(&dir.path().join("u.parquet"), &with_reply("u", 70)).unwrap();
    write_parquet(&dir.path().join("s.parquet"), &with_reply("s", 120)).unwrap();
    let harmful: Vec<PreparedRow> = (0..3)
        .map(|i| prepared_row("h", i, "eval", vec![1, 50 + i as u32, 2, 1], 4, None))
        .collect();
    write_parquet(&dir.path().join("h.parquet"), &harmful).unwrap();
    dir
}

fn landscape(prepared: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "landscape",
        "--prepared",
        prepared.to_str().unwrap(),
        "--utility-set",
        "u",
        "--safety-set",
        "s",
        "--asr-set",
        "h",
        "--max-new-tokens",
        "3",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    evaluate(&args)
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CSV's rows as (a, b, utility, safety, asr_keyword).
fn rows(dir: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("landscape.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "a,b,utility_loss,safety_loss,asr_keyword,asr_calibrated"
    );
    lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// Both losses of a model as `evaluate landscape` defines them (the val rows of u and s).
fn losses(model: &Path, prepared: &Path) -> (f64, f64) {
    let m = basin_lm::model::Model::open(model, DType::F32, &Device::Cpu).unwrap();
    let loss = |set: &str| {
        let rows =
            basin_lm::schema::read_parquet(&prepared.join(format!("{set}.parquet"))).unwrap();
        let val: Vec<(&[u32], usize)> = rows
            .iter()
            .filter(|r| r.split == "val")
            .map(|r| r.example())
            .collect();
        basin_lm::batch::mean_loss(&m.llama, &val, 8, 0).unwrap().0
    };
    (loss("u"), loss("s"))
}

fn num(s: &str) -> f64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

#[test]
fn the_line_between_two_models_meets_both_at_its_ends() {
    let (a, b, data, out) = (
        tiny_model_dir(1),
        tiny_model_dir(2),
        prepared(),
        tempfile::tempdir().unwrap(),
    );
    let dest = out.path().join("line");
    let run = landscape(
        data.path(),
        &dest,
        &[
            "--from",
            a.path().to_str().unwrap(),
            "--to",
            b.path().to_str().unwrap(),
            "--points",
            "5",
            "--asr-points",
            "3",
        ],
    );
    ok(&run);
    let rows = rows(&dest);
    let alphas: Vec<f64> = rows.iter().map(|r| num(&r[0])).collect();
    assert_eq!(alphas, vec![-0.5, 0.0, 0.5, 1.0, 1.5]);
    // α = 0 is A and α = 1 is B: the kernel's lerp reproduces both models' losses.
    for (i, model) in [(1, a.path()), (3, b.path())] {
        let (u, s) = losses(model, data.path());
        assert!((num(&rows[i][2]) - u).abs() < 1e-5, "utility at {i}: {u}");
        assert!((num(&rows[i][3]) - s).abs() < 1e-5, "safety at {i}: {s}");
    }
    // Half-way is neither model.
    assert!((num(&rows[2][2]) - num(&rows[1][2])).abs() > 1e-4);
    // ASR where asked for (3 of 5 points, both ends included) and nowhere else.
    let asr: Vec<bool> = rows.iter().map(|r| !r[4].is_empty()).collect();
    assert_eq!(asr, vec![true, false, true, false, true]);
    for r in rows.iter().filter(|r| !r[4].is_empty()) {
        assert!((0.0..=1.0).contains(&num(&r[4])) && (0.0..=1.0).contains(&num(&r[5])));
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dest.join("landscape.json")).unwrap())
            .unwrap();
    assert_eq!(doc["kind"], "interpolation");
    for which in ["utility", "safety"] {
        let basin = &doc["basins"][which];
        let (lo, at, hi) = (
            basin["lo"].as_f64().unwrap(),
            basin["argmin"].as_f64().unwrap(),
            basin["hi"].as_f64().unwrap(),
        );
        assert!(lo <= at && at <= hi, "{which}: {basin}");
        let min = rows
            .iter()
            .map(|r| num(&r[if which == "utility" { 2 } else { 3 }]))
            .fold(f64::INFINITY, f64::min);
        assert!((basin["min"].as_f64().unwrap() - min).abs() < 1e-5);
    }
    assert_eq!(doc["sets"]["utility"]["rows"], 4, "the val rows only");
    assert_eq!(doc["from"]["sha256"].as_str().unwrap().len(), 64);
    // --replot: the basins again at another threshold, from the saved points alone.
    let csv_before = std::fs::read_to_string(dest.join("landscape.csv")).unwrap();
    let width = |doc: &serde_json::Value| doc["basins"]["utility"]["width"].as_f64().unwrap();
    ok(&evaluate(&[
        "landscape",
        "--replot",
        dest.to_str().unwrap(),
        "--basin-pct",
        "400",
    ]));
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dest.join("landscape.json")).unwrap())
            .unwrap();
    assert_eq!(again["basin_pct"], 400.0);
    assert!(
        width(&again) >= width(&doc) && width(&again) > 0.0,
        "{again}"
    );
    assert_eq!(again["points"], doc["points"]);
    assert_eq!(again["from"], doc["from"]);
    assert_eq!(
        std::fs::read_to_string(dest.join("landscape.csv")).unwrap(),
        csv_before
    );
    if evaluate::plots::load_font().is_some() {
        for stem in ["losses", "relative", "asr"] {
            for ext in ["svg", "png"] {
                assert!(dest.join(format!("{stem}.{ext}")).is_file(), "{stem}.{ext}");
            }
        }
    }
}

#[test]
fn random_planes_are_seeded_and_centred_on_the_model() {
    let (a, data, out) = (tiny_model_dir(3), prepared(), tempfile::tempdir().unwrap());
    let run = |seed: &str, name: &str| {
        let dest = out.path().join(name);
        ok(&landscape(
            data.path(),
            &dest,
            &[
                "--from",
                a.path().to_str().unwrap(),
                "--directions",
                "2",
                "--points",
                "3",
                "--span",
                "0.2",
                "--seed",
                seed,
            ],
        ));
        dest
    };
    let (first, again, other) = (run("0", "p0"), run("0", "p0b"), run("1", "p1"));
    let grid = rows(&first);
    assert_eq!(grid.len(), 9);
    let centre = &grid[4];
    assert_eq!((num(&centre[0]), num(&centre[1])), (0.0, 0.0));
    let (u, s) = losses(a.path(), data.path());
    assert!((num(&centre[2]) - u).abs() < 1e-5 && (num(&centre[3]) - s).abs() < 1e-5);
    assert!(grid.iter().all(|r| r[4].is_empty()), "no ASR on a plane");
    assert_eq!(rows(&again), grid, "same seed, same plane");
    assert_ne!(rows(&other), grid, "another seed, another plane");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("landscape.json")).unwrap())
            .unwrap();
    assert_eq!(doc["kind"], "random-2d");
    assert!(doc["basins"]["safety"]["cells"].as_u64().unwrap() >= 1);
    if evaluate::plots::load_font().is_some() {
        assert!(first.join("utility-contour.png").is_file());
        assert!(first.join("safety-contour.svg").is_file());
    }
}

#[test]
fn bad_arguments_are_clear_errors_and_write_nothing() {
    let (a, data, out) = (tiny_model_dir(4), prepared(), tempfile::tempdir().unwrap());
    // A model of another shape.
    let other = tempfile::tempdir().unwrap();
    write_tiny_model(other.path(), 5);
    let mut config = basin_lm::tiny::tiny_config();
    config.intermediate_size = 48;
    let varmap = basin_lm::llama::random_weights(&config, 5, DType::F32, &Device::Cpu).unwrap();
    let text = basin_lm::source::ModelText::open(other.path()).unwrap();
    basin_lm::weights::save_hf_dir(other.path(), &config, &varmap, &text, DType::F32).unwrap();
    let from = a.path().to_str().unwrap();
    let dest = out.path().join("x");
    for (extra, want) in [
        (
            vec!["--from", from, "--to", other.path().to_str().unwrap()],
            "shape",
        ),
        (vec!["--from", from, "--directions", "3"], "expected 1 or 2"),
        (vec!["--from", from, "--points", "1"], "at least 2 points"),
        (
            vec!["--from", from, "--alpha-min", "1", "--alpha-max", "0"],
            "is empty",
        ),
        (
            vec!["--from", from, "--dtype", "bf16", "--decoder", "cpu"],
            "--decoder cpu decodes an f32 model on the CPU",
        ),
    ] {
        let run = landscape(data.path(), &dest, &extra);
        assert_eq!(run.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!dest.exists(), "{extra:?} wrote {}", dest.display());
    }
    // A set prepare has not written.
    let run = evaluate(&[
        "landscape",
        "--from",
        from,
        "--prepared",
        data.path().to_str().unwrap(),
        "--utility-set",
        "nope",
        "--out",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("nope.parquet"));
    assert!(!dest.exists());
}
