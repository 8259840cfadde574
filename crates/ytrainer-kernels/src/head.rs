//! The LM head's host side on the CPU backend: logits kept in one host buffer with every row's statistics
//! (CE, log-sum-exp, argmax, entropy), the closed-form gradient written into the same buffer, and the head's
//! GEMMs read straight from the tensors' buffers. `ytrainer_core::lm_loss` and `step` use these when the logits
//! live on the CPU and fall back to tensor ops everywhere else.

use burn::prelude::*;
use burn::tensor::DType;

use crate::cpu::RowStats;

/// Logits `[N, vocab]` held in host memory (the CPU backend) with the statistics of every row, so CE, entropy,
/// argmax and later the gradient come from one vectorised pass each instead of a chain of tensor ops
/// (see [`crate::cpu`]).
pub struct HostLogits {
    /// Always f32, whatever the model's precision: the softmax and CE are where bf16 loses the most.
    logits: burn_flex::FlexTensor,
    /// The dtype of the logits handed in, which the gradient and log-probabilities are given back in.
    dtype: DType,
    vocab: usize,
    targets: Vec<usize>,
    /// Per-row statistics (CE, log-sum-exp, argmax, entropy when asked for).
    pub stats: Vec<RowStats>,
    /// Set by [`HostLogits::try_new_for_grad`]: the buffer then holds `e^(x - max)` per row, not the logits,
    /// and this is each row's `1 / sum e^(x - max)`.
    inv_sums: Option<Vec<f32>>,
}

impl HostLogits {
    /// Takes `logits` when they live on the CPU backend (bf16 / f16 logits are widened to f32 first); gives them
    /// back otherwise (another backend keeps the tensor path).
    // Handing the tensor back (once per micro-batch) is the point of the error variant; boxing it buys nothing.
    #[allow(clippy::result_large_err)]
    pub fn try_new(
        logits: Tensor<2>,
        targets: &[usize],
        with_entropy: bool,
    ) -> Result<Self, Tensor<2>> {
        Self::build(logits, targets, with_entropy, false)
    }

    /// [`HostLogits::try_new`] for a caller that only needs the statistics and then [`HostLogits::into_grad`]:
    /// the statistics pass leaves the softmax numerators in the buffer, so the gradient costs no second `exp`
    /// over `N x vocab` values. [`HostLogits::row`] and [`HostLogits::log_probs`] are then unavailable.
    #[allow(clippy::result_large_err)]
    pub fn try_new_for_grad(
        logits: Tensor<2>,
        targets: &[usize],
        with_entropy: bool,
    ) -> Result<Self, Tensor<2>> {
        Self::build(logits, targets, with_entropy, true)
    }

    #[allow(clippy::result_large_err)]
    fn build(
        logits: Tensor<2>,
        targets: &[usize],
        with_entropy: bool,
        for_grad: bool,
    ) -> Result<Self, Tensor<2>> {
        let [n, vocab] = logits.dims();
        let dtype = logits.dtype();
        if !crate::enabled() {
            return Err(logits);
        }
        let Ok(mut flex) = logits.clone().try_into_primitive::<burn_flex::Flex>() else {
            return Err(logits);
        };
        if dtype != DType::F32 {
            match logits
                .clone()
                .cast(DType::F32)
                .try_into_primitive::<burn_flex::Flex>()
            {
                Ok(wide) => flex = wide,
                Err(_) => return Err(logits),
            }
        }
        if n != targets.len()
            || targets.iter().any(|&t| t >= vocab)
            || flex.as_slice::<f32>().is_none()
        {
            return Err(logits);
        }
        // The tensor handle goes first, so the buffer is ours alone and can be written in place.
        drop(logits);
        let (stats, inv_sums) = if for_grad {
            let buf = crate::cpu::flex_f32_mut(&mut flex).expect("contiguous f32, checked above");
            let (stats, inv) = crate::cpu::row_stats_exp_inplace(buf, vocab, targets, with_entropy);
            (stats, Some(inv))
        } else {
            let slice = flex
                .as_slice::<f32>()
                .expect("contiguous f32, checked above");
            (
                crate::cpu::row_stats(slice, vocab, targets, with_entropy),
                None,
            )
        };
        Ok(Self {
            logits: flex,
            dtype,
            vocab,
            targets: targets.to_vec(),
            stats,
            inv_sums,
        })
    }

    /// Row `i` of the logits (`vocab` values). Not after [`HostLogits::try_new_for_grad`].
    pub fn row(&self, i: usize) -> &[f32] {
        assert!(
            self.inv_sums.is_none(),
            "logits were overwritten by try_new_for_grad"
        );
        let all = self
            .logits
            .as_slice::<f32>()
            .expect("contiguous f32, checked in try_new");
        &all[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Log-probabilities as a tensor (only for plugins that need more than the per-row statistics). Not after
    /// [`HostLogits::try_new_for_grad`].
    pub fn log_probs(&self) -> Tensor<2> {
        assert!(
            self.inv_sums.is_none(),
            "logits were overwritten by try_new_for_grad"
        );
        let n = self.targets.len();
        let logits = Tensor::<2>::from_primitive::<burn_flex::Flex>(self.logits.clone());
        let lse: Vec<f32> = self.stats.iter().map(|s| s.lse).collect();
        let lse = Tensor::<1>::from_data(TensorData::new(lse, [n]), (&logits.device(), DType::F32));
        narrow(logits.sub(lse.reshape([n, 1])), self.dtype)
    }

    /// The gradient of `sum_i weights_i * CE_i` with respect to the logits, `(softmax - onehot) * w`, computed in
    /// place in the logits' buffer.
    pub fn into_grad(mut self, weights: &[f32]) -> Tensor<2> {
        let buf =
            crate::cpu::flex_f32_mut(&mut self.logits).expect("f32 logits, checked in try_new");
        match &self.inv_sums {
            Some(inv) => {
                crate::cpu::softmax_ce_grad_from_exp(buf, self.vocab, &self.targets, inv, weights)
            }
            None => crate::cpu::softmax_ce_grad_inplace(
                buf,
                self.vocab,
                &self.targets,
                &self.stats,
                weights,
            ),
        }
        narrow(
            Tensor::from_primitive::<burn_flex::Flex>(self.logits),
            self.dtype,
        )
    }
}

/// `op(a) · op(b)` (`(m, n, k)`, `op` a transpose where asked) straight from the buffers of contiguous f32 tensors
/// on the CPU backend; `None` elsewhere. Flex's `matmul` first copies a transposed operand into a contiguous one:
/// for the head that is the whole `[vocab, hidden]` weight for every forward pass and the whole `[N, vocab]`
/// logits gradient for every weight gradient, on one thread. The GEMM reads the transposed layout in place.
pub fn host_matmul(
    a: &Tensor<2>,
    b: &Tensor<2>,
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
) -> Option<Tensor<2>> {
    if !crate::enabled() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return None;
    }
    let af = a.clone().try_into_primitive::<burn_flex::Flex>().ok()?;
    let bf = b.clone().try_into_primitive::<burn_flex::Flex>().ok()?;
    let (asl, bsl) = (af.as_slice::<f32>()?, bf.as_slice::<f32>()?);
    if asl.len() != m * k || bsl.len() != k * n {
        return None;
    }
    let c = crate::cpu::matmul_new(asl, bsl, (m, n, k), ta, tb, 1.0);
    Some(Tensor::from_primitive::<burn_flex::Flex>(
        burn_flex::FlexTensor::from_data(TensorData::new(c, [m, n])),
    ))
}

/// `t` in `dtype` (a no-op when it already is): f32 head results go back to the model's float type.
pub fn narrow<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}
