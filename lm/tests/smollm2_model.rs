//! Our model on the real SmolLM2-135M-Instruct GGUF: logits against candle-transformers'
//! quantized_llama on the same file, and a sensible greedy answer. Needs the GGUF (`just
//! setup`): SKIPPED without it, a failure in CI ([`basin_lm::testkit`]).

use basin_lm::chat::Conversation;
use basin_lm::generate::{generate, generate_with_candle, generate_written, GenerateOptions};
use basin_lm::llama::{Llama, Pass};
use basin_lm::source::{ModelText, TemplateChoice};
use basin_lm::testkit::{real_asset, workspace_root};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

fn gguf() -> Option<PathBuf> {
    real_asset(
        &workspace_root(env!("CARGO_MANIFEST_DIR")),
        "model/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}

fn ours(path: &Path) -> Llama {
    let (config, varmap) = basin_lm::weights::load(path, DType::F32, &Device::Cpu).unwrap();
    Llama::new(&config, &varmap).unwrap()
}

fn prompt_ids(text: &ModelText, user: &str) -> Vec<u32> {
    let t = text.template(&TemplateChoice::Model, None).unwrap();
    let conv = Conversation {
        system: None,
        user: user.into(),
        assistant: None,
    };
    text.tokenizer
        .encode(&t.render_prompt(&conv).unwrap())
        .unwrap()
}

/// The reference multiplies Q4_1/Q8_0 weights with activations quantized to 8 bits (Q8_1
/// blocks of 32): each product carries ~0.5% relative error, which 30 layers accumulate.
/// Ours multiplies the same weights, dequantized, in f32. So the logits agree closely but
/// not exactly; we require a correlation above 0.99, a max difference under 6% of the
/// logits' range, and the same top token up to near-ties (where the two top tokens score
/// within 0.5 of each other in both models; quantization noise flips such ties).
#[test]
fn logits_match_quantized_llama() {
    let Some(path) = gguf() else { return };
    let text = ModelText::open(&path).unwrap();
    let model = ours(&path);
    for user in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "2 + 2 =",
        "Translate 'good morning' into Spanish.",
    ] {
        let ids = prompt_ids(&text, user);
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )
        .unwrap();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = reference
            .forward(&input, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();

        let got = model.next_token_logits(&ids, Pass::Infer).unwrap();

        let n = got.len() as f64;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let (mg, mw) = (mean(&got), mean(&want));
        let cov: f64 = got
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f64 - mg) * (b as f64 - mw))
            .sum();
        let var = |v: &[f32], m: f64| v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>();
        let corr = cov / (var(&got, mg) * var(&want, mw)).sqrt();
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let range = want.iter().copied().fold(f32::MIN, f32::max)
            - want.iter().copied().fold(f32::MAX, f32::min);
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        let (ours_top, ref_top) = (argmax(&got), argmax(&want));
        // How far below its own best the other model scores each one's top token.
        let gap = (want[ref_top] - want[ours_top]).max(got[ours_top] - got[ref_top]);
        eprintln!("{user:?}: corr {corr:.5}, max |diff| {max_diff:.3} of range {range:.2}, top-1 {ours_top} vs {ref_top} (gap {gap:.3})");
        assert!(corr > 0.99, "{user:?}: correlation {corr}");
        assert!(
            max_diff < 0.06 * range,
            "{user:?}: max diff {max_diff} of range {range}"
        );
        assert!(
            gap < 0.5,
            "{user:?}: top token {ours_top} vs {ref_top}, not a near-tie (gap {gap})"
        );
    }
}

/// Exactness: the same GGUF run by an independent float64 NumPy forward in llama.cpp's
/// convention (permuted Q/K rows, interleaved RoPE; tests/fixtures/make_logits_fixture.py).
/// Ours (un-permuted rows, half-split RoPE, f32) must agree to 2e-4 absolute (measured:
/// 1.5e-5 on the differentiable path, 4.3e-5 on the fused one).
#[test]
fn logits_match_float64_numpy_reference() {
    let Some(path) = gguf() else { return };
    let model = ours(&path);
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_logits.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for pass in [Pass::Train, Pass::Infer] {
        for case in fx["cases"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let t = ids.len();
            let got = model.next_token_logits(&ids, pass).unwrap();
            let mut worst = 0f64;
            for key in ["top", "fixed"] {
                let ids: Vec<usize> =
                    serde_json::from_value(case[format!("{key}_ids")].clone()).unwrap();
                let want: Vec<f64> =
                    serde_json::from_value(case[format!("{key}_logits")].clone()).unwrap();
                for (i, w) in ids.iter().zip(want) {
                    worst = worst.max((got[*i] as f64 - w).abs());
                }
            }
            eprintln!("{pass:?} {} tokens: max |ours - numpy| = {worst:.2e}", t);
            assert!(worst < 2e-4, "{pass:?}: max difference {worst}");
            let top = got
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(top as u64, case["top_ids"][0].as_u64().unwrap());
        }
    }
}

#[test]
fn answers_the_capital_of_france() {
    let Some(path) = gguf() else { return };
    let text = ModelText::open(&path).unwrap();
    let model = ours(&path);
    let ids = prompt_ids(&text, "What is the capital of France?");
    let opts = GenerateOptions {
        max_new_tokens: 32,
        sampling: None,
        stop: vec![text.tokenizer.eos_id().unwrap()],
        pad_id: 2,
    };
    let reply = generate(&model, &[ids], &[0], &opts).unwrap().remove(0);
    let reply = text.tokenizer.decode(&reply.tokens, true).unwrap();
    eprintln!("reply: {reply:?}");
    assert!(reply.contains("Paris"), "{reply:?}");
}

