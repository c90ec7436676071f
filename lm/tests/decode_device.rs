//! Decoding through the training pass's layers on the GPU (`decode::with_pass_decoder`,
//! issue 23) against the CPU: the logits of the same steps — a prefill of mixed-length,
//! left-padded prompts, then one token a row at a time — in f32 against the CPU decoder to
//! 1e-4 of the largest, the greedy replies identical, each greedy token chosen on the device
//! equal to candle's `argmax` of the same step's logits; in bf16 against the f32 CPU decoder of
//! the same (bf16-valued) weights, no further from it than candle's graph in bf16 is. The
//! tiny model, every family's tiny config and 4 layers of the SmolLM2 shape. Needs
//! `--features cuda` and a GPU (scripts/device-pass.sh); elsewhere it says it was skipped.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_decoding_matches_the_cpu() {
    basin_lm::testkit::skipped(
        "built without the cuda feature (scripts/device-pass.sh runs it on a GPU)",
    );
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_decoding_matches_the_cpu() {
    use basin_lm::llama::ModelConfig;
    let Ok(gpu) = candle_core::Device::new_cuda(0) else {
        return basin_lm::testkit::skipped("no CUDA device");
    };
    let mut configs = vec![("tiny".to_string(), basin_lm::tiny::tiny_config())];
    for name in ["llama3", "llama-bias-4x", "qwen2", "phi3", "mistral"] {
        configs.push((
            name.to_string(),
            basin_lm::testkit::family_config(name).unwrap(),
        ));
    }
    let mut smol = ModelConfig::llama(49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, true, 2048);
    smol.num_hidden_layers = 4;
    configs.push(("smollm2-4-layers".to_string(), smol));
    for (name, c) in &configs {
        eprintln!("{name}:");
        device::compare(c, &gpu);
    }
}

#[cfg(feature = "cuda")]
mod device {
    use basin_lm::decode::{with_pass_decoder, Decoder, HeldModel};
    use basin_lm::generate::{generate, generate_written, GenerateOptions};
    use basin_lm::llama::{attention_bias, random_weights, KvCache, Llama, ModelConfig, Pass};
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarMap;

    const STEPS: usize = 6;
    const WIDTH: usize = 6;

    fn prompts(vocab: usize) -> Vec<Vec<u32>> {
        let v = |x: u32| x % (vocab as u32 - 3) + 3;
        vec![
            vec![1, v(80)],
            (81..86).map(v).collect(),
            vec![1, v(90), v(91)],
        ]
    }

    /// A decoder's step: ids, positions, key_valid → the logits [b, vocab] on the host.
    type Logits<'a> = &'a mut dyn FnMut(&[u32], &[u32], &[Vec<bool>]) -> anyhow::Result<Vec<f32>>;

    /// Each step's logits [b, vocab] of `step` over the fixed schedule: the prompts
    /// left-padded to WIDTH, then STEPS single tokens a row.
    fn schedule(vocab: usize, step: Logits) -> Vec<Vec<f32>> {
        let prompts = prompts(vocab);
        let b = prompts.len();
        let (mut ids, mut pos, mut valid) = (Vec::new(), Vec::new(), Vec::<Vec<bool>>::new());
        for p in &prompts {
            let pad = WIDTH - p.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
            pos.extend(std::iter::repeat_n(0, pad).chain(0..p.len() as u32));
            valid.push((0..WIDTH).map(|i| i >= pad).collect());
        }
        let mut out = Vec::new();
        for i in 0..=STEPS {
            out.push(step(&ids, &pos, &valid).unwrap());
            ids = (0..b as u32)
                .map(|r| 3 + (r + 7 * i as u32) % (vocab as u32 - 3))
                .collect();
            pos = prompts.iter().map(|p| (p.len() + i) as u32).collect();
            valid.iter_mut().for_each(|v| v.push(true));
        }
        out
    }

    /// candle's graph over the same schedule, on the model's device.
    fn graph(m: &Llama) -> Vec<Vec<f32>> {
        let dev = m.device().clone();
        let b = 3;
        let mut cache = KvCache::default();
        schedule(m.config.vocab_size, &mut |ids, pos, valid| {
            let t = ids.len() / b;
            let bias = attention_bias(valid, t, m.dtype(), &dev)?;
            let input = Tensor::from_vec(ids.to_vec(), (b, t), &dev)?;
            let positions = Tensor::from_vec(pos.to_vec(), (b, t), &dev)?;
            let hidden = m.hidden(&input, &positions, &bias, Some(&mut cache), Pass::Infer)?;
            let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
            let logits = m.logits(&last, Pass::Infer)?.to_dtype(DType::F32)?;
            Ok(logits.flatten_all()?.to_vec1()?)
        })
    }

