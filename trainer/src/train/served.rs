//! The acceptance the draft gets as it will be served (`train.eval_decode`): at each
//! evaluation, greedy speculative decoding of held-out prompts (the first user turns of
//! data.eval) with a chain or an SGLang tree, one `eval/tau/<setting>` row each, beside the
//! teacher-forced `eval/sim_tau`.

use super::Trainer;
use crate::error::{Result, TrainerError};
use crate::parallel::{Comm, ReduceOp};
use crate::predict::Setting;
use forge_data::TokenDataset;
use forge_models::speculative::{speculative_generate, SpecOptions};
use forge_models::TargetModel;
use std::collections::BTreeMap;
use tch::Tensor;

/// The first `n` prompts of `eval`: each sample's tokens before its first trained token (the
/// conversation up to the first assistant answer), where there is one.
pub(super) fn prompts(eval: &TokenDataset, n: usize) -> Vec<Vec<i64>> {
    (0..eval.len())
        .filter_map(|i| {
            let first = eval.mask(i).iter().position(|&m| m != 0)?;
            (first > 0).then(|| eval.input_ids(i)[..first].iter().map(|&t| i64::from(t)).collect())
        })
        .take(n)
        .collect()
}

impl Trainer<'_> {
    /// `eval/tau/<setting>` for every `train.eval_decode` setting: tokens emitted per target
    /// forward over this rank's share of the prompts, summed over ranks.
    pub(super) fn served_acceptance(
        &self,
        dp: &mut dyn Comm,
        target: &TargetModel,
        eval: &TokenDataset,
    ) -> Result<BTreeMap<String, f64>> {
        let t = &self.recipe.train;
        let mut rows = BTreeMap::new();
        if t.eval_decode.is_empty() {
            return Ok(rows);
        }
        let all = prompts(eval, t.eval_decode_prompts as usize);
        let mine: Vec<&Vec<i64>> = all.iter().skip(dp.rank()).step_by(dp.world()).collect();
        let needs = self.drafter.spec().feature_needs();
        for text in &t.eval_decode {
            let setting = Setting::parse(text).map_err(|e| TrainerError::Config(format!("train.eval_decode: {e}")))?;
            let (gamma, tree) = match setting {
                Setting::Chain { n } => (n as usize, None),
                Setting::Tree(tr) => (tr.steps, Some(tr)),
                Setting::Block { .. } => {
                    return Err(TrainerError::Config(format!(
                        "train.eval_decode: {setting}: block drafters are not decoded yet"
                    )))
                }
            };
            let opts = SpecOptions {
                gamma,
                max_gamma: gamma.max(1),
                max_new_tokens: t.eval_decode_tokens as usize,
                stop_ids: target.config.eos_token_ids.clone(),
                tree,
                ..Default::default()
            };
            let (mut emitted, mut rounds) = (0.0, 0.0);
            for p in &mine {
                let mut session = self.drafter.session(target)?;
                let out = tch::no_grad(|| speculative_generate(target, session.as_mut(), &needs, p, &opts))
                    .map_err(|e| TrainerError::Config(format!("train.eval_decode {setting}: {e}")))?;
                emitted += out.rounds.iter().map(|r| r.emitted).sum::<usize>() as f64;
                rounds += out.rounds.len() as f64;
            }
            let mut sums = Tensor::from_slice(&[emitted, rounds]).to_device(dp.device());
            dp.all_reduce(&mut sums, ReduceOp::Sum)?;
            let (e, r) = (sums.double_value(&[0]), sums.double_value(&[1]));
            if r > 0.0 {
                rows.insert(format!("eval/tau/{setting}"), e / r);
            }
        }
        Ok(rows)
    }
}
