use forge_models::layers::{RopeScaling, Rotary};
use forge_models::{Capture, DType, LogitsMode, TargetConfig, TargetModel};
use forge_tests::{max_abs_diff, random_target, reference_python, saved_tiny_target, tmp_dir, TestRng};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

const FAMILIES: &[&str] = &["llama", "qwen2", "qwen3"];

fn logits_all(m: &TargetModel, ids: &Tensor) -> Tensor {
    tch::no_grad(|| {
        m.forward(ids, None, None, None, &Capture::logits(LogitsMode::All))
            .expect("forward")
            .logits
            .expect("logits")
    })
}

fn ids(b: i64, t: i64, seed: i64) -> Tensor {
    let mut rng = TestRng::new(seed as u64);
    let v: Vec<i64> = (0..b * t).map(|_| 3 + (rng.next_u64() % 93) as i64).collect();
    Tensor::from_slice(&v).view([b, t])
}

#[test]
fn save_reload_gives_identical_logits() {
    for fam in FAMILIES {
        let dir = tmp_dir(&format!("roundtrip-{fam}"));
        let a = random_target(fam, 1);
        a.save_hf(&dir).expect("save");
        let b = TargetModel::load(&dir, DType::F32, Device::Cpu).expect("load");
        let x = ids(2, 11, 7);
        assert_eq!(max_abs_diff(&logits_all(&a, &x), &logits_all(&b, &x)), 0.0, "{fam}");
        // The config options that shape the model survived the round trip.
        assert_eq!(b.config.num_kv_heads, 2);
        assert_eq!(b.config.tie_word_embeddings, *fam == "llama");
        let names = b.vs.variables();
        assert_eq!(
            names.contains_key("lm_head.weight"),
            *fam != "llama",
            "{fam}: tied embeddings have no lm_head"
        );
        assert_eq!(
            names.contains_key("model.layers.0.self_attn.q_norm.weight"),
            *fam == "qwen3"
        );
        assert_eq!(
            names.contains_key("model.layers.0.self_attn.q_proj.bias"),
            *fam == "qwen2"
        );
        assert!(!names.contains_key("model.layers.0.self_attn.o_proj.bias"));
    }
}

