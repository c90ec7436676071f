//! The model families against transformers: tiny random checkpoints that transformers saved
//! (lm/tests/fixtures/families/, made by scripts/make_family_fixtures.py) load strictly,
//! compute transformers' logits, decode its greedy tokens and export back to the same
//! files; broken checkpoints are refused with their reason.

use basin_lm::architecture::{Family, ModelConfig};
use basin_lm::generate::{generate, GenerateOptions};
use basin_lm::llama::{Llama, Pass};
use basin_lm::model::Model;
use basin_lm::weights;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FAMILIES: [&str; 5] = ["llama3", "llama-bias-4x", "qwen2", "phi3", "mistral"];

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    last_logits: Vec<f32>,
    probe_ids: Vec<u32>,
    probe_logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Greedy {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
}

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
    greedy: Greedy,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn open(dir: &Path) -> Llama {
    let (config, varmap) = weights::load(dir, DType::F32, &Device::Cpu).unwrap();
    Llama::new(&config, &varmap).unwrap()
}

/// Every position's logits [time, vocab] of one sequence.
fn all_logits(m: &Llama, ids: &[u32], pass: Pass) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let t = ids.len();
    let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let positions = Tensor::arange(0u32, t as u32, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let bias = basin_lm::llama::attention_bias(&[vec![true; t]], t, DType::F32, &dev).unwrap();
    let h = m.hidden(&input, &positions, &bias, None, pass).unwrap();
    m.logits(&h, pass)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// The largest difference from transformers' logits over a fixture's cases.
fn worst_logit_error(m: &Llama, e: &Expected, pass: Pass) -> f32 {
    let mut worst = 0f32;
    for case in &e.cases {
        let got = all_logits(m, &case.ids, pass);
        let last = got.last().unwrap();
        assert_eq!(last.len(), case.last_logits.len());
        for (a, b) in last.iter().zip(&case.last_logits) {
            worst = worst.max((a - b).abs());
        }
        for (row, want) in got.iter().zip(&case.probe_logits) {
            for (&id, b) in case.probe_ids.iter().zip(want) {
                worst = worst.max((row[id as usize] - b).abs());
            }
        }
    }
    worst
}

#[test]
fn every_family_computes_transformers_logits() {
    for name in FAMILIES {
        let m = open(&fixture(name));
        let e = expected(name);
        for pass in [Pass::Train, Pass::Infer] {
            let worst = worst_logit_error(&m, &e, pass);
            eprintln!("{name} ({pass:?}): max |logit - transformers| = {worst:.1e}");
            // About 10x the largest error measured over the families (5.3e-6).
            assert!(worst < 5e-5, "{name} {pass:?}: {worst}");
        }
    }
}

#[test]
fn every_family_decodes_transformers_greedy_tokens() {
    for name in FAMILIES {
        let m = open(&fixture(name));
        let e = expected(name);
        let opts = GenerateOptions {
            max_new_tokens: e.greedy.tokens.len(),
            sampling: None,
            stop: vec![],
            pad_id: 0,
        };
        let prompt = std::slice::from_ref(&e.greedy.prompt);
        let got = generate(&m, prompt, &[0], &opts).unwrap();
        assert_eq!(got[0].tokens, e.greedy.tokens, "{name}");
        // Through the training pass's layers too (the GPU's decoder, on the CPU backend).
        let got = basin_lm::generate::generate_written(&m, prompt, &[0], &opts).unwrap();
        assert_eq!(
            got[0].tokens, e.greedy.tokens,
            "{name} (the pass's decoder)"
        );
    }
}

#[test]
fn families_are_read_as_transformers_reads_them() {
    let config = |name: &str| {
        let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
        ModelConfig::from_hf_json(&text).unwrap()
    };
    let l = config("llama3");
    assert_eq!(
        (l.family, l.head_dim, l.tie_word_embeddings),
        (Family::Llama, 8, true)
    );
    assert!(matches!(
        l.rope_scaling,
        basin_lm::architecture::RopeScaling::Llama3 { .. }
    ));
    let b = config("llama-bias-4x");
    assert!(b.qkv_bias && b.o_bias && b.mlp_bias && b.rope_theta == 500.0);
    let q = config("qwen2");
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings);
    let p = config("phi3");
    assert_eq!((p.family, p.max_positions()), (Family::Phi3, 48));
    let m = config("mistral");
    assert_eq!((m.head_dim, m.sliding_window), (8, Some(40)));
}

