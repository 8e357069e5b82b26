/* y = x W^T + bias for a few rows of x (a decode step), float32, on the CPU.
 *
 * With a few rows a product does a few multiply-adds per weight it reads, so its speed is
 * the speed at which the weight streams from memory. oneDNN's packed product (linear.py)
 * fetched and computed in turn and streamed SmolLM2's weights at about half the memory
 * bandwidth on a 2-core Zen 5 (docs/benchmarks.md, session 12). Here the weight is packed
 * once into blocks of VW output columns, (ceil(N / VW), K, VW), so one block is read
 * front to back; each loaded vector of VW weights is multiplied with all M rows of x, and
 * the block is prefetched AHEAD vectors ahead of the loads.
 *
 * Shapes: x (M, K) contiguous, 1 <= M <= MAX_ROWS (in chunks of MAX_M rows); wp (ceil(N / VW), K, VW), the last block
 * padded with zeros; bias (N) or NULL; y (M, N) contiguous. Loaded by qkv/kernel.py.
 */
#include <stdlib.h>

/* VW floats per vector; MAX_M rows of one vector of sums each, plus the loaded weight and
   x value, fit the vector registers (32 with AVX-512, 16 with AVX2) */
#if defined(__AVX512F__)
enum { VW = 16, MAX_M = 16 };
#else
enum { VW = 8, MAX_M = 12 };
#endif
enum { AHEAD = 128, MAX_ROWS = 64 };  /* vectors: 8 KB ahead with AVX-512 */

typedef float vec __attribute__((vector_size(VW * 4)));

static inline vec load(const float *p) { vec x; __builtin_memcpy(&x, p, sizeof x); return x; }
static inline void store(float *p, vec x) { __builtin_memcpy(p, &x, sizeof x); }
static inline vec splat(float x) { return x - (vec){0}; }

/* Columns [nb VW, nb VW + VW) of y for M rows. xt is x transposed, (K, M): row k holds
   the M values that multiply weight vector k, side by side (x's own rows, K floats
   apart, would all fall in one L1 set when K is a multiple of 1024). With fewer than 8
   rows, U independent sums per row keep the adds from waiting on each other. */
static inline __attribute__((always_inline)) void block(
    const float *wp, const float *xt, const float *bias, float *y, const int M, int K, int N,
    long nb, const int U)
{
    vec acc[4][16];
    for (int u = 0; u < U; u++)
        for (int m = 0; m < M; m++) acc[u][m] = splat(0.f);
    const float *w = wp + nb * (long)K * VW;
    int k = 0;
    for (; k + U <= K; k += U)
        for (int u = 0; u < U; u++) {
            __builtin_prefetch(w + (long)(k + u + AHEAD) * VW, 0, 0);
            vec wk = load(w + (long)(k + u) * VW);
            for (int m = 0; m < M; m++) acc[u][m] += wk * splat(xt[(long)(k + u) * M + m]);
        }
    for (; k < K; k++) {
        vec wk = load(w + (long)k * VW);
        for (int m = 0; m < M; m++) acc[0][m] += wk * splat(xt[(long)k * M + m]);
    }
    long n0 = nb * VW;
    int cols = N - n0 < VW ? (int)(N - n0) : VW;
    for (int m = 0; m < M; m++) {
        vec s = acc[0][m];
        for (int u = 1; u < U; u++) s += acc[u][m];
        if (cols == VW) {
            if (bias) s += load(bias + n0);
            store(y + (long)m * N + n0, s);
        } else {  /* the padded last block */
            for (int j = 0; j < cols; j++) y[(long)m * N + n0 + j] = s[j] + (bias ? bias[n0 + j] : 0.f);
        }
    }
}

#if defined(__AVX512F__)
/* out[i] <- lane i of the 16 rows x[j] (16 floats each, `stride` apart): a 16 x 16
   transpose, within 128-bit lanes first, then across them. */
