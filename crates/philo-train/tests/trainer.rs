//! Tests of the fine-tuning loop itself (`Trainer::new`, `run`, `resume_from`) on a small random
//! Phi-3 (the tiny shape with 2 layers) with the real Phi-3 tokenizer and the toy dataset:
//!
//! - a run stopped half-way and resumed from its checkpoint repeats the uninterrupted run
//!   bit for bit (losses, learning rates, gradient norms, final adapter), with LoRA dropout and
//!   gradient accumulation on, over an epoch boundary, on a dense and on an NF4 base;
//! - gradient accumulation over two micro-batches equals one batch of both;
//! - two data-parallel ranks (threads joined by an in-process communicator) train as one rank
//!   accumulating both ranks' micro-batches, with dropout and clipping on; only rank 0 writes;
//! - a loss that stops being finite ends the run with an error naming the loss and step, and
//!   leaves the checkpoint saved before it untouched.
//!
//! Everything runs on the CPU in f32, each trainer in its own temporary folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use philo_model::adapter::AdapterConfig;
use philo_model::tiny::{random_weights, tiny_config};
use philo_model::{Phi3, Phi3Config};
use philo_text::{ChatTemplate, Tokenizer};
use philo_train::adamw::AdamWConfig;
use philo_train::comm::Communicator;
use philo_train::data::{load_dataset, DataOptions, Example, RowDataset};
use philo_train::schedule::ScheduleKind;
use philo_train::trainer::{StepMetrics, TrainEvent, TrainSummary, Trainer, TrainerConfig};

const TOKENIZER_JSON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer.json"
);
const TOKENIZER_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer_config.json"
);
const TOY_DATASET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/toy_dataset.jsonl"
);

/// The tiny Phi-3 shape (hidden 128, Phi-3 vocabulary) with 2 layers instead of 4, for speed.
fn small_config() -> Phi3Config {
    Phi3Config {
        num_hidden_layers: 2,
        ..tiny_config()
    }
}

/// The dense small model (built once; each test clones it, which shares the frozen tensors).
fn dense_model() -> Phi3 {
    static MODEL: OnceLock<Phi3> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let config = small_config();
            let weights = random_weights(&config, 7, &Device::Cpu).unwrap();
            Phi3::load(&config, &weights, DType::F32, &Device::Cpu).unwrap()
        })
        .clone()
}

/// The first `n` examples of examples/toy_dataset.jsonl, tokenised with the Phi-3 template
/// (loss on the assistant replies), and the padding id.
fn toy_examples(n: usize) -> (Vec<Example>, u32) {
    static DATA: OnceLock<(Vec<Example>, u32)> = OnceLock::new();
    let (examples, pad) = DATA.get_or_init(|| {
        let tokenizer = Tokenizer::from_file(Path::new(TOKENIZER_JSON)).unwrap();
        let template = ChatTemplate::from_tokenizer_config(Path::new(TOKENIZER_CONFIG)).unwrap();
        let options = DataOptions {
            max_seq_length: 64,
            ..DataOptions::default()
        };
        let data = load_dataset(Path::new(TOY_DATASET), &tokenizer, &template, &options).unwrap();
        (data.examples, data.eos_id)
    });
    assert!(
        examples.len() >= n,
        "the toy dataset has {} examples",
        examples.len()
    );
    (examples[..n].to_vec(), *pad)
}

fn rows(n: usize) -> RowDataset {
    let (examples, pad) = toy_examples(n);
    RowDataset::unpacked(examples, pad)
}

fn adapter_config(dropout: f32) -> AdapterConfig {
    AdapterConfig::new(
        8,
        16.0,
        dropout,
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        false,
    )
}

fn trainer_config(output_dir: &Path) -> TrainerConfig {
    TrainerConfig {
        output_dir: output_dir.to_path_buf(),
        batch_size: 2,
        gradient_accumulation_steps: 1,
        epochs: 1,
        max_steps: None,
        lr: 1e-3,
        schedule: ScheduleKind::Constant,
        warmup_steps: 0,
        warmup_ratio: 0.0,
        max_grad_norm: Some(1.0),
        adamw: AdamWConfig::default(),
        seed: 42,
        logging_steps: 1,
        eval_steps: None,
        save_steps: None,
        gradient_checkpointing: true,
        gradient_offload: true,
        uncheckpointed_layers: 0,
    }
}

