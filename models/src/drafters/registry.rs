//! What a drafter kind is to the rest of forge: one trait, implemented by each kind's type in
//! its own file, and dispatched over by the registry (the `drafters!` list in `mod.rs`). The
//! trainer, the recipe, `forge check`, export and import only ever call these hooks, so a new
//! kind touches no file but its own and one registry line.

use super::{Drafter, ExportFormat, FeatureNeeds, PrepareData, TargetAccess, TargetNeeds};
use crate::error::{ModelError, Result};
use crate::llm::TargetConfig;
use forge_schema::{Ctx, FromNode, SectionDocs};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// The target a recipe section is resolved against.
#[derive(Debug, Clone, Copy)]
pub struct ResolveTarget<'a> {
    pub config: &'a TargetConfig,
    /// The target's folder (`target.path`), where a kind checks files built for this target
    /// (e.g. the knowledge cache's fingerprint); `None` for synthetic targets.
    pub dir: Option<&'a Path>,
}

/// An engine-format draft folder a kind recognised ([`DrafterKind::recognise`]).
#[derive(Debug, Clone)]
pub struct EngineDraft<S> {
    pub spec: S,
    /// The layout its tensors are named in (the drafter's own export table for it).
    pub format: ExportFormat,
    /// The safetensors file holding its weights.
    pub weights: PathBuf,
    /// What it is, for messages ("EAGLE-3 (SGLang / vLLM)").
    pub what: &'static str,
}

impl<S> EngineDraft<S> {
    pub fn map<T>(self, f: impl FnOnce(S) -> T) -> EngineDraft<T> {
        EngineDraft {
            spec: f(self.spec),
            format: self.format,
            weights: self.weights,
            what: self.what,
        }
    }
}

/// A drafter kind: its recipe section, its spec, and everything kind-specific that generic
/// code asks of it. Implemented by the drafter's type (`impl DrafterKind for Medusa`).
pub trait DrafterKind {
    /// Its page under docs/methods/.
    const DOCS: &'static str;
    /// Why the kind trains only online (the live target inside the step), for the recipe's
    /// refusal of `data.mode: offline`; `None`: online and offline alike.
    const ONLINE_ONLY: Option<&'static str> = None;
    /// The `drafter:` keys besides `kind`, declared with [`forge_schema::section!`] (typed,
    /// defaulted, documented; unknown keys are errors with their line).
    type Section: FromNode + SectionDocs + Default + Clone + Debug + PartialEq + Serialize;
    /// The section resolved against a target: what builds the drafter, stored in checkpoints
    /// and forge exports.
    type Spec: Clone + Debug + PartialEq + Serialize + DeserializeOwned;

