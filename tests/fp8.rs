//! FP8 hidden-state shards (`forge prepare-hidden --dtype fp8`): the e4m3fn conversion against
//! torch's, the per-element error bound through a shard, the header and manifest, the size
//! against bf16 shards of the same data, and offline training on fp8 shards.

use forge_data::fp8::{dequantize_rows, e4m3_to_f32, f32_to_e4m3, quantize_rows};
use forge_data::hidden::{
    bf16_bytes_to_f32, f32_to_bf16_bytes, HiddenDataset, HiddenDtype, HiddenManifest, HiddenSettings, HiddenWriter,
    SampleRows, HIDDEN_FORMAT,
};
use forge_tests::{demo_model, forge, losses, tmp_dir, TinyRun};
use std::path::Path;
use tch::{Kind, Tensor};

/// The safetensors header of a file: (JSON header, offset of the data).
fn header(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).expect("read shard");
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n) as usize;
    let json = serde_json::from_slice(&bytes[8..8 + n]).expect("header json");
    (json, bytes[8 + n..].to_vec())
}

/// Rewrites a safetensors file with another header (same data bytes).
fn rewrite_header(path: &Path, json: &serde_json::Value, data: &[u8]) {
    let mut h = serde_json::to_vec(json).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).expect("write shard");
}

#[test]
fn fp8_conversion_matches_torch_float8_e4m3fn() {
    // every finite bf16 value below 448 in magnitude, and an f32 between each and the next
    let mut xs = Vec::new();
    for b in 0..=u16::MAX {
        for low in [0u32, 0x8123, 0x8000, 0x7fff] {
            let x = f32::from_bits(((b as u32) << 16) | low);
            if x.is_finite() && x.abs() < 448.0 {
                xs.push(x);
            }
        }
    }
    let t = Tensor::from_slice(&xs).to_kind(Kind::Float8e4m3fn).to_kind(Kind::Float);
    let want: Vec<f32> = Vec::try_from(&t).expect("f32");
    let bad: Vec<String> = xs
        .iter()
        .zip(&want)
        .filter_map(|(x, w)| {
            let got = e4m3_to_f32(f32_to_e4m3(*x));
            (got.to_bits() != w.to_bits()).then(|| format!("{x:e}: forge {got:e}, torch {w:e}"))
        })
        .collect();
    assert!(xs.len() > 100_000, "{}", xs.len());
    // past 448 both saturate (libtorch 2.13's CPU cast included), so every value agrees
    let edge = [464f32, 479.0, 480.0, 1e6, -1e6];
    let t = Tensor::from_slice(&edge)
        .to_kind(Kind::Float8e4m3fn)
        .to_kind(Kind::Float);
    let torch_edge: Vec<f32> = Vec::try_from(&t).expect("f32");
    assert_eq!(torch_edge, [448.0, 448.0, 448.0, 448.0, -448.0]);
    assert!(edge.iter().all(|&x| e4m3_to_f32(f32_to_e4m3(x)) == x.signum() * 448.0));
    assert!(
        bad.is_empty(),
        "{} of {} differ from torch's cast: {:?}",
        bad.len(),
        xs.len(),
        &bad[..bad.len().min(5)]
    );
}

fn settings(n: usize, per_shard: usize, h: usize, aux: Vec<usize>, topk: usize, dtype: HiddenDtype) -> HiddenSettings {
    HiddenSettings {
        format: HIDDEN_FORMAT.into(),
        target: "t".into(),
        target_fingerprint: "f".into(),
        data_key: "k".into(),
        hidden_size: h,
        last_hidden: true,
        aux_layers: aux,
        topk,
        dtype,
        samples_per_shard: per_shard,
        num_samples: n,
    }
}

/// Samples whose rows span magnitudes from 1e-3 to 1e3, with an outlier column.
fn sample_values(n: usize, h: usize, a: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..n)
        .map(|s| {
            let t = 3 + s;
            let row = |j: usize, w: usize| {
                let mag = 10f32.powi((j / w) as i32 % 7 - 3);
                let x = ((s * 131 + j * 17) as f32 * 0.37).sin() * mag;
                if j % w == 5 {
                    x * 40.0
                } else {
                    x
                }
            };
            (
                (0..t * h).map(|j| row(j, h)).collect(),
                (0..t * h * a).map(|j| row(j, h * a)).collect(),
            )
        })
        .collect()
}

