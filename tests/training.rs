//! The training step and loop on a real checkpoint (tiny-qwen2): normalisation over the whole accumulated step,
//! hand-checked weighted losses, misbehaving plugins, and non-finite values that must never reach the optimizer
//! or a checkpoint.

mod common;
use common::*;

#[path = "../crates/ytrainer-models/tests/common/mod.rs"]
#[allow(unused)]
mod reference;

use std::collections::BTreeMap;

use ytrainer_core::burn::prelude::*;
use ytrainer_core::config::TrainSection;
use ytrainer_core::loss::{
    LossFn, Normalize, Registry, TokenReweighter, TokenStats, tensor_to_vec,
};
use ytrainer_core::observe::Silent;
use ytrainer_core::optim::GradAccumulator;
use ytrainer_core::sft::{self, TrainSetup};
use ytrainer_core::step::{StepContext, StepCounters, eval_micro_batch, train_micro_batch};
use ytrainer_core::trainer::LoopSetup;
use ytrainer_data::{BatchOptions, Example, MicroBatch};
use ytrainer_models::{AdapterSpec, Decoder, LoraConfig, load_pretrained};
use ytrainer_plugin_asft as _;
use ytrainer_plugin_ce as _;
use ytrainer_plugin_dft as _;
use ytrainer_plugin_eaft as _;
use ytrainer_plugin_nlirg::Curve;

const IDS: [[u32; 16]; 2] = [
    [
        5157, 235, 3980, 5192, 7935, 905, 2763, 7813, 2895, 5056, 144, 4225, 8140, 7751, 2797, 6652,
    ],
    [
        3462, 7449, 1202, 5396, 5374, 4453, 2962, 2516, 7051, 252, 3562, 4764, 8093, 6542, 562,
        2628,
    ],
];
/// transformers' per-token losses of reference.json (CE(logits[b, t], ids[b, t + 1])).
const REF_LOSS: [[f64; 15]; 2] = [
    [
        8.800271034240723,
        9.456947326660156,
        8.539911270141602,
        9.271589279174805,
        8.659219741821289,
        9.159368515014648,
        8.51335334777832,
        8.855292320251465,
        8.55053997039795,
        8.544053077697754,
        9.294981956481934,
        8.717021942138672,
        8.971240997314453,
        9.543924331665039,
        9.015151977539062,
    ],
    [
        9.112873077392578,
        8.81637191772461,
        8.89281177520752,
        8.964438438415527,
        8.91453742980957,
        8.953378677368164,
        9.212297439575195,
        9.400225639343262,
        8.881856918334961,
        8.75262451171875,
        9.097325325012207,
        8.739726066589355,
        8.681148529052734,
        8.675601959228516,
        8.999886512756348,
    ],
];

fn device() -> Device {
    Device::flex().autodiff()
}

fn model(adapter: &AdapterSpec) -> Decoder {
    load_pretrained(&assets().join("tiny-qwen2"), adapter, &device())
        .unwrap()
        .0
}

fn lora() -> AdapterSpec {
    AdapterSpec::Lora(LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    })
}

fn micro_batch(rows: &[usize], mask: impl Fn(usize, usize) -> bool + Copy) -> MicroBatch {
    let t = 16;
    MicroBatch {
        batch: rows.len(),
        seq: t,
        input_ids: rows.iter().flat_map(|&r| IDS[r]).collect(),
        position_ids: rows.iter().flat_map(|_| 0..t as u32).collect(),
        segment_ids: vec![1; rows.len() * t],
        target_mask: rows
            .iter()
            .flat_map(|&r| (0..t).map(move |p| p > 0 && mask(r, p)))
            .collect::<Vec<bool>>(),
        examples: rows.to_vec(),
        weights: Default::default(),
    }
}

fn ctx() -> StepContext {
    StepContext {
        step: 0,
        progress: 0.0,
        zone_borders: [1.45, 6.6, 15.0],
    }
}

fn nlirg() -> Box<dyn TokenReweighter> {
    match Registry::discover()
        .build("nlirg", &BTreeMap::new())
        .unwrap()
        .0
    {
        LossFn::Token(p) => p,
        LossFn::Pairwise(_) => unreachable!(),
    }
}

#[test]
fn per_token_ce_of_the_step_matches_transformers() {
    let m = model(&AdapterSpec::Full);
    let c = eval_micro_batch(
        &m,
        &micro_batch(&[0, 1], |_, _| true),
        [1.45, 6.6, 15.0],
        &device(),
    );
    let want: f64 = REF_LOSS.iter().flatten().sum();
    assert_eq!(c.tokens, 30);
    assert!(
        ((c.ce_sum - want) / want).abs() < 1e-5,
        "{} vs {want}",
        c.ce_sum
    );
}

#[test]
fn weighted_loss_and_counters_match_hand_computation() {
    let m = model(&lora());
    let plugin = nlirg();
    // supervise only odd positions of row 0 and positions >= 10 of row 1
    let mask = |r: usize, p: usize| if r == 0 { p % 2 == 1 } else { p >= 10 };
    let mut acc = GradAccumulator::default();
    let c = train_micro_batch(
        &m,
        &micro_batch(&[0, 1], mask),
        plugin.as_ref(),
        ctx(),
        &mut acc,
        &device(),
    )
    .unwrap();
    let curve = Curve::default();
    let (mut tokens, mut wsum, mut wl, mut nonzero) = (0usize, 0.0, 0.0, 0.0);
    for (r, losses) in REF_LOSS.iter().enumerate() {
        for p in 1..16 {
            if mask(r, p) {
                let l = losses[p - 1];
                let w = curve.weight(l);
                tokens += 1;
                wsum += w;
                wl += w * l;
                if w * l != 0.0 {
                    nonzero += 1.0;
                }
            }
        }
    }
    assert_eq!(c.tokens, tokens);
    assert_eq!(c.nonzero, nonzero);
    assert!(
        (c.weight_sum - wsum).abs() < 1e-4,
        "{} vs {wsum}",
        c.weight_sum
    );
    assert!(
        (c.weighted_sum - wl).abs() / wl < 1e-5,
        "{} vs {wl}",
        c.weighted_sum
    );
    // the three normalisations (docs/losses.md, "Normalisation")
    assert_eq!(
        Normalize::Tokens.denominator(c.tokens as f64, c.nonzero, c.weight_sum),
        tokens as f64
    );
    assert_eq!(
        Normalize::Nonzero.denominator(c.tokens as f64, c.nonzero, c.weight_sum),
        nonzero
    );
    assert_eq!(
        Normalize::Weights.denominator(c.tokens as f64, c.nonzero, c.weight_sum),
        c.weight_sum
    );
    // a step whose weights are all zero divides by 1, not by 0
    assert_eq!(Normalize::Nonzero.denominator(5.0, 0.0, 0.0), 1.0);
}

