//! `forge eval`: what a draft is worth. Speculative decoding of every prompt with the trained
//! draft against its target (`forge_models::speculative`), and plain target decoding of the
//! same prompts in the same run for the speedup; greedy outputs are compared token for token.
//!
//! Prompts: MT-Bench `question.jsonl` (`{"question_id", "category", "turns": [...]}`) or
//! ShareGPT / messages / `{"prompt"}` records (user turns), rendered with the target's chat
//! template. Multi-turn: turn k's context holds the model's own answers to turns < k (the
//! speculative run's for the speculative run, the plain run's for the plain run).
//!
//! Library only: [`run`] takes [`EvalOptions`], reports progress and events to the caller and
//! returns an [`EvalReport`]; `forge eval` (forge/src/cli/eval.rs) parses and prints.

mod decode;
mod report;
pub mod sweep;
mod tally;

pub use decode::TurnRecord;
pub use report::{AblationReport, EvalReport, EvalSetup, FileReport, Verified};
pub use tally::{ratio, round4, Tally};

use crate::engines::load_drafter_with_target;
use crate::error::{Result, ResultExt, TrainerError};
use crate::progress::Progress;
use crate::regenerate::{resolve_dtype, stop_ids};
use decode::Ctx;
use forge_data::conversation::{read_prompts, PromptConversation as InputConversation};
use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_models::generate::Sampling;
use forge_models::spec_tree::TreeSpec;
use forge_models::speculative::Acceptance;
use forge_models::{parse_device, TargetConfig, TargetModel};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Options of an evaluation (what `forge eval` parses; see its --help for each).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The target's Hugging Face folder (None: the target the draft was trained for).
    pub target: Option<PathBuf>,
    /// The draft: a step_<N> checkpoint, a checkpoint.dir, a forge export or an engine-format
    /// folder (needs `target`).
    pub draft: PathBuf,
    /// Prompt files: MT-Bench question.jsonl or ShareGPT.
    pub prompts: Vec<PathBuf>,
    pub max_new_tokens: usize,
    /// Draft length (with `dynamic_gamma` the starting length).
    pub gamma: usize,
    pub dynamic_gamma: bool,
    pub min_gamma: usize,
    pub max_gamma: usize,
    /// Greedy (temperature 0), or speculative sampling with the target's sampling parameters
    /// (temperature, top-p, top-k) applied to target and draft as the engines apply them.
    pub sampling: Sampling,
    /// Sampled acceptance (temperature > 0).
    pub acceptance: Acceptance,
    /// Draft trees as SGLang does instead of chains (`gamma` unused).
    pub tree: Option<TreeSpec>,
    /// Predict the speedup of the measured acceptance on these GPUs and batch sizes.
    pub predict: Option<sweep::PredictOptions>,
    /// After the main run, decode the prompts once more per serving setting (empty: the
    /// defaults of [`sweep::default_candidates`]) and recommend one per GPU and batch size.
    pub sweep: bool,
    pub sweep_settings: Vec<crate::predict::Setting>,
    pub seed: u64,
    /// Greedy only: [`EvalReport::verify`] fails unless every speculative output equals plain
    /// greedy output.
    pub verify: bool,
    /// Skip plain decoding (no speedup, no verification).
    pub no_baseline: bool,
    /// KEY=VALUE draft options.
    pub draft_options: Vec<String>,
    /// KEY=VALUE draft options, each for one more run after the main one.
    pub ablate: Vec<String>,
    /// Only the first N prompts of each file.
    pub limit: Option<usize>,
    /// System message for conversations that have none.
    pub system: Option<String>,
    /// auto, chatml, llama3, llama3.1, qwen3.
    pub chat_template: String,
    /// Weight format of the target: auto, fp32, bf16, fp16.
    pub dtype: String,
    /// auto, cpu, cuda, cuda:N.
    pub device: String,
    /// The target's tensor-parallel group (`--tensor-parallel N` under `forge launch`): every
    /// rank decodes the same prompts in lockstep over its share of the target.
    pub tensor_parallel: Option<std::sync::Arc<forge_models::layers::TensorParallel>>,
}

