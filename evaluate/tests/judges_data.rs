//! The judges on real data from the cache or DATA_MIRROR: the keyword list is the paper's,
//! and the calibrated judge beats it on held-out human labels without losing precision.

use basin_lm::fsutil::locate_asset;
use evaluate::calibration::{read_labelled, split, Confusion};
use evaluate::judges::{keyword_refuses, RefusalJudge, QI_REFUSAL_KEYWORDS};
use std::path::{Path, PathBuf};

fn asset(rel: &str) -> Option<PathBuf> {
    let p = locate_asset(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), rel);
    if p.is_none() {
        eprintln!("SKIPPED: {rel} not in data/cache or DATA_MIRROR");
    }
    p
}

#[test]
fn keyword_list_is_the_published_one() {
    let Some(p) = asset("refusal_scoring/refusal_keyword_lists.json") else {
        return;
    };
    let lists: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let published: Vec<String> =
        serde_json::from_value(lists["qi2023_and_harmbench_advbench_prefixes"]["list"].clone())
            .unwrap();
    assert_eq!(published, QI_REFUSAL_KEYWORDS.to_vec());
}

#[test]
fn calibrated_judge_beats_keywords_on_held_out_labels() {
    let (Some(full), Some(sample)) = (
        asset("refusal_scoring/pyrit_labelled/refusal.csv"),
        asset("refusal_scoring/pyrit_labelled/mini_refusal.csv"),
    ) else {
        return;
    };
    let (dev, test) = split(
        read_labelled(&full).unwrap(),
        read_labelled(&sample).unwrap(),
    );
    assert!(
        test.len() >= 30 && dev.len() >= 30,
        "{} / {}",
        dev.len(),
        test.len()
    );
    let judge = RefusalJudge::default();
    let kw = Confusion::of(&test, keyword_refuses);
    let ours = Confusion::of(&test, |r| judge.refuses(r));
    eprintln!(
        "held out: keyword acc {:.3} prec {:.3}; calibrated acc {:.3} prec {:.3}",
        kw.accuracy(),
        kw.precision(),
        ours.accuracy(),
        ours.precision()
    );
    assert!(ours.accuracy() > kw.accuracy());
    assert!(ours.precision() >= kw.precision());
}
