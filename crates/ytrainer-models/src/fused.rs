//! RMSNorm and the SwiGLU activation on the CPU as single operations with hand-written backward passes.
//!
//! As tensor code, RMSNorm is six ops forward and about a dozen backward (square, mean, add, sqrt, div, mul and
//! their derivatives), and `silu(g) * u` is three forward (with a scalar libm `exp`) and six backward, each a
//! full pass over memory with its own allocation and autodiff node. Here each is one multi-threaded pass forward
//! and one backward. The formulas are transformers' (`LlamaRMSNorm`: `w * x * rsqrt(mean(x^2) + eps)`; `silu`);
//! the tensor versions in `decoder.rs` stay the reference and the path for other backends, and the tests below
//! check values and gradients against them.

use burn::prelude::*;
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use ytrainer_core::cpu;

/// Rows handed to one rayon task: enough work to amortise scheduling, small enough to balance two cores.
const ROWS_PER_TASK: usize = 16;

/// Whether the fused CPU ops are allowed (`YTRAINER_FUSED=0` turns them off for A/B measurements).
pub(crate) fn enabled() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("YTRAINER_FUSED").as_deref() != Ok("0"))
}

/// f32 contents of a Flex tensor, copied only when it is not contiguous.
pub(crate) fn host(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    match t.as_slice::<f32>() {
        Some(s) => Some(std::borrow::Cow::Borrowed(s)),
        None => {
            let c = t.to_contiguous();
            c.as_slice::<f32>()
                .map(|s| std::borrow::Cow::Owned(s.to_vec()))
        }
    }
}

fn flex(v: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape.to_vec()))
}

/// `w * x * rsqrt(mean(x^2) + eps)` over the last dimension; `None` when not on the CPU backend.
pub fn rms_norm<const D: usize>(x: &Tensor<D>, w: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    if !enabled() {
        return None;
    }
    let eps = eps as f32;
    if let (Ok(xa), Ok(wa)) = (
        x.clone().try_into_primitive::<Autodiff<Flex>>(),
        w.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let out = match RmsNormBackward
            .prepare::<NoCheckpointing>([xa.node(), wa.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, inv) = rms_forward(xa.primitive(), wa.primitive(), eps)?;
                let state = RmsState {
                    x: xa.primitive().clone(),
                    w: wa.primitive().clone(),
                    inv,
                };
                prep.finish(std::sync::Arc::new(state), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(rms_forward(xa.primitive(), wa.primitive(), eps)?.0)
            }
        };
        return Some(Tensor::from_primitive::<Autodiff<Flex>>(out));
    }
    let xf = x.clone().try_into_primitive::<Flex>().ok()?;
    let wf = w.clone().try_into_primitive::<Flex>().ok()?;
    Some(Tensor::from_primitive::<Flex>(
        rms_forward(&xf, &wf, eps)?.0,
    ))
}

/// The normalised output and `rsqrt(mean(x^2) + eps)` per row.
fn rms_forward(x: &FlexTensor, w: &FlexTensor, eps: f32) -> Option<(FlexTensor, Vec<f32>)> {
    let shape = x.layout().shape().as_slice().to_vec();
    let (xs, ws) = (host(x)?, host(w)?);
    let hdim = *shape.last()?;
    if ws.len() != hdim || hdim == 0 {
        return None;
    }
    let rows = xs.len() / hdim;
    let mut y = vec![0.0f32; xs.len()];
    let mut inv = vec![0.0f32; rows];
    y.par_chunks_mut(hdim * ROWS_PER_TASK)
        .zip(inv.par_chunks_mut(ROWS_PER_TASK))
        .zip(xs.par_chunks(hdim * ROWS_PER_TASK))
        .for_each(|((yc, ic), xc)| {
            for ((yr, r), xr) in yc.chunks_mut(hdim).zip(ic.iter_mut()).zip(xc.chunks(hdim)) {
                *r = 1.0 / (cpu::dot(xr, xr) / hdim as f32 + eps).sqrt();
                for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(ws.iter()) {
                    *o = g * (a * *r);
                }
            }
        });
    Some((flex(y, &shape), inv))
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
        let [nx, nw] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let shape = s.x.layout().shape().as_slice().to_vec();
        let (xs, ws, dys) = (
            host(&s.x).expect("f32 input"),
            host(&s.w).expect("f32 weight"),
            host(&dy).expect("f32 gradient"),
        );
        let hdim = ws.len();
        // dx = r (g - x r^2 mean(g x)) with g = dy * w; dw = sum over rows of dy * x * r.
        let mut dx = vec![0.0f32; xs.len()];
        let dw = dx
            .par_chunks_mut(hdim * ROWS_PER_TASK)
            .zip(xs.par_chunks(hdim * ROWS_PER_TASK))
            .zip(dys.par_chunks(hdim * ROWS_PER_TASK))
            .zip(s.inv.par_chunks(ROWS_PER_TASK))
            .fold(
                || vec![0.0f32; hdim],
                |mut dw, (((dxc, xc), dyc), ic)| {
                    let mut g = vec![0.0f32; hdim];
                    for (((dxr, xr), dyr), &r) in dxc
                        .chunks_mut(hdim)
                        .zip(xc.chunks(hdim))
                        .zip(dyc.chunks(hdim))
                        .zip(ic)
                    {
                        for ((gv, &d), &wv) in g.iter_mut().zip(dyr).zip(ws.iter()) {
                            *gv = d * wv;
                        }
                        let c = cpu::dot(&g, xr) * r * r / hdim as f32;
                        for (((o, &gv), &xv), (dwv, &d)) in
                            dxr.iter_mut().zip(&g).zip(xr).zip(dw.iter_mut().zip(dyr))
                        {
                            *o = r * (gv - xv * c);
                            *dwv += d * xv * r;
                        }
                    }
                    dw
                },
            )
            .reduce(
                || vec![0.0f32; hdim],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            );
        if let Some(n) = nx {
            grads.register::<Flex>(n.id, flex(dx, &shape));
        }
        if let Some(n) = nw {
            grads.register::<Flex>(n.id, flex(dw, &[hdim]));
        }
    }
}

