// fxqat's QAT kernels (fxqat.quant.fast_fq, fake_quant, folded_fq): the 8-bit fake-quant forward with its
// straight-through mask, per tensor and per channel, the masked gradient, the observers' update, and the BN-folded
// weight's forward and backward. Each reproduces torch's ops' float32 arithmetic (see each function); compiled into one
// library with qconv.cpp (fxqat.native.build) and called through ctypes with the GIL held.
#include <cmath>
#include <cstdint>
#include <vector>

extern "C" {
// Per-tensor 8-bit fake-quantization of n contiguous float32 values in one pass (QAT's forward), with its
// straight-through mask: y = (clamp(nearbyint(x * (1 / scale)) + zp, qmin, qmax) - zp) * scale, torch's fake-quant
// kernel's arithmetic bit for bit (a NaN gives the grid's lowest value, as there; quantize_per_tensor + dequantize
// give the highest). mask (when not null) = lo <= x (mode & 1) and x <= hi (mode & 2): the elements whose gradient
// passes. Split over `threads` OpenMP threads (the caller passes torch's count).
__attribute__((target_clones("avx512f", "avx2", "default")))
static void fq8_range(const float* x, float* y, uint8_t* mask, int64_t b, int64_t e, float scale, float inv, float zp,
                      float qmin, float qmax, float lo, float hi, int mode) {
  for (int64_t i = b; i < e; ++i) {
    float v = x[i];
    float q = std::nearbyint(v * inv) + zp;
    q = !(q >= qmin) ? qmin : q;
    q = q > qmax ? qmax : q;
    y[i] = (q - zp) * scale;
  }
  if (mask) {
    for (int64_t i = b; i < e; ++i) {
      float v = x[i];
      bool m = true;
      if (mode & 1) m = m && (v >= lo);
      if (mode & 2) m = m && (v <= hi);
      mask[i] = m;
    }
  }
}

void fxqat_fq8(const float* x, float* y, uint8_t* mask, int64_t n, float scale, int zp, int qmin, int qmax, float lo,
               float hi, int mode, int threads) {
  const float inv = 1.0f / scale;
  const int64_t grain = 1 << 14;
  const int64_t chunks = (n + grain - 1) / grain;
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1 && threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t b = c * grain, e = b + grain < n ? b + grain : n;
    fq8_range(x, y, mask, b, e, scale, inv, float(zp), float(qmin), float(qmax), lo, hi, mode);
  }
}

// Per-channel fake-quantization of rows x cols contiguous float32 values (QAT's weights: one row per output channel),
// torch's fake_quantize_per_channel_affine kernel's values and straight-through mask bit for bit: q = nearbyint(x *
// (1 / scale)) + zp, mask = qmin <= q <= qmax, y = (clamp(q) - zp) * scale. torch casts q to int64 first: a NaN or a q
// past 2^63 becomes INT64_MIN there and clamps to qmin, as here. mask may be null (no gradient wanted). fqc_row's fr
// (fxqat_fold_fq: a BN factor; else 1, where x * 1 and y / 1 are exact) quantizes x * fr and writes y / fr.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void fqc_row(const float* x, float* y, uint8_t* mask, int64_t n, float fr, float scale, float zp, float qmin,
                    float qmax) {
  const float inv = 1.0f / scale, big = 9.2233720368547758e18f;
  for (int64_t i = 0; i < n; ++i) {
    float q = std::nearbyint((x[i] * fr) * inv) + zp;
    float c = !(q < big) ? qmin : q < qmin ? qmin : q > qmax ? qmax : q;
    y[i] = ((c - zp) * scale) / fr;
  }
  if (mask)
    for (int64_t i = 0; i < n; ++i) {
      float q = std::nearbyint((x[i] * fr) * inv) + zp;
      mask[i] = (q >= qmin) & (q <= qmax);
    }
}

void fxqat_fq8c(const float* x, float* y, uint8_t* mask, int64_t rows, int64_t cols, const float* scale,
                const int32_t* zp, int qmin, int qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols > (1 << 16) && threads > 1)
  for (int64_t r = 0; r < rows; ++r)
    fqc_row(x + r * cols, y + r * cols, mask ? mask + r * cols : nullptr, cols, 1.0f, scale[r], float(zp[r]),
            float(qmin), float(qmax));
}

