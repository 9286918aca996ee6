// Weight-only quantised matmuls for x86 CPUs with AVX2: y = x @ w.T for int4 (groups of 32, w = q * scale +
// offset per group) and int8 (one scale per output row) weights. Built on first use by llama/cpu_kernels.py.
//
// PyTorch's packed kernels convert every weight to float and are bound by that unpacking, not by memory bandwidth:
// ~10 G weights/s at batch-1 decode on two AVX2 cores. Here the activations are
// quantised to int16 per group of 32 (scale = max|x| / 32767, finer than the bf16 PyTorch's kernels take), and
// each group's dot product is an integer one (vpmaddwd on weights widened to int16) scaled once per group: up to
// ~40 G weights/s on SmolLM2's larger int4 shapes, ~4x PyTorch's kernels and near what two cores read from memory.
// The int4 offset term takes the exact float group sums of the activations.
//
// Also here, after them: attention of one query per row over a float32 KV cache (decode_attention), the training
// loss's softmax cross-entropy, and causal attention with its backward for float32 training on BLAS sgemm.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr float kInt16Max = 32767.f;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float horizontal_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Into L1 ahead of use. An address rather than a pointer: prefetches may reach past the end of a tensor (they never
// fault), which pointer arithmetic may not.
inline void prefetch(uintptr_t address) { _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0); }

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &widened, sizeof(out));
  return out;
}

// Activations (m, k) as int16 per group of 32: values (m, k), scales and exact float sums (m, k / 32).
// 16 bits keep them closer to the float input than bf16 does (PyTorch's kernels' input): int8 here cost SmolLM2
// 10 points of top-1 agreement with fp32 under int4 weights.
struct QuantisedActivations {
  std::vector<int16_t> values;
  std::vector<float> scales, sums;
  int64_t k, groups;

  QuantisedActivations(const float* x, int64_t m, int64_t k)
      : values(m * k), scales(m * k / kGroup), sums(m * k / kGroup), k(k), groups(k / kGroup) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < m * groups; ++i) {
      const float* src = x + i * kGroup;
      __m256 v[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(src + 8 * j);
      const __m256 abs_max = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_bit, v[0]), _mm256_andnot_ps(sign_bit, v[1])),
                                           _mm256_max_ps(_mm256_andnot_ps(sign_bit, v[2]), _mm256_andnot_ps(sign_bit, v[3])));
      const float scale = horizontal_max(abs_max) / kInt16Max;
      const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      __m256i rounded[4];
      for (int j = 0; j < 4; ++j) rounded[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inverse));  // round to nearest even
      // packs works within 128-bit lanes: 64-bit blocks come out as 0 2 1 3, which permute4x64 puts back in order
      for (int j = 0; j < 2; ++j) {
        const __m256i packed = _mm256_packs_epi32(rounded[2 * j], rounded[2 * j + 1]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(values.data() + i * kGroup + 16 * j),
                            _mm256_permute4x64_epi64(packed, 0xD8));
      }
      scales[i] = scale;
      sums[i] = horizontal_sum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    }
  }
};

// One group of a weight row as two vectors of 16 int16. int4: q in 0..15 (w = q * scale + offset, the offset is
// handled outside).
struct Int4Group {
  static constexpr int64_t kBytes = kGroup / 2;
  __m256i low, high;
  Int4Group(const uint8_t* row, int64_t g) {
    // byte j of a group holds q[j] in its low nibble and q[j + 16] in its high one (GGUF's Q4 order); widened to
    // 16 bits, the high nibble is a plain shift away
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kGroup / 2)));
    low = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    high = _mm256_srli_epi16(bytes, 4);
  }
};

struct Int8Group {
  static constexpr int64_t kBytes = kGroup;
  __m256i low, high;
  Int8Group(const int8_t* row, int64_t g)
      : low(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kGroup)))),
        high(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kGroup + 16)))) {}
};

