//! `evaluate`: attack success rate, over-refusal and utility (not built yet).

fn main() {
    eprintln!(
        "evaluate: not implemented yet — the evaluation stage is planned (see README, 'Status')."
    );
    std::process::exit(2);
}
