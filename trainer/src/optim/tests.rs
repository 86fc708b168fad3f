//! The optimizer against hand arithmetic and libtorch's own AdamW; groups and clipping.

use super::*;
use crate::error::Result;
use forge_models::drafters::ParamGroup;
use tch::{Kind, Tensor};

const LR: f64 = 0.1;

fn cfg() -> AdamWConfig {
    AdamWConfig {
        lr: LR,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

const W0: [f64; 4] = [1.0, -2.0, 0.5, 3.0];
const B0: [f64; 2] = [0.5, -1.0];
const GW: [f64; 4] = [0.1, -0.2, 0.3, 0.4];
const GB: [f64; 2] = [0.01, -0.5];

fn var(values: &[f64], shape: &[i64]) -> Tensor {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_slice(&v).view(shape).set_requires_grad(true)
}

fn values(t: &Tensor) -> Vec<f64> {
    let flat = t.detach().to_kind(Kind::Double).flatten(0, -1);
    (0..flat.size()[0]).map(|i| flat.double_value(&[i])).collect()
}

/// Sets the gradients through autograd: d/dp sum(p * G) = G.
fn backward(params: &[(&Tensor, &[f64])]) {
    let mut loss = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    for (p, g) in params {
        let g: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        let g = Tensor::from_slice(&g).view(p.size().as_slice());
        loss += (*p * g).sum(Kind::Float);
    }
    loss.backward();
}

fn problem() -> (Tensor, Tensor, AdamW) {
    let w = var(&W0, &[2, 2]);
    let b = var(&B0, &[2]);
    let opt = AdamW::new(
        vec![("w".into(), w.shallow_clone()), ("b".into(), b.shallow_clone())],
        cfg(),
        &ParamPolicy::default(),
    )
    .expect("adamw");
    (w, b, opt)
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w} (tol {tol})");
    }
}

/// AdamW by hand, in f64, one scalar at a time: returns p after `steps` steps with the
/// fixed gradient g.
fn by_hand(p0: f64, g: f64, steps: u32, decay: bool) -> f64 {
    by_hand_at(p0, g, steps, LR, decay)
}

/// [`by_hand`] at learning rate `lr`.
fn by_hand_at(p0: f64, g: f64, steps: u32, lr: f64, decay: bool) -> f64 {
    let (b1, b2, eps, wd) = (0.9_f64, 0.999_f64, 1e-8_f64, 0.1_f64);
    let (mut p, mut m, mut v) = (p0, 0.0_f64, 0.0_f64);
    for t in 1..=steps {
        if decay {
            p -= lr * wd * p;
        }
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        let m_hat = m / (1.0 - b1.powi(t as i32));
        let v_hat = v / (1.0 - b2.powi(t as i32));
        p -= lr * m_hat / (v_hat.sqrt() + eps);
    }
    p
}

