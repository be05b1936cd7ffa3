// GroupNorm on [n, c, h, w] f32 tensors (src/ops/group_norm/cuda.rs).
// A group is cpg channels of hw values each, contiguous; block b of the
// per-group kernels handles group b % groups of image b / groups.
// Compiled with NVRTC at first use, after ../block_sum.cuh.

// Mean and 1/std of the len values at xs, in f64 as the CPU op (two passes).
__device__ void group_stats(const float* xs, long long len, double eps, double* shared, float* mean, float* rstd) {
    double sum = 0.0;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) sum += xs[i];
    const double m = block_sum(sum, shared) / len;
    double squares = 0.0;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const double d = xs[i] - m;
        squares += d * d;
    }
    const double var = block_sum(squares, shared) / len;
    *mean = (float)m;
    *rstd = (float)(1.0 / sqrt(var + eps));
}

extern "C" __global__ void group_norm_forward(const float* x, const float* gamma, const float* beta, float* y,
                                              int groups, int cpg, int hw, double eps) {
    __shared__ double shared[32];
    const long long len = (long long)cpg * hw, base = (long long)blockIdx.x * len;
    const int first = (blockIdx.x % groups) * cpg;
    float mean, rstd;
    group_stats(x + base, len, eps, shared, &mean, &rstd);
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const int c = first + (int)(i / hw);
        y[base + i] = (x[base + i] - mean) * (gamma[c] * rstd) + beta[c];
    }
}

// dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g * xhat)) per group;
// stats[2b], stats[2b+1] = the group's mean and 1/std, for the next kernel.
extern "C" __global__ void group_norm_input_grad(const float* dy, const float* x, const float* gamma, float* dx,
                                                 float* stats, int groups, int cpg, int hw, double eps) {
    __shared__ double shared[32];
    const long long len = (long long)cpg * hw, base = (long long)blockIdx.x * len;
    const int first = (blockIdx.x % groups) * cpg;
    float mean, rstd;
    group_stats(x + base, len, eps, shared, &mean, &rstd);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rstd;
    }
    double sum_dyg = 0.0, sum_dyg_xhat = 0.0;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const float xhat = (x[base + i] - mean) * rstd;
        const double dyg = (double)(dy[base + i] * gamma[first + (int)(i / hw)]);
        sum_dyg += dyg;
        sum_dyg_xhat += dyg * xhat;
    }
    const float m1 = (float)(block_sum(sum_dyg, shared) / len);
    const float m2 = (float)(block_sum(sum_dyg_xhat, shared) / len);
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        const float xhat = (x[base + i] - mean) * rstd;
        dx[base + i] = rstd * (dy[base + i] * gamma[first + (int)(i / hw)] - m1 - xhat * m2);
    }
}

// Block c: params[c] = dgamma = sum(dy * xhat), params[c_total + c] = dbeta
// = sum(dy), over every image and position of channel c.
extern "C" __global__ void group_norm_param_grad(const float* dy, const float* x, const float* stats, float* params,
                                                 int n, int c_total, int groups, int cpg, int hw) {
    __shared__ double shared[32];
    const int c = blockIdx.x, group = c / cpg;
    double dgamma = 0.0, dbeta = 0.0;
    for (long long i = threadIdx.x; i < (long long)n * hw; i += blockDim.x) {
        const int image = (int)(i / hw);
        const long long at = ((long long)image * c_total + c) * hw + i % hw;
        const int b = image * groups + group;
        const float xhat = (x[at] - stats[2 * b]) * stats[2 * b + 1];
        dgamma += (double)dy[at] * xhat;
        dbeta += dy[at];
    }
    dgamma = block_sum(dgamma, shared);
    dbeta = block_sum(dbeta, shared);
    if (threadIdx.x == 0) {
        params[c] = (float)dgamma;
        params[c_total + c] = (float)dbeta;
    }
}