#[test]
fn fp8_shards_read_back_within_the_bound_and_say_their_dtype() {
    let dir = tmp_dir("fp8-shards");
    let (n, h, a, k) = (5usize, 16usize, 3usize, 2usize);
    let values = sample_values(n, h, a);
    let rows_of = |dtype: HiddenDtype| -> Vec<SampleRows> {
        values
            .iter()
            .enumerate()
            .map(|(s, (f, g))| {
                let t = f.len() / h;
                let mut r = SampleRows {
                    id: format!("s{s}"),
                    input_ids: (0..t as u32).collect(),
                    loss_mask: vec![1; t],
                    topk_ids: (0..(t * k) as i32).collect(),
                    topk_logprobs: f32_to_bf16_bytes(&vec![-0.75; t * k]),
                    ..Default::default()
                };
                match dtype {
                    HiddenDtype::Bf16 => {
                        r.hidden_state = f32_to_bf16_bytes(f);
                        r.aux_hidden_state = f32_to_bf16_bytes(g);
                    }
                    HiddenDtype::Fp8 => {
                        (r.hidden_state, r.hidden_scale) = quantize_rows(f, h, "h").expect("finite");
                        (r.aux_hidden_state, r.aux_scale) = quantize_rows(g, h * a, "a").expect("finite");
                    }
                }
                r
            })
            .collect()
    };
    let write = |name: &str, dtype: HiddenDtype| {
        let d = dir.join(name);
        let rows = rows_of(dtype);
        let mut w = HiddenWriter::open(&d, settings(n, 2, h, vec![1, 2, 3], k, dtype)).expect("open");
        for s in w.pending_shards() {
            let r = w.shard_range(s);
            w.write_shard(s, &rows[r]).expect("write");
        }
        d
    };
    let fp8 = write("fp8", HiddenDtype::Fp8);
    let bf16 = write("bf16", HiddenDtype::Bf16);
    // the writer checks the scales it is given
    let mut bad = rows_of(HiddenDtype::Fp8);
    bad[0].aux_scale.pop();
    let mut w =
        HiddenWriter::open(&dir.join("bad"), settings(n, 2, h, vec![1, 2, 3], k, HiddenDtype::Fp8)).expect("open");
    let err = w.write_shard(0, &bad[0..2]).expect_err("scales missing").to_string();
    assert!(err.contains("aux_hidden_state scales"), "{err}");

    // the manifest and each shard's header say fp8; the states are e4m3fn with f32 scales
    let m = HiddenManifest::read(&fp8).expect("manifest");
    assert_eq!(m.settings.dtype, HiddenDtype::Fp8);
    let text = std::fs::read_to_string(fp8.join("manifest.json")).expect("manifest");
    assert!(text.contains("\"dtype\": \"fp8\""), "{text}");
    let (hd, _) = header(&fp8.join("shard_00000.safetensors"));
    assert_eq!(hd["__metadata__"]["dtype"], "fp8");
    assert_eq!(hd["hidden_state"]["dtype"], "F8_E4M3");
    assert_eq!(hd["aux_hidden_state"]["dtype"], "F8_E4M3");
    assert_eq!(hd["hidden_state_scale"]["dtype"], "F32");
    assert_eq!(hd["hidden_state_scale"]["shape"], serde_json::json!([7, 1]));
    assert_eq!(hd["aux_hidden_state_scale"]["shape"], serde_json::json!([7, 1]));
    assert_eq!(hd["topk_logprobs"]["dtype"], "BF16");
    let (hb, _) = header(&bf16.join("shard_00000.safetensors"));
    assert_eq!(hb["__metadata__"]["dtype"], "bf16");
    assert!(hb.get("hidden_state_scale").is_none());

    // read back: bf16 bytes of the dequantised values, within the bound of every element
    // (fp8: 2^-4 |x| + 2^-10 scale; then the bf16 rounding of the result, 2^-9 |x̂|)
    let mut ds = HiddenDataset::open(&fp8).expect("open fp8");
    for (i, (f, g)) in values.iter().enumerate() {
        let v = ds.sample(i).expect("sample");
        assert_eq!(v.topk_logprobs, &f32_to_bf16_bytes(&vec![-0.75; f.len() / h * k])[..]);
        for (want, got, w) in [
            (f, bf16_bytes_to_f32(v.hidden_state), h),
            (g, bf16_bytes_to_f32(v.aux_hidden_state), h * a),
        ] {
            assert_eq!(got.len(), want.len());
            for (r, (x, y)) in want.chunks(w).zip(got.chunks(w)).enumerate() {
                let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0;
                for (x, y) in x.iter().zip(y) {
                    let bound = x.abs() / 16.0 + scale / 1024.0 + (x.abs() * 17.0 / 16.0) / 512.0 + 1e-6 * x.abs();
                    assert!((x - y).abs() <= bound, "sample {i} row {r}: {x} -> {y} (bound {bound})");
                }
            }
        }
    }
    // a bf16 shard in an fp8 folder is refused, naming the file
    std::fs::copy(
        bf16.join("shard_00001.safetensors"),
        fp8.join("shard_00001.safetensors"),
    )
    .expect("copy");
    let mut ds = HiddenDataset::open(&fp8).expect("open fp8");
    let err = ds.sample(2).map(|_| ()).expect_err("mixed dtypes").to_string();
    assert!(
        err.contains("shard_00001.safetensors") && err.contains("holds bf16") && err.contains("says fp8"),
        "{err}"
    );
    // shards written before the dtype existed (no `dtype` in their header) read as bf16
    let old = dir.join("bf16-old");
    std::fs::create_dir_all(&old).expect("mkdir");
    for f in [
        "manifest.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "shard_00002.safetensors",
    ] {
        std::fs::copy(bf16.join(f), old.join(f)).expect("copy");
    }
    let p = old.join("shard_00001.safetensors");
    let (mut json, data) = header(&p);
    json["__metadata__"].as_object_mut().expect("metadata").remove("dtype");
    rewrite_header(&p, &json, &data);
    let (json, _) = header(&p);
    assert!(json["__metadata__"].get("dtype").is_none());
    let mut a_ds = HiddenDataset::open(&old).expect("old");
    let mut b_ds = HiddenDataset::open(&bf16).expect("bf16");
    for i in 0..n {
        let (x, y) = (
            a_ds.sample(i).expect("old").hidden_state.to_vec(),
            b_ds.sample(i).expect("new").hidden_state.to_vec(),
        );
        assert_eq!(x, y, "sample {i}");
    }
    // the e4m3fn codes themselves: dequantize_rows is what the reader applies
    let (codes, scales) = quantize_rows(&values[0].0, h, "h").expect("q");
    let back = dequantize_rows(&codes, &scales, h).expect("dq");
    assert_eq!(back.len(), values[0].0.len());
}

