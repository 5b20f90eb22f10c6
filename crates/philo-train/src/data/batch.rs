//! Rows (packed or not), batch plans, padded batches and the eval split.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{DataError, DataOptions, Example, IGNORE_INDEX};

/// Splits examples into `(train, eval)`, holding out about `fraction` of them
/// for evaluation.
///
/// The examples are shuffled with a [`StdRng`] seeded with `seed`, so the same
/// inputs always give the same split; each side keeps the shuffled order. With
/// `fraction > 0` and at least two examples both sides get at least one
/// example; with `fraction <= 0` (or fewer than two examples) everything is
/// training data (NaN counts as 0). `fraction` is clamped to at most 1.
pub fn split_eval(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    if fraction.is_nan() || fraction <= 0.0 || n < 2 {
        return (examples, Vec::new());
    }
    let eval_len = ((n as f64 * fraction.min(1.0)).round() as usize).clamp(1, n - 1);
    let mut examples = examples;
    examples.shuffle(&mut StdRng::seed_from_u64(seed));
    let eval = examples.split_off(n - eval_len);
    (examples, eval)
}

/// One row of a batch before padding: one example, or several packed ones.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Row {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` ([`IGNORE_INDEX`] where the loss does not look).
    pub labels: Vec<i64>,
    /// For each token, which example of the row it belongs to: 1, 2, ...
    pub segment_ids: Vec<u32>,
}

impl Row {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the row has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of examples in the row.
    pub fn segments(&self) -> usize {
        self.segment_ids.last().map_or(0, |&s| s as usize)
    }

    fn push(&mut self, example: &Example) {
        let segment = self.segments() as u32 + 1;
        self.input_ids.extend_from_slice(&example.input_ids);
        self.labels.extend_from_slice(&example.labels);
        self.segment_ids
            .extend(std::iter::repeat_n(segment, example.len()));
    }
}

/// The rows that batches are built from, and the padding id.
///
/// Without packing each example is its own row (segment 1). With packing,
/// examples are concatenated into rows of at most `max_seq_length` tokens,
/// each example keeping its own segment id; the model must attend only within
/// a segment and restart positions at each segment (see
/// [`Batch::position_ids`]), so a packed row trains exactly like its examples
/// would one by one, with less padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowDataset {
    rows: Vec<Row>,
    pad_id: u32,
}

impl RowDataset {
    /// One row per example, in order.
    pub fn unpacked(examples: Vec<Example>, pad_id: u32) -> Self {
        let rows = examples
            .into_iter()
            .map(|example| {
                let segment_ids = vec![1; example.len()];
                Row {
                    input_ids: example.input_ids,
                    labels: example.labels,
                    segment_ids,
                }
            })
            .collect();
        RowDataset { rows, pad_id }
    }

    /// Packs examples into rows of at most `max_seq_length` tokens.
    ///
    /// Greedy best-fit decreasing: examples are taken longest first (ties in
    /// their original order), each goes into the open row with the least room
    /// that still fits it (the earliest such row on ties), or starts a new row.
    /// The result depends only on the examples' lengths and order. An example
    /// longer than `max_seq_length` (not produced by
    /// [`super::tokenize_records`], which truncates) gets a row of its own.
    pub fn packed(examples: Vec<Example>, max_seq_length: usize, pad_id: u32) -> Self {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));

        let mut rows: Vec<Row> = Vec::new();
        // Open rows by (room left, row index).
        let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
        for i in order {
            let example = &examples[i];
            let len = example.len();
            let fit = open.range((len, 0)..).next().copied();
            match fit {
                Some((room, row)) => {
                    open.remove(&(room, row));
                    rows[row].push(example);
                    if room > len {
                        open.insert((room - len, row));
                    }
                }
                None => {
                    let mut row = Row::default();
                    row.push(example);
                    if len < max_seq_length {
                        open.insert((max_seq_length - len, rows.len()));
                    }
                    rows.push(row);
                }
            }
        }
        RowDataset { rows, pad_id }
    }

    /// [`RowDataset::packed`] with `options.max_seq_length` when
    /// `options.packing` is set, else [`RowDataset::unpacked`].
    pub fn from_options(examples: Vec<Example>, options: &DataOptions, pad_id: u32) -> Self {
        if options.packing {
            Self::packed(examples, options.max_seq_length, pad_id)
        } else {
            Self::unpacked(examples, pad_id)
        }
    }

    /// Number of rows (what a [`BatchPlan`] counts).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The id padding positions get.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The batch of rows `indices`, in that order, right-padded to the longest
    /// of them with the pad id, label [`IGNORE_INDEX`] and segment 0.
    ///
    /// # Panics
    ///
    /// If an index is not below [`RowDataset::len`].
    pub fn batch(&self, indices: &[usize]) -> Batch {
        let width = indices
            .iter()
            .map(|&i| self.rows[i].len())
            .max()
            .unwrap_or(0);
        let mut batch = Batch {
            input_ids: Vec::with_capacity(indices.len()),
            labels: Vec::with_capacity(indices.len()),
            segment_ids: Vec::with_capacity(indices.len()),
        };
        for &i in indices {
            let row = &self.rows[i];
            let padding = width - row.len();
            let mut input_ids = row.input_ids.clone();
            input_ids.extend(std::iter::repeat_n(self.pad_id, padding));
            let mut labels = row.labels.clone();
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, padding));
            let mut segment_ids = row.segment_ids.clone();
            segment_ids.extend(std::iter::repeat_n(0, padding));
            batch.input_ids.push(input_ids);
            batch.labels.push(labels);
            batch.segment_ids.push(segment_ids);
        }
        batch
    }
}

