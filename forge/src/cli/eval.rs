//! `forge eval`: the flags, the progress bar and the printed summaries of
//! `forge_trainer::eval`, and the `--json` report file.

use super::chat::ChatArgs;
use super::progress::{self, Bar};
use anyhow::{Context, Result};
use forge_models::generate::Sampling;
use forge_models::spec_tree::TreeSpec;
use forge_models::speculative::Acceptance;
use forge_trainer::eval::sweep::PredictOptions;
use forge_trainer::eval::{self, ratio, EvalEvent, EvalOptions, Tally, Verified};
use forge_trainer::predict::Setting;
use std::io::Write;
use std::path::PathBuf;

/// `--acceptance` (see [`Acceptance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AcceptanceArg {
    Engine,
    Exact,
}

impl From<AcceptanceArg> for Acceptance {
    fn from(a: AcceptanceArg) -> Self {
        match a {
            AcceptanceArg::Engine => Acceptance::Engine,
            AcceptanceArg::Exact => Acceptance::Exact,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// The target's Hugging Face folder (default: the target the draft was trained for).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// The draft: a step_<N> checkpoint, a checkpoint.dir (its newest checkpoint), a forge export, or an engine-format folder (SGLang/vLLM EAGLE-3 or EAGLE-1, vLLM or FasterDecoding Medusa; needs --target).
    #[arg(long)]
    pub draft: PathBuf,
    /// Prompt file(s): MT-Bench question.jsonl or ShareGPT (repeat for several files).
    #[arg(long = "prompts", value_name = "FILE", required = true)]
    pub prompts: Vec<PathBuf>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Draft length (with --dynamic-gamma the starting length, at least --min-gamma). Medusa proposes at most one token per head.
    #[arg(long, default_value_t = 5)]
    pub gamma: usize,
    /// Dynamic gamma: +1 after a round with every proposal accepted, else max(--min-gamma, gamma / 2).
    #[arg(long)]
    pub dynamic_gamma: bool,
    /// Floor of dynamic gamma.
    #[arg(long, default_value_t = 4)]
    pub min_gamma: usize,
    /// Ceiling of dynamic gamma.
    #[arg(long, default_value_t = 32)]
    pub max_gamma: usize,
    /// 0 = greedy; > 0 = speculative sampling at this temperature.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sampling only: keep the most likely tokens whose mass reaches P (1 = off), applied
    /// after --top-k to target and draft distributions, as vLLM and SGLang apply it.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Sampling only: keep the K most likely tokens (0 = off), before --top-p.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampled acceptance (temperature > 0): engine = a greedy draft chain accepted with
    /// probability p(d), as vLLM and SGLang serve; exact = drafts sampled from the draft's
    /// distribution q, accepted with min(1, p/q). Both follow the target's distribution.
    #[arg(long, value_enum, default_value_t = AcceptanceArg::Engine)]
    pub acceptance: AcceptanceArg,
    /// Draft a tree as SGLang does instead of a chain: steps=S,topk=K,draft_tokens=N
    /// (SGLang's --speculative-num-steps, --speculative-eagle-topk,
    /// --speculative-num-draft-tokens; its Llama default is steps=5,topk=4,draft_tokens=8).
    /// Verified in one target forward under a tree mask. Medusa, EAGLE-1, EAGLE-3, hybrid,
    /// knowledge.
    #[arg(long, value_name = "SPEC", value_parser = TreeSpec::parse)]
    pub tree: Option<TreeSpec>,
    /// Predict the speedup of the measured acceptance on these GPUs (comma-separated: a100,
    /// h100, h200, b200, l40s; `forge predict --gpus` lists them) with the roofline model of
    /// docs/eval.md, for the draft as SGLang / vLLM serve it.
    #[arg(long, value_name = "GPU", value_delimiter = ',')]
    pub predict: Vec<String>,
    /// Batch sizes (concurrent sequences) for --predict, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<i64>,
    /// Mean context per sequence (tokens) for --predict.
    #[arg(long, default_value_t = 2048)]
    pub context: i64,
    /// After the main run, decode the prompts once per serving setting (chains of 3 to 8;
    /// trees of topk 2 to 8 with 4 to 64 nodes for drafts that branch) and print, per --predict
    /// GPU and --batch size, the setting with the best predicted speedup and its SGLang and vLLM
    /// flags.
    #[arg(long, requires = "predict")]
    pub sweep: bool,
    /// A setting for --sweep instead of the defaults (repeatable): chain:N or
    /// tree:steps=S,topk=K,draft_tokens=D.
    #[arg(long = "sweep-setting", value_name = "SETTING", value_parser = parse_setting, requires = "sweep")]
    pub sweep_settings: Vec<Setting>,
    /// Sampling seed (each prompt turn draws from its own stream: seed, id, turn).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the full report (summary, per category, per prompt) as JSON here.
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
    /// Greedy only: fail (exit 1) unless every speculative output equals plain greedy output.
    #[arg(long)]
    pub verify: bool,
    /// Skip plain decoding (no speedup, no verification).
    #[arg(long)]
    pub no_baseline: bool,
    /// Split the target over N ranks (tensor parallelism): run as forge launch --nproc N (or --gpus N) -- eval ... --tensor-parallel N; rank 0 reports.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
    /// A draft option, KEY=VALUE (repeatable), e.g. knowledge=off: the knowledge drafter
    /// without its knowledge cache.
    #[arg(long = "draft-option", value_name = "KEY=VALUE")]
    pub draft_options: Vec<String>,
    /// After the main run, decode the same prompts again with this draft option added (e.g.
    /// knowledge=off: tau without the knowledge cache) and report that run too, its speedup
    /// against the main run's plain decoding (repeatable: one more run each).
    #[arg(long = "ablate", value_name = "KEY=VALUE")]
    pub ablate: Vec<String>,
    /// Only the first N prompts of each file.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub chat: ChatArgs,
}

fn parse_setting(s: &str) -> std::result::Result<Setting, String> {
    Setting::parse(s).map_err(|e| e.to_string())
}

/// The speedups `--predict` gives for the main run, and the `--sweep` recommendations with
/// their engine flags.
fn print_predictions(report: &eval::EvalReport, a: &EvalArgs) {
    let setting = match &a.tree {
        Some(t) => format!("tree {t}"),
        None => format!("chain of {}", a.gamma),
    };
    if !report.predictions.is_empty() {
        println!(
            "predicted on GPUs (tau {:.3}, {setting}, context {}; roofline of docs/eval.md, not measured):",
            report.overall.tau(),
            a.context
        );
        for (g, batch, p) in &report.predictions {
            println!(
                "  {:<26} batch {:>4}: {:.2}x ({:.0} -> {:.0} tok/s; draft {:.3} ms + verify {:.3} ms per round)",
                g.label,
                batch,
                p.speedup,
                p.plain_tokens_per_s,
                p.tokens_per_s,
                p.draft_s * 1e3,
                p.verify_s * 1e3
            );
        }
    }
    let Some(shape) = &report.serving_shape else {
        return;
    };
    if report.recommendations.is_empty() {
        return;
    }
    println!("recommended serving settings (best predicted speedup of the sweep):");
    let draft = a.draft.display().to_string();
    for r in &report.recommendations {
        let (s, _) = &report.sweep[r.best];
        let speedup = r.predictions[r.best].as_ref().map(|p| p.speedup).unwrap_or(f64::NAN);
        println!("  {:<26} batch {:>4}: {s} ({speedup:.2}x)", r.gpu.label, r.batch);
        if speedup < 1.0 {
            println!("      no setting of the sweep beats plain decoding here: serve the target without this draft (or raise tau: train longer, on more data)");
            continue;
        }
        let sglang = eval::sweep::engine_flags(s, shape, &draft).0;
        if let Some(f) = sglang {
            println!("      {f}");
        }
        // vLLM drafts chains: the best chain of the sweep
        let best_chain = r
            .predictions
            .iter()
            .zip(&report.sweep)
            .filter(|(p, (s, _))| p.is_some() && matches!(s, Setting::Chain { .. }))
            .max_by(|x, y| {
                let sp = |p: &Option<forge_trainer::predict::Prediction>| p.as_ref().map(|p| p.speedup).unwrap_or(0.0);
                sp(x.0).total_cmp(&sp(y.0))
            });
        if let Some((p, (chain, _))) = best_chain {
            if let Some(f) = eval::sweep::engine_flags(chain, shape, &draft).1 {
                let sp = p.as_ref().map(|p| p.speedup).unwrap_or(f64::NAN);
                println!("      {f}   ({chain}, {sp:.2}x)");
            }
        }
    }
}

/// One summary line of the printed report.
fn print_summary(name: &str, t: &Tally, baseline: bool) {
    let acc: Vec<String> = t
        .accepted
        .iter()
        .zip(&t.reached)
        .map(|(&a, &r)| format!("{:.2}", ratio(a as f64, r as f64)))
        .collect();
    let mut line = format!(
        "  {name:<24} turns {:>3}  tokens {:>6}  tau {:.3}  accept/pos [{}]  draft {:.0}%  {:.1} tok/s",
        t.turns,
        t.spec_tokens,
        t.tau(),
        acc.join(" "),
        100.0 * ratio(t.draft_s, t.spec_s),
        ratio(t.spec_tokens as f64, t.spec_s)
    );
    line += &format!("  draft {:.2} ms/token", 1e3 * ratio(t.draft_s, t.drafted as f64));
    if !t.counters.is_empty() {
        let all: u64 = t.counters.values().sum();
        let shares: Vec<String> = t
            .counters
            .iter()
            .map(|(k, n)| format!("{k} {:.0}%", 100.0 * ratio(*n as f64, all as f64)))
            .collect();
        line += &format!("  [{}]", shares.join(" "));
    }
    if baseline {
        line += &format!(
            "  plain {:.1} tok/s  draft/target time {}  speedup {}",
            ratio(t.base_tokens as f64, t.base_s),
            t.draft_time_ratio()
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "-".into()),
            t.speedup().map(|s| format!("{s:.3}x")).unwrap_or_else(|| "-".into())
        );
        if t.compared > 0 {
            line += &format!("  greedy mismatches {}/{}", t.mismatches, t.compared);
            if t.mismatches_at_ties > 0 {
                line += &format!(" ({} at ties)", t.mismatches_at_ties);
            }
        }
    }
    println!("{line}");
}

pub fn run(a: EvalArgs) -> Result<()> {
    let device = forge_models::parse_device(&a.chat.device).context("--device")?;
    let tp = forge_trainer::parallel::tensor::target_group(
        a.tensor_parallel,
        forge_trainer::recipe::Backend::Auto,
        device,
        1800,
    )
    .context("--tensor-parallel")?;
    let device = forge_trainer::parallel::tensor::rank_device(device, &tp);
    let opts = EvalOptions {
        target: a.target.clone(),
        draft: a.draft.clone(),
        prompts: a.prompts.clone(),
        max_new_tokens: a.max_new_tokens,
        gamma: a.gamma,
        dynamic_gamma: a.dynamic_gamma,
        min_gamma: a.min_gamma,
        max_gamma: a.max_gamma,
        sampling: Sampling {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
        },
        acceptance: a.acceptance.into(),
        tree: a.tree,
        predict: (!a.predict.is_empty()).then(|| PredictOptions {
            gpus: a.predict.clone(),
            batches: a.batch.clone(),
            context: a.context,
        }),
        sweep: a.sweep,
        sweep_settings: a.sweep_settings.clone(),
        seed: a.seed,
        verify: a.verify,
        no_baseline: a.no_baseline,
        draft_options: a.draft_options.clone(),
        ablate: a.ablate.clone(),
        limit: a.limit,
        system: a.chat.system.clone(),
        chat_template: a.chat.chat_template.clone(),
        dtype: a.chat.dtype.clone(),
        device: match device {
            tch::Device::Cuda(i) => format!("cuda:{i}"),
            _ => a.chat.device.clone(),
        },
        tensor_parallel: tp.clone(),
    };
    if tp.as_ref().is_some_and(|t| t.rank() != 0) {
        // the other ranks of a tensor-parallel target decode the same prompts; rank 0 reports
        eval::run(&opts, &mut forge_trainer::progress::NoProgress, |_| {})?;
        return Ok(());
    }
    let mut bar = Bar::new(
        progress::show(&a.chat.progress),
        "eval [{bar:30}] {pos}/{len} turns {msg} eta {eta}",
        false,
    );
    let mut files = 0;
    let mut baseline = true;
    let mut swept = false;
    let report = eval::run(&opts, &mut bar, |e| match e {
        EvalEvent::Started(s) => {
            files = s.files;
            baseline = s.baseline();
            // once, on stdout (the report's first line, also when piped), before any progress
            println!(
                "forge eval: {} draft {} ({:.2} M weights, {:.1} MB{}) against {} ({:?}, {}), {} prompt turns in {} file(s), {}{}, {}{}, max {} new tokens",
                s.kind,
                s.source.display(),
                s.weights as f64 / 1e6,
                s.weight_bytes as f64 / 1e6,
                s.description.iter().map(|d| format!("; {d}")).collect::<String>(),
                s.target.display(),
                s.device,
                s.dtype.name(),
                s.total_turns,
                s.files,
                match &a.tree {
                    Some(t) => format!("tree {t}"),
                    None => format!("gamma {}", a.gamma),
                },
                if a.dynamic_gamma { format!(" (dynamic, min {}, max {})", a.min_gamma, a.max_gamma) } else { String::new() },
                opts.sampling.describe(),
                if opts.sampling.is_greedy() { String::new() } else { format!(" ({} acceptance)", Acceptance::from(a.acceptance).name()) },
                a.max_new_tokens
            );
            let _ = std::io::stdout().flush();
        }
        EvalEvent::File(f) => {
            println!("{}:", f.path.display());
            print_summary("all", &f.all, baseline);
            if f.categories.len() > 1 {
                for (c, t) in &f.categories {
                    print_summary(c, t, baseline);
                }
            }
            // the drafter's groups of prompts (the knowledge drafter: in cache / not in cache)
            for (g, t) in &f.groups {
                print_summary(g, t, baseline);
            }
        }
        EvalEvent::Overall(t, groups) => {
            if files > 1 {
                println!("all files:");
                print_summary("all", t, baseline);
                for (g, t) in groups {
                    print_summary(g, t, baseline);
                }
            }
        }
        EvalEvent::Ablation(ab) => {
            println!("with {} (all files):", ab.option);
            print_summary("all", &ab.all, baseline);
            for (g, t) in &ab.groups {
                print_summary(g, t, baseline);
            }
        }
        EvalEvent::Sweep(setting, t) => {
            if !swept {
                println!("sweep (all files, one run per setting):");
                swept = true;
            }
            print_summary(&setting.to_string(), t, false);
        }
    })?;
    print_predictions(&report, &a);
    if let Some(out) = &a.json {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("--json: cannot create {}", dir.display()))?;
        }
        let mut f = std::fs::File::create(out).with_context(|| format!("--json {}: cannot create", out.display()))?;
        writeln!(f, "{}", serde_json::to_string_pretty(&report.to_json())?)
            .with_context(|| format!("--json {}: write failed", out.display()))?;
        eprintln!("forge eval: wrote {}", out.display());
    }
    match report.verify()? {
        Verified::NotAsked => {}
        Verified::EqualBesidesTies { compared, at_ties } => eprintln!(
            "forge eval: verified: {} of {} greedy speculative outputs equal plain greedy decoding; {} depart at a tie of the target's two best logits (within 4 units in the last place of {}: verifying several positions in one forward rounds differently from decoding one at a time), none beyond",
            compared - at_ties,
            compared,
            at_ties,
            report.setup.dtype.name()
        ),
        Verified::AllEqual { compared } => eprintln!(
            "forge eval: verified: all {compared} greedy speculative outputs equal plain greedy decoding"
        ),
    }
    Ok(())
}
