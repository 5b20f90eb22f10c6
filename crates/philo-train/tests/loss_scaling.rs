//! f16 training under dynamic loss scaling (torch's GradScaler rules), on the CPU with a tiny
//! model in f16: a step whose scaled gradients overflow f16 is skipped — the adapter and the
//! optimizer are left as they were — and the scale halves; at a sane scale the step applies and
//! reports the unscaled gradient norm.

use candle_core::{DType, Device, Tensor};
use philo_model::adapter::{AdapterConfig, TARGET_MODULES};
use philo_model::tiny::{random_weights, tiny_config};
use philo_model::{DropoutSeed, Phi3, Phi3Config};
use philo_train::adamw::{AdamW, AdamWConfig};
use philo_train::backward::{LossScaler, MicroBatch, PassOptions, StepContext};
use philo_train::comm::SingleProcess;
use philo_train::lora_params::LoraParams;
use philo_train::step::{train_step, StepConfig, WindowBatch};

fn snapshot(params: &LoraParams) -> Vec<Vec<f32>> {
    params
        .params
        .iter()
        .map(|p| {
            p.var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn overflowing_f16_steps_are_skipped_and_the_scale_halves() {
    let config = Phi3Config {
        num_hidden_layers: 2,
        ..tiny_config()
    };
    let weights = random_weights(&config, 9, &Device::Cpu).unwrap();
    let mut model = Phi3::load(&config, &weights, DType::F16, &Device::Cpu).unwrap();
    let adapter = AdapterConfig::new(
        4,
        8.0,
        0.0,
        TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
        false,
    );
    let params = LoraParams::init(&mut model, &adapter, 1).unwrap();
    let mut optimizer = AdamW::new(AdamWConfig::default(), &params).unwrap();
    let ids: Vec<u32> = (0..32).map(|i| 100 + i * 37).collect();
    let window = [WindowBatch {
        batch: MicroBatch {
            input_ids: Tensor::from_vec(ids.clone(), (1, 32), &Device::Cpu).unwrap(),
            segments: None,
            labels: vec![ids.iter().map(|&i| i as i64).collect()],
        },
        dropout: DropoutSeed(3),
    }];
    let step_config = StepConfig {
        lr: 1e-3,
        max_grad_norm: Some(1.0),
        pass: PassOptions {
            checkpointing: true,
            offload: false,
            uncheckpointed_layers: 0,
        },
    };
    let mut context = StepContext::new(&Device::Cpu, DType::F16);
    assert_eq!(context.scaler, Some(LossScaler::new(65536.0)));
    let step = |optimizer: &mut AdamW, context: &mut StepContext| {
        train_step(
            &model,
            &params,
            optimizer,
            &window,
            step_config,
            context,
            &SingleProcess,
        )
        .unwrap()
        .unwrap()
    };

    // Far beyond f16's range (65504): the gradients overflow.
    context.scaler = Some(LossScaler::new(1e30));
    let before = snapshot(&params);
    let outcome = step(&mut optimizer, &mut context);
    assert!(outcome.skipped, "{outcome:?}");
    assert!(outcome.loss.is_finite() && !outcome.grad_norm.is_finite());
    assert_eq!(
        snapshot(&params),
        before,
        "a skipped step must not touch the adapter"
    );
    assert_eq!(optimizer.step, 0, "a skipped step must not count for AdamW");
    assert_eq!(context.scaler.as_ref().unwrap().scale, 5e29);

    // A scale f16 holds: the step applies, with the norm of the unscaled gradients.
    context.scaler = Some(LossScaler::new(1024.0));
    let outcome = step(&mut optimizer, &mut context);
    assert!(
        !outcome.skipped && outcome.grad_norm.is_finite(),
        "{outcome:?}"
    );
    assert_ne!(snapshot(&params), before);
    assert_eq!(optimizer.step, 1);
    // The same step without scaling reports the same gradient norm (f16 noise aside).
    let mut plain = StepContext::new(&Device::Cpu, DType::F16);
    plain.scaler = Some(LossScaler::new(1.0));
    let mut optimizer2 = AdamW::new(AdamWConfig::default(), &params).unwrap();
    let unscaled = step(&mut optimizer2, &mut plain);
    let rel = (unscaled.grad_norm - outcome.grad_norm).abs() / unscaled.grad_norm;
    assert!(
        rel < 0.2,
        "norm at scale 1024 {} vs unscaled {}",
        outcome.grad_norm,
        unscaled.grad_norm
    );
}