#[test]
fn adamw_matches_hand_arithmetic_and_decays_only_the_matrix() {
    let (w, b, mut opt) = problem();
    for _ in 0..3 {
        opt.zero_grad().expect("zero_grad");
        backward(&[(&w, &GW), (&b, &GB)]);
        opt.step(LR).expect("step");
    }
    assert_eq!(opt.step_count(), 3);
    let want_w: Vec<f64> = W0.iter().zip(GW).map(|(&p, g)| by_hand(p, g, 3, true)).collect();
    let want_b: Vec<f64> = B0.iter().zip(GB).map(|(&p, g)| by_hand(p, g, 3, false)).collect();
    assert_close(&values(&w), &want_w, 2e-6);
    assert_close(&values(&b), &want_b, 2e-6);
    // With a constant gradient every bias-corrected update is g/(|g|+eps) ~ sign(g), so
    // after 3 steps: bias = b0 - 3*0.1*sign(g) exactly up to eps; the matrix also shrinks
    // by (1 - 0.1*0.1) per step: w = ((w0*0.99 - 0.1 s)*0.99 - 0.1 s)*0.99 - 0.1 s.
    let s = |g: f64| g.signum();
    let lit_b = [0.5 - 0.3 * s(0.01), -1.0 - 0.3 * s(-0.5)]; // [0.2, -0.7]
    assert_close(&values(&b), &lit_b, 1e-5);
    assert_close(&want_b, &[0.2, -0.7], 1e-5);
    let shrink = |p0: f64, g: f64| ((p0 * 0.99 - 0.1 * s(g)) * 0.99 - 0.1 * s(g)) * 0.99 - 0.1 * s(g);
    let lit_w: Vec<f64> = W0.iter().zip(GW).map(|(&p, g)| shrink(p, g)).collect();
    // w[0][0]: ((0.99 - 0.1)*0.99 - 0.1)*0.99 - 0.1 = 0.673289 (up to O(eps) terms)
    assert!((lit_w[0] - 0.673289).abs() < 1e-12);
    assert_close(&values(&w), &lit_w, 1e-5);
    // and the decay really hits only the matrix: without it w would be w0 - 0.3*sign(g)
    let no_decay: Vec<f64> = W0.iter().zip(GW).map(|(&p, g)| p - 0.3 * s(g)).collect();
    assert!(values(&w).iter().zip(&no_decay).all(|(a, b)| (a - b).abs() > 1e-3));
}

/// Cross-check against libtorch's own C++ torch::optim::AdamW (through tch's opaque
/// nn::Optimizer) on a small regression, varying gradients and learning rates, with the
/// bias in a parameter group without weight decay.
#[test]
fn matches_libtorch_adamw_with_decay_on_matrices_only() {
    use tch::nn::OptimizerConfig;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let w_init = Tensor::from_slice(&[0.3f32, -0.2, 0.1, 0.5, -0.4, 0.2]).view([2, 3]);
    let b_init = Tensor::from_slice(&[0.05f32, -0.1]);
    let w_ref = vs.root().set_group(0).var_copy("w", &w_init);
    let b_ref = vs.root().set_group(1).var_copy("b", &b_init);
    let mut reference = tch::nn::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        wd: 0.1,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(&vs, 1e-2)
    .expect("libtorch AdamW");
    reference.set_weight_decay_group(1, 0.0);

    let w = w_init.copy().set_requires_grad(true);
    let b = b_init.copy().set_requires_grad(true);
    let mut ours = AdamW::new(
        vec![("w".into(), w.shallow_clone()), ("b".into(), b.shallow_clone())],
        cfg(),
        &ParamPolicy::default(),
    )
    .expect("adamw");

    let x = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5, -0.3, 0.8, 2.0, 1.0, 0.0, -1.5, 0.2, 0.7]).view([4, 3]);
    let y = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 2.0, -0.5, 0.3, 1.5, -2.0]).view([4, 2]);
    let loss = |w: &Tensor, b: &Tensor| (x.matmul(&w.transpose(0, 1)) + b - &y).square().sum(Kind::Float);
    for (i, lr) in [1e-2, 3e-2, 5e-2, 2e-2, 1e-2, 4e-2].into_iter().enumerate() {
        reference.set_lr(lr);
        reference.zero_grad();
        loss(&w_ref, &b_ref).backward();
        reference.step();
        ours.zero_grad().expect("zero_grad");
        loss(&w, &b).backward();
        ours.step(lr).expect("step");
        let (dw, db) = (
            (&w - &w_ref).abs().max().double_value(&[]),
            (&b - &b_ref).abs().max().double_value(&[]),
        );
        assert!(dw < 1e-6 && db < 1e-6, "step {i}: |dw| {dw}, |db| {db}");
    }
    // (one step of decay moves w by lr*wd*|w| ~ 3e-4, far above the 1e-6 tolerance, so
    // matching both groups shows decay on the matrix and none on the bias)
}