// The straight-through gradient of a fake-quant: y = mask ? g : 0 (torch.where(mask, g, 0.0): the per-tensor
// backward) or, with mul, y = g * float(mask) (torch's per-channel cachemask backward: dY * mask, so a NaN gradient
// stays NaN and a negative one gives -0). n contiguous values, split over `threads` OpenMP threads.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void mask_grad_range(const float* g, const uint8_t* mask, float* y, int64_t b, int64_t e, int mul) {
  if (mul)
    for (int64_t i = b; i < e; ++i) y[i] = g[i] * float(mask[i]);
  else
    for (int64_t i = b; i < e; ++i) y[i] = mask[i] ? g[i] : 0.0f;
}

void fxqat_mask_grad(const float* g, const uint8_t* mask, float* y, int64_t n, int mul, int threads) {
  const int64_t grain = 1 << 15, chunks = (n + grain - 1) / grain;
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1 && threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t b = c * grain, e = b + grain < n ? b + grain : n;
    mask_grad_range(g, mask, y, b, e, mul);
  }
}

// The batch's min / max of one row (of x * f: f is a BN factor in fxqat_fold_fq, else 1, where x * 1 is exact), and
// whether it holds a NaN or an infinity.
__attribute__((target_clones("avx512f", "avx2", "default")))
static int row_range(const float* x, int64_t n, float f, float* lo, float* hi) {
  float mn = INFINITY, mx = -INFINITY;
  int bad = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] * f;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    bad |= !(v - v == 0.0f);  // NaN or infinity
  }
  *lo = mn, *hi = mx;
  return bad;
}

// The scalar arithmetic in float32 without contraction into FMAs: torch's ops round after every operation.
__attribute__((optimize("fp-contract=off"))) static void row_qparams(float bmin, float bmax, float* lo0, float* hi0,
                                                                     int ema, float c, int first_check, int qmin,
                                                                     int qmax, int symmetric, float eps, float* scale,
                                                                     int32_t* zp) {
  volatile float lo = bmin, hi = bmax;
  if (!ema) {
    lo = *lo0 < lo ? *lo0 : lo;
    hi = *hi0 > hi ? *hi0 : hi;
  } else if (!(first_check && std::isinf(*lo0) && *lo0 > 0 && std::isinf(*hi0) && *hi0 < 0)) {
    volatile float dl = bmin - *lo0, dh = bmax - *hi0;
    volatile float ml = c * dl, mh = c * dh;
    lo = *lo0 + ml;
    hi = *hi0 + mh;
  }
  *lo0 = lo, *hi0 = hi;
  float l = lo < 0.0f ? lo : 0.0f, h = hi > 0.0f ? hi : 0.0f;
  volatile float s;
  int32_t z;
  if (symmetric) {
    float m = -l > h ? -l : h;
    s = m / (float(qmax - qmin) / 2.0f);
    z = qmin < 0 ? 0 : (qmin + qmax) / 2;
  } else {
    s = (h - l) / float(qmax - qmin);
  }
  float sc = s > eps ? s : eps;
  if (!symmetric) {
    volatile float r = l / sc;
    int32_t q = qmin - int32_t(std::nearbyint(r));
    z = q < qmin ? qmin : q > qmax ? qmax : q;
  }
  const float scale_eps = 1e-8f;
  *scale = sc > scale_eps ? sc : scale_eps;
  *zp = z;
}

// QAT's observer step for a MinMax / MovingAverageMinMax observer (torch.ao's update and qparams, op for op: see
// fxqat.quant.fake_quant.FakeQuant._observe_fast), one call instead of ~20 tensor ops. x: rows x cols contiguous
// float32 (one row per channel of a per-channel observer, one row per tensor otherwise); lo0 / hi0: the observer's
// running min / max per row, updated in place; scale / zp: the quantizer's buffers, written; range: the last row's
// batch min / max. ema: 0 min/max, 1 moving average with constant c (first_check: a per-tensor state still at
// +inf / -inf takes the batch's range). Returns 1 and writes nothing when x holds a NaN or an infinity (the caller
// then takes torch's path, which defines those cases).
int fxqat_observe(const float* x, int64_t rows, int64_t cols, float* lo0, float* hi0, int ema, float c,
                  int first_check, int qmin, int qmax, int symmetric, float eps, float* scale, int32_t* zp,
                  float* range, int threads) {
  std::vector<float> lo(rows), hi(rows);
  int bad = 0;
  if (rows == 1) {  // one tensor: chunks over the threads
    const int64_t grain = 1 << 15, chunks = (cols + grain - 1) / grain;
    float mn = INFINITY, mx = -INFINITY;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min : mn) reduction(max : mx) \
    reduction(| : bad) if (chunks > 1 && threads > 1)
    for (int64_t k = 0; k < chunks; ++k) {
      int64_t b = k * grain, e = b + grain < cols ? b + grain : cols;
      float a, z;
      bad |= row_range(x + b, e - b, 1.0f, &a, &z);
      mn = a < mn ? a : mn;
      mx = z > mx ? z : mx;
    }
    lo[0] = mn, hi[0] = mx;
  } else {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) \
    if (rows * cols > (1 << 16) && threads > 1)
    for (int64_t r = 0; r < rows; ++r) bad |= row_range(x + r * cols, cols, 1.0f, &lo[r], &hi[r]);
  }
  if (bad || cols == 0) return 1;
  for (int64_t r = 0; r < rows; ++r)
    row_qparams(lo[r], hi[r], lo0 + r, hi0 + r, ema, c, first_check, qmin, qmax, symmetric, eps, scale + r, zp + r);
  range[0] = lo[rows - 1], range[1] = hi[rows - 1];
  return 0;
}

