//! Helpers shared by the integration tests: tiny random targets, paths, the forge binary.

use forge_models::generate::RowRng;
use forge_models::layers::ParamInit;
use forge_models::safetensors_io::{write_safetensors, SafetensorsFile};
use forge_models::{DType, TargetConfig, TargetModel};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh temporary folder under target/test-tmp (kept small; removed at the start).
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = root().join("target").join("test-tmp").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create test tmp dir");
    d
}

/// The `forge` binary built by `make build` / `cargo build --release -p forge`
/// (same profile folder as this test binary).
pub fn forge_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = profile_dir.join("forge");
    assert!(
        bin.is_file(),
        "{} not found: build it first (make build, or cargo build -p forge with the same profile)",
        bin.display()
    );
    bin
}

pub fn forge(args: &[&str]) -> Output {
    Command::new(forge_bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("run forge")
}

/// config.json of a tiny random target: hidden 64, 2 layers, 4 heads / 2 KV heads (GQA).
pub fn tiny_config(model_type: &str) -> serde_json::Value {
    let mut c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": 96,
        "tie_word_embeddings": true,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "eos_token_id": 2,
        "bos_token_id": 1,
    });
    match model_type {
        // Qwen3: q/k norm, explicit head_dim different from hidden/heads, untied lm_head.
        "qwen3" => {
            c["head_dim"] = 32.into();
            c["tie_word_embeddings"] = false.into();
            c["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
        }
        // Qwen2: q/k/v bias, untied.
        "qwen2" => {
            c["tie_word_embeddings"] = false.into();
            c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        }
        _ => {}
    }
    c
}

/// Random numbers that do not come from libtorch's generator (splitmix64 + Box-Muller).
///
/// libtorch has one CPU generator per process and the tests run on parallel threads in one
/// process: `tch::manual_seed` followed by draws is not reproducible while another test draws
/// (and every model construction draws). Test models whose values an assertion depends on
/// take their weights from here, seeded per tensor name so that the order does not matter.
pub struct TestRng(RowRng);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(RowRng::new(seed))
    }

    /// A generator for one named tensor: the seed mixed with the name's FNV-1a hash.
    pub fn for_name(seed: u64, name: &str) -> Self {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        TestRng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.next_f64()
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A float tensor of `shape` uniform in [lo, hi).
    pub fn uniform_tensor(&mut self, shape: &[i64], lo: f64, hi: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (lo + (hi - lo) * self.uniform()) as f32).collect();
        Tensor::from_slice(&v).view(shape)
    }

    /// A float tensor of `shape` normal with mean 0 and standard deviation `std`.
    pub fn normal_tensor(&mut self, shape: &[i64], std: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (std * self.normal()) as f32).collect();
        Tensor::from_slice(&v).view(shape)
    }
}

/// Overwrites the trainable floating-point variables of `vs` that are not constant (norm
/// weights of ones and zero biases stay) with uniform values in +-1/sqrt(fan_in), like the
/// default linear initialisation, drawn from [`TestRng`] per name: a drafter built by a test
/// then has the same weights in every run, whatever the other tests draw meanwhile.
pub fn reinit_trainable(vs: &tch::nn::VarStore, seed: u64) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if !v.requires_grad() || !v.is_floating_point() || v.numel() < 2 {
                continue;
            }
            let constant = (v.max() - v.min()).double_value(&[]) == 0.0;
            if constant {
                continue;
            }
            let shape = v.size();
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            let b = 1.0 / fan_in.sqrt();
            let r = TestRng::for_name(seed, &name).uniform_tensor(&shape, -b, b);
            v.copy_(&r.to_kind(v.kind()));
        }
    });
}

/// Builds a tiny target with random weights (norm weights random around 1, biases random)
/// so that every tensor matters in comparisons. The weights depend only on the seed (see
/// [`TestRng`]).
pub fn random_target(model_type: &str, seed: i64) -> TargetModel {
    random_target_from(tiny_config(model_type), seed)
}