fn recipe(dir: &Path, data: &Path) -> std::path::PathBuf {
    let p = dir.join("eagle3.yaml");
    std::fs::write(
        &p,
        format!(
            "drafter:\n  kind: eagle3\n  draft_vocab_size: 500\ntarget:\n  path: {}\ndata:\n  train: [{}]\n  max_length: 64\n  cache_dir: {}\ncheckpoint:\n  dir: {}\nlog:\n  progress: false\n",
            demo_model().display(),
            data.display(),
            dir.join("cache").display(),
            dir.join("run").display()
        ),
    )
    .expect("write recipe");
    p
}

#[test]
fn prepare_hidden_fp8_halves_the_bytes_per_token_of_bf16() {
    let dir = tmp_dir("fp8-prepare-hidden");
    let data = forge_tests::demo_conversations_subset(&dir.join("convs.jsonl"), 4);
    let recipe = recipe(&dir, &data);
    let r = recipe.to_str().expect("utf8");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "prepare-hidden",
            r,
            "--out",
            out.to_str().expect("utf8"),
            "--samples-per-shard",
            "2",
        ];
        args.extend_from_slice(extra);
        forge(&args)
    };
    let (bf16, fp8) = (dir.join("bf16"), dir.join("fp8"));
    let out = run(&bf16, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("bytes/token (bf16)"));
    // the recipe key picks fp8 when --dtype is not given
    let out = run(&fp8, &["--set", "data.hidden_dtype=fp8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bytes/token (fp8)"), "{text}");
    let (mb, mf) = (
        HiddenManifest::read(&bf16).expect("bf16"),
        HiddenManifest::read(&fp8).expect("fp8"),
    );
    assert_eq!(
        (mb.settings.dtype, mf.settings.dtype),
        (HiddenDtype::Bf16, HiddenDtype::Fp8)
    );
    assert_eq!(mb.tokens, mf.tokens);
    // bytes per token of the shard files (headers included): EAGLE-3 on the demo target,
    // 4 x 576 states + ids + mask: bf16 4613 payload bytes, fp8 2317 (2 scales of 4 bytes)
    let ratio = mf.bytes_per_token / mb.bytes_per_token;
    println!(
        "bytes per token: bf16 {:.1}, fp8 {:.1}, ratio {ratio:.3}",
        mb.bytes_per_token, mf.bytes_per_token
    );
    assert!(
        ratio <= 0.55,
        "fp8 {} vs bf16 {} bytes/token",
        mf.bytes_per_token,
        mb.bytes_per_token
    );
    let files: u64 = mf
        .shards
        .iter()
        .map(|s| std::fs::metadata(fp8.join(&s.file)).expect("shard").len())
        .sum();
    assert_eq!(files, mf.bytes, "the manifest counts the shard files");
    // the same target states: fp8 within its bound of bf16 (both rounded from the same f32)
    let (mut b, mut f) = (
        HiddenDataset::open(&bf16).expect("bf16"),
        HiddenDataset::open(&fp8).expect("fp8"),
    );
    for i in 0..b.len() {
        let (hb, ab) = {
            let v = b.sample(i).expect("bf16 sample");
            (bf16_bytes_to_f32(v.hidden_state), bf16_bytes_to_f32(v.aux_hidden_state))
        };
        let v = f.sample(i).expect("fp8 sample");
        for (x, y, w) in [
            (hb, bf16_bytes_to_f32(v.hidden_state), 576),
            (ab, bf16_bytes_to_f32(v.aux_hidden_state), 3 * 576),
        ] {
            for (xr, yr) in x.chunks(w).zip(y.chunks(w)) {
                let scale = xr.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0 * 1.01;
                for (x, y) in xr.iter().zip(yr) {
                    // fp8's bound, plus a bf16 rounding on each side
                    let bound = x.abs() * (1.0 / 16.0 + 3.0 / 256.0) + scale / 1024.0 + 1e-6;
                    assert!((x - y).abs() <= bound, "sample {i}: bf16 {x}, fp8 {y}");
                }
            }
        }
    }
    // a folder keeps its dtype: another is refused, naming the setting; the same is a no-op
    let out = run(&fp8, &["--dtype", "bf16"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dtype"), "{err}");
    let out = run(&fp8, &["--dtype", "fp8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(0 written now, 2 already there)"));
    let out = run(&dir.join("x"), &["--dtype", "fp16"]);
    assert!(!out.status.success());
}

#[test]
fn eagle3_trains_offline_on_fp8_shards_and_its_loss_falls() {
    let run = TinyRun::new("fp8-offline", "recipes/eagle3-tiny.yaml", true);
    let hidden = run.dir.join("hidden");
    let mut args = vec![
        "prepare-hidden".to_string(),
        run.recipe.display().to_string(),
        "--out".into(),
        hidden.display().to_string(),
        "--dtype".into(),
        "fp8".into(),
    ];
    for s in run.sets() {
        args.push("--set".into());
        args.push(s);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = forge(&refs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        HiddenManifest::read(&hidden).expect("manifest").settings.dtype,
        HiddenDtype::Fp8
    );
    let ckpt = run.dir.join("offline");
    let hd = format!("data.hidden_dir={}", hidden.display());
    run.train(
        &ckpt,
        &[
            "--set",
            "train.max_steps=40",
            "--set",
            "train.lr=3e-3",
            "--set",
            "checkpoint.every_steps=40",
            "--set",
            "data.mode=offline",
            "--set",
            &hd,
        ],
    );
    let l = losses(&ckpt);
    assert_eq!(l.len(), 40);
    let first: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = l[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(last < first * 0.8, "loss fell from {first:.3} to {last:.3}");
}
