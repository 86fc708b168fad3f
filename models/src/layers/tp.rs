//! Tensor parallelism of a frozen target (Megatron-LM's layout): every rank of a group of
//! `size` holds `1/size` of each layer — its share of the attention heads (q/k/v
//! column-parallel, o_proj row-parallel) and of the MLP's intermediate width (gate/up
//! column-parallel, down_proj row-parallel) — and the sum over the group after each
//! row-parallel projection (one all-reduce after the attention, one after the MLP) gives
//! every rank the full hidden state. The embedding and the lm_head are vocab-parallel: a
//! rank embeds the ids of its vocabulary slice (the others contribute zeros to the sum) and
//! computes the logits of its slice, gathered into the full vocabulary.
//!
//! Forward only: the target is frozen and runs under `no_grad` in every drafter that reads
//! its features (the drafters that train through the target's layers, `TargetNeeds::Model`,
//! need it whole). `TargetConfig::tensor_parallel_shard` gives each rank's layer shapes.

use crate::error::{ModelError, Result};
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// The collectives a tensor-parallel target needs, over the ranks of its group (the trainer
/// implements it with a c10d process group).
pub trait TpComm: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Sums `t` (contiguous) over the group, in place, on every rank.
    fn all_reduce_sum(&self, t: &mut Tensor) -> std::result::Result<(), String>;
    /// `out` (contiguous, `size` times `input`'s elements) receives every rank's `input`,
    /// rank r's at chunk r.
    fn all_gather(&self, out: &mut Tensor, input: &Tensor) -> std::result::Result<(), String>;
}

/// How one weight of a target is split over the ranks of a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Whole on every rank (norms, routers).
    Replicated,
    /// Rank r keeps rows `[r n/size, (r+1) n/size)` of dim 0 (column-parallel outputs, a
    /// vocab slice).
    Dim0,
    /// Rank r keeps columns `[r n/size, (r+1) n/size)` of dim 1 (row-parallel inputs).
    Dim1,
    /// Rank 0 keeps it, the others hold zeros (a row-parallel projection's bias: the sum over
    /// ranks adds it once).
    FirstRank,
}

/// The split of the target weight `name` (its Hugging Face name).
pub fn split_of(name: &str) -> Split {
    const DIM0: &[&str] = &[
        "q_proj.weight",
        "q_proj.bias",
        "k_proj.weight",
        "k_proj.bias",
        "v_proj.weight",
        "v_proj.bias",
        "gate_proj.weight",
        "gate_proj.bias",
        "up_proj.weight",
        "up_proj.bias",
        "embed_tokens.weight",
        "lm_head.weight",
    ];
    const DIM1: &[&str] = &["o_proj.weight", "down_proj.weight"];
    const FIRST: &[&str] = &["o_proj.bias", "down_proj.bias"];
    let is = |set: &[&str]| set.iter().any(|s| name == *s || name.ends_with(&format!(".{s}")));
    if is(DIM0) {
        Split::Dim0
    } else if is(DIM1) {
        Split::Dim1
    } else if is(FIRST) {
        Split::FirstRank
    } else {
        Split::Replicated
    }
}

/// Rank `rank`'s part of the full tensor `t` of weight `name`.
pub fn shard(name: &str, t: &Tensor, rank: usize, size: usize) -> Result<Tensor> {
    let (r, n) = (rank as i64, size as i64);
    let part = |dim: usize| -> Result<Tensor> {
        let len = t.size()[dim];
        if len % n != 0 {
            return Err(ModelError::Invalid(format!(
                "{name}: dimension {dim} of {:?} does not split into {size} equal parts (target.tensor_parallel)",
                t.size()
            )));
        }
        Ok(t.narrow(dim as i64, r * len / n, len / n))
    };
    match split_of(name) {
        Split::Replicated => Ok(t.shallow_clone()),
        Split::Dim0 => part(0),
        Split::Dim1 => part(1),
        Split::FirstRank if rank == 0 => Ok(t.shallow_clone()),
        Split::FirstRank => Ok(t.zeros_like()),
    }
}

/// The tensor-parallel group a target runs in: the collectives, and the first error one of
/// them raised inside a layer (layers return tensors; [`TensorParallel::check`] turns a
/// failed collective into an error after the layer).
pub struct TensorParallel {
    comm: Arc<dyn TpComm>,
    failed: Mutex<Option<String>>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorParallel(rank {} of {})", self.rank(), self.size())
    }
}

