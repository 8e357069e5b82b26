/* Attention of a few query rows against a long K/V cache, float32 on the CPU.
 *
 * Decode steps and beam search ask softmax(q K^T / sqrt(D)) V for R query rows per
 * key/value head (R = 1 for MHA, H for MQA, times the beams sharing a source) against S
 * cached keys. PyTorch runs these as R-row matrix products, far below this CPU's memory
 * speed when R is 2-64 (docs/benchmarks.md, "Session 6"). Here K is read once and each
 * row of it is multiplied with all R rows while it sits in L1; V likewise.
 *
 * Shapes (letters of attention.py): q and out (B, G, R, D) contiguous; k and v
 * (B, G, S, D) with any strides but the last (1); keep (B or 1, S) bytes, 1 = may attend,
 * or NULL. A row with no key allowed gives zeros. Loaded and called by qkv/kernel.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef float v8 __attribute__((vector_size(32)));

/* Query rows handled together in `scores` and `mix`, so that each key and value vector loaded
   serves several rows: 3 x 8 accumulators need AVX-512's 32 vector registers (AVX2's 16
   would spill). On the Zen 4, with the vectorised maximum, MQA's attention (9 rows) became
   1.5x and GQA's (3 rows) 1.4x faster (ad hoc, docs/benchmarks.md, session 11). */
#if defined(__AVX512F__)
enum { NB = 3 };
#else
enum { NB = 1 };
#endif

static inline v8 load8(const float *p) { v8 x; __builtin_memcpy(&x, p, 32); return x; }
static inline void store8(float *p, v8 x) { __builtin_memcpy(p, &x, 32); }
static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

#if defined(__AVX512F__)
/* AVX-512's full width for the several-rows and one-row paths (D a multiple of 16): half
   the loads and multiply-adds of 8-lane vectors. */
typedef float v16 __attribute__((vector_size(64)));
static inline v16 load16(const float *p) { v16 x; __builtin_memcpy(&x, p, 64); return x; }
static inline void store16(float *p, v16 x) { __builtin_memcpy(p, &x, 64); }
static inline v16 splat16(float x) { return x - (v16){0}; }
static inline v8 fold16(v16 x) {  /* lane j: x[j] + x[j + 8] */
    return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
}
#define WIDE 1
#else
#define WIDE 0
#endif

static inline float sum8(v8 x) {
    float s = 0.f;
    for (int i = 0; i < 8; i++) s += x[i];
    return s;
}