/// Runs `trainer` to its end (or until `stop_at` steps are logged, when given) and returns the
/// summary and the checkpoint folders it reported.
fn run(trainer: &mut Trainer, stop_at: Option<usize>) -> (TrainSummary, Vec<(usize, PathBuf)>) {
    let stop = AtomicBool::new(false);
    let mut saved = Vec::new();
    let summary = trainer
        .run(&stop, |event| match event {
            TrainEvent::Step(m) if Some(m.step) == stop_at => stop.store(true, Ordering::SeqCst),
            TrainEvent::Saved { step, dir } => saved.push((step, dir.to_path_buf())),
            _ => {}
        })
        .unwrap();
    (summary, saved)
}

/// The tensors of a safetensors file, by name.
fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The tensor names of an adapter, sorted.
fn sorted_names(adapter: &HashMap<String, Tensor>) -> Vec<&String> {
    let mut names: Vec<&String> = adapter.keys().collect();
    names.sort();
    names
}

/// The largest absolute difference between same-named tensors of two adapters (which must have
/// the same names and shapes).
fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(
        sorted_names(a),
        sorted_names(b),
        "the adapters hold different tensors"
    );
    let mut max = 0f32;
    for name in sorted_names(a) {
        assert_eq!(a[name].dims(), b[name].dims(), "{name}");
        for (x, y) in values(&a[name]).into_iter().zip(values(&b[name])) {
            max = max.max((x - y).abs());
        }
    }
    max
}

/// Fails unless two adapters hold the same tensors bit for bit.
fn assert_bitwise_equal(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(
        sorted_names(a),
        sorted_names(b),
        "{what}: different tensors"
    );
    let bits = |t: &Tensor| values(t).into_iter().map(f32::to_bits).collect::<Vec<_>>();
    for name in sorted_names(a) {
        assert_eq!(a[name].dims(), b[name].dims(), "{what}: {name}");
        assert!(bits(&a[name]) == bits(&b[name]), "{what}: {name} differs");
    }
}

/// Fails unless runs `a` and `b` logged the same steps, their losses within `loss_tolerance`
/// of the step and their gradient norms within 1e-5 of `a`'s.
fn assert_same_steps(
    a: &[StepMetrics],
    b: &[StepMetrics],
    loss_tolerance: impl Fn(usize) -> f64,
    what: &str,
) {
    assert_eq!(a.len(), b.len(), "{what}: steps logged");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step, "{what}");
        assert!(
            (x.loss - y.loss).abs() <= loss_tolerance(x.step),
            "{what}, step {}: loss {} against {}",
            x.step,
            x.loss,
            y.loss
        );
        assert!(
            (x.grad_norm - y.grad_norm).abs() <= 1e-5 * x.grad_norm,
            "{what}, step {}: gradient norm {} against {}",
            x.step,
            x.grad_norm,
            y.grad_norm
        );
    }
}

/// `(step, loss, lr, grad_norm)` of logged steps, the f64 values as bits so that comparing
/// traces is bitwise.
fn trace(history: &[StepMetrics]) -> Vec<(usize, u64, u64, u64)> {
    history
        .iter()
        .map(|m| {
            (
                m.step,
                m.loss.to_bits(),
                m.lr.to_bits(),
                m.grad_norm.to_bits(),
            )
        })
        .collect()
}

/// Files with their bytes.
type Files = Vec<(PathBuf, Vec<u8>)>;

