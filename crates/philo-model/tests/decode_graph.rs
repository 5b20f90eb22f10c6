//! The graph-captured decode step (`DecodeGraph`) against the plain forward on the GPU: several
//! sequences prefilled with different prompts, then decoded greedily token by token, give each
//! step the logits of the full forward over the sequence so far, in every weight format the
//! graph reads, across the sliding window and across LongRoPE's switch. Runs only with
//! PHILO_CUDA_TESTS=1 (and the cuda feature).

mod common;

use candle_core::{DType, Device};
use common::*;
use philo_kernels::sampling::adjust_reference;
use philo_model::{
    Adapter, DecodeGraph, DecodeRow, DecodeStep, LogitAdjustment, LoraBank, PagedKvCache, Phi3,
    RowSampling, SeqChunk, WeightFormat,
};

fn prompt(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed.wrapping_mul(7919) + i * 104_729 + i * i * 31) % vocab as u32)
        .collect()
}

/// Decodes `steps` greedy tokens for `rows` sequences and checks every step's logits.
/// `tol`: relative to the largest logit; quantised weights are read at f32 by the graph's GEMV
/// but rounded to bf16 by the forward's dequantisation, hence a wider bound for them.
fn check_case(
    model: &Phi3,
    rows: usize,
    prompt_lens: &[usize],
    steps: usize,
    capture: bool,
    tol: f32,
) {
    check_case_with(model, rows, prompt_lens, steps, capture, tol, false);
}

/// [`check_case`], with the decoder layers in the persistent kernel when `persistent` (which
/// must take the rows).
fn check_case_with(
    model: &Phi3,
    rows: usize,
    prompt_lens: &[usize],
    steps: usize,
    capture: bool,
    tol: f32,
    persistent: bool,
) {
    let vocab = model.config().vocab_size;
    let capacity = prompt_lens.iter().max().unwrap() + steps + 1;
    let mut graph = match persistent {
        true => DecodeGraph::with_persistent_layers(model, rows, capacity, capture),
        false => DecodeGraph::new(model, rows, capacity, capture),
    }
    .unwrap()
    .unwrap_or_else(|| panic!("the graph takes this model with {rows} rows"));
    assert!(
        !persistent || graph.persistent_layers(),
        "the persistent kernel takes {rows} rows"
    );
    let rotary = model.rotary();
    let mut seqs: Vec<Vec<u32>> = (0..rows)
        .map(|r| prompt(r as u32 + 1, prompt_lens[r], vocab))
        .collect();
    let mut next = Vec::new();
    let mut worst = 0f32;
    for (r, ids) in seqs.iter().enumerate() {
        let long = rotary.uses_long_factors(ids.len() - 1);
        let logits = graph.prefill(model, r, ids, long).unwrap();
        let want = last_logits(model, ids);
        let got = candle_core::Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
        assert!(relative_diff(&got, &want) < tol, "prefill of row {r}");
        next.push(argmax(&logits));
    }
    for step in 0..steps {
        for (ids, &t) in seqs.iter_mut().zip(&next) {
            ids.push(t);
        }
        // A row whose new token crosses LongRoPE's switch is recomputed whole, as generate does.
        let crossing: Vec<bool> = seqs
            .iter()
            .map(|ids| {
                let last = ids.len() - 1;
                rotary.switches_between(last - 1, last)
            })
            .collect();
        let logits: Vec<Vec<f32>> = if crossing.iter().any(|&c| c) {
            assert_eq!(rows, 1, "the test crosses the switch with one row");
            vec![graph.prefill(model, 0, &seqs[0], true).unwrap()]
        } else {
            graph.step(&next).unwrap();
            let all = graph.logits().unwrap();
            let greedy = graph.tokens().unwrap();
            let rows_logits: Vec<Vec<f32>> = all.chunks(vocab).map(<[f32]>::to_vec).collect();
            for (r, l) in rows_logits.iter().enumerate() {
                assert_eq!(greedy[r], argmax(l), "step {step} row {r}: GPU argmax");
            }
            rows_logits
        };
        for (r, l) in logits.iter().enumerate() {
            let want = last_logits(model, &seqs[r]);
            let got = candle_core::Tensor::new(l.as_slice(), &Device::Cpu).unwrap();
            let diff = relative_diff(&got, &want);
            worst = worst.max(diff);
            assert!(
                diff < tol,
                "step {step} row {r} (length {}): relative diff {diff}",
                seqs[r].len()
            );
        }
        next = logits.iter().map(|l| argmax(l)).collect();
    }
    assert_eq!(graph.lengths()[0], seqs[0].len());
    eprintln!("  {rows} rows, capture {capture}: largest relative diff {worst:.4}");
}

