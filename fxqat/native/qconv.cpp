// fxqat's direct oneDNN convolution (and residual add, and QAT's fused 8-bit fake-quant: below): one primitive per
// layer and input shape, created once
// and executed with the caller's buffers. torch's onednn::qconv2d_pointwise rebuilds its descriptors on every call (26-54 us a call on a
// 2-core EPYC); executing a kept primitive costs a few microseconds. uint8 NHWC in, uint8 (requantized) or float32
// NHWC out; per-channel int8 weights; SiLU (swish) or ReLU fused; input and output zero points; float32 bias.
// Called from Python through ctypes with the GIL held: one call at a time per process, so a primitive's scratchpad
// and its argument memories are never shared by two running calls.
#include <oneapi/dnnl/dnnl.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <unordered_map>
#include <vector>

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {
thread_local std::string last_error;

// A kept primitive: its engine, stream and argument memories. io holds the memories whose data handles each run
// points at the caller's buffers, in call order (the inputs, then the output).
struct Prim {
  engine eng{engine::kind::cpu, 0};
  stream strm{eng};
  primitive prim;
  std::unordered_map<int, memory> args;
  std::vector<memory> io;
  std::string impl;
};

memory vec_f32(const engine& eng, const float* v, int n) {
  memory m(memory::desc({n}, dt::f32, tag::a), eng);
  std::memcpy(m.get_data_handle(), v, sizeof(float) * n);
  return m;
}

// Run f; 0, or 1 with the exception's message kept for fxqat_qconv_error.
template <class F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// make(p) fills a new Prim; the Prim, or nullptr with the exception's message kept for fxqat_qconv_error.
template <class F>
void* made(F make) {
  auto* p = new Prim();
  if (guarded([&] { make(*p); })) {
    delete p;
    return nullptr;
  }
  return p;
}

// Point io at the caller's buffers and execute; 0, or 1 with the message kept.
int run(void* handle, std::initializer_list<void*> buffers) {
  auto* p = static_cast<Prim*>(handle);
  return guarded([&] {
    size_t k = 0;
    for (void* b : buffers) p->io[k++].set_data_handle(b);
    p->prim.execute(p->strm, p->args);
    p->strm.wait();
  });
}

memory scalar_s32(const engine& eng, int v) {
  memory m(memory::desc({1}, dt::s32, tag::a), eng);
  *static_cast<int*>(m.get_data_handle()) = v;
  return m;
}
}  // namespace

extern "C" {

int fxqat_qconv_abi() { return 9; }

const char* fxqat_qconv_error() { return last_error.c_str(); }

// act: 0 none, 1 swish, 2 relu. float_out: float32 output (no output scale / zero point).
void* fxqat_qconv_create(int n, int c, int h, int w, int o, int kh, int kw, int sh, int sw, int ph, int pw, int dh,
                         int dw, int groups, const int8_t* weight, const float* w_scale, const float* bias,
                         float x_scale, int x_zp, float o_scale, int o_zp, int act, int float_out) {
  return made([&](Prim& cv) {
    memory::dims src_d{n, c, h, w};
    int eh = (kh - 1) * dh + 1, ew = (kw - 1) * dw + 1;
    memory::dims dst_d{n, o, (h + 2 * ph - eh) / sh + 1, (w + 2 * pw - ew) / sw + 1};
    memory::dims w_d = groups > 1 ? memory::dims{groups, o / groups, c / groups, kh, kw} : memory::dims{o, c, kh, kw};
    auto src_md = memory::desc(src_d, dt::u8, tag::nhwc);
    auto dst_md = memory::desc(dst_d, float_out ? dt::f32 : dt::u8, tag::nhwc);
    auto b_md = memory::desc({o}, dt::f32, tag::a);
    primitive_attr attr;
    attr.set_scales_mask(DNNL_ARG_SRC, 0);
    attr.set_scales_mask(DNNL_ARG_WEIGHTS, groups > 1 ? 3 : 1);  // per output channel
    if (!float_out) attr.set_scales_mask(DNNL_ARG_DST, 0);
    if (x_zp) attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
    if (o_zp && !float_out) attr.set_zero_points_mask(DNNL_ARG_DST, 0);
    post_ops po;
    if (act == 1) po.append_eltwise(algorithm::eltwise_swish, 1.f, 0.f);
    if (act == 2) po.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(po);
    attr.set_scratchpad_mode(scratchpad_mode::user);
    auto pd = convolution_forward::primitive_desc(
        cv.eng, prop_kind::forward_inference, algorithm::convolution_direct, src_md,
        memory::desc(w_d, dt::s8, tag::any), b_md, dst_md, {sh, sw}, {dh - 1, dw - 1}, {ph, pw}, {ph, pw}, attr);
    cv.prim = convolution_forward(pd);
    cv.impl = pd.impl_info_str();
    memory w_user(memory::desc(w_d, dt::s8, groups > 1 ? tag::goihw : tag::oihw), cv.eng,
                  const_cast<int8_t*>(weight));
    memory w_mem(pd.weights_desc(), cv.eng);
    reorder(w_user, w_mem).execute(cv.strm, w_user, w_mem);
    cv.strm.wait();
    cv.io = {memory(src_md, cv.eng, nullptr), memory(pd.dst_desc(), cv.eng, nullptr)};
    cv.args = {{DNNL_ARG_SRC, cv.io[0]},
               {DNNL_ARG_WEIGHTS, w_mem},
               {DNNL_ARG_BIAS, vec_f32(cv.eng, bias, o)},
               {DNNL_ARG_DST, cv.io[1]},
               {DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), cv.eng)},
               {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, vec_f32(cv.eng, &x_scale, 1)},
               {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, vec_f32(cv.eng, w_scale, o)}};
    if (!float_out) cv.args[DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST] = vec_f32(cv.eng, &o_scale, 1);
    if (x_zp) cv.args[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC] = scalar_s32(cv.eng, x_zp);
    if (o_zp && !float_out) cv.args[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST] = scalar_s32(cv.eng, o_zp);
  });
}