/// Data weights (record and message `weight`, carried by `MicroBatch::weights`) multiply the plugin's weights:
/// every counter, and so every normaliser, sees `d_i * w_i`. Row 0 (8 targets) has data weight 0.5, row 1 (6 targets) has
/// 2.0 on positions 10-12 and 1 elsewhere; a zero data weight (row 0, position 5) counts as a token but not as
/// nonzero. The gradient of a batch weighted 2 everywhere is exactly twice the unweighted one.
#[test]
fn data_weights_multiply_the_plugin_weights_in_every_counter() {
    let m = model(&lora());
    let plugin = nlirg();
    let mask = |r: usize, p: usize| if r == 0 { p % 2 == 1 } else { p >= 10 };
    let data_w = |r: usize, p: usize| -> f32 {
        match (r, p) {
            (0, 5) => 0.0,
            (0, _) => 0.5,
            (1, 10..=12) => 2.0,
            _ => 1.0,
        }
    };
    let mut mb = micro_batch(&[0, 1], mask);
    mb.weights = ytrainer_data::Weights(
        (0..2)
            .flat_map(|r| (0..16).map(move |p| data_w(r, p)))
            .collect(),
    );
    let mut acc = GradAccumulator::default();
    let c = train_micro_batch(&m, &mb, plugin.as_ref(), ctx(), &mut acc, &device()).unwrap();
    let curve = Curve::default();
    let (mut tokens, mut wsum, mut wl, mut nonzero) = (0usize, 0.0, 0.0, 0.0);
    for (r, losses) in REF_LOSS.iter().enumerate() {
        for p in 1..16 {
            if mask(r, p) {
                let l = losses[p - 1];
                let w = curve.weight(l) * f64::from(data_w(r, p));
                tokens += 1;
                wsum += w;
                wl += w * l;
                if w * l != 0.0 {
                    nonzero += 1.0;
                }
            }
        }
    }
    assert_eq!((c.tokens, tokens), (14, 14));
    assert_eq!((c.nonzero, nonzero), (13.0, 13.0));
    assert!(
        (c.weight_sum - wsum).abs() < 1e-4,
        "{} vs {wsum}",
        c.weight_sum
    );
    assert!(
        (c.weighted_sum - wl).abs() / wl < 1e-5,
        "{} vs {wl}",
        c.weighted_sum
    );
    let den = |n: Normalize| n.denominator(c.tokens as f64, c.nonzero, c.weight_sum);
    assert_eq!(den(Normalize::Tokens), 14.0);
    assert_eq!(den(Normalize::Nonzero), 13.0);
    assert_eq!(den(Normalize::Weights), c.weight_sum);
    // The logged step loss under each normaliser, `sum(d w ce) / denominator`, by hand.
    for (n, d) in [
        (Normalize::Tokens, 14.0),
        (Normalize::Nonzero, 13.0),
        (Normalize::Weights, wsum),
    ] {
        assert!(
            (c.weighted_sum / den(n) - wl / d).abs() < 1e-4 * (wl / d),
            "{n:?}"
        );
    }

    // Weight 2 everywhere: twice the gradient of the unweighted batch.
    let plain = micro_batch(&[0, 1], mask);
    let mut doubled = plain.clone();
    doubled.weights = ytrainer_data::Weights(vec![2.0; 32]);
    let grads = |mb: &MicroBatch| {
        let mut acc = GradAccumulator::default();
        train_micro_batch(&m, mb, plugin.as_ref(), ctx(), &mut acc, &device()).unwrap();
        flat_grads(&acc, &m)
    };
    let (g1, g2) = (grads(&plain), grads(&doubled));
    let twice: Vec<f32> = g1.iter().map(|x| 2.0 * x).collect();
    assert!(rel_diff(&g2, &twice) < 1e-6, "{}", rel_diff(&g2, &twice));
    assert!(g1.iter().any(|x| *x != 0.0));
}

/// Gradient accumulation must not change the step: two micro-batches (row 0, then row 1) give the same
/// normalised gradient as one micro-batch of both rows, because the denominator is over the whole step.
#[test]
fn accumulated_step_equals_single_batch_step() {
    let m = model(&lora());
    let plugin = nlirg();
    let mask = |r: usize, p: usize| if r == 0 { p > 3 } else { !p.is_multiple_of(3) };
    let mut one = GradAccumulator::default();
    let c1 = train_micro_batch(
        &m,
        &micro_batch(&[0, 1], mask),
        plugin.as_ref(),
        ctx(),
        &mut one,
        &device(),
    )
    .unwrap();
    let mut two = GradAccumulator::default();
    let mut c2 = StepCounters::default();
    for r in [0usize, 1] {
        let c = train_micro_batch(
            &m,
            &micro_batch(&[r], mask),
            plugin.as_ref(),
            ctx(),
            &mut two,
            &device(),
        )
        .unwrap();
        c2.merge(&c);
    }
    assert_eq!(c1.tokens, c2.tokens);
    assert_eq!(c1.nonzero, c2.nonzero);
    for norm in [Normalize::Nonzero, Normalize::Tokens, Normalize::Weights] {
        let d1 = norm.denominator(c1.tokens as f64, c1.nonzero, c1.weight_sum);
        let d2 = norm.denominator(c2.tokens as f64, c2.nonzero, c2.weight_sum);
        let (g1, g2) = (one.global_norm(1.0 / d1), two.global_norm(1.0 / d2));
        assert!(((g1 - g2) / g1).abs() < 1e-4, "{norm:?}: {g1} vs {g2}");
        let (l1, l2) = (c1.weighted_sum / d1, c2.weighted_sum / d2);
        assert!(((l1 - l2) / l1).abs() < 1e-5, "{norm:?}: {l1} vs {l2}");
    }
    // and per-micro-batch averaging (the HF bug class) would differ:
    let per_mb = {
        let mut a = GradAccumulator::default();
        let c = train_micro_batch(
            &m,
            &micro_batch(&[0], mask),
            plugin.as_ref(),
            ctx(),
            &mut a,
            &device(),
        )
        .unwrap();
        a.global_norm(1.0 / c.tokens as f64)
    };
    assert!(per_mb > 0.0);
}

