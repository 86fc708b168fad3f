//! Building a drafter from its spec, kind-blind: the target tensors its spec asks for
//! (`TargetNeeds`), and the data-dependent preparation services it may call
//! (`PrepareData`: the draft vocabulary, cached beside the token cache).

use crate::data;
use crate::error::{Result, TrainerError};
use crate::recipe::Recipe;
use forge_data::hidden::HiddenDataset;
use forge_data::{CacheStatus, LoadedDataset, VocabMapping};
use forge_models::drafters::{PrepareData, TargetAccess, TargetNeeds, EMBED, LM_HEAD};
use forge_models::llm::read_named_tensors;
use forge_models::{ModelError, TargetConfig, TargetModel};
use std::collections::BTreeMap;
use std::path::Path;

/// The target as `needs` asks for it: tensors by name read from the target folder `dir`
/// (without loading the model), or the live model `live` for a drafter that runs inside it
/// (`TargetNeeds::Model`), which only online training loads.
pub fn target_access<'t>(
    dir: &Path,
    cfg: &TargetConfig,
    needs: &TargetNeeds,
    live: Option<&'t TargetModel>,
) -> Result<TargetAccess<'t>> {
    match needs {
        TargetNeeds::Nothing => Ok(TargetAccess::Nothing),
        TargetNeeds::Model => live.map(TargetAccess::Model).ok_or_else(|| {
            TrainerError::Config(
                "this drafter is built inside the live target model, which only online training loads (data.mode: online; offline runs and checkpoint loading read target tensors from disk)".into(),
            )
        }),
        TargetNeeds::Tensors(names) => {
            // a tied target's output projection is its embedding; each file tensor is read once
            let tied = cfg.tie_word_embeddings;
            let mut on_disk: Vec<&str> = names.iter().map(|n| file_name(n, tied)).collect();
            on_disk.sort_unstable();
            on_disk.dedup();
            let got: BTreeMap<&str, Option<tch::Tensor>> = on_disk.iter().copied().zip(read_named_tensors(dir, &on_disk)?).collect();
            let mut map = BTreeMap::new();
            for name in names {
                let f = file_name(name, tied);
                let t = got.get(f).and_then(Option::as_ref).ok_or_else(|| {
                    TrainerError::Config(format!("{}: the target has no tensor {f} (the drafter needs it)", dir.display()))
                })?;
                map.insert(name.clone(), t.shallow_clone());
            }
            Ok(TargetAccess::Tensors(map))
        }
    }
}

/// The name on disk of the target tensor a drafter asks for as `name`: a tied target's
/// output projection is its embedding.
fn file_name(name: &str, tied: bool) -> &str {
    if name == LM_HEAD && tied {
        EMBED
    } else {
        name
    }
}

/// Where a training run's data is, for [`Prepare`].
pub enum PrepareSource<'a> {
    /// Tokenised training data (online runs, `forge prepare-data`).
    Tokens(&'a LoadedDataset),
    /// Hidden-state shards (offline runs): the mapping is the one an online run on the same
    /// data would build (cached for the shards' data key, or built from `data.train` when it
    /// is that data).
    Shards(&'a HiddenDataset),
}

/// [`PrepareData`] over a recipe's training data; remembers what it built for reports.
pub struct Prepare<'a> {
    pub recipe: &'a Recipe,
    pub cfg: &'a TargetConfig,
    pub source: PrepareSource<'a>,
    /// The vocabulary mapping handed out, and whether it came from the cache.
    pub vocab: Option<(VocabMapping, CacheStatus)>,
    /// Where the drafter's report lines go (the library prints nothing itself).
    report: &'a mut dyn FnMut(&str),
}

impl<'a> Prepare<'a> {
    /// Preparation over `source`; the drafter's report lines go to `report`.
    pub fn new(
        recipe: &'a Recipe,
        cfg: &'a TargetConfig,
        source: PrepareSource<'a>,
        report: &'a mut dyn FnMut(&str),
    ) -> Self {
        Self {
            recipe,
            cfg,
            source,
            vocab: None,
            report,
        }
    }

    fn mapping(&self, size: usize) -> Result<(VocabMapping, CacheStatus)> {
        let (recipe, cfg) = (self.recipe, self.cfg);
        match &self.source {
            PrepareSource::Tokens(d) => data::vocab_mapping(recipe, cfg, d, size),
            PrepareSource::Shards(ds) => {
                let key = &ds.settings().data_key;
                let cached = VocabMapping::cache_path(&recipe.data.cache_dir, key, cfg.vocab_size as usize, size);
                if let Ok(m) = VocabMapping::load(&cached) {
                    if m.d2t.len() == size && m.t2d.len() == cfg.vocab_size as usize {
                        return Ok((m, CacheStatus::Hit(cached)));
                    }
                }
                let td = data::load_token_data(recipe, &|_: &str, _: u64, _: u64| {})?;
                if &td.train.key != key {
                    return Err(TrainerError::Config(format!(
                        "the draft vocabulary is built from data.train, which is not the data the hidden states in {} were computed from: point data.train at that data",
                        recipe.data.hidden_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
                    )));
                }
                data::vocab_mapping(recipe, cfg, &td.train, size)
            }
        }
    }
}

impl PrepareData for Prepare<'_> {
    fn vocab_mapping(&mut self, size: usize) -> forge_models::Result<(Vec<i64>, Vec<bool>)> {
        let (m, st) = self.mapping(size).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let out = (m.d2t.clone(), m.t2d.clone());
        self.vocab = Some((m, st));
        Ok(out)
    }

    fn report(&mut self, line: &str) {
        (self.report)(line);
    }
}
