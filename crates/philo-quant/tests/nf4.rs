//! NF4 against bitsandbytes 0.50 reference data (`quantize_4bit(W, blocksize=64,
//! quant_type="nf4")`, plain and with `compress_statistics=True`), plus properties on random
//! data, ragged shapes, bad input and the dequantising matmul.

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use philo_quant::{
    dequantize_matmul, dynamic_code, nf4_index, quantize_dynamic, Absmax, Nf4Tensor, QuantError,
    DOUBLE_QUANT_BLOCK_SIZE, NF4_BLOCK_SIZE, NF4_CODE,
};
use safetensors::{Dtype, SafeTensors};

const FIXTURE_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/hf-reference/dev/nf4"
);

/// The reference tensors and JSON metadata.
struct Fixture {
    bytes: Vec<u8>,
    json: serde_json::Value,
}

impl Fixture {
    fn load() -> Self {
        let bytes = std::fs::read(format!("{FIXTURE_DIR}/nf4_reference.safetensors"))
            .expect("read nf4_reference.safetensors");
        let json = std::fs::read_to_string(format!("{FIXTURE_DIR}/nf4_reference.json"))
            .expect("read nf4_reference.json");
        Fixture {
            bytes,
            json: serde_json::from_str(&json).expect("parse nf4_reference.json"),
        }
    }

    fn view(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("parse safetensors");
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let (dtype, _, data) = self.view(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn u8s(&self, name: &str) -> Vec<u8> {
        let (dtype, _, data) = self.view(name);
        assert_eq!(dtype, Dtype::U8, "{name}");
        data
    }

    fn shape(&self, name: &str) -> Vec<usize> {
        self.view(name).1
    }

    /// `W` as (values, rows, cols).
    fn weights(&self) -> (Vec<f32>, usize, usize) {
        let shape = self.shape("W");
        (self.f32s("W"), shape[0], shape[1])
    }
}

/// Distance from `r` to the next bf16 value away from zero: one bf16 ulp at `r`.
fn ulp_bf16(r: f32) -> f32 {
    let b = bf16::from_f32(r);
    let next = bf16::from_bits(b.to_bits() + 1);
    (next.to_f32() - b.to_f32()).abs()
}

/// Small deterministic generator (SplitMix64) so the tests need no extra dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` weights like a checkpoint's: normal × `scale`, rounded to bf16, as f32.
    fn bf16_weights(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| bf16::from_f64(self.normal() * scale).to_f32())
            .collect()
    }
}

/// Index of the nearest NF4 value to `x` in exact arithmetic (ties to the lower index).
fn nearest_code(x: f32) -> usize {
    let x = f64::from(x.clamp(-1.0, 1.0));
    let distance = |k: usize| (f64::from(NF4_CODE[k]) - x).abs();
    // `min_by` keeps the first of equal elements: ties go to the lower index.
    (0..16)
        .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
        .unwrap()
}

/// Half the gap between the two NF4 values around `x` (the worst rounding error at `x`).
fn half_gap_around(x: f32) -> f32 {
    let x = x.clamp(-1.0, 1.0);
    let upper = NF4_CODE.iter().position(|&c| c >= x).unwrap_or(15).max(1);
    (NF4_CODE[upper] - NF4_CODE[upper - 1]) / 2.0
}

// ---------------------------------------------------------------- code tables

#[test]
fn nf4_code_equals_fixture() {
    let fixture = Fixture::load();
    let reference = fixture.f32s("nf4.code");
    assert_eq!(reference.len(), 16);
    for (k, (&ours, &theirs)) in NF4_CODE.iter().zip(&reference).enumerate() {
        assert_eq!(
            ours.to_bits(),
            theirs.to_bits(),
            "code[{k}]: {ours} vs {theirs}"
        );
    }
}

#[test]
fn dynamic_code_equals_fixture() {
    let fixture = Fixture::load();
    let reference = fixture.f32s("dq.state2.code");
    assert_eq!(reference.len(), 256);
    let ours = dynamic_code();
    let mismatches: Vec<_> = (0..256)
        .filter(|&i| ours[i].to_bits() != reference[i].to_bits())
        .map(|i| (i, ours[i], reference[i]))
        .collect();
    assert!(
        mismatches.is_empty(),
        "dynamic code differs at {mismatches:?}"
    );
}