struct Bad(f32);
impl TokenReweighter for Bad {
    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }
    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        stats.loss.clone().mul_scalar(0.0).add_scalar(self.0)
    }
}

#[test]
fn plugin_returning_nan_or_negative_weights_is_an_error_naming_the_token() {
    let m = model(&lora());
    let mut acc = GradAccumulator::default();
    let mb = micro_batch(&[0], |_, _| true);
    let e = train_micro_batch(&m, &mb, &Bad(f32::NAN), ctx(), &mut acc, &device()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "loss plugin returned NaN for token 0: weights must be finite and >= 0"
    );
    let e = train_micro_batch(&m, &mb, &Bad(-1.0), ctx(), &mut acc, &device()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "loss plugin returned weight -1 for token 0: weights must be finite and >= 0"
    );
    assert!(
        acc.is_empty(),
        "a rejected micro-batch contributes no gradient"
    );
}

/// A model whose frozen base holds a NaN produces non-finite losses: every update is skipped and counted, the
/// adapter stays at its initial (finite) values, and the checkpoint holds no NaN.
#[test]
fn non_finite_loss_skips_the_update_and_never_reaches_a_checkpoint() {
    use ytrainer_core::burn::module::{Module, ModuleMapper, Param};
    struct Poison;
    impl ModuleMapper for Poison {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if p.val().is_require_grad() || D != 1 {
                return p;
            }
            p.map(|t| t.mul_scalar(f32::NAN))
        }
    }
    let m = model(&lora()).map(&mut Poison);
    let before = ytrainer_core::checkpoint::trainable_params(&m);
    let d = TempDir::new("nan");
    let examples: Vec<Example> = IDS
        .iter()
        .map(|ids| Example::single(ids.to_vec(), (0..16).map(|p| p > 0).collect(), None))
        .collect();
    let train = TrainSection {
        max_steps: 2,
        tokens_per_step: 15,
        ..TrainSection::default()
    };
    let plugin = nlirg();
    let batch = BatchOptions {
        tokens_per_step: 15,
        max_micro_batch_size: 1,
        ..BatchOptions::default()
    };
    let device = device();
    let setup = TrainSetup {
        run: LoopSetup {
            train: &train,
            seed: batch.seed,
            output_dir: d.path(),
            eval_every: 0,
            save_every: 1,
            save_total_limit: 0,
            resume: None,
            fingerprint: "x".into(),
            device: &device,
            dist: &ytrainer_core::dist::SINGLE,
            best: Default::default(),
        },
        batch,
        train_examples: &examples,
        eval_examples: &[],
        plugin: plugin.as_ref(),
        normalize: Normalize::Nonzero,
        zone_borders: [1.45, 6.6, 15.0],
    };
    let (m, summary) = sft::train(m, &setup, &mut Silent).unwrap();
    assert_eq!(summary.steps, 2);
    assert_eq!(summary.skipped_steps, 2);
    let metrics = jsonl(&d.path().join("metrics.jsonl"));
    assert!(metrics.iter().all(|l| l["skipped"] == true));
    assert_eq!(
        ytrainer_core::checkpoint::trainable_params(&m),
        before,
        "adapter untouched"
    );
    let saved = ytrainer_core::checkpoint::read_safetensors(
        &d.path().join("checkpoint-2/trainable.safetensors"),
    )
    .unwrap();
    assert!(saved.values().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    let _ = tensor_to_vec;
}

/// `(param id, module path)` of every float parameter.
fn param_paths<M: ytrainer_core::burn::module::Module>(
    m: &M,
) -> Vec<(ytrainer_core::burn::module::ParamId, String)> {
    use ytrainer_core::burn::module::{ModuleVisitor, Param};
    struct V(
        Vec<String>,
        Vec<(ytrainer_core::burn::module::ParamId, String)>,
    );
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.1.push((p.id, self.0.join(".")));
        }
    }
    let mut v = V(Vec::new(), Vec::new());
    m.visit(&mut v);
    v.1
}

/// The trainer's step (closed-form LM head + CE, tied embeddings) reproduces transformers' gradient norms of
/// every parameter for the mean CE of the reference batch.
/// Also with gradient checkpointing: the step's recomputing backward pass gives the same gradients.
#[test]
fn training_step_gradients_match_transformers() {
    for recompute in [false, true] {
        training_step_gradients_match_transformers_with(recompute);
    }
}

