// Attention for CPU training in fp32, head dimension 64, AVX-512: causal self-attention (GPT,
// LingLong) and attention with an additive bias that may take a gradient (T5).
//
// Causal: q, k, v are [n, T, 64] (n = batch x heads), contiguous, T a multiple of 32. The work goes in
// blocks of 8 query rows: a block's scores against the keys it may see stay in a per-thread
// scratch row buffer, their softmax is written to `probs` (kept for backward, as the blocked
// torch path keeps them), and the products run in register tiles of 8 rows x 32 columns. MKL's
// batched products of these 64-wide shapes ran at about 75% of a thread's peak here; the tiles
// keep every operand of the inner loop in registers or L1 (megatron_lite/cpu_kernels/__init__.py).
//
// probs holds, per head, block b (rows 8b .. 8b+7) as 8 rows of 8b+8 columns at offset
// 32 b (b + 1); the columns past a row's own position are zero. The *_lse entry points keep a
// log-sum-exp per row instead and recompute the probabilities in backward.
//
// Biased: q [b, h, S, 64] over k, v [b, h, T, 64], S a multiple of 8 and T of 32, every key
// seen, the bias added to the scaled scores; the probabilities [b, h, S, T] are kept, and in
// backward the scores' gradient is the bias's.
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
// Four rows of acc at a time: one row's sum over r is a chain of 8 dependent FMAs, so a single
// row would leave the FMA units waiting on their latency.
inline void add_at_b(float* acc, const float* a, int64_t lda, const float* b, int64_t kn) {
  constexpr int64_t kAt = 4;
  for (int64_t half = 0; half < kDim; half += 32) {
    __m512 rows[kRows][2];
    for (int r = 0; r < kRows; ++r) {
      rows[r][0] = _mm512_loadu_ps(b + r * kDim + half);
      rows[r][1] = _mm512_loadu_ps(b + r * kDim + half + 16);
    }
    int64_t l = 0;
    for (; l + kAt <= kn; l += kAt) {
      __m512 c[kAt][2];
      for (int64_t j = 0; j < kAt; ++j) {
        c[j][0] = _mm512_loadu_ps(acc + (l + j) * kDim + half);
        c[j][1] = _mm512_loadu_ps(acc + (l + j) * kDim + half + 16);
      }
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        for (int64_t j = 0; j < kAt; ++j) {
          const __m512 x = _mm512_set1_ps(a[r * lda + l + j]);
          c[j][0] = _mm512_fmadd_ps(x, rows[r][0], c[j][0]);
          c[j][1] = _mm512_fmadd_ps(x, rows[r][1], c[j][1]);
        }
      }
      for (int64_t j = 0; j < kAt; ++j) {
        _mm512_storeu_ps(acc + (l + j) * kDim + half, c[j][0]);
        _mm512_storeu_ps(acc + (l + j) * kDim + half + 16, c[j][1]);
      }
    }
    for (; l < kn; ++l) {
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

// Row r of a block (query i0 + r) sees keys 0 .. i0 + r. The softmax of its scores s [8, lds]
// goes to p [8, ldp], zero from the row's own position + 1 up to kn; lse (if given) gets each
// row's log-sum-exp of the scaled scores.
inline void softmax_block(const float* s, int64_t lds, int64_t i0, int64_t kn, float scale,
                          float* p, int64_t ldp, float* lse) {
  for (int64_t r = 0; r < kRows; ++r) {
    const float* row = s + r * lds;
    const int64_t seen = i0 + r + 1;
    float top = row[0];
    for (int64_t c = 1; c < seen; ++c) top = std::max(top, row[c]);
    float sum = 0.f;
    float* prob = p + r * ldp;
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
    if (lse != nullptr) lse[r] = top * scale + std::log(sum);
  }
}

// The same probabilities again from the scores and a log-sum-exp per row (which may span more
// keys than these: then they are this block's share of a wider softmax).
inline void probs_from_lse(const float* s, int64_t lds, int64_t i0, int64_t kn, float scale,
                           const float* lse, float* p, int64_t ldp) {
  for (int64_t r = 0; r < kRows; ++r) {
    const float* row = s + r * lds;
    const int64_t seen = i0 + r + 1;
    const float shift = lse[r];
    float* prob = p + r * ldp;
#pragma omp simd
    for (int64_t c = 0; c < seen; ++c) prob[c] = std::exp(row[c] * scale - shift);
    for (int64_t c = seen; c < kn; ++c) prob[c] = 0.f;
  }
}

// One block's backward, given its probabilities p [8, ldp]: dq rows written, dk and dv rows
// 0 .. kn - 1 of the head added to, the scores' gradient left in ds [8, T]. g, o, q_rows: the
// block's 8 rows of dO, O and q; T: the keys' row stride (of vt and ds).
inline void backward_block(const float* g, const float* o, const float* p, int64_t ldp,
                           const float* vt, const float* k, const float* q_rows, int64_t T,
                           int64_t kn, float scale, float* ds, float* dq_rows,
                           float* dk, float* dv) {
  const int64_t tiles = (kn + kCols - 1) / kCols;
  for (int64_t tile = 0; tile < tiles; ++tile) {  // dP = dO v^T
    tile_a_bt(ds + tile * kCols, T, g, vt + tile * kCols, T);
  }
  for (int64_t r = 0; r < kRows; ++r) {
    // dS = P * (dP - rowsum(dP * P)), the row sum being rowsum(dO * O); times the scores'
    // scale, which dq and dk take.
    float row_dot = 0.f;
#pragma omp simd reduction(+ : row_dot)
    for (int64_t c = 0; c < kDim; ++c) row_dot += g[r * kDim + c] * o[r * kDim + c];
    const float* prob = p + r * ldp;
    float* row = ds + r * T;
#pragma omp simd
    for (int64_t c = 0; c < kn; ++c) row[c] = prob[c] * (row[c] - row_dot) * scale;
  }
  rows_a_b(dq_rows, ds, T, k, kn);
  add_at_b(dk, ds, T, q_rows, kn);
  add_at_b(dv, p, ldp, g, kn);
}

// Block b of a head, in an order that pairs blocks (j, blocks - 1 - j) of equal total work,
// so that each thread's contiguous range gets its share of the triangle even for one head.
inline int64_t paired_block(int64_t j, int64_t blocks) {
  return j % 2 == 0 ? j / 2 : blocks - 1 - j / 2;
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

// softmax(q k^T / 8 + causal mask) v: (out, probs), or (out, lse) with `keep_lse`, where lse
// [n, T] holds each row's log-sum-exp and backward recomputes the probabilities from it.
std::vector<torch::Tensor> attend(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  bool keep_lse) {
  check_inputs({q, k, v});
  const int64_t n = q.size(0), T = q.size(1), blocks = T / kRows, per_head = block_offset(blocks);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  const auto kt = k.transpose(1, 2).contiguous();  // [n, 64, T]: score tiles read its rows
  auto out = torch::empty_like(q);
  auto kept = keep_lse ? torch::empty({n, T}, q.options()) : torch::empty({n, per_head}, q.options());
  const float *Q = q.data_ptr<float>(), *KT = kt.data_ptr<float>(), *V = v.data_ptr<float>();
  float *O = out.data_ptr<float>(), *kept_ptr = kept.data_ptr<float>();
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((keep_lse ? 2 : 1) * kRows * T);
    float* s = scratch.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / blocks, b = paired_block(t % blocks, blocks);
      const int64_t i0 = b * kRows, kn = i0 + kRows, tiles = (kn + kCols - 1) / kCols;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        tile_a_bt(s + tile * kCols, T, Q + (h * T + i0) * kDim, KT + h * kDim * T + tile * kCols, T);
      }
      float* p = keep_lse ? s + kRows * T : kept_ptr + h * per_head + block_offset(b);
      const int64_t ldp = keep_lse ? T : kn;
      softmax_block(s, T, i0, kn, scale, p, ldp, keep_lse ? kept_ptr + h * T + i0 : nullptr);
      rows_a_b(O + (h * T + i0) * kDim, p, ldp, V + h * T * kDim, kn);
    }
  });
  return {out, kept};
}