/// The thresholds of bitsandbytes' `dQuantizeNF4` decision tree, as written in its source
/// (double literals with an `f` suffix, i.e. rounded to f32).
#[allow(clippy::excessive_precision)]
const BNB_NF4_TREE_THRESHOLDS: [f64; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

#[test]
fn nf4_index_switches_exactly_at_bitsandbytes_thresholds() {
    for (k, &t) in BNB_NF4_TREE_THRESHOLDS.iter().enumerate() {
        let t = t as f32;
        // "x > threshold" picks the upper code: the threshold itself stays below.
        assert_eq!(nf4_index(t) as usize, k, "at threshold {t}");
        assert_eq!(nf4_index(t.next_down()) as usize, k, "below threshold {t}");
        assert_eq!(
            nf4_index(t.next_up()) as usize,
            k + 1,
            "above threshold {t}"
        );
    }
    assert_eq!(nf4_index(-1.0), 0);
    assert_eq!(nf4_index(0.0), 7);
    assert_eq!(nf4_index(1.0), 15);
    assert_eq!(
        nf4_index(-7.0),
        0,
        "below the range clamps to the first code"
    );
    assert_eq!(
        nf4_index(7.0),
        15,
        "above the range clamps to the last code"
    );
    assert_eq!(
        nf4_index(f32::NAN),
        0,
        "NaN maps to index 0 as in bitsandbytes"
    );
}

#[test]
fn nf4_index_picks_the_nearest_code() {
    let mut rng = Rng(7);
    for _ in 0..100_000 {
        let x = (rng.uniform() * 2.2 - 1.1) as f32;
        let ours = nf4_index(x) as usize;
        let nearest = nearest_code(x);
        if ours != nearest {
            // Only possible within f32 rounding of a midpoint.
            let x64 = f64::from(x.clamp(-1.0, 1.0));
            let d_ours = (f64::from(NF4_CODE[ours]) - x64).abs();
            let d_nearest = (f64::from(NF4_CODE[nearest]) - x64).abs();
            assert!(
                d_ours - d_nearest <= 1e-7,
                "x = {x}: index {ours} (distance {d_ours}) but {nearest} is nearer ({d_nearest})"
            );
        }
    }
}

#[test]
fn quantize_dynamic_maps_code_values_to_themselves_and_ties_like_bitsandbytes() {
    let code = dynamic_code();
    for (i, &c) in code.iter().enumerate() {
        // 0.0 appears once; every code value must map back to its own index.
        assert_eq!(quantize_dynamic(code, c) as usize, i, "code[{i}] = {c}");
    }
    assert_eq!(quantize_dynamic(code, -1.0), 0);
    assert_eq!(quantize_dynamic(code, f32::NAN), 0);
    // Between code[127] = 0 and code[128]: the search ends on pivot 128, so the exact
    // midpoint goes to 128 (a tie goes to the final pivot, not always to the lower value).
    assert_eq!(code[127], 0.0);
    let mid = (code[127] + code[128]) * 0.5;
    assert_eq!(quantize_dynamic(code, mid), 128);
    assert_eq!(quantize_dynamic(code, mid.next_up()), 128);
    assert_eq!(quantize_dynamic(code, mid.next_down()), 127);
}

// ---------------------------------------------------------------- against bitsandbytes

#[test]
fn plain_packed_and_absmax_equal_fixture_exactly() {
    let fixture = Fixture::load();
    assert_eq!(fixture.json["blocksize"], 64);
    let (w, rows, cols) = fixture.weights();
    let q = Nf4Tensor::quantize(&w, rows, cols, false).unwrap();

    let packed = fixture.u8s("plain.packed");
    assert_eq!(fixture.shape("plain.packed"), vec![packed.len(), 1]);
    assert_eq!(q.packed().len(), packed.len());
    let wrong: Vec<_> = (0..packed.len())
        .filter(|&i| q.packed()[i] != packed[i])
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} packed bytes differ, first at {:?}",
        wrong.len(),
        packed.len(),
        wrong.first()
    );

    let absmax = fixture.f32s("plain.absmax");
    let Absmax::Plain(ours) = q.absmax() else {
        panic!("expected plain absmax")
    };
    assert_eq!(ours.len(), absmax.len());
    for (i, (a, b)) in ours.iter().zip(&absmax).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "absmax[{i}]: {a} vs {b}");
    }
    assert_eq!(q.absmax_values(), absmax);
    assert!(!q.is_double_quant());
    assert_eq!(q.shape(), (96, 256));
    assert_eq!(q.block_size(), NF4_BLOCK_SIZE);
}