// A tile of COLS weight rows (from `row`, `row_stride` apart) by ROWS activation rows (from `first`):
// acc[c * ROWS + r] += the 8 partial sums of sum over groups g of scales[c * col_stride + r * row_stride_s + g] *
// <w_cg, x_rg>, each group's dot product an integer one (vpmaddwd: 8 int32 partial sums). Each weight group is
// unpacked once for the ROWS activation rows and each activation group loaded once for the COLS weight rows.
// Tiles of fewer than 4 accumulators also split even and odd groups, so that the FMA latency chains overlap.
// Decode reads each weight once, from memory: the same group of the next tile's rows is prefetched as this one's is
// used (~15 % faster int4 decode matmuls than the hardware prefetcher alone).
template <int COLS, int ROWS, class Group, class Row>
inline void tile_dots(const Row* row, int64_t row_stride, const QuantisedActivations& a, int64_t first,
                      const float* scales, int64_t col_stride, int64_t row_stride_s, __m256* acc) {
  constexpr int kTile = COLS * ROWS;
  constexpr bool kSplit = kTile < 4;
  __m256 odd[kTile];
  for (int i = 0; i < kTile; ++i) odd[i] = _mm256_setzero_ps();
  const int16_t* x = a.values.data() + first * a.k;
  auto accumulate = [&](__m256* into, int64_t g) {
    __m256i low[COLS], high[COLS];
    for (int c = 0; c < COLS; ++c) {
      prefetch(reinterpret_cast<uintptr_t>(row + c * row_stride + g * Group::kBytes) + COLS * row_stride * sizeof(Row));
      const Group weights(row + c * row_stride, g);
      low[c] = weights.low;
      high[c] = weights.high;
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * a.k + g * kGroup));
      const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * a.k + g * kGroup + 16));
      for (int c = 0; c < COLS; ++c) {
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(low[c], x_low), _mm256_madd_epi16(high[c], x_high));
        const __m256 scale = _mm256_broadcast_ss(scales + c * col_stride + r * row_stride_s + g);
        into[c * ROWS + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, into[c * ROWS + r]);
      }
    }
  };
  int64_t g = 0;
  for (; g + 2 <= a.groups; g += 2) {
    accumulate(acc, g);
    accumulate(kSplit ? odd : acc, g + 1);
  }
  if (g < a.groups) accumulate(acc, g);
  if (kSplit)
    for (int i = 0; i < kTile; ++i) acc[i] = _mm256_add_ps(acc[i], odd[i]);
}

// For one int4 weight row and one activation row: each group's weight scale times activation scale into
// group_scales (padded to a multiple of 8), and the 8 partial sums of the offset term sum_g (zero_g - 8 scale_g) *
// sum(x_g). A 32-bit lane of scales_and_zeros is a bf16 pair (scale, zero): scale = lane << 16, zero = lane &
// 0xFFFF0000. The last 8 groups are loaded under a mask: lanes past the row read nothing and add 0.
inline __m256 int4_scales_and_offset(const uint16_t* scales_and_zeros, const float* x_scales, const float* x_sums,
                                     int64_t groups, float* group_scales) {
  const __m256i high_half = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 offset = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g += 8) {
    const __m256i in_row = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(groups - g)), lane);
    const __m256i pairs = _mm256_maskload_epi32(reinterpret_cast<const int*>(scales_and_zeros + 2 * g), in_row);
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_half));
    _mm256_storeu_ps(group_scales + g, _mm256_mul_ps(scale, _mm256_maskload_ps(x_scales + g, in_row)));
    offset = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero), _mm256_maskload_ps(x_sums + g, in_row),
                             offset);
  }
  return offset;
}

inline int64_t padded_groups(int64_t groups) { return (groups + 7) / 8 * 8; }

constexpr int kTileRows = 4;  // activation rows a weight row is unpacked for at once

