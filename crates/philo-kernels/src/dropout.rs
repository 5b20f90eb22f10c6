//! Inverted dropout with a mask that is a pure function of (seed, element index), so the
//! backward regenerates it instead of keeping a mask tensor alive.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::{from_host, host_f32};

/// The uniform number in [0, 1) of element `i` (splitmix64 of seed + i·golden ratio, top 24
/// bits), exactly as the kernel computes it.
pub fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Reference: x_i / (1 − p) where uniform(seed, i) ≥ p, else 0.
pub fn reference(x: &[f32], seed: u64, p: f32) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            if uniform(seed, i as u64) >= p {
                v * keep
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Dropout {
    seed: u64,
    p: f32,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "philo-dropout"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("philo-dropout: CPU tensors go through dropout's reference path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::launch::*;
        use candle_core::backend::BackendStorage;
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let slice = with_float_type!(s.dtype(), T, {
            let x = contiguous::<T>(s, l)?;
            let out = unsafe { dev.alloc::<T>(n)? };
            let f = typed_function(&dev, &DROPOUT, "dropout", s.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&out).arg(&n).arg(&self.seed).arg(&self.p);
            unsafe { b.launch(elementwise_config(n)) }.w()?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, l.shape().clone()))
    }
}

/// Inverted dropout of `x` with probability `p`, reproducible from `seed`. On CUDA one kernel;
/// on the CPU the reference. Its gradient is the same mask on the gradient: [`dropout_in_place`].
pub fn dropout(x: &Tensor, seed: u64, p: f32) -> Result<Tensor> {
    if x.device().is_cuda() {
        return x.contiguous()?.apply_op1(Dropout { seed, p });
    }
    from_host(
        reference(&host_f32(x)?, seed, p),
        x.dims(),
        x.dtype(),
        x.device(),
    )
}

/// [`dropout`] applied to `x` in place (a contiguous tensor): the backward's use, where the
/// gradient is masked where it lies instead of copied.
pub fn dropout_in_place(x: &Tensor, seed: u64, p: f32) -> Result<()> {
    if !x.is_contiguous() {
        candle_core::bail!("dropout_in_place: the tensor must be contiguous");
    }
    if x.device().is_cuda() {
        return x.inplace_op1(&DropoutInPlace { seed, p });
    }
    x.slice_set(&dropout(x, seed, p)?, 0, 0)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct DropoutInPlace {
    seed: u64,
    p: f32,
}

impl candle_core::InplaceOp1 for DropoutInPlace {
    fn name(&self) -> &'static str {
        "philo-dropout-in-place"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("philo-dropout-in-place: CPU tensors go through the reference path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use crate::launch::*;
        use candle_core::backend::BackendStorage;
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        with_float_type!(s.dtype(), T, {
            let x = contiguous::<T>(s, l)?;
            let f = typed_function(&dev, &DROPOUT, "dropout", s.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            // Element-wise: reading and writing the same element is safe.
            b.arg(&x).arg(&x).arg(&n).arg(&self.seed).arg(&self.p);
            unsafe { b.launch(elementwise_config(n)) }.w()?;
        });
        Ok(())
    }
}
