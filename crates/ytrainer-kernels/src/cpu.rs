//! Vectorised CPU kernels for the row-wise loops that dominate training after the matrix products.
//!
//! Burn's Flex backend computes `exp` with the scalar libm routine, one thread per op, and splits a softmax into
//! several full passes over memory. On a `[N, vocab]` logits matrix that was a tenth of a training step. These
//! kernels do the same math in one or two passes per row, with an `exp` written so the compiler vectorises it, and
//! spread rows over rayon's pool. Each kernel is a plain function over slices; the AVX2 build of the hot loop is
//! chosen at run time (`is_x86_feature_detected!`), so the binary stays portable.

use rayon::prelude::*;

/// `exp(x)` in f32, written without branches or calls so loops over it vectorise.
///
/// Cody-Waite reduction `x = n ln2 + r`, |r| <= ln2/2, then Cephes' degree-7 polynomial for `e^r` and `2^n` built
/// in the exponent bits. Relative error below 2e-7 over the whole range (tested against `f64::exp`); inputs below
/// -87.3 give exactly 0 (so a masked `-inf` score contributes nothing), inputs above 88.3 are clamped.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer without a call to `round`.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let xc = x.clamp(-87.3, 88.3);
    let k = xc * LOG2E + ROUND;
    let n = k - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // `n` as an integer, read from the low mantissa bits of `k` (which holds 1.5 * 2^23 + n exactly): the same
    // value as `n as i32`, whose saturating, NaN-checking conversion the compiler cannot vectorise (it turned
    // every loop over this function into scalar code).
    let ni = (k.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if underflow { 0.0 } else { e * scale }
}

/// Calls `$generic($args)` compiled for the widest vector extension this CPU has: AVX-512 (x86-64-v4), else
/// AVX2 + FMA, else the portable build. The kernels are `#[inline(always)]` bodies, so each instantiation is
/// compiled for the features of its caller; the choice is made at run time, so the binary stays portable.
#[macro_export]
macro_rules! simd_dispatch {
    ($generic:path, ($($arg:ident : $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
        unsafe fn v4($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
        match $crate::cpu::simd_level() {
            // SAFETY: the CPU has every feature the build enables (detected at run time by `simd_level`).
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::SimdLevel::Avx512 => unsafe { v4($($arg),*) },
            // SAFETY: as above, AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::SimdLevel::Avx2 => unsafe { v3($($arg),*) },
            _ => $generic($($arg),*),
        }
    }};
}

/// The vector extensions the kernels are compiled for on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    /// AVX-512 F/VL/DQ/BW with AVX2 and FMA (x86-64-v4).
    Avx512,
    /// AVX2 and FMA (x86-64-v3).
    Avx2,
    /// Whatever the target's baseline is.
    Portable,
}

/// Detected once. `YTRAINER_SIMD=avx2` or `=portable` caps it (for A/B measurements and to test every build).
pub fn simd_level() -> SimdLevel {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("YTRAINER_SIMD").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let v4 = v3
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512bw");
            match cap.as_str() {
                "portable" => SimdLevel::Portable,
                "avx2" if v3 => SimdLevel::Avx2,
                _ if v4 && cap != "avx2" => SimdLevel::Avx512,
                _ if v3 => SimdLevel::Avx2,
                _ => SimdLevel::Portable,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = cap;
            SimdLevel::Portable
        }
    })
}

/// Per-row statistics of a logits matrix, from which every per-token quantity the trainer reports follows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowStats {
    /// `log sum_j exp(x_j)`.
    pub lse: f32,
    /// Cross-entropy of the row's target: `lse - x_target`.
    pub ce: f32,
    /// Predictive entropy `lse - sum_j p_j x_j` (computed only when asked for, else 0).
    pub entropy: f32,
    /// Index of the largest logit (the first one on ties, as `argmax`).
    pub argmax: u32,
}

/// Lanes of the explicit accumulators: float reductions only vectorise when the code itself keeps independent
/// partial sums (the compiler may not reorder float additions).
const LANES: usize = 8;

#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut max = acc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for &x in tail {
        max = max.max(x);
    }
    max
}