/// Largest relative difference allowed against the full forward: quantised weights are read at
/// f32 by the graph's GEMV but rounded to bf16 by the forward's dequantisation.
fn tolerance(format: WeightFormat) -> f32 {
    if format == WeightFormat::Dense {
        3e-2
    } else {
        8e-2
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn decode_graph_matches_the_full_forward_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    let formats = [
        WeightFormat::Dense,
        WeightFormat::Int8,
        WeightFormat::Nf4 { double_quant: true },
    ];
    for case in ["mini4k", "gqa_window", "longrope"] {
        for format in formats {
            let model = load_case_bf16(case, &device, format);
            eprintln!("{case} {format:?}");
            let tol = tolerance(format);
            if case == "longrope" {
                // Prompt 20, original 32: the 13th new token crosses the switch.
                check_case(&model, 1, &[20], 24, true, tol);
            } else {
                // Three rows of different lengths, past the gqa case's window of 8.
                check_case(&model, 3, &[5, 17, 1], 12, true, tol);
                check_case(&model, 1, &[9], 4, false, tol);
                // Up to 8 rows through the GEMV (the H200's shared memory holds their inputs).
                let many = [5, 17, 1, 9, 3, 30, 2, 11, 7, 4];
                check_case(&model, 6, &many[..6], 12, true, tol);
                check_case(&model, 8, &many[..8], 4, true, tol);
                if format == WeightFormat::Dense {
                    // More rows than the GEMV takes: norms and SwiGLU as their own kernel, cuBLAS.
                    check_case(&model, 10, &many, 12, true, tol);
                    check_case(&model, 9, &many[..9], 4, false, tol);
                } else {
                    // Quantised weights are read by the GEMV only.
                    assert!(DecodeGraph::new(&model, 10, 64, true).unwrap().is_none());
                }
            }
        }
    }
}

/// Phi-3-mini's head dimension (96; the fixtures' is 16, which runs the tiled attention kernel),
/// which the decode step's tensor-core attention takes: one row past 1,024 positions, three rows
/// of which one crosses the sliding window (2,047) and one is short, and ten rows (the GEMM
/// path), each step against the full forward. A random model of 4 heads (2 key/value heads), 2
/// layers.
#[test]
fn decode_graph_at_phi3_head_dim_matches_the_full_forward_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    let mut config = philo_model::tiny::tiny_config();
    config.hidden_size = 384;
    config.num_attention_heads = 4;
    config.num_key_value_heads = 2;
    config.head_dim = 96;
    config.rope.rotary_dim = 96;
    config.num_hidden_layers = 2;
    let weights = philo_model::tiny::random_weights(&config, 5, &Device::Cpu).unwrap();
    let model = Phi3::load(&config, &weights, DType::BF16, &device).unwrap();
    let tol = tolerance(WeightFormat::Dense);
    check_case(&model, 1, &[1100], 6, true, tol);
    check_case(&model, 3, &[2040, 5, 1030], 12, true, tol);
    let many = [300, 17, 1, 1200, 3, 30, 2, 11, 700, 4];
    check_case(&model, 10, &many, 3, true, tol);

    // Widths of whole 512-byte tiles (768 and 512) take the tensor-core GEMV (the fixtures'
    // and the model above the FMA one): 8 rows through it (8 sequences, then a verify step of 8
    // rows of one), 10 through cuBLAS.
    config.hidden_size = 768;
    config.num_attention_heads = 8;
    config.num_key_value_heads = 4;
    config.intermediate_size = 512;
    let weights = philo_model::tiny::random_weights(&config, 6, &Device::Cpu).unwrap();
    let model = Phi3::load(&config, &weights, DType::BF16, &device).unwrap();
    let cache = PagedKvCache::new(&config, 8, 16, DType::BF16, &device).unwrap();
    let step = DecodeStep::new(&model, &cache, 10, 128, false)
        .unwrap()
        .unwrap();
    assert_eq!(step.gemv_rows(), 8);
    check_case(&model, 8, &many[..8], 3, true, tol);
    check_case(&model, 10, &many, 3, true, tol);
    verify_case(&model, 40, 7, 3, tol);
}