#[test]
fn forward_matches_numpy_reference() {
    // An independent NumPy implementation of the HF forward (scripts/reference_forward.py).
    for fam in FAMILIES {
        let dir = tmp_dir(&format!("reference-{fam}"));
        saved_tiny_target(fam, 3, &dir);
        let m = TargetModel::load(&dir, DType::F32, Device::Cpu).expect("load");
        let tokens: Vec<i64> = vec![1, 17, 33, 5, 90, 42, 8, 61, 12];
        let x = Tensor::from_slice(&tokens).view([1, -1]);
        let logits = logits_all(&m, &x).squeeze_dim(0);
        let csv = tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
        let out = std::process::Command::new(reference_python())
            .arg(forge_tests::root().join("scripts/reference_forward.py"))
            .arg(&dir)
            .arg(&csv)
            .output()
            .expect("run reference");
        assert!(
            out.status.success(),
            "reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: HashMap<String, Vec<f64>> = serde_json::from_slice(&out.stdout).expect("json");
        let last = Tensor::from_slice(&v["last"]);
        let first = Tensor::from_slice(&v["first"]);
        let d_last = max_abs_diff(&logits.get(tokens.len() as i64 - 1), &last);
        let d_first = max_abs_diff(&logits.get(0), &first);
        let scale = last.abs().max().double_value(&[]);
        assert!(scale > 0.1, "{fam}: degenerate logits");
        assert!(
            d_last < 1e-4 && d_first < 1e-4,
            "{fam}: forge vs numpy reference differ: last {d_last}, first {d_first}"
        );
    }
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    for fam in FAMILIES {
        let m = random_target(fam, 2);
        let x = ids(1, 14, 9);
        let full = logits_all(&m, &x);
        let mut cache = m.new_cache();
        let cap = Capture::logits(LogitsMode::All);
        let mut parts = Vec::new();
        tch::no_grad(|| {
            // prefill 5, then single tokens, then a chunk of 3 with a cache (speculative verify shape), then 1.
            let mut pos = 0;
            for step in [5, 1, 1, 1, 3, 1, 2] {
                let chunk = x.narrow(1, pos, step);
                parts.push(
                    m.forward(&chunk, None, None, Some(&mut cache), &cap)
                        .expect("fwd")
                        .logits
                        .expect("logits"),
                );
                pos += step;
            }
            assert_eq!(pos, 14);
        });
        let inc = Tensor::cat(&parts, 1);
        let d = max_abs_diff(&full, &inc);
        assert!(d < 1e-4, "{fam}: cached decoding differs from recompute by {d}");
        assert_eq!(cache.len(), 14);

        // Roll back to 6 positions (rejected speculative tokens) and re-decode the rest.
        cache.truncate(6);
        let rest = tch::no_grad(|| {
            m.forward(&x.narrow(1, 6, 8), None, None, Some(&mut cache), &cap)
                .expect("fwd")
                .logits
                .expect("logits")
        });
        let d = max_abs_diff(&full.narrow(1, 6, 8), &rest);
        assert!(d < 1e-4, "{fam}: decoding after rollback differs by {d}");
    }
}

#[test]
fn padded_batch_equals_single_sequences() {
    let m = random_target("llama", 4);
    let a = ids(1, 10, 11);
    let b = ids(1, 6, 12);
    // Right-pad b to 10 and mark the padding invalid.
    let pad = Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu));
    let batch = Tensor::cat(&[a.shallow_clone(), Tensor::cat(&[&b, &pad], 1)], 0);
    let valid = Tensor::cat(
        &[
            Tensor::ones([1, 10], (Kind::Int64, Device::Cpu)),
            Tensor::cat(&[Tensor::ones([1, 6], (Kind::Int64, Device::Cpu)), pad.zeros_like()], 1),
        ],
        0,
    );
    let out = tch::no_grad(|| {
        m.forward(&batch, None, Some(&valid), None, &Capture::logits(LogitsMode::All))
            .expect("fwd")
            .logits
            .expect("logits")
    });
    let da = max_abs_diff(&out.narrow(0, 0, 1), &logits_all(&m, &a));
    let db = max_abs_diff(&out.narrow(0, 1, 1).narrow(1, 0, 6), &logits_all(&m, &b));
    assert!(da < 1e-4 && db < 1e-4, "padded batch differs: {da} {db}");

    // Left padding with explicit positions (batched generation layout).
    let left = Tensor::cat(&[&pad, &b], 1);
    let lvalid = Tensor::cat(&[pad.zeros_like(), Tensor::ones([1, 6], (Kind::Int64, Device::Cpu))], 1);
    let pos = Tensor::cat(
        &[
            pad.zeros_like(),
            Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([1, 6]),
        ],
        1,
    );
    let out = tch::no_grad(|| {
        m.forward(
            &left,
            Some(&pos),
            Some(&lvalid),
            None,
            &Capture::logits(LogitsMode::All),
        )
        .expect("fwd")
        .logits
        .expect("logits")
    });
    let dl = max_abs_diff(&out.narrow(1, 4, 6), &logits_all(&m, &b));
    assert!(dl < 1e-4, "left-padded row differs: {dl}");
}

#[test]
fn hidden_state_capture() {
    let m = random_target("llama", 5);
    let x = ids(2, 7, 13);
    let cap = Capture {
        layers: vec![1, 0],
        logits: LogitsMode::Last,
    };
    let out = tch::no_grad(|| m.forward(&x, None, None, None, &cap).expect("fwd"));
    assert_eq!(out.layers.len(), 2);
    assert_eq!(out.layers[0].size(), [2, 7, 64]);
    // The last layer's output is the pre-norm hidden state; lm_head reads the normed one.
    assert_eq!(max_abs_diff(&out.layers[0], &out.hidden), 0.0);
    assert!(max_abs_diff(&out.layers[1], &out.hidden) > 1e-3);
    assert!(max_abs_diff(&m.final_norm(&out.hidden), &out.hidden_normed) < 1e-6);
    let last = out.logits.expect("logits");
    assert_eq!(last.size(), [2, 1, 96]);
    assert!(max_abs_diff(&last, &m.logits(&out.hidden_normed.narrow(1, 6, 1))) < 1e-5);
    let bad = Capture {
        layers: vec![2],
        logits: LogitsMode::None,
    };
    let Err(err) = tch::no_grad(|| m.forward(&x, None, None, None, &bad)) else {
        panic!("layer 2 does not exist");
    };
    assert!(err.to_string().contains("layer 2"), "{err}");
}

