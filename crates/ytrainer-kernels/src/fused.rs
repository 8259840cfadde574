//! RMSNorm and the SwiGLU activation on the CPU as single operations with hand-written backward passes.
//!
//! As tensor code, RMSNorm is six ops forward and about a dozen backward (square, mean, add, sqrt, div, mul and
//! their derivatives), and `silu(g) * u` is three forward (with a scalar libm `exp`) and six backward, each a
//! full pass over memory with its own allocation and autodiff node. Here each is one multi-threaded pass forward
//! and one backward. The formulas are transformers' (`LlamaRMSNorm`: `w * x * rsqrt(mean(x^2) + eps)`; `silu`);
//! the tensor versions in `ytrainer-models`' `decoder.rs` stay the reference and the path for other backends, and the tests below
//! check values and gradients against them.

use crate::cpu::{self, matmul, matmul_new};
use burn::prelude::*;
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// Rows handed to one rayon task: enough work to amortise scheduling, small enough to balance two cores.
const ROWS_PER_TASK: usize = 16;

use crate::enabled;

/// Whether every tensor is f32: the kernels compute in f32 and must decide before recording an autodiff step
/// (another dtype keeps the tensor path).
pub fn all_f32<const D: usize>(ts: &[&Tensor<D>]) -> bool {
    ts.iter().all(|t| t.dtype() == burn::tensor::DType::F32)
}

/// f32 contents of a Flex tensor, copied only when it is not contiguous.
pub fn host(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    match t.as_slice::<f32>() {
        Some(s) => Some(std::borrow::Cow::Borrowed(s)),
        None => {
            let c = t.to_contiguous();
            c.as_slice::<f32>()
                .map(|s| std::borrow::Cow::Owned(s.to_vec()))
        }
    }
}

/// Records `op` on the autodiff graph over the inputs whose `nodes` are given (in the op's parent order) and runs
/// the forward pass once: `forward(true)` must return the output and the backward step's state (a gradient is
/// needed), `forward(false)` the output alone. Shared by every fused op.
pub(crate) fn record<O, const N: usize, const D: usize>(
    op: O,
    nodes: [NodeGuard; N],
    forward: impl FnOnce(bool) -> Option<(FlexTensor, Option<O::State>)>,
) -> Option<Tensor<D>>
where
    O: Backward<Flex, N>,
{
    let out = match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, state) = forward(true)?;
            prep.finish(state?, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(false)?.0),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex>>(out))
}

fn flex(v: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape.to_vec()))
}

/// `w * x * rsqrt(mean(x^2) + eps)` over the last dimension; `None` when not on the CPU backend.
pub fn rms_norm<const D: usize>(x: &Tensor<D>, w: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    if !enabled() || !all_f32(&[x]) || !all_f32(&[w]) {
        return None;
    }
    let eps = eps as f32;
    if let (Ok(xa), Ok(wa)) = (
        x.clone().try_into_primitive::<Autodiff<Flex>>(),
        w.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        return record(RmsNormBackward, [xa.node(), wa.node()], |keep| {
            let (y, inv) = rms_forward(xa.primitive(), wa.primitive(), eps)?;
            let state = keep.then(|| {
                std::sync::Arc::new(RmsState {
                    x: xa.primitive().clone(),
                    w: wa.primitive().clone(),
                    inv,
                })
            });
            Some((y, state))
        });
    }
    let xf = x.clone().try_into_primitive::<Flex>().ok()?;
    let wf = w.clone().try_into_primitive::<Flex>().ok()?;
    Some(Tensor::from_primitive::<Flex>(
        rms_forward(&xf, &wf, eps)?.0,
    ))
}

/// The normalised output and `rsqrt(mean(x^2) + eps)` per row.
fn rms_forward(x: &FlexTensor, w: &FlexTensor, eps: f32) -> Option<(FlexTensor, Vec<f32>)> {
    let _span = crate::prof::span(crate::prof::Op::RmsNorm);
    let shape = x.layout().shape().as_slice().to_vec();
    let (xs, ws) = (host(x)?, host(w)?);
    let hdim = *shape.last()?;
    if ws.len() != hdim || hdim == 0 {
        return None;
    }
    let rows = xs.len() / hdim;
    // The output is written once, not zeroed first (a memory-bound op: a zeroing pass is a third more traffic).
    let mut y = Vec::with_capacity(rows * hdim);
    let mut inv = vec![0.0f32; rows];
    y.spare_capacity_mut()[..rows * hdim]
        .par_chunks_mut(hdim * ROWS_PER_TASK)
        .zip(inv.par_chunks_mut(ROWS_PER_TASK))
        .zip(xs.par_chunks(hdim * ROWS_PER_TASK))
        .for_each(|((yc, ic), xc)| rms_forward_rows(yc, ic, xc, &ws, eps));
    // SAFETY: the row chunks cover all rows * hdim elements and every element of each row was written above.
    unsafe { y.set_len(rows * hdim) };
    Some((flex(y, &shape), inv))
}

