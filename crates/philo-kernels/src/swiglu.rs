//! SwiGLU of a fused `gate_up` projection `[..., 2·i]` laid out [gate | up]: silu(gate)·up.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::{from_host, host_f32};

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Reference forward: rows of `2·i` values → rows of `i`.
pub fn reference(gate_up: &[f32], i: usize) -> Vec<f32> {
    gate_up
        .chunks(2 * i)
        .flat_map(|row| (0..i).map(move |c| silu(row[c]) * row[i + c]))
        .collect()
}

/// Reference backward: the gradient of `gate_up` from that of the output.
pub fn reference_backward(gate_up: &[f32], grad: &[f32], i: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len()];
    for ((row, g), o) in gate_up
        .chunks(2 * i)
        .zip(grad.chunks(i))
        .zip(out.chunks_mut(2 * i))
    {
        for c in 0..i {
            let (x, u) = (row[c], row[i + c]);
            let sig = 1.0 / (1.0 + (-x).exp());
            o[c] = g[c] * u * sig * (1.0 + x * (1.0 - sig));
            o[i + c] = g[c] * x * sig;
        }
    }
    out
}

/// The forward with `pad` columns after each output row (left unwritten).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct SwiGlu {
    pad: usize,
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "philo-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("philo-swiglu: CPU tensors go through swiglu's reference path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::launch::*;
        use candle_core::backend::BackendStorage;
        let mut dims = l.shape().dims().to_vec();
        let i = *dims.last().unwrap() / 2;
        let ld_out = i + self.pad;
        *dims.last_mut().unwrap() = ld_out;
        let rows = l.shape().elem_count() / (2 * i);
        let dev = s.device().clone();
        let slice = with_float_type!(s.dtype(), T, {
            let x = contiguous::<T>(s, l)?;
            let out = unsafe { dev.alloc::<T>(rows * ld_out)? };
            let f = typed_function(&dev, &SWIGLU, "swiglu", s.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (i32_, ld32) = (i as i32, ld_out as i32);
            b.arg(&x).arg(&out).arg(&i32_).arg(&ld32);
            unsafe { b.launch(block_per_row(rows)) }.w()?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, Shape::from(dims)))
    }
}

/// silu(gate)·up of `gate_up` `[..., 2·i]`. On CUDA one kernel; on the CPU the reference.
/// [`backward`] is its gradient.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    swiglu_padded(gate_up, 0)
}

/// [`swiglu`] written into rows of `i + pad` values `[..., i + pad]`: the last `pad` columns of
/// each row are free for the caller (on CUDA they are left unwritten; on the CPU they are 0),
/// e.g. for a LoRA down projection to sit beside its input ([x | down]).
pub fn swiglu_padded(gate_up: &Tensor, pad: usize) -> Result<Tensor> {
    if gate_up.device().is_cuda() {
        return gate_up.contiguous()?.apply_op1(SwiGlu { pad });
    }
    let mut dims = gate_up.dims().to_vec();
    let i = *dims.last().unwrap() / 2;
    *dims.last_mut().unwrap() = i;
    let out = from_host(
        reference(&host_f32(gate_up)?, i),
        &dims,
        gate_up.dtype(),
        gate_up.device(),
    )?;
    if pad == 0 {
        return Ok(out);
    }
    let rows = out.elem_count() / i.max(1);
    let padded = crate::pad_columns(out.reshape((rows, i))?, pad)?;
    *dims.last_mut().unwrap() = i + pad;
    padded.reshape(dims)
}

/// The gradient of `gate_up` given that of `swiglu(gate_up)`.
pub fn backward(gate_up: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let i = gate_up.dims().last().copied().unwrap_or(0) / 2;
    #[cfg(feature = "cuda")]
    if gate_up.device().is_cuda() {
        use crate::launch::*;
        let dev = device(gate_up)?;
        let (x, g) = (gate_up.contiguous()?, grad.contiguous()?);
        let rows = x.elem_count() / (2 * i);
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        return with_float_type!(x.dtype(), T, {
            let xv = contiguous::<T>(cuda(&xs)?, xl)?;
            let gv = contiguous::<T>(cuda(&gs)?, gl)?;
            let out = unsafe { dev.alloc::<T>(rows * 2 * i)? };
            let f = typed_function(&dev, &SWIGLU, "swiglu_backward", x.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let i32_ = i as i32;
            b.arg(&xv).arg(&gv).arg(&out).arg(&i32_);
            unsafe { b.launch(block_per_row(rows)) }.w()?;
            Ok(tensor(out, &dev, x.shape()))
        });
    }
    from_host(
        reference_backward(&host_f32(gate_up)?, &host_f32(grad)?, i),
        gate_up.dims(),
        gate_up.dtype(),
        gate_up.device(),
    )
}
