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
// Biased (T5): q [b, h, S, 64] over k, v [b, h, T, 64], S a multiple of 8 and T of 32, with a
// bias added to the scaled scores that is read from its parts, never formed as [b, h, S, T]: a
// relative position bias given per distance (which takes a gradient), a per-key bias (padding
// masks) and a causal mask; attention dropout with its mask hashed from a seed (never stored).
// The probabilities [b, h, S, T] (before dropout) are kept for backward.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kDim = 64;   // head dimension
constexpr int64_t kRows = 8;   // query rows per block
constexpr int64_t kCols = 32;  // key columns per score tile

inline int64_t block_offset(int64_t b) { return 32 * b * (b + 1); }

// c[8, 32] = a[8, 64] (rows lda apart) . bt[64, 32 columns of a row-major [64, ldb] matrix].
inline void tile_a_bt(float* c, int64_t ldc, const float* a, int64_t lda, const float* bt,
                      int64_t ldb) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < kDim; ++d) {
    const __m512 b0 = _mm512_loadu_ps(bt + d * ldb), b1 = _mm512_loadu_ps(bt + d * ldb + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + d]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}

// out[8, 64] (rows ldo apart) = a[8, kn] (rows lda apart) . b[kn, 64] (rows ldb apart).
inline void rows_a_b(float* out, int64_t ldo, const float* a, int64_t lda, const float* b,
                     int64_t ldb, int64_t kn) {
  for (int64_t half = 0; half < kDim; half += 32) {
    __m512 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t l = 0; l < kn; ++l) {
      const float* row = b + l * ldb + half;
      const __m512 b0 = _mm512_loadu_ps(row), b1 = _mm512_loadu_ps(row + 16);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_set1_ps(a[r * lda + l]);
        acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm512_storeu_ps(out + r * ldo + half, acc[r][0]);
      _mm512_storeu_ps(out + r * ldo + half + 16, acc[r][1]);
    }
  }
}

// acc[l, 0:64] += sum_r a[r * lda + l] * b[r * ldb + 0:64] for l < kn: a rank-8 update of the
// contiguous [kn, 64] acc.
inline void add_at_b(float* acc, const float* a, int64_t lda, const float* b, int64_t ldb,
                     int64_t kn) {
  for (int64_t half = 0; half < kDim; half += 32) {
    __m512 rows[kRows][2];
    for (int r = 0; r < kRows; ++r) {
      rows[r][0] = _mm512_loadu_ps(b + r * ldb + half);
      rows[r][1] = _mm512_loadu_ps(b + r * ldb + half + 16);
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

// Where a block's 8 rows of one [.., 64] operand are: the first row and the rows' stride.
struct Rows {
  const float* at;
  int64_t ld;
};

// Attention dropout without a mask tensor: whether probability (row, j) of the [b, h, S, T]
// attention is kept is a hash of (seed, row, j) below (1 - p) 2^32, so backward recomputes the
// same mask. torch's generator drew a [8, 512, 512] uint8 mask in 12 ms here (6 ns a value),
// longer than half the attention; the hash costs a few instructions per 16 values. `threshold`
// 0 means no dropout.
struct Dropout {
  uint32_t seed, threshold;
  float inv_keep;  // 1 / (1 - p)
  bool on() const { return threshold != 0; }
};

inline uint32_t mix32(uint32_t x) {  // an invertible integer hash (lowbias32's constants)
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

inline __m512i mix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// The dropout of an attention at rate p, its mask drawn from `seed`; p == 0: none.
Dropout make_dropout(int64_t seed, double p) {
  TORCH_CHECK(0 <= p && p < 1, "attention kernel: dropout p must be in [0, 1), got ", p);
  const double kept = (1.0 - p) * 4294967296.0;  // (1 - p) 2^32
  const uint32_t threshold = p == 0 ? 0u : static_cast<uint32_t>(std::min(kept, 4294967295.0));
  const auto s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s) ^ mix32(static_cast<uint32_t>(s >> 32)), threshold,
          static_cast<float>(1.0 / (1.0 - p))};
}

// The hash key of attention row `row` (its index in [b * h * S]).
inline uint32_t row_key(const Dropout& drop, int64_t row) {
  return mix32(drop.seed ^ mix32(static_cast<uint32_t>(row) * 0x9e3779b9u +
                                 static_cast<uint32_t>(row >> 32)));
}

// Lanes c .. c + 15 of the attention row whose key is `key`: which are kept.
inline __mmask16 kept_lanes(const Dropout& drop, uint32_t key, int64_t c) {
  const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                          12, 13, 14, 15));
  const __m512i bits = mix32(_mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(key)),
                                              _mm512_mullo_epi32(cols, _mm512_set1_epi32(0x85ebca6b))));
  return _mm512_cmplt_epu32_mask(bits, _mm512_set1_epi32(static_cast<int>(drop.threshold)));
}