/// RMSNorm of whole rows (`hdim = w.len()` each), writing `y` and each row's `1 / rms`.
fn rms_forward_rows(
    y: &mut [std::mem::MaybeUninit<f32>],
    inv: &mut [f32],
    x: &[f32],
    w: &[f32],
    eps: f32,
) {
    #[inline(always)]
    fn body(y: &mut [std::mem::MaybeUninit<f32>], inv: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let hdim = w.len();
        for ((yr, r), xr) in y.chunks_mut(hdim).zip(inv.iter_mut()).zip(x.chunks(hdim)) {
            *r = 1.0 / (cpu::dot(xr, xr) / hdim as f32 + eps).sqrt();
            for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w.iter()) {
                o.write(g * (a * *r));
            }
        }
    }
    crate::simd_dispatch!(body, (y: &mut [std::mem::MaybeUninit<f32>], inv: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> ())
}

/// RMSNorm's backward over whole rows: `d` holds `dy` and is overwritten with `dx`; returns these rows' share of
/// the weight's gradient.
fn rms_backward_rows(d: &mut [f32], x: &[f32], inv: &[f32], w: &[f32]) -> Vec<f32> {
    #[inline(always)]
    fn body(d: &mut [f32], x: &[f32], inv: &[f32], w: &[f32]) -> Vec<f32> {
        let hdim = w.len();
        let mut dw = vec![0.0f32; hdim];
        let mut g = vec![0.0f32; hdim];
        for ((dr, xr), &r) in d.chunks_mut(hdim).zip(x.chunks(hdim)).zip(inv) {
            for ((gv, &dv), &wv) in g.iter_mut().zip(dr.iter()).zip(w.iter()) {
                *gv = dv * wv;
            }
            let c = cpu::dot(&g, xr) * r * r / hdim as f32;
            for (((o, &gv), &xv), dwv) in dr.iter_mut().zip(&g).zip(xr).zip(dw.iter_mut()) {
                *dwv += *o * xv * r;
                *o = r * (gv - xv * c);
            }
        }
        dw
    }
    crate::simd_dispatch!(body, (d: &mut [f32], x: &[f32], inv: &[f32], w: &[f32]) -> Vec<f32>)
}

#[derive(Debug)]
struct RmsState {
    x: FlexTensor,
    w: FlexTensor,
    inv: Vec<f32>,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = std::sync::Arc<RmsState>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let _span = crate::prof::span(crate::prof::Op::RmsNorm);
        let [nx, nw] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let (xs, ws) = (
            host(&s.x).expect("f32 input"),
            host(&s.w).expect("f32 weight"),
        );
        let hdim = ws.len();
        // dx = r (g - x r^2 mean(g x)) with g = dy * w; dw = sum over rows of dy * x * r. dx is written over dy
        // (each row's dy is read before it is overwritten; copied first only if something else holds it).
        let mut dx = dy;
        let dw = cpu::flex_f32_mut(&mut dx)
            .expect("f32 gradient")
            .par_chunks_mut(hdim * ROWS_PER_TASK)
            .zip(xs.par_chunks(hdim * ROWS_PER_TASK))
            .zip(s.inv.par_chunks(ROWS_PER_TASK))
            .map(|((dc, xc), ic)| rms_backward_rows(dc, xc, ic, &ws))
            .collect::<Vec<_>>();
        let dw = sum_in_order(dw, hdim);
        if let Some(n) = nx {
            grads.register::<Flex>(n.id, dx);
        }
        if let Some(n) = nw {
            grads.register::<Flex>(n.id, flex(dw, &[hdim]));
        }
    }
}

