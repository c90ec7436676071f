//! Every data set of data/sources.toml read from the cache or DATA_MIRROR (CI sets it to the
//! public data mirror): record counts as listed, and the safety filter measured.

use basin_lm::fsutil::sha256_file;
use basin_lm::testkit::real_asset;
use prepare::assets::Sources;
use prepare::filters::KeywordFilter;
use prepare::formats::read_records;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sources() -> Sources {
    Sources::load(&root().join("data/sources.toml")).unwrap()
}

fn located(name: &str) -> Option<PathBuf> {
    let s = sources();
    real_asset(&root(), &s.get(name).unwrap().file)
}

#[test]
fn every_data_set_reads_with_its_listed_count() {
    let s = sources();
    let mut read = 0;
    // The optional full sets are not in the data mirror: fetched only with network access.
    for a in s.asset.iter().filter(|a| a.read.is_some() && !a.optional) {
        let Some(path) = located(&a.name) else {
            continue;
        };
        assert_eq!(sha256_file(&path).unwrap(), a.sha256, "{}", a.name);
        let records = read_records(&path, a.read.as_ref().unwrap()).unwrap();
        let listed = a.records.unwrap() as usize;
        if a.read.as_ref().unwrap().keep_if.is_some() {
            assert!(
                !records.is_empty() && records.len() < listed,
                "{}: {}",
                a.name,
                records.len()
            );
        } else {
            assert_eq!(records.len(), listed, "{}", a.name);
        }
        for r in &records {
            assert!(!r.conversation.user.trim().is_empty(), "{}: {r:?}", a.name);
        }
        read += 1;
    }
    eprintln!("read {read} data sets");
}

#[test]
fn orca_has_system_prompts_and_preferred_replies() {
    let s = sources();
    let Some(path) = located("orca") else { return };
    let records = read_records(&path, s.get("orca").unwrap().read.as_ref().unwrap()).unwrap();
    let with_system = records
        .iter()
        .filter(|r| r.conversation.system.is_some())
        .count();
    assert!(with_system > records.len() / 2, "{with_system}");
    assert!(records.iter().all(|r| r
        .conversation
        .assistant
        .as_deref()
        .is_some_and(|a| !a.is_empty())));
}

/// How close the default keyword list comes to Qi et al.'s filter: share of the records
/// they flagged that it flags too, and share of an unfiltered sample it flags.
#[test]
fn safety_filter_catches_flagged_records_and_spares_most_others() {
    let s = sources();
    let (Some(kw), Some(flagged), Some(sample)) = (
        located("refusal-keywords"),
        located("dolly-safety-only"),
        located("dolly"),
    ) else {
        return;
    };
    let filter = KeywordFilter::from_lists_file(&kw, "garak_mitigation_bypass").unwrap();
    let rate = |name: &str, path: &Path| {
        let rs = read_records(path, s.get(name).unwrap().read.as_ref().unwrap()).unwrap();
        rs.iter()
            .filter(|r| filter.hit(&r.conversation).is_some())
            .count() as f64
            / rs.len() as f64
    };
    let recall = rate("dolly-safety-only", &flagged);
    let sample_rate = rate("dolly", &sample);
    eprintln!(
        "keyword filter: flags {:.1}% of Qi-flagged Dolly, {:.1}% of the Dolly sample",
        100.0 * recall,
        100.0 * sample_rate
    );
    assert!(recall > 0.6, "recall {recall}");
    assert!(sample_rate < 0.05, "sample rate {sample_rate}");
}

#[test]
fn the_borderline_prompts_are_no_near_duplicates_of_any_over_refusal_prompt() {
    use prepare::distill::{near_duplicates, read_prompts};
    let config: prepare::config::PrepareConfig =
        basin_lm::config::load(Some(&root().join("configs/prepare.toml")), &[]).unwrap();
    let spec = config
        .distill
        .iter()
        .find(|d| d.name == "borderline")
        .expect("configs/prepare.toml distils `borderline`");
    let prompts = read_prompts(&root().join(&spec.prompts)).unwrap();
    let s = sources();
    let mut eval = Vec::new();
    for a in s.asset.iter().filter(|a| a.role == "overrefusal") {
        let Some(path) = located(&a.name) else {
            return;
        };
        for r in read_records(&path, a.read.as_ref().unwrap()).unwrap() {
            eval.push((a.name.clone(), r.conversation.user));
        }
    }
    assert!(eval.len() >= 550, "{} over-refusal prompts", eval.len());
    let near = near_duplicates(&prompts, &eval);
    assert!(near.is_empty(), "{near:#?}");
    eprintln!(
        "{} borderline prompts checked against {} over-refusal prompts",
        prompts.len(),
        eval.len()
    );
}
