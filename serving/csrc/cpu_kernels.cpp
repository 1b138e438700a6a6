// CPU kernels of the packed path (serving/cpu_kernels.py builds and loads them).
//
// Paged decode attention: one query token per sequence, its keys and values read where the paged
// KV cache holds them (no gather of the whole cache into a batch tensor, as SDPA needs). RMSNorm
// and SwiGLU's silu(gate) * up in one pass each, where torch takes 3-8 small ops.
//
// Built with the system's C++ compiler (-O3 -march=native -fopenmp) and called through ctypes with
// raw pointers, so it includes no torch header and compiles in about a second. Its OpenMP is the
// libgomp torch already loaded (the same soname): one thread team.
//
// Decode attention's layout (element strides; the caller checks them):
//   q      (B, H, hd)       row b at q + b * q_row, head h at + h * hd, H = Hkv * G
//   kc, vc (S, Hkv, hd)     cache slot s at + s * Hkv * hd, contiguous
//   slots  (B, L) int64     the cache slot of each key position (row b's first lens[b] are real)
//   lens   (B,)   int64     keys per sequence (the query is at position lens[b] - 1)
//   out    (B, H * hd)      contiguous
// window > 0: only the last `window` keys (a sliding-window layer), as the engine's masks.
//
// Per (sequence, key head) task, the G query heads that share the key head are attended together:
// scores in float32, a max-subtracted softmax, values summed in float32, one rounding at the end.
// Each sequence's result depends only on its own keys, so it is the same whatever else is batched.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include <array>
#include <utility>

#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline void from_f32(float x, float* y) { *y = x; }
inline void from_f32(float x, uint16_t* y) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {  // NaN stays NaN
        *y = static_cast<uint16_t>((u >> 16) | 0x40);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch's conversion
    *y = static_cast<uint16_t>(u >> 16);
}

// exp(x), vectorisable: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6
// polynomial (relative error ~2e-7, as expf's float32 result); x is clamped to [-87, 88].
inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t e = (static_cast<int32_t>(n) + 127) << 23;
    float s;
    std::memcpy(&s, &e, 4);
    return p * s;
}

constexpr int MAX_HD = 256;
constexpr int MAX_G = 16;

#if defined(__AVX512F__)
// The 16 sums of a[0..15] as one vector (lane i = the sum of a[i]'s lanes): a transposing tree of
// 15 adds, where 16 separate horizontal sums take ~4x the instructions. Its order is fixed.
inline __m512 sum16(const __m512* a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: a[2i]'s partial sums at 0, 2; a[2i+1]'s at 1, 3
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: a[4i + k]'s partial sum at k
        const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)  // 128-bit lanes: c[2i]'s lanes 0+1, 2+3, then c[2i+1]'s
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// q k^T for 16 keys at a time: each key's row converted once, its G dot products as 16-lane partial
// sums, then `sum16` per query head (keys past m are zero rows, their lanes not stored).
// The G heads' scores of nj <= 16 keys already in float32 (key jj's row at kb + jj * kb_row, 64-byte
// aligned), into sc[g * m + j0 + jj]: `scores16`'s arithmetic, shared by the per-sequence path.
template <int HD, int G>
inline void score_chunk(const float* qf, int64_t q_row, const float* kb, int64_t kb_row, int nj, float* sc, int64_t m,
                        int64_t j0) {
    constexpr int NCH = HD / 16;
    for (int g = 0; g < G; ++g) {
        __m512 qv[NCH], a[16];
        for (int c = 0; c < NCH; ++c) qv[c] = _mm512_load_ps(qf + g * q_row + 16 * c);
        for (int jj = 0; jj < 16; ++jj) {
            __m512 v = _mm512_setzero_ps();
            if (jj < nj)
                for (int c = 0; c < NCH; ++c) v = _mm512_fmadd_ps(qv[c], _mm512_load_ps(kb + jj * kb_row + 16 * c), v);
            a[jj] = v;
        }
        _mm512_mask_storeu_ps(sc + g * m + j0, static_cast<__mmask16>((1u << nj) - 1u), sum16(a));
    }
}

