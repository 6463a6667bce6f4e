/* Winograd F(4x4, 3x3) convolution, one dtype and one CPU path: included by winograd.c with REAL (float or
 * double), SUF (f32_portable, f32_avx2, ...) and TARGET (empty or a target attribute) defined.
 *
 * The transforms are loops over a block's tiles (t, innermost and contiguous), so the compiler vectorises
 * them for the path's ISA; the 36 products per block are the GEMM of gemm.c. Notation (Lavin & Gray 2016,
 * interpolation points 0, +-1, +-2, inf):
 *   V = B^T d B   (6x6 input tile d)       U = G g G^T   (3x3 kernel g)
 *   Y = A^T (U . V) A   (4x4 output tile)   '.' elementwise over the 36 positions xi = 6*row + col
 */

/* One row (or column) of B^T d: out[k] = sum_j BT[k][j] d[j], d[j] at d + j*ds, out[k] at o + k*os, over
 * n tiles (index t: stride 1 in both). */
TARGET static void GLUE(wino_bt, SUF)(REAL *restrict o, int64_t os, const REAL *restrict d, int64_t ds, int64_t n)
{
    const REAL *d0 = d, *d1 = d + ds, *d2 = d + 2 * ds, *d3 = d + 3 * ds, *d4 = d + 4 * ds, *d5 = d + 5 * ds;
    REAL *o0 = o, *o1 = o + os, *o2 = o + 2 * os, *o3 = o + 3 * os, *o4 = o + 4 * os, *o5 = o + 5 * os;
#pragma omp simd
    for (int64_t t = 0; t < n; t++) {
        const REAL a = d4[t] - 4 * d2[t], b = d3[t] - 4 * d1[t];      /* shared by rows 1, 2 */
        const REAL c = d4[t] - d2[t], e = 2 * (d3[t] - d1[t]);          /* shared by rows 3, 4 */
        o0[t] = 4 * d0[t] - 5 * d2[t] + d4[t];
        o1[t] = a + b;
        o2[t] = a - b;
        o3[t] = c + e;
        o4[t] = c - e;
        o5[t] = 4 * d1[t] - 5 * d3[t] + d5[t];
    }
}

/* One row (or column) of A^T m: out[a] = sum_l AT[a][l] m[l] for a < 4. */
TARGET static void GLUE(wino_at, SUF)(REAL *restrict o, int64_t os, const REAL *restrict m, int64_t ms, int64_t n)
{
    const REAL *m0 = m, *m1 = m + ms, *m2 = m + 2 * ms, *m3 = m + 3 * ms, *m4 = m + 4 * ms, *m5 = m + 5 * ms;
    REAL *o0 = o, *o1 = o + os, *o2 = o + 2 * os, *o3 = o + 3 * os;
#pragma omp simd
    for (int64_t t = 0; t < n; t++) {
        const REAL s12 = m1[t] + m2[t], d12 = m1[t] - m2[t], s34 = m3[t] + m4[t], d34 = m3[t] - m4[t];
        o0[t] = m0[t] + s12 + s34;
        o1[t] = d12 + 2 * d34;
        o2[t] = s12 + 4 * s34;
        o3[t] = d12 + 8 * d34 + m5[t];
    }
}

/* One row (or column) of A dY: out[l] = sum_a A[l][a] dy[a] (A = AT^T, 6x4): the transpose of wino_at. */
TARGET static void GLUE(wino_a, SUF)(REAL *restrict o, int64_t os, const REAL *restrict g, int64_t gs, int64_t n)
{
    const REAL *g0 = g, *g1 = g + gs, *g2 = g + 2 * gs, *g3 = g + 3 * gs;
    REAL *o0 = o, *o1 = o + os, *o2 = o + 2 * os, *o3 = o + 3 * os, *o4 = o + 4 * os, *o5 = o + 5 * os;
#pragma omp simd
    for (int64_t t = 0; t < n; t++) {
        const REAL p1 = g1[t] + g3[t], q1 = g0[t] + g2[t];
        const REAL p2 = 2 * g1[t] + 8 * g3[t], q2 = g0[t] + 4 * g2[t];
        o0[t] = g0[t];
        o1[t] = q1 + p1;
        o2[t] = q1 - p1;
        o3[t] = q2 + p2;
        o4[t] = q2 - p2;
        o5[t] = g3[t];
    }
}

/* V (36, C, TB) for the block's tiles: tile t of the block is image n0 + t / T1, tile row (t % T1) / TW, tile
 * column (t % T1) % TW; plane is (Hp, Wp) scratch, d and u are (36, TB). Input pixel (4*th + i - PT,
 * 4*tw + j - PL) of tile (th, tw); outside the image reads as 0. */
