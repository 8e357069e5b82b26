/* One decode step (one new token per sequence) through a stack of Llama-style decoder
 * layers, float32, on the CPU, without returning to Python between operators.
 *
 * A layer: h = rmsnorm(x); q, k, v = h Wq, h Wk, h Wv; RoPE on q and k; k, v appended to
 * the cache; a = attention(q, cache); x += a Wo; h = rmsnorm(x); x += (silu(h Wg) * h Wu) Wd.
 * No biases, pre-norm: what models.py builds for SmolLM2 and Llama-shaped configs.
 *
 * The products and the attention are the kernels of skinny_linear.c and
 * decode_attention.c. Through the modules, a batch-16 step of SmolLM2's shape spent
 * ~240 us of each layer's ~550 in Python and small operators on one core, the other
 * idle (docs/benchmarks.md, session 13); here the small operators (norms, RoPE, the
 * cache write, silu, residuals) are loops over a few KB.
 *
 * Shapes (letters of attention.py): x (B, C) contiguous, updated in place; C = H D.
 * table (L, SLOTS) pointers per layer: the two norms' weights (C) and the products'
 * weights as kernel.pack_skinny packs them; caches (L, 2): the layer's K and V caches
 * (B, G, P, D) contiguous, P positions of which `start` are filled. cos and sin (D) per
 * sequence, `rope_b` floats apart (0: shared), sin's first half negated
 * (layers.RotaryEmbedding).
 * keep (B, S = start + 1) bytes, `keep_b` apart (0: shared), or NULL. Loaded by
 * qkv/kernel.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int qkv_skinny_linear(const float *wp, const float *x, const float *bias, float *y,
                      int M, int K, int N, int threads);
int qkv_decode_attention(
    const float *q, const float *k, const float *v, const uint8_t *keep, float *out,
    int B, int G, int R, int S, int D,
    long kb, long kg, long ks, long vb, long vg, long vs, long keep_b,
    float scale, int threads);
void qkv_silu_mul(float *g, const float *u, long n);

enum { NORM1, WQ, WK, WV, WO, NORM2, WG, WU, WD, SLOTS };

/* y (B, C) <- x / sqrt(mean(x^2) + eps) * w, as torch.nn.RMSNorm */
static void rms_norm(const float *x, const float *w, float *y, int B, int C, float eps)
{
    for (int b = 0; b < B; b++) {
        const float *xb = x + (long)b * C;
        float ss = 0.f;
        for (int c = 0; c < C; c++) ss += xb[c] * xb[c];
        float r = 1.f / sqrtf(ss / C + eps);
        for (int c = 0; c < C; c++) y[(long)b * C + c] = xb[c] * r * w[c];
    }
}

/* x (B, n, D) rotated in place: x cos + (x2, x1) sin, pairs (i, i + D/2) */
static void rope(float *x, int B, int n, int D, const float *cos, const float *sin, long rope_b)
{
    int half = D / 2;
    for (int b = 0; b < B; b++) {
        const float *c = cos + b * rope_b, *s = sin + b * rope_b;
        for (int h = 0; h < n; h++) {
            float *r = x + ((long)b * n + h) * D;
            for (int i = 0; i < half; i++) {
                float x1 = r[i], x2 = r[i + half];
                r[i] = x1 * c[i] + x2 * s[i];
                r[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}

/* the cache's position `at` of every (b, g) <- x (B, G, D) */
static void append(float *cache, const float *x, int B, int G, int D, long P, long at)
{
    for (long i = 0; i < (long)B * G; i++)
        memcpy(cache + (i * P + at) * D, x + i * D, sizeof(float) * (size_t)D);
}

static void add(float *x, const float *y, long n)
{
    for (long i = 0; i < n; i++) x[i] += y[i];
}

/* Returns 0; 1 when memory could not be had (x may then be partly updated). */
int qkv_decode_layers(
    const int64_t *table, const int64_t *caches, int L, float *x, int B, int C, int H, int G,
    int F, long P, long start, const float *cos, const float *sin, long rope_b, const uint8_t *keep,
    long keep_b, float eps, int threads)
{
    int D = C / H;
    long kv = (long)G * D;
    /* h, q, a (attention), o (B, C); k, v (B, G D); g, u (B, F) */
    float *h = malloc(sizeof(float) * (size_t)B * (size_t)(4 * C + 2 * kv + 2L * F));
    if (h == NULL) return 1;
    float *q = h + (long)B * C, *a = q + (long)B * C, *o = a + (long)B * C;
    float *k = o + (long)B * C, *v = k + B * kv, *g = v + B * kv, *u = g + (long)B * F;
    int failed = 0;
    for (int l = 0; l < L && !failed; l++) {
        const int64_t *t = table + (long)l * SLOTS;
#define W(i) ((const float *)(intptr_t)t[i])
        float *kc = (float *)(intptr_t)caches[2L * l];
        float *vc = (float *)(intptr_t)caches[2L * l + 1];
        rms_norm(x, W(NORM1), h, B, C, eps);
        failed |= qkv_skinny_linear(W(WQ), h, NULL, q, B, C, C, threads);
        failed |= qkv_skinny_linear(W(WK), h, NULL, k, B, C, (int)kv, threads);
        failed |= qkv_skinny_linear(W(WV), h, NULL, v, B, C, (int)kv, threads);
        rope(q, B, H, D, cos, sin, rope_b);
        rope(k, B, G, D, cos, sin, rope_b);
        append(kc, k, B, G, D, P, start);
        append(vc, v, B, G, D, P, start);
        failed |= qkv_decode_attention(q, kc, vc, keep, a, B, G, H / G, (int)(start + 1), D,
                                       G * P * D, P * D, D, G * P * D, P * D, D, keep_b,
                                       (float)(1.0 / sqrt((double)D)), threads);
        failed |= qkv_skinny_linear(W(WO), a, NULL, o, B, C, C, threads);
        add(x, o, (long)B * C);
        rms_norm(x, W(NORM2), h, B, C, eps);
        failed |= qkv_skinny_linear(W(WG), h, NULL, g, B, C, F, threads);
        failed |= qkv_skinny_linear(W(WU), h, NULL, u, B, C, F, threads);
        qkv_silu_mul(g, u, (long)B * F);
        failed |= qkv_skinny_linear(W(WD), g, NULL, o, B, F, C, threads);
        add(x, o, (long)B * C);
#undef W
    }
    free(h);
    return failed != 0;
}
