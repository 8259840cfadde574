//! The model interface the trainer drives. Architectures live in `ytrainer-models`; the trainer only needs
//! hidden states, an LM head it can apply to the few rows that carry targets, and a way to export results.

use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::prelude::*;

/// One micro-batch as the model sees it. Rows are right-padded to a common length `T`.
///
/// Packed rows (continued pretraining) hold several documents: `position_ids` restart at 0 for each document
/// and `segment_ids` give each document its own id, so that attention never crosses a document border.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// Token ids, `[B, T]`.
    pub input_ids: Tensor<2, Int>,
    /// Rotary positions, `[B, T]`.
    pub position_ids: Tensor<2, Int>,
    /// Document id per token, `[B, T]`; a query attends to keys `k <= q` with the same id. `0` marks padding.
    pub segment_ids: Tensor<2, Int>,
}

/// The LM head's weight as the trainer's fused head + cross-entropy path needs it.
#[derive(Debug, Clone)]
pub struct LmHeadWeight {
    /// Parameter id (for adding the head's gradient; a tied head shares the embedding's id).
    pub id: burn::module::ParamId,
    /// The weight tensor.
    pub weight: Tensor<2>,
    /// Its layout.
    pub layout: HeadLayout,
    /// Whether the optimizer updates it (false under LoRA: no head gradient is computed at all).
    pub trainable: bool,
}

/// The backward half of a forward pass run by [`CausalLm::hidden_states_at_recomputed`].
pub trait Recompute {
    /// Back-propagates `grad` (the loss's gradient at `rows`, the tensor returned with this) through the model,
    /// recomputing each layer on the way down. Each piece's gradients go to `sink` as soon as they exist (the
    /// trainer moves the parameters' ones into its accumulator), so no two layers' graphs are alive at once.
    fn backward(self: Box<Self>, rows: Tensor<2>, grad: Tensor<2>, sink: &mut dyn GradSink);
}

/// Where [`Recompute::backward`] puts the gradients it makes.
pub trait GradSink {
    /// The gradients of one piece of the model's graph.
    fn graph(&mut self, grads: &mut burn::tensor::Gradients);
    /// A gradient that is nonzero in a few rows only: `rows[i]` (`[N, cols]`) adds to row `ids[i]` of parameter
    /// `id` (`shape`). The embedding's: added into the accumulated gradient in place, instead of a
    /// vocabulary-sized buffer per micro-batch that would then be summed in (two such buffers at the peak).
    fn rows(&mut self, id: ParamId, ids: Tensor<1, Int>, rows: Tensor<2>, shape: [usize; 2]);
}

/// A decoder-only language model the trainer can fine-tune.
pub trait CausalLm: Module {
    /// Final hidden states after the last norm, `[B, T, hidden]`.
    fn hidden_states(&self, input: &ModelInput) -> Tensor<3>;

    /// Final hidden states at `rows` only (flat `b * T + t` indices, ascending; `host_rows` the same on the host),
    /// `[N, hidden]`. The default computes every position and selects; a model may skip the work no target
    /// needs (see the decoder's last layer).
    fn hidden_states_at(
        &self,
        input: &ModelInput,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Tensor<2> {
        let _ = host_rows;
        let hidden = self.hidden_states(input);
        let [b, t, h] = hidden.dims();
        hidden.reshape([b * t, h]).select(0, rows.clone())
    }

    /// [`CausalLm::hidden_states_at`] with activation recomputation (`train.gradient_checkpointing`): the forward
    /// pass keeps only each layer's input, and [`Recompute::backward`] runs each layer again, one at a time, to
    /// back-propagate through it. Peak memory then holds one layer's activations instead of all of them, for
    /// about one more forward pass of compute. `None`: not enabled for this model (the caller takes the plain
    /// path).
    fn hidden_states_at_recomputed(
        &self,
        input: &ModelInput,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Option<(Tensor<2>, Box<dyn Recompute + '_>)> {
        let _ = (input, rows, host_rows);
        None
    }

    /// Applies the LM head to rows of hidden states: `[N, hidden] -> [N, vocab]`.
    /// Split from [`CausalLm::hidden_states`] so the trainer computes logits only where there are targets.
    fn lm_head(&self, hidden: Tensor<2>) -> Tensor<2>;

    /// Vocabulary size (columns of the LM head).
    fn vocab_size(&self) -> usize;

    /// The LM head as one weight matrix, for the trainer's closed-form head + cross-entropy path
    /// ([`crate::lm_loss`]). `None` makes the trainer differentiate through [`CausalLm::lm_head`] instead.
    fn lm_head_weight(&self) -> Option<LmHeadWeight> {
        None
    }

    /// Runs `f` on the reference model of reference-based losses (`rho1`): a separately loaded model when one was
    /// configured (`[loss] reference_model`), else this model with every adapter (LoRA branch) switched off, i.e.
    /// the frozen base. `None` when there is neither.
    fn adapters_disabled<R>(&self, f: impl FnOnce(&Self) -> R) -> Option<R>
    where
        Self: Sized,
    {
        let _ = f;
        None
    }

    /// Writes what a user takes back to the ecosystem: a PEFT adapter directory for LoRA, or a Hugging Face
    /// checkpoint (`config.json` + safetensors) for full fine-tuning. Returns the files written.
    fn export(&self, dir: &Path) -> Result<Vec<PathBuf>, String>;
}

/// How the head weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[vocab, hidden]` (a tied embedding matrix).
    VocabMajor,
    /// `[hidden, vocab]` (Burn's `Linear` layout).
    HiddenMajor,
}
