//! The model on the tiny config: gradients against finite differences, the fused inference
//! path against the differentiable one, KV-cache decoding, batching, save/load.

use basin_lm::backprop;
use basin_lm::batch::{loss, Batch};
use basin_lm::decode::{Decoder, HeldModel};
use basin_lm::generate::{
    generate, generate_by, generate_with_candle, generate_written, DecoderKind, GenerateOptions,
    Sampling,
};
use basin_lm::llama::{attention_bias, KvCache};
use basin_lm::llama::{random_weights, Llama, ModelConfig, Pass};
use basin_lm::tiny::tiny_config;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

fn model(config: &ModelConfig, seed: u64, dtype: DType) -> (Llama, VarMap) {
    let varmap = random_weights(config, seed, dtype, &Device::Cpu).unwrap();
    (Llama::new(config, &varmap).unwrap(), varmap)
}

fn rows() -> Vec<(Vec<u32>, usize)> {
    vec![
        (vec![1, 40, 41, 42, 43, 44, 2], 3),
        (vec![1, 50, 51, 52, 2], 2),
        (vec![1, 60, 61, 62, 63, 64, 65, 66, 2], 5),
    ]
}

fn batch(rows: &[(Vec<u32>, usize)], dtype: DType) -> Batch {
    let r: Vec<(&[u32], usize)> = rows.iter().map(|(ids, p)| (ids.as_slice(), *p)).collect();
    Batch::new(&r, 0, dtype, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Central differences in f64 on a few coordinates of every weight tensor.
fn check_gradients(config: &ModelConfig) {
    let (m, varmap) = model(config, 3, DType::F64);
    let b = batch(&rows(), DType::F64);
    let grads = loss(&m, &b, Pass::Train).unwrap().backward().unwrap();
    let vars: Vec<(String, Var)> = {
        let data = varmap.data().lock().unwrap();
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.as_tensor().shape().clone();
        for &i in &[0, orig.len() / 3, orig.len() - 1] {
            let at = |delta: f64| {
                let mut w = orig.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                scalar(&loss(&m, &b, Pass::Train).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(orig.clone(), shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-4));
            assert!(
                err < 1e-4,
                "{name}[{i}]: autograd {} vs finite difference {fd}",
                g[i]
            );
            worst = worst.max(err);
        }
    }
    eprintln!(
        "{} tensors checked, worst relative error {worst:.2e}",
        vars.len()
    );
}

#[test]
fn gradients_match_finite_differences_tied() {
    check_gradients(&tiny_config());
}

#[test]
fn gradients_match_finite_differences_untied() {
    check_gradients(&ModelConfig {
        tie_word_embeddings: false,
        ..tiny_config()
    });
}

/// Every weight's gradient, by name, as f64.
fn all_gradients(dtype: DType) -> Vec<(String, Vec<f64>)> {
    let (m, varmap) = model(&tiny_config(), 3, dtype);
    let grads = loss(&m, &batch(&rows(), dtype), Pass::Train)
        .unwrap()
        .backward()
        .unwrap();
    let data = varmap.data().lock().unwrap();
    let mut out: Vec<(String, Vec<f64>)> = data
        .iter()
        .map(|(k, v)| {
            let g = grads.get(v.as_tensor()).unwrap();
            let g = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            (k.clone(), g.to_vec1::<f64>().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// About 10x the measured error (7.7e-7; the test prints it).
const TOL_F32_AUTOGRAD: f64 = 1e-5;

#[test]
fn f32_autograd_pass_with_fused_softmax_and_cross_entropy_has_the_f64_gradients() {
    // The autograd pass (a GPU's, and the real-model test's reference) in f32 runs the fused
    // attention softmax and cross-entropy; f64 runs candle's ops, whose gradients the
    // finite-difference tests check.
    let (fused, plain) = (all_gradients(DType::F32), all_gradients(DType::F64));
    let mut worst = 0f64;
    for ((name, a), (_, b)) in fused.iter().zip(&plain) {
        let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
        assert!(
            diff / scale < TOL_F32_AUTOGRAD,
            "{name}: max difference {diff} (largest |g| {scale})"
        );
    }
    eprintln!("f32 fused autograd vs f64: worst {worst:.1e} of the largest gradient (tolerance {TOL_F32_AUTOGRAD:.0e})");
}

/// The written-out f32 CPU passes against candle's autograd of the f64 model (its plain
/// ops, checked by the finite-difference tests): the loss and every weight's gradient.
fn check_written_out_backprop(config: &ModelConfig) {
    let scale = 0.5;
    let (m64, vars64) = model(config, 5, DType::F64);
    let l64 = loss(&m64, &batch(&rows(), DType::F64), Pass::Train).unwrap();
    let want = l64.affine(scale, 0.0).unwrap().backward().unwrap();
    let (m32, vars32) = model(config, 5, DType::F32);
    assert!(backprop::supports(&m32) && !backprop::supports(&m64));
    let trace = backprop::forward(&m32, &batch(&rows(), DType::F32)).unwrap();
    let (want_loss, got_loss) = (scalar(&l64), trace.loss());
    assert!(
        (got_loss - want_loss).abs() < 1e-5 * want_loss,
        "loss {got_loss} vs {want_loss}"
    );
    let got = trace.backward(scale).unwrap();
    let (d64, d32) = (vars64.data().lock().unwrap(), vars32.data().lock().unwrap());
    assert_eq!(d64.len(), d32.len());
    let mut worst: f64 = 0.0;
    for (name, v64) in d64.iter() {
        let flat = |t: &Tensor| -> Vec<f64> {
            let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            t.to_vec1::<f64>().unwrap()
        };
        let b = flat(want.get(v64.as_tensor()).unwrap());
        let a = flat(
            got.get(d32[name].as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}")),
        );
        let largest = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(largest > 0.0, "{name}: the f64 gradient is all zeros");
        assert!(
            diff <= 1e-5 * largest,
            "{name}: max difference {diff} (largest |g| {largest})"
        );
        worst = worst.max(diff / largest);
    }
    eprintln!(
        "{} gradients, worst difference {worst:.1e} of the largest",
        d64.len()
    );
}

/// Activation recompute keeps each layer's input only and redoes the layer in the backward:
/// the same loss and every gradient the same, bit for bit.
#[test]
fn recompute_gives_the_same_gradients_bit_for_bit() {
    let (m, vars) = model(&tiny_config(), 5, DType::F32);
    let b = batch(&rows(), DType::F32);
    let (full, again) = (
        backprop::forward(&m, &b).unwrap(),
        backprop::forward_with(&m, &b, true).unwrap(),
    );
    assert_eq!(full.loss().to_bits(), again.loss().to_bits());
    let (g1, g2) = (full.backward(0.5).unwrap(), again.backward(0.5).unwrap());
    let data = vars.data().lock().unwrap();
    for (name, v) in data.iter() {
        let flat = |g: &candle_core::backprop::GradStore| -> Vec<u32> {
            let t = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(flat(&g1), flat(&g2), "{name}");
    }
    // The written-out route (where recompute lives) refuses a model it cannot run.
    let (m64, _) = model(&tiny_config(), 5, DType::F64);
    let route = backprop::Route::Written { recompute: true };
    let Err(err) = backprop::loss_and_grads(&m64, &batch(&rows(), DType::F64), 1.0, route) else {
        panic!("an f64 model on the written-out route should be refused")
    };
    assert!(err.to_string().contains("runs f32 models"), "{err}");
}

#[test]
fn written_out_cpu_backprop_has_autograds_loss_and_gradients_tied() {
    check_written_out_backprop(&tiny_config());
}

#[test]
fn written_out_cpu_backprop_has_autograds_loss_and_gradients_untied() {
    // One key/value head for all four query heads, the other extreme of grouped queries.
    check_written_out_backprop(&ModelConfig {
        tie_word_embeddings: false,
        num_key_value_heads: 1,
        ..tiny_config()
    });
}

#[test]
fn written_out_backprop_refuses_what_it_cannot_run() {
    let (m32, _) = model(&tiny_config(), 1, DType::F32);
    let vocab = tiny_config().vocab_size as u32;
    let bad = batch(&[(vec![1, 2, vocab, 3], 1)], DType::F32);
    let err = backprop::forward(&m32, &bad)
        .err()
        .expect("an id past the vocabulary");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let (m64, _) = model(&tiny_config(), 1, DType::F64);
    let err = backprop::forward(&m64, &batch(&rows(), DType::F64)).err();
    assert!(err
        .expect("f64 is autograd's")
        .to_string()
        .contains("runs f32 models on the CPU"));
}

#[test]
fn padding_does_not_change_a_rows_loss() {
    let (m, _) = model(&tiny_config(), 1, DType::F32);
    let all = rows();
    // Loss of row 1 alone vs the loss over a batch where only row 1 counts.
    let alone = scalar(&loss(&m, &batch(&all[1..2], DType::F32), Pass::Train).unwrap());
    let mut masked = all.clone();
    masked[0].1 = masked[0].0.len();
    masked[2].1 = masked[2].0.len();
    let together = scalar(&loss(&m, &batch(&masked, DType::F32), Pass::Train).unwrap());
    assert!((alone - together).abs() < 1e-5, "{alone} vs {together}");
}

#[test]
fn loss_is_the_mean_reply_token_nll_over_every_positions_logits() {
    // The loss projects only reply positions; here every position's logits are computed
    // and the reply ones picked by hand, from the rows themselves.
    let (m, _) = model(&tiny_config(), 4, DType::F64);
    let rows = rows();
    let b = batch(&rows, DType::F64);
    let hidden = m
        .hidden(&b.ids, &b.positions, &b.bias, None, Pass::Train)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&m.logits(&hidden, Pass::Train).unwrap(), 2)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for (r, (ids, prompt_len)) in rows.iter().enumerate() {
        for i in (*prompt_len).max(1)..ids.len() {
            sum -= logp[r][i - 1][ids[i] as usize];
            n += 1;
        }
    }
    assert_eq!(n, b.n_loss_tokens);
    let want = sum / n as f64;
    let got = scalar(&loss(&m, &b, Pass::Train).unwrap());
    assert!((got - want).abs() < 1e-9, "f64: {got} vs {want}");
    // f32 goes through the fused kernels (and inference's): the same to f32 precision.
    let (m32, _) = model(&tiny_config(), 4, DType::F32);
    for pass in [Pass::Train, Pass::Infer] {
        let got = scalar(&loss(&m32, &batch(&rows, DType::F32), pass).unwrap());
        assert!((got - want).abs() < 1e-4, "f32 {pass:?}: {got} vs {want}");
    }
}

#[test]
fn fused_inference_path_matches_differentiable_path() {
    for dtype in [DType::F32, DType::BF16] {
        let (m, _) = model(&tiny_config(), 2, dtype);
        let b = batch(&rows(), dtype);
        let train = m
            .hidden(&b.ids, &b.positions, &b.bias, None, Pass::Train)
            .unwrap();
        let infer = m
            .hidden(&b.ids, &b.positions, &b.bias, None, Pass::Infer)
            .unwrap();
        let diff = scalar(&(train - infer).unwrap().abs().unwrap().max_all().unwrap());
        // About 10x the measured error (f32 7.2e-7, bf16 1.6e-2; printed below).
        let tol = if dtype == DType::F32 { 1e-5 } else { 0.1 };
        eprintln!("{dtype:?}: fused vs differentiable hidden states, max |diff| {diff:.1e} (tolerance {tol:.0e})");
        assert!(diff < tol, "{dtype:?}: max difference {diff}");
    }
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: None,
        stop: vec![2],
        pad_id: 0,
    }
}

#[test]
fn kv_cache_decoding_matches_full_recompute() {
    let (m, _) = model(&tiny_config(), 4, DType::F32);
    let prompt = vec![1u32, 70, 71, 72];
    let got = generate(&m, std::slice::from_ref(&prompt), &[0], &greedy(12))
        .unwrap()
        .remove(0);
    // The same greedy tokens, recomputing the whole sequence for each one.
    let mut seq = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..12 {
        let logits = m.next_token_logits(&seq, Pass::Train).unwrap();
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .unwrap()
            .0 as u32;
        if next == 2 {
            break;
        }
        want.push(next);
        seq.push(next);
    }
    assert_eq!(got.tokens, want);
}

#[test]
fn a_batch_decodes_like_one_prompt_at_a_time() {
    let (m, _) = model(&tiny_config(), 5, DType::F32);
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 80],
        vec![1, 81, 82, 83, 84, 85, 86],
        vec![1, 90, 91, 92],
        vec![1, 100, 101, 102, 103],
    ];
    let all: Vec<usize> = (0..prompts.len()).collect();
    let batched = generate(&m, &prompts, &all, &greedy(16)).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&m, std::slice::from_ref(p), &[i], &greedy(16))
            .unwrap()
            .remove(0);
        assert_eq!(batched[i], single, "prompt {i}");
    }
    // Seeded sampling: reproducible, and per-prompt (not per-batch) random streams.
    let opts = GenerateOptions {
        sampling: Some(Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        }),
        ..greedy(16)
    };
    let a = generate(&m, &prompts, &all, &opts).unwrap();
    assert_eq!(a, generate(&m, &prompts, &all, &opts).unwrap());
    assert_eq!(
        a[2],
        generate(&m, &prompts[2..3], &[2], &opts).unwrap().remove(0)
    );
    assert_ne!(
        a.iter().map(|g| &g.tokens).collect::<Vec<_>>(),
        batched.iter().map(|g| &g.tokens).collect::<Vec<_>>()
    );
}

/// The written-out decoder's logits (`written_pass`: the decoder through the training
/// pass's layers, else the CPU decoder) against candle's graph over a prefill of
/// mixed-length prompts and `steps` decoding steps (both fed the same tokens); the max
/// relative difference.
fn decoder_vs_graph(config: &ModelConfig, seed: u64, steps: usize, written_pass: bool) -> f32 {
    let (m, _) = model(config, seed, DType::F32);
    let (b, width) = (3, 6);
    if written_pass {
        let run = |step: &mut dyn basin_lm::decode::Step| {
            Ok(steps_vs_graph(&m, steps, &mut |ids, pos, valid| {
                step.logits(ids, pos, valid)
            }))
        };
        return basin_lm::decode::with_pass_decoder(&m, b, width + steps, run).unwrap();
    }
    let held = HeldModel::of(&m).unwrap();
    let mut decoder = Decoder::new(&m, &held, b, width + steps).unwrap();
    steps_vs_graph(&m, steps, &mut |ids, pos, valid| {
        decoder.step(ids, pos, valid)
    })
}

/// A decoder's step: ids, positions, key_valid → the logits [b, vocab] on the host.
type Logits<'a> = &'a mut dyn FnMut(&[u32], &[u32], &[Vec<bool>]) -> anyhow::Result<Vec<f32>>;

/// [`decoder_vs_graph`] with the decoder's `step`.
fn steps_vs_graph(m: &Llama, steps: usize, step: Logits) -> f32 {
    let dev = Device::Cpu;
    let prompts: Vec<Vec<u32>> = vec![vec![1, 80], vec![1, 81, 82, 83, 84, 85], vec![1, 90, 91]];
    let (b, width) = (prompts.len(), 6);
    let mut ids: Vec<u32> = Vec::new();
    let mut pos: Vec<u32> = Vec::new();
    let mut valid: Vec<Vec<bool>> = Vec::new();
    for p in &prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        pos.extend(std::iter::repeat_n(0, pad).chain(0..p.len() as u32));
        valid.push((0..width).map(|i| i >= pad).collect());
    }
    let mut cache = KvCache::default();
    let mut worst = 0f32;
    for i in 0..=steps {
        let t = ids.len() / b;
        let ours = step(&ids, &pos, &valid).unwrap();
        let bias = attention_bias(&valid, t, DType::F32, &dev).unwrap();
        let input = Tensor::from_vec(ids.clone(), (b, t), &dev).unwrap();
        let positions = Tensor::from_vec(pos.clone(), (b, t), &dev).unwrap();
        let hidden = m
            .hidden(&input, &positions, &bias, Some(&mut cache), Pass::Infer)
            .unwrap();
        let last = hidden.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
        let want = m.logits(&last, Pass::Infer).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = ours
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        worst = worst.max(diff / scale);
        // The next tokens: a few fixed ones per row, then a step at a time.
        ids = (0..b as u32).map(|r| 100 + r + i as u32).collect();
        pos = prompts.iter().map(|p| (p.len() + i) as u32).collect();
        valid.iter_mut().for_each(|v| v.push(true));
    }
    worst
}