inline __mmask16 first_lanes(int64_t n) {  // the first min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// dropped[8, kn] (rows ldd apart) = p[8, kn] (rows ldp apart) * keep / (1 - p), for attention
// rows row0 .. row0 + 7.
inline void drop_block(const float* p, int64_t ldp, const Dropout& drop, int64_t row0,
                       int64_t kn, float* dropped, int64_t ldd) {
  const __m512 inv = _mm512_set1_ps(drop.inv_keep);
  for (int64_t r = 0; r < kRows; ++r) {
    const uint32_t key = row_key(drop, row0 + r);
    for (int64_t c = 0; c < kn; c += 16) {
      const __mmask16 lanes = first_lanes(kn - c);
      _mm512_mask_storeu_ps(dropped + r * ldd + c, lanes,
                            _mm512_maskz_mul_ps(kept_lanes(drop, key, c) & lanes,
                                                _mm512_maskz_loadu_ps(lanes, p + r * ldp + c), inv));
    }
  }
}

// One block's backward, given its probabilities p [8, ldp]: the block's dq rows written, dk and
// dv rows 0 .. kn - 1 of the head (contiguous) added to, the scores' gradient left in ds [8, T].
// g, o, q: the block's rows of dO, O and q; k: the head's keys; T: the row stride of vt and ds.
// With dropout (of attention rows row0 .. row0 + 7) the output was P_drop v,
// P_drop = P * keep / (1 - p): dv takes P_drop (formed in `dropped` [8, T]), and
// dP = dP_drop * keep / (1 - p), whose row sum against P is still rowsum(dO * O).
inline void backward_block(Rows g, Rows o, const float* p, int64_t ldp, const float* vt, Rows k,
                           Rows q, int64_t T, int64_t kn, float scale, float* ds, float* dq_rows,
                           int64_t lddq, float* dk, float* dv, const Dropout& drop = {0, 0, 1.f},
                           int64_t row0 = 0, float* dropped = nullptr) {
  const int64_t tiles = (kn + kCols - 1) / kCols;
  for (int64_t tile = 0; tile < tiles; ++tile) {  // dP = dO v^T
    tile_a_bt(ds + tile * kCols, T, g.at, g.ld, vt + tile * kCols, T);
  }
  for (int64_t r = 0; r < kRows; ++r) {
    // dS = P * (dP - rowsum(dP * P)), the row sum being rowsum(dO * O); times the scores'
    // scale, which dq and dk take.
    float row_dot = 0.f;
#pragma omp simd reduction(+ : row_dot)
    for (int64_t c = 0; c < kDim; ++c) row_dot += g.at[r * g.ld + c] * o.at[r * o.ld + c];
    const float* prob = p + r * ldp;
    float* row = ds + r * T;
    if (drop.on()) {
      const __m512 inv = _mm512_set1_ps(drop.inv_keep), dot = _mm512_set1_ps(row_dot);
      const __m512 vscale = _mm512_set1_ps(scale);
      const uint32_t key = row_key(drop, row0 + r);
      for (int64_t c = 0; c < kn; c += 16) {
        const __mmask16 lanes = first_lanes(kn - c);
        const __m512 dp = _mm512_maskz_mul_ps(kept_lanes(drop, key, c) & lanes,
                                              _mm512_maskz_loadu_ps(lanes, row + c), inv);
        _mm512_mask_storeu_ps(row + c, lanes,
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, prob + c),
                                                          _mm512_sub_ps(dp, dot)), vscale));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < kn; ++c) row[c] = prob[c] * (row[c] - row_dot) * scale;
    }
  }
  rows_a_b(dq_rows, lddq, ds, T, k.at, k.ld, kn);
  add_at_b(dk, ds, T, q.at, q.ld, kn);
  if (drop.on()) {
    drop_block(p, ldp, drop, row0, kn, dropped, T);
    add_at_b(dv, dropped, T, g.at, g.ld, kn);
  } else {
    add_at_b(dv, p, ldp, g.at, g.ld, kn);
  }
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
                                  bool keep_lse, double dropout_p = 0, int64_t seed = 0) {
  check_inputs({q, k, v});
  const Dropout drop = make_dropout(seed, dropout_p);
  TORCH_CHECK(!(keep_lse && drop.on()), "causal_attention kernel: no dropout with log-sum-exps");
  const int64_t n = q.size(0), T = q.size(1), blocks = T / kRows, per_head = block_offset(blocks);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  const auto kt = k.transpose(1, 2).contiguous();  // [n, 64, T]: score tiles read its rows
  auto out = torch::empty_like(q);
  auto kept = keep_lse ? torch::empty({n, T}, q.options()) : torch::empty({n, per_head}, q.options());
  const float *Q = q.data_ptr<float>(), *KT = kt.data_ptr<float>(), *V = v.data_ptr<float>();
  float *O = out.data_ptr<float>(), *kept_ptr = kept.data_ptr<float>();
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((keep_lse || drop.on() ? 2 : 1) * kRows * T);
    float *s = scratch.data(), *dropped = s + kRows * T;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / blocks, b = paired_block(t % blocks, blocks);
      const int64_t i0 = b * kRows, kn = i0 + kRows, tiles = (kn + kCols - 1) / kCols;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        tile_a_bt(s + tile * kCols, T, Q + (h * T + i0) * kDim, kDim,
                  KT + h * kDim * T + tile * kCols, T);
      }
      float* p = keep_lse ? s + kRows * T : kept_ptr + h * per_head + block_offset(b);
      const int64_t ldp = keep_lse ? T : kn;
      softmax_block(s, T, i0, kn, scale, p, ldp, keep_lse ? kept_ptr + h * T + i0 : nullptr);
      if (drop.on()) {
        drop_block(p, ldp, drop, h * T + i0, kn, dropped, T);
        rows_a_b(O + (h * T + i0) * kDim, kDim, dropped, T, V + h * T * kDim, kDim, kn);
      } else {
        rows_a_b(O + (h * T + i0) * kDim, kDim, p, ldp, V + h * T * kDim, kDim, kn);
      }
    }
  });
  return {out, kept};
}

