//! Training core + Medusa: the loss numbers, learning on a tiny target, checkpoints and exact
//! resume, interrupted checkpoints, exports.

use forge_models::drafters::medusa::{Medusa, MedusaSpec};
use forge_models::drafters::{Drafter, Features};
use forge_models::safetensors_io::SafetensorsFile;
use forge_tests::{forge, losses, metrics_rows, reinit_trainable, step_weights, TestRng, TinyRun};
use forge_tests::{train_ctx, TargetHeads};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Two Medusa heads of one ResBlock over hidden `h` and vocabulary `v`, with a random target
/// head (returned too) that the per-head lm_heads start from.
fn small_medusa(rng: &mut TestRng, h: i64, v: i64) -> (Medusa, Tensor) {
    let lm = rng.normal_tensor(&[v, h], 1.0);
    let spec = MedusaSpec {
        num_heads: 2,
        num_layers: 1,
        original_lm_head: false,
        loss_decay: 0.8,
        top_k: 3,
        hidden_size: h,
        vocab_size: v,
    };
    let target = TargetHeads {
        lm_head: Some(lm.shallow_clone()),
        embed: None,
    };
    (
        Medusa::new(spec, &target.access(), Device::Cpu, Kind::Float).expect("medusa"),
        lm,
    )
}

