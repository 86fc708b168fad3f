//! `forge predict`: the speedup a draft with a measured tau would give on real GPUs (the
//! roofline model in `forge_trainer::predict`; docs/eval.md says what it assumes).

use anyhow::{bail, Context, Result};
use forge_models::TargetConfig;
use forge_trainer::predict::{self, DraftShape, Efficiency, ModelShape, Serving, Setting, GPUS};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PredictArgs {
    /// List the GPUs the model knows, with their datasheet numbers and sources, and exit.
    #[arg(long)]
    gpus: bool,
    /// The target: a Hugging Face folder holding config.json.
    #[arg(long, conflicts_with = "target_config")]
    target: Option<PathBuf>,
    /// The target's config.json itself.
    #[arg(long)]
    target_config: Option<PathBuf>,
    /// Measured mean acceptance length: tokens emitted per verification forward, bonus included
    /// (`tau` in `forge eval`'s report), measured under the setting given here.
    #[arg(long)]
    tau: Option<f64>,
    /// A chain of N drafts: N draft forwards, N + 1 tokens verified.
    #[arg(long, value_name = "N", conflicts_with_all = ["tree", "block"])]
    chain: Option<u32>,
    /// An SGLang EAGLE tree: steps=S,topk=K,draft_tokens=D.
    #[arg(long, value_name = "steps=S,topk=K,draft_tokens=D", conflicts_with = "block")]
    tree: Option<String>,
    /// A block drafter: one draft forward over N positions, N tokens verified.
    #[arg(long, value_name = "N")]
    block: Option<u32>,
    /// The draft's layout: eagle3 (default for --chain and --tree), eagle1, medusa (heads =
    /// block size - 1, needs --block), block (a DFlash-style block drafter, default for --block).
    #[arg(long, value_name = "KIND")]
    draft_kind: Option<String>,
    /// Decoder layers of the draft (default 1; 5 for a block drafter).
    #[arg(long)]
    draft_layers: Option<i64>,
    /// Rows of the lm_head the draft reads: an EAGLE-3 draft vocabulary (32000 in SpecForge's
    /// configs); default the target's vocabulary.
    #[arg(long)]
    draft_vocab: Option<i64>,
    /// GPUs (repeatable or comma-separated): a100, h100, h200, b200, l40s.
    #[arg(long, value_delimiter = ',', default_value = "h100")]
    gpu: Vec<String>,
    /// Concurrent sequences (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<i64>,
    /// Mean context per sequence, tokens.
    #[arg(long, default_value_t = 2048)]
    context: i64,
    /// GPUs the target is split over (tensor parallel; all-reduces not modelled).
    #[arg(long, default_value_t = 1)]
    tp: i64,
    /// Share of peak bf16 FLOP/s reached.
    #[arg(long, default_value_t = Efficiency::default().compute)]
    compute_efficiency: f64,
    /// Share of peak memory bandwidth reached.
    #[arg(long, default_value_t = Efficiency::default().bandwidth)]
    bandwidth_efficiency: f64,
    /// Fixed cost of every forward, microseconds.
    #[arg(long, default_value_t = Efficiency::default().forward_overhead_s * 1e6)]
    forward_overhead_us: f64,
    /// Host work exposed per speculative round, as a share of a plain decoding step (0 for an
    /// engine that overlaps speculative rounds with the host).
    #[arg(long, default_value_t = Efficiency::default().round_host_share)]
    round_host_share: f64,
}