fn training_step_gradients_match_transformers_with(recompute: bool) {
    let norms = reference::reference_grad_norms();
    let m = model(&AdapterSpec::Full).with_gradient_checkpointing(recompute);
    assert!(
        ytrainer_core::model::CausalLm::lm_head_weight(&m).is_some(),
        "the fused head path is in use"
    );
    let ce = match Registry::discover()
        .build("ce", &BTreeMap::new())
        .unwrap()
        .0
    {
        LossFn::Token(p) => p,
        LossFn::Pairwise(_) => unreachable!(),
    };
    let mut acc = GradAccumulator::default();
    let c = train_micro_batch(
        &m,
        &micro_batch(&[0, 1], |_, _| true),
        ce.as_ref(),
        ctx(),
        &mut acc,
        &device(),
    )
    .unwrap();
    assert_eq!(c.tokens, 30);
    let mut checked = 0;
    for (id, path) in param_paths(&m) {
        let hf = format!("model.{path}");
        let Some(&want) = norms.get(&hf) else {
            continue;
        };
        let g = acc
            .get(&id)
            .unwrap_or_else(|| panic!("no gradient for {path}"));
        let got = g.clone().powi_scalar(2).sum().sqrt().into_scalar::<f32>() as f64 / 30.0;
        assert!(
            ((got - want) / want).abs() < 1e-4,
            "{hf} (gradient checkpointing {recompute}): {got} vs transformers {want}"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        norms.len(),
        "every parameter of grad_norms was checked"
    );
}

/// The same micro-batch gives bit-identical gradients every time: no reduction's order depends on how rayon
/// happened to split the work (RMSNorm weights and biases sum over rows; with rayon's `fold` + `reduce` this
/// failed on every run).
#[test]
fn gradients_are_bit_identical_from_run_to_run() {
    let m = model(&AdapterSpec::Full);
    let ce = match Registry::discover()
        .build("ce", &BTreeMap::new())
        .unwrap()
        .0
    {
        LossFn::Token(p) => p,
        LossFn::Pairwise(_) => unreachable!(),
    };
    // 64 rows of 16 tokens: 1024 rows for each norm and bias to sum, in dozens of tasks.
    let rows: Vec<usize> = (0..64).map(|i| i % 2).collect();
    let grads = || {
        let mut acc = GradAccumulator::default();
        train_micro_batch(
            &m,
            &micro_batch(&rows, |_, _| true),
            ce.as_ref(),
            ctx(),
            &mut acc,
            &device(),
        )
        .unwrap();
        param_paths(&m)
            .into_iter()
            .map(|(id, path)| {
                let g = acc.get(&id).expect("gradient").clone();
                (path, tensor_to_vec(g))
            })
            .collect::<Vec<_>>()
    };
    let first = grads();
    for _ in 0..6 {
        for ((path, a), (_, b)) in first.iter().zip(grads()) {
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{path}: gradients differ between identical runs"
            );
        }
    }
}

/// A micro-batch whose logits exceed the head's chunk runs the head chunk by chunk (statistics first, then each
/// chunk's logits again for the gradient) and gives the same counters and gradients as the whole head, for a
/// trainable (full fine-tuning) head and for a plugin that reads the top-k entropy of the logits.
#[test]
fn chunked_head_gives_the_whole_head_gradients() {
    for (adapter, loss) in [(AdapterSpec::Full, "nlirg"), (lora(), "eaft")] {
        let m = model(&adapter);
        let plugin = match Registry::discover()
            .build(loss, &BTreeMap::new())
            .unwrap()
            .0
        {
            LossFn::Token(p) => p,
            LossFn::Pairwise(_) => unreachable!(),
        };
        let mask = |r: usize, p: usize| if r == 0 { p > 2 } else { !p.is_multiple_of(3) };
        let run = |floats: usize| {
            let mut acc = GradAccumulator::default();
            let c = ytrainer_core::step::with_head_chunk_floats(floats, || {
                train_micro_batch(
                    &m,
                    &micro_batch(&[0, 1], mask),
                    plugin.as_ref(),
                    ctx(),
                    &mut acc,
                    &device(),
                )
                .unwrap()
            });
            (c, acc)
        };
        let vocab = ytrainer_core::model::CausalLm::vocab_size(&m);
        let (whole, g_whole) = run(usize::MAX);
        // 4 rows per chunk: the last chunk is partial.
        let (chunked, g_chunked) = run(4 * vocab);
        assert!(
            whole.tokens > 8 && whole.tokens % 4 != 0,
            "{}",
            whole.tokens
        );
        assert_eq!(whole.tokens, chunked.tokens);
        assert_eq!(whole.correct, chunked.correct);
        assert_eq!(whole.ce_sum, chunked.ce_sum, "{loss}");
        assert!(
            (whole.weighted_sum - chunked.weighted_sum).abs() <= 1e-6 * whole.weighted_sum.abs()
        );
        let params = ytrainer_core::checkpoint::trainable_params(&m);
        assert!(!params.is_empty());
        let (a, b) = (g_whole.global_norm(1.0), g_chunked.global_norm(1.0));
        assert!(a > 0.0 && ((a - b) / a).abs() < 1e-5, "{loss}: {a} vs {b}");
    }
}

/// ASFT's KL anchor (`asft`, `TokenReweighter::kl_anchor`): the trainer's loss value and gradients of
/// `sum_i sg(p_i) ce_i + alpha sum_i KL(p_ref(.|i) || p(.|i))` equal the formula differentiated by autodiff on the
/// model's own log-probabilities (reference: the base, adapters off), on the whole host head and on the chunked
/// head; and the anchor does change the gradient (the LoRA weights are nudged so the policy is not the base).
#[test]
fn asft_kl_anchor_matches_autodiff_on_the_whole_and_chunked_head() {
    use ytrainer_core::burn::module::{Module, ModuleMapper, Param};
    use ytrainer_core::model::CausalLm;
    use ytrainer_core::step::{target_log_probs, to_device, token_ce};
    struct Nudge;
    impl ModuleMapper for Nudge {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !p.val().is_require_grad() {
                return p;
            }
            p.map(|t| {
                let d = t.device();
                Tensor::from_data(t.detach().add_scalar(0.05).into_data(), &d).require_grad()
            })
        }
    }
    let m = model(&lora()).map(&mut Nudge);
    let alpha = 0.5;
    let build = |name: &str, params: &[(&str, f64)]| {
        let p: BTreeMap<String, f64> = params.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        match Registry::discover().build(name, &p).unwrap().0 {
            LossFn::Token(p) => p,
            LossFn::Pairwise(_) => unreachable!(),
        }
    };
    let asft = build("asft", &[("alpha", alpha)]);
    let dft = build("dft", &[]);
    let mask = |r: usize, p: usize| if r == 0 { p > 2 } else { !p.is_multiple_of(3) };
    let mb = micro_batch(&[0, 1], mask);
    let dev = device();
    let run = |plugin: &dyn TokenReweighter, floats: usize| {
        let mut acc = GradAccumulator::default();
        let c = ytrainer_core::step::with_head_chunk_floats(floats, || {
            train_micro_batch(&m, &mb, plugin, ctx(), &mut acc, &dev).unwrap()
        });
        (c, flat_grads(&acc, &m))
    };

    // The formula, by autodiff through the model's log-probabilities.
    let batch = to_device(&mb, &dev);
    let lp = target_log_probs(&m, &batch);
    let rlp = m
        .adapters_disabled(|b| target_log_probs(b, &batch).detach())
        .unwrap();
    let ce = token_ce(lp.clone(), batch.targets.clone());
    let p = ce.clone().detach().neg().exp();
    let kl = rlp.clone().exp().mul(rlp.sub(lp)).sum();
    let kl_value = f64::from(kl.clone().detach().into_scalar::<f32>());
    let loss = ce.mul(p).sum().add(kl.mul_scalar(alpha));
    let value = f64::from(loss.clone().detach().into_scalar::<f32>());
    let mut g = loss.backward();
    let mut acc = GradAccumulator::default();
    acc.accumulate(&m, &mut g);
    let want = flat_grads(&acc, &m);
    assert!(
        kl_value > 1e-3,
        "the nudge must move the policy off the base: KL {kl_value}"
    );

    let vocab = CausalLm::vocab_size(&m);
    for floats in [usize::MAX, 4 * vocab] {
        let (c, got) = run(asft.as_ref(), floats);
        assert!(
            (c.weighted_sum - value).abs() <= 1e-5 * value.abs(),
            "chunk {floats}: {} vs {value}",
            c.weighted_sum
        );
        let d = rel_diff(&got, &want);
        assert!(d < 1e-4, "chunk {floats}: relative gradient difference {d}");
    }
    // Without the anchor (plain dft) the gradient is visibly different.
    let (c, plain) = run(dft.as_ref(), usize::MAX);
    assert!((value - c.weighted_sum - alpha * kl_value).abs() <= 1e-5 * value.abs());
    assert!(
        rel_diff(&plain, &want) > 1e-3,
        "{}",
        rel_diff(&plain, &want)
    );
}

