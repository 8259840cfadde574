//! The NLIRG weight curve: the one place its math lives (the formula, defaults and golden weights are in
//! docs/losses.md, `nlirg`).
//!
//! The curve rises with the token's loss up to `split` (tokens the model already knows barely move it), then
//! falls (very hard tokens are attenuated to protect general ability) and drops to zero at `cutoff`
//! (near-certain noise). It is deliberately discontinuous at `split`, exactly as the reference.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::burn::tensor::activation::sigmoid;

/// f32 machine epsilon, added so that no supervised token below the cutoff gets an exactly-zero weight.
pub const EPS: f64 = 1.192_092_9e-7;

/// The curve's shape. Field names are the config keys under `[loss.params]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Curve {
    /// Height of both sigmoid branches; the curve never exceeds it.
    pub a: f64,
    /// Loss at which the rising branch crosses `a / 2`.
    pub x0: f64,
    /// Steepness of the rising branch.
    pub k: f64,
    /// Loss where the rising branch hands over to the falling one.
    pub split: f64,
    /// Loss at which the falling branch crosses `a / 2` (a literal 6.2 in the original).
    pub center: f64,
    /// Steepness of the falling branch (a literal 1 in the original).
    pub slope: f64,
    /// Losses at or above this are treated as noise and get weight 0.
    pub cutoff: f64,
    /// Small constant added on the falling branch.
    pub floor: f64,
}

impl Default for Curve {
    fn default() -> Self {
        Curve {
            a: 1.0,
            x0: 1.2,
            k: 1.7,
            split: 3.0,
            center: 6.2,
            slope: 1.0,
            cutoff: 15.0,
            floor: 5e-8,
        }
    }
}

/// Logistic function that cannot overflow: the exponent is clamped like the reference does (f64-safe range),
/// and `1 / (1 + inf)` is a clean 0 rather than NaN anyway.
fn sigmoid_f64(z: f64) -> f64 {
    1.0 / (1.0 + (-z).clamp(-709.0, 709.0).exp())
}

impl Curve {
    /// The weight of one token with loss `l` (nats). Non-finite losses get 0: they must never reach the optimizer.
    pub fn weight(&self, l: f64) -> f64 {
        if !l.is_finite() || l >= self.cutoff {
            0.0
        } else if l <= self.split {
            self.a * sigmoid_f64(self.k * (l - self.x0)) + EPS
        } else {
            self.a * sigmoid_f64(self.slope * (self.center - l)) + EPS + self.floor
        }
    }

    /// The same curve on a device tensor of detached losses `[N]`; f32 throughout, no NaN for any input.
    pub fn weights(&self, loss: Tensor<1>) -> Tensor<1> {
        let nan = loss.clone().is_nan();
        // Replace NaN by a value past the cutoff so every comparison below is well defined; +inf already is.
        let l = loss.mask_fill(nan, self.cutoff + 1.0);
        // Clamping keeps exp finite in f32 (|z| <= 80 => exp(z) < 5.6e34) without changing any weight at f32 precision.
        let rising = sigmoid(
            l.clone()
                .sub_scalar(self.x0)
                .mul_scalar(self.k)
                .clamp(-80.0, 80.0),
        )
        .mul_scalar(self.a)
        .add_scalar(EPS);
        let falling = sigmoid(
            l.clone()
                .neg()
                .add_scalar(self.center)
                .mul_scalar(self.slope)
                .clamp(-80.0, 80.0),
        )
        .mul_scalar(self.a)
        .add_scalar(EPS + self.floor);
        let w = falling.mask_where(l.clone().lower_equal_elem(self.split), rising);
        w.mask_fill(l.greater_equal_elem(self.cutoff), 0.0)
    }
}
