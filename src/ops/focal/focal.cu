// The weighted sigmoid focal loss and its gradient on f32 [n, a, k] logits
// and targets with [n, a, 1] weights (src/ops/focal/cuda.rs). The formulas
// are the CPU op's (`Focal` in ../focal.rs). Compiled with NVRTC at first
// use, after ../block_sum.cuh.

struct Parts {
    float p, not_p, ce, q, alpha_t;
};

// p = sigmoid(x) and 1 - p without cancellation, the stable cross entropy,
// q = 1 - p_t and alpha_t (1 when alpha < 0).
__device__ Parts parts(float x, float t, float alpha) {
    const float e = expf(-fabsf(x));
    const float big = 1.0f / (1.0f + e), small = e / (1.0f + e);
    Parts v;
    v.p = x >= 0.0f ? big : small;
    v.not_p = x >= 0.0f ? small : big;
    v.ce = fmaxf(x, 0.0f) - x * t + log1pf(e);
    v.q = v.not_p * t + v.p * (1.0f - t);
    v.alpha_t = alpha < 0.0f ? 1.0f : alpha * t + (1.0f - alpha) * (1.0f - t);
    return v;
}

// (q^gamma, q^(gamma-1)); q clamped away from 0 except for gamma 0 and 2.
__device__ void powers(float q, float gamma, float* q_g, float* q_g1) {
    if (gamma == 0.0f) {
        *q_g = 1.0f;
        *q_g1 = 0.0f;
    } else if (gamma == 2.0f) {
        *q_g = q * q;
        *q_g1 = q;
    } else {
        const float c = fminf(fmaxf(q, 1e-12f), 1.0f);
        *q_g = powf(c, gamma);
        *q_g1 = powf(c, gamma - 1.0f);
    }
}

// partials[block] = this block's share of sum(w[row] * FL(x, t)), rows with
// weight 0 skipped; the grid has a fixed size, so the sum's order (and its
// bits) never depends on scheduling.
extern "C" __global__ void focal_loss_partial(const float* x, const float* t, const float* w, double* partials,
                                              long long len, int k, float alpha, float gamma) {
    __shared__ double shared[32];
    double sum = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const float weight = w[i / k];
        if (weight != 0.0f) {
            const Parts v = parts(x[i], t[i], alpha);
            float q_g, q_g1;
            powers(v.q, gamma, &q_g, &q_g1);
            sum += (double)weight * (double)(v.alpha_t * q_g * v.ce);
        }
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// out[0] = the sum of `count` partials, by one block.
extern "C" __global__ void sum_partials(const double* partials, float* out, int count) {
    __shared__ double shared[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) out[0] = (float)sum;
}

// dx = scale * w[row] * dFL/dx, with p - t written p (1 - t) - t (1 - p).
extern "C" __global__ void focal_loss_grad(const float* x, const float* t, const float* w, float* dx, long long len,
                                           int k, float alpha, float gamma, float scale) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float weight = w[i / k];
    if (weight == 0.0f) {
        dx[i] = 0.0f;
        return;
    }
    const Parts v = parts(x[i], t[i], alpha);
    float q_g, q_g1;
    powers(v.q, gamma, &q_g, &q_g1);
    const float p_minus_t = v.p * (1.0f - t[i]) - t[i] * v.not_p;
    const float g = v.alpha_t * (q_g * p_minus_t - gamma * q_g1 * v.p * v.not_p * (2.0f * t[i] - 1.0f) * v.ce);
    dx[i] = scale * weight * g;
}