/// Every trainable parameter's accumulated gradient, flattened in the model's parameter order.
fn flat_grads(acc: &GradAccumulator, m: &Decoder) -> Vec<f32> {
    use ytrainer_core::burn::module::{Module, ModuleVisitor, Param};
    struct Ids(Vec<(ytrainer_core::burn::module::ParamId, usize)>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if p.is_require_grad() {
                self.0.push((p.id, p.val().shape().num_elements()));
            }
        }
    }
    let mut ids = Ids(Vec::new());
    m.visit(&mut ids);
    let mut out = Vec::new();
    for (id, n) in ids.0 {
        match acc.get(&id) {
            Some(g) => out.extend(tensor_to_vec(g.clone())),
            None => out.extend(std::iter::repeat_n(0.0, n)),
        }
    }
    out
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (f64::from(*x) - f64::from(*y)).powi(2);
        n += f64::from(*y).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

/// The data-parallel seam without a transport: a step's micro-batches split over two "ranks" (`Shard`), their
/// tallies and gradients summed, gives the single-process step (normaliser, loss, gradient); normalising on each
/// rank and averaging, what a per-rank normaliser does, is visibly wrong here because the ranks hold very
/// different numbers of supervised tokens (15 + 7 against 3).
#[test]
fn a_step_split_over_ranks_equals_the_whole_step_and_a_per_rank_normaliser_would_not() {
    use ytrainer_core::dist::{Shard, Tally};
    use ytrainer_core::sft::TokenObjective;
    use ytrainer_core::trainer::{Objective, StepAt, StepOutcome};

    let m = model(&AdapterSpec::Full);
    let examples = vec![
        Example::single(IDS[0].to_vec(), (0..16).map(|p| p > 0).collect(), None),
        Example::single(IDS[1].to_vec(), (0..16).map(|p| p >= 13).collect(), None),
        Example::single(IDS[1][..8].to_vec(), (0..8).map(|p| p > 0).collect(), None),
    ];
    let train = TrainSection::default();
    let batch = BatchOptions {
        shuffle: false,
        tokens_per_step: 1000,
        max_micro_batch_size: 1,
        ..BatchOptions::default()
    };
    let device = device();
    let d = TempDir::new("shards");
    let plugin = nlirg();
    let setup = TrainSetup {
        run: LoopSetup {
            train: &train,
            seed: 7,
            output_dir: d.path(),
            eval_every: 0,
            save_every: 0,
            save_total_limit: 0,
            resume: None,
            fingerprint: "x".into(),
            device: &device,
            dist: &ytrainer_core::dist::SINGLE,
            best: Default::default(),
        },
        batch,
        train_examples: &examples,
        eval_examples: &[],
        plugin: plugin.as_ref(),
        normalize: Normalize::Tokens,
        zone_borders: [1.45, 6.6, 15.0],
    };
    let obj = TokenObjective::new(&setup);
    let plan = Objective::<Decoder>::plan(&obj).unwrap();
    assert_eq!(plan.len(), 1);
    let step = &plan[0].1;
    assert_eq!(step.micro_batches.len(), 3, "one micro-batch per example");
    let at = |shard| StepAt {
        index: 0,
        total: 1,
        epoch: 0,
        seed: 7,
        shard,
    };
    let outcome = |at| StepOutcome {
        at,
        lr: 0.0,
        grad_norm: 0.0,
        skipped: false,
        seconds: 1.0,
    };

    let mut g_all = GradAccumulator::default();
    let whole = Objective::<Decoder>::conclude(
        &obj,
        obj.accumulate(&m, step, at(Shard::ALL), &mut g_all)
            .unwrap(),
    );
    let whole_loss = Objective::<Decoder>::metrics(&obj, &whole, &outcome(at(Shard::ALL))).loss;
    let want = flat_grads(&g_all, &m);

    let mut grads = Vec::new();
    let mut tallies = Vec::new();
    for rank in 0..2 {
        let shard = Shard { rank, world: 2 };
        let mut g = GradAccumulator::default();
        tallies.push(obj.accumulate(&m, step, at(shard), &mut g).unwrap());
        grads.push(flat_grads(&g, &m));
    }
    let sums: Vec<f64> = tallies[0]
        .to_sums()
        .iter()
        .zip(tallies[1].to_sums())
        .map(|(a, b)| a + b)
        .collect();
    let per_rank: Vec<_> = tallies
        .into_iter()
        .map(|t| Objective::<Decoder>::conclude(&obj, t))
        .collect();
    assert_eq!(
        per_rank.iter().map(|a| a.tokens).collect::<Vec<_>>(),
        [15 + 7, 3],
        "rank 0 runs micro-batches 0 and 2, rank 1 micro-batch 1"
    );

    // Data-parallel: tallies and gradients summed over the ranks, then the step's own normaliser.
    let mut global = Objective::<Decoder>::accumulate(
        &obj,
        &m,
        step,
        at(Shard { rank: 5, world: 6 }),
        &mut GradAccumulator::default(),
    )
    .unwrap();
    global.set_sums(&sums);
    let global = Objective::<Decoder>::conclude(&obj, global);
    assert_eq!(global.tokens, whole.tokens);
    assert!((global.scale - whole.scale).abs() <= 1e-12 * whole.scale.abs());
    let loss = Objective::<Decoder>::metrics(&obj, &global, &outcome(at(Shard::ALL))).loss;
    assert!(
        (loss - whole_loss).abs() <= 1e-6 * whole_loss.abs(),
        "{loss} vs {whole_loss}"
    );
    let summed: Vec<f32> = grads[0].iter().zip(&grads[1]).map(|(a, b)| a + b).collect();
    let scaled =
        |v: &[f32], s: f64| -> Vec<f32> { v.iter().map(|x| (f64::from(*x) * s) as f32).collect() };
    let want = scaled(&want, whole.scale);
    let got = scaled(&summed, global.scale);
    assert!(rel_diff(&got, &want) < 1e-5, "{}", rel_diff(&got, &want));

    // A per-rank normaliser (each rank divides by its own tokens, the ranks average): another gradient and loss.
    let averaged: Vec<f32> = scaled(&grads[0], per_rank[0].scale)
        .iter()
        .zip(scaled(&grads[1], per_rank[1].scale))
        .map(|(a, b)| (a + b) / 2.0)
        .collect();
    assert!(
        rel_diff(&averaged, &want) > 0.05,
        "a per-rank normaliser should differ here, got {}",
        rel_diff(&averaged, &want)
    );
    let rank_losses: Vec<f64> = per_rank
        .iter()
        .map(|a| Objective::<Decoder>::metrics(&obj, a, &outcome(at(Shard::ALL))).loss)
        .collect();
    let mean_of_means = (rank_losses[0] + rank_losses[1]) / 2.0;
    assert!(
        (mean_of_means - whole_loss).abs() > 1e-3,
        "{mean_of_means} vs {whole_loss}"
    );
}

