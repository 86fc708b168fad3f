//! EAGLE-3 (training-time test) and EAGLE-1: attention masks, the loss against hand-computed
//! references, learning on a tiny target, offline = online, exports for SGLang and vLLM.

use forge_models::drafters::eagle::DraftLayerSpec;
use forge_models::drafters::eagle1::{Eagle1, Eagle1Spec};
use forge_models::drafters::eagle3::{install_vocab_mapping, ttt_attention, ttt_mask, Eagle3, Eagle3Spec};
use forge_models::drafters::{Drafter, Features};
use forge_models::safetensors_io::SafetensorsFile;
use forge_tests::{eval_ctx, train_ctx, TargetHeads};
use forge_tests::{export_fp32, forge, losses, metrics_rows, reinit_trainable, TestRng, TinyRun};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Double, Device::Cpu);

#[test]
fn ttt_mask_matches_a_per_step_reference() {
    let t = 5i64;
    for step in 0..4i64 {
        let m = ttt_mask(t, step, Device::Cpu);
        assert_eq!(m.size(), [t, t * (step + 1)]);
        for q in 0..t {
            for j in 0..=step {
                for k in 0..t {
                    // step 0: causal over the step-0 keys; step j >= 1: only the same position
                    let want = if j == 0 { k <= q } else { k == q };
                    let got = m.int64_value(&[q, j * t + k]) != 0;
                    assert_eq!(got, want, "step {step}: query {q}, block {j}, key {k}");
                }
            }
        }
    }
}

#[test]
fn ttt_attention_equals_attention_over_all_step_keys_with_the_explicit_mask() {
    let mut rng = TestRng::new(11);
    let (b, h, t, d) = (2i64, 3i64, 6i64, 4i64);
    let q = rng.normal_tensor(&[b, h, t, d], 1.0).to_kind(Kind::Double);
    let ks: Vec<Tensor> = (0..4)
        .map(|_| rng.normal_tensor(&[b, h, t, d], 1.0).to_kind(Kind::Double))
        .collect();
    let vs: Vec<Tensor> = (0..4)
        .map(|_| rng.normal_tensor(&[b, h, t, d], 1.0).to_kind(Kind::Double))
        .collect();
    let causal = ttt_mask(t, 0, Device::Cpu)
        .view([1, 1, t, t])
        .expand([b, 1, t, t], false);
    for step in 0..4usize {
        let got = ttt_attention(&q, &ks[..=step], &vs[..=step], &causal);
        // reference: one query at a time over the keys the mask allows
        let mask = ttt_mask(t, step as i64, Device::Cpu);
        let kall = Tensor::cat(&ks[..=step], 2);
        let vall = Tensor::cat(&vs[..=step], 2);
        for bi in 0..b {
            for hi in 0..h {
                for qi in 0..t {
                    let qv = q.get(bi).get(hi).get(qi);
                    let allowed: Vec<i64> = (0..t * (step as i64 + 1))
                        .filter(|&k| mask.int64_value(&[qi, k]) != 0)
                        .collect();
                    let idx = Tensor::from_slice(&allowed);
                    let kk = kall.get(bi).get(hi).index_select(0, &idx);
                    let vv = vall.get(bi).get(hi).index_select(0, &idx);
                    let w = (kk.mv(&qv) / (d as f64).sqrt()).softmax(0, Kind::Double);
                    let want = vv.tr().mv(&w);
                    let diff = (got.get(bi).get(hi).get(qi) - want).abs().max().double_value(&[]);
                    assert!(diff < 1e-9, "step {step} b {bi} h {hi} q {qi}: {diff}");
                }
            }
        }
    }
}

fn rms_ref(x: &Tensor, w: &Tensor) -> Tensor {
    let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Double);
    x * (var + 1e-6).rsqrt() * w
}

fn rope_ref(x: &Tensor, pos: &Tensor, theta: f64) -> Tensor {
    // x [B, h, T, d], pos [B, T]
    let d = x.size()[3];
    let half = d / 2;
    let inv: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64)).collect();
    let inv = Tensor::from_slice(&inv);
    let ang = pos.to_kind(Kind::Double).unsqueeze(-1) * inv.view([1, 1, half]);
    let emb = Tensor::cat(&[&ang, &ang], -1).unsqueeze(1);
    let rot = Tensor::cat(&[x.narrow(3, half, half).neg(), x.narrow(3, 0, half)], 3);
    x * emb.cos() + rot * emb.sin()
}

fn small_spec(ttt: i64) -> Eagle3Spec {
    Eagle3Spec {
        ttt_length: ttt,
        step_decay: 0.8,
        aux_layers: vec![0, 1, 2],
        draft_vocab_size: 8,
        target_hidden_size: 16,
        vocab_size: 20,
        layer: DraftLayerSpec {
            hidden_size: 16,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            intermediate_size: 24,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: forge_models::layers::RopeScaling::None,
        },
    }
}