/// Speculation's verify step: after a prefill, one step over the last token and `k` proposed
/// tokens gives each row the logits of the full forward over the sequence up to that token; a
/// rewind to fewer tokens and the next steps then continue as if the rejected ones were never
/// fed (their cache slots are written again).
fn verify_case(model: &Phi3, prompt_len: usize, k: usize, keep: usize, tol: f32) {
    verify_case_with(model, prompt_len, k, keep, tol, false);
}

/// [`verify_case`], with the decoder layers in the persistent kernel when `persistent` (which
/// must take the k + 1 rows).
fn verify_case_with(
    model: &Phi3,
    prompt_len: usize,
    k: usize,
    keep: usize,
    tol: f32,
    persistent: bool,
) {
    let vocab = model.config().vocab_size;
    let rotary = model.rotary();
    let mut graph = DecodeGraph::new(model, 1, prompt_len + k + 8, true)
        .unwrap()
        .expect("the graph takes this model");
    if persistent {
        assert!(graph.set_persistent_layers(true) > k, "{} rows", k + 1);
    }
    assert!(graph.verify_rows() > k, "{} rows", graph.verify_rows());
    let mut seq = prompt(3, prompt_len, vocab);
    let long = rotary.uses_long_factors(prompt_len - 1);
    let first = graph.prefill(model, 0, &seq, long).unwrap();
    seq.push(argmax(&first));
    // The last token, then proposals (arbitrary ids: the logits do not depend on acceptance).
    let fed: Vec<u32> = std::iter::once(*seq.last().unwrap())
        .chain(prompt(9, k, vocab))
        .collect();
    graph.verify(0, &fed).unwrap();
    let logits = graph.logits().unwrap();
    let greedy = graph.tokens().unwrap();
    assert_eq!(logits.len(), (k + 1) * vocab);
    let mut worst = 0f32;
    for i in 0..=k {
        let ids = [&seq[..], &fed[1..=i]].concat();
        let row = &logits[i * vocab..(i + 1) * vocab];
        assert_eq!(greedy[i], argmax(row), "verify row {i}: GPU argmax");
        let got = candle_core::Tensor::new(row, &Device::Cpu).unwrap();
        let diff = relative_diff(&got, &last_logits(model, &ids));
        worst = worst.max(diff);
        assert!(diff < tol, "verify row {i} of {k}: relative diff {diff}");
    }
    // Keep `keep` proposals, then decode on from the kept sequence.
    seq.extend(&fed[1..=keep]);
    graph.rewind(0, seq.len()).unwrap();
    let mut next = argmax(&logits[keep * vocab..(keep + 1) * vocab]);
    for step in 0..3 {
        seq.push(next);
        graph.step(&[next]).unwrap();
        let row = graph.logits().unwrap();
        let got = candle_core::Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
        let diff = relative_diff(&got, &last_logits(model, &seq));
        worst = worst.max(diff);
        assert!(
            diff < tol,
            "step {step} after keeping {keep} of {k}: relative diff {diff}"
        );
        next = argmax(&row);
    }
    eprintln!("  verify k {k}, keep {keep}: largest relative diff {worst:.4}");
}

#[test]
fn decode_graph_verifies_proposals_and_rewinds_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    for (case, format) in [
        ("mini4k", WeightFormat::Dense),
        ("mini4k", WeightFormat::Int8),
        ("gqa_window", WeightFormat::Dense),
        ("longrope", WeightFormat::Dense),
    ] {
        let model = load_case_bf16(case, &device, format);
        eprintln!("{case} {format:?}");
        let tol = tolerance(format);
        // gqa_window's window is 8: 7 proposals after 6 tokens run across it. longrope's
        // switch is at 32: both sides, never across (proposals stop before it).
        let prompt_len = if case == "longrope" { 36 } else { 6 };
        verify_case(&model, prompt_len, 7, 3, tol);
        verify_case(&model, prompt_len, 1, 0, tol);
        if format == WeightFormat::Dense {
            // 9 rows: past the GEMV, cuBLAS.
            verify_case(&model, prompt_len, 8, 8, tol);
        }
        verify_case(&model, 9, 4, 4, tol);
    }
}