/// A padded batch: every row has the same length.
///
/// `segment_ids` say which sample of the row each token belongs to: 0 is
/// padding, 1, 2, ... the samples in the row (always 1 without packing). The
/// model should let a token attend only to earlier tokens of the same segment
/// and count positions from 0 at the start of each segment.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Batch {
    /// Token ids, `[batch][seq]`.
    pub input_ids: Vec<Vec<u32>>,
    /// Labels aligned with `input_ids` (not shifted), [`IGNORE_INDEX`] where the
    /// loss does not look (prompt tokens, padding).
    pub labels: Vec<Vec<i64>>,
    /// Segment of each token: 0 for padding, 1.. for the samples in the row.
    pub segment_ids: Vec<Vec<u32>>,
}

impl Batch {
    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    /// Length of every row.
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// Number of labels the loss covers.
    pub fn loss_tokens(&self) -> usize {
        self.labels
            .iter()
            .flatten()
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// Position of each token within its segment: 0, 1, ... from the start of
    /// each segment; 0 for padding.
    pub fn position_ids(&self) -> Vec<Vec<u32>> {
        self.segment_ids
            .iter()
            .map(|segments| {
                let mut positions = Vec::with_capacity(segments.len());
                let mut previous = 0;
                let mut position = 0;
                for &segment in segments {
                    if segment != previous {
                        position = 0;
                        previous = segment;
                    }
                    positions.push(if segment == 0 { 0 } else { position });
                    position += 1;
                }
                positions
            })
            .collect()
    }

    /// The batch as `[batch, seq]` tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<BatchTensors> {
        let shape = (self.batch_size(), self.seq_len());
        let flat_u32 = |rows: &[Vec<u32>]| rows.iter().flatten().copied().collect::<Vec<u32>>();
        let labels: Vec<i64> = self.labels.iter().flatten().copied().collect();
        Ok(BatchTensors {
            input_ids: Tensor::from_vec(flat_u32(&self.input_ids), shape, device)?,
            labels: Tensor::from_vec(labels, shape, device)?,
            segment_ids: Tensor::from_vec(flat_u32(&self.segment_ids), shape, device)?,
            position_ids: Tensor::from_vec(flat_u32(&self.position_ids()), shape, device)?,
        })
    }
}

/// A [`Batch`] as tensors, all of shape `[batch, seq]`.
#[derive(Clone, Debug)]
pub struct BatchTensors {
    /// Token ids, `u32`.
    pub input_ids: Tensor,
    /// Labels, `i64`, [`IGNORE_INDEX`] where the loss does not look.
    pub labels: Tensor,
    /// Segment ids, `u32`, 0 for padding.
    pub segment_ids: Tensor,
    /// Positions within each segment ([`Batch::position_ids`]), `u32`.
    pub position_ids: Tensor,
}

