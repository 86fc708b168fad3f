//! `forge bench train`: the speed and memory of the online training step, the one that runs
//! the frozen target inside every step, for each drafter asked for.
//!
//! Each timed step is what `forge train` does in online mode, through the same functions: the
//! target's forward over a batch and the features the drafter reads
//! (`train::target_features`), the drafter's loss and backward, and the optimizer step
//! (`DistAdamW`, one process). Only the batch is synthetic: `batch` rows of `seq_len` random
//! token ids, every position trained on. The target is a Hugging Face folder or a named shape
//! with random weights built directly on the device (never read from disk), so a Llama-8B
//! shaped target needs no download.
//!
//! Reported per drafter: the median step's time and its phases (target forward with the
//! features, draft forward with the loss, backward, gradient communication, clipping,
//! optimizer update; the device is synchronised between phases, and the phases add up to
//! the step), tokens per second, the peak memory (CUDA: the caching allocator's peak of
//! allocated bytes over the timed steps; CPU: the process's peak resident set), the
//! optimizer's state, and the useful FLOPs: the target forward's, the drafter's
//! ([`forge_models::drafters::Drafter::token_macs`]) and the step's, with the utilisation
//! against a peak given (`--peak-tflops`) or measured by a matmul probe ([`probe_peak`]).
//!
//! Under `forge launch` every rank runs the same steps on its own random batch and the
//! gradients go through the configured ZeRO stage's collectives (the comm phase); rank 0
//! reports.

use crate::error::{Result, TrainerError};
use crate::optim::ParamPolicy;
use crate::parallel::Comm;
use crate::recipe::Recipe;
use crate::train::{compute_kind, optimizer, peak_rss_mb, target_features};
use forge_models::drafters::{PrepareData, StepContext, TargetAccess};
use forge_models::layers::ParamInit;
use forge_models::{synchronize, DType, TargetConfig, TargetModel};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Where the benchmark's target comes from.
#[derive(Debug, Clone)]
pub enum BenchTarget {
    /// A Hugging Face model folder.
    Dir(PathBuf),
    /// A named shape ([`SHAPES`]) with random weights.
    Shape(String),
}

/// The named target shapes `--shape` takes: name, what it is.
pub const SHAPES: &[(&str, &str)] = &[
    (
        "llama3-8b",
        "Llama-3-8B: hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256",
    ),
    (
        "llama2-7b",
        "Llama-2-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000",
    ),
    (
        "qwen3-0.6b",
        "Qwen3-0.6B: hidden 1024, 28 layers, 16/8 heads (head_dim 128), MLP 3072, vocab 151936",
    ),
    (
        "smollm2-135m",
        "SmolLM2-135M: hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152",
    ),
    (
        "tiny",
        "hidden 64, 8 layers, 4/2 heads, MLP 128, vocab 1024 (for tests)",
    ),
];

/// The config.json of a named shape.
pub fn shape_config(name: &str) -> Result<serde_json::Value> {
    let (h, l, nh, kv, mlp, vocab, theta, tie, model_type, head_dim) = match name {
        "llama3-8b" => (4096, 32, 32, 8, 14336, 128256, 500000.0, false, "llama", None),
        "llama2-7b" => (4096, 32, 32, 32, 11008, 32000, 10000.0, false, "llama", None),
        "qwen3-0.6b" => (1024, 28, 16, 8, 3072, 151936, 1000000.0, true, "qwen3", Some(128)),
        "smollm2-135m" => (576, 30, 9, 3, 1536, 49152, 100000.0, true, "llama", None),
        "tiny" => (64, 8, 4, 2, 128, 1024, 10000.0, false, "llama", None),
        other => {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.0).collect();
            return Err(TrainerError::Config(format!(
                "--shape '{other}' is not one of {}",
                names.join(", ")
            )));
        }
    };
    let mut v = serde_json::json!({
        "model_type": model_type,
        "architectures": [if model_type == "qwen3" { "Qwen3ForCausalLM" } else { "LlamaForCausalLM" }],
        "hidden_size": h,
        "num_hidden_layers": l,
        "num_attention_heads": nh,
        "num_key_value_heads": kv,
        "intermediate_size": mlp,
        "vocab_size": vocab,
        "rope_theta": theta,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
    });
    if let Some(d) = head_dim {
        v["head_dim"] = d.into();
    }
    Ok(v)
}

/// Options of one benchmark run.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    pub target: BenchTarget,
    /// Drafter kinds (`eagle3`, `medusa`, ...), each benchmarked with its recipe defaults.
    pub drafters: Vec<String>,
    pub batch: usize,
    pub seq_len: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    pub device: Device,
    /// The target's weight format.
    pub dtype: DType,
    /// The drafter's compute precision, as `train.dtype` takes it (auto, fp32, bf16, fp16).
    pub compute: String,
    /// The device's dense peak in TFLOP/s for the utilisation (0 = measure it with
    /// [`probe_peak`]).
    pub peak_tflops: f64,
    /// ZeRO stage of the optimizer (0, 1, 2; matters under `forge launch`).
    pub zero_stage: u32,
    pub seed: u64,
}

