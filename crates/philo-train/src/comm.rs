//! How the ranks of a data-parallel fine-tune combine what each computed. Every rank trains on
//! its share of each accumulation window; before the window's backward the ranks sum their
//! counts of labelled tokens (so each divides by the window's global count), and after it they
//! sum their losses and their LoRA gradients. Each rank then applies the same update to the same
//! adapter, so the adapters stay equal without ever being sent.
//!
//! [`SingleProcess`] is the one-rank case (every sum is the rank's own value).

use candle_core::Tensor;

use crate::error::Result;

/// The ranks of a run, as each rank sees them.
pub trait Communicator {
    /// This rank, 0-based; rank 0 logs, evaluates and writes checkpoints.
    fn rank(&self) -> usize;

    /// Ranks in the run.
    fn world_size(&self) -> usize;

    /// Sums `values` over the ranks in place: every rank gets the same sums (called by every
    /// rank, in the same order).
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;

    /// Sums each f32 tensor over the ranks in place (the gradient accumulators; every rank
    /// passes tensors of the same shapes, in the same order).
    fn all_reduce_tensors(&self, tensors: &[Tensor]) -> Result<()>;
}

/// A run of one rank: the sums are the values themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_tensors(&self, _tensors: &[Tensor]) -> Result<()> {
        Ok(())
    }
}
