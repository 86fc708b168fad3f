//! Distributed training over Gloo on 127.0.0.1 with 2 processes: every collective's numbers,
//! 2 ranks = 1 rank with the same global batch for ZeRO stages 0, 1 and 2, resume of a
//! sharded run (same and different world size), `forge launch` stopping the other worker
//! when one fails, c10d errors naming the collective, and launch flag checks.

use forge_tests::{
    demo_conversations_subset, forge_bin, max_abs_diff, metrics_rows, root, step_weights,
    tiny_target_with_demo_tokenizer, tmp_dir,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn run_forge(args: &[String]) -> Output {
    Command::new(forge_bin())
        .args(args)
        // the same intra-op thread count for 1-rank and 2-rank runs, so that they can be
        // compared tightly on any machine
        .env("OMP_NUM_THREADS", "1")
        .current_dir(root())
        .output()
        .expect("run forge")
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A free TCP port (bind port 0), so that tests running in parallel do not collide.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn launch_args(nproc: usize, rest: &[String]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "launch".into(),
        "--nproc".into(),
        nproc.to_string(),
        "--master-port".into(),
        free_port().to_string(),
        "--".into(),
    ];
    a.extend(rest.iter().cloned());
    a
}

/// The JSON line each rank printed (lines "[rank r] {...}").
fn rank_json(stdout: &str, world: usize) -> Vec<serde_json::Value> {
    (0..world)
        .map(|r| {
            let prefix = format!("[rank {r}] {{");
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no JSON line from rank {r} in:\n{stdout}"));
            serde_json::from_str(&line[prefix.len() - 1..]).expect("selftest json")
        })
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
fn every_collective_gives_the_expected_numbers_over_gloo() {
    let out = run_forge(&launch_args(
        2,
        &["dist-selftest".into(), "--backend".into(), "gloo".into()],
    ));
    let stdout = ok(&out, "forge launch --nproc 2 -- dist-selftest");
    let rows = rank_json(&stdout, 2);
    let w = 2.0;
    for (r, v) in rows.iter().enumerate() {
        assert_eq!(v["rank"].as_u64(), Some(r as u64));
        assert_eq!(v["world"].as_u64(), Some(2));
        // rank q contributes [q+1, 10(q+1), -q]
        let contrib = |q: f64| [q + 1.0, 10.0 * (q + 1.0), -q];
        let (c0, c1) = (contrib(0.0), contrib(1.0));
        let sum: Vec<f64> = (0..3).map(|i| c0[i] + c1[i]).collect();
        assert_eq!(floats(&v["all_reduce_sum"]), sum, "rank {r}");
        assert_eq!(floats(&v["all_reduce_sum"]), vec![3.0, 30.0, -1.0]);
        assert_eq!(floats(&v["all_reduce_max"]), vec![2.0, 20.0, 0.0]);
        assert_eq!(floats(&v["all_reduce_min"]), vec![1.0, 10.0, -1.0]);
        // bf16 [0.5(q+1), 2^q] summed: [1.5, 3] (exact in bf16)
        assert_eq!(floats(&v["all_reduce_bf16"]), vec![1.5, 3.0]);
        // int64 [q, 1]
        assert_eq!(floats(&v["all_reduce_int64"]), vec![1.0, w]);
        // broadcast from the last rank (1): [101, 1]
        assert_eq!(floats(&v["broadcast"]), vec![101.0, 1.0]);
        // all_gather of [q, q + 0.5]
        assert_eq!(floats(&v["all_gather"]), vec![0.0, 0.5, 1.0, 1.5]);
        // reduce_scatter of [i + 100 q], i in 0..4: sum = [100, 102, 104, 106], chunk r
        let full = [100.0, 102.0, 104.0, 106.0];
        assert_eq!(
            floats(&v["reduce_scatter"]),
            full[2 * r..2 * r + 2].to_vec(),
            "rank {r}"
        );
        // metric names: the union of {"loss", "rank0"} and {"loss", "rank1"}
        assert_eq!(v["union_keys"], serde_json::json!(["loss", "rank0", "rank1"]));
        // the fused AdamW over 2 ranks (replicated, and ZeRO-2 with parameters split across
        // buckets and ranks) against the per-tensor AdamW on the averaged gradients, 5 steps
        for stage in ["zero0", "zero2"] {
            let rel = v["fused_adamw_max_rel_diff"][stage].as_f64().expect("fused check");
            assert!(
                rel <= 1e-6,
                "rank {r} {stage}: fused vs per-tensor max relative difference {rel:e}"
            );
        }
    }
}

#[test]
fn a_failing_worker_stops_the_launch_within_seconds() {
    // rank 1 fails before the rendezvous; rank 0 would wait there for 120 s
    let t0 = Instant::now();
    let out = run_forge(&launch_args(
        2,
        &[
            "dist-selftest".into(),
            "--timeout-s".into(),
            "120".into(),
            "--fail-rank".into(),
            "1".into(),
        ],
    ));
    let secs = t0.elapsed().as_secs_f64();
    assert!(!out.status.success(), "launch must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(secs < 20.0, "launch took {secs:.1}s to stop:\n{err}");
    assert!(
        err.contains("rank 1 exited with exit status 1") && err.contains("stopped the other 1 worker(s)"),
        "{err}"
    );
    assert!(
        err.contains("[rank 1] error: rank 1 fails on purpose"),
        "worker output is prefixed with its rank:\n{err}"
    );

    // rank 1 fails after the rendezvous, so rank 0's next collective fails too and rank 0 may
    // exit (and print) first: the launcher quotes every rank's error, rank 1's among them
    let out = run_forge(&launch_args(
        2,
        &[
            "dist-selftest",
            "--timeout-s",
            "60",
            "--fail-rank",
            "1",
            "--fail-after-rendezvous",
        ]
        .map(String::from),
    ));
    assert!(!out.status.success(), "launch must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("forge launch: rank"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("(errors: ") && line.contains("rank 1: rank 1 fails on purpose after the rendezvous"),
        "{line}"
    );
}

/// `forge launch` as node `node_rank` of 2 (one CPU worker running `dist-selftest`),
/// rendezvous at 127.0.0.1:`port`.
fn launch_node(node_rank: &str, port: &str, timeout_s: &str) -> Child {
    Command::new(forge_bin())
        .args(["launch", "--nproc", "1", "--nnodes", "2", "--node-rank", node_rank])
        .args(["--master-addr", "127.0.0.1", "--master-port", port])
        .args(["--", "dist-selftest", "--timeout-s", timeout_s])
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn forge launch")
}

/// Node 0 of 2 with no node 1: its one worker waits in the rendezvous (timeout 120 s) until
/// the launcher stops it.
fn lonely_node0() -> Child {
    launch_node("0", &free_port().to_string(), "120")
}

/// `forge ARGS` as rank `rank` of 2 with torchrun-style variables (no launcher), rendezvous
/// at 127.0.0.1:`port`.
fn torchrun_style(args: &[String], rank: &str, port: &str) -> Child {
    Command::new(forge_bin())
        .args(args)
        .env("RANK", rank)
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank)
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .env("OMP_NUM_THREADS", "1")
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn forge")
}

/// The state letter of a process (`Z` for a zombie), None when it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

#[test]
fn workers_die_with_a_launcher_killed_by_sigkill() {
    let mut child = lonely_node0();
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let t0 = Instant::now();
    let worker: u32 = loop {
        let list = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = list.split_whitespace().next().and_then(|p| p.parse().ok()) {
            break pid;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the launcher started no worker");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().expect("SIGKILL the launcher");
    let _ = child.wait();
    let t0 = Instant::now();
    while matches!(process_state(worker), Some(s) if s != 'Z') {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "worker {worker} outlived its launcher"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ranks_that_resume_from_different_checkpoints_are_stopped() {
    // rank 0 sees a checkpoint at step 4, rank 1 a checkpoint.dir of its own with none (not
    // one shared folder): both refuse instead of training different models
    let run = setup("dist-resume-mismatch");
    let shared = run.dir.join("run");
    train(
        &run,
        1,
        &shared,
        &["train.max_steps=4", "checkpoint.every_steps=4"],
        &[],
    );
    let port = free_port().to_string();
    let spawn = |rank: &str, ckpt: &Path| {
        let args = train_args(
            &run,
            ckpt,
            &["train.max_steps=6", "dist.timeout_s=60"],
            &["--resume", "auto"],
        );
        torchrun_style(&args, rank, &port)
    };
    let r0 = spawn("0", &shared);
    let r1 = spawn("1", &run.dir.join("elsewhere"));
    let (o0, o1) = (
        r0.wait_with_output().expect("rank 0"),
        r1.wait_with_output().expect("rank 1"),
    );
    for (r, o) in [(0, &o0), (1, &o1)] {
        assert!(!o.status.success(), "rank {r} must refuse");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("resumed from different checkpoints") && err.contains("step 0 to 4"),
            "rank {r}: {err}"
        );
    }
    assert!(!shared.join("step_6").exists(), "nothing trained");
}

#[test]
fn c10d_errors_name_the_collective_under_torchrun_style_variables() {
    // two plain `forge dist-selftest` processes with RANK/WORLD_SIZE/... (no launcher); rank 1
    // leaves right after the rendezvous, so rank 0's first all_reduce fails
    let port = free_port().to_string();
    let spawn = |rank: &str, extra: &[&str]| {
        let args: Vec<String> = ["dist-selftest", "--timeout-s", "30"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        torchrun_style(&args, rank, &port)
    };
    let t0 = Instant::now();
    let r0 = spawn("0", &[]);
    let r1 = spawn("1", &["--fail-rank", "1", "--fail-after-rendezvous"]);
    let o1 = r1.wait_with_output().expect("rank 1");
    let o0 = r0.wait_with_output().expect("rank 0");
    assert!(!o1.status.success() && !o0.status.success());
    let e0 = String::from_utf8_lossy(&o0.stderr);
    assert!(e0.contains("distributed all_reduce failed"), "rank 0: {e0}");
    assert!(t0.elapsed() < Duration::from_secs(25), "took {:?}", t0.elapsed());
}

#[test]
fn launch_flags_are_checked_with_the_fix() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["launch", "--gpus", "64", "--", "train", "x.yaml"],
            "use --nproc N for CPU workers",
        ),
        (
            &["launch", "--", "train", "x.yaml"],
            "--gpus N (one per GPU) or --nproc N",
        ),
        (
            &["launch", "--nproc", "2", "--gpus", "1", "--", "train", "x.yaml"],
            "not both",
        ),
        (
            &["launch", "--nproc", "2", "--nnodes", "2", "--", "train", "x.yaml"],
            "--master-addr",
        ),
        (
            &[
                "launch",
                "--nproc",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--",
                "train",
                "x.yaml",
            ],
            "--node-rank",
        ),
    ];
    for (args, want) in cases {
        let out = run_forge(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

// ---- training ------------------------------------------------------------------------------

struct Run {
    dir: PathBuf,
    target: PathBuf,
    data: PathBuf,
    recipe: PathBuf,
}

fn setup(name: &str) -> Run {
    let dir = tmp_dir(name);
    let target = tiny_target_with_demo_tokenizer(&dir.join("target"), 7);
    let data = demo_conversations_subset(&dir.join("convs.jsonl"), 40);
    Run {
        dir,
        target,
        data,
        recipe: root().join("recipes/medusa-tiny.yaml"),
    }
}

/// `forge train <run.recipe>` (through `forge launch --nproc world` when world > 1)
/// with the run's target/data, a checkpoint folder and extra `--set`s.
fn train(run: &Run, world: usize, ckpt: &Path, sets: &[&str], extra: &[&str]) -> String {
    let args = train_args(run, ckpt, sets, extra);
    let args = if world > 1 { launch_args(world, &args) } else { args };
    ok(&run_forge(&args), &format!("forge {}", args.join(" ")))
}

/// The arguments of `forge train <run.recipe>` with the run's target/data, a checkpoint
/// folder, the tests' common settings and extra `--set`s.
fn train_args(run: &Run, ckpt: &Path, sets: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into(), run.recipe.display().to_string()];
    let base = [
        format!("target.path={}", run.target.display()),
        format!("data.train=[{}]", run.data.display()),
        format!("data.cache_dir={}", run.dir.join("cache").display()),
        format!("checkpoint.dir={}", ckpt.display()),
        "checkpoint.every_steps=3".into(),
        "log.every_steps=1".into(),
        // a loss with two heads and clipping active (the grad norm is ~3.5)
        "train.max_grad_norm=1.0".into(),
        "train.weight_decay=0.1".into(),
    ];
    for s in base.iter().map(String::as_str).chain(sets.iter().copied()) {
        args.push("--set".into());
        args.push(s.into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn losses(ckpt: &Path) -> Vec<(u64, f64)> {
    metrics_rows(&ckpt.join("metrics.jsonl"))
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r["train/loss"].as_f64()?)))
        .collect()
}

fn assert_same_run(a: &Path, b: &Path, step: u64, what: &str) {
    assert_same_run_within(a, b, step, what, 1e-5)
}

/// [`assert_same_run`] with the weights equal to `weight_tol` (a tensor-parallel target sums
/// its partial products in another order: the same losses to 1e-5, the weights after a few
/// Adam steps to rounding amplified by the update's normalisation).
fn assert_same_run_within(a: &Path, b: &Path, step: u64, what: &str, weight_tol: f64) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{what}: {la:?} vs {lb:?}");
    for ((sa, x), (sb, y)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{what}: step {sa}: loss {x} vs {y}"
        );
    }
    // counters are global (summed over ranks)
    let state = |d: &Path| -> serde_json::Value {
        let p = d.join(format!("step_{step}")).join("trainer_state.json");
        serde_json::from_str(&std::fs::read_to_string(&p).expect("trainer_state.json")).expect("json")
    };
    let (sa, sb) = (state(a), state(b));
    for key in ["samples_seen", "tokens_seen", "epoch"] {
        assert_eq!(sa[key], sb[key], "{what}: {key}");
    }
    assert!(sa["samples_seen"].as_u64().unwrap_or(0) > 0);
    let (wa, wb) = (
        step_weights(&a.join(format!("step_{step}"))),
        step_weights(&b.join(format!("step_{step}"))),
    );
    assert_eq!(wa.len(), wb.len());
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        let d = max_abs_diff(ta, tb);
        assert!(d <= weight_tol, "{what}: {na} differs by {d}");
    }
}

fn state_bytes(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.contains("optimizer state: "))
        .unwrap_or_else(|| panic!("no optimizer state line in:\n{stdout}"));
    line.split("optimizer state: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("bytes")
}

#[test]
fn two_ranks_equal_one_rank_with_the_same_global_batch_for_every_zero_stage() {
    let run = setup("dist-equal");
    let one = run.dir.join("one");
    // 1 rank x grad_accum 2 = 2 ranks x grad_accum 1 (micro-batch 2 each)
    let out1 = train(&run, 1, &one, &["train.max_steps=6", "train.grad_accum=2"], &[]);
    let bytes1 = state_bytes(&out1);
    let l1 = losses(&one);
    assert_eq!(l1.len(), 6);
    // the weights moved: a run that did nothing would also "match"
    let w0 = step_weights(&one.join("step_3"));
    let w6 = step_weights(&one.join("step_6"));
    assert!(w0.iter().zip(&w6).any(|((_, a), (_, b))| max_abs_diff(a, b) > 1e-4));
    for stage in [0, 1, 2] {
        let two = run.dir.join(format!("two-z{stage}"));
        let zs = format!("dist.zero_stage={stage}");
        // small buckets: several buckets, each split between the ranks
        let out2 = train(&run, 2, &two, &["train.max_steps=6", &zs, "dist.bucket_mb=0.5"], &[]);
        assert_same_run(&one, &two, 6, &format!("zero_stage {stage}"));
        // only rank 0 logs: one metrics row per step, its summary line alone
        assert_eq!(losses(&two).len(), 6);
        assert!(
            out2.contains("[rank 0] trained 6 steps") && !out2.contains("[rank 1] trained"),
            "{out2}"
        );
        // optimizer state per rank: all of it at stage 0, half (plus < 1 element of padding) at 1-2
        let bytes2 = state_bytes(&out2);
        if stage == 0 {
            assert_eq!(bytes2, bytes1);
        } else {
            assert!(
                bytes2 >= bytes1 / 2 && bytes2 <= bytes1 / 2 + 8,
                "stage {stage}: {bytes2} vs {bytes1}"
            );
            let ck = two.join("step_6");
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(ck.join("manifest.json")).expect("manifest"))
                    .expect("json");
            assert_eq!(m["optimizer_shards"], 2);
            assert!(
                ck.join("optimizer.rank0.safetensors").is_file() && ck.join("optimizer.rank1.safetensors").is_file()
            );
            assert!(!ck.join("optimizer.safetensors").exists());
        }
    }
}

#[test]
fn a_sharded_two_rank_run_resumes_exactly_and_reshards_to_one_rank() {
    let run = setup("dist-resume");
    let sets_full = ["train.max_steps=6", "dist.zero_stage=2", "dist.bucket_mb=0.5"];
    let full = run.dir.join("full");
    train(&run, 2, &full, &sets_full, &[]);
    // interrupted after step 3, resumed on 2 ranks
    let part = run.dir.join("part");
    train(
        &run,
        2,
        &part,
        &["train.max_steps=3", "dist.zero_stage=2", "dist.bucket_mb=0.5"],
        &[],
    );
    let copy = run.dir.join("part-1rank");
    std::fs::create_dir_all(&copy).expect("mkdir");
    for entry in ["step_3", "metrics.jsonl", "recipe.resolved.yaml"] {
        let src = part.join(entry);
        let dst = copy.join(entry);
        if src.is_dir() {
            std::fs::create_dir_all(&dst).expect("mkdir");
            for f in std::fs::read_dir(&src).expect("read_dir").flatten() {
                std::fs::copy(f.path(), dst.join(f.file_name())).expect("copy");
            }
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
    let out = train(&run, 2, &part, &sets_full, &["--resume", "auto"]);
    assert!(out.contains("trained 3 steps (3..6)"), "{out}");
    assert_same_run(&full, &part, 6, "2-rank ZeRO-2 resume");
    // the same checkpoint on 1 rank (grad_accum 2: the same global batch), ZeRO-1: re-sharded
    let out = train(
        &run,
        1,
        &copy,
        &["train.max_steps=6", "train.grad_accum=2", "dist.zero_stage=1"],
        &["--resume", "auto"],
    );
    assert!(out.contains("trained 3 steps (3..6)"), "{out}");
    assert_same_run(
        &full,
        &copy,
        6,
        "2-rank ZeRO-2 checkpoint resumed on 1 rank with ZeRO-1",
    );
}

#[test]
fn resuming_where_the_new_world_cannot_split_the_data_position_is_refused() {
    let run = setup("dist-refuse");
    let ck = run.dir.join("run");
    // 1 rank, 3 steps of 1 micro-batch: 3 micro-batches consumed, which 2 ranks cannot split
    train(&run, 1, &ck, &["train.max_steps=3"], &[]);
    let args = train_args(&run, &ck, &["train.max_steps=6"], &["--resume", "auto"]);
    let out = run_forge(&launch_args(2, &args));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("written by 1 rank(s) after 3 micro-batches") && err.contains("resume with 1 rank(s)"),
        "{err}"
    );
}

#[test]
fn eagle1_feature_noise_is_drawn_per_global_micro_batch_so_two_ranks_equal_one() {
    let mut run = setup("dist-eagle1-noise");
    // the tiny EAGLE-3 recipe with its drafter swapped for EAGLE-1 with feature noise
    let text = std::fs::read_to_string(root().join("recipes/eagle3-tiny.yaml")).expect("recipe");
    let (a, b) = (
        text.find("drafter:").expect("drafter"),
        text.find("target:").expect("target"),
    );
    let recipe = run.dir.join("eagle1-noise.yaml");
    std::fs::write(
        &recipe,
        format!(
            "{}drafter:\n  kind: eagle1\n  feature_noise: 0.2\n{}",
            &text[..a],
            &text[b..]
        ),
    )
    .expect("write");
    run.recipe = recipe;
    let one = run.dir.join("one");
    train(
        &run,
        1,
        &one,
        &["train.max_steps=4", "train.grad_accum=2", "checkpoint.every_steps=4"],
        &[],
    );
    let two = run.dir.join("two");
    train(
        &run,
        2,
        &two,
        &["train.max_steps=4", "checkpoint.every_steps=4", "dist.zero_stage=1"],
        &[],
    );
    assert_same_run(&one, &two, 4, "eagle1 with feature noise");
}

#[test]
fn two_launchers_as_two_nodes_rendezvous_on_the_master_address() {
    // the multi-node code path on one machine: node 0 and node 1, one CPU worker each
    let port = free_port().to_string();
    let (n0, n1) = (launch_node("0", &port, "60"), launch_node("1", &port, "60"));
    let (o0, o1) = (
        n0.wait_with_output().expect("node 0"),
        n1.wait_with_output().expect("node 1"),
    );
    let (s0, s1) = (ok(&o0, "node 0"), ok(&o1, "node 1"));
    // node r's worker is rank r of 2 and got the same all-reduce as everyone
    for (r, s) in [(0usize, &s0), (1, &s1)] {
        let prefix = format!("[rank {r}] {{");
        let line = s
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("node {r}: {s}"));
        let v: serde_json::Value = serde_json::from_str(&line[prefix.len() - 1..]).expect("json");
        assert_eq!(v["world"].as_u64(), Some(2));
        assert_eq!(floats(&v["all_reduce_sum"]), vec![3.0, 30.0, -1.0]);
    }
}

#[test]
fn ctrl_c_stops_every_worker() {
    let child = lonely_node0();
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("launch");
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted: stopped all workers"), "{err}");
}

#[test]
fn hybrid_gumbel_noise_is_drawn_per_global_micro_batch_so_two_ranks_equal_one() {
    let mut run = setup("dist-hybrid");
    run.recipe = root().join("recipes/hybrid-tiny.yaml");
    let one = run.dir.join("one");
    let sets = ["train.max_steps=4", "checkpoint.every_steps=4", "drafter.hard=true"];
    train(&run, 1, &one, &[&sets[..], &["train.grad_accum=2"]].concat(), &[]);
    let two = run.dir.join("two");
    train(&run, 2, &two, &[&sets[..], &["dist.zero_stage=1"]].concat(), &[]);
    assert_same_run(&one, &two, 4, "hybrid with hard Gumbel-Softmax gates");
}

#[test]
fn spaf_adapters_trained_inside_the_target_on_two_ranks_equal_one() {
    let mut run = setup("dist-spaf");
    run.recipe = root().join("recipes/spaf-tiny.yaml");
    let one = run.dir.join("one");
    let sets = ["train.max_steps=4", "checkpoint.every_steps=4"];
    train(&run, 1, &one, &[&sets[..], &["train.grad_accum=2"]].concat(), &[]);
    let two = run.dir.join("two");
    train(&run, 2, &two, &[&sets[..], &["dist.zero_stage=2"]].concat(), &[]);
    assert_same_run(&one, &two, 4, "spaf");
}

#[test]
fn knowledge_drafter_with_its_cache_on_two_ranks_equals_one() {
    let mut run = setup("dist-knowledge");
    run.recipe = root().join("recipes/knowledge-tiny.yaml");
    let cache = run.dir.join("cache.safetensors");
    let o = run_forge(&[
        "build-knowledge".into(),
        "--target".into(),
        run.target.display().to_string(),
        // questions held out of the training conversations (train refuses an overlap)
        "--in".into(),
        root()
            .join("recipes/data/demo_eval_prompts.jsonl")
            .display()
            .to_string(),
        "--entries".into(),
        "4".into(),
        "--max-answer-tokens".into(),
        "16".into(),
        "--cache-dim".into(),
        "16".into(),
        "--out".into(),
        cache.display().to_string(),
        "--progress".into(),
        "never".into(),
    ]);
    ok(&o, "forge build-knowledge");
    let c = format!("drafter.knowledge_cache={}", cache.display());
    let one = run.dir.join("one");
    let sets = [
        "train.max_steps=4",
        "checkpoint.every_steps=4",
        "drafter.strategy=list",
        "drafter.layers=[0, 1]",
        "drafter.max_answer_tokens=16",
        c.as_str(),
    ];
    train(&run, 1, &one, &[&sets[..], &["train.grad_accum=2"]].concat(), &[]);
    let two = run.dir.join("two");
    train(&run, 2, &two, &[&sets[..], &["dist.zero_stage=1"]].concat(), &[]);
    assert_same_run(&one, &two, 4, "knowledge");
}

/// `forge launch`'s process management is library code: its flag checks are typed errors that
/// name the flag, usable without the binary.
#[test]
fn launch_plan_is_library_code_with_typed_errors() {
    use forge_trainer::error::TrainerError;
    use forge_trainer::launch::LaunchOptions;
    let opts = LaunchOptions {
        gpus: None,
        nproc: Some(2),
        nnodes: 1,
        node_rank: 0,
        master_addr: None,
        master_port: Some(29555),
        grace_s: 5,
        command: vec!["dist-selftest".into()],
        rank0_inherits_stderr: false,
    };
    let plan = opts.plan().expect("plan");
    assert_eq!((plan.nproc, plan.world, plan.first_rank), (2, 2, 0));
    assert_eq!((plan.master_addr.as_str(), plan.master_port), ("127.0.0.1", 29555));
    let bad = LaunchOptions {
        nnodes: 2,
        node_rank: 2,
        ..opts.clone()
    };
    match bad.plan() {
        Err(TrainerError::Config(m)) => assert!(m.contains("--node-rank") && m.contains("--nnodes 2"), "{m}"),
        other => panic!("expected a --node-rank error, got {other:?}"),
    }
    let both = LaunchOptions { gpus: Some(1), ..opts };
    assert!(both.plan().unwrap_err().to_string().contains("--gpus/--nproc"));
}

/// The fraction of the target's layer parameters each rank reported holding
/// ("tensor parallel: the target's N layer parameters split over K ranks: rank 0 n0 (..%), ...").
fn shard_shares(stdout: &str) -> (i64, Vec<i64>) {
    let line = stdout
        .lines()
        .find(|l| l.contains("tensor parallel: the target's"))
        .unwrap_or_else(|| panic!("no tensor-parallel line in:\n{stdout}"));
    let after = line.split("the target's ").nth(1).expect("count");
    let full: i64 = after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("full");
    let held = after
        .split("rank ")
        .skip(1)
        .map(|p| p.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("held"))
        .collect();
    (full, held)
}

#[test]
fn a_target_split_over_two_ranks_trains_the_draft_exactly_as_one_whole_target() {
    for recipe in ["medusa-tiny.yaml", "eagle3-tiny.yaml"] {
        let mut run = setup(&format!("dist-tp-{recipe}"));
        run.recipe = root().join("recipes").join(recipe);
        let one = run.dir.join("one");
        train(&run, 1, &one, &["train.max_steps=6"], &[]);
        let two = run.dir.join("tp2");
        let args = launch_args(
            2,
            &train_args(&run, &two, &["train.max_steps=6", "target.tensor_parallel=2"], &[]),
        );
        let done = run_forge(&args);
        let out =
            ok(&done, "forge launch --nproc 2 -- train (tensor_parallel 2)") + &String::from_utf8_lossy(&done.stderr);
        assert_same_run_within(&one, &two, 6, &format!("{recipe}: tensor_parallel 2 vs 1"), 1e-4);
        // each rank holds half of the layers' weights (the norms, 2 x 64 per layer, are whole)
        let (full, held) = shard_shares(&out);
        assert_eq!(held.len(), 2, "{out}");
        for h in &held {
            let share = *h as f64 / full as f64;
            assert!(
                (0.5..0.52).contains(&share),
                "{recipe}: a rank holds {share} of the layers"
            );
        }
        assert!(
            out.contains("[rank 0] trained 6 steps") && !out.contains("[rank 1] trained"),
            "{out}"
        );
        assert!(
            out.contains("(data-parallel world 1, target split over 2 ranks"),
            "{out}"
        );
    }
}

#[test]
fn tensor_parallel_composes_with_data_parallel_and_zero() {
    // 4 ranks = 2 targets split 2 ways: the same as 1 rank with 2 micro-batches per step
    let run = setup("dist-tp-dp");
    let one = run.dir.join("one");
    train(&run, 1, &one, &["train.max_steps=6", "train.grad_accum=2"], &[]);
    let four = run.dir.join("tp2-dp2");
    let out = train(
        &run,
        4,
        &four,
        &["train.max_steps=6", "target.tensor_parallel=2", "dist.zero_stage=2"],
        &[],
    );
    assert_same_run_within(&one, &four, 6, "tensor_parallel 2 x data parallel 2, ZeRO-2", 1e-4);
    // the optimizer state is sharded over the 2 data-parallel ranks, written once
    let ck = four.join("step_6");
    assert!(ck.join("optimizer.rank0.safetensors").is_file() && ck.join("optimizer.rank1.safetensors").is_file());
    assert!(!ck.join("optimizer.rank2.safetensors").exists(), "{out}");
    // a world the split does not divide is refused with the fix
    let bad = run_forge(&launch_args(
        3,
        &train_args(&run, &run.dir.join("bad"), &["target.tensor_parallel=2"], &[]),
    ));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("target.tensor_parallel 2 does not divide the 3 launched ranks"),
        "{err}"
    );
}

/// `forge <args>` through `forge launch --nproc 2` (every rank one target shard), checked.
fn launched_tp2(args: &[String]) -> String {
    let out = run_forge(&launch_args(2, args));
    ok(&out, &format!("forge launch --nproc 2 -- {}", args.join(" ")))
}

#[test]
fn a_split_target_prepares_hidden_states_regenerates_and_evaluates_as_the_whole_one() {
    let mut run = setup("dist-tp-commands");
    run.recipe = root().join("recipes/eagle3-tiny.yaml");
    let data_sets = [
        format!("target.path={}", run.target.display()),
        format!("data.train=[{}]", run.data.display()),
        format!("data.cache_dir={}", run.dir.join("cache").display()),
    ];
    let with_sets = |mut args: Vec<String>, extra: &[&str]| -> Vec<String> {
        for s in data_sets.iter().map(String::as_str).chain(extra.iter().copied()) {
            args.push("--set".into());
            args.push(s.into());
        }
        args
    };
    // prepare-hidden: the shards of a split target train the draft as the whole target's do
    let hidden = |name: &str| -> Vec<String> {
        vec![
            "prepare-hidden".into(),
            run.recipe.display().to_string(),
            "--out".into(),
            run.dir.join(name).display().to_string(),
        ]
    };
    ok(&run_forge(&with_sets(hidden("hidden1"), &[])), "prepare-hidden");
    let out = launched_tp2(&with_sets(hidden("hidden2"), &["target.tensor_parallel=2"]));
    assert!(out.contains("[rank 0]") && !out.contains("[rank 1]"), "{out}");
    let offline = |name: &str, shards: &str| -> Vec<(u64, f64)> {
        let ck = run.dir.join(name);
        let hd = format!("data.hidden_dir={}", run.dir.join(shards).display());
        train(&run, 1, &ck, &["train.max_steps=3", "data.mode=offline", &hd], &[]);
        losses(&ck)
    };
    let (a, b) = (offline("off1", "hidden1"), offline("off2", "hidden2"));
    assert_eq!(a.len(), 3);
    for ((_, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-3 * x.abs(),
            "whole target {x} vs split {y} (bf16 shards)"
        );
    }

    // regenerate: the same greedy answers, written once
    let prompts = forge_tests::two_turn_questions(&run.dir);
    let regen = |out: &str, tp: &str| -> Vec<String> {
        [
            "regenerate",
            "--target",
            &run.target.display().to_string(),
            "--in",
            &prompts.display().to_string(),
            "--out",
            &run.dir.join(out).display().to_string(),
            "--max-new-tokens",
            "8",
            "--tensor-parallel",
            tp,
            "--progress",
            "never",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    ok(&run_forge(&regen("regen1.jsonl", "1")), "regenerate");
    launched_tp2(&regen("regen2.jsonl", "2"));
    let read = |f: &str| std::fs::read_to_string(run.dir.join(f)).expect("regenerated");
    assert_eq!(read("regen1.jsonl"), read("regen2.jsonl"));

    // eval: the draft decodes losslessly against the split target, with the whole one's tau
    let ck = run.dir.join("online");
    train(&run, 1, &ck, &["train.max_steps=3"], &[]);
    let eval = |json: &str, tp: &str| -> Vec<String> {
        [
            "eval",
            "--target",
            &run.target.display().to_string(),
            "--draft",
            &ck.join("step_3").display().to_string(),
            "--prompts",
            &prompts.display().to_string(),
            "--max-new-tokens",
            "12",
            "--gamma",
            "3",
            "--verify",
            "--json",
            &run.dir.join(json).display().to_string(),
            "--tensor-parallel",
            tp,
            "--progress",
            "never",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    ok(&run_forge(&eval("eval1.json", "1")), "eval");
    let out = launched_tp2(&eval("eval2.json", "2"));
    assert!(!out.contains("[rank 1] forge eval:"), "rank 0 alone reports: {out}");
    let summary = |f: &str| -> serde_json::Value {
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.dir.join(f)).expect("report")).expect("json");
        r["summary"].clone()
    };
    let (s1, s2) = (summary("eval1.json"), summary("eval2.json"));
    assert_eq!(s2["greedy_mismatches"], 0, "{s2}");
    assert_eq!(s2["greedy_compared"], 2, "{s2}");
    assert_eq!(s1["new_tokens"], s2["new_tokens"]);
    assert_eq!(s1["tau"], s2["tau"], "{s1} vs {s2}");
    // a split over more ranks than were launched is refused with the fix
    let e = run_forge(&eval("eval3.json", "2"));
    assert!(!e.status.success());
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(err.contains("forge launch --nproc 2"), "{err}");
}