// (dq, dk, dv) from the output's gradient and what `attend` kept: probs, or with `from_lse` a
// log-sum-exp per row (out and lse may be those of a wider softmax that these keys are part of).
std::vector<torch::Tensor> attend_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k,
                                           torch::Tensor v, torch::Tensor out,
                                           torch::Tensor kept, bool from_lse,
                                           double dropout_p = 0, int64_t seed = 0) {
  check_inputs({q, k, v, grad, out, kept});
  const Dropout drop = make_dropout(seed, dropout_p);
  TORCH_CHECK(!(from_lse && drop.on()), "causal_attention kernel: no dropout with log-sum-exps");
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
    std::vector<float> scratch((from_lse ? 3 : drop.on() ? 2 : 1) * kRows * T);
    float *ds = scratch.data(), *s = ds + kRows * T, *p_lse = s + kRows * T, *dropped = s;
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i0 = b * kRows, kn = i0 + kRows;
        const float* p = kept_ptr + h * per_head + block_offset(b);
        int64_t ldp = kn;
        if (from_lse) {
          const int64_t tiles = (kn + kCols - 1) / kCols;
          for (int64_t tile = 0; tile < tiles; ++tile) {
            tile_a_bt(s + tile * kCols, T, Q + (h * T + i0) * kDim, kDim,
                  KT + h * kDim * T + tile * kCols, T);
          }
          probs_from_lse(s, T, i0, kn, scale, kept_ptr + h * T + i0, p_lse, T);
          p = p_lse;
          ldp = T;
        }
        const int64_t row = h * T + i0;
        backward_block({G + row * kDim, kDim}, {O + row * kDim, kDim}, p, ldp, VT + h * kDim * T,
                       {K + h * T * kDim, kDim}, {Q + row * kDim, kDim}, T, kn, scale, ds,
                       dQ + row * kDim, kDim, dK + h * T * kDim, dV + h * T * kDim, drop, row,
                       dropped);
      }
    }
  });
  return {dq, dk, dv};
}

