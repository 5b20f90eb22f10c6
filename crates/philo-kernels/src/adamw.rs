//! The optimizer's passes over f32 parameters as one kernel per tensor: the gradients' sum of
//! squares (for the global norm) and PyTorch's AdamW update in place, with the clipping and
//! loss-scale factor applied to the gradient as it is read (no pass that rescales gradients).

use candle_core::{DType, Result, Tensor};

/// One AdamW update's scalars.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The update's number, from 1 (bias correction).
    pub step: u64,
    /// What the gradient is multiplied by first (clipping coefficient / loss scale).
    pub grad_scale: f64,
}

/// An update's factors in f32, each computed in f64 first (1 − β2 from an f32-rounded β2 would
/// be off by 5e-5 relative, which PyTorch's f64 scalars are not).
struct Factors {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// 1 − lr·wd.
    decay: f32,
    bias2_sqrt: f32,
    /// lr / (1 − β1ᵗ).
    step_size: f32,
    eps: f32,
    grad_scale: f32,
}

impl AdamWStep {
    fn factors(&self) -> Factors {
        let t = self.step as i32;
        Factors {
            beta1: self.beta1 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            bias2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
            step_size: (self.lr / (1.0 - self.beta1.powi(t))) as f32,
            eps: self.eps as f32,
            grad_scale: self.grad_scale as f32,
        }
    }
}

/// Reference: p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
/// p ← p − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps), with g = grad·grad_scale.
pub fn reference(p: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], s: &AdamWStep) {
    let f = s.factors();
    for i in 0..p.len() {
        let g = grad[i] * f.grad_scale;
        m[i] = f.beta1 * m[i] + f.one_minus_beta1 * g;
        v[i] = f.beta2 * v[i] + f.one_minus_beta2 * g * g;
        p[i] = p[i] * f.decay - f.step_size * m[i] / (v[i].sqrt() / f.bias2_sqrt + f.eps);
    }
}

/// Σ x² over `tensors` (any float dtype): f32 partial sums per block (CUDA) or per tensor.
pub fn sum_of_squares(tensors: &[Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(first) = tensors.first() {
        if first.device().is_cuda()
            && tensors
                .iter()
                .all(|t| t.dtype() == DType::F32 && t.is_contiguous())
        {
            return cuda::sum_of_squares(tensors);
        }
    }
    // Per-tensor sums stay on the device; one transfer brings them all back.
    let sums = tensors
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&sums, 0)?
        .to_vec1::<f32>()?
        .iter()
        .map(|&s| s as f64)
        .sum())
}

/// Whether [`update_in_place`] runs as a kernel on these tensors (CUDA, f32, contiguous).
pub fn has_kernel(tensors: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && tensors
            .iter()
            .all(|t| t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// One AdamW update of `p` with moments `m`, `v` from `grad`, in place (see [`reference`]);
/// needs [`has_kernel`].
pub fn update_in_place(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    if !has_kernel(&[p, m, v, grad]) {
        candle_core::bail!("adamw::update_in_place takes contiguous f32 CUDA tensors");
    }
    let n = p.elem_count();
    if [m, v, grad].iter().any(|t| t.elem_count() != n) {
        candle_core::bail!(
            "adamw::update_in_place: parameter, moments and gradient differ in size"
        );
    }
    #[cfg(feature = "cuda")]
    return cuda::adamw(p, m, v, grad, n, s);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = s;
        unreachable!("has_kernel is false without the cuda feature")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::launch::*;

    pub(super) fn sum_of_squares(tensors: &[Tensor]) -> Result<f64> {
        let first = &tensors[0];
        let dev = device(first)?;
        let total = Tensor::zeros(1, DType::F32, first.device())?;
        let total_p = address(&total)?;
        let f = function(&dev, &ADAMW, "sum_of_squares")?;
        let stream = dev.cuda_stream();
        for t in tensors {
            let n = t.elem_count();
            if n == 0 {
                continue;
            }
            let x = address(t)?;
            let mut l = stream.launch_builder(&f);
            l.arg(&x).arg(&n).arg(&total_p);
            unsafe { l.launch(elementwise_config(n)) }.w()?;
        }
        Ok(total.to_vec1::<f32>()?[0] as f64)
    }

    pub(super) fn adamw(
        p: &Tensor,
        m: &Tensor,
        v: &Tensor,
        grad: &Tensor,
        n: usize,
        s: &AdamWStep,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let dev = device(p)?;
        let f = s.factors();
        let [pp, mp, vp, gp] = [p, m, v, grad].map(address);
        let (pp, mp, vp, gp) = (pp?, mp?, vp?, gp?);
        let function = function(&dev, &ADAMW, "adamw")?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&function);
        l.arg(&pp).arg(&mp).arg(&vp).arg(&gp).arg(&n);
        for x in [
            &f.grad_scale,
            &f.decay,
            &f.beta1,
            &f.one_minus_beta1,
            &f.beta2,
            &f.one_minus_beta2,
            &f.bias2_sqrt,
            &f.eps,
            &f.step_size,
        ] {
            l.arg(x);
        }
        unsafe { l.launch(elementwise_config(n)) }.w()?;
        Ok(())
    }
}
