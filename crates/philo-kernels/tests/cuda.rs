//! The CUDA kernels of philo-kernels against their CPU references, on random data in bf16 (and
//! f16). Gated twice: compiled only with the `cuda` feature, and each test returns at once
//! (passing, with a "skipped" note) unless `PHILO_CUDA_TESTS=1` is set; then it runs on GPU 0.
//!
//!     PHILO_CUDA_TESTS=1 cargo test --release -p philo-kernels --features cuda --test cuda -- --nocapture
//!
//! Each check prints its max error relative to the max |reference|.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor};
use philo_kernels::attention::{self, AttentionMask, Dims};
use philo_kernels::nf4::Nf4Weight;
use philo_kernels::rope::QkvShape;
use philo_kernels::{cross_entropy, rms_norm, rope, rows, swiglu};
use philo_quant::Nf4Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Forward tolerance (bf16/f16), relative to max |reference|.
const TOL: f32 = 1e-2;
/// Attention backward (dq, dk, dv) tolerance.
const TOL_ATTN_BWD: f32 = 2e-2;

/// GPU 0, or None (the test then passes trivially) unless PHILO_CUDA_TESTS=1.
fn gpu(test: &str) -> Option<Device> {
    if std::env::var("PHILO_CUDA_TESTS").as_deref() != Ok("1") {
        eprintln!("{test}: skipped (set PHILO_CUDA_TESTS=1 to run the CUDA tests)");
        return None;
    }
    Some(Device::new_cuda(0).expect("PHILO_CUDA_TESTS=1 but CUDA device 0 cannot be opened"))
}

/// [`gpu`] with its CUDA device, for the tests that load the decode kernels.
fn cuda_gpu(test: &str) -> Option<(Device, candle_core::CudaDevice)> {
    let dev = gpu(test)?;
    let cuda = dev.as_cuda_device().expect("device 0 is CUDA").clone();
    Some((dev, cuda))
}

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A tensor of `dtype` on `dev` from host values, and the host f32 values it actually holds
/// (rounded to `dtype`), which the reference is fed.
fn upload(
    values: Vec<f32>,
    shape: &[usize],
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Vec<f32>)> {
    let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?;
    let rounded = host(&t)?;
    Ok((t.to_device(dev)?, rounded))
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "non-finite value in the kernel's result"
    );
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    diff / scale
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = rel_err(got, want);
    eprintln!("{what}: max rel err {err:.3e} (tol {tol:.0e})");
    assert!(err <= tol, "{what}: max rel err {err:e} > {tol:e}");
}

fn dtypes() -> [DType; 2] {
    [DType::BF16, DType::F16]
}

// ------------------------------------------------------------------------------------------------
// RMSNorm

