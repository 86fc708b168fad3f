//! The roofline speedup model (`trainer/src/predict`) against published speedups on real GPUs
//! (tests/fixtures/published_speedups.json, each point with its source), and `forge predict`.

use forge_models::TargetConfig;
use forge_tests::forge;
use forge_trainer::predict::{gpu, predict, DraftShape, Efficiency, ModelShape, Serving, Setting};

/// The share the prediction may miss a published speedup by.
const TOLERANCE: f64 = 0.20;

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/published_speedups.json");
    let text = std::fs::read_to_string(path).expect("read the fixture");
    serde_json::from_str(&text).expect("fixture json")
}

fn int(v: &serde_json::Value, key: &str) -> i64 {
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("{key}: not an integer in {v}"))
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key}: not a number in {v}"))
}

/// (predicted, published) speedup of one fixture point with the default efficiencies.
fn predicted(point: &serde_json::Value) -> (f64, f64) {
    let config = TargetConfig::from_value(point["target"].clone()).expect("target config");
    let draft = &point["draft"];
    let (layers, rows) = (int(draft, "layers"), int(draft, "lm_head_rows"));
    let draft = match draft["kind"].as_str() {
        Some("eagle3") => DraftShape::eagle3(&config, layers, rows),
        Some("eagle1") => DraftShape::eagle1(&config, layers, rows),
        other => panic!("draft kind {other:?} has no shape here"),
    };
    let setting = Setting::parse(point["setting"].as_str().expect("setting")).expect("setting parses");
    let gpu = gpu(point["gpu"].as_str().expect("gpu")).expect("known gpu");
    let serving = Serving {
        batch: int(point, "batch"),
        context: int(point, "context"),
        tensor_parallel: int(point, "tensor_parallel"),
    };
    let p = predict(
        &ModelShape::target(&config),
        &draft,
        &setting,
        num(point, "acceptance_length"),
        gpu,
        &serving,
        &Efficiency::default(),
    )
    .expect("predict");
    (p.speedup, num(point, "speedup"))
}

#[test]
fn published_speedups_are_predicted_within_20_percent() {
    let fixture = fixture();
    let points = fixture["points"].as_array().expect("points");
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    let mut within = 0;
    for point in points {
        for key in ["source", "url", "where", "notes"] {
            assert!(
                point[key].as_str().is_some_and(|s| !s.is_empty()),
                "every point names its {key}: {point}"
            );
        }
        let (pred, published) = predicted(point);
        let error = pred / published - 1.0;
        let is_within = error.abs() <= TOLERANCE;
        let expected = point["expected_within"].as_bool().expect("expected_within");
        if !expected {
            assert!(
                point["why_outside"].as_str().is_some_and(|s| !s.is_empty()),
                "a point expected outside says why: {point}"
            );
        }
        let line = format!(
            "{} {} batch {} {} tau {:.3}: predicted {pred:.2}x, published {published:.2}x ({:+.0}%)",
            point["target"]["name"].as_str().unwrap_or("?"),
            point["setting"].as_str().unwrap_or("?"),
            point["batch"],
            point["benchmark"].as_str().unwrap_or("?"),
            num(point, "acceptance_length"),
            100.0 * error
        );
        if is_within != expected {
            wrong.push(format!("{line}: expected_within {expected}"));
        }
        within += usize::from(is_within);
        report.push(line);
    }
    println!("{}", report.join("\n"));
    assert!(
        wrong.is_empty(),
        "points on the wrong side of 20%:\n{}",
        wrong.join("\n")
    );
    assert!(within >= 4, "only {within} points within 20%:\n{}", report.join("\n"));
}

#[test]
fn forge_predict_prints_a_table_per_gpu_and_batch() {
    let dir = std::env::temp_dir().join(format!("forge-predict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let fixture = fixture();
    let config = dir.join("config.json");
    std::fs::write(&config, fixture["points"][0]["target"].to_string()).expect("config");
    let out = forge(&[
        "predict",
        "--target-config",
        config.to_str().expect("utf8"),
        "--tau",
        "3.2",
        "--tree",
        "steps=5,topk=4,draft_tokens=8",
        "--draft-vocab",
        "32000",
        "--gpu",
        "h100,b200",
        "--batch",
        "1,32",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "NVIDIA H100 SXM",
        "NVIDIA B200",
        "tree:steps=5,topk=4,draft_tokens=8",
        "speedup",
    ] {
        assert!(stdout.contains(want), "{want} missing:\n{stdout}");
    }
    // one row per GPU and batch
    let rows = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(['1', '3']))
        .count();
    assert_eq!(rows, 4, "{stdout}");

    let gpus = forge(&["predict", "--gpus"]);
    let listed = String::from_utf8_lossy(&gpus.stdout);
    assert!(gpus.status.success());
    for name in ["a100", "h100", "h200", "b200", "l40s", "https://www.nvidia.com/"] {
        assert!(listed.contains(name), "{name} missing:\n{listed}");
    }

    let bad = forge(&[
        "predict",
        "--target-config",
        config.to_str().expect("utf8"),
        "--tau",
        "9",
        "--chain",
        "3",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("outside [1, 4]"));
    std::fs::remove_dir_all(&dir).ok();
}