/// Decodes 10 greedy steps of one row per entry of `adapters` (bank slots) through a
/// [`DecodeStep`] over scattered blocks of a shared cache, after a `forward_paged` prefill, and
/// checks each row's logits against `reference(row, ids)` (the full forward of its model). Odd
/// rows carry logit adjustments (a bias, and penalties on their context's tokens), which their
/// logits and token must show as the reference applies them.
fn scattered_case(
    model: &Phi3,
    bank: &LoraBank,
    adapters: &[Option<usize>],
    reference: &dyn Fn(usize, &[u32]) -> candle_core::Tensor,
) {
    let config = model.config();
    let vocab = config.vocab_size;
    let rows = adapters.len();
    let (block_size, num_blocks) = (4, 192);
    let mut cache =
        PagedKvCache::new(config, num_blocks, block_size, DType::BF16, model.device()).unwrap();
    // Blocks handed out in a scrambled order, each row its own.
    let order: Vec<u32> = (0..num_blocks as u32)
        .map(|b| (b * 37 + 11) % num_blocks as u32)
        .collect();
    let tables: Vec<Vec<u32>> = order
        .chunks(num_blocks / rows.max(8))
        .take(rows)
        .map(<[u32]>::to_vec)
        .collect();
    let mut seqs: Vec<Vec<u32>> = (0..rows)
        .map(|r| prompt(r as u32 + 3, 2 + 5 * r, vocab))
        .collect();
    let chunks: Vec<SeqChunk> = seqs
        .iter()
        .zip(&tables)
        .zip(adapters)
        .map(|((ids, table), &adapter)| SeqChunk {
            tokens: ids,
            past: 0,
            block_table: table,
            adapter,
            long_rope: false,
        })
        .collect();
    let logits = model
        .forward_paged(&chunks, &mut cache, bank)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut step = DecodeStep::new(model, &cache, rows.max(8), 64, true)
        .unwrap()
        .expect("the step takes this model");
    step.set_adapters(bank).unwrap();
    let mut next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
    // Each row's largest relative difference over the steps, checked after all of them (so
    // that a failure shows every row's).
    let mut worst = vec![0f32; rows];
    for step_index in 0..10 {
        for (ids, &t) in seqs.iter_mut().zip(&next) {
            ids.push(t);
        }
        let adjustments: Vec<Vec<LogitAdjustment>> = seqs
            .iter()
            .enumerate()
            .map(|(r, ids)| {
                if r % 2 == 0 {
                    return Vec::new();
                }
                let mut seen: Vec<u32> = ids.clone();
                seen.sort_unstable();
                seen.dedup();
                let boosted = ((7 * step_index + r) % vocab) as u32;
                let mut list: Vec<LogitAdjustment> = seen
                    .iter()
                    .map(|&token| LogitAdjustment {
                        token,
                        bias: if token == boosted { 3.0 } else { -0.0 },
                        penalty: 1.3,
                        subtract: 0.5,
                    })
                    .collect();
                if !seen.contains(&boosted) {
                    list.push(LogitAdjustment {
                        token: boosted,
                        bias: 3.0,
                        penalty: 1.0,
                        subtract: 0.0,
                    });
                }
                list
            })
            .collect();
        let batch: Vec<DecodeRow> = seqs
            .iter()
            .zip(&tables)
            .zip(adapters)
            .zip(&adjustments)
            .map(|(((ids, table), &adapter), adjustments)| DecodeRow {
                token: *ids.last().unwrap(),
                len: ids.len(),
                long_rope: false,
                block_table: table,
                sampling: RowSampling::greedy(),
                adjustments,
                adapter,
            })
            .collect();
        step.run(&batch).unwrap();
        let all = step.logits().unwrap();
        let greedy = step.tokens().unwrap();
        assert_eq!(all.len(), rows * vocab);
        next.clear();
        for (r, l) in all.chunks(vocab).enumerate() {
            assert_eq!(
                greedy[r],
                argmax(l),
                "{rows} rows, step {step_index} row {r}"
            );
            // The step's logits of an adjusted row are adjusted: so is the reference.
            let mut want = reference(r, &seqs[r]).to_vec1::<f32>().unwrap();
            adjust_reference(&mut want, vocab, std::slice::from_ref(&adjustments[r]));
            let want = candle_core::Tensor::new(want, &Device::Cpu).unwrap();
            let got = candle_core::Tensor::new(l, &Device::Cpu).unwrap();
            worst[r] = worst[r].max(relative_diff(&got, &want));
            next.push(greedy[r]);
        }
    }
    eprintln!(
        "  scattered blocks, adapters {adapters:?}: largest relative diff per row {worst:.4?}"
    );
    for (r, &diff) in worst.iter().enumerate() {
        // Adapter rows round twice more (x·Aᵀ, then its product with scale·B, in bf16)
        // and the step adds the product after the base one where the forward adds their
        // sum: up to 4.4e-2 measured on the H200 (1.7e-2 for rows without one).
        let tol = if adapters[r].is_some() { 5e-2 } else { 3e-2 };
        assert!(
            diff < tol,
            "{rows} rows, row {r} (adapter {:?}): relative diff {diff}",
            adapters[r]
        );
    }
}