// out[(first + r) * n + j + c] for a tile of int4 weight rows j.. and activation rows first..; group_scales:
// scratch for COLS * ROWS (at most kTileRows) rows of padded groups.
template <int COLS, int ROWS>
inline void int4_tile(const uint8_t* weight, const uint16_t* scales_and_zeros, const QuantisedActivations& a,
                      int64_t j, int64_t first, float* group_scales, float* out, int64_t n) {
  static_assert(COLS * ROWS <= kTileRows, "the scratch holds kTileRows rows of group scales");
  const int64_t stride = padded_groups(a.groups), row_bytes = a.k / 2;
  // the next tile's scales, every cache line of them, ahead of its prologue (~10 % more, on top of the weights')
  const uintptr_t next_scales = reinterpret_cast<uintptr_t>(scales_and_zeros + (j + COLS) * a.groups * 2);
  for (uintptr_t line = next_scales & ~uintptr_t{63}; line < next_scales + COLS * a.groups * 4; line += 64)
    prefetch(line);
  __m256 acc[COLS * ROWS];  // start from the offset terms
  for (int c = 0; c < COLS; ++c)
    for (int r = 0; r < ROWS; ++r) {
      const int64_t at = (first + r) * a.groups;
      acc[c * ROWS + r] = int4_scales_and_offset(scales_and_zeros + (j + c) * a.groups * 2, a.scales.data() + at,
                                                 a.sums.data() + at, a.groups, group_scales + (c * ROWS + r) * stride);
    }
  tile_dots<COLS, ROWS, Int4Group>(weight + j * row_bytes, row_bytes, a, first, group_scales, ROWS * stride, stride,
                                   acc);
  for (int c = 0; c < COLS; ++c)
    for (int r = 0; r < ROWS; ++r) out[(first + r) * n + j + c] = horizontal_sum(acc[c * ROWS + r]);
}

template <int COLS, int ROWS>
inline void int8_tile(const int8_t* weight, const float* row_scales, const QuantisedActivations& a, int64_t j,
                      int64_t first, float* out, int64_t n) {
  __m256 acc[COLS * ROWS];
  for (int i = 0; i < COLS * ROWS; ++i) acc[i] = _mm256_setzero_ps();
  // the activations' group scales are the same for every weight row
  tile_dots<COLS, ROWS, Int8Group>(weight + j * a.k, a.k, a, first, a.scales.data() + first * a.groups, 0, a.groups,
                                   acc);
  for (int c = 0; c < COLS; ++c)
    for (int r = 0; r < ROWS; ++r) out[(first + r) * n + j + c] = horizontal_sum(acc[c * ROWS + r]) * row_scales[j + c];
}

// Calls tile(j, first, scratch, COLS-tag, ROWS-tag) over every weight row j and activation row: one weight row
// against blocks of kTileRows activation rows, then DECODE_COLS weight rows at once against each single activation
// row left (all of decode's), weight rows read while still in cache. Weight rows are split across PyTorch's
// intra-op threads; each thread's share gets `scratch_floats` of scratch.
template <int DECODE_COLS, class Tile>
void for_each_output(int64_t m, int64_t n, int64_t scratch_floats, Tile tile) {
  using std::integral_constant;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats);
    auto every_row = [&](int64_t j, auto cols) {
      int64_t r = 0;
      for (; r + kTileRows <= m; r += kTileRows)
        for (int c = 0; c < cols.value; ++c)
          tile(j + c, r, scratch.data(), integral_constant<int, 1>(), integral_constant<int, kTileRows>());
      for (; r < m; ++r) tile(j, r, scratch.data(), cols, integral_constant<int, 1>());
    };
    int64_t j = begin;
    for (; j + DECODE_COLS <= end; j += DECODE_COLS) every_row(j, integral_constant<int, DECODE_COLS>());
    for (; j < end; ++j) every_row(j, integral_constant<int, 1>());
  });
}