/// A token objective whose evaluations report scripted values (`eval_loss = script[step]`): training is real
/// (the adapter changes every step), so the best step and what must be kept of it are known by construction.
struct Scripted<'a> {
    inner: sft::TokenObjective<'a>,
    script: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct ScriptedEval {
    step: usize,
    eval_loss: f64,
    eval_token_accuracy: f64,
}

impl ytrainer_core::trainer::EvalLine for ScriptedEval {
    fn step(&self) -> usize {
        self.step
    }
    fn summary(&self) -> String {
        format!("scripted {}", self.eval_loss)
    }
}

impl ytrainer_core::trainer::Objective<Decoder> for Scripted<'_> {
    type Unit = ytrainer_data::Step;
    type Tally = sft::TokenTally;
    type EvalTally = StepCounters;
    type Metrics = sft::StepMetrics;
    type Eval = ScriptedEval;
    fn plan(&self) -> Result<Vec<(usize, Self::Unit)>, ytrainer_core::trainer::TrainError> {
        <sft::TokenObjective as ytrainer_core::trainer::Objective<Decoder>>::plan(&self.inner)
    }
    fn accumulate(
        &self,
        model: &Decoder,
        unit: &Self::Unit,
        at: ytrainer_core::trainer::StepAt,
        grads: &mut GradAccumulator,
    ) -> Result<Self::Tally, ytrainer_core::trainer::TrainError> {
        self.inner.accumulate(model, unit, at, grads)
    }
    fn conclude(&self, t: Self::Tally) -> ytrainer_core::trainer::Accumulated<Self::Tally> {
        <sft::TokenObjective as ytrainer_core::trainer::Objective<Decoder>>::conclude(
            &self.inner,
            t,
        )
    }
    fn metrics(
        &self,
        acc: &ytrainer_core::trainer::Accumulated<Self::Tally>,
        o: &ytrainer_core::trainer::StepOutcome,
    ) -> Self::Metrics {
        <sft::TokenObjective as ytrainer_core::trainer::Objective<Decoder>>::metrics(
            &self.inner,
            acc,
            o,
        )
    }
    fn evaluate(
        &self,
        model: &Decoder,
        step: usize,
        shard: ytrainer_core::dist::Shard,
    ) -> Result<Option<StepCounters>, ytrainer_core::trainer::TrainError> {
        self.inner.evaluate(model, step, shard)
    }
    fn eval_line(&self, _: &StepCounters, step: usize) -> ScriptedEval {
        ScriptedEval {
            step,
            eval_loss: self.script[step],
            eval_token_accuracy: 1.0 - self.script[step] / 10.0,
        }
    }
}

/// Runs the scripted objective for up to 8 steps (one example a step, eval every step) in `dir`.
fn scripted_run(
    dir: &std::path::Path,
    script: &[f64],
    best: ytrainer_core::trainer::BestModel,
    save_total_limit: usize,
    resume: Option<std::path::PathBuf>,
) -> Result<
    (
        Decoder,
        ytrainer_core::trainer::LoopReport<sft::StepMetrics, ScriptedEval>,
    ),
    ytrainer_core::trainer::TrainError,
> {
    let examples: Vec<Example> = IDS
        .iter()
        .map(|ids| Example::single(ids.to_vec(), (0..16).map(|p| p > 0).collect(), None))
        .collect();
    let train = TrainSection {
        epochs: 4,
        learning_rate: 1e-2,
        warmup_ratio: 0.0,
        lr_scheduler: ytrainer_core::optim::Schedule::Constant,
        ..TrainSection::default()
    };
    let plugin = nlirg();
    let batch = BatchOptions {
        tokens_per_step: 15,
        max_micro_batch_size: 1,
        ..BatchOptions::default()
    };
    let device = device();
    let setup = TrainSetup {
        run: LoopSetup {
            train: &train,
            seed: batch.seed,
            output_dir: dir,
            eval_every: 1,
            save_every: 0,
            save_total_limit,
            resume,
            fingerprint: "x".into(),
            device: &device,
            dist: &ytrainer_core::dist::SINGLE,
            best,
        },
        batch,
        train_examples: &examples,
        eval_examples: &examples[..1],
        plugin: plugin.as_ref(),
        normalize: Normalize::Nonzero,
        zone_borders: [1.45, 6.6, 15.0],
    };
    let objective = Scripted {
        inner: sft::TokenObjective::new(&setup),
        script: script.to_vec(),
    };
    ytrainer_core::trainer::train(model(&lora()), &objective, &setup.run, &mut Silent)
}