#[test]
fn written_out_decoder_matches_candles_graph_in_every_family() {
    // Tolerance about 10x the largest measured (1.7e-7; printed below).
    let tol = 2e-6;
    let mut configs = vec![("tiny", tiny_config())];
    for name in ["llama3", "llama-bias-4x", "qwen2", "phi3", "mistral"] {
        configs.push((name, basin_lm::testkit::family_config(name).unwrap()));
    }
    for (name, config) in configs {
        for written_pass in [false, true] {
            let diff = decoder_vs_graph(&config, 8, 6, written_pass);
            let which = if written_pass {
                "the pass's decoder (CPU backend)"
            } else {
                "decoder"
            };
            eprintln!("{name}: {which} vs graph logits, max relative difference {diff:.1e} (tolerance {tol:.0e})");
            assert!(diff < tol, "{name} {which}: {diff}");
        }
    }
}

#[test]
fn written_out_decoding_gives_the_graphs_replies() {
    let (m, _) = model(&tiny_config(), 5, DType::F32);
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 80],
        vec![1, 81, 82, 83, 84, 85, 86],
        vec![1, 90, 91, 92],
    ];
    let all: Vec<usize> = (0..prompts.len()).collect();
    let ours = generate(&m, &prompts, &all, &greedy(16)).unwrap();
    assert_eq!(
        ours,
        generate_with_candle(&m, &prompts, &all, &greedy(16)).unwrap()
    );
    assert!(ours.iter().any(|g| g.tokens.len() > 4), "{ours:?}");
    // And through the training pass's layers (the GPU's decoder, here on the CPU backend).
    assert_eq!(
        ours,
        generate_written(&m, &prompts, &all, &greedy(16)).unwrap()
    );
    // Each decoder by name (`evaluate --decoder`).
    for kind in [DecoderKind::Graph, DecoderKind::Cpu, DecoderKind::Pass] {
        let by = generate_by(kind, &m, &prompts, &all, &greedy(16)).unwrap();
        assert_eq!(ours, by, "{kind}");
    }
}

