//! Flash attention: causal, sliding window, padding and packed segments, GQA, forward and
//! backward, without materialising the `[seq, seq]` score matrix.
//!
//! Shapes: q `[B, H, S, D]`, k and v `[B, KVH, T, D]` (the last S key positions are the
//! queries'; T − S earlier ones come from a KV cache), output `[B, S, H, D]` (what o_proj reads
//! as `[B, S, H·D]`). Key j is visible to the query at position i when j ≤ i, i − j < window,
//! and — with `segments` `[B, T]` — both have the same non-zero segment id. A query that sees no
//! key gets zeros. The scale is 1/sqrt(D).

use candle_core::{DType, Result, Shape, Tensor};

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

fn dims_of(q: &Shape, k: &Shape) -> Result<Dims> {
    let (b, h, s, d) = q.dims4()?;
    let (kb, kvh, t, kd) = k.dims4()?;
    if kb != b || kd != d || t < s || kvh == 0 || h % kvh != 0 {
        candle_core::bail!("flash attention: q {q:?} and k {k:?} do not fit together");
    }
    Ok(Dims { b, h, kvh, s, t, d })
}

/// Segment ids of `mask` on the host, for the references.
fn host_segments(mask: &AttentionMask) -> Result<Option<Vec<u32>>> {
    mask.segments
        .as_ref()
        .map(|s| s.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>())
        .transpose()
}

/// Attention output `[B, S, H, D]` and its logsumexp `[B, H, S]` (f32, what the backward needs)
/// of q `[B, H, S, D]`, k/v `[B, KVH, T, D]` (views with a contiguous last dim are fine). On
/// CUDA (bf16 or f16) the tensor-core kernel; elsewhere the f32 reference.
pub fn flash_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
) -> Result<(Tensor, Tensor)> {
    let n = dims_of(q.shape(), k.shape())?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::forward(q, k, v, mask, n);
    }
    let segments = host_segments(mask)?;
    let (out, lse) = reference(
        &host_f32(q)?,
        &host_f32(k)?,
        &host_f32(v)?,
        segments.as_deref(),
        mask.window,
        n,
    );
    Ok((
        crate::from_host(out, &[n.b, n.s, n.h, n.d], q.dtype(), q.device())?,
        crate::from_host(lse, &[n.b, n.h, n.s], DType::F32, q.device())?,
    ))
}

/// The attention output alone (inference).
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    Ok(flash_forward(q, k, v, mask)?.0)
}

/// Gradients (dq `[B, H, S, D]`, dk and dv `[B, KVH, T, D]`, in q's dtype) from `dout`
/// `[B, S, H, D]`, given the forward's `out` and `lse`. On CUDA the tensor-core kernel;
/// elsewhere the f32 reference (which recomputes `out` and `lse` itself).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    mask: &AttentionMask,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = dims_of(q.shape(), k.shape())?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::backward(q, k, v, out, lse, dout, mask, n);
    }
    let _ = (out, lse);
    let segments = host_segments(mask)?;
    let (dq, dk, dv) = reference_backward(
        &host_f32(q)?,
        &host_f32(k)?,
        &host_f32(v)?,
        segments.as_deref(),
        mask.window,
        n,
        &host_f32(dout)?,
    );
    let (dtype, device) = (q.dtype(), q.device());
    Ok((
        crate::from_host(dq, &[n.b, n.h, n.s, n.d], dtype, device)?,
        crate::from_host(dk, &[n.b, n.kvh, n.t, n.d], dtype, device)?,
        crate::from_host(dv, &[n.b, n.kvh, n.t, n.d], dtype, device)?,
    ))
}