/// A target with random weights for any config.json value (see [`random_target`]).
pub fn random_target_from(config: serde_json::Value, seed: i64) -> TargetModel {
    let cfg = TargetConfig::from_value(config).expect("tiny config");
    let model = TargetModel::build(cfg, DType::F32, Device::Cpu, ParamInit::Default);
    tch::no_grad(|| {
        for (name, mut v) in model.vs.variables() {
            let mut rng = TestRng::for_name(seed as u64, &name);
            let r = if name.ends_with("norm.weight") {
                rng.uniform_tensor(&v.size(), 0.5, 1.5)
            } else {
                rng.normal_tensor(&v.size(), 0.15)
            };
            v.copy_(&r.to_kind(v.kind()));
        }
    });
    model
}

/// Saves a random tiny target as a HF folder and returns its path.
pub fn saved_tiny_target(model_type: &str, seed: i64, dir: &Path) -> PathBuf {
    let model = random_target(model_type, seed);
    model.save_hf(dir).expect("save tiny target");
    dir.to_path_buf()
}

/// `forge export CKPT --format FORMAT --dtype fp32 --out OUT`, its output unchecked.
pub fn export_fp32(ckpt: &Path, format: &str, out: &Path) -> Output {
    forge(&[
        "export",
        ckpt.to_str().expect("utf8"),
        "--format",
        format,
        "--dtype",
        "fp32",
        "--out",
        out.to_str().expect("utf8"),
    ])
}

/// `forge export CKPT --format forge --dtype fp32 --out OUT`; asserts it succeeds and that the
/// export holds exactly the checkpoint's weights, bit for bit. Returns them, sorted by name.
pub fn export_forge_equal_to(ckpt: &Path, out: &Path) -> Vec<(String, Tensor)> {
    let o = export_fp32(ckpt, "forge", out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = step_weights(ckpt);
    let b = step_weights(out);
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na}");
    }
    b
}

/// A two-turn MT-Bench-style question file (`questions.jsonl`) in `dir`.
pub fn two_turn_questions(dir: &Path) -> PathBuf {
    let p = dir.join("questions.jsonl");
    std::fs::write(
        &p,
        "{\"question_id\": 1, \"turns\": [\"Write a haiku about rain.\", \"Now one about snow.\"]}\n",
    )
    .expect("write");
    p
}

/// The weights of a checkpoint's `step_N` folder, sorted by name.
pub fn step_weights(step_dir: &Path) -> Vec<(String, Tensor)> {
    let mut w = SafetensorsFile::open(&step_dir.join("model.safetensors"))
        .expect("open")
        .tensors()
        .expect("tensors");
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The demo target folder (fetched by `make demo-model`).
pub fn demo_model() -> PathBuf {
    let p = root().join(".forge/models/SmolLM2-135M-Instruct");
    assert!(
        p.join("model.safetensors").is_file(),
        "demo target missing at {}: run `make demo-model` (make test does)",
        p.display()
    );
    p
}

/// The python with numpy + safetensors that scripts/get-demo-model.sh sets up.
pub fn reference_python() -> PathBuf {
    let p = root().join(".forge/venv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run `make demo-model` (make test does)",
        p.display()
    );
    p
}

/// A tiny random Llama target (hidden 64, 2 layers) that uses the demo target's tokenizer and
/// chat template (so its vocabulary is 49152), saved as a HF folder under `dir`.
pub fn tiny_target_with_demo_tokenizer(dir: &Path, seed: i64) -> PathBuf {
    tiny_target_with_demo_tokenizer_layers(dir, seed, 2)
}

/// [`tiny_target_with_demo_tokenizer`] with `layers` decoder layers.
pub fn tiny_target_with_demo_tokenizer_layers(dir: &Path, seed: i64, layers: i64) -> PathBuf {
    let mut cfg = tiny_config("llama");
    cfg["vocab_size"] = 49152.into();
    cfg["num_hidden_layers"] = layers.into();
    let model = random_target_from(cfg, seed);
    model.save_hf(dir).expect("save tiny target");
    let demo = demo_model();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(demo.join(f), dir.join(f)).expect("copy tokenizer");
    }
    dir.to_path_buf()
}

/// The first `n` conversations of the committed demo set (recipes/data/demo_conversations.jsonl)
/// written to `path`.
pub fn demo_conversations_subset(path: &Path, n: usize) -> PathBuf {
    let src = root().join("recipes/data/demo_conversations.jsonl");
    let text = std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(path, lines.join("\n") + "\n").expect("write subset");
    path.to_path_buf()
}