/// The index of the first element equal to `max` (0 when none is): whole tiles are tested with a loop that does not
/// exit early (so it vectorises), and only the tile that holds the match is searched element by element.
#[inline(always)]
fn first_equal(row: &[f32], max: f32) -> u32 {
    const TILE: usize = 64;
    for (t, c) in row.chunks(TILE).enumerate() {
        if c.iter().fold(false, |any, &x| any | (x == max)) {
            let i = c.iter().position(|&x| x == max).unwrap_or(0);
            return (t * TILE + i) as u32;
        }
    }
    0
}

/// `(sum_j e^(x_j - shift), sum_j e^(x_j - shift) (x_j - shift))`, the second only when `weighted`.
///
/// The exponentials go through a small stack buffer first: a plain map loop is what the compiler vectorises
/// reliably (an `exp` inside a reduction loop stays scalar).
#[inline(always)]
fn exp_sums(row: &[f32], shift: f32, weighted: bool) -> (f32, f32) {
    const TILE: usize = 64;
    let mut s = [0.0f32; LANES];
    let mut w = [0.0f32; LANES];
    let mut tmp = [0.0f32; TILE];
    let chunks = row.chunks_exact(TILE);
    let tail = chunks.remainder();
    for c in chunks {
        for (t, &x) in tmp.iter_mut().zip(c) {
            *t = exp_f32(x - shift);
        }
        for (e8, x8) in tmp.chunks_exact(LANES).zip(c.chunks_exact(LANES)) {
            for l in 0..LANES {
                s[l] += e8[l];
            }
            if weighted {
                for l in 0..LANES {
                    w[l] += e8[l] * (x8[l] - shift);
                }
            }
        }
    }
    let (mut sum, mut wsum) = (s.iter().sum::<f32>(), w.iter().sum::<f32>());
    for &x in tail {
        let e = exp_f32(x - shift);
        sum += e;
        wsum += e * (x - shift);
    }
    (sum, wsum)
}

#[inline(always)]
fn row_stats_generic(row: &[f32], target: usize, with_entropy: bool) -> RowStats {
    let max = row_max(row);
    let argmax = first_equal(row, max);
    let (sum, weighted) = exp_sums(row, max, with_entropy);
    let lse = max + sum.ln();
    RowStats {
        lse,
        ce: lse - row[target],
        entropy: if with_entropy {
            (sum.ln() - weighted / sum).max(0.0)
        } else {
            0.0
        },
        argmax,
    }
}

fn row_stats_one(row: &[f32], target: usize, with_entropy: bool) -> RowStats {
    crate::simd_dispatch!(row_stats_generic, (row: &[f32], target: usize, with_entropy: bool) -> RowStats)
}

/// [`RowStats`] of every row of `logits` (`targets.len()` rows of `vocab` values), rows spread over threads.
pub fn row_stats(
    logits: &[f32],
    vocab: usize,
    targets: &[usize],
    with_entropy: bool,
) -> Vec<RowStats> {
    assert_eq!(logits.len(), vocab * targets.len(), "logits shape");
    let _span = crate::prof::span(crate::prof::Op::HeadStats);
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| row_stats_one(row, t, with_entropy))
        .collect()
}

/// Like [`row_stats_generic`], but leaves `e^(x_j - max)` in the row (so the gradient pass needs no second
/// `exp`); returns the statistics and `1 / sum_j e^(x_j - max)`.
#[inline(always)]
fn row_stats_exp_generic(row: &mut [f32], target: usize, with_entropy: bool) -> (RowStats, f32) {
    const TILE: usize = 64;
    let max = row_max(row);
    let argmax = first_equal(row, max);
    let x_target = row[target];
    let mut s = [0.0f32; LANES];
    let mut w = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(TILE);
    for c in &mut chunks {
        let mut tmp = [0.0f32; TILE];
        for (t, &x) in tmp.iter_mut().zip(c.iter()) {
            *t = exp_f32(x - max);
        }
        for (e8, x8) in tmp.chunks_exact(LANES).zip(c.chunks_exact(LANES)) {
            for l in 0..LANES {
                s[l] += e8[l];
            }
            if with_entropy {
                for l in 0..LANES {
                    w[l] += e8[l] * (x8[l] - max);
                }
            }
        }
        c.copy_from_slice(&tmp);
    }
    let (mut sum, mut wsum) = (s.iter().sum::<f32>(), w.iter().sum::<f32>());
    for x in chunks.into_remainder() {
        let e = exp_f32(*x - max);
        sum += e;
        wsum += e * (*x - max);
        *x = e;
    }
    let lse = max + sum.ln();
    let stats = RowStats {
        lse,
        ce: lse - x_target,
        entropy: if with_entropy {
            (sum.ln() - wsum / sum).max(0.0)
        } else {
            0.0
        },
        argmax,
    };
    (stats, 1.0 / sum)
}

