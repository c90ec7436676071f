//! The evaluation stage: judges of harmful-prompt replies ([`judges`]) and their
//! calibration against human labels ([`calibration`]), the safety scores ([`safety`]), and
//! the report over runs ([`report`], [`plots`]).

pub mod calibration;
pub mod judges;
pub mod landscape;
pub mod model_judge;
pub mod plots;
pub mod report;
pub mod safety;