/// A tiny training run for CLI tests: a random tiny target (hidden 64, the demo tokenizer),
/// 48 demo conversations, and a recipe whose paths are overridden with `--set`.
pub struct TinyRun {
    pub dir: PathBuf,
    pub recipe: PathBuf,
    pub target: PathBuf,
    pub data: PathBuf,
}

impl TinyRun {
    /// `sharp`: the target's (tied) embedding scaled by 4. A random target's next-token
    /// distributions are nearly flat, which leaves little for a drafter to match; sharper ones
    /// make learning visible in a few steps.
    pub fn new(name: &str, recipe: &str, sharp: bool) -> TinyRun {
        Self::with_layers(name, recipe, sharp, 2)
    }

    /// [`TinyRun::new`] with a target of `layers` decoder layers.
    pub fn with_layers(name: &str, recipe: &str, sharp: bool, layers: i64) -> TinyRun {
        let dir = tmp_dir(name);
        let target = tiny_target_with_demo_tokenizer_layers(&dir.join("target"), 5, layers);
        if sharp {
            let file = target.join("model.safetensors");
            let mut w = SafetensorsFile::open(&file).expect("open").tensors().expect("tensors");
            for (n, t) in w.iter_mut() {
                if n == "model.embed_tokens.weight" {
                    *t = &*t * 4.0;
                }
            }
            let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
            write_safetensors(&file, &w, &meta).expect("write");
        }
        let data = demo_conversations_subset(&dir.join("convs.jsonl"), 48);
        TinyRun {
            recipe: root().join(recipe),
            dir,
            target,
            data,
        }
    }

    /// The `--set` overrides pointing the recipe at this run's target, data and cache.
    pub fn sets(&self) -> Vec<String> {
        vec![
            format!("target.path={}", self.target.display()),
            format!("data.train=[{}]", self.data.display()),
            format!("data.cache_dir={}", self.dir.join("cache").display()),
        ]
    }

    /// `forge train` into checkpoint.dir `ckpt` with extra arguments; panics on failure.
    pub fn train(&self, ckpt: &Path, extra: &[&str]) -> Output {
        let mut sets = self.sets();
        sets.push(format!("checkpoint.dir={}", ckpt.display()));
        let mut args: Vec<String> = vec!["train".into(), self.recipe.display().to_string()];
        for s in &sets {
            args.push("--set".into());
            args.push(s.clone());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = forge(&refs);
        assert!(
            out.status.success(),
            "forge {}\n{}",
            refs.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// (step, train/loss) rows of a run's metrics.jsonl.
pub fn losses(ckpt: &Path) -> Vec<(u64, f64)> {
    metrics_rows(&ckpt.join("metrics.jsonl"))
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r["train/loss"].as_f64()?)))
        .collect()
}

/// Rows of a metrics.jsonl file.
pub fn metrics_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("metrics row"))
        .collect()
}

/// The target's lm_head and embedding as a drafter is given them (either may be left out).
pub struct TargetHeads {
    pub lm_head: Option<Tensor>,
    pub embed: Option<Tensor>,
}

impl TargetHeads {
    pub fn access(&self) -> forge_models::drafters::TargetAccess<'static> {
        use forge_models::drafters::{EMBED, LM_HEAD};
        let mut m = std::collections::BTreeMap::new();
        if let Some(t) = &self.lm_head {
            m.insert(LM_HEAD.to_string(), t.shallow_clone());
        }
        if let Some(t) = &self.embed {
            m.insert(EMBED.to_string(), t.shallow_clone());
        }
        forge_models::drafters::TargetAccess::Tensors(m)
    }
}

/// A training step context (step 0 of 1, micro-batch 0, seed 0).
pub fn train_ctx() -> forge_models::drafters::StepContext<'static> {
    forge_models::drafters::StepContext::train(0, 0, 1, 0)
}

/// An evaluation context.
pub fn eval_ctx() -> forge_models::drafters::StepContext<'static> {
    forge_models::drafters::StepContext::eval(0, 0, 1)
}
