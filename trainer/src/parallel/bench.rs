//! `forge bench allreduce` (all-reduce bandwidth over the configured backend) and
//! `forge dist-selftest` (every collective with known numbers, printed as JSON so that the
//! tests can check them). Both run under `forge launch` (or torchrun-style variables).

use super::{Comm, ReduceOp};
use crate::error::Result;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One row of the all-reduce benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub bytes: u64,
    pub seconds: f64,
    /// bytes / seconds.
    pub algbw_gb_s: f64,
    /// algbw * 2 (world-1) / world (the bytes each rank moves in a ring all-reduce).
    pub busbw_gb_s: f64,
}

/// Times fp32 sum all-reduces of each size (MiB), `iters` times after one warm-up, and
/// checks the result (every element = world).
pub fn allreduce(comm: &mut dyn Comm, sizes_mb: &[f64], iters: usize, device: Device) -> Result<Vec<BenchRow>> {
    let w = comm.world() as f64;
    let mut rows = Vec::new();
    for &mb in sizes_mb {
        let n = ((mb * 1024.0 * 1024.0) / 4.0).max(1.0) as i64;
        let mut t = Tensor::ones([n], (Kind::Float, device));
        comm.all_reduce(&mut t, ReduceOp::Sum)?;
        let got = t.min().double_value(&[]);
        if got != w {
            return Err(crate::error::TrainerError::Dist {
                op: "all_reduce".into(),
                message: format!("benchmark check: expected every element = {w}, got min {got}"),
            });
        }
        comm.barrier()?;
        let t0 = Instant::now();
        for _ in 0..iters.max(1) {
            comm.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        comm.barrier()?;
        let seconds = t0.elapsed().as_secs_f64() / iters.max(1) as f64;
        let bytes = (n * 4) as u64;
        let algbw = bytes as f64 / seconds / 1e9;
        rows.push(BenchRow {
            bytes,
            seconds,
            algbw_gb_s: algbw,
            busbw_gb_s: algbw * 2.0 * (w - 1.0) / w,
        });
    }
    Ok(rows)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        &t.to_kind(Kind::Double).to_device(Device::Cpu).view(-1),
    )?)
}

/// Runs each collective on inputs that depend on the rank and returns the results, keyed by
/// collective (rank r's inputs are documented inline; the tests recompute the expected
/// numbers independently).
pub fn selftest(comm: &mut dyn Comm, device: Device) -> Result<serde_json::Value> {
    let r = comm.rank() as f64;
    let w = comm.world() as i64;
    let f32s = |v: &[f64]| Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()).to_device(device);
    // all_reduce sum / max / min of [r+1, 10(r+1), -r]
    let base = [r + 1.0, 10.0 * (r + 1.0), -r];
    let mut sum = f32s(&base);
    comm.all_reduce(&mut sum, ReduceOp::Sum)?;
    let mut max = f32s(&base);
    comm.all_reduce(&mut max, ReduceOp::Max)?;
    let mut min = f32s(&base);
    comm.all_reduce(&mut min, ReduceOp::Min)?;
    // bf16 all_reduce sum of [0.5 (r+1), 2^r]
    let mut bf = f32s(&[0.5 * (r + 1.0), 2f64.powf(r)]).to_kind(Kind::BFloat16);
    comm.all_reduce(&mut bf, ReduceOp::Sum)?;
    // int64 all_reduce sum of [r, 1]
    let mut ints = Tensor::from_slice(&[r as i64, 1]).to_device(device);
    comm.all_reduce(&mut ints, ReduceOp::Sum)?;
    // broadcast from the last rank: [100 + r, r]
    let mut bc = f32s(&[100.0 + r, r]);
    comm.broadcast(&mut bc, (w - 1) as usize)?;
    // all_gather of [r, r + 0.5]
    let mut gathered = Tensor::zeros([2 * w], (Kind::Float, device));
    comm.all_gather(&mut gathered, &f32s(&[r, r + 0.5]))?;
    // reduce_scatter (sum) of [i + 100 r for i in 0..2w]: chunk r of the sum
    let input: Vec<f64> = (0..2 * w).map(|i| i as f64 + 100.0 * r).collect();
    let mut scattered = Tensor::zeros([2], (Kind::Float, device));
    comm.reduce_scatter(&mut scattered, &f32s(&input), ReduceOp::Sum)?;
    // metric-name agreement: rank r knows {"loss", "rank<r>"}
    let mine: std::collections::BTreeSet<String> = ["loss".to_string(), format!("rank{}", comm.rank())]
        .into_iter()
        .collect();
    let union = super::keys::union_keys(comm, &mine)?;
    let fused_vs_per_tensor = serde_json::json!({
        "zero0": fused_optimizer_check(comm, device, 0)?,
        "zero2": fused_optimizer_check(comm, device, 2)?,
    });
    comm.barrier()?;
    Ok(serde_json::json!({
        "union_keys": union,
        "rank": comm.rank(),
        "world": comm.world(),
        "all_reduce_sum": values(&sum)?,
        "all_reduce_max": values(&max)?,
        "all_reduce_min": values(&min)?,
        "all_reduce_bf16": values(&bf)?,
        "all_reduce_int64": values(&ints)?,
        "broadcast": values(&bc)?,
        "all_gather": values(&gathered)?,
        "reduce_scatter": values(&scattered)?,
        "fused_adamw_max_rel_diff": fused_vs_per_tensor,
    }))
}