static inline void transpose16(const float *x, long stride, float *out)
{
#define UNPACK_LO(a, b) __builtin_shufflevector(a, b, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29)
#define UNPACK_HI(a, b) __builtin_shufflevector(a, b, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31)
#define PAIRS_LO(a, b) __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
#define PAIRS_HI(a, b) __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31)
#define QUADS_EVEN(a, b) __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
#define QUADS_ODD(a, b) __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)
    vec a[16], b[16];
    for (int j = 0; j < 16; j++) a[j] = load(x + j * stride);
    for (int i = 0; i < 16; i += 2) {  /* pairs of rows, element by element */
        b[i] = UNPACK_LO(a[i], a[i + 1]);
        b[i + 1] = UNPACK_HI(a[i], a[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {  /* then two elements at a time: 4 x 4 within lanes */
        a[g] = PAIRS_LO(b[g], b[g + 2]);
        a[g + 1] = PAIRS_HI(b[g], b[g + 2]);
        a[g + 2] = PAIRS_LO(b[g + 1], b[g + 3]);
        a[g + 3] = PAIRS_HI(b[g + 1], b[g + 3]);
    }
    for (int g = 0; g < 16; g += 8)  /* then 128-bit lanes, twice */
        for (int i = 0; i < 4; i++) {
            b[g + i] = QUADS_EVEN(a[g + i], a[g + i + 4]);
            b[g + i + 4] = QUADS_ODD(a[g + i], a[g + i + 4]);
        }
    for (int i = 0; i < 8; i++) {
        store(out + i * 16, QUADS_EVEN(b[i], b[i + 8]));
        store(out + (i + 8) * 16, QUADS_ODD(b[i], b[i + 8]));
    }
#undef UNPACK_LO
#undef UNPACK_HI
#undef PAIRS_LO
#undef PAIRS_HI
#undef QUADS_EVEN
#undef QUADS_ODD
}
#endif

/* Columns [k0, k1) of x (rows, K) into xt (K, rows): xt row k holds x's column k. Sixteen
   rows with AVX-512 go 16 x 16 at a time: element by element (with x's rows one after the
   other) the copy took ~1 ns per float: 9 us of a 16-row product with K = 576 on one
   thread, ~5 us on each of two, more than its multiply-adds. */
static void transpose_rows(const float *x, int rows, int K, float *xt, int k0, int k1)
{
    int k = k0;
#if defined(__AVX512F__)
    if (rows == 16)
        for (; k + 16 <= k1; k += 16) transpose16(x + k, K, xt + (long)k * 16);
#endif
    for (int m = 0; m < rows; m++)
        for (int j = k; j < k1; j++) xt[(long)j * rows + m] = x[(long)m * K + j];
}

int qkv_skinny_width(void) { return VW; }

int qkv_skinny_max_rows(void) { return MAX_ROWS; }

/* Returns 0, 1 when scratch memory could not be had, 2 when M is out of range (y is then
   not written). Rows come in chunks of MAX_M: each block of the weight, read from memory
   for the first chunk, serves the others from L1 or L2. */
int qkv_skinny_linear(const float *wp, const float *x, const float *bias, float *y,
                      int M, int K, int N, int threads)
{
    if (M < 1 || M > MAX_ROWS) return 2;
    /* chunk c's rows, transposed: (K, rows of c) at xt + c MAX_M K */
    float *xt = M == 1 ? (float *)x : malloc(sizeof(float) * (size_t)K * (size_t)M);
    if (xt == NULL) return 1;
    long blocks = (N + VW - 1) / VW;
    int chunks = (M + MAX_M - 1) / MAX_M;
    #pragma omp parallel num_threads(threads)
    {
        if (M > 1) {  /* one row is its own transpose */
            long spans = (K + 63) / 64;  /* 64 columns of x at a time, for each chunk */
            #pragma omp for schedule(static)
            for (long w = 0; w < chunks * spans; w++) {
                int c = (int)(w / spans), k0 = (int)(w % spans) * 64;
                int rows = M - c * MAX_M < MAX_M ? M - c * MAX_M : MAX_M;
                transpose_rows(x + (long)c * MAX_M * K, rows, K, xt + (long)c * MAX_M * K,
                               k0, k0 + 64 < K ? k0 + 64 : K);
            }
        }
        #pragma omp for schedule(static)  /* after the implicit barrier of the loop above */
        for (long nb = 0; nb < blocks; nb++)
          for (int c = 0; c < chunks; c++) {
            int rows = M - c * MAX_M < MAX_M ? M - c * MAX_M : MAX_M;
            const float *xc = xt + (long)c * MAX_M * K;
            float *yc = y + (long)c * MAX_M * N;
            switch (rows) {  /* constant rows and U: the accumulators stay in registers */
#define ROWS(m, u) case m: block(wp, xc, bias, yc, m, K, N, nb, u); break;
            ROWS(1, 4) ROWS(2, 4) ROWS(3, 2) ROWS(4, 2) ROWS(5, 2) ROWS(6, 2) ROWS(7, 2)
            ROWS(8, 1) ROWS(9, 1) ROWS(10, 1) ROWS(11, 1) ROWS(12, 1) ROWS(13, 1) ROWS(14, 1)
            ROWS(15, 1) ROWS(16, 1)
#undef ROWS
            }
          }
    }
    if (M > 1) free(xt);
    return 0;
}
