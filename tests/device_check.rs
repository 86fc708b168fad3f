//! scripts/device-check.sh on this machine: the dry run of its "here" half (the bundle, its
//! size and contents), the way its parts travel in separate calls, and its "there" half
//! rehearsed on the CPU at a tiny scale (every stage, every figure of the summary). Also
//! `forge bench train`'s figures. Reads bench/ through the script (the bundle's prompts and
//! benchmark questions, see bench/README.md).

use forge_tests::{forge, root, tmp_dir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LIMIT: u64 = 64 * 1024 * 1024;

fn script(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut c = Command::new("bash");
    c.arg(root().join("scripts/device-check.sh"))
        .args(args)
        .current_dir(root());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run scripts/device-check.sh")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .expect("read dir")
        .flatten()
        .map(|e| e.metadata().expect("meta").len())
        .sum()
}

/// Bytes of the working tree that travels with every call (tracked and untracked files that
/// git does not ignore).
fn tree_bytes() -> u64 {
    let o = Command::new("git")
        .args(["ls-files", "--cached", "--others", "--exclude-standard"])
        .current_dir(root())
        .output()
        .expect("git ls-files");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|f| std::fs::metadata(root().join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn device_check_bundle_fits_the_calls_and_its_cpu_rehearsal_runs_every_stage() {
    // its own bundle folder: a real GPU bundle in .forge/device stays as it is
    let device = tmp_dir("device-check-bundle");
    let tests_bin = std::env::current_exe().expect("current_exe");
    let dev: (&str, &Path) = ("FORGE_DEVICE_DIR", &device);
    let o = script(&["build", "--dry-run"], &[("FORGE_TESTS_BIN", &tests_bin), dev]);
    assert!(o.status.success(), "{}", text(&o));

    // The contents, checked against the manifest's checksums.
    let stage = device.join("stage");
    let manifest = std::fs::read_to_string(stage.join("MANIFEST")).expect("MANIFEST");
    assert!(
        manifest.contains("dry_run: 1") && manifest.contains("demo_model: 1"),
        "{manifest}"
    );
    let files: Vec<&str> = manifest
        .lines()
        .skip(5)
        .map(|l| l.split_whitespace().nth(1).expect("file"))
        .collect();
    for want in [
        "./bin/forge",
        "./bin/forge-tests",
        "./data/bench_questions.jsonl",
        "./data/prompts.jsonl",
        "./model/SmolLM2-135M-Instruct.Q4_1.gguf",
        "./wheels/gguf-0.19.0-py3-none-any.whl",
    ] {
        assert!(files.contains(&want), "{want} not in the bundle: {manifest}");
    }
    let sums: String = manifest.lines().skip(5).collect::<Vec<_>>().join("\n") + "\n";
    std::fs::write(device.join("sums.txt"), sums).expect("sums");
    let check = Command::new("sha256sum")
        .arg("--check")
        .arg("--quiet")
        .arg(device.join("sums.txt"))
        .current_dir(&stage)
        .output()
        .expect("sha256sum");
    assert!(check.status.success(), "{}", text(&check));
    let lines = |f: &str| std::fs::read_to_string(stage.join(f)).expect("read").lines().count();
    assert_eq!(lines("data/bench_questions.jsonl"), 80);
    assert!(lines("data/prompts.jsonl") > 1000, "the self-distillation prompts");

    // Every call carries one part and the working tree: under 64 MiB each.
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&device)
        .expect("read .forge/device")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("carry"))
        })
        .collect();
    parts.sort();
    assert!(
        parts.len() >= 2,
        "the demo target's GGUF alone is over one call: {parts:?}"
    );
    let tree = tree_bytes();
    for p in &parts {
        let b = dir_bytes(p) + tree;
        assert!(b < LIMIT, "{} + the working tree = {b} bytes, over 64 MiB", p.display());
    }
    let summary = std::fs::read_to_string(device.join("bundle.txt")).expect("bundle.txt");
    assert!(summary.contains(&format!("in {} part(s)", parts.len())), "{summary}");

    // The calls as they happen there: each carries its own part only; the last finds the
    // others kept from the earlier calls (here: moved aside and back).
    let aside = tmp_dir("device-check-aside");
    let last = parts.last().expect("parts").clone();
    let last_aside = aside.join("last");
    std::fs::rename(&last, &last_aside).expect("move the last part aside");
    let work = tmp_dir("device-check-work");
    let out = tmp_dir("device-check-out");
    let o = script(
        &["device", "--cpu"],
        &[("OUT", &out), ("FORGE_DEVICE_WORK", &work), dev],
    );
    assert!(
        !o.status.success() && text(&o).contains("sha256 missing"),
        "{}",
        text(&o)
    );
    let o = script(&["receive"], &[dev]);
    assert!(o.status.success(), "{}", text(&o));
    for p in &parts[..parts.len() - 1] {
        std::fs::rename(p, aside.join(p.file_name().expect("name"))).expect("move a part aside");
    }
    std::fs::rename(&last_aside, &last).expect("move the last part back");
    // a dry-run bundle is refused on the GPU machine's path
    let o = script(&["device"], &[("OUT", &out), ("FORGE_DEVICE_WORK", &work), dev]);
    assert!(
        !o.status.success() && text(&o).contains("this bundle is a dry run"),
        "{}",
        text(&o)
    );
    let o = script(
        &["device", "--cpu"],
        &[("OUT", &out), ("FORGE_DEVICE_WORK", &work), dev],
    );
    let log = text(&o);
    assert!(o.status.success(), "{log}");

    // Every stage ran and passed; the summary holds every figure.
    let s = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    for stage in [
        "generate",
        "tests",
        "nccl-selftest",
        "nccl-allreduce",
        "bench-shape",
        "bench-demo",
        "quality-regenerate",
        "quality-train",
        "quality-eval-g5",
        "quality-eval-g7",
    ] {
        assert!(s.contains(&format!("| {stage} | ok |")), "stage {stage} in:\n{s}");
    }
    assert!(!s.contains("**missing:**"), "{s}");
    assert!(s.contains("test result: ok. 7 passed; 0 failed"), "{s}");
    assert!(s.contains("every collective gave the expected numbers"), "{s}");
    assert!(s.contains("| eagle3 |") && s.contains("| medusa |"), "{s}");
    assert!(s.contains("| 5 | ") && s.contains("| 7 | "), "{s}");
    assert!(out.join("logs.tar.gz").is_file());

    // A part lost between calls is named.
    let _ = std::fs::remove_dir_all(device.join("recv"));
    let o = script(
        &["device", "--cpu"],
        &[("OUT", &out), ("FORGE_DEVICE_WORK", &work), dev],
    );
    assert!(
        !o.status.success() && text(&o).contains(&format!("part 1 of {} is missing", parts.len())),
        "{}",
        text(&o)
    );
    for p in &parts[..parts.len() - 1] {
        let _ = std::fs::rename(aside.join(p.file_name().expect("name")), p);
    }
}