template <typename T, int HD, int G>
inline void scores16(const float (*qf)[MAX_HD], const T* kc, const int64_t* srow, int64_t m, int64_t slot_stride,
                     int kh, float* sc) {
    alignas(64) float kb[16][HD];
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        const int nj = static_cast<int>(m - j0 < 16 ? m - j0 : 16);
        for (int jj = 0; jj < nj; ++jj) {
            const T* kp = kc + srow[j0 + jj] * slot_stride + static_cast<int64_t>(kh) * HD;
            for (int d = 0; d < HD; ++d) kb[jj][d] = to_f32(kp[d]);
        }
        score_chunk<HD, G>(qf[0], MAX_HD, kb[0], HD, nj, sc, m, j0);
    }
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_masked(const uint16_t* p, __mmask16 k) {  // lanes past k read as zero
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const uint16_t* p) {  // 16 bfloat16 -> float32: the bits shifted up, exact
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// sum_j p[g][j] v[j] with the G x HD/16 sums in registers for the whole key loop (the generic loop
// keeps them in memory); per element the same fused multiply-adds in the same order.
template <typename T, int HD, int G>
inline void values16(const float* sc, int64_t m, const T* vc, const int64_t* srow, int64_t slot_stride, int kh,
                     float (*acc)[MAX_HD]) {
    constexpr int NCH = HD / 16;
    __m512 a[G][NCH];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < NCH; ++c) a[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < m; ++j) {
        const T* vp = vc + srow[j] * slot_stride + static_cast<int64_t>(kh) * HD;
        __m512 v[NCH];
        for (int c = 0; c < NCH; ++c) v[c] = load16(vp + 16 * c);
        for (int g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(sc[g * m + j]);
            for (int c = 0; c < NCH; ++c) a[g][c] = _mm512_fmadd_ps(p, v[c], a[g][c]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < NCH; ++c) _mm512_store_ps(acc[g] + 16 * c, a[g][c]);
}
#endif

// exp(s - max) over one head's scores in place; returns 1 / their sum. The sum in 16 lanes and a
// fixed tree, not `omp simd reduction`: its order would follow the buffer's alignment, and a row's
// bits would depend on the thread it ran on.
inline float softmax_row(float* sg, int64_t m) {
    float mx = sg[0];
    for (int64_t j = 1; j < m; ++j) mx = sg[j] > mx ? sg[j] : mx;
    float part[16] = {0.0f};
    int64_t j = 0;
    for (; j + 16 <= m; j += 16) {
        for (int l = 0; l < 16; ++l) {
            const float e = exp_neg(sg[j + l] - mx);
            sg[j + l] = e;
            part[l] += e;
        }
    }
    for (int l = 0; j < m; ++j, ++l) {
        const float e = exp_neg(sg[j] - mx);
        sg[j] = e;
        part[l] += e;
    }
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) part[l] += part[l + w];
    return 1.0f / part[0];
}

// One (sequence, key head) task. HD_ and G_ are the head size and query heads per key head when
// known at compile time (0: read from hd, g): the common shapes get loops the compiler unrolls
// into a few vector instructions per key.
template <typename T, int HD_, int G_>
inline void task(const T* q, const T* kc, const T* vc, const int64_t* srow, int64_t m, int64_t slot_stride,
                 int kh, int hd_rt, int g_rt, float scale, float* sc, T* out) {
    const int hd = HD_ ? HD_ : hd_rt;
    const int G = G_ ? G_ : g_rt;
    alignas(64) float qf[MAX_G][MAX_HD];
    alignas(64) float acc[MAX_G][MAX_HD];
    alignas(64) float row[MAX_HD];
    for (int g = 0; g < G; ++g) {
        const T* qp = q + static_cast<int64_t>(kh * G + g) * hd;
        for (int d = 0; d < hd; ++d) qf[g][d] = to_f32(qp[d]) * scale;
    }
#if defined(__AVX512F__)
    if constexpr (HD_ > 0 && HD_ % 16 == 0 && G_ > 0) {
        scores16<T, HD_, G_>(qf, kc, srow, m, slot_stride, kh, sc);
    } else
#endif
    for (int64_t j = 0; j < m; ++j) {
        const T* kp = kc + srow[j] * slot_stride + static_cast<int64_t>(kh) * hd;
        for (int d = 0; d < hd; ++d) row[d] = to_f32(kp[d]);
        for (int g = 0; g < G; ++g) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < hd; ++d) s += qf[g][d] * row[d];
            sc[g * m + j] = s;
        }
    }
    float inv[MAX_G];
    for (int g = 0; g < G; ++g) {
        inv[g] = softmax_row(sc + g * m, m);
        for (int d = 0; d < hd; ++d) acc[g][d] = 0.0f;
    }
#if defined(__AVX512F__)
    if constexpr (HD_ > 0 && HD_ % 16 == 0 && G_ > 0 && G_ * (HD_ / 16) <= 24) {
        values16<T, HD_, G_>(sc, m, vc, srow, slot_stride, kh, acc);
    } else
#endif
    for (int64_t j = 0; j < m; ++j) {
        const T* vp = vc + srow[j] * slot_stride + static_cast<int64_t>(kh) * hd;
        for (int d = 0; d < hd; ++d) row[d] = to_f32(vp[d]);
        for (int g = 0; g < G; ++g) {
            const float p = sc[g * m + j];
#pragma omp simd
            for (int d = 0; d < hd; ++d) acc[g][d] += p * row[d];
        }
    }
    for (int g = 0; g < G; ++g) {
        T* op = out + static_cast<int64_t>(kh * G + g) * hd;
        for (int d = 0; d < hd; ++d) from_f32(acc[g][d] * inv[g], op + d);
    }
}

#if defined(__AVX512F__)
constexpr int SEQ_MAX_ROW = 512;  // floats of a slot's row (every key head) the per-sequence path buffers
constexpr int SEQ_MAX_H = 32;

