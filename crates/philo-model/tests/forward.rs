//! Forward-pass behaviour beyond single-sequence parity: KV cache, padded batches, checkpoint
//! layouts and dtypes, checked against the reference logits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use philo_model::{ModelError, Phi3Config, SafetensorsStore};

/// Prefill of a few tokens, then one token at a time, gives the logits of the full forward.
#[test]
fn kv_cache_steps_match_full_forward() {
    // longrope's in1 stays below original_max_position_embeddings; gqa_window's in0 (24 tokens)
    // runs past its sliding window of 8 inside the cache.
    for (case, key) in [
        ("mini4k", "in0"),
        ("gqa_window", "in0"),
        ("longrope", "in1"),
    ] {
        let dir = case_dir(case);
        let model = load_model(&dir, DType::F32);
        let ids = input(&reference(&dir), key);
        let expected = reference_tensor(&dir, &format!("logits.{key}"));
        let mut cache = model.new_cache();
        let prefill = 5;
        let logits = model
            .forward(&row(&ids[..prefill]), None, Some(&mut cache))
            .unwrap();
        let diff = relative_diff(
            &logits.squeeze(0).unwrap(),
            &expected.narrow(0, 0, prefill).unwrap(),
        );
        assert!(diff < 1e-4, "{case}: prefill logits differ by {diff:e}");
        for (i, &id) in ids.iter().enumerate().skip(prefill) {
            let step = model
                .forward_last(&row(&[id]), None, Some(&mut cache))
                .unwrap();
            let diff = relative_diff(&step, &expected.narrow(0, i, 1).unwrap());
            assert!(diff < 1e-4, "{case}: step {i} logits differ by {diff:e}");
        }
        assert_eq!(cache.seq_len(), ids.len());
    }
}

/// Two sequences of different lengths in one batch, the shorter left-padded, give each sequence's
/// reference logits on its real positions.
#[test]
fn left_padded_batch_matches_reference() {
    for case in ["mini4k", "gqa_window"] {
        let dir = case_dir(case);
        let model = load_model(&dir, DType::F32);
        let reference = reference(&dir);
        let (long, short) = (input(&reference, "in0"), input(&reference, "in1"));
        let pad = long.len() - short.len();
        let mut padded = vec![0u32; pad];
        padded.extend(&short);
        let ids = Tensor::new(vec![long.clone(), padded], &Device::Cpu).unwrap();
        let mask: Vec<Vec<u32>> = vec![
            vec![1; long.len()],
            (0..long.len()).map(|j| (j >= pad) as u32).collect(),
        ];
        let mask = Tensor::new(mask, &Device::Cpu).unwrap();
        let logits = model.forward(&ids, Some(&mask), None).unwrap();
        let first = logits.get(0).unwrap();
        let diff = relative_diff(&first, &reference_tensor(&dir, "logits.in0"));
        assert!(diff < 1e-4, "{case}: batch row 0 differs by {diff:e}");
        let second = logits.get(1).unwrap().narrow(0, pad, short.len()).unwrap();
        let diff = relative_diff(&second, &reference_tensor(&dir, "logits.in1"));
        assert!(
            diff < 1e-4,
            "{case}: padded batch row 1 differs by {diff:e}"
        );
        let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{case}: padding rows must stay finite"
        );
    }
}