/// `silu(g) * u` (SwiGLU's gate); `None` when not on the CPU backend.
pub fn swiglu<const D: usize>(g: &Tensor<D>, u: &Tensor<D>) -> Option<Tensor<D>> {
    if !enabled() || g.dims() != u.dims() {
        return None;
    }
    if let (Ok(ga), Ok(ua)) = (
        g.clone().try_into_primitive::<Autodiff<Flex>>(),
        u.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let out = match SwigluBackward
            .prepare::<NoCheckpointing>([ga.node(), ua.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = swiglu_forward(ga.primitive(), ua.primitive())?;
                prep.finish((ga.primitive().clone(), ua.primitive().clone()), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(swiglu_forward(ga.primitive(), ua.primitive())?)
            }
        };
        return Some(Tensor::from_primitive::<Autodiff<Flex>>(out));
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
    let shape = g.layout().shape().as_slice().to_vec();
    let (gs, us) = (host(g)?, host(u)?);
    let mut y = vec![0.0f32; gs.len()];
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            gs.par_chunks(ELEMS_PER_TASK)
                .zip(us.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(yc, (gc, uc))| swiglu_chunk(yc, gc, uc));
    Some(flex(y, &shape))
}

fn swiglu_chunk(y: &mut [f32], g: &[f32], u: &[f32]) {
    #[inline(always)]
    fn body(y: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
            *o = a * sigmoid(a) * b;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn body_avx2(y: &mut [f32], g: &[f32], u: &[f32]) {
        body(y, g, u)
    }
    #[cfg(target_arch = "x86_64")]
    if cpu::has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { body_avx2(y, g, u) };
    }
    body(y, g, u)
}

fn swiglu_backward_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    #[inline(always)]
    fn body(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        for i in 0..dy
            .len()
            .min(g.len())
            .min(u.len())
            .min(dg.len())
            .min(du.len())
        {
            let (a, b, d) = (g[i], u[i], dy[i]);
            let s = sigmoid(a);
            du[i] = d * a * s;
            dg[i] = d * b * s * (1.0 + a * (1.0 - s));
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn body_avx2(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        body(dg, du, g, u, dy)
    }
    #[cfg(target_arch = "x86_64")]
    if cpu::has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { body_avx2(dg, du, g, u, dy) };
    }
    body(dg, du, g, u, dy)
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [ng, nu] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (g, u) = ops.state;
        let shape = g.layout().shape().as_slice().to_vec();
        let (gs, us, dys) = (
            host(&g).expect("f32 gate"),
            host(&u).expect("f32 up"),
            host(&dy).expect("f32 gradient"),
        );
        let mut dg = vec![0.0f32; gs.len()];
        let mut du = vec![0.0f32; gs.len()];
        dg.par_chunks_mut(ELEMS_PER_TASK)
            .zip(du.par_chunks_mut(ELEMS_PER_TASK))
            .zip(gs.par_chunks(ELEMS_PER_TASK))
            .zip(
                us.par_chunks(ELEMS_PER_TASK)
                    .zip(dys.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(((a, b), gc), (uc, dc))| swiglu_backward_chunk(a, b, gc, uc, dc));
        if let Some(n) = ng {
            grads.register::<Flex>(n.id, flex(dg, &shape));
        }
        if let Some(n) = nu {
            grads.register::<Flex>(n.id, flex(du, &shape));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;

    fn rand<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        let mut x = seed;
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 8.0 - 4.0
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
