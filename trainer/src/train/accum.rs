//! Sums of a step's (or an evaluation's) loss, metrics and counts over micro-batches and
//! ranks, and what one optimizer step reports.

use crate::error::Result;
use crate::parallel::{keys, Comm, ReduceOp};
use forge_models::drafters::Metric;
use std::collections::{BTreeMap, BTreeSet};
use tch::{Device, Tensor};

/// Sums of loss parts and metrics over micro-batches (and ranks).
#[derive(Default)]
pub(super) struct Accum {
    pub(super) loss_sum: f64,
    pub(super) batches: f64,
    pub(super) tokens: f64,
    /// Samples (rows) trained on.
    pub(super) samples: f64,
    values: BTreeMap<String, (f64, f64)>,
}

impl Accum {
    pub(super) fn add(&mut self, loss: f64, parts: &[Metric], metrics: &[Metric], tokens: usize) {
        self.loss_sum += loss;
        self.batches += 1.0;
        self.tokens += tokens as f64;
        for m in parts.iter().chain(metrics) {
            let e = self.values.entry(m.name.clone()).or_default();
            e.0 += m.sum;
            e.1 += m.count;
        }
    }

    /// Flat vector for an all-reduce, and back.
    fn to_vec(&self) -> Vec<f64> {
        let mut v = vec![self.loss_sum, self.batches, self.tokens, self.samples];
        for (s, c) in self.values.values() {
            v.push(*s);
            v.push(*c);
        }
        v
    }

    fn set_from_vec(&mut self, v: &[f64]) {
        self.loss_sum = v[0];
        self.batches = v[1];
        self.tokens = v[2];
        self.samples = v[3];
        for (i, val) in self.values.values_mut().enumerate() {
            *val = (v[4 + 2 * i], v[5 + 2 * i]);
        }
    }

    /// Sums over ranks: first agree on the union of metric names (a rank may lack some,
    /// e.g. a Medusa head without loss positions, or an empty padded micro-batch), then one
    /// all-reduce of every value.
    pub(super) fn sync(&mut self, comm: &mut dyn Comm) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let mine: BTreeSet<String> = self.values.keys().cloned().collect();
        for k in keys::union_keys(comm, &mine)? {
            self.values.entry(k).or_default();
        }
        let mut t = Tensor::from_slice(&self.to_vec()).to_device(comm.device());
        comm.all_reduce(&mut t, ReduceOp::Sum)?;
        let v = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
        self.set_from_vec(&v);
        Ok(())
    }

    /// Adds another sum (e.g. a step's into the window since the last log row).
    pub(super) fn merge(&mut self, o: &Accum) {
        self.loss_sum += o.loss_sum;
        self.batches += o.batches;
        self.tokens += o.tokens;
        self.samples += o.samples;
        for (k, (s, c)) in &o.values {
            let e = self.values.entry(k.clone()).or_default();
            e.0 += s;
            e.1 += c;
        }
    }

    pub(super) fn scalars(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut out = vec![(format!("{prefix}loss"), self.loss_sum / self.batches.max(1.0))];
        for (k, (s, c)) in &self.values {
            out.push((format!("{prefix}{k}"), if *c > 0.0 { s / c } else { 0.0 }));
        }
        out
    }
}

/// What one optimizer step did.
pub(super) struct StepMetrics {
    /// Loss parts, metrics, tokens and samples summed over the step's micro-batches and the
    /// ranks.
    pub(super) acc: Accum,
    pub(super) lr: f64,
    /// Global gradient norm before clipping.
    pub(super) grad_norm: f64,
}