// (dq, dk, dv) from the output's gradient and what `attend` kept: probs, or with `from_lse` a
// log-sum-exp per row (out and lse may be those of a wider softmax that these keys are part of).
std::vector<torch::Tensor> attend_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k,
                                           torch::Tensor v, torch::Tensor out,
                                           torch::Tensor kept, bool from_lse) {
  check_inputs({q, k, v, grad, out, kept});
  const int64_t n = q.size(0), T = q.size(1), blocks = T / kRows, per_head = block_offset(blocks);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && kept.dim() == 2 &&
                  kept.size(0) == n && kept.size(1) == (from_lse ? T : per_head),
              "causal_attention kernel: backward's tensors do not match its forward's");
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  const auto vt = v.transpose(1, 2).contiguous();  // [n, 64, T]
  const auto kt = from_lse ? k.transpose(1, 2).contiguous() : torch::Tensor();
  auto dq = torch::empty_like(q), dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  const float *G = grad.data_ptr<float>(), *Q = q.data_ptr<float>(), *K = k.data_ptr<float>();
  const float *VT = vt.data_ptr<float>(), *O = out.data_ptr<float>();
  const float *kept_ptr = kept.data_ptr<float>(), *KT = from_lse ? kt.data_ptr<float>() : nullptr;
  float *dQ = dq.data_ptr<float>(), *dK = dk.data_ptr<float>(), *dV = dv.data_ptr<float>();
  // By heads: every block of a head adds into all of that head's dk and dv rows before it.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((from_lse ? 3 : 1) * kRows * T);
    float *ds = scratch.data(), *s = ds + kRows * T, *p_lse = s + kRows * T;
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i0 = b * kRows, kn = i0 + kRows;
        const float* p = kept_ptr + h * per_head + block_offset(b);
        int64_t ldp = kn;
        if (from_lse) {
          const int64_t tiles = (kn + kCols - 1) / kCols;
          for (int64_t tile = 0; tile < tiles; ++tile) {
            tile_a_bt(s + tile * kCols, T, Q + (h * T + i0) * kDim, KT + h * kDim * T + tile * kCols, T);
          }
          probs_from_lse(s, T, i0, kn, scale, kept_ptr + h * T + i0, p_lse, T);
          p = p_lse;
          ldp = T;
        }
        backward_block(G + (h * T + i0) * kDim, O + (h * T + i0) * kDim, p, ldp,
                       VT + h * kDim * T, K + h * T * kDim, Q + (h * T + i0) * kDim, T, kn,
                       scale, ds, dQ + (h * T + i0) * kDim, dK + h * T * kDim, dV + h * T * kDim);
      }
    }
  });
  return {dq, dk, dv};
}