/// `--decoder`: auto is the CPU decoder for an f32 model on the CPU and candle's graph for
/// any other; a decoder that cannot run the model says why; names round-trip.
#[test]
fn a_decoder_choice_resolves_for_the_model_or_says_why_not() {
    let (f32_model, _) = model(&tiny_config(), 5, DType::F32);
    let (bf16_model, _) = model(&tiny_config(), 5, DType::BF16);
    let r = |k: DecoderKind, m: &Llama| k.resolve(m).map_err(|e| e.to_string());
    assert_eq!(r(DecoderKind::Auto, &f32_model), Ok(DecoderKind::Cpu));
    assert_eq!(r(DecoderKind::Pass, &f32_model), Ok(DecoderKind::Pass));
    assert_eq!(r(DecoderKind::Graph, &f32_model), Ok(DecoderKind::Graph));
    assert_eq!(r(DecoderKind::Auto, &bf16_model), Ok(DecoderKind::Graph));
    let err = r(DecoderKind::Cpu, &bf16_model).unwrap_err();
    assert!(
        err.contains("an f32 model on the CPU, not BF16 on Cpu"),
        "{err}"
    );
    let err = r(DecoderKind::Pass, &bf16_model).unwrap_err();
    assert!(err.contains("runs f32 models on the CPU"), "{err}");
    for kind in [
        DecoderKind::Auto,
        DecoderKind::Graph,
        DecoderKind::Cpu,
        DecoderKind::Pass,
    ] {
        assert_eq!(kind.to_string().parse::<DecoderKind>(), Ok(kind));
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{kind}\""));
    }
    assert!("fast".parse::<DecoderKind>().is_err());
}