#[test]
fn zero_gradient_step_is_pure_weight_decay_on_matrices() {
    let (w, b, mut opt) = problem();
    backward(&[(&w, &[0.0; 4]), (&b, &[0.0; 2])]);
    opt.step(0.5).expect("step");
    // m = v = 0: the Adam part is 0/(0+eps) = 0; only p *= 1 - 0.5*0.1 on the matrix
    let want_w: Vec<f64> = W0.iter().map(|p| p * 0.95).collect();
    assert_close(&values(&w), &want_w, 1e-7);
    assert_close(&values(&b), &B0, 0.0);
}

#[test]
fn params_without_grad_are_skipped() {
    let (w, b, _) = problem();
    let unused = var(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let mut opt = AdamW::new(
        vec![
            ("w".into(), w.shallow_clone()),
            ("b".into(), b.shallow_clone()),
            ("unused".into(), unused.shallow_clone()),
        ],
        cfg(),
        &ParamPolicy::default(),
    )
    .expect("adamw");
    backward(&[(&w, &GW), (&b, &GB)]);
    opt.step(LR).expect("step");
    assert_close(&values(&unused), &[1.0, 2.0, 3.0, 4.0], 0.0);
    for (name, t) in opt.state_tensors() {
        if name.ends_with("/unused") {
            assert_close(&values(&t), &[0.0; 4], 0.0);
        }
    }
    assert_close(
        &values(&b),
        &[by_hand(0.5, 0.01, 1, false), by_hand(-1.0, -0.5, 1, false)],
        1e-6,
    );
}

#[test]
fn clipping_scales_to_max_norm_and_returns_the_pre_clip_norm() {
    let (w, b, mut opt) = problem();
    // norm = sqrt(0^2 + 0^2 + 0^2 + 12^2 + 3^2 + 4^2) = sqrt(169) = 13
    let gw = [0.0, 0.0, 0.0, 12.0];
    let gb = [3.0, 4.0];
    backward(&[(&w, &gw), (&b, &gb)]);
    // no clipping when max_norm <= 0 or above the norm
    assert!((opt.clip_grad_norm(0.0).expect("clip") - 13.0).abs() < 1e-9);
    assert!((opt.clip_grad_norm(20.0).expect("clip") - 13.0).abs() < 1e-9);
    assert_close(&values(&b.grad()), &gb, 0.0);
    let norm = opt.clip_grad_norm(6.5).expect("clip");
    assert!((norm - 13.0).abs() < 1e-9, "{norm}");
    let c = 6.5 / (13.0 + 1e-6);
    assert_close(&values(&w.grad()), &[0.0, 0.0, 0.0, 12.0 * c], 1e-6);
    assert_close(&values(&b.grad()), &[3.0 * c, 4.0 * c], 1e-6);
    // the clipped norm is the max norm (minus the 1e-6 guard)
    assert!((opt.clip_grad_norm(0.0).expect("clip") - 6.5).abs() < 1e-5);
    // no grads at all: norm 0
    let mut empty = AdamW::new(vec![("x".into(), var(&[1.0], &[1]))], cfg(), &ParamPolicy::default()).expect("adamw");
    assert_eq!(empty.clip_grad_norm(1.0).expect("clip"), 0.0);
}

#[test]
fn state_round_trip_gives_identical_steps() {
    let (w, b, mut a) = problem();
    for _ in 0..2 {
        a.zero_grad().expect("zero_grad");
        backward(&[(&w, &GW), (&b, &GB)]);
        a.step(LR).expect("step");
    }
    // "checkpoint": deep copies of state and weights
    let saved: Vec<(String, Tensor)> = a.state_tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["exp_avg/w", "exp_avg_sq/w", "exp_avg/b", "exp_avg_sq/b"]);
    assert!(saved.iter().all(|(_, t)| t.kind() == Kind::Float));
    assert_eq!(a.state_bytes(), 2 * (4 + 2) * 4);
    let w2 = w.detach().copy().set_requires_grad(true);
    let b2 = b.detach().copy().set_requires_grad(true);
    let mut c = AdamW::new(
        vec![("w".into(), w2.shallow_clone()), ("b".into(), b2.shallow_clone())],
        cfg(),
        &ParamPolicy::default(),
    )
    .expect("adamw");
    c.load_state(&saved, a.step_count()).expect("load_state");
    assert_eq!(c.step_count(), 2);
    // one more identical step on both
    for (opt, (w, b)) in [(&mut a, (&w, &b)), (&mut c, (&w2, &b2))] {
        opt.zero_grad().expect("zero_grad");
        backward(&[(w, &GW), (b, &GB)]);
        opt.step(LR).expect("step");
    }
    assert!(w.equal(&w2) && b.equal(&b2), "weights differ after resume");
    for ((n1, t1), (n2, t2)) in a.state_tensors().iter().zip(c.state_tensors().iter()) {
        assert_eq!(n1, n2);
        assert!(t1.equal(t2), "{n1} differs after resume");
    }
    // and a fresh optimizer (no state loaded) would not match: the state matters
    let w3 = w.detach().copy().set_requires_grad(true);
    let mut fresh = AdamW::new(vec![("w".into(), w3.shallow_clone())], cfg(), &ParamPolicy::default()).expect("adamw");
    backward(&[(&w3, &GW)]);
    fresh.step(LR).expect("step");
    assert!(!w3.equal(&w));
}

