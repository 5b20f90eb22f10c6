//! The hand-written backward (`philo_model::train_layer`) against finite differences of its own
//! loss, on the CPU in f32, where PEFT's reference cannot follow: LoRA dropout on, a packed
//! batch of two segments plus padding, grouped-query attention with a sliding window. The
//! PEFT-parity tests (tests/hf_parity.rs) cover the case without dropout.
//!
//! For random directions v over all adapters, the directional derivative ⟨∇L, v⟩ from the
//! backward must match (L(θ + εv) − L(θ − εv)) / 2ε.

use candle_core::{DType, Device, Tensor};
use philo_model::adapter::{AdapterConfig, TARGET_MODULES};
use philo_model::tiny::{random_weights, tiny_config};
use philo_model::{DropoutSeed, Phi3, Phi3Config};
use philo_train::backward::{loss_and_grads, MicroBatch, PassOptions};
use philo_train::lora_params::LoraParams;
use philo_train::loss::count_targets;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn model() -> Phi3 {
    let config = Phi3Config {
        num_hidden_layers: 2,
        num_key_value_heads: 2,
        sliding_window: Some(9),
        ..tiny_config()
    };
    let weights = random_weights(&config, 3, &Device::Cpu).unwrap();
    Phi3::load(&config, &weights, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn backward_matches_finite_differences_with_dropout_and_packing() {
    let mut model = model();
    let adapter = AdapterConfig::new(
        4,
        8.0,
        0.3,
        TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
        false,
    );
    let params = LoraParams::init(&mut model, &adapter, 5).unwrap();
    let mut rng = StdRng::seed_from_u64(17);
    // B starts at zero; random B makes the A gradients non-zero too.
    for p in params.params.iter().filter(|p| p.name.contains("lora_B")) {
        let values: Vec<f32> = (0..p.var.elem_count())
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        p.var
            .set(&Tensor::from_vec(values, p.var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let (b, s) = (2, 24);
    let ids: Vec<u32> = (0..b * s).map(|_| rng.random_range(100..30000)).collect();
    // Row 0: 3 padding positions, then two segments; row 1: one segment.
    let segments: Vec<u32> = (0..b * s)
        .map(|i| match (i / s, i % s) {
            (0, j) if j < 3 => 0,
            (0, j) if j < 13 => 1,
            (0, _) => 2,
            _ => 1,
        })
        .collect();
    let labels: Vec<Vec<i64>> = (0..b)
        .map(|r| {
            (0..s)
                .map(|j| match segments[r * s + j] {
                    0 => -100,
                    _ => ids[r * s + j] as i64,
                })
                .collect()
        })
        .collect();
    let batch = MicroBatch {
        input_ids: Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap(),
        segments: Some(Tensor::from_vec(segments, (b, s), &Device::Cpu).unwrap()),
        labels: labels.clone(),
    };
    let n = count_targets(&labels);
    let dropout = Some(DropoutSeed(99));
    let loss = |params: &LoraParams| -> f64 {
        loss_and_grads(
            &model,
            params,
            &batch,
            n,
            PassOptions::CHECKPOINTED,
            dropout,
        )
        .unwrap()
        .loss_sum
            / n as f64
    };
    let grads = loss_and_grads(
        &model,
        &params,
        &batch,
        n,
        PassOptions::CHECKPOINTED,
        dropout,
    )
    .unwrap();
    let originals: Vec<Tensor> = params
        .params
        .iter()
        .map(|p| p.var.as_tensor().copy().unwrap())
        .collect();
    for trial in 0..3 {
        let directions: Vec<Tensor> = originals
            .iter()
            .map(|t| {
                let values: Vec<f32> = (0..t.elem_count())
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap()
            })
            .collect();
        let analytic: f64 = grads
            .grads
            .iter()
            .zip(&directions)
            .map(|(g, v)| {
                (g * v)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum();
        // Small enough that the truncation error of the central difference stays under the
        // tolerance, large enough that f32 rounding of the loss does too.
        let eps = 1e-3;
        let at = |sign: f64| -> f64 {
            for ((p, t), v) in params.params.iter().zip(&originals).zip(&directions) {
                p.var
                    .set(&(t + (v * (sign * eps)).unwrap()).unwrap())
                    .unwrap();
            }
            loss(&params)
        };
        let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
        for (p, t) in params.params.iter().zip(&originals) {
            p.var.set(t).unwrap();
        }
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-6);
        eprintln!(
            "direction {trial}: analytic {analytic:.6e}, numeric {numeric:.6e}, rel {rel:.2e}"
        );
        assert!(
            rel < 1e-2,
            "direction {trial}: analytic {analytic} vs numeric {numeric}"
        );
    }
}
