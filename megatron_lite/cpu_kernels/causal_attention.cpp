// Causal self-attention for CPU training in fp32, head dimension 64, AVX-512.
//
// q, k, v are [n, T, 64] (n = batch x heads), contiguous, T a multiple of 32. The work goes in
// blocks of 8 query rows: a block's scores against the keys it may see stay in a per-thread
// scratch row buffer, their softmax is written to `probs` (kept for backward, as the blocked
// torch path keeps them), and the products run in register tiles of 8 rows x 32 columns. MKL's
// batched products of these 64-wide shapes ran at about 75% of a thread's peak here; the tiles
// keep every operand of the inner loop in registers or L1 (megatron_lite/cpu_kernels/__init__.py).
//
// probs holds, per head, block b (rows 8b .. 8b+7) as 8 rows of 8b+8 columns at offset
// 32 b (b + 1); the columns past a row's own position are zero.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kDim = 64;   // head dimension
constexpr int64_t kRows = 8;   // query rows per block
constexpr int64_t kCols = 32;  // key columns per score tile

inline int64_t block_offset(int64_t b) { return 32 * b * (b + 1); }

// c[8, 32] = a[8, 64] (rows contiguous) . bt[64, 32 columns of a row-major [64, ldb] matrix].
inline void tile_a_bt(float* c, int64_t ldc, const float* a, const float* bt, int64_t ldb) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < kDim; ++d) {
    const __m512 b0 = _mm512_loadu_ps(bt + d * ldb), b1 = _mm512_loadu_ps(bt + d * ldb + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * kDim + d]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}

// out[8, 64] = a[8, kn] (row stride lda) . b[kn, 64] (rows contiguous).
inline void rows_a_b(float* out, const float* a, int64_t lda, const float* b, int64_t kn) {
  for (int64_t half = 0; half < kDim; half += 32) {
    __m512 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t l = 0; l < kn; ++l) {
      const float* row = b + l * kDim + half;
      const __m512 b0 = _mm512_loadu_ps(row), b1 = _mm512_loadu_ps(row + 16);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_set1_ps(a[r * lda + l]);
        acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm512_storeu_ps(out + r * kDim + half, acc[r][0]);
      _mm512_storeu_ps(out + r * kDim + half + 16, acc[r][1]);
    }
  }
}

// acc[l, 0:64] += sum_r a[r * lda + l] * b[r, 0:64] for l < kn: a rank-8 update of [kn, 64].
inline void add_at_b(float* acc, const float* a, int64_t lda, const float* b, int64_t kn) {
  for (int64_t half = 0; half < kDim; half += 32) {
    __m512 rows[kRows][2];
    for (int r = 0; r < kRows; ++r) {
      rows[r][0] = _mm512_loadu_ps(b + r * kDim + half);
      rows[r][1] = _mm512_loadu_ps(b + r * kDim + half + 16);
    }
    for (int64_t l = 0; l < kn; ++l) {
      float* out = acc + l * kDim + half;
      __m512 c0 = _mm512_loadu_ps(out), c1 = _mm512_loadu_ps(out + 16);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_set1_ps(a[r * lda + l]);
        c0 = _mm512_fmadd_ps(x, rows[r][0], c0);
        c1 = _mm512_fmadd_ps(x, rows[r][1], c1);
      }
      _mm512_storeu_ps(out, c0);
      _mm512_storeu_ps(out + 16, c1);
    }
  }
}

void check_inputs(const std::vector<torch::Tensor>& tensors) {
  const auto& q = tensors[0];
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kDim && q.size(1) % kCols == 0,
              "causal_attention kernel: q must be [n, T, 64] with T a multiple of 32, got ",
              q.sizes());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                "causal_attention kernel: every tensor must be a contiguous fp32 CPU tensor");
  }
  for (size_t i = 1; i < 3 && i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].sizes() == q.sizes(), "causal_attention kernel: q, k and v differ in shape");
  }
}

}  // namespace