#[test]
fn the_decoder_refuses_a_step_past_its_cache_or_with_a_bad_mask() {
    let (m, _) = model(&tiny_config(), 5, DType::F32);
    let held = HeldModel::of(&m).unwrap();
    let mut d = Decoder::new(&m, &held, 1, 3).unwrap();
    let err = d.step(&[], &[], &[vec![]]).unwrap_err();
    assert!(err.to_string().contains("0 ids"), "{err}");
    let err = d.step(&[1, 2], &[0, 1], &[vec![true]]).unwrap_err();
    assert!(
        err.to_string().contains("mask row 0 has 1 keys, not 2"),
        "{err}"
    );
    d.step(&[1, 2], &[0, 1], &[vec![true; 2]]).unwrap();
    d.step(&[3], &[2], &[vec![true; 3]]).unwrap();
    let err = d.step(&[4], &[3], &[vec![true; 4]]).unwrap_err();
    assert!(err.to_string().contains("exceed the cache's 3"), "{err}");
    let (bf, _) = model(&tiny_config(), 5, DType::BF16);
    assert!(HeldModel::of(&bf).is_err());
}

#[test]
fn saved_hf_directory_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    basin_lm::tiny::write_tiny_model_dir(dir.path()).unwrap();
    let text = basin_lm::source::ModelText::open(dir.path()).unwrap();
    let config = tiny_config();
    let (m, varmap) = model(&config, 6, DType::F32);
    basin_lm::weights::save_hf_dir(dir.path(), &config, &varmap, &text, DType::F32).unwrap();
    let (config2, varmap2) = basin_lm::weights::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(config2, config);
    let m2 = Llama::new(&config2, &varmap2).unwrap();
    let b = batch(&rows(), DType::F32);
    let l1 = scalar(&loss(&m, &b, Pass::Train).unwrap());
    let l2 = scalar(&loss(&m2, &b, Pass::Train).unwrap());
    assert_eq!(l1, l2);
    let reopened = basin_lm::source::ModelText::open(dir.path()).unwrap();
    assert_eq!(reopened.chat_template, text.chat_template);
    assert_eq!(reopened.tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
}