fn row_stats_exp_one(row: &mut [f32], target: usize, with_entropy: bool) -> (RowStats, f32) {
    crate::simd_dispatch!(row_stats_exp_generic, (row: &mut [f32], target: usize, with_entropy: bool) -> (RowStats, f32))
}

/// [`row_stats`] that overwrites each row with its unnormalised softmax `e^(x_j - max)` and also returns each
/// row's `1 / sum_j e^(x_j - max)`: what [`softmax_ce_grad_from_exp`] needs, at one `exp` per logit instead of
/// two. For the training step, which needs no logit after the statistics.
pub fn row_stats_exp_inplace(
    logits: &mut [f32],
    vocab: usize,
    targets: &[usize],
    with_entropy: bool,
) -> (Vec<RowStats>, Vec<f32>) {
    assert_eq!(logits.len(), vocab * targets.len(), "logits shape");
    let _span = crate::prof::span(crate::prof::Op::HeadStats);
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| row_stats_exp_one(row, t, with_entropy))
        .unzip()
}

#[inline(always)]
fn scale_grad_generic(row: &mut [f32], factor: f32, weight: f32, target: usize) {
    for x in row.iter_mut() {
        *x *= factor;
    }
    row[target] -= weight;
}

fn scale_grad_one(row: &mut [f32], factor: f32, weight: f32, target: usize) {
    crate::simd_dispatch!(scale_grad_generic, (row: &mut [f32], factor: f32, weight: f32, target: usize) -> ())
}

/// The gradient of `sum_i weights_i * CE_i` from rows left by [`row_stats_exp_inplace`]:
/// `e_j * w / sum - w * [j = target]`, in place.
pub fn softmax_ce_grad_from_exp(
    exps: &mut [f32],
    vocab: usize,
    targets: &[usize],
    inv_sums: &[f32],
    weights: &[f32],
) {
    assert_eq!(exps.len(), vocab * targets.len(), "logits shape");
    let _span = crate::prof::span(crate::prof::Op::HeadGrad);
    exps.par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(inv_sums.par_iter().zip(weights.par_iter()))
        .for_each(|((row, &t), (&inv, &w))| scale_grad_one(row, inv * w, w, t));
}

#[inline(always)]
fn softmax_grad_generic(row: &mut [f32], lse: f32, weight: f32, target: usize) {
    for x in row.iter_mut() {
        *x = exp_f32(*x - lse) * weight;
    }
    row[target] -= weight;
}

fn softmax_grad_one(row: &mut [f32], lse: f32, weight: f32, target: usize) {
    crate::simd_dispatch!(softmax_grad_generic, (row: &mut [f32], lse: f32, weight: f32, target: usize) -> ())
}

/// Overwrites each logits row with the gradient of `weight * CE` with respect to it:
/// `(softmax(x) - onehot(target)) * weight`, using the row's `lse` from [`row_stats`].
pub fn softmax_ce_grad_inplace(
    logits: &mut [f32],
    vocab: usize,
    targets: &[usize],
    stats: &[RowStats],
    weights: &[f32],
) {
    assert_eq!(logits.len(), vocab * targets.len(), "logits shape");
    let _span = crate::prof::span(crate::prof::Op::HeadGrad);
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(stats.par_iter().zip(weights.par_iter()))
        .for_each(|((row, &t), (s, &w))| softmax_grad_one(row, s.lse, w, t));
}