#[test]
fn eagle3_with_one_step_equals_a_hand_computed_forward() {
    let mut rng = TestRng::new(5);
    let (b, t, hh, v) = (2i64, 7i64, 16i64, 20i64);
    let embed = rng.normal_tensor(&[v, hh], 1.0);
    let target_lm = rng.normal_tensor(&[v, hh], 1.0);
    let target = TargetHeads {
        lm_head: Some(target_lm.shallow_clone()),
        embed: Some(embed.shallow_clone()),
    };
    let m = Eagle3::new(small_spec(1), &target.access(), Device::Cpu, Kind::Float).expect("eagle3");
    reinit_trainable(m.var_store(), 7);
    let used: Vec<i64> = vec![0, 2, 3, 5, 7, 11, 13, 17];
    let d2t: Vec<i64> = used.iter().enumerate().map(|(i, &u)| u - i as i64).collect();
    let mut t2d = vec![false; v as usize];
    used.iter().for_each(|&u| t2d[u as usize] = true);
    install_vocab_mapping(m.var_store(), &d2t, &t2d, None).expect("mapping");
    tch::no_grad(|| {
        for (name, mut p) in m.var_store().variables() {
            if name.ends_with("norm.weight") {
                p.copy_(&TestRng::for_name(1, &name).uniform_tensor(&p.size(), 0.5, 1.5));
            }
        }
    });
    // target ids chosen so that some target arg-maxes fall outside the draft vocabulary
    let ids_v: Vec<i64> = vec![1, 4, 7, 2, 9, 3, 5, 5, 10, 0, 6, 8, 13, 0];
    let mask_v: Vec<i64> = vec![0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0];
    let am_v: Vec<i64> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
    let f = Features {
        input_ids: Tensor::from_slice(&ids_v).view([b, t]),
        attention_mask: Tensor::from_slice(&am_v).view([b, t]),
        position_ids: Tensor::arange(t, (Kind::Int64, Device::Cpu)).repeat([b, 1]),
        loss_mask: Tensor::from_slice(&mask_v).view([b, t]),
        hidden_normed: Some(rng.normal_tensor(&[b, t, hh], 1.0)),
        aux_hidden: Some(rng.normal_tensor(&[b, t, 3 * hh], 1.0)),
        target_topk: None,
    };
    let out = m.loss(&f, &train_ctx()).expect("loss");

    // by hand, in f64
    let vars = m.var_store().variables();
    let w = |n: &str| vars[n].to_kind(Kind::Double);
    let aux = f.aux_hidden.as_ref().expect("aux").to_kind(Kind::Double);
    let h0 = aux.matmul(&w("fc.weight").tr());
    let next: Vec<i64> = (0..b * t)
        .map(|i| if (i + 1) % t == 0 { 0 } else { ids_v[i as usize + 1] })
        .collect();
    let emb = embed
        .to_kind(Kind::Double)
        .index_select(0, &Tensor::from_slice(&next))
        .view([b, t, hh]);
    let x = Tensor::cat(
        &[
            rms_ref(&emb, &w("midlayer.input_layernorm.weight")),
            rms_ref(&h0, &w("midlayer.hidden_norm.weight")),
        ],
        -1,
    );
    let proj = |n: &str, heads: i64| {
        x.matmul(&w(&format!("midlayer.self_attn.{n}_proj.weight")).tr())
            .view([b, t, heads, 4])
            .transpose(1, 2)
    };
    let pos = &f.position_ids;
    let q = rope_ref(&proj("q", 4), pos, 10000.0);
    let k = rope_ref(&proj("k", 2), pos, 10000.0).repeat_interleave_self_int(2, 1, None);
    let vv = proj("v", 2).repeat_interleave_self_int(2, 1, None);
    let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
    let scores = (q.matmul(&k.transpose(-1, -2)) / 2.0).masked_fill(&causal.logical_not(), f64::NEG_INFINITY);
    let att = scores
        .softmax(-1, Kind::Double)
        .matmul(&vv)
        .transpose(1, 2)
        .reshape([b, t, 16]);
    let h1 = &h0 + att.matmul(&w("midlayer.self_attn.o_proj.weight").tr());
    let z = rms_ref(&h1, &w("midlayer.post_attention_layernorm.weight"));
    let mlp = (z.matmul(&w("midlayer.mlp.gate_proj.weight").tr()).silu()
        * z.matmul(&w("midlayer.mlp.up_proj.weight").tr()))
    .matmul(&w("midlayer.mlp.down_proj.weight").tr());
    let out_h = h1 + mlp;
    let logits = rms_ref(&out_h, &w("norm.weight")).matmul(&w("lm_head.weight").tr()); // [B, T, 8]
    let tlog = f
        .hidden_normed
        .as_ref()
        .expect("h")
        .to_kind(Kind::Double)
        .matmul(&target_lm.to_kind(Kind::Double).tr());
    let (mut ce_sum, mut n, mut hits) = (0.0f64, 0.0f64, 0.0f64);
    for r in 0..b {
        for p in 0..t - 1 {
            // position p predicts token p+2 from the target's distribution at p+1
            let lp = (r * t + p + 2) as usize;
            if p + 2 >= t || mask_v[lp] == 0 {
                continue;
            }
            let tl: Vec<f64> = Vec::try_from(&tlog.get(r).get(p + 1)).expect("vec");
            let arg = (0..v as usize).max_by(|&a, &c| tl[a].total_cmp(&tl[c])).expect("max");
            if !t2d[arg] {
                continue;
            }
            let sel: Vec<f64> = used.iter().map(|&u| tl[u as usize]).collect();
            let mx = sel.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sel.iter().map(|x| (x - mx).exp()).sum();
            let probs: Vec<f64> = sel.iter().map(|x| (x - mx).exp() / z).collect();
            let dl: Vec<f64> = Vec::try_from(&logits.get(r).get(p)).expect("vec");
            let dm = dl.iter().cloned().fold(f64::MIN, f64::max);
            let lse = dm + dl.iter().map(|x| (x - dm).exp()).sum::<f64>().ln();
            ce_sum += -probs.iter().zip(&dl).map(|(pp, l)| pp * (l - lse)).sum::<f64>();
            n += 1.0;
            let da = (0..dl.len()).max_by(|&a, &c| dl[a].total_cmp(&dl[c])).expect("max");
            let ta = (0..probs.len())
                .max_by(|&a, &c| probs[a].total_cmp(&probs[c]))
                .expect("max");
            hits += (da == ta) as i32 as f64;
        }
    }
    assert!(n > 0.0 && n < 10.0, "some positions trained, some masked: {n}");
    let ce = ce_sum / n;
    let got = out.loss.double_value(&[]);
    assert!((got - ce).abs() < 1e-4, "loss {got} vs hand-computed {ce}");
    let part = out.parts.iter().find(|p| p.name == "ce/step0").expect("part");
    assert_eq!(part.count, n);
    let acc = out.metrics.iter().find(|p| p.name == "acc/step0").expect("acc");
    assert_eq!(acc.sum, hits);
    // gradients reach fc through the midlayer; the frozen embedding is not a variable
    out.loss.backward();
    assert!(vars["fc.weight"].grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(!vars.keys().any(|k| k.contains("embed")), "{:?}", vars.keys());
    assert!(!vars["d2t"].requires_grad() && !vars["t2d"].requires_grad());
}

#[test]
fn eagle3_later_steps_see_only_what_the_mask_allows() {
    // Step i at position t must not depend on tokens after t+i+1 nor on aux features after t.
    let mut rng = TestRng::new(8);
    let (b, t, hh, v) = (1i64, 8i64, 16i64, 20i64);
    let target = TargetHeads {
        lm_head: Some(rng.normal_tensor(&[v, hh], 1.0)),
        embed: Some(rng.normal_tensor(&[v, hh], 1.0)),
    };
    let m = Eagle3::new(small_spec(3), &target.access(), Device::Cpu, Kind::Float).expect("eagle3");
    reinit_trainable(m.var_store(), 7);
    let ids: Vec<i64> = vec![1, 4, 7, 2, 9, 3, 5, 6];
    let aux = rng.normal_tensor(&[b, t, 3 * hh], 1.0);
    let run = |ids: &[i64], aux: &Tensor| -> Vec<Tensor> {
        let f = Features {
            input_ids: Tensor::from_slice(ids).view([b, t]),
            attention_mask: Tensor::ones([b, t], (Kind::Int64, Device::Cpu)),
            position_ids: Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([b, t]),
            loss_mask: Tensor::ones([b, t], (Kind::Int64, Device::Cpu)),
            hidden_normed: Some(Tensor::zeros([b, t, hh], (Kind::Float, Device::Cpu))),
            aux_hidden: Some(aux.shallow_clone()),
            target_topk: None,
        };
        m.step_hidden(&f).expect("steps")
    };
    let base = run(&ids, &aux);
    assert_eq!(base.len(), 3);
    let p = 3i64; // perturb token p+... and aux at p+1
    let mut ids2 = ids.clone();
    ids2[(p + 3) as usize] = 19;
    let aux2 = aux.copy();
    let _ = aux2.get(0).get(p + 1).fill_(3.0);
    let pert = run(&ids2, &aux2);
    for (i, (a, c)) in base.iter().zip(&pert).enumerate() {
        // step i at positions <= p reads tokens up to p+i+1 <= p+2+... : token p+3 is read by
        // step i at position t iff t+i+1 >= p+3 through same-position chains only
        for pos in 0..=p {
            let reads_token = pos + i as i64 + 1 >= p + 3;
            let d = (a.get(0).get(pos) - c.get(0).get(pos)).abs().max().double_value(&[]);
            if reads_token {
                continue;
            }
            assert!(d < 1e-6, "step {i} position {pos} changed by {d}");
        }
    }
}

fn setup(name: &str, recipe: &str) -> TinyRun {
    TinyRun::new(name, recipe, true)
}

fn assert_falls(l: &[(u64, f64)]) {
    let n = l.len();
    let first: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = l[n - 5..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(last < first * 0.8, "loss fell from {first:.3} to {last:.3}");
}

#[test]
fn eagle3_trains_on_a_tiny_target_and_its_loss_falls() {
    let run = setup("eagle3-falls", "recipes/eagle3-tiny.yaml");
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=40",
            "--set",
            "train.lr=3e-3",
            "--set",
            "checkpoint.every_steps=40",
        ],
    );
    let l = losses(&ckpt);
    assert_eq!(l.len(), 40);
    let rows = metrics_rows(&ckpt.join("metrics.jsonl"));
    assert_falls(&l);
    for key in [
        "train/acc/step0",
        "train/acc/step1",
        "train/acc/step2",
        "train/ce/step0",
        "train/ce/step2",
        "train/kl/step1",
    ] {
        assert!(rows[0].get(key).is_some(), "{key} missing in {}", rows[0]);
    }
    // the divergence from the target (the part of the loss that can be learned) falls too
    let kl: Vec<(u64, f64)> = rows
        .iter()
        .map(|r| (0, r["train/kl/step0"].as_f64().expect("kl")))
        .collect();
    assert_falls(&kl);
}