/// The sum of per-task partial sums, in task order. Rayon's `fold` + `reduce` would group the partials by however
/// the work was split at run time, so the same step could round differently from run to run; fixed chunks summed
/// in a fixed order make every run bit-identical.
fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut total = vec![0.0f32; len];
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// `silu(g) * u` (SwiGLU's gate); `None` when not on the CPU backend.
pub fn swiglu<const D: usize>(g: &Tensor<D>, u: &Tensor<D>) -> Option<Tensor<D>> {
    if !enabled() || g.dims() != u.dims() || !all_f32(&[g, u]) {
        return None;
    }
    if let (Ok(ga), Ok(ua)) = (
        g.clone().try_into_primitive::<Autodiff<Flex>>(),
        u.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        return record(SwigluBackward, [ga.node(), ua.node()], |keep| {
            let y = swiglu_forward(ga.primitive(), ua.primitive())?;
            Some((
                y,
                keep.then(|| (ga.primitive().clone(), ua.primitive().clone())),
            ))
        });
    }
    let gf = g.clone().try_into_primitive::<Flex>().ok()?;
    let uf = u.clone().try_into_primitive::<Flex>().ok()?;
    Some(Tensor::from_primitive::<Flex>(swiglu_forward(&gf, &uf)?))
}

/// Elements per rayon task in the element-wise kernels.
const ELEMS_PER_TASK: usize = 1 << 14;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + cpu::exp_f32(-x))
}

fn swiglu_forward(g: &FlexTensor, u: &FlexTensor) -> Option<FlexTensor> {
    let _span = crate::prof::span(crate::prof::Op::Swiglu);
    let shape = g.layout().shape().as_slice().to_vec();
    let (gs, us) = (host(g)?, host(u)?);
    if gs.len() != us.len() {
        return None;
    }
    // Written once, never zeroed first: on this memory-bound op a zeroing pass is a third more traffic.
    let mut y = Vec::with_capacity(gs.len());
    y.spare_capacity_mut()[..gs.len()]
        .par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            gs.par_chunks(ELEMS_PER_TASK)
                .zip(us.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(yc, (gc, uc))| swiglu_chunk(yc, gc, uc));
    // SAFETY: the chunks cover all gs.len() elements and swiglu_chunk writes every element of its chunk.
    unsafe { y.set_len(gs.len()) };
    Some(flex(y, &shape))
}

fn swiglu_chunk(y: &mut [std::mem::MaybeUninit<f32>], g: &[f32], u: &[f32]) {
    #[inline(always)]
    fn body(y: &mut [std::mem::MaybeUninit<f32>], g: &[f32], u: &[f32]) {
        for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
            o.write(a * sigmoid(a) * b);
        }
    }
    crate::simd_dispatch!(body, (y: &mut [std::mem::MaybeUninit<f32>], g: &[f32], u: &[f32]) -> ())
}

/// Overwrites the saved gate `g` and up `u` values with their gradients `dg`, `du` (each element is read before
/// it is written): the backward pass is the last reader of both, so no new buffers and no zeroing are needed.
fn swiglu_backward_chunk(g: &mut [f32], u: &mut [f32], dy: &[f32]) {
    #[inline(always)]
    fn body(g: &mut [f32], u: &mut [f32], dy: &[f32]) {
        for i in 0..dy.len().min(g.len()).min(u.len()) {
            let (a, b, d) = (g[i], u[i], dy[i]);
            let s = sigmoid(a);
            u[i] = d * a * s;
            g[i] = d * b * s * (1.0 + a * (1.0 - s));
        }
    }
    crate::simd_dispatch!(body, (g: &mut [f32], u: &mut [f32], dy: &[f32]) -> ())
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let _span = crate::prof::span(crate::prof::Op::Swiglu);
        let [ng, nu] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let dys = host(&dy).expect("f32 gradient");
        // The saved gate and up values become the gradients in place (copied first only if not contiguous, or on
        // write if something else still holds them).
        let (mut dg, mut du) = ops.state;
        cpu::flex_f32_mut(&mut dg)
            .expect("f32 gate")
            .par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                cpu::flex_f32_mut(&mut du)
                    .expect("f32 up")
                    .par_chunks_mut(ELEMS_PER_TASK),
            )
            .zip(dys.par_chunks(ELEMS_PER_TASK))
            .for_each(|((a, b), dc)| swiglu_backward_chunk(a, b, dc));
        if let Some(n) = ng {
            grads.register::<Flex>(n.id, dg);
        }
        if let Some(n) = nu {
            grads.register::<Flex>(n.id, du);
        }
    }
}