pub fn run(a: PredictArgs) -> Result<()> {
    if a.gpus {
        print_gpus();
        return Ok(());
    }
    let config_path = match (&a.target, &a.target_config) {
        (Some(dir), None) => dir.join("config.json"),
        (None, Some(file)) => file.clone(),
        _ => bail!("pass --target DIR or --target-config FILE (or --gpus to list the GPUs)"),
    };
    let config = TargetConfig::from_file(&config_path)?;
    let Some(tau) = a.tau else {
        bail!("--tau: pass the measured mean acceptance length (tokens per verification forward)");
    };
    let setting = match (a.chain, &a.tree, a.block) {
        (Some(n), None, None) => Setting::parse(&format!("chain:{n}"))?,
        (None, Some(tree), None) => Setting::parse(&format!("tree:{tree}")).context("--tree")?,
        (None, None, Some(size)) => Setting::parse(&format!("block:{size}"))?,
        _ => bail!("pass one of --chain N, --tree steps=S,topk=K,draft_tokens=D or --block N"),
    };
    let rows = a.draft_vocab.unwrap_or(config.vocab_size);
    if rows < 1 {
        bail!("--draft-vocab: takes a whole number >= 1, not {rows}");
    }
    let is_block = matches!(setting, Setting::Block { .. });
    let kind = a
        .draft_kind
        .clone()
        .unwrap_or_else(|| if is_block { "block" } else { "eagle3" }.to_string());
    let layers = a.draft_layers.unwrap_or(if kind == "block" { 5 } else { 1 });
    if layers < 1 && kind != "medusa" {
        bail!("--draft-layers: takes a whole number >= 1, not {layers}");
    }
    let draft = match (kind.as_str(), setting) {
        ("eagle3", _) => DraftShape::eagle3(&config, layers, rows),
        ("eagle1", _) => DraftShape::eagle1(&config, layers, rows),
        // DFlash drafts read five target layers
        ("block", _) => DraftShape::block(&config, layers, 5, rows),
        ("medusa", Setting::Block { size }) if size >= 2 => DraftShape::medusa(&config, i64::from(size) - 1, rows),
        ("medusa", _) => bail!("--draft-kind medusa: pass --block N (N - 1 heads, one forward)"),
        (other, _) => bail!("--draft-kind: '{other}' is not one of eagle3, eagle1, medusa, block"),
    };
    let gpus = a
        .gpu
        .iter()
        .map(|g| predict::gpu(g))
        .collect::<Result<Vec<_>, _>>()
        .context("--gpu")?;
    let eff = Efficiency {
        compute: a.compute_efficiency,
        bandwidth: a.bandwidth_efficiency,
        forward_overhead_s: a.forward_overhead_us * 1e-6,
        round_host_share: a.round_host_share,
    };
    let target = ModelShape::target(&config);
    // every prediction first, so a refused input prints nothing but the error
    let mut tables = Vec::new();
    for g in gpus {
        let mut rows = Vec::new();
        for &batch in &a.batch {
            let serving = Serving {
                batch,
                context: a.context,
                tensor_parallel: a.tp,
            };
            rows.push((
                batch,
                predict::predict(&target, &draft, &setting, tau, g, &serving, &eff)?,
            ));
        }
        tables.push((g, rows));
    }
    println!(
        "target {}: {:.2}B parameters, {} layers; draft {kind}: {layers} layer(s), {rows}-row lm_head, {:.2}B parameters read per forward",
        config_path.display(),
        config.num_parameters() as f64 / 1e9,
        config.num_layers,
        draft.weight_params / 1e9
    );
    println!(
        "setting {setting}: {} draft forward(s), {} tokens verified; tau {tau}; context {}; tensor parallel {}",
        setting.draft_forwards(tau).len(),
        setting.verify_tokens(),
        a.context,
        a.tp
    );
    println!(
        "efficiency: compute {}, bandwidth {}, {} us per forward, host {} of a plain step per round (docs/eval.md)",
        eff.compute, eff.bandwidth, a.forward_overhead_us, eff.round_host_share
    );
    for (g, rows) in tables {
        println!(
            "\n{} ({:.1} TFLOP/s bf16 dense, {:.2} TB/s)",
            g.label,
            g.bf16_flops / 1e12,
            g.bandwidth / 1e12
        );
        println!(
            "  {:>6} {:>9} {:>10} {:>15} {:>12} {:>12} {:>8}",
            "batch", "draft ms", "verify ms", "plain ms/token", "tok/s plain", "tok/s spec", "speedup"
        );
        for (batch, p) in rows {
            println!(
                "  {:>6} {:>9.3} {:>10.3} {:>15.3} {:>12.0} {:>12.0} {:>7.2}x{}",
                batch,
                p.draft_s * 1e3,
                p.verify_s * 1e3,
                p.plain_step_s * 1e3,
                p.plain_tokens_per_s,
                p.tokens_per_s,
                p.speedup,
                if p.verify_compute_bound {
                    "  (verify compute-bound)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

fn print_gpus() {
    println!(
        "{:<6} {:<26} {:>16} {:>9} {:>7}  source",
        "name", "GPU", "bf16 TFLOP/s", "TB/s", "GB"
    );
    for g in GPUS {
        println!(
            "{:<6} {:<26} {:>16.1} {:>9.3} {:>7.0}  {}\n{:<6} {}",
            g.name,
            g.label,
            g.bf16_flops / 1e12,
            g.bandwidth / 1e12,
            g.memory_gb,
            g.source,
            "",
            g.note
        );
    }
}
