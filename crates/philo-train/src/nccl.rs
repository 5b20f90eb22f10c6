//! The communicator of a multi-GPU run (feature `nccl`): NCCL's all-reduce over the GPUs, one
//! process per GPU, joined through the rendezvous at the master address.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, Storage, Tensor};

use crate::comm::Communicator;
use crate::error::{Result, TrainError};
use crate::rendezvous;

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> TrainError {
    TrainError::Internal(format!("NCCL {what}: {e:?}"))
}

/// One rank's NCCL communicator, on the stream of the rank's CUDA device (so collectives run in
/// order with the step's kernels).
pub struct NcclCommunicator {
    comm: Comm,
    device: CudaDevice,
}

impl NcclCommunicator {
    /// Joins the run of `world_size` ranks as `rank`: rank 0 makes NCCL's id and serves it on
    /// `master`'s port (on every interface); the others fetch it from `master`. Fails when a
    /// rank does not turn up within `timeout`.
    pub fn join(
        device: &CudaDevice,
        rank: usize,
        world_size: usize,
        master: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            let listener = TcpListener::bind(("0.0.0.0", master.port())).map_err(|e| {
                TrainError::Config(format!(
                    "rank 0 cannot listen on port {} (--master_port): {e}",
                    master.port()
                ))
            })?;
            rendezvous::serve(&listener, world_size, &bytes, deadline)?;
            id
        } else {
            let bytes = rendezvous::fetch(master, rank, deadline)?;
            if bytes.len() != 128 {
                return Err(TrainError::Internal(format!(
                    "rendezvous: NCCL's id has 128 bytes, rank 0 sent {}",
                    bytes.len()
                )));
            }
            Id::uninit(std::array::from_fn(|i| bytes[i] as std::ffi::c_char))
        };
        let comm = Comm::from_rank(device.cuda_stream(), rank, world_size, id)
            .map_err(|e| nccl_error("init", e))?;
        Ok(NcclCommunicator {
            comm,
            device: device.clone(),
        })
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let stream = self.comm.stream();
        let mut buffer = stream
            .clone_htod(values)
            .map_err(|e| nccl_error("copy", e))?;
        self.comm
            .all_reduce_in_place(&mut buffer, &ReduceOp::Sum)
            .map_err(|e| nccl_error("all-reduce", e))?;
        let sums = stream
            .clone_dtoh(&buffer)
            .map_err(|e| nccl_error("copy", e))?;
        values.copy_from_slice(&sums);
        Ok(())
    }

    /// One all-reduce of all the tensors together (one bucket: LoRA gradients are small next to
    /// a step's compute), written back in place.
    fn all_reduce_tensors(&self, tensors: &[Tensor]) -> Result<()> {
        let flat = Tensor::cat(
            &tensors
                .iter()
                .map(|t| t.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let count = flat.elem_count();
        let mut summed = self
            .comm
            .stream()
            .alloc_zeros::<f32>(count)
            .map_err(|e| nccl_error("alloc", e))?;
        {
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                return Err(TrainError::Internal(
                    "NCCL all-reduce of tensors that are not on the GPU".into(),
                ));
            };
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                TrainError::Internal("NCCL all-reduce of a non-contiguous tensor".into())
            })?;
            let view = storage.as_cuda_slice::<f32>()?.slice(start..end);
            self.comm
                .all_reduce(&view, &mut summed, &ReduceOp::Sum)
                .map_err(|e| nccl_error("all-reduce", e))?;
        }
        let summed = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(summed, self.device.clone())),
            count,
            BackpropOp::none(),
            false,
        );
        let mut at = 0;
        for t in tensors {
            let n = t.elem_count();
            t.slice_set(&summed.narrow(0, at, n)?.reshape(t.shape())?, 0, 0)?;
            at += n;
        }
        Ok(())
    }
}