int fxqat_qconv_run(void* handle, void* x, void* y) { return run(handle, {x, y}); }

const char* fxqat_prim_impl(void* handle) { return static_cast<Prim*>(handle)->impl.c_str(); }

void fxqat_prim_destroy(void* handle) { delete static_cast<Prim*>(handle); }

// The residual add on codes: out = sat_u8(round_half_even(ka * a + kb * b + c0)), with ka = sa / so, kb = sb / so
// and c0 = zo - za * ka - zb * kb (a oneDNN binary add with per-tensor source scales and a linear post-op), for
// dense channels-last uint8 maps of one shape. Created once per layer and shape, like the convolutions.
void* fxqat_qadd_create(int n, int c, int h, int w, float ka, float kb, float c0) {
  return made([&](Prim& ad) {
    auto md = memory::desc({n, c, h, w}, dt::u8, tag::nhwc);
    primitive_attr attr;
    attr.set_scales_mask(DNNL_ARG_SRC_0, 0);
    attr.set_scales_mask(DNNL_ARG_SRC_1, 0);
    post_ops po;
    po.append_eltwise(algorithm::eltwise_linear, 1.f, c0);
    attr.set_post_ops(po);
    auto pd = binary::primitive_desc(ad.eng, algorithm::binary_add, md, md, md, attr);
    ad.prim = binary(pd);
    ad.impl = pd.impl_info_str();
    ad.io = {memory(md, ad.eng, nullptr), memory(md, ad.eng, nullptr), memory(md, ad.eng, nullptr)};
    ad.args = {{DNNL_ARG_SRC_0, ad.io[0]}, {DNNL_ARG_SRC_1, ad.io[1]}, {DNNL_ARG_DST, ad.io[2]},
               {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC_0, vec_f32(ad.eng, &ka, 1)},
               {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC_1, vec_f32(ad.eng, &kb, 1)}};
  });
}

int fxqat_qadd_run(void* handle, void* a, void* b, void* y) { return run(handle, {a, b, y}); }

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
// past 2^63 becomes INT64_MIN there and clamps to qmin, as here. mask may be null (no gradient wanted).
__attribute__((target_clones("avx512f", "avx2", "default")))
static void fqc_row(const float* x, float* y, uint8_t* mask, int64_t n, float scale, float zp, float qmin, float qmax) {
  const float inv = 1.0f / scale, big = 9.2233720368547758e18f;
  for (int64_t i = 0; i < n; ++i) {
    float q = std::nearbyint(x[i] * inv) + zp;
    float c = !(q < big) ? qmin : q < qmin ? qmin : q > qmax ? qmax : q;
    y[i] = (c - zp) * scale;
  }
  if (mask)
    for (int64_t i = 0; i < n; ++i) {
      float q = std::nearbyint(x[i] * inv) + zp;
      mask[i] = (q >= qmin) & (q <= qmax);
    }
}

