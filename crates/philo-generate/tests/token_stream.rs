//! Decoding through the KV cache equals recomputing the whole sequence at every step, also when a
//! LongRoPE model crosses original_max_position_embeddings mid-generation.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use philo_generate::{generate, GenerateOptions, SamplingParams, StopReason, TokenStream};
use philo_model::{Phi3, Phi3Config, SafetensorsStore};

fn load(case: &str) -> (Phi3, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf-reference/dev")
        .join(case);
    let config = Phi3Config::from_file(&dir.join("config.json")).unwrap();
    let store = SafetensorsStore::open_dir(&dir).unwrap();
    let model = Phi3::load(&config, &store, DType::F32, &Device::Cpu).unwrap();
    let reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    (model, reference)
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy continuation by a full forward of the whole sequence at each step (no cache).
fn greedy_without_cache(model: &Phi3, mut tokens: Vec<u32>, n: usize) -> Vec<u32> {
    let start = tokens.len();
    for _ in 0..n {
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward_last(&input, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        tokens.push(logits.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    tokens[start..].to_vec()
}

#[test]
fn longrope_generation_across_the_switch_equals_recomputation() {
    let (model, reference) = load("longrope");
    // original_max_position_embeddings is 32: a 28-token prompt and 12 new tokens cross it.
    let prompt = ids(&reference["inputs"]["in0"])[..28].to_vec();
    let expected = greedy_without_cache(&model, prompt.clone(), 12);
    let mut stream = TokenStream::new(&model, prompt, SamplingParams::greedy()).unwrap();
    let produced: Vec<u32> = (0..12).map(|_| stream.next_token().unwrap()).collect();
    assert_eq!(produced, expected);
}

#[test]
fn cached_decoding_equals_recomputation_with_sliding_window() {
    let (model, reference) = load("gqa_window");
    let prompt = ids(&reference["inputs"]["in1"]);
    let expected = greedy_without_cache(&model, prompt.clone(), 15);
    let mut stream = TokenStream::new(&model, prompt, SamplingParams::greedy()).unwrap();
    let produced: Vec<u32> = (0..15).map(|_| stream.next_token().unwrap()).collect();
    assert_eq!(produced, expected);
}

#[test]
fn generate_stops_on_stop_tokens_and_limits() {
    let (model, reference) = load("mini4k");
    let greedy = &reference["greedy"];
    let (prompt, continuation) = (ids(&greedy["prompt"]), ids(&greedy["new_tokens"]));
    let mut options = GenerateOptions {
        max_new_tokens: 5,
        stop_tokens: vec![],
        sampling: SamplingParams::greedy(),
        speculative_tokens: None,
        draft: None,
    };
    let out = generate(&model, prompt.clone(), &options, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(
        (out.tokens.as_slice(), out.stop),
        (&continuation[..5], StopReason::MaxTokens)
    );

    // The fourth reference token as a stop token ends generation before it.
    options.max_new_tokens = 20;
    options.stop_tokens = vec![continuation[3]];
    let out = generate(&model, prompt.clone(), &options, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let first_stop = continuation
        .iter()
        .position(|t| *t == continuation[3])
        .unwrap();
    assert_eq!(
        (out.tokens.as_slice(), out.stop),
        (&continuation[..first_stop], StopReason::Eos)
    );

    // The callback cancels.
    options.stop_tokens.clear();
    let mut seen = 0;
    let out = generate(&model, prompt, &options, |_| {
        seen += 1;
        if seen == 2 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!((out.tokens.len(), out.stop), (2, StopReason::Cancelled));
}

#[test]
fn empty_and_oversized_prompts_are_refused() {
    let (model, _) = load("longrope");
    assert!(TokenStream::new(&model, vec![], SamplingParams::greedy()).is_err());
    let context = model.config().max_position_embeddings;
    let err = TokenStream::new(&model, vec![5; context], SamplingParams::greedy())
        .err()
        .unwrap();
    assert!(err.to_string().contains("context"), "{err}");
}

/// The first three tokens sampled (temperature 0.7, top-k 3) after `prompt`, counted over `runs`
/// seeds from `first_seed`, with `speculate` applied to each stream; and speculation's
/// (proposed, accepted) totals.
fn first_three_tokens<'m>(
    model: &'m Phi3,
    prompt: &[u32],
    runs: usize,
    first_seed: u64,
    speculate: impl Fn(TokenStream<'m>) -> TokenStream<'m>,
) -> (std::collections::HashMap<Vec<u32>, usize>, (usize, usize)) {
    let mut counts = std::collections::HashMap::<Vec<u32>, usize>::new();
    let mut kept = (0, 0);
    for seed in 0..runs {
        let params = SamplingParams {
            temperature: 0.7,
            top_k: Some(3),
            top_p: None,
            seed: Some(first_seed + seed as u64),
            ..SamplingParams::default()
        };
        let mut stream = speculate(TokenStream::new(model, prompt.to_vec(), params).unwrap());
        let out: Vec<u32> = (0..3).map(|_| stream.next_token().unwrap()).collect();
        let (p, a) = stream.speculation_counts();
        kept = (kept.0 + p, kept.1 + a);
        *counts.entry(out).or_default() += 1;
    }
    (counts, kept)
}

/// The number of distinct outcomes and the total variation distance between two histograms
/// of `runs` draws each.
fn total_variation(
    a: &std::collections::HashMap<Vec<u32>, usize>,
    b: &std::collections::HashMap<Vec<u32>, usize>,
    runs: usize,
) -> (usize, f64) {
    let keys: std::collections::HashSet<&Vec<u32>> = a.keys().chain(b.keys()).collect();
    let share = |h: &std::collections::HashMap<Vec<u32>, usize>, k: &Vec<u32>| {
        *h.get(k).unwrap_or(&0) as f64 / runs as f64
    };
    let tv = keys
        .iter()
        .map(|k| (share(a, k) - share(b, k)).abs())
        .sum::<f64>()
        / 2.0;
    (keys.len(), tv)
}

/// A prompt that repeats itself, so that prompt lookup has something to propose.
fn repeated(prompt: &[u32], times: usize) -> Vec<u32> {
    prompt
        .iter()
        .copied()
        .cycle()
        .take(prompt.len() * times)
        .collect()
}

#[test]
fn speculation_keeps_the_greedy_output() {
    // The prompt is a piece, the model's own greedy continuation of it, and the piece again: prompt
    // lookup then proposes that continuation, which the model may repeat (random weights give
    // no other copying workload). The sliding window (gqa_window: 8) and LongRoPE's switch
    // (longrope: original 32, crossed by the 22-token prompt's 11th new token) are included.
    for (case, piece_len, new) in [
        ("mini4k", 6, 24),
        ("gqa_window", 5, 24),
        ("longrope", 8, 24),
    ] {
        let (model, reference) = load(case);
        let piece = ids(&reference["inputs"]["in0"])[..piece_len].to_vec();
        let continuation = greedy_without_cache(&model, piece.clone(), 6);
        let prompt = [piece.clone(), continuation, piece].concat();
        let mut plain = TokenStream::new(&model, prompt.clone(), SamplingParams::greedy()).unwrap();
        let expected: Vec<u32> = (0..new).map(|_| plain.next_token().unwrap()).collect();
        let mut fast = TokenStream::new(&model, prompt, SamplingParams::greedy())
            .unwrap()
            .with_speculation(4);
        let produced: Vec<u32> = (0..new).map(|_| fast.next_token().unwrap()).collect();
        let (proposed, accepted) = fast.speculation_counts();
        eprintln!("{case}: {accepted} of {proposed} proposed tokens accepted");
        assert!(proposed > 0, "{case}: prompt lookup proposed nothing");
        assert_eq!(produced, expected, "{case}");
        assert_eq!(fast.generated(), expected.as_slice());
    }
}

#[test]
fn speculation_keeps_the_sampling_distribution() {
    // The first three sampled tokens, over many seeds, with and without speculation: the same
    // distribution (total variation distance within sampling noise).
    let (model, reference) = load("mini4k");
    let prompt = repeated(&ids(&reference["inputs"]["in0"])[..5], 3);
    let runs = 3000;
    let (plain, _) = first_three_tokens(&model, &prompt, runs, 0, |s| s);
    let (fast, _) = first_three_tokens(&model, &prompt, runs, 1_000_000, |s| s.with_speculation(3));
    let (outcomes, tv) = total_variation(&plain, &fast, runs);
    eprintln!("{outcomes} outcomes, total variation {tv:.4}");
    assert!(tv < 0.06, "total variation {tv}");
}

#[test]
fn speculation_accepts_what_the_model_would_say() {
    // gqa_window sees 8 tokens a layer over 2 layers: what follows a 24-token prompt depends on
    // its last 15 tokens only. So a copy of the prompt's end followed by its greedy continuation,
    // put in front, changes nothing the model says, and prompt lookup proposes exactly it.
    let (model, reference) = load("gqa_window");
    let prompt = ids(&reference["inputs"]["in0"]);
    let continuation = greedy_without_cache(&model, prompt.clone(), 12);
    let mut lead = prompt[prompt.len() - 2..].to_vec();
    lead.extend(&continuation[..5]);
    let prompt = [lead, prompt].concat();
    let mut plain = TokenStream::new(&model, prompt.clone(), SamplingParams::greedy()).unwrap();
    let expected: Vec<u32> = (0..12).map(|_| plain.next_token().unwrap()).collect();
    assert_eq!(expected, continuation, "the lead changes the continuation");
    let mut fast = TokenStream::new(&model, prompt, SamplingParams::greedy())
        .unwrap()
        .with_speculation(4);
    let produced: Vec<u32> = (0..12).map(|_| fast.next_token().unwrap()).collect();
    assert_eq!(produced, expected);
    let (proposed, accepted) = fast.speculation_counts();
    assert!(accepted >= 4, "{accepted} of {proposed} accepted");
}

#[test]
fn a_draft_model_keeps_the_greedy_output() {
    // Drafted by the model itself every proposal is kept; drafted by another model of the same
    // vocabulary (different weights) few are. The output is plain greedy's either way, across
    // the sliding window (gqa_window) and LongRoPE's switch (longrope).
    let (other, _) = load("mini4k");
    for (case, new) in [("mini4k", 20), ("gqa_window", 20), ("longrope", 24)] {
        let (model, reference) = load(case);
        let prompt = ids(&reference["inputs"]["in0"])[..22].to_vec();
        let mut plain = TokenStream::new(&model, prompt.clone(), SamplingParams::greedy()).unwrap();
        let expected: Vec<u32> = (0..new).map(|_| plain.next_token().unwrap()).collect();
        for (draft, name) in [(&model, "itself"), (&other, "mini4k")] {
            let mut fast = TokenStream::new(&model, prompt.clone(), SamplingParams::greedy())
                .unwrap()
                .with_draft(draft, 4)
                .unwrap();
            let produced: Vec<u32> = (0..new).map(|_| fast.next_token().unwrap()).collect();
            let (proposed, accepted) = fast.speculation_counts();
            eprintln!("{case} drafted by {name}: {accepted} of {proposed} accepted");
            assert_eq!(produced, expected, "{case} drafted by {name}");
            assert!(proposed > 0, "{case} drafted by {name}: nothing proposed");
            if std::ptr::eq(draft, &model) {
                assert_eq!(accepted, proposed, "{case}: a model agrees with itself");
            }
        }
    }
}

#[test]
fn a_draft_model_keeps_the_sampling_distribution() {
    // As for prompt lookup: the first three sampled tokens over many seeds, plain and drafted
    // (by the model's own greedy guesses, which sampling often keeps and sometimes rejects),
    // have the same distribution.
    let (model, reference) = load("gqa_window");
    let (draft, _) = load("gqa_window");
    let prompt = ids(&reference["inputs"]["in0"])[..12].to_vec();
    let runs = 3000;
    let (plain, _) = first_three_tokens(&model, &prompt, runs, 0, |s| s);
    let (fast, (proposed, accepted)) = first_three_tokens(&model, &prompt, runs, 1_000_000, |s| {
        s.with_draft(&draft, 3).unwrap()
    });
    assert!(
        accepted > 0 && accepted < proposed,
        "{accepted} of {proposed} accepted"
    );
    let (outcomes, tv) = total_variation(&plain, &fast, runs);
    eprintln!("{outcomes} outcomes, total variation {tv:.4}, {accepted} of {proposed} accepted");
    assert!(tv < 0.06, "total variation {tv}");
}

#[test]
fn a_draft_of_another_vocabulary_is_refused() {
    let (model, _) = load("mini4k");
    let config = philo_model::tiny::tiny_config();
    let weights = philo_model::tiny::random_weights(&config, 0, &Device::Cpu).unwrap();
    let draft = Phi3::load(&config, &weights, DType::F32, &Device::Cpu).unwrap();
    let error = TokenStream::new(&model, vec![1, 2, 3], SamplingParams::greedy())
        .unwrap()
        .with_draft(&draft, 4)
        .err()
        .expect("a draft with 32,064 tokens for a 512-token model");
    assert!(error.to_string().contains("vocabulary"), "{error}");
}
