/* small_fc_lopt on a population of rank >= 2 tensors, fused (float32, CPU).
 *
 * mulo/functional.py does what is per tensor (the Adafactor row / col accumulators, their
 * factors, the first layer with the normalisation and time features folded in); the two
 * functions here do everything per element, reading the parameter, gradient and moments once
 * per pass and keeping every feature and activation in registers / L1:
 *
 *   lo_accumulate: m_k += (1 - beta_k)(g - m_k), v += (1 - beta_v)(g^2 - v), then the sums of
 *                  squares of the 16 per-element input channels (for their normalisation);
 *   lo_step:       builds the 16 channels of a tile of TILE elements, runs
 *                  Linear(16->32) + ReLU, Linear(32->32) + ReLU, Linear(32->2) and writes
 *                  the step (see lo_step's comment).
 *
 * Geometry. A contiguous tensor [A, B, *rest] is seen as [A, B, C] (C = prod(rest)); element i
 * sits at (a, b, c). Its two largest dims must be the first two (true for Linear [out, in],
 * embeddings and conv kernels [out, in, kh, kw]), so a statistic reduced over dim 0 is indexed
 * by i0 = b*C + c and one reduced over dim 1 by i1 = a*C + c. The product of the two factored
 * rsqrt factors is f0[i0] * f1[i1] and the first layer starts from t0[:][i0] + t1[i1][:].
 *
 * Every per-particle array is population-stacked ([P, ...], contiguous), the meta-parameters
 * too, so one call steps the same tensor of all particles. Work is split over OpenMP threads in
 * fixed blocks, and block sums are added in a fixed order: results do not depend on the
 * thread count. Loaded after torch, this library shares torch's libgomp (same soname), so it
 * uses torch's thread team and its thread count.
 *
 * It is the same math as the PyTorch path in functional.py (the fallback, and the reference it
 * is tested against). Elements sit in vector lanes and weights are broadcast, so the only vector
 * type needed is GCC/Clang's generic one: portable across ISAs, compiled -O3 -march=native.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define H 32
#define K 16 /* per-element channels of a rank >= 2 tensor (MATRIX_ELEMENT_CHANNELS) */
#define LANES 8
#ifndef VECS
#define VECS 2 /* vectors per tile (best of a sweep over VECS x JB on AVX2) */
#endif
#define TILE (LANES * VECS)
#ifndef JB
#define JB 4 /* outputs per register block: JB * VECS accumulators */
#endif
#define BLOCK (64 * TILE) /* elements per unit of parallel work and per partial sum */

typedef float v8 __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vmask __attribute__((vector_size(LANES * sizeof(float))));

int64_t lo_block(void) { return BLOCK; } /* mulo/kernel.py sizes the partial sums with it */