/// The serving engine's use: a [`DecodeStep`] over a shared paged cache whose sequences hold
/// scattered blocks, prefilled together by `forward_paged`, through the GEMV (2, 3 and 6 rows)
/// and cuBLASLt (10 rows), without adapters and, on the GEMV, with two adapters mixed with
/// base rows (the batched LoRA), each row against the full forward of its own model.
#[test]
fn decode_step_over_scattered_blocks_matches_the_full_forward_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    let windowed = load_case_bf16("gqa_window", &device, WeightFormat::Dense);
    let plain = |_: usize, ids: &[u32]| last_logits(&windowed, ids);
    let empty = LoraBank::new();
    scattered_case(&windowed, &empty, &[None; 2], &plain);
    scattered_case(&windowed, &empty, &[None; 6], &plain);
    scattered_case(&windowed, &empty, &[None; 10], &plain);

    let dir = case_dir("mini4k");
    let model = load_case_bf16("mini4k", &device, WeightFormat::Dense);
    let adapter = Adapter::load(&dir.join("adapter")).unwrap();
    // A second adapter: the same A, B negated and scaled.
    let (_tmp, other) = negated_adapter(&dir);
    let mut bank = LoraBank::new();
    let first = bank.insert(&adapter, &model).unwrap();
    let second = bank.insert(&other, &model).unwrap();
    for adapters in [
        vec![Some(first), None, Some(second)],
        vec![
            Some(second),
            None,
            Some(first),
            Some(second),
            None,
            Some(first),
        ],
    ] {
        // The general paged forward over the whole sequence with the same bank (its LoRA
        // products are checked against PEFT in tests/paged.rs).
        let reference = |r: usize, ids: &[u32]| {
            let blocks = ids.len().div_ceil(4);
            let mut cache =
                PagedKvCache::new(model.config(), blocks, 4, DType::BF16, &device).unwrap();
            let table: Vec<u32> = (0..blocks as u32).collect();
            let chunk = SeqChunk {
                tokens: ids,
                past: 0,
                block_table: &table,
                adapter: adapters[r],
                long_rope: false,
            };
            model
                .forward_paged(&[chunk], &mut cache, &bank)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        scattered_case(&model, &bank, &adapters, &reference);
    }
    // The adapters do change the logits: the base model's would not pass for them.
    let mut tuned = model.clone();
    adapter.attach(&mut tuned).unwrap();
    assert_adapter_matters(&model, &tuned);
}

/// The adapter on `tuned` moves its logits well past the tests' tolerances from `base`'s.
fn assert_adapter_matters(base: &Phi3, tuned: &Phi3) {
    let ids = prompt(3, 9, base.config().vocab_size);
    assert!(
        relative_diff(&last_logits(tuned, &ids), &last_logits(base, &ids)) > 5e-2,
        "the adapter is too weak to test with"
    );
}

