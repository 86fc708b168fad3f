//! Data-parallel gradient synchronisation and (optionally) sharded AdamW state: ZeRO stages
//! 0, 1 and 2 over a [`Comm`].
//!
//! The trainable parameters (sorted by name) are laid end to end in one flat index space
//! of `total` elements, padded to a multiple of the world size and cut into buckets of about
//! `dist.bucket_mb` (each a multiple of the world size). Rank r owns the r-th 1/world of
//! every bucket, so its optimizer state is `padded / world` fp32 elements per moment.
//!
//! - stage 0: bucketed all-reduce (sum, then / world) of the gradients, then the ordinary
//!   replicated [`AdamW`] (clipping included) on every rank;
//! - stage 1: the same all-reduce, then each rank updates only its slices of the parameters
//!   with its shard of the state (each slice at its parameter's learning-rate scale and
//!   weight decay, from the [`ParamPolicy`]), and an all-gather per bucket rebuilds the
//!   parameters;
//! - stage 2: a reduce-scatter per bucket instead of the all-reduce (each rank receives only
//!   its slice of the averaged gradients), the global gradient norm from an all-reduce of the
//!   shards' squared norms, then the stage-1 update and all-gather.
//!
//! Checkpoints: stage 0 saves `exp_avg/<param>` / `exp_avg_sq/<param>` (full, rank 0);
//! stages 1-2 save each rank's pieces as `exp_avg/<param>@<offset>` (1-d, offset into the
//! flattened parameter), one file per rank. [`assemble_full_state`] turns any set of pieces
//! back into full tensors, which is what lets a run resume with another world size or stage.
//!
//! One file over ~500 lines: the three ZeRO stages share one bucket walk and one state layout.

use super::layout::{gather_flat, scatter_flat, Layout, Segment};
use super::{Comm, ReduceOp};
use crate::error::{Result, TrainerError};
use crate::optim::{clip_coef, fused, AdamW, AdamWConfig, ParamPolicy, ParamRule};
use std::collections::BTreeMap;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const EXP_AVG: &str = "exp_avg/";
const EXP_AVG_SQ: &str = "exp_avg_sq/";

/// Gives every parameter a defined (zero) gradient, so that every rank takes part in every
/// collective with the same tensors even when a parameter got no gradient on some rank.
pub fn materialize_grads(params: &[Tensor]) {
    if params.iter().all(|p| p.grad().defined()) {
        return;
    }
    let zero = params
        .iter()
        .filter(|p| !p.grad().defined())
        .map(|p| (p * 0.0).sum(Kind::Float))
        .reduce(|a, b| a + b);
    if let Some(z) = zero {
        z.backward();
    }
}

enum State {
    /// Stage 0: replicated AdamW.
    Replicated(AdamW),
    /// Stages 1-2: this rank's shard of both moments.
    Sharded {
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        segments: Vec<Segment>,
        step: u64,
    },
}

/// AdamW with data-parallel gradient averaging and ZeRO-sharded state.
pub struct DistAdamW {
    cfg: AdamWConfig,
    stage: u32,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Learning-rate scale and weight decay of each parameter (what the policy decided).
    rules: Vec<ParamRule>,
    layout: Layout,
    state: State,
    device: Device,
    /// Time each phase of [`DistAdamW::step`] (synchronising the device between phases).
    timing: bool,
    phases: StepPhases,
}

/// Where the last [`DistAdamW::step`] spent its time, in milliseconds, when phase timing is on
/// ([`DistAdamW::set_phase_timing`]; all zero otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepPhases {
    /// All-reduce, reduce-scatter and all-gather, with the copies into and out of buckets.
    pub comm_ms: f64,
    /// The global gradient norm (and its all-reduce under ZeRO-2) and the scaling.
    pub clip_ms: f64,
    /// The AdamW update.
    pub update_ms: f64,
}

/// Laps between phases: the device is synchronised first so that the time is the work's.
struct Clock {
    on: bool,
    device: Device,
    last: Instant,
}