#[test]
fn cuda_rms_norm() -> Result<()> {
    let Some(dev) = gpu("cuda_rms_norm") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, eps) = (7, 1e-5);
    for dtype in dtypes() {
        for n in [3072, 64] {
            let what = format!("rms_norm {dtype:?} rows {rows} n {n}");
            let (x, xh) = upload(uniform(&mut rng, rows * n, 3.0), &[rows, n], dtype, &dev)?;
            let (y, yh) = upload(uniform(&mut rng, rows * n, 3.0), &[rows, n], dtype, &dev)?;
            let wv: Vec<f32> = (0..n).map(|_| rng.random_range(0.5..1.5)).collect();
            let (w, wh) = upload(wv, &[n], dtype, &dev)?;
            let (dy, dyh) = upload(uniform(&mut rng, rows * n, 1.0), &[rows, n], dtype, &dev)?;

            let out = rms_norm::rms_norm(&x, &w, eps)?;
            assert_eq!((out.dims(), out.dtype()), (&[rows, n][..], dtype));
            check(
                &format!("{what} fwd"),
                &host(&out)?,
                &rms_norm::reference(&xh, &wh, eps as f32),
                TOL,
            );

            let want_dx = rms_norm::reference_backward(&xh, &wh, &dyh, eps as f32);
            let dx = rms_norm::backward(&x, &w, &dy, eps, None)?;
            check(&format!("{what} bwd"), &host(&dx)?, &want_dx, TOL);
            // With a residual gradient summed in the same pass.
            let dx = rms_norm::backward(&x, &w, &dy, eps, Some(&y))?;
            let want: Vec<f32> = want_dx.iter().zip(&yh).map(|(a, b)| a + b).collect();
            check(&format!("{what} bwd + add"), &host(&dx)?, &want, TOL);
            // dy as the first n columns of wider rows, read in place: 64 more columns keep the
            // vectorised kernel, 3 more (rows no longer 16-byte aligned) take the scalar one.
            for extra in [64, 3] {
                let wide = Tensor::cat(&[&dy, &dy.narrow(1, 0, extra.min(n))?], 1)?;
                let dx = rms_norm::backward(&x, &w, &wide.narrow(1, 0, n)?, eps, Some(&y))?;
                check(
                    &format!("{what} bwd, dy rows {} apart", n + extra),
                    &host(&dx)?,
                    &want,
                    TOL,
                );
            }
            // Rows that start at an odd element (a view): the scalar kernel.
            let odd = Tensor::cat(&[&x, &x], 1)?.narrow(1, 1, n)?;
            let odd_h: Vec<f32> = (0..rows)
                .flat_map(|r| {
                    (0..n).map(move |c| {
                        if c + 1 < n {
                            (r, c + 1)
                        } else {
                            (r, c + 1 - n)
                        }
                    })
                })
                .map(|(r, c)| xh[r * n + c])
                .collect();
            check(
                &format!("{what} fwd (unaligned rows)"),
                &host(&rms_norm::rms_norm(&odd, &w, eps)?)?,
                &rms_norm::reference(&odd_h, &wh, eps as f32),
                TOL,
            );

            let (sum, normed) = rms_norm::add_rms_norm(&x, &y, &w, eps)?;
            let want_sum: Vec<f32> = xh.iter().zip(&yh).map(|(a, b)| a + b).collect();
            check(
                &format!("{what} add_rms_norm sum"),
                &host(&sum)?,
                &want_sum,
                TOL,
            );
            // The norm reads the sum as stored (rounded to the dtype).
            let (_, sum_rounded) = upload(want_sum, &[rows, n], dtype, &Device::Cpu)?;
            let want_normed = rms_norm::reference(&sum_rounded, &wh, eps as f32);
            check(
                &format!("{what} add_rms_norm normed"),
                &host(&normed)?,
                &want_normed,
                TOL,
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// QKV split + RoPE

fn rope_tables(b: usize, s: usize, rd: usize) -> (Vec<f32>, Vec<f32>) {
    let half = rd / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for si in 0..s {
            let pos = (si + 7 * bi) as f32;
            for i in 0..half {
                let angle = pos / 10000f32.powf(2.0 * i as f32 / rd as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

#[test]
fn cuda_qkv_rope() -> Result<()> {
    let Some(dev) = gpu("cuda_qkv_rope") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(12);
    let cases = [
        (
            "phi-3",
            2,
            37,
            QkvShape {
                heads: 32,
                kv_heads: 32,
                head_dim: 96,
                rotary_dim: 96,
            },
        ),
        (
            "gqa partial",
            2,
            37,
            QkvShape {
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
                rotary_dim: 16,
            },
        ),
        (
            // rd/2 = 6: the element-at-a-time walk.
            "odd rotary",
            1,
            9,
            QkvShape {
                heads: 2,
                kv_heads: 1,
                head_dim: 16,
                rotary_dim: 12,
            },
        ),
    ];
    for dtype in dtypes() {
        for (name, b, s, sh) in cases {
            let what = format!("qkv_rope {name} {dtype:?}");
            let n = sh.heads + 2 * sh.kv_heads;
            let d = sh.head_dim;
            let half = sh.rotary_dim / 2;
            let (qkv, qkvh) = upload(
                uniform(&mut rng, b * s * n * d, 3.0),
                &[b, s, n * d],
                dtype,
                &dev,
            )?;
            let (cos, sin) = rope_tables(b, s, sh.rotary_dim);
            let (cos, cosh) = upload(cos, &[b, s, half], dtype, &dev)?;
            let (sin, sinh) = upload(sin, &[b, s, half], dtype, &dev)?;
            let (grad, gradh) = upload(
                uniform(&mut rng, b * n * s * d, 1.0),
                &[b, n, s, d],
                dtype,
                &dev,
            )?;

            let out = rope::qkv_rope(&qkv, &cos, &sin, sh)?;
            assert_eq!((out.dims(), out.dtype()), (&[b, n, s, d][..], dtype));
            check(
                &format!("{what} fwd"),
                &host(&out)?,
                &rope::reference(&qkvh, &cosh, &sinh, b, s, sh),
                TOL,
            );

            let want = rope::reference_backward(&gradh, &cosh, &sinh, b, s, sh);
            let dqkv = rope::backward(&grad, &cos, &sin, sh)?;
            assert_eq!(dqkv.dims(), &[b, s, n * d]);
            check(&format!("{what} bwd"), &host(&dqkv)?, &want, TOL);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// SwiGLU

#[test]
fn cuda_swiglu() -> Result<()> {
    let Some(dev) = gpu("cuda_swiglu") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(13);
    // 8192: eight elements a thread; 1001: not a multiple of 8, the scalar loop.
    for (dtype, (rows, i)) in dtypes()
        .into_iter()
        .flat_map(|d| [(5, 8192), (3, 1001)].map(|s| (d, s)))
    {
        let what = format!("swiglu {dtype:?} rows {rows} i {i}");
        let (x, xh) = upload(
            uniform(&mut rng, rows * 2 * i, 6.0),
            &[rows, 2 * i],
            dtype,
            &dev,
        )?;
        let (g, gh) = upload(uniform(&mut rng, rows * i, 1.0), &[rows, i], dtype, &dev)?;
        let out = swiglu::swiglu(&x)?;
        assert_eq!((out.dims(), out.dtype()), (&[rows, i][..], dtype));
        check(
            &format!("{what} fwd"),
            &host(&out)?,
            &swiglu::reference(&xh, i),
            TOL,
        );

        // With 64 free columns after each row (where the down projection's adapter goes).
        let padded = swiglu::swiglu_padded(&x, 64)?;
        assert_eq!(padded.dims(), &[rows, i + 64][..]);
        check(
            &format!("{what} fwd padded"),
            &host(&padded.narrow(1, 0, i)?)?,
            &swiglu::reference(&xh, i),
            TOL,
        );

        let want = swiglu::reference_backward(&xh, &gh, i);
        check(
            &format!("{what} bwd"),
            &host(&swiglu::backward(&x, &g)?)?,
            &want,
            TOL,
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Row scatter

#[test]
fn cuda_scatter_rows() -> Result<()> {
    let Some(dev) = gpu("cuda_scatter_rows") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(17);
    // 3072 bf16 columns: 16-byte copies; 7: 2-byte copies; f32 too.
    for (dtype, cols) in [(DType::BF16, 3072), (DType::BF16, 7), (DType::F32, 3072)] {
        let (rows, index) = (9, [7u32, 0, 4, 8]);
        let (dst, mut want) = upload(
            uniform(&mut rng, rows * cols, 1.0),
            &[rows, cols],
            dtype,
            &dev,
        )?;
        let (src, src_host) = upload(
            uniform(&mut rng, index.len() * cols, 1.0),
            &[index.len(), cols],
            dtype,
            &dev,
        )?;
        rows::scatter_rows(&dst, &index, &src)?;
        rows::reference_scatter(&mut want, cols, &index, &src_host);
        assert_eq!(host(&dst)?, want, "scatter_rows {dtype:?} cols {cols}");
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// INT8 / INT4 dequantisation

/// The one-pass INT8 and INT4 dequantisation on the GPU (`philo_kernels::dequantize`) gives,
/// bit for bit, the host reference rounded to the dtype (`Int8Tensor::to_tensor`,
/// `Int4Tensor::to_tensor`), for f32, bf16 and f16 and shapes of one and many rows.
#[test]
fn cuda_int_dequantize_matches_the_host_reference() -> Result<()> {
    use philo_quant::device::{Int4Weight, Int8Weight};
    use philo_quant::{Int4Tensor, Int8Tensor, INT4_GROUP};
    let Some(dev) = gpu("cuda_int_dequantize_matches_the_host_reference") else {
        return Ok(());
    };
    let quant = |e: philo_quant::QuantError| candle_core::Error::Msg(e.to_string());
    let mut rng = StdRng::seed_from_u64(31);
    for (rows, cols) in [(1, 1024), (37, 3072), (96, 8192)] {
        let w = uniform(&mut rng, rows * cols, 0.05);
        let q8 = Int8Tensor::quantize(&w, rows, cols).map_err(quant)?;
        let q4 = Int4Tensor::quantize(&w, rows, cols, INT4_GROUP).map_err(quant)?;
        let d8 = Int8Weight::from_host(&q8, &dev).map_err(quant)?;
        let d4 = Int4Weight::from_host(&q4, &dev)
            .map_err(quant)?
            .expect("whole groups");
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (what, got, want) in [
                (
                    "int8",
                    philo_kernels::dequantize::int8(&d8, dtype)?,
                    q8.to_tensor(dtype, &Device::Cpu).map_err(quant)?,
                ),
                (
                    "int4",
                    philo_kernels::dequantize::int4(&d4, dtype)?,
                    q4.to_tensor(dtype, &Device::Cpu).map_err(quant)?,
                ),
            ] {
                let got = host(&got)?;
                let want = host(&want)?;
                let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    (got.len(), differ),
                    (rows * cols, 0),
                    "{what} [{rows}, {cols}] {dtype:?}"
                );
            }
        }
    }
    Ok(())
}

// NF4

#[test]
fn cuda_nf4_matches_host_quantiser_bit_for_bit() -> Result<()> {
    let Some(dev) = gpu("cuda_nf4_matches_host_quantiser_bit_for_bit") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(14);
    let (rows, cols) = (256, 3072);
    // Rows of different magnitudes, an all-zero block and a few outliers.
    let mut w = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = 0.01 + 0.2 * (r % 13) as f32 / 13.0;
        w.extend((0..cols).map(|_| rng.random_range(-scale..scale)));
    }
    for x in &mut w[640..704] {
        *x = 0.0;
    }
    w[1000] = 3.0;
    w[50_001] = -2.5;
    let cpu = Tensor::from_vec(w, (rows, cols), &Device::Cpu)?.to_dtype(DType::BF16)?;
    let gpu_w = cpu.to_device(&dev)?;
    for dq in [false, true] {
        let what = format!("nf4 [{rows}, {cols}] bf16 double_quant {dq}");
        let want = Nf4Tensor::from_tensor(&cpu, dq).expect("host quantiser");
        let weight = Nf4Weight::quantize(&gpu_w, dq)?;
        assert!(weight.packed.device().is_cuda());
        let got = weight.to_host()?;
        let differing = got
            .packed()
            .iter()
            .zip(want.packed())
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "{what}: {differing} of {} packed bytes differ",
            want.packed().len()
        );
        assert_eq!(got.packed(), want.packed(), "{what}: packed bytes");
        let (ga, wa) = (got.absmax_values(), want.absmax_values());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ga), bits(&wa), "{what}: absmax values");
        assert_eq!(got.absmax(), want.absmax(), "{what}: stored scales");

        let want_bf = host(
            &want
                .to_tensor(DType::BF16, &Device::Cpu)
                .expect("host dequantise"),
        )?;
        let got_bf = weight.dequantize(DType::BF16)?;
        assert_eq!(
            (got_bf.dims(), got_bf.dtype()),
            (&[rows, cols][..], DType::BF16)
        );
        let got_bf = host(&got_bf)?;
        let differing = got_bf
            .iter()
            .zip(&want_bf)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        eprintln!("{what}: dequantize(BF16) {differing} values differ from the host's");
        assert_eq!(differing, 0, "{what}: dequantize(BF16)");
        // f32 too, and a weight uploaded from the host quantiser.
        assert_eq!(
            host(&weight.dequantize(DType::F32)?)?,
            want.dequantize(),
            "{what}: dequantize(F32)"
        );
        let uploaded = Nf4Weight::from_host(&want, &dev)?;
        assert_eq!(
            host(&uploaded.dequantize(DType::BF16)?)?,
            want_bf,
            "{what}: from_host"
        );
        // Padded rows: the same matrix in the first columns of [rows, cols + 64].
        let padded = weight.dequantize_padded(DType::BF16, 64)?;
        assert_eq!(padded.dims(), &[rows, cols + 64][..]);
        assert_eq!(
            host(&padded.narrow(1, 0, cols)?.contiguous()?)?,
            want_bf,
            "{what}: dequantize_padded(BF16, 64)"
        );
    }
    // A size that is not a whole number of 16-weight groups: the byte-wise kernel.
    let odd = Tensor::from_vec(uniform(&mut rng, 3 * 70, 0.5), (3, 70), &Device::Cpu)?;
    let want = Nf4Tensor::from_tensor(&odd, true).expect("host quantiser");
    let uploaded = Nf4Weight::from_host(&want, &dev)?;
    assert_eq!(
        host(&uploaded.dequantize(DType::F32)?)?,
        want.dequantize(),
        "nf4 [3, 70]: dequantize(F32)"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Flash attention

struct FlashCase {
    name: &'static str,
    n: Dims,
    window: usize,
    segments: Option<Vec<u32>>,
    dtype: DType,
    /// q, k, v as narrow views along dim 1 of one `[B, H + 2·KVH, S, D]` tensor (needs S = T).
    fused: bool,
}

fn dims(b: usize, h: usize, kvh: usize, s: usize, t: usize, d: usize) -> Dims {
    Dims { b, h, kvh, s, t, d }
}

fn flash_case(dev: &Device, c: FlashCase, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let Dims { b, h, kvh, s, t, d } = c.n;
    let what = format!("flash {} {:?}", c.name, c.dtype);
    let q = Tensor::from_vec(
        uniform(&mut rng, b * h * s * d, 2.0),
        (b, h, s, d),
        &Device::Cpu,
    )?;
    let k = Tensor::from_vec(
        uniform(&mut rng, b * kvh * t * d, 2.0),
        (b, kvh, t, d),
        &Device::Cpu,
    )?;
    let v = Tensor::from_vec(
        uniform(&mut rng, b * kvh * t * d, 1.0),
        (b, kvh, t, d),
        &Device::Cpu,
    )?;
    let (q, k, v) = (
        q.to_dtype(c.dtype)?,
        k.to_dtype(c.dtype)?,
        v.to_dtype(c.dtype)?,
    );
    let (qh, kh, vh) = (host(&q)?, host(&k)?, host(&v)?);
    let (dout, douth) = upload(
        uniform(&mut rng, b * s * h * d, 1.0),
        &[b, s, h, d],
        c.dtype,
        dev,
    )?;
    let mask = AttentionMask {
        window: c.window,
        segments: match &c.segments {
            Some(seg) => Some(Tensor::from_vec(seg.clone(), (b, t), dev)?),
            None => None,
        },
    };

    // q/k/v as the kernel sees them: views of one fused tensor, or three tensors.
    let (qt, kt, vt) = if c.fused {
        assert_eq!(s, t, "a fused case needs S = T");
        let all = Tensor::cat(&[&q, &k, &v], 1)?.to_device(dev)?;
        let (qt, kt, vt) = (
            all.narrow(1, 0, h)?,
            all.narrow(1, h, kvh)?,
            all.narrow(1, h + kvh, kvh)?,
        );
        assert!(!qt.is_contiguous() || b == 1);
        (qt, kt, vt)
    } else {
        (q.to_device(dev)?, k.to_device(dev)?, v.to_device(dev)?)
    };

    let (out, lse) = attention::flash_forward(&qt, &kt, &vt, &mask)?;
    assert_eq!((out.dims(), out.dtype()), (&[b, s, h, d][..], c.dtype));
    let (want_out, want_lse) =
        attention::reference(&qh, &kh, &vh, c.segments.as_deref(), c.window, c.n);
    check(&format!("{what} fwd out"), &host(&out)?, &want_out, TOL);
    let finite = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| if x.is_finite() { x } else { 0.0 })
            .collect()
    };
    check(
        &format!("{what} fwd lse"),
        &finite(host(&lse)?),
        &finite(want_lse),
        TOL,
    );

    let (dq, dk, dv) = attention::flash_backward(&qt, &kt, &vt, &out, &lse, &dout, &mask)?;
    assert_eq!(dq.dims(), &[b, h, s, d]);
    assert_eq!(dk.dims(), &[b, kvh, t, d]);
    assert_eq!(dv.dims(), &[b, kvh, t, d]);
    let (want_dq, want_dk, want_dv) =
        attention::reference_backward(&qh, &kh, &vh, c.segments.as_deref(), c.window, c.n, &douth);
    check(
        &format!("{what} bwd dq"),
        &host(&dq)?,
        &want_dq,
        TOL_ATTN_BWD,
    );
    check(
        &format!("{what} bwd dk"),
        &host(&dk)?,
        &want_dk,
        TOL_ATTN_BWD,
    );
    check(
        &format!("{what} bwd dv"),
        &host(&dv)?,
        &want_dv,
        TOL_ATTN_BWD,
    );
    Ok(())
}

/// Row 0: 9 padding positions, then two packed segments; row 1: all one segment.
fn two_rows_of_segments(t: usize) -> Vec<u32> {
    let mut seg: Vec<u32> = (0..t)
        .map(|j| {
            if j < 9 {
                0
            } else if j < 9 + t / 3 {
                1
            } else {
                2
            }
        })
        .collect();
    seg.extend(std::iter::repeat_n(1, t));
    seg
}

#[test]
fn cuda_flash_attention_phi3_causal() -> Result<()> {
    let Some(dev) = gpu("cuda_flash_attention_phi3_causal") else {
        return Ok(());
    };
    let c = FlashCase {
        name: "phi-3 b1 h32 s=t=200 d96 causal",
        n: dims(1, 32, 32, 200, 200, 96),
        window: usize::MAX,
        segments: None,
        dtype: DType::BF16,
        fused: false,
    };
    flash_case(&dev, c, 21)
}

#[test]
fn cuda_flash_attention_gqa_window_segments() -> Result<()> {
    let Some(dev) = gpu("cuda_flash_attention_gqa_window_segments") else {
        return Ok(());
    };
    for (dtype, seed) in [(DType::BF16, 22), (DType::F16, 23)] {
        let c = FlashCase {
            name: "b2 h4 kvh2 s=t=130 d32 window 17 segments",
            n: dims(2, 4, 2, 130, 130, 32),
            window: 17,
            segments: Some(two_rows_of_segments(130)),
            dtype,
            fused: false,
        };
        flash_case(&dev, c, seed)?;
    }
    Ok(())
}

/// Head dims 64 and 96 take the wgmma kernels on an H200 (the mma.sync ones elsewhere): several
/// 192-row query blocks (forward) and 128-key blocks of 64-query tiles (backward) with partial
/// last ones, GQA, a window crossing tiles, segments.
#[test]
fn cuda_flash_attention_wgmma_shapes() -> Result<()> {
    let Some(dev) = gpu("cuda_flash_attention_wgmma_shapes") else {
        return Ok(());
    };
    let cases = [
        (
            "b2 h4 kvh2 s=t=400 d96 window 150 segments",
            96,
            150,
            true,
            DType::BF16,
        ),
        (
            "b2 h4 kvh2 s=t=400 d96 window 150 segments",
            96,
            150,
            true,
            DType::F16,
        ),
        (
            "b2 h4 kvh2 s=t=400 d64 causal",
            64,
            usize::MAX,
            false,
            DType::BF16,
        ),
    ];
    for (i, (name, d, window, segments, dtype)) in cases.into_iter().enumerate() {
        let c = FlashCase {
            name,
            n: dims(2, 4, 2, 400, 400, d),
            window,
            segments: segments.then(|| two_rows_of_segments(400)),
            dtype,
            fused: false,
        };
        flash_case(&dev, c, 40 + i as u64)?;
    }
    Ok(())
}

#[test]
fn cuda_flash_attention_d16() -> Result<()> {
    let Some(dev) = gpu("cuda_flash_attention_d16") else {
        return Ok(());
    };
    let c = FlashCase {
        name: "b1 h4 kvh4 s=t=70 d16 causal",
        n: dims(1, 4, 4, 70, 70, 16),
        window: usize::MAX,
        segments: None,
        dtype: DType::BF16,
        fused: false,
    };
    flash_case(&dev, c, 24)
}

#[test]
fn cuda_flash_attention_kv_cache() -> Result<()> {
    let Some(dev) = gpu("cuda_flash_attention_kv_cache") else {
        return Ok(());
    };
    let cases = [
        (
            "decode b2 h4 kvh2 s1 t150 d96",
            dims(2, 4, 2, 1, 150, 96),
            usize::MAX,
            DType::BF16,
        ),
        (
            "decode b2 h4 kvh2 s1 t150 d96",
            dims(2, 4, 2, 1, 150, 96),
            usize::MAX,
            DType::F16,
        ),
        (
            "prefill over a cache b1 h4 kvh2 s5 t133 d96",
            dims(1, 4, 2, 5, 133, 96),
            usize::MAX,
            DType::BF16,
        ),
        (
            "cache + window b2 h4 kvh4 s5 t133 d96 window 70",
            dims(2, 4, 4, 5, 133, 96),
            70,
            DType::BF16,
        ),
    ];
    for (i, (name, n, window, dtype)) in cases.into_iter().enumerate() {
        let c = FlashCase {
            name,
            n,
            window,
            segments: None,
            dtype,
            fused: false,
        };
        flash_case(&dev, c, 25 + i as u64)?;
    }
    Ok(())
}

#[test]
fn cuda_flash_attention_fused_qkv_views() -> Result<()> {
    let Some(dev) = gpu("cuda_flash_attention_fused_qkv_views") else {
        return Ok(());
    };
    let c = FlashCase {
        name: "views of [b2, h4+2·kvh2, 100, d64] causal",
        n: dims(2, 4, 2, 100, 100, 64),
        window: usize::MAX,
        segments: None,
        dtype: DType::BF16,
        fused: true,
    };
    flash_case(&dev, c, 31)?;
    let c = FlashCase {
        name: "views of [b2, h4+2·kvh2, 130, d32] window 17 segments",
        n: dims(2, 4, 2, 130, 130, 32),
        window: 17,
        segments: Some(two_rows_of_segments(130)),
        dtype: DType::BF16,
        fused: true,
    };
    flash_case(&dev, c, 32)
}

// ------------------------------------------------------------------------------------------------
// Cross-entropy

#[test]
fn cuda_cross_entropy() -> Result<()> {
    let Some(dev) = gpu("cuda_cross_entropy") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(41);
    // Phi-3's vocabulary (the row read once into registers) and one entry fewer (not a whole
    // number of 8-wide pieces: the three-pass loop).
    for v in [32064, 32063] {
        let rows = 9;
        let what = format!("cross_entropy bf16 rows {rows} V {v}");
        let grad_scale = 1.0 / rows as f32;
        let (logits, lh) = upload(
            uniform(&mut rng, rows * v, 5.0),
            &[rows, v],
            DType::BF16,
            &dev,
        )?;
        let targets: Vec<u32> = (0..rows).map(|_| rng.random_range(0..v as u32)).collect();
        let tt = Tensor::from_vec(targets.clone(), rows, &dev)?;
        let (loss, grad) = cross_entropy::cross_entropy_with_grad(&logits, &tt, grad_scale as f64)?;
        assert_eq!((loss.dims(), loss.dtype()), (&[rows][..], DType::F32));
        assert_eq!((grad.dims(), grad.dtype()), (&[rows, v][..], DType::BF16));
        let (want_loss, want_grad) = cross_entropy::reference(&lh, &targets, grad_scale);
        check(&format!("{what} loss"), &host(&loss)?, &want_loss, TOL);
        let got_grad = host(&grad)?;
        check(&format!("{what} grad"), &got_grad, &want_grad, TOL);
        // The non-target entries on their own scale (the −1 of the target dominates the one
        // above).
        let off_target = |g: &[f32]| -> Vec<f32> {
            g.iter()
                .enumerate()
                .filter(|(i, _)| targets[i / v] as usize != i % v)
                .map(|(_, x)| *x)
                .collect()
        };
        check(
            &format!("{what} grad (non-target entries)"),
            &off_target(&got_grad),
            &off_target(&want_grad),
            TOL,
        );
    }
    Ok(())
}

#[test]
fn cuda_dropout_regenerates_its_mask() -> Result<()> {
    let Some(dev) = gpu("cuda_dropout_regenerates_its_mask") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(21);
    let n = 3 * 8192;
    let (p, seed) = (0.05f32, 0xDEAD_BEEF_u64);
    for dtype in dtypes() {
        let (x, xs) = upload(uniform(&mut rng, n, 1.0), &[3, 8192], dtype, &dev)?;
        let want = philo_kernels::dropout::reference(&xs, seed, p);
        let out = philo_kernels::dropout::dropout(&x, seed, p)?;
        let got = host(&out)?;
        check(&format!("dropout {dtype:?} fwd"), &got, &want, 1e-2);
        // Same elements dropped as the reference (values may round differently).
        let dropped = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| (**g == 0.0) != (**w == 0.0))
            .count();
        assert_eq!(dropped, 0, "dropout masks differ in {dropped} elements");
        let kept = want.iter().filter(|w| **w != 0.0).count() as f32 / n as f32;
        eprintln!(
            "dropout {dtype:?}: kept fraction {kept:.4} (expected {:.2})",
            1.0 - p
        );
        assert!((kept - (1.0 - p)).abs() < 0.01);
        // In place (the backward's use): the same mask.
        let (g, gs) = upload(uniform(&mut rng, n, 1.0), &[3, 8192], dtype, &dev)?;
        philo_kernels::dropout::dropout_in_place(&g, seed, p)?;
        check(
            &format!("dropout {dtype:?} in place"),
            &host(&g)?,
            &philo_kernels::dropout::reference(&gs, seed, p),
            1e-2,
        );
    }
    Ok(())
}

#[test]
fn cuda_gemv() -> Result<()> {
    let Some(dev) = gpu("cuda_gemv") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(5);
    for (m, n, k) in [(1, 9216, 3072), (4, 3072, 8192), (2, 32064, 3072)] {
        for dtype in dtypes() {
            let (x, xs) = upload(uniform(&mut rng, m * k, 1.0), &[m, k], dtype, &dev)?;
            let (w, ws) = upload(uniform(&mut rng, n * k, 0.05), &[n, k], dtype, &dev)?;
            let got = host(&philo_kernels::gemv::gemv(&x, &w)?)?;
            check(
                &format!("gemv {dtype:?} m{m} n{n} k{k}"),
                &got,
                &philo_kernels::gemv::reference(&xs, &ws, k),
                1e-2,
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Paged KV cache: writing slots and decode attention over block tables

#[test]
fn cuda_paged_kv_cache() -> Result<()> {
    use philo_kernels::paged_attention::*;
    let Some(dev) = gpu("cuda_paged_kv_cache") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(6);
    // (heads, kv heads, head_dim, block size, sequence lengths, window)
    type Case<'a> = (usize, usize, usize, usize, &'a [usize], usize);
    // Head dims 64, 96 and 128 run the tiled kernel compiled for them, 80 the general one.
    let cases: [Case; 4] = [
        (32, 32, 96, 16, &[1, 17, 130, 300], usize::MAX),
        (8, 2, 64, 8, &[5, 64, 9], 20),
        (4, 4, 128, 16, &[257], usize::MAX),
        (4, 2, 80, 16, &[3, 200], 150),
    ];
    for (h, kvh, d, bs, lens, window) in cases {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let n = lens.len();
            let max_blocks = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap();
            let blocks = n * max_blocks + 3;
            // Tables: blocks handed out in a scrambled order.
            let mut order: Vec<u32> = (0..blocks as u32).collect();
            order.sort_by_key(|b| (b * 7919) % blocks as u32);
            let tables: Vec<u32> = order[..n * max_blocks].to_vec();
            let cache_len = blocks * kvh * bs * d;
            let (k_cache, mut k_host) =
                upload(vec![0.0; cache_len], &[blocks, kvh, bs, d], dtype, &dev)?;
            let (v_cache, mut v_host) =
                upload(vec![0.0; cache_len], &[blocks, kvh, bs, d], dtype, &dev)?;
            // Every position of every sequence is written in one call, as a prefill step does.
            let mut slots = Vec::new();
            for (s, &len) in lens.iter().enumerate() {
                for p in 0..len {
                    slots.push(tables[s * max_blocks + p / bs] * bs as u32 + (p % bs) as u32);
                }
            }
            let t = slots.len();
            let (k_new, k_new_host) = upload(
                uniform(&mut rng, kvh * t * d, 1.0),
                &[kvh, t, d],
                dtype,
                &dev,
            )?;
            let (v_new, v_new_host) = upload(
                uniform(&mut rng, kvh * t * d, 1.0),
                &[kvh, t, d],
                dtype,
                &dev,
            )?;
            let slots_t = Tensor::new(slots.as_slice(), &dev)?;
            write_kv(&k_cache, &k_new, &slots_t)?;
            write_kv(&v_cache, &v_new, &slots_t)?;
            write_kv_reference(&mut k_host, &k_new_host, &slots, kvh, bs, d);
            write_kv_reference(&mut v_host, &v_new_host, &slots, kvh, bs, d);
            assert_eq!(host(&k_cache)?, k_host, "write_kv {dtype:?}: keys differ");
            assert_eq!(host(&v_cache)?, v_host, "write_kv {dtype:?}: values differ");

            let (q, q_host) = upload(uniform(&mut rng, h * n * d, 1.0), &[h, n, d], dtype, &dev)?;
            let lens_u32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
            let got = paged_decode_attention(
                &q,
                &k_cache,
                &v_cache,
                &Tensor::from_vec(tables.clone(), (n, max_blocks), &dev)?,
                &Tensor::new(lens_u32.as_slice(), &dev)?,
                window,
            )?;
            let want = paged_decode_reference(
                &q_host, &k_host, &v_host, &tables, &lens_u32, h, kvh, bs, d, window,
            );
            check(
                &format!("paged decode {dtype:?} h{h} kvh{kvh} d{d} bs{bs} lens {lens:?}"),
                &host(&got)?,
                &want,
                1e-2,
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// GEMM into an existing tensor (LoRA products and weight gradients)

#[test]
fn cuda_gemm_into() -> Result<()> {
    use philo_kernels::gemm;
    let Some(dev) = gpu("cuda_gemm_into") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(31);
    for dtype in dtypes() {
        for (m, n, k) in [(4096, 64, 3072), (777, 96, 64), (5, 3, 7)] {
            for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                let a_shape = if trans_a { [k, m] } else { [m, k] };
                let b_shape = if trans_b { [n, k] } else { [k, n] };
                let (a, ah) = upload(uniform(&mut rng, m * k, 1.0), &a_shape, dtype, &dev)?;
                let (b, bh) = upload(uniform(&mut rng, k * n, 1.0), &b_shape, dtype, &dev)?;
                for out in [DType::F32, dtype] {
                    let what = format!(
                        "gemm_into {dtype:?}→{out:?} m{m} n{n} k{k} ta {trans_a} tb {trans_b}"
                    );
                    let (c, ch) = upload(uniform(&mut rng, m * n, 1.0), &[m, n], out, &dev)?;
                    gemm::gemm_into(&c, &a, trans_a, &b, trans_b, 0.25, 1.0)?;
                    let want =
                        gemm::reference(&ch, &ah, trans_a, &bh, trans_b, (m, n, k), 0.25, 1.0);
                    let tol = if out == DType::F32 { 1e-4 } else { TOL };
                    check(&what, &host(&c)?, &want, tol);
                }
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Flash backward straight to the QKV projection's gradient (GQA sum + inverse RoPE fused)

#[test]
fn cuda_flash_backward_qkv() -> Result<()> {
    let Some(dev) = gpu("cuda_flash_backward_qkv") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(41);
    // Partial rotary (48 of 96 dims: the final pass's 8-wide path; 20: its scalar one), a
    // window, two rows; GQA (4 query heads on 2 KV heads: dK/dV summed by the pass after the
    // kernel) and one KV head per query head with packed segments (the kernel writes dK/dV into
    // the gradient itself).
    let (b, h, s, d) = (2, 4, 150, 96);
    for (kvh, packed, rd) in [(2, false, 48), (4, true, 48), (2, false, 20)] {
        for dtype in dtypes() {
            let all = h + 2 * kvh;
            let (heads, _) = upload(
                uniform(&mut rng, b * all * s * d, 2.0),
                &[b, all, s, d],
                dtype,
                &dev,
            )?;
            let (dout, _) = upload(
                uniform(&mut rng, b * s * h * d, 1.0),
                &[b, s, h, d],
                dtype,
                &dev,
            )?;
            let table = |rng: &mut StdRng| {
                upload(
                    uniform(rng, b * s * rd / 2, 1.0),
                    &[b, s, rd / 2],
                    dtype,
                    &dev,
                )
            };
            let ((cos, _), (sin, _)) = (table(&mut rng)?, table(&mut rng)?);
            let segments = packed.then(|| two_rows_of_segments(s));
            let mask_on = |device: &Device| -> Result<AttentionMask> {
                Ok(AttentionMask {
                    window: 40,
                    segments: match &segments {
                        Some(seg) => Some(Tensor::from_vec(seg.clone(), (b, s), device)?),
                        None => None,
                    },
                })
            };
            let mask = mask_on(&dev)?;
            let (q, k, v) = (
                heads.narrow(1, 0, h)?,
                heads.narrow(1, h, kvh)?,
                heads.narrow(1, h + kvh, kvh)?,
            );
            let (out, lse) = attention::flash_forward(&q, &k, &v, &mask)?;
            let got = attention::flash_backward_qkv(
                &heads,
                kvh,
                &out,
                &lse,
                &dout,
                &mask,
                Some((&cos, &sin, rd)),
            )?;
            assert_eq!(got.dims(), &[b, s, all * d]);
            // The CPU path: the f32 references, composed.
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
            let want = attention::flash_backward_qkv(
                &cpu(&heads)?,
                kvh,
                &cpu(&out)?,
                &cpu(&lse)?,
                &cpu(&dout)?,
                &mask_on(&Device::Cpu)?,
                Some((&cpu(&cos)?, &cpu(&sin)?, rd)),
            )?;
            check(
                &format!("flash_backward_qkv kvh {kvh} packed {packed} rd {rd} {dtype:?}"),
                &host(&got)?,
                &host(&want)?,
                TOL_ATTN_BWD,
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The decode step's kernels: the fused GEMV in every weight format, split-K paged attention

/// A GEMV weight of `format` quantised from `w` `[n, k]` on `dev`: the kernels' view of it, what
/// owns the buffers behind that view (to keep alive), and the dequantised values the reference
/// multiplies.
fn decode_weight(
    format: &str,
    w: &[f32],
    n: usize,
    k: usize,
    dtype: DType,
    dev: &Device,
) -> Result<(
    philo_kernels::decode::GemvWeight,
    Box<dyn std::any::Any>,
    Vec<f32>,
)> {
    use philo_kernels::decode::GemvWeight;
    use philo_quant::device::{Int4Weight, Int8Weight};
    use philo_quant::{Int4Tensor, Int8Tensor, INT4_GROUP};
    let quant = |e: philo_quant::QuantError| candle_core::Error::Msg(e.to_string());
    Ok(match format {
        "dense" => {
            let (t, values) = upload(w.to_vec(), &[n, k], dtype, dev)?;
            (GemvWeight::dense(&t)?, Box::new(t), values)
        }
        "int8" => {
            let q = Int8Tensor::quantize(w, n, k).map_err(quant)?;
            let d = Int8Weight::from_host(&q, dev).map_err(quant)?;
            (GemvWeight::int8(&d)?, Box::new(d), q.dequantize())
        }
        "int4" => {
            let q = Int4Tensor::quantize(w, n, k, INT4_GROUP).map_err(quant)?;
            let d = Int4Weight::from_host(&q, dev)
                .map_err(quant)?
                .expect("whole groups");
            (GemvWeight::int4(&d)?, Box::new(d), q.dequantize())
        }
        double => {
            let q = Nf4Tensor::quantize(w, n, k, double == "nf4-dq").map_err(quant)?;
            let d = Nf4Weight::from_host(&q, dev)?;
            (GemvWeight::nf4(&d)?, Box::new(d), q.dequantize())
        }
    })
}

#[test]
fn cuda_decode_gemv_every_format_and_input() -> Result<()> {
    use philo_kernels::decode::*;
    let Some((dev, cuda_dev)) = cuda_gpu("cuda_decode_gemv_every_format_and_input") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(21);
    let mut swiglu_outputs = 0;
    // (rows, n, k): a QKV, a down projection and a ragged n that leaves a partial row group;
    // 5-8 rows (a verify step's) up to the down projection's width; rows of 640 are not whole
    // warps of 16-byte vectors (the norm's per-row sums then add lane by lane).
    for (m, n, k) in [
        (1, 1152, 3072),
        (3, 320, 8192),
        (2, 102, 1024),
        (4, 64, 256),
        (8, 320, 8192),
        (5, 102, 3072),
        (7, 64, 1024),
        (6, 40, 640),
    ] {
        for dtype in dtypes() {
            let kernels = DecodeKernels::load(&cuda_dev, dtype)?;
            for format in ["dense", "int8", "int4", "nf4", "nf4-dq"] {
                let w = uniform(&mut rng, n * k, 0.05);
                let (weight, _kept, w_values) = decode_weight(format, &w, n, k, dtype, &dev)?;
                for input in ["plain", "rmsnorm", "swiglu"] {
                    let width = if input == "swiglu" { 2 * k } else { k };
                    let (x, xs) =
                        upload(uniform(&mut rng, m * width, 1.0), &[m, width], dtype, &dev)?;
                    let (g, gs) = upload(uniform(&mut rng, k, 2.0), &[k], dtype, &dev)?;
                    let (res, res_host) =
                        upload(uniform(&mut rng, m * n, 1.0), &[m, n], dtype, &dev)?;
                    let gemv_input = match input {
                        "plain" => GemvInput::Plain,
                        "rmsnorm" => GemvInput::RmsNorm {
                            weight: address(&g)?,
                            eps: 1e-5,
                        },
                        _ => GemvInput::SwiGlu,
                    };
                    let norm = (input == "rmsnorm").then_some(gs.as_slice());
                    // Into a fresh buffer, added to the residual, and as f32 logits.
                    let stored = Tensor::zeros((m, n), dtype, &dev)?;
                    let logits = Tensor::zeros((m, n), DType::F32, &dev)?;
                    for (output, target, residual) in [
                        (GemvOutput::Store(address(&stored)?), &stored, None),
                        (
                            GemvOutput::AddTo(address(&res)?),
                            &res,
                            Some(res_host.as_slice()),
                        ),
                        (GemvOutput::F32(address(&logits)?), &logits, None),
                    ] {
                        kernels.gemv(&Gemv {
                            x: address(&x)?,
                            input: gemv_input,
                            m,
                            n,
                            k,
                            weight,
                            output,
                        })?;
                        let want =
                            gemv_reference(&xs, gemv_input, norm, &w_values, k, residual, dtype);
                        check(
                            &format!(
                                "decode gemv {format} {input} {output:?} {dtype:?} m{m} n{n} k{k}"
                            ),
                            &host(target)?,
                            &want,
                            1e-2,
                        );
                    }
                    // W as the MLP's [gate | up]: SwiGLU of the output, where the tensor-core
                    // GEMV takes it.
                    let glu = Tensor::zeros((m, n / 2), dtype, &dev)?;
                    let gemv = Gemv {
                        x: address(&x)?,
                        input: gemv_input,
                        m,
                        n,
                        k,
                        weight,
                        output: GemvOutput::SwiGlu(address(&glu)?),
                    };
                    // NF4's table of byte pairs (32 KiB) leaves room for 4 staged rows of 8,192.
                    let tensor_cores = ["dense", "int8", "int4"].contains(&format)
                        || (format.starts_with("nf4") && m * k <= 4 * 8192);
                    if n % 16 == 0 && k % 1024 == 0 && tensor_cores {
                        assert!(
                            kernels.takes_swiglu_output(&gemv)?,
                            "{format} m{m} n{n} k{k}"
                        );
                    }
                    if kernels.takes_swiglu_output(&gemv)? {
                        kernels.gemv(&gemv)?;
                        let full = gemv_reference(&xs, gemv_input, norm, &w_values, k, None, dtype);
                        let want: Vec<f32> = full
                            .chunks(n)
                            .flat_map(|row| swiglu_reference(row, dtype))
                            .collect();
                        check(
                            &format!("decode gemv {format} {input} SwiGLU output {dtype:?} m{m} n{n} k{k}"),
                            &host(&glu)?,
                            &want,
                            1e-2,
                        );
                        swiglu_outputs += 1;
                    } else {
                        assert!(
                            kernels.gemv(&gemv).is_err(),
                            "{format} m{m} n{n} k{k} took a SwiGLU output it says it does not"
                        );
                    }
                }
            }
        }
    }
    assert!(swiglu_outputs > 0, "no GEMV ran with the SwiGLU output");
    Ok(())
}

/// The decode step's RoPE + KV write (`rope_write_kv`, after the QKV GEMV stored its rows)
/// against the GEMV's and RoPE's references: every tensor-core format, 1-8 rows at their own
/// positions, short and long tables.
#[test]
fn cuda_rope_write_kv_matches_the_reference() -> Result<()> {
    use philo_kernels::decode::*;
    let Some((dev, cuda_dev)) = cuda_gpu("cuda_rope_write_kv_matches_the_reference") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(23);
    let (h, kvh, d, bs, k, positions) = (4, 2, 96, 16, 1024, 64);
    let n = (h + 2 * kvh) * d;
    let max_blocks = positions / bs;
    let all_lens = [5u32, 33, 64, 17, 40, 2, 50, 16];
    for m in [1, 3, 8] {
        let lens = &all_lens[..m];
        let long_rows: Vec<u32> = (0..m as u32).map(|b| b % 2).collect();
        let blocks = m * max_blocks;
        let tables: Vec<u32> = (0..blocks as u32).rev().collect();
        for dtype in dtypes() {
            let kernels = DecodeKernels::load(&cuda_dev, dtype)?;
            let half = d / 2;
            let table = |rng: &mut StdRng| {
                upload(
                    uniform(rng, positions * half, 1.0),
                    &[positions * half],
                    dtype,
                    &dev,
                )
            };
            let (cos_s, cos_s_host) = table(&mut rng)?;
            let (sin_s, sin_s_host) = table(&mut rng)?;
            let (cos_l, cos_l_host) = table(&mut rng)?;
            let (sin_l, sin_l_host) = table(&mut rng)?;
            let lens_t = Tensor::new(lens, &dev)?;
            let long_t = Tensor::new(long_rows.as_slice(), &dev)?;
            let tables_t = Tensor::new(tables.as_slice(), &dev)?;
            let host_view = RopeKvHost {
                cos_short: &cos_s_host,
                sin_short: &sin_s_host,
                cos_long: &cos_l_host,
                sin_long: &sin_l_host,
                long_rows: &long_rows,
                lens,
                tables: &tables,
                max_blocks,
                heads: h,
                kv_heads: kvh,
                head_dim: d,
                rotary_dim: d,
                block_size: bs,
            };
            for format in ["dense", "int8", "int4"] {
                let w = uniform(&mut rng, n * k, 0.05);
                let (weight, _kept, w_values) = decode_weight(format, &w, n, k, dtype, &dev)?;
                let (x, xs) = upload(uniform(&mut rng, m * k, 1.0), &[m, k], dtype, &dev)?;
                let (g, gs) = upload(uniform(&mut rng, k, 2.0), &[k], dtype, &dev)?;
                let input = GemvInput::RmsNorm {
                    weight: address(&g)?,
                    eps: 1e-5,
                };
                let stored = gemv_reference(&xs, input, Some(&gs), &w_values, k, None, dtype);
                let cache_len = blocks * kvh * bs * d;
                let (mut q_want, mut k_want, mut v_want) = (
                    vec![0f32; h * m * d],
                    vec![0f32; cache_len],
                    vec![0f32; cache_len],
                );
                rope_kv_reference(
                    &stored,
                    &host_view,
                    dtype,
                    &mut q_want,
                    &mut k_want,
                    &mut v_want,
                );
                let qkv = Tensor::zeros((m, n), dtype, &dev)?;
                let q = Tensor::zeros(h * m * d, dtype, &dev)?;
                let kc = Tensor::zeros(cache_len, dtype, &dev)?;
                let vc = Tensor::zeros(cache_len, dtype, &dev)?;
                kernels.gemv(&Gemv {
                    x: address(&x)?,
                    input,
                    m,
                    n,
                    k,
                    weight,
                    output: GemvOutput::Store(address(&qkv)?),
                })?;
                kernels.rope_write_kv(&RopeKv {
                    qkv: address(&qkv)?,
                    cos_short: address(&cos_s)?,
                    sin_short: address(&sin_s)?,
                    cos_long: address(&cos_l)?,
                    sin_long: address(&sin_l)?,
                    long_rows: address(&long_t)?,
                    lens: address(&lens_t)?,
                    tables: address(&tables_t)?,
                    max_blocks,
                    q_out: address(&q)?,
                    k_cache: address(&kc)?,
                    v_cache: address(&vc)?,
                    m,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: d,
                    rotary_dim: d,
                    block_size: bs,
                })?;
                let what = format!("{format} {dtype:?} m{m}");
                check(&format!("RoPE q, {what}"), &host(&q)?, &q_want, 1e-2);
                check(&format!("RoPE k cache, {what}"), &host(&kc)?, &k_want, 1e-2);
                check(&format!("RoPE v cache, {what}"), &host(&vc)?, &v_want, 1e-2);
            }
        }
    }
    Ok(())
}

/// The decode step's attention (`DecodeKernels::attention`: keys split over blocks; the tiled
/// and the tensor-core kernel) against the reference.
#[test]
fn cuda_paged_decode_split_matches_unsplit() -> Result<()> {
    use philo_kernels::decode::{address, Attention, AttentionKernel, DecodeKernels};
    use philo_kernels::paged_attention::paged_decode_reference;
    let Some((dev, cuda_dev)) = cuda_gpu("cuda_paged_decode_split_matches_unsplit") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(22);
    let (h, kvh, d, bs) = (8, 4, 96, 16);
    // Lengths shorter than the split count (empty splits), ragged (stages cut by the length),
    // whole stages, and long; windows that start inside a stage; more than 8 rows (split and
    // not).
    let many = vec![1u32, 5, 17, 33, 100, 129, 300, 64, 16, 250];
    for (lens, window, splits) in [
        (vec![3u32, 100, 1000], usize::MAX, 8),
        (vec![4096u32], 2047, 16),
        (vec![33u32, 517], 40, 5),
        (vec![1u32, 16, 17, 32], usize::MAX, 1),
        (vec![20_000u32, 77], usize::MAX, 12),
        (vec![3000u32], 1001, 7),
        (many.clone(), usize::MAX, 1),
        (many.clone(), 40, 3),
        (many, usize::MAX, 32),
    ] {
        let dtype = DType::BF16;
        let kernels = DecodeKernels::load(&cuda_dev, dtype)?;
        let n = lens.len();
        let max_blocks = *lens.iter().max().unwrap() as usize / bs + 1;
        let blocks = n * max_blocks;
        let tables: Vec<u32> = (0..blocks as u32).rev().collect();
        let cache = blocks * kvh * bs * d;
        let (kc, kh) = upload(uniform(&mut rng, cache, 1.0), &[cache], dtype, &dev)?;
        let (vc, vh) = upload(uniform(&mut rng, cache, 1.0), &[cache], dtype, &dev)?;
        let (q, qh) = upload(uniform(&mut rng, h * n * d, 2.0), &[h * n * d], dtype, &dev)?;
        let out = Tensor::zeros(n * h * d, dtype, &dev)?;
        let partial = Tensor::zeros(n * h * splits * (d + 2), DType::F32, &dev)?;
        let counters = Tensor::zeros(n * h, DType::U32, &dev)?;
        let tables_t = Tensor::from_vec(tables.clone(), blocks, &dev)?;
        let lens_t = Tensor::new(lens.as_slice(), &dev)?;
        let want = paged_decode_reference(&qh, &kh, &vh, &tables, &lens, h, kvh, bs, d, window);
        for kernel in [
            AttentionKernel::Tiled,
            AttentionKernel::TensorCore,
            AttentionKernel::TensorCoreShallow,
        ] {
            if !kernels.runs_attention(kernel, d, bs) {
                eprintln!("this GPU does not run {kernel:?} (too little shared memory)");
                continue;
            }
            // Twice: the counters must be back at zero after a launch.
            for round in 0..2 {
                out.zero_set()?;
                kernels.attention(&Attention {
                    q: address(&q)?,
                    k_cache: address(&kc)?,
                    v_cache: address(&vc)?,
                    tables: address(&tables_t)?,
                    lens: address(&lens_t)?,
                    out: address(&out)?,
                    m: n,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: d,
                    block_size: bs,
                    max_blocks,
                    window,
                    splits,
                    kernel,
                    partial: address(&partial)?,
                    counters: address(&counters)?,
                })?;
                check(
                    &format!(
                        "{kernel:?} decode attention lens {lens:?} window {window} splits {splits} round {round}"
                    ),
                    &host(&out)?,
                    &want,
                    1e-2,
                );
            }
            assert!(host(&counters)?.iter().all(|&c| c == 0.0), "counters reset");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// LoRA's rank-r products with the dropout inside them, against the composed CPU path

#[test]
fn cuda_lora_products_with_dropout() -> Result<()> {
    use philo_kernels::lora;
    let Some(dev) = gpu("cuda_lora_products_with_dropout") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(77);
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    // Every rank the kernels take, ragged row counts (tails of the 64-row tiles and of the
    // gradient's row splits), widths that split the down product's columns (ragged last split)
    // and that do not, with and without dropout.
    for (rank, width, rows) in [
        (16, 128, 1),
        (32, 384, 100),
        (64, 256, 300),
        (128, 128, 70),
        (64, 1152, 300),
        (16, 512, 1),
    ] {
        for mask in [None, Some((0x5EED_u64 ^ rank as u64, 0.3f32))] {
            for dtype in dtypes() {
                let what = format!("lora r{rank} in {width} rows {rows} mask {mask:?} {dtype:?}");
                let (x, _) = upload(
                    uniform(&mut rng, rows * width, 1.0),
                    &[rows, width],
                    dtype,
                    &dev,
                )?;
                let (a, _) = upload(
                    uniform(&mut rng, rank * width, 0.5),
                    &[rank, width],
                    dtype,
                    &dev,
                )?;
                let (d_down, _) = upload(
                    uniform(&mut rng, rows * rank, 1.0),
                    &[rows, rank],
                    dtype,
                    &dev,
                )?;
                let grad0 = uniform(&mut rng, rank * width, 1.0);

                let got = lora::down(&x, &a, mask)?;
                let want = lora::down(&cpu(&x)?, &cpu(&a)?, mask)?;
                check(&format!("{what}: down"), &host(&got)?, &host(&want)?, TOL);
                // x and down side by side in one [rows, width + rank] buffer, as the training
                // layer keeps them: strided x in, down written into the last columns.
                let padded = Tensor::zeros((rows, width + rank), dtype, &dev)?;
                padded.slice_set(&x, 1, 0)?;
                let x_view = padded.narrow(1, 0, width)?;
                lora::down_into(&x_view, &a, mask, &padded, width)?;
                let got = padded.narrow(1, width, rank)?.contiguous()?;
                check(
                    &format!("{what}: down into [x | down]"),
                    &host(&got)?,
                    &host(&want)?,
                    TOL,
                );
                let grad = Tensor::zeros((rank, width), DType::F32, &dev)?;
                lora::accumulate_grad_a(&grad, &d_down, &x_view, mask)?;
                let want_strided = Tensor::zeros((rank, width), DType::F32, &Device::Cpu)?;
                lora::accumulate_grad_a(&want_strided, &cpu(&d_down)?, &cpu(&x)?, mask)?;
                check(
                    &format!("{what}: grad A of strided x"),
                    &host(&grad)?,
                    &host(&want_strided)?,
                    TOL,
                );

                let grad = Tensor::from_vec(grad0.clone(), (rank, width), &dev)?;
                lora::accumulate_grad_a(&grad, &d_down, &x, mask)?;
                let want = Tensor::from_vec(grad0, (rank, width), &Device::Cpu)?;
                lora::accumulate_grad_a(&want, &cpu(&d_down)?, &cpu(&x)?, mask)?;
                check(
                    &format!("{what}: grad A"),
                    &host(&grad)?,
                    &host(&want)?,
                    TOL,
                );

                let got = lora::up_through_dropout(&d_down, &a, mask)?;
                let want = lora::up_through_dropout(&cpu(&d_down)?, &cpu(&a)?, mask)?;
                check(&format!("{what}: dx"), &host(&got)?, &host(&want)?, TOL);

                // [dx | d_down] side by side, as one GEMM against [W | scale·B] writes them in
                // the backward: A's gradient from the strided d_down, and dx += its share.
                let (dx0, dx0_host) = upload(
                    uniform(&mut rng, rows * width, 1.0),
                    &[rows, width],
                    dtype,
                    &dev,
                )?;
                let both = Tensor::cat(&[&dx0, &d_down], 1)?;
                let d_down_view = both.narrow(1, width, rank)?;
                let grad = Tensor::zeros((rank, width), DType::F32, &dev)?;
                lora::accumulate_grad_a(&grad, &d_down_view, &x, mask)?;
                let want_a = Tensor::zeros((rank, width), DType::F32, &Device::Cpu)?;
                lora::accumulate_grad_a(&want_a, &cpu(&d_down)?, &cpu(&x)?, mask)?;
                check(
                    &format!("{what}: grad A of strided d_down"),
                    &host(&grad)?,
                    &host(&want_a)?,
                    TOL,
                );
                lora::add_up_through_dropout(&d_down_view, &a, mask, &both)?;
                let want_dx: Vec<f32> = host(&want)?
                    .iter()
                    .zip(&dx0_host)
                    .map(|(u, d)| u + d)
                    .collect();
                check(
                    &format!("{what}: dx += through [dx | d_down]"),
                    &host(&both.narrow(1, 0, width)?)?,
                    &want_dx,
                    TOL,
                );
                check(
                    &format!("{what}: d_down left as it was"),
                    &host(&both.narrow(1, width, rank)?)?,
                    &host(&d_down)?,
                    0.0,
                );
                // Rows not a whole number of 16-byte pieces apart: element-wise stores.
                let spare = Tensor::zeros((rows, 2), dtype, &dev)?;
                let ragged = Tensor::cat(&[&dx0, &d_down, &spare], 1)?;
                lora::add_up_through_dropout(&ragged.narrow(1, width, rank)?, &a, mask, &ragged)?;
                check(
                    &format!("{what}: dx += with rows {} apart", width + rank + 2),
                    &host(&ragged.narrow(1, 0, width)?)?,
                    &want_dx,
                    TOL,
                );
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The optimizer's kernels: AdamW in place and the gradients' sum of squares

#[test]
fn cuda_adamw_and_sum_of_squares() -> Result<()> {
    use philo_kernels::adamw::{self, AdamWStep};
    let Some(dev) = gpu("cuda_adamw_and_sum_of_squares") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(5);
    let step = AdamWStep {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        grad_scale: 0.5,
    };
    let n = 70_001;
    let (p0, m0, g) = (
        uniform(&mut rng, n, 1.0),
        uniform(&mut rng, n, 0.1),
        uniform(&mut rng, n, 2.0),
    );
    let v0: Vec<f32> = uniform(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
    let on = |x: &[f32]| Tensor::from_vec(x.to_vec(), n, &dev);
    let (p, m, v, grad) = (on(&p0)?, on(&m0)?, on(&v0)?, on(&g)?);
    assert!(adamw::has_kernel(&[&p, &m, &v, &grad]));
    adamw::update_in_place(&p, &m, &v, &grad, &step)?;
    let (mut pw, mut mw, mut vw) = (p0, m0, v0);
    adamw::reference(&mut pw, &mut mw, &mut vw, &g, &step);
    check("adamw p", &host(&p)?, &pw, 1e-5);
    check("adamw m", &host(&m)?, &mw, 1e-5);
    check("adamw v", &host(&v)?, &vw, 1e-5);

    let tensors = [on(&g)?, on(&pw)?, Tensor::zeros(0, DType::F32, &dev)?];
    let got = adamw::sum_of_squares(&tensors)?;
    let want: f64 = g.iter().chain(&pw).map(|&x| (x as f64) * (x as f64)).sum();
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "sum of squares {got} vs {want}"
    );
    Ok(())
}

/// The many-rows path of the decode step: the GEMV's input transform as its own kernel, then
/// cuBLASLt (its algorithms timed ahead, or at the first call), against the GEMV's reference
/// (dense weights; stored, added, f32 outputs).
#[test]
fn cuda_transform_rows_then_gemm() -> Result<()> {
    use philo_kernels::decode::*;
    let Some((dev, cuda_dev)) = cuda_gpu("cuda_transform_rows_then_gemm") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(23);
    for (m, n, k) in [(5, 1152, 3072), (16, 320, 8192), (9, 100, 1024)] {
        for dtype in dtypes() {
            let kernels = DecodeKernels::load(&cuda_dev, dtype)?;
            let w = uniform(&mut rng, n * k, 0.05);
            let (weight, _kept, w_values) = decode_weight("dense", &w, n, k, dtype, &dev)?;
            let GemvWeight::Dense { w: w_address } = weight else {
                unreachable!()
            };
            for input in ["plain", "rmsnorm", "swiglu"] {
                let width = if input == "swiglu" { 2 * k } else { k };
                let (x, xs) = upload(uniform(&mut rng, m * width, 1.0), &[m, width], dtype, &dev)?;
                let (g, gs) = upload(uniform(&mut rng, k, 2.0), &[k], dtype, &dev)?;
                let (res, res_host) = upload(uniform(&mut rng, m * n, 1.0), &[m, n], dtype, &dev)?;
                let gemv_input = match input {
                    "plain" => GemvInput::Plain,
                    "rmsnorm" => GemvInput::RmsNorm {
                        weight: address(&g)?,
                        eps: 1e-5,
                    },
                    _ => GemvInput::SwiGlu,
                };
                let norm = (input == "rmsnorm").then_some(gs.as_slice());
                let staged = Tensor::zeros((m, k), dtype, &dev)?;
                kernels.transform_rows(address(&x)?, gemv_input, m, k, address(&staged)?)?;
                // Timing the shape's algorithms ahead must leave the residual as it was (the
                // first input's; later ones find the shape timed).
                kernels.tune_gemm(
                    address(&staged)?,
                    m,
                    n,
                    k,
                    w_address,
                    GemvOutput::AddTo(address(&res)?),
                )?;
                let stored = Tensor::zeros((m, n), dtype, &dev)?;
                let logits = Tensor::zeros((m, n), DType::F32, &dev)?;
                for (output, target, residual) in [
                    (GemvOutput::Store(address(&stored)?), &stored, None),
                    (
                        GemvOutput::AddTo(address(&res)?),
                        &res,
                        Some(res_host.as_slice()),
                    ),
                    (GemvOutput::F32(address(&logits)?), &logits, None),
                ] {
                    kernels.gemm(address(&staged)?, m, n, k, w_address, output)?;
                    let want = gemv_reference(&xs, gemv_input, norm, &w_values, k, residual, dtype);
                    check(
                        &format!("transform + gemm {input} {output:?} {dtype:?} m{m} n{n} k{k}"),
                        &host(target)?,
                        &want,
                        1e-2,
                    );
                }
            }
        }
    }
    Ok(())
}

/// GPU sampling against its reference, token for token (up to rounding at a boundary): greedy
/// (NaN and ties), temperature alone, top-k (with ties at the k-th), top-p, min-p and all
/// together, on f32 logits and on bf16-rounded ones (many ties at the top-p threshold), a
/// vocabulary that is not a multiple of the threads' share, and one with every logit -inf.
#[test]
fn cuda_adjust_logits_match_the_reference() -> Result<()> {
    use philo_kernels::decode::{address, DecodeKernels};
    use philo_kernels::sampling::{adjust_reference, LogitAdjustment};
    use rand::seq::SliceRandom;
    let Some((dev, cuda_dev)) = cuda_gpu("cuda_adjust_logits_match_the_reference") else {
        return Ok(());
    };
    let kernels = DecodeKernels::load(&cuda_dev, DType::BF16)?;
    let mut rng = StdRng::seed_from_u64(32);
    let (rows, vocab) = (7, 32_064);
    let mut logits = uniform(&mut rng, rows * vocab, 8.0);
    logits[0] = -0.0;
    logits[1] = 0.0;
    logits[2] = f32::NEG_INFINITY;
    // Per row: distinct tokens, biased or not, penalised or not; row 3 has none; row 5 more
    // entries than one block's threads.
    let mut adjustments = Vec::new();
    for row in 0..rows {
        let count = match row {
            3 => 0,
            5 => 3_000,
            _ => 40 + row * 10,
        };
        let mut tokens: Vec<u32> = (0..vocab as u32).collect();
        tokens.shuffle(&mut rng);
        adjustments.push(
            tokens[..count]
                .iter()
                .chain(if row == 0 { &[0u32, 1, 2][..] } else { &[][..] })
                .enumerate()
                .map(|(i, &token)| LogitAdjustment {
                    token,
                    bias: if i % 3 == 0 {
                        -0.0
                    } else {
                        rng.random_range(-5.0f32..5.0)
                    },
                    penalty: if i % 2 == 0 {
                        1.0
                    } else {
                        rng.random_range(0.5f32..2.0)
                    },
                    subtract: if i % 5 == 0 {
                        0.0
                    } else {
                        rng.random_range(-1.0f32..3.0)
                    },
                })
                .collect::<Vec<_>>(),
        );
    }
    // The first row's tokens 0, 1 and 2 may repeat the shuffled ones: keep each token once.
    adjustments[0].sort_by_key(|a| a.token);
    adjustments[0].dedup_by_key(|a| a.token);
    let words: Vec<u32> = adjustments
        .iter()
        .enumerate()
        .flat_map(|(row, list)| list.iter().flat_map(move |a| a.words(row, vocab)))
        .collect();
    let n = words.len() / LogitAdjustment::WORDS;
    let device_logits = Tensor::from_vec(logits.clone(), rows * vocab, &dev)?;
    let entries = Tensor::from_vec(words, n * LogitAdjustment::WORDS, &dev)?;
    let count = Tensor::new(&[n as u32], &dev)?;
    // A grid sized for more entries than there are: the count bounds the work.
    kernels.adjust(
        address(&device_logits)?,
        address(&entries)?,
        address(&count)?,
        n + 1_000,
    )?;
    let got = device_logits.to_vec1::<f32>()?;
    let mut want = logits;
    adjust_reference(&mut want, vocab, &adjustments);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&got) == bits(&want),
        "adjusted logits differ from the reference"
    );
    Ok(())
}

#[test]
fn cuda_sample_rows_match_the_reference() -> Result<()> {
    use philo_kernels::decode::{address, DecodeKernels};
    use philo_kernels::sampling::{
        self, draw_weights, reference, same_up_to_rounding, RowSampling,
    };
    let Some((dev, cuda_dev)) = cuda_gpu("cuda_sample_rows_match_the_reference") else {
        return Ok(());
    };
    let kernels = DecodeKernels::load(&cuda_dev, DType::BF16)?;
    let mut rng = StdRng::seed_from_u64(31);
    let settings = |t: f32, k: u32, p: f32, min_p: f32, typical_p: f32| RowSampling {
        temperature: t,
        top_k: k,
        top_p: p,
        min_p,
        typical_p,
        seed: 0,
        counter: 0,
    };
    let kinds = [
        settings(0.0, 0, 1.0, 0.0, 1.0),
        settings(1.0, 0, 1.0, 0.0, 1.0),
        settings(0.7, 0, 1.0, 0.0, 1.0),
        settings(0.7, 40, 1.0, 0.0, 1.0),
        settings(0.7, 0, 0.9, 0.0, 1.0),
        settings(1.3, 0, 0.5, 0.0, 1.0),
        settings(0.8, 0, 1.0, 0.05, 1.0),
        settings(0.6, 50, 0.95, 0.02, 1.0),
        settings(1.0, 0, 1.0, 0.0, 0.2),
        settings(0.7, 0, 1.0, 0.0, 0.9),
        settings(0.8, 100, 0.9, 0.0, 0.5),
    ];
    for vocab in [32_064usize, 1000] {
        let rows = 64;
        let mut logits = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            let scale = 2.0 + r as f32 * 0.2;
            let row = uniform(&mut rng, vocab, scale);
            // Odd rows rounded through bf16: ties everywhere.
            logits.extend(row.into_iter().map(|x| {
                if r % 2 == 1 {
                    half::bf16::from_f32(x).to_f32()
                } else {
                    x
                }
            }));
        }
        logits[3] = f32::NAN;
        logits[vocab..2 * vocab].fill(f32::NEG_INFINITY);
        let device_logits = Tensor::from_vec(logits.clone(), rows * vocab, &dev)?;
        for round in 0..3u32 {
            let mut params = vec![0u32; RowSampling::WORDS * rows];
            let mut row_settings = Vec::new();
            for r in 0..rows {
                let mut s = kinds[(r + round as usize) % kinds.len()];
                s.seed = 1000 + r as u64;
                s.counter = round * 7 + r as u32;
                s.write(&mut params, rows, r);
                row_settings.push(s);
            }
            let params = Tensor::from_vec(params, rows * RowSampling::WORDS, &dev)?;
            let out = Tensor::zeros(rows, DType::U32, &dev)?;
            kernels.sample(
                address(&device_logits)?,
                vocab,
                address(&params)?,
                rows,
                address(&out)?,
                rows,
            )?;
            let got = out.to_vec1::<u32>()?;
            for r in 0..rows {
                let (row, s) = (&logits[r * vocab..(r + 1) * vocab], &row_settings[r]);
                let want = reference(row, s);
                // Both sum in f64, but exp may differ by an ulp: a draw right at a boundary
                // between two tokens may fall either side.
                let rounding = || {
                    draw_weights(row, s).is_some_and(|w| {
                        let u = sampling::uniform(s.seed, s.counter);
                        same_up_to_rounding(&w, f64::from(u), want, got[r], 1e-6)
                    })
                };
                assert!(
                    got[r] == want || rounding(),
                    "vocab {vocab} round {round} row {r}: {} vs {want}, {s:?}",
                    got[r]
                );
            }
        }
    }
    Ok(())
}

/// The batched LoRA of the decode step (BGMV shrink and expand) against its reference: rows of
/// three adapters (ranks 16, 12 and 72: a rank not a multiple of 8 loads element by element, one
/// past 64 takes two passes) mixed with rows without one, which must stay as they were; k 1,000
/// (not a whole number of the shrink's 256-input slices); 322 and 11,266 outputs (the expand's
/// narrow and wide kernels); plain, RMSNorm and SwiGLU inputs, transformed by the first product.
#[test]
fn cuda_batched_lora_matches_the_reference() -> Result<()> {
    use philo_kernels::decode::*;
    let Some((dev, cuda_dev)) = cuda_gpu("cuda_batched_lora_matches_the_reference") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(41);
    let (k, max_rank) = (1000, 96);
    // 40 rows (two and a half of the kernels' tiles of 16): runs of one adapter, rows without
    // one and adapters interleaved, as a step's rows sorted by adapter and unsorted give them.
    let rows: Vec<Option<usize>> = (0..40)
        .map(|i| match i % 7 {
            3 => None,
            4 | 5 => Some(1),
            6 if i < 20 => Some(2),
            _ if i >= 32 => None,
            _ => Some(0),
        })
        .collect();
    let m = rows.len();
    for (dtype, n) in dtypes().into_iter().flat_map(|d| [(d, 322), (d, 11_266)]) {
        let kernels = DecodeKernels::load(&cuda_dev, dtype)?;
        let ranks = [16, 12, 72];
        let mut adapters = Vec::new();
        let mut entries = Vec::new();
        for &rank in &ranks {
            let (a, a_host) = upload(uniform(&mut rng, rank * k, 0.1), &[rank, k], dtype, &dev)?;
            let (b, b_host) = upload(uniform(&mut rng, n * rank, 0.1), &[n, rank], dtype, &dev)?;
            entries.extend(lora_entry(address(&a)?, address(&b)?, rank));
            adapters.push((a, a_host, b, b_host));
        }
        // candle has no u64: the same bits as i64.
        let entries: Vec<i64> = entries.into_iter().map(|w| w as i64).collect();
        let entries = Tensor::from_vec(entries.clone(), entries.len(), &dev)?;
        let adapter_rows: Vec<u32> = rows
            .iter()
            .map(|r| r.map_or(u32::MAX, |i| i as u32))
            .collect();
        let adapter_rows = Tensor::from_vec(adapter_rows, m, &dev)?;
        let (x, x_host) = upload(uniform(&mut rng, m * k, 1.0), &[m, k], dtype, &dev)?;
        let (x2, x2_host) = upload(uniform(&mut rng, m * 2 * k, 2.0), &[m, 2 * k], dtype, &dev)?;
        let (g, g_host) = upload(uniform(&mut rng, k, 1.0), &[k], dtype, &dev)?;
        // Three projections in turn, as a step runs them, one per input transform: each zeroes
        // the next one's t (the second's here starts full of ones).
        let t = [
            Tensor::zeros(m * max_rank, DType::F32, &dev)?,
            Tensor::ones(m * max_rank, DType::F32, &dev)?,
        ];
        let inputs = [
            GemvInput::Plain,
            GemvInput::RmsNorm {
                weight: address(&g)?,
                eps: 1e-5,
            },
            GemvInput::SwiGlu,
        ];
        for (pass, input) in inputs.into_iter().enumerate() {
            let (x, x_host) = match input {
                GemvInput::SwiGlu => (&x2, &x2_host),
                _ => (&x, &x_host),
            };
            let (y, y_host) = upload(uniform(&mut rng, m * n, 1.0), &[m, n], dtype, &dev)?;
            kernels.lora(&BatchedLora {
                x: address(x)?,
                input,
                y: address(&y)?,
                m,
                n,
                k,
                adapter_rows: address(&adapter_rows)?,
                entries: address(&entries)?,
                t: address(&t[pass % 2])?,
                t_next: address(&t[(pass + 1) % 2])?,
                max_rank,
            })?;
            let got = host(&y)?;
            let staged = transform_reference(x_host, input, Some(&g_host), k, dtype);
            for (r, adapter) in rows.iter().enumerate() {
                let before = &y_host[r * n..(r + 1) * n];
                let want = match adapter {
                    None => before.to_vec(),
                    Some(i) => {
                        let (_, a, _, b) = &adapters[*i];
                        lora_reference(&staged[r], a, b, ranks[*i], before, dtype)
                    }
                };
                check(
                    &format!("batched lora {dtype:?} n {n} {input:?} row {r} adapter {adapter:?}"),
                    &got[r * n..(r + 1) * n],
                    &want,
                    1e-2,
                );
            }
        }
    }
    Ok(())
}