#[test]
fn sharded_checkpoint_and_dtypes_load() {
    let dir = tmp_dir("sharded");
    let a = random_target("qwen3", 6);
    a.save_hf(&dir).expect("save");
    // Re-write as two shards + index, bf16 on disk for one of them.
    let single = dir.join("model.safetensors");
    let st = forge_models::safetensors_io::SafetensorsFile::open(&single).expect("open");
    let tensors = st.tensors().expect("tensors");
    std::fs::remove_file(&single).expect("rm");
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let meta = HashMap::new();
    let second: Vec<(String, Tensor)> = second
        .iter()
        .map(|(n, t)| (n.clone(), t.to_kind(Kind::BFloat16)))
        .collect();
    forge_models::safetensors_io::write_safetensors(&dir.join("model-00001-of-00002.safetensors"), first, &meta)
        .expect("w1");
    forge_models::safetensors_io::write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &second, &meta)
        .expect("w2");
    let mut map = serde_json::Map::new();
    for (n, _) in first {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _) in &second {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string(&serde_json::json!({"metadata": {}, "weight_map": map})).expect("json"),
    )
    .expect("index");
    let b = TargetModel::load(&dir, DType::F32, Device::Cpu).expect("load sharded");
    let x = ids(1, 9, 14);
    let d = max_abs_diff(&logits_all(&a, &x), &logits_all(&b, &x));
    assert!(
        d > 0.0 && d < 0.05,
        "half the weights went through bf16: small but non-zero difference expected, got {d}"
    );
    let c = TargetModel::load(&dir, DType::BF16, Device::Cpu).expect("load bf16");
    assert_eq!(c.kind(), Kind::BFloat16);
    let d = max_abs_diff(&logits_all(&a, &x), &logits_all(&c, &x).to_kind(Kind::Float));
    assert!(d < 0.2, "bf16 model too far from fp32: {d}");
}

#[test]
fn missing_or_misshapen_weights_are_named() {
    let dir = tmp_dir("missing");
    let a = random_target("llama", 7);
    a.save_hf(&dir).expect("save");
    let path = dir.join("model.safetensors");
    let st = forge_models::safetensors_io::SafetensorsFile::open(&path).expect("open");
    let mut tensors = st.tensors().expect("tensors");
    tensors.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight");
    forge_models::safetensors_io::write_safetensors(&path, &tensors, &HashMap::new()).expect("write");
    let err = TargetModel::load(&dir, DType::F32, Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{err}");

    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("cfg")).expect("json");
    cfg["model_type"] = "gpt2".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write");
    let err = TargetModel::load(&dir, DType::F32, Device::Cpu)
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("config.json") && err.to_string().contains("gpt2"),
        "{err}"
    );
}

#[test]
fn llama3_rope_scaling_frequencies() {
    // Llama-3.1-8B: theta 5e5, head_dim 128, factor 8, low 1, high 4, original 8192.
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let plain = Rotary::new(128, 500000.0, &RopeScaling::None, Device::Cpu);
    let scaled = Rotary::new(128, 500000.0, &scaling, Device::Cpu);
    // sin at position 1 is ~ the frequency itself for small angles; compare via atan2.
    let pos = Tensor::from_slice(&[1i64]).view([1, 1]);
    let freq = |r: &Rotary| {
        let (c, s) = r.cos_sin(&pos, Kind::Double);
        s.atan2(&c).view([-1]).narrow(0, 0, 64)
    };
    let (p, s) = (freq(&plain), freq(&scaled));
    let f = |t: &Tensor, i: i64| t.double_value(&[i]);
    // High-frequency end (wavelength < 8192/4): unchanged.
    assert!((f(&p, 0) - f(&s, 0)).abs() < 1e-9);
    // Low-frequency end (wavelength > 8192): divided by the factor.
    assert!((f(&p, 63) / 8.0 - f(&s, 63)).abs() < 1e-12);
    // In between: strictly between the two.
    let mid = (0..64).find(|&i| {
        let wl = 2.0 * std::f64::consts::PI / f(&p, i);
        wl > 2048.0 && wl < 8192.0
    });
    let i = mid.expect("a frequency in the smoothing band");
    assert!(f(&s, i) < f(&p, i) && f(&s, i) > f(&p, i) / 8.0);
    // The config parser reads the same numbers.
    let mut cfg = forge_tests::tiny_config("llama");
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    assert_eq!(TargetConfig::from_value(cfg).expect("cfg").rope_scaling, scaling);
}

