//! AdamW with decoupled weight decay, gradient accumulation across micro-batches, global-norm clipping and
//! learning-rate schedules.
//!
//! Written here rather than taken from `burn-optim` because the trainer needs three things Burn's optimizer does
//! not give: clipping by the global norm over all parameters (Burn's `Norm` clipping is per tensor), no weight
//! decay on norms and biases, and optimizer state keyed by parameter *path* so a checkpoint can be restored into
//! a freshly loaded model (whose `ParamId`s are new) and continue bit-for-bit.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::Gradients;
use serde::{Deserialize, Serialize};
#[cfg(test)]
use ytrainer_kernels::host::host_f32;
use ytrainer_kernels::host::{AdamWConsts, Moments, host_add, host_add_rows};

/// AdamW hyper-parameters (PyTorch semantics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay, applied as `p *= 1 - lr * wd` (skipped for norms and biases).
    pub weight_decay: f64,
    /// LoRA+ (Hayou et al. 2024): the learning rate of every `lora_b` matrix (and DoRA `lora_magnitude` vector,
    /// as PEFT groups them) is this times the step's (its decay too); 1 = plain LoRA.
    #[serde(default = "one")]
    pub lora_b_lr_ratio: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            lora_b_lr_ratio: 1.0,
        }
    }
}

/// Norm weights and biases are not decayed: shrinking a norm's gain towards 0 changes what the layer computes
/// rather than regularising it (the HF / TRL default).
pub fn decays(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    !(path.contains("norm") || last == "bias" || last.ends_with("_bias"))
}

/// Gradients summed over the micro-batches of one optimizer step, keyed by parameter.
#[derive(Default)]
pub struct GradAccumulator {
    grads: HashMap<ParamId, Tensor<1>>,
}

