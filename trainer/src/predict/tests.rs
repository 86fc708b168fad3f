use super::*;

fn llama8b() -> TargetConfig {
    TargetConfig::from_value(serde_json::json!({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "rope_theta": 500000.0
    }))
    .expect("config")
}

fn serving(batch: i64) -> Serving {
    Serving {
        batch,
        context: 1024,
        tensor_parallel: 1,
    }
}

#[test]
fn settings_parse_and_print_back() {
    for text in ["chain:5", "tree:steps=5,topk=4,draft_tokens=8", "block:16"] {
        let s = Setting::parse(text).expect(text);
        assert_eq!(s.to_string(), text);
        assert_eq!(Setting::parse(&s.to_string()).expect("again"), s);
    }
    assert_eq!(Setting::parse("chain=3").expect("="), Setting::Chain { n: 3 });
    assert_eq!(Setting::parse(" Chain 3 ").expect("space"), Setting::Chain { n: 3 });
    assert_eq!(
        Setting::parse("tree:draft_tokens=8, topk=4, steps=5").expect("any order"),
        Setting::Tree(TreeSpec {
            steps: 5,
            topk: 4,
            draft_tokens: 8
        })
    );
}

#[test]
fn bad_settings_say_what_is_wrong() {
    let msg = |t: &str| Setting::parse(t).expect_err(t).to_string();
    assert!(msg("chain:0").contains("whole number >= 1"), "{}", msg("chain:0"));
    assert!(msg("chain:x").contains("'x'"));
    assert!(msg("ladder:3").contains("expected chain:N"));
    assert!(msg("tree:steps=5,topk=4").contains("draft_tokens is missing"));
    assert!(msg("tree:steps=5,width=4,draft_tokens=8").contains("unknown key `width`"));
    assert!(msg("tree:steps=5,steps=4,topk=1,draft_tokens=8").contains("given twice"));
    assert!(msg("tree:steps=3,topk=1,draft_tokens=3").contains("must be 4"));
    assert!(msg("tree:steps=2,topk=2,draft_tokens=9").contains("draft_tokens must be 2..=7"));
}

#[test]
fn setting_costs() {
    let chain = Setting::Chain { n: 3 };
    assert_eq!(chain.draft_forwards(2.5), vec![2.5, 1.0, 1.0]);
    assert_eq!((chain.verify_tokens(), chain.max_tau()), (4, 4));
    let tree = Setting::Tree(TreeSpec {
        steps: 5,
        topk: 4,
        draft_tokens: 8,
    });
    assert_eq!(tree.draft_forwards(2.0), vec![2.0, 4.0, 4.0, 4.0, 4.0]);
    assert_eq!((tree.verify_tokens(), tree.max_tau()), (8, 6));
    let block = Setting::Block { size: 16 };
    assert_eq!(block.draft_forwards(3.0), vec![19.0]);
    assert_eq!((block.verify_tokens(), block.max_tau()), (16, 16));
}

#[test]
fn gpus_are_found_by_name_and_unknown_ones_listed() {
    assert_eq!(gpu("H100").expect("h100").name, "h100");
    let err = gpu("h800").expect_err("unknown").to_string();
    assert!(err.contains("a100, h100, h200, b200, l40s"), "{err}");
    for g in GPUS {
        assert!(g.source.starts_with("https://"), "{}", g.name);
        assert!(g.bf16_flops > 1e14 && g.bandwidth > 1e11, "{}", g.name);
    }
}

#[test]
fn shapes_count_what_a_forward_reads() {
    let t = llama8b();
    let target = ModelShape::target(&t);
    // Llama-3.1-8B: 8.03e9 parameters, the untied input embedding (128256 x 4096) not read
    assert_eq!(t.num_parameters(), 8_030_261_248);
    assert_eq!(target.weight_params, (8_030_261_248i64 - 128256 * 4096) as f64);
    let d = DraftShape::eagle3(&t, 1, 32000);
    // SpecForge's Llama-3.1-8B EAGLE-3 draft: fc 3h->h, one layer with 2h-wide q/k/v, norm, 32000-row head
    let layer = 8192 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096;
    assert_eq!(d.weight_params, (3 * 4096 * 4096 + layer + 4096 + 32000 * 4096) as f64);
    assert_eq!(DraftShape::medusa(&t, 4, 128256).layers, 0);
}

#[test]
fn plain_decoding_is_bandwidth_bound_at_batch_one() {
    let t = ModelShape::target(&llama8b());
    let d = DraftShape::eagle3(&llama8b(), 1, 32000);
    let h100 = gpu("h100").expect("h100");
    let eff = Efficiency::default();
    let p = predict(&t, &d, &Setting::Chain { n: 3 }, 3.0, h100, &serving(1), &eff).expect("predict");
    // 15.0 GB of weights at 0.8 x 3.35 TB/s, plus the KV read and the overhead: about 5.6 ms
    let expect = t.weight_params * 2.0 / (0.8 * 3.35e12);
    assert!(
        p.plain_step_s > expect && p.plain_step_s < expect * 1.05,
        "{}",
        p.plain_step_s
    );
    assert!(!p.verify_compute_bound);
    assert!((p.speedup - p.tokens_per_s / p.plain_tokens_per_s).abs() < 1e-12);
    assert!((p.round_s() - (p.draft_s + p.verify_s + p.host_s)).abs() < 1e-15);
}

#[test]
fn speedup_rises_with_tau_and_falls_with_batch() {
    let cfg = llama8b();
    let (t, d) = (ModelShape::target(&cfg), DraftShape::eagle3(&cfg, 1, 32000));
    let h200 = gpu("h200").expect("h200");
    let eff = Efficiency::default();
    let tree = Setting::parse("tree:steps=5,topk=4,draft_tokens=8").expect("tree");
    let at = |tau: f64, batch: i64| {
        predict(&t, &d, &tree, tau, h200, &serving(batch), &eff)
            .expect("predict")
            .speedup
    };
    assert!(at(3.0, 1) > at(2.0, 1));
    assert!(at(3.0, 1) > at(3.0, 64));
    assert!(at(3.0, 256) < at(3.0, 64));
    // at batch 256 x 8 tokens the verification is compute-bound
    assert!(
        predict(&t, &d, &tree, 3.0, h200, &serving(256), &eff)
            .expect("predict")
            .verify_compute_bound
    );
    // tau 1 (nothing accepted) is always a slowdown
    assert!(at(1.0, 1) < 1.0);
}

#[test]
fn inputs_out_of_range_are_refused() {
    let cfg = llama8b();
    let (t, d) = (ModelShape::target(&cfg), DraftShape::eagle3(&cfg, 1, 32000));
    let h100 = gpu("h100").expect("h100");
    let eff = Efficiency::default();
    let chain = Setting::Chain { n: 3 };
    let err = |tau: f64, s: Serving, e: Efficiency| {
        predict(&t, &d, &chain, tau, h100, &s, &e)
            .expect_err("refused")
            .to_string()
    };
    assert!(err(4.5, serving(1), eff).contains("outside [1, 4]"));
    assert!(err(0.5, serving(1), eff).contains("tau"));
    assert!(err(f64::NAN, serving(1), eff).contains("tau"));
    assert!(err(2.0, serving(0), eff).starts_with("batch"));
    let bad = Efficiency { bandwidth: 1.5, ..eff };
    assert!(err(2.0, serving(1), bad).starts_with("bandwidth efficiency"));
}