static inline v8 load(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 splat(float s) { return (v8){s, s, s, s, s, s, s, s}; }
/* max(a, 0), but NaN stays NaN as in torch.relu */
static inline v8 relu(v8 a) {
    vmask keep = (a > splat(0.0f)) | (a != a);
    return (v8)((vmask)a & keep);
}

/* out[j][e] = relu(out[j][e] + sum_c w[j * kin + c] * in[c][e]), j < H, e < TILE */
static void dense_relu(const float *in, int64_t kin, const float *w, float out[H][TILE]) {
    for (int j0 = 0; j0 < H; j0 += JB) {
        v8 acc[JB][VECS];
        for (int j = 0; j < JB; j++)
            for (int v = 0; v < VECS; v++) acc[j][v] = load(&out[j0 + j][v * LANES]);
        for (int64_t c = 0; c < kin; c++) {
            v8 xin[VECS];
            for (int v = 0; v < VECS; v++) {
                xin[v] = load(in + c * TILE + v * LANES);
                __asm__("" : "+x"(xin[v])); /* keep in a register: GCC would reload per FMA */
            }
            for (int j = 0; j < JB; j++) {
                v8 wj = splat(w[(j0 + j) * kin + c]);
                for (int v = 0; v < VECS; v++) acc[j][v] += wj * xin[v];
            }
        }
        for (int j = 0; j < JB; j++)
            for (int v = 0; v < VECS; v++) store(&out[j0 + j][v * LANES], relu(acc[j][v]));
    }
}

/* One particle's view of a tensor of n elements. */
typedef struct {
    const float *g, *p, *mv; /* mv: [4, n] = three momenta, second moment */
    const float *f0, *f1;    /* [3, n0], [3, n1]: the factored rsqrt factors */
    int64_t n, n0, n1, bc, c;
} view;

/* i0 and i1 of the m elements from `start` (e >= m repeat the first), stepped without
 * divisions: (a, r) = (i / bc, i % bc) and c = r % C advance with i. */
static void indices(const view *t, int64_t start, int64_t m, int64_t j0[TILE], int64_t j1[TILE]) {
    int64_t a = start / t->bc, r = start % t->bc, c = r % t->c;
    for (int64_t e = 0; e < TILE; e++) {
        if (e >= m) { j0[e] = j0[0]; j1[e] = j1[0]; continue; }
        j0[e] = r;
        j1[e] = a * t->c + c;
        if (++c == t->c) c = 0;
        if (++r == t->bc) { r = 0; a++; }
    }
}

/* Whether the tile's elements are consecutive in i0 with one i1 (C = 1, inside one row). */
static inline int in_row(const view *t, int64_t m, const int64_t j0[TILE]) {
    return m == TILE && t->c == 1 && j0[TILE - 1] == j0[0] + TILE - 1;
}

/* x[ch][e] for the m elements starting at i0 (e >= m: zeros), in MATRIX_ELEMENT_CHANNELS order:
 * g, p, m0..2, v, m_k * rsqrt(v + 1e-6), rsqrt(v + 1e-6), fac_k * g, fac_k * m_k. */
static void channels(const view *t, int64_t i0, int64_t m, const int64_t j0[TILE],
                     const int64_t j1[TILE], float x[K][TILE]) {
    const int64_t n = t->n;
    float fac[3][TILE];
    for (int k = 0; k < 3; k++) {
        const float *f0 = t->f0 + k * t->n0, *f1 = t->f1 + k * t->n1;
        if (in_row(t, m, j0))
            for (int e = 0; e < TILE; e++) fac[k][e] = f0[j0[0] + e] * f1[j1[0]];
        else
            for (int e = 0; e < TILE; e++) fac[k][e] = f0[j0[e]] * f1[j1[e]];
    }
    if (m == TILE) { /* contiguous loads: the loops vectorise */
        const float *g = t->g + i0, *p = t->p + i0, *mv = t->mv + i0;
        for (int e = 0; e < TILE; e++) {
            x[0][e] = g[e];
            x[1][e] = p[e];
            x[5][e] = mv[3 * n + e];
            x[9][e] = 1.0f / sqrtf(mv[3 * n + e] + 1e-6f);
        }
        for (int k = 0; k < 3; k++)
            for (int e = 0; e < TILE; e++) {
                float mk = mv[k * n + e];
                x[2 + k][e] = mk;
                x[6 + k][e] = mk * x[9][e];
                x[10 + k][e] = fac[k][e] * g[e];
                x[13 + k][e] = fac[k][e] * mk;
            }
        return;
    }
    for (int64_t e = 0; e < TILE; e++) {
        if (e >= m) {
            for (int ch = 0; ch < K; ch++) x[ch][e] = 0.0f;
            continue;
        }
        int64_t i = i0 + e;
        float g = t->g[i], v = t->mv[3 * n + i];
        float rsv = 1.0f / sqrtf(v + 1e-6f);
        x[0][e] = g;
        x[1][e] = t->p[i];
        x[5][e] = v;
        x[9][e] = rsv;
        for (int k = 0; k < 3; k++) {
            float mk = t->mv[k * n + i];
            x[2 + k][e] = mk;
            x[6 + k][e] = mk * rsv;
            x[10 + k][e] = fac[k][e] * g;
            x[13 + k][e] = fac[k][e] * mk;
        }
    }
}

/* h1[j][e] = t0t[j][i0(e)] + t1[i1(e)][j]: the first layer's broadcast terms */
static void first_layer_init(const view *t, int64_t m, const int64_t j0[TILE],
                             const int64_t j1[TILE], const float *t0t, const float *t1,
                             float h1[H][TILE]) {
    if (in_row(t, m, j0)) {
        const float *r1 = t1 + j1[0] * H;
        for (int j = 0; j < H; j++)
            for (int v = 0; v < VECS; v++)
                store(&h1[j][v * LANES], load(t0t + j * t->n0 + j0[0] + v * LANES) + splat(r1[j]));
        return;
    }
    for (int e = 0; e < TILE; e++) {
        const float *r1 = t1 + j1[e] * H;
        for (int j = 0; j < H; j++) h1[j][e] = t0t[j * t->n0 + j0[e]] + r1[j];
    }
}

static view particle(int64_t q, int64_t n, int64_t a, int64_t b, int64_t c, const float *g,
                     const float *p, const float *mv, const float *f0, const float *f1) {
    int64_t n0 = b * c, n1 = a * c;
    return (view){g + q * n, p + q * n, mv + q * 4 * n, f0 + q * 3 * n0, f1 + q * 3 * n1,
                  n, n0, n1, b * c, c};
}

/* Update the moments (w: [P, 4] = 1 - beta for m0..2 and v) and write per-block sums of squares
 * of the 16 channels to partial [P, blocks, K]; sums [P, K] (double) gets their fixed-order sum. */
void lo_accumulate(int64_t P, int64_t a, int64_t b, int64_t c, const float *g, const float *p,
                   float *mv, const float *w, const float *f0, const float *f1, double *partial,
                   double *sums) {
    const int64_t n = a * b * c, blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t q = 0; q < P; q++)
        for (int64_t blk = 0; blk < blocks; blk++) {
            float *m = mv + q * 4 * n;
            const float *gq = g + q * n, *wq = w + q * 4;
            int64_t lo = blk * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
            for (int k = 0; k < 4; k++) {
                float wk = wq[k], *mk = m + k * n;
                for (int64_t i = lo; i < hi; i++) {
                    float target = k < 3 ? gq[i] : gq[i] * gq[i];
                    mk[i] += wk * (target - mk[i]);
                }
            }
            view t = particle(q, n, a, b, c, g, p, mv, f0, f1);
            double acc[K] = {0};
            float x[K][TILE];
            int64_t j0[TILE], j1[TILE];
            for (int64_t i0 = lo; i0 < hi; i0 += TILE) {
                int64_t len = hi - i0 < TILE ? hi - i0 : TILE;
                indices(&t, i0, len, j0, j1);
                channels(&t, i0, len, j0, j1, x);
                for (int ch = 0; ch < K; ch++) {
                    v8 s = splat(0.0f);
                    for (int v = 0; v < VECS; v++) {
                        v8 xv = load(&x[ch][v * LANES]);
                        s += xv * xv;
                    }
                    float lanes[LANES];
                    store(lanes, s);
                    for (int e = 0; e < LANES; e++) acc[ch] += lanes[e];
                }
            }
            memcpy(partial + (q * blocks + blk) * K, acc, sizeof acc);
        }
    for (int64_t q = 0; q < P; q++)
        for (int ch = 0; ch < K; ch++) {
            double s = 0.0;
            for (int64_t blk = 0; blk < blocks; blk++) s += partial[(q * blocks + blk) * K + ch];
            sums[q * K + ch] = s;
        }
}