impl GradAccumulator {
    /// Adds the gradients of one backward pass for every trainable parameter of `model`.
    pub fn accumulate<M: Module>(&mut self, model: &M, grads: &mut Gradients) {
        struct Collect<'a> {
            grads: &'a mut Gradients,
            found: Vec<(ParamId, Tensor<1>)>,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if !param.is_require_grad() {
                    return;
                }
                if let Some(g) = param.val().grad_remove(self.grads) {
                    let n = g.shape().num_elements();
                    self.found.push((param.id, g.reshape([n])));
                }
            }
        }
        let mut c = Collect {
            grads,
            found: Vec::new(),
        };
        model.visit(&mut c);
        for (id, g) in c.found {
            self.add(id, g);
        }
    }

    /// Adds `rows[i]` to row `ids[i]` of parameter `id` (`[rows, cols]` = `shape`), in place when the parameter
    /// already has a gradient (see [`crate::model::GradSink::rows`]).
    pub fn add_rows(
        &mut self,
        id: ParamId,
        ids: Tensor<1, Int>,
        rows: Tensor<2>,
        [r, c]: [usize; 2],
    ) {
        let prev = self.grads.remove(&id);
        let sum = match host_add_rows(prev, &ids, rows, [r, c]) {
            Ok(sum) => sum,
            Err((prev, rows)) => {
                let base = match prev {
                    Some(prev) => prev.reshape([r, c]),
                    None => Tensor::zeros([r, c], &rows.device()),
                };
                base.select_assign(0, ids, rows, burn::tensor::IndexingUpdateOp::Add)
                    .reshape([r * c])
            }
        };
        self.grads.insert(id, sum);
    }

    /// Adds a gradient computed outside autodiff (the LM head's, see [`crate::lm_loss`]) to parameter `id`.
    pub fn add<const D: usize>(&mut self, id: ParamId, grad: Tensor<D>) {
        let n = grad.shape().num_elements();
        let g = grad.reshape([n]);
        let sum = match self.grads.remove(&id) {
            Some(prev) => host_add(prev, g),
            None => g,
        };
        self.grads.insert(id, sum);
    }

    /// Global L2 norm of the accumulated gradients after multiplying them by `scale`. Squares are summed in f64
    /// (in fixed chunks, so the result does not depend on the thread count): an f32 sum over a large tensor is
    /// off by ~1e-5, enough to move the clipping factor.
    pub fn global_norm(&self, scale: f64) -> f64 {
        use rayon::prelude::*;
        let mut sq = 0.0f64;
        for g in self.grads.values() {
            sq += match ytrainer_kernels::host::host_f32(g) {
                Some(f) => {
                    let v = f.as_slice::<f32>().expect("f32, checked by host_f32");
                    let parts: Vec<f64> = v.par_chunks(1 << 16).map(sum_sq_f64).collect();
                    parts.iter().sum::<f64>()
                }
                None => {
                    let s: f32 = g.clone().powi_scalar(2).sum().into_scalar::<f32>();
                    s as f64
                }
            };
        }
        sq.sqrt() * scale.abs()
    }

    /// Sums the accumulated gradients over every rank of `dist`, in place. Parameter ids differ between
    /// processes, so the gradients travel as one flat host buffer in the model's parameter order (every trainable
    /// parameter, zeros where this rank has no gradient), followed by one presence flag per parameter: a
    /// parameter no rank has a gradient for stays absent, exactly as in a single process. Returns the bytes
    /// this rank contributed and the squared L2 norm of the summed gradient, taken over the buffer in parameter
    /// order so that every rank computes the same bits (the map's own order differs between processes).
    pub fn all_reduce<M: Module>(
        &mut self,
        model: &M,
        dist: &dyn crate::dist::Collective,
    ) -> Result<(usize, f64), crate::dist::DistError> {
        struct List(Vec<(ParamId, usize, Device, burn::tensor::DType)>);
        impl ModuleVisitor for List {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.is_require_grad() {
                    let t = param.val().inner();
                    self.0
                        .push((param.id, t.shape().num_elements(), t.device(), t.dtype()));
                }
            }
        }
        let mut list = List(Vec::new());
        model.visit(&mut list);
        let params = list.0;
        let n: usize = params.iter().map(|p| p.1).sum();
        let mut buf = vec![0f32; n + params.len()];
        let mut off = 0;
        for (i, (id, len, _, _)) in params.iter().enumerate() {
            if let Some(g) = self.grads.remove(id) {
                let host = g.into_data().convert::<f32>();
                let v = host
                    .as_slice::<f32>()
                    .map_err(|e| crate::dist::DistError::Transport(format!("{e:?}")))?;
                buf[off..off + len].copy_from_slice(v);
                buf[n + i] = 1.0;
            }
            off += len;
        }
        debug_assert!(
            self.grads.is_empty(),
            "a gradient of a parameter that does not require one"
        );
        dist.all_reduce_f32(&mut buf)?;
        let sum_sq = sum_sq_f64(&buf[..n]);
        let mut off = 0;
        for (i, (id, len, device, dtype)) in params.iter().enumerate() {
            if buf[n + i] > 0.0 {
                let data =
                    TensorData::new(buf[off..off + len].to_vec(), [*len]).convert_dtype(*dtype);
                self.grads.insert(*id, Tensor::from_data(data, device));
            }
            off += len;
        }
        Ok((buf.len() * std::mem::size_of::<f32>(), sum_sq))
    }

    /// The accumulated (unscaled) gradient of a parameter, flattened.
    pub fn get(&self, id: &ParamId) -> Option<&Tensor<1>> {
        self.grads.get(id)
    }

    /// Whether nothing was accumulated.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Drops everything (after a step, or when a step is skipped).
    pub fn clear(&mut self) {
        self.grads.clear();
    }
}

/// `sum(x^2)` in f64, in order.
fn sum_sq_f64(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Per-parameter Adam moments, keyed by module path (stable across model reloads).
#[derive(Debug, Clone, Default)]
pub struct AdamWState {
    /// Number of optimizer steps taken.
    pub step: u64,
    /// `(m, v)` flattened, by parameter path.
    pub moments: BTreeMap<String, (Tensor<1>, Tensor<1>)>,
}

/// The optimizer.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Moments and step counter.
    pub state: AdamWState,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            state: AdamWState::default(),
        }
    }

    /// Applies one update: every accumulated gradient is multiplied by `grad_scale` (normalisation and
    /// clipping folded together) before the Adam moments see it. Returns the updated model.
    pub fn step<M: Module>(
        &mut self,
        model: M,
        acc: &mut GradAccumulator,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.state.step += 1;
        let t = self.state.step as i32;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let mut mapper = Update {
            path: Vec::new(),
            grads: &mut acc.grads,
            moments: &mut self.state.moments,
            config: c,
            lr,
            grad_scale,
            bc1,
            bc2,
        };
        let model = model.map(&mut mapper);
        acc.clear();
        model
    }
}