#[test]
fn double_quant_parts_equal_fixture() {
    let fixture = Fixture::load();
    let (w, rows, cols) = fixture.weights();
    let q = Nf4Tensor::quantize(&w, rows, cols, true).unwrap();
    assert!(q.is_double_quant());

    // The 4-bit part does not depend on how the scales are stored.
    assert_eq!(q.packed(), fixture.u8s("dq.packed").as_slice());

    let Absmax::Double {
        quantized,
        code,
        state2_absmax,
        offset,
        block_size,
    } = q.absmax()
    else {
        panic!("expected double-quantised absmax")
    };
    assert_eq!(quantized, &fixture.u8s("dq.absmax_q"), "dq.absmax_q");
    assert_eq!(*block_size, DOUBLE_QUANT_BLOCK_SIZE);
    assert_eq!(fixture.json["dq.state2.blocksize"], 256);
    assert_eq!(&code[..], &fixture.f32s("dq.state2.code")[..]);

    let reference_offset = fixture.json["dq.offset"].as_f64().unwrap();
    assert!(
        (f64::from(*offset) - reference_offset).abs() <= 1e-7,
        "offset {offset} vs {reference_offset}"
    );
    let reference_state2 = fixture.f32s("dq.state2.absmax");
    assert_eq!(state2_absmax.len(), reference_state2.len());
    for (i, (a, b)) in state2_absmax.iter().zip(&reference_state2).enumerate() {
        assert!(
            (a - b).abs() <= f32::EPSILON * b.abs(),
            "state2.absmax[{i}]: {a} vs {b}"
        );
    }
}