fn bench_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("json")
        .lines()
        .map(|l| serde_json::from_str(l).expect("row"))
        .collect()
}

#[test]
fn bench_train_reports_step_time_tokens_flops_and_memory() {
    let dir = tmp_dir("bench-train");
    let json = dir.join("rows.json");
    let o = forge(&[
        "bench",
        "train",
        "--shape",
        "tiny",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--peak-tflops",
        "1",
        "--json",
        json.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = bench_rows(&json);
    assert_eq!(
        rows.iter()
            .map(|r| r["drafter"].as_str().expect("kind"))
            .collect::<Vec<_>>(),
        ["eagle3", "medusa"]
    );
    // tiny: hidden 64, 8 layers, 4 heads of 16 (q 64), 2 KV heads (k, v 32 each), MLP 128:
    // projections 64*64 + 2*64*32 + 64*64 + 3*64*128 = 36864 weights; per sequence of 32
    // tokens and layer 2*36864*32 + 2*2*64*(32*33/2) = 2494464 FLOPs; x 8 layers x 2 sequences
    let flops = 2.0 * 8.0 * 2_494_464.0;
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert_eq!(f("target_flops"), flops, "{r}");
        assert!((f("tokens_per_s") * f("step_ms") / 1e3 - 64.0).abs() < 1e-6, "{r}");
        assert!(
            (f("target_tflops_per_s") - flops / (f("target_ms") / 1e3) / 1e12).abs() < 1e-9,
            "{r}"
        );
        assert!((f("target_mfu") - f("target_tflops_per_s")).abs() < 1e-12, "{r}");
        assert!(
            f("target_ms") < f("step_ms")
                && (f("drafter_ms") - (f("step_ms") - f("target_ms"))).abs() < f("step_ms") * 0.5
        );
        assert_eq!(r["peak_mem_kind"], "process_rss");
        assert_eq!(
            f("target_params"),
            (1024.0 * 64.0 * 2.0) + 8.0 * (36864.0 + 2.0 * 64.0) + 64.0,
            "embedding, head, layers, norms"
        );
        assert!(f("trainable_params") > 0.0);
    }
    // bad input names the fix
    let o = forge(&["bench", "train", "--shape", "llama-9b", "--device", "cpu"]);
    assert!(
        !o.status.success() && text(&o).contains("is not one of llama3-8b"),
        "{}",
        text(&o)
    );
    let o = forge(&[
        "bench",
        "train",
        "--shape",
        "tiny",
        "--drafter",
        "eagle9",
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success() && text(&o).contains("eagle9"), "{}", text(&o));
}