#[test]
fn load_state_names_missing_misshapen_and_unknown_tensors() {
    let (_, _, mut opt) = problem();
    let good = opt.state_tensors();
    let msg = |r: Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();

    let missing: Vec<(String, Tensor)> = good
        .iter()
        .filter(|(n, _)| n != "exp_avg_sq/b")
        .map(|(n, t)| (n.clone(), t.copy()))
        .collect();
    let e = msg(opt.load_state(&missing, 1));
    assert!(e.contains("missing tensor exp_avg_sq/b"), "{e}");

    let mut misshapen: Vec<(String, Tensor)> = good.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    misshapen[0].1 = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
    let e = msg(opt.load_state(&misshapen, 1));
    assert!(
        e.contains("exp_avg/w") && e.contains("[4]") && e.contains("[2, 2]"),
        "{e}"
    );

    let mut extra: Vec<(String, Tensor)> = good.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    extra.push((
        "exp_avg/ghost".into(),
        Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
    ));
    let e = msg(opt.load_state(&extra, 1));
    assert!(e.contains("exp_avg/ghost"), "{e}");

    // failed loads leave the step count alone
    assert_eq!(opt.step_count(), 0);
}

fn group(name: &str, prefix: &str, lr_scale: f64, weight_decay: bool) -> ParamGroup {
    ParamGroup {
        name: name.into(),
        prefix: prefix.into(),
        lr_scale,
        weight_decay,
    }
}

/// Two groups: "head." parameters at half the learning rate without weight decay, the
/// rest ("" prefix) at the scheduled rate with weight decay on matrices only.
fn two_groups() -> ParamPolicy {
    ParamPolicy::new(vec![group("body", "", 1.0, true), group("head", "head.", 0.5, false)]).expect("policy")
}

