//! `train`: full fine-tuning with AdamW and the parameter-space EMA (not built yet).

fn main() {
    eprintln!("train: not implemented yet — the training stage is planned (see README, 'Status').");
    std::process::exit(2);
}