fn dir_names(d: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort();
    v
}

/// Early stopping with patience 2 ends the run two evaluations after the best one (step 2: 3.0, 2.0, then 2.1
/// and 2.05 do not improve); with `load_best_model_at_end` every improving evaluation is checkpointed, the best
/// checkpoint survives `save_total_limit = 1` beside the last one, and the model handed back holds the best
/// step's weights (not the last step's), re-evaluated to the best value. Resuming the stopped run trains nothing.
#[test]
fn early_stopping_keeps_and_hands_back_the_best_checkpoint() {
    use ytrainer_core::trainer::BestModel;
    let d = TempDir::new("best");
    // Index = step; step 0 is the evaluation before training, which never counts as the best.
    let script = [0.5, 3.0, 2.0, 2.1, 2.05, 1.0, 1.0, 1.0, 1.0];
    let best = BestModel {
        patience: 2,
        load_best_at_end: true,
        ..BestModel::default()
    };
    let (m, r) = scripted_run(d.path(), &script, best.clone(), 1, None).unwrap();
    assert_eq!(r.steps, 4, "stopped after step 4 of 8");
    assert_eq!(r.stopped_early_at, Some(4));
    let b = r.best.clone().unwrap();
    assert_eq!((b.step, b.metric.as_str(), b.value), (2, "eval_loss", 2.0));
    assert_eq!(
        b.checkpoint.as_deref(),
        Some(d.path().join("checkpoint-2").as_path())
    );
    assert!(r.loaded_best);
    assert_eq!(r.eval_after.as_ref().unwrap().eval_loss, 2.0);
    // checkpoint-1 (improving, then superseded) is pruned; the best and the newest stay.
    assert_eq!(dir_names(d.path()), ["checkpoint-2", "checkpoint-4"]);
    let read = |n: &str| {
        ytrainer_core::checkpoint::read_safetensors(&d.path().join(n).join("trainable.safetensors"))
            .unwrap()
    };
    let held = ytrainer_core::checkpoint::trainable_params(&m);
    assert_eq!(held, read("checkpoint-2"), "the best step's weights");
    assert_ne!(held, read("checkpoint-4"), "not the last step's");
    let evals: Vec<u64> = jsonl(&d.path().join("eval.jsonl"))
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 1, 2, 3, 4]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("checkpoint-4/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["trainer"]["best"]["step"], 2);
    assert_eq!(state["trainer"]["evals_without_improvement"], 2);
    // Resuming the stopped run: nothing left to train, and it still hands back the best.
    let (m2, r2) = scripted_run(
        d.path(),
        &script,
        best,
        1,
        Some(d.path().join("checkpoint-4")),
    )
    .unwrap();
    assert_eq!((r2.steps, r2.stopped_early_at), (4, Some(4)));
    assert_eq!(ytrainer_core::checkpoint::trainable_params(&m2), held);
}

/// Without early stopping the run goes to its end; the best evaluation is recorded but, without
/// `load_best_model_at_end`, only the checkpoints written anyway exist and the last model is handed back.
/// A larger-is-better metric picks the maximum, and a metric evaluations lack is named before training.
#[test]
fn the_best_metric_is_tracked_by_key_and_direction() {
    use ytrainer_core::trainer::BestModel;
    let d = TempDir::new("best-acc");
    let script = [5.0, 3.0, 2.0, 2.1, 2.05, 1.0, 1.5, 4.0, 3.0];
    // eval_token_accuracy = 1 - loss / 10: best at the lowest loss, step 5 (0.9).
    let best = BestModel {
        metric: "eval_token_accuracy".into(),
        greater_is_better: true,
        ..BestModel::default()
    };
    let (_, r) = scripted_run(d.path(), &script, best, 2, None).unwrap();
    assert_eq!(
        (r.steps, r.stopped_early_at, r.loaded_best),
        (8, None, false)
    );
    let b = r.best.unwrap();
    assert_eq!((b.step, b.value, b.checkpoint), (5, 0.9, None));
    assert_eq!(dir_names(d.path()), ["checkpoint-8"]);

    let d = TempDir::new("best-bad");
    let bad = BestModel {
        metric: "eval_bleu".into(),
        ..BestModel::default()
    };
    let e = scripted_run(d.path(), &script, bad, 2, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "[eval] metric_for_best_model = \"eval_bleu\": the evaluations of this run have no numeric field \
         `eval_bleu`; choose one of: eval_loss, eval_token_accuracy"
    );
    assert!(
        !d.path().join("metrics.jsonl").exists()
            || jsonl(&d.path().join("metrics.jsonl")).is_empty()
    );
}

/// Per-token CE of every target of `mb`, keyed by (example, position in the example) through `members` (the
/// examples each row holds, in order; one example per row when unpacked).
fn keyed_token_ce(
    m: &Decoder,
    mb: &MicroBatch,
    examples: &[Example],
    members: &[Vec<usize>],
) -> Vec<((usize, usize), f32)> {
    use ytrainer_core::step::{target_log_probs, to_device, token_ce};
    let b = to_device(mb, &device());
    let ce = tensor_to_vec(token_ce(target_log_probs(m, &b), b.targets.clone()));
    let mut keys = Vec::new();
    for (r, &row) in mb.examples.iter().enumerate() {
        let mut at = 0;
        for &e in &members[row] {
            for p in 0..examples[e].len() {
                if mb.target_mask[r * mb.seq + at + p] {
                    keys.push((e, p));
                }
            }
            at += examples[e].len();
        }
    }
    let mut v: Vec<((usize, usize), f32)> = keys.into_iter().zip(ce).collect();
    v.sort_by_key(|x| x.0);
    v
}