// One sequence, every key head, 16 keys at a time: each key's and value's whole slot row (all heads,
// contiguous) converted once into a buffer, then each head's work as `task`'s, the same operations
// in the same order (the same bits). A per-head task reads a third of each row (SmolLM2: 128 of 384
// bytes) and the next head the next third later: cold in memory that ran at ~20 GB/s against ~40
// for whole rows (batch 64, 56 keys: 120 vs 72 us).
template <typename T, int HD, int G>
void seq_task(const T* q, const T* kc, const T* vc, const int64_t* srow, int64_t m, int Hkv, float scale,
              float* sc, T* out) {
    constexpr int NCH = HD / 16;
    const int64_t row = static_cast<int64_t>(Hkv) * HD;
    alignas(64) float qf[SEQ_MAX_H][HD];
    alignas(64) float acc[SEQ_MAX_H][HD];
    alignas(64) float buf[16][SEQ_MAX_ROW];
    float inv[SEQ_MAX_H];
    const int H = Hkv * G;
    for (int h = 0; h < H; ++h)
        for (int d = 0; d < HD; ++d) qf[h][d] = to_f32(q[static_cast<int64_t>(h) * HD + d]) * scale;
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        const int nj = static_cast<int>(m - j0 < 16 ? m - j0 : 16);
        for (int jj = 0; jj < nj; ++jj) {
            const T* kp = kc + srow[j0 + jj] * row;
            for (int64_t d = 0; d < row; ++d) buf[jj][d] = to_f32(kp[d]);
        }
        for (int kh = 0; kh < Hkv; ++kh)
            score_chunk<HD, G>(qf[kh * G], HD, buf[0] + kh * HD, SEQ_MAX_ROW, nj, sc + kh * G * m, m, j0);
    }
    for (int h = 0; h < H; ++h) {
        inv[h] = softmax_row(sc + h * m, m);
        for (int d = 0; d < HD; ++d) acc[h][d] = 0.0f;
    }
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        const int nj = static_cast<int>(m - j0 < 16 ? m - j0 : 16);
        for (int jj = 0; jj < nj; ++jj) {
            const T* vp = vc + srow[j0 + jj] * row;
            for (int64_t d = 0; d < row; ++d) buf[jj][d] = to_f32(vp[d]);
        }
        for (int kh = 0; kh < Hkv; ++kh) {  // `values16`'s sums, carried in acc from chunk to chunk
            __m512 a[G][NCH];
            for (int g = 0; g < G; ++g)
                for (int c = 0; c < NCH; ++c) a[g][c] = _mm512_load_ps(acc[kh * G + g] + 16 * c);
            for (int jj = 0; jj < nj; ++jj) {
                __m512 v[NCH];
                for (int c = 0; c < NCH; ++c) v[c] = _mm512_load_ps(buf[jj] + kh * HD + 16 * c);
                for (int g = 0; g < G; ++g) {
                    const __m512 p = _mm512_set1_ps(sc[(kh * G + g) * m + j0 + jj]);
                    for (int c = 0; c < NCH; ++c) a[g][c] = _mm512_fmadd_ps(p, v[c], a[g][c]);
                }
            }
            for (int g = 0; g < G; ++g)
                for (int c = 0; c < NCH; ++c) _mm512_store_ps(acc[kh * G + g] + 16 * c, a[g][c]);
        }
    }
    for (int h = 0; h < H; ++h)
        for (int d = 0; d < HD; ++d) from_f32(acc[h][d] * inv[h], out + static_cast<int64_t>(h) * HD + d);
}

template <typename T>
using SeqFn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, int, float, float*, T*);

template <typename T, int HD>
SeqFn<T> pick_seq_g(int G) {
    if (G * (HD / 16) > 24) return nullptr;  // the value sums would not stay in registers
    switch (G) {
        case 1: return seq_task<T, HD, 1>;
        case 2: return seq_task<T, HD, 2>;
        case 3: return seq_task<T, HD, 3>;
        case 4: return seq_task<T, HD, 4>;
        case 5: return seq_task<T, HD, 5>;
        case 6: return seq_task<T, HD, 6>;
        case 7: return seq_task<T, HD, 7>;
        case 8: return seq_task<T, HD, 8>;
        default: return nullptr;
    }
}

// The per-sequence path where it applies (else nullptr: per-head tasks): AVX-512, head sizes of 16s,
// a slot's row within the buffer, the value sums within the registers `values16` keeps.
template <typename T>
SeqFn<T> pick_seq(int hd, int G, int Hkv) {
    if (Hkv < 2 || static_cast<int64_t>(Hkv) * hd > SEQ_MAX_ROW || Hkv * G > SEQ_MAX_H) return nullptr;
    switch (hd) {
        case 32: return pick_seq_g<T, 32>(G);
        case 64: return pick_seq_g<T, 64>(G);
        case 128: return pick_seq_g<T, 128>(G);
        default: return nullptr;
    }
}
#endif

template <typename T>
using TaskFn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int, int, int, float, float*, T*);

template <typename T, int HD_>
TaskFn<T> pick_g(int G) {
    switch (G) {
        case 1: return task<T, HD_, 1>;
        case 2: return task<T, HD_, 2>;
        case 3: return task<T, HD_, 3>;
        case 4: return task<T, HD_, 4>;
        case 5: return task<T, HD_, 5>;
        case 6: return task<T, HD_, 6>;
        case 7: return task<T, HD_, 7>;
        case 8: return task<T, HD_, 8>;
        default: return task<T, HD_, 0>;
    }
}

template <typename T>
TaskFn<T> pick(int hd, int G) {
    switch (hd) {
        case 32: return pick_g<T, 32>(G);
        case 64: return pick_g<T, 64>(G);
        case 128: return pick_g<T, 128>(G);
        default: return task<T, 0, 0>;
    }
}

