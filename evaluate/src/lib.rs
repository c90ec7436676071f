//! The evaluation stage: judges of harmful-prompt replies ([`judges`]) and their
//! calibration against human labels ([`calibration`]), the safety scores ([`safety`]), the
//! report over runs ([`report`], [`plots`]) and what it says of the paper's claims
//! ([`claims`]), the loss landscapes ([`landscape`]), a model
//! judge ([`model_judge`]); and the `evaluate` commands built on them ([`commands`]), each
//! `run(&Args) -> Result<Summary>`.

pub mod calibration;
pub mod claims;
pub mod commands;
pub mod degenerate;
pub mod endpoint;
pub mod judges;
pub mod landscape;
pub mod model_judge;
pub mod plots;
pub mod report;
pub mod safety;

/// A progress bar of `len` steps in evaluate's style (the message first; the caller sets
/// it): replies of a model, answers of an endpoint.
pub(crate) fn progress_bar(len: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}