/// Sample packing changes no token's loss: five examples (lengths 16, 9, 7, 12, 4) packed into rows of 24
/// (segments, restarting positions) give every supervised token the CE it has unpacked, and a LoRA step the same
/// gradient; the packed micro-batch holds 3 rows x 23 instead of 5 x 16 padded tokens.
#[test]
fn packed_rows_give_every_token_its_unpacked_loss_and_gradient() {
    let cut = |r: usize, from: usize, len: usize| {
        let ids = IDS[r][from..from + len].to_vec();
        Example::single(ids, (0..len).map(|p| p >= len / 3).collect(), None)
    };
    let examples = vec![
        cut(0, 0, 16),
        cut(1, 0, 9),
        cut(1, 7, 7),
        cut(0, 4, 12),
        cut(1, 3, 4),
    ];
    let (rows, members) = ytrainer_data::pack_examples(&examples, 24);
    // Best-fit decreasing: 16 + 7, 12 + 9, 4.
    assert_eq!(members, [vec![0, 2], vec![3, 1], vec![4]]);
    let opts = BatchOptions {
        shuffle: false,
        micro_batch_tokens: 1 << 20,
        tokens_per_step: 1 << 20,
        ..BatchOptions::default()
    };
    let one_mb = |ex: &[Example]| {
        let s = ytrainer_data::plan_epoch(ex, &opts, 0).unwrap();
        assert_eq!((s.len(), s[0].micro_batches.len()), (1, 1));
        s[0].micro_batches[0].clone()
    };
    let (plain, packed) = (one_mb(&examples), one_mb(&rows));
    assert_eq!((plain.batch, plain.seq), (5, 16));
    assert_eq!((packed.batch, packed.seq), (3, 23));
    let single: Vec<Vec<usize>> = (0..examples.len()).map(|i| vec![i]).collect();
    let m = model(&lora());
    let a = keyed_token_ce(&m, &plain, &examples, &single);
    let b = keyed_token_ce(&m, &packed, &examples, &members);
    assert_eq!(
        a.len(),
        examples.iter().map(Example::num_targets).sum::<usize>()
    );
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x.1 - y.1).abs())
        .fold(0f32, f32::max);
    println!("packed vs unpacked: largest per-token CE difference {worst:e}");
    assert!(worst < 2e-5, "largest per-token CE difference {worst}");
    // Cross-segment attention would change the losses of the second segment of each row by far more.
    let mut leaky = packed.clone();
    leaky.segment_ids.iter_mut().for_each(|s| *s = (*s).min(1));
    leaky.position_ids = (0..leaky.batch).flat_map(|_| 0..leaky.seq as u32).collect();
    let c = keyed_token_ce(&m, &leaky, &examples, &members);
    let leak = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x.1 - y.1).abs())
        .fold(0f32, f32::max);
    assert!(
        leak > 1e-2,
        "a packed row without segments should differ: {leak}"
    );
    // The same gradient from a training step.
    let plugin = nlirg();
    let (mut ga, mut gb) = (GradAccumulator::default(), GradAccumulator::default());
    train_micro_batch(&m, &plain, plugin.as_ref(), ctx(), &mut ga, &device()).unwrap();
    train_micro_batch(&m, &packed, plugin.as_ref(), ctx(), &mut gb, &device()).unwrap();
    let d = rel_diff(&flat_grads(&gb, &m), &flat_grads(&ga, &m));
    println!(
        "packed vs unpacked: LoRA gradient relative difference {d:e}; without segments CE moves by {leak}"
    );
    assert!(d < 1e-5, "gradient relative difference {d}");
}

/// NEFTune: the noise is uniform in `[-m, m]` with `m = alpha / sqrt(T * H)` (5 / sqrt(16 * 64) here: every
/// draw inside, the extremes near m, mean near 0), changes the training forward pass's losses, and leaves the
/// plain (evaluation) device and a forward pass with adapters off untouched.
#[test]
fn neftune_noise_has_trls_scale_and_only_touches_training() {
    let device = device();
    let x: Tensor<3> = Tensor::zeros([2, 16, 64], &device);
    device.seed(3);
    let noise =
        tensor_to_vec(ytrainer_models::decoder::neftune(x.clone(), 5.0).reshape([2 * 16 * 64]));
    let m = 5.0 / (16.0f32 * 64.0).sqrt();
    let max = noise.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let mean = noise.iter().sum::<f32>() / noise.len() as f32;
    assert!(max <= m && max > 0.99 * m, "max |noise| {max} vs m {m}");
    assert!(mean.abs() < 0.05 * m, "mean {mean}");
    let plain: Tensor<3> = Tensor::zeros([2, 16, 64], &device.clone().inner());
    let same = tensor_to_vec(ytrainer_models::decoder::neftune(plain, 5.0).reshape([2 * 16 * 64]));
    assert!(
        same.iter().all(|&v| v == 0.0),
        "no noise off the training device"
    );
    let off = ytrainer_models::lora::without_adapters(|| {
        tensor_to_vec(ytrainer_models::decoder::neftune(x, 5.0).reshape([2 * 16 * 64]))
    });
    assert!(off.iter().all(|&v| v == 0.0), "no noise with adapters off");

    let mb = micro_batch(&[0, 1], |_, _| true);
    let ce = |m: &Decoder| {
        use ytrainer_core::step::{target_log_probs, to_device, token_ce};
        let b = to_device(&mb, &device);
        tensor_to_vec(token_ce(target_log_probs(m, &b), b.targets.clone()))
    };
    let mut m = model(&lora());
    let clean = ce(&m);
    m.neftune_alpha = 5.0;
    let noisy = ce(&m);
    assert!(
        clean.iter().zip(&noisy).any(|(a, b)| (a - b).abs() > 1e-4),
        "the training forward pass sees the noise"
    );
    let examples: Vec<Example> = IDS
        .iter()
        .map(|ids| Example::single(ids.to_vec(), vec![true; 16], None))
        .collect();
    let eval = |m: &Decoder| {
        sft::evaluate(
            m,
            &examples,
            &BatchOptions::default(),
            [1.45, 6.6, 15.0],
            &device,
            0,
        )
        .unwrap()
        .eval_loss
    };
    let with = eval(&m);
    m.neftune_alpha = 0.0;
    assert_eq!(with, eval(&m), "evaluation is noise-free");
}