TARGET static void GLUE(wino_input, SUF)(REAL *restrict V, const REAL *restrict x, int64_t n0, int64_t nb, int64_t C,
                                         int64_t H, int64_t W, int64_t PT, int64_t PL, int64_t TH, int64_t TW,
                                         int64_t TB, REAL *restrict plane, REAL *restrict d, REAL *restrict u)
{
    const int64_t Hp = 4 * TH + 2, Wp = 4 * TW + 2, T1 = TH * TW;
    /* the image's rows land at plane rows [r0, r1), columns [c0, c1); the rest of the plane stays 0 */
    const int64_t r0 = PT, r1 = H + PT < Hp ? H + PT : Hp, c0 = PL, c1 = W + PL < Wp ? W + PL : Wp;
    for (int64_t i = 0; i < Hp * Wp; i++) plane[i] = 0;
    for (int64_t c = 0; c < C; c++) {
        for (int64_t b = 0; b < nb; b++) {
            /* the zero-padded plane of image n0 + b, channel c */
            const REAL *xc = x + ((n0 + b) * C + c) * H * W;
            for (int64_t r = r0; r < r1; r++) {
                const REAL *src = xc + (r - PT) * W;
                REAL *dst = plane + r * Wp;
                for (int64_t q = c0; q < c1; q++) dst[q] = src[q - PL];
            }
            /* gather: d[i*6 + j][t] = pixel (i, j) of tile t = (th, tw): plane row 4*th + i, column 4*tw + j */
            for (int64_t th = 0; th < TH; th++)
                for (int64_t i = 0; i < 6; i++) {
                    const REAL *row = plane + (4 * th + i) * Wp;
                    for (int64_t j = 0; j < 6; j++) {
                        REAL *dst = d + (i * 6 + j) * TB + b * T1 + th * TW;
                        for (int64_t tw = 0; tw < TW; tw++) dst[tw] = row[4 * tw + j];
                    }
                }
        }
        const int64_t n = nb * T1;
        /* rows: u[i*6 + k] = sum_j BT[k][j] d[i*6 + j]; columns: V[l*6 + k] = sum_i BT[l][i] u[i*6 + k] */
        for (int64_t i = 0; i < 6; i++) GLUE(wino_bt, SUF)(u + i * 6 * TB, TB, d + i * 6 * TB, TB, n);
        for (int64_t k = 0; k < 6; k++)
            GLUE(wino_bt, SUF)(V + (k * C + c) * TB, 6 * C * TB, u + k * TB, 6 * TB, n);
    }
}

/* y (block's images) = A^T M A (+ bias) from M (36, OC, TB); s is (24, TB) scratch. */
TARGET static void GLUE(wino_output, SUF)(REAL *restrict y, const REAL *restrict M, const REAL *restrict bias,
                                          int64_t n0, int64_t nb, int64_t OC, int64_t OH, int64_t OW, int64_t TH,
                                          int64_t TW, int64_t TB, REAL *restrict s, REAL *restrict o)
{
    const int64_t T1 = TH * TW, n = nb * T1;
    for (int64_t oc = 0; oc < OC; oc++) {
        /* columns: s[a*6 + k] = sum_l AT[a][l] M[l*6 + k]; rows: o[a*4 + e] = sum_k AT[e][k] s[a*6 + k] */
        for (int64_t k = 0; k < 6; k++)
            GLUE(wino_at, SUF)(s + k * TB, 6 * TB, M + (k * OC + oc) * TB, 6 * OC * TB, n);
        for (int64_t a = 0; a < 4; a++) GLUE(wino_at, SUF)(o + a * 4 * TB, TB, s + a * 6 * TB, TB, n);
        const REAL bv = bias ? bias[oc] : 0;
        for (int64_t b = 0; b < nb; b++) {
            REAL *yc = y + ((n0 + b) * OC + oc) * OH * OW;
            for (int64_t th = 0; th < TH; th++) {
                const int64_t rows = OH - 4 * th < 4 ? OH - 4 * th : 4;
                for (int64_t a = 0; a < rows; a++)
                    for (int64_t e = 0; e < 4; e++) {
                        const REAL *src = o + (a * 4 + e) * TB + b * T1 + th * TW;
                        REAL *dst = yc + (4 * th + a) * OW + e;
                        const int64_t full = (OW - e + 3) / 4;       /* tiles whose column e exists */
                        for (int64_t tw = 0; tw < full; tw++) dst[4 * tw] = src[tw] + bv;
                    }
            }
        }
    }
}

/* dM (36, OC, TB) = A dY A^T for the block's tiles (dY outside (OH, OW) reads as 0); g and s scratch (16|36, TB). */
TARGET static void GLUE(wino_dy, SUF)(REAL *restrict dM, const REAL *restrict dy, int64_t n0, int64_t nb, int64_t OC,
                                      int64_t OH, int64_t OW, int64_t TH, int64_t TW, int64_t TB, REAL *restrict g,
                                      REAL *restrict s)
{
    const int64_t T1 = TH * TW, n = nb * T1;
    for (int64_t oc = 0; oc < OC; oc++) {
        for (int64_t b = 0; b < nb; b++) {
            const REAL *dyc = dy + ((n0 + b) * OC + oc) * OH * OW;
            for (int64_t th = 0; th < TH; th++)
                for (int64_t a = 0; a < 4; a++)
                    for (int64_t e = 0; e < 4; e++) {
                        REAL *dst = g + (a * 4 + e) * TB + b * T1 + th * TW;
                        const int64_t full = 4 * th + a < OH ? (OW - e + 3) / 4 : 0;
                        const REAL *src = full ? dyc + (4 * th + a) * OW + e : dyc;
                        for (int64_t tw = 0; tw < full; tw++) dst[tw] = src[4 * tw];
                        for (int64_t tw = full; tw < TW; tw++) dst[tw] = 0;
                    }
        }
        /* rows: s[a*6 + l] = sum_e A[l][e] g[a*4 + e]; columns: dM[k*6 + l] = sum_a A[k][a] s[a*6 + l] */
        for (int64_t a = 0; a < 4; a++) GLUE(wino_a, SUF)(s + a * 6 * TB, TB, g + a * 4 * TB, TB, n);
        for (int64_t l = 0; l < 6; l++)
            GLUE(wino_a, SUF)(dM + (l * OC + oc) * TB, 6 * OC * TB, s + l * TB, 6 * TB, n);
    }
}
