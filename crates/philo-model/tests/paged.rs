//! The serving step (`Phi3::forward_paged`) against the plain forward: sequences split into
//! prompt chunks and decode steps, mixed in one batch, with scattered block tables and per-row
//! adapters, give each sequence the logits of the full forward on its own prefix.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use philo_model::{Adapter, LoraBank, PagedKvCache, Phi3, SeqChunk};

const BLOCK: usize = 4;

/// Token ids `len` long, deterministic, below `vocab`.
fn tokens(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed.wrapping_mul(7919) + i * 104_729 + i * i * 31) % vocab as u32)
        .collect()
}

/// One sequence's planned chunks: (start, end) token ranges, one per step (None: idle).
struct Plan {
    ids: Vec<u32>,
    chunks: Vec<Option<(usize, usize)>>,
    adapter: Option<usize>,
    table: Vec<u32>,
}

/// Runs the plans step by step and checks each chunk's logits against `expected(seq, end)`.
fn run(
    model: &Phi3,
    bank: &LoraBank,
    plans: &mut [Plan],
    expected: impl Fn(usize, &[u32]) -> Tensor,
    tol: f32,
) {
    let config = model.config();
    let mut cache = PagedKvCache::new(config, 64, BLOCK, model.dtype(), model.device()).unwrap();
    // Blocks handed out from the top down, alternating between sequences, so no table is
    // contiguous or in order.
    let mut next_block = 63u32;
    for plan in plans.iter_mut() {
        let blocks = plan.ids.len().div_ceil(BLOCK);
        plan.table = (0..blocks)
            .map(|_| {
                next_block -= 1;
                next_block + 1
            })
            .collect();
        plan.table.reverse();
    }
    let steps = plans.iter().map(|p| p.chunks.len()).max().unwrap();
    for step in 0..steps {
        let mut seqs = Vec::new();
        let mut chunks = Vec::new();
        for (s, plan) in plans.iter().enumerate() {
            if let Some(Some((start, end))) = plan.chunks.get(step) {
                seqs.push((s, *end));
                chunks.push(SeqChunk {
                    tokens: &plan.ids[*start..*end],
                    past: *start,
                    block_table: &plan.table,
                    adapter: plan.adapter,
                    long_rope: false,
                });
            }
        }
        let logits = model.forward_paged(&chunks, &mut cache, bank).unwrap();
        for (row, (s, end)) in seqs.iter().enumerate() {
            let got = logits.get(row).unwrap().to_device(&Device::Cpu).unwrap();
            let want = expected(*s, &plans[*s].ids[..*end]);
            let diff = relative_diff(&got, &want);
            assert!(
                diff < tol,
                "step {step}, sequence {s} up to {end}: relative diff {diff}"
            );
        }
    }
}

/// Prefill chunks, decode steps and idle steps interleaved across three sequences.
fn mixed_plans(vocab: usize) -> Vec<Plan> {
    let plan = |seed, len, chunks: Vec<Option<(usize, usize)>>| Plan {
        ids: tokens(seed, len, vocab),
        chunks,
        adapter: None,
        table: Vec::new(),
    };
    vec![
        plan(
            1,
            9,
            vec![Some((0, 5)), Some((5, 7)), Some((7, 8)), None, Some((8, 9))],
        ),
        plan(
            2,
            16,
            vec![
                Some((0, 13)),
                Some((13, 14)),
                Some((14, 15)),
                Some((15, 16)),
            ],
        ),
        plan(
            3,
            21,
            vec![None, Some((0, 9)), Some((9, 20)), Some((20, 21))],
        ),
    ]
}

#[test]
fn paged_steps_match_the_full_forward() {
    // gqa_window: grouped KV heads and a sliding window shorter than the sequences.
    for case in ["mini4k", "gqa_window", "longrope"] {
        let model = load_model(&case_dir(case), DType::F32);
        let bank = LoraBank::new();
        let mut plans = mixed_plans(model.config().vocab_size);
        run(
            &model,
            &bank,
            &mut plans,
            |_, ids| last_logits(&model, ids),
            1e-4,
        );
    }
}

/// The same on the GPU in bf16 (fused kernels, paged decode kernel), against the plain forward
/// in bf16 there. Runs only with PHILO_CUDA_TESTS=1 (and the cuda feature).
#[test]
fn paged_steps_match_the_full_forward_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    for case in ["mini4k", "gqa_window"] {
        let dir = case_dir(case);
        let config = philo_model::Phi3Config::from_file(&dir.join("config.json")).unwrap();
        let store = philo_model::SafetensorsStore::open_dir(&dir).unwrap();
        let model = Phi3::load(&config, &store, DType::BF16, &device).unwrap();
        let mut plans = mixed_plans(model.config().vocab_size);
        run(
            &model,
            &LoraBank::new(),
            &mut plans,
            |_, ids| last_logits(&model, ids),
            3e-2,
        );
    }
}

#[test]
fn sequences_with_different_adapters_share_a_step() {
    let dir = case_dir("mini4k");
    let model = load_model(&dir, DType::F32);
    let adapter = Adapter::load(&dir.join("adapter")).unwrap();
    // A second adapter: the same A, B negated and scaled.
    let (_tmp, other) = negated_adapter(&dir);

    let mut bank = LoraBank::new();
    let first = bank.insert(&adapter, &model).unwrap();
    let second = bank.insert(&other, &model).unwrap();
    let with = |a: &Adapter| {
        let mut m = model.clone();
        a.attach(&mut m).unwrap();
        m
    };
    let references = [model.clone(), with(&adapter), with(&other)];
    let mut plans = mixed_plans(model.config().vocab_size);
    plans[1].adapter = Some(first);
    plans[2].adapter = Some(second);
    run(
        &model,
        &bank,
        &mut plans,
        |s, ids| last_logits(&references[s], ids),
        1e-4,
    );
    // The adapters do change the logits: the base model's would not pass for them.
    let ids = &plans[1].ids[..5];
    assert!(relative_diff(&last_logits(&references[1], ids), &last_logits(&model, ids)) > 1e-3);
}

#[test]
fn a_short_block_table_is_an_error_not_a_panic() {
    let model = load_model(&case_dir("mini4k"), DType::F32);
    let mut cache = PagedKvCache::new(model.config(), 4, BLOCK, DType::F32, &Device::Cpu).unwrap();
    let ids = tokens(5, 9, model.config().vocab_size);
    let chunk = SeqChunk {
        tokens: &ids,
        past: 0,
        block_table: &[0, 1],
        adapter: None,
        long_rope: false,
    };
    let err = model
        .forward_paged(&[chunk], &mut cache, &LoraBank::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("block table covers 8 positions"), "{err}");
}
