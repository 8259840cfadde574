//! Host passes over parameter-sized buffers on the CPU backend, each one multi-threaded pass where the tensor
//! formulation is several single-threaded ones: adding gradients, scattering embedding rows into a gradient, and
//! the AdamW update. Each hands its inputs back when they are not contiguous f32 CPU tensors (or
//! `YTRAINER_FUSED=0`), so the caller runs the tensor formulation instead; `ytrainer_core::optim` tests both agree.

use burn::prelude::*;

/// `a + b`, on the CPU backend as one multi-threaded pass into `a`'s buffer (Flex adds on one thread, and the
/// tied embedding's two gradients, from the LM head and from the input side, are vocabulary-sized).
pub fn host_add(a: Tensor<1>, b: Tensor<1>) -> Tensor<1> {
    use rayon::prelude::*;
    if !crate::enabled() || b.dims() != a.dims() {
        return a.add(b);
    }
    let (Some(mut af), Some(bf)) = (host_f32(&a), host_f32(&b)) else {
        return a.add(b);
    };
    drop((a, b));
    let bs = bf.as_slice::<f32>().expect("contiguous, checked above");
    crate::cpu::flex_f32_mut(&mut af)
        .expect("f32, checked above")
        .par_chunks_mut(1 << 16)
        .zip(bs.par_chunks(1 << 16))
        .for_each(|(x, y)| {
            for (x, &y) in x.iter_mut().zip(y) {
                *x += y;
            }
        });
    Tensor::from_primitive::<burn_flex::Flex>(af)
}

/// `GradAccumulator::add_rows` on the host: the rows scattered into the previous gradient's own buffer (or into
/// zeros written by both cores), keeping it a CPU tensor the host AdamW pass takes. Hands the inputs back when
/// either is not a contiguous f32 CPU tensor, an id is out of range, or `YTRAINER_FUSED=0` asks for the tensor
/// path (what every other backend takes).
#[allow(clippy::type_complexity, clippy::result_large_err)]
pub fn host_add_rows(
    prev: Option<Tensor<1>>,
    ids: &Tensor<1, Int>,
    rows: Tensor<2>,
    [r, c]: [usize; 2],
) -> Result<Tensor<1>, (Option<Tensor<1>>, Tensor<2>)> {
    if !crate::enabled() {
        return Err((prev, rows));
    }
    let [n, rc] = rows.dims();
    if rc != c {
        return Err((prev, rows));
    }
    let rows_flat = rows.clone().reshape([n * c]);
    let Some(rf) = host_f32(&rows_flat) else {
        return Err((prev, rows));
    };
    let mut base = match &prev {
        Some(p) => match host_f32(p) {
            Some(f) if p.dims()[0] == r * c => f,
            _ => return Err((prev, rows)),
        },
        None => {
            burn_flex::FlexTensor::from_data(TensorData::new(crate::cpu::zeros(r * c), [r * c]))
        }
    };
    let idx: Vec<i64> = ids
        .clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap_or_default();
    if idx.len() != n || idx.iter().any(|&i| i < 0 || i as usize >= r) {
        return Err((prev, rows));
    }
    drop((prev, rows, rows_flat));
    let src = rf.as_slice::<f32>().expect("contiguous, checked above");
    let dst = crate::cpu::flex_f32_mut(&mut base).expect("f32, checked above");
    for (k, &i) in idx.iter().enumerate() {
        let i = i as usize;
        for (d, &s) in dst[i * c..(i + 1) * c]
            .iter_mut()
            .zip(&src[k * c..(k + 1) * c])
        {
            *d += s;
        }
    }
    Ok(Tensor::from_primitive::<burn_flex::Flex>(base))
}

/// The primitive of `t` when it is a contiguous f32 tensor on the CPU backend (what the host passes need; the
/// check on the slice also checks the dtype), else `None`.
pub fn host_f32(t: &Tensor<1>) -> Option<burn_flex::FlexTensor> {
    t.clone()
        .try_into_primitive::<burn_flex::Flex>()
        .ok()
        .filter(|f| f.as_slice::<f32>().is_some())
}

/// A parameter's Adam moments `(m, v)`, absent before its first update.
pub type Moments = Option<(Tensor<1>, Tensor<1>)>;