#[test]
fn medusa_loss_equals_a_hand_computed_reference() {
    let mut rng = TestRng::new(3);
    let (h, v, b, t) = (8i64, 11i64, 2i64, 6i64);
    let (m, _) = small_medusa(&mut rng, h, v);
    reinit_trainable(m.var_store(), 7);
    // give the ResBlocks non-zero weights so they matter
    tch::no_grad(|| {
        for (name, mut p) in m.var_store().variables() {
            let r = TestRng::for_name(3, &name).normal_tensor(&p.size(), 0.3);
            p.copy_(&(&p + r));
        }
    });
    let vars = m.var_store().variables();
    let hidden = rng.normal_tensor(&[b, t, h], 1.0);
    let ids_v: Vec<i64> = vec![1, 4, 7, 2, 9, 3, 5, 5, 10, 0, 6, 8];
    let mask_v: Vec<i64> = vec![0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1];
    let ids = Tensor::from_slice(&ids_v).view([b, t]);
    let mask = Tensor::from_slice(&mask_v).view([b, t]);
    let f = Features {
        input_ids: ids.shallow_clone(),
        attention_mask: Tensor::ones([b, t], (Kind::Int64, Device::Cpu)),
        position_ids: Tensor::arange(t, (Kind::Int64, Device::Cpu)).repeat([b, 1]),
        loss_mask: mask.shallow_clone(),
        hidden_normed: Some(hidden.shallow_clone()),
        aux_hidden: None,
        target_topk: None,
    };
    let out = m.loss(&f, &train_ctx()).expect("loss");
    // reference: position by position, f64
    let get = |name: &str| vars[name].to_kind(Kind::Double);
    let hid = hidden.to_kind(Kind::Double);
    let mut total = 0.0f64;
    for k in 0..2i64 {
        let (w, bias, head) = (
            get(&format!("blocks.{k}.layers.0.weight")),
            get(&format!("blocks.{k}.layers.0.bias")),
            get(&format!("lm_heads.{k}.weight")),
        );
        let mut ce_sum = 0.0;
        let mut n = 0.0;
        let mut hits = 0.0;
        for r in 0..b {
            for p in 0..t - (k + 2) {
                let label_pos = (r * t + p + k + 2) as usize;
                if mask_v[label_pos] == 0 {
                    continue;
                }
                let x = hid.get(r).get(p);
                let y = &x + (w.mv(&x) + &bias).silu();
                let logits: Vec<f64> = Vec::try_from(&head.mv(&y)).expect("vec");
                let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
                let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
                let label = ids_v[label_pos] as usize;
                ce_sum += lse - logits[label];
                n += 1.0;
                let argmax = (0..logits.len())
                    .max_by(|&a, &c| logits[a].total_cmp(&logits[c]))
                    .expect("max");
                hits += (argmax == label) as i32 as f64;
            }
        }
        let ce = ce_sum / n;
        total += 0.8f64.powi(k as i32 + 1) * ce;
        let part = out
            .parts
            .iter()
            .find(|p| p.name == format!("ce/head{}", k + 1))
            .expect("part");
        assert!((part.value() - ce).abs() < 1e-4, "head {k}: {} vs {ce}", part.value());
        assert_eq!(part.count, n);
        let acc = out
            .metrics
            .iter()
            .find(|p| p.name == format!("acc/head{}", k + 1))
            .expect("acc");
        assert_eq!(acc.sum, hits);
    }
    let got = out.loss.double_value(&[]);
    assert!((got - total).abs() < 1e-4, "{got} vs {total}");
    // gradients reach the heads
    out.loss.backward();
    let g = vars["blocks.0.layers.0.weight"].grad();
    assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

fn setup(name: &str) -> TinyRun {
    TinyRun::new(name, "recipes/medusa-tiny.yaml", false)
}

#[test]
fn medusa_trains_on_a_tiny_target_and_its_loss_falls() {
    let run = setup("train-medusa-falls");
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
    assert_eq!(l.len(), 40, "a row per step (log.every_steps 1)");
    let first: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = l[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(last < first * 0.8, "loss fell from {first:.3} to {last:.3}");
    // the resolved recipe sits next to the checkpoints, with the overrides applied
    let resolved = std::fs::read_to_string(ckpt.join("recipe.resolved.yaml")).expect("resolved");
    assert!(resolved.contains("max_steps: 40"), "{resolved}");
    // metrics rows carry per-head accuracy, lr, grad norm, tokens/s
    let rows = metrics_rows(&ckpt.join("metrics.jsonl"));
    for key in [
        "train/acc/head1",
        "train/top3/head2",
        "train/ce/head1",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_second",
    ] {
        assert!(rows[0].get(key).is_some(), "{key} missing in {}", rows[0]);
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_run_and_skips_broken_checkpoints() {
    let run = setup("train-resume");
    let straight = run.dir.join("straight");
    run.train(
        &straight,
        &["--set", "train.max_steps=10", "--set", "checkpoint.every_steps=5"],
    );
    let l_straight = losses(&straight);
    assert_eq!(l_straight.len(), 10);
    // keep_last 2: steps 5 and 10
    assert!(straight.join("step_5").is_dir() && straight.join("step_10").is_dir());

    // An interrupted run: the same run stopped after step 5 (its step_5 is what a kill after
    // step 5 leaves), with debris of an interrupted checkpoint write at step 10.
    let cut = run.dir.join("cut");
    std::fs::create_dir_all(&cut).expect("mkdir");
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read").flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    };
    copy(&straight.join("step_5"), &cut.join("step_5"));
    let rows: Vec<String> = std::fs::read_to_string(straight.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .take(5)
        .map(str::to_string)
        .collect();
    std::fs::write(cut.join("metrics.jsonl"), rows.join("\n") + "\n").expect("write");
    // a checkpoint interrupted mid-write: temporary folder, and a step folder whose weights
    // are truncated (as if the rename happened but the disk lost data)
    copy(&straight.join("step_10"), &cut.join(".step_10.tmp.999"));
    copy(&straight.join("step_10"), &cut.join("step_9"));
    let w = cut.join("step_9/model.safetensors");
    let bytes = std::fs::read(&w).expect("read");
    std::fs::write(&w, &bytes[..bytes.len() / 2]).expect("truncate");
    let out = run.train(
        &cut,
        &[
            "--set",
            "train.max_steps=10",
            "--set",
            "checkpoint.every_steps=5",
            "--resume",
            "auto",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step_5 (step 5)"), "resumed from step 5: {err}");
    let l_cut = losses(&cut);
    assert_eq!(l_cut, l_straight, "same losses step for step");
    for ((na, a), (nb, b)) in step_weights(&straight.join("step_10"))
        .iter()
        .zip(step_weights(&cut.join("step_10")).iter())
    {
        assert_eq!(na, nb);
        assert!(a.equal(b), "{na} differs after resume");
    }
    let opt_a = SafetensorsFile::open(&straight.join("step_10/optimizer.safetensors"))
        .expect("o")
        .tensors()
        .expect("t");
    let opt_b = SafetensorsFile::open(&cut.join("step_10/optimizer.safetensors"))
        .expect("o")
        .tensors()
        .expect("t");
    assert_eq!(opt_a.len(), opt_b.len());
    for ((na, a), (_, b)) in opt_a.iter().zip(opt_b.iter()) {
        assert!(a.equal(b), "optimizer state {na} differs after resume");
    }
    // the broken ones are cleaned away, the complete ones kept
    assert!(!cut.join(".step_10.tmp.999").exists());
}

fn keys_and_shapes(p: &Path) -> Vec<(String, Vec<i64>)> {
    let mut v: Vec<(String, Vec<i64>)> = SafetensorsFile::open(p)
        .expect("open")
        .tensors()
        .expect("tensors")
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    v.sort();
    v
}

#[test]
fn medusa_exports_for_vllm_original_medusa_and_forge() {
    let run = setup("train-export");
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &["--set", "train.max_steps=2", "--set", "checkpoint.every_steps=2"],
    );
    let (h, v) = (64i64, 49152i64);
    // vLLM
    let vllm = run.dir.join("vllm");
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "vllm",
        "--out",
        vllm.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut want = Vec::new();
    for k in 0..2 {
        want.push((format!("blocks.{k}.layers.0.bias"), vec![h]));
        want.push((format!("blocks.{k}.layers.0.weight"), vec![h, h]));
        want.push((format!("lm_heads.{k}.weight"), vec![v, h]));
    }
    want.sort();
    assert_eq!(keys_and_shapes(&vllm.join("model.safetensors")), want);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vllm.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["architectures"][0], "MedusaModel");
    assert_eq!(cfg["num_heads"], 2);
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_eq!(cfg["hidden_size"], 64);
    assert_eq!(cfg["vocab_size"], 49152);
    assert_eq!(cfg["truncated_vocab_size"], 49152);
    assert_eq!(cfg["medusa_fc_bias"], true);
    assert_eq!(cfg["original_lm_head"], false);
    // vLLM renames config keys containing "num" + "heads"/"layers": only the two it reads
    let risky: Vec<&String> = cfg
        .as_object()
        .expect("obj")
        .keys()
        .filter(|k| k.contains("num") && (k.contains("heads") || k.contains("layers")))
        .collect();
    assert_eq!(risky, ["num_heads", "num_hidden_layers"]);
    let st = SafetensorsFile::open(&vllm.join("model.safetensors")).expect("open");
    let meta = st.metadata().expect("meta");
    assert_eq!(meta.get("format").map(String::as_str), Some("vllm"));
    assert_eq!(meta.get("algorithm").map(String::as_str), Some("medusa"));
    assert!(meta.contains_key("forge_version"));
    assert_eq!(st.tensor("lm_heads.0.weight").expect("t").kind(), Kind::BFloat16);
    // original Medusa
    let orig = run.dir.join("orig");
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "medusa",
        "--out",
        orig.to_str().expect("utf8"),
        "--dtype",
        "fp32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut want = Vec::new();
    for k in 0..2 {
        want.push((format!("{k}.0.linear.bias"), vec![h]));
        want.push((format!("{k}.0.linear.weight"), vec![h, h]));
        want.push((format!("{k}.1.weight"), vec![v, h]));
    }
    want.sort();
    assert_eq!(keys_and_shapes(&orig.join("medusa_lm_head.safetensors")), want);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(orig.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["medusa_num_heads"], 2);
    assert_eq!(cfg["medusa_num_layers"], 1);
    // the tiny target's config.json has no _name_or_path: the target folder trained against
    assert_eq!(cfg["base_model_name_or_path"], run.target.display().to_string());
    // the fp32 export holds exactly the checkpoint's weights under the renamed keys
    let step = ckpt.join("step_2");
    let ck = step_weights(&step);
    let ex = SafetensorsFile::open(&orig.join("medusa_lm_head.safetensors")).expect("open");
    let w = ck.iter().find(|(n, _)| n == "blocks.1.layers.0.weight").expect("w");
    assert!(ex.tensor("1.0.linear.weight").expect("t").equal(&w.1));
    let w = ck.iter().find(|(n, _)| n == "lm_heads.1.weight").expect("w");
    assert!(ex.tensor("1.1.weight").expect("t").equal(&w.1));
    // forge format reloads to the same weights
    let fx = run.dir.join("forge");
    let out = forge(&[
        "export",
        step.to_str().expect("utf8"),
        "--format",
        "forge",
        "--out",
        fx.to_str().expect("utf8"),
        "--dtype",
        "fp32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let re = forge_trainer::engines::load_drafter(&fx, Device::Cpu).expect("reload");
    let mut rw: Vec<(String, Tensor)> = re.drafter.var_store().variables().into_iter().collect();
    rw.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(rw.len(), ck.len());
    for ((na, a), (nb, b)) in rw.iter().zip(ck.iter()) {
        assert_eq!(na, nb);
        assert!(a.equal(b), "{na}");
    }
    // a format that does not fit the drafter is refused with the reason
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "sglang",
        "--out",
        run.dir.join("x").to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be exported as sglang") && err.contains("vllm, medusa"),
        "{err}"
    );
}

#[test]
fn medusa_with_the_shared_target_lm_head_exports_it_for_vllm() {
    let run = setup("train-shared-head");
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=2",
            "--set",
            "drafter.original_lm_head=true",
        ],
    );
    // only the ResBlocks are trained and checkpointed
    let names: Vec<String> = step_weights(&ckpt.join("step_2")).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| n.starts_with("blocks.")), "{names:?}");
    let vllm = run.dir.join("vllm");
    let out = forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        "vllm",
        "--out",
        vllm.to_str().expect("utf8"),
        "--dtype",
        "fp32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = SafetensorsFile::open(&vllm.join("model.safetensors")).expect("open");
    let head = st.tensor("lm_head.weight").expect("lm_head");
    let target = SafetensorsFile::open(&run.target.join("model.safetensors")).expect("t");
    assert!(
        head.equal(&target.tensor("model.embed_tokens.weight").expect("embed")),
        "the target's (tied) head"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vllm.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["original_lm_head"], true);
}

#[test]
fn offline_training_on_hidden_shards_matches_online() {
    let run = setup("train-offline");
    let online = run.dir.join("online");
    run.train(
        &online,
        &["--set", "train.max_steps=3", "--set", "checkpoint.every_steps=3"],
    );
    // one shard holding every sample: the epoch plan is the same as online
    let hidden = run.dir.join("hidden");
    let args = [
        "prepare-hidden".to_string(),
        run.recipe.display().to_string(),
        "--out".into(),
        hidden.display().to_string(),
        "--samples-per-shard".into(),
        "1000".into(),
        "--set".into(),
        format!("target.path={}", run.target.display()),
        "--set".into(),
        format!("data.train=[{}]", run.data.display()),
        "--set".into(),
        format!("data.cache_dir={}", run.dir.join("cache").display()),
    ];
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
        // hidden states stored in bf16: relative differences of ~1e-3
        assert!((x - y).abs() < 2e-2 * x.abs(), "online {x} vs offline {y}");
    }
    assert_ne!(a, b, "offline really read the bf16 shards");
}

#[test]
fn bf16_compute_keeps_fp32_masters_and_tracks_the_fp32_loss() {
    let run = setup("train-bf16");
    let a = run.dir.join("fp32");
    let b = run.dir.join("bf16");
    run.train(&a, &["--set", "train.max_steps=3", "--set", "checkpoint.every_steps=3"]);
    run.train(
        &b,
        &[
            "--set",
            "train.max_steps=3",
            "--set",
            "checkpoint.every_steps=3",
            "--set",
            "train.dtype=bf16",
        ],
    );
    let (la, lb) = (losses(&a), losses(&b));
    for ((_, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 3e-2 * x.abs(), "fp32 {x} vs bf16 {y}");
    }
    assert_ne!(la, lb, "the bf16 run computed in bf16");
    // master weights and optimizer state stay fp32
    for (n, t) in step_weights(&b.join("step_3")) {
        assert_eq!(t.kind(), Kind::Float, "{n}");
    }
}

#[test]
fn a_second_run_without_resume_does_not_overwrite_the_first() {
    let run = setup("train-no-overwrite");
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &["--set", "train.max_steps=1", "--set", "checkpoint.every_steps=1"],
    );
    let before = std::fs::read(ckpt.join("step_1/model.safetensors")).expect("read");
    let out = forge(&[
        "train",
        run.recipe.to_str().expect("utf8"),
        "--set",
        &format!("target.path={}", run.target.display()),
        "--set",
        &format!("data.train=[{}]", run.data.display()),
        "--set",
        &format!("checkpoint.dir={}", ckpt.display()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds checkpoints") && err.contains("--resume auto"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(ckpt.join("step_1/model.safetensors")).expect("read"),
        before
    );
}

/// Medusa's per-head lm_heads start as copies of the target's head: each owns its storage
/// (an fp32 target head on the same device must not be shared by the heads, or one AdamW
/// step would update the same tensor once per head).
#[test]
fn medusa_heads_own_their_storage() {
    let (m, lm) = small_medusa(&mut TestRng::new(4), 8, 11);
    let vars = m.var_store().variables();
    let (a, b) = (&vars["lm_heads.0.weight"], &vars["lm_heads.1.weight"]);
    assert!(a.equal(&lm) && b.equal(&lm), "heads start from the target's lm_head");
    assert_ne!(a.data_ptr(), b.data_ptr());
    assert_ne!(a.data_ptr(), lm.data_ptr());
    tch::no_grad(|| {
        let mut x = a.shallow_clone();
        let _ = x.g_add_scalar_(1.0);
    });
    assert!(b.equal(&lm), "changing head 0 left head 1 alone");
}

#[test]
fn drafters_get_the_target_tensors_or_the_live_model_they_ask_for() {
    use forge_models::drafters::{TargetAccess, TargetNeeds, EMBED, LM_HEAD};
    use forge_trainer::drafter::target_access;
    let dir = forge_tests::tmp_dir("target-access");
    for (model_type, tied) in [("llama", true), ("qwen3", false)] {
        let path = forge_tests::saved_tiny_target(model_type, 5, &dir.join(model_type));
        let live = forge_models::TargetModel::load(&path, forge_models::DType::F32, Device::Cpu).expect("load");
        let cfg = live.config.clone();
        assert_eq!(cfg.tie_word_embeddings, tied);
        // tensors by name, read from the files: a tied target's lm_head is its embedding
        let needs = TargetNeeds::Tensors(vec![LM_HEAD.into(), EMBED.into()]);
        let access = target_access(&path, &cfg, &needs, None).expect("tensors");
        assert!(access
            .require(LM_HEAD, "test")
            .expect("lm_head")
            .equal(live.lm_head_weight()));
        assert!(access.require(EMBED, "test").expect("embed").equal(live.embed_weight()));
        assert!(matches!(
            target_access(&path, &cfg, &TargetNeeds::Nothing, None),
            Ok(TargetAccess::Nothing)
        ));
        // a tensor the target does not have is named
        let missing = TargetNeeds::Tensors(vec!["model.layers.9.mlp.up_proj.weight".into()]);
        let err = target_access(&path, &cfg, &missing, None)
            .err()
            .expect("missing tensor")
            .to_string();
        assert!(err.contains("model.layers.9.mlp.up_proj.weight"), "{err}");
        // the live model: handed over where it is loaded, refused with the fix where not
        match target_access(&path, &cfg, &TargetNeeds::Model, Some(&live)) {
            Ok(TargetAccess::Model(m)) => assert!(std::ptr::eq(m, &live)),
            _ => panic!("the live model was not handed over"),
        }
        let err = target_access(&path, &cfg, &TargetNeeds::Model, None)
            .err()
            .expect("no live model")
            .to_string();
        assert!(err.contains("data.mode: online"), "{err}");
    }
}

#[test]
fn chain_metrics_are_the_shares_of_starts_whose_first_proposals_all_hit() {
    use forge_models::drafters::chain_metrics;
    let b = |v: &[i64]| Tensor::from_slice(v).view([1, -1]).ne(0);
    // 5 chain starts; start 4 is not valid at step 1, so it is not counted
    let hits = [b(&[1, 1, 0, 1, 1]), b(&[1, 0, 1, 1, 1]), b(&[0, 1, 1, 1, 1])];
    let valid = [b(&[1, 1, 1, 1, 1]), b(&[1, 1, 1, 1, 0]), b(&[1, 1, 1, 1, 1])];
    let m = chain_metrics(&hits, &valid);
    let got: Vec<(String, f64, f64)> = m.iter().map(|x| (x.name.clone(), x.sum, x.count)).collect();
    // starts 0..3: step 0 hits 0, 1, 3; steps 0-1 hit 0, 3; steps 0-2 hit 3
    assert_eq!(
        got,
        [
            ("chain/0".into(), 3.0, 4.0),
            ("chain/1".into(), 2.0, 4.0),
            ("chain/2".into(), 1.0, 4.0)
        ]
    );
    let rows: std::collections::BTreeMap<String, f64> =
        m.iter().map(|x| (format!("eval/{}", x.name), x.value())).collect();
    let t = forge_models::drafters::sim_tau(&rows, "eval/").expect("sim_tau");
    assert!((t - (1.0 + 0.75 + 0.5 + 0.25)).abs() < 1e-12);
}

#[test]
fn evaluation_reports_the_simulated_acceptance_and_keeps_the_best_weights() {
    let run = TinyRun::new("train-best", "recipes/medusa-tiny.yaml", true);
    let eval = forge_tests::demo_conversations_subset(&run.dir.join("eval.jsonl"), 6);
    let ckpt = run.dir.join("run");
    let ev = format!("data.eval=[{}]", eval.display());
    run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=6",
            "--set",
            "train.eval_every=2",
            "--set",
            &ev,
            "--set",
            "checkpoint.every_steps=6",
        ],
    );
    let rows: Vec<serde_json::Value> = metrics_rows(&ckpt.join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r.get("eval/sim_tau").is_some())
        .collect();
    // at steps 0 (before training), 2, 4 and 6
    assert_eq!(rows.len(), 4, "{rows:?}");
    let mut best = (f64::MIN, 0);
    for r in &rows {
        let c: Vec<f64> = (0..2)
            .map(|k| r[format!("eval/chain/{k}")].as_f64().expect("chain"))
            .collect();
        assert!(c[1] <= c[0], "a longer chain is accepted in full no more often: {c:?}");
        let t = r["eval/sim_tau"].as_f64().expect("sim_tau");
        assert!((t - (1.0 + c[0] + c[1])).abs() < 1e-9);
        let step = r["step"].as_u64().expect("step");
        if step > 0 && t > best.0 {
            best = (t, step);
        }
    }
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("best/best.json")).expect("best.json")).expect("json");
    assert_eq!(rec["metric"], "eval/sim_tau");
    assert!((rec["value"].as_f64().expect("value") - best.0).abs() < 1e-12);
    assert_eq!(rec["step"], best.1);
    // the best weights export like any checkpoint; resume ignores them
    let out = forge(&[
        "export",
        ckpt.join("best").to_str().expect("utf8"),
        "--format",
        "forge",
        "--out",
        run.dir.join("best-export").to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        forge_trainer::checkpoint::latest(&ckpt)
            .expect("latest")
            .file_name()
            .and_then(|n| n.to_str()),
        Some("step_6")
    );
}