/// One drafter's figures. The step time and its phases are those of the median step.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchRow {
    pub target: String,
    pub drafter: String,
    pub device: String,
    pub target_dtype: String,
    pub compute_dtype: String,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub target_params: i64,
    pub trainable_params: i64,
    /// Data-parallel ranks and the optimizer's ZeRO stage.
    pub world: usize,
    pub zero_stage: u32,
    /// Intra-op threads of this process (torch's).
    pub threads: i32,
    /// The median step's time (target forward + drafter loss, backward, optimizer step).
    pub step_ms: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    /// The target forward (and the features) within the median step.
    pub target_ms: f64,
    /// `step_ms - target_ms`.
    pub drafter_ms: f64,
    /// The other phases of the median step (they add up to `step_ms` with `target_ms`): the
    /// drafter's forward and loss, backward, the gradients' all-reduce / reduce-scatter /
    /// all-gather, clipping, and the rest of the optimizer step (the update, zeroing the
    /// gradients).
    pub draft_forward_ms: f64,
    pub backward_ms: f64,
    pub comm_ms: f64,
    pub clip_ms: f64,
    pub optimizer_ms: f64,
    pub tokens_per_s: f64,
    /// Useful FLOPs of one target forward over the batch (causal attention counted once).
    pub target_flops: f64,
    pub target_tflops_per_s: f64,
    /// `target_tflops_per_s / peak_tflops` (absent without a peak).
    pub target_mfu: Option<f64>,
    /// The drafter's training FLOPs (forward and backward) per token.
    pub draft_flops_per_token: f64,
    /// Useful FLOPs of the whole step: the target forward and the drafter's training.
    pub step_flops: f64,
    pub step_tflops_per_s: f64,
    /// The peak the utilisation is measured against, and where it comes from.
    pub peak_tflops: f64,
    pub peak_source: String,
    /// `step_tflops_per_s / peak_tflops`.
    pub step_utilisation: f64,
    pub peak_mem_mb: f64,
    /// What `peak_mem_mb` measures: `cuda_allocated` or `process_rss`.
    pub peak_mem_kind: String,
    /// Optimizer state this rank holds (both AdamW moments, fp32).
    pub optimizer_state_mb: f64,
}

/// The dense matmul peak of `device` in TFLOP/s, measured: the best of 5 timed products of
/// two square matrices (2048 fp32 on CPU, 8192 in `kind` on CUDA) after one warm-up. What
/// the utilisation of a step is measured against when no `--peak-tflops` is given.
pub fn probe_peak(device: Device, kind: Kind) -> (f64, String) {
    let (n, kind) = if device.is_cuda() {
        (8192, kind)
    } else {
        (2048, Kind::Float)
    };
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let _ = a.matmul(&b);
    synchronize(device);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        let _ = a.matmul(&b);
        synchronize(device);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let tflops = 2.0 * (n as f64).powi(3) / best / 1e12;
    (
        tflops,
        format!(
            "probe: {n}x{n} {} matmul, {} threads",
            kind_name(kind),
            tch::get_num_threads()
        ),
    )
}

/// Useful FLOPs of a target forward over `batch` sequences of `seq` tokens: 2 per weight per
/// token for every projection of every layer, plus causal attention (Q·K and A·V over the
/// T(T+1)/2 visible pairs), plus the output projection when `logits` (the features need
/// the target's top-k).
pub fn target_forward_flops(cfg: &TargetConfig, batch: usize, seq: usize, logits: bool) -> f64 {
    let h = cfg.hidden_size as f64;
    let d = cfg.head_dim as f64;
    let q = cfg.num_heads as f64 * d;
    let kv = cfg.num_kv_heads as f64 * d;
    let proj = h * q + 2.0 * h * kv + q * h + 3.0 * h * cfg.intermediate_size as f64;
    let t = seq as f64;
    let per_layer = 2.0 * proj * t + 2.0 * 2.0 * q * t * (t + 1.0) / 2.0;
    let head = if logits {
        2.0 * h * cfg.vocab_size as f64 * t
    } else {
        0.0
    };
    batch as f64 * (cfg.num_layers as f64 * per_layer + head)
}

/// A draft vocabulary for drafters that want one: the first `size` ids (the benchmark has no
/// data to count; the cost does not depend on which ids they are).
struct FirstIds {
    vocab: usize,
}