impl Clock {
    fn start(on: bool, device: Device) -> Self {
        if on {
            forge_models::synchronize(device);
        }
        Clock {
            on,
            device,
            last: Instant::now(),
        }
    }

    /// Milliseconds since the last lap (0 when timing is off).
    fn lap(&mut self) -> f64 {
        if !self.on {
            return 0.0;
        }
        forge_models::synchronize(self.device);
        let now = Instant::now();
        let ms = (now - self.last).as_secs_f64() * 1e3;
        self.last = now;
        ms
    }
}

impl DistAdamW {
    /// params: (name, fp32 trainable variable), sorted the same way on every rank; `policy`
    /// gives each its learning-rate scale and weight decay (a parameter no group matches is
    /// an error).
    pub fn new(
        params: Vec<(String, Tensor)>,
        cfg: AdamWConfig,
        policy: &ParamPolicy,
        stage: u32,
        bucket_mb: f64,
        comm: &dyn Comm,
    ) -> Result<DistAdamW> {
        if stage > 2 {
            return Err(TrainerError::Config(format!(
                "dist.zero_stage must be 0, 1 or 2, got {stage}"
            )));
        }
        let device = params.first().map_or(Device::Cpu, |(_, p)| p.device());
        if stage > 0 {
            if let Some((n, p)) = params.iter().find(|(_, p)| p.kind() != Kind::Float) {
                return Err(TrainerError::Config(format!(
                    "dist.zero_stage {stage} needs fp32 master weights, parameter {n} is {:?}: use dist.zero_stage 0",
                    p.kind()
                )));
            }
        }
        // parameters sharing storage would be updated once per name (and rebuilt by the
        // all-gather from different slices): refuse them
        let mut seen: BTreeMap<usize, &str> = BTreeMap::new();
        for (n, p) in &params {
            let ptr = p.data_ptr() as usize;
            if let Some(other) = seen.insert(ptr, n) {
                return Err(TrainerError::Config(format!(
                    "trainable parameters {other} and {n} share storage: the drafter must give each parameter its own tensor"
                )));
            }
        }
        let numels: Vec<i64> = params.iter().map(|(_, p)| p.numel() as i64).collect();
        let bucket_elems = ((bucket_mb * 1024.0 * 1024.0) / 4.0).max(1.0) as i64;
        let layout = Layout::new(&numels, bucket_elems, comm.rank(), comm.world());
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let rules = policy.rules(&params)?;
        if comm.world() > 1 || stage > 0 {
            materialize_grads(&tensors);
        }
        let state = if stage == 0 {
            State::Replicated(AdamW::new(params, cfg, policy)?)
        } else {
            let s = layout.shard_len();
            State::Sharded {
                exp_avg: Tensor::zeros([s], (Kind::Float, device)),
                exp_avg_sq: Tensor::zeros([s], (Kind::Float, device)),
                segments: layout.shard_segments(),
                step: 0,
            }
        };
        Ok(DistAdamW {
            cfg,
            stage,
            names,
            params: tensors,
            rules,
            layout,
            state,
            device,
            timing: false,
            phases: StepPhases::default(),
        })
    }

    /// Times the phases of every following step (synchronising the device between them: for
    /// benchmarks, not for training).
    pub fn set_phase_timing(&mut self, on: bool) {
        self.timing = on;
    }

    /// The phases of the last step (zero unless phase timing is on).
    pub fn last_phases(&self) -> StepPhases {
        self.phases
    }

    pub fn stage(&self) -> u32 {
        self.stage
    }

    pub fn step_count(&self) -> u64 {
        match &self.state {
            State::Replicated(a) => a.step_count(),
            State::Sharded { step, .. } => *step,
        }
    }

    /// Bytes of optimizer state this rank holds (both moments, fp32).
    pub fn state_bytes(&self) -> u64 {
        match &self.state {
            State::Replicated(a) => a.state_bytes(),
            State::Sharded {
                exp_avg, exp_avg_sq, ..
            } => ((exp_avg.numel() + exp_avg_sq.numel()) * 4) as u64,
        }
    }