void fxqat_fq8c(const float* x, float* y, uint8_t* mask, int64_t rows, int64_t cols, const float* scale,
                const int32_t* zp, int qmin, int qmax, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols > (1 << 16) && threads > 1)
  for (int64_t r = 0; r < rows; ++r)
    fqc_row(x + r * cols, y + r * cols, mask ? mask + r * cols : nullptr, cols, scale[r], float(zp[r]), float(qmin),
            float(qmax));
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

// The batch's min / max of one row, and whether it holds a NaN or an infinity.
__attribute__((target_clones("avx512f", "avx2", "default")))
static int row_range(const float* x, int64_t n, float* lo, float* hi) {
  float mn = INFINITY, mx = -INFINITY;
  int bad = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
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
      bad |= row_range(x + b, e - b, &a, &z);
      mn = a < mn ? a : mn;
      mx = z > mx ? z : mx;
    }
    lo[0] = mn, hi[0] = mx;
  } else {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) \
    if (rows * cols > (1 << 16) && threads > 1)
    for (int64_t r = 0; r < rows; ++r) bad |= row_range(x + r * cols, cols, &lo[r], &hi[r]);
  }
  if (bad || cols == 0) return 1;
  for (int64_t r = 0; r < rows; ++r)
    row_qparams(lo[r], hi[r], lo0 + r, hi0 + r, ema, c, first_check, qmin, qmax, symmetric, eps, scale + r, zp + r);
  range[0] = lo[rows - 1], range[1] = hi[rows - 1];
  return 0;
}


// QAT's BN-folded weight in one pass per row (fxqat.quant.folded_fq): out = q(w * f) / f per output channel r, with q
// the per-channel fake-quant of fxqat_fq8c and, when observe is set, the observer first updated from the rows' min /
// max of w * f (as fxqat_observe). Each product, quotient and rounding is the one torch's ops make (mul, the
// per-channel kernel, div), so out and mask equal the unfused ops' bit for bit. Returns 1 and writes nothing when
// w * f holds a NaN or an infinity (the caller then runs torch's ops).
__attribute__((target_clones("avx512f", "avx2", "default")))
static int fold_range(const float* w, int64_t n, float fr, float* lo, float* hi) {
  float mn = INFINITY, mx = -INFINITY;
  int bad = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    float v = w[i] * fr;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    bad |= !(v - v == 0.0f);
  }
  *lo = mn, *hi = mx;
  return bad;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void fold_fq_row(const float* w, float* y, uint8_t* mask, int64_t n, float fr, float scale, float zp, float qmin,
                        float qmax) {
  const float inv = 1.0f / scale, big = 9.2233720368547758e18f;
  for (int64_t i = 0; i < n; ++i) {
    float q = std::nearbyint((w[i] * fr) * inv) + zp;
    float c = !(q < big) ? qmin : q < qmin ? qmin : q > qmax ? qmax : q;
    y[i] = ((c - zp) * scale) / fr;
  }
  if (mask)
    for (int64_t i = 0; i < n; ++i) {
      float q = std::nearbyint((w[i] * fr) * inv) + zp;
      mask[i] = (q >= qmin) & (q <= qmax);
    }
}

