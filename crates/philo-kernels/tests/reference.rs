//! The CPU references of philo-kernels against independent formulations written with candle ops
//! (f32, CPU): the forward of each op as composed candle ops, its backward as candle autograd of
//! that composition. Also checks that the Tensor-level entry points route to the references on
//! the CPU, and that NF4 quantisation on the CPU is the host quantiser's.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use philo_kernels::attention::{self, AttentionMask, Dims};
use philo_kernels::rope::QkvShape;
use philo_kernels::{cross_entropy, nf4, rms_norm, rope, swiglu};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f32 = 1e-5;

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Max |got − want| relative to max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        got.iter().all(|v| v.is_finite()),
        "non-finite value in the result"
    );
    diff / scale
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = rel_err(got, want);
    eprintln!("{what}: max rel err {err:.3e}");
    assert!(err <= tol, "{what}: max rel err {err:e} > {tol:e}");
}

fn cpu() -> Device {
    Device::Cpu
}

// ------------------------------------------------------------------------------------------------
// RMSNorm

fn candle_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

#[test]
fn rms_norm_forward_and_backward() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    for (rows, n, eps) in [(5, 48, 1e-5), (3, 7, 1e-6), (1, 256, 1e-5)] {
        let x = uniform(&mut rng, rows * n, 2.0);
        let w = uniform(&mut rng, n, 1.5);
        let dy = uniform(&mut rng, rows * n, 1.0);
        let xt = Var::from_vec(x.clone(), (rows, n), &cpu())?;
        let wt = Tensor::from_vec(w.clone(), n, &cpu())?;
        let dyt = Tensor::from_vec(dy.clone(), (rows, n), &cpu())?;
        let y = candle_rms_norm(xt.as_tensor(), &wt, eps)?;
        assert_close(
            &format!("rms_norm fwd rows {rows} n {n}"),
            &rms_norm::reference(&x, &w, eps as f32),
            &host(&y)?,
            TOL,
        );
        let grads = (y * &dyt)?.sum_all()?.backward()?;
        let dx = grads.get(xt.as_tensor()).expect("grad of x");
        assert_close(
            &format!("rms_norm bwd rows {rows} n {n}"),
            &rms_norm::reference_backward(&x, &w, &dy, eps as f32),
            &host(dx)?,
            TOL,
        );
    }
    Ok(())
}

#[test]
fn rms_norm_tensor_functions_route_to_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, n, eps) = (4, 32, 1e-5);
    let x = uniform(&mut rng, rows * n, 2.0);
    let y = uniform(&mut rng, rows * n, 2.0);
    let w = uniform(&mut rng, n, 1.5);
    let dy = uniform(&mut rng, rows * n, 1.0);
    let xt = Tensor::from_vec(x.clone(), (2, 2, n), &cpu())?;
    let yt = Tensor::from_vec(y.clone(), (2, 2, n), &cpu())?;
    let wt = Tensor::from_vec(w.clone(), n, &cpu())?;
    let dyt = Tensor::from_vec(dy.clone(), (2, 2, n), &cpu())?;

    let out = rms_norm::rms_norm(&xt, &wt, eps)?;
    assert_eq!(out.dims(), &[2, 2, n]);
    assert_eq!(host(&out)?, rms_norm::reference(&x, &w, eps as f32));

    let dx = rms_norm::backward(&xt, &wt, &dyt, eps, None)?;
    assert_eq!(dx.dims(), &[2, 2, n]);
    let want_dx = rms_norm::reference_backward(&x, &w, &dy, eps as f32);
    assert_eq!(host(&dx)?, want_dx);
    let dx = rms_norm::backward(&xt, &wt, &dyt, eps, Some(&yt))?;
    let want: Vec<f32> = want_dx.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_eq!(host(&dx)?, want);

    let (sum, normed) = rms_norm::add_rms_norm(&xt, &yt, &wt, eps)?;
    let want_sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_eq!(host(&sum)?, want_sum);
    assert_eq!(
        host(&normed)?,
        rms_norm::reference(&want_sum, &w, eps as f32)
    );

    // The dtype is kept.
    let out16 = rms_norm::rms_norm(&xt.to_dtype(DType::BF16)?, &wt.to_dtype(DType::BF16)?, eps)?;
    assert_eq!(out16.dtype(), DType::BF16);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// QKV split + RoPE

