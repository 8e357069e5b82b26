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
            #pragma omp for schedule(static)
            for (int k = 0; k < K; k++)
                for (int m = 0; m < M; m++) {
                    int c = m / MAX_M, rows = M - c * MAX_M < MAX_M ? M - c * MAX_M : MAX_M;
                    xt[(long)c * MAX_M * K + (long)k * rows + m % MAX_M] = x[(long)m * K + k];
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