#[test]
fn groups_give_each_parameter_its_lr_scale_and_decay_as_computed_by_hand() {
    // head.w: a matrix in the no-decay group; body.w: a matrix with decay; body.b: a
    // vector in the decay group (never decayed)
    let hw = var(&W0, &[2, 2]);
    let bw = var(&[0.7, -0.3, 1.5, -2.5], &[2, 2]);
    let bb = var(&B0, &[2]);
    let named = vec![
        ("body.b".to_string(), bb.shallow_clone()),
        ("body.w".to_string(), bw.shallow_clone()),
        ("head.w".to_string(), hw.shallow_clone()),
    ];
    let policy = two_groups();
    assert_eq!(
        policy.rules(&named).expect("rules"),
        [
            ParamRule {
                lr_scale: 1.0,
                decay: false
            },
            ParamRule {
                lr_scale: 1.0,
                decay: true
            },
            ParamRule {
                lr_scale: 0.5,
                decay: false
            },
        ]
    );
    let mut opt = AdamW::new(named, cfg(), &policy).expect("adamw");
    let gbw = [-0.3, 0.2, 0.05, -1.0];
    for _ in 0..3 {
        opt.zero_grad().expect("zero_grad");
        backward(&[(&hw, &GW), (&bw, &gbw), (&bb, &GB)]);
        opt.step(LR).expect("step");
    }
    let hand = |p0: &[f64], g: &[f64], lr: f64, decay: bool| -> Vec<f64> {
        p0.iter()
            .zip(g)
            .map(|(&p, &g)| by_hand_at(p, g, 3, lr, decay))
            .collect()
    };
    assert_close(&values(&hw), &hand(&W0, &GW, 0.5 * LR, false), 2e-6);
    assert_close(&values(&bw), &hand(&[0.7, -0.3, 1.5, -2.5], &gbw, LR, true), 2e-6);
    assert_close(&values(&bb), &hand(&B0, &GB, LR, false), 2e-6);
    // with a constant gradient each step moves ~lr*sign(g): head.w by 0.05 per step,
    // without shrinking (w[0][0] = 1 - 3*0.05*sign(0.1) = 0.85)
    assert!((values(&hw)[0] - 0.85).abs() < 1e-5, "{:?}", values(&hw));
    // and body.w shrinks by (1 - 0.1*0.1) per step: ((0.7*0.99 + 0.1)*0.99 + 0.1)*0.99 + 0.1
    let w00 = ((0.7 * 0.99 + 0.1) * 0.99 + 0.1) * 0.99 + 0.1;
    assert!((values(&bw)[0] - w00).abs() < 1e-5, "{:?} vs {w00}", values(&bw));
}

#[test]
fn a_group_at_scale_s_steps_exactly_as_the_whole_optimizer_at_lr_times_s() {
    let run = |policy: &ParamPolicy, lr: f64| {
        let (w, b) = (var(&W0, &[2, 2]), var(&B0, &[2]));
        let mut opt = AdamW::new(
            vec![("head.w".into(), w.shallow_clone()), ("b".into(), b.shallow_clone())],
            cfg(),
            policy,
        )
        .expect("adamw");
        for _ in 0..2 {
            opt.zero_grad().expect("zero_grad");
            backward(&[(&w, &GW), (&b, &GB)]);
            opt.step(lr).expect("step");
        }
        (w, b)
    };
    let only_head =
        ParamPolicy::new(vec![group("head", "head.", 0.5, true), group("rest", "", 1.0, true)]).expect("policy");
    let (w, b) = run(&only_head, LR);
    let (w_half, _) = run(&ParamPolicy::default(), 0.5 * LR);
    let (_, b_full) = run(&ParamPolicy::default(), LR);
    assert!(w.equal(&w_half) && b.equal(&b_full), "bit-identical updates");
    // one group of scale 1 is the default policy, bit for bit
    let (w1, b1) = run(&ParamPolicy::new(vec![group("x", "", 1.0, true)]).expect("policy"), LR);
    assert!(w1.equal(&run(&ParamPolicy::default(), LR).0) && b1.equal(&b_full));
}

