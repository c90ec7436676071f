//! The evaluation stage: judges of harmful-prompt replies ([`judges`]) and their
//! calibration against human labels ([`calibration`]), and the safety scores ([`safety`]).

pub mod calibration;
pub mod judges;
pub mod model_judge;
pub mod safety;