/// A copy of a fixture in a temporary directory, with the tiny tokenizer's files.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    basin_lm::tiny::write_tiny_model_dir(dir.path()).unwrap();
    dir
}

fn tensors_of(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn export_writes_each_family_back_in_its_own_layout() {
    for name in FAMILIES {
        let src = copy(name);
        let model = Model::open(src.path(), DType::F32, &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        weights::save_hf_dir(
            out.path(),
            &model.config,
            &model.varmap,
            &model.text,
            DType::F32,
        )
        .unwrap();
        // The same class and arithmetic, the same tensors under the same names, bit for bit.
        let read = |d: &Path| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                    .unwrap();
            (v["model_type"].clone(), v["architectures"].clone())
        };
        assert_eq!(read(out.path()), read(src.path()), "{name}");
        let text = |d: &Path| std::fs::read_to_string(d.join("config.json")).unwrap();
        assert_eq!(
            ModelConfig::from_hf_json(&text(out.path())).unwrap(),
            model.config,
            "{name}"
        );
        let (a, b) = (
            tensors_of(&src.path().join("model.safetensors")),
            tensors_of(&out.path().join("model.safetensors")),
        );
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (n, t) in &a {
            let (x, y) = (
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b[n].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(x == y && t.dims() == b[n].dims(), "{name}: {n} changed");
        }
        let back = open(out.path());
        assert!(worst_logit_error(&back, &expected(name), Pass::Infer) < 1e-4);
    }
}

/// A Python command's output, failing the test with both streams when it fails.
fn python(python: &Path, args: &[&Path]) -> String {
    let out = std::process::Command::new(python)
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{python:?} {args:?}: {stdout}\n{stderr}"
    );
    stdout.into_owned()
}

/// transformers itself loads each export as its family's class and computes the logits it
/// computed on the files it saved (scripts/check_family_exports.py).
#[test]
fn transformers_loads_every_export_as_its_own_class() {
    let Some(py) = basin_lm::testkit::hf_python() else {
        return;
    };
    let exports = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let src = copy(name);
        let model = Model::open(src.path(), DType::F32, &Device::Cpu).unwrap();
        let out = exports.path().join(name);
        weights::save_hf_dir(&out, &model.config, &model.varmap, &model.text, DType::F32).unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_family_exports.py");
    let said = python(&py, &[&script, exports.path()]);
    eprintln!("{said}");
    assert!(
        said.contains("OK: transformers loads every export"),
        "{said}"
    );
}

/// The error of loading a fixture copy after `edit` changed it.
fn refusal(name: &str, edit: impl FnOnce(&Path)) -> String {
    let dir = copy(name);
    edit(dir.path());
    let err = weights::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("the broken checkpoint loaded");
    format!("{err:#}")
}

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = tensors_of(&path);
    f(&mut t);
    candle_core::safetensors::save(&t.into_iter().collect(), &path).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn broken_checkpoints_are_refused_naming_the_problem() {
    let e = refusal("qwen2", |d| {
        edit_tensors(d, |t| {
            t.remove("model.layers.1.self_attn.k_proj.bias");
        })
    });
    assert!(
        e.contains("missing: model.layers.1.self_attn.k_proj.bias")
            && e.contains("model.safetensors"),
        "{e}"
    );
    // Phi-3's fused projection given split, as a loader that ignores layouts would accept.
    let e = refusal("phi3", |d| {
        edit_tensors(d, |t| {
            let qkv = t
                .remove("model.layers.0.self_attn.qkv_proj.weight")
                .unwrap();
            t.insert(
                "model.layers.0.self_attn.q_proj.weight".into(),
                qkv.narrow(0, 0, 16).unwrap(),
            );
        })
    });
    assert!(
        e.contains("missing: model.layers.0.self_attn.qkv_proj.weight")
            && e.contains("unexpected: model.layers.0.self_attn.q_proj.weight"),
        "{e}"
    );
    let e = refusal("mistral", |d| {
        edit_tensors(d, |t| {
            let w = t["model.norm.weight"].clone();
            t.insert("model.extra.weight".into(), w);
        })
    });
    assert!(e.contains("unexpected: model.extra.weight"), "{e}");
    // Loads run no code: a directory with only a PyTorch pickle is refused with the fix.
    let e = refusal("qwen2", |d| {
        std::fs::rename(d.join("model.safetensors"), d.join("pytorch_model.bin")).unwrap();
    });
    assert!(
        e.contains("holds pytorch_model.bin but no safetensors") && e.contains("save_pretrained"),
        "{e}"
    );
    let e = refusal("llama3", |d| {
        edit_tensors(d, |t| {
            let w = t["model.layers.0.mlp.up_proj.weight"]
                .narrow(0, 0, 31)
                .unwrap();
            t.insert("model.layers.0.mlp.up_proj.weight".into(), w);
        })
    });
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight: expected [32, 16], found [31, 16]"),
        "{e}"
    );
    // A tied model whose lm_head is not its embeddings is not the model its config says.
    let e = refusal("qwen2", |d| {
        edit_tensors(d, |t| {
            let e = t["model.embed_tokens.weight"].clone();
            t.insert("lm_head.weight".into(), (e * 2.0).unwrap());
        })
    });
    assert!(e.contains("lm_head.weight differs"), "{e}");
    let e = refusal("llama3", |d| {
        edit_config(d, |c| {
            c.insert("model_type".into(), "gemma2".into());
        })
    });
    assert!(e.contains("model_type 'gemma2' is not supported"), "{e}");
    let e = refusal("phi3", |d| {
        edit_config(d, |c| {
            c.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0, 1.0], "long_factor": [1.0, 1.0]}),
            );
        })
    });
    assert!(
        e.contains("rope_type 'longrope'") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn sequences_past_a_sliding_window_are_refused() {
    let m = open(&fixture("phi3"));
    let opts = GenerateOptions {
        max_new_tokens: 16,
        sampling: None,
        stop: vec![],
        pad_id: 0,
    };
    let err = generate(&m, &[vec![5; 40]], &[0], &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sliding_window 48"), "{err}");
    let long: Vec<u32> = (0..49).map(|i| 3 + i % 200).collect();
    let rows = [(long.as_slice(), 10)];
    let b = basin_lm::batch::Batch::new(&rows, 0, DType::F32, &Device::Cpu).unwrap();
    let err = basin_lm::batch::loss(&m, &b, Pass::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sliding_window 48"), "{err}");
    let err = basin_lm::backprop::forward(&m, &b)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sliding_window 48"), "{err}");
}

#[test]
fn a_model_stops_at_every_end_of_turn_id_it_lists() {
    let dir = copy("llama3");
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0, 7]}"#,
    )
    .unwrap();
    let model = Model::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    // The tokenizer's eos (<|im_end|> = 2) first, then the listed ones, each once.
    assert_eq!(model.text.stop_ids, vec![2, 0, 7]);
    assert_eq!(model.options(4).unwrap().stop, vec![2, 0, 7]);
}

