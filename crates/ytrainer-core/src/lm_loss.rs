//! The LM head and cross-entropy outside the autodiff graph.
//!
//! Under autodiff, `log_softmax(h E^T)` keeps several `[N, vocab]` tensors alive for the backward pass and runs
//! the softmax backward as many small ops. The gradient of `sum_i w_i * CE_i` with respect to the logits is known
//! in closed form, `G = (softmax - onehot) * w`, so the trainer computes it directly on plain tensors:
//! `dh = G E` flows back into the model body through a surrogate `sum(h * dh)`, and `dE = G^T h` is added to the
//! head's gradient by hand. Rows are processed in chunks so no more than `chunk x vocab` floats are live.

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::softmax;

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

/// How the head weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[vocab, hidden]` (a tied embedding matrix).
    VocabMajor,
    /// `[hidden, vocab]` (Burn's `Linear` layout).
    HiddenMajor,
}

/// `h W^T` (vocab-major) or `h W` (hidden-major): logits `[N, vocab]`.
pub fn logits(h: Tensor<2>, w: &Tensor<2>, layout: HeadLayout) -> Tensor<2> {
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

/// Gradients of `sum_i weights_i * CE_i` from already computed log-probabilities `lp` `[N, vocab]` (plain
/// tensors): `dh` `[N, hidden]`, and the head weight's gradient (in the weight's layout) when `head_grad`.
/// `G = (softmax - onehot) * w`; `dh = G W` (vocab-major) and `dW = G^T h`.
pub fn head_grads(
    lp: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Tensor<1>,
    h: Tensor<2>,
    w: &Tensor<2>,
    layout: HeadLayout,
    head_grad: bool,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let n = targets.dims()[0];
    let wc = weights.reshape([n, 1]);
    let g = lp.exp().mul(wc.clone()).scatter(
        1,
        targets.reshape([n, 1]),
        wc.neg(),
        IndexingUpdateOp::Add,
    );
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

/// Forward statistics: CE (and entropy) per target row of `h` (`[N, hidden]`, plain tensors).
pub fn head_forward(
    h: &Tensor<2>,
    w: &Tensor<2>,
    layout: HeadLayout,
    targets: &Tensor<1, Int>,
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
        let m = end - start;
        let max = z.clone().max_dim(1);
        let shifted = z.sub(max);
        let lse = shifted.clone().exp().sum_dim(1).log();
        let logp = shifted.sub(lse);
        let t = targets.clone().slice(start..end).reshape([m, 1]);
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
        start = end;
    }
    out
}

/// Gradients of `sum_i weights_i * CE_i`: `dh` `[N, hidden]` and the head weight's gradient in its own layout.
pub fn head_backward(
    h: &Tensor<2>,
    w: &Tensor<2>,
    layout: HeadLayout,
    targets: &Tensor<1, Int>,
    weights: &Tensor<1>,
    chunk: usize,
) -> (Tensor<2>, Tensor<2>) {
    let [n, _] = h.dims();
    let mut dh_parts = Vec::new();
    let mut dw: Option<Tensor<2>> = None;
    let mut start = 0;
    while start < n {
        let end = (start + chunk.max(1)).min(n);
        let m = end - start;
        let hc = h.clone().slice(start..end);
        let p = softmax(logits(hc.clone(), w, layout), 1);
        let t = targets.clone().slice(start..end).reshape([m, 1]);
        let wc = weights.clone().slice(start..end).reshape([m, 1]);
        // (softmax - onehot) * w, with the onehot subtracted in place at the target columns.
        let g = p
            .mul(wc.clone())
            .scatter(1, t, wc.neg(), IndexingUpdateOp::Add);
        let (dh, dwc) = match layout {
            HeadLayout::VocabMajor => (g.clone().matmul(w.clone()), g.transpose().matmul(hc)),
            HeadLayout::HiddenMajor => (
                g.clone().matmul(w.clone().transpose()),
                hc.transpose().matmul(g),
            ),
        };
        dh_parts.push(dh);
        dw = Some(match dw {
            Some(acc) => acc.add(dwc),
            None => dwc,
        });
        start = end;
    }
    let dh = Tensor::cat(dh_parts, 0);
    let dw = dw.unwrap_or_else(|| w.zeros_like());
    (dh, dw)
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

        for chunk in [1, 3, 100] {
            let stats = head_forward(&h, &e, HeadLayout::VocabMajor, &targets, true, chunk);
            for (a, b) in stats.ce.iter().zip(&ce_ref) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            let (dh, de) = head_backward(&h, &e, HeadLayout::VocabMajor, &targets, &w, chunk);
            let diff =
                |a: Tensor<2>, b: Tensor<2>| -> f32 { a.sub(b).abs().max().into_scalar::<f32>() };
            assert!(diff(dh, gh.clone()) < 1e-5);
            assert!(diff(de, ge.clone()) < 1e-5);
            // the same head stored hidden-major
            let (dh2, de2) = head_backward(
                &h,
                &e.clone().transpose(),
                HeadLayout::HiddenMajor,
                &targets,
                &w,
                chunk,
            );
            assert!(diff(dh2, gh.clone()) < 1e-5);
            assert!(diff(de2.transpose(), ge.clone()) < 1e-5);
        }
    }
}