impl PrepareData for FirstIds {
    fn vocab_mapping(&mut self, size: usize) -> forge_models::Result<(Vec<i64>, Vec<bool>)> {
        let size = size.min(self.vocab);
        Ok((vec![0; size], (0..self.vocab).map(|i| i < size).collect()))
    }
}

/// One timed step's phases, in milliseconds (they add up to `step`).
#[derive(Debug, Clone, Copy, Default)]
struct StepTimes {
    step: f64,
    target: f64,
    draft: f64,
    backward: f64,
    comm: f64,
    clip: f64,
    optimizer: f64,
}

/// The step of median time (the upper one of the middle two for an even count), whose
/// phases are reported: phases of one step add up to it, medians of each phase would not.
fn median_step(times: &[StepTimes]) -> StepTimes {
    let mut s = times.to_vec();
    s.sort_by(|a, b| a.step.total_cmp(&b.step));
    s.get(s.len() / 2).copied().unwrap_or_default()
}

fn kind_name(k: Kind) -> &'static str {
    DType::of(k).map_or("other", DType::name)
}

/// What [`run_observed`] reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum BenchEvent<'a> {
    /// A remark on the settings (the run goes on).
    Note(&'a str),
    /// A drafter's row, as soon as it is measured.
    Row(&'a TrainBenchRow),
}

/// Runs the benchmark; `on_row` sees each drafter's row as soon as it is measured.
pub fn run(
    opts: &TrainBenchOptions,
    comm: &mut dyn Comm,
    mut on_row: impl FnMut(&TrainBenchRow),
) -> Result<Vec<TrainBenchRow>> {
    run_observed(opts, comm, |e| {
        if let BenchEvent::Row(r) = e {
            on_row(r)
        }
    })
}

/// Runs the benchmark; `on_event` sees its notes and each drafter's row as soon as measured.
pub fn run_observed(
    opts: &TrainBenchOptions,
    comm: &mut dyn Comm,
    mut on_event: impl FnMut(BenchEvent),
) -> Result<Vec<TrainBenchRow>> {
    if opts.batch == 0 || opts.seq_len < 2 || opts.steps == 0 {
        return Err(TrainerError::Config(
            "--batch must be at least 1, --seq-len at least 2 and --steps at least 1".into(),
        ));
    }
    if opts.drafters.is_empty() {
        return Err(TrainerError::Config("--drafter: name at least one drafter kind".into()));
    }
    let device = opts.device;
    tch::manual_seed(opts.seed as i64);
    let (peak_tflops, peak_source) = if opts.peak_tflops > 0.0 {
        (opts.peak_tflops, "--peak-tflops".to_string())
    } else {
        probe_peak(device, opts.dtype.kind())
    };
    let (target, target_name) = match &opts.target {
        BenchTarget::Dir(dir) => (TargetModel::load(dir, opts.dtype, device)?, dir.display().to_string()),
        BenchTarget::Shape(name) => {
            let cfg = TargetConfig::from_value(shape_config(name)?)
                .map_err(|e| TrainerError::Config(format!("--shape {name}: {e}")))?;
            (
                TargetModel::build(cfg, opts.dtype, device, ParamInit::Default),
                format!("{name} (random weights)"),
            )
        }
    };
    let cfg = target.config.clone();
    if opts.seq_len as i64 > cfg.max_position_embeddings.unwrap_or(i64::MAX) {
        on_event(BenchEvent::Note(&format!(
            "--seq-len {} is beyond the target's max_position_embeddings {:?} (timed anyway)",
            opts.seq_len, cfg.max_position_embeddings
        )));
    }
    let target_params: i64 = target.vs.variables().values().map(|t| t.numel() as i64).sum();
    let mut rows = Vec::new();
    for kind in &opts.drafters {
        // The drafter exactly as a recipe with this kind's defaults builds it.
        let text = format!(
            "drafter:\n  kind: {kind}\ntarget:\n  path: bench-target\ndata:\n  train: [bench-data]\ntrain:\n  dtype: {}\ncheckpoint:\n  dir: bench\n",
            opts.compute
        );
        let recipe = Recipe::from_str(&text, &[]).map_err(|issues| {
            let msgs: Vec<String> = issues.iter().map(|i| format!("{}: {}", i.path, i.msg)).collect();
            TrainerError::Config(format!("--drafter {kind}: {}", msgs.join("; ")))
        })?;
        let spec = recipe.drafter.to_spec(&cfg, None)?;
        let compute = compute_kind(&recipe, device);
        let needs = spec.feature_needs();
        let access = TargetAccess::Model(&target);
        let mut drafter = spec.build(&access, device, compute)?;
        drafter.prepare(
            &mut FirstIds {
                vocab: cfg.vocab_size as usize,
            },
            &access,
        )?;
        let mut params: Vec<(String, Tensor)> = drafter
            .var_store()
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let trainable_params: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
        let policy = ParamPolicy::new(drafter.param_groups())?;
        let t = &recipe.train;
        let mut opt = optimizer(&recipe, &params, &policy, opts.zero_stage, comm)?;
        opt.set_phase_timing(true);
        let (b, l) = (opts.batch as i64, opts.seq_len as i64);
        let total = (opts.warmup + opts.steps) as u64;
        let mut times: Vec<StepTimes> = Vec::new();
        // each rank its own batches
        tch::manual_seed(opts.seed as i64 + 7919 * comm.rank() as i64);
        for step in 0..total {
            if step == opts.warmup as u64 {
                crate::parallel::c10d::cuda_reset_peak(device);
            }
            let ids = Tensor::randint(cfg.vocab_size, [b, l], (Kind::Int64, device));
            let ones = Tensor::ones([b, l], (Kind::Int64, device));
            let pos = Tensor::arange(l, (Kind::Int64, device)).unsqueeze(0).repeat([b, 1]);
            synchronize(device);
            let t0 = Instant::now();
            let f = target_features(&target, &needs, ids, ones.shallow_clone(), pos, ones)?;
            synchronize(device);
            let t1 = Instant::now();
            let ctx = StepContext::train(opts.seed, step, total, 0).with_target(Some(&target));
            let out = drafter.loss(&f, &ctx)?;
            synchronize(device);
            let t2 = Instant::now();
            out.loss.backward();
            synchronize(device);
            let t3 = Instant::now();
            opt.step(comm, t.lr, t.max_grad_norm)?;
            opt.zero_grad()?;
            synchronize(device);
            let t5 = Instant::now();
            if step >= opts.warmup as u64 {
                let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
                let p = opt.last_phases();
                // the optimizer phase is what is left of the step after the others, so that
                // the phases add up to the step exactly
                times.push(StepTimes {
                    step: ms(t0, t5),
                    target: ms(t0, t1),
                    draft: ms(t1, t2),
                    backward: ms(t2, t3),
                    comm: p.comm_ms,
                    clip: p.clip_ms,
                    optimizer: ms(t3, t5) - p.comm_ms - p.clip_ms,
                });
            }
        }
        let median_step = median_step(&times);
        let (peak_mem_mb, peak_mem_kind) = match crate::parallel::c10d::cuda_peak_allocated(device) {
            Some(bytes) => (bytes as f64 / (1024.0 * 1024.0), "cuda_allocated"),
            None => (peak_rss_mb(), "process_rss"),
        };
        let med_step = median_step.step;
        let med_target = median_step.target;
        let flops = target_forward_flops(&cfg, opts.batch, opts.seq_len, needs.target_topk > 0);
        let tflops = if med_target > 0.0 {
            flops / (med_target / 1e3) / 1e12
        } else {
            0.0
        };
        let draft_flops_per_token = drafter.token_macs(l).train_flops();
        let step_flops = flops + draft_flops_per_token * (opts.batch * opts.seq_len) as f64;
        let step_tflops = if med_step > 0.0 {
            step_flops / (med_step / 1e3) / 1e12
        } else {
            0.0
        };
        let row = TrainBenchRow {
            target: target_name.clone(),
            drafter: kind.clone(),
            device: format!("{device:?}").to_lowercase(),
            target_dtype: kind_name(target.kind()).into(),
            compute_dtype: kind_name(compute).into(),
            batch: opts.batch,
            seq_len: opts.seq_len,
            steps: opts.steps,
            target_params,
            trainable_params,
            world: comm.world(),
            zero_stage: opts.zero_stage,
            threads: tch::get_num_threads(),
            step_ms: med_step,
            step_ms_min: times.iter().map(|t| t.step).fold(f64::INFINITY, f64::min),
            step_ms_max: times.iter().map(|t| t.step).fold(0.0, f64::max),
            target_ms: med_target,
            drafter_ms: med_step - med_target,
            draft_forward_ms: median_step.draft,
            backward_ms: median_step.backward,
            comm_ms: median_step.comm,
            clip_ms: median_step.clip,
            optimizer_ms: median_step.optimizer,
            tokens_per_s: (opts.batch * opts.seq_len) as f64 / (med_step / 1e3),
            target_flops: flops,
            target_tflops_per_s: tflops,
            target_mfu: Some(tflops / peak_tflops),
            draft_flops_per_token,
            step_flops,
            step_tflops_per_s: step_tflops,
            peak_tflops,
            peak_source: peak_source.clone(),
            step_utilisation: step_tflops / peak_tflops,
            peak_mem_mb,
            peak_mem_kind: peak_mem_kind.into(),
            optimizer_state_mb: opt.state_bytes() as f64 / (1024.0 * 1024.0),
        };
        on_event(BenchEvent::Row(&row));
        rows.push(row);
        drop(opt);
        drop(drafter);
    }
    Ok(rows)
}
