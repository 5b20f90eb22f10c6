//! Per-row symmetric INT8: exact values on simple rows, round-trip error bound on random data,
//! bad input.

use candle_core::{DType, Device};
use philo_quant::{Int8Tensor, QuantError};

#[test]
fn known_rows_quantize_exactly() {
    // Row 0: absmax 127 so the scale is 1: 62.5 is a tie and goes to the even 62.
    // Row 1: absmax 2: ±2 → ±127, 1 → 63.5 → 64 (even).
    let w = [127.0, 62.5, -127.0, 0.0, 2.0, 1.0, -2.0, 0.0];
    let q = Int8Tensor::quantize(&w, 2, 4).unwrap();
    assert_eq!(q.data(), &[127, 62, -127, 0, 127, 64, -127, 0]);
    assert_eq!(q.row_absmax(), &[127.0, 2.0]);
    let deq = q.dequantize();
    assert_eq!(deq[0], 127.0);
    assert_eq!(deq[2], -127.0);
    assert_eq!(deq[4], 2.0);
}

#[test]
fn random_round_trip_error_is_at_most_half_a_step() {
    let (rows, cols) = (37, 100);
    let mut state = 0x1234_5678_9abc_def0u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // Rows of very different magnitudes.
            u * (1.0 + (i / cols) as f32)
        })
        .collect();
    let q = Int8Tensor::quantize(&w, rows, cols).unwrap();
    let deq = q.dequantize();
    for (e, (&x, &y)) in w.iter().zip(&deq).enumerate() {
        let absmax = q.row_absmax()[e / cols];
        let bound = absmax / 254.0 * (1.0 + 1e-5);
        assert!(
            (x - y).abs() <= bound,
            "element {e}: {x} → {y} (bound {bound})"
        );
    }
    let t = q.to_tensor(DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[rows, cols]);
}

#[test]
fn zero_rows_and_bad_input() {
    let q = Int8Tensor::quantize(&[0.0; 6], 2, 3).unwrap();
    assert!(q.data().iter().all(|&v| v == 0));
    assert!(q.dequantize().iter().all(|&v| v == 0.0));

    let err = Int8Tensor::quantize(&[1.0; 5], 2, 3).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::LengthMismatch {
                expected: 6,
                actual: 5,
                ..
            }
        ),
        "{err}"
    );
    let err = Int8Tensor::quantize(&[1.0, f32::NEG_INFINITY], 1, 2).unwrap_err();
    assert!(
        matches!(err, QuantError::NonFinite { row: 0, col: 1, .. }),
        "{err}"
    );
    let err = Int8Tensor::quantize(&[], 2, 0).unwrap_err();
    assert!(matches!(err, QuantError::EmptyShape { .. }), "{err}");
}
