//! The graph-captured decode step (`DecodeGraph`) against the plain forward on the GPU: several
//! sequences prefilled with different prompts, then decoded greedily token by token, give each
//! step the logits of the full forward over the sequence so far, in every weight format the
//! graph reads, across the sliding window and across LongRoPE's switch. Runs only with
//! PHILO_CUDA_TESTS=1 (and the cuda feature).

mod common;

use candle_core::{DType, Device};
use common::*;
use philo_model::{DecodeGraph, Phi3, Phi3Config, SafetensorsStore, WeightFormat};

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
    let vocab = model.config().vocab_size;
    let capacity = prompt_lens.iter().max().unwrap() + steps + 1;
    let mut graph = DecodeGraph::new(model, rows, capacity, capture)
        .unwrap()
        .expect("the graph takes this model");
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
            let greedy = graph.greedy().unwrap();
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
    if std::env::var("PHILO_CUDA_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped (set PHILO_CUDA_TESTS=1 to run the CUDA tests)");
        return;
    }
    let device = Device::new_cuda(0).expect("PHILO_CUDA_TESTS=1 but no CUDA device 0");
    let formats = [
        WeightFormat::Dense,
        WeightFormat::Int8,
        WeightFormat::Nf4 { double_quant: true },
    ];
    for case in ["mini4k", "gqa_window", "longrope"] {
        let dir = case_dir(case);
        let config = Phi3Config::from_file(&dir.join("config.json")).unwrap();
        let store = SafetensorsStore::open_dir(&dir).unwrap();
        for format in formats {
            let model = Phi3::load_as(&config, &store, DType::BF16, &device, format).unwrap();
            eprintln!("{case} {format:?}");
            let tol = if format == WeightFormat::Dense {
                3e-2
            } else {
                8e-2
            };
            if case == "longrope" {
                // Prompt 20, original 32: the 13th new token crosses the switch.
                check_case(&model, 1, &[20], 24, true, tol);
            } else {
                // Three rows of different lengths, past the gqa case's window of 8.
                check_case(&model, 3, &[5, 17, 1], 12, true, tol);
                check_case(&model, 1, &[9], 4, false, tol);
            }
        }
    }
}