template <typename T>
int decode(const T* q, int64_t q_row, const T* kc, const T* vc, const int64_t* slots, const int64_t* lens,
           T* out, int64_t S, int B, int Hkv, int G, int hd, int L, int window, float scale, int threads) {
    if (hd > MAX_HD || G > MAX_G || hd <= 0 || G <= 0) return 1;
    const int64_t slot_stride = static_cast<int64_t>(Hkv) * hd;
    const TaskFn<T> fn = pick<T>(hd, G);
    int bad = 0;
#if defined(__AVX512F__)
    // a task per sequence when there are enough of them to share out (else per head: one sequence
    // at batch 1 is Hkv tasks)
    const SeqFn<T> seq = B >= 2 * threads ? pick_seq<T>(hd, G, Hkv) : nullptr;
    if (seq != nullptr) {
#pragma omp parallel num_threads(threads)
        {
            std::vector<float> scores(static_cast<size_t>(Hkv) * G * (L > 0 ? L : 1));
#pragma omp for schedule(static)
            for (int b = 0; b < B; ++b) {
                const int64_t n = lens[b];
                if (n <= 0 || n > L) {
#pragma omp atomic write
                    bad = 2;
                    continue;
                }
                const int64_t start = (window > 0 && n > window) ? n - window : 0;
                const int64_t* srow = slots + static_cast<int64_t>(b) * L + start;
                bool inside = true;
                for (int64_t j = 0; j < n - start; ++j) inside &= srow[j] >= 0 && srow[j] < S;
                if (!inside) {
#pragma omp atomic write
                    bad = 3;
                    continue;
                }
                seq(q + b * q_row, kc, vc, srow, n - start, Hkv, scale, scores.data(),
                    out + static_cast<int64_t>(b) * Hkv * G * hd);
            }
        }
        return bad;
    }
#endif
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores(static_cast<size_t>(G) * (L > 0 ? L : 1));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < static_cast<int64_t>(B) * Hkv; ++t) {
            const int b = static_cast<int>(t / Hkv), kh = static_cast<int>(t % Hkv);
            const int64_t n = lens[b];
            if (n <= 0 || n > L) {
#pragma omp atomic write
                bad = 2;
                continue;
            }
            const int64_t start = (window > 0 && n > window) ? n - window : 0;
            const int64_t* srow = slots + static_cast<int64_t>(b) * L + start;
            bool inside = true;
            for (int64_t j = 0; j < n - start; ++j) inside &= srow[j] >= 0 && srow[j] < S;
            if (!inside) {
#pragma omp atomic write
                bad = 3;
                continue;
            }
            fn(q + b * q_row, kc, vc, srow, n - start, slot_stride, kh, hd, G, scale, scores.data(),
               out + static_cast<int64_t>(b) * Hkv * G * hd);
        }
    }
    return bad;
}

// RoPE (rotate-half, transformers' convention) on q and k of a fused q|k|v GEMM output, with k and
// v written to the paged cache, in one pass: torch's qk * cos, cat, addcmul and two index_copy_
// calls (~25 us a layer at 16 rows, ~65 at 64). Per element out = x cos + rot(x) sin, where rot(x)
// = [x2, x1] and `sin` holds [-sin, sin]; x cos is rounded to T first and the sum once, as those
// ops round (in bfloat16 the product rot(x) sin of two bfloat16 values is exact in float32, so the
// bits are torch's whatever the order of the float32 operations).
//   qkv (N, (H + 2 Hkv) hd) rows at qkv + n * row     cos, sin (N, hd) contiguous
//   q   (N, H, hd) contiguous                       kc, vc (S, Hkv, hd); slots (N,) in 0..S-1
template <typename T>
int rope_kv(const T* qkv, int64_t row, const T* cos, const T* sin, T* q, T* kc, T* vc, const int64_t* slots,
            int64_t N, int H, int Hkv, int hd, int64_t S, int threads) {
    const int half = hd / 2;
    const int64_t kv_row = static_cast<int64_t>(Hkv) * hd;
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int64_t slot = slots[n];
        const bool ok = slot >= 0 && slot < S;
        if (!ok) {
#pragma omp atomic write
            bad = 1;
        }
        const T* x = qkv + n * row;
        const T* c = cos + n * hd;
        const T* s = sin + n * hd;
        for (int h = 0; h < H + Hkv; ++h) {
            if (h >= H && !ok) break;
            const T* xh = x + static_cast<int64_t>(h) * hd;
            T* o = h < H ? q + (n * H + h) * static_cast<int64_t>(hd) : kc + slot * kv_row + static_cast<int64_t>(h - H) * hd;
            for (int d = 0; d < hd; ++d) {
                T t;
                from_f32(to_f32(xh[d]) * to_f32(c[d]), &t);
                const float r = to_f32(xh[d < half ? d + half : d - half]);
                from_f32(to_f32(t) + r * to_f32(s[d]), o + d);
            }
        }
        if (ok) std::memcpy(vc + slot * kv_row, x + static_cast<int64_t>(H + Hkv) * hd, kv_row * sizeof(T));
    }
    return bad;
}

// RMSNorm of each row as transformers computes it: in float32, x * rsqrt(mean(x^2) + eps); then
// (bfloat16) rounded and scaled by w, rounded again; (float32) scaled by w. The sum of squares runs
// in 16 lanes and a fixed tree: a row's bits do not depend on its neighbours or its alignment.
template <typename T>
void rms_norm(const T* x, int64_t x_row, const T* w, T* out, int64_t N, int D, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < N; ++i) {
        const T* xr = x + i * x_row;
        float part[16] = {0.0f};
        int d = 0;
        for (; d + 16 <= D; d += 16)
            for (int l = 0; l < 16; ++l) {
                const float v = to_f32(xr[d + l]);
                part[l] += v * v;
            }
        for (int l = 0; d < D; ++d, ++l) {
            const float v = to_f32(xr[d]);
            part[l] += v * v;
        }
        for (int k = 8; k >= 1; k /= 2)
            for (int l = 0; l < k; ++l) part[l] += part[l + k];
        const float r = 1.0f / std::sqrt(part[0] / static_cast<float>(D) + eps);
        T* o = out + i * static_cast<int64_t>(D);
        for (int e = 0; e < D; ++e) {
            T n;
            from_f32(to_f32(xr[e]) * r, &n);
            from_f32(to_f32(w[e]) * to_f32(n), o + e);
        }
    }
}