/// `generate`'s sampled decoding on the GPU: each step's token is what the GPU sampler's
/// reference draws from that step's logits with the row's settings (temperature with top-p,
/// top-k, min-p, typical-p), up to rounding at a boundary between two tokens. Row 1 carries a
/// logit bias of +50 on one token (the step's logits are the adjusted ones): it draws that token.
#[test]
fn decode_graph_samples_as_the_reference_draws_on_cuda() {
    use philo_kernels::sampling::{draw_weights, reference, same_up_to_rounding, uniform};
    let Some(device) = cuda_device() else {
        return;
    };
    let model = load_case_bf16("mini4k", &device, WeightFormat::Dense);
    let vocab = model.config().vocab_size;
    let mut graph = DecodeGraph::new(&model, 3, 64, true).unwrap().unwrap();
    assert!(graph.samples());
    let settings = |t: f32, top_k: u32, top_p: f32, min_p: f32, seed: u64| RowSampling {
        temperature: t,
        top_k,
        top_p,
        min_p,
        typical_p: 1.0,
        seed,
        counter: 0,
    };
    let rows = [
        settings(0.8, 0, 0.9, 0.0, 11),
        settings(1.2, 20, 1.0, 0.0, 12),
        RowSampling {
            typical_p: 0.5,
            ..settings(0.7, 0, 1.0, 0.05, 13)
        },
    ];
    let mut next = Vec::new();
    for r in 0..3 {
        let logits = graph
            .prefill(&model, r, &prompt(r as u32 + 5, 6, vocab), false)
            .unwrap();
        next.push(argmax(&logits));
    }
    let mut distinct = std::collections::HashSet::new();
    for step in 0..12u32 {
        let sampling: Vec<RowSampling> = rows
            .iter()
            .map(|s| RowSampling {
                counter: step,
                ..*s
            })
            .collect();
        let forced = [LogitAdjustment {
            token: 9,
            bias: 50.0,
            penalty: 1.0,
            subtract: 0.0,
        }];
        graph
            .step_sampled(&next, &sampling, &[&[], &forced, &[]])
            .unwrap();
        let logits = graph.logits().unwrap();
        let tokens = graph.tokens().unwrap();
        for (r, s) in sampling.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let want = reference(row, s);
            let rounding = || {
                let weights = draw_weights(row, s).unwrap();
                let u = f64::from(uniform(s.seed, s.counter));
                same_up_to_rounding(&weights, u, want, tokens[r], 1e-6)
            };
            assert!(
                tokens[r] == want || rounding(),
                "step {step} row {r}: {} vs {want}",
                tokens[r]
            );
            if r == 1 {
                assert_eq!(tokens[r], 9, "step {step}: row 1's +50 bias");
            }
            distinct.insert(tokens[r]);
        }
        next = tokens;
    }
    // Sampling, not argmax: the draws spread over several tokens.
    assert!(distinct.len() > 3, "{distinct:?}");
}

/// One sequence decoded greedily with every decoder layer in the persistent kernel
/// (`DecodeGraph::set_persistent_layers`) and, beside it, with a launch per kernel: each
/// step's logits against the full forward's and the other graph's.
fn persistent_case(model: &Phi3, prompt_len: usize, steps: usize, tol: f32) {
    let vocab = model.config().vocab_size;
    let capacity = prompt_len + steps + 1;
    let mut layers = DecodeGraph::new(model, 1, capacity, true)
        .unwrap()
        .expect("the graph takes this model");
    assert!(
        layers.set_persistent_layers(true) >= 1,
        "the persistent kernel takes this model"
    );
    let mut chain = DecodeGraph::new(model, 1, capacity, true).unwrap().unwrap();
    let mut ids = prompt(1, prompt_len, vocab);
    let long = model.rotary().uses_long_factors(ids.len() - 1);
    let mut next = argmax(&layers.prefill(model, 0, &ids, long).unwrap());
    chain.prefill(model, 0, &ids, long).unwrap();
    let (mut worst_forward, mut worst_chain) = (0f32, 0f32);
    for step in 0..steps {
        ids.push(next);
        layers.step(&[next]).unwrap();
        chain.step(&[next]).unwrap();
        let logits = layers.logits().unwrap();
        assert_eq!(layers.tokens().unwrap()[0], argmax(&logits), "step {step}");
        let got = candle_core::Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
        let launched = chain.logits().unwrap();
        let launched = candle_core::Tensor::new(launched.as_slice(), &Device::Cpu).unwrap();
        let forward = relative_diff(&got, &last_logits(model, &ids));
        let beside = relative_diff(&got, &launched);
        worst_forward = worst_forward.max(forward);
        worst_chain = worst_chain.max(beside);
        assert!(
            forward < tol && beside < tol,
            "step {step} (length {}): relative diff {forward} from the full forward, {beside} from the launch-per-kernel step",
            ids.len()
        );
        next = argmax(&logits);
    }
    eprintln!(
        "  prompt {prompt_len}, {steps} steps: largest relative diff {worst_forward:.4} from the full forward, {worst_chain:.4} from the launch-per-kernel step"
    );
}