void check_activations(const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "llama_one: activations must be a contiguous (tokens, in_features) float32 tensor");
  TORCH_CHECK(x.size(1) == in_features && in_features % kGroup == 0,
              "llama_one: activations have ", x.size(1), " features, the weight takes ", in_features,
              " (a multiple of ", kGroup, ")");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales_and_zeros) {
  const int64_t m = x.size(0), k = weight.size(1) * 2, n = weight.size(0);
  check_activations(x, k);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous(), "llama_one: int4 weight must be (n, k / 2) uint8");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.numel() == n * (k / kGroup) * 2,
              "llama_one: scales_and_zeros must be (n, k / 32, 2) bfloat16");
  const QuantisedActivations a(x.data_ptr<float>(), m, k);
  at::Tensor out = at::empty({m, n}, x.options());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr());
  float* o = out.data_ptr<float>();
  // scratch: the group scales of a tile's weight rows x activation rows
  // 4 weight rows at once against one activation row: ~5 % faster decode on SmolLM2's shapes with two AVX2 cores
  constexpr int decode_cols = 4;
  for_each_output<decode_cols>(m, n, kTileRows * padded_groups(a.groups), [&](int64_t j, int64_t r, float* group_scales, auto cols, auto rows) {
    int4_tile<decltype(cols)::value, decltype(rows)::value>(w, sz, a, j, r, group_scales, o, n);
  });
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  const int64_t m = x.size(0), k = weight.size(1), n = weight.size(0);
  check_activations(x, k);
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "llama_one: int8 weight must be (n, k) int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == n, "llama_one: int8 scales must be (n,) float32");
  const QuantisedActivations a(x.data_ptr<float>(), m, k);
  at::Tensor out = at::empty({m, n}, x.options());
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // one weight row at a time: tiles of several made the (memory-bound) output projection slower
  for_each_output<1>(m, n, 0, [&](int64_t j, int64_t r, float*, auto cols, auto rows) {
    int8_tile<decltype(cols)::value, decltype(rows)::value>(w, s, a, j, r, o, n);
  });
  return out;
}

// The (n, k) float32 weight: many activation rows at once (prefill) run faster through sgemm on it.
at::Tensor int4_dequantize(const at::Tensor& weight, const at::Tensor& scales_and_zeros) {
  const int64_t n = weight.size(0), k = weight.size(1) * 2, groups = k / kGroup;
  at::Tensor out = at::empty({n, k}, weight.options().dtype(at::kFloat));
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n * groups, 256, [&](int64_t begin, int64_t end) {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int64_t i = begin; i < end; ++i) {  // group i of the flattened (n, groups)
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i * kGroup / 2));
      const __m128i halves[2] = {_mm_and_si128(packed, nibble), _mm_and_si128(_mm_srli_epi16(packed, 4), nibble)};
      const float scale = bf16_to_float(sz[2 * i]);
      const __m256 scale_v = _mm256_set1_ps(scale), offset = _mm256_set1_ps(bf16_to_float(sz[2 * i + 1]) - 8.f * scale);
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 2; ++j) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8 * j)));
          _mm256_storeu_ps(o + i * kGroup + 16 * h + 8 * j, _mm256_fmadd_ps(q, scale_v, offset));
        }
    }
  });
  return out;
}

// Decode attention: one query per row over a float32 cache. out[b, h] = softmax over the slots mask[b] allows of
// q[b, h] . k[b, g] / sqrt(d), times v[b, g], where kv head g = h / (heads per kv head). SDPA's CPU kernel takes
// ~25 us a call at SmolLM2's decode shapes (9 heads of 64 over ~100 slots), mostly setting up tiles meant for long
// queries; this takes ~5. A row that allows no slot gets zeros.
struct CacheView {
  const float* data;
  int64_t batch_stride, head_stride, slot_stride;
  explicit CacheView(const at::Tensor& t)
      : data(t.data_ptr<float>()), batch_stride(t.stride(0)), head_stride(t.stride(1)), slot_stride(t.stride(2)) {}
  const float* at(int64_t b, int64_t head) const { return data + b * batch_stride + head * head_stride; }
};

// weights[j] = <query, key j> * scale for N keys at once, so that their FMA chains overlap.
template <int64_t D, int N>
inline void scores(const float* query, const float* keys, int64_t key_stride, float scale, float* weights) {
  __m256 dot[N];
  for (int j = 0; j < N; ++j) dot[j] = _mm256_setzero_ps();
  for (int64_t e = 0; e < D; e += 8) {
    const __m256 query_part = _mm256_loadu_ps(query + e);
    for (int j = 0; j < N; ++j) dot[j] = _mm256_fmadd_ps(query_part, _mm256_loadu_ps(keys + j * key_stride + e), dot[j]);
  }
  for (int j = 0; j < N; ++j) weights[j] = horizontal_sum(dot[j]) * scale;
}

