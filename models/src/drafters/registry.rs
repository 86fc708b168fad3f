//! The one enum of drafter kinds: a spec (hyper-parameters + the target dimensions it was
//! built for) that builds its drafter and says what it needs. Specs are stored in checkpoints
//! and forge exports, so a drafter is rebuilt from them name for name. A new drafter adds one
//! arm to each match here.

use super::eagle1::{Eagle1, Eagle1Spec};
use super::eagle3::{Eagle3, Eagle3Spec};
use super::hybrid::{Hybrid, HybridSpec};
use super::knowledge::{Knowledge, KnowledgeSpec};
use super::medusa::{Medusa, MedusaSpec};
use super::spaf::{Spaf, SpafSpec};
use super::{Drafter, FeatureNeeds, PrepareData, TargetAccess, TargetNeeds};
use crate::error::Result;
use tch::{Device, Kind};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DrafterSpec {
    Medusa(MedusaSpec),
    Eagle1(Eagle1Spec),
    Eagle3(Eagle3Spec),
    Hybrid(HybridSpec),
    Spaf(SpafSpec),
    Knowledge(KnowledgeSpec),
}

impl DrafterSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            DrafterSpec::Medusa(_) => "medusa",
            DrafterSpec::Eagle1(_) => "eagle1",
            DrafterSpec::Eagle3(_) => "eagle3",
            DrafterSpec::Hybrid(_) => "hybrid",
            DrafterSpec::Spaf(_) => "spaf",
            DrafterSpec::Knowledge(_) => "knowledge",
        }
    }

    /// Builds the drafter on `device` computing in `compute` (its weights are fp32 masters,
    /// cast where used). `target` holds what [`DrafterSpec::target_needs`] asked for.
    pub fn build(&self, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>> {
        Ok(match self {
            DrafterSpec::Medusa(m) => Box::new(Medusa::new(m.clone(), target, device, compute)?),
            DrafterSpec::Eagle1(e) => Box::new(Eagle1::new(e.clone(), target, device, compute)?),
            DrafterSpec::Eagle3(e) => Box::new(Eagle3::new(e.clone(), target, device, compute)?),
            DrafterSpec::Hybrid(h) => Box::new(Hybrid::new(h.clone(), target, device, compute)?),
            DrafterSpec::Spaf(s) => Box::new(Spaf::new(s.clone(), target, device, compute)?),
            DrafterSpec::Knowledge(k) => Box::new(Knowledge::new(k.clone(), target, device, compute)?),
        })
    }

    /// What of the target building needs: `fresh` for a new drafter (initialised from the
    /// target), otherwise for one whose weights are loaded right after (only what it shares).
    pub fn target_needs(&self, fresh: bool) -> TargetNeeds {
        match self {
            DrafterSpec::Medusa(m) => m.target_needs(fresh),
            DrafterSpec::Eagle1(_) | DrafterSpec::Eagle3(_) | DrafterSpec::Hybrid(_) => super::eagle::target_needs(),
            DrafterSpec::Spaf(s) => s.target_needs(fresh),
            DrafterSpec::Knowledge(k) => k.target_needs(fresh),
        }
    }

    /// The data-dependent preparation a fresh drafter of this spec asks for in
    /// [`Drafter::prepare`], run without building the drafter (no weights, no target), so that
    /// `forge prepare-data` computes and caches it ahead of training: EAGLE-3's draft
    /// vocabulary.
    pub fn prepare_data(&self, data: &mut dyn PrepareData) -> Result<()> {
        match self {
            DrafterSpec::Medusa(_) | DrafterSpec::Eagle1(_) | DrafterSpec::Spaf(_) | DrafterSpec::Knowledge(_) => {
                Ok(())
            }
            DrafterSpec::Eagle3(e) => data.vocab_mapping(e.draft_vocab_size as usize).map(|_| ()),
            DrafterSpec::Hybrid(h) => match h.draft_vocab_size {
                Some(vd) => data.vocab_mapping(vd as usize).map(|_| ()),
                None => Ok(()),
            },
        }
    }

    /// The target features the drafter reads (training, online and offline, and decoding).
    pub fn feature_needs(&self) -> FeatureNeeds {
        match self {
            DrafterSpec::Medusa(_) | DrafterSpec::Eagle1(_) | DrafterSpec::Hybrid(_) => FeatureNeeds {
                last_hidden: true,
                ..FeatureNeeds::default()
            },
            DrafterSpec::Eagle3(e) => FeatureNeeds {
                last_hidden: true,
                aux_layers: e.aux_layers.clone(),
                target_topk: 0,
            },
            // the output of layer k-1 starts the draft's stream and is the alignment target;
            // the last hidden state gives the target's distribution (KL)
            DrafterSpec::Spaf(s) => FeatureNeeds {
                last_hidden: true,
                aux_layers: vec![s.cutoff_layer - 1],
                target_topk: 0,
            },
            // the target's next-token distribution: in full from its last hidden state, or
            // its top-k log-probabilities
            DrafterSpec::Knowledge(k) => FeatureNeeds {
                last_hidden: k.target_topk == 0,
                aux_layers: Vec::new(),
                target_topk: k.target_topk,
            },
        }
    }
}