/// cos/sin `[b, s, rd/2]` of per-row positions (each batch row starts at a different offset, so
/// that a layout mix-up between rows shows).
fn rope_tables(b: usize, s: usize, rd: usize) -> (Vec<f32>, Vec<f32>) {
    let half = rd / 2;
    let mut cos = Vec::with_capacity(b * s * half);
    let mut sin = Vec::with_capacity(b * s * half);
    for bi in 0..b {
        for si in 0..s {
            let pos = (si + 3 * bi + 1) as f32;
            for i in 0..half {
                let inv_freq = 1.0 / 10000f32.powf(2.0 * i as f32 / rd as f32);
                cos.push((pos * inv_freq).cos());
                sin.push((pos * inv_freq).sin());
            }
        }
    }
    (cos, sin)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// qkv `[b, s, n·d]` → `[b, n, s, d]`, q and k heads rotated on their first `rd` dims.
fn candle_qkv_rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, sh: QkvShape) -> Result<Tensor> {
    let (b, s, _) = qkv.dims3()?;
    let n = sh.heads + 2 * sh.kv_heads;
    let (d, rd) = (sh.head_dim, sh.rotary_dim);
    let heads = qkv.reshape((b, s, n, d))?.transpose(1, 2)?; // [b, n, s, d]
    let qk = heads.narrow(1, 0, sh.heads + sh.kv_heads)?;
    let v = heads.narrow(1, sh.heads + sh.kv_heads, sh.kv_heads)?;
    // [b, s, rd/2] → [b, 1, s, rd] (the same angle for both halves).
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let rot = qk.narrow(3, 0, rd)?;
    let rotated = (rot.broadcast_mul(&cos)? + rotate_half(&rot)?.broadcast_mul(&sin)?)?;
    let qk = if rd < d {
        Tensor::cat(&[&rotated, &qk.narrow(3, rd, d - rd)?], 3)?
    } else {
        rotated
    };
    Tensor::cat(&[&qk, &v], 1)?.contiguous()
}