/// 2N steps straight vs N steps, stopped, then resumed from checkpoint-N to 2N.
fn check_resume_repeats_the_straight_run(model: Phi3, label: &str) {
    const N: usize = 3;
    let work = tempfile::tempdir().unwrap();
    // 9 rows in micro-batches of 2 (the fifth holds one row): 5 micro-batches per epoch, so the
    // 12 micro-batches of 6 steps span epochs 0..=2 and the resume point (micro-batch 6) lies in
    // epoch 1.
    let data = || rows(9);
    let config = |name: &str| TrainerConfig {
        gradient_accumulation_steps: 2,
        max_steps: Some(2 * N),
        lr: 5e-3,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 2,
        save_steps: Some(N),
        ..trainer_config(&work.path().join(name))
    };
    let new_trainer = |name: &str| {
        Trainer::new(
            model.clone(),
            adapter_config(0.1),
            data(),
            None,
            config(name),
        )
        .unwrap()
    };

    let mut straight = new_trainer("straight");
    let (full, _) = run(&mut straight, None);
    assert_eq!(full.steps, 2 * N, "{label}");
    assert!(!full.interrupted, "{label}");
    let steps: Vec<usize> = full.history.iter().map(|m| m.step).collect();
    assert_eq!(
        steps,
        (1..=2 * N).collect::<Vec<_>>(),
        "{label}: logging_steps 1 logs every step"
    );
    assert!(
        full.history.iter().all(|m| m.loss.is_finite()),
        "{label}: {:?}",
        full.history
    );

    let mut first_half = new_trainer("interrupted");
    let (half, saved) = run(&mut first_half, Some(N));
    assert!(
        half.interrupted,
        "{label}: the stop flag set at step {N} ends the run"
    );
    assert_eq!(half.steps, N, "{label}");
    assert_eq!(
        trace(&half.history),
        trace(&full.history[..N]),
        "{label}: the same first {N} steps"
    );
    let checkpoint = work
        .path()
        .join("interrupted")
        .join(format!("checkpoint-{N}"));
    assert!(
        saved
            .iter()
            .any(|(step, dir)| *step == N && *dir == checkpoint),
        "{label}: {saved:?}"
    );
    assert!(checkpoint.join("trainer_state.json").is_file(), "{label}");
    assert_eq!(
        Trainer::latest_checkpoint(&work.path().join("interrupted")),
        Some(checkpoint.clone())
    );
    assert!(
        !work
            .path()
            .join("interrupted/adapter_model.safetensors")
            .exists(),
        "{label}: an interrupted run leaves only its checkpoint, not a final adapter"
    );

    // The checkpoint the stop wrote holds what the straight run's scheduled checkpoint holds.
    assert_bitwise_equal(
        &tensors(&checkpoint.join("adapter_model.safetensors")),
        &tensors(
            &work
                .path()
                .join(format!("straight/checkpoint-{N}/adapter_model.safetensors")),
        ),
        label,
    );

    let mut resumed = new_trainer("resumed");
    resumed.resume_from(&checkpoint).unwrap();
    let (rest, _) = run(&mut resumed, None);
    assert_eq!(rest.steps, 2 * N, "{label}");
    assert!(!rest.interrupted, "{label}");
    assert_eq!(
        trace(&rest.history),
        trace(&full.history[N..]),
        "{label}: steps {}..={} after the resume must repeat the straight run exactly\nresumed: {:?}\nstraight: {:?}",
        N + 1,
        2 * N,
        rest.history,
        &full.history[N..]
    );
    assert_eq!(
        rest.final_loss.map(f64::to_bits),
        full.final_loss.map(f64::to_bits),
        "{label}"
    );

    let straight_adapter = tensors(&work.path().join("straight/adapter_model.safetensors"));
    let resumed_adapter = tensors(&work.path().join("resumed/adapter_model.safetensors"));
    assert_bitwise_equal(&straight_adapter, &resumed_adapter, label);
    // The comparison has teeth: the adapter moved away from what it was at the checkpoint.
    let at_checkpoint = tensors(&checkpoint.join("adapter_model.safetensors"));
    assert!(
        max_abs_diff(&straight_adapter, &at_checkpoint) > 1e-4,
        "{label}: training after step {N} changed nothing"
    );
}