#[test]
fn written_out_backprop_has_autograds_gradients_in_every_family() {
    // Biases everywhere (llama-bias-4x), q/k/v biases (qwen2), llama3 RoPE scaling and a
    // head size that is not hidden / heads (llama3, mistral), Phi-3's split projections.
    for name in ["llama3", "llama-bias-4x", "qwen2", "phi3", "mistral"] {
        eprintln!("{name}:");
        check_written_out_backprop(&basin_lm::testkit::family_config(name).unwrap());
    }
}

#[test]
fn gradients_match_finite_differences_with_biases() {
    check_gradients(&basin_lm::testkit::family_config("llama-bias-4x").unwrap());
}

#[test]
fn the_padding_tokens_embedding_gets_no_gradient_from_lookups() {
    // Token 40 is input in rows(); untied, so lookups are the embedding's only gradient.
    let config = ModelConfig {
        tie_word_embeddings: false,
        pad_token_id: Some(40),
        ..tiny_config()
    };
    check_written_out_backprop(&config);
    let (m, varmap) = model(&config, 2, DType::F32);
    let grads = loss(&m, &batch(&rows(), DType::F32), Pass::Train)
        .unwrap()
        .backward()
        .unwrap();
    let embed = varmap.data().lock().unwrap()["model.embed_tokens.weight"].clone();
    let g = grads
        .get(embed.as_tensor())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(g[40].iter().all(|&v| v == 0.0));
    assert!(g[41].iter().any(|&v| v != 0.0));
}

