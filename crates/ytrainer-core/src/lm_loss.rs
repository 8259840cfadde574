//! The LM head and cross-entropy outside the autodiff graph.
//!
//! Under autodiff, `log_softmax(h E^T)` keeps several `[N, vocab]` tensors alive for the backward pass and runs
//! the softmax backward as many small ops. The gradient of `sum_i w_i * CE_i` with respect to the logits is known
//! in closed form, `G = (softmax - onehot) * w`, so the trainer computes it directly on plain tensors:
//! `dh = G E` flows back into the model body through a surrogate `sum(h * dh)`, and `dE = G^T h` is added to the
//! head's gradient by hand. Rows are processed in chunks so no more than `chunk x vocab` floats are live.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, IndexingUpdateOp};

use ytrainer_kernels::head::host_matmul as host_product;
pub use ytrainer_kernels::head::{HostLogits, narrow};

/// Per-token statistics of a chunked forward pass.
#[derive(Debug, Clone, Default)]
pub struct HeadStats {
    /// Cross-entropy per target, nats.
    pub ce: Vec<f32>,
    /// Predictive entropy per target (when asked for).
    pub entropy: Option<Vec<f32>>,
    /// Argmax prediction per target.
    pub argmax: Vec<i64>,
}

// The layout belongs to the model interface (`LmHeadWeight`); the head kernels here read it.
pub use crate::model::HeadLayout;

/// `h W^T` (vocab-major) or `h W` (hidden-major): logits `[N, vocab]`.
pub fn logits(h: Tensor<2>, w: &Tensor<2>, layout: HeadLayout) -> Tensor<2> {
    let [n, hidden] = h.dims();
    let vocab = match layout {
        HeadLayout::VocabMajor => w.dims()[0],
        HeadLayout::HiddenMajor => w.dims()[1],
    };
    if let Some(z) = host_product(
        &h,
        w,
        (n, vocab, hidden),
        (false, layout == HeadLayout::VocabMajor),
    ) {
        return z;
    }
    match layout {
        HeadLayout::VocabMajor => h.matmul(w.clone().transpose()),
        HeadLayout::HiddenMajor => h.matmul(w.clone()),
    }
}

fn host_i64(t: Tensor<1, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap_or_default()
}

/// `t` in f32: softmax, log-sum-exp and cross-entropy lose too much in bf16 (a bf16 log-probability near -10 is
/// off by up to 0.03), so the head's statistics are computed in f32 whatever the model's precision.
pub fn widen<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    narrow(t, DType::F32)
}

/// `(softmax - onehot) * w` from log-probabilities `lp` `[N, vocab]` (the tensor path of [`HostLogits::into_grad`]).
pub fn ce_grad_from_log_probs(
    lp: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Tensor<1>,
) -> Tensor<2> {
    let n = targets.dims()[0];
    let wc = weights.reshape([n, 1]);
    lp.exp()
        .mul(wc.clone())
        .scatter(1, targets.reshape([n, 1]), wc.neg(), IndexingUpdateOp::Add)
}

/// Back through the head from the logits' gradient `g` `[N, vocab]`: `dh` `[N, hidden]`, and the head weight's
/// gradient (in the weight's layout) when `head_grad`. `dh = G W` (vocab-major) and `dW = G^T h`.
pub fn head_grads(
    g: Tensor<2>,
    h: Tensor<2>,
    w: &Tensor<2>,
    layout: HeadLayout,
    head_grad: bool,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let [n, vocab] = g.dims();
    let hidden = h.dims()[1];
    let vocab_major = layout == HeadLayout::VocabMajor;
    if let Some(dh) = host_product(&g, w, (n, hidden, vocab), (false, !vocab_major)) {
        let dw = if !head_grad {
            None
        } else if vocab_major {
            host_product(&g, &h, (vocab, hidden, n), (true, false))
        } else {
            host_product(&h, &g, (hidden, vocab, n), (true, false))
        };
        if dw.is_some() || !head_grad {
            return (dh, dw);
        }
    }
    let dh = match layout {
        HeadLayout::VocabMajor => g.clone().matmul(w.clone()),
        HeadLayout::HiddenMajor => g.clone().matmul(w.clone().transpose()),
    };
    let dw = head_grad.then(|| match layout {
        HeadLayout::VocabMajor => g.transpose().matmul(h),
        HeadLayout::HiddenMajor => h.transpose().matmul(g),
    });
    (dh, dw)
}

/// The head over `rows` `chunk` rows at a time, each chunk's logits kept on the host ([`HostLogits::try_new`]) and
/// handed to `f` with the chunk's first row; `false` as soon as the logits are not on the CPU backend (the caller
/// then takes the tensor path for the whole batch and ignores what `f` saw).
pub fn host_chunks(
    rows: &Tensor<2>,
    w: &Tensor<2>,
    layout: HeadLayout,
    target_ids: &[usize],
    entropy: bool,
    chunk: usize,
    mut f: impl FnMut(usize, HostLogits),
) -> bool {
    let n = target_ids.len();
    let mut start = 0;
    while start < n {
        let end = (start + chunk.max(1)).min(n);
        let z = logits(rows.clone().slice(start..end), w, layout);
        match HostLogits::try_new(z, &target_ids[start..end], entropy) {
            Ok(host) => f(start, host),
            Err(_) => return false,
        }
        start = end;
    }
    true
}