/// The AdamW update as one multi-threaded pass over `p`, `g` and both moments, in place, when all four are
/// contiguous f32 tensors on the CPU backend. As tensor ops it is a dozen passes over parameter-sized buffers,
/// each on one thread (Flex runs element-wise ops sequentially); here it is one pass on every core. The
/// arithmetic is the tensor path's, in the same order. Hands the inputs back otherwise.
// The tensors handed back on the fallback path are moved, not copied; boxing them buys nothing.
#[allow(clippy::type_complexity, clippy::result_large_err)]
pub fn adamw_update(
    p: Tensor<1>,
    g: Tensor<1>,
    prev: Moments,
    mut k: AdamWConsts,
) -> Result<(Tensor<1>, Tensor<1>, Tensor<1>), (Tensor<1>, Tensor<1>, Moments)> {
    use burn_flex::{Flex, FlexTensor};
    use rayon::prelude::*;
    if !crate::enabled() {
        return Err((p, g, prev));
    }
    let n = p.dims()[0];
    let (Some(pf), Some(gf)) = (host_f32(&p), host_f32(&g)) else {
        return Err((p, g, prev));
    };
    let moments = match &prev {
        Some((m, v)) => match (host_f32(m), host_f32(v)) {
            (Some(mf), Some(vf)) => Some((mf, vf)),
            _ => return Err((p, g, prev)),
        },
        None => None,
    };
    let len = |f: &FlexTensor| f.as_slice::<f32>().map_or(0, |s| s.len());
    if len(&pf) != n
        || len(&gf) != n
        || moments
            .as_ref()
            .is_some_and(|(m, v)| len(m) != n || len(v) != n)
    {
        return Err((p, g, prev));
    }
    // Only the primitives remain, so each buffer is unshared and is written in place (no copy on write).
    drop((p, g, prev));
    k.fresh = moments.is_none();
    let (mut mf, mut vf) = moments.unwrap_or_else(|| {
        let zeros = || FlexTensor::from_data(TensorData::new(crate::cpu::zeros(n), [n]));
        (zeros(), zeros())
    });
    let mut pf = pf;
    const CHUNK: usize = 1 << 14;
    let gsl = gf.as_slice::<f32>().expect("contiguous, checked above");
    let f32_mut = |t| crate::cpu::flex_f32_mut(t).expect("contiguous f32, checked above");
    let (ps, ms, vs) = (f32_mut(&mut pf), f32_mut(&mut mf), f32_mut(&mut vf));
    ps.par_chunks_mut(CHUNK)
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(vs.par_chunks_mut(CHUNK))
        .zip(gsl.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, &k));
    let t = |f: FlexTensor| Tensor::<1>::from_primitive::<Flex>(f);
    Ok((t(pf), t(mf), t(vf)))
}

/// The scalars of one parameter's AdamW update (see [`adamw_update`]), in f32 as the pass computes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConsts {
    /// `beta1`.
    pub b1: f32,
    /// `beta2`.
    pub b2: f32,
    /// `1 - beta1`.
    pub ob1: f32,
    /// `1 - beta2`.
    pub ob2: f32,
    /// Factor the gradient is multiplied by first (normaliser and clipping).
    pub gs: f32,
    /// `1 - lr * weight_decay`.
    pub keep: f32,
    /// Bias correction `1 - beta1^t`.
    pub bc1: f32,
    /// Bias correction `1 - beta2^t`.
    pub bc2: f32,
    /// `eps`.
    pub eps: f32,
    /// Learning rate.
    pub lr: f32,
    /// No moments yet (set by [`adamw_update`] itself).
    pub fresh: bool,
    /// Whether weight decay applies to this parameter.
    pub decay: bool,
}

/// One chunk of the update, built for the CPU's widest vectors (`cpu::simd_dispatch!`): its divisions and square
/// root made the baseline (SSE2) build compute-bound at ~10 GB/s, a third of what two cores can stream. Rust never
/// contracts `a * b + c` into an FMA, so every build gives the tensor path's results bit for bit.
fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamWConsts) {
    #[inline(always)]
    fn body(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamWConsts) {
        let n = p.len().min(m.len()).min(v.len()).min(g.len());
        let (p, m, v, g) = (&mut p[..n], &mut m[..n], &mut v[..n], &g[..n]);
        // The two flags are hoisted out of the loop so that each of the four loops vectorises on its own.
        macro_rules! run {
            ($fresh:expr, $decay:expr) => {
                for i in 0..n {
                    let gi = g[i] * k.gs;
                    if $fresh {
                        m[i] = gi * k.ob1;
                        v[i] = (gi * gi) * k.ob2;
                    } else {
                        m[i] = m[i] * k.b1 + gi * k.ob1;
                        v[i] = v[i] * k.b2 + (gi * gi) * k.ob2;
                    }
                    let pi = if $decay { p[i] * k.keep } else { p[i] };
                    let denom = (v[i] / k.bc2).sqrt() + k.eps;
                    p[i] = pi - ((m[i] / k.bc1) / denom) * k.lr;
                }
            };
        }
        match (k.fresh, k.decay) {
            (true, true) => run!(true, true),
            (true, false) => run!(true, false),
            (false, true) => run!(false, true),
            (false, false) => run!(false, false),
        }
    }
    crate::simd_dispatch!(body, (p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamWConsts) -> ())
}