namespace {

// e^x for x <= 0, 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial
// of degree 6 (relative error under 2e-7), times 2^n; exactly 0 below -87 (T5's masked keys),
// where e^x leaves fp32's normal range. Inline, unlike glibc's vector expf, which is a call
// per 16 lanes.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), clamped);  // ln2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);              // and the rest
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

// The bias added to the scores, in parts (each may be absent):
//   rel [h, S + T - 1]: per head, the bias of key j for query i at column j - i + S - 1, the
//     diagonals of a Toeplitz matrix (T5's relative position bias);
//   keys [b, T]: added to every query's scores over the keys of batch row b (padding masks);
//   causal: keys after the query masked.
struct ScoreBias {
  const float* rel;
  const float* keys;
  bool causal;
  int64_t heads, S, T;
  const float* rel_row(int64_t n, int64_t i) const {
    return rel == nullptr ? nullptr : rel + (n % heads) * (S + T - 1) + (S - 1 - i);
  }
  const float* key_row(int64_t n) const { return keys == nullptr ? nullptr : keys + (n / heads) * T; }
};

// Row r of a block (query i0 + r of head n): x = s * scale + the bias (kept in s; the keys a
// causal row may not see at the lowest float), and its softmax over the T keys (a multiple of
// 16) into p [8, T].
inline void biased_softmax_block(float* s, int64_t T, const ScoreBias& bias, int64_t n,
                                 int64_t i0, float scale, float* p) {
  const __m512 vscale = _mm512_set1_ps(scale), lowest = _mm512_set1_ps(std::numeric_limits<float>::lowest());
  const float* keys = bias.key_row(n);
  for (int64_t r = 0; r < kRows; ++r) {
    float* row = s + r * T;
    const float* rel = bias.rel_row(n, i0 + r);
    const int64_t seen = bias.causal ? i0 + r + 1 : T;
    __m512 top = lowest;
    for (int64_t c = 0; c < T; c += 16) {
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + c), vscale);
      if (rel != nullptr) x = _mm512_add_ps(x, _mm512_loadu_ps(rel + c));
      if (keys != nullptr) x = _mm512_add_ps(x, _mm512_loadu_ps(keys + c));
      if (c + 16 > seen) {  // lanes c + l with c + l >= seen are masked
        const __mmask16 visible = seen <= c ? 0 : static_cast<__mmask16>((1u << (seen - c)) - 1);
        x = _mm512_mask_mov_ps(lowest, visible, x);
      }
      _mm512_storeu_ps(row + c, x);
      top = _mm512_max_ps(top, x);
    }
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    float* prob = p + r * T;
    for (int64_t c = 0; c < T; c += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + c), shift));
      _mm512_storeu_ps(prob + c, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t c = 0; c < T; c += 16) {
      _mm512_storeu_ps(prob + c, _mm512_mul_ps(_mm512_loadu_ps(prob + c), inv));
    }
  }
}

