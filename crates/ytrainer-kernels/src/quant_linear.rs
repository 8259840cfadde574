//! `x·Wᵀ + b + s·(x·A)·B` with a frozen, quantised `W` ([`QuantWeight`]) as one autodiff operation on the CPU.
//!
//! The base weight is not a tensor at all, so it has no autodiff node and never receives a gradient; the
//! backward pass produces `dX` (through the tiled `dY·W`), `dA` and `dB`. The LoRA products are the thin ones of
//! `fused::linear`; unlike there, the adapter is never merged into the weight (that would need the f32 weight the
//! quantised base exists to avoid).

use std::sync::Arc;

use burn::prelude::*;
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::cpu::{matmul, matmul_new};
use crate::fused::{all_f32, host, record};
use crate::quant::QuantWeight;

fn flex(v: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape.to_vec()))
}

/// A frozen tensor's Flex primitive, whether or not it sits under autodiff.
fn plain<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    match t.clone().try_into_primitive::<Autodiff<Flex>>() {
        Ok(a) => Some(a.primitive().clone()),
        Err(_) => t.clone().try_into_primitive::<Flex>().ok(),
    }
}

/// `x·Wᵀ + b + s·(x·A)·B` over the last dimension of `x` (`[.., cols]` -> `[.., rows]`); `lora` is
/// `(A [cols, r], B [r, rows], s)`. `None` when the tensors are not f32 on the CPU backend (the caller then
/// dequantises the weight into a tensor for that layer).
pub fn quant_linear<const D: usize>(
    x: &Tensor<D>,
    w: &Arc<QuantWeight>,
    bias: Option<&Tensor<1>>,
    lora: Option<(&Tensor<2>, &Tensor<2>, f32)>,
) -> Option<Tensor<D>> {
    if !crate::enabled()
        || !all_f32(&[x])
        || bias.is_some_and(|b| !all_f32(&[b]))
        || lora.is_some_and(|(a, b, _)| !all_f32(&[a, b]))
    {
        return None;
    }
    let bias = match bias {
        Some(b) => Some(plain(b)?),
        None => None,
    };
    let scale = lora.map_or(0.0, |l| l.2);
    if let Ok(xa) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
        let ad = |t: &Tensor<2>| t.clone().try_into_primitive::<Autodiff<Flex>>().ok();
        let mats = match lora {
            Some((a, b, _)) => Some((ad(a)?, ad(b)?)),
            None => None,
        };
        let fwd = |keep: bool| {
            let ab = mats.as_ref().map(|(a, b)| (a.primitive(), b.primitive()));
            let (y, t) = forward(xa.primitive(), w, bias.as_ref(), ab, scale, keep)?;
            let state = keep.then(|| {
                Arc::new(State {
                    x: xa.primitive().clone(),
                    w: w.clone(),
                    ab: mats
                        .as_ref()
                        .map(|(a, b)| (a.primitive().clone(), b.primitive().clone())),
                    t,
                    scale,
                })
            });
            Some((y, state))
        };
        return match &mats {
            None => record(QuantLinearBackward::<1>, [xa.node()], fwd),
            Some((a, b)) => record(
                QuantLinearBackward::<3>,
                [xa.node(), a.node(), b.node()],
                fwd,
            ),
        };
    }
    let xf = x.clone().try_into_primitive::<Flex>().ok()?;
    let ab = match lora {
        Some((a, b, _)) => Some((
            a.clone().try_into_primitive::<Flex>().ok()?,
            b.clone().try_into_primitive::<Flex>().ok()?,
        )),
        None => None,
    };
    let (y, _) = forward(
        &xf,
        w,
        bias.as_ref(),
        ab.as_ref().map(|(a, b)| (a, b)),
        scale,
        false,
    )?;
    Some(Tensor::from_primitive::<Flex>(y))
}

