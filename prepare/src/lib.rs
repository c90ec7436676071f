//! The prepare stage: fetch the data assets, read them into conversations, render them
//! with the model's chat template, tokenize, and write Parquet (schema: basin_lm::schema).

pub mod assets;
pub mod config;
pub mod distill;
pub mod filters;
pub mod formats;
pub mod pipeline;

/// A progress bar on stderr, or a hidden one (tests, `--quiet`, no terminal).
pub fn progress_bar(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>24} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
