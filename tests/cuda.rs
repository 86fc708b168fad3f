//! Tests for a CUDA device, all `#[ignore]`d in the normal suite (CI has no GPU).
//! scripts/device-check.sh runs them on the GPU machine: `forge-tests --ignored cuda::` with
//! FORGE_TEST_DEVICE=cuda (the default); its CPU rehearsal runs them with
//! FORGE_TEST_DEVICE=cpu, which checks the tests themselves. They build everything in
//! process (tiny random targets under the system's temp folder), so the test binary runs
//! from any folder.

use forge_models::drafters::{Drafter, Features};
use forge_models::generate::{generate, GenerateOptions};
use forge_models::speculative::{greedy_divergence, speculative_generate, SpecOptions};
use forge_models::{parse_device, Capture, DType, LogitsMode, TargetModel};
use forge_tests::random_target;
use forge_trainer::bench_train::{self, target_forward_flops, BenchTarget, TrainBenchOptions};
use forge_trainer::parallel::{bench, c10d};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// FORGE_TEST_DEVICE (default cuda).
fn device() -> Device {
    let name = std::env::var("FORGE_TEST_DEVICE").unwrap_or_else(|_| "cuda".into());
    parse_device(&name).unwrap_or_else(|e| {
        panic!(
            "FORGE_TEST_DEVICE={name}: {e} (these tests are for the GPU machine; FORGE_TEST_DEVICE=cpu rehearses them)"
        )
    })
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("forge-cuda-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// `t` (built on the CPU) loaded on `device` in `dtype`, through a saved HF folder.
fn moved(t: &TargetModel, name: &str, dtype: DType, device: Device) -> TargetModel {
    let dir = scratch(name);
    t.save_hf(&dir).expect("save");
    let m = TargetModel::load(&dir, dtype, device).expect("load on the device");
    let _ = std::fs::remove_dir_all(&dir);
    m
}

fn ids(device: Device) -> Tensor {
    let v: Vec<i64> = (0..24).map(|i| (i * 37 + 11) % 96).collect();
    Tensor::from_slice(&v).view([2, 12]).to_device(device)
}

/// Largest |a - b| over the largest |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

fn logits(t: &TargetModel, ids: &Tensor) -> Tensor {
    let out = tch::no_grad(|| t.forward(ids, None, None, None, &Capture::logits(LogitsMode::All))).expect("forward");
    out.logits.expect("logits")
}

#[test]
#[ignore = "needs a GPU"]
fn target_forward_on_the_device_matches_the_cpu() {
    let dev = device();
    for model_type in ["llama", "qwen3"] {
        let cpu = random_target(model_type, 31);
        let want = logits(&cpu, &ids(Device::Cpu));
        let fp32 = moved(&cpu, "fp32", DType::F32, dev);
        let got = logits(&fp32, &ids(dev));
        let r = rel(&got, &want);
        // TF32 is off by default in libtorch: fp32 matmuls are fp32
        assert!(r < 1e-4, "{model_type} fp32 on {dev:?}: relative difference {r}");
        let bf16 = moved(&cpu, "bf16", DType::BF16, dev);
        let got = logits(&bf16, &ids(dev));
        let r = rel(&got, &want);
        assert!(r < 0.06, "{model_type} bf16 on {dev:?}: relative difference {r}");
        let agree = got
            .to_device(Device::Cpu)
            .argmax(-1, false)
            .eq_tensor(&want.argmax(-1, false))
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(
            agree > 0.8,
            "{model_type} bf16 on {dev:?}: arg-max agrees at {agree:.2} of positions"
        );
        eprintln!("{model_type}: fp32 and bf16 on {dev:?} match the CPU (bf16 relative difference {r:.4}, arg-max agreement {agree:.2})");
    }
}

/// Greedy decoding with the KV cache on the device gives the CPU's tokens, or departs only at
/// a near-tie of the CPU's two best logits.
#[test]
#[ignore = "needs a GPU"]
fn greedy_decoding_with_a_cache_on_the_device_matches_the_cpu() {
    let dev = device();
    let cpu = random_target("llama", 32);
    let on_dev = moved(&cpu, "gen", DType::F32, dev);
    let opts = GenerateOptions {
        max_new_tokens: 40,
        ..Default::default()
    };
    for prompt in [vec![1i64, 17, 42, 5, 66, 23], vec![3, 80, 80, 12]] {
        let want = generate(&cpu, &prompt, &opts, |_| {}).expect("cpu").tokens;
        let got = generate(&on_dev, &prompt, &opts, |_| {}).expect("device").tokens;
        if let Some(i) = (0..want.len().min(got.len())).find(|&i| want[i] != got[i]) {
            let seq: Vec<i64> = prompt.iter().chain(&want[..i]).copied().collect();
            let l = logits(&cpu, &Tensor::from_slice(&seq).view([1, -1])).get(0).get(-1);
            let top = l.topk(2, -1, true, true).0;
            let gap = top.double_value(&[0]) - top.double_value(&[1]);
            assert!(
                gap < 1e-3,
                "token {i} differs ({} vs {}) with a logit gap of {gap} on the CPU",
                want[i],
                got[i]
            );
        } else {
            assert_eq!(got.len(), want.len());
        }
    }
}

fn features(t: &TargetModel, ids: &Tensor) -> Features {
    let dev = t.device();
    let (b, n) = (ids.size()[0], ids.size()[1]);
    let cap = Capture {
        layers: vec![0, 1],
        logits: LogitsMode::None,
    };
    let out = tch::no_grad(|| t.forward(ids, None, None, None, &cap)).expect("forward");
    Features {
        input_ids: ids.shallow_clone(),
        attention_mask: ids.ones_like(),
        position_ids: Tensor::arange(n, (Kind::Int64, dev)).unsqueeze(0).repeat([b, 1]),
        loss_mask: ids.ones_like(),
        hidden_normed: Some(out.hidden_normed.to_kind(Kind::Float)),
        aux_hidden: Some(Tensor::cat(&out.layers, -1).to_kind(Kind::Float)),
        target_topk: None,
    }
}

#[test]
#[ignore = "needs a GPU"]
fn eagle3_loss_and_gradients_on_the_device_match_the_cpu() {
    let dev = device();
    let cpu_t = random_target("llama", 33);
    let dev_t = moved(&cpu_t, "eagle3", DType::F32, dev);
    let on_cpu = crate::eval::eagle3_on(&cpu_t, Device::Cpu);
    let on_dev = crate::eval::eagle3_on(&dev_t, dev);
    let checked = same_loss_and_gradients(&on_cpu, &cpu_t, &on_dev, &dev_t);
    assert!(checked > 5, "only {checked} trainable tensors compared");
}

/// The loss of `on_cpu` over `cpu_t`'s features equals that of `on_dev` over `dev_t`'s (the
/// same weights on the device), within 1e-4, and so do the gradients of every trainable
/// tensor, within 1e-3 relative; returns how many tensors were compared.
fn same_loss_and_gradients(
    on_cpu: &dyn Drafter,
    cpu_t: &TargetModel,
    on_dev: &dyn Drafter,
    dev_t: &TargetModel,
) -> usize {
    let dev = dev_t.device();
    let ctx = forge_tests::train_ctx();
    let a = on_cpu
        .loss(&features(cpu_t, &ids(Device::Cpu)), &ctx)
        .expect("cpu loss");
    let b = on_dev.loss(&features(dev_t, &ids(dev)), &ctx).expect("device loss");
    let (la, lb) = (a.loss.double_value(&[]), b.loss.double_value(&[]));
    assert!(
        (la - lb).abs() <= 1e-4 * la.abs().max(1.0),
        "loss {la} on the CPU, {lb} on {dev:?}"
    );
    a.loss.backward();
    b.loss.backward();
    let gb = on_dev.var_store().variables();
    let mut checked = 0;
    for (name, p) in on_cpu.var_store().variables().iter().filter(|(_, p)| p.requires_grad()) {
        let r = rel(&gb[name].grad(), &p.grad());
        assert!(r < 1e-3, "gradient of {name}: relative difference {r} on {dev:?}");
        checked += 1;
    }
    checked
}

#[test]
#[ignore = "needs a GPU"]
fn greedy_speculative_decoding_on_the_device_is_lossless() {
    let dev = device();
    let cpu_t = random_target("llama", 34);
    for dtype in [DType::F32, DType::BF16] {
        let t = moved(&cpu_t, "spec", dtype, dev);
        let d = crate::eval::eagle3_on(&t, dev);
        for gamma in [1usize, 5, 7] {
            for prompt in [vec![1i64, 17, 42, 5, 66, 23], vec![1, 9]] {
                lossless_on_device(&t, &d, dtype, gamma, &prompt);
            }
        }
    }
}

/// The knowledge drafter (random weights, blocks and cache) on the device: its loss and
/// gradients match the CPU's, and greedy speculative decoding with it is lossless in fp32 and
/// bf16.
#[test]
#[ignore = "needs a GPU"]
fn knowledge_drafter_on_the_device_matches_the_cpu_and_decodes_losslessly() {
    use forge_models::drafters::knowledge::Knowledge;
    use forge_models::drafters::TargetAccess;
    let dev = device();
    let cpu_t = random_target("llama", 35);
    let dev_t = moved(&cpu_t, "knowledge", DType::F32, dev);
    let s = crate::knowledge::spec(&cpu_t, vec![0, 1], Some((12, 16)));
    let on_cpu = crate::knowledge::with_random_cache(&cpu_t, vec![0, 1]);
    let copy_to = |t: &TargetModel, kind: Kind| {
        let m = Knowledge::new(s.clone(), &TargetAccess::Model(t), t.device(), kind).expect("knowledge on the device");
        let src = on_cpu.var_store().variables();
        tch::no_grad(|| {
            for (n, mut v) in m.var_store().variables() {
                v.copy_(&src[&n].to_device(v.device()));
            }
        });
        m
    };
    let on_dev = copy_to(&dev_t, Kind::Float);
    let checked = same_loss_and_gradients(&on_cpu, &cpu_t, &on_dev, &dev_t);
    assert!(checked > 20, "only {checked} trainable tensors compared");
    for dtype in [DType::F32, DType::BF16] {
        let t = moved(&cpu_t, "knowledge-spec", dtype, dev);
        let d = copy_to(&t, dtype.kind());
        for gamma in [1usize, 5] {
            lossless_on_device(&t, &d, dtype, gamma, &[1, 17, 42, 5, 66, 23]);
        }
    }
}

/// Greedy speculative decoding of 32 tokens with `d` on `t` equals plain greedy decoding, or
/// departs only at a tie of the target's two best logits (fp32 on a GPU: one-row and
/// several-row matrix products may round apart by more than 4 ulps, so there a gap below
/// 1e-3 counts too).
fn lossless_on_device(t: &TargetModel, d: &dyn Drafter, dtype: DType, gamma: usize, prompt: &[i64]) {
    let plain = generate(
        t,
        prompt,
        &GenerateOptions {
            max_new_tokens: 32,
            ..Default::default()
        },
        |_| {},
    )
    .expect("plain")
    .tokens;
    let mut s = d.session(t).expect("session");
    let opts = SpecOptions {
        gamma,
        max_new_tokens: 32,
        ..Default::default()
    };
    let got = speculative_generate(t, s.as_mut(), &d.spec().feature_needs(), prompt, &opts).expect("speculative");
    if let Some(x) = greedy_divergence(t, prompt, &plain, &got.tokens).expect("divergence") {
        let near = x.tie || (dtype == DType::F32 && x.gap.abs() < 1e-3);
        assert!(near, "{dtype:?} gamma {gamma} on {:?}: {x:?}", t.device());
        eprintln!("{dtype:?} gamma {gamma}: departs at a tie ({x:?})");
    }
}

/// c10d with one rank on the device: NCCL on CUDA (Gloo on the CPU) rendezvouses, runs every
/// collective with known numbers, and is torn down cleanly (twice in a row).
#[test]
#[ignore = "needs a GPU"]
fn c10d_world_of_one_runs_every_collective_on_the_device() {
    let dev = device();
    let kind = if dev.is_cuda() {
        c10d::BackendKind::Nccl
    } else {
        c10d::BackendKind::Gloo
    };
    let comm_dev = if dev.is_cuda() { dev } else { Device::Cpu };
    for round in 0..2 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let mut pg = c10d::ProcessGroup::new(
            "127.0.0.1",
            port,
            0,
            1,
            std::time::Duration::from_secs(60),
            kind,
            false,
            comm_dev,
        )
        .unwrap_or_else(|e| panic!("{} world 1 on {comm_dev:?}: {e}", kind.name()));
        let v = bench::selftest(&mut pg, comm_dev).expect("selftest");
        assert_eq!(v["world"], 1, "{v}");
        assert_eq!(v["all_reduce_sum"], serde_json::json!([1.0, 10.0, 0.0]), "{v}");
        assert_eq!(v["all_reduce_max"], serde_json::json!([1.0, 10.0, 0.0]), "{v}");
        assert_eq!(v["all_reduce_min"], serde_json::json!([1.0, 10.0, 0.0]), "{v}");
        assert_eq!(v["all_reduce_bf16"], serde_json::json!([0.5, 1.0]), "{v}");
        assert_eq!(v["all_reduce_int64"], serde_json::json!([0.0, 1.0]), "{v}");
        assert_eq!(v["broadcast"], serde_json::json!([100.0, 0.0]), "{v}");
        assert_eq!(v["all_gather"], serde_json::json!([0.0, 0.5]), "{v}");
        assert_eq!(v["reduce_scatter"], serde_json::json!([0.0, 1.0]), "{v}");
        drop(pg);
        eprintln!("{} world 1 on {comm_dev:?}: round {round} ok", kind.name());
    }
}

/// `forge bench train`'s figures on the device are consistent: tokens/s is the batch over the
/// step time, the FLOPs are the hand count, the peak memory is the CUDA allocator's on a GPU
/// and holds at least the target's weights.
#[test]
#[ignore = "needs a GPU"]
fn bench_train_on_the_device_reports_consistent_figures() {
    let dev = device();
    let opts = TrainBenchOptions {
        target: BenchTarget::Shape("tiny".into()),
        drafters: vec!["eagle3".into(), "medusa".into()],
        batch: 2,
        seq_len: 64,
        steps: 3,
        warmup: 1,
        device: dev,
        dtype: if dev.is_cuda() { DType::BF16 } else { DType::F32 },
        compute: "auto".into(),
        peak_tflops: 100.0,
        zero_stage: 0,
        seed: 0,
    };
    let rows = bench_train::run(&opts, &mut forge_trainer::parallel::SingleProcess, |_| {}).expect("bench");
    assert_eq!(rows.len(), 2);
    let cfg = forge_models::TargetConfig::from_value(bench_train::shape_config("tiny").expect("shape")).expect("cfg");
    for r in &rows {
        assert!(r.step_ms > 0.0 && r.target_ms > 0.0 && r.target_ms < r.step_ms, "{r:?}");
        let tokens = r.tokens_per_s * r.step_ms / 1e3;
        assert!((tokens - 128.0).abs() < 1e-6, "{r:?}");
        assert_eq!(r.target_flops, target_forward_flops(&cfg, 2, 64, false));
        let mfu = r.target_mfu.expect("mfu");
        assert!((mfu - r.target_tflops_per_s / 100.0).abs() < 1e-12);
        let weights_mb = r.target_params as f64 * if dev.is_cuda() { 2.0 } else { 4.0 } / (1024.0 * 1024.0);
        assert!(r.peak_mem_mb >= weights_mb, "{r:?}");
        assert_eq!(
            r.peak_mem_kind,
            if dev.is_cuda() { "cuda_allocated" } else { "process_rss" }
        );
        assert!(r.trainable_params > 0);
    }
}