/// Checks `ours` against bitsandbytes' bf16 output: within one bf16 ulp as f32, and
/// bit-identical once we round to bf16 ourselves.
fn assert_matches_bf16_reference(label: &str, q: &Nf4Tensor, reference: &[f32]) {
    let ours = q.dequantize();
    assert_eq!(ours.len(), reference.len());
    for (i, (&a, &r)) in ours.iter().zip(reference).enumerate() {
        assert!(
            (a - r).abs() <= ulp_bf16(r),
            "{label}[{i}]: {a} vs {r} (bf16 ulp {})",
            ulp_bf16(r)
        );
    }
    let as_bf16 = q
        .to_tensor(DType::BF16, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let differing = as_bf16
        .iter()
        .zip(reference)
        .filter(|(a, r)| a.to_bits() != r.to_bits())
        .count();
    assert_eq!(
        differing, 0,
        "{label}: bf16 tensor differs in {differing} values"
    );
}

#[test]
fn plain_dequantized_equals_fixture_within_one_bf16_ulp() {
    let fixture = Fixture::load();
    let (w, rows, cols) = fixture.weights();
    let q = Nf4Tensor::quantize(&w, rows, cols, false).unwrap();
    assert_matches_bf16_reference("plain", &q, &fixture.f32s("plain.dequantized"));
}

#[test]
fn double_quant_dequantized_equals_fixture_within_one_bf16_ulp() {
    let fixture = Fixture::load();
    let (w, rows, cols) = fixture.weights();
    let q = Nf4Tensor::quantize(&w, rows, cols, true).unwrap();
    assert_matches_bf16_reference("dq", &q, &fixture.f32s("dq.dequantized"));
}

#[test]
fn from_parts_of_a_bitsandbytes_state_dequantizes_like_bitsandbytes() {
    let fixture = Fixture::load();
    let absmax = Absmax::Double {
        quantized: fixture.u8s("dq.absmax_q"),
        code: Cow::Owned(fixture.f32s("dq.state2.code")),
        state2_absmax: fixture.f32s("dq.state2.absmax"),
        offset: fixture.json["dq.offset"].as_f64().unwrap() as f32,
        block_size: 256,
    };
    let q = Nf4Tensor::from_parts(fixture.u8s("dq.packed"), absmax, (96, 256), 64).unwrap();
    assert_matches_bf16_reference("from_parts", &q, &fixture.f32s("dq.dequantized"));

    let plain = Nf4Tensor::from_parts(
        fixture.u8s("plain.packed"),
        Absmax::Plain(fixture.f32s("plain.absmax")),
        (96, 256),
        64,
    )
    .unwrap();
    assert_matches_bf16_reference(
        "from_parts plain",
        &plain,
        &fixture.f32s("plain.dequantized"),
    );
}

// ---------------------------------------------------------------- layout and properties

#[test]
fn first_element_goes_to_the_high_nibble() {
    let q = Nf4Tensor::quantize(&[-1.0, 1.0, 0.0, 0.5], 2, 2, false).unwrap();
    // -1 → index 0, 1 → 15, 0 → 7, 0.5 → 12 (0.4407 is nearer than 0.5626).
    assert_eq!(q.packed(), &[0x0F, 0x7C]);
    assert_eq!(q.indices(), vec![0, 15, 7, 12]);
    let q = Nf4Tensor::quantize(&[1.0, -1.0], 1, 2, false).unwrap();
    assert_eq!(q.packed(), &[0xF0]);
}

#[test]
fn scaling_multiplies_by_the_f32_reciprocal_like_bitsandbytes() {
    // (weight, block absmax, index by w × (1/absmax), index by w / absmax): pairs where the two
    // roundings fall on opposite sides of an NF4 threshold.
    for (w, absmax, by_reciprocal, by_division) in [
        (0.0061508752f32, 0.15458286f32, 8u8, 7u8),
        (0.06712391, 0.13380267, 12, 13),
        (0.009889933, 0.015386021, 14, 13),
    ] {
        assert_eq!(nf4_index(w * (1.0 / absmax)), by_reciprocal);
        assert_eq!(nf4_index(w / absmax), by_division);
        let q = Nf4Tensor::quantize(&[w, absmax], 1, 2, false).unwrap();
        assert_eq!(
            q.indices(),
            vec![by_reciprocal, 15],
            "w = {w}, absmax = {absmax}"
        );
    }
}

#[test]
fn random_round_trip_error_is_within_half_a_code_gap() {
    let largest_half_gap = NF4_CODE
        .windows(2)
        .map(|p| (p[1] - p[0]) / 2.0)
        .fold(0f32, f32::max);
    let mut rng = Rng(42);
    for (rows, cols, double_quant) in [(64, 128, false), (33, 192, true), (7, 64, false)] {
        let w = rng.bf16_weights(rows * cols, 0.02);
        let q = Nf4Tensor::quantize(&w, rows, cols, double_quant).unwrap();
        let deq = q.dequantize();
        let scales = q.absmax_values();
        for (e, (&x, &y)) in w.iter().zip(&deq).enumerate() {
            let block = e / NF4_BLOCK_SIZE;
            let true_absmax = w[block * 64..(block * 64 + 64).min(w.len())]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let scale = scales[block];
            let err = (x - y).abs();
            // Rounding error (relative to the stored scale) plus, for double quantisation, the
            // scale's own error.
            let tight = half_gap_around(x / scale) * scale * (1.0 + 1e-5)
                + (scale - true_absmax).abs()
                + 1e-9;
            assert!(
                err <= tight,
                "{rows}x{cols} dq={double_quant} element {e}: {x} → {y}, error {err} > {tight}"
            );
            if !double_quant {
                assert!(err <= largest_half_gap * scale * (1.0 + 1e-5));
                assert_eq!(
                    q.indices()[e] as usize,
                    nearest_code(x / scale),
                    "element {e}"
                );
            }
        }
    }
}

#[test]
fn double_quant_scales_stay_close_to_plain_scales() {
    let mut rng = Rng(3);
    let w = rng.bf16_weights(128 * 256, 0.05);
    let plain = Nf4Tensor::quantize(&w, 128, 256, false).unwrap();
    let double = Nf4Tensor::quantize(&w, 128, 256, true).unwrap();
    assert_eq!(plain.packed(), double.packed());
    let a = plain.absmax_values();
    let b = double.absmax_values();
    let Absmax::Double { state2_absmax, .. } = double.absmax() else {
        panic!("expected double-quantised absmax")
    };
    // 8-bit dynamic code: the error is at most half a code step (≤ 0.0071 near ±1) times the
    // second-level scale.
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let bound = 0.0071 * state2_absmax[i / 256];
        assert!(
            (x - y).abs() <= bound,
            "block {i}: {x} vs {y} (bound {bound})"
        );
    }
}