/// Five steps of the data-parallel optimizer at ZeRO `stage` (fused AdamW, 1 KiB buckets so
/// that parameters split across buckets and ranks) against the per-tensor AdamW given the
/// averaged gradients, clipping active, in two parameter groups. Rank q's gradient at step s
/// is drawn from seed 1000 + 16 s + q, so every rank can also draw every other rank's.
/// Returns `max |fused - reference| / max |reference|` over the parameters.
fn fused_optimizer_check(comm: &mut dyn Comm, device: Device, stage: u32) -> Result<f64> {
    use crate::optim::{max_rel_diff, per_tensor_reference, AdamWConfig, ParamPolicy};
    use forge_models::drafters::ParamGroup;
    let shapes: [&[i64]; 4] = [&[40, 9], &[9], &[300], &[7, 5]];
    let names = ["body.a", "body.b", "head.c", "head.d"];
    let opts = (Kind::Float, device);
    tch::manual_seed(999);
    let init: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, opts)).collect();
    let draw = |step: usize, rank: usize| -> Vec<Tensor> {
        tch::manual_seed(1000 + 16 * step as i64 + rank as i64);
        shapes.iter().map(|s| Tensor::randn(*s, opts) * 0.3).collect()
    };
    let world = comm.world();
    let steps = 5;
    let mean_grads: Vec<Vec<Tensor>> = (0..steps)
        .map(|s| {
            let all: Vec<Vec<Tensor>> = (0..world).map(|q| draw(s, q)).collect();
            (0..shapes.len())
                .map(|i| {
                    all.iter()
                        .map(|g| g[i].shallow_clone())
                        .reduce(|a, b| a + b)
                        .map_or_else(|| init[i].zeros_like(), |t| t / world as f64)
                })
                .collect()
        })
        .collect();
    let group = |name: &str, prefix: &str, lr_scale, weight_decay| ParamGroup {
        name: name.into(),
        prefix: prefix.into(),
        lr_scale,
        weight_decay,
    };
    let policy = ParamPolicy::new(vec![group("body", "", 1.0, true), group("head", "head.", 0.5, false)])?;
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let params: Vec<Tensor> = init.iter().map(|t| t.copy().set_requires_grad(true)).collect();
    let named: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| n.to_string())
        .zip(params.iter().map(Tensor::shallow_clone))
        .collect();
    let rules = policy.rules(&named)?;
    let mut opt = super::zero::DistAdamW::new(named, cfg, &policy, stage, 1.0 / 1024.0, comm)?;
    let max_norm = 2.0;
    for s in 0..steps {
        opt.zero_grad()?;
        let mine = draw(s, comm.rank());
        let loss = params
            .iter()
            .zip(&mine)
            .map(|(p, g)| (p * g).sum(Kind::Float))
            .reduce(|a, b| a + b);
        if let Some(loss) = loss {
            loss.backward();
        }
        opt.step(comm, cfg.lr, max_norm)?;
    }
    let want = per_tensor_reference(&init, &rules, &mean_grads, &cfg, cfg.lr, max_norm);
    Ok(max_rel_diff(&params, &want))
}