// One (row, head): the head dimension D is a constant so that the D / 8 output accumulators stay in registers.
template <int64_t D>
void attend_one(const float* query, const float* keys, const float* values, const bool* allowed, int64_t len,
                int64_t key_stride, int64_t value_stride, int64_t mask_stride, float* weights, float* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kVecs = D / 8;
  constexpr int kBlock = 8;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // slots after the last allowed one (a static cache's future, in compiled decode) cost nothing
  while (len > 0 && !allowed[(len - 1) * mask_stride]) --len;
  int64_t slot = 0;
  for (; slot + kBlock <= len; slot += kBlock)
    scores<D, kBlock>(query, keys + slot * key_stride, key_stride, scale, weights + slot);
  for (; slot < len; ++slot) scores<D, 1>(query, keys + slot * key_stride, key_stride, scale, weights + slot);
  float top = -std::numeric_limits<float>::infinity();
  for (slot = 0; slot < len; ++slot) {
    if (!allowed[slot * mask_stride]) weights[slot] = -std::numeric_limits<float>::infinity();
    top = std::max(top, weights[slot]);
  }
  // exp(score - top): 0 at masked slots; with none allowed, top stays -inf and every weight 0
  const Vec top_v(top == -std::numeric_limits<float>::infinity() ? 0.f : top);
  Vec total_v(0.f);
  for (slot = 0; slot < len; slot += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), len - slot);
    const Vec e = (Vec::loadu(weights + slot, count) - top_v).exp();
    e.store(weights + slot, count);
    total_v = total_v + Vec::set(Vec(0.f), e, count);
  }
  const float total = horizontal_sum(total_v);
  __m256 sum[kVecs];
  for (int64_t e = 0; e < kVecs; ++e) sum[e] = _mm256_setzero_ps();
  for (slot = 0; slot < len; ++slot) {
    if (weights[slot] == 0.f) continue;  // masked: whatever the cache holds there is not read
    const __m256 w = _mm256_set1_ps(weights[slot]);
    for (int64_t e = 0; e < kVecs; ++e)
      sum[e] = _mm256_fmadd_ps(w, _mm256_loadu_ps(values + slot * value_stride + 8 * e), sum[e]);
  }
  const __m256 inverse = _mm256_set1_ps(total > 0.f ? 1.f / total : 0.f);
  for (int64_t e = 0; e < kVecs; ++e) _mm256_storeu_ps(out + 8 * e, _mm256_mul_ps(sum[e], inverse));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  // q (bs, heads, 1, d); k, v (bs, kv_heads, len, d), each slot's d floats contiguous; mask (bs, 1, 1, len) bool
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat && q.stride(3) == 1,
              "llama_one: decode_attention takes one float32 query per row, (bs, heads, 1, head_dim)");
  const int64_t bs = q.size(0), heads = q.size(1), d = q.size(3), kv_heads = k.size(1), len = k.size(2);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->size(0) == bs && t->size(1) == kv_heads &&
                    t->size(2) == len && t->size(3) == d && t->stride(3) == 1,
                "llama_one: decode_attention's keys and values must be float32 (bs, kv_heads, len, head_dim)");
  TORCH_CHECK((d == 64 || d == 128) && kv_heads > 0 && heads % kv_heads == 0,
              "llama_one: decode_attention takes head_dim 64 or 128 and heads a multiple of kv_heads");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == bs && mask.size(1) == 1 &&
                  mask.size(2) == 1 && mask.size(3) == len,
              "llama_one: decode_attention's mask must be bool (bs, 1, 1, len)");
  at::Tensor out = at::empty({bs, heads, 1, d}, q.options());
  const CacheView keys(k), values(v);
  const float* q_data = q.data_ptr<float>();
  const int64_t q_batch_stride = q.stride(0), q_head_stride = q.stride(1);
  const bool* mask_data = mask.data_ptr<bool>();
  const int64_t mask_row_stride = mask.stride(0), mask_stride = mask.stride(3);
  float* out_data = out.data_ptr<float>();
  auto attend = d == 64 ? attend_one<64> : attend_one<128>;
  at::parallel_for(0, bs * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(len);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads, g = h / (heads / kv_heads);
      attend(q_data + b * q_batch_stride + h * q_head_stride, keys.at(b, g), values.at(b, g),
             mask_data + b * mask_row_stride, len, keys.slot_stride, values.slot_stride, mask_stride, weights.data(),
             out_data + i * d);
    }
  });
  return out;
}