/// The gradient of a fused QKV projection from flash attention's backward: `heads`
/// `[b, h + 2·kvh, s, d]` holds the rotated q and k and the v that the forward read (queries at
/// every key position: no KV cache), and `rope` (cos, sin `[b, s, rotary_dim / 2]`, rotary_dim)
/// the rotation to invert. Returns d(qkv) `[b, s, (h + 2·kvh)·d]`: what [`flash_backward`]
/// followed by `rope::backward` gives, in one pass over the kernel's f32 results.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward_qkv(
    heads: &Tensor,
    kv_heads: usize,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    mask: &AttentionMask,
    rope: Option<(&Tensor, &Tensor, usize)>,
) -> Result<Tensor> {
    let (b, all, s, d) = heads.dims4()?;
    let h = all - 2 * kv_heads;
    let (q, k, v) = (
        heads.narrow(1, 0, h)?,
        heads.narrow(1, h, kv_heads)?,
        heads.narrow(1, h + kv_heads, kv_heads)?,
    );
    #[cfg(feature = "cuda")]
    if heads.device().is_cuda() {
        let n = dims_of(q.shape(), k.shape())?;
        return cuda::backward_qkv(&q, &k, &v, out, lse, dout, mask, rope, n);
    }
    let (dq, dk, dv) = flash_backward(&q, &k, &v, out, lse, dout, mask)?;
    let d_heads = Tensor::cat(&[dq, dk, dv], 1)?;
    match rope {
        Some((cos, sin, rotary_dim)) => {
            let shape = crate::rope::QkvShape {
                heads: h,
                kv_heads,
                head_dim: d,
                rotary_dim,
            };
            crate::rope::backward(&d_heads, cos, sin, shape)
        }
        None => d_heads.transpose(1, 2)?.reshape((b, s, all * d)),
    }
}

