//! Convolutions on CUDA through cuDNN (a `cudnn` build), with their own
//! backward. Candle's CUDA backward computes the input gradient with a
//! naive transposed-convolution kernel and the weight gradient with a
//! convolution of transposed tensors that falls back to a direct kernel;
//! here forward, backward-data and backward-filter are the three cuDNN
//! calls PyTorch makes, with:
//! - a plan per shape, dtype and device (descriptors, and per direction the
//!   heuristic's algorithm and its workspace size), built on first use;
//! - one grow-only workspace per device, never zeroed (cuDNN writes it
//!   before reading);
//! - bf16 data with f32 accumulation, and for f32 TF32 tensor cores when
//!   `cuda_kernels::tf32_allowed` (PyTorch's math-type choice).
//!
//! Built and compiled here; run only where gpu-check runs (a GPU machine),
//! against Candle's stock convolution (tests/cuda_ops.rs).

use std::any::Any;
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor,
    TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::super::cuda_kernels::{cuda_view, tf32_allowed};
use super::Geometry;

/// `y = conv(x, w)` from arguments `x [n, c, h, w]` and `w [co, c, kh, kw]`.
pub(super) struct CudnnForward(pub(super) Geometry);

/// `dx` from arguments `grad [n, co, ho, wo]` and `w [co, c, kh, kw]`.
struct CudnnInputGrad(Geometry);

/// `dw` from arguments `x [n, c, h, w]` and `grad [n, co, ho, wo]`.
struct CudnnWeightGrad(Geometry);

impl CustomOp2 for CudnnForward {
    fn name(&self) -> &'static str {
        "conv2d-cudnn"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the cuDNN convolution runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = &self.0;
        let shape = Shape::from((g.n, g.c_out, g.out_h, g.out_w));
        Ok((run(Direction::Forward, g, (xs, xl), (ws, wl), shape.elem_count())?, shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // As on the CPU: no gradient for the image batch or frozen weights.
        let dx = x.track_op().then(|| grad.apply_op2_no_bwd(w, &CudnnInputGrad(self.0))).transpose()?;
        let dw = w.track_op().then(|| x.apply_op2_no_bwd(&grad, &CudnnWeightGrad(self.0))).transpose()?;
        Ok((dx, dw))
    }
}

impl CustomOp2 for CudnnInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-cudnn-input-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the cuDNN convolution runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = &self.0;
        let shape = Shape::from((g.n, g.c_in, g.h, g.w));
        Ok((run(Direction::InputGrad, g, (gs, gl), (ws, wl), shape.elem_count())?, shape))
    }
}

impl CustomOp2 for CudnnWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-cudnn-weight-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the cuDNN convolution runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = &self.0;
        let shape = Shape::from((g.c_out, g.c_in, g.kh, g.kw));
        Ok((run(Direction::WeightGrad, g, (xs, xl), (gs, gl), shape.elem_count())?, shape))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Direction {
    Forward,
    InputGrad,
    WeightGrad,
}

type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// Runs one direction on the two operands (in the argument order of the
/// op above) into a fresh buffer of `len` elements.
fn run(direction: Direction, g: &Geometry, a: Operand, b: Operand, len: usize) -> Result<CudaStorage> {
    match a.0.dtype() {
        DType::F32 => run_typed::<f32>(direction, g, a, b, len),
        DType::BF16 => run_typed::<half::bf16>(direction, g, a, b, len),
        dtype => candle_core::bail!("the cuDNN convolution takes f32 or bf16, got {dtype:?}"),
    }
}

fn run_typed<T>(direction: Direction, g: &Geometry, a: Operand, b: Operand, len: usize) -> Result<CudaStorage>
where
    T: WithDType + CudaDType + DeviceRepr + CudnnDataType,
{
    let device = a.0.device().clone();
    // The plan's descriptors take both as contiguous NCHW.
    let a = cuda_view::<T>(a.0, a.1, "a cuDNN convolution operand")?;
    let b = cuda_view::<T>(b.0, b.1, "a cuDNN convolution operand")?;
    // SAFETY: every element is written by cuDNN (beta = 0) before it is read.
    let mut out = unsafe { device.alloc::<T>(len)? };
    let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
    with_plan::<T, _>(&device, g, |plan, workspace| {
        // SAFETY: the descriptors were made for exactly these shapes and T.
        unsafe {
            match direction {
                Direction::Forward => {
                    let op = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
                    let (algo, bytes) = plan
                        .forward
                        .get_or_insert_with(|| algo_and_size(op.pick_algorithm(), |a| op.get_workspace_size(a)))
                        .clone()
                        .map_err(candle_core::Error::Msg)?;
                    let ws = grow(workspace, &device, bytes)?;
                    op.launch(algo, ws, (one, zero), &a, &b, &mut out).map_err(wrap)
                }
                Direction::InputGrad => {
                    let op = ConvBackwardData { conv: &plan.conv, dx: &plan.x, w: &plan.w, dy: &plan.y };
                    let (algo, bytes) = plan
                        .input_grad
                        .get_or_insert_with(|| algo_and_size(op.pick_algorithm(), |a| op.get_workspace_size(a)))
                        .clone()
                        .map_err(candle_core::Error::Msg)?;
                    let ws = grow(workspace, &device, bytes)?;
                    op.launch(algo, ws, (one, zero), &mut out, &b, &a).map_err(wrap)
                }
                Direction::WeightGrad => {
                    let op = ConvBackwardFilter { conv: &plan.conv, x: &plan.x, dw: &plan.w, dy: &plan.y };
                    let (algo, bytes) = plan
                        .weight_grad
                        .get_or_insert_with(|| algo_and_size(op.pick_algorithm(), |a| op.get_workspace_size(a)))
                        .clone()
                        .map_err(candle_core::Error::Msg)?;
                    let ws = grow(workspace, &device, bytes)?;
                    op.launch(algo, ws, (one, zero), &a, &mut out, &b).map_err(wrap)
                }
            }
        }
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, device))
}

