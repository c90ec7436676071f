//! The evaluation stage: judges of harmful-prompt replies ([`judges`]) and their
//! calibration against human labels ([`calibration`]).

pub mod calibration;
pub mod judges;