namespace {

// Row r of a block: x = s * scale + bias (kept in s, the bias's rows `bias_rows` apart), and
// its softmax over all T keys into p [8, T].
inline void biased_softmax_block(float* s, int64_t T, const float* bias, int64_t bias_rows,
                                 float scale, float* p) {
  for (int64_t r = 0; r < kRows; ++r) {
    float* row = s + r * T;
    const float* add = bias + r * bias_rows;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t c = 0; c < T; ++c) {
      row[c] = row[c] * scale + add[c];
      top = std::max(top, row[c]);
    }
    float sum = 0.f;
    float* prob = p + r * T;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < T; ++c) {
      const float e = std::exp(row[c] - top);
      prob[c] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t c = 0; c < T; ++c) prob[c] *= inv;
  }
}

struct BiasStrides {  // element strides of a [b | 1, h | 1, S | 1, T] bias; 0 where broadcast
  int64_t batch, head, row;
};

BiasStrides check_biased_inputs(const torch::Tensor& q, const torch::Tensor& k,
                                const torch::Tensor& v, const torch::Tensor& bias) {
  TORCH_CHECK(q.dim() == 4 && q.size(3) == kDim && q.size(2) % kRows == 0 && k.dim() == 4 &&
                  k.size(2) % kCols == 0,
              "biased_attention kernel: q must be [b, h, S, 64] and k, v [b, h, T, 64] with S a "
              "multiple of 8 and T of 32, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == kDim,
              "biased_attention kernel: q, k and v do not match: ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  for (const auto& t : {q, k, v}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                "biased_attention kernel: q, k and v must be contiguous fp32 CPU tensors");
  }
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == torch::kFloat32 && bias.dim() == 4 &&
                  bias.size(3) == k.size(2) && bias.stride(3) == 1,
              "biased_attention kernel: the bias must be an fp32 CPU tensor [b | 1, h | 1, S | 1, T] "
              "with contiguous rows, got ", bias.sizes());
  auto stride = [&](int d, int64_t full) {
    TORCH_CHECK(bias.size(d) == 1 || bias.size(d) == full,
                "biased_attention kernel: the bias's dim ", d, " must be 1 or ", full);
    return bias.size(d) == 1 ? int64_t{0} : bias.stride(d);
  };
  return {stride(0, q.size(0)), stride(1, q.size(1)), stride(2, q.size(2))};
}

}  // namespace