// SwiGLU's silu(gate) * up over a fused gate/up output (rows of [gate | up], I each), each op
// rounded to T as torch's silu and mul are.
#if defined(__AVX512F__)
// `exp_neg` on 16 lanes: the same clamp, reduction and polynomial
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// 16 floats rounded to bfloat16 as `from_f32` rounds (nearest even, NaN kept quiet), widened back
inline __m512 round16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline __m512 silu16(__m512 x) {  // x / (1 + exp(-x)), -0 where exp(-x) overflows
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ), _mm512_set1_ps(-0.0f));
}

inline int silu_mul16(const float* g, const float* u, float* o, int I) {
    int e = 0;
    for (; e + 16 <= I; e += 16)
        _mm512_storeu_ps(o + e, _mm512_mul_ps(silu16(_mm512_loadu_ps(g + e)), _mm512_loadu_ps(u + e)));
    return e;
}
inline int silu_mul16(const uint16_t* g, const uint16_t* u, uint16_t* o, int I) {
    int e = 0;
    for (; e + 16 <= I; e += 16) {
        const __m512 y = round16(_mm512_mul_ps(round16(silu16(load16(g + e))), load16(u + e)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + e),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(y), 16)));
    }
    return e;
}
#endif

template <typename T>
void silu_mul(const T* gu, int64_t row, T* out, int64_t N, int I, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < N; ++i) {
        const T* g = gu + i * row;
        const T* u = g + I;
        T* o = out + i * static_cast<int64_t>(I);
        int e0 = 0;
#if defined(__AVX512F__)
        e0 = silu_mul16(g, u, o, I);  // 16 at a time; the scalar loop below for the rest
#endif
        for (int e = e0; e < I; ++e) {
            const float x = to_f32(g[e]);
            T s;
            from_f32(x < -87.0f ? -0.0f : x / (1.0f + exp_neg(-x)), &s);  // -0 where exp(-x) overflows, as torch
            from_f32(to_f32(s) * to_f32(u[e]), o + e);
        }
    }
}

// A folded one-cluster bank's per-token work (serving/lora_batch.py): z = x V came out of the base
// GEMM as extra columns; per token h = S_n z (S_n its entry's core, block-diagonal over the
// group's modules), then y[n, cols_b] += h_b U_b^T for each module block b. All in float32, y
// rounded once (as torch's y.add_(h @ Ut) does). In torch this is 4-8 small ops per projection
// group (~350 us a group at 16 rows in bfloat16); here one pass.
//   z     (N, R) rows at z + n * z_row           cores (N, R, R) contiguous, or (N, R) if diag
//   ut    (R, D) contiguous float32 (U^T)         y (N, D) rows at y + n * y_row
//   blocks nb x 4 int32: r0, r1, c0, c1 (core rows/cols r0..r1 map to output columns c0..c1)
//   zs: cores hold S^T (h[j] = sum_i z[i] S^T[i][j]), else S (h[i] = sum_j S[i][j] z[j])
// The expand as a GEMM over the batch: U is shared by every token of a cluster, so a tile of
// MR rows x NC columns keeps its sums in registers while U's rows stream through once per tile
// (the per-token GEMV this replaced re-read U for every token and was load/store-bound at
// ~15 GFMA/s; this runs ~4-6x that). Each sum still runs r0..r1 in order from zero, one fused
// multiply-add per step, so a row's bits do not depend on which rows share its tile.
#if defined(__AVX512F__)
constexpr int VL = 16, NV = 4;  // 16 accumulators of 32 registers
#else
constexpr int VL = 8, NV = 2;   // AVX2 (or narrower: the compiler splits the vectors)
#endif
constexpr int MR = 4, NC = VL * NV;
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// y[rows[m], c..c+NC) += H[m] . ut[r0..r1, c..c+NC) for m < M; H rows R apart, M <= MR
template <int M, typename T>
inline void expand_tile(const float* H, int R, const int64_t* rows, const float* ut, int64_t D, int r0, int r1,
                        int64_t c, T* y, int64_t y_row) {
    vf acc[M][NV];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[m][v] = vf{};
    for (int r = r0; r < r1; ++r) {
        const float* u = ut + r * D + c;
        vf uv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) uv[v] = load(u + v * VL);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const float h = H[m * static_cast<int64_t>(R) + r];
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[m][v] += h * uv[v];
        }
    }
    float out[M][NC];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) std::memcpy(out[m] + v * VL, &acc[m][v], sizeof(vf));
    for (int m = 0; m < M; ++m) {
        T* yr = y + rows[m] * y_row + c;
        for (int j = 0; j < NC; ++j) from_f32(to_f32(yr[j]) + out[m][j], yr + j);
    }
}

template <typename T>
void expand_rows(const float* H, int R, const int64_t* rows, int64_t M, const float* ut, int64_t D, int r0, int r1,
                 int64_t c, int64_t c1, T* y, int64_t y_row) {
    if (c + NC <= c1) {
        int64_t m = 0;
        for (; m + MR <= M; m += MR) expand_tile<MR>(H + m * R, R, rows + m, ut, D, r0, r1, c, y, y_row);
        switch (M - m) {
            case 3: expand_tile<3>(H + m * R, R, rows + m, ut, D, r0, r1, c, y, y_row); break;
            case 2: expand_tile<2>(H + m * R, R, rows + m, ut, D, r0, r1, c, y, y_row); break;
            case 1: expand_tile<1>(H + m * R, R, rows + m, ut, D, r0, r1, c, y, y_row); break;
        }
        return;
    }
    for (int64_t m = 0; m < M; ++m) {  // a block's last columns, fewer than NC
        float acc[NC] = {};
        const float* h = H + m * R;
        for (int r = r0; r < r1; ++r)
            for (int64_t j = c; j < c1; ++j) acc[j - c] += h[r] * ut[r * D + j];
        T* yr = y + rows[m] * y_row;
        for (int64_t j = c; j < c1; ++j) from_f32(to_f32(yr[j]) + acc[j - c], yr + j);
    }
}