/// The forward pass; also returns `t = x·A` when `keep` (the backward pass needs it for `dB`).
fn forward(
    x: &FlexTensor,
    w: &QuantWeight,
    bias: Option<&FlexTensor>,
    ab: Option<(&FlexTensor, &FlexTensor)>,
    scale: f32,
    keep: bool,
) -> Option<(FlexTensor, Option<FlexTensor>)> {
    let _span = crate::prof::span(crate::prof::Op::LinearForward);
    let mut shape = x.layout().shape().as_slice().to_vec();
    let (d_in, d_out) = (w.cols, w.rows);
    if shape.last() != Some(&d_in) || d_in == 0 {
        return None;
    }
    let xs = host(x)?;
    let n = xs.len() / d_in;
    let lora = match ab {
        Some((a, b)) => {
            let [a_in, r] = a.layout().shape().dims::<2>();
            let [b_r, b_out] = b.layout().shape().dims::<2>();
            if a_in != d_in || b_r != r || b_out != d_out {
                return None;
            }
            Some((host(a)?, host(b)?, r))
        }
        None => None,
    };
    let (mut y, t) = rayon::join(
        || w.matmul_t(&xs, n),
        || {
            lora.as_ref().map(|(a, _, r)| {
                let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
                matmul_new(&xs, a, (n, *r, d_in), false, false, 1.0)
            })
        },
    );
    let mut kept = None;
    if let (Some((_, b, r)), Some(t)) = (&lora, t) {
        matmul(&mut y, &t, b, (n, d_out, *r), false, false, true, scale);
        if keep {
            kept = Some(flex(t, &[n, *r]));
        }
    }
    if let Some(b) = bias {
        let bs = host(b)?;
        if bs.len() != d_out {
            return None;
        }
        y.par_chunks_mut(d_out).for_each(|row| {
            for (o, &v) in row.iter_mut().zip(bs.iter()) {
                *o += v;
            }
        });
    }
    *shape.last_mut()? = d_out;
    Some((flex(y, &shape), kept))
}

#[derive(Debug)]
struct State {
    x: FlexTensor,
    w: Arc<QuantWeight>,
    ab: Option<(FlexTensor, FlexTensor)>,
    /// `x·A`, `[N, r]`.
    t: Option<FlexTensor>,
    scale: f32,
}

#[derive(Debug)]
struct QuantLinearBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for QuantLinearBackward<N> {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let _span = crate::prof::span(crate::prof::Op::LinearBackward);
        let s = ops.state;
        // Parents in the order `quant_linear` recorded them: x, [A, B].
        let mut parents = ops.parents.into_iter();
        let nx = parents.next().flatten();
        let (na, nb) = (parents.next().flatten(), parents.next().flatten());
        let dy = grads.consume::<Flex>(&ops.node);
        let x_shape = s.x.layout().shape().as_slice().to_vec();
        let (d_in, d_out) = (s.w.cols, s.w.rows);
        let (xs, dys) = (
            host(&s.x).expect("f32 input"),
            host(&dy).expect("f32 gradient"),
        );
        let n = xs.len() / d_in;
        let lora = s.ab.as_ref().map(|(a, b)| {
            (
                host(a).expect("f32 A"),
                host(b).expect("f32 B"),
                a.layout().shape().dims::<2>()[1],
            )
        });
        // u = dY·Bᵀ, the gradient at the LoRA bottleneck before the scale: needed for dA and dX.
        let u = lora.as_ref().map(|(_, b, r)| {
            let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
            matmul_new(&dys, b, (n, *r, d_out), false, true, 1.0)
        });
        let dx = || {
            let node = nx?;
            let mut dx = s.w.matmul(&dys, n);
            if let (Some((a, _, r)), Some(u)) = (&lora, &u) {
                let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
                matmul(&mut dx, u, a, (n, d_in, *r), false, true, true, s.scale);
            }
            Some((node, dx))
        };
        let dab = || {
            let (_, _, r) = lora.as_ref()?;
            let _lora = crate::prof::span(crate::prof::Op::LoraProducts);
            let da = na.map(|node| {
                let u = u.as_ref().expect("u computed with a LoRA branch");
                (
                    node,
                    matmul_new(&xs, u, (d_in, *r, n), true, false, s.scale),
                )
            });
            let db = nb.map(|node| {
                let t =
                    s.t.as_ref()
                        .expect("x·A kept when the LoRA branch is tracked");
                let ts = host(t).expect("f32 x·A");
                (
                    node,
                    matmul_new(&ts, &dys, (*r, d_out, n), true, false, s.scale),
                )
            });
            Some((da, db, *r))
        };
        let (dx, dab) = rayon::join(dx, dab);
        if let Some((node, dx)) = dx {
            grads.register::<Flex>(node.id, flex(dx, &x_shape));
        }
        if let Some((da, db, r)) = dab {
            if let Some((node, da)) = da {
                grads.register::<Flex>(node.id, flex(da, &[d_in, r]));
            }
            if let Some((node, db)) = db {
                grads.register::<Flex>(node.id, flex(db, &[r, d_out]));
            }
        }
    }
}