    /// Drops every gradient (torch's `set_to_none=True`): the next backward writes fresh
    /// gradients instead of adding to zeros. [`DistAdamW::step`] gives a parameter that got
    /// no gradient a zero one first, so the step is the one zeroed gradients would give.
    pub fn zero_grad(&mut self) -> Result<()> {
        fused::release_grads(&self.params)
    }

    fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.grad()).collect()
    }

    /// Averages the full gradients over ranks with one all-reduce per bucket.
    fn all_reduce_grads(&mut self, comm: &mut dyn Comm) -> Result<()> {
        let world = comm.world();
        if world == 1 {
            return Ok(());
        }
        let grads = self.grads();
        for &(s, l) in &self.layout.buckets {
            let mut flat = gather_flat(&self.layout, &grads, s, l, self.device);
            comm.all_reduce(&mut flat, ReduceOp::Sum)?;
            let flat = flat / world as f64;
            scatter_flat(&self.layout, &grads, s, &flat);
        }
        Ok(())
    }

    /// Synchronises gradients, clips them to `max_norm` (global norm, <= 0: no clipping) and
    /// takes one AdamW step at `lr`. Returns the gradient norm before clipping. Every rank
    /// must call it at the same step.
    pub fn step(&mut self, comm: &mut dyn Comm, lr: f64, max_norm: f64) -> Result<f64> {
        // every parameter has a gradient (zero when it got none: every rank sends the same
        // buckets, and the update is the one zeroed gradients would give)
        materialize_grads(&self.params);
        let mut clock = Clock::start(self.timing, self.device);
        let mut phases = StepPhases::default();
        let norm = self.step_timed(comm, lr, max_norm, &mut clock, &mut phases)?;
        self.phases = phases;
        Ok(norm)
    }

    fn step_timed(
        &mut self,
        comm: &mut dyn Comm,
        lr: f64,
        max_norm: f64,
        clock: &mut Clock,
        phases: &mut StepPhases,
    ) -> Result<f64> {
        if self.stage == 0 {
            self.all_reduce_grads(comm)?;
            phases.comm_ms += clock.lap();
            let State::Replicated(opt) = &mut self.state else {
                unreachable!("stage 0 holds a replicated AdamW")
            };
            let norm = opt.clip_grad_norm(max_norm)?;
            phases.clip_ms += clock.lap();
            opt.step(lr)?;
            phases.update_ms += clock.lap();
            return Ok(norm);
        }
        let world = comm.world() as f64;
        // this rank's slice of the averaged gradients
        let shard_len = self.layout.shard_len();
        let grad_shard = if self.stage == 1 {
            self.all_reduce_grads(comm)?;
            let grads = self.grads();
            let g = Tensor::zeros([shard_len], (Kind::Float, self.device));
            for k in 0..self.layout.buckets.len() {
                let (s, l, off) = self.layout.piece(k);
                tch::no_grad(|| {
                    g.narrow(0, off, l)
                        .copy_(&gather_flat(&self.layout, &grads, s, l, self.device))
                });
            }
            g
        } else {
            let grads = self.grads();
            let g = Tensor::zeros([shard_len], (Kind::Float, self.device));
            for (k, &(s, l)) in self.layout.buckets.iter().enumerate() {
                let flat = gather_flat(&self.layout, &grads, s, l, self.device);
                let (_, part, off) = self.layout.piece(k);
                let mut out = g.narrow(0, off, part);
                comm.reduce_scatter(&mut out, &flat, ReduceOp::Sum)?;
            }
            tch::no_grad(|| g / world)
        };
        phases.comm_ms += clock.lap();
        // global norm: the shards partition the flat gradient (padding is zero)
        let norm = if self.stage == 2 {
            let mut sq =
                Tensor::from_slice(&[fused::sq_norm(std::slice::from_ref(&grad_shard))?]).to_device(self.device);
            comm.all_reduce(&mut sq, ReduceOp::Sum)?;
            sq.double_value(&[0]).sqrt()
        } else {
            // stage 1 holds the full averaged gradients: the norm from them, as stage 0
            fused::sq_norm(&self.grads())?.sqrt()
        };
        let coef = clip_coef(norm, max_norm);
        if coef != 1.0 {
            fused::mul_(std::slice::from_ref(&grad_shard), coef)?;
        }
        phases.clip_ms += clock.lap();
        let cfg = self.cfg;
        let State::Sharded {
            exp_avg,
            exp_avg_sq,
            segments,
            step,
        } = &mut self.state
        else {
            unreachable!("stages 1-2 hold a sharded state")
        };
        *step += 1;
        let t = *step;
        // one fused kernel per (lr scale, decay) over this rank's slices; a segment is a run of
        // one parameter, so its parameter's rule applies
        tch::no_grad(|| -> Result<()> {
            let mut done = vec![false; segments.len()];
            for first in 0..segments.len() {
                if done[first] {
                    continue;
                }
                let rule = self.rules[segments[first].param];
                let (mut p, mut g, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (i, seg) in segments.iter().enumerate().skip(first) {
                    let r = self.rules[seg.param];
                    if done[i] || r.lr_scale != rule.lr_scale || r.decay != rule.decay {
                        continue;
                    }
                    done[i] = true;
                    p.push(self.params[seg.param].view(-1).narrow(0, seg.param_offset, seg.len));
                    g.push(grad_shard.narrow(0, seg.shard_offset, seg.len));
                    m.push(exp_avg.narrow(0, seg.shard_offset, seg.len));
                    v.push(exp_avg_sq.narrow(0, seg.shard_offset, seg.len));
                }
                fused::adamw(&p, &g, &m, &v, t, lr * rule.lr_scale, &cfg, rule.decay)?;
            }
            Ok(())
        })?;
        phases.update_ms += clock.lap();
        // rebuild the full parameters on every rank
        for k in 0..self.layout.buckets.len() {
            let (s, l) = self.layout.buckets[k];
            let (ps, part, _) = self.layout.piece(k);
            let mine = gather_flat(&self.layout, &self.params, ps, part, self.device);
            let mut full = Tensor::zeros([l], (Kind::Float, self.device));
            comm.all_gather(&mut full, &mine)?;
            scatter_flat(&self.layout, &self.params, s, &full);
        }
        phases.comm_ms += clock.lap();
        Ok(norm)
    }

    /// The optimizer tensors this rank saves: stage 0 the full state (names as [`AdamW`]'s),
    /// stages 1-2 this rank's pieces `exp_avg/<param>@<offset>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match &self.state {
            State::Replicated(a) => a.state_tensors(),
            State::Sharded {
                exp_avg,
                exp_avg_sq,
                segments,
                ..
            } => {
                let mut out = Vec::with_capacity(2 * segments.len());
                for seg in segments {
                    let name = &self.names[seg.param];
                    for (prefix, t) in [(EXP_AVG, exp_avg), (EXP_AVG_SQ, exp_avg_sq)] {
                        out.push((
                            format!("{prefix}{name}@{}", seg.param_offset),
                            t.narrow(0, seg.shard_offset, seg.len).copy(),
                        ));
                    }
                }
                out
            }
        }
    }

    /// Restores full-shaped state (`exp_avg/<param>`, `exp_avg_sq/<param>`, as produced by
    /// [`assemble_full_state`]) at optimizer step `step`: stage 0 loads it whole, stages 1-2
    /// take this rank's slices.
    pub fn load_full_state(&mut self, tensors: &[(String, Tensor)], step: u64) -> Result<()> {
        match &mut self.state {
            State::Replicated(a) => a.load_state(tensors, step),
            State::Sharded {
                exp_avg,
                exp_avg_sq,
                segments,
                step: s,
            } => {
                let by_name: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
                for (i, name) in self.names.iter().enumerate() {
                    for prefix in [EXP_AVG, EXP_AVG_SQ] {
                        let key = format!("{prefix}{name}");
                        let t = by_name
                            .get(key.as_str())
                            .ok_or_else(|| TrainerError::OptimizerState(format!("missing tensor {key}")))?;
                        if t.size() != self.params[i].size() {
                            return Err(TrainerError::OptimizerState(format!(
                                "tensor {key} has shape {:?}, the parameter has {:?}",
                                t.size(),
                                self.params[i].size()
                            )));
                        }
                    }
                }
                if by_name.len() != 2 * self.names.len() {
                    if let Some(n) = by_name.keys().find(|n| {
                        let p = n
                            .strip_prefix(EXP_AVG_SQ)
                            .or_else(|| n.strip_prefix(EXP_AVG))
                            .unwrap_or("");
                        !self.names.iter().any(|x| x == p)
                    }) {
                        return Err(TrainerError::OptimizerState(format!(
                            "unexpected tensor {n} (no such parameter)"
                        )));
                    }
                }
                tch::no_grad(|| {
                    for seg in segments.iter() {
                        let name = &self.names[seg.param];
                        for (prefix, dst) in [(EXP_AVG, &*exp_avg), (EXP_AVG_SQ, &*exp_avg_sq)] {
                            let src = by_name[format!("{prefix}{name}").as_str()];
                            let src = src.to_device(dst.device()).to_kind(Kind::Float);
                            dst.narrow(0, seg.shard_offset, seg.len).copy_(&src.view(-1).narrow(
                                0,
                                seg.param_offset,
                                seg.len,
                            ));
                        }
                    }
                });
                *s = step;
                Ok(())
            }
        }
    }
}