// QAT's BN-folded weight in one pass per row (fxqat.quant.folded_fq): out = q(w * f) / f per output channel r, with q
// fxqat_fq8c's per-channel fake-quant and, when observe is set, the observer first updated from the rows' min / max
// of w * f (as fxqat_observe): the same row functions with the factor f. Each product, quotient and rounding is the
// one torch's ops make (mul, the per-channel kernel, div), so out and mask equal the unfused ops' bit for bit.
// Returns 1 and writes nothing when w * f holds a NaN or an infinity (the caller then runs torch's ops).
int fxqat_fold_fq(const float* w, const float* f, int64_t rows, int64_t cols, int observe, float* lo0, float* hi0,
                  int ema, float c, int qmin, int qmax, int symmetric, float eps, float* scale, int32_t* zp, float* y,
                  uint8_t* mask, int threads) {
  const bool par = rows * cols > (1 << 16) && threads > 1;
  if (observe) {
    std::vector<float> lo(rows), hi(rows);
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (par)
    for (int64_t r = 0; r < rows; ++r) bad |= row_range(w + r * cols, cols, f[r], &lo[r], &hi[r]);
    if (bad || cols == 0) return 1;
    for (int64_t r = 0; r < rows; ++r)
      row_qparams(lo[r], hi[r], lo0 + r, hi0 + r, ema, c, 0, qmin, qmax, symmetric, eps, scale + r, zp + r);
  }
#pragma omp parallel for num_threads(threads) schedule(static) if (par)
  for (int64_t r = 0; r < rows; ++r)
    fqc_row(w + r * cols, y + r * cols, mask ? mask + r * cols : nullptr, cols, f[r], scale[r], float(zp[r]),
            float(qmin), float(qmax));
  return 0;
}

// Its backward, the unfused ops' chain rule in one pass per row: dw = ((g / f) * mask) * f (div, the per-channel
// kernel's dY * mask, mul: the same bits), and df[r] = sum_i -g * ((q / f) / f) + sum_i ((g / f) * mask) * w (div's
// and mul's gradients for f, each term rounded as torch rounds it, summed in double in vector lanes: torch sums in
// float, so df agrees with it within float32 summation error, not bit for bit). out = q / f, as the forward wrote it.
__attribute__((target_clones("avx512f", "avx2", "default")))
static float fold_grad_row(const float* g, const float* w, const float* out, const uint8_t* mask, float* dw,
                           int64_t n, float fr) {
  double sd = 0.0, sm = 0.0;
#pragma omp simd reduction(+ : sd, sm)  // partial sums in vector lanes: a single running sum was ~4 cycles a value
  for (int64_t i = 0; i < n; ++i) {
    float a = g[i] / fr;
    float b = a * float(mask[i]);
    dw[i] = b * fr;
    float t = out[i] / fr;
    sd += double(-g[i] * t);
    sm += double(b * w[i]);
  }
  return float(sd + sm);
}

void fxqat_fold_fq_grad(const float* g, const float* w, const float* out, const uint8_t* mask, const float* f,
                        int64_t rows, int64_t cols, float* dw, float* df, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols > (1 << 16) && threads > 1)
  for (int64_t r = 0; r < rows; ++r)
    df[r] = fold_grad_row(g + r * cols, w + r * cols, out + r * cols, mask + r * cols, dw + r * cols, cols, f[r]);
}
}  // extern "C"