/// The optional parts of a linear layer for [`linear`].
pub struct LinearParts<'a> {
    pub bias: Option<&'a Tensor<1>>,
    /// `(A [in, r], B [r, out], scale)`.
    pub lora: Option<(&'a Tensor<2>, &'a Tensor<2>, f32)>,
}

/// `x·W + b + s·(x·A)·B` over the last dimension as one operation (LoRA without dropout, or a plain linear):
/// the LoRA product is accumulated into the base product's buffer and the backward pass produces `dX`, `dA`,
/// `dB` (and `dW`, `db` when trainable) from the same few GEMMs. `None` when not on the CPU backend.
pub fn linear<const D: usize>(
    x: &Tensor<D>,
    w: &Tensor<2>,
    parts: LinearParts<'_>,
) -> Option<Tensor<D>> {
    if !enabled()
        || !all_f32(&[x])
        || !all_f32(&[w])
        || parts.bias.is_some_and(|b| !all_f32(&[b]))
        || parts.lora.is_some_and(|(a, b, _)| !all_f32(&[a, b]))
    {
        return None;
    }
    let mut inputs: Vec<&Tensor<2>> = vec![w];
    if let Some((a, b, _)) = parts.lora {
        inputs.push(a);
        inputs.push(b);
    }
    let scale = parts.lora.map_or(0.0, |l| l.2);
    let roles = Roles {
        bias: parts.bias.is_some(),
        lora: parts.lora.is_some(),
    };
    let ad = |t: &Tensor<2>| t.clone().try_into_primitive::<Autodiff<Flex>>().ok();
    if let Ok(xa) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
        let mats: Option<Vec<_>> = inputs.iter().map(|t| ad(t)).collect();
        let mats = mats?;
        let bias = match parts.bias {
            Some(b) => Some(b.clone().try_into_primitive::<Autodiff<Flex>>().ok()?),
            None => None,
        };
        let prims = |i: usize| mats[i].primitive();
        let fwd = |keep: bool| {
            let (y, t) = linear_forward(
                xa.primitive(),
                prims(0),
                bias.as_ref().map(|b| b.primitive()),
                roles.lora.then(|| (prims(1), prims(2), scale)),
                keep,
            )?;
            let state = keep.then(|| {
                std::sync::Arc::new(LinearState {
                    x: xa.primitive().clone(),
                    w: prims(0).clone(),
                    a: roles.lora.then(|| prims(1).clone()),
                    b: roles.lora.then(|| prims(2).clone()),
                    t,
                    scale,
                    roles,
                })
            });
            Some((y, state))
        };
        // One arm per combination of inputs (the parent count is a const generic).
        return match (&bias, roles.lora) {
            (None, false) => record(LinearBackward::<2>, [xa.node(), mats[0].node()], fwd),
            (Some(b), false) => record(
                LinearBackward::<3>,
                [xa.node(), mats[0].node(), b.node()],
                fwd,
            ),
            (None, true) => record(
                LinearBackward::<4>,
                [xa.node(), mats[0].node(), mats[1].node(), mats[2].node()],
                fwd,
            ),
            (Some(b), true) => record(
                LinearBackward::<5>,
                [
                    xa.node(),
                    mats[0].node(),
                    b.node(),
                    mats[1].node(),
                    mats[2].node(),
                ],
                fwd,
            ),
        };
    }
    let pf = |t: &Tensor<2>| t.clone().try_into_primitive::<Flex>().ok();
    let xf = x.clone().try_into_primitive::<Flex>().ok()?;
    let mats: Option<Vec<_>> = inputs.iter().map(|t| pf(t)).collect();
    let mats = mats?;
    let bias = match parts.bias {
        Some(b) => Some(b.clone().try_into_primitive::<Flex>().ok()?),
        None => None,
    };
    let (y, _) = linear_forward(
        &xf,
        &mats[0],
        bias.as_ref(),
        roles.lora.then(|| (&mats[1], &mats[2], scale)),
        false,
    )?;
    Some(Tensor::from_primitive::<Flex>(y))
}

#[derive(Debug, Clone, Copy)]
struct Roles {
    bias: bool,
    lora: bool,
}

