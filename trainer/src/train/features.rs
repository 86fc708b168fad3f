//! Target features of a micro-batch: computed by the frozen target inside the step
//! (online) or read from hidden-state shards (offline), and the data plan of each source.

use super::{Source, Trainer};
use crate::error::{Result, TrainerError};
use crate::recipe::Recipe;
use forge_data::batch::{global_plan, global_plan_grouped, PlanOptions};
use forge_data::hidden::HiddenDataset;
use forge_data::{Batch, TokenDataset};
use forge_models::drafters::{FeatureNeeds, Features};
use forge_models::{Capture, LogitsMode, TargetModel};
use tch::{Device, Kind, Tensor};

impl Source {
    fn lengths(&self) -> Vec<usize> {
        match self {
            Source::Online { data, .. } => data.lengths(),
            Source::Offline { data } => data.lengths(),
        }
    }

    /// The epoch's micro-batches in their global order (before sharding over ranks).
    pub(super) fn global_plan(&self, recipe: &Recipe, epoch: u64) -> Vec<Vec<usize>> {
        let t = &recipe.train;
        let opts = PlanOptions {
            micro_batch_size: t.micro_batch_size.max(1) as usize,
            seed: t.seed,
            shuffle: true,
            length_grouping: true,
        };
        let lengths = self.lengths();
        match self {
            Source::Online { .. } => global_plan(&lengths, epoch, &opts),
            Source::Offline { data } => global_plan_grouped(&lengths, &data.shard_ranges(), epoch, &opts),
        }
    }
}