#[test]
fn qkv_rope_forward_and_backward() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let cases = [
        // (b, s, shape)
        (
            2,
            5,
            QkvShape {
                heads: 3,
                kv_heads: 3,
                head_dim: 8,
                rotary_dim: 8,
            },
        ),
        // GQA + partial rotary (Phi-3-small-like).
        (
            2,
            6,
            QkvShape {
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                rotary_dim: 8,
            },
        ),
        (
            1,
            4,
            QkvShape {
                heads: 2,
                kv_heads: 1,
                head_dim: 12,
                rotary_dim: 4,
            },
        ),
    ];
    for (b, s, sh) in cases {
        let n = sh.heads + 2 * sh.kv_heads;
        let d = sh.head_dim;
        let qkv = uniform(&mut rng, b * s * n * d, 2.0);
        let grad = uniform(&mut rng, b * n * s * d, 1.0);
        let (cos, sin) = rope_tables(b, s, sh.rotary_dim);
        let what = format!("qkv_rope b{b} s{s} {sh:?}");

        let qkv_t = Var::from_vec(qkv.clone(), (b, s, n * d), &cpu())?;
        let cos_t = Tensor::from_vec(cos.clone(), (b, s, sh.rotary_dim / 2), &cpu())?;
        let sin_t = Tensor::from_vec(sin.clone(), (b, s, sh.rotary_dim / 2), &cpu())?;
        let grad_t = Tensor::from_vec(grad.clone(), (b, n, s, d), &cpu())?;
        let out = candle_qkv_rope(qkv_t.as_tensor(), &cos_t, &sin_t, sh)?;
        let want = host(&out)?;
        assert_close(
            &format!("{what} fwd"),
            &rope::reference(&qkv, &cos, &sin, b, s, sh),
            &want,
            TOL,
        );
        let grads = (out * &grad_t)?.sum_all()?.backward()?;
        let dqkv = host(grads.get(qkv_t.as_tensor()).expect("grad of qkv"))?;
        assert_close(
            &format!("{what} bwd"),
            &rope::reference_backward(&grad, &cos, &sin, b, s, sh),
            &dqkv,
            TOL,
        );

        // Tensor-level functions (CPU: the references).
        let plain = Tensor::from_vec(qkv.clone(), (b, s, n * d), &cpu())?;
        let fwd = rope::qkv_rope(&plain, &cos_t, &sin_t, sh)?;
        assert_eq!(fwd.dims(), &[b, n, s, d]);
        assert_eq!(host(&fwd)?, rope::reference(&qkv, &cos, &sin, b, s, sh));
        let bwd = rope::backward(&grad_t, &cos_t, &sin_t, sh)?;
        assert_eq!(bwd.dims(), &[b, s, n * d]);
        assert_eq!(
            host(&bwd)?,
            rope::reference_backward(&grad, &cos, &sin, b, s, sh)
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// SwiGLU

#[test]
fn swiglu_forward_and_backward() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    for (rows, i) in [(3, 16), (1, 5), (4, 33)] {
        let gate_up = uniform(&mut rng, rows * 2 * i, 6.0);
        let grad = uniform(&mut rng, rows * i, 1.0);
        let x = Var::from_vec(gate_up.clone(), (rows, 2 * i), &cpu())?;
        let grad_t = Tensor::from_vec(grad.clone(), (rows, i), &cpu())?;
        let gate = x.narrow(D::Minus1, 0, i)?;
        let up = x.narrow(D::Minus1, i, i)?;
        let out = (gate.silu()? * up)?;
        assert_close(
            &format!("swiglu fwd rows {rows} i {i}"),
            &swiglu::reference(&gate_up, i),
            &host(&out)?,
            TOL,
        );
        let grads = (out * &grad_t)?.sum_all()?.backward()?;
        let dx = host(grads.get(x.as_tensor()).expect("grad of gate_up"))?;
        assert_close(
            &format!("swiglu bwd rows {rows} i {i}"),
            &swiglu::reference_backward(&gate_up, &grad, i),
            &dx,
            TOL,
        );

        let plain = Tensor::from_vec(gate_up.clone(), (rows, 2 * i), &cpu())?;
        let fwd = swiglu::swiglu(&plain)?;
        assert_eq!(fwd.dims(), &[rows, i]);
        assert_eq!(host(&fwd)?, swiglu::reference(&gate_up, i));
        let bwd = swiglu::backward(&plain, &grad_t)?;
        assert_eq!(bwd.dims(), &[rows, 2 * i]);
        assert_eq!(host(&bwd)?, swiglu::reference_backward(&gate_up, &grad, i));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Attention

struct AttnCase {
    name: &'static str,
    n: Dims,
    window: usize,
    segments: Option<Vec<u32>>,
}

/// Whether query `i` (of S, at key position T − S + i) of batch row `b` sees key `j`.
fn sees(c: &AttnCase, b: usize, i: usize, j: usize) -> bool {
    let pos = c.n.t - c.n.s + i;
    if j > pos || pos - j >= c.window {
        return false;
    }
    match &c.segments {
        None => true,
        Some(seg) => {
            let row = &seg[b * c.n.t..(b + 1) * c.n.t];
            row[pos] != 0 && row[j] == row[pos]
        }
    }
}

/// softmax(q·kᵀ/sqrt(d) + mask)·v with candle ops: output `[B, S, H, D]` and the logsumexp of
/// the masked scores `[B, H, S]`. Rows that see no key are multiplied by 0 (output and lse).
fn candle_attention(
    c: &AttnCase,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Dims { b, h, kvh, s, t, d } = c.n;
    let group = h / kvh;
    // KV head of query head hh is hh / group.
    let expand = |x: &Tensor| -> Result<Tensor> {
        x.unsqueeze(2)?
            .expand((b, kvh, group, t, d))?
            .reshape((b, h, t, d))
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let mut mask = Vec::with_capacity(b * s * t);
    let mut any = Vec::with_capacity(b * s);
    for bi in 0..b {
        for i in 0..s {
            let mut seen = false;
            for j in 0..t {
                let ok = sees(c, bi, i, j);
                seen |= ok;
                mask.push(if ok { 0f32 } else { -1e9 });
            }
            any.push(if seen { 1f32 } else { 0f32 });
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, s, t), q.device())?;
    let any = Tensor::from_vec(any, (b, 1, s, 1), q.device())?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let out = p.matmul(&v)?.broadcast_mul(&any)?; // [B, H, S, D]
    let max = scores.max_keepdim(D::Minus1)?;
    let lse = (scores
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?
        .broadcast_mul(&any)?
        .squeeze(D::Minus1)?;
    Ok((out.transpose(1, 2)?.contiguous()?, lse, any))
}

fn attention_cases() -> Vec<AttnCase> {
    let dims = |b, h, kvh, s, t, d| Dims { b, h, kvh, s, t, d };
    // Row 0: left padding, two packed segments; row 1: one segment with a padded tail.
    let packed = |t: usize| -> Vec<u32> {
        let mut seg = Vec::with_capacity(2 * t);
        seg.extend((0..t).map(|j| {
            if j < 3 {
                0
            } else if j < t / 2 {
                1
            } else {
                2
            }
        }));
        seg.extend((0..t).map(|j| if j + 2 < t { 1 } else { 0 }));
        seg
    };
    vec![
        AttnCase {
            name: "causal",
            n: dims(1, 2, 2, 9, 9, 8),
            window: usize::MAX,
            segments: None,
        },
        AttnCase {
            name: "gqa causal",
            n: dims(2, 4, 2, 11, 11, 8),
            window: usize::MAX,
            segments: None,
        },
        AttnCase {
            name: "window",
            n: dims(1, 2, 1, 13, 13, 4),
            window: 4,
            segments: None,
        },
        AttnCase {
            name: "segments + window + gqa",
            n: dims(2, 4, 2, 16, 16, 8),
            window: 5,
            segments: Some(packed(16)),
        },
        AttnCase {
            name: "kv cache",
            n: dims(2, 4, 2, 5, 12, 8),
            window: usize::MAX,
            segments: None,
        },
        AttnCase {
            name: "decode",
            n: dims(1, 3, 1, 1, 10, 8),
            window: 6,
            segments: None,
        },
        AttnCase {
            name: "kv cache + segments",
            n: dims(2, 2, 2, 6, 14, 4),
            window: 7,
            segments: Some(packed(14)),
        },
    ]
}

#[test]
fn attention_forward_and_backward() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    for c in attention_cases() {
        let Dims { b, h, kvh, s, t, d } = c.n;
        let q = uniform(&mut rng, b * h * s * d, 2.0);
        let k = uniform(&mut rng, b * kvh * t * d, 2.0);
        let v = uniform(&mut rng, b * kvh * t * d, 1.0);
        let dout = uniform(&mut rng, b * s * h * d, 1.0);
        let qv = Var::from_vec(q.clone(), (b, h, s, d), &cpu())?;
        let kv = Var::from_vec(k.clone(), (b, kvh, t, d), &cpu())?;
        let vv = Var::from_vec(v.clone(), (b, kvh, t, d), &cpu())?;
        let (out, lse, any) = candle_attention(&c, qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;

        let (ref_out, ref_lse) =
            attention::reference(&q, &k, &v, c.segments.as_deref(), c.window, c.n);
        // Rows seeing no key are zero in both (the candle output is masked by `any`).
        assert_close(
            &format!("attention fwd {}", c.name),
            &ref_out,
            &host(&out)?,
            TOL,
        );
        // logsumexp: compare rows that see a key; the reference marks the others +inf.
        let any_rows = host(&any)?; // [B, S]
        let lse_want = host(&lse)?;
        let (mut got, mut want) = (Vec::new(), Vec::new());
        let mut blind = 0;
        for bi in 0..b {
            for hh in 0..h {
                for i in 0..s {
                    let at = (bi * h + hh) * s + i;
                    if any_rows[bi * s + i] > 0.0 {
                        got.push(ref_lse[at]);
                        want.push(lse_want[at]);
                    } else {
                        assert_eq!(ref_lse[at], f32::INFINITY, "{}: lse of a blind row", c.name);
                        blind += 1;
                    }
                }
            }
        }
        assert!(!got.is_empty());
        assert_close(
            &format!("attention lse {} ({blind} blind rows)", c.name),
            &got,
            &want,
            TOL,
        );

        // The tensor wrapper runs the same reference.
        let mask = AttentionMask {
            window: c.window,
            segments: match &c.segments {
                Some(seg) => Some(Tensor::from_vec(seg.clone(), (b, t), &cpu())?),
                None => None,
            },
        };
        let (wrap_out, wrap_lse) =
            attention::reference_tensors(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &mask)?;
        assert_eq!(wrap_out, ref_out);
        assert_eq!(wrap_lse, ref_lse);

        let dout_t = Tensor::from_vec(dout.clone(), (b, s, h, d), &cpu())?;
        let grads = (out * &dout_t)?.sum_all()?.backward()?;
        let (dq, dk, dv) =
            attention::reference_backward(&q, &k, &v, c.segments.as_deref(), c.window, c.n, &dout);
        let g = |var: &Var| host(grads.get(var.as_tensor()).expect("grad"));
        assert_close(&format!("attention dq {}", c.name), &dq, &g(&qv)?, TOL);
        assert_close(&format!("attention dk {}", c.name), &dk, &g(&kv)?, TOL);
        assert_close(&format!("attention dv {}", c.name), &dv, &g(&vv)?, TOL);
    }
    Ok(())
}

#[test]
fn attention_blind_queries_give_zeros() {
    // Every query sees at least itself unless it is padding (segment 0): the padded queries
    // must come out as zeros with a +inf logsumexp, and take no part in the backward.
    let n = Dims {
        b: 1,
        h: 1,
        kvh: 1,
        s: 4,
        t: 4,
        d: 2,
    };
    let q = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let seg = [0u32, 1, 0, 1];
    let (out, lse) = attention::reference(&q, &q, &q, Some(&seg), usize::MAX, n);
    assert_eq!(&out[0..2], &[0.0, 0.0]);
    assert_eq!(&out[4..6], &[0.0, 0.0]);
    assert_eq!(lse[0], f32::INFINITY);
    assert_eq!(lse[2], f32::INFINITY);
    assert!(lse[1].is_finite() && lse[3].is_finite());
    // Query 3 sees keys 1 and 3 only.
    let (dq, dk, dv) =
        attention::reference_backward(&q, &q, &q, Some(&seg), usize::MAX, n, &[1.0; 8]);
    for x in [&dq, &dk, &dv] {
        assert_eq!(&x[0..2], &[0.0, 0.0]);
        assert_eq!(&x[4..6], &[0.0, 0.0]);
    }
}

// ------------------------------------------------------------------------------------------------
// Cross-entropy

#[test]
fn cross_entropy_loss_and_grad() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    for (rows, v, scale, grad_scale) in [(4, 50, 5.0, 0.25), (3, 1000, 20.0, 1.0), (1, 7, 1.0, 0.5)]
    {
        let logits = uniform(&mut rng, rows * v, scale);
        let targets: Vec<u32> = (0..rows).map(|_| rng.random_range(0..v as u32)).collect();
        let x = Var::from_vec(logits.clone(), (rows, v), &cpu())?;
        let tt = Tensor::from_vec(targets.clone(), (rows, 1), &cpu())?;
        let logp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)?;
        let loss = logp.gather(&tt, 1)?.neg()?.squeeze(1)?; // [rows]
        let (ref_loss, ref_grad) = cross_entropy::reference(&logits, &targets, grad_scale);
        let what = format!("cross_entropy rows {rows} V {v}");
        assert_close(&format!("{what} loss"), &ref_loss, &host(&loss)?, TOL);
        let grads = (loss.sum_all()? * grad_scale as f64)?.backward()?;
        let dx = host(grads.get(x.as_tensor()).expect("grad of logits"))?;
        assert_close(&format!("{what} grad"), &ref_grad, &dx, TOL);

        let plain = Tensor::from_vec(logits.clone(), (rows, v), &cpu())?;
        let tflat = Tensor::from_vec(targets.clone(), rows, &cpu())?;
        let (l, g) = cross_entropy::cross_entropy_with_grad(&plain, &tflat, grad_scale as f64)?;
        assert_eq!(l.dims(), &[rows]);
        assert_eq!(g.dims(), &[rows, v]);
        assert_eq!(host(&l)?, ref_loss);
        assert_eq!(host(&g)?, ref_grad);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// NF4

#[test]
fn nf4_cpu_quantize_matches_host_quantiser() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    // A multiple of 64 elements and one that is not (the host quantiser takes any count).
    for (rows, cols) in [(16, 192), (3, 50)] {
        let mut w = uniform(&mut rng, rows * cols, 0.1);
        w[5] = 0.7; // an outlier sets one block's absmax
        for x in w.iter_mut().skip(64).take(64) {
            *x = 0.0; // an all-zero block
        }
        let t = Tensor::from_vec(w, (rows, cols), &cpu())?;
        for dq in [false, true] {
            let weight = nf4::Nf4Weight::quantize(&t, dq)?;
            assert_eq!((weight.rows, weight.cols), (rows, cols));
            let host_q = philo_quant::Nf4Tensor::from_tensor(&t, dq).expect("host quantiser");
            let got = host(&weight.dequantize(DType::F32)?)?;
            assert_eq!(got, host_q.dequantize(), "nf4 {rows}x{cols} dq {dq}");
            assert_eq!(
                weight.to_host()?,
                host_q,
                "nf4 {rows}x{cols} dq {dq}: to_host"
            );
            let bf = weight.dequantize(DType::BF16)?;
            assert_eq!(bf.dtype(), DType::BF16);
            assert_eq!(
                host(&bf)?,
                host(&host_q.to_tensor(DType::BF16, &cpu()).expect("to_tensor"))?
            );
            eprintln!("nf4 {rows}x{cols} dq {dq}: equal to the host quantiser");
        }
    }
    Ok(())
}

#[test]
fn gemv_reference_is_a_matmul() {
    let mut rng = StdRng::seed_from_u64(3);
    let (m, n, k) = (3, 5, 16);
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let want = xt
        .matmul(&wt.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got = philo_kernels::gemv::reference(&x, &w, k);
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
    assert!(err < 1e-5, "gemv reference differs from matmul by {err}");
}

/// The paged decode reference equals the flash reference on the same keys laid out contiguously
/// (last query of each sequence), and write_kv puts each token where its block table says.
#[test]
fn paged_decode_reference_matches_contiguous_attention() -> Result<()> {
    use philo_kernels::paged_attention::*;
    let mut rng = StdRng::seed_from_u64(11);
    let (h, kvh, d, bs, window) = (4, 2, 8, 4, 6);
    let lens = [3usize, 9, 13];
    let n = lens.len();
    let max_blocks = 4;
    let blocks = n * max_blocks;
    let tables: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut k_cache = vec![0f32; blocks * kvh * bs * d];
    let mut v_cache = k_cache.clone();
    let q = uniform(&mut rng, h * n * d, 1.0);
    let mut want = Vec::new();
    for (s, &len) in lens.iter().enumerate() {
        // Contiguous [1, kvh, len, d] keys/values, written into the paged cache.
        let k = uniform(&mut rng, kvh * len * d, 1.0);
        let v = uniform(&mut rng, kvh * len * d, 1.0);
        let slots: Vec<u32> = (0..len)
            .map(|p| tables[s * max_blocks + p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        write_kv_reference(&mut k_cache, &k, &slots, kvh, bs, d);
        write_kv_reference(&mut v_cache, &v, &slots, kvh, bs, d);
        let qs: Vec<f32> = (0..h)
            .flat_map(|hh| q[(hh * n + s) * d..][..d].to_vec())
            .collect();
        let (out, _) = attention::reference(
            &qs,
            &k,
            &v,
            None,
            window,
            Dims {
                b: 1,
                h,
                kvh,
                s: 1,
                t: len,
                d,
            },
        );
        want.extend(out);
    }
    let got = paged_decode_reference(
        &q,
        &k_cache,
        &v_cache,
        &tables,
        &lens.map(|l| l as u32),
        h,
        kvh,
        bs,
        d,
        window,
    );
    let err = rel_err(&got, &want);
    assert!(err < TOL, "paged decode vs contiguous: {err}");
    // Through the Tensor entry points on the CPU: slot 5 is block 1 offset 1, slot 42 block 10
    // offset 2.
    let cache = Tensor::zeros((blocks, kvh, bs, d), DType::F32, &Device::Cpu)?;
    let new = Tensor::from_vec(
        uniform(&mut rng, kvh * 2 * d, 1.0),
        (kvh, 2, d),
        &Device::Cpu,
    )?;
    write_kv(&cache, &new, &Tensor::new(&[5u32, 42], &Device::Cpu)?)?;
    for head in 0..kvh {
        for (token, (block, offset)) in [(1, 1), (10, 2)].into_iter().enumerate() {
            let got = host(&cache.get(block)?.get(head)?.get(offset)?)?;
            assert_eq!(got, host(&new.get(head)?.get(token)?)?);
        }
    }
    assert_eq!(host(&cache.sum_all()?)?, host(&new.sum_all()?)?);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// GEMM into an existing tensor

#[test]
fn gemm_into_matches_candle_for_every_transposition() -> Result<()> {
    use philo_kernels::gemm;
    let mut rng = StdRng::seed_from_u64(21);
    let (m, n, k) = (5, 11, 37);
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = uniform(&mut rng, m * k, 1.0);
        let b = uniform(&mut rng, k * n, 1.0);
        let c0 = uniform(&mut rng, m * n, 1.0);
        let a_shape = if trans_a { (k, m) } else { (m, k) };
        let b_shape = if trans_b { (n, k) } else { (k, n) };
        let at = Tensor::from_vec(a.clone(), a_shape, &cpu())?;
        let bt = Tensor::from_vec(b.clone(), b_shape, &cpu())?;
        let op = |t: &Tensor, trans: bool| if trans { t.t() } else { Ok(t.clone()) };
        let candle = ((op(&at, trans_a)?.matmul(&op(&bt, trans_b)?)? * 0.5)?
            + (Tensor::from_vec(c0.clone(), (m, n), &cpu())? * 2.0)?)?;
        let want = gemm::reference(&c0, &a, trans_a, &b, trans_b, (m, n, k), 0.5, 2.0);
        let what = format!("gemm reference ta {trans_a} tb {trans_b}");
        assert_close(&what, &want, &host(&candle)?, TOL);
        // The entry point, in place, with `a` as a strided view.
        let c = Tensor::from_vec(c0.clone(), (m, n), &cpu())?;
        let wide = Tensor::cat(&[&at, &at], 1)?;
        let a_view = wide.narrow(1, a_shape.1, a_shape.1)?;
        gemm::gemm_into(&c, &a_view, trans_a, &bt, trans_b, 0.5, 2.0)?;
        assert_close(
            &format!("gemm_into ta {trans_a} tb {trans_b}"),
            &host(&c)?,
            &want,
            TOL,
        );
        // beta = 0 ignores what c held.
        let c = Tensor::full(f32::NAN, (m, n), &cpu())?;
        gemm::gemm_into(&c, &at, trans_a, &bt, trans_b, 1.0, 0.0)?;
        let plain = gemm::reference(&c0, &a, trans_a, &b, trans_b, (m, n, k), 1.0, 0.0);
        assert_close(
            &format!("gemm_into beta 0 ta {trans_a} tb {trans_b}"),
            &host(&c)?,
            &plain,
            TOL,
        );
    }
    Ok(())
}
