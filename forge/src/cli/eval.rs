//! `forge eval`: the flags, the progress bar and the printed summaries of
//! `forge_trainer::eval`, and the `--json` report file.

use super::chat::ChatArgs;
use super::progress::{self, Bar};
use anyhow::{Context, Result};
use forge_models::generate::Sampling;
use forge_models::spec_tree::TreeSpec;
use forge_models::speculative::Acceptance;
use forge_trainer::eval::{self, ratio, EvalEvent, EvalOptions, Tally, Verified};
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
        seed: a.seed,
        verify: a.verify,
        no_baseline: a.no_baseline,
        draft_options: a.draft_options.clone(),
        ablate: a.ablate.clone(),
        limit: a.limit,
        system: a.chat.system.clone(),
        chat_template: a.chat.chat_template.clone(),
        dtype: a.chat.dtype.clone(),
        device: a.chat.device.clone(),
    };
    let mut bar = Bar::new(
        progress::show(&a.chat.progress),
        "eval [{bar:30}] {pos}/{len} turns {msg} eta {eta}",
        false,
    );
    let mut files = 0;
    let mut baseline = true;
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
    })?;
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
