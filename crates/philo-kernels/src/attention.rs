//! Flash attention: causal, sliding window, padding and packed segments, GQA, forward and
//! backward, without materialising the `[seq, seq]` score matrix.
//!
//! Shapes: q `[B, H, S, D]`, k and v `[B, KVH, T, D]` (the last S key positions are the
//! queries'; T − S earlier ones come from a KV cache), output `[B, S, H, D]` (what o_proj reads
//! as `[B, S, H·D]`). Key j is visible to the query at position i when j ≤ i, i − j < window,
//! and — with `segments` `[B, T]` — both have the same non-zero segment id. A query that sees no
//! key gets zeros. The scale is 1/sqrt(D).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::host_f32;

/// Which keys each query sees.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    /// Keys at least this far behind the query are masked (usize::MAX: no window).
    pub window: usize,
    /// `[B, T]` u32 segment ids (0 = padding), or None when every position is real.
    pub segments: Option<Tensor>,
}

fn visible(key: usize, pos: usize, window: usize, seg: Option<&[u32]>, query_seg: u32) -> bool {
    key <= pos && pos - key < window && seg.is_none_or(|s| s[key] != 0 && s[key] == query_seg)
}

/// Dimensions of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
}

/// Reference forward on contiguous f32 data: (output `[B, S, H, D]`, logsumexp `[B, H, S]`).
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: Option<&[u32]>,
    window: usize,
    n: Dims,
) -> (Vec<f32>, Vec<f32>) {
    let scale = 1.0 / (n.d as f32).sqrt();
    let past = n.t - n.s;
    let mut out = vec![0f32; n.b * n.s * n.h * n.d];
    let mut lse = vec![f32::INFINITY; n.b * n.h * n.s];
    for b in 0..n.b {
        let seg = segments.map(|s| &s[b * n.t..(b + 1) * n.t]);
        for h in 0..n.h {
            let kvh = h / (n.h / n.kvh);
            let kb = &k[(b * n.kvh + kvh) * n.t * n.d..][..n.t * n.d];
            let vb = &v[(b * n.kvh + kvh) * n.t * n.d..][..n.t * n.d];
            for i in 0..n.s {
                let pos = past + i;
                let qi = &q[((b * n.h + h) * n.s + i) * n.d..][..n.d];
                let query_seg = seg.map_or(0, |s| s[pos]);
                let scores: Vec<Option<f32>> = (0..n.t)
                    .map(|j| {
                        visible(j, pos, window, seg, query_seg).then(|| {
                            qi.iter()
                                .zip(&kb[j * n.d..(j + 1) * n.d])
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                * scale
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                if max == f32::NEG_INFINITY {
                    continue;
                }
                let sum: f32 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                lse[(b * n.h + h) * n.s + i] = max + sum.ln();
                let o = &mut out[((b * n.s + i) * n.h + h) * n.d..][..n.d];
                for (j, s) in scores.iter().enumerate() {
                    if let Some(s) = s {
                        let p = (s - max).exp() / sum;
                        for (o, v) in o.iter_mut().zip(&vb[j * n.d..(j + 1) * n.d]) {
                            *o += p * v;
                        }
                    }
                }
            }
        }
    }
    (out, lse)
}

/// Reference backward: (dq `[B, H, S, D]`, dk, dv `[B, KVH, T, D]`) from dout `[B, S, H, D]`.
#[allow(clippy::too_many_arguments)]
pub fn reference_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: Option<&[u32]>,
    window: usize,
    n: Dims,
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (out, lse) = reference(q, k, v, segments, window, n);
    let scale = 1.0 / (n.d as f32).sqrt();
    let past = n.t - n.s;
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for b in 0..n.b {
        let seg = segments.map(|s| &s[b * n.t..(b + 1) * n.t]);
        for h in 0..n.h {
            let kvh = h / (n.h / n.kvh);
            let kv_base = (b * n.kvh + kvh) * n.t * n.d;
            for i in 0..n.s {
                let pos = past + i;
                let query_seg = seg.map_or(0, |s| s[pos]);
                let q_at = ((b * n.h + h) * n.s + i) * n.d;
                let o_at = ((b * n.s + i) * n.h + h) * n.d;
                let qi = &q[q_at..q_at + n.d];
                let doi = &dout[o_at..o_at + n.d];
                let delta = dot(doi, &out[o_at..o_at + n.d]);
                let l = lse[(b * n.h + h) * n.s + i];
                for j in (0..n.t).filter(|&j| visible(j, pos, window, seg, query_seg)) {
                    let kj = &k[kv_base + j * n.d..][..n.d];
                    let vj = &v[kv_base + j * n.d..][..n.d];
                    let p = (dot(qi, kj) * scale - l).exp();
                    let ds = p * (dot(doi, vj) - delta) * scale;
                    for c in 0..n.d {
                        dv[kv_base + j * n.d + c] += p * doi[c];
                        dk[kv_base + j * n.d + c] += ds * qi[c];
                        dq[q_at + c] += ds * kj[c];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

struct FlashAttention {
    mask: AttentionMask,
}

fn dims_of(q: &Shape, k: &Shape) -> Result<Dims> {
    let (b, h, s, d) = q.dims4()?;
    let (kb, kvh, t, kd) = k.dims4()?;
    if kb != b || kd != d || t < s || kvh == 0 || h % kvh != 0 {
        candle_core::bail!("flash attention: q {q:?} and k {k:?} do not fit together");
    }
    Ok(Dims { b, h, kvh, s, t, d })
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// Elements of T that hold the f32 logsumexp behind the output in the packed forward result.
fn lse_slots(n: &Dims, dtype: DType) -> usize {
    n.b * n.h * n.s * 4 / dtype.size_in_bytes()
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "philo-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention's custom op runs on CUDA; on the CPU flash_attention() calls the reference")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = dims_of(ql.shape(), kl.shape())?;
        let storage = cuda::forward(qs, ql, ks, kl, vs, vl, &self.mask, n)?;
        let total = n.b * n.s * n.h * n.d + lse_slots(&n, qs_dtype(qs));
        Ok((storage, Shape::from(total)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = backward(q, k, v, &self.mask, res, grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(feature = "cuda")]
fn qs_dtype(s: &candle_core::CudaStorage) -> DType {
    use candle_core::backend::BackendStorage;
    s.dtype()
}

/// Attention output `[B, S, H, D]` of q `[B, H, S, D]`, k/v `[B, KVH, T, D]` (views with a
/// contiguous last dim are fine). On CUDA (bf16 or f16) differentiable in q, k and v; on the CPU
/// the f32 reference, forward only.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    let n = dims_of(q.shape(), k.shape())?;
    if !q.device().is_cuda() {
        // The reference, forward only: the CPU model trains through composed attention.
        let segments = match &mask.segments {
            Some(s) => Some(s.flatten_all()?.to_vec1::<u32>()?),
            None => None,
        };
        let (out, _) = reference(
            &host_f32(q)?,
            &host_f32(k)?,
            &host_f32(v)?,
            segments.as_deref(),
            mask.window,
            n,
        );
        return crate::from_host(out, &[n.b, n.s, n.h, n.d], q.dtype(), q.device());
    }
    let packed = q.apply_op3_arc(
        k,
        v,
        std::sync::Arc::new(Box::new(FlashAttention { mask: mask.clone() })),
    )?;
    packed
        .narrow(0, 0, n.b * n.s * n.h * n.d)?
        .reshape((n.b, n.s, n.h, n.d))
}

/// Gradients of q, k, v from the packed forward result `res` and its gradient `grad`.
fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    res: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let n = dims_of(q.shape(), k.shape())?;
        return cuda::backward(q, k, v, mask, res, grad, n);
    }
    let _ = (q, k, v, mask, res, grad);
    candle_core::bail!("flash attention runs on CUDA")
}

/// Runs the reference on tensors (any device/dtype; computed in f32 on the host).
pub fn reference_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = dims_of(q.shape(), k.shape())?;
    let seg = match &mask.segments {
        Some(s) => Some(s.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?),
        None => None,
    };
    Ok(reference(
        &host_f32(q)?,
        &host_f32(k)?,
        &host_f32(v)?,
        seg.as_deref(),
        mask.window,
        n,
    ))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::launch::*;
    use candle_core::backend::BackendStorage;

    fn strides(l: &Layout, what: &str) -> Result<[i64; 3]> {
        let st = l.stride();
        if st[3] != 1
            || st[..3].iter().any(|s| !s.is_multiple_of(8))
            || !l.start_offset().is_multiple_of(8)
        {
            candle_core::bail!("flash attention: {what} needs a contiguous last dim and 16-byte aligned rows (strides {st:?})");
        }
        Ok([st[0] as i64, st[1] as i64, st[2] as i64])
    }

    fn check(d: usize, dtype: DType) -> Result<()> {
        if ![16, 32, 64, 96, 128].contains(&d) {
            candle_core::bail!("flash attention supports head_dim 16, 32, 64, 96 or 128, not {d}");
        }
        if !matches!(dtype, DType::BF16 | DType::F16) {
            candle_core::bail!("flash attention takes bf16 or f16, not {dtype:?}");
        }
        Ok(())
    }

    /// Segment ids as a contiguous u32 device tensor (the kernel reads them as int32).
    fn segments(mask: &AttentionMask) -> Result<Option<Tensor>> {
        mask.segments
            .as_ref()
            .map(|s| s.to_dtype(DType::U32)?.contiguous())
            .transpose()
    }

    fn window(mask: &AttentionMask) -> i32 {
        mask.window.min(i32::MAX as usize) as i32
    }

    /// Device address of a tensor's first element (single stream: no event bookkeeping needed).
    fn address(t: &Tensor) -> Result<u64> {
        let (s, l) = t.storage_and_layout();
        let s = cuda(&s)?;
        let stream = s.device().cuda_stream();
        with_float_or_int!(s.dtype(), T, {
            let view = from_offset::<T>(s, l)?;
            let (ptr, _sync) = view.device_ptr(&stream);
            Ok(ptr)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
        mask: &AttentionMask,
        n: Dims,
    ) -> Result<candle_core::CudaStorage> {
        let dtype = qs.dtype();
        check(n.d, dtype)?;
        let dev = qs.device().clone();
        let stream = dev.cuda_stream();
        let [q_b, q_h, q_s] = strides(ql, "q")?;
        let [k_b, k_h, k_t] = strides(kl, "k")?;
        if strides(vl, "v")? != [k_b, k_h, k_t] {
            candle_core::bail!("flash attention: k and v must share strides");
        }
        let seg = segments(mask)?;
        let seg_ptr = seg.as_ref().map(address).transpose()?.unwrap_or(0);
        let out_len = n.b * n.s * n.h * n.d;
        let f = function(
            &dev,
            &FLASH_ATTENTION,
            &format!("flash_forward_{}_d{}", suffix(dtype)?, n.d),
        )?;
        let (scale, win) = (1.0 / (n.d as f32).sqrt(), window(mask));
        let [b, h, kvh, s, t] = [n.b, n.h, n.kvh, n.s, n.t].map(|v| v as i32);
        let cfg = LaunchConfig {
            grid_dim: (n.s.div_ceil(64) as u32, (n.b * n.h) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        with_float_type!(dtype, T, {
            let (qv, kv, vv) = (
                from_offset::<T>(qs, ql)?,
                from_offset::<T>(ks, kl)?,
                from_offset::<T>(vs, vl)?,
            );
            let (q, _q) = qv.device_ptr(&stream);
            let (k, _k) = kv.device_ptr(&stream);
            let (v, _v) = vv.device_ptr(&stream);
            let packed = unsafe { dev.alloc::<T>(out_len + lse_slots(&n, dtype))? };
            let (out, _out) = packed.device_ptr(&stream);
            // The logsumexp rows sit behind the output, as f32.
            let lse = out + (out_len * dtype.size_in_bytes()) as u64;
            let mut l = stream.launch_builder(&f);
            l.arg(&q).arg(&k).arg(&v).arg(&seg_ptr).arg(&out).arg(&lse);
            l.arg(&b).arg(&h).arg(&kvh).arg(&s).arg(&t);
            l.arg(&q_b)
                .arg(&q_h)
                .arg(&q_s)
                .arg(&k_b)
                .arg(&k_h)
                .arg(&k_t);
            l.arg(&win).arg(&scale);
            unsafe { l.launch(cfg) }.w()?;
            drop(_out);
            Ok(candle_core::CudaStorage::wrap_cuda_slice(
                packed,
                dev.clone(),
            ))
        })
    }

    pub(super) fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
        res: &Tensor,
        grad: &Tensor,
        n: Dims,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dtype = q.dtype();
        check(n.d, dtype)?;
        let dev = device(q)?;
        let stream = dev.cuda_stream();
        let [q_b, q_h, q_s] = strides(q.layout(), "q")?;
        let (k, v) = if strides(k.layout(), "k")? != strides(v.layout(), "v")? {
            (k.contiguous()?, v.contiguous()?)
        } else {
            (k.clone(), v.clone())
        };
        let [k_b, k_h, k_t] = strides(k.layout(), "k")?;
        let out_len = n.b * n.s * n.h * n.d;
        let res = res.contiguous()?;
        let grad = grad.narrow(0, 0, out_len)?.contiguous()?;
        let seg = segments(mask)?;
        let seg_ptr = seg.as_ref().map(address).transpose()?.unwrap_or(0);
        let rows = n.b * n.s * n.h;
        let delta = Tensor::zeros(n.b * n.h * n.s, DType::F32, q.device())?;
        let dq = Tensor::zeros((n.b, n.h, n.s, n.d), DType::F32, q.device())?;
        let dk = Tensor::zeros((n.b, n.h, n.t, n.d), DType::F32, q.device())?;
        let dv = Tensor::zeros((n.b, n.h, n.t, n.d), DType::F32, q.device())?;
        let out = address(&res)?;
        let lse = out + (out_len * dtype.size_in_bytes()) as u64;
        let dout = address(&grad)?;
        let (delta_p, dq_p, dk_p, dv_p) = (
            address(&delta)?,
            address(&dq)?,
            address(&dk)?,
            address(&dv)?,
        );
        let [b, h, kvh, s, t] = [n.b, n.h, n.kvh, n.s, n.t].map(|v| v as i32);
        let d = n.d as i32;
        let sfx = suffix(dtype)?;
        {
            let f = function(&dev, &FLASH_ATTENTION, &format!("flash_delta_{sfx}"))?;
            let mut l = stream.launch_builder(&f);
            l.arg(&out)
                .arg(&dout)
                .arg(&delta_p)
                .arg(&b)
                .arg(&h)
                .arg(&s)
                .arg(&d);
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.w()?;
        }
        {
            let f = function(
                &dev,
                &FLASH_ATTENTION,
                &format!("flash_backward_{sfx}_d{}", n.d),
            )?;
            let (qp, kp, vp) = (address(q)?, address(&k)?, address(&v)?);
            let (scale, win) = (1.0 / (n.d as f32).sqrt(), window(mask));
            let mut l = stream.launch_builder(&f);
            l.arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&seg_ptr)
                .arg(&dout)
                .arg(&lse)
                .arg(&delta_p);
            l.arg(&dq_p).arg(&dk_p).arg(&dv_p);
            l.arg(&b).arg(&h).arg(&kvh).arg(&s).arg(&t);
            l.arg(&q_b)
                .arg(&q_h)
                .arg(&q_s)
                .arg(&k_b)
                .arg(&k_h)
                .arg(&k_t);
            l.arg(&win).arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (n.t.div_ceil(64) as u32, (n.b * n.h) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.w()?;
        }
        // Per-query-head dK/dV sum over the heads that share a KV head.
        let group = |x: Tensor| -> Result<Tensor> {
            let x = if n.kvh == n.h {
                x
            } else {
                x.reshape((n.b, n.kvh, n.h / n.kvh, n.t, n.d))?.sum(2)?
            };
            x.to_dtype(dtype)
        };
        Ok((dq.to_dtype(dtype)?, group(dk)?, group(dv)?))
    }
}
