// loramux's CPU kernel for one decode step of batched LoRA (Punica's BGMV, "batched gather
// matrix-vector"): every row adds its own adapter's  x A^T B  to the base layer's output,
// reading that adapter's pair where it lies in the layer's stacks. The plain-torch path
// (inference/lora_backend.py, BatchedLoraLinear._gathered) first copies each row's pair out
// of the stacks (index_select), so a step moves every row's adapter bytes three times; on a
// CPU a decode step is bound by the bytes it moves. Here each row's pair is read once,
// converted to fp32 on the fly if the stacks hold bf16, and the delta is accumulated into the
// output in place: one call per layer instead of five ops.
//
//   y    [rows, out]        fp32 or bf16, contiguous; y += delta
//   x    [rows, in]         fp32 or bf16, contiguous
//   A    [cap, r_max, in]   fp32 or bf16, contiguous (lora_A, one adapter per position)
//   B    [cap, r_max, out]  same dtype as A, contiguous (lora_B transposed, scale folded)
//   ids  [rows]             int64: each row's adapter position; 0 = no adapter (skipped)
//   ranks[rows]             int64: the ranks to read for each row (clipped to r_max)
//
// Sums run in fp32 in a fixed order (eight lanes, summed pairwise, then the tail), so the
// result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Eight fp32 lanes through GCC's (and Clang's) vector extensions: AVX2 registers where the
// library is built for x86-64-v3, two SSE or NEON registers elsewhere. Loads and stores go
// through memcpy, so no alignment is assumed.
typedef float vf8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf8 load8(const c10::BFloat16* p) {  // bf16 is the high half of an fp32
  vh8 h;
  std::memcpy(&h, p, sizeof h);
  vu8 u = __builtin_convertvector(h, vu8) << 16;
  vf8 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof v); }
inline float sum8(vf8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// h[j] = a_j . x for the `rank` rows of `a` ([rank, n]), one row (one stream) at a time.
template <typename S>
inline void shrink(const S* a, const float* x, int64_t n, int64_t rank, float* h) {
  const int64_t whole = n - n % (2 * kLanes);
  for (int64_t j = 0; j < rank; ++j) {
    const S* aj = a + j * n;
    vf8 c0 = {}, c1 = {};
    for (int64_t k = 0; k < whole; k += 2 * kLanes) {
      c0 += load8(aj + k) * load8(x + k);
      c1 += load8(aj + k + kLanes) * load8(x + k + kLanes);
    }
    float s = sum8(c0 + c1);
    for (int64_t k = whole; k < n; ++k) s += to_float(aj[k]) * x[k];
    h[j] = s;
  }
}

// y += h B for `b` [rank, n], one rank at a time: each row of b is read as one stream (the
// output row stays in L1), which the hardware prefetchers follow better than `rank`
// interleaved streams.
template <typename S>
inline void expand(const S* b, const float* h, int64_t n, int64_t rank, float* y) {
  const int64_t whole = n - n % kLanes;
  for (int64_t j = 0; j < rank; ++j) {
    const S* bj = b + j * n;
    const float hj = h[j];
    for (int64_t k = 0; k < whole; k += kLanes) store8(y + k, load8(y + k) + hj * load8(bj + k));
    for (int64_t k = whole; k < n; ++k) y[k] += hj * to_float(bj[k]);
  }
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = to_float(src[k]);
}

inline void store_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
inline void store_row(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = c10::BFloat16(src[k]);  // round to nearest even
}

template <typename S, typename Y, typename X>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
         const at::Tensor& ids, const at::Tensor& ranks) {
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1);
  const int64_t cap = A.size(0), r_max = A.size(1);
  const X* xp = x.const_data_ptr<X>();
  const S* ap = A.const_data_ptr<S>();
  const S* bp = B.const_data_ptr<S>();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  const int64_t* rp = ranks.const_data_ptr<int64_t>();
  Y* yp = y.mutable_data_ptr<Y>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xrow(in), yrow(out), h(r_max);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t id = ip[i];
      const int64_t rank = std::min(rp[i], r_max);
      if (id <= 0 || id >= cap || rank <= 0) continue;
      load_row(xp + i * in, xrow.data(), in);
      const S* a = ap + id * r_max * in;
      shrink(a, xrow.data(), in, rank, h.data());
      load_row(yp + i * out, yrow.data(), out);
      expand(bp + id * r_max * out, h.data(), out, rank, yrow.data());
      store_row(yrow.data(), yp + i * out, out);
    }
  });
}

template <typename S, typename Y>
void dispatch_x(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& ids, const at::Tensor& ranks) {
  if (x.scalar_type() == at::kFloat) {
    run<S, Y, float>(y, x, A, B, ids, ranks);
  } else {
    run<S, Y, c10::BFloat16>(y, x, A, B, ids, ranks);
  }
}

template <typename S>
void dispatch_y(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& ids, const at::Tensor& ranks) {
  if (y.scalar_type() == at::kFloat) {
    dispatch_x<S, float>(y, x, A, B, ids, ranks);
  } else {
    dispatch_x<S, c10::BFloat16>(y, x, A, B, ids, ranks);
  }
}

bool float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

void bgmv_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
           const at::Tensor& ids, const at::Tensor& ranks) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && A.device().is_cpu() &&
                  B.device().is_cpu() && ids.device().is_cpu() && ranks.device().is_cpu(),
              "bgmv_: CPU tensors only");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && A.dim() == 3 && B.dim() == 3 && ids.dim() == 1 &&
                  ranks.dim() == 1,
              "bgmv_: y [rows, out], x [rows, in], A [cap, r, in], B [cap, r, out], ids and "
              "ranks [rows]");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && A.is_contiguous() && B.is_contiguous() &&
                  ids.is_contiguous() && ranks.is_contiguous(),
              "bgmv_: contiguous tensors only");
  TORCH_CHECK(x.size(0) == y.size(0) && ids.size(0) == y.size(0) && ranks.size(0) == y.size(0),
              "bgmv_: one id and one rank per row");
  TORCH_CHECK(A.size(2) == x.size(1) && B.size(2) == y.size(1) && A.size(0) == B.size(0) &&
                  A.size(1) == B.size(1),
              "bgmv_: the stacks do not fit the layer");
  TORCH_CHECK(float_or_bf16(y) && float_or_bf16(x) && float_or_bf16(A) &&
                  A.scalar_type() == B.scalar_type(),
              "bgmv_: fp32 or bf16 tensors, A and B of one dtype");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ranks.scalar_type() == at::kLong,
              "bgmv_: int64 ids and ranks");
  if (A.scalar_type() == at::kFloat) {
    dispatch_y<float>(y, x, A, B, ids, ranks);
  } else {
    dispatch_y<c10::BFloat16>(y, x, A, B, ids, ranks);
  }
}

}  // namespace

TORCH_LIBRARY(loramux, m) {
  m.def("bgmv_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor ids, Tensor ranks) -> ()");
}

TORCH_LIBRARY_IMPL(loramux, CPU, m) { m.impl("bgmv_", bgmv_); }