/* The network on every element of every particle. w1 [P, H, K] (normalisation folded in),
 * t0 [P, H, n0] (transposed; bias and time features folded in), t1 [P, n1, H], w2 [P, H, H], b2 [P, H],
 * w3 [P, 2, H], b3 [P, 2]. The raw step of an element is u = d * exp(min(exp_mult * a,
 * exp_cap)) for the outputs (d, a).
 * mode 0: p += alpha[q] * u where u is finite (a non-finite step is dropped);
 * mode 1: out[q, i] = u (0 where not finite) and dsq [P] (double) = sum over i of d^2 where u
 *         is finite: the caller normalises and applies the step. */
void lo_step(int64_t P, int64_t a, int64_t b, int64_t c, const float *g, float *p,
             const float *mv, const float *f0, const float *f1, const float *w1,
             const float *t0, const float *t1, const float *w2, const float *b2,
             const float *w3, const float *b3, float exp_mult, float exp_cap, int64_t mode,
             const float *alpha, float *out, double *partial, double *dsq) {
    const int64_t n = a * b * c, blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t q = 0; q < P; q++)
        for (int64_t blk = 0; blk < blocks; blk++) {
            view t = particle(q, n, a, b, c, g, p, mv, f0, f1);
            const float *w1q = w1 + q * H * K, *w2q = w2 + q * H * H, *b2q = b2 + q * H;
            const float *w3q = w3 + q * 2 * H, *b3q = b3 + q * 2;
            const float *t0q = t0 + q * t.n0 * H, *t1q = t1 + q * t.n1 * H;
            float *pq = p + q * n;
            int64_t lo = blk * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
            double acc = 0.0;
            float x[K][TILE], h1[H][TILE], h2[H][TILE];
            int64_t j0[TILE], j1[TILE];
            for (int64_t i0 = lo; i0 < hi; i0 += TILE) {
                int64_t len = hi - i0 < TILE ? hi - i0 : TILE;
                indices(&t, i0, len, j0, j1);
                channels(&t, i0, len, j0, j1, x);
                first_layer_init(&t, len, j0, j1, t0q, t1q, h1);
                dense_relu(&x[0][0], K, w1q, h1);
                for (int j = 0; j < H; j++)
                    for (int v = 0; v < VECS; v++) store(&h2[j][v * LANES], splat(b2q[j]));
                dense_relu(&h1[0][0], H, w2q, h2);
                v8 d[VECS], m[VECS];
                for (int v = 0; v < VECS; v++) { d[v] = splat(b3q[0]); m[v] = splat(b3q[1]); }
                for (int j = 0; j < H; j++)
                    for (int v = 0; v < VECS; v++) {
                        v8 hj = load(&h2[j][v * LANES]);
                        d[v] += splat(w3q[j]) * hj;
                        m[v] += splat(w3q[H + j]) * hj;
                    }
                float dd[TILE], mm[TILE];
                for (int v = 0; v < VECS; v++) {
                    store(dd + v * LANES, d[v]);
                    store(mm + v * LANES, m[v]);
                }
                for (int64_t e = 0; e < len; e++) {
                    float step = dd[e] * expf(fminf(exp_mult * mm[e], exp_cap));
                    int ok = isfinite(step);
                    if (mode == 0) {
                        if (ok) pq[i0 + e] += alpha[q] * step;
                    } else {
                        out[q * n + i0 + e] = ok ? step : 0.0f;
                        if (ok) acc += (double)dd[e] * dd[e];
                    }
                }
            }
            if (mode != 0) partial[q * blocks + blk] = acc;
        }
    if (mode != 0)
        for (int64_t q = 0; q < P; q++) {
            double s = 0.0;
            for (int64_t blk = 0; blk < blocks; blk++) s += partial[q * blocks + blk];
            dsq[q] = s;
        }
}
