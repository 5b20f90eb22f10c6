//! Building batches ahead of the training loop on a background thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Batch, BatchPlan, BatchPosition, DataError, RowDataset};

/// When a [`Prefetcher`] stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchLimit {
    /// Stop at the end of this many epochs counted from epoch 0 (so a run
    /// resumed in epoch 1 of `Epochs(3)` finishes epochs 1 and 2).
    Epochs(usize),
    /// Stop after handing over this many batches, running through as many
    /// epochs as needed.
    Batches(usize),
}

/// Builds the batches of a [`BatchPlan`] in order on a background thread and
/// hands them over through a bounded channel, so the next batches are ready
/// while the current one trains.
///
/// Iterate it (or call [`Prefetcher::next`]) to get `(position, batch)` pairs;
/// it ends when the [`PrefetchLimit`] is reached. Dropping it stops the thread
/// and waits for it to finish.
pub struct Prefetcher {
    receiver: Option<Receiver<(BatchPosition, Batch)>>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts a thread building batches of `dataset` as `plan` orders them,
    /// from `start` (an index past the end of its epoch moves on to the next
    /// epoch) until `limit`, keeping up to `depth` finished batches waiting (at
    /// least 1).
    ///
    /// Fails when `plan` is not made for `dataset.len()` rows.
    pub fn spawn(
        dataset: Arc<RowDataset>,
        plan: BatchPlan,
        start: BatchPosition,
        limit: PrefetchLimit,
        depth: usize,
    ) -> Result<Prefetcher, DataError> {
        if plan.num_examples() != dataset.len() {
            return Err(DataError::PlanMismatch {
                plan: plan.num_examples(),
                dataset: dataset.len(),
            });
        }
        let (sender, receiver) = sync_channel(depth.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let worker = std::thread::Builder::new()
            .name("philo-prefetch".to_string())
            .spawn(move || {
                let mut position = plan.normalize(start);
                let mut handed_over = 0usize;
                let mut order: Vec<usize> = Vec::new();
                let mut order_epoch: Option<usize> = None;
                loop {
                    if stop_flag.load(Ordering::Relaxed) {
                        return;
                    }
                    let done = match limit {
                        PrefetchLimit::Epochs(epochs) => position.epoch >= epochs,
                        PrefetchLimit::Batches(batches) => handed_over >= batches,
                    };
                    if done {
                        return;
                    }
                    // Shuffle each epoch's order once, not once per batch.
                    if order_epoch != Some(position.epoch) {
                        order = plan.epoch_order(position.epoch);
                        order_epoch = Some(position.epoch);
                    }
                    let indices = plan.slice(&order, position.index);
                    let batch = dataset.batch(indices);
                    if sender.send((position, batch)).is_err() {
                        // The Prefetcher was dropped.
                        return;
                    }
                    handed_over += 1;
                    position = plan.next_position(position);
                }
            })
            .map_err(|e| {
                DataError::InvalidOption(format!("cannot start the prefetch thread: {e}"))
            })?;
        Ok(Prefetcher {
            receiver: Some(receiver),
            stop,
            worker: Some(worker),
        })
    }
}

impl Iterator for Prefetcher {
    type Item = (BatchPosition, Batch);

    /// The next batch and its position, waiting for it if it is not built
    /// yet; `None` once the limit is reached.
    fn next(&mut self) -> Option<(BatchPosition, Batch)> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver wakes a worker blocked on a full channel: its
        // send fails and it returns.
        self.receiver.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("running", &self.worker.is_some())
            .finish()
    }
}