/// Where a batch lies in a [`BatchPlan`]: batch `index` of epoch `epoch`
/// (both from 0). Ordered by epoch, then index.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct BatchPosition {
    /// The epoch, from 0.
    pub epoch: usize,
    /// The batch within the epoch, from 0.
    pub index: usize,
}

impl BatchPosition {
    /// The first batch of the first epoch.
    pub const START: BatchPosition = BatchPosition { epoch: 0, index: 0 };

    /// Batch `index` of epoch `epoch`.
    pub fn new(epoch: usize, index: usize) -> Self {
        BatchPosition { epoch, index }
    }
}

impl From<(usize, usize)> for BatchPosition {
    fn from((epoch, index): (usize, usize)) -> Self {
        BatchPosition { epoch, index }
    }
}

/// Which rows make up each batch, epoch after epoch.
///
/// Each epoch visits every row once, in an order shuffled by a [`StdRng`]
/// seeded with `seed + epoch`, cut into batches of `batch_size` rows; the last
/// batch of an epoch keeps the leftover rows (it may be smaller). Everything is
/// a function of `(num_examples, batch_size, seed)`, so a resumed run gets the
/// same batches from any [`BatchPosition`] on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    num_examples: usize,
    batch_size: usize,
    seed: u64,
}

impl BatchPlan {
    /// A plan over `num_examples` rows (use [`RowDataset::len`]: with packing
    /// that is the number of packed rows) in batches of `batch_size`.
    ///
    /// Fails when either is 0.
    pub fn new(num_examples: usize, batch_size: usize, seed: u64) -> Result<Self, DataError> {
        if num_examples == 0 {
            return Err(DataError::InvalidOption(
                "cannot plan batches over an empty dataset".to_string(),
            ));
        }
        if batch_size == 0 {
            return Err(DataError::InvalidOption(
                "batch size is 0; give at least 1 (e.g. --batch_size 4)".to_string(),
            ));
        }
        Ok(BatchPlan {
            num_examples,
            batch_size,
            seed,
        })
    }

    /// Number of rows the plan covers.
    pub fn num_examples(&self) -> usize {
        self.num_examples
    }

    /// Rows per batch (the last batch of an epoch may have fewer).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Batches in each epoch, the last partial one included.
    pub fn batches_per_epoch(&self) -> usize {
        self.num_examples.div_ceil(self.batch_size)
    }

    /// Every row index once, in the order of epoch `epoch`.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.num_examples).collect();
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
        order
    }

    /// The rows of batch `index` of epoch `epoch`; empty when `index` is not
    /// below [`BatchPlan::batches_per_epoch`]. Shuffles the epoch's order each
    /// call; to walk a whole epoch, slice [`BatchPlan::epoch_order`] instead.
    pub fn batch_indices(&self, epoch: usize, index: usize) -> Vec<usize> {
        let order = self.epoch_order(epoch);
        self.slice(&order, index).to_vec()
    }

    /// The part of an epoch order that batch `index` takes.
    pub(crate) fn slice<'a>(&self, order: &'a [usize], index: usize) -> &'a [usize] {
        let start = index.saturating_mul(self.batch_size).min(order.len());
        let end = start.saturating_add(self.batch_size).min(order.len());
        &order[start..end]
    }

    /// The position after `position`: the next batch, or the first batch of
    /// the next epoch.
    pub fn next_position(&self, position: BatchPosition) -> BatchPosition {
        self.normalize(BatchPosition::new(position.epoch, position.index + 1))
    }

    /// The position of the `step`-th batch (from 0) counted from the start.
    pub fn position_of_step(&self, step: usize) -> BatchPosition {
        let per_epoch = self.batches_per_epoch();
        BatchPosition::new(step / per_epoch, step % per_epoch)
    }

    /// How many batches come before `position` (the inverse of
    /// [`BatchPlan::position_of_step`]).
    pub fn step_of_position(&self, position: BatchPosition) -> usize {
        position.epoch * self.batches_per_epoch() + position.index
    }

    /// `position` with an index past the end of its epoch carried into the
    /// following epochs.
    pub fn normalize(&self, position: BatchPosition) -> BatchPosition {
        let per_epoch = self.batches_per_epoch();
        BatchPosition::new(
            position.epoch + position.index / per_epoch,
            position.index % per_epoch,
        )
    }
}