/// Forward statistics: CE (and entropy) per target row of `h` (`[N, hidden]`, plain tensors), `chunk` rows of
/// logits at a time.
pub fn head_forward(
    h: &Tensor<2>,
    w: &Tensor<2>,
    layout: HeadLayout,
    target_ids: &[usize],
    need_entropy: bool,
    chunk: usize,
) -> HeadStats {
    let n = h.dims()[0];
    let mut out = HeadStats {
        entropy: need_entropy.then(Vec::new),
        ..Default::default()
    };
    let mut start = 0;
    while start < n {
        let end = (start + chunk.max(1)).min(n);
        let z = logits(h.clone().slice(start..end), w, layout);
        match HostLogits::try_new(z, &target_ids[start..end], need_entropy) {
            Ok(host) => {
                for s in &host.stats {
                    out.ce.push(s.ce);
                    out.argmax.push(s.argmax as i64);
                    if let Some(e) = out.entropy.as_mut() {
                        e.push(s.entropy);
                    }
                }
            }
            Err(z) => {
                let m = end - start;
                let logp = log_softmax(widen(z), 1);
                let ids: Vec<i64> = target_ids[start..end].iter().map(|&t| t as i64).collect();
                let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [m, 1]), &h.device());
                out.ce.extend(crate::loss::tensor_to_vec(
                    logp.clone().gather(1, t).reshape([m]).neg(),
                ));
                out.argmax
                    .extend(host_i64(logp.clone().argmax(1).reshape([m])));
                if let Some(e) = out.entropy.as_mut() {
                    let p = logp.clone().exp();
                    e.extend(crate::loss::tensor_to_vec(
                        p.mul(logp).sum_dim(1).reshape([m]).neg(),
                    ));
                }
            }
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::log_softmax;

    fn rand(shape: [usize; 2], seed: u64, device: &Device) -> Tensor<2> {
        let mut x = seed;
        let v: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    /// The closed-form gradients equal autodiff's for `sum(w * CE)`, for both head layouts and chunkings.
    #[test]
    fn matches_autodiff() {
        let plain = Device::flex();
        let ad = plain.clone().autodiff();
        let (n, hdim, v) = (7, 5, 11);
        let h = rand([n, hdim], 1, &plain);
        let e = rand([v, hdim], 2, &plain).mul_scalar(3.0);
        let targets: Tensor<1, Int> =
            Tensor::from_data(TensorData::new(vec![0i64, 3, 10, 4, 4, 7, 1], [n]), &plain);
        let w: Tensor<1> = Tensor::from_data(
            TensorData::new(vec![1.0f32, 0.5, 0.0, 2.0, 0.1, 1.0, 0.7], [n]),
            &plain,
        );

        let ha = Tensor::<2>::from_inner(h.clone()).require_grad();
        let ea = Tensor::<2>::from_inner(e.clone()).require_grad();
        let lp = log_softmax(ha.clone().matmul(ea.clone().transpose()), 1);
        let ce = lp
            .gather(1, Tensor::from_inner(targets.clone()).reshape([n, 1]))
            .reshape([n])
            .neg();
        let loss = ce.clone().mul(Tensor::from_inner(w.clone())).sum();
        let grads = loss.backward();
        let (gh, ge) = (ha.grad(&grads).unwrap(), ea.grad(&grads).unwrap());
        let ce_ref = crate::loss::tensor_to_vec(ce.detach().inner());
        let _ = ad;

        let diff =
            |a: Tensor<2>, b: Tensor<2>| -> f32 { a.sub(b).abs().max().into_scalar::<f32>() };
        let target_ids: Vec<usize> = host_i64(targets.clone())
            .iter()
            .map(|&t| t as usize)
            .collect();
        for chunk in [1, 3, 100] {
            let stats = head_forward(&h, &e, HeadLayout::VocabMajor, &target_ids, true, chunk);
            for (a, b) in stats.ce.iter().zip(&ce_ref) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        let w_host = crate::loss::tensor_to_vec(w.clone());
        for layout in [HeadLayout::VocabMajor, HeadLayout::HiddenMajor] {
            let wt = match layout {
                HeadLayout::VocabMajor => e.clone(),
                HeadLayout::HiddenMajor => e.clone().transpose(),
            };
            // The host kernel and the tensor path give the same logits gradient, and through the head the same
            // gradients as autodiff.
            let Ok(host) = HostLogits::try_new(logits(h.clone(), &wt, layout), &target_ids, false)
            else {
                panic!("CPU logits must take the host path");
            };
            for (s, r) in host.stats.iter().zip(&ce_ref) {
                assert!((s.ce - r).abs() < 1e-5);
            }
            let g_host = host.into_grad(&w_host);
            let lp = log_softmax(logits(h.clone(), &wt, layout), 1);
            let g_tensor = ce_grad_from_log_probs(lp, targets.clone(), w.clone());
            assert!(diff(g_host.clone(), g_tensor) < 1e-6);
            let (dh, de) = head_grads(g_host, h.clone(), &wt, layout, true);
            let de = de.expect("head gradient asked for");
            assert!(diff(dh, gh.clone()) < 1e-5);
            let de = match layout {
                HeadLayout::VocabMajor => de,
                HeadLayout::HiddenMajor => de.transpose(),
            };
            assert!(diff(de, ge.clone()) < 1e-5);
        }
    }
}