/// Full-shaped optimizer state from a checkpoint's tensors: full tensors pass through;
/// pieces `exp_avg/<param>@<offset>` (from every rank's shard file) are placed into zeroed
/// tensors of the parameter's shape. `shapes`: parameter name -> shape. Errors when the
/// pieces do not cover every element exactly once.
pub fn assemble_full_state(
    tensors: Vec<(String, Tensor)>,
    shapes: &BTreeMap<String, Vec<i64>>,
) -> Result<Vec<(String, Tensor)>> {
    if !tensors.iter().any(|(n, _)| n.contains('@')) {
        return Ok(tensors);
    }
    let err = |m: String| TrainerError::OptimizerState(m);
    let mut full: BTreeMap<String, (Tensor, i64)> = BTreeMap::new();
    for (name, t) in tensors {
        let Some((key, off)) = name.rsplit_once('@') else {
            return Err(err(format!(
                "tensor {name}: a sharded checkpoint mixes full and sharded tensors"
            )));
        };
        let off: i64 = off.parse().map_err(|_| err(format!("tensor {name}: bad offset")))?;
        let param = key
            .strip_prefix(EXP_AVG_SQ)
            .or_else(|| key.strip_prefix(EXP_AVG))
            .unwrap_or("");
        let shape = shapes
            .get(param)
            .ok_or_else(|| err(format!("unexpected tensor {name} (no such parameter)")))?;
        let numel: i64 = shape.iter().product();
        let len = t.numel() as i64;
        if off < 0 || off + len > numel {
            return Err(err(format!(
                "tensor {name}: elements {off}..{} outside the parameter's {numel}",
                off + len
            )));
        }
        let entry = full
            .entry(key.to_string())
            .or_insert_with(|| (Tensor::zeros([numel], (Kind::Float, Device::Cpu)), 0));
        tch::no_grad(|| entry.0.narrow(0, off, len).copy_(&t.view(-1).to_kind(Kind::Float)));
        entry.1 += len;
    }
    let mut out = Vec::with_capacity(full.len());
    for (key, (t, covered)) in full {
        let param = key
            .strip_prefix(EXP_AVG_SQ)
            .or_else(|| key.strip_prefix(EXP_AVG))
            .unwrap_or("");
        let shape = &shapes[param];
        let numel: i64 = shape.iter().product();
        if covered != numel {
            return Err(err(format!(
                "tensor {key}: the shard files cover {covered} of {numel} elements (a rank's optimizer shard is missing)"
            )));
        }
        out.push((key, t.view(shape.as_slice())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }

    /// w [3,3] and b [4] with fixed values; the loss sum(w*gw) + sum(b*gb) * k has the
    /// gradients gw, gb * k.
    /// (Fixed values, not the global RNG: unit tests run in parallel threads and reseeding
    /// libtorch's generator from another test would change them.)
    fn params() -> Vec<(String, Tensor)> {
        let b = Tensor::from_slice(&[0.3f32, -1.2, 0.7, 2.0]);
        let w = (Tensor::arange(9, (Kind::Float, Device::Cpu)).view([3, 3]) * 0.37).sin();
        vec![
            ("b".to_string(), b.set_requires_grad(true)),
            ("w".to_string(), w.set_requires_grad(true)),
        ]
    }

    fn backward(ps: &[(String, Tensor)], k: f64) {
        let gw = Tensor::arange(9, (Kind::Float, Device::Cpu)).view([3, 3]) - 4.0;
        let gb = Tensor::from_slice(&[3.0f32, -1.0, 0.5, 2.0]);
        let loss = (&ps[1].1 * gw).sum(Kind::Float) + (&ps[0].1 * gb).sum(Kind::Float) * k;
        loss.backward();
    }

    fn run(stage: u32, bucket_mb: f64, steps: usize) -> (Vec<(String, Tensor)>, DistAdamW) {
        run_with(&ParamPolicy::default(), stage, bucket_mb, steps)
    }

    fn run_with(policy: &ParamPolicy, stage: u32, bucket_mb: f64, steps: usize) -> (Vec<(String, Tensor)>, DistAdamW) {
        let ps = params();
        let mut comm = crate::parallel::SingleProcess;
        let mut opt = DistAdamW::new(
            ps.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            cfg(),
            policy,
            stage,
            bucket_mb,
            &comm,
        )
        .expect("optimizer");
        for i in 0..steps {
            backward(&ps, 1.0 + i as f64);
            // clipping active: the gradient norm is ~8-10
            opt.step(&mut comm, 0.05, 5.0).expect("step");
            opt.zero_grad().expect("zero_grad");
        }
        (ps, opt)
    }

    #[test]
    fn sharded_stages_on_one_rank_equal_the_replicated_optimizer() {
        let (p0, o0) = run(0, 25.0, 3);
        // 4-element buckets: parameters split across buckets
        for stage in [1, 2] {
            let (p, o) = run(stage, 16.0 / (1024.0 * 1024.0), 3);
            for ((n, a), (_, b)) in p0.iter().zip(&p) {
                let d = (a - b).abs().max().double_value(&[]);
                // the fused kernel over slices rounds its vector tails apart from the whole
                // tensors' (an ulp at most)
                assert!(d < 1e-6, "stage {stage}: {n} differs by {d}");
            }
            assert_eq!(o.step_count(), 3);
            // 13 elements, world 1: the whole state, no padding
            assert_eq!(o.state_bytes(), o0.state_bytes());
            assert_eq!(o.state_bytes(), 2 * 13 * 4);
        }
    }

    #[test]
    fn sharded_stages_on_one_rank_with_groups_equal_the_replicated_optimizer() {
        use forge_models::drafters::ParamGroup;
        let group = |name: &str, prefix: &str, lr_scale: f64, weight_decay: bool| ParamGroup {
            name: name.into(),
            prefix: prefix.into(),
            lr_scale,
            weight_decay,
        };
        // w (the matrix) in its own group: once at a quarter of the rate with decay, once at
        // three times the rate without; b at twice the rate
        for w_group in [group("w", "w", 0.25, true), group("w", "w", 3.0, false)] {
            let policy = ParamPolicy::new(vec![
                group("rest", "", 1.0, true),
                group("b", "b", 2.0, true),
                w_group.clone(),
            ])
            .expect("policy");
            let (p0, _) = run_with(&policy, 0, 25.0, 3);
            // the groups matter: stage 0 with them differs from stage 0 without
            let (plain, _) = run(0, 25.0, 3);
            for ((n, a), (_, b)) in p0.iter().zip(&plain) {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d > 1e-3, "{n}: the groups changed nothing ({d})");
            }
            // 4-element buckets: parameters split across buckets, each segment at its
            // parameter's rate and decay
            for stage in [1, 2] {
                let (p, _) = run_with(&policy, stage, 16.0 / (1024.0 * 1024.0), 3);
                for ((n, a), (_, b)) in p0.iter().zip(&p) {
                    let d = (a - b).abs().max().double_value(&[]);
                    assert!(d < 1e-6, "stage {stage}, {w_group:?}: {n} differs by {d}");
                }
            }
        }
        // a parameter no group matches: refused at every stage
        let only_w = ParamPolicy::new(vec![group("w", "w", 1.0, true)]).expect("policy");
        for stage in [0, 1, 2] {
            let e = DistAdamW::new(params(), cfg(), &only_w, stage, 25.0, &crate::parallel::SingleProcess)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("trainable parameter b matches no optimizer parameter group"),
                "stage {stage}: {e}"
            );
        }
    }

    #[test]
    fn sharded_state_saved_as_pieces_resumes_in_a_replicated_optimizer() {
        let shapes: BTreeMap<String, Vec<i64>> = params().into_iter().map(|(n, t)| (n, t.size())).collect();
        // reference: 4 replicated steps
        let (p_ref, _) = run(0, 25.0, 4);
        // 3 sharded steps, save pieces, load into a fresh stage-0 optimizer, 1 more step
        let (p, o) = run(2, 16.0 / (1024.0 * 1024.0), 3);
        let pieces = o.state_tensors();
        assert!(
            pieces.iter().all(|(n, _)| n.contains('@')),
            "pieces are named <moment>/<param>@<offset>"
        );
        let full = assemble_full_state(pieces, &shapes).expect("assemble");
        let mut comm = crate::parallel::SingleProcess;
        let mut again = DistAdamW::new(
            p.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            cfg(),
            &ParamPolicy::default(),
            0,
            25.0,
            &comm,
        )
        .expect("optimizer");
        again.load_full_state(&full, 3).expect("load");
        backward(&p, 4.0);
        again.step(&mut comm, 0.05, 5.0).expect("step");
        for ((n, a), (_, b)) in p_ref.iter().zip(&p) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-7, "{n} differs by {d} after resuming");
        }
    }

    #[test]
    fn parameters_sharing_storage_are_refused() {
        let w = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let alias = w.detach().set_requires_grad(true);
        let e = DistAdamW::new(
            vec![("a".into(), w), ("b".into(), alias)],
            cfg(),
            &ParamPolicy::default(),
            1,
            25.0,
            &crate::parallel::SingleProcess,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("a and b share storage"), "{e}");
    }

    #[test]
    fn assembling_pieces_restores_full_tensors_and_detects_gaps() {
        let shapes: BTreeMap<String, Vec<i64>> = [("w".to_string(), vec![2, 2])].into_iter().collect();
        let piece = |name: &str, vals: &[f32]| (name.to_string(), Tensor::from_slice(vals));
        let got = assemble_full_state(
            vec![
                piece("exp_avg/w@0", &[1.0, 2.0]),
                piece("exp_avg/w@2", &[3.0, 4.0]),
                piece("exp_avg_sq/w@0", &[5.0, 6.0, 7.0]),
                piece("exp_avg_sq/w@3", &[8.0]),
            ],
            &shapes,
        )
        .expect("assemble");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "exp_avg/w");
        assert_eq!(
            Vec::<f32>::try_from(got[0].1.view(-1)).expect("vec"),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(got[1].1.size(), vec![2, 2]);
        assert_eq!(
            Vec::<f32>::try_from(got[1].1.view(-1)).expect("vec"),
            vec![5.0, 6.0, 7.0, 8.0]
        );
        let e = assemble_full_state(vec![piece("exp_avg/w@0", &[1.0, 2.0])], &shapes)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cover 2 of 4"), "{e}");
    }
}