// (out, probs) of softmax(q k^T / 8 + causal mask) v.
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
  check_inputs({q, k, v});
  const int64_t n = q.size(0), T = q.size(1), blocks = T / kRows;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  const auto kt = k.transpose(1, 2).contiguous();  // [n, 64, T]: score tiles read its rows
  auto out = torch::empty_like(q);
  const int64_t per_head = block_offset(blocks);
  auto probs = torch::empty({n, per_head}, q.options());
  const float *Q = q.data_ptr<float>(), *KT = kt.data_ptr<float>(), *V = v.data_ptr<float>();
  float *O = out.data_ptr<float>(), *P = probs.data_ptr<float>();
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kRows * T);
    for (int64_t t = begin; t < end; ++t) {
      // Blocks in pairs (j, blocks - 1 - j) of equal total work, so that each thread's
      // contiguous range of t gets its share of the triangle even for one head.
      const int64_t h = t / blocks, j = t % blocks;
      const int64_t b = j % 2 == 0 ? j / 2 : blocks - 1 - j / 2;
      const int64_t i0 = b * kRows, kn = i0 + kRows, tiles = (kn + kCols - 1) / kCols;
      const float* q_rows = Q + (h * T + i0) * kDim;
      float* p = P + h * per_head + block_offset(b);
      float* s = scratch.data();
      for (int64_t tile = 0; tile < tiles; ++tile) {
        tile_a_bt(s + tile * kCols, T, q_rows, KT + h * kDim * T + tile * kCols, T);
      }
      for (int64_t r = 0; r < kRows; ++r) {
        const float* row = s + r * T;
        const int64_t seen = i0 + r + 1;  // keys 0 .. i0 + r
        float top = row[0];
        for (int64_t c = 1; c < seen; ++c) top = std::max(top, row[c]);
        float sum = 0.f;
        float* prob = p + r * kn;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < seen; ++c) {
          const float e = std::exp((row[c] - top) * scale);
          prob[c] = e;
          sum += e;
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t c = 0; c < seen; ++c) prob[c] *= inv;
        for (int64_t c = seen; c < kn; ++c) prob[c] = 0.f;
      }
      rows_a_b(O + (h * T + i0) * kDim, p, kn, V + h * T * kDim, kn);
    }
  });
  return {out, probs};
}

// (dq, dk, dv) from the output's gradient and what forward kept.
std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k,
                                    torch::Tensor v, torch::Tensor out, torch::Tensor probs) {
  check_inputs({q, k, v, grad, out, probs});
  const int64_t n = q.size(0), T = q.size(1), blocks = T / kRows, per_head = block_offset(blocks);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  probs.dim() == 2 && probs.size(0) == n && probs.size(1) == per_head,
              "causal_attention kernel: backward's tensors do not match its forward's");
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  const auto vt = v.transpose(1, 2).contiguous();  // [n, 64, T]
  auto dq = torch::empty_like(q), dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  const float *G = grad.data_ptr<float>(), *Q = q.data_ptr<float>(), *K = k.data_ptr<float>();
  const float *VT = vt.data_ptr<float>(), *O = out.data_ptr<float>(), *P = probs.data_ptr<float>();
  float *dQ = dq.data_ptr<float>(), *dK = dk.data_ptr<float>(), *dV = dv.data_ptr<float>();
  // By heads: every block of a head adds into all of that head's dk and dv rows before it.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kRows * T);
    float* ds = scratch.data();
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i0 = b * kRows, kn = i0 + kRows, tiles = (kn + kCols - 1) / kCols;
        const float* p = P + h * per_head + block_offset(b);
        const float* g = G + (h * T + i0) * kDim;
        for (int64_t tile = 0; tile < tiles; ++tile) {  // dP = dO v^T
          tile_a_bt(ds + tile * kCols, T, g, VT + h * kDim * T + tile * kCols, T);
        }
        for (int64_t r = 0; r < kRows; ++r) {
          // dS = P * (dP - rowsum(dP * P)), the row sum being rowsum(dO * O); times the
          // scores' scale, which dq and dk take.
          const float* o = O + (h * T + i0 + r) * kDim;
          float row_dot = 0.f;
#pragma omp simd reduction(+ : row_dot)
          for (int64_t c = 0; c < kDim; ++c) row_dot += g[r * kDim + c] * o[c];
          const float* prob = p + r * kn;
          float* row = ds + r * T;
#pragma omp simd
          for (int64_t c = 0; c < kn; ++c) row[c] = prob[c] * (row[c] - row_dot) * scale;
        }
        rows_a_b(dQ + (h * T + i0) * kDim, ds, T, K + h * T * kDim, kn);
        add_at_b(dK + h * T * kDim, ds, T, Q + (h * T + i0) * kDim, kn);
        add_at_b(dV + h * T * kDim, p, kn, g, kn);
      }
    }
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal attention forward (out, probs)");
  m.def("backward", &backward, "causal attention backward (dq, dk, dv)");
}