// Row n's core lines that h = S_n z reads (the diagonal blocks only), into the cache ahead of use:
// the gathered cores are cold by the time a layer runs, and their strided lines defeat the
// hardware's prefetchers (a batch-64 qkv group's cores took 29 us to read, 6 us when warm).
// always_inline: GCC drops a call to a helper whose only effect is prefetches (it finds it pure,
// the result unused), and with it every prefetch here
__attribute__((always_inline)) inline void prefetch_core(const float* cores, int diag, int R, int64_t n, const int32_t* blocks, int nb) {
    if (diag) {
        for (int r = 0; r < R; r += 16) __builtin_prefetch(cores + n * R + r);
        return;
    }
    const float* c = cores + n * static_cast<int64_t>(R) * R;
    for (int b = 0; b < nb; ++b)
        for (int i = blocks[4 * b]; i < blocks[4 * b + 1]; ++i)
            for (int j = blocks[4 * b]; j < blocks[4 * b + 1]; j += 16) __builtin_prefetch(c + static_cast<int64_t>(i) * R + j);
}

template <typename T>
void bank_expand(const T* z, int64_t z_row, const float* cores, int diag, int zs, const float* ut, T* y,
                 int64_t y_row, int64_t N, int R, int D, const int32_t* blocks, int nb, int threads) {
    std::vector<float> H(N * static_cast<int64_t>(R));
    std::vector<char> live(N);
    std::vector<int64_t> rows;
    std::vector<int64_t> tiles;  // (block << 32) | first column, NC columns each
    for (int b = 0; b < nb; ++b)
        for (int64_t c = blocks[4 * b + 2]; c < blocks[4 * b + 3]; c += NC) tiles.push_back((int64_t(b) << 32) | c);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> zf(R);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {  // h = S_n z[n], block by block
            if (n + 1 < N) prefetch_core(cores, diag, R, n + 1, blocks, nb);
            float* h = H.data() + n * R;
            for (int r = 0; r < R; ++r) zf[r] = to_f32(z[n * z_row + r]);
            if (diag) {
                const float* c = cores + n * static_cast<int64_t>(R);
                for (int r = 0; r < R; ++r) h[r] = c[r] * zf[r];
            } else {
                const float* c = cores + n * static_cast<int64_t>(R) * R;
                for (int b = 0; b < nb; ++b) {
                    const int r0 = blocks[4 * b], r1 = blocks[4 * b + 1];
                    if (zs) {  // h[i] = sum_j z[j] S^T[j][i], j in order: rows of S^T, contiguous in i
                        for (int i = r0; i < r1; ++i) h[i] = 0.0f;
                        for (int j = r0; j < r1; ++j) {
                            const float zj = zf[j];
                            const float* cj = c + static_cast<int64_t>(j) * R;
#pragma omp simd
                            for (int i = r0; i < r1; ++i) h[i] += zj * cj[i];
                        }
                    } else {
                        for (int i = r0; i < r1; ++i) {
                            float v = 0.0f;
                            for (int j = r0; j < r1; ++j) v += c[static_cast<int64_t>(i) * R + j] * zf[j];
                            h[i] = v;
                        }
                    }
                }
            }
            bool any = false;
            for (int r = 0; r < R; ++r) any |= h[r] != 0.0f;
            live[n] = any;  // a base token (its core is the zero core): y stays as it is
        }
#pragma omp single
        {
            int64_t k = 0;
            for (int64_t n = 0; n < N; ++n)
                if (live[n]) {
                    if (k != n) std::memcpy(H.data() + k * R, H.data() + n * R, R * sizeof(float));
                    rows.push_back(n);
                    ++k;
                }
        }
#pragma omp for schedule(static)
        for (size_t t = 0; t < tiles.size(); ++t) {
            const int b = static_cast<int>(tiles[t] >> 32);
            const int64_t c = tiles[t] & 0xffffffff;
            if (t + 1 < tiles.size()) {  // the next tile's panel of U^T, while this one computes
                const int b1 = static_cast<int>(tiles[t + 1] >> 32);
                const int64_t c1 = tiles[t + 1] & 0xffffffff, e1 = std::min<int64_t>(c1 + NC, blocks[4 * b1 + 3]);
                for (int r = blocks[4 * b1]; r < blocks[4 * b1 + 1]; ++r)
                    for (int64_t j = c1; j < e1; j += 16) __builtin_prefetch(ut + r * static_cast<int64_t>(D) + j);
            }
            expand_rows(H.data(), R, rows.data(), static_cast<int64_t>(rows.size()), ut, D, blocks[4 * b],
                        blocks[4 * b + 1], c, std::min<int64_t>(c + NC, blocks[4 * b + 3]), y, y_row);
        }
    }
}


#if defined(__AVX512BF16__)
// A bfloat16 GEMM for decode's few rows: y (M, N) = x (M, K) W^T (+ bias) (+ residual), rounded to
// bfloat16 once from the float32 sums. W is packed ahead (`pack_bf16`) for AVX512-BF16's dot
// product of bf16 pairs: block b of 16 output columns, pair p of inputs as 16 x (W[n][2p],
// W[n][2p+1]), 64 bytes, so one load feeds up to 16 rows' `vdpbf16ps`. Each output's sum runs over
// k in the same order whatever M or the thread (a row's bits do not depend on its batch).
constexpr int GEMM_MR = 16;