/// The persistent layers kernel on Phi-3-mini's widths (3,072 hidden, 32 heads of 96; a
/// narrower MLP of 2,048 and 2 layers, to keep the test small) in bf16, INT8, INT4 and NF4 (its
/// block scales plain and double-quantised): a 300-token prompt (each head's positions split
/// over three blocks), a short one, three and twelve sequences (past the GEMV's 8 rows), verify
/// steps of 9, 8 and 3 rows, and, with 8 key/value heads, a sliding window of 64 crossed while
/// decoding (one and two sequences, and a verify step across it); LongRoPE's switch with a
/// partial rotation. The fixtures' shapes (widths of 128) do not take it.
#[test]
fn persistent_layers_match_the_full_forward_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    let tiny = load_case_bf16("mini4k", &device, WeightFormat::Dense);
    let mut graph = DecodeGraph::new(&tiny, 1, 64, true).unwrap().unwrap();
    assert_eq!(graph.set_persistent_layers(true), 0);

    let mut config = philo_model::tiny::tiny_config();
    config.vocab_size = 4096;
    config.hidden_size = 3072;
    config.intermediate_size = 2048;
    config.num_attention_heads = 32;
    config.num_key_value_heads = 32;
    config.head_dim = 96;
    config.rope.rotary_dim = 96;
    config.num_hidden_layers = 2;
    let weights = philo_model::tiny::random_weights(&config, 7, &Device::Cpu).unwrap();
    // First the simplest case, one layer and a short prompt, so that a failure there points at
    // a phase rather than at what runs across layers.
    let mut one_layer = config.clone();
    one_layer.num_hidden_layers = 1;
    let model = Phi3::load_as(
        &one_layer,
        &weights,
        DType::BF16,
        &device,
        WeightFormat::Dense,
    )
    .unwrap();
    persistent_case(&model, 7, 3, tolerance(WeightFormat::Dense));
    let mut windowed = config.clone();
    windowed.sliding_window = Some(64);
    windowed.num_key_value_heads = 8;
    let windowed_weights = philo_model::tiny::random_weights(&windowed, 8, &Device::Cpu).unwrap();
    let mut longrope = config.clone();
    longrope.rope.rotary_dim = 64;
    longrope.rope.scaling = philo_model::RopeScaling::LongRope {
        short_factor: (0..32).map(|i| 1.0 + 0.05 * i as f64).collect(),
        long_factor: (0..32).map(|i| 2.0 + 0.5 * i as f64).collect(),
        original_max_position_embeddings: 32,
        attention_factor: 1.2,
    };
    for format in [
        WeightFormat::Dense,
        WeightFormat::Int8,
        WeightFormat::Int4,
        WeightFormat::Nf4 { double_quant: true },
        WeightFormat::Nf4 {
            double_quant: false,
        },
    ] {
        let tol = tolerance(format);
        eprintln!("{format:?}");
        let model = Phi3::load_as(&config, &weights, DType::BF16, &device, format).unwrap();
        persistent_case(&model, 300, 8, tol);
        persistent_case(&model, 7, 4, tol);
        // Several sequences, and verify steps (rows of one sequence that see each other's new
        // keys and values), then a rewind.
        check_case_with(&model, 3, &[5, 140, 1], 6, true, tol, true);
        verify_case_with(&model, 40, 7, 3, tol, true);
        verify_case_with(&model, 9, 2, 0, tol, true);
        // 9 rows (8 proposals: the mma's second half of rows), which a quantised base has no
        // other path for (on the full shape NF4's table leaves no room for them).
        verify_case_with(&model, 40, 8, 8, tol, true);
        // 12 sequences: on a quantised base only the persistent kernel takes more than 8.
        check_case_with(
            &model,
            12,
            &[5, 17, 1, 9, 3, 30, 2, 11, 7, 4, 60, 6],
            4,
            true,
            tol,
            true,
        );
        let model =
            Phi3::load_as(&windowed, &windowed_weights, DType::BF16, &device, format).unwrap();
        persistent_case(&model, 50, 30, tol);
        check_case_with(&model, 2, &[50, 70], 20, true, tol, true);
        verify_case_with(&model, 60, 7, 5, tol, true);
        // LongRoPE with a partial rotation (64 of 96): the 13th new token crosses the switch.
        let model = Phi3::load_as(&longrope, &weights, DType::BF16, &device, format).unwrap();
        check_case_with(&model, 1, &[20], 24, true, tol, true);
    }
}