impl TensorParallel {
    pub fn new(comm: Arc<dyn TpComm>) -> Arc<Self> {
        Arc::new(Self {
            comm,
            failed: Mutex::new(None),
        })
    }
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    fn fail(&self, e: String) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(e);
        }
    }

    /// The sum of the ranks' partial results `t` (a row-parallel projection's output).
    pub fn reduce(&self, t: Tensor) -> Tensor {
        let mut t = t.detach().contiguous();
        if let Err(e) = self.comm.all_reduce_sum(&mut t) {
            self.fail(format!("all-reduce over the tensor-parallel group failed: {e}"));
        }
        t
    }

    /// The ranks' slices `t` `[.., n]` of the last dimension, concatenated in rank order:
    /// `[.., size * n]` (vocab-parallel logits).
    pub fn gather_last(&self, t: &Tensor) -> Tensor {
        let size = self.size() as i64;
        let shape = t.size();
        let n = *shape.last().unwrap_or(&1);
        let rows = t.numel() as i64 / n.max(1);
        let input = t.detach().contiguous().view([rows, n]);
        // stacked along dim 0 (Gloo's all-gather cuts `out` into `size` chunks of input's shape)
        let mut out = Tensor::empty([size * rows, n], (t.kind(), t.device()));
        if let Err(e) = self.comm.all_gather(&mut out, &input) {
            self.fail(format!("all-gather over the tensor-parallel group failed: {e}"));
        }
        let mut full = shape.clone();
        if let Some(last) = full.last_mut() {
            *last = size * n;
        }
        out.view([size, rows, n]).permute([1, 0, 2]).reshape(full.as_slice())
    }

    /// Returns once every rank of the group has called it (a sum of zeros).
    pub fn sync(&self) -> Result<()> {
        let _ = self.reduce(Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)));
        self.check()
    }

    /// The first collective that failed since the last check, as an error.
    pub fn check(&self) -> Result<()> {
        match self.failed.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(ModelError::Invalid(e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn splits_follow_megatron_column_and_row_parallel_layout() {
        assert_eq!(split_of("model.layers.3.self_attn.q_proj.weight"), Split::Dim0);
        assert_eq!(split_of("model.layers.3.self_attn.k_proj.bias"), Split::Dim0);
        assert_eq!(split_of("model.layers.3.self_attn.o_proj.weight"), Split::Dim1);
        assert_eq!(split_of("model.layers.3.self_attn.o_proj.bias"), Split::FirstRank);
        assert_eq!(split_of("model.layers.3.self_attn.q_norm.weight"), Split::Replicated);
        assert_eq!(split_of("model.layers.0.mlp.up_proj.weight"), Split::Dim0);
        assert_eq!(split_of("model.layers.0.mlp.down_proj.weight"), Split::Dim1);
        assert_eq!(split_of("model.layers.0.mlp.experts.7.gate_proj.weight"), Split::Dim0);
        assert_eq!(split_of("model.layers.0.mlp.gate.weight"), Split::Replicated);
        assert_eq!(split_of("model.layers.0.input_layernorm.weight"), Split::Replicated);
        assert_eq!(split_of("model.embed_tokens.weight"), Split::Dim0);
        assert_eq!(split_of("lm_head.weight"), Split::Dim0);
        assert_eq!(split_of("model.norm.weight"), Split::Replicated);
    }

    #[test]
    fn shards_are_the_slices_and_concatenate_back() {
        let t = Tensor::arange(24, (Kind::Float, Device::Cpu)).view([4, 6]);
        let rows: Vec<Tensor> = (0..2)
            .map(|r| shard("x.q_proj.weight", &t, r, 2).expect("dim 0"))
            .collect();
        assert!(Tensor::cat(&rows, 0).equal(&t));
        assert_eq!(rows[1].double_value(&[0, 0]), 12.0);
        let cols: Vec<Tensor> = (0..3)
            .map(|r| shard("x.down_proj.weight", &t, r, 3).expect("dim 1"))
            .collect();
        assert!(Tensor::cat(&cols, 1).equal(&t));
        assert_eq!(cols[2].size(), [4, 2]);
        let b = Tensor::ones([6], (Kind::Float, Device::Cpu));
        assert!(shard("x.o_proj.bias", &b, 0, 2).expect("rank 0").equal(&b));
        assert_eq!(
            shard("x.o_proj.bias", &b, 1, 2)
                .expect("rank 1")
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        let err = shard("x.q_proj.weight", &t, 0, 3).expect_err("4 rows into 3");
        assert!(err.to_string().contains("tensor_parallel"), "{err}");
    }
}