struct Update<'a> {
    path: Vec<String>,
    grads: &'a mut HashMap<ParamId, Tensor<1>>,
    moments: &'a mut BTreeMap<String, (Tensor<1>, Tensor<1>)>,
    config: AdamWConfig,
    lr: f64,
    grad_scale: f64,
    bc1: f64,
    bc2: f64,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.remove(&param.id) else {
            return param;
        };
        let path = self.path.join(".");
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let p = tensor.inner().reshape([n]);
        let c = self.config;
        let prev = self.moments.remove(&path);
        let decay = c.weight_decay != 0.0 && decays(&path);
        // LoRA+: B's learning rate (and with it its decay) is the ratio times the step's; DoRA's magnitude
        // vectors go with B, as in PEFT's `create_loraplus_optimizer` (its 1-d parameters join B's group).
        let lr = self.lr;
        if c.lora_b_lr_ratio != 1.0
            && (path.ends_with("lora_b") || path.ends_with("lora_magnitude"))
        {
            self.lr = lr * c.lora_b_lr_ratio;
        }
        let (p, m, v) = match host_update(self, p, g, prev, decay) {
            Ok(done) => done,
            Err((p, g, prev)) => self.tensor_update(p, g, prev, decay),
        };
        self.lr = lr;
        let p = p.reshape(shape);
        self.moments.insert(path, (m, v));
        let mut p = Tensor::from_inner(p);
        if require_grad {
            p = p.require_grad();
        }
        Param::from_mapped_value(id, p, mapper)
    }
}

/// The host AdamW pass of `ytrainer-kernels` with this update's scalars; hands the inputs back where it does not
/// apply (another backend, another float type, `YTRAINER_FUSED=0`).
#[allow(clippy::type_complexity, clippy::result_large_err)]
fn host_update(
    u: &Update<'_>,
    p: Tensor<1>,
    g: Tensor<1>,
    prev: Moments,
    decay: bool,
) -> Result<(Tensor<1>, Tensor<1>, Tensor<1>), (Tensor<1>, Tensor<1>, Moments)> {
    let c = u.config;
    let k = AdamWConsts {
        b1: c.beta1 as f32,
        b2: c.beta2 as f32,
        ob1: (1.0 - c.beta1) as f32,
        ob2: (1.0 - c.beta2) as f32,
        gs: u.grad_scale as f32,
        keep: (1.0 - u.lr * c.weight_decay) as f32,
        bc1: u.bc1 as f32,
        bc2: u.bc2 as f32,
        eps: c.eps as f32,
        lr: u.lr as f32,
        fresh: prev.is_none(),
        decay,
    };
    ytrainer_kernels::host::adamw_update(p, g, prev, k)
}

impl Update<'_> {
    /// The update as tensor ops: any backend, any float type.
    fn tensor_update(
        &self,
        p: Tensor<1>,
        g: Tensor<1>,
        prev: Moments,
        decay: bool,
    ) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
        let c = self.config;
        let g = g.mul_scalar(self.grad_scale);
        let (m, v) = match prev {
            Some((m, v)) => (
                m.mul_scalar(c.beta1)
                    .add(g.clone().mul_scalar(1.0 - c.beta1)),
                v.mul_scalar(c.beta2)
                    .add(g.clone().powi_scalar(2).mul_scalar(1.0 - c.beta2)),
            ),
            None => (
                g.clone().mul_scalar(1.0 - c.beta1),
                g.powi_scalar(2).mul_scalar(1.0 - c.beta2),
            ),
        };
        let p = if decay {
            p.mul_scalar(1.0 - self.lr * c.weight_decay)
        } else {
            p
        };
        let denom = v.clone().div_scalar(self.bc2).sqrt().add_scalar(c.eps);
        let update = m
            .clone()
            .div_scalar(self.bc1)
            .div(denom)
            .mul_scalar(self.lr);
        (p.sub(update), m, v)
    }
}