// A [b, h, rows, 64] operand read or written where it lies: its data and the element strides
// of its batch, head and row dims, each row's 64 values contiguous. n indexes batch x heads.
struct Heads {
  float* data;
  int64_t batch, head, row, heads;
  float* at(int64_t n, int64_t i) const {
    return data + (n / heads) * batch + (n % heads) * head + i * row;
  }
  Rows rows(int64_t n, int64_t i) const { return {at(n, i), row}; }
};

Heads heads_of(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.size(3) == kDim && t.stride(3) == 1 && t.device().is_cpu() &&
                  t.scalar_type() == torch::kFloat32,
              "biased_attention kernel: ", name, " must be an fp32 CPU tensor [b, h, rows, 64] "
              "with contiguous rows, got ", t.sizes(), " with strides ", t.strides());
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

// An empty [b, h, rows, 64] tensor laid out as [b, rows, h, 64], the layout the heads' merge
// (and its gradient) has, so that neither side copies between the two.
torch::Tensor empty_rows_major(const torch::Tensor& like) {
  return torch::empty({like.size(0), like.size(2), like.size(1), kDim}, like.options())
      .transpose(1, 2);
}

// [b, h, 64, rows] contiguous: the operand's rows as columns, which the score tiles and dP
// tiles read. By 16 rows at a time, so that both sides stay in cache whatever t's layout (torch's
// copy of a strided view, e.g. keys split off a fused key/value projection, ran 4x slower).
torch::Tensor transposed_heads(const torch::Tensor& t, const Heads& from) {
  const int64_t n = t.size(0) * t.size(1), rows = t.size(2);
  auto out = torch::empty({t.size(0), t.size(1), kDim, rows}, t.options());
  float* to = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t j0 = 0; j0 < rows; j0 += 16) {
        const int64_t j1 = std::min(j0 + 16, rows);
        for (int64_t d = 0; d < kDim; ++d) {
          float* dst = to + (h * kDim + d) * rows;
          for (int64_t j = j0; j < j1; ++j) dst[j] = from.at(h, j)[d];
        }
      }
    }
  });
  return out;
}

ScoreBias check_biased_inputs(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const torch::Tensor& rel,
                              const torch::Tensor& keys, bool causal) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) % kRows == 0 && k.dim() == 4 && k.size(2) % kCols == 0,
              "biased_attention kernel: q must be [b, h, S, 64] and k, v [b, h, T, 64] with S a "
              "multiple of 8 and T of 32, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1),
              "biased_attention kernel: q, k and v do not match: ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  const int64_t b = q.size(0), h = q.size(1), S = q.size(2), T = k.size(2);
  TORCH_CHECK(!causal || S == T, "biased_attention kernel: a causal mask needs S == T");
  auto check = [](const torch::Tensor& t, std::vector<int64_t> shape, const char* name) {
    TORCH_CHECK(!t.defined() || (t.device().is_cpu() && t.scalar_type() == torch::kFloat32 &&
                                 t.is_contiguous() && t.sizes() == shape),
                "biased_attention kernel: ", name, " must be a contiguous fp32 CPU tensor of "
                "shape ", shape, ", got ", t.defined() ? t.sizes() : at::IntArrayRef{});
    return t.defined() ? t.data_ptr<float>() : nullptr;
  };
  return {check(rel, {h, S + T - 1}, "rel"), check(keys, {b, T}, "keys"), causal, h, S, T};
}

}  // namespace