// row[i] = exp(row[i] - shift) for i < n; returns their sum. ATen's exp_u20 (a polynomial good to ~20 ulp, as
// PyTorch's own CPU flash attention takes) is ~1.5x its Sleef exp here.
inline float exp_shifted(float* row, int64_t n, float shift) {
  using Vec = at::vec::Vectorized<float>;
  const Vec shift_v(shift);
  Vec total_v(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(row + i) - shift_v).exp_u20();
    e.store(row + i);
    total_v = total_v + e;
  }
  float total = horizontal_sum(total_v);
  for (; i < n; ++i) total += row[i] = std::exp(row[i] - shift);
  return total;
}

inline float row_max(const float* row, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, row, n);
}

inline void scale_row(float* row, int64_t n, float factor) {
  using Vec = at::vec::Vectorized<float>;
  at::vec::map([factor](Vec x) { return x * Vec(factor); }, row, row, n);
}

// Cross-entropy of a chunk of logits (n, vocab) against targets (n,), for the chunked training loss (llama/loss.py):
// returns each row's logsumexp - logit[target] and overwrites the row with its gradient, (softmax - one-hot) *
// scale. A row (128 KB of floats at a 32k vocabulary) stays in L2 through the max, exp-sum and scaling passes; as
// whole-chunk tensor ops (amax, sub, exp, sum, div) each pass went through memory: ~3x the time.
at::Tensor softmax_cross_entropy_(at::Tensor& logits, const at::Tensor& targets, double scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "llama_one: softmax_cross_entropy_ takes contiguous float32 logits (n, vocab)");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n && targets.scalar_type() == at::kLong,
              "llama_one: softmax_cross_entropy_ takes int64 targets (n,)");
  const at::Tensor target_ids = targets.contiguous();
  const int64_t* target = target_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(target[r] >= 0 && target[r] < vocab, "llama_one: softmax_cross_entropy_: target ", target[r],
                " is not a token id of a ", vocab, "-token vocabulary");
  at::Tensor losses = at::empty({n}, logits.options());
  float* data = logits.data_ptr<float>();
  float* loss = losses.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = data + r * vocab;
      const float target_logit = row[target[r]], top = row_max(row, vocab);
      const float total = exp_shifted(row, vocab, top);
      loss[r] = std::log(total) + top - target_logit;
      scale_row(row, vocab, static_cast<float>(scale) / total);
      row[target[r]] -= static_cast<float>(scale);
    }
  });
  return losses;
}

// Causal self-attention for training and evaluation on a float32 CPU model, forward and backward, grouped-query:
// q (bs, seq, heads, d), k and v (bs, seq, kv_heads, d), as the projections give them (no transposes); out like q.
// Per (batch, kv head), a block of 32 positions of all the query heads that share it is one matrix, and each of its
// products with the keys up to the block's end is one BLAS sgemm over scores small enough to stay in cache; at 256
// positions the blocks skip 7/16 of the products, those above the diagonal. At bench.train's shapes (4 x 256 tokens,
// 6 heads over 2 kv heads of 64) a layer's forward and backward take ~6 ms on 2 threads, ATen's CPU flash attention
// ~12 (blocks of 64 positions: ~7).

// Fortran BLAS (MKL in PyTorch's x86 wheels). Weak: a PyTorch built without one still loads the other kernels, and
// Python takes SDPA (blas_available).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

bool blas_available() { return sgemm_ != nullptr; }

// Row-major C (m, n) = alpha * op(A) (m, k) @ op(B) (k, n) + beta * C. BLAS is column-major, where a row-major
// matrix reads as its transpose: so it computes C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char op_b = trans_b ? 'T' : 'N', op_a = trans_a ? 'T' : 'N';
  const int m_ = static_cast<int>(n), n_ = static_cast<int>(m), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(ldb), ldb_ = static_cast<int>(lda), ldc_ = static_cast<int>(ldc);
  sgemm_(&op_b, &op_a, &m_, &n_, &k_, &alpha, b, &lda_, a, &ldb_, &beta, c, &ldc_);
}

constexpr int64_t kQueryBlock = 32;