#[test]
fn the_longest_matching_prefix_decides() {
    let p = ParamPolicy::new(vec![
        group("all", "", 1.0, true),
        group("layers", "layers.", 2.0, true),
        group("layer0", "layers.0.", 3.0, false),
    ])
    .expect("policy");
    let name = |n: &str| p.group_of(n).map(|g| g.name.clone()).unwrap_or_default();
    assert_eq!(name("layers.0.w"), "layer0");
    assert_eq!(name("layers.01.w"), "layers");
    assert_eq!(name("layers.1.w"), "layers");
    assert_eq!(name("fc.weight"), "all");
    let m = var(&W0, &[2, 2]);
    assert_eq!(
        p.rule("layers.0.w", &m).expect("rule"),
        ParamRule {
            lr_scale: 3.0,
            decay: false
        }
    );
    assert_eq!(
        p.rule("layers.1.w", &m).expect("rule"),
        ParamRule {
            lr_scale: 2.0,
            decay: true
        }
    );
    // the summary counts tensors and elements per group
    let named = vec![
        ("layers.0.w".to_string(), m.shallow_clone()),
        ("layers.0.b".to_string(), var(&B0, &[2])),
        ("fc.w".to_string(), m.shallow_clone()),
    ];
    let s = p.summary(&named).expect("summary");
    let counts: Vec<(&str, usize, i64)> = s.iter().map(|g| (g.name.as_str(), g.tensors, g.numel)).collect();
    assert_eq!(counts, [("all", 1, 4), ("layers", 0, 0), ("layer0", 2, 6)]);
    assert_eq!(
        s[2].to_string(),
        "parameter group layer0: 2 tensors, 6 parameters, lr scale 3, weight decay off"
    );
}

#[test]
fn a_parameter_no_group_matches_is_an_error_naming_it() {
    let p = ParamPolicy::new(vec![group("head", "head.", 1.0, true)]).expect("policy");
    let named = vec![
        ("head.w".to_string(), var(&W0, &[2, 2])),
        ("fc.weight".to_string(), var(&W0, &[2, 2])),
    ];
    let e = AdamW::new(named, cfg(), &p)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("trainable parameter fc.weight matches no optimizer parameter group") && e.contains("'head.'"),
        "{e}"
    );
    // and groups that cannot decide are refused up front
    let e = ParamPolicy::new(vec![group("a", "x.", 1.0, true), group("b", "x.", 2.0, true)])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("a and b have the same prefix 'x.'"), "{e}");
    let e = ParamPolicy::new(vec![group("a", "", f64::NAN, true)])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("group a: lr_scale NaN"), "{e}");
}

#[test]
fn fused_adamw_gives_the_per_tensor_parameters_after_five_steps() {
    // random fp32 parameters of assorted shapes in two groups (decay on body matrices only,
    // head at half the rate), random gradients large enough that clipping scales them
    tch::manual_seed(7);
    let shapes: [&[i64]; 5] = [&[64, 33], &[33], &[5, 7, 3], &[1000], &[3, 3]];
    let names = ["body.a", "body.b", "body.c", "head.d", "head.e"];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)))
        .collect();
    let grads: Vec<Vec<Tensor>> = (0..5)
        .map(|_| {
            shapes
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)) * 0.3)
                .collect()
        })
        .collect();
    let params: Vec<Tensor> = init.iter().map(|t| t.copy().set_requires_grad(true)).collect();
    let named: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| n.to_string())
        .zip(params.iter().map(Tensor::shallow_clone))
        .collect();
    let policy = two_groups();
    let rules = policy.rules(&named).expect("rules");
    let mut opt = AdamW::new(named, cfg(), &policy).expect("adamw");
    let (lr, max_norm) = (1e-2, 5.0);
    for g in &grads {
        opt.zero_grad().expect("zero_grad");
        let loss = params
            .iter()
            .zip(g)
            .map(|(p, g)| (p * g).sum(Kind::Float))
            .fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |a, b| a + b);
        loss.backward();
        let norm = opt.clip_grad_norm(max_norm).expect("clip");
        assert!(norm > max_norm, "clipping must be active: norm {norm}");
        opt.step(lr).expect("step");
    }
    let want = per_tensor_reference(&init, &rules, &grads, &cfg(), lr, max_norm);
    let rel = max_rel_diff(&params, &want);
    assert!(
        rel <= 1e-6,
        "fused vs per-tensor AdamW after 5 steps: max relative difference {rel:e}"
    );
    // and the parameters did move (by ~lr per step): the comparison is not vacuous
    assert!(max_rel_diff(&params, &init) > 1e-3);
}