#[test]
fn chat_template_jinja_is_read_before_tokenizer_config() {
    let dir = copy("qwen2");
    let own = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}";
    std::fs::write(dir.path().join("chat_template.jinja"), own).unwrap();
    let text = basin_lm::source::ModelText::open(dir.path()).unwrap();
    assert_eq!(text.chat_template.as_deref(), Some(own));
    // The list-of-templates form of tokenizer_config.json.
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let cfg = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let text = basin_lm::source::ModelText::open(dir.path()).unwrap();
    assert_eq!(text.chat_template.as_deref(), Some("D"));
}

#[test]
fn the_paper_models_shapes_parse_with_their_published_sizes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models");
    // Published parameter counts, in billions to two decimals.
    for (file, family, billions) in [
        ("llama-2-7b-chat.json", Family::Llama, 6.74),
        ("llama-3.2-1b-instruct.json", Family::Llama, 1.24),
        ("qwen2.5-3b-instruct.json", Family::Qwen2, 3.09),
        ("phi-3-mini-4k-instruct.json", Family::Phi3, 3.82),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let c = ModelConfig::from_hf_json(&text).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!(c.family, family, "{file}");
        let n: usize = c
            .checkpoint_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let b = (n as f64 / 1e9 * 100.0).round() / 100.0;
        assert_eq!(b, billions, "{file}: {n} parameters");
    }
}

