//! Fused QKV split + rotary embedding: `qkv [b, s, (h + 2·kvh)·d]` → `heads [b, h + 2·kvh, s, d]`
//! with the q and k heads rotated (rotate-half layout; dims past `rotary_dim` pass through) and
//! the v heads copied. cos/sin are `[b, s, rotary_dim / 2]`, so LongRoPE and per-row positions
//! are whatever the caller computed them for.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::{from_host, host_f32};

/// Head layout of a fused QKV projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
}

impl QkvShape {
    fn all_heads(&self) -> usize {
        self.heads + 2 * self.kv_heads
    }
}

/// Reference forward on row-major f32 data (`b`, `s` given).
pub fn reference(
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    b: usize,
    s: usize,
    shape: QkvShape,
) -> Vec<f32> {
    let (n, d, rd) = (shape.all_heads(), shape.head_dim, shape.rotary_dim);
    let half = rd / 2;
    let mut out = vec![0f32; b * n * s * d];
    for bi in 0..b {
        for si in 0..s {
            let row = bi * s + si;
            for head in 0..n {
                let src = &qkv[(row * n + head) * d..(row * n + head + 1) * d];
                let dst = ((bi * n + head) * s + si) * d;
                for j in 0..d {
                    out[dst + j] = if head >= shape.heads + shape.kv_heads || j >= rd {
                        src[j]
                    } else {
                        let i = j % half;
                        let (c, sn) = (cos[row * half + i], sin[row * half + i]);
                        let rotated = if j < half {
                            -src[j + half]
                        } else {
                            src[j - half]
                        };
                        src[j] * c + rotated * sn
                    };
                }
            }
        }
    }
    out
}

/// Reference backward: the gradient of `qkv` given that of `heads`.
pub fn reference_backward(
    grad: &[f32],
    cos: &[f32],
    sin: &[f32],
    b: usize,
    s: usize,
    shape: QkvShape,
) -> Vec<f32> {
    let (n, d, rd) = (shape.all_heads(), shape.head_dim, shape.rotary_dim);
    let half = rd / 2;
    let mut out = vec![0f32; b * s * n * d];
    for bi in 0..b {
        for si in 0..s {
            let row = bi * s + si;
            for head in 0..n {
                let g = &grad[((bi * n + head) * s + si) * d..][..d];
                let dst = &mut out[(row * n + head) * d..][..d];
                for j in 0..d {
                    dst[j] = if head >= shape.heads + shape.kv_heads || j >= rd {
                        g[j]
                    } else {
                        let i = j % half;
                        let (c, sn) = (cos[row * half + i], sin[row * half + i]);
                        if j < half {
                            g[j] * c + g[j + half] * sn
                        } else {
                            g[j] * c - g[j - half] * sn
                        }
                    };
                }
            }
        }
    }
    out
}

struct QkvRope {
    shape: QkvShape,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl QkvRope {
    fn dims(&self, qkv: &Shape) -> Result<(usize, usize)> {
        let (b, s, width) = qkv.dims3()?;
        let expected = self.shape.all_heads() * self.shape.head_dim;
        if width != expected {
            candle_core::bail!("qkv_rope: last dim {width}, expected {expected}");
        }
        Ok((b, s))
    }
}

impl CustomOp3 for QkvRope {
    fn name(&self) -> &'static str {
        "philo-qkv-rope"
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
        candle_core::bail!("philo-qkv-rope: CPU tensors go through qkv_rope's reference path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::launch::*;
        use candle_core::backend::BackendStorage;
        let (b, s) = self.dims(ql.shape())?;
        let sh = self.shape;
        let out_shape = Shape::from((b, sh.all_heads(), s, sh.head_dim));
        let dev = qs.device().clone();
        let slice = with_float_type!(qs.dtype(), T, {
            let qkv = contiguous::<T>(qs, ql)?;
            let cos = contiguous::<T>(cs, cl)?;
            let sin = contiguous::<T>(ss, sl)?;
            let n = out_shape.elem_count();
            let out = unsafe { dev.alloc::<T>(n)? };
            let f = typed_function(&dev, &ROPE, "qkv_rope", qs.dtype())?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            let args = [
                s,
                sh.all_heads(),
                sh.heads + sh.kv_heads,
                sh.head_dim,
                sh.rotary_dim,
            ]
            .map(|v| v as i32);
            l.arg(&qkv).arg(&cos).arg(&sin).arg(&out);
            for a in &args {
                l.arg(a);
            }
            unsafe { l.launch(block_per_row(b * s)) }.w()?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, out_shape))
    }
}

/// Splits and rotates `qkv` (see the module docs). On CUDA one kernel; on the CPU the
/// reference. [`backward`] is its gradient.
pub fn qkv_rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, shape: QkvShape) -> Result<Tensor> {
    let (b, s, _) = qkv.dims3()?;
    if qkv.device().is_cuda() {
        let (cos, sin) = (cos.to_dtype(qkv.dtype())?, sin.to_dtype(qkv.dtype())?);
        return qkv.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            QkvRope { shape },
        );
    }
    let out = reference(
        &host_f32(qkv)?,
        &host_f32(cos)?,
        &host_f32(sin)?,
        b,
        s,
        shape,
    );
    from_host(
        out,
        &[b, shape.all_heads(), s, shape.head_dim],
        qkv.dtype(),
        qkv.device(),
    )
}

/// The gradient of `qkv` `[b, s, (h + 2·kvh)·d]` from that of the heads `[b, h + 2·kvh, s, d]`.
pub fn backward(grad: &Tensor, cos: &Tensor, sin: &Tensor, shape: QkvShape) -> Result<Tensor> {
    let (b, n, s, d) = grad.dims4()?;
    #[cfg(feature = "cuda")]
    if grad.device().is_cuda() {
        use crate::launch::*;
        let dev = device(grad)?;
        let grad = grad.contiguous()?;
        let cos = cos.to_dtype(grad.dtype())?.contiguous()?;
        let sin = sin.to_dtype(grad.dtype())?.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        return with_float_type!(grad.dtype(), T, {
            let g = contiguous::<T>(cuda(&gs)?, gl)?;
            let c = contiguous::<T>(cuda(&cs)?, cl)?;
            let sn = contiguous::<T>(cuda(&ss)?, sl)?;
            let total = b * n * s * d;
            let out = unsafe { dev.alloc::<T>(total)? };
            let f = typed_function(&dev, &ROPE, "qkv_rope_backward", grad.dtype())?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            let args = [s, n, shape.heads + shape.kv_heads, d, shape.rotary_dim].map(|v| v as i32);
            l.arg(&g).arg(&c).arg(&sn).arg(&out);
            for a in &args {
                l.arg(a);
            }
            unsafe { l.launch(block_per_row(b * s)) }.w()?;
            Ok(tensor(out, &dev, (b, s, n * d)))
        });
    }
    let out = reference_backward(
        &host_f32(grad)?,
        &host_f32(cos)?,
        &host_f32(sin)?,
        b,
        s,
        shape,
    );
    from_host(out, &[b, s, n * d], grad.dtype(), grad.device())
}