#[inline(always)]
fn exp_shifted_generic(row: &mut [f32], shift: f32) {
    for x in row.iter_mut() {
        *x = exp_f32(*x - shift);
    }
}

/// `row[j] = exp(row[j] - shift)` in place (`-inf` entries become exactly 0).
pub fn exp_shifted_inplace(row: &mut [f32], shift: f32) {
    crate::simd_dispatch!(exp_shifted_generic, (row: &mut [f32], shift: f32) -> ())
}

#[inline(always)]
fn softmax_generic(row: &mut [f32]) -> f32 {
    let max = row_max(row);
    exp_shifted_generic(row, max);
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let sum = acc.iter().sum::<f32>() + tail.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    max + sum.ln()
}

/// Softmax of `row` in place (`-inf` entries, i.e. masked ones, become 0); returns the row's log-sum-exp. The row
/// must hold at least one finite value.
pub fn softmax_inplace(row: &mut [f32]) -> f32 {
    crate::simd_dispatch!(softmax_generic, (row: &mut [f32]) -> f32)
}

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum_j a_j b_j` with vectorised partial sums.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::simd_dispatch!(dot_generic, (a: &[f32], b: &[f32]) -> f32)
}

/// The f32 elements of a CPU-backend tensor, writable in place: made contiguous first when it is not (a copy), its
/// buffer copied on write when shared, and only the tensor's own elements, not the rest of a larger buffer it may
/// view. `None` when the tensor is not f32.
pub fn flex_f32_mut(t: &mut burn_flex::FlexTensor) -> Option<&mut [f32]> {
    if !t.is_contiguous() {
        *t = t.to_contiguous();
    }
    t.as_slice::<f32>()?;
    let (start, end) = t.layout().contiguous_offsets()?;
    Some(&mut t.storage_mut::<f32>()[start..end])
}

/// `n` zeros, written by both cores: `vec![0.0; n]` zeroes on the calling thread alone (a `memset` per kernel
/// output, during which the other core sat idle).
pub fn zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(1 << 16)
        .for_each(|c| {
            for x in c {
                x.write(0.0);
            }
        });
    // SAFETY: every one of the n elements was written just above.
    unsafe { v.set_len(n) };
    v
}

/// `c (m x n) = [c +] beta · op(a) · op(b)` on row-major, contiguous slices; `ta` / `tb` read `a` (stored
/// `[k, m]`) / `b` (stored `[n, k]`) transposed. Multi-threaded above ~7M multiply-adds (Flex's own threshold).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    ta: bool,
    tb: bool,
    accumulate: bool,
    beta: f32,
) {
    assert!(c.len() >= m * n, "matmul output size");
    // SAFETY: c holds at least m x n initialised floats (asserted just above).
    unsafe { matmul_raw(c.as_mut_ptr(), a, b, (m, n, k), (ta, tb), accumulate, beta) }
}

/// `beta · op(a) · op(b)` into a new `m x n` buffer, not zeroed first: the product writes every element.
pub fn matmul_new(
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    ta: bool,
    tb: bool,
    beta: f32,
) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: the buffer has room for m x n floats; with `accumulate` false, matmul_raw writes every one of them
    // without reading any, so all are initialised afterwards.
    unsafe {
        matmul_raw(
            c.spare_capacity_mut().as_mut_ptr().cast(),
            a,
            b,
            (m, n, k),
            (ta, tb),
            false,
            beta,
        );
        c.set_len(m * n);
    }
    c
}

/// # Safety
/// `c` must point to `m x n` writable floats, initialised when `accumulate`.
unsafe fn matmul_raw(
    c: *mut f32,
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
    accumulate: bool,
    beta: f32,
) {
    assert!(a.len() >= m * k && b.len() >= k * n, "matmul operand sizes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: c points to m x n writable floats (the caller's contract).
            unsafe { std::ptr::write_bytes(c, 0, m * n) };
        }
        return;
    }
    let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
    let par = if m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above bounds every index `i * rs + j * cs` of each operand within its slice, the caller
    // guarantees the m x n output, and gemm reads `c` only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_dot() {
        let mut row = vec![
            1.0f32,
            2.0,
            f32::NEG_INFINITY,
            0.5,
            3.0,
            -1.0,
            2.5,
            0.0,
            1.5,
            -2.0,
            4.0,
        ];
        let orig = row.clone();
        let lse = softmax_inplace(&mut row);
        let want_lse = orig
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| (x as f64).exp())
            .sum::<f64>()
            .ln();
        assert!((lse as f64 - want_lse).abs() < 1e-6);
        for (p, x) in row.iter().zip(&orig) {
            let want = if x.is_finite() {
                ((*x as f64) - want_lse).exp()
            } else {
                0.0
            };
            assert!((*p as f64 - want).abs() < 1e-7, "{p} vs {want}");
        }
        let mut again = orig.clone();
        exp_shifted_inplace(&mut again, lse);
        for (a, b) in again.iter().zip(&row) {
            assert!((a - b).abs() < 1e-7);
        }
        let a: Vec<f32> = (0..21).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..21).map(|i| 1.0 - i as f32 * 0.1).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
    }

    #[test]
    fn exp_matches_f64_to_2e7_relative() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(200.0).is_finite());
    }

    fn reference(row: &[f32], t: usize) -> (f64, f64, f64) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        let lse = m + s.ln();
        let h: f64 = row
            .iter()
            .map(|&x| {
                let p = (x as f64 - lse).exp();
                -p * (x as f64 - lse)
            })
            .sum();
        (lse, lse - row[t] as f64, h)
    }

    #[test]
    fn row_stats_and_grad_match_f64_reference() {
        let vocab = 1003; // not a multiple of the vector width
        let rows = 5;
        let logits: Vec<f32> = (0..vocab * rows)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 3) as f32))
            .collect();
        let targets = vec![0, 17, 1002, 500, 3];
        let stats = row_stats(&logits, vocab, &targets, true);
        for (r, s) in stats.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let (lse, ce, h) = reference(row, targets[r]);
            assert!((s.lse as f64 - lse).abs() < 1e-5, "lse {} vs {lse}", s.lse);
            assert!((s.ce as f64 - ce).abs() < 1e-5, "ce {} vs {ce}", s.ce);
            assert!(
                (s.entropy as f64 - h).abs() < 1e-4,
                "entropy {} vs {h}",
                s.entropy
            );
            let want_arg = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &x)| if x > b.1 { (i, x) } else { b },
                )
                .0;
            assert_eq!(s.argmax as usize, want_arg);
        }
        let weights = vec![1.0, 0.5, 0.0, 2.0, 1.0];
        let mut g = logits.clone();
        softmax_ce_grad_inplace(&mut g, vocab, &targets, &stats, &weights);
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let (lse, _, _) = reference(row, targets[r]);
            let mut sum = 0.0f64;
            for j in 0..vocab {
                let mut want = (row[j] as f64 - lse).exp() * weights[r] as f64;
                if j == targets[r] {
                    want -= weights[r] as f64;
                }
                let got = g[r * vocab + j] as f64;
                assert!(
                    (got - want).abs() < 1e-6,
                    "row {r} col {j}: {got} vs {want}"
                );
                sum += got;
            }
            // Softmax minus one-hot sums to zero per row.
            assert!(sum.abs() < 1e-4, "row {r} gradient sums to {sum}");
        }
        // The one-exp variant: same statistics, same gradient.
        let mut e = logits.clone();
        let (stats2, inv) = row_stats_exp_inplace(&mut e, vocab, &targets, true);
        for (a, b) in stats.iter().zip(&stats2) {
            assert!((a.lse - b.lse).abs() < 1e-6 && (a.ce - b.ce).abs() < 1e-6);
            assert!((a.entropy - b.entropy).abs() < 1e-5 && a.argmax == b.argmax);
        }
        softmax_ce_grad_from_exp(&mut e, vocab, &targets, &inv, &weights);
        for (i, (a, b)) in g.iter().zip(&e).enumerate() {
            assert!((a - b).abs() < 1e-6, "element {i}: {a} vs {b}");
        }
    }
}
