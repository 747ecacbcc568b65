// fxqat's direct oneDNN convolution, residual add and chains of them (below) for the INT8 torch model (QAT's kernels:
// qat.cpp): one primitive per layer and input shape, created once and executed with the caller's buffers. torch's
// onednn::qconv2d_pointwise rebuilds its descriptors on every call (26-54 us a call on a 2-core EPYC); executing a
// kept primitive costs a few microseconds. uint8 NHWC in, uint8 (requantized) or float32
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