/// An algorithm with its workspace size, or why there is none (kept, so a
/// shape cuDNN cannot run fails the same way every time).
type Choice<A> = std::result::Result<(A, usize), String>;

fn algo_and_size<A: Copy, E: std::fmt::Debug>(
    algo: std::result::Result<A, E>,
    size: impl Fn(A) -> std::result::Result<usize, E>,
) -> Choice<A> {
    let algo = algo.map_err(|e| format!("cuDNN found no algorithm: {e:?}"))?;
    Ok((algo, size(algo).map_err(|e| format!("cuDNN workspace size: {e:?}"))?))
}

/// One shape's descriptors (x and y name the input and output of the
/// forward in all three directions) and the algorithm chosen per direction.
struct Plan<T> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    /// Compute type f32: bf16 data accumulates in f32.
    conv: ConvDescriptor<f32>,
    forward: Option<Choice<sys::cudnnConvolutionFwdAlgo_t>>,
    input_grad: Option<Choice<sys::cudnnConvolutionBwdDataAlgo_t>>,
    weight_grad: Option<Choice<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

impl<T: CudnnDataType + 'static> Plan<T> {
    fn new(cudnn: &Arc<Cudnn>, g: &Geometry, dtype: DType, tf32: bool) -> Result<Self> {
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let dims = |a: usize, b: usize, c: usize, d: usize| [a as i32, b as i32, c as i32, d as i32];
        let (p, s) = (g.padding as i32, g.stride as i32);
        let mut conv = cudnn
            .create_conv2d::<f32>([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
            .map_err(wrap)?;
        conv.set_math_type(math_type(dtype, tf32)).map_err(wrap)?;
        Ok(Self {
            x: cudnn.create_4d_tensor::<T>(nchw, dims(g.n, g.c_in, g.h, g.w)).map_err(wrap)?,
            w: cudnn.create_4d_filter::<T>(nchw, dims(g.c_out, g.c_in, g.kh, g.kw)).map_err(wrap)?,
            y: cudnn.create_4d_tensor::<T>(nchw, dims(g.n, g.c_out, g.out_h, g.out_w)).map_err(wrap)?,
            conv,
            forward: None,
            input_grad: None,
            weight_grad: None,
        })
    }
}

/// PyTorch's choice (aten/src/ATen/cudnn/Descriptors.h): tensor cores for
/// bf16; for f32 the default math, which lets cuDNN use TF32, unless TF32
/// is turned off.
fn math_type(dtype: DType, tf32: bool) -> sys::cudnnMathType_t {
    match (dtype, tf32) {
        (DType::F32, true) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        (DType::F32, false) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

fn wrap(err: candle_core::cuda_backend::cudarc::cudnn::CudnnError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {err:?}"))
}

#[derive(PartialEq, Eq, Hash)]
struct PlanKey {
    device: DeviceId,
    dtype: DType,
    geometry: Geometry,
    tf32: bool,
}

/// A device's cuDNN handle, plans and workspace. cuDNN handles are neither
/// Send nor Sync, so each thread keeps its own (as Candle does); the
/// training loop issues every op from one thread.
#[derive(Default)]
struct PerThread {
    handles: HashMap<DeviceId, Arc<Cudnn>>,
    plans: HashMap<PlanKey, Box<dyn Any>>,
    workspaces: HashMap<DeviceId, CudaSlice<u8>>,
}

thread_local! {
    static STATE: RefCell<PerThread> = RefCell::new(PerThread::default());
}

/// Calls `f` with the plan for `g` in `T` on `device` (made on first use)
/// and the device's workspace.
fn with_plan<T: CudnnDataType + WithDType + 'static, R>(
    device: &CudaDevice,
    g: &Geometry,
    f: impl FnOnce(&mut Plan<T>, &mut Option<CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let PerThread { handles, plans, workspaces } = &mut *state;
        let id = device.id();
        let cudnn = match handles.get(&id) {
            Some(handle) => handle.clone(),
            None => {
                let handle = Cudnn::new(device.cuda_stream()).map_err(wrap)?;
                handles.insert(id, handle.clone());
                handle
            }
        };
        let tf32 = tf32_allowed();
        let plan = match plans.entry(PlanKey { device: id, dtype: T::DTYPE, geometry: *g, tf32 }) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Box::new(Plan::<T>::new(&cudnn, g, T::DTYPE, tf32)?)),
        };
        let plan = plan.downcast_mut::<Plan<T>>().expect("a plan of this dtype");
        let mut workspace = workspaces.remove(&id);
        let result = f(plan, &mut workspace);
        if let Some(workspace) = workspace {
            workspaces.insert(id, workspace);
        }
        result
    })
}

/// The workspace, grown to at least `bytes` (`None` when none is needed).
fn grow<'a>(
    workspace: &'a mut Option<CudaSlice<u8>>,
    device: &CudaDevice,
    bytes: usize,
) -> Result<Option<&'a mut CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    if workspace.as_ref().is_none_or(|w| w.len() < bytes) {
        *workspace = None; // free the old one first: the peak is the larger alone
                           // SAFETY: cuDNN writes its workspace before reading it.
        *workspace = Some(unsafe { device.alloc::<u8>(bytes)? });
    }
    Ok(workspace.as_mut())
}