fn keys_shapes_kinds(p: &Path) -> Vec<(String, Vec<i64>, Kind)> {
    let mut v: Vec<(String, Vec<i64>, Kind)> = SafetensorsFile::open(p)
        .expect("open")
        .tensors()
        .expect("tensors")
        .into_iter()
        .map(|(n, t)| (n, t.size(), t.kind()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

#[test]
fn eagle3_exports_for_sglang_and_vllm() {
    // a 4-layer target: engines serve 3 distinct ascending auxiliary layers
    let run = TinyRun::with_layers("eagle3-export", "recipes/eagle3-tiny.yaml", true, 4);
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=2",
            "--set",
            "drafter.aux_layers=[0,1,2]",
        ],
    );
    let (h, v, vd) = (64i64, 49152i64, 16384i64);
    let bf = Kind::BFloat16;
    let mut want: Vec<(String, Vec<i64>, Kind)> = vec![
        ("d2t".into(), vec![vd], Kind::Int64),
        ("fc.weight".into(), vec![h, 3 * h], bf),
        ("lm_head.weight".into(), vec![vd, h], bf),
        ("midlayer.hidden_norm.weight".into(), vec![h], bf),
        ("midlayer.input_layernorm.weight".into(), vec![h], bf),
        ("midlayer.mlp.down_proj.weight".into(), vec![h, 128], bf),
        ("midlayer.mlp.gate_proj.weight".into(), vec![128, h], bf),
        ("midlayer.mlp.up_proj.weight".into(), vec![128, h], bf),
        ("midlayer.post_attention_layernorm.weight".into(), vec![h], bf),
        ("midlayer.self_attn.k_proj.weight".into(), vec![32, 2 * h], bf),
        ("midlayer.self_attn.o_proj.weight".into(), vec![h, h], bf),
        ("midlayer.self_attn.q_proj.weight".into(), vec![h, 2 * h], bf),
        ("midlayer.self_attn.v_proj.weight".into(), vec![32, 2 * h], bf),
        ("norm.weight".into(), vec![h], bf),
        ("t2d".into(), vec![v], Kind::Bool),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    // the speculators layout names the decoder layer as its published checkpoints do
    let mut want_speculators: Vec<(String, Vec<i64>, Kind)> = want
        .iter()
        .map(|(n, s, k)| (n.replace("midlayer.", "layers.0."), s.clone(), *k))
        .collect();
    want_speculators.sort_by(|a, b| a.0.cmp(&b.0));
    let ck = SafetensorsFile::open(&ckpt.join("step_2/model.safetensors")).expect("ckpt");
    for fmt in ["sglang", "vllm"] {
        let out_dir = run.dir.join(fmt);
        let out = forge(&[
            "export",
            ckpt.to_str().expect("utf8"),
            "--format",
            fmt,
            "--out",
            out_dir.to_str().expect("utf8"),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let file = out_dir.join("model.safetensors");
        assert_eq!(keys_shapes_kinds(&file), want, "{fmt}");
        let st = SafetensorsFile::open(&file).expect("open");
        let meta = st.metadata().expect("meta");
        assert_eq!(meta.get("format").map(String::as_str), Some(fmt));
        assert_eq!(meta.get("algorithm").map(String::as_str), Some("eagle3"));
        // d2t / t2d: consistent with each other, ascending, the checkpoint's mapping
        let d2t = st.tensor("d2t").expect("d2t");
        let t2d = st.tensor("t2d").expect("t2d");
        assert!(d2t.equal(&ck.tensor("d2t").expect("d2t")));
        assert!(t2d.equal(&ck.tensor("t2d").expect("t2d")));
        let ids = Tensor::arange(vd, (Kind::Int64, Device::Cpu)) + &d2t;
        assert_eq!(t2d.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]), vd);
        assert!(t2d.index_select(0, &ids).all().int64_value(&[]) != 0);
        let ids_v: Vec<i64> = Vec::try_from(&ids).expect("ids");
        assert!(ids_v.windows(2).all(|w| w[0] < w[1]), "draft ids ascend");
        assert!(
            d2t.abs().sum(Kind::Int64).int64_value(&[]) > 0,
            "a real mapping, not the identity"
        );
        let cfg = read_json(&out_dir.join("config.json"));
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLMEagle3");
        assert_eq!(cfg["num_hidden_layers"], 1);
        assert_eq!(cfg["vocab_size"], v);
        assert_eq!(cfg["draft_vocab_size"], vd);
        assert_eq!(cfg["target_hidden_size"], h);
        assert_eq!(cfg["hidden_size"], h);
        assert_eq!(cfg["num_attention_heads"], 4);
        assert_eq!(cfg["num_key_value_heads"], 2);
        assert_eq!(cfg["intermediate_size"], 128);
        assert_eq!(cfg["torch_dtype"], "bfloat16");
        // the layers, as each engine reads them, in both folders (a folder served by the
        // other engine reads the trained layers too): forge's are target layer outputs;
        // SGLang takes output ids under eagle_config (and adds 1), vLLM capture points at
        // top level
        assert_eq!(
            cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
            serde_json::json!([0, 1, 2]),
            "{fmt}"
        );
        assert_eq!(
            cfg["eagle_aux_hidden_state_layer_ids"],
            serde_json::json!([1, 2, 3]),
            "{fmt}"
        );
    }
    // vLLM's speculators layout: the same tensors as vllm, a config vllm serve recognises
    let sp = run.dir.join("speculators");
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "speculators",
        "--out",
        sp.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(keys_shapes_kinds(&sp.join("model.safetensors")), want_speculators);
    let cfg = read_json(&sp.join("config.json"));
    assert!(
        cfg.get("model_type").is_none(),
        "a top-level model_type hides the speculators block from vLLM"
    );
    assert_eq!(cfg["speculators_model_type"], "eagle3");
    assert_eq!(cfg["architectures"][0], "Eagle3Speculator");
    let sc = &cfg["speculators_config"];
    assert_eq!(sc["algorithm"], "eagle3");
    assert_eq!(sc["default_proposal_method"], "greedy");
    assert_eq!(sc["proposal_methods"][0]["proposal_type"], "greedy");
    assert_eq!(sc["proposal_methods"][0]["speculative_tokens"], 3);
    assert_eq!(sc["verifier"]["name_or_path"], run.target.display().to_string());
    assert_eq!(sc["verifier"]["architectures"][0], "LlamaForCausalLM");
    let layer = &cfg["transformer_layer_config"];
    assert_eq!(layer["model_type"], "llama");
    assert_eq!(layer["num_hidden_layers"], 1);
    assert_eq!(layer["hidden_size"], h);
    assert!(layer.get("architectures").is_none() && layer.get("draft_vocab_size").is_none());
    assert_eq!(cfg["draft_vocab_size"], vd);
    assert_eq!(cfg["target_hidden_size"], h);
    assert_eq!(cfg["norm_before_residual"], false);
    assert_eq!(cfg["eagle_aux_hidden_state_layer_ids"], serde_json::json!([1, 2, 3]));
    assert_eq!(
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        serde_json::json!([0, 1, 2])
    );
    assert!(layer.get("eagle_config").is_none());
    // layers an engine cannot serve as trained (a 2-layer target's [0, 1, 1]): refused
    let small = setup("eagle3-export-refused", "recipes/eagle3-tiny.yaml");
    let ck2 = small.dir.join("run");
    small.train(
        &ck2,
        &["--set", "train.max_steps=1", "--set", "checkpoint.every_steps=1"],
    );
    let out = forge(&[
        "export",
        ck2.to_str().expect("utf8"),
        "--format",
        "vllm",
        "--out",
        small.dir.join("vllm").to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[0, 1, 1]") && err.contains("3 distinct ascending"),
        "{err}"
    );
    // the fp32 export holds the checkpoint's weights
    let fx = run.dir.join("fp32");
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "sglang",
        "--out",
        fx.to_str().expect("utf8"),
        "--dtype",
        "fp32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ex = SafetensorsFile::open(&fx.join("model.safetensors")).expect("open");
    for n in ["fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight"] {
        assert!(ex.tensor(n).expect("t").equal(&ck.tensor(n).expect("t")), "{n}");
    }
    // forge format: reloads (with the target's shared embedding and lm_head) to the same
    // weights and buffers
    let ffx = run.dir.join("forge");
    let step = ckpt.join("step_2");
    let out = forge(&[
        "export",
        step.to_str().expect("utf8"),
        "--format",
        "forge",
        "--out",
        ffx.to_str().expect("utf8"),
        "--dtype",
        "fp32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let re = forge_trainer::engines::load_drafter(&ffx, Device::Cpu).expect("reload");
    let mut ck_all = ck.tensors().expect("tensors");
    ck_all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rw: Vec<(String, Tensor)> = re.drafter.var_store().variables().into_iter().collect();
    rw.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(rw.len(), ck_all.len());
    for ((na, a), (nb, b)) in rw.iter().zip(ck_all.iter()) {
        assert_eq!(na, nb);
        assert!(a.equal(b), "{na}");
    }
    // resuming keeps the mapping and continues
    let out = run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=3",
            "--set",
            "checkpoint.every_steps=1",
            "--set",
            "drafter.aux_layers=[0,1,2]",
            "--resume",
            "auto",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("(step 2)"));
    let resumed = SafetensorsFile::open(&ckpt.join("step_3/model.safetensors")).expect("step 3");
    assert!(resumed
        .tensor("d2t")
        .expect("d2t")
        .equal(&ck.tensor("d2t").expect("d2t")));
    // Medusa's layout does not hold EAGLE drafters
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "medusa",
        "--out",
        run.dir.join("x").to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
}

#[test]
fn eagle3_offline_training_on_hidden_shards_matches_online() {
    let run = setup("eagle3-offline", "recipes/eagle3-tiny.yaml");
    let online = run.dir.join("online");
    run.train(
        &online,
        &["--set", "train.max_steps=3", "--set", "checkpoint.every_steps=3"],
    );
    let hidden = run.dir.join("hidden");
    let mut args = vec![
        "prepare-hidden".to_string(),
        run.recipe.display().to_string(),
        "--out".into(),
        hidden.display().to_string(),
        "--samples-per-shard".into(),
        "1000".into(),
    ];
    for s in run.sets() {
        args.push("--set".into());
        args.push(s);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = forge(&refs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let offline = run.dir.join("offline");
    let hd = format!("data.hidden_dir={}", hidden.display());
    run.train(
        &offline,
        &[
            "--set",
            "train.max_steps=3",
            "--set",
            "checkpoint.every_steps=3",
            "--set",
            "data.mode=offline",
            "--set",
            &hd,
        ],
    );
    let (a, b) = (losses(&online), losses(&offline));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    for ((_, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 2e-2 * x.abs(), "online {x} vs offline {y}");
    }
    assert_ne!(a, b, "offline really read the bf16 shards");
    // the same vocabulary mapping in both runs
    let wa = SafetensorsFile::open(&online.join("step_3/model.safetensors")).expect("a");
    let wb = SafetensorsFile::open(&offline.join("step_3/model.safetensors")).expect("b");
    assert!(wa.tensor("d2t").expect("d2t").equal(&wb.tensor("d2t").expect("d2t")));
}

// ---- EAGLE-1 ---------------------------------------------------------------------------

#[test]
fn eagle1_loss_equals_a_hand_computed_reference() {
    let mut rng = TestRng::new(21);
    let (b, t, hh, v) = (2i64, 6i64, 16i64, 20i64);
    let embed = rng.normal_tensor(&[v, hh], 1.0);
    let head = rng.normal_tensor(&[v, hh], 1.0);
    let spec = Eagle1Spec {
        feature_weight: 1.0,
        token_weight: 0.1,
        feature_noise: 0.0,
        fc_bias: true,
        vocab_size: v,
        layer: small_spec(1).layer,
    };
    let target = TargetHeads {
        lm_head: Some(head.shallow_clone()),
        embed: Some(embed.shallow_clone()),
    };
    let m = Eagle1::new(spec, &target.access(), Device::Cpu, Kind::Float).expect("eagle1");
    reinit_trainable(m.var_store(), 7);
    tch::no_grad(|| {
        for (name, mut p) in m.var_store().variables() {
            if name.ends_with("norm.weight") {
                p.copy_(&TestRng::for_name(1, &name).uniform_tensor(&p.size(), 0.5, 1.5));
            }
        }
    });
    let ids_v: Vec<i64> = vec![1, 4, 7, 2, 9, 3, 5, 5, 10, 0, 6, 8];
    let mask_v: Vec<i64> = vec![0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0];
    let feats = rng.normal_tensor(&[b, t, hh], 1.0);
    let f = Features {
        input_ids: Tensor::from_slice(&ids_v).view([b, t]),
        attention_mask: Tensor::ones([b, t], (Kind::Int64, Device::Cpu)),
        position_ids: Tensor::arange(t, (Kind::Int64, Device::Cpu)).repeat([b, 1]),
        loss_mask: Tensor::from_slice(&mask_v).view([b, t]),
        hidden_normed: Some(feats.shallow_clone()),
        aux_hidden: None,
        target_topk: None,
    };
    let out = m.loss(&f, &train_ctx()).expect("loss");
    let vars = m.var_store().variables();
    let w = |n: &str| vars[n].to_kind(Kind::Double);
    let fd = feats.to_kind(Kind::Double);
    let next: Vec<i64> = (0..b * t)
        .map(|i| if (i + 1) % t == 0 { 0 } else { ids_v[i as usize + 1] })
        .collect();
    let emb = embed
        .to_kind(Kind::Double)
        .index_select(0, &Tensor::from_slice(&next))
        .view([b, t, hh]);
    let x = Tensor::cat(&[&emb, &fd], -1).matmul(&w("fc.weight").tr()) + w("fc.bias");
    let proj = |n: &str, heads: i64| {
        x.matmul(&w(&format!("layers.0.self_attn.{n}_proj.weight")).tr())
            .view([b, t, heads, 4])
            .transpose(1, 2)
    };
    let pos = &f.position_ids;
    let q = rope_ref(&proj("q", 4), pos, 10000.0);
    let k = rope_ref(&proj("k", 2), pos, 10000.0).repeat_interleave_self_int(2, 1, None);
    let vv = proj("v", 2).repeat_interleave_self_int(2, 1, None);
    let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
    let scores = (q.matmul(&k.transpose(-1, -2)) / 2.0).masked_fill(&causal.logical_not(), f64::NEG_INFINITY);
    let att = scores
        .softmax(-1, Kind::Double)
        .matmul(&vv)
        .transpose(1, 2)
        .reshape([b, t, 16]);
    let h1 = &x + att.matmul(&w("layers.0.self_attn.o_proj.weight").tr());
    let z = rms_ref(&h1, &w("layers.0.post_attention_layernorm.weight"));
    let mlp = (z.matmul(&w("layers.0.mlp.gate_proj.weight").tr()).silu()
        * z.matmul(&w("layers.0.mlp.up_proj.weight").tr()))
    .matmul(&w("layers.0.mlp.down_proj.weight").tr());
    let pred = h1 + mlp;
    let hd = head.to_kind(Kind::Double);
    let (mut fsum, mut csum, mut n) = (0.0f64, 0.0f64, 0.0f64);
    for r in 0..b {
        for p in 0..t - 2 {
            if mask_v[(r * t + p + 2) as usize] == 0 {
                continue;
            }
            let a = pred.get(r).get(p);
            let y = fd.get(r).get(p + 1);
            let d: Vec<f64> = Vec::try_from(&(&a - &y).abs()).expect("vec");
            fsum += d
                .iter()
                .map(|&d| if d < 1.0 { 0.5 * d * d } else { d - 0.5 })
                .sum::<f64>()
                / hh as f64;
            let tp = hd.mv(&y).softmax(0, Kind::Double);
            let lp = hd.mv(&a).log_softmax(0, Kind::Double);
            csum += -(tp * lp).sum(Kind::Double).double_value(&[]);
            n += 1.0;
        }
    }
    let want = fsum / n + 0.1 * csum / n;
    let got = out.loss.double_value(&[]);
    assert!((got - want).abs() < 1e-4, "loss {got} vs hand-computed {want}");
    let fpart = out.parts.iter().find(|p| p.name == "feature/smooth_l1").expect("part");
    assert!((fpart.value() - fsum / n).abs() < 1e-5);
    assert_eq!(fpart.count, n);
    // noise only in training
    let m2 = Eagle1::new(
        Eagle1Spec {
            feature_noise: 0.5,
            fc_bias: true,
            ..match m.spec() {
                forge_models::drafters::DrafterSpec::Eagle1(s) => s.clone(),
                _ => unreachable!(),
            }
        },
        &target.access(),
        Device::Cpu,
        Kind::Float,
    )
    .expect("eagle1");
    tch::no_grad(|| {
        let src = m.var_store().variables();
        for (name, mut p) in m2.var_store().variables() {
            p.copy_(&src[&name]);
        }
    });
    let eval = m2.loss(&f, &eval_ctx()).expect("loss").loss.double_value(&[]);
    assert!((eval - got).abs() < 1e-6, "no noise in evaluation");
    let noisy = m2.loss(&f, &train_ctx()).expect("loss").loss.double_value(&[]);
    assert!((noisy - got).abs() > 1e-6, "noise in training");
}

/// The tiny EAGLE-3 recipe with its drafter section swapped for `kind: eagle1`.
fn eagle1_tiny_recipe(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(forge_tests::root().join("recipes/eagle3-tiny.yaml")).expect("recipe");
    let (a, b) = (
        text.find("drafter:").expect("drafter"),
        text.find("target:").expect("target"),
    );
    let text = format!("{}drafter:\n  kind: eagle1\n{}", &text[..a], &text[b..]);
    let p = dir.join("eagle1-tiny.yaml");
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn eagle1_trains_on_a_tiny_target_and_exports_for_sglang_and_vllm() {
    let mut run = setup("eagle1-train", "recipes/eagle3-tiny.yaml");
    run.recipe = eagle1_tiny_recipe(&run.dir);
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=40",
            "--set",
            "train.lr=3e-3",
            "--set",
            "checkpoint.every_steps=40",
        ],
    );
    let l = losses(&ckpt);
    assert_eq!(l.len(), 40);
    assert_falls(&l);
    let rows = metrics_rows(&ckpt.join("metrics.jsonl"));
    for key in ["train/feature/smooth_l1", "train/token/ce", "train/acc/step0"] {
        assert!(rows[0].get(key).is_some(), "{key} missing in {}", rows[0]);
    }
    let h = 64i64;
    let mut want: Vec<(String, Vec<i64>, Kind)> = vec![
        ("fc.weight".into(), vec![h, 2 * h], Kind::BFloat16),
        ("layers.0.mlp.down_proj.weight".into(), vec![h, 128], Kind::BFloat16),
        ("layers.0.mlp.gate_proj.weight".into(), vec![128, h], Kind::BFloat16),
        ("layers.0.mlp.up_proj.weight".into(), vec![128, h], Kind::BFloat16),
        (
            "layers.0.post_attention_layernorm.weight".into(),
            vec![h],
            Kind::BFloat16,
        ),
        ("layers.0.self_attn.k_proj.weight".into(), vec![32, h], Kind::BFloat16),
        ("layers.0.self_attn.o_proj.weight".into(), vec![h, h], Kind::BFloat16),
        ("layers.0.self_attn.q_proj.weight".into(), vec![h, h], Kind::BFloat16),
        ("layers.0.self_attn.v_proj.weight".into(), vec![32, h], Kind::BFloat16),
    ];
    // the default draft (fc with a bias) serves on SGLang; vLLM, which has no fc bias, refuses
    // it instead of dropping a trained weight
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "vllm",
        "--out",
        run.dir.join("vllm-biased").to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("drafter.fc_bias: false"), "{err}");
    // a bias-free draft: vLLM as trained, SGLang with a zero bias (the same layer)
    let plain = run.dir.join("run-nobias");
    run.train(
        &plain,
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=2",
            "--set",
            "drafter.fc_bias=false",
        ],
    );
    for (ck, fmt, arch, bias) in [
        (&plain, "vllm", "EagleLlamaForCausalLM", false),
        (&plain, "sglang", "LlamaForCausalLMEagle", true),
        (&ckpt, "sglang", "LlamaForCausalLMEagle", true),
    ] {
        if bias && !want.iter().any(|w| w.0 == "fc.bias") {
            want.push(("fc.bias".into(), vec![h], Kind::BFloat16));
            want.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let out_dir = run.dir.join(format!(
            "{fmt}-{}",
            ck.file_name().and_then(|n| n.to_str()).expect("name")
        ));
        let out = forge(&[
            "export",
            ck.to_str().expect("utf8"),
            "--format",
            fmt,
            "--out",
            out_dir.to_str().expect("utf8"),
            "--dtype",
            "bf16",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(keys_shapes_kinds(&out_dir.join("model.safetensors")), want, "{fmt}");
        let cfg = read_json(&out_dir.join("config.json"));
        assert_eq!(cfg["architectures"][0], arch);
        assert_eq!(cfg["num_hidden_layers"], 1);
        assert_eq!(cfg["vocab_size"], 49152);
        assert_eq!(cfg["hidden_size"], h);
        if bias {
            let b = SafetensorsFile::open(&out_dir.join("model.safetensors"))
                .expect("open")
                .tensor("fc.bias")
                .expect("bias");
            let zero = b.abs().sum(Kind::Float).double_value(&[]) == 0.0;
            assert_eq!(zero, ck == &plain, "{fmt}: a zero bias exactly for the bias-free draft");
        }
    }
}

/// EAGLE-3's TTT loss from the description alone, in f64 with per-query loops: step i reads
/// token p+i+1 at RoPE position p+i and its previous output; query p attends the valid step-0
/// keys s <= p and key p of each later step; it is matched to the target's distribution at
/// p+i+1 over the draft vocabulary where token p+i+2 is trained and the arg-max is drafted.
fn eagle3_reference(
    m: &Eagle3,
    f: &Features,
    embed: &Tensor,
    target_lm: &Tensor,
    used: &[i64],
    ttt: i64,
) -> (f64, Vec<(f64, f64)>) {
    let vars = m.var_store().variables();
    let w = |n: &str| vars[n].to_kind(Kind::Double);
    let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
    let (hh, nh, d) = (16i64, 4i64, 4i64);
    let ids: Vec<i64> = Vec::try_from(&f.input_ids.reshape([-1])).expect("ids");
    let lm: Vec<i64> = Vec::try_from(&f.loss_mask.reshape([-1])).expect("mask");
    let am: Vec<i64> = Vec::try_from(&f.attention_mask.reshape([-1])).expect("am");
    let tlog = f
        .hidden_normed
        .as_ref()
        .expect("h")
        .to_kind(Kind::Double)
        .matmul(&target_lm.to_kind(Kind::Double).tr());
    let mut hidden = f
        .aux_hidden
        .as_ref()
        .expect("aux")
        .to_kind(Kind::Double)
        .matmul(&w("fc.weight").tr());
    let (mut kl, mut vl): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
    let mut total = 0.0;
    let mut steps = Vec::new();
    for i in 0..ttt {
        let tok: Vec<i64> = (0..b * t)
            .map(|k| {
                if k % t + i + 1 < t {
                    ids[(k + i + 1) as usize]
                } else {
                    0
                }
            })
            .collect();
        let emb = embed
            .to_kind(Kind::Double)
            .index_select(0, &Tensor::from_slice(&tok))
            .view([b, t, hh]);
        let x = Tensor::cat(
            &[
                rms_ref(&emb, &w("midlayer.input_layernorm.weight")),
                rms_ref(&hidden, &w("midlayer.hidden_norm.weight")),
            ],
            -1,
        );
        let proj = |n: &str, heads: i64| {
            x.matmul(&w(&format!("midlayer.self_attn.{n}_proj.weight")).tr())
                .view([b, t, heads, d])
                .transpose(1, 2)
        };
        let pos = &f.position_ids + i;
        let q = rope_ref(&proj("q", nh), &pos, 10000.0);
        kl.push(rope_ref(&proj("k", 2), &pos, 10000.0).repeat_interleave_self_int(2, 1, None));
        vl.push(proj("v", 2).repeat_interleave_self_int(2, 1, None));
        let att = Tensor::zeros([b, nh, t, d], CPU);
        for bi in 0..b {
            for h in 0..nh {
                for p in 0..t {
                    let (mut ks, mut vs) = (Vec::new(), Vec::new());
                    for s in 0..=p {
                        if am[(bi * t + s) as usize] != 0 || s == p {
                            ks.push(kl[0].get(bi).get(h).get(s));
                            vs.push(vl[0].get(bi).get(h).get(s));
                        }
                    }
                    for j in 1..=i as usize {
                        ks.push(kl[j].get(bi).get(h).get(p));
                        vs.push(vl[j].get(bi).get(h).get(p));
                    }
                    let kk = Tensor::stack(&ks, 0);
                    let wts = (kk.mv(&q.get(bi).get(h).get(p)) / (d as f64).sqrt()).softmax(0, Kind::Double);
                    att.get(bi).get(h).get(p).copy_(&Tensor::stack(&vs, 0).tr().mv(&wts));
                }
            }
        }
        let att = att.transpose(1, 2).reshape([b, t, nh * d]);
        let h1 = &hidden + att.matmul(&w("midlayer.self_attn.o_proj.weight").tr());
        let z = rms_ref(&h1, &w("midlayer.post_attention_layernorm.weight"));
        let mlp = (z.matmul(&w("midlayer.mlp.gate_proj.weight").tr()).silu()
            * z.matmul(&w("midlayer.mlp.up_proj.weight").tr()))
        .matmul(&w("midlayer.mlp.down_proj.weight").tr());
        hidden = h1 + mlp;
        let logits = rms_ref(&hidden, &w("norm.weight")).matmul(&w("lm_head.weight").tr());
        let (mut ce, mut n) = (0.0f64, 0.0f64);
        for bi in 0..b {
            for p in 0..t {
                let tp = p + i + 1; // the target position this query is matched to
                if tp + 1 >= t || lm[(bi * t + tp + 1) as usize] == 0 {
                    continue;
                }
                let tl = tlog.get(bi).get(tp);
                if !used.contains(&tl.argmax(0, false).int64_value(&[])) {
                    continue;
                }
                let probs = tl.index_select(0, &Tensor::from_slice(used)).softmax(0, Kind::Double);
                let lp = logits.get(bi).get(p).log_softmax(0, Kind::Double);
                ce += -(probs * lp).sum(Kind::Double).double_value(&[]);
                n += 1.0;
            }
        }
        if n > 0.0 {
            total += 0.8f64.powi(i as i32) * ce / n;
        }
        steps.push((if n > 0.0 { ce / n } else { 0.0 }, n));
    }
    (total, steps)
}

#[test]
fn eagle3_ttt_loss_equals_a_per_step_reference() {
    let mut rng = TestRng::new(9);
    let (b, t, hh, v) = (2i64, 8i64, 16i64, 20i64);
    let embed = rng.normal_tensor(&[v, hh], 1.0);
    let target_lm = rng.normal_tensor(&[v, hh], 1.0);
    let target = TargetHeads {
        lm_head: Some(target_lm.shallow_clone()),
        embed: Some(embed.shallow_clone()),
    };
    let used: Vec<i64> = vec![0, 1, 2, 3, 5, 7, 8, 11, 12, 13, 17, 19];
    let mut spec = small_spec(4);
    spec.draft_vocab_size = used.len() as i64;
    let m = Eagle3::new(spec, &target.access(), Device::Cpu, Kind::Float).expect("eagle3");
    reinit_trainable(m.var_store(), 7);
    let d2t: Vec<i64> = used.iter().enumerate().map(|(i, &u)| u - i as i64).collect();
    let mut t2d = vec![false; v as usize];
    used.iter().for_each(|&u| t2d[u as usize] = true);
    install_vocab_mapping(m.var_store(), &d2t, &t2d, Some(&target_lm)).expect("mapping");
    let ids_v: Vec<i64> = vec![1, 4, 7, 2, 9, 3, 5, 5, 10, 0, 6, 8, 13, 0, 2, 0];
    let mask_v: Vec<i64> = vec![0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0];
    let am_v: Vec<i64> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let f = Features {
        input_ids: Tensor::from_slice(&ids_v).view([b, t]),
        attention_mask: Tensor::from_slice(&am_v).view([b, t]),
        position_ids: Tensor::arange(t, (Kind::Int64, Device::Cpu)).repeat([b, 1]),
        loss_mask: Tensor::from_slice(&mask_v).view([b, t]),
        hidden_normed: Some(rng.normal_tensor(&[b, t, hh], 1.0)),
        aux_hidden: Some(rng.normal_tensor(&[b, t, 3 * hh], 1.0)),
        target_topk: None,
    };
    let out = m.loss(&f, &train_ctx()).expect("loss");
    let (want, steps) = eagle3_reference(&m, &f, &embed, &target_lm, &used, 4);
    assert!(
        steps.iter().filter(|s| s.1 > 0.0).count() >= 3,
        "most steps train something: {steps:?}"
    );
    for (i, (ce, n)) in steps.iter().enumerate() {
        let part = out
            .parts
            .iter()
            .find(|p| p.name == format!("ce/step{i}"))
            .expect("part");
        assert_eq!(part.count, *n, "step {i} positions");
        assert!(
            (part.value() - ce).abs() < 1e-4,
            "step {i}: {} vs reference {ce}",
            part.value()
        );
    }
    let got = out.loss.double_value(&[]);
    assert!((got - want).abs() < 1e-4, "loss {got} vs reference {want}");
}

/// What engines serve (issue 26): a full-vocabulary draft's folder leaves out the identity
/// d2t / t2d (vLLM's loader refuses them as unexpected) and the importer takes the folder with
/// or without them; both engines' aux-layer keys are in every folder and must agree; an aux
/// layer at the target's last layer is refused for SGLang, which captures the input of layer
/// l + 1 for aux layer l.
#[test]
fn eagle3_full_vocabulary_and_last_layer_exports_are_what_engines_serve() {
    use forge_trainer::engines::load_drafter_with_target;
    let run = TinyRun::with_layers("eagle3-engines", "recipes/eagle3-tiny.yaml", true, 4);
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=1",
            "--set",
            "checkpoint.every_steps=1",
            "--set",
            "drafter.aux_layers=[0,1,3]",
            "--set",
            "drafter.draft_vocab_size=49152",
        ],
    );
    let export = |fmt: &str| {
        let dir = run.dir.join(fmt);
        let out = export_fp32(&ckpt, fmt, &dir);
        (dir, out)
    };
    // layer 3 of 4 is the last: SGLang cannot capture its output
    let (_, out) = export("sglang");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("sglang")
            && err.contains("largest it serves on this 4-layer target is 2"),
        "{err}"
    );
    let (dir, out) = export("vllm");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = dir.join("model.safetensors");
    let names: Vec<String> = keys_shapes_kinds(&file).into_iter().map(|(n, _, _)| n).collect();
    assert!(
        !names.iter().any(|n| n == "d2t" || n == "t2d"),
        "identity mapping written: {names:?}"
    );
    let cfg = read_json(&dir.join("config.json"));
    assert_eq!(cfg["eagle_aux_hidden_state_layer_ids"], serde_json::json!([1, 2, 4]));
    assert_eq!(
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        serde_json::json!([0, 1, 3])
    );
    // loads without the mapping, and with the identity mapping written by another tool
    let load = || load_drafter_with_target(&dir, Device::Cpu, Kind::Float, Some(&run.target));
    let loaded = load().expect("full-vocabulary folder without d2t/t2d");
    assert_eq!(loaded.spec.feature_needs().aux_layers, vec![0, 1, 3]);
    let mut w = SafetensorsFile::open(&file).expect("open").tensors().expect("tensors");
    w.push(("d2t".into(), Tensor::zeros([49152], (Kind::Int64, Device::Cpu))));
    w.push(("t2d".into(), Tensor::ones([49152], (Kind::Bool, Device::Cpu))));
    forge_models::safetensors_io::write_safetensors(&file, &w, &std::collections::HashMap::new()).expect("write");
    load().expect("full-vocabulary folder with the identity d2t/t2d");
    // the two engines' keys naming different layers: refused, both named
    let mut bad = cfg.clone();
    bad["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = serde_json::json!([0, 1, 2]);
    std::fs::write(dir.join("config.json"), bad.to_string()).expect("write");
    let err = load().err().expect("disagreeing aux keys").to_string();
    assert!(
        err.contains("eagle_config.eagle_aux_hidden_state_layer_ids") && err.contains("[1, 2, 4]"),
        "{err}"
    );
}
