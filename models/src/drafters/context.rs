//! What a drafter's loss is told about the step it runs in: the optimizer step, the total,
//! whether it trains, and a random generator of its own.
//!
//! [`StepRng`] never touches libtorch's process-wide generator. Its numbers are a counter-based
//! hash (computed with integer tensor ops on the tensor's device) of a key made from the run's
//! seed, the optimizer step and the micro-batch's index in the step's *global* batch, so:
//! - they are reproducible (resume gives the same noise as an uninterrupted run);
//! - they do not depend on the rank: W ranks x grad_accum a draw exactly what 1 rank x
//!   grad_accum W*a draws (the global micro-batch index already says which rank runs it);
//! - they are the same on CPU and CUDA, and parallel test threads cannot disturb them.

use crate::llm::TargetModel;
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

/// The step a loss is computed for.
pub struct StepContext<'a> {
    /// 0-based optimizer step.
    pub step: u64,
    /// Steps in the whole run (schedules such as temperature annealing read step / total).
    pub total_steps: u64,
    /// Training (noise, stochastic gates) rather than evaluation.
    pub train: bool,
    pub rng: StepRng,
    /// The live target, for drafters whose spec asks for it (`TargetNeeds::Model`).
    pub target: Option<&'a TargetModel>,
}

impl<'a> StepContext<'a> {
    /// Training at `step` of `total_steps`, for global micro-batch `micro_batch` of the step.
    pub fn train(seed: u64, step: u64, total_steps: u64, micro_batch: u64) -> Self {
        Self {
            step,
            total_steps,
            train: true,
            rng: StepRng::new(seed, step, micro_batch),
            target: None,
        }
    }

    /// The same context with the live target.
    pub fn with_target(mut self, target: Option<&'a TargetModel>) -> Self {
        self.target = target;
        self
    }

    /// Evaluation (no training-only randomness is drawn; the generator is still seeded).
    pub fn eval(seed: u64, step: u64, total_steps: u64) -> Self {
        Self {
            step,
            total_steps,
            train: false,
            rng: StepRng::new(seed, step, u64::MAX),
            target: None,
        }
    }