void pack_bf16(const uint16_t* w, int64_t N, int64_t K, uint16_t* out) {
    const int64_t KP = K / 2, NB = (N + 15) / 16;
    for (int64_t nb = 0; nb < NB; ++nb)
        for (int64_t p = 0; p < KP; ++p)
            for (int i = 0; i < 16; ++i) {
                const int64_t n = nb * 16 + i;
                uint16_t* o = out + ((nb * KP + p) * 16 + i) * 2;
                o[0] = n < N ? w[n * K + 2 * p] : 0;
                o[1] = n < N ? w[n * K + 2 * p + 1] : 0;
            }
}

template <int MR>
inline void gemm_tile(const uint16_t* x, int64_t x_row, const uint16_t* wb, const uint16_t* wnext, int64_t KP,
                      const uint16_t* bias, const uint16_t* res, int64_t r_row, uint16_t* y, int64_t y_row, int nc) {
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t p = 0; p < KP; ++p) {
        if (wnext != nullptr) __builtin_prefetch(wnext + p * 32);
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wb + p * 32);
        for (int m = 0; m < MR; ++m) {
            int32_t pair;
            std::memcpy(&pair, x + m * x_row + 2 * p, 4);
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(pair), w);
        }
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << nc) - 1u);
    const __m512 b = bias ? load16_masked(bias, mask) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
        __m512 v = _mm512_add_ps(acc[m], b);
        if (res) v = _mm512_add_ps(v, load16_masked(res + m * r_row, mask));
        const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(round16(v)), 16);
        _mm256_mask_storeu_epi16(y + m * y_row, mask, _mm512_cvtepi32_epi16(r));
    }
}

// Two column blocks at a time for bigger batches: 12 rows x 32 columns, 24 sums in registers, 2
// weight loads and 12 broadcasts per 24 dot products (the 16 x 16 tile: 1 and 16 per 16).
template <int MR>
inline void gemm_tile2(const uint16_t* x, int64_t x_row, const uint16_t* wb, const uint16_t* wb2, int64_t KP,
                       const uint16_t* bias, const uint16_t* res, int64_t r_row, uint16_t* y, int64_t y_row, int nc2) {
    __m512 acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < KP; ++p) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + p * 32);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb2 + p * 32);
        for (int m = 0; m < MR; ++m) {
            int32_t pair;
            std::memcpy(&pair, x + m * x_row + 2 * p, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
        }
    }
    for (int h = 0; h < 2; ++h) {
        const int nc = h == 0 ? 16 : nc2;
        const __mmask16 mask = static_cast<__mmask16>((1u << nc) - 1u);
        const __m512 b = bias ? load16_masked(bias + 16 * h, mask) : _mm512_setzero_ps();
        for (int m = 0; m < MR; ++m) {
            __m512 v = _mm512_add_ps(acc[m][h], b);
            if (res) v = _mm512_add_ps(v, load16_masked(res + m * r_row + 16 * h, mask));
            const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(round16(v)), 16);
            _mm256_mask_storeu_epi16(y + m * y_row + 16 * h, mask, _mm512_cvtepi32_epi16(r));
        }
    }
}
constexpr int GEMM_MR2 = 12;
using GemmTile2 = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*,
                           const uint16_t*, int64_t, uint16_t*, int64_t, int);
template <int... I>
constexpr std::array<GemmTile2, sizeof...(I)> gemm_tiles2(std::integer_sequence<int, I...>) {
    return {gemm_tile2<I + 1>...};
}

using GemmTile = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*,
                          const uint16_t*, int64_t, uint16_t*, int64_t, int);
template <int... I>
constexpr std::array<GemmTile, sizeof...(I)> gemm_tiles(std::integer_sequence<int, I...>) {
    return {gemm_tile<I + 1>...};
}

void gemm_bf16(const uint16_t* x, int64_t x_row, const uint16_t* wp, int64_t N, int64_t K, const uint16_t* bias,
               const uint16_t* res, int64_t r_row, uint16_t* y, int64_t y_row, int64_t M, int threads) {
    static constexpr auto tiles = gemm_tiles(std::make_integer_sequence<int, GEMM_MR>{});
    static constexpr auto tiles2 = gemm_tiles2(std::make_integer_sequence<int, GEMM_MR2>{});
    const int64_t KP = K / 2, NB = (N + 15) / 16;
    if (M > GEMM_MR) {  // pairs of column blocks, 12 rows at a time (a last odd block alone)
        const int64_t NP = (NB + 1) / 2;
#pragma omp parallel num_threads(threads)
        {
            const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
            for (int64_t pb = NP * tid / nt; pb < NP * (tid + 1) / nt; ++pb) {
                const int64_t nb = 2 * pb;
                const uint16_t* wb = wp + nb * KP * 32;
                if (nb + 1 < NB) {
                    const int nc2 = static_cast<int>(N - (nb + 1) * 16 < 16 ? N - (nb + 1) * 16 : 16);
                    for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR2) {
                        const int mr = static_cast<int>(M - m0 < GEMM_MR2 ? M - m0 : GEMM_MR2);
                        tiles2[mr - 1](x + m0 * x_row, x_row, wb, wb + KP * 32, KP, bias ? bias + nb * 16 : nullptr,
                                       res ? res + m0 * r_row + nb * 16 : nullptr, r_row, y + m0 * y_row + nb * 16,
                                       y_row, nc2);
                    }
                } else {
                    const int nc = static_cast<int>(N - nb * 16);
                    for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {
                        const int mr = static_cast<int>(M - m0 < GEMM_MR ? M - m0 : GEMM_MR);
                        tiles[mr - 1](x + m0 * x_row, x_row, wb, nullptr, KP, bias ? bias + nb * 16 : nullptr,
                                      res ? res + m0 * r_row + nb * 16 : nullptr, r_row, y + m0 * y_row + nb * 16,
                                      y_row, nc);
                    }
                }
            }
        }
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t b0 = NB * tid / nt, b1 = NB * (tid + 1) / nt;  // this thread's column blocks
        for (int64_t nb = b0; nb < b1; ++nb) {
            const uint16_t* wb = wp + nb * KP * 32;
            const uint16_t* wnext = nb + 2 < b1 ? wp + (nb + 2) * KP * 32 : nullptr;
            const int nc = static_cast<int>(N - nb * 16 < 16 ? N - nb * 16 : 16);
            for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {
                const int mr = static_cast<int>(M - m0 < GEMM_MR ? M - m0 : GEMM_MR);
                tiles[mr - 1](x + m0 * x_row, x_row, wb, m0 == 0 ? wnext : nullptr, KP, bias ? bias + nb * 16 : nullptr,
                              res ? res + m0 * r_row + nb * 16 : nullptr, r_row, y + m0 * y_row + nb * 16, y_row, nc);
            }
        }
    }
}
#endif
}  // namespace

