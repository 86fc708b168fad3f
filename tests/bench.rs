//! `forge bench train`: the phases of a step add up to it, the FLOPs are the drafter's own
//! count, the utilisation is against the peak given, and under `forge launch` with ZeRO-2
//! the gradients' collectives show in the comm phase and the optimizer state is sharded.

use forge_tests::{forge, tmp_dir};

/// Runs `forge [launch..] bench train --shape tiny --drafter medusa --device cpu ARGS` with
/// `--json` into a fresh folder named `name`; returns its stdout and the JSON rows.
fn bench_tiny_medusa(name: &str, launch: &[&str], args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let json = tmp_dir(name).join("rows.jsonl");
    let json_arg = json.to_str().expect("utf-8");
    let mut all: Vec<&str> = launch.to_vec();
    all.extend([
        "bench",
        "train",
        "--shape",
        "tiny",
        "--drafter",
        "medusa",
        "--device",
        "cpu",
    ]);
    all.extend(args);
    all.extend(["--json", json_arg]);
    let out = forge(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&json).expect("bench json");
    let rows = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), rows)
}

fn f(r: &serde_json::Value, key: &str) -> f64 {
    r[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"))
}

/// Medusa's FLOPs per token on the tiny shape (hidden 64, vocab 1024), by hand: 4 heads, one
/// ResBlock each (64x64 over the target's hidden state: one operand needs a gradient, 2
/// forward + 2 backward FLOPs per MAC) and an own 1024x64 lm_head after it (both operands:
/// 2 + 4), head k trained at T-k-2 of T positions.
fn medusa_tiny_flops_per_token(t: f64) -> f64 {
    let per_head = 4.0 * 64.0 * 64.0 + 6.0 * 1024.0 * 64.0;
    (0..4).map(|k| (t - k as f64 - 2.0) / t * per_head).sum()
}

#[test]
fn bench_train_phases_add_up_and_flops_are_the_drafters_count() {
    let (stdout, rs) = bench_tiny_medusa(
        "bench-phases",
        &[],
        &[
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--peak-tflops",
            "0.5",
        ],
    );
    for col in ["target", "draft fwd", "backward", "comm", "clip", "optimizer", "util"] {
        assert!(stdout.contains(col), "no {col} column in\n{stdout}");
    }
    assert_eq!(rs.len(), 1);
    let r = &rs[0];
    let phases: f64 = [
        "target_ms",
        "draft_forward_ms",
        "backward_ms",
        "comm_ms",
        "clip_ms",
        "optimizer_ms",
    ]
    .iter()
    .map(|k| f(r, k))
    .sum();
    let step = f(r, "step_ms");
    // medians of the phases against the median of the steps: close, not equal
    assert!(
        phases > 0.6 * step && phases < 1.4 * step,
        "phases {phases} ms vs step {step} ms: {r}"
    );
    assert!(f(r, "comm_ms") < 0.05, "one process: no collectives, {r}");
    assert_eq!(r["world"].as_u64(), Some(1));
    let want = medusa_tiny_flops_per_token(32.0);
    assert!(
        (f(r, "draft_flops_per_token") - want).abs() < 1e-6 * want,
        "{} vs {want}",
        r["draft_flops_per_token"]
    );
    let step_flops = f(r, "target_flops") + want * 64.0;
    assert!((f(r, "step_flops") - step_flops).abs() < 1e-6 * step_flops, "{r}");
    let tflops = step_flops / (step / 1e3) / 1e12;
    assert!(
        (f(r, "step_tflops_per_s") - tflops).abs() < 1e-9 * tflops.max(1.0),
        "{r}"
    );
    assert!((f(r, "step_utilisation") - tflops / 0.5).abs() < 1e-9, "{r}");
    assert_eq!(r["peak_source"].as_str(), Some("--peak-tflops"));
    // both AdamW moments of every trainable parameter, fp32
    let state = f(r, "trainable_params") * 8.0 / (1024.0 * 1024.0);
    assert!((f(r, "optimizer_state_mb") - state).abs() < 1e-9, "{r}");
}

#[test]
fn bench_train_without_a_peak_measures_one() {
    let (_, rs) = bench_tiny_medusa(
        "bench-probe",
        &[],
        &["--seq-len", "16", "--steps", "1", "--warmup", "0"],
    );
    let r = &rs[0];
    assert!(
        r["peak_source"]
            .as_str()
            .is_some_and(|s| s.starts_with("probe: 2048x2048 fp32 matmul")),
        "{r}"
    );
    // any CPU does more than 1 GFLOP/s and less than 100 TFLOP/s in fp32
    let peak = f(r, "peak_tflops");
    assert!(peak > 1e-3 && peak < 100.0, "{r}");
}

#[test]
fn bench_train_under_launch_with_zero2_shards_state_and_times_the_collectives() {
    let (_, rs) = bench_tiny_medusa(
        "bench-zero2",
        &["launch", "--nproc", "2", "--"],
        &[
            "--seq-len",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--peak-tflops",
            "1",
            "--zero-stage",
            "2",
        ],
    );
    assert_eq!(rs.len(), 1, "rank 0 alone writes the rows");
    let r = &rs[0];
    assert_eq!(r["world"].as_u64(), Some(2));
    assert_eq!(r["zero_stage"].as_u64(), Some(2));
    assert!(f(r, "comm_ms") > 0.0, "{r}");
    // half of both moments (plus at most the padding to a multiple of the world)
    let half = f(r, "trainable_params") * 8.0 / 2.0 / (1024.0 * 1024.0);
    let got = f(r, "optimizer_state_mb");
    assert!(got >= half && got < half + 1e-3, "{got} vs {half}: {r}");
}

/// Medusa sharing the target's frozen lm_head (`original_lm_head`) holds the target's own
/// tensor when the compute kind is the target's (no copy, none at each use), and casts it
/// once otherwise; the export writes the target's tensor as the target holds it.
#[test]
fn medusa_uses_the_targets_frozen_lm_head_without_a_copy() {
    use forge_models::drafters::medusa::{Medusa, MedusaSpec};
    use forge_models::drafters::{Drafter, ExportFormat, TargetAccess};
    use tch::{Device, Kind};
    for target_kind in [Kind::Float, Kind::BFloat16] {
        let mut t = forge_tests::random_target("llama", 3);
        t.vs.set_kind(target_kind);
        let spec = MedusaSpec {
            num_heads: 2,
            num_layers: 1,
            original_lm_head: true,
            loss_decay: 0.8,
            top_k: 3,
            hidden_size: t.config.hidden_size,
            vocab_size: t.config.vocab_size,
        };
        let head = t.lm_head_weight();
        for compute in [Kind::Float, Kind::BFloat16] {
            let m = Medusa::new(spec.clone(), &TargetAccess::Model(&t), Device::Cpu, compute).expect("medusa");
            let bundle = m.export(ExportFormat::Vllm, &t.config.raw).expect("export");
            let (_, exported) = bundle.tensor_files[0]
                .1
                .iter()
                .find(|(n, _)| n == "lm_head.weight")
                .expect("lm_head.weight exported");
            assert_eq!(exported.kind(), head.kind(), "{compute:?}");
            assert_eq!(exported.kind(), target_kind);
            assert_eq!(
                exported.data_ptr(),
                head.data_ptr(),
                "{compute:?}: the export copied the target's lm_head"
            );
        }
    }
}
