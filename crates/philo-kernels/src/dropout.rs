//! Inverted dropout with a mask that is a pure function of (seed, element index), so the
//! backward regenerates it instead of keeping a mask tensor alive.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::{from_host, host_f32};

/// Mixes 32 bits (Wellons' lowbias32: two multiply-xorshift rounds, full avalanche).
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The uniform number in [0, 1) of element `i`, exactly as the kernels compute it: elements 2j
/// and 2j + 1 share one 32-bit hash, the low and the high 16 bits. The hash is one `mix32` of
/// j's low 32 bits XOR a key of the seed (and j's high bits), which kernels compute once: 32-bit
/// arithmetic and one mix per pair keep the mask cheap where kernels regenerate it.
pub fn uniform(seed: u64, i: u64) -> f32 {
    let j = i >> 1;
    let key = mix32(mix32((seed >> 32) as u32) ^ seed as u32)
        ^ ((j >> 32) as u32).wrapping_mul(0x9E37_79B9);
    let h = mix32(j as u32 ^ key);
    let bits = if i & 1 == 0 { h & 0xFFFF } else { h >> 16 };
    bits as f32 * (1.0 / 65_536.0)
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

#[cfg(test)]
mod tests {
    use super::uniform;

    /// The mask drops close to p of the elements, both halves of a pair alike and
    /// independently, and another seed draws another mask.
    #[test]
    fn uniform_drops_p_of_the_elements() {
        let n = 1 << 20;
        let p = 0.1f32;
        let dropped = |seed: u64, parity: u64| {
            (0..n as u64)
                .filter(|i| i & 1 == parity && uniform(seed, *i) < p)
                .count() as f64
                / (n / 2) as f64
        };
        for parity in [0, 1] {
            let f = dropped(7, parity);
            assert!((f - 0.1).abs() < 0.003, "dropped fraction {f}");
        }
        // The two halves of a pair's hash are independent: both below 0.5 in a quarter of pairs.
        let both = (0..4096u64)
            .filter(|&j| uniform(7, 2 * j) < 0.5 && uniform(7, 2 * j + 1) < 0.5)
            .count();
        assert!(
            (900..1150).contains(&both),
            "both halves low in {both} of 4096"
        );
        let same = (0..4096u64)
            .filter(|&i| (uniform(7, i) < 0.5) == (uniform(8, i) < 0.5))
            .count();
        assert!(
            (1800..2300).contains(&same),
            "seeds 7 and 8 agree on {same} of 4096"
        );
        let high = (0..4096u64)
            .filter(|&i| (uniform(7, i) < 0.5) == (uniform(7 + (1 << 32), i) < 0.5))
            .count();
        assert!(
            (1800..2300).contains(&high),
            "seeds differing above bit 32 agree on {high}"
        );
    }
}