/// Runs the reference on tensors (any device/dtype; computed in f32 on the host).
pub fn reference_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = dims_of(q.shape(), k.shape())?;
    let seg = host_segments(mask)?;
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
    use candle_core::Layout;

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

    /// Bytes of dynamic shared memory of the forward kernel (K and V tiles of 64 rows, two
    /// stages, padded rows of d + 8 two-byte elements, and the key tiles' segment ids).
    fn forward_smem(d: usize) -> usize {
        2 * 2 * 64 * (d + 8) * 2 + 2 * 64 * 4
    }

    /// Query rows of one forward block: 4 warps of two 16-row tiles up to head dim 96, one
    /// above (`forward_row_tiles` in the kernel).
    fn forward_rows_per_block(d: usize) -> usize {
        if d <= 96 {
            128
        } else {
            64
        }
    }

    /// Whether head dim `d` runs on the Hopper wgmma kernels (`flash_attention_sm90.cu`: head
    /// dims 64 and 96, on a compute-capability-9.0 GPU of a build for it) rather than the
    /// mma.sync ones.
    fn wgmma_kernels(dev: &candle_core::CudaDevice, d: usize) -> Result<bool> {
        Ok(matches!(d, 64 | 96) && hopper_kernels(dev)?)
    }

    /// The Hopper forward (`flash_attention_sm90.cu`): query rows per block (three warp groups
    /// of 64), threads, and bytes of dynamic shared memory (the Q tile, K and V tiles of 128
    /// rows two stages deep, their segment ids and mbarriers, 1024 for alignment).
    const WG_FORWARD_ROWS: usize = 192;
    const WG_FORWARD_THREADS: u32 = 384;
    fn wg_forward_smem(d: usize) -> usize {
        (WG_FORWARD_ROWS + 2 * 2 * 128) * d * 2 + 2 * (128 * 4 + 16) + 1024
    }

    /// The Hopper backward's bytes of dynamic shared memory (`flash_attention_sm90.cu`: K and V
    /// of 128 keys, Q and dO tiles of 64 rows two stages deep, two dSᵀ buffers of 128 × 64,
    /// per-query logsumexp, delta and segment per stage, mbarriers, 1024 for alignment; at least
    /// the f32 staging of dK/dV).
    fn wg_backward_smem(d: usize) -> usize {
        let tiles =
            (2 * 128 * d + 2 * 2 * 64 * d + 2 * 128 * 64) * 2 + 2 * (3 * 64 * 4 + 16) + 1024;
        tiles.max(128 * (d + 4) * 4 + 1024)
    }

    /// Bytes of dynamic shared memory of the backward kernel (Q and dO tiles of 32 rows, two
    /// stages; the block's 128 keys; dS; per-query logsumexp, delta and segment, two stages).
    fn backward_smem(d: usize) -> usize {
        (2 * 2 * 32 * (d + 8) + 128 * (d + 8) + 32 * 136) * 2 + 2 * 3 * 32 * 4
    }

    fn window(mask: &AttentionMask) -> i32 {
        mask.window.min(i32::MAX as usize) as i32
    }

    pub(super) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
        n: Dims,
    ) -> Result<(Tensor, Tensor)> {
        let dtype = q.dtype();
        check(n.d, dtype)?;
        let dev = device(q)?;
        let stream = dev.cuda_stream();
        let [q_b, q_h, q_s] = strides(q.layout(), "q")?;
        let (k, v) = shared_strides(k, v)?;
        let [k_b, k_h, k_t] = strides(k.layout(), "k")?;
        let seg = segments(mask)?;
        let seg_ptr = seg.as_ref().map(address).transpose()?.unwrap_or(0);
        let out = unsafe { Tensor::empty((n.b, n.s, n.h, n.d), dtype, q.device())? };
        let lse = unsafe { Tensor::empty((n.b, n.h, n.s), DType::F32, q.device())? };
        let sfx = suffix(dtype)?;
        // Hopper: the wgmma kernel (about twice as fast at Phi-3's head dim 96).
        let (f, rows, threads, smem) = if wgmma_kernels(&dev, n.d)? {
            let f = function(
                &dev,
                &FLASH_ATTENTION_SM90,
                &format!("flash_forward_wg_{sfx}_d{}", n.d),
            )?;
            let smem = wg_forward_smem(n.d);
            (f, WG_FORWARD_ROWS, WG_FORWARD_THREADS, smem)
        } else {
            let f = function(
                &dev,
                &FLASH_ATTENTION,
                &format!("flash_forward_{sfx}_d{}", n.d),
            )?;
            (f, forward_rows_per_block(n.d), 128, forward_smem(n.d))
        };
        let (scale, win) = (1.0 / (n.d as f32).sqrt(), window(mask));
        let [b, h, kvh, s, t] = [n.b, n.h, n.kvh, n.s, n.t].map(|v| v as i32);
        let cfg = LaunchConfig {
            grid_dim: (n.s.div_ceil(rows) as u32, (n.b * n.h) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: dynamic_smem(&f, smem)?,
        };
        let [qp, kp, vp, out_p, lse_p] = [q, &k, &v, &out, &lse].map(address);
        let (qp, kp, vp, out_p, lse_p) = (qp?, kp?, vp?, out_p?, lse_p?);
        let mut l = stream.launch_builder(&f);
        l.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&seg_ptr)
            .arg(&out_p)
            .arg(&lse_p);
        l.arg(&b).arg(&h).arg(&kvh).arg(&s).arg(&t);
        l.arg(&q_b)
            .arg(&q_h)
            .arg(&q_s)
            .arg(&k_b)
            .arg(&k_h)
            .arg(&k_t);
        l.arg(&win).arg(&scale);
        unsafe { l.launch(cfg) }.w()?;
        Ok((out, lse))
    }

    /// k and v with the same strides (the kernels take one set for both).
    fn shared_strides(k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if strides(k.layout(), "k")? != strides(v.layout(), "v")? {
            Ok((k.contiguous()?, v.contiguous()?))
        } else {
            Ok((k.clone(), v.clone()))
        }
    }

    /// Where the backward kernel puts dK and dV: f32 per query head, or (one query head per KV
    /// head, queries at every key position) straight into the fused QKV projection's gradient.
    enum KvGradients<'a> {
        PerQueryHead,
        IntoQkvGrad {
            grad: &'a Tensor,
            cos: u64,
            sin: u64,
            rotary_dim: usize,
        },
    }

    /// The kernels' dk and dv pointers: the per-query-head buffers, or null when the kernel
    /// wrote dK/dV into the QKV gradient.
    fn per_head_addresses(per_head: &Option<(Tensor, Tensor)>) -> Result<(u64, u64)> {
        Ok(match per_head {
            Some((dk, dv)) => (address(dk)?, address(dv)?),
            None => (0, 0),
        })
    }

    /// The backward kernels: dq `[B, H, S, D]` f32 and, per `kv`, dk and dv per query head
    /// `[B, H, T, D]` f32 (or None when they went into the QKV gradient).
    #[allow(clippy::too_many_arguments)]
    fn backward_f32(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        mask: &AttentionMask,
        n: Dims,
        kv: KvGradients,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let dtype = q.dtype();
        check(n.d, dtype)?;
        let dev = device(q)?;
        let stream = dev.cuda_stream();
        let [q_b, q_h, q_s] = strides(q.layout(), "q")?;
        let (k, v) = shared_strides(k, v)?;
        let [k_b, k_h, k_t] = strides(k.layout(), "k")?;
        let out = out.contiguous()?;
        let lse = lse.contiguous()?;
        let grad = dout.contiguous()?;
        for (t, what) in [(&out, "out"), (&grad, "dout")] {
            if !t.layout().start_offset().is_multiple_of(8) {
                candle_core::bail!("flash attention backward: {what} must start 16-byte aligned");
            }
        }
        let seg = segments(mask)?;
        let seg_ptr = seg.as_ref().map(address).transpose()?.unwrap_or(0);
        let rows = n.b * n.s * n.h;
        let delta = unsafe { Tensor::empty(n.b * n.h * n.s, DType::F32, q.device())? };
        // dQ is summed by atomics into rows that the delta kernel zeroes.
        let dq = unsafe { Tensor::empty((n.b, n.h, n.s, n.d), DType::F32, q.device())? };
        let per_head = match kv {
            KvGradients::PerQueryHead => Some((
                unsafe { Tensor::empty((n.b, n.h, n.t, n.d), DType::F32, q.device())? },
                unsafe { Tensor::empty((n.b, n.h, n.t, n.d), DType::F32, q.device())? },
            )),
            KvGradients::IntoQkvGrad { .. } => None,
        };
        let (out, lse, dout) = (address(&out)?, address(&lse)?, address(&grad)?);
        let (delta_p, dq_p) = (address(&delta)?, address(&dq)?);
        let (dk_p, dv_p) = per_head_addresses(&per_head)?;
        let (dkv_p, cos_p, sin_p, rd) = match kv {
            KvGradients::PerQueryHead => (0, 0, 0, 0),
            KvGradients::IntoQkvGrad {
                grad,
                cos,
                sin,
                rotary_dim,
            } => (address(grad)?, cos, sin, rotary_dim as i32),
        };
        let [b, h, kvh, s, t] = [n.b, n.h, n.kvh, n.s, n.t].map(|v| v as i32);
        let d = n.d as i32;
        let sfx = suffix(dtype)?;
        {
            let f = function(&dev, &FLASH_ATTENTION, &format!("flash_delta_{sfx}"))?;
            let mut l = stream.launch_builder(&f);
            l.arg(&out)
                .arg(&dout)
                .arg(&delta_p)
                .arg(&dq_p)
                .arg(&b)
                .arg(&h)
                .arg(&s)
                .arg(&d);
            // 16 lanes per row, 16 rows a block.
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(16) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.w()?;
        }
        {
            // Hopper: the wgmma kernel. Both take 256 threads and 128 keys a block.
            let (f, smem) = if wgmma_kernels(&dev, n.d)? {
                let f = function(
                    &dev,
                    &FLASH_ATTENTION_SM90,
                    &format!("flash_backward_wg_{sfx}_d{}", n.d),
                )?;
                (f, wg_backward_smem(n.d))
            } else {
                let f = function(
                    &dev,
                    &FLASH_ATTENTION,
                    &format!("flash_backward_{sfx}_d{}", n.d),
                )?;
                (f, backward_smem(n.d))
            };
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
            l.arg(&dkv_p).arg(&cos_p).arg(&sin_p).arg(&rd);
            l.arg(&b).arg(&h).arg(&kvh).arg(&s).arg(&t);
            l.arg(&q_b)
                .arg(&q_h)
                .arg(&q_s)
                .arg(&k_b)
                .arg(&k_h)
                .arg(&k_t);
            l.arg(&win).arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (n.t.div_ceil(128) as u32, (n.b * n.h) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: dynamic_smem(&f, smem)?,
            };
            unsafe { l.launch(cfg) }.w()?;
        }
        Ok((dq, per_head))
    }

    /// dq, dk, dv in q's dtype from the f32 per-query-head results of [`backward_f32`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        mask: &AttentionMask,
        n: Dims,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dq, per_head) =
            backward_f32(q, k, v, out, lse, dout, mask, n, KvGradients::PerQueryHead)?;
        let (dk, dv) = per_head.ok_or_else(|| candle_core::Error::Msg("no dK/dV".into()))?;
        // Per-query-head dK/dV sum over the heads that share a KV head.
        let group = |x: Tensor| -> Result<Tensor> {
            let x = if n.kvh == n.h {
                x
            } else {
                x.reshape((n.b, n.kvh, n.h / n.kvh, n.t, n.d))?.sum(2)?
            };
            x.to_dtype(q.dtype())
        };
        Ok((dq.to_dtype(q.dtype())?, group(dk)?, group(dv)?))
    }

    /// The gradient of the fused QKV projection `[b, s, (h + 2·kvh)·d]` in one pass over the f32
    /// results: GQA groups summed, RoPE's rotation inverted on q and k (when `rope` is given).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_qkv(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        mask: &AttentionMask,
        rope: Option<(&Tensor, &Tensor, usize)>,
        n: Dims,
    ) -> Result<Tensor> {
        let dev = device(q)?;
        let heads = n.h + 2 * n.kvh;
        let grad = unsafe { Tensor::empty((n.b, n.s, heads * n.d), q.dtype(), q.device())? };
        let (cos, sin, rd) = match rope {
            Some((cos, sin, rd)) => (
                Some(cos.to_dtype(q.dtype())?.contiguous()?),
                Some(sin.to_dtype(q.dtype())?.contiguous()?),
                rd,
            ),
            None => (None, None, 0),
        };
        let cos_p = cos.as_ref().map(address).transpose()?.unwrap_or(0);
        let sin_p = sin.as_ref().map(address).transpose()?.unwrap_or(0);
        // Without grouped queries the kernel writes dK and dV into the gradient itself; the
        // pass below then writes only the q heads.
        let direct = n.kvh == n.h && n.s == n.t;
        let kv = if direct {
            KvGradients::IntoQkvGrad {
                grad: &grad,
                cos: cos_p,
                sin: sin_p,
                rotary_dim: rd,
            }
        } else {
            KvGradients::PerQueryHead
        };
        let (dq, per_head) = backward_f32(q, k, v, out, lse, dout, mask, n, kv)?;
        let f = typed_function(&dev, &FLASH_ATTENTION, "flash_qkv_grad", q.dtype())?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        let [dq_p, grad_p] = [&dq, &grad].map(address);
        let (dq_p, grad_p) = (dq_p?, grad_p?);
        let (dk_p, dv_p) = per_head_addresses(&per_head)?;
        l.arg(&dq_p)
            .arg(&dk_p)
            .arg(&dv_p)
            .arg(&cos_p)
            .arg(&sin_p)
            .arg(&grad_p);
        let heads_out = if direct { n.h } else { heads };
        let dims = [n.s, n.h, n.kvh, n.d, rd, heads_out].map(|v| v as i32);
        for a in &dims {
            l.arg(a);
        }
        unsafe { l.launch(block_per_row(n.b * n.s)) }.w()?;
        Ok(grad)
    }
}
