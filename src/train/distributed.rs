//! Data-parallel training, as torch's DistributedDataParallel does it: one
//! process per GPU (a rank), each holding the whole model and running its
//! share of every global batch (`data::loader::Shard`); before each
//! optimiser step the ranks average their gradients, so every rank takes the
//! same step and the models stay identical.
//!
//! The ranks start identical without a broadcast: a model is built from the
//! run's seed on the host (`model::init`) or loaded from the same files.
//! BatchNorm running statistics are not averaged (DDP broadcasts rank 0's);
//! only rank 0 evaluates and checkpoints, so only its statistics are used.
//!
//! `retinanet train --gpus 0,1,...` (`commands::launch`), torchrun or SLURM's
//! srun start the ranks; each learns its place and the NCCL group's id in
//! `rendezvous`, and the ranks talk over NCCL (`--features nccl`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

use super::optim::Param;
use crate::data::Shard;

/// How the ranks of a run combine numbers.
pub trait Collective {
    /// This process's rank and the number of ranks.
    fn shard(&self) -> Shard;
    /// The element-wise mean of a 1-D f32 tensor over every rank; every rank
    /// gets the same result.
    fn all_reduce_mean(&self, values: &Tensor) -> Result<Tensor>;
    /// True when there is nothing to combine, so the all-reduce is skipped.
    /// An NCCL group of one GPU still all-reduces: `--gpus 0` runs the same
    /// code path as several GPUs.
    fn single_process(&self) -> bool {
        false
    }
}

/// A run of one process: nothing to combine.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn shard(&self) -> Shard {
        Shard::WHOLE
    }

    fn all_reduce_mean(&self, values: &Tensor) -> Result<Tensor> {
        Ok(values.clone())
    }

    fn single_process(&self) -> bool {
        true
    }
}

/// Replaces each gradient in `grads` by its mean over every rank and returns
/// the rank-averaged `[classification, box regression]` loss terms, all in
/// one all-reduce. A parameter without a gradient counts as zero, so every
/// rank sends the same layout.
pub(super) fn average_over_ranks(
    collective: &dyn Collective,
    params: &[Param],
    grads: &mut GradStore,
    losses: [&Tensor; 2],
) -> Result<[f64; 2]> {
    let scalar = |t: &Tensor| t.to_dtype(DType::F64)?.to_scalar::<f64>();
    if collective.single_process() {
        return Ok([scalar(losses[0])?, scalar(losses[1])?]);
    }
    let mut parts = Vec::with_capacity(params.len() + 2);
    for p in params {
        let part = match grads.get(p.var.as_tensor()) {
            Some(g) => g.detach().to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(p.var.elem_count(), DType::F32, p.var.device())?,
        };
        parts.push(part);
    }
    for loss in losses {
        parts.push(loss.detach().to_dtype(DType::F32)?.reshape(1)?);
    }
    let mean = collective.all_reduce_mean(&Tensor::cat(&parts, 0)?)?;
    let mut offset = 0;
    for p in params {
        let n = p.var.elem_count();
        let grad = mean.narrow(0, offset, n)?.reshape(p.var.shape())?.to_dtype(p.var.dtype())?;
        grads.insert(p.var.as_tensor(), grad);
        offset += n;
    }
    Ok([scalar(&mean.get(offset)?)?, scalar(&mean.get(offset + 1)?)?])
}

/// Whether any rank asked to stop (Ctrl-C reaches each rank at its own
/// moment; stopping only where every rank agrees keeps them in step).
pub fn any_rank(collective: &dyn Collective, mine: bool, device: &candle_core::Device) -> Result<bool> {
    if collective.single_process() {
        return Ok(mine);
    }
    let flag = Tensor::new(&[if mine { 1f32 } else { 0.0 }], device)?;
    Ok(collective.all_reduce_mean(&flag)?.get(0)?.to_scalar::<f32>()? > 0.0)
}

#[cfg(feature = "nccl")]
pub use nccl::{new_group_id, NcclGroup};

/// The NCCL group of a launched run.
#[cfg(feature = "nccl")]
mod nccl {
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

    use super::Collective;
    use crate::data::Shard;

    /// Length of an `ncclUniqueId`.
    const ID_BYTES: usize = 128;

    /// A new group id for rank 0 to hand to every rank, as hex.
    pub fn new_group_id() -> anyhow::Result<String> {
        let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL: cannot create a group id: {e:?}"))?;
        Ok(id.internal().iter().map(|&b| format!("{:02x}", b as u8)).collect())
    }

    fn parse_id(hex: &str) -> Result<Id> {
        let bad = || candle_core::Error::Msg(format!("the NCCL group id from rank 0: not {ID_BYTES} bytes of hex"));
        if hex.len() != 2 * ID_BYTES {
            return Err(bad());
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (i, byte) in internal.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())? as std::ffi::c_char;
        }
        Ok(Id::uninit(internal))
    }

    /// The communicator, shared with the all-reduce op.
    struct Communicator(Comm);

    // SAFETY: `Comm` holds NCCL's raw handle, so it is neither Send nor Sync,
    // and `CustomOp1` asks for both. Each rank is one process whose training
    // thread alone issues collectives, which is NCCL's rule (one thread at a
    // time per communicator).
    unsafe impl Send for Communicator {}
    unsafe impl Sync for Communicator {}

    /// One rank of an NCCL group, on its GPU.
    pub struct NcclGroup {
        comm: Arc<Communicator>,
        shard: Shard,
    }

    impl NcclGroup {
        /// Joins group `id_hex` as `shard.rank`; blocks until every rank has
        /// joined. Collectives run on `device`'s stream, in order with its
        /// kernels.
        pub fn join(device: &Device, shard: Shard, id_hex: &str) -> Result<Self> {
            let Device::Cuda(cuda) = device else {
                candle_core::bail!("data-parallel training needs CUDA devices, got {device:?}");
            };
            let comm = Comm::from_rank(cuda.cuda_stream(), shard.rank, shard.world, parse_id(id_hex)?)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL: rank {} cannot join: {e:?}", shard.rank)))?;
            Ok(Self { comm: Arc::new(Communicator(comm)), shard })
        }
    }

    impl Collective for NcclGroup {
        fn shard(&self) -> Shard {
            self.shard
        }

        fn all_reduce_mean(&self, values: &Tensor) -> Result<Tensor> {
            values.contiguous()?.apply_op1_no_bwd(&AllReduceMean(Arc::clone(&self.comm)))
        }
    }

    struct AllReduceMean(Arc<Communicator>);

    impl CustomOp1 for AllReduceMean {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-mean"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("an NCCL all-reduce needs a CUDA tensor")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("all-reduce of a strided tensor".into()))?;
            let device = storage.device().clone();
            let source = storage.as_cuda_slice::<f32>()?.slice(start..end);
            // SAFETY: NCCL writes every element before anything reads it.
            let mut target = unsafe { device.alloc::<f32>(end - start)? };
            self.0
                 .0
                .all_reduce(&source, &mut target, &ReduceOp::Avg)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(target, device), layout.shape().clone()))
        }
    }
}