/// An adapter attached to the model unmerged (as `chat --use_4bit --adapter` loads a quantised
/// base) runs on the decode graph through the step's batched LoRA: the graph takes the model,
/// each step matches the full forward of the model with the adapter, one and three sequences,
/// on a dense and an NF4 base; and the graph refuses a second adapter.
#[test]
fn decode_graph_runs_an_attached_adapter_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    let (_guard, adapter) = negated_adapter(&case_dir("mini4k"));
    for format in [
        WeightFormat::Dense,
        WeightFormat::Nf4 { double_quant: true },
    ] {
        let mut model = load_case_bf16("mini4k", &device, format);
        let base = model.clone();
        adapter.attach(&mut model).unwrap();
        assert_adapter_matters(&base, &model);
        eprintln!("{format:?}");
        // Adapter rows round twice more than the forward (see the scattered-blocks test).
        let tol = tolerance(format).max(5e-2);
        check_case(&model, 1, &[9], 8, true, tol);
        check_case(&model, 3, &[5, 17, 1], 6, true, tol);
        let mut graph = DecodeGraph::new(&model, 1, 64, true).unwrap().unwrap();
        assert!(graph.set_adapter(&base, &adapter).is_err());
    }
}

/// The reference adapter padded with zeros to `rank` (the same products; `r` in its config).
fn padded_adapter(dir: &std::path::Path, rank: usize) -> (tempfile::TempDir, Adapter) {
    rewritten_adapter(
        dir,
        |name, t| {
            // lora_A [r, in] grows rows, lora_B [out, r] columns.
            let axis = if name.contains("lora_A") { 0 } else { 1 };
            let mut shape = t.dims().to_vec();
            shape[axis] = rank - shape[axis];
            let zeros = candle_core::Tensor::zeros(shape, t.dtype(), &Device::Cpu).unwrap();
            candle_core::Tensor::cat(&[&t, &zeros], axis).unwrap()
        },
        |config| config["r"] = rank.into(),
    )
}

/// An adapter the step does not take (rank past `DecodeStep::MAX_RANK`) is refused and the
/// graph goes on with the one it had, step for step as if the refusal had not been asked for;
/// a new adapter empties the rows (their caches were computed without it).
#[test]
fn decode_graph_keeps_its_adapter_when_it_refuses_one_on_cuda() {
    let Some(device) = cuda_device() else {
        return;
    };
    let dir = case_dir("mini4k");
    let (_guard, adapter) = negated_adapter(&dir);
    let (_wide_guard, wide) = padded_adapter(&dir, DecodeStep::MAX_RANK + 32);
    let model = load_case_bf16("mini4k", &device, WeightFormat::Dense);
    let run = |refuse: bool| -> Vec<f32> {
        let mut graph = DecodeGraph::new(&model, 1, 64, true).unwrap().unwrap();
        graph.set_adapter(&model, &adapter).unwrap();
        if refuse {
            assert!(graph.set_adapter(&model, &wide).is_err());
        }
        graph.prefill(&model, 0, &[1, 5, 9, 13], false).unwrap();
        graph.step(&[7]).unwrap();
        graph.step(&[11]).unwrap();
        graph.logits().unwrap()
    };
    assert_eq!(run(false), run(true));
    let mut graph = DecodeGraph::new(&model, 1, 64, true).unwrap().unwrap();
    graph.prefill(&model, 0, &[1, 5, 9, 13], false).unwrap();
    graph.set_adapter(&model, &adapter).unwrap();
    assert!(
        graph.step(&[7]).is_err(),
        "a row prefilled without the adapter decoded with it"
    );
}
