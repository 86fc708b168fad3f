use forge_tests::{forge, root};
use forge_trainer::recipe::{DrafterSection, Recipe, Schedule};
use forge_trainer::target_check;

fn errors(text: &str, overrides: &[&str]) -> Vec<String> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Recipe::from_str(text, &o) {
        Ok(_) => panic!("recipe unexpectedly valid:\n{text}"),
        Err(issues) => issues.iter().map(|i| format!("{} @ {}", i, i.loc)).collect(),
    }
}

const BASE: &str = "drafter:\n  kind: medusa\ntarget:\n  path: m\ndata:\n  train: d.jsonl\ncheckpoint:\n  dir: out\n";

#[test]
fn every_recipe_passes_forge_check() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("recipes")).expect("recipes/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let recipe = Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        let p = path.to_str().expect("utf8");
        let out = forge(&["check", p, "--recipe-only"]);
        assert!(
            out.status.success(),
            "forge check {} --recipe-only failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // with its target: passes where the folder is complete (the demo target after `make
        // demo-model`), otherwise fails naming target.path, what is missing and the fix
        let target = recipe.target.path.clone().expect("every recipe names its target");
        let complete = target_check::target_folder_problems(&target).is_empty();
        let out = forge(&["check", p]);
        let err = String::from_utf8_lossy(&out.stderr);
        if complete {
            assert!(out.status.success(), "forge check {p} failed: {err}");
        } else {
            assert!(
                !out.status.success() && err.contains("target.path") && err.contains(&target.display().to_string()),
                "forge check {p} must refuse its missing target {}: {err}",
                target.display()
            );
        }
    }
    assert!(n >= 6, "expected the real-scale, demo and tiny recipes, found {n}");
}

#[test]
fn defaults_and_kind_fields() {
    let r = Recipe::from_str(BASE, &[]).expect("valid");
    match &r.drafter {
        DrafterSection::Medusa(m) => {
            assert_eq!(m.num_heads, 4);
            assert_eq!(m.loss_decay, 0.8);
        }
        other => panic!("wrong kind {other:?}"),
    }
    assert_eq!(r.train.schedule, Schedule::Cosine);
    assert_eq!(r.data.train, vec![std::path::PathBuf::from("d.jsonl")]);
    let e3 = Recipe::from_str(
        &BASE.replace("kind: medusa", "kind: eagle3\n  ttt_length: 5\n  aux_layers: [1, 2, 3]"),
        &[],
    )
    .expect("valid");
    match e3.drafter {
        DrafterSection::Eagle3(e) => {
            assert_eq!(e.ttt_length, 5);
            assert_eq!(e.aux_layers, Some(vec![1, 2, 3]));
            assert_eq!(e.draft_vocab_size, 32000);
        }
        other => panic!("wrong kind {other:?}"),
    }
}

#[test]
fn misspelt_key_names_path_line_and_suggestion() {
    let text = BASE.replace("  train: d.jsonl", "  train: d.jsonl\n  max_lenght: 128");
    let e = errors(&text, &[]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("data.max_lenght") && e[0].contains("did you mean 'max_length'") && e[0].contains("line 7"),
        "{e:?}"
    );
}

#[test]
fn wrong_type_names_path_and_line() {
    let text = format!("{BASE}train:\n  lr: fast\n  micro_batch_size: 1.5\n");
    let e = errors(&text, &[]);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].contains("train.lr") && e[0].contains("expected a number") && e[0].contains("line 10"),
        "{e:?}"
    );
    assert!(
        e[1].contains("train.micro_batch_size") && e[1].contains("integer") && e[1].contains("line 11"),
        "{e:?}"
    );
}

#[test]
fn unknown_kind_lists_the_kinds() {
    let e = errors(&BASE.replace("kind: medusa", "kind: medussa"), &[]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("drafter.kind")
            && e[0].contains("did you mean 'medusa'")
            && e[0].contains("eagle3")
            && e[0].contains("line 2"),
        "{e:?}"
    );
}