#[test]
fn resume_repeats_an_uninterrupted_run() {
    check_resume_repeats_the_straight_run(dense_model(), "dense base");
    let mut nf4 = dense_model();
    nf4.quantize_nf4(true).unwrap();
    check_resume_repeats_the_straight_run(nf4, "NF4 base");
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let work = tempfile::tempdir().unwrap();
    // Exactly 4 rows: every optimizer step sees all of them, whatever order the epoch's shuffle
    // gives, in one batch of 4 or in two micro-batches of 2.
    let train = |name: &str, batch_size: usize, accumulation: usize| {
        let config = TrainerConfig {
            batch_size,
            gradient_accumulation_steps: accumulation,
            max_steps: Some(2),
            lr: 1e-3,
            max_grad_norm: None,
            ..trainer_config(&work.path().join(name))
        };
        let mut trainer =
            Trainer::new(dense_model(), adapter_config(0.0), rows(4), None, config).unwrap();
        let (summary, _) = run(&mut trainer, None);
        assert_eq!(summary.steps, 2, "{name}");
        let adapter = tensors(&work.path().join(name).join("adapter_model.safetensors"));
        (summary.history, adapter)
    };
    let (big, big_adapter) = train("4x1", 4, 1);
    let (accumulated, accumulated_adapter) = train("2x2", 2, 2);
    assert_eq!(big.len(), 2);
    assert_eq!(accumulated.len(), 2);
    // Step 1 starts from the same adapter (B = 0), so its loss matches to the last bits; the
    // second sees f32 rounding differences of the first update (measured: 2.5e-6 of 10.6).
    assert_same_steps(
        &big,
        &accumulated,
        |step| if step == 1 { 1e-6 } else { 1e-5 },
        "one batch of 4 against 2 x 2",
    );
    let diff = max_abs_diff(&big_adapter, &accumulated_adapter);
    assert!(diff <= 1e-5, "the adapters after 2 steps differ by {diff}");

    // The comparison can tell batches apart: half of the data alone trains differently.
    let (half, half_adapter) = train("2x1", 2, 1);
    assert!(
        (half[0].loss - big[0].loss).abs() > 1e-3,
        "{} vs {}",
        half[0].loss,
        big[0].loss
    );
    assert!(max_abs_diff(&big_adapter, &half_adapter) > 1e-4);
}

/// One rank of a data-parallel run whose ranks are threads of this process: a collective waits
/// for every rank, then each rank sums all ranks' values in rank order (so every rank gets the
/// same sums), and waits again before the slots are reused.
struct LocalRank {
    rank: usize,
    group: Arc<LocalGroup>,
}

struct LocalGroup {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

impl LocalRank {
    fn group(world: usize) -> Vec<LocalRank> {
        let group = Arc::new(LocalGroup {
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![Vec::new(); world]),
        });
        (0..world)
            .map(|rank| LocalRank {
                rank,
                group: Arc::clone(&group),
            })
            .collect()
    }

    fn sum(&self, values: &[f64]) -> Vec<f64> {
        self.group.slots.lock().unwrap()[self.rank] = values.to_vec();
        self.group.barrier.wait();
        let sums = {
            let slots = self.group.slots.lock().unwrap();
            (0..values.len())
                .map(|i| slots.iter().map(|s| s[i]).sum())
                .collect()
        };
        self.group.barrier.wait();
        sums
    }
}

impl Communicator for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.slots.lock().unwrap().len()
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> philo_train::Result<()> {
        let sums = self.sum(values);
        values.copy_from_slice(&sums);
        Ok(())
    }

    fn all_reduce_tensors(&self, tensors: &[Tensor]) -> philo_train::Result<()> {
        let flat: Vec<f64> = tensors
            .iter()
            .flat_map(|t| values(t).into_iter().map(f64::from))
            .collect();
        let sums = self.sum(&flat);
        let mut at = 0;
        for t in tensors {
            let part: Vec<f32> = sums[at..at + t.elem_count()]
                .iter()
                .map(|&v| v as f32)
                .collect();
            at += t.elem_count();
            t.slice_set(&Tensor::from_vec(part, t.shape(), t.device())?, 0, 0)?;
        }
        Ok(())
    }
}