    /// The pass's decoder over the schedule, on the model's device.
    fn pass(m: &Llama) -> Vec<Vec<f32>> {
        with_pass_decoder(m, 3, WIDTH + STEPS, |step| {
            Ok(schedule(m.config.vocab_size, &mut |i, p, v| {
                step.logits(i, p, v)
            }))
        })
        .unwrap()
    }

    /// Greedy decoding's choice on the device ([`Step::greedy`]) is candle's `argmax` of the
    /// same step's logits on the host: two decoders over the schedule, one asked for logits,
    /// the other for tokens.
    fn greedy_is_argmax(m: &Llama) {
        let vocab = m.config.vocab_size;
        let logits = pass(m);
        let mut chosen = Vec::new();
        with_pass_decoder(m, 3, WIDTH + STEPS, |step| {
            schedule(vocab, &mut |i, p, v| {
                chosen.push(step.greedy(i, p, v)?);
                Ok(vec![0.0; 3 * vocab])
            });
            Ok(())
        })
        .unwrap();
        for (s, (l, c)) in logits.iter().zip(&chosen).enumerate() {
            let t = Tensor::from_slice(l, (3, vocab), &Device::Cpu).unwrap();
            let want: Vec<u32> = t.argmax(candle_core::D::Minus1).unwrap().to_vec1().unwrap();
            assert_eq!(c, &want, "step {s}: greedy tokens ({:?})", m.dtype());
        }
    }

    /// The largest |a − b| of any step relative to that step's largest |b|.
    fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let scale = y.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
                let d = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                d / scale
            })
            .fold(0f32, f32::max)
    }

    /// A copy of `vars` as `dtype` on `dev`.
    fn copy(vars: &VarMap, dtype: DType, dev: &Device) -> VarMap {
        let out = VarMap::new();
        for (name, v) in vars.data().lock().unwrap().iter() {
            let t = v
                .as_tensor()
                .to_dtype(dtype)
                .unwrap()
                .to_device(dev)
                .unwrap();
            let var = Var::from_tensor(&t).unwrap();
            out.data().lock().unwrap().insert(name.clone(), var);
        }
        out
    }

    pub fn compare(c: &ModelConfig, gpu: &Device) {
        // bf16-valued weights, so that the f32 reference and the bf16 runs hold the same ones.
        let held = random_weights(c, 8, DType::BF16, &Device::Cpu).unwrap();
        let cpu = copy(&held, DType::F32, &Device::Cpu);
        let cpu_model = Llama::new(c, &cpu).unwrap();
        let h = HeldModel::of(&cpu_model).unwrap();
        let mut dec = Decoder::new(&cpu_model, &h, 3, WIDTH + STEPS).unwrap();
        let reference = schedule(c.vocab_size, &mut |i, p, v| dec.step(i, p, v));
        // f32 on the GPU.
        let g32 = copy(&held, DType::F32, gpu);
        let m32 = Llama::new(c, &g32).unwrap();
        let (ours, theirs) = (
            worst(&pass(&m32), &reference),
            worst(&graph(&m32), &reference),
        );
        eprintln!("  f32: the pass's decoder {ours:.1e} from the CPU decoder (candle's graph {theirs:.1e})");
        assert!(ours < 1e-4, "f32 logits: {ours}");
        let prompts = prompts(c.vocab_size);
        let rows: Vec<usize> = (0..prompts.len()).collect();
        let opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: None,
            stop: vec![],
            pad_id: 0,
        };
        let want = generate(&cpu_model, &prompts, &rows, &opts).unwrap();
        let got = generate_written(&m32, &prompts, &rows, &opts).unwrap();
        assert_eq!(got, want, "f32 greedy replies");
        greedy_is_argmax(&m32);
        // bf16 on the GPU, beside candle's graph in bf16.
        let g16 = copy(&held, DType::BF16, gpu);
        let m16 = Llama::new(c, &g16).unwrap();
        let (ours, theirs) = (
            worst(&pass(&m16), &reference),
            worst(&graph(&m16), &reference),
        );
        eprintln!(
            "  bf16: the pass's decoder {ours:.1e} from f32 (candle's graph in bf16 {theirs:.1e})"
        );
        assert!(
            ours <= 2.0 * theirs + 2.0 / 256.0,
            "bf16 logits: {ours} from f32, candle's bf16 graph {theirs}"
        );
        // Whole replies in bf16 (greedy; no stop token: each runs to the budget).
        let replies = generate_written(&m16, &prompts, &rows, &opts).unwrap();
        assert!(replies.iter().all(|g| g.tokens.len() == 12), "{replies:?}");
        greedy_is_argmax(&m16);
    }
}