// softmax(q k^T * scale + bias) v: (out, probs). q, k, v are read where they lie (rows
// contiguous); out comes laid out as [b, S, h, 64].
std::vector<torch::Tensor> biased_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         c10::optional<torch::Tensor> rel,
                                         c10::optional<torch::Tensor> keys, bool causal,
                                         double scale_, double dropout_p, int64_t seed) {
  const ScoreBias bias = check_biased_inputs(q, k, v, rel.value_or(torch::Tensor()),
                                             keys.value_or(torch::Tensor()), causal);
  const Heads Q = heads_of(q, "q"), V = heads_of(v, "v");
  const int64_t heads = q.size(1), n = q.size(0) * heads, S = q.size(2), T = k.size(2);
  const int64_t blocks = S / kRows;
  const float scale = static_cast<float>(scale_);
  const auto kt = transposed_heads(k, heads_of(k, "k"));
  auto out = empty_rows_major(q);
  auto probs = torch::empty({q.size(0), heads, S, T}, q.options());
  const Dropout drop = make_dropout(seed, dropout_p);
  const Heads O = heads_of(out, "out");
  const float* KT = kt.data_ptr<float>();
  float* P = probs.data_ptr<float>();
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((drop.on() ? 2 : 1) * kRows * T);
    float *s = scratch.data(), *dropped = s + kRows * T;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / blocks, i0 = (t % blocks) * kRows;
      for (int64_t tile = 0; tile < T / kCols; ++tile) {
        tile_a_bt(s + tile * kCols, T, Q.at(h, i0), Q.row, KT + h * kDim * T + tile * kCols, T);
      }
      float* p = P + (h * S + i0) * T;
      biased_softmax_block(s, T, bias, h, i0, scale, p);
      if (drop.on()) {
        drop_block(p, T, drop, h * S + i0, T, dropped, T);
        rows_a_b(O.at(h, i0), O.row, dropped, T, V.at(h, 0), V.row, T);
      } else {
        rows_a_b(O.at(h, i0), O.row, p, T, V.at(h, 0), V.row, T);
      }
    }
  });
  return {out, probs};
}

// (dq, dk, dv, drel) from the output's gradient and the kept probabilities. drel [b, h, S+T-1]
// is the scores' gradient summed along each diagonal (the per-distance bias's gradient, before
// the sum over batch rows), or undefined when `rel_grad` is false. dq comes laid out as
// [b, S, h, 64], dk and dv contiguous.
std::vector<torch::Tensor> biased_attend_backward(torch::Tensor grad, torch::Tensor q,
                                                  torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor out, torch::Tensor probs,
                                                  double scale_, bool rel_grad,
                                                  double dropout_p, int64_t seed) {
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && probs.is_contiguous() &&
                  probs.dim() == 4 && probs.size(2) == q.size(2) && probs.size(3) == k.size(2),
              "biased_attention kernel: backward's tensors do not match its forward's");
  const Heads G = heads_of(grad, "grad"), Q = heads_of(q, "q"), K = heads_of(k, "k");
  const Heads O = heads_of(out, "out");
  const int64_t heads = q.size(1), n = q.size(0) * heads, S = q.size(2), T = k.size(2);
  const int64_t diagonals = S + T - 1;
  const float scale = static_cast<float>(scale_);
  const Dropout drop = make_dropout(seed, dropout_p);
  const auto vt = transposed_heads(v, heads_of(v, "v"));
  auto dq = empty_rows_major(q), dk = torch::zeros_like(k, at::MemoryFormat::Contiguous);
  auto dv = torch::zeros_like(v, at::MemoryFormat::Contiguous);
  auto drel = rel_grad ? torch::zeros({q.size(0), heads, diagonals}, q.options()) : torch::Tensor();
  const Heads dQ = heads_of(dq, "dq");
  const float *VT = vt.data_ptr<float>(), *P = probs.data_ptr<float>();
  float *dK = dk.data_ptr<float>(), *dV = dv.data_ptr<float>();
  float* dR = rel_grad ? drel.data_ptr<float>() : nullptr;
  // By heads: every block of a head adds into all of that head's dk and dv rows.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((drop.on() ? 2 : 1) * kRows * T);
    float *ds = scratch.data(), *dropped = ds + kRows * T;
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t i0 = 0; i0 < S; i0 += kRows) {
        const int64_t row = h * S + i0;
        // The scores' gradient unscaled (it is the bias's); dq and dk take the scale after.
        backward_block(G.rows(h, i0), O.rows(h, i0), P + row * T, T, VT + h * kDim * T,
                       K.rows(h, 0), Q.rows(h, i0), T, T, 1.0f, ds, dQ.at(h, i0), dQ.row,
                       dK + h * T * kDim, dV + h * T * kDim, drop, row, dropped);
        for (int64_t r = 0; dR != nullptr && r < kRows; ++r) {  // query i0 + r's diagonals
          float* to = dR + h * diagonals + (S - 1 - i0 - r);
          for (int64_t c = 0; c < T; c += 16) {
            _mm512_storeu_ps(to + c, _mm512_add_ps(_mm512_loadu_ps(to + c),
                                                   _mm512_loadu_ps(ds + r * T + c)));
          }
        }
      }
      if (scale != 1.0f) {
        for (int64_t i = 0; i < S; ++i) {
          float* dq_row = dQ.at(h, i);
          for (int64_t c = 0; c < kDim; ++c) dq_row[c] *= scale;
        }
        for (int64_t i = 0; i < T * kDim; ++i) dK[h * T * kDim + i] *= scale;
      }
    }
  });
  return {dq, dk, dv, drel};
}