#[test]
fn ragged_last_block_is_handled_like_bitsandbytes() {
    let mut rng = Rng(11);
    // 21 elements: a single short block, odd count; 65: a full block plus a block of one.
    for (rows, cols) in [(3, 7), (5, 13), (10, 10)] {
        let w = rng.bf16_weights(rows * cols, 1.0);
        let n = w.len();
        let q = Nf4Tensor::quantize(&w, rows, cols, false).unwrap();
        assert_eq!(q.packed().len(), n.div_ceil(2));
        let scales = q.absmax_values();
        assert_eq!(scales.len(), n.div_ceil(64));
        // Independent reference: nearest code of w × (1 / absmax of its block).
        for (e, &x) in w.iter().enumerate() {
            let block = &w[e / 64 * 64..(e / 64 * 64 + 64).min(n)];
            let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scales[e / 64], absmax, "{rows}x{cols} block {}", e / 64);
            assert_eq!(
                q.indices()[e] as usize,
                nearest_code(x * (1.0 / absmax)),
                "{rows}x{cols} element {e}"
            );
        }
        if n % 2 == 1 {
            // Padding nibble: the index of 0.0, as bitsandbytes pads with zeros.
            assert_eq!(q.packed()[n / 2] & 0x0F, 7, "{rows}x{cols} padding nibble");
        }
        if n % 64 == 1 {
            // A block of one element stores it exactly (±1 × its own magnitude).
            assert_eq!(q.dequantize()[n - 1], w[n - 1]);
        }
        assert_eq!(q.dequantize().len(), n);
        let dq = Nf4Tensor::quantize(&w, rows, cols, true).unwrap();
        assert_eq!(dq.packed(), q.packed());
        assert_eq!(dq.absmax_values().len(), scales.len());
    }
}

#[test]
fn all_zero_block_dequantizes_to_zero() {
    let mut w = vec![0f32; 128];
    w[64..].copy_from_slice(&Rng(5).bf16_weights(64, 0.1));
    let q = Nf4Tensor::quantize(&w, 2, 64, false).unwrap();
    // bitsandbytes computes 0 × (1/0) = NaN for such a block and its decision tree sends NaN to
    // index 0 (-1.0); the scale 0 makes the values zero again.
    assert!(q.packed()[..32].iter().all(|&b| b == 0x00));
    assert_eq!(q.absmax_values()[0], 0.0);
    assert!(q.dequantize()[..64].iter().all(|&v| v == 0.0));
}

#[test]
fn double_quant_of_a_single_block_keeps_its_scale_exactly() {
    let w = Rng(9).bf16_weights(64, 0.3);
    let plain = Nf4Tensor::quantize(&w, 1, 64, false).unwrap();
    let double = Nf4Tensor::quantize(&w, 1, 64, true).unwrap();
    // offset = the single absmax; the centred value is 0, its 8-bit scale 0, so the scale
    // comes back as exactly the offset.
    assert_eq!(double.absmax_values(), plain.absmax_values());
    assert_eq!(double.dequantize(), plain.dequantize());
}

