/* The small_fc_lopt network and update for one chunk, fused (float32, CPU).
 *
 * mulo/functional.py builds the per-element input channels (channel-major, [k, n]) and the
 * first layer's broadcast terms; this kernel runs Linear(k->32) + ReLU, Linear(32->32) + ReLU,
 * Linear(32->2) and p += alpha * d * exp(0.001 a) on tiles of TILE elements that stay in
 * registers / L1, so no activation ever goes to memory. It is the same math as the PyTorch
 * path in functional.py (the fallback and the reference it is tested against).
 *
 * Elements sit in vector lanes and weights are broadcast, so the only vector type needed is
 * GCC/Clang's generic one: portable across ISAs, compiled with -O3 -march=native.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define H 32
#define LANES 8
#ifndef VECS
#define VECS 2 /* vectors per tile (best of a sweep over VECS x JB on AVX2) */
#endif
#define TILE (LANES * VECS)
#ifndef JB
#define JB 4 /* outputs per register block: JB * VECS accumulators */
#endif

typedef float v8 __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vmask __attribute__((vector_size(LANES * sizeof(float))));

static inline v8 load(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 splat(float s) { return (v8){s, s, s, s, s, s, s, s}; }
/* max(a, 0), but NaN stays NaN as in torch.relu */
static inline v8 relu(v8 a) {
    vmask keep = (a > splat(0.0f)) | (a != a);
    return (v8)((vmask)a & keep);
}

/* out[j][e] = relu(out[j][e] + sum_c w[j * kin + c] * in[c * stride + e]), j < H, e < TILE */
static void dense_relu(const float *in, int64_t stride, int64_t kin, const float *w,
                       float out[H][TILE]) {
    for (int j0 = 0; j0 < H; j0 += JB) {
        v8 acc[JB][VECS];
        for (int j = 0; j < JB; j++)
            for (int v = 0; v < VECS; v++) acc[j][v] = load(&out[j0 + j][v * LANES]);
        for (int64_t c = 0; c < kin; c++) {
            v8 xin[VECS];
            for (int v = 0; v < VECS; v++) {
                xin[v] = load(in + c * stride + v * LANES);
                __asm__("" : "+x"(xin[v])); /* keep in a register: GCC would reload per FMA */
            }
            for (int j = 0; j < JB; j++) {
                v8 wj = splat(w[(j0 + j) * kin + c]);
                for (int v = 0; v < VECS; v++) acc[j][v] += wj * xin[v];
            }
        }
        for (int j = 0; j < JB; j++)
            for (int v = 0; v < VECS; v++) {
                store(&out[j0 + j][v * LANES], relu(acc[j][v]));
            }
    }
}

/* h1[j][e] = rowterm[row(e)][j] + colterm_t[j][col(e)] for the tile's elements. colterm_t is
 * the column term transposed ([H, ncols]), so a tile inside one row reads it contiguously. */
static void first_layer_init(float h1[H][TILE], int64_t i0, int64_t m, const float *rowterm,
                             int64_t rows_vary, const float *colterm_t, int64_t cols_vary,
                             int64_t ncols) {
    int64_t row = i0 / ncols, col = i0 % ncols;
    if (!rows_vary || col + m <= ncols) { /* one row (or no row dependence): vectorised */
        const float *r = rowterm + (rows_vary ? row * H : 0);
        for (int j = 0; j < H; j++)
            for (int v = 0; v < VECS; v++) {
                v8 c;
                if (cols_vary && col + (v + 1) * LANES <= ncols)
                    c = load(colterm_t + j * ncols + col + v * LANES);
                else
                    for (int e = 0; e < LANES; e++) {
                        int64_t cc = col + v * LANES + e;
                        c[e] = colterm_t[cols_vary ? j * ncols + (cc < ncols ? cc : 0) : j];
                    }
                store(&h1[j][v * LANES], c + splat(r[j]));
            }
        return;
    }
    for (int e = 0; e < TILE; e++) { /* the tile crosses rows */
        int64_t i = i0 + (e < m ? e : 0), rr = i / ncols, cc = i % ncols;
        const float *r = rowterm + (rows_vary ? rr * H : 0);
        for (int j = 0; j < H; j++) h1[j][e] = r[j] + colterm_t[cols_vary ? j * ncols + cc : j];
    }
}

/* Process the chunk's n elements, split over OpenMP threads. Loaded after torch, this library
 * shares torch's libgomp (same soname), so it uses torch's thread team and its thread count.
 * x: [k, n] channel-major inputs. Element i sits at (row, col) = (i / ncols, i % ncols) and its
 * first-layer pre-activation starts at rowterm[row or 0][j] + colterm_t[j][col or 0]
 * (rowterm [R, H], colterm_t [H, C]; rows_vary / cols_vary say whether each term varies). w1 [H, k], w2 [H, H], b2 [H], w3 [2, H],
 * b3 [2]. Non-finite steps are dropped, so they never reach p. */
void lo_net_update(const float *x, int64_t n, int64_t k, const float *rowterm, int64_t rows_vary,
                   const float *colterm_t, int64_t cols_vary, int64_t ncols, const float *w1,
                   const float *w2, const float *b2, const float *w3, const float *b3, float *p,
                   double alpha) {
    int64_t tiles = (n + TILE - 1) / TILE;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float h1[H][TILE], h2[H][TILE];
        float pad[64 * TILE]; /* tail tile: inputs copied to a zero-padded buffer (k <= 64) */
        int64_t i0 = t * TILE;
        int64_t m = n - i0 < TILE ? n - i0 : TILE;
        const float *in = x + i0;
        int64_t stride = n;
        if (m < TILE) {
            memset(pad, 0, sizeof pad);
            for (int64_t c = 0; c < k; c++) memcpy(pad + c * TILE, x + c * n + i0, m * sizeof(float));
            in = pad;
            stride = TILE;
        }
        first_layer_init(h1, i0, m, rowterm, rows_vary, colterm_t, cols_vary, ncols);
        dense_relu(in, stride, k, w1, h1);
        for (int j = 0; j < H; j++)
            for (int v = 0; v < VECS; v++) store(&h2[j][v * LANES], splat(b2[j]));
        dense_relu(&h1[0][0], TILE, H, w2, h2);
        v8 d[VECS], a[VECS];
        for (int v = 0; v < VECS; v++) { d[v] = splat(b3[0]); a[v] = splat(b3[1]); }
        for (int j = 0; j < H; j++)
            for (int v = 0; v < VECS; v++) {
                v8 hj = load(&h2[j][v * LANES]);
                d[v] += splat(w3[j]) * hj;
                a[v] += splat(w3[H + j]) * hj;
            }
        float dd[TILE], aa[TILE];
        for (int v = 0; v < VECS; v++) { store(dd + v * LANES, d[v]); store(aa + v * LANES, a[v]); }
        for (int64_t e = 0; e < m; e++) {
            float step = dd[e] * expf(0.001f * aa[e]);
            if (isfinite(step)) p[i0 + e] += (float)alpha * step;
        }
    }
}