/// transformers v5 `rope_parameters` (theta inside, yarn and llama3) read as transformers
/// computes them: frequencies and attention factor against tests/fixtures/rope_transformers.json
/// (made by scripts/make_rope_fixture.py with transformers), and the same RoPE as the
/// equivalent v4 `rope_theta` + `rope_scaling` config.
#[test]
fn rope_parameters_v5_match_transformers_and_the_v4_form() {
    let path = forge_tests::root().join("tests/fixtures/rope_transformers.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json");
    let cases = fixture["cases"].as_object().expect("cases");
    assert!(cases.len() >= 4);
    for (name, case) in cases {
        let params = case["rope_parameters"].clone();
        let mut v5 = forge_tests::tiny_config("llama");
        v5["head_dim"] = 16.into();
        v5["max_position_embeddings"] = case["max_position_embeddings"].clone();
        v5.as_object_mut().expect("object").remove("rope_theta");
        v5["rope_parameters"] = params.clone();
        let cfg = TargetConfig::from_value(v5.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.rope_theta, params["rope_theta"].as_f64().expect("theta"), "{name}");
        // the v4 form: theta at the top, the rest under rope_scaling
        let mut v4 = v5.clone();
        v4.as_object_mut().expect("object").remove("rope_parameters");
        let mut scaling = params.clone();
        v4["rope_theta"] = scaling
            .as_object_mut()
            .expect("object")
            .remove("rope_theta")
            .expect("theta");
        v4["rope_scaling"] = scaling;
        let old = TargetConfig::from_value(v4).unwrap_or_else(|e| panic!("{name} v4: {e}"));
        assert_eq!(
            (old.rope_theta, &old.rope_scaling),
            (cfg.rope_theta, &cfg.rope_scaling),
            "{name}"
        );

        // at position 1 the angle of (cos, sin) is the frequency and its length the factor
        let rotary = Rotary::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling, Device::Cpu);
        let (c, s) = rotary.cos_sin(&Tensor::from_slice(&[1i64]).view([1, 1]), Kind::Double);
        let half = cfg.head_dim / 2;
        let (c, s) = (c.view([-1]).narrow(0, 0, half), s.view([-1]).narrow(0, 0, half));
        let freq = Vec::<f64>::try_from(s.atan2(&c)).expect("angles");
        let scale = Vec::<f64>::try_from((&c * &c + &s * &s).sqrt()).expect("lengths");
        let want: Vec<f64> = case["inv_freq"]
            .as_array()
            .expect("inv_freq")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect();
        let factor = case["attention_factor"].as_f64().expect("attention_factor");
        assert_eq!(freq.len(), want.len(), "{name}");
        for (i, (g, w)) in freq.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs(),
                "{name}: frequency {i}: {g} vs transformers {w}"
            );
        }
        for l in &scale {
            assert!(
                (l - factor).abs() < 1e-6,
                "{name}: attention factor {l} vs transformers {factor}"
            );
        }
    }
}

#[test]
fn rope_configs_forge_cannot_compute_are_refused_by_name() {
    let with = |key: &str, v: serde_json::Value, keep_theta: bool| {
        let mut c = forge_tests::tiny_config("llama");
        if !keep_theta {
            c.as_object_mut().expect("object").remove("rope_theta");
        }
        c[key] = v;
        TargetConfig::from_value(c).err().unwrap_or_default()
    };
    let e = with(
        "rope_parameters",
        serde_json::json!({"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}),
        false,
    );
    assert!(e.contains("'dynamic'") && e.contains("yarn"), "{e}");
    let e = with(
        "rope_scaling",
        serde_json::json!({"type": "longrope", "factor": 2.0}),
        true,
    );
    assert!(e.contains("'longrope'"), "{e}");
    // v5 without a theta anywhere: never a silent 10000
    let e = with("rope_parameters", serde_json::json!({"rope_type": "default"}), false);
    assert!(e.contains("rope_parameters has no rope_theta"), "{e}");
    let e = with(
        "rope_parameters",
        serde_json::json!({"rope_type": "default", "rope_theta": 5e5}),
        true,
    );
    assert!(e.contains("disagrees"), "{e}");
    // one RoPE per layer type (Gemma 3 style)
    let e = with(
        "rope_parameters",
        serde_json::json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        false,
    );
    assert!(e.contains("per layer type"), "{e}");
    let e = with(
        "rope_parameters",
        serde_json::json!({"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
        false,
    );
    assert!(e.contains("partial_rotary_factor"), "{e}");
    // the v5 default type reads its theta
    let mut c = forge_tests::tiny_config("llama");
    c.as_object_mut().expect("object").remove("rope_theta");
    c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
    let cfg = TargetConfig::from_value(c).expect("v5 default");
    assert_eq!((cfg.rope_theta, cfg.rope_scaling), (1e6, RopeScaling::None));
}

/// The parameter count a config gives (printed at the start of every run) is that of the
/// model built from it, for every family, tied and untied, with and without biases.
#[test]
fn the_config_parameter_count_is_the_built_models() {
    for fam in FAMILIES {
        for tied in [true, false] {
            let mut c = forge_tests::tiny_config(fam);
            c["tie_word_embeddings"] = tied.into();
            if *fam == "llama" && !tied {
                c["attention_bias"] = true.into();
                c["mlp_bias"] = true.into();
            }
            let cfg = TargetConfig::from_value(c).expect("config");
            let want = cfg.num_parameters();
            let m = TargetModel::build(cfg, DType::F32, Device::Cpu, forge_models::layers::ParamInit::Zeros);
            let got: i64 = m.vs.variables().values().map(|t| t.numel() as i64).sum();
            assert_eq!(want, got, "{fam}, tied {tied}");
        }
    }
}