#[test]
fn other_block_sizes_and_tensor_input() {
    let w = Rng(13).bf16_weights(16 * 256, 0.02);
    let q = Nf4Tensor::quantize_with_block_size(&w, 16, 256, 128, false).unwrap();
    assert_eq!(q.absmax_values().len(), 32);
    assert_eq!(q.block_size(), 128);

    let t = Tensor::from_vec(w.clone(), (16, 256), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let from_tensor = Nf4Tensor::from_tensor(&t, true).unwrap();
    assert_eq!(from_tensor, Nf4Tensor::quantize(&w, 16, 256, true).unwrap());
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let err = Nf4Tensor::quantize(&[0.5; 10], 3, 4, false).unwrap_err();
    assert!(matches!(
        err,
        QuantError::LengthMismatch {
            expected: 12,
            actual: 10,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "weights have 10 values, but a 3x4 matrix needs 12"
    );

    let err = Nf4Tensor::quantize(&[], 0, 4, false).unwrap_err();
    assert!(
        matches!(err, QuantError::EmptyShape { rows: 0, cols: 4 }),
        "{err}"
    );

    let err = Nf4Tensor::quantize(&[], usize::MAX, 2, false).unwrap_err();
    assert!(matches!(err, QuantError::ShapeOverflow { .. }), "{err}");

    let mut w = vec![0.25f32; 12];
    w[7] = f32::NAN;
    let err = Nf4Tensor::quantize(&w, 3, 4, false).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { row: 1, col: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("row 1, column 3 is NaN"), "{err}");
    w[7] = f32::INFINITY;
    assert!(Nf4Tensor::quantize(&w, 3, 4, true).is_err());

    let err = Nf4Tensor::quantize_with_block_size(&[1.0; 4], 2, 2, 0, false).unwrap_err();
    assert!(
        matches!(err, QuantError::InvalidBlockSize { block_size: 0 }),
        "{err}"
    );

    let t = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let err = Nf4Tensor::from_tensor(&t, false).unwrap_err();
    assert!(matches!(err, QuantError::NotAMatrix { .. }), "{err}");

    let q = Nf4Tensor::quantize(&[1.0; 4], 2, 2, false).unwrap();
    let err = q.to_tensor(DType::U8, &Device::Cpu).unwrap_err();
    assert!(matches!(err, QuantError::UnsupportedDType { .. }), "{err}");
}

#[test]
fn from_parts_refuses_parts_that_do_not_fit() {
    // 9 elements need 5 bytes: 4 is refused.
    let err = Nf4Tensor::from_parts(vec![0; 4], Absmax::Plain(vec![1.0]), (3, 3), 64).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::PartLength {
                expected: 5,
                actual: 4,
                ..
            }
        ),
        "{err}"
    );
    // 130 elements in blocks of 64 need 3 scales.
    let err =
        Nf4Tensor::from_parts(vec![0; 65], Absmax::Plain(vec![1.0; 2]), (10, 13), 64).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::PartLength {
                expected: 3,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    let bad_code = Absmax::Double {
        quantized: vec![0; 3],
        code: Cow::Owned(vec![0.0; 16]),
        state2_absmax: vec![1.0],
        offset: 0.0,
        block_size: 256,
    };
    let err = Nf4Tensor::from_parts(vec![0; 65], bad_code, (10, 13), 64).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::PartLength {
                expected: 256,
                actual: 16,
                ..
            }
        ),
        "{err}"
    );
    let zero_block = Absmax::Double {
        quantized: vec![0; 3],
        code: Cow::Borrowed(dynamic_code().as_slice()),
        state2_absmax: vec![1.0],
        offset: 0.0,
        block_size: 0,
    };
    let err = Nf4Tensor::from_parts(vec![0; 65], zero_block, (10, 13), 64).unwrap_err();
    assert!(matches!(err, QuantError::InvalidBlockSize { .. }), "{err}");
    let err = Nf4Tensor::from_parts(vec![0; 1], Absmax::Plain(vec![1.0]), (1, 2), 0).unwrap_err();
    assert!(matches!(err, QuantError::InvalidBlockSize { .. }), "{err}");
}

// ---------------------------------------------------------------- matmul