/// Every `forge train` run prints its trainable parameter count at the start; the number is
/// the sum of the elements of the tensors the optimizer updates (one `exp_avg/<name>` moment
/// each in the checkpoint), for every drafter kind with a tiny recipe, and for Medusa also
/// the hand count: per head H^2 + H (one ResBlock) plus V x H without the shared lm_head.
#[test]
fn every_run_prints_its_trainable_parameter_count() {
    let (h, v) = (64i64, 49152i64);
    let cases: [(&str, &str, &[&str], Option<i64>); 6] = [
        (
            "medusa",
            "recipes/medusa-tiny.yaml",
            &[],
            Some(2 * (h * h + h) + 2 * v * h),
        ),
        (
            "medusa-shared",
            "recipes/medusa-tiny.yaml",
            &["drafter.original_lm_head=true"],
            Some(2 * (h * h + h)),
        ),
        ("eagle3", "recipes/eagle3-tiny.yaml", &[], None),
        ("hybrid", "recipes/hybrid-tiny.yaml", &[], None),
        ("spaf", "recipes/spaf-tiny.yaml", &[], None),
        ("spaf-all", "recipes/spaf-tiny.yaml", &["drafter.train_exits=all"], None),
    ];
    for (name, recipe, sets, hand) in cases {
        let run = TinyRun::new(&format!("trainable-{name}"), recipe, false);
        let ckpt = run.dir.join("run");
        let mut extra = vec!["--set", "train.max_steps=1", "--set", "checkpoint.every_steps=1"];
        for s in sets {
            extra.extend(["--set", s]);
        }
        let out = run.train(&ckpt, &extra);
        let text = String::from_utf8_lossy(&out.stderr);
        let line = text
            .lines()
            .find(|l| l.starts_with("trainable parameters: "))
            .unwrap_or_else(|| panic!("{name}: no trainable parameter line in\n{text}"));
        let printed: i64 = line["trainable parameters: ".len()..]
            .split(' ')
            .next()
            .expect("a number")
            .replace(',', "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {line}: {e}"));
        assert!(line.contains("frozen target"), "{line}");
        let opt = SafetensorsFile::open(&ckpt.join("step_1").join("optimizer.safetensors"))
            .expect("optimizer state")
            .tensors()
            .expect("tensors");
        let moments: i64 = opt
            .iter()
            .filter(|(n, _)| n.starts_with("exp_avg/"))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert!(moments > 0, "{name}: no exp_avg moments");
        assert_eq!(printed, moments, "{name}: {line}");
        if let Some(hand) = hand {
            assert_eq!(printed, hand, "{name}: {line}");
        }
    }
}