/// `y = x·W + b + s·(x·A)·B`; also returns `t = x·A` when `keep` (the backward pass needs it for `dB`).
fn linear_forward(
    x: &FlexTensor,
    w: &FlexTensor,
    bias: Option<&FlexTensor>,
    lora: Option<(&FlexTensor, &FlexTensor, f32)>,
    keep: bool,
) -> Option<(FlexTensor, Option<FlexTensor>)> {
    let _span = crate::prof::span(crate::prof::Op::LinearForward);
    let mut shape = x.layout().shape().as_slice().to_vec();
    let [d_in, d_out] = w.layout().shape().dims::<2>();
    if shape.last() != Some(&d_in) || d_in == 0 {
        return None;
    }
    let (xs, ws) = (host(x)?, host(w)?);
    let n = xs.len() / d_in;
    let lora = match lora {
        Some((a, b, scale)) => {
            let [a_in, r] = a.layout().shape().dims::<2>();
            let [b_r, b_out] = b.layout().shape().dims::<2>();
            if a_in != d_in || b_r != r || b_out != d_out {
                return None;
            }
            Some((host(a)?, host(b)?, r, scale))
        }
        None => None,
    };
    let mut kept = None;
    // The thin `x·A` (needed by the LoRA branch or, for `dB`, by the backward pass) runs beside the large product:
    // alone it would leave the pool's other thread idle, beside it that thread takes over part of the large one.
    let thin_t = |need: bool| {
        lora.as_ref().filter(|_| need).map(|(as_, _, r, _)| {
            let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
            matmul_new(&xs, as_, (n, *r, d_in), false, false, 1.0)
        })
    };
    let mut y = match &lora {
        Some((as_, bs, r, scale)) if merge_pays(n, d_in) => {
            // y = x·(W + s·A·B): one large product instead of the base product plus two thin ones.
            let merged = {
                let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
                merged_weight(&ws, as_, bs, (d_in, d_out, *r), *scale)
            };
            let (y, t) = rayon::join(
                || matmul_new(&xs, &merged, (n, d_out, d_in), false, false, 1.0),
                || thin_t(keep),
            );
            kept = t.map(|t| flex(t, &[n, *r]));
            y
        }
        _ => {
            let (mut y, t) = rayon::join(
                || matmul_new(&xs, &ws, (n, d_out, d_in), false, false, 1.0),
                || thin_t(true),
            );
            if let (Some((_, bs, r, scale)), Some(t)) = (&lora, t) {
                matmul(&mut y, &t, bs, (n, d_out, *r), false, false, true, *scale);
                if keep {
                    kept = Some(flex(t, &[n, *r]));
                }
            }
            y
        }
    };
    if let Some(b) = bias {
        let bs = host(b)?;
        if bs.len() != d_out {
            return None;
        }
        y.par_chunks_mut(d_out * ROWS_PER_TASK).for_each(|c| {
            for row in c.chunks_mut(d_out) {
                for (o, &v) in row.iter_mut().zip(bs.iter()) {
                    *o += v;
                }
            }
        });
    }
    *shape.last_mut()? = d_out;
    Some((flex(y, &shape), kept))
}

/// Whether to multiply by the merged weight `W + s·A·B` (`[k, m]`, the side the LoRA product would otherwise
/// be applied on) rather than applying the two thin LoRA products to `rows` rows: merging costs `k·m·r`
/// multiply-adds, the thin product it replaces `rows·m·r`, and the merged product runs at full GEMM speed.
/// `YTRAINER_LORA_MERGE=0` keeps the thin products (for A/B measurements).
fn merge_pays(rows: usize, k: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    rows >= k && *ON.get_or_init(|| std::env::var("YTRAINER_LORA_MERGE").as_deref() != Ok("0"))
}

/// `W + s·A·B` for `W` `[d_in, d_out]`, `A` `[d_in, r]`, `B` `[r, d_out]`: PEFT's merged weight, rebuilt per call
/// (keeping it from the forward pass would hold a second copy of every adapted weight until the backward pass).
fn merged_weight(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    (d_in, d_out, r): (usize, usize, usize),
    s: f32,
) -> Vec<f32> {
    let w = &w[..d_in * d_out];
    let mut m = Vec::with_capacity(w.len());
    m.spare_capacity_mut()
        .par_chunks_mut(ELEMS_PER_TASK * 4)
        .zip(w.par_chunks(ELEMS_PER_TASK * 4))
        .for_each(|(dst, src)| {
            for (d, &v) in dst.iter_mut().zip(src) {
                d.write(v);
            }
        });
    // SAFETY: every element was written by the copy above.
    unsafe { m.set_len(w.len()) };
    matmul(&mut m, a, b, (d_in, d_out, r), false, false, true, s);
    m
}