#[test]
fn kind_specific_keys_are_checked_against_the_kind() {
    // ttt_length belongs to eagle3, not medusa.
    let e = errors(&BASE.replace("kind: medusa", "kind: medusa\n  ttt_length: 7"), &[]);
    assert!(
        e.len() == 1 && e[0].contains("drafter.ttt_length") && e[0].contains("num_heads"),
        "{e:?}"
    );
}

#[test]
fn all_problems_reported_at_once() {
    let text = "drafter:\n  kind: medusa\n  num_heads: 0\ntarget: {}\ndata:\n  max_length: 1\ntrain:\n  lr: -1\n  warmup_ratio: 1.5\n  schedul: cosine\nextra: 1\n";
    let e = errors(text, &[]);
    let joined = e.join("\n");
    for needle in [
        "drafter.num_heads",
        "target.path",
        "data.train",
        "data.max_length",
        "train.lr",
        "train.warmup_ratio",
        "train.schedul",
        "extra",
        "checkpoint.dir",
    ] {
        assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
    }
}

#[test]
fn overrides_apply_and_are_validated() {
    let r = Recipe::from_str(
        BASE,
        &[
            "train.max_steps=20".into(),
            "drafter.num_heads=3".into(),
            "data.train=[a.jsonl, b.jsonl]".into(),
        ],
    )
    .expect("valid");
    assert_eq!(r.train.max_steps, Some(20));
    assert_eq!(r.data.train.len(), 2);
    match r.drafter {
        DrafterSection::Medusa(m) => assert_eq!(m.num_heads, 3),
        other => panic!("{other:?}"),
    }
    let e = errors(BASE, &["train.lr=abc", "train.nope=1", "garbage"]);
    let joined = e.join("\n");
    assert!(
        joined.contains("train.lr") && joined.contains("--set train.lr=abc"),
        "{joined}"
    );
    assert!(
        joined.contains("train.nope") && joined.contains("unknown key"),
        "{joined}"
    );
    assert!(joined.contains("key.path=value"), "{joined}");
}

#[test]
fn resolved_recipe_round_trips() {
    let r = Recipe::from_str(BASE, &["train.lr=3e-4".into()]).expect("valid");
    let yaml = r.to_yaml().expect("yaml");
    let again = Recipe::from_str(&yaml, &[]).unwrap_or_else(|e| panic!("{e:?}\n{yaml}"));
    assert_eq!(r, again);
}