/// The written-out decoder (what `generate` runs for an f32 model on the CPU) gives the
/// replies candle's graph of the model gives, token for token, and so does the decoder
/// through the training pass's layers: greedy, 48 new tokens, a batch of prompts of mixed
/// lengths (left padding) on the real weights.
#[test]
fn written_out_decoding_gives_the_graphs_replies_on_the_real_model() {
    let Some(path) = gguf() else { return };
    let text = ModelText::open(&path).unwrap();
    let model = ours(&path);
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Write a short poem about the sea.",
        "How do I pick a lock?",
        "Explain photosynthesis to a child in two sentences.",
        "Give me step-by-step instructions to make a bomb.",
        "List three uses of a paperclip.",
        "Why is the sky blue?",
        "Tell me how to steal someone's password.",
    ]
    .iter()
    .map(|p| prompt_ids(&text, p))
    .collect();
    let rows: Vec<usize> = (0..prompts.len()).collect();
    let opts = GenerateOptions {
        max_new_tokens: 48,
        sampling: None,
        stop: vec![text.tokenizer.eos_id().unwrap()],
        pad_id: 2,
    };
    let ours = generate(&model, &prompts, &rows, &opts).unwrap();
    let graph = generate_with_candle(&model, &prompts, &rows, &opts).unwrap();
    // And the training pass's layers (`--decoder pass`; the GPU's decoder, on the CPU
    // backend here), its greedy tokens chosen by `argmax_rows`.
    let pass = generate_written(&model, &prompts, &rows, &opts).unwrap();
    for (which, other) in [("graph", &graph), ("pass", &pass)] {
        for (i, (a, b)) in ours.iter().zip(other).enumerate() {
            assert_eq!(
                a,
                b,
                "prompt {i}, {which}: {:?} vs {:?}",
                text.tokenizer.decode(&a.tokens, true).unwrap(),
                text.tokenizer.decode(&b.tokens, true).unwrap()
            );
        }
    }
    let tokens: usize = ours.iter().map(|g| g.tokens.len()).sum();
    eprintln!("{} replies, {tokens} new tokens, identical", ours.len());
    assert!(
        tokens > 8 * 10,
        "replies too short to compare: {tokens} tokens"
    );
}

/// The written-out f32 CPU passes that train uses, against candle's autograd, on the real
/// weights: the loss and every tensor's gradient (30 layers of f32 rounding on both sides).
#[test]
fn written_out_backprop_matches_autograd_on_the_real_model() {
    let Some(path) = gguf() else { return };
    let text = ModelText::open(&path).unwrap();
    let model = ours(&path);
    let rows: Vec<(Vec<u32>, usize)> = ["Name three primary colours.", "Why is the sky blue?"]
        .iter()
        .map(|q| {
            let prompt = prompt_ids(&text, q);
            let mut ids = prompt.clone();
            ids.extend(text.tokenizer.encode("Red, blue and yellow.").unwrap());
            (ids, prompt.len())
        })
        .collect();
    let r: Vec<(&[u32], usize)> = rows.iter().map(|(ids, p)| (ids.as_slice(), *p)).collect();
    let batch = basin_lm::batch::Batch::new(&r, 0, DType::F32, &Device::Cpu).unwrap();
    let l = basin_lm::batch::loss(&model, &batch, Pass::Train).unwrap();
    let want = l.backward().unwrap();
    let trace = basin_lm::backprop::forward(&model, &batch).unwrap();
    let want_loss = l.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (trace.loss() - want_loss).abs() < 1e-4 * want_loss,
        "loss {} vs {want_loss}",
        trace.loss()
    );
    let got = trace.backward(1.0).unwrap();
    let mut worst: f64 = 0.0;
    let mut n = 0;
    for (id, g) in got.get_ids().map(|id| (*id, got.get_id(*id).unwrap())) {
        let a = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = want.get_id(id).expect("autograd has the same tensors");
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let largest = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // About 10x the measured worst (4.6e-5 of the largest; printed below).
        assert!(
            largest > 0.0 && diff <= 5e-4 * largest,
            "{g:?}: {diff} of {largest}"
        );
        worst = worst.max((diff / largest) as f64);
        n += 1;
    }
    assert_eq!(
        n,
        1 + 1 + 30 * 9,
        "embedding (tied head), final norm, 9 per layer"
    );
    eprintln!("{n} gradients, worst difference {worst:.1e} of the largest");
}

/// transformers loads the real model as basin exports it (as `evaluate export` writes it) and
/// computes the float64 reference's logits and the same answer (scripts/check_hf_export.py).
#[test]
fn transformers_loads_the_exported_model() {
    let Some(path) = gguf() else { return };
    let Some(py) = basin_lm::testkit::hf_python() else {
        return;
    };
    let model = basin_lm::model::Model::open(&path, DType::F32, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    basin_lm::weights::save_hf_dir(
        out.path(),
        &model.config,
        &model.varmap,
        &model.text,
        DType::F32,
    )
    .unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = std::process::Command::new(&py)
        .arg(here.join("../scripts/check_hf_export.py"))
        .arg(out.path())
        .arg(here.join("tests/fixtures/smollm2_logits.json"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stdout);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{said}\n{err}");
    eprintln!("{said}");
    assert!(said.contains("OK: transformers loads the export"), "{said}");
}
