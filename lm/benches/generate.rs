//! Greedy generation on CPU with the real SmolLM2-135M-Instruct: 8 prompts x 32 new
//! tokens, batched and one prompt at a time, f32. Prints tokens/s and checks that both
//! give the same replies. `just bench` runs it (after `just setup`).

use basin_lm::chat::Conversation;
use basin_lm::fsutil::locate_asset;
use basin_lm::generate::generate;
use basin_lm::model::Model;
use basin_lm::source::TemplateChoice;
use candle_core::{DType, Device};
use std::path::Path;
use std::time::Instant;

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
    "Explain what a hash table is in two sentences.",
    "Write a short poem about rain.",
    "How many legs does a spider have?",
    "Suggest a name for a friendly robot.",
    "What is 17 times 3?",
    "Describe the colour blue to someone who cannot see.",
];
const NEW_TOKENS: usize = 32;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Some(path) = locate_asset(&root, "model/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        println!("generate bench: SKIPPED (SmolLM2 GGUF not fetched; run `just setup`)");
        return Ok(());
    };
    let model = Model::open(&path, DType::F32, &Device::Cpu)?;
    let template = model.text.template(&TemplateChoice::Model, None)?;
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| {
            let conv = Conversation {
                system: None,
                user: p.to_string(),
                assistant: None,
            };
            model.text.tokenizer.encode(&template.render_prompt(&conv)?)
        })
        .collect::<anyhow::Result<_>>()?;
    // No stop token: every row decodes exactly NEW_TOKENS, so the work is fixed.
    let mut opts = model.options(NEW_TOKENS)?;
    opts.stop.clear();
    let rows: Vec<usize> = (0..prompts.len()).collect();

    let t = Instant::now();
    let batched = generate(&model.llama, &prompts, &rows, &opts)?;
    let batched_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut single = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        single.extend(generate(
            &model.llama,
            std::slice::from_ref(p),
            &[i],
            &opts,
        )?);
    }
    let single_s = t.elapsed().as_secs_f64();

    let n = (prompts.len() * NEW_TOKENS) as f64;
    println!("greedy generation, SmolLM2-135M f32, CPU ({} threads), {} prompts x {NEW_TOKENS} new tokens", rayon_threads(), prompts.len());
    println!("| mode | seconds | new tokens/s |");
    println!("| --- | --- | --- |");
    println!("| batch of 8 | {batched_s:.2} | {:.1} |", n / batched_s);
    println!("| one at a time | {single_s:.2} | {:.1} |", n / single_s);
    println!("| PyTorch + transformers, batch 8 (DESIGN.md, same machine kind) | | 61 |");
    let same = batched == single;
    println!(
        "same replies batched and one at a time: {}",
        if same { "yes" } else { "NO" }
    );
    for (p, g) in PROMPTS.iter().zip(&batched) {
        println!(
            "  {p:?} -> {:?}",
            model.text.tokenizer.decode(&g.tokens, true)?
        );
    }
    if !same {
        anyhow::bail!("batched replies differ from one-at-a-time replies");
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