/// Learning-rate schedule kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half-cosine from the peak down to `min_lr_ratio * peak`.
    Cosine,
    /// Linear decay from the peak down to `min_lr_ratio * peak`.
    Linear,
    /// The peak throughout (after warmup).
    Constant,
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup over `warmup` steps, then the
/// schedule. Pure function of its inputs, so a resumed run continues the same curve.
pub fn lr_at(
    schedule: Schedule,
    peak: f64,
    step: usize,
    total: usize,
    warmup: usize,
    min_lr_ratio: f64,
) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / decay_steps as f64).clamp(0.0, 1.0);
    let floor = peak * min_lr_ratio;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => floor + (peak - floor) * (1.0 - progress),
        Schedule::Cosine => {
            floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;

    #[derive(Module, Debug)]
    struct Toy {
        proj: Param<Tensor<2>>,
        norm: Param<Tensor<1>>,
    }

    /// PyTorch's AdamW on host values (torch.optim.AdamW, amsgrad=False), for one tensor.
    fn torch_adamw(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        t: i32,
        lr: f64,
        wd: f64,
    ) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = m[i] / (1.0 - b1.powi(t));
            let vh = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + eps);
        }
    }

    /// Three steps of our AdamW on `loss = sum(c * p)` (gradient = c, scaled) against PyTorch's formula, with
    /// decay on the projection and none on the norm.
    #[test]
    fn adamw_matches_pytorch_and_skips_decay_on_norms() {
        let device = Device::flex().autodiff();
        let p0 = [0.5f32, -0.25, 1.0, 2.0];
        let n0 = [1.0f32, 0.5];
        let mut toy = Toy {
            proj: Param::from_tensor(
                Tensor::from_data(TensorData::new(p0.to_vec(), [2, 2]), &device).require_grad(),
            ),
            norm: Param::from_tensor(
                Tensor::from_data(TensorData::new(n0.to_vec(), [2]), &device).require_grad(),
            ),
        };
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        });
        let (lr, scale) = (0.01, 0.5);
        let cp = [0.3f64, -1.2, 0.0005, 2.0];
        let cn = [-0.7f64, 0.1];
        let (mut hp, mut hn): (Vec<f64>, Vec<f64>) = (
            p0.iter().map(|&x| x as f64).collect(),
            n0.iter().map(|&x| x as f64).collect(),
        );
        let (mut mp, mut vp, mut mn, mut vn) =
            (vec![0.0; 4], vec![0.0; 4], vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=3 {
            let c1: Tensor<2> = Tensor::from_data(
                TensorData::new(cp.iter().map(|&x| x as f32).collect::<Vec<_>>(), [2, 2]),
                &device,
            );
            let c2: Tensor<1> = Tensor::from_data(
                TensorData::new(cn.iter().map(|&x| x as f32).collect::<Vec<_>>(), [2]),
                &device,
            );
            let loss = toy
                .proj
                .val()
                .mul(c1)
                .sum()
                .add(toy.norm.val().mul(c2).sum());
            let mut grads = loss.backward();
            let mut acc = GradAccumulator::default();
            acc.accumulate(&toy, &mut grads);
            toy = opt.step(toy, &mut acc, lr, scale);
            let gp: Vec<f64> = cp.iter().map(|x| x * scale).collect();
            let gn: Vec<f64> = cn.iter().map(|x| x * scale).collect();
            torch_adamw(&mut hp, &gp, &mut mp, &mut vp, t, lr, 0.1);
            torch_adamw(&mut hn, &gn, &mut mn, &mut vn, t, lr, 0.0);
        }
        let got_p: Vec<f32> = toy
            .proj
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        let got_n: Vec<f32> = toy
            .norm
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        for (g, w) in got_p.iter().zip(&hp).chain(got_n.iter().zip(&hn)) {
            assert!(
                (*g as f64 - w).abs() < 1e-6,
                "{got_p:?} {hp:?} / {got_n:?} {hn:?}"
            );
        }
        assert_eq!(opt.state.step, 3);
        assert!(opt.state.moments.contains_key("proj") && opt.state.moments.contains_key("norm"));
    }

    #[derive(Module, Debug)]
    struct Lora {
        lora_a: Param<Tensor<1>>,
        lora_b: Param<Tensor<1>>,
        lora_magnitude: Param<Tensor<1>>,
    }

    /// LoRA+: with ratio 16 the `lora_b` matrix (and a DoRA magnitude, which PEFT groups with B) moves as
    /// PyTorch's AdamW with 16 times the learning rate (decay included), `lora_a` as with the step's own, over
    /// three steps on the same gradient.
    #[test]
    fn lora_plus_scales_the_learning_rate_of_b_only() {
        let device = Device::flex().autodiff();
        let p0 = [0.5f32, -0.25, 1.0];
        let param = || {
            Param::from_tensor(
                Tensor::<1>::from_data(TensorData::new(p0.to_vec(), [3]), &device).require_grad(),
            )
        };
        let mut toy = Lora {
            lora_a: param(),
            lora_b: param(),
            lora_magnitude: param(),
        };
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.1,
            lora_b_lr_ratio: 16.0,
            ..AdamWConfig::default()
        });
        let lr = 1e-3;
        let c = [0.3f64, -1.2, 0.05];
        let host0: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut ha, mut hb) = (host0.clone(), host0);
        let (mut ma, mut va, mut mb, mut vb) =
            (vec![0.0; 3], vec![0.0; 3], vec![0.0; 3], vec![0.0; 3]);
        for t in 1..=3 {
            let ct = || -> Tensor<1> {
                Tensor::from_data(
                    TensorData::new(c.iter().map(|&x| x as f32).collect::<Vec<_>>(), [3]),
                    &device,
                )
            };
            let loss = toy
                .lora_a
                .val()
                .mul(ct())
                .sum()
                .add(toy.lora_b.val().mul(ct()).sum())
                .add(toy.lora_magnitude.val().mul(ct()).sum());
            let mut grads = loss.backward();
            let mut acc = GradAccumulator::default();
            acc.accumulate(&toy, &mut grads);
            toy = opt.step(toy, &mut acc, lr, 1.0);
            torch_adamw(&mut ha, &c, &mut ma, &mut va, t, lr, 0.1);
            torch_adamw(&mut hb, &c, &mut mb, &mut vb, t, lr * 16.0, 0.1);
        }
        let host = |p: &Param<Tensor<1>>| -> Vec<f32> {
            p.val().into_data().convert::<f32>().try_into_vec().unwrap()
        };
        let (a, b, m) = (
            host(&toy.lora_a),
            host(&toy.lora_b),
            host(&toy.lora_magnitude),
        );
        for (g, w) in a
            .iter()
            .zip(&ha)
            .chain(b.iter().zip(&hb))
            .chain(m.iter().zip(&hb))
        {
            assert!((*g as f64 - w).abs() < 1e-6, "{a:?} {ha:?} / {b:?} {hb:?}");
        }
        // B moved about 16 times as far as A (Adam's first steps move each weight by about lr).
        let moved = |v: &[f32]| (v[0] as f64 - 0.5).abs();
        assert!((moved(&b) / moved(&a) - 16.0).abs() < 0.2, "{a:?} {b:?}");
    }

    #[test]
    fn decay_excludes_norms_and_biases() {
        assert!(decays("layers.0.attn.q_proj.weight"));
        assert!(decays("layers.0.attn.q_proj.lora_a"));
        assert!(!decays("layers.0.input_layernorm.weight"));
        assert!(!decays("norm.gamma"));
        assert!(!decays("layers.0.attn.q_proj.bias"));
    }

    #[test]
    fn schedules() {
        // warmup 2 of 10, peak 1.0
        assert_eq!(lr_at(Schedule::Constant, 1.0, 0, 10, 2, 0.0), 0.5);
        assert_eq!(lr_at(Schedule::Constant, 1.0, 1, 10, 2, 0.0), 1.0);
        assert_eq!(lr_at(Schedule::Cosine, 1.0, 2, 10, 2, 0.0), 1.0);
        assert!((lr_at(Schedule::Cosine, 1.0, 6, 10, 2, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 6, 10, 2, 0.1) - 0.55).abs() < 1e-12);
        assert!(lr_at(Schedule::Cosine, 1.0, 10, 10, 2, 0.0).abs() < 1e-12);
    }

    /// Row gradients (an embedding's) scattered into the accumulated gradient: repeated ids add up, the result is
    /// the dense sum, and it stays a CPU tensor the host AdamW pass takes (a tracked or foreign tensor would push
    /// the update onto the slow tensor path), whether or not a previous gradient exists.
    /// The global norm sums squares in f64: over 2^21 values of 0.1 an f32 sum drifts by far more than 1e-7
    /// (it was what made a data-parallel run's grad norm differ from one process's by 1e-5).
    #[test]
    fn global_norm_is_exact_to_f64_rounding_on_large_tensors() {
        let inner = Device::flex();
        let n = 1 << 21;
        let mut acc = GradAccumulator::default();
        acc.add(
            ParamId::new(),
            Tensor::<1>::from_data(TensorData::new(vec![0.1f32; n], [n]), &inner),
        );
        acc.add(
            ParamId::new(),
            Tensor::<1>::from_data(TensorData::new(vec![-3.0f32, 4.0], [2]), &inner),
        );
        let x = f64::from(0.1f32);
        let want = (n as f64 * x * x + 25.0).sqrt() * 0.5;
        let got = acc.global_norm(-0.5);
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    }

    #[test]
    fn add_rows_scatters_into_the_accumulated_gradient_in_place() {
        let device = Device::flex().autodiff();
        let inner = Device::flex();
        let id = ParamId::new();
        let (r, c) = (4, 3);
        let rows =
            |v: Vec<f32>, n: usize| Tensor::<2>::from_data(TensorData::new(v, [n, c]), &inner);
        let ids = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device)
        };
        let mut acc = GradAccumulator::default();
        acc.add_rows(
            id,
            ids(vec![2, 0, 2]),
            rows((1..=9).map(|x| x as f32).collect(), 3),
            [r, c],
        );
        let got = acc
            .get(&id)
            .unwrap()
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, [4., 5., 6., 0., 0., 0., 8., 10., 12., 0., 0., 0.]);
        acc.add_rows(id, ids(vec![3]), rows(vec![0.5, 0.5, 0.5], 1), [r, c]);
        let g = acc.get(&id).unwrap().clone();
        // (`YTRAINER_FUSED=0` runs the same check through the tensor op every other backend takes.)
        if ytrainer_kernels::enabled() {
            assert!(host_f32(&g).is_some(), "the sum stays on the host path");
        }
        let got = g.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(got, [4., 5., 6., 0., 0., 0., 8., 10., 12., 0.5, 0.5, 0.5]);
    }

    /// The host pass gives the tensor path's update bit for bit, in each of its four loops (first step or not,
    /// with or without decay) and at every SIMD level the CPU offers (run with `YTRAINER_SIMD=avx2|portable`
    /// for the others).
    #[test]
    fn host_update_equals_the_tensor_path_bit_for_bit() {
        let device = Device::flex();
        let n = 40_000; // several chunks, and a tail
        let vals = |seed: u64, scale: f32| -> Tensor<1> {
            let mut r = crate::rng::SplitMix64::new(seed);
            let v: Vec<f32> = (0..n)
                .map(|_| (r.next_f64() as f32 - 0.5) * scale)
                .collect();
            Tensor::from_data(TensorData::new(v, [n]), &device)
        };
        let mut grads = HashMap::new();
        let mut moments = BTreeMap::new();
        let u = Update {
            path: Vec::new(),
            grads: &mut grads,
            moments: &mut moments,
            config: AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
            lr: 3e-3,
            grad_scale: 0.25,
            bc1: 1.0 - 0.9f64.powi(3),
            bc2: 1.0 - 0.999f64.powi(3),
        };
        let host = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
        for fresh in [true, false] {
            for decay in [true, false] {
                let (p, g) = (vals(1, 2.0), vals(2, 0.1));
                let prev = (!fresh).then(|| (vals(3, 0.01), vals(4, 0.001).abs()));
                let want = u.tensor_update(p.clone(), g.clone(), prev.clone(), decay);
                let got = host_update(&u, p, g, prev, decay).expect("the host path applies");
                assert_eq!(host(got.0), host(want.0), "p, fresh {fresh}, decay {decay}");
                assert_eq!(host(got.1), host(want.1), "m, fresh {fresh}, decay {decay}");
                assert_eq!(host(got.2), host(want.2), "v, fresh {fresh}, decay {decay}");
            }
        }
    }
}