/// A GGUF file of the tiny Llama (f32 tensors under llama.cpp's names), with `drop` left
/// out, `extra` tensors and `meta` keys added, and `arch` as its architecture.
fn tiny_gguf(path: &Path, arch: &str, drop: &str, extra: &[&str], meta: &[(&str, f32)]) {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let c = basin_lm::tiny::tiny_config();
    let (h, ff, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![c.vocab_size, h]),
        ("output_norm.weight".into(), vec![h]),
    ];
    for i in 0..c.num_hidden_layers {
        for (n, s) in [
            ("attn_norm", vec![h]),
            ("attn_q", vec![qd, h]),
            ("attn_k", vec![kvd, h]),
            ("attn_v", vec![kvd, h]),
            ("attn_output", vec![h, qd]),
            ("ffn_norm", vec![h]),
            ("ffn_gate", vec![ff, h]),
            ("ffn_up", vec![ff, h]),
            ("ffn_down", vec![h, ff]),
        ] {
            shapes.push((format!("blk.{i}.{n}.weight"), s));
        }
    }
    shapes.extend(extra.iter().map(|n| (n.to_string(), vec![hd / 2])));
    let tensors: Vec<(String, QTensor)> = shapes
        .into_iter()
        .filter(|(n, _)| n != drop)
        .map(|(n, s)| {
            let t = Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
            (n, QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let u = |v: usize| Value::U32(v as u32);
    let mut keys: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("llama.vocab_size".into(), u(c.vocab_size)),
        ("llama.embedding_length".into(), u(h)),
        ("llama.feed_forward_length".into(), u(ff)),
        ("llama.block_count".into(), u(c.num_hidden_layers)),
        (
            "llama.attention.head_count".into(),
            u(c.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(c.num_key_value_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.context_length".into(), u(c.max_position_embeddings)),
    ];
    keys.extend(meta.iter().map(|(k, v)| (k.to_string(), Value::F32(*v))));
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(
        &mut f,
        &keys
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect::<Vec<_>>(),
    )
    .unwrap();
}

#[test]
fn gguf_files_are_checked_as_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let load = |path: &Path| weights::load(path, DType::F32, &Device::Cpu).map(|_| ());
    tiny_gguf(&path, "llama", "", &[], &[]);
    load(&path).unwrap();
    let refused = |arch: &str, drop: &str, extra: &[&str], meta: &[(&str, f32)]| {
        tiny_gguf(&path, arch, drop, extra, meta);
        format!("{:#}", load(&path).unwrap_err())
    };
    let e = refused("llama", "blk.1.ffn_up.weight", &[], &[]);
    assert!(
        e.contains("missing: model.layers.1.mlp.up_proj.weight") && e.contains("m.gguf"),
        "{e}"
    );
    // Llama 3.1's GGUF files carry their RoPE scaling as a tensor of frequency factors.
    let e = refused("llama", "", &["rope_freqs.weight"], &[]);
    assert!(e.contains("unexpected: rope_freqs.weight"), "{e}");
    let e = refused("llama", "", &[], &[("llama.rope.scaling.factor", 8.0)]);
    assert!(e.contains("llama.rope.scaling.factor"), "{e}");
    let e = refused("qwen2", "", &[], &[]);
    assert!(
        e.contains("GGUF architecture 'qwen2' is not supported"),
        "{e}"
    );
}

#[test]
fn a_template_that_writes_bos_gets_one_bos() {
    // A tokenizer whose post-processor adds <|im_start|> (id 1) as a BOS, as Llama 3's adds
    // <|begin_of_text|>; the template writes bos_token itself.
    let dir = copy("qwen2");
    let path = dir.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
    });
    std::fs::write(&path, tok.to_string()).unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    .unwrap();
    let text = basin_lm::source::ModelText::open(dir.path()).unwrap();
    let t = text
        .template(&basin_lm::source::TemplateChoice::Model, None)
        .unwrap();
    let conv = basin_lm::chat::Conversation {
        system: None,
        user: "hi".into(),
        assistant: None,
    };
    let ids = text
        .tokenizer
        .encode(&t.render_prompt(&conv).unwrap())
        .unwrap();
    assert_eq!(ids, vec![1, 3 + b'h' as u32, 3 + b'i' as u32]);
    // The post-processor is live: asked for, it would add a second one.
    let with = text.tokenizer.inner.encode("x", true).unwrap();
    assert_eq!(with.get_ids()[0], 1);
}
