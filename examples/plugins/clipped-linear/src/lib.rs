//! `clipped-linear`: an external ytrainer loss plugin. Each token's weight grows linearly with its own loss and
//! is clipped to `[min, max]`:
//!
//! ```text
//! w = clamp(slope * loss + bias, min, max)
//! ```
//!
//! Build: `cargo build --release` in this directory, then
//! `ytrainer --plugin-dir target/release plugins list`.

use ytrainer_plugin::{Batch, Normalize, Param, Params, Plugin, export_plugin};

struct ClippedLinear {
    slope: f32,
    bias: f32,
    min: f32,
    max: f32,
}

impl Plugin for ClippedLinear {
    const NAME: &'static str = "clipped-linear";
    const DESCRIPTION: &'static str = "clipped linear: w = clamp(slope * loss + bias, min, max)";
    const FORMULA: &'static str = "w = clamp(slope * ce + bias, min, max)";
    const PARAMS: &'static [Param] = &[
        Param::new("slope", 0.25, "weight gained per nat of loss"),
        Param::new("bias", 0.1, "weight at loss 0 (before clipping)"),
        Param::new("min", 0.0, "lowest weight (>= 0)"),
        Param::new("max", 1.0, "highest weight (>= min)"),
    ];
    const NORMALIZE: Normalize = Normalize::Tokens;

    fn new(p: &Params) -> Result<Self, String> {
        let (slope, bias, min, max) = (p.get("slope"), p.get("bias"), p.get("min"), p.get("max"));
        if min < 0.0 {
            return Err(format!(
                "`min` = {min}: must be >= 0 (weights must not be negative)"
            ));
        }
        if max < min {
            return Err(format!("`max` = {max}: must be >= `min` ({min})"));
        }
        Ok(ClippedLinear {
            slope: slope as f32,
            bias: bias as f32,
            min: min as f32,
            max: max as f32,
        })
    }

    fn weights(&self, batch: &Batch<'_>, out: &mut [f32]) {
        for (w, &l) in out.iter_mut().zip(batch.loss) {
            // A non-finite loss gets weight 0 (the trainer skips such steps anyway).
            *w = if l.is_finite() {
                (self.slope * l + self.bias).clamp(self.min, self.max)
            } else {
                0.0
            };
        }
    }
}

export_plugin!(ClippedLinear);