/// `--batch-size`: a number as given; auto on the CPU is CPU_BATCH, never more than the
/// prompts; the replies do not depend on it.
#[test]
fn auto_batches_on_the_cpu_and_replies_do_not_depend_on_it() {
    use basin_lm::generate::{BatchSize, CPU_BATCH};
    let dir = tempfile::tempdir().unwrap();
    basin_lm::tiny::write_tiny_model(dir.path(), &tiny_config(), 21).unwrap();
    let m = basin_lm::model::Model::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = (0..11u32).map(|i| vec![1, 40 + i, 41, 2 + i % 3]).collect();
    assert_eq!(
        m.batch_for(BatchSize::Auto, &prompts, 8).unwrap(),
        CPU_BATCH
    );
    assert_eq!(m.batch_for(BatchSize::Auto, &prompts[..3], 8).unwrap(), 3);
    assert_eq!(m.batch_for(BatchSize::Fixed(5), &prompts, 8).unwrap(), 5);
    let opts = m.options(6).unwrap();
    let auto = m
        .replies_to_ids(&prompts, &opts, BatchSize::Auto, |_| ())
        .unwrap();
    let one = m
        .replies_to_ids(&prompts, &opts, BatchSize::Fixed(1), |_| ())
        .unwrap();
    assert_eq!(auto, one);
}
