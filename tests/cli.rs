use forge_tests::{demo_model, forge};

fn generate_json(prompt: &str, extra: &[&str]) -> serde_json::Value {
    let model = demo_model();
    let mut args = vec![
        "generate",
        "--target",
        model.to_str().expect("utf8"),
        "--chat",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "16",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = forge(&args);
    assert!(
        out.status.success(),
        "forge generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

#[test]
fn demo_target_answers_paris_deterministically() {
    let a = generate_json("What is the capital of France?", &[]);
    let text = a["text"].as_str().expect("text");
    assert!(text.contains("Paris"), "answer does not mention Paris: {text:?}");
    assert!(
        a["stopped"].as_bool().expect("stopped"),
        "the answer should end with <|im_end|> within 16 tokens: {text:?}"
    );
    // The chat template (with SmolLM2's default system prompt) was applied.
    let prompt = a["prompt"].as_str().expect("prompt");
    assert!(
        prompt.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{prompt:?}"
    );
    assert!(
        prompt.ends_with("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt:?}"
    );
    let b = generate_json("What is the capital of France?", &[]);
    assert_eq!(
        a["output_ids"], b["output_ids"],
        "greedy decoding must be deterministic"
    );
}

#[test]
fn sampling_is_seeded() {
    let a = generate_json("Write a word.", &["--temperature", "1.0", "--seed", "5"]);
    let b = generate_json("Write a word.", &["--temperature", "1.0", "--seed", "5"]);
    assert_eq!(a["output_ids"], b["output_ids"]);
}

#[test]
fn bad_target_folder_is_named() {
    let out = forge(&["generate", "--target", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model") && err.contains("tokenizer.json"),
        "{err}"
    );
}

#[test]
fn an_os_error_is_printed_once() {
    let dir = forge_tests::tmp_dir("cli-os-error");
    let ckpt = dir.join("run");
    let out = forge(&[
        "train",
        "recipes/medusa-tiny.yaml",
        "--set",
        "target.path=/nonexistent/model",
        "--set",
        &format!("checkpoint.dir={}", ckpt.display()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("/nonexistent/model/config.json"), "{line}");
    assert_eq!(line.matches("(os error 2)").count(), 1, "{line}");
}