// A (bs, seq, heads, d) tensor, read or written one block of a group's heads at a time.
struct HeadRows {
  float* data;
  int64_t batch, row, head, d;
  explicit HeadRows(const at::Tensor& t)
      : data(t.data_ptr<float>()), batch(t.stride(0)), row(t.stride(1)), head(t.stride(2)), d(t.size(3)) {}
  float* at(int64_t b, int64_t h) const { return data + b * batch + h * head; }
  // block[(j * rows + r) * d ..] = row first + r of head first_head + j, for j < heads
  void gather(int64_t b, int64_t first_head, int64_t heads, int64_t first, int64_t rows, float* block) const {
    for (int64_t j = 0; j < heads; ++j)
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(at(b, first_head + j) + (first + r) * row, d, block + (j * rows + r) * d);
  }
  void scatter(int64_t b, int64_t first_head, int64_t heads, int64_t first, int64_t rows, const float* block) const {
    for (int64_t j = 0; j < heads; ++j)
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(block + (j * rows + r) * d, d, at(b, first_head + j) + (first + r) * row);
  }
};

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(blas_available(), "llama_one: causal_attention needs PyTorch built with a BLAS");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "llama_one: causal_attention takes (bs, seq, heads, d)");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "llama_one: causal_attention takes float32 tensors with contiguous head_dim");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
                  k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "llama_one: causal_attention's keys and values must be (bs, seq, kv_heads, d) with heads a multiple of "
              "kv_heads");
}