    /// Checks of the section on its own, reported into `cx` at `drafter.<key>` (every problem
    /// at once, each at the line it was written). Default: none.
    fn validate(_section: &Self::Section, _cx: &mut Ctx) {}
    /// The spec for a target: the recipe's values with its defaults resolved against the
    /// target's dimensions, refused with a message naming the key when the target makes
    /// them impossible.
    fn resolve(section: &Self::Section, target: ResolveTarget) -> Result<Self::Spec>;
    /// Before `forge check` resolves the section against a target: notes for the person
    /// (e.g. a value capped by the target), and inputs set aside that are built later (a
    /// cache not built yet) so the rest is still checked. Default: none.
    fn check_notes(_section: &mut Self::Section, _target: &TargetConfig) -> Vec<String> {
        Vec::new()
    }
    /// Builds the drafter on `device` computing in `compute` (fp32 master weights). `target`
    /// holds what [`DrafterKind::target_needs`] asked for.
    fn build(spec: &Self::Spec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>>;
    /// What of the target building needs: `fresh` for a new drafter (initialised from the
    /// target), otherwise one whose weights are loaded right after (only what it shares).
    fn target_needs(spec: &Self::Spec, fresh: bool) -> TargetNeeds;
    /// The target features the drafter reads (training, online and offline, and decoding).
    fn feature_needs(spec: &Self::Spec) -> FeatureNeeds;
    /// The data-dependent preparation a fresh drafter asks for in [`Drafter::prepare`], run
    /// without building it (so `forge prepare-data` caches it ahead of training). Default:
    /// none.
    fn prepare_data(_spec: &Self::Spec, _data: &mut dyn PrepareData) -> Result<()> {
        Ok(())
    }
    /// Warnings printed when training starts (a setting that trains but cannot be served,
    /// ...). Default: none.
    fn warnings(_spec: &Self::Spec) -> Vec<String> {
        Vec::new()
    }
    /// An engine-format draft of this kind in `dir` (its `config.json` given), for `forge
    /// eval --draft` and `train.init_from`: `Ok(None)` when the folder is not one. Default:
    /// none (a kind without engine formats).
    fn recognise(
        _dir: &Path,
        _config: &serde_json::Value,
        _target: &TargetConfig,
    ) -> Result<Option<EngineDraft<Self::Spec>>> {
        Ok(None)
    }
    /// The section's choice-valued keys and their values, for the recipe reference.
    fn choices() -> Vec<(&'static str, &'static [&'static str])> {
        Vec::new()
    }
}

/// The first of `architectures` in an engine draft's config.json ("" when there is none).
pub fn architecture(cfg: &serde_json::Value) -> &str {
    cfg.get("architectures")
        .and_then(|a| a.get(0))
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
}

/// An integer field of an engine draft's config.json, or an error naming the file.
pub fn config_int(cfg: &serde_json::Value, key: &str, file: &Path) -> Result<i64> {
    cfg.get(key)
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| ModelError::Config {
            path: file.to_path_buf(),
            msg: format!("no integer \"{key}\" (an engine draft's config.json holds it)"),
        })
}

/// Defines the registry from one list: the kinds' modules, [`super::DrafterSpec`] and
/// [`super::DrafterSection`] (one variant per kind, tagged `kind:` with its name), and every
/// dispatch over them. Used once, in `drafters/mod.rs`.
macro_rules! drafters {
    ($( $module:ident :: $ty:ident = $name:literal ),* $(,)?) => {
        $( pub mod $module; )*

        /// A drafter's spec, tagged with its kind: stored in checkpoints and forge exports,
        /// so a drafter is rebuilt from it name for name.
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(tag = "kind")]
        pub enum DrafterSpec {
            $( #[serde(rename = $name)] $ty(<$module::$ty as $crate::drafters::DrafterKind>::Spec), )*
        }

        /// A recipe's `drafter:` section: `kind` picks the kind, the other keys are its own.
        #[derive(Debug, Clone, PartialEq, serde::Serialize)]
        #[serde(tag = "kind")]
        pub enum DrafterSection {
            $( #[serde(rename = $name)] $ty(<$module::$ty as $crate::drafters::DrafterKind>::Section), )*
        }

        /// Every kind's name, in registry order.
        pub const KINDS: &[&str] = &[ $( $name ),* ];

        /// A kind's reference: its name, docs page, keys with their documentation, default
        /// values (as JSON) and choice-valued keys.
        pub struct KindInfo {
            pub name: &'static str,
            pub docs: &'static str,
            pub fields: Vec<(&'static str, String)>,
            pub defaults: serde_json::Value,
            pub choices: Vec<(&'static str, &'static [&'static str])>,
        }

        /// The reference of every kind, in registry order.
        pub fn kinds() -> Vec<KindInfo> {
            use $crate::drafters::DrafterKind;
            vec![ $( KindInfo {
                name: $name,
                docs: <$module::$ty as DrafterKind>::DOCS,
                fields: <<$module::$ty as DrafterKind>::Section as forge_schema::SectionDocs>::field_docs(),
                defaults: serde_json::to_value(<<$module::$ty as DrafterKind>::Section as Default>::default())
                    .unwrap_or(serde_json::Value::Null),
                choices: <$module::$ty as DrafterKind>::choices(),
            } ),* ]
        }

        impl DrafterSpec {
            /// The kind's name (`drafter.kind`).
            pub fn kind(&self) -> &'static str {
                match self { $( Self::$ty(_) => $name, )* }
            }
            /// Builds the drafter ([`DrafterKind::build`]).
            pub fn build(&self, target: &TargetAccess, device: tch::Device, compute: tch::Kind) -> $crate::error::Result<Box<dyn Drafter>> {
                match self { $( Self::$ty(s) => <$module::$ty as $crate::drafters::DrafterKind>::build(s, target, device, compute), )* }
            }
            /// [`DrafterKind::target_needs`].
            pub fn target_needs(&self, fresh: bool) -> TargetNeeds {
                match self { $( Self::$ty(s) => <$module::$ty as $crate::drafters::DrafterKind>::target_needs(s, fresh), )* }
            }
            /// [`DrafterKind::feature_needs`].
            pub fn feature_needs(&self) -> FeatureNeeds {
                match self { $( Self::$ty(s) => <$module::$ty as $crate::drafters::DrafterKind>::feature_needs(s), )* }
            }
            /// [`DrafterKind::prepare_data`].
            pub fn prepare_data(&self, data: &mut dyn PrepareData) -> $crate::error::Result<()> {
                match self { $( Self::$ty(s) => <$module::$ty as $crate::drafters::DrafterKind>::prepare_data(s, data), )* }
            }
            /// [`DrafterKind::warnings`].
            pub fn warnings(&self) -> Vec<String> {
                match self { $( Self::$ty(s) => <$module::$ty as $crate::drafters::DrafterKind>::warnings(s), )* }
            }
            /// The engine-format draft in `dir`, whichever kind recognises it
            /// ([`DrafterKind::recognise`]); `Ok(None)` when none does.
            pub fn recognise(
                dir: &std::path::Path,
                config: &serde_json::Value,
                target: &$crate::llm::TargetConfig,
            ) -> $crate::error::Result<Option<$crate::drafters::EngineDraft<DrafterSpec>>> {
                $(
                    if let Some(found) = <$module::$ty as $crate::drafters::DrafterKind>::recognise(dir, config, target)? {
                        return Ok(Some(found.map(Self::$ty)));
                    }
                )*
                Ok(None)
            }
        }

        impl Default for DrafterSection {
            /// The first kind with its defaults (what a recipe without a valid `drafter:`
            /// section is checked as, so the other sections are still checked).
            fn default() -> Self {
                drafters!(@first $( $ty ),*)
            }
        }

        impl DrafterSection {
            /// The kind's name (`drafter.kind`).
            pub fn kind(&self) -> &'static str {
                match self { $( Self::$ty(_) => $name, )* }
            }
            /// The section of kind `name` read from `rest` (the keys besides `kind`), problems
            /// reported into `cx`; `None` for an unknown kind.
            pub fn parse(name: &str, rest: &forge_schema::Node, path: &str, cx: &mut forge_schema::Ctx) -> Option<Self> {
                use forge_schema::FromNode;
                match name {
                    $( $name => Some(Self::$ty(FromNode::from_node(rest, path, cx).unwrap_or_default())), )*
                    _ => None,
                }
            }
            /// [`DrafterKind::validate`].
            pub fn validate(&self, cx: &mut forge_schema::Ctx) {
                match self { $( Self::$ty(s) => <$module::$ty as $crate::drafters::DrafterKind>::validate(s, cx), )* }
            }
            /// The spec for a target ([`DrafterKind::resolve`]); `dir` is the target's folder
            /// (`None` for synthetic targets).
            pub fn to_spec(&self, config: &$crate::llm::TargetConfig, dir: Option<&std::path::Path>) -> $crate::error::Result<DrafterSpec> {
                let target = $crate::drafters::ResolveTarget { config, dir };
                Ok(match self { $( Self::$ty(s) => DrafterSpec::$ty(<$module::$ty as $crate::drafters::DrafterKind>::resolve(s, target)?), )* })
            }
            /// Why the kind trains only online ([`DrafterKind::ONLINE_ONLY`]).
            pub fn online_only(&self) -> Option<&'static str> {
                match self { $( Self::$ty(_) => <$module::$ty as $crate::drafters::DrafterKind>::ONLINE_ONLY, )* }
            }
            /// [`DrafterKind::check_notes`].
            pub fn check_notes(&mut self, target: &$crate::llm::TargetConfig) -> Vec<String> {
                match self { $( Self::$ty(s) => <$module::$ty as $crate::drafters::DrafterKind>::check_notes(s, target), )* }
            }
        }
    };
    (@first $first:ident $(, $rest:ident)*) => { Self::$first(Default::default()) };
}