// The keep mask [b, h, S, T] (1 = kept) that dropout at rate p with `seed` applies: for tests.
torch::Tensor dropout_keep_mask(int64_t b, int64_t h, int64_t S, int64_t T, double p,
                                int64_t seed) {
  TORCH_CHECK(T % 16 == 0, "dropout_keep_mask: T must be a multiple of 16");
  const Dropout drop = make_dropout(seed, p);
  auto keep = torch::ones({b, h, S, T}, torch::kUInt8);
  uint8_t* out = keep.data_ptr<uint8_t>();
  for (int64_t row = 0; drop.on() && row < b * h * S; ++row) {
    const uint32_t key = row_key(drop, row);
    for (int64_t c = 0; c < T; c += 16) {
      const __mmask16 lanes = kept_lanes(drop, key, c);
      for (int l = 0; l < 16; ++l) out[row * T + c + l] = (lanes >> l) & 1;
    }
  }
  return keep;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", [](torch::Tensor q, torch::Tensor k, torch::Tensor v, double dropout_p,
                      int64_t seed) { return attend(q, k, v, false, dropout_p, seed); },
        "causal attention forward, dropout's mask hashed from a seed: (out, probs)");
  m.def("backward", [](torch::Tensor g, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                       torch::Tensor out, torch::Tensor probs, double dropout_p, int64_t seed) {
          return attend_backward(g, q, k, v, out, probs, false, dropout_p, seed);
        }, "causal attention backward from the kept probabilities: (dq, dk, dv)");
  m.def("forward_lse", [](torch::Tensor q, torch::Tensor k, torch::Tensor v) { return attend(q, k, v, true); },
        "causal attention forward: (out, log-sum-exp per row)");
  m.def("backward_lse", [](torch::Tensor g, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                           torch::Tensor out, torch::Tensor lse) {
          return attend_backward(g, q, k, v, out, lse, true);
        }, "causal attention backward, the probabilities recomputed from log-sum-exps: (dq, dk, dv)");
  m.def("biased_forward", &biased_attend,
        "dropout(softmax(q k^T * scale + bias)) v, the bias from its parts (rel, keys, causal), "
        "the dropout's mask hashed from a seed: (out, probs)");
  m.def("dropout_keep_mask", &dropout_keep_mask,
        "the keep mask [b, h, S, T] of the biased attention's dropout at rate p from seed");
  m.def("biased_backward", &biased_attend_backward,
        "biased attention backward from the kept probabilities: (dq, dk, dv, drel or None)");
}