// Keys and values are read by BLAS straight from the tensor, one position per row: rows must not overlap (an
// expanded tensor's do).
at::Tensor as_blas_rows(const at::Tensor& t) { return t.stride(1) >= t.size(3) ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k_, const at::Tensor& v_) {
  check_attention(q, k_, v_);
  const at::Tensor k = as_blas_rows(k_), v = as_blas_rows(v_);
  const int64_t bs = q.size(0), seq = q.size(1), heads = q.size(2), d = q.size(3), kv_heads = k.size(2);
  const int64_t group = heads / kv_heads;
  at::Tensor out = at::empty({bs, seq, heads, d}, q.options());
  at::Tensor lse = at::empty({bs, heads, seq}, q.options());  // each query's logsumexp, for the backward
  const HeadRows queries(q), keys(k), values(v), outputs(out);
  float* lse_data = lse.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, bs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_block(group * kQueryBlock * d), scores(group * kQueryBlock * seq), o_block(q_block.size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads;
      for (int64_t first = 0; first < seq; first += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, seq - first), n_keys = first + rows;
        queries.gather(b, g * group, group, first, rows, q_block.data());
        gemm(false, true, group * rows, n_keys, d, scale, q_block.data(), d, keys.at(b, g), keys.row, 0.f,
             scores.data(), n_keys);
        for (int64_t j = 0; j < group; ++j)
          for (int64_t r = 0; r < rows; ++r) {  // softmax over the keys up to the query; zeros after
            float* row = scores.data() + (j * rows + r) * n_keys;
            const int64_t allowed = first + r + 1;
            const float top = row_max(row, allowed), total = exp_shifted(row, allowed, top);
            scale_row(row, allowed, 1.f / total);
            std::fill(row + allowed, row + n_keys, 0.f);
            lse_data[(b * heads + g * group + j) * seq + first + r] = top + std::log(total);
          }
        gemm(false, false, group * rows, d, n_keys, 1.f, scores.data(), n_keys, values.at(b, g), values.row, 0.f,
             o_block.data(), d);
        outputs.scatter(b, g * group, group, first, rows, o_block.data());
      }
    }
  });
  return std::make_tuple(out, lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out_, const at::Tensor& q, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out,
    const at::Tensor& lse) {
  check_attention(q, k_, v_);
  const at::Tensor k = as_blas_rows(k_), v = as_blas_rows(v_);
  const at::Tensor grad_out = grad_out_.contiguous();
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && out.stride(3) == 1 &&
                  lse.is_contiguous() && lse.numel() == q.size(0) * q.size(2) * q.size(1),
              "llama_one: causal_attention_backward takes causal_attention's output and logsumexp");
  const int64_t bs = q.size(0), seq = q.size(1), heads = q.size(2), d = q.size(3), kv_heads = k.size(2);
  const int64_t group = heads / kv_heads;
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::zeros(k.sizes(), k.options()), grad_v = at::zeros(v.sizes(), v.options());
  const HeadRows queries(q), keys(k), values(v), outputs(out), grad_outputs(grad_out), grad_queries(grad_q),
      grad_keys(grad_k), grad_values(grad_v);
  const float* lse_data = lse.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  using Vec = at::vec::Vectorized<float>;
  // one (batch, kv head) per task: its keys' and values' gradients sum over the group's query heads
  at::parallel_for(0, bs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    const int64_t block_rows = group * kQueryBlock;
    std::vector<float> q_block(block_rows * d), grad_o_block(block_rows * d), o_block(block_rows * d),
        probs(block_rows * seq), grad_scores(block_rows * seq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads;
      const float *k_g = keys.at(b, g), *v_g = values.at(b, g);
      for (int64_t first = 0; first < seq; first += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, seq - first), n_keys = first + rows;
        queries.gather(b, g * group, group, first, rows, q_block.data());
        grad_outputs.gather(b, g * group, group, first, rows, grad_o_block.data());
        outputs.gather(b, g * group, group, first, rows, o_block.data());
        // P, recomputed from the forward's logsumexp
        gemm(false, true, group * rows, n_keys, d, scale, q_block.data(), d, k_g, keys.row, 0.f, probs.data(), n_keys);
        for (int64_t j = 0; j < group; ++j)
          for (int64_t r = 0; r < rows; ++r) {
            float* row = probs.data() + (j * rows + r) * n_keys;
            const int64_t allowed = first + r + 1;
            exp_shifted(row, allowed, lse_data[(b * heads + g * group + j) * seq + first + r]);
            std::fill(row + allowed, row + n_keys, 0.f);
          }
        // dV += P^T dO; dP = dO V^T
        gemm(true, false, n_keys, d, group * rows, 1.f, probs.data(), n_keys, grad_o_block.data(), d, 1.f,
             grad_values.at(b, g), grad_values.row);
        gemm(false, true, group * rows, n_keys, d, 1.f, grad_o_block.data(), d, v_g, values.row, 0.f,
             grad_scores.data(), n_keys);
        // dS = P * (dP - dO.O) * scale: zero wherever P is (the masked keys)
        for (int64_t i = 0; i < group * rows; ++i) {
          const float row_dot = at::vec::map2_reduce_all<float>(
              [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, grad_o_block.data() + i * d,
              o_block.data() + i * d, d);
          const Vec subtrahend(row_dot), scale_v(scale);
          float* grad_row = grad_scores.data() + i * n_keys;
          at::vec::map2([=](Vec p, Vec dp) { return p * (dp - subtrahend) * scale_v; }, grad_row,
                        probs.data() + i * n_keys, grad_row, n_keys);
        }
        // dQ = dS K (written over the gathered queries' block after its last use below); dK += dS^T Q
        gemm(true, false, n_keys, d, group * rows, 1.f, grad_scores.data(), n_keys, q_block.data(), d, 1.f,
             grad_keys.at(b, g), grad_keys.row);
        gemm(false, false, group * rows, d, n_keys, 1.f, grad_scores.data(), n_keys, k_g, keys.row, 0.f,
             q_block.data(), d);
        grad_queries.scatter(b, g * group, group, first, rows, q_block.data());
      }
    }
  });
  return std::make_tuple(grad_q, grad_k, grad_v);
}

}  // namespace

TORCH_LIBRARY(llama_one, lib) {
  lib.def("int4_linear(Tensor x, Tensor weight, Tensor scales_and_zeros) -> Tensor");
  lib.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  lib.def("int4_dequantize(Tensor weight, Tensor scales_and_zeros) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  lib.def("softmax_cross_entropy_(Tensor(a!) logits, Tensor targets, float scale) -> Tensor");
  lib.def("blas_available", &blas_available);
  lib.def("causal_attention(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  lib.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llama_one, CPU, lib) {
  lib.impl("int4_linear", &int4_linear);
  lib.impl("int8_linear", &int8_linear);
  lib.impl("int4_dequantize", &int4_dequantize);
  lib.impl("decode_attention", &decode_attention);
  lib.impl("softmax_cross_entropy_", &softmax_cross_entropy_);
  lib.impl("causal_attention", &causal_attention);
  lib.impl("causal_attention_backward", &causal_attention_backward);
}