#[derive(Debug)]
struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
    a: Option<FlexTensor>,
    b: Option<FlexTensor>,
    /// `x·A`, `[N, r]`.
    t: Option<FlexTensor>,
    scale: f32,
    roles: Roles,
}

#[derive(Debug)]
struct LinearBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for LinearBackward<N> {
    type State = std::sync::Arc<LinearState>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let _span = crate::prof::span(crate::prof::Op::LinearBackward);
        let s = ops.state;
        // Parents in the order `linear` recorded them: x, W, [bias], [A, B].
        let mut parents = ops.parents.into_iter();
        let nx = parents.next().flatten();
        let nw = parents.next().flatten();
        let nbias = if s.roles.bias {
            parents.next().flatten()
        } else {
            None
        };
        let (na, nb) = if s.roles.lora {
            (parents.next().flatten(), parents.next().flatten())
        } else {
            (None, None)
        };
        let dy = grads.consume::<Flex>(&ops.node);
        let x_shape = s.x.layout().shape().as_slice().to_vec();
        let [d_in, d_out] = s.w.layout().shape().dims::<2>();
        let (xs, ws, dys) = (
            host(&s.x).expect("f32 input"),
            host(&s.w).expect("f32 weight"),
            host(&dy).expect("f32 gradient"),
        );
        let n = xs.len() / d_in;
        let lora = match (&s.a, &s.b) {
            (Some(a), Some(b)) => Some((
                host(a).expect("f32 A"),
                host(b).expect("f32 B"),
                a.layout().shape().dims::<2>()[1],
            )),
            _ => None,
        };
        let r = lora.as_ref().map_or(0, |l| l.2);
        let merged_dx = nx.is_some() && lora.is_some() && merge_pays(n, d_out);
        // u = dY·B^T (the gradient at the LoRA bottleneck, before the scale), needed for dA and, unmerged, dX;
        // it and the merged weight are both thin products, so they run side by side.
        let (u, merged) = rayon::join(
            || {
                let (_, b_host, _) = lora.as_ref()?;
                (na.is_some() || (nx.is_some() && !merged_dx)).then(|| {
                    let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
                    matmul_new(&dys, b_host, (n, r, d_out), false, true, 1.0)
                })
            },
            || {
                let (a_host, b_host, _) = lora.as_ref().filter(|_| merged_dx)?;
                let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
                Some(merged_weight(
                    &ws,
                    a_host,
                    b_host,
                    (d_in, d_out, r),
                    s.scale,
                ))
            },
        );
        // dX (large) beside dA = s · x^T · u and dB = s · t^T · dY (thin; t = x·A kept from the forward pass).
        let dx = || {
            let node = nx?;
            let dx = match &merged {
                // dX = dY·(W + s·A·B)^T in one product.
                Some(m) => matmul_new(&dys, m, (n, d_in, d_out), false, true, 1.0),
                None => {
                    let mut dx = matmul_new(&dys, &ws, (n, d_in, d_out), false, true, 1.0);
                    if let (Some((a_host, _, _)), Some(u)) = (&lora, &u) {
                        let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
                        matmul(&mut dx, u, a_host, (n, d_in, r), false, true, true, s.scale);
                    }
                    dx
                }
            };
            Some((node, dx))
        };
        let da = || {
            let (node, u) = (na?, u.as_ref()?);
            let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
            Some((node, matmul_new(&xs, u, (d_in, r, n), true, false, s.scale)))
        };
        let db = || {
            let node = nb?;
            let t =
                s.t.as_ref()
                    .expect("x·A kept when the LoRA branch is tracked");
            let ts = host(t).expect("f32 x·A");
            let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
            Some((
                node,
                matmul_new(&ts, &dys, (r, d_out, n), true, false, s.scale),
            ))
        };
        // dW (full fine-tuning) beside them too: two large products side by side keep both cores busy through
        // the tail of each, where one product alone has only a partial tile left per core.
        let dw = || {
            let node = nw?;
            Some((
                node,
                matmul_new(&xs, &dys, (d_in, d_out, n), true, false, 1.0),
            ))
        };
        let ((dx, dw), (da, db)) = rayon::join(|| rayon::join(dx, dw), || rayon::join(da, db));
        if let Some((node, dx)) = dx {
            grads.register::<Flex>(node.id, flex(dx, &x_shape));
        }
        if let Some((node, da)) = da {
            grads.register::<Flex>(node.id, flex(da, &[d_in, r]));
        }
        if let Some((node, db)) = db {
            grads.register::<Flex>(node.id, flex(db, &[r, d_out]));
        }
        if let Some((node, dw)) = dw {
            grads.register::<Flex>(node.id, flex(dw, &[d_in, d_out]));
        }
        if let Some(node) = nbias {
            let db = dys
                .par_chunks(d_out * 256)
                .map(|c| {
                    let mut acc = vec![0.0f32; d_out];
                    for row in c.chunks(d_out) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    acc
                })
                .collect::<Vec<_>>();
            let db = sum_in_order(db, d_out);
            grads.register::<Flex>(node.id, flex(db, &[d_out]));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::activation::silu;

    fn rand<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        uniform(shape, seed, 4.0, device)
    }

