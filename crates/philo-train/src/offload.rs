//! Where what is kept of each layer for the backward (gradient checkpoints: the layer input,
//! its attention output with the logsumexp, and the post-attention residual) waits: on the device, or — "gradient offload" — in
//! pinned host memory. The copies run on a second CUDA stream,
//! overlapped with the layers' compute: each input goes out while the next layers run forward,
//! and comes back one layer ahead of its backward. The main stream waits for a copy only where
//! it needs its result, so a copy costs no time as long as it is shorter than a layer.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// The checkpoints of one micro-batch, by layer: a few tensors each.
pub struct Checkpoints<'a> {
    slots: Vec<Option<Vec<Tensor>>>,
    #[cfg(feature = "cuda")]
    host: Option<cuda::HostCopies<'a>>,
    #[cfg(not(feature = "cuda"))]
    _pool: std::marker::PhantomData<&'a mut OffloadPool>,
}

impl<'a> Checkpoints<'a> {
    /// Keeps checkpoints in pinned host memory when `offload` and `device` is a GPU; on the
    /// device otherwise. `pool` carries the pinned buffers from one micro-batch to the next.
    pub fn new(device: &Device, offload: bool, pool: &'a mut OffloadPool) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(dev), true) = (device, offload) {
            return Ok(Checkpoints {
                slots: Vec::new(),
                host: Some(cuda::HostCopies::new(dev, pool)?),
            });
        }
        let _ = (device, offload);
        #[cfg(not(feature = "cuda"))]
        let _ = pool;
        Ok(Checkpoints {
            slots: Vec::new(),
            #[cfg(feature = "cuda")]
            host: None,
            #[cfg(not(feature = "cuda"))]
            _pool: std::marker::PhantomData,
        })
    }

    /// Keeps `tensors` as checkpoint `index` (indices pushed in order 0, 1, …).
    pub fn push(&mut self, index: usize, tensors: Vec<Tensor>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(host) = &mut self.host {
            return host.push(index, tensors);
        }
        debug_assert_eq!(index, self.slots.len());
        self.slots.push(Some(tensors));
        Ok(())
    }

    /// Starts bringing checkpoint `index` back (a no-op when it stayed on the device), so that a
    /// later [`Checkpoints::take`] finds it ready.
    pub fn prefetch(&mut self, index: usize) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(host) = &mut self.host {
            return host.prefetch(index);
        }
        let _ = index;
        Ok(())
    }

    /// Checkpoint `index` on the device (its copy back is waited for on the device, not the
    /// host).
    pub fn take(&mut self, index: usize) -> Result<Vec<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(host) = &mut self.host {
            return host.take(index);
        }
        self.slots
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| crate::TrainError::Internal(format!("checkpoint {index} is missing")))
    }
}