/* Lane j of the result is the sum of the lanes of a_j: eight dot products finished at once. */
static inline v8 sums8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
#define EVEN(a, b) __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14)
#define ODD(a, b) __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15)
#define LO(a, b) __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13)
#define HI(a, b) __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15)
    v8 x01 = EVEN(a0, a1) + ODD(a0, a1), x23 = EVEN(a2, a3) + ODD(a2, a3);
    v8 x45 = EVEN(a4, a5) + ODD(a4, a5), x67 = EVEN(a6, a7) + ODD(a6, a7);
    v8 y0 = LO(x01, x23) + HI(x01, x23), y1 = LO(x45, x67) + HI(x45, x67);
    return __builtin_shufflevector(y0, y1, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(y0, y1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* Vectors for e^x: AVX-512's 16 lanes where there are, else 8. */
#if WIDE
typedef v16 vexp;
#else
typedef v8 vexp;
#endif
typedef int32_t iexp __attribute__((vector_size(sizeof(vexp))));
enum { EL = sizeof(vexp) / sizeof(float) };
static inline vexp loade(const float *p) { vexp x; __builtin_memcpy(&x, p, sizeof x); return x; }
static inline void storee(float *p, vexp x) { __builtin_memcpy(p, &x, sizeof x); }

/* e^x for x <= 0 or -inf (scores minus their maximum; no NaN), relative error about 2e-7
   (Cephes expf). */
static inline vexp expe(vexp x) {
    iexp low = x < -87.f;  /* e^-87 is near float's smallest normal: treat as 0 */
    iexp inside = x > -88.f, ix, floor;
    vexp lowest = (vexp){0} - 88.f;
    __builtin_memcpy(&ix, &x, sizeof x);
    __builtin_memcpy(&floor, &lowest, sizeof x);
    ix = (inside & ix) | (~inside & floor);  /* max(x, -88): keeps the conversion below defined */
    __builtin_memcpy(&x, &ix, sizeof x);
    vexp n = (x * 1.44269504f + 12582912.f) - 12582912.f;  /* round(x / ln 2) */
    vexp f = (x - n * 0.693359375f) + n * 2.12194440e-4f;  /* x - n ln 2 */
    vexp p = f * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.f;
    iexp bits = (__builtin_convertvector(n, iexp) + 127) << 23, pbits;  /* 2^n */
    vexp scale;
    __builtin_memcpy(&scale, &bits, sizeof x);
    p = p * scale;
    __builtin_memcpy(&pbits, &p, sizeof x);
    pbits &= ~low;
    __builtin_memcpy(&p, &pbits, sizeof x);
    return p;
}

/* sum_t e^(x[t] - m) for t < n, m finite; out[t] <- each term unless out is NULL. */
static inline float exp_sum(const float *x, float *out, int n, float m) {
    vexp acc = {0};
    int t = 0;
    for (; t + EL <= n; t += EL) {
        vexp e = expe(loade(x + t) - m);
        if (out) storee(out + t, e);
        acc += e;
    }
    float sum = 0.f;
    for (int j = 0; j < EL; j++) sum += acc[j];
    for (; t < n; t++) {
        float e = x[t] == -INFINITY ? 0.f : expf(x[t] - m);
        if (out) out[t] = e;
        sum += e;
    }
    return sum;
}

/* g <- silu(g) u = g / (1 + e^-g) u, n floats: the SwiGLU of decode_layers.c with the
   vectorised e^x, which wants x <= 0: e = e^-|g|, and silu(g) = g e / (1 + e) for g < 0.
   A scalar loop of expf took ~1.5 ms of a batch-16 decode step of SmolLM2's shape
   (30 layers of 16 x 1536). */
void qkv_silu_mul(float *g, const float *u, long n)
{
    long i = 0;
    for (; i + EL <= n; i += EL) {
        vexp x = loade(g + i), minus, xe;
        iexp bits, neg = x < 0.f, xeb;
        __builtin_memcpy(&bits, &x, sizeof x);
        bits |= (iexp){0} + (int32_t)0x80000000;  /* -|x| */
        __builtin_memcpy(&minus, &bits, sizeof x);
        vexp e = expe(minus);
        xe = x * e;
        __builtin_memcpy(&xeb, &xe, sizeof x);
        __builtin_memcpy(&bits, &x, sizeof x);
        bits = (neg & xeb) | (~neg & bits);  /* x e where x < 0, else x */
        __builtin_memcpy(&xe, &bits, sizeof x);
        storee(g + i, xe / (1.f + e) * loade(u + i));
    }
    for (; i < n; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

/* Prefetch keys [a, b) of the tile at k (stride ks). With several blocks of rows the first
   block's pass over a tile reads it from memory and the others from L1; fetching the next
   tile meanwhile overlapped the two (MQA's 9 rows: 1.3x faster on the Zen 4). With one
   block there is nothing to overlap, and it cost time. Into every cache level (locality 3),
   not into L2 only: see prefetch_spread. */
static inline void prefetch_keys(const float *k, long ks, int D, int a, int b) {
    for (int t = a; t < b; t++)
        for (int d = 0; d < D; d += 16) __builtin_prefetch(k + t * ks + d, 0, 3);
}

/* The next tile's keys [*pos, *pos + step) in 1/65536ths of a key, *pos moved on: spreads
   its prefetch over this tile's iterations without two integer divisions in each (the
   profile showed them). With locality 3 as well, MQA's decode step on the Zen 5 was 1.07x
   faster when the host's memory read 75 GB/s and 1.03x at 50 GB/s (ad hoc, interleaved;
   docs/benchmarks.md, session 13). */
static inline void prefetch_spread(const float *k, long ks, int D, unsigned *pos,
                                   unsigned step) {
    unsigned a = *pos >> 16;
    *pos += step;
    prefetch_keys(k, ks, D, (int)a, (int)(*pos >> 16));
}

/* p[r][t] = q[r] . k[t] for the R rows (q already scaled by 1/sqrt(D)) and t in [t0, t1),
   a tile of keys that stays in L1 while all R rows use it. */
static inline __attribute__((always_inline)) void scores(
    const float *q, const float *k, long ks, float *p, int R, int S, const int D,
    int t0, int t1)
{
    const int C = D / 8;
    int r = 0;
    const int nk = S - t1 < t1 - t0 ? S - t1 : t1 - t0, iters = (R / NB) * ((t1 - t0) / 8) + 1;
    unsigned pos = 0, step = ((unsigned)nk << 16) / (unsigned)iters;
    for (; NB > 1 && r + NB <= R; r += NB) {  /* NB rows at once: a key vector serves all */
        int t = t0;
        for (; t + 8 <= t1; t += 8) {
            if (R >= 2 * NB)  /* the next tile, spread over this one's iterations */
                prefetch_spread(k + t1 * ks, ks, D, &pos, step);
            const float *kt = k + t * ks;
#if WIDE
            if (D % 16 == 0) {
                v16 a[NB][8] = {{{0}}};
                for (int c = 0; c < D / 16; c++) {
                    v16 x[NB];
                    for (int i = 0; i < NB; i++) x[i] = load16(q + (r + i) * D + 16 * c);
                    for (int j = 0; j < 8; j++) {
                        v16 kj = load16(kt + j * ks + 16 * c);
                        for (int i = 0; i < NB; i++) a[i][j] += x[i] * kj;
                    }
                }
                for (int i = 0; i < NB; i++)
                    store8(p + (long)(r + i) * S + t,
                           sums8(fold16(a[i][0]), fold16(a[i][1]), fold16(a[i][2]),
                                 fold16(a[i][3]), fold16(a[i][4]), fold16(a[i][5]),
                                 fold16(a[i][6]), fold16(a[i][7])));
                continue;
            }
#endif
            v8 a[NB][8] = {{{0}}};
            for (int c = 0; c < C; c++) {
                v8 x[NB];
                for (int i = 0; i < NB; i++) x[i] = load8(q + (r + i) * D + 8 * c);
                for (int j = 0; j < 8; j++) {
                    v8 kj = load8(kt + j * ks + 8 * c);
                    for (int i = 0; i < NB; i++) a[i][j] += x[i] * kj;
                }
            }
            for (int i = 0; i < NB; i++)
                store8(p + (long)(r + i) * S + t, sums8(a[i][0], a[i][1], a[i][2], a[i][3],
                                                        a[i][4], a[i][5], a[i][6], a[i][7]));
        }
        for (; t < t1; t++)
            for (int i = 0; i < NB; i++) {
                v8 a = {0};
                for (int c = 0; c < C; c++) a += load8(q + (r + i) * D + 8 * c) * load8(k + t * ks + 8 * c);
                p[(long)(r + i) * S + t] = sum8(a);
            }
    }
#if WIDE
    /* One row (MHA) at 16 lanes: half the loads and multiply-adds of the 8-lane loop below.
       Not faster in a loop over keys in L1, but MHA's attention read its cache 1.075x faster
       when the host's memory read 77 GB/s (a tie at 49 GB/s; ad hoc, docs/benchmarks.md,
       session 13): fewer instructions between the loads. */
    if (D % 16 == 0 && D <= 128)
        for (; r < R; r++) {
            v16 qr[8];
            for (int c = 0; c < D / 16; c++) qr[c] = load16(q + r * D + 16 * c);
            int t = t0;
            for (; t + 8 <= t1; t += 8) {
                v16 a[8] = {{0}};
                const float *kt = k + t * ks;
                for (int c = 0; c < D / 16; c++)
                    for (int j = 0; j < 8; j++) a[j] += qr[c] * load16(kt + j * ks + 16 * c);
                store8(p + (long)r * S + t, sums8(fold16(a[0]), fold16(a[1]), fold16(a[2]),
                                                  fold16(a[3]), fold16(a[4]), fold16(a[5]),
                                                  fold16(a[6]), fold16(a[7])));
            }
            for (; t < t1; t++) {
                v16 a = {0};
                for (int c = 0; c < D / 16; c++) a += qr[c] * load16(k + t * ks + 16 * c);
                p[(long)r * S + t] = sum8(fold16(a));
            }
        }
#endif
    for (; r < R; r++) {
        v8 qr[C];
        for (int c = 0; c < C; c++) qr[c] = load8(q + r * D + 8 * c);
        int t = t0;
        for (; t + 8 <= t1; t += 8) {
            v8 a[8] = {{0}};
            const float *kt = k + t * ks;
            for (int c = 0; c < C; c++)
                for (int j = 0; j < 8; j++) a[j] += qr[c] * load8(kt + j * ks + 8 * c);
            store8(p + (long)r * S + t, sums8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
        }
        for (; t < t1; t++) {
            v8 a = {0};
            for (int c = 0; c < C; c++) a += qr[c] * load8(k + t * ks + 8 * c);
            p[(long)r * S + t] = sum8(a);
        }
    }
}

/* The largest of x[0..n), EL lanes at a time, like e^x (16 with AVX-512: the softmax of
   MQA's 9 rows, computed alone, 1.15-1.19x faster than with 8; ad hoc, session 13); NaN if
   any is NaN; -inf if n == 0. */
static float max_or_nan(const float *x, int n) {
    vexp mv = (vexp){0} - INFINITY;
    iexp nan = {0};
    int t = 0;
    for (; t + EL <= n; t += EL) {
        vexp v = loade(x + t);
        iexp bigger = v > mv, iv, im;
        nan |= v != v;
        __builtin_memcpy(&iv, &v, sizeof v);
        __builtin_memcpy(&im, &mv, sizeof v);
        im = (bigger & iv) | (~bigger & im);  /* lane-wise v > mv ? v : mv */
        __builtin_memcpy(&mv, &im, sizeof v);
    }
    float m = -INFINITY;
    int isnan = 0;
    for (int j = 0; j < EL; j++) { m = mv[j] > m ? mv[j] : m; isnan |= nan[j]; }
    for (; t < n; t++) { m = x[t] > m ? x[t] : m; isnan |= x[t] != x[t]; }
    return isnan ? NAN : m;
}

/* p[t] <- e^(p[t] - max) for allowed keys, 0 for the others; *max <- the max; returns the
   sum. As PyTorch's SDPA on the CPU treats a row: no key allowed, or every allowed score
   -inf, gives 0 (max -inf; the caller writes zeros); a NaN or +inf score gives NaN. */
static float softmax_numerator(float *p, const uint8_t *keep, int S, float *max) {
    int allowed = keep == NULL && S > 0;
    if (keep)
        for (int t = 0; t < S; t++) {
            allowed |= keep[t];
            p[t] = keep[t] ? p[t] : -INFINITY;
        }
    float m = max_or_nan(p, S);
    if (!allowed || m == -INFINITY) {
        *max = -INFINITY;
        return 0.f;
    }
    if (m != m || m == INFINITY) {  /* e^(inf - inf): NaN, as SDPA gives */
        for (int t = 0; t < S; t++) p[t] = NAN;
        *max = NAN;
        return NAN;
    }
    *max = m;
    return exp_sum(p, p, S, m);
}

/* out[r] += sum_t p[r][t] v[t] for t in [t0, t1). */
static inline __attribute__((always_inline)) void mix(
    const float *p, const float *v, long vs, float *out, int R, int S, const int D,
    int t0, int t1)
{
    const int C = D / 8;
    int r = 0;
    const int nk = S - t1 < t1 - t0 ? S - t1 : t1 - t0, iters = (R / NB) * (t1 - t0) + 1;
    unsigned pos = 0, step = ((unsigned)nk << 16) / (unsigned)iters;
#if WIDE
    for (; NB > 1 && r + NB <= R && D % 16 == 0 && D <= 128; r += NB) {  /* 16 lanes */
        v16 acc[NB][8];
        for (int i = 0; i < NB; i++)
            for (int c = 0; c < D / 16; c++) acc[i][c] = load16(out + (r + i) * D + 16 * c);
        for (int t = t0; t < t1; t++) {
            if (R >= 2 * NB)
                prefetch_spread(v + t1 * vs, vs, D, &pos, step);
            v16 w[NB];
            for (int i = 0; i < NB; i++) w[i] = splat16(p[(long)(r + i) * S + t]);
            for (int c = 0; c < D / 16; c++) {
                v16 vc = load16(v + t * vs + 16 * c);
                for (int i = 0; i < NB; i++) acc[i][c] += w[i] * vc;
            }
        }
        for (int i = 0; i < NB; i++)
            for (int c = 0; c < D / 16; c++) store16(out + (r + i) * D + 16 * c, acc[i][c]);
    }
#endif
    for (; NB > 1 && r + NB <= R && C <= 8; r += NB) {  /* NB rows at once */
        v8 acc[NB][8];
        for (int i = 0; i < NB; i++)
            for (int c = 0; c < C; c++) acc[i][c] = load8(out + (r + i) * D + 8 * c);
        for (int t = t0; t < t1; t++) {
            if (R >= 2 * NB)
                prefetch_spread(v + t1 * vs, vs, D, &pos, step);
            v8 w[NB];
            for (int i = 0; i < NB; i++) w[i] = splat(p[(long)(r + i) * S + t]);
            for (int c = 0; c < C; c++) {
                v8 vc = load8(v + t * vs + 8 * c);
                for (int i = 0; i < NB; i++) acc[i][c] += w[i] * vc;
            }
        }
        for (int i = 0; i < NB; i++)
            for (int c = 0; c < C; c++) store8(out + (r + i) * D + 8 * c, acc[i][c]);
    }
#if WIDE
    if (D % 16 == 0 && D <= 128)  /* one row at 16 lanes: see `scores` */
        for (; r < R; r++) {
            v16 acc[8];
            for (int c = 0; c < D / 16; c++) acc[c] = load16(out + r * D + 16 * c);
            for (int t = t0; t < t1; t++) {
                v16 w = splat16(p[(long)r * S + t]);
                for (int c = 0; c < D / 16; c++) acc[c] += w * load16(v + t * vs + 16 * c);
            }
            for (int c = 0; c < D / 16; c++) store16(out + r * D + 16 * c, acc[c]);
        }
#endif
    for (; r < R; r++) {
        v8 acc[C];
        for (int c = 0; c < C; c++) acc[c] = load8(out + r * D + 8 * c);
        for (int t = t0; t < t1; t++) {
            v8 w = splat(p[(long)r * S + t]);
            for (int c = 0; c < C; c++) acc[c] += w * load8(v + t * vs + 8 * c);
        }
        for (int c = 0; c < C; c++) store8(out + r * D + 8 * c, acc[c]);
    }
}

enum { TILE = 64, MIN_CHUNK = 256 };

/* R query rows against S keys of one (batch row, kv head), or against one chunk of them:
   out (R, D) <- sum_t e^(s_t - m) v_t, m[r] <- the rows' maximum score, l[r] <- sum_t
   e^(s_t - m): the softmax not yet divided by l, so chunks can be merged (`combine`).
   No key allowed: m = -inf, l = 0, out = 0. p: R * S floats of scratch. */
static inline __attribute__((always_inline)) void attend(
    const float *q, const float *k, long ks, const float *v, long vs, const uint8_t *keep,
    float *out, float *m, float *l, int R, int S, const int D, float *p)
{
    for (int t0 = 0; t0 < S; t0 += TILE)
        scores(q, k, ks, p, R, S, D, t0, t0 + TILE < S ? t0 + TILE : S);
    for (int r = 0; r < R; r++) l[r] = softmax_numerator(p + (long)r * S, keep, S, m + r);
    for (int i = 0; i < R * D; i++) out[i] = 0.f;
    for (int t0 = 0; t0 < S; t0 += TILE)
        mix(p, v, vs, out, R, S, D, t0, t0 + TILE < S ? t0 + TILE : S);
}

/* out (R, D) = the softmax-weighted sum over n chunks' parts (R, D) with their m, l. */
static void combine(const float *parts, const float *m, const float *l, int n, int R, int D,
                    float *out)
{
    for (int r = 0; r < R; r++) {
        float top = -INFINITY, total = 0.f;
        for (int j = 0; j < n; j++)
            top = m[j * R + r] > top || m[j * R + r] != m[j * R + r] ? m[j * R + r] : top;
        if (top != top) {  /* a chunk's softmax was undefined: NaN, as SDPA gives */
            for (int d = 0; d < D; d++) out[r * D + d] = NAN;
            continue;
        }
        for (int d = 0; d < D; d++) out[r * D + d] = 0.f;
        if (top == -INFINITY) continue;  /* no key allowed (or only -inf scores): zeros */
        for (int j = 0; j < n; j++) {
            if (l[j * R + r] == 0.f) continue;  /* a chunk with no key to add */
            float w = expf(m[j * R + r] - top);
            total += w * l[j * R + r];
            for (int d = 0; d < D; d++) out[r * D + d] += w * parts[((long)j * R + r) * D + d];
        }
        for (int d = 0; d < D; d++) out[r * D + d] /= total;
    }
}

/* The chunks S is cut into: with fewer (batch row, kv head) pairs than about 4 per thread
   (batch 1, MQA) the keys are split too, as in flash-decoding, so that every thread reads
   part of the cache; never below MIN_CHUNK keys a chunk. */
static int chunks(long pairs, int S, int threads) {
    int n = 1;
    while (pairs * n < 4L * threads && S >= 2L * n * MIN_CHUNK) n *= 2;
    return n;
}

/* Returns 0, or 1 when scratch memory could not be had (out is then incomplete). */
int qkv_decode_attention(
    const float *q, const float *k, const float *v, const uint8_t *keep, float *out,
    int B, int G, int R, int S, int D,
    long kb, long kg, long ks, long vb, long vg, long vs, long keep_b,
    float scale, int threads)
{
    long pairs = (long)B * G, rows = pairs * R;
    int n = chunks(pairs, S, threads), span = (S + n - 1) / n;
    /* the scaled queries, then per (pair, chunk): parts (R, D), m (R), l (R) */
    float *qs = malloc(sizeof(float) * (size_t)(rows * D + pairs * n * R * (D + 2)));
    if (qs == NULL) return 1;
    float *parts = qs + rows * D, *m = parts + pairs * n * R * D, *l = m + pairs * n * R;
    for (long i = 0; i < rows * D; i++) qs[i] = q[i] * scale;
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        float *p = malloc(sizeof(float) * (size_t)R * (size_t)span);
        failed = p == NULL;
        #pragma omp for schedule(static)
        for (long w = 0; w < pairs * n; w++) {
            if (p == NULL) continue;
            long i = w / n, b = i / G, g = i % G;
            int t0 = (int)(w % n) * span, len = S - t0 < span ? S - t0 : span;
            if (len <= 0) {  /* an empty last chunk */
                for (int r = 0; r < R; r++) { m[w * R + r] = -INFINITY; l[w * R + r] = 0.f; }
                for (int x = 0; x < R * D; x++) parts[w * R * D + x] = 0.f;
                continue;
            }
            const float *qi = qs + i * R * D;
            const float *ki = k + b * kb + g * kg + t0 * ks, *vi = v + b * vb + g * vg + t0 * vs;
            const uint8_t *keep_i = keep ? keep + b * keep_b + t0 : NULL;
            float *pw = parts + w * R * D, *mw = m + w * R, *lw = l + w * R;
            /* constant D: the vector loops unroll and stay in registers */
            if (D == 64) attend(qi, ki, ks, vi, vs, keep_i, pw, mw, lw, R, len, 64, p);
            else if (D == 128) attend(qi, ki, ks, vi, vs, keep_i, pw, mw, lw, R, len, 128, p);
            else if (D == 32) attend(qi, ki, ks, vi, vs, keep_i, pw, mw, lw, R, len, 32, p);
            else attend(qi, ki, ks, vi, vs, keep_i, pw, mw, lw, R, len, D, p);
        }
        free(p);
        #pragma omp for schedule(static)  /* after the implicit barrier of the loop above */
        for (long i = 0; i < pairs; i++)
            combine(parts + i * n * R * D, m + i * n * R, l + i * n * R, n, R, D, out + i * R * D);
    }
    free(qs);
    return failed;
}

/* out[n] = log sum_j e^x[n][j] for the N rows of x (N, V) contiguous: beam search's
   log-normaliser of each row of logits, as torch.logsumexp gives it (a NaN gives NaN, +inf
   gives +inf, a row of -inf gives -inf), with the vectorised e^x above. */
void qkv_logsumexp_rows(const float *x, long N, int V, float *out, int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static) if (N > 1)
    for (long n = 0; n < N; n++) {
        const float *r = x + n * V;
        float m = max_or_nan(r, V);
        if (m != m || m == INFINITY || m == -INFINITY) {
            out[n] = m;
            continue;
        }
        out[n] = m + logf(exp_sum(r, NULL, V, m));
    }
}
