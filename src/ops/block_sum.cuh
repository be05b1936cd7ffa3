// Shared by the kernels of src/ops (prepended to each source before NVRTC
// compiles it, which has no include path).

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024);
// every thread gets the total. `shared` holds 32 doubles.
__device__ double block_sum(double v, double* shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    const double total = shared[0];
    __syncthreads();  // before the next call reuses `shared`
    return total;
}