int fxqat_fold_fq(const float* w, const float* f, int64_t rows, int64_t cols, int observe, float* lo0, float* hi0,
                  int ema, float c, int qmin, int qmax, int symmetric, float eps, float* scale, int32_t* zp, float* y,
                  uint8_t* mask, int threads) {
  const bool par = rows * cols > (1 << 16) && threads > 1;
  if (observe) {
    std::vector<float> lo(rows), hi(rows);
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (par)
    for (int64_t r = 0; r < rows; ++r) bad |= fold_range(w + r * cols, cols, f[r], &lo[r], &hi[r]);
    if (bad || cols == 0) return 1;
    for (int64_t r = 0; r < rows; ++r)
      row_qparams(lo[r], hi[r], lo0 + r, hi0 + r, ema, c, 0, qmin, qmax, symmetric, eps, scale + r, zp + r);
  }
#pragma omp parallel for num_threads(threads) schedule(static) if (par)
  for (int64_t r = 0; r < rows; ++r)
    fold_fq_row(w + r * cols, y + r * cols, mask ? mask + r * cols : nullptr, cols, f[r], scale[r], float(zp[r]),
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

namespace {
// A chain: kept convolutions, adds and channel copies run in order in one call, for the stretches of an INT8 model
// where only such steps follow each other (fxqat.modules.int8_chain builds it from the graph and the primitives its
// modules made). Every step reads and writes buffers named by slot: the slots' pointers are set once for buffers the
// chain owns and before each run for its inputs and outputs (slots 0 .. n_ext - 1).
struct Chain {
  struct Step {
    int kind;  // 0 primitive (conv: in, out; add: a, b, out), 1 channel copy
    Prim* prim;
    int s[3];
    int64_t pixels, src_c, src_off, dst_c, dst_off, c;
  };
  std::vector<void*> slot;
  std::vector<Step> steps;
  int n_ext = 0, threads = 1;
};

template <int B>
void copy_rows(const Chain::Step& st, const uint8_t* src, uint8_t* dst, int64_t b, int64_t e) {
  for (int64_t p = b; p < e; ++p) {
    const uint8_t* s = src + p * st.src_c + st.src_off;
    uint8_t* d = dst + p * st.dst_c + st.dst_off;
    if (B == 0) {
      std::memcpy(d, s, st.c);
    } else {
      for (int64_t k = 0; k < st.c; k += B) std::memcpy(d + k, s + k, B);  // a constant size: inlined moves
    }
  }
}

void copy_channels(const Chain::Step& st, const uint8_t* src, uint8_t* dst, int threads) {
  const int64_t P = st.pixels;
  auto f = st.c % 64 == 0 ? copy_rows<64> : st.c % 32 == 0 ? copy_rows<32> : st.c % 16 == 0 ? copy_rows<16>
                                                                                              : copy_rows<0>;
  const int n = P * st.c > (1 << 18) && threads > 1 ? threads : 1;
#pragma omp parallel for num_threads(n) schedule(static) if (n > 1)
  for (int t = 0; t < n; ++t) f(st, src, dst, P * t / n, P * (t + 1) / n);
}

}  // namespace

extern "C" {

void* fxqat_chain_create(int n_slots, int n_ext, int threads) {
  auto* ch = new Chain();
  ch->slot.assign(n_slots, nullptr);
  ch->n_ext = n_ext, ch->threads = threads;
  return ch;
}

void fxqat_chain_slot(void* chain, int i, void* ptr) { static_cast<Chain*>(chain)->slot[i] = ptr; }

// A kept primitive's step: a convolution reads slot a and writes slot y (b < 0); an add reads a and b, writes y.
void fxqat_chain_prim(void* chain, void* prim, int a, int b, int y) {
  Chain::Step st{0, static_cast<Prim*>(prim), {a, b, y}, 0, 0, 0, 0, 0, 0};
  static_cast<Chain*>(chain)->steps.push_back(st);
}

// dst[p, dst_off : dst_off + c] = src[p, src_off : src_off + c] for each of `pixels` pixels of two channels-last
// uint8 maps with src_c / dst_c channels (a channel slice made dense, or one input of a concat).
void fxqat_chain_copy(void* chain, int src, int64_t src_c, int64_t src_off, int dst, int64_t dst_c, int64_t dst_off,
                      int64_t c, int64_t pixels) {
  Chain::Step st{1, nullptr, {src, -1, dst}, pixels, src_c, src_off, dst_c, dst_off, c};
  static_cast<Chain*>(chain)->steps.push_back(st);
}

// Run every step with the inputs' and outputs' pointers in ext (n_ext of them); 0, or 1 with the message kept.
int fxqat_chain_run(void* chain, void* const* ext) {
  auto* ch = static_cast<Chain*>(chain);
  for (int i = 0; i < ch->n_ext; ++i) ch->slot[i] = ext[i];
  return guarded([&] {
    for (const auto& st : ch->steps) {
      if (st.kind == 1) {
        copy_channels(st, static_cast<const uint8_t*>(ch->slot[st.s[0]]), static_cast<uint8_t*>(ch->slot[st.s[2]]),
                      ch->threads);
        continue;
      }
      Prim* p = st.prim;
      p->io[0].set_data_handle(ch->slot[st.s[0]]);
      if (st.s[1] >= 0) {
        p->io[1].set_data_handle(ch->slot[st.s[1]]);
        p->io[2].set_data_handle(ch->slot[st.s[2]]);
      } else {
        p->io[1].set_data_handle(ch->slot[st.s[2]]);
      }
      p->prim.execute(p->strm, p->args);
      p->strm.wait();
    }
  });
}

void fxqat_chain_destroy(void* chain) { delete static_cast<Chain*>(chain); }
}