    /// Progress through the run in [0, 1].
    pub fn progress(&self) -> f64 {
        if self.total_steps == 0 {
            0.0
        } else {
            (self.step as f64 / self.total_steps as f64).clamp(0.0, 1.0)
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A counter-based generator keyed by (seed, step, micro-batch). Every draw uses the next
/// stream of the key, so the n-th draw of a loss is the same wherever and whenever it runs.
#[derive(Debug)]
pub struct StepRng {
    key: u64,
    stream: Cell<u64>,
}

const M32: i64 = 0xFFFF_FFFF;

/// `(x * c) mod 2^32` for `x` in [0, 2^32) held in int64, without overflowing int64.
fn mul32(x: &Tensor, c: u32) -> Tensor {
    let (lo, hi) = ((c & 0xFFFF) as i64, (c >> 16) as i64);
    let a = x * lo;
    let b = (x * hi).bitwise_and(0xFFFF).bitwise_left_shift_tensor_scalar(16);
    (a + b).bitwise_and(M32)
}

/// Chris Wellons' "lowbias32" integer hash on int64 tensors holding 32-bit values.
fn hash32(x: &Tensor) -> Tensor {
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = mul32(&x, 0x7feb_352d);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
    let x = mul32(&x, 0x846c_a68b);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

impl StepRng {
    pub fn new(seed: u64, step: u64, micro_batch: u64) -> Self {
        let key = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ micro_batch);
        Self {
            key,
            stream: Cell::new(0),
        }
    }

    /// 32 random bits an element (as int64 in [0, 2^32)), of `shape`, on `device`; each
    /// call is a new stream.
    fn bits(&self, shape: &[i64], device: Device) -> Tensor {
        let s = self.stream.get();
        self.stream.set(s + 1);
        let k = splitmix64(self.key ^ splitmix64(s));
        let (k1, k2) = ((k & 0xFFFF_FFFF) as i64, (k >> 32) as i64);
        let n: i64 = shape.iter().product();
        let idx = Tensor::arange(n, (Kind::Int64, device));
        let lo = idx.bitwise_and(M32).bitwise_xor(k1);
        let hi = idx.bitwise_right_shift_tensor_scalar(32).bitwise_xor(k2);
        hash32(&hash32(&lo).bitwise_xor_tensor(&hash32(&hi))).view(shape)
    }

    /// Uniform numbers in [0, 1) (24 random bits each), fp32, of `shape`, on `device`.
    pub fn uniform(&self, shape: &[i64], device: Device) -> Tensor {
        self.bits(shape, device)
            .bitwise_right_shift_tensor_scalar(8)
            .to_kind(Kind::Float)
            * (1.0 / (1u64 << 24) as f64)
    }

    /// Standard Gumbel noise `-log(-log(u))` with u uniform in (0, 1), fp32: always finite.
    pub fn gumbel(&self, shape: &[i64], device: Device) -> Tensor {
        gumbel_from_bits(&self.bits(shape, device))
    }
}

/// Gumbel noise from 32-bit random integers. u = (b + 1/2) / 2^23 for the top 23 bits b lies
/// in [2^-24, 1 - 2^-24]; every step is exact in fp32, so u is never 0 or 1 and the noise is
/// never infinite (a 24-bit u plus an offset can round to exactly 1.0).
fn gumbel_from_bits(bits: &Tensor) -> Tensor {
    let u = (bits.bitwise_right_shift_tensor_scalar(9).to_kind(Kind::Float) + 0.5) * (1.0 / (1u64 << 23) as f64);
    -(-u.log()).log()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_numbers_other_key_other_numbers() {
        let a = StepRng::new(7, 3, 1).uniform(&[4, 5], Device::Cpu);
        let b = StepRng::new(7, 3, 1).uniform(&[4, 5], Device::Cpu);
        assert!(a.equal(&b));
        for other in [StepRng::new(8, 3, 1), StepRng::new(7, 4, 1), StepRng::new(7, 3, 2)] {
            assert!(!a.equal(&other.uniform(&[4, 5], Device::Cpu)));
        }
        // the second draw of a generator is a new stream
        let r = StepRng::new(7, 3, 1);
        let first = r.uniform(&[4, 5], Device::Cpu);
        assert!(first.equal(&a));
        assert!(!first.equal(&r.uniform(&[4, 5], Device::Cpu)));
    }

    #[test]
    fn uniforms_are_uniform() {
        let u = StepRng::new(0, 0, 0).uniform(&[200_000], Device::Cpu);
        let lo = u.min().double_value(&[]);
        let hi = u.max().double_value(&[]);
        assert!(lo >= 0.0 && hi < 1.0, "{lo} {hi}");
        let mean = u.mean(Kind::Double).double_value(&[]);
        let var = u.var(true).double_value(&[]);
        // mean 1/2 and variance 1/12; standard errors ~6.5e-4 and ~2e-4
        assert!((mean - 0.5).abs() < 4e-3, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 2e-3, "var {var}");
        // ten equal bins each hold 10% (+- 0.5%), and neighbours are uncorrelated
        let bins = (&u * 10.0).floor().to_kind(Kind::Int64).bincount::<Tensor>(None, 10);
        for i in 0..10 {
            let f = bins.int64_value(&[i]) as f64 / 200_000.0;
            assert!((f - 0.1).abs() < 5e-3, "bin {i}: {f}");
        }
        let a = u.narrow(0, 0, 199_999) - 0.5;
        let b = u.narrow(0, 1, 199_999) - 0.5;
        let corr = (&a * &b).mean(Kind::Double).double_value(&[]) * 12.0;
        assert!(corr.abs() < 0.01, "lag-1 correlation {corr}");
    }

    #[test]
    fn gumbel_noise_is_finite_at_the_extreme_bits() {
        let extremes = Tensor::from_slice(&[0i64, 1, 511, 512, M32 - 512, M32 - 1, M32]);
        let g = gumbel_from_bits(&extremes);
        assert_eq!(g.isfinite().all().int64_value(&[]), 1, "{g}");
        // the largest bits give the largest noise: -ln(-ln(1 - 2^-24)) = 16.64
        let top = g.double_value(&[6]);
        assert!((top - 16.6355).abs() < 1e-2, "{top}");
        // the smallest: -ln(-ln(2^-24)) = -2.8115
        let bottom = g.double_value(&[0]);
        assert!((bottom + 2.8115).abs() < 1e-3, "{bottom}");
    }

    #[test]
    fn gumbel_noise_has_the_gumbel_mean() {
        let g = StepRng::new(1, 2, 3).gumbel(&[100_000], Device::Cpu);
        assert!(g.isfinite().all().int64_value(&[]) == 1);
        // mean = Euler-Mascheroni constant 0.5772, variance pi^2/6 = 1.645
        let mean = g.mean(Kind::Double).double_value(&[]);
        let var = g.var(true).double_value(&[]);
        assert!((mean - 0.5772).abs() < 0.02, "mean {mean}");
        assert!((var - 1.645).abs() < 0.05, "var {var}");
    }
}