/// `train.eval_decode`: at every evaluation the draft decodes held-out prompts greedily as it
/// will be served, one curve per setting (a chain and an SGLang tree), in metrics.jsonl (and
/// TensorBoard); a setting that does not parse is a recipe error naming its field.
#[test]
fn evaluation_decodes_held_out_prompts_with_the_served_settings() {
    let run = TinyRun::new("train-served", "recipes/eagle3-tiny.yaml", true);
    let eval = forge_tests::demo_conversations_subset(&run.dir.join("eval.jsonl"), 6);
    let ckpt = run.dir.join("run");
    let ev = format!("data.eval=[{}]", eval.display());
    let tree = "tree:steps=3,topk=2,draft_tokens=5";
    let settings = format!("train.eval_decode=[chain:3, \"{tree}\"]");
    let out = run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=4",
            "--set",
            "train.eval_every=2",
            "--set",
            &ev,
            "--set",
            &settings,
            "--set",
            "train.eval_decode_prompts=3",
            "--set",
            "train.eval_decode_tokens=12",
        ],
    );
    let rows: Vec<serde_json::Value> = metrics_rows(&ckpt.join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r.get("eval/sim_tau").is_some())
        .collect();
    assert_eq!(rows.len(), 3, "evaluations at steps 0, 2 and 4: {rows:?}");
    for r in &rows {
        for (key, most) in [("eval/tau/chain:3".to_string(), 4.0), (format!("eval/tau/{tree}"), 4.0)] {
            let t = r[&key].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"));
            assert!((1.0..=most).contains(&t), "{key} = {t}");
        }
    }
    // the same keys in the resolved recipe's record of what ran
    let resolved = std::fs::read_to_string(ckpt.join("recipe.resolved.yaml")).expect("resolved recipe");
    assert!(
        resolved.contains("eval_decode") && resolved.contains(tree),
        "{resolved}"
    );
    let _ = out;
    // a bad setting is reported with its field before anything runs
    let bad = forge(&[
        "check",
        run.recipe.to_str().expect("utf8"),
        "--recipe-only",
        "--set",
        &ev,
        "--set",
        "train.eval_decode=[\"tree:steps=5,topk=4\"]",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("train.eval_decode[0]") && err.contains("draft_tokens"),
        "{err}"
    );
}