// softmax(q k^T * scale + bias) v: (out, probs).
std::vector<torch::Tensor> biased_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor bias, double scale_) {
  const BiasStrides bs = check_biased_inputs(q, k, v, bias);
  const int64_t heads = q.size(1), n = q.size(0) * heads, S = q.size(2), T = k.size(2);
  const int64_t blocks = S / kRows;
  const float scale = static_cast<float>(scale_);
  const auto kt = k.transpose(2, 3).contiguous();  // [b, h, 64, T]: score tiles read its rows
  auto out = torch::empty_like(q);
  auto probs = torch::empty({q.size(0), heads, S, T}, q.options());
  const float *Q = q.data_ptr<float>(), *KT = kt.data_ptr<float>(), *V = v.data_ptr<float>();
  const float* B = bias.data_ptr<float>();
  float *O = out.data_ptr<float>(), *P = probs.data_ptr<float>();
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kRows * T);
    float* s = scratch.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / blocks, i0 = (t % blocks) * kRows;
      for (int64_t tile = 0; tile < T / kCols; ++tile) {
        tile_a_bt(s + tile * kCols, T, Q + (h * S + i0) * kDim, KT + h * kDim * T + tile * kCols, T);
      }
      const float* bias_rows = B + (h / heads) * bs.batch + (h % heads) * bs.head + i0 * bs.row;
      float* p = P + (h * S + i0) * T;
      biased_softmax_block(s, T, bias_rows, bs.row, scale, p);
      rows_a_b(O + (h * S + i0) * kDim, p, T, V + h * T * kDim, T);
    }
  });
  return {out, probs};
}

// (dq, dk, dv, dbias) from the output's gradient and the kept probabilities; dbias [b, h, S, T]
// is the scores' gradient (before the bias's broadcast is summed away), or undefined when
// `bias_grad` is false.
std::vector<torch::Tensor> biased_attend_backward(torch::Tensor grad, torch::Tensor q,
                                                  torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor out, torch::Tensor probs,
                                                  double scale_, bool bias_grad) {
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && grad.is_contiguous() &&
                  out.is_contiguous() && probs.is_contiguous() && probs.dim() == 4 &&
                  probs.size(2) == q.size(2) && probs.size(3) == k.size(2),
              "biased_attention kernel: backward's tensors do not match its forward's");
  const int64_t heads = q.size(1), n = q.size(0) * heads, S = q.size(2), T = k.size(2);
  const float scale = static_cast<float>(scale_);
  const auto vt = v.transpose(2, 3).contiguous();  // [b, h, 64, T]
  auto dq = torch::empty_like(q), dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  auto dbias = bias_grad ? torch::empty_like(probs) : torch::Tensor();
  const float *G = grad.data_ptr<float>(), *Q = q.data_ptr<float>(), *K = k.data_ptr<float>();
  const float *VT = vt.data_ptr<float>(), *O = out.data_ptr<float>(), *P = probs.data_ptr<float>();
  float *dQ = dq.data_ptr<float>(), *dK = dk.data_ptr<float>(), *dV = dv.data_ptr<float>();
  float* dB = bias_grad ? dbias.data_ptr<float>() : nullptr;
  // By heads: every block of a head adds into all of that head's dk and dv rows.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(bias_grad ? 0 : kRows * T);
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t i0 = 0; i0 < S; i0 += kRows) {
        const int64_t row = h * S + i0;
        float* ds = bias_grad ? dB + row * T : scratch.data();
        // The scores' gradient unscaled (it is the bias's); dq and dk take the scale after.
        backward_block(G + row * kDim, O + row * kDim, P + row * T, T, VT + h * kDim * T,
                       K + h * T * kDim, Q + row * kDim, T, T, 1.0f, ds, dQ + row * kDim,
                       dK + h * T * kDim, dV + h * T * kDim);
      }
      if (scale != 1.0f) {
        for (int64_t i = 0; i < S * kDim; ++i) dQ[h * S * kDim + i] *= scale;
        for (int64_t i = 0; i < T * kDim; ++i) dK[h * T * kDim + i] *= scale;
      }
    }
  });
  return {dq, dk, dv, dbias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", [](torch::Tensor q, torch::Tensor k, torch::Tensor v) { return attend(q, k, v, false); },
        "causal attention forward: (out, probs)");
  m.def("backward", [](torch::Tensor g, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                       torch::Tensor out, torch::Tensor probs) {
          return attend_backward(g, q, k, v, out, probs, false);
        }, "causal attention backward from the kept probabilities: (dq, dk, dv)");
  m.def("forward_lse", [](torch::Tensor q, torch::Tensor k, torch::Tensor v) { return attend(q, k, v, true); },
        "causal attention forward: (out, log-sum-exp per row)");
  m.def("backward_lse", [](torch::Tensor g, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                           torch::Tensor out, torch::Tensor lse) {
          return attend_backward(g, q, k, v, out, lse, true);
        }, "causal attention backward, the probabilities recomputed from log-sum-exps: (dq, dk, dv)");
  m.def("biased_forward", &biased_attend, "softmax(q k^T * scale + bias) v: (out, probs)");
  m.def("biased_backward", &biased_attend_backward,
        "biased attention backward from the kept probabilities: (dq, dk, dv, dbias or None)");
}