/// Padded batch decoding through the cache: each row's next-token logits equal the row alone.
#[test]
fn padded_batch_decodes_through_cache() {
    let dir = case_dir("gqa_window");
    let model = load_model(&dir, DType::F32);
    let reference = reference(&dir);
    let (a, b) = (input(&reference, "in0"), input(&reference, "in1"));
    let (a_prompt, b_prompt) = (&a[..12], &b[..7]);
    let pad = a_prompt.len() - b_prompt.len();
    let mut b_padded = vec![0u32; pad];
    b_padded.extend(b_prompt);
    let mut mask_rows = vec![
        vec![1u32; a_prompt.len()],
        (0..a_prompt.len())
            .map(|j| (j >= pad) as u32)
            .collect::<Vec<_>>(),
    ];
    let mut cache = model.new_cache();
    let ids = Tensor::new(vec![a_prompt.to_vec(), b_padded], &Device::Cpu).unwrap();
    let mask = Tensor::new(mask_rows.clone(), &Device::Cpu).unwrap();
    model
        .forward_last(&ids, Some(&mask), Some(&mut cache))
        .unwrap();
    // Feed the true continuations and compare with the unpadded full forward of each row.
    let full_a = model
        .forward(&row(&a), None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let full_b = model
        .forward(&row(&b), None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    for step in 0..5 {
        let (ta, tb) = (a[a_prompt.len() + step], b[b_prompt.len() + step]);
        mask_rows.iter_mut().for_each(|m| m.push(1));
        let mask = Tensor::new(mask_rows.clone(), &Device::Cpu).unwrap();
        let ids = Tensor::new(vec![vec![ta], vec![tb]], &Device::Cpu).unwrap();
        let logits = model
            .forward_last(&ids, Some(&mask), Some(&mut cache))
            .unwrap();
        let ea = full_a.narrow(0, a_prompt.len() + step, 1).unwrap();
        let eb = full_b.narrow(0, b_prompt.len() + step, 1).unwrap();
        let da = relative_diff(&logits.narrow(0, 0, 1).unwrap(), &ea);
        let db = relative_diff(&logits.narrow(0, 1, 1).unwrap(), &eb);
        assert!(
            da < 1e-4 && db < 1e-4,
            "step {step}: rows differ by {da:e} / {db:e}"
        );
    }
}

fn write_checkpoint(tensors: &std::collections::HashMap<String, Tensor>, path: &std::path::Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

fn all_tensors(dir: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    let store = SafetensorsStore::open_dir(dir).unwrap();
    store
        .names()
        .map(|n| (n.to_string(), store.load_raw(n).unwrap()))
        .collect()
}

/// A sharded checkpoint (index + two files) loads to the same model.
#[test]
fn sharded_checkpoint_loads() {
    let src = case_dir("mini4k");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let tensors = all_tensors(&src);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        write_checkpoint(&shard, &tmp.path().join(file));
        for n in part {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let model = load_model(tmp.path(), DType::F32);
    let ids = input(&reference(&src), "in0");
    let logits = model
        .forward(&row(&ids), None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = relative_diff(&logits, &reference_tensor(&src, "logits.in0"));
    assert!(diff < 1e-4, "sharded logits differ by {diff:e}");
}

/// bf16 and f16 on disk load into f32 compute; bf16 compute stays within bf16 tolerance. These
/// random fixtures are sharp (init range 0.15): rounding the weights to bf16 alone moves the
/// logits by 1.3e-2 relative, and bf16 activations add about as much again.
#[test]
fn half_precision_checkpoints_and_compute() {
    let src = case_dir("mini4k");
    let ids = input(&reference(&src), "in0");
    let expected = reference_tensor(&src, "logits.in0");
    for dtype in [DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let converted = all_tensors(&src)
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(dtype).unwrap()))
            .collect();
        write_checkpoint(&converted, &tmp.path().join("model.safetensors"));
        let model = load_model(tmp.path(), DType::F32);
        let logits = model
            .forward(&row(&ids), None, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let diff = relative_diff(&logits, &expected);
        assert!(diff < 2e-2, "{dtype:?} on disk: logits differ by {diff:e}");
    }
    let model = load_model(&src, DType::BF16);
    let logits = model
        .forward(&row(&ids), None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = relative_diff(&logits, &expected);
    assert!(diff < 5e-2, "bf16 compute: logits differ by {diff:e}");
}

/// A missing tensor and a tensor of the wrong shape are named with their file.
#[test]
fn missing_and_misshapen_tensors_are_named() {
    let src = case_dir("mini4k");
    let config = Phi3Config::from_file(&src.join("config.json")).unwrap();
    let mut tensors = all_tensors(&src);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");

    tensors.remove("model.layers.1.mlp.down_proj.weight");
    write_checkpoint(&tensors, &path);
    let store = SafetensorsStore::open_files(std::slice::from_ref(&path)).unwrap();
    let err = philo_model::Phi3::load(&config, &store, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("model.layers.1.mlp.down_proj.weight")
            && message.contains("model.safetensors"),
        "{message}"
    );

    tensors.insert(
        "model.layers.1.mlp.down_proj.weight".into(),
        Tensor::zeros((64, 95), DType::F32, &Device::Cpu).unwrap(),
    );
    write_checkpoint(&tensors, &path);
    let store = SafetensorsStore::open_files(std::slice::from_ref(&path)).unwrap();
    let err = philo_model::Phi3::load(&config, &store, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.down_proj.weight")
            && err.contains("[64, 95]")
            && err.contains("[64, 96]"),
        "{err}"
    );
}

/// A truncated file is refused when opened, naming the file.
#[test]
fn truncated_safetensors_is_refused() {
    let src = case_dir("mini4k").join("model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = SafetensorsStore::open_files(&[path])
        .err()
        .expect("a truncated file must be refused");
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

/// Two samples packed in one row with segment ids 1 and 2 give each sample's own logits:
/// attention stays inside a segment and positions restart.
#[test]
fn packed_segments_attend_only_within_themselves() {
    let dir = case_dir("mini4k");
    let model = load_model(&dir, DType::F32);
    let reference = reference(&dir);
    let (a, b) = (input(&reference, "in1"), input(&reference, "in0"));
    let b = &b[..10];
    let mut ids = a.clone();
    ids.extend(b);
    ids.extend([0, 0]); // right padding
    let segments: Vec<u32> = std::iter::repeat_n(1, a.len())
        .chain(std::iter::repeat_n(2, b.len()))
        .chain([0, 0])
        .collect();
    let mask = Tensor::new(segments.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&row(&ids), Some(&mask), None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let first = logits.narrow(0, 0, a.len()).unwrap();
    let diff = relative_diff(&first, &reference_tensor(&dir, "logits.in1"));
    assert!(diff < 1e-4, "segment 1 differs by {diff:e}");
    let second = logits.narrow(0, a.len(), b.len()).unwrap();
    let expected = reference_tensor(&dir, "logits.in0")
        .narrow(0, 0, b.len())
        .unwrap();
    let diff = relative_diff(&second, &expected);
    assert!(diff < 1e-4, "segment 2 differs by {diff:e}");
}

/// An NF4 base computes exactly what a dense model of its dequantised weights computes.
#[test]
fn nf4_base_runs_like_its_dequantised_weights() {
    let dir = case_dir("mini4k");
    let mut quantized = load_model(&dir, DType::F32);
    quantized.quantize_nf4(true).unwrap();
    let mut dense = quantized.clone();
    for (_, _, linear) in dense.linears_mut() {
        let weight = linear.dense_weight(DType::F32, &Device::Cpu).unwrap();
        linear.base = philo_model::BaseWeight::Dense(weight);
    }
    assert!(quantized
        .linears_mut()
        .iter()
        .all(|(_, _, l)| matches!(l.base, philo_model::BaseWeight::Nf4(_))));
    let ids = input(&reference(&dir), "in0");
    let a = quantized.forward(&row(&ids), None, None).unwrap();
    let b = dense.forward(&row(&ids), None, None).unwrap();
    let diff = relative_diff(&a, &b);
    assert!(
        diff < 1e-5,
        "NF4 and its dequantised dense weights differ by {diff:e}"
    );
}
