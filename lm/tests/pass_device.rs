//! The written-out training pass on the GPU against the same pass on the CPU: the loss and
//! every weight's gradient of the same model (random weights, the same values on both
//! devices) on the same batch, to 1e-5 of the largest gradient — the tiny model, every
//! family of the model issue (biases, split projections, RoPE scaling, grouped queries) and
//! the SmolLM2-135M shape with fewer layers; and a bit-for-bit repeat on the device (the
//! sums run in a fixed order). Needs `--features cuda` and a GPU (scripts/device-pass.sh);
//! elsewhere each test says it was skipped.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_pass_equals_the_cpu_pass() {
    basin_lm::testkit::skipped(
        "built without the cuda feature (scripts/device-pass.sh runs it on a GPU)",
    );
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_pass_equals_the_cpu_pass() {
    use basin_lm::llama::ModelConfig;
    let Ok(gpu) = candle_core::Device::new_cuda(0) else {
        return basin_lm::testkit::skipped("no CUDA device");
    };
    let rows = device::rows(3, &[7, 5, 9], 300);
    device::compare(&basin_lm::tiny::tiny_config(), &rows, &gpu);
    device::compare(
        &ModelConfig {
            tie_word_embeddings: false,
            num_key_value_heads: 1,
            pad_token_id: Some(40),
            ..basin_lm::tiny::tiny_config()
        },
        &rows,
        &gpu,
    );
    for name in ["llama3", "llama-bias-4x", "qwen2", "phi3", "mistral"] {
        eprintln!("{name}:");
        let c = device::family(name);
        device::compare(&c, &device::rows(4, &[33, 20, 41, 12], c.vocab_size), &gpu);
    }
    // The SmolLM2-135M shape (4 of its 30 layers), 4 rows of 256 tokens.
    let mut smol = ModelConfig::llama(49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, true, 2048);
    smol.num_hidden_layers = 4;
    device::compare(&smol, &device::rows(4, &[256, 256, 200, 256], 49152), &gpu);
}

#[cfg(feature = "cuda")]
mod device {
    use basin_lm::backprop;
    use basin_lm::batch::Batch;
    use basin_lm::llama::{random_weights, Llama, ModelConfig};
    use candle_core::{DType, Device, Tensor};

    /// A family's tiny config: from this crate's sources where they were built, or — on a
    /// GPU machine that got the binary and a checkout — from `lm/` under the current folder.
    pub fn family(name: &str) -> ModelConfig {
        let rel = std::path::Path::new("tests/fixtures/families")
            .join(name)
            .join("config.json");
        let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel);
        let path = if built.exists() {
            built
        } else {
            std::path::Path::new("lm").join(&rel)
        };
        ModelConfig::from_hf_json(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// `n` rows of the given lengths, ids below `vocab` (none 0, the padding id), prompts of
    /// a third of each row.
    pub fn rows(n: usize, lens: &[usize], vocab: usize) -> Vec<(Vec<u32>, usize)> {
        let mut rng = basin_lm::rng::SplitMix64::new(9);
        (0..n)
            .map(|r| {
                let len = lens[r % lens.len()];
                let ids = (0..len)
                    .map(|_| 1 + (rng.next_u64() % (vocab as u64 - 1)) as u32)
                    .collect();
                (ids, len / 3)
            })
            .collect()
    }

    fn host(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Loss and gradients of one pass of `config`'s model on `dev`.
    fn pass(
        config: &ModelConfig,
        rows: &[(Vec<u32>, usize)],
        dev: &Device,
    ) -> (f64, Vec<(String, Vec<f32>)>) {
        let varmap = random_weights(config, 5, DType::F32, dev).unwrap();
        let model = Llama::new(config, &varmap).unwrap();
        let r: Vec<(&[u32], usize)> = rows.iter().map(|(ids, p)| (ids.as_slice(), *p)).collect();
        let batch = Batch::new(&r, 0, DType::F32, dev).unwrap();
        let trace = backprop::forward(&model, &batch).unwrap();
        let loss = trace.loss();
        let grads = trace.backward(0.5).unwrap();
        let data = varmap.data().lock().unwrap();
        let mut out: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(name, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                assert_eq!(
                    g.device().location(),
                    dev.location(),
                    "{name}: gradient off the device"
                );
                (name.clone(), host(g))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        (loss, out)
    }

    pub fn compare(config: &ModelConfig, rows: &[(Vec<u32>, usize)], gpu: &Device) {
        let (cpu_loss, cpu) = pass(config, rows, &Device::Cpu);
        let (gpu_loss, dev) = pass(config, rows, gpu);
        assert!(
            (gpu_loss - cpu_loss).abs() <= 1e-5 * cpu_loss.abs(),
            "loss {gpu_loss} on the GPU vs {cpu_loss}"
        );
        let mut worst = 0f32;
        for ((name, a), (_, b)) in dev.iter().zip(&cpu) {
            let largest = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(largest > 0.0, "{name}: the CPU gradient is all zeros");
            assert!(
                diff <= 1e-5 * largest,
                "{name}: max difference {diff} (largest |g| {largest})"
            );
            worst = worst.max(diff / largest);
        }
        // The same pass again on the device: the same bits.
        let (again_loss, again) = pass(config, rows, gpu);
        assert_eq!(
            again_loss.to_bits(),
            gpu_loss.to_bits(),
            "loss not reproducible"
        );
        for ((name, a), (_, b)) in again.iter().zip(&dev) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: not reproducible"
            );
        }
        eprintln!(
            "loss {gpu_loss:.6} (CPU {cpu_loss:.6}); {} gradients, worst difference {worst:.1e} of the largest",
            dev.len()
        );
    }
}