/// What [`run`] reports as it goes, before it returns the whole [`EvalReport`].
#[derive(Debug, Clone, Copy)]
pub enum EvalEvent<'a> {
    /// Draft and target loaded; decoding starts.
    Started(&'a EvalSetup),
    /// A prompt file is done.
    File(&'a FileReport),
    /// Every prompt file is done (all of them together; per drafter group, e.g. the knowledge
    /// drafter's `in cache` / `not in cache`, none for most drafters).
    Overall(&'a Tally, &'a BTreeMap<String, Tally>),
    /// An ablation run is done.
    Ablation(&'a AblationReport),
    /// A sweep setting is decoded (its tally over all files).
    Sweep(&'a crate::predict::Setting, &'a Tally),
}

/// The options' own consistency (before anything is loaded); errors name the flag.
pub fn check_options(a: &EvalOptions) -> Result<()> {
    let bail = |m: String| Err(TrainerError::Config(m));
    if a.max_new_tokens == 0 {
        return bail("--max-new-tokens must be at least 1".into());
    }
    if a.gamma == 0 {
        return bail("--gamma must be at least 1".into());
    }
    if a.dynamic_gamma && (a.min_gamma == 0 || a.min_gamma > a.max_gamma) {
        return bail(format!(
            "--min-gamma must be in 1..=--max-gamma ({}), got {}",
            a.max_gamma, a.min_gamma
        ));
    }
    if a.gamma > a.max_gamma {
        return bail(format!("--gamma {} is above --max-gamma {}", a.gamma, a.max_gamma));
    }
    if let Err(e) = a.sampling.check() {
        return bail(format!("--{e}"));
    }
    if let Some(t) = &a.tree {
        if let Err(e) = t.check() {
            return bail(format!("--tree: {e}"));
        }
        if a.dynamic_gamma {
            return bail("--dynamic-gamma applies to chains: leave it out with --tree".into());
        }
        if !a.sampling.is_greedy() && a.acceptance == Acceptance::Exact {
            return bail(
                "--tree accepts sampled trees as the engines do: use --acceptance engine (exact is for chains)".into(),
            );
        }
    }
    if a.sampling.is_greedy() && (a.sampling.top_p < 1.0 || a.sampling.top_k > 0) {
        return bail("--top-p and --top-k filter sampled tokens: give --temperature > 0 with them (greedy decoding ignores them)".into());
    }
    if a.verify && !a.sampling.is_greedy() {
        return bail("--verify compares with plain greedy decoding: use it with --temperature 0".into());
    }
    if a.verify && a.no_baseline {
        return bail("--verify needs the plain decoding that --no-baseline skips".into());
    }
    if a.limit == Some(0) {
        return bail("--limit must be at least 1".into());
    }
    if a.predict.is_some() && a.dynamic_gamma {
        return bail("--predict needs one serving setting: leave out --dynamic-gamma".into());
    }
    if a.sweep && a.predict.is_none() {
        return bail("--sweep recommends a setting per GPU and batch size: give --predict GPU[,GPU] (e.g. h100,h200) and --batch".into());
    }
    if let Some(p) = &a.predict {
        if p.gpus.is_empty() || p.batches.is_empty() || p.batches.iter().any(|&b| b < 1) || p.context < 0 {
            return bail(format!(
                "--predict {:?} --batch {:?} --context {}: give at least one GPU, batch sizes >= 1 and a context >= 0",
                p.gpus, p.batches, p.context
            ));
        }
    }
    for s in &a.sweep_settings {
        if matches!(s, crate::predict::Setting::Block { .. }) {
            return bail(format!("--sweep-setting {s}: block drafters are not among the kinds forge eval decodes yet (chain:N or tree:...)"));
        }
    }
    Ok(())
}

/// The draft must fit the target: same hidden size and vocabulary, auxiliary layers inside it.
fn check_fit(draft_cfg: &Value, draft_src: &Path, target: &TargetConfig, target_dir: &Path) -> Result<()> {
    let d = TargetConfig::from_value(draft_cfg.clone()).map_err(|e| {
        TrainerError::Config(format!(
            "{}: the target config recorded with the draft: {e}",
            draft_src.display()
        ))
    })?;
    let mut problems = Vec::new();
    if d.hidden_size != target.hidden_size {
        problems.push(format!("hidden size {} vs {}", d.hidden_size, target.hidden_size));
    }
    if d.vocab_size != target.vocab_size {
        problems.push(format!("vocabulary {} vs {}", d.vocab_size, target.vocab_size));
    }
    if d.num_layers != target.num_layers {
        problems.push(format!("{} vs {} layers", d.num_layers, target.num_layers));
    }
    if !problems.is_empty() {
        return Err(TrainerError::DraftTargetMismatch {
            draft: draft_src.to_path_buf(),
            target: target_dir.to_path_buf(),
            differences: problems,
        });
    }
    Ok(())
}

/// A KEY=VALUE draft option given with `flag`, split.
fn draft_option<'o>(opt: &'o str, flag: &str) -> Result<(&'o str, &'o str)> {
    opt.split_once('=')
        .ok_or_else(|| TrainerError::bad_option(format!("{flag} {opt}"), "write KEY=VALUE"))
}

/// Applies a KEY=VALUE draft option given with `flag`.
fn set_draft_option(drafter: &mut dyn forge_models::drafters::Drafter, opt: &str, flag: &str) -> Result<()> {
    let (k, v) = draft_option(opt, flag)?;
    drafter.set_option(k, v).with_context(|| format!("{flag} {opt}"))
}

/// Evaluates a draft: loads it and its target, decodes every prompt turn speculatively and
/// (unless `no_baseline`) plainly, then once more per ablation. `on_event` sees the setup and
/// each file's figures as they are done; `progress` counts the main run's prompt turns (its
/// message: the running tau). Fails on options that cannot work, on a draft that does not fit
/// the target, on decoding errors; `verify` is checked by [`EvalReport::verify`] (so that the
/// report can be written first).
pub fn run(a: &EvalOptions, progress: &mut dyn Progress, mut on_event: impl FnMut(EvalEvent)) -> Result<EvalReport> {
    check_options(a)?;
    let mut files = Vec::new();
    for p in &a.prompts {
        let mut convs = read_prompts(p).with_context(|| format!("--prompts {}", p.display()))?;
        if let Some(n) = a.limit {
            convs.truncate(n);
        }
        if convs.is_empty() {
            return Err(TrainerError::bad_option(
                format!("--prompts {}", p.display()),
                "no prompts",
            ));
        }
        files.push((p.clone(), convs));
    }
    let device = parse_device(&a.device).context("--device")?;
    let dtype = resolve_dtype(&a.dtype, device)?;
    let loaded = load_drafter_with_target(&a.draft, device, dtype.kind(), a.target.as_deref())
        .with_context(|| format!("--draft {}", a.draft.display()))?;
    let target_dir = a.target.clone().unwrap_or_else(|| loaded.target.clone());
    let model = TargetModel::load_parallel(&target_dir, dtype, device, a.tensor_parallel.clone())
        .with_context(|| format!("loading target {}", target_dir.display()))?;
    check_fit(&loaded.target_config, &loaded.source, &model.config, &target_dir)?;
    let mut drafter = loaded.drafter;
    for opt in &a.draft_options {
        set_draft_option(drafter.as_mut(), opt, "--draft-option")?;
    }
    // the ablations' options are checked before the main run spends its time
    for opt in &a.ablate {
        let (k, v) = draft_option(opt, "--ablate")?;
        drafter.check_option(k, v).with_context(|| format!("--ablate {opt}"))?;
    }
    let description = drafter.describe();
    let tokenizer = TextTokenizer::from_dir(&target_dir)?;
    let template = ChatTemplate::from_name(&a.chat_template, &target_dir)
        .with_context(|| format!("--chat-template {}", a.chat_template))?;
    let stop = stop_ids(&model, &tokenizer, &template, &a.chat_template)?;
    let ctx = Ctx {
        a,
        model: &model,
        drafter: drafter.as_ref(),
        tokenizer: &tokenizer,
        template: &template,
        stop,
    };
    let total_turns: usize = files.iter().flat_map(|(_, c)| c.iter().map(|c| c.user_turns())).sum();
    // the draft's own weights (what it adds to the target's memory besides its KV cache)
    let draft_vars = drafter.var_store().variables();
    let weights: i64 = draft_vars.values().map(|t| t.numel() as i64).sum();
    let weight_bytes: i64 = draft_vars
        .values()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as i64)
        .sum();
    let setup = EvalSetup {
        kind: loaded.spec.kind().to_string(),
        source: loaded.source.clone(),
        spec: serde_json::to_value(&loaded.spec).unwrap_or(Value::Null),
        weights,
        weight_bytes,
        description,
        target: target_dir.clone(),
        device,
        dtype,
        total_turns,
        files: files.len(),
        options: a.clone(),
    };
    on_event(EvalEvent::Started(&setup));
    // warm-up: the first forwards of a process pay one-time allocation costs
    {
        let warm = InputConversation {
            id: "warm-up".into(),
            line: 0,
            messages: vec![Message::new(Role::User, "Hello")],
            category: None,
        };
        let mut warm_args = a.clone();
        warm_args.max_new_tokens = a.max_new_tokens.min(8);
        let warm_ctx = Ctx {
            a: &warm_args,
            stop: ctx.stop.clone(),
            ..ctx
        };
        warm_ctx.conversation(&warm, &mut Tally::default(), &mut Vec::new())?;
    }

    progress.start("eval", total_turns as u64);
    let mut overall = Tally::default();
    let mut overall_groups: BTreeMap<String, Tally> = BTreeMap::new();
    let mut file_reports = Vec::new();
    for (path, convs) in &files {
        let mut tally = Tally::default();
        let mut by_cat: BTreeMap<String, Tally> = BTreeMap::new();
        let mut by_group: BTreeMap<String, Tally> = BTreeMap::new();
        let mut records = Vec::new();
        for conv in convs {
            let mut t = Tally::default();
            ctx.conversation(conv, &mut t, &mut records)?;
            by_cat
                .entry(conv.category.clone().unwrap_or_else(|| "-".into()))
                .or_default()
                .merge(&t);
            if let Some(g) = prompt_group(drafter.as_ref(), conv) {
                by_group.entry(g.to_string()).or_default().merge(&t);
                overall_groups.entry(g.to_string()).or_default().merge(&t);
            }
            tally.merge(&t);
            progress.inc(conv.user_turns() as u64);
            progress.set_message(&format!("tau {:.2}", tally.tau()));
        }
        overall.merge(&tally);
        let report = FileReport {
            path: path.clone(),
            all: tally,
            categories: by_cat,
            groups: by_group,
            prompts: records,
        };
        on_event(EvalEvent::File(&report));
        file_reports.push(report);
    }
    progress.finish();
    on_event(EvalEvent::Overall(&overall, &overall_groups));
    // ablations: the same prompts decoded again with one more draft option each; the main
    // run's plain decoding is their baseline
    let stop = ctx.stop.clone();
    let mut ablations = Vec::new();
    for opt in &a.ablate {
        set_draft_option(drafter.as_mut(), opt, "--ablate")?;
        let mut args = a.clone();
        args.no_baseline = true;
        let actx = Ctx {
            a: &args,
            model: &model,
            drafter: drafter.as_ref(),
            tokenizer: &tokenizer,
            template: &template,
            stop: stop.clone(),
        };
        let mut groups: BTreeMap<String, Tally> = BTreeMap::new();
        let mut t = decode_files(&actx, &files, &format!("--ablate {opt}"), |conv, one| {
            if let Some(g) = prompt_group(drafter.as_ref(), conv) {
                groups.entry(g.to_string()).or_default().merge(one);
            }
        })?;
        t.baseline_of(&overall);
        for (g, gt) in groups.iter_mut() {
            if let Some(main) = overall_groups.get(g) {
                gt.baseline_of(main);
            }
        }
        let ab = AblationReport {
            option: opt.clone(),
            all: t,
            groups,
        };
        on_event(EvalEvent::Ablation(&ab));
        ablations.push(ab);
    }
    // the speedup the measured acceptance predicts on GPUs, then the sweep over settings
    let shape = drafter.serving_shape();
    let need_shape = || {
        shape.ok_or_else(|| {
            TrainerError::Config(format!(
                "--predict: no engine serves a {} draft (the speedup model knows eagle3, eagle1 and medusa drafts)",
                loaded.spec.kind()
            ))
        })
    };
    let mut predictions = Vec::new();
    if let Some(p) = &a.predict {
        let setting = sweep::decoded_setting(a.tree, a.gamma);
        predictions = sweep::predict_all(&model.config, &need_shape()?, &setting, overall.tau(), p)?;
    }
    let mut sweep_rows = Vec::new();
    let mut recommendations = Vec::new();
    if a.sweep {
        let (max_depth, can_branch) = {
            let s = drafter.session(&model)?;
            (s.max_gamma().unwrap_or(usize::MAX).min(a.max_gamma), s.can_branch())
        };
        let candidates = if a.sweep_settings.is_empty() {
            sweep::default_candidates(max_depth, can_branch)
        } else {
            a.sweep_settings.clone()
        };
        for setting in candidates {
            // the main run is the one compared with plain decoding (`--verify`)
            let mut args = a.clone();
            args.no_baseline = true;
            args.verify = false;
            args.dynamic_gamma = false;
            match setting {
                crate::predict::Setting::Chain { n } => {
                    args.tree = None;
                    args.gamma = n as usize;
                    args.max_gamma = args.max_gamma.max(args.gamma);
                }
                crate::predict::Setting::Tree(t) => args.tree = Some(t),
                crate::predict::Setting::Block { .. } => continue,
            }
            check_options(&args).with_context(|| format!("--sweep {setting}"))?;
            let sctx = Ctx {
                a: &args,
                model: &model,
                drafter: drafter.as_ref(),
                tokenizer: &tokenizer,
                template: &template,
                stop: stop.clone(),
            };
            let t = decode_files(&sctx, &files, &format!("--sweep {setting}"), |_, _| {})?;
            on_event(EvalEvent::Sweep(&setting, &t));
            sweep_rows.push((setting, t));
        }
        if let Some(p) = &a.predict {
            recommendations = sweep::recommend(&model.config, &need_shape()?, &sweep_rows, p)?;
        }
    }
    Ok(EvalReport {
        setup,
        files: file_reports,
        overall,
        groups: overall_groups,
        ablations,
        serving_shape: shape,
        predictions,
        sweep: sweep_rows,
        recommendations,
    })
}

/// Every prompt turn of `files` decoded with `ctx` (no per-prompt records), summed; `each` sees
/// each conversation and its own tally. Errors name `what` (the flag of the run).
fn decode_files(
    ctx: &Ctx,
    files: &[(PathBuf, Vec<InputConversation>)],
    what: &str,
    mut each: impl FnMut(&InputConversation, &Tally),
) -> Result<Tally> {
    let mut total = Tally::default();
    for (_, convs) in files {
        for conv in convs {
            let mut one = Tally::default();
            ctx.conversation(conv, &mut one, &mut Vec::new())
                .with_context(|| what.to_string())?;
            each(conv, &one);
            total.merge(&one);
        }
    }
    Ok(total)
}

/// The drafter's group of a prompt ([`forge_models::drafters::Drafter::prompt_group`]), from
/// its first user turn.
fn prompt_group(drafter: &dyn forge_models::drafters::Drafter, conv: &InputConversation) -> Option<&'static str> {
    conv.messages
        .iter()
        .find(|m| m.role == Role::User)
        .and_then(|m| drafter.prompt_group(&m.content))
}
