//! The AdamW step and the EMA blend as CUDA kernels with CPU references (planned; see
//! README, 'Status').