/// Pinned host buffers reused across micro-batches (allocating pinned memory is slow).
#[derive(Default)]
pub struct OffloadPool {
    /// By checkpoint, one buffer per tensor.
    #[cfg(feature = "cuda")]
    buffers: Vec<Vec<cuda::Pinned>>,
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::cudarc::driver::{result, CudaEvent, CudaStream, DevicePtr};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Storage, Tensor};

    use super::OffloadPool;
    use crate::error::{Result, TrainError};

    /// Page-locked host memory (DMA-able, so copies run asynchronously).
    pub(super) struct Pinned {
        ptr: *mut u8,
        bytes: usize,
    }

    // The buffer is plain memory; only the copies scheduled by `HostCopies` touch it.
    unsafe impl Send for Pinned {}

    impl Pinned {
        fn new(bytes: usize) -> Result<Self> {
            let ptr = unsafe { result::malloc_host(bytes, 0) }.w()? as *mut u8;
            Ok(Pinned { ptr, bytes })
        }
    }

    impl Drop for Pinned {
        fn drop(&mut self) {
            // The copies that used it were waited for by `HostCopies::drop`.
            unsafe {
                let _ = result::free_host(self.ptr as *mut _);
            }
        }
    }

    /// Tensors on their way out and the event their copies complete on: their memory may be
    /// reused only once the main stream has waited for that event.
    struct Outgoing {
        tensors: Vec<Tensor>,
        copied: CudaEvent,
    }

    pub(super) struct HostCopies<'a> {
        dev: CudaDevice,
        main: Arc<CudaStream>,
        copies: Arc<CudaStream>,
        /// One pinned buffer per checkpoint, kept across micro-batches.
        pool: &'a mut OffloadPool,
        /// Shape and dtype of each checkpoint's tensors.
        shapes: Vec<Vec<(candle_core::Shape, candle_core::DType)>>,
        outgoing: Vec<Outgoing>,
        incoming: Vec<Option<(Vec<Tensor>, CudaEvent)>>,
    }

    fn event(stream: &CudaStream) -> Result<CudaEvent> {
        Ok(stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .w()?)
    }

    /// Device address and byte length of a contiguous tensor.
    fn device_span(t: &Tensor, stream: &Arc<CudaStream>) -> Result<(u64, usize)> {
        use candle_core::backend::BackendStorage;
        use candle_core::DType;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            return Err(TrainError::Internal("offload: not a CUDA tensor".into()));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(TrainError::Internal(
                "offload: checkpoint not contiguous".into(),
            ));
        };
        let base = match s.dtype() {
            DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
            DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
            DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(stream).0,
            other => {
                return Err(TrainError::Internal(format!(
                    "offload: unexpected checkpoint dtype {other:?}"
                )))
            }
        };
        let size = t.dtype().size_in_bytes();
        Ok((base + (start * size) as u64, (end - start) * size))
    }

    impl<'a> HostCopies<'a> {
        pub(super) fn new(dev: &CudaDevice, pool: &'a mut OffloadPool) -> Result<Self> {
            let main = dev.cuda_stream();
            let copies = main.fork().w()?;
            Ok(HostCopies {
                dev: dev.clone(),
                main,
                copies,
                pool,
                shapes: Vec::new(),
                outgoing: Vec::new(),
                incoming: Vec::new(),
            })
        }

        pub(super) fn push(&mut self, index: usize, tensors: Vec<Tensor>) -> Result<()> {
            let tensors = tensors
                .into_iter()
                .map(|t| t.contiguous())
                .collect::<candle_core::Result<Vec<_>>>()?;
            if self.pool.buffers.len() <= index {
                self.pool.buffers.resize_with(index + 1, Vec::new);
            }
            // The copies start once the main stream has produced the tensors.
            self.copies.wait(&event(&self.main)?).w()?;
            for (j, t) in tensors.iter().enumerate() {
                let (src, bytes) = device_span(t, &self.main)?;
                let buffers = &mut self.pool.buffers[index];
                if buffers.len() <= j {
                    buffers.push(Pinned::new(bytes)?);
                } else if buffers[j].bytes < bytes {
                    buffers[j] = Pinned::new(bytes)?;
                }
                let dst = unsafe { std::slice::from_raw_parts_mut(buffers[j].ptr, bytes) };
                unsafe { result::memcpy_dtoh_async(dst, src, self.copies.cu_stream()) }.w()?;
            }
            let copied = event(&self.copies)?;
            // Tensors pushed two layers ago are surely copied by now: let the main stream wait
            // for their copies and release their memory.
            while self.outgoing.len() > 1 {
                let done = self.outgoing.remove(0);
                self.main.wait(&done.copied).w()?;
            }
            self.shapes.push(
                tensors
                    .iter()
                    .map(|t| (t.shape().clone(), t.dtype()))
                    .collect(),
            );
            self.incoming.push(None);
            self.outgoing.push(Outgoing { tensors, copied });
            Ok(())
        }

        pub(super) fn prefetch(&mut self, index: usize) -> Result<()> {
            if self.incoming.get(index).is_some_and(Option::is_some) {
                return Ok(());
            }
            let shapes = self.shapes.get(index).cloned().ok_or_else(|| {
                TrainError::Internal(format!("checkpoint {index} was never pushed"))
            })?;
            let device = candle_core::Device::Cuda(self.dev.clone());
            let mut tensors = Vec::with_capacity(shapes.len());
            for (shape, dtype) in shapes {
                tensors.push(unsafe { Tensor::empty(shape, dtype, &device)? });
            }
            // The buffers were allocated on the main stream: the copies wait for that point.
            self.copies.wait(&event(&self.main)?).w()?;
            for (j, t) in tensors.iter().enumerate() {
                let (dst, bytes) = device_span(t, &self.main)?;
                let src =
                    unsafe { std::slice::from_raw_parts(self.pool.buffers[index][j].ptr, bytes) };
                unsafe { result::memcpy_htod_async(dst, src, self.copies.cu_stream()) }.w()?;
            }
            self.incoming[index] = Some((tensors, event(&self.copies)?));
            Ok(())
        }

        pub(super) fn take(&mut self, index: usize) -> Result<Vec<Tensor>> {
            self.prefetch(index)?;
            let (tensors, ready) = self.incoming[index]
                .take()
                .ok_or_else(|| TrainError::Internal(format!("checkpoint {index} is missing")))?;
            self.main.wait(&ready).w()?;
            Ok(tensors)
        }
    }

    impl Drop for HostCopies<'_> {
        fn drop(&mut self) {
            // Every copy must be finished before its tensors or buffers are reused.
            let _ = self.copies.synchronize();
            for done in self.outgoing.drain(..) {
                let _ = self.main.wait(&done.copied);
                drop(done.tensors);
            }
        }
    }
}
