//! Symmetric INT4 in groups: exact codes on simple groups, packing, the round-trip bound on
//! random data, a short last group, bad input.

use candle_core::{DType, Device};
use philo_quant::{Int4Tensor, QuantError};

#[test]
fn known_groups_quantize_exactly() {
    // Group [7, 3.5, -7, 0]: scale 1, 3.5 is a tie and goes to the even 4; group [14, -1, 2, 7]:
    // scale 2, -1 → -0.5 → -0 and 7 → 3.5 → 4.
    let w = [7.0, 3.5, -7.0, 0.0, 14.0, -1.0, 2.0, 7.0];
    let q = Int4Tensor::quantize(&w, 1, 8, 4).unwrap();
    let codes: Vec<i8> = (0..8).map(|e| q.code(e)).collect();
    assert_eq!(codes, [7, 4, -7, 0, 7, 0, 1, 4]);
    assert_eq!(q.scales(), &[1.0, 2.0]);
    // Two codes a byte, +8, the even element low.
    assert_eq!(q.packed()[0], (7 + 8) | ((4 + 8) << 4));
    assert_eq!(q.dequantize(), [7.0, 4.0, -7.0, 0.0, 14.0, 0.0, 2.0, 8.0]);
}

#[test]
fn random_round_trip_error_is_at_most_half_a_step_per_group() {
    let (rows, cols, group) = (9, 300, 128); // 3 groups a row, the last of 44 columns
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * (1.0 + (i / cols) as f32)
        })
        .collect();
    let q = Int4Tensor::quantize(&w, rows, cols, group).unwrap();
    assert_eq!(q.scales().len(), rows * 3);
    let deq = q.dequantize();
    for (e, (&x, &y)) in w.iter().zip(&deq).enumerate() {
        let scale = q.scales()[(e / cols) * 3 + (e % cols) / group];
        assert!(
            (x - y).abs() <= scale / 2.0 * (1.0 + 1e-5),
            "element {e}: {x} → {y} (scale {scale})"
        );
    }
    let t = q.to_tensor(DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[rows, cols]);
}

#[test]
fn odd_sizes_zero_groups_and_bad_input() {
    let q = Int4Tensor::quantize(&[0.0, 0.0, 0.0], 1, 3, 2).unwrap();
    assert_eq!(q.dequantize(), [0.0, 0.0, 0.0]);
    assert_eq!(q.packed().len(), 2);
    assert!(matches!(
        Int4Tensor::quantize(&[1.0; 5], 2, 3, 4),
        Err(QuantError::LengthMismatch { .. })
    ));
    assert!(matches!(
        Int4Tensor::quantize(&[1.0, f32::NAN], 1, 2, 2),
        Err(QuantError::NonFinite { col: 1, .. })
    ));
    assert!(matches!(
        Int4Tensor::quantize(&[1.0; 4], 2, 2, 0),
        Err(QuantError::InvalidBlockSize { .. })
    ));
}

#[test]
fn device_weights_dequantise_like_the_host_references() {
    use philo_quant::device::{Int4Weight, Int8Weight};
    use philo_quant::Int8Tensor;
    let (rows, cols) = (5, 256);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / cols) as f32))
        .collect();
    let q4 = Int4Tensor::quantize(&w, rows, cols, 128).unwrap();
    let d4 = Int4Weight::from_host(&q4, &Device::Cpu).unwrap().unwrap();
    let got = d4
        .dequantize(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, q4.dequantize(), "int4");
    assert_eq!(d4.bytes(), rows * cols / 2 + 4 * rows * 2);
    // Odd column counts stay on the host path.
    let odd = Int4Tensor::quantize(&w[..15], 3, 5, 4).unwrap();
    assert!(Int4Weight::from_host(&odd, &Device::Cpu).unwrap().is_none());

    let q8 = Int8Tensor::quantize(&w, rows, cols).unwrap();
    let d8 = Int8Weight::from_host(&q8, &Device::Cpu).unwrap();
    let got = d8
        .dequantize(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, q8.dequantize(), "int8");
    let bf = d8.dequantize(DType::BF16).unwrap();
    assert_eq!((bf.dims(), bf.dtype()), (&[rows, cols][..], DType::BF16));
}