impl Trainer<'_> {
    /// Target features of a micro-batch of token samples (online).
    pub(super) fn online_features(
        target: &TargetModel,
        needs: &FeatureNeeds,
        data: &TokenDataset,
        idx: &[usize],
        device: Device,
    ) -> Result<(Features, usize)> {
        let samples: Vec<(&[u32], &[u8])> = idx.iter().map(|&i| (data.input_ids(i), data.mask(i))).collect();
        let batch = Batch::collate(&samples, 0);
        let (ids, am, pos, lm) = batch_tensors(&batch, device);
        Ok((target_features(target, needs, ids, am, pos, lm)?, batch.tokens()))
    }

    fn offline_features(
        data: &mut HiddenDataset,
        needs: &FeatureNeeds,
        idx: &[usize],
        device: Device,
    ) -> Result<(Features, usize)> {
        let s = data.settings().clone();
        let h = s.hidden_size as i64;
        let a = (s.aux_layers.len() * s.hidden_size) as i64;
        let k = s.topk as i64;
        let mut rows = Vec::with_capacity(idx.len());
        for &i in idx {
            let v = data.sample(i)?;
            let t = v.input_ids.len() as i64;
            let hid =
                (!v.hidden_state.is_empty()).then(|| Tensor::from_data_size(v.hidden_state, &[t, h], Kind::BFloat16));
            let aux = (!v.aux_hidden_state.is_empty())
                .then(|| Tensor::from_data_size(v.aux_hidden_state, &[t, a], Kind::BFloat16));
            let topk = (needs.target_topk > 0 && k > 0).then(|| {
                let lp = Tensor::from_data_size(v.topk_logprobs, &[t, k], Kind::BFloat16);
                let ids = Tensor::from_slice(v.topk_ids).view([t, k]).to_kind(Kind::Int64);
                (lp, ids)
            });
            rows.push((v.input_ids.to_vec(), v.loss_mask.to_vec(), hid, aux, topk));
        }
        let samples: Vec<(&[u32], &[u8])> = rows.iter().map(|r| (&r.0[..], &r.1[..])).collect();
        let batch = Batch::collate(&samples, 0);
        let l = batch.len as i64;
        let pad = |parts: Vec<Option<&Tensor>>, width: i64| -> Option<Tensor> {
            if parts.iter().any(|p| p.is_none()) {
                return None;
            }
            let padded: Vec<Tensor> = parts
                .into_iter()
                .flatten()
                .map(|t| {
                    let n = t.size()[0];
                    if n == l {
                        t.shallow_clone()
                    } else {
                        Tensor::cat(
                            &[
                                t.shallow_clone(),
                                Tensor::zeros([l - n, width], (Kind::BFloat16, Device::Cpu)),
                            ],
                            0,
                        )
                    }
                })
                .collect();
            Some(Tensor::stack(&padded, 0).to_device(device).to_kind(Kind::Float))
        };
        let hidden = pad(rows.iter().map(|r| r.2.as_ref()).collect(), h);
        let aux = pad(rows.iter().map(|r| r.3.as_ref()).collect(), a);
        // the drafter's top-k (the shards may hold more); padded rows: log-prob 0, id 0
        let want = needs.target_topk as i64;
        let target_topk = if want > 0 {
            let (mut lps, mut idss) = (Vec::new(), Vec::new());
            for r in &rows {
                let (lp, ids) = r.4.as_ref().ok_or_else(|| {
                    TrainerError::Config(
                        "the hidden-state shards hold no target top-k: run forge prepare-hidden with this recipe"
                            .into(),
                    )
                })?;
                let n = lp.size()[0];
                lps.push(Tensor::cat(
                    &[
                        lp.to_kind(Kind::Float),
                        Tensor::zeros([l - n, k], (Kind::Float, Device::Cpu)),
                    ],
                    0,
                ));
                idss.push(Tensor::cat(
                    &[
                        ids.shallow_clone(),
                        Tensor::zeros([l - n, k], (Kind::Int64, Device::Cpu)),
                    ],
                    0,
                ));
            }
            let lp = Tensor::stack(&lps, 0).narrow(2, 0, want).to_device(device);
            let ids = Tensor::stack(&idss, 0).narrow(2, 0, want).to_device(device);
            Some((lp, ids))
        } else {
            None
        };
        let (ids, am, pos, lm) = batch_tensors(&batch, device);
        Ok((
            Features {
                input_ids: ids,
                attention_mask: am,
                position_ids: pos,
                loss_mask: lm,
                hidden_normed: hidden,
                aux_hidden: aux,
                target_topk,
            },
            batch.tokens(),
        ))
    }

    pub(super) fn features(&mut self, idx: &[usize]) -> Result<(Features, usize)> {
        let device = self.device;
        match &mut self.source {
            Source::Online { target, data } => Self::online_features(target, &self.needs, data, idx, device),
            Source::Offline { data } => Self::offline_features(data, &self.needs, idx, device),
        }
    }
}

/// The frozen target's forward over a batch (no gradients) and the features the drafter
/// needs from it: what online training computes inside every step (and `forge bench train`
/// times). Right padding under a causal mask: real tokens never attend to padding.
pub(crate) fn target_features(
    target: &TargetModel,
    needs: &FeatureNeeds,
    ids: Tensor,
    am: Tensor,
    pos: Tensor,
    lm: Tensor,
) -> Result<Features> {
    let capture = Capture {
        layers: needs.aux_layers.clone(),
        logits: LogitsMode::None,
    };
    let out = tch::no_grad(|| target.forward(&ids, None, None, None, &capture))?;
    let aux_hidden = (!out.layers.is_empty()).then(|| Tensor::cat(&out.layers, -1));
    let target_topk = (needs.target_topk > 0).then(|| {
        tch::no_grad(|| {
            let logp = target
                .logits(&out.hidden_normed)
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float);
            logp.topk(needs.target_topk as i64, -1, true, true)
        })
    });
    Ok(Features {
        input_ids: ids,
        attention_mask: am,
        position_ids: pos,
        loss_mask: lm,
        hidden_normed: Some(out.hidden_normed),
        aux_hidden,
        target_topk,
    })
}

fn batch_tensors(b: &Batch, device: Device) -> (Tensor, Tensor, Tensor, Tensor) {
    let shape = [b.batch as i64, b.len as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    (
        t(&b.input_ids),
        t(&b.attention_mask),
        t(&b.position_ids),
        t(&b.loss_mask),
    )
}
