// The 3x3 stride-2 max-pool with padding 1 on [n, c, h, w] f32 tensors
// (src/ops/maxpool/cuda.rs), one thread per output or input element.
// The argmax rule is the CPU op's: the first maximum in row-major window
// order wins, padding never wins, and NaN propagates.

__device__ int window_argmax(const float* plane, int h, int w, int oy, int ox) {
    const int y0 = max(2 * oy - 1, 0), y1 = min(2 * oy + 2, h);
    const int x0 = max(2 * ox - 1, 0), x1 = min(2 * ox + 2, w);
    int best = y0 * w + x0;
    for (int y = y0; y < y1; ++y) {
        for (int x = x0; x < x1; ++x) {
            const int i = y * w + x;
            const float v = plane[i], b = plane[best];
            if (v > b || (isnan(v) && !isnan(b))) best = i;
        }
    }
    return best;
}

extern "C" __global__ void max_pool_forward(const float* x, float* y, long long planes, int h, int w, int oh, int ow) {
    const long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= planes * oh * ow) return;
    const long long plane = o / ((long long)oh * ow);
    const int at = (int)(o % ((long long)oh * ow));
    const float* p = x + plane * h * w;
    y[o] = p[window_argmax(p, h, w, at / ow, at % ow)];
}

// dx of each input element: the sum of the gradients of the (at most four)
// outputs whose window maximum it is, in row-major output order, as the
// CPU op adds them; deterministic, with no zero-fill and no atomics.
// Output row oy covers input rows 2oy-1 .. 2oy+1, so row r is covered by
// oy = r/2 .. (r+1)/2 (and likewise for columns).
extern "C" __global__ void max_pool_grad(const float* input, const float* grad, float* dx, long long planes, int h,
                                         int w, int oh, int ow) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * h * w) return;
    const long long plane = i / ((long long)h * w);
    const int at = (int)(i % ((long long)h * w)), row = at / w, col = at % w;
    const float* p = input + plane * h * w;
    const float* g = grad + plane * oh * ow;
    float sum = 0.0f;
    for (int oy = row / 2; oy <= min((row + 1) / 2, oh - 1); ++oy) {
        for (int ox = col / 2; ox <= min((col + 1) / 2, ow - 1); ++ox) {
            if (window_argmax(p, h, w, oy, ox) == at) sum += g[oy * ow + ox];
        }
    }
    dx[i] = sum;
}