/// `world` ranks with micro-batches of 2 rows against one rank that accumulates `world` of them:
/// one epoch of `n_rows` rows in `steps` steps, with LoRA dropout (seeded by the micro-batch's
/// place in the window) and clipping (of the summed gradients).
fn check_data_parallel(n_rows: usize, world: usize, steps: usize) {
    let work = tempfile::tempdir().unwrap();
    let config = |name: &str, accumulation: usize| TrainerConfig {
        batch_size: 2,
        gradient_accumulation_steps: accumulation,
        lr: 1e-3,
        max_grad_norm: Some(1.0),
        ..trainer_config(&work.path().join(name))
    };
    let mut one = Trainer::new(
        dense_model(),
        adapter_config(0.1),
        rows(n_rows),
        None,
        config("one", world),
    )
    .unwrap();
    let (one_summary, _) = run(&mut one, None);
    let ranks: Vec<TrainSummary> = std::thread::scope(|scope| {
        let handles: Vec<_> = LocalRank::group(world)
            .into_iter()
            .map(|comm| {
                let config = config(&format!("rank{}", comm.rank), 1);
                scope.spawn(move || {
                    let mut trainer = Trainer::new_rank(
                        dense_model(),
                        adapter_config(0.1),
                        rows(n_rows),
                        None,
                        config,
                        Box::new(comm),
                    )
                    .unwrap();
                    assert_eq!(trainer.total_steps(), steps);
                    run(&mut trainer, None).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let what = format!("{n_rows} rows on {world} ranks");
    assert_eq!(one_summary.history.len(), steps, "{what}");
    for rank in &ranks {
        assert_eq!(rank.steps, steps, "{what}");
        assert_eq!(
            trace(&rank.history),
            trace(&ranks[0].history),
            "{what}: ranks disagree"
        );
    }
    assert_same_steps(
        &one_summary.history,
        &ranks[0].history,
        |_| 1e-5,
        &format!("{what} against one rank"),
    );
    let one_adapter = tensors(&work.path().join("one/adapter_model.safetensors"));
    let rank0_adapter = tensors(&work.path().join("rank0/adapter_model.safetensors"));
    let diff = max_abs_diff(&one_adapter, &rank0_adapter);
    assert!(diff <= 1e-5, "{what}: the adapters differ by {diff}");
    for rank in 1..world {
        let dir = work.path().join(format!("rank{rank}"));
        assert!(
            !dir.exists(),
            "{what}: rank {rank} wrote files: only rank 0 logs and saves"
        );
    }
}

#[test]
fn data_parallel_ranks_train_as_one_rank_with_the_whole_window() {
    // 4 micro-batches: two windows of two.
    check_data_parallel(8, 2, 2);
    // 5 micro-batches on 3 ranks: the second window has two, so rank 2 has none and still
    // takes part in every sum.
    check_data_parallel(10, 3, 2);
}

/// Trains `world` ranks on 16 rows (micro-batches of 2, one each a step: 8 / world steps) into
/// `out`, each rank from `resume` when given. `stop_rank1_after`: rank 0's events set rank 1's
/// stop flag once that step is logged (rank 0's own flag stays clear). Returns every rank's
/// summary.
fn train_ranks(
    world: usize,
    out: &Path,
    resume: Option<&Path>,
    stop_rank1_after: Option<usize>,
) -> Vec<TrainSummary> {
    let rank1_stop = AtomicBool::new(false);
    let rank1_stop = &rank1_stop;
    std::thread::scope(|scope| {
        let handles: Vec<_> = LocalRank::group(world)
            .into_iter()
            .map(|comm| {
                let config = TrainerConfig {
                    batch_size: 2,
                    lr: 1e-3,
                    ..trainer_config(out)
                };
                scope.spawn(move || {
                    let rank = comm.rank;
                    let mut trainer = Trainer::new_rank(
                        dense_model(),
                        adapter_config(0.1),
                        rows(16),
                        None,
                        config,
                        Box::new(comm),
                    )
                    .unwrap();
                    if let Some(dir) = resume {
                        trainer.resume_from(dir).unwrap();
                    }
                    let own = AtomicBool::new(false);
                    let stop = if rank == 1 { rank1_stop } else { &own };
                    trainer
                        .run(stop, |event| {
                            if let TrainEvent::Step(m) = event {
                                if Some(m.step) == stop_rank1_after {
                                    rank1_stop.store(true, Ordering::SeqCst);
                                }
                            }
                        })
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_stop_on_any_rank_stops_all_and_the_run_resumes_as_if_uninterrupted() {
    let work = tempfile::tempdir().unwrap();
    let straight = train_ranks(2, &work.path().join("straight"), None, None);
    assert_eq!(straight[0].steps, 4);
    let interrupted_dir = work.path().join("interrupted");
    // Rank 1's flag is set while it may already be in the next step's check: the ranks stop
    // after step 1 or 2, but both at the same one.
    let interrupted = train_ranks(2, &interrupted_dir, None, Some(1));
    let stopped = interrupted[0].steps;
    assert!((1..4).contains(&stopped), "stopped after step {stopped}");
    for rank in &interrupted {
        assert!(rank.interrupted);
        assert_eq!(rank.steps, stopped, "the ranks stopped at different steps");
    }
    let checkpoint = interrupted_dir.join(format!("checkpoint-{stopped}"));
    let resumed = train_ranks(2, &interrupted_dir, Some(&checkpoint), None);
    assert_eq!(resumed[0].steps, 4);
    assert_eq!(
        trace(&resumed[0].history),
        trace(&straight[0].history[stopped..]),
        "the resumed steps repeat the straight run's"
    );
    assert_bitwise_equal(
        &tensors(&work.path().join("straight/adapter_model.safetensors")),
        &tensors(&interrupted_dir.join("adapter_model.safetensors")),
        "adapter after resuming",
    );
}

#[test]
fn resume_refuses_a_checkpoint_of_another_world_size() {
    let work = tempfile::tempdir().unwrap();
    let config = TrainerConfig {
        max_steps: Some(2),
        save_steps: Some(1),
        ..trainer_config(&work.path().join("run"))
    };
    let mut one = Trainer::new(
        dense_model(),
        adapter_config(0.0),
        rows(8),
        None,
        config.clone(),
    )
    .unwrap();
    let (_, saved) = run(&mut one, None);
    let (step, checkpoint) = &saved[0];
    assert_eq!(*step, 1);
    // Same seed, batch, accumulation and total steps: only the number of ranks differs.
    let rank0 = LocalRank::group(2).remove(0);
    let mut two = Trainer::new_rank(
        dense_model(),
        adapter_config(0.0),
        rows(8),
        None,
        config,
        Box::new(rank0),
    )
    .unwrap();
    let error = two.resume_from(checkpoint).unwrap_err().to_string();
    assert!(
        error.contains("1 rank(s); this run has 42, 2, 2, 1, 2; resume with the same settings"),
        "{error}"
    );
}

#[test]
fn nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // Step 1 is an ordinary step whose update (AdamW moves every B entry by about lr) blows the
    // adapter up; step 2's forward pass then overflows, so its loss is not finite.
    let config = TrainerConfig {
        max_steps: Some(4),
        lr: 1e30,
        save_steps: Some(1),
        ..trainer_config(&out)
    };
    let mut trainer =
        Trainer::new(dense_model(), adapter_config(0.0), rows(8), None, config).unwrap();
    let stop = AtomicBool::new(false);
    let mut logged = Vec::new();
    // The folder of the last checkpoint and its files' bytes when it was written.
    let mut snapshot: Option<(PathBuf, Files)> = None;
    let error = trainer
        .run(&stop, |event| match event {
            TrainEvent::Step(m) => logged.push(m.clone()),
            TrainEvent::Saved { dir, .. } => {
                let mut files: Files = std::fs::read_dir(dir)
                    .unwrap()
                    .map(|e| {
                        let path = e.unwrap().path();
                        let bytes = std::fs::read(&path).unwrap();
                        (path, bytes)
                    })
                    .collect();
                files.sort();
                snapshot = Some((dir.to_path_buf(), files));
            }
            TrainEvent::Started { .. } | TrainEvent::Progress { .. } => {}
        })
        .expect_err("a run whose loss overflows must fail");
    let message = error.to_string();
    assert!(message.contains("loss"), "{message}");
    assert!(
        message.contains("NaN") || message.contains("inf"),
        "the message says what the loss became: {message}"
    );
    assert!(message.contains("at step 2"), "{message}");
    assert!(
        message.contains(&out.display().to_string()),
        "the message names where the checkpoint is: {message}"
    );

    assert_eq!(logged.len(), 1, "only step 1 had a finite loss: {logged:?}");
    assert!(logged[0].loss.is_finite());
    let (dir, files) = snapshot.expect("checkpoint-1 was saved before the loss broke");
    assert_eq!(dir, out.join("checkpoint-1"));
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "checkpoint-1 lacks {expected}: {names:?}"
        );
    }
    for (path, bytes) in &files {
        let now = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            now == *bytes,
            "{} changed after the failure",
            path.display()
        );
    }
    assert_eq!(
        Trainer::latest_checkpoint(&out),
        Some(out.join("checkpoint-1"))
    );
    assert!(!out.join("checkpoint-2").exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        1,
        "only step 1 is logged: {metrics}"
    );
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no final adapter from a failed run"
    );

    // The kept checkpoint is usable: a fresh trainer resumes from it.
    let config = TrainerConfig {
        max_steps: Some(4),
        lr: 1e30,
        save_steps: Some(1),
        ..trainer_config(&work.path().join("again"))
    };
    let mut again =
        Trainer::new(dense_model(), adapter_config(0.0), rows(8), None, config).unwrap();
    again.resume_from(&out.join("checkpoint-1")).unwrap();
}
