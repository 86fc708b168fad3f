//! The one enum of drafter kinds: a spec (hyper-parameters + the target dimensions it was
//! built for) that builds its drafter. Specs are stored in checkpoints and forge exports, so a
//! drafter is rebuilt from them name for name. A new drafter adds one arm here.

use super::eagle1::{Eagle1, Eagle1Spec};
use super::eagle3::{Eagle3, Eagle3Spec};
use super::medusa::{Medusa, MedusaSpec};
use super::{Drafter, TargetTensors};
use crate::error::Result;
use tch::Device;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DrafterSpec {
    Medusa(MedusaSpec),
    Eagle1(Eagle1Spec),
    Eagle3(Eagle3Spec),
}

impl DrafterSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            DrafterSpec::Medusa(_) => "medusa",
            DrafterSpec::Eagle1(_) => "eagle1",
            DrafterSpec::Eagle3(_) => "eagle3",
        }
    }

    /// Builds the drafter; `target` supplies the frozen tensors it initialises from or shares
    /// (`None` fields are fine when weights are loaded right after, unless shared).
    pub fn build(&self, target: &TargetTensors, device: Device) -> Result<Box<dyn Drafter>> {
        Ok(match self {
            DrafterSpec::Medusa(m) => Box::new(Medusa::new(m.clone(), target, device)?),
            DrafterSpec::Eagle1(e) => Box::new(Eagle1::new(e.clone(), target, device)?),
            DrafterSpec::Eagle3(e) => Box::new(Eagle3::new(e.clone(), target, device)?),
        })
    }

    /// Whether building needs the target's lm_head / embedding even when weights are loaded.
    pub fn shares_target_tensors(&self) -> (bool, bool) {
        match self {
            DrafterSpec::Medusa(m) => (m.original_lm_head, false),
            // the frozen embedding and the target lm_head (target probabilities) are shared
            DrafterSpec::Eagle1(_) | DrafterSpec::Eagle3(_) => (true, true),
        }
    }
}