#[test]
fn forge_check_reports_errors_with_file_and_line() {
    let dir = forge_tests::tmp_dir("recipe-check");
    let path = dir.join("bad.yaml");
    std::fs::write(&path, BASE.replace("kind: medusa", "kind: medusa\n  num_haeds: 4")).expect("write");
    let out = forge(&["check", path.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:3:3") && err.contains("drafter.num_haeds") && err.contains("num_heads"),
        "{err}"
    );
}

#[test]
fn docs_recipe_reference_is_current() {
    let generated = forge_trainer::recipe::reference::markdown();
    let on_disk = std::fs::read_to_string(root().join("docs/recipes.md")).expect("docs/recipes.md");
    assert!(
        generated == on_disk,
        "docs/recipes.md is stale: regenerate with `target/release/forge recipe-reference > docs/recipes.md`"
    );
    // Every section and kind is documented.
    for needle in [
        "`kind: medusa`",
        "`kind: eagle3`",
        "`kind: knowledge`",
        "## `train`",
        "| `max_grad_norm` | `0.5` |",
    ] {
        assert!(generated.contains(needle), "{needle}");
    }
}

#[test]
fn knowledge_recipes_are_validated_all_at_once_and_resolve_their_layers() {
    let text = BASE.replace(
        "kind: medusa",
        "kind: knowledge\n  num_sampled_layers: 0\n  layers: [3, 1]\n  kl_weight: -1\n  temperature: 2\n  target_topk: 8\n  cache_dim: 0\n  new_lr_scale: 0",
    );
    let e = errors(&text, &[]);
    for key in [
        "drafter.num_sampled_layers",
        "drafter.layers",
        "drafter.kl_weight",
        "drafter.temperature",
        "drafter.cache_dim",
        "drafter.new_lr_scale",
    ] {
        assert!(
            e.iter().any(|x| x.contains(key) && x.contains("line ")),
            "{key} not reported: {e:?}"
        );
    }
    use forge_models::drafters::DrafterSpec;
    use forge_models::TargetConfig;
    let mut cfg = forge_tests::tiny_config("llama");
    cfg["num_hidden_layers"] = 28.into();
    let cfg = TargetConfig::from_value(cfg).expect("config");
    let spec = |extra: &str| -> Result<DrafterSpec, String> {
        let r = Recipe::from_str(&BASE.replace("kind: medusa", &format!("kind: knowledge{extra}")), &[])
            .map_err(|e| format!("{e:?}"))?;
        r.drafter.to_spec(&cfg, None).map_err(|e| e.to_string())
    };
    let DrafterSpec::Knowledge(k) = spec("").expect("defaults") else {
        panic!("not knowledge")
    };
    assert_eq!(k.layers, vec![0, 5, 11, 16, 22, 27]);
    assert!(k.cache.is_none() && k.transition && k.kl_weight == 0.8 && k.acceptance_weight == 0.3);
    let DrafterSpec::Knowledge(k) = spec("\n  strategy: list\n  layers: [2, 9]").expect("list") else {
        panic!("not knowledge")
    };
    assert_eq!(k.layers, vec![2, 9]);
    let e = spec("\n  layers: [2, 9]").expect_err("layers with strategy uniform");
    assert!(e.contains("strategy: list"), "{e}");
    let e = spec("\n  strategy: list\n  layers: [2, 28]").expect_err("no layer 28");
    assert!(e.contains("layer 28 does not exist"), "{e}");
    let e = spec("\n  num_sampled_layers: 29").expect_err("29 of 28");
    assert!(e.contains("29 layers asked of a target with 28"), "{e}");
}

#[test]
fn spaf_recipes_are_validated_all_at_once_and_offline_training_is_refused() {
    let text = BASE.replace(
        "kind: medusa",
        "kind: spaf\n  adapter_dim_ratio: 1.5\n  alignment_num_layers: 0\n  layer_weights: [0, -1]\n  serial_parallel_transition: -1",
    );
    let e = errors(&text, &["data.mode=offline", "data.hidden_dir=x"]);
    for key in [
        "drafter.adapter_dim_ratio",
        "drafter.alignment_num_layers",
        "drafter.layer_weights",
        "drafter.serial_parallel_transition",
        "data.mode",
    ] {
        assert!(e.iter().any(|x| x.contains(key)), "{key} not reported: {e:?}");
    }
    // layer_weights and train_exits resolve against the target: one weight per exit
    use forge_models::drafters::DrafterSpec;
    use forge_models::TargetConfig;
    use forge_trainer::recipe::DrafterSection;
    let mut cfg = forge_tests::tiny_config("llama");
    cfg["num_hidden_layers"] = 6.into();
    let cfg = TargetConfig::from_value(cfg).expect("config");
    let spec = |extra: &str| -> Result<DrafterSpec, String> {
        let r =
            forge_trainer::recipe::Recipe::from_str(&BASE.replace("kind: medusa", &format!("kind: spaf{extra}")), &[])
                .map_err(|e| format!("{e:?}"))?;
        let d: &DrafterSection = &r.drafter;
        d.to_spec(&cfg, None).map_err(|e| e.to_string())
    };
    let DrafterSpec::Spaf(s) = spec("").expect("defaults") else {
        panic!("not spaf")
    };
    assert_eq!((s.cutoff_layer, s.exit_layer, s.adapter_dim), (3, 3, 16));
    // by default only the drafting exit is in the loss, also when it is not the cutoff's
    assert_eq!(s.layer_weights, vec![1.0, 0.0, 0.0]);
    let DrafterSpec::Spaf(s) = spec("\n  exit_layer: 4").expect("exit 4") else {
        panic!("not spaf")
    };
    assert_eq!(s.layer_weights, vec![0.0, 1.0, 0.0]);
    // `all`: every exit, equally (what the default was before)
    let DrafterSpec::Spaf(s) = spec("\n  train_exits: all").expect("all exits") else {
        panic!("not spaf")
    };
    assert_eq!(s.layer_weights, vec![1.0 / 3.0; 3]);
    let e = spec("\n  train_exits: every").expect_err("not a list");
    assert!(
        e.contains("drafter.train_exits") && e.contains("expected all or a list of exit layers"),
        "{e}"
    );
    let DrafterSpec::Spaf(s) = spec("\n  train_exits: [3, 5]").expect("exits") else {
        panic!("not spaf")
    };
    assert_eq!(s.layer_weights, vec![0.5, 0.0, 0.5]);
    let e = spec("\n  train_exits: [2]").expect_err("no exit at 2");
    assert!(e.contains("train_exits") && e.contains("exits are layers 3..5"), "{e}");
    let e = spec("\n  layer_weights: [1, 1]").expect_err("two weights for three exits");
    assert!(e.contains("layer_weights has 2 entries for 3 exits"), "{e}");
    let e = spec("\n  exit_layer: 6").expect_err("no layer 6");
    assert!(e.contains("exit_layer 6"), "{e}");
}

#[test]
fn eagle3_aux_layers_must_be_three_ascending_layers_of_the_target() {
    use forge_models::TargetConfig;
    use forge_trainer::recipe::DrafterSection;
    let cfg = TargetConfig::from_value(forge_tests::tiny_config("llama")).expect("config");
    let spec = |aux: &str| -> Result<(), String> {
        let text = BASE.replace("kind: medusa", &format!("kind: eagle3\n  aux_layers: {aux}"));
        let r = Recipe::from_str(&text, &[]).map_err(|e| format!("{e:?}"))?;
        let d: &DrafterSection = &r.drafter;
        d.to_spec(&cfg, None).map(|_| ()).map_err(|e| e.to_string())
    };
    // the tiny target has 2 layers: [0, 1, 1] is three ascending (not distinct) layers
    assert!(spec("[0, 1, 1]").is_ok());
    let e = spec("[0, 1]").expect_err("two layers");
    assert!(e.contains("exactly 3") && e.contains("3 x hidden"), "{e}");
    let e = spec("[1, 0, 1]").expect_err("descending");
    assert!(e.contains("must ascend"), "{e}");
    let e = spec("[0, 1, 5, 7]").expect_err("four, out of range");
    assert!(e.contains("5, 7 do not exist") && e.contains("exactly 3"), "{e}");
}

#[test]
fn forge_check_names_what_a_target_folder_lacks() {
    let dir = forge_tests::tmp_dir("check-target");
    let target = dir.join("target");
    let recipe = dir.join("r.yaml");
    std::fs::write(&recipe, BASE.replace("path: m", &format!("path: {}", target.display()))).expect("write");
    let check = |extra: &[&str]| {
        let mut args = vec!["check", recipe.to_str().expect("utf8")];
        args.extend(extra);
        let o = forge(&args);
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // no folder at all
    let (ok, err) = check(&[]);
    assert!(
        !ok && err.contains("does not exist") && err.contains("huggingface-cli download"),
        "{err}"
    );
    let (ok, err) = check(&["--recipe-only"]);
    assert!(ok && err.contains("note: target.path"), "{err}");
    // a saved tiny target has config and weights but no tokenizer
    forge_tests::saved_tiny_target("llama", 3, &target);
    let (ok, err) = check(&[]);
    assert!(
        !ok && err.contains("no tokenizer.json") && !err.contains("no config.json"),
        "{err}"
    );
    // a sharded folder whose index names a shard that is not there
    std::fs::write(target.join("tokenizer.json"), "{}").expect("tokenizer");
    std::fs::rename(
        target.join("model.safetensors"),
        target.join("model-00001-of-00002.safetensors"),
    )
    .expect("mv");
    let index = serde_json::json!({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(target.join("model.safetensors.index.json"), index.to_string()).expect("index");
    let (ok, err) = check(&[]);
    assert!(
        !ok && err.contains("model-00002-of-00002.safetensors") && !err.contains("00001"),
        "{err}"
    );
    assert_eq!(target_check::target_folder_problems(&target).len(), 1);
}