    /// Deterministic values uniform in `[-half_width, half_width)` (an LCG: tests need no RNG dependency).
    pub(crate) fn uniform<const D: usize>(
        shape: [usize; D],
        seed: u64,
        half_width: f32,
        device: &Device,
    ) -> Tensor<D> {
        let mut x = seed;
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 * half_width - half_width
            })
            .collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        a.sub(b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn rms_norm_matches_tensor_formula_values_and_gradients() {
        let plain = Device::flex();
        let ad = plain.clone().autodiff();
        // 37 rows (not a multiple of the task size) of 19 features.
        let (x0, w0) = (rand([37, 19], 1, &plain), rand([19], 2, &plain));
        let up = Tensor::<2>::from_inner(rand([37, 19], 3, &plain));
        let leaf2 = |t: &Tensor<2>| Tensor::<2>::from_inner(t.clone()).require_grad();
        let leaf1 = |t: &Tensor<1>| Tensor::<1>::from_inner(t.clone()).require_grad();
        let (xa, wa) = (leaf2(&x0), leaf1(&w0));
        let fused = rms_norm(&xa, &wa, 1e-6).expect("CPU tensors take the fused path");
        let ga = fused.clone().mul(up.clone()).sum().backward();
        let (xb, wb) = (leaf2(&x0), leaf1(&w0));
        let rms = xb.clone().square().mean_dim(1).add_scalar(1e-6).sqrt();
        let want = xb.clone().div(rms) * wb.clone().unsqueeze::<2>();
        let gb = want.clone().mul(up).sum().backward();
        assert!(max_diff(fused, want) < 1e-5);
        let dx = max_diff(
            Tensor::<2>::from_inner(xa.grad(&ga).unwrap()),
            Tensor::from_inner(xb.grad(&gb).unwrap()),
        );
        let dw = max_diff(
            Tensor::<1>::from_inner(wa.grad(&ga).unwrap()),
            Tensor::from_inner(wb.grad(&gb).unwrap()),
        );
        assert!(dx < 1e-5, "dx differs by {dx}");
        assert!(dw < 1e-4, "dw differs by {dw}");
        let _ = ad;
    }

    /// Plain and LoRA linears, with and without bias, trainable or frozen base: values and every gradient equal
    /// the tensor formulation `x·W + b + s·(x·A)·B`.
    #[test]
    fn linear_matches_tensor_formula_values_and_gradients() {
        use burn::tensor::module::linear as tlinear;
        let plain = Device::flex();
        let (n_in, n_out, r) = (13, 11, 3);
        // 10 rows take the unmerged LoRA path (fewer rows than either side of W), 32 rows the merged one.
        for rows in [5, 16] {
            let x0 = rand([2, rows, n_in], 7, &plain);
            let w0 = rand([n_in, n_out], 8, &plain);
            let b0 = rand([n_out], 9, &plain);
            let a0 = rand([n_in, r], 10, &plain);
            let bb0 = rand([r, n_out], 11, &plain);
            let up = Tensor::<3>::from_inner(rand([2, rows, n_out], 12, &plain));
            for (with_bias, with_lora, w_trainable) in [
                (false, false, true),
                (true, false, true),
                (false, true, false),
                (true, true, false),
                (true, true, true),
            ] {
                let leaf3 = |t: &Tensor<3>| Tensor::<3>::from_inner(t.clone()).require_grad();
                let leaf2 = |t: &Tensor<2>, g: bool| {
                    let t = Tensor::<2>::from_inner(t.clone());
                    if g { t.require_grad() } else { t }
                };
                let leaf1 = |t: &Tensor<1>| Tensor::<1>::from_inner(t.clone()).require_grad();
                let mk = || {
                    (
                        leaf3(&x0),
                        leaf2(&w0, w_trainable),
                        leaf1(&b0),
                        leaf2(&a0, true),
                        leaf2(&bb0, true),
                    )
                };
                let (x, w, b, a, bb) = mk();
                let fused = linear(
                    &x,
                    &w,
                    LinearParts {
                        bias: with_bias.then_some(&b),
                        lora: with_lora.then_some((&a, &bb, 0.5)),
                    },
                )
                .expect("CPU tensors take the fused path");
                let g1 = fused.clone().mul(up.clone()).sum().backward();
                let (x2, w2, b2, a2, bb2) = mk();
                let mut want = tlinear(x2.clone(), w2.clone(), with_bias.then(|| b2.clone()));
                if with_lora {
                    want = want
                        + tlinear(tlinear(x2.clone(), a2.clone(), None), bb2.clone(), None)
                            .mul_scalar(0.5);
                }
                let g2 = want.clone().mul(up.clone()).sum().backward();
                assert!(max_diff(fused, want) < 1e-4);
                let case = format!("rows {rows} bias {with_bias} lora {with_lora} w {w_trainable}");
                let d = max_diff(
                    Tensor::<3>::from_inner(x.grad(&g1).unwrap()),
                    Tensor::from_inner(x2.grad(&g2).unwrap()),
                );
                assert!(d < 1e-4, "{case}: dx {d}");
                if w_trainable {
                    let d = max_diff(
                        Tensor::<2>::from_inner(w.grad(&g1).unwrap()),
                        Tensor::from_inner(w2.grad(&g2).unwrap()),
                    );
                    assert!(d < 1e-4, "{case}: dw {d}");
                } else {
                    assert!(w.grad(&g1).is_none());
                }
                if with_bias {
                    let d = max_diff(
                        Tensor::<1>::from_inner(b.grad(&g1).unwrap()),
                        Tensor::from_inner(b2.grad(&g2).unwrap()),
                    );
                    assert!(d < 1e-4, "{case}: db {d}");
                }
                if with_lora {
                    for (p, q) in [(&a, &a2), (&bb, &bb2)] {
                        let d = max_diff(
                            Tensor::<2>::from_inner(p.grad(&g1).unwrap()),
                            Tensor::from_inner(q.grad(&g2).unwrap()),
                        );
                        assert!(d < 1e-4, "{case}: lora {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn swiglu_matches_tensor_formula_values_and_gradients() {
        let plain = Device::flex();
        let (g0, u0) = (rand([3, 5, 7001], 4, &plain), rand([3, 5, 7001], 5, &plain));
        let up = Tensor::<3>::from_inner(rand([3, 5, 7001], 6, &plain));
        let leaf = |t: &Tensor<3>| Tensor::<3>::from_inner(t.clone()).require_grad();
        let (ga_, ua) = (leaf(&g0), leaf(&u0));
        let fused = swiglu(&ga_, &ua).expect("CPU tensors take the fused path");
        let grads_a = fused.clone().mul(up.clone()).sum().backward();
        let (gb_, ub) = (leaf(&g0), leaf(&u0));
        let want = silu(gb_.clone()) * ub.clone();
        let grads_b = want.clone().mul(up).sum().backward();
        assert!(max_diff(fused, want) < 1e-5);
        for (a, b) in [(&ga_, &gb_), (&ua, &ub)] {
            let d = max_diff(
                Tensor::<3>::from_inner(a.grad(&grads_a).unwrap()),
                Tensor::from_inner(b.grad(&grads_b).unwrap()),
            );
            assert!(d < 1e-5, "gradient differs by {d}");
        }
        // Inference on the plain device.
        let plain_out = swiglu(&g0, &u0).unwrap();
        assert!(max_diff(plain_out, silu(g0) * u0) < 1e-5);
    }
}