extern "C" {

// Returns 0, or 1 for unsupported head sizes, 2 for a length outside 1..L, 3 for a slot outside
// 0..S-1 (such a row is left unwritten).
int kl_decode_attention_f32(const float* q, int64_t q_row, const float* kc, const float* vc, const int64_t* slots,
                            const int64_t* lens, float* out, int64_t S, int B, int Hkv, int G, int hd, int L, int window,
                            float scale, int threads) {
    return decode(q, q_row, kc, vc, slots, lens, out, S, B, Hkv, G, hd, L, window, scale, threads);
}

int kl_decode_attention_bf16(const uint16_t* q, int64_t q_row, const uint16_t* kc, const uint16_t* vc,
                             const int64_t* slots, const int64_t* lens, uint16_t* out, int64_t S, int B, int Hkv, int G, int hd,
                             int L, int window, float scale, int threads) {
    return decode(q, q_row, kc, vc, slots, lens, out, S, B, Hkv, G, hd, L, window, scale, threads);
}

void kl_rms_norm_f32(const float* x, int64_t x_row, const float* w, float* out, int64_t N, int D, float eps,
                     int threads) {
    rms_norm(x, x_row, w, out, N, D, eps, threads);
}
void kl_rms_norm_bf16(const uint16_t* x, int64_t x_row, const uint16_t* w, uint16_t* out, int64_t N, int D,
                      float eps, int threads) {
    rms_norm(x, x_row, w, out, N, D, eps, threads);
}
void kl_silu_mul_f32(const float* gu, int64_t row, float* out, int64_t N, int I, int threads) {
    silu_mul(gu, row, out, N, I, threads);
}
void kl_silu_mul_bf16(const uint16_t* gu, int64_t row, uint16_t* out, int64_t N, int I, int threads) {
    silu_mul(gu, row, out, N, I, threads);
}

void kl_bank_expand_f32(const float* z, int64_t z_row, const float* cores, int diag, int zs, const float* ut,
                        float* y, int64_t y_row, int64_t N, int R, int D, const int32_t* blocks, int nb, int threads) {
    bank_expand(z, z_row, cores, diag, zs, ut, y, y_row, N, R, D, blocks, nb, threads);
}
void kl_bank_expand_bf16(const uint16_t* z, int64_t z_row, const float* cores, int diag, int zs, const float* ut,
                         uint16_t* y, int64_t y_row, int64_t N, int R, int D, const int32_t* blocks, int nb,
                         int threads) {
    bank_expand(z, z_row, cores, diag, zs, ut, y, y_row, N, R, D, blocks, nb, threads);
}

int kl_rope_kv_f32(const float* qkv, int64_t row, const float* cos, const float* sin, float* q, float* kc, float* vc,
                   const int64_t* slots, int64_t N, int H, int Hkv, int hd, int64_t S, int threads) {
    return rope_kv(qkv, row, cos, sin, q, kc, vc, slots, N, H, Hkv, hd, S, threads);
}
int kl_rope_kv_bf16(const uint16_t* qkv, int64_t row, const uint16_t* cos, const uint16_t* sin, uint16_t* q,
                    uint16_t* kc, uint16_t* vc, const int64_t* slots, int64_t N, int H, int Hkv, int hd, int64_t S,
                    int threads) {
    return rope_kv(qkv, row, cos, sin, q, kc, vc, slots, N, H, Hkv, hd, S, threads);
}

#if defined(__AVX512BF16__)
int kl_has_gemm_bf16() { return 1; }
void kl_pack_bf16(const uint16_t* w, int64_t N, int64_t K, uint16_t* out) { pack_bf16(w, N, K, out); }
void kl_gemm_bf16(const uint16_t* x, int64_t x_row, const uint16_t* wp, int64_t N, int64_t K, const uint16_t* bias,
                  const uint16_t* res, int64_t r_row, uint16_t* y, int64_t y_row, int64_t M, int threads) {
    gemm_bf16(x, x_row, wp, N, K, bias, res, r_row, y, y_row, M, threads);
}
#else
int kl_has_gemm_bf16() { return 0; }
void kl_pack_bf16(const uint16_t*, int64_t, int64_t, uint16_t*) {}
void kl_gemm_bf16(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const uint16_t*, const uint16_t*,
                  int64_t, uint16_t*, int64_t, int64_t, int) {}
#endif

int kl_abi_version() { return 9; }
int kl_vector_lanes() { return VL; }

}
