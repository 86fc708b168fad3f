//! Parameter groups: which learning-rate scale and weight decay each parameter gets.

use crate::error::{Result, TrainerError};
use forge_models::drafters::ParamGroup;
use tch::Tensor;

/// How the optimizer treats one parameter (what its [`ParamGroup`] and its shape decide).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamRule {
    /// Multiplies the scheduled learning rate (the decoupled weight decay uses the product
    /// too, as torch's per-group `lr` does).
    pub lr_scale: f64,
    /// The decoupled weight decay applies.
    pub decay: bool,
}

impl ParamRule {
    /// The one place the decay rule lives: the group asks for weight decay and the parameter
    /// has two or more dimensions (matrices, embeddings; never norms, biases, other vectors).
    fn new(group: &ParamGroup, param: &Tensor) -> ParamRule {
        ParamRule {
            lr_scale: group.lr_scale,
            decay: group.weight_decay && param.dim() >= 2,
        }
    }
}

/// The optimizer policy both [`super::AdamW`] and the data-parallel `DistAdamW` read: a drafter's
/// parameter groups, of which the one whose prefix is the longest match of a parameter's
/// name decides that parameter's [`ParamRule`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParamPolicy {
    groups: Vec<ParamGroup>,
}

impl Default for ParamPolicy {
    /// One group, [`ParamGroup::all`]: the scheduled learning rate for every parameter and
    /// weight decay on every matrix.
    fn default() -> Self {
        ParamPolicy {
            groups: vec![ParamGroup::all()],
        }
    }
}

/// One parameter group as the trainer reports it at the start of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSummary {
    pub name: String,
    /// Trainable tensors in the group.
    pub tensors: usize,
    /// Their elements.
    pub numel: i64,
    pub lr_scale: f64,
    pub weight_decay: bool,
}

impl std::fmt::Display for GroupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "parameter group {}: {} tensors, {} parameters, lr scale {}, weight decay {}",
            self.name,
            self.tensors,
            self.numel,
            self.lr_scale,
            if self.weight_decay {
                "on (tensors of 2+ dims)"
            } else {
                "off"
            }
        )
    }
}

impl ParamPolicy {
    /// The policy of a drafter's groups (`Drafter::param_groups`). Errors on two groups
    /// with one prefix (which of them applies would be arbitrary) and on a learning-rate scale
    /// that is not a finite number >= 0.
    pub fn new(groups: Vec<ParamGroup>) -> Result<ParamPolicy> {
        for (i, g) in groups.iter().enumerate() {
            if !g.lr_scale.is_finite() || g.lr_scale < 0.0 {
                return Err(TrainerError::Config(format!(
                    "optimizer parameter group {}: lr_scale {} is not a finite number >= 0",
                    g.name, g.lr_scale
                )));
            }
            if let Some(other) = groups[..i].iter().find(|o| o.prefix == g.prefix) {
                return Err(TrainerError::Config(format!(
                    "optimizer parameter groups {} and {} have the same prefix '{}'",
                    other.name, g.name, g.prefix
                )));
            }
        }
        Ok(ParamPolicy { groups })
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The group deciding for parameter `name`: the one with the longest prefix of it.
    pub fn group_of(&self, name: &str) -> Option<&ParamGroup> {
        self.group_index(name).map(|i| &self.groups[i])
    }

    fn group_index(&self, name: &str) -> Option<usize> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, g)| name.starts_with(g.prefix.as_str()))
            .max_by_key(|(_, g)| g.prefix.len())
            .map(|(i, _)| i)
    }

    /// [`Self::group_index`], or an error naming the parameter no group matches.
    fn matching_group(&self, name: &str) -> Result<usize> {
        self.group_index(name).ok_or_else(|| {
            let prefixes: Vec<String> = self.groups.iter().map(|g| format!("'{}'", g.prefix)).collect();
            TrainerError::Config(format!(
                "trainable parameter {name} matches no optimizer parameter group (prefixes: {}): the drafter's param_groups must cover every trainable variable",
                prefixes.join(", ")
            ))
        })
    }

    /// The rule of parameter `name`; an error names a parameter that no group matches.
    pub fn rule(&self, name: &str, param: &Tensor) -> Result<ParamRule> {
        Ok(ParamRule::new(&self.groups[self.matching_group(name)?], param))
    }

    /// The rules of `params`, in their order.
    pub fn rules(&self, params: &[(String, Tensor)]) -> Result<Vec<ParamRule>> {
        params.iter().map(|(n, p)| self.rule(n, p)).collect()
    }

    /// Each group with the number of `params` tensors and elements it decides for (errors
    /// as [`ParamPolicy::rule`]).
    pub fn summary(&self, params: &[(String, Tensor)]) -> Result<Vec<GroupSummary>> {
        let mut out: Vec<GroupSummary> = self
            .groups
            .iter()
            .map(|g| GroupSummary {
                name: g.name.clone(),
                tensors: 0,
                numel: 0,
                lr_scale: g.lr_scale,
                weight_decay: g.weight_decay,
            })
            .collect();
        for (n, p) in params {
            let i = self.matching_group(n)?;
            out[i].tensors += 1;
            out[i].numel += p.numel() as i64;
        }
        Ok(out)
    }
}