/// `x · dequant(W)ᵀ` in f64, element by element.
fn naive_matmul(x: &[f32], m: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            out[i * rows + r] = (0..cols)
                .map(|k| f64::from(x[i * cols + k]) * f64::from(w[r * cols + k]))
                .sum();
        }
    }
    out
}

#[test]
fn dequantize_matmul_equals_naive_product() {
    let fixture = Fixture::load();
    let (w, rows, cols) = fixture.weights();
    let q = Nf4Tensor::quantize(&w, rows, cols, true).unwrap();
    let deq = q.dequantize();
    let mut rng = Rng(21);
    let (b, s) = (2, 3);
    let x: Vec<f32> = (0..b * s * cols).map(|_| rng.normal() as f32).collect();
    let expected = naive_matmul(&x, b * s, &deq, rows, cols);
    let scale: Vec<f64> = {
        let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let abs_w: Vec<f32> = deq.iter().map(|v| v.abs()).collect();
        naive_matmul(&abs_x, b * s, &abs_w, rows, cols)
    };
    let xt = Tensor::from_vec(x.clone(), (b, s, cols), &Device::Cpu).unwrap();

    let y = dequantize_matmul(&xt, &q, DType::F32).unwrap();
    assert_eq!(y.dims(), &[b, s, rows]);
    assert_eq!(y.dtype(), DType::F32);
    let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (&got, &want)) in y.iter().zip(&expected).enumerate() {
        let tol = 1e-5 * scale[i] + 1e-6;
        assert!(
            (f64::from(got) - want).abs() <= tol,
            "f32 [{i}]: {got} vs {want}"
        );
    }

    // bf16 compute: x is cast, W dequantised to bf16; error bounded by bf16 rounding.
    let y = dequantize_matmul(&xt, &q, DType::BF16).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let y = y
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (&got, &want)) in y.iter().zip(&expected).enumerate() {
        let tol = 3.0 * 2f64.powi(-8) * scale[i] + 1e-6;
        assert!(
            (f64::from(got) - want).abs() <= tol,
            "bf16 [{i}]: {got} vs {want}"
        );
    }

    // A single vector gives a single output vector.
    let v = Tensor::from_vec(x[..cols].to_vec(), cols, &Device::Cpu).unwrap();
    let y = dequantize_matmul(&v, &q, DType::F32).unwrap();
    assert_eq!(y.dims(), &[rows]);
    let y = y.to_vec1::<f32>().unwrap();
    for r in 0..rows {
        let tol = 1e-5 * scale[r] + 1e-6;
        assert!((f64::from(y[r]) - expected[r]).abs() <= tol, "vector [{r}]");
    }
}

#[test]
fn dequantize_matmul_passes_gradients_to_the_input() {
    let w = Rng(17).bf16_weights(8 * 64, 0.1);
    let q = Nf4Tensor::quantize(&w, 8, 64, false).unwrap();
    let deq = q.dequantize();
    let x = Var::from_tensor(&Tensor::ones((3, 64), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let y = dequantize_matmul(x.as_tensor(), &q, DType::F32).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("gradient for x");
    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // d(sum(x·Wᵀ))/dx[i, k] = Σ_r W[r, k].
    for (idx, &got) in g.iter().enumerate() {
        let k = idx % 64;
        let want: f32 = (0..8).map(|r| deq[r * 64 + k]).sum();
        assert!((got - want).abs() <= 1e-5, "grad [{idx}]: {got} vs {want}");
    }
}

#[test]
fn dequantize_matmul_refuses_a_mismatched_input() {
    let q = Nf4Tensor::quantize(&[0.5; 8 * 64], 8, 64, false).unwrap();
    let x = Tensor::zeros((2, 63), DType::F32, &Device::Cpu).unwrap();
    let err = dequantize_matmul(&x, &q, DType::F32).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::MatmulShape {
                rows: 8,
                cols: 64,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("last dimension must be 64"),
        "{err}"
    );
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    assert!(matches!(
        dequantize_matmul(&scalar, &q, DType::F32),
        Err(QuantError::MatmulShape { .. })
    ));
}
