/* Eval-mode batch norm that also returns its input's per-channel moments, in one read (CPU).

   Built by bn_inspect/engine/fused/cpu.py with portable flags and -ffp-contract=off, loaded with
   ctypes. Plain C and pthreads, no torch headers: it compiles in a few seconds.

   The output is x * alpha + beta with alpha and beta as ATen's CPU kernel computes them
   (batch_norm_cpu_collect_linear_and_constant_terms). Whether ATen's build fuses each
   multiply-add into one FMA depends on the CPU capability it dispatches to, so the caller says
   which (use_fma), having compared both with F.batch_norm once.

   Moments: the input is walked in tiles that fit the L1 cache. Each tile is normalized (the one
   read from memory), then read again from the cache for the shifted sums: the shift is the
   tile's own float mean, and the shifted values and their squares are added element by element
   into float lanes (no reassociation), so the sums cancel only by the tile's spread. Each tile's
   mean and centred sum of squares are formed in double and merged with Chan's formula, tile after
   tile, thread after thread, and with the batches before. Infinite or NaN means add up as the
   values would and leave m2 NaN, as engine/moments.py does.

   This file includes itself once per element type (BN_T). */

#ifndef BN_T

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 2048 /* values of one plane: the tile and its output stay in L1 */
#define ROWS_TILE 16384 /* values: a row tile stays in L2 */
#define MIN_WORK_PER_THREAD 65536 /* values: fewer, and starting a thread costs more than it saves */
#define MAX_THREADS 64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* A clone of each part's loop for CPUs with FMA and AVX2 (elsewhere fmaf is a slow library
   call); the helpers are inlined into each clone, so they run with the clone's instructions. */
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif
#define INLINE static inline __attribute__((always_inline))

#define BN_OK 0
#define BN_OVERFLOW 1 /* finite values whose float sums overflowed: moments unusable, output fine */
#define BN_NO_MEMORY (-1)

typedef struct {
    double count, mean, m2;
} moments_t;

static void chan_merge(moments_t *a, double count, double mean, double m2) {
    if (count == 0) return;
    if (a->count == 0) {
        a->count = count, a->mean = mean, a->m2 = m2;
        return;
    }
    double total = a->count + count;
    if (isfinite(a->mean) && isfinite(mean)) {
        double delta = mean - a->mean;
        a->mean += delta * (count / total);
        a->m2 += m2 + delta * delta * (a->count * count / total);
    } else {
        a->mean += mean;
        a->m2 = NAN;
    }
    a->count = total;
}

/* Merges a tile's shifted float sums into acc; 0 where the values are finite but their sums
   overflowed (the caller then computes these moments another way). */
static int tile_moments(moments_t *acc, double count, double shift, double s1, double s2, int overflowed) {
    if (overflowed) return 0;
    double mean = shift + s1 / count;
    double m2 = s2 - s1 * (s1 / count);
    if (!isfinite(mean))
        m2 = NAN;
    else if (m2 < 0)
        m2 = 0;
    chan_merge(acc, count, mean, m2);
    return 1;
}

typedef struct {
    int64_t begin, end;
    void *job;
    moments_t *moments; /* rows layout: one per channel for this thread */
    int status;
} part_t;

static void *run_part(void *arg);

/* Runs parts[0] here and the others on their own threads. */
static void run_parts(part_t *parts, int n) {
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < n; t++) started[t] = pthread_create(&threads[t], NULL, run_part, &parts[t]) == 0;
    run_part(&parts[0]);
    for (int t = 1; t < n; t++) {
        if (started[t])
            pthread_join(threads[t], NULL);
        else
            run_part(&parts[t]);
    }
}

static int thread_count(int64_t work, int64_t units, int nthreads) {
    int64_t n = work / MIN_WORK_PER_THREAD;
    if (n > nthreads) n = nthreads;
    if (n > units) n = units;
    if (n > MAX_THREADS) n = MAX_THREADS;
    return n < 1 ? 1 : (int)n;
}

#define BN_T float
#define BN_NAME(name) name##_f32
#define BN_FMA fmaf
#define BN_SQRT sqrtf
#include __FILE__
#undef BN_T
#undef BN_NAME
#undef BN_FMA
#undef BN_SQRT

#define BN_T double
#define BN_NAME(name) name##_f64
#define BN_FMA fma
#define BN_SQRT sqrt
#include __FILE__

static void *run_part(void *arg) {
    part_t *part = arg;
    int is_double = *(int *)part->job;
    part->status = is_double ? run_part_f64(part) : run_part_f32(part);
    return NULL;
}

#else /* one element type: BN_T */

typedef struct {
    int is_double; /* first: run_part reads it */
    const BN_T *x;
    BN_T *y;
    int64_t outer, channels, inner;
    const BN_T *alpha, *beta;
    int use_fma;
    moments_t *moments; /* planes layout: one per channel */
} BN_NAME(job_t);

/* The sums run in two vectors of accumulators: 16 floats or 8 doubles side by side. */
typedef BN_T BN_NAME(vec_t) __attribute__((vector_size(32)));
#define VEC BN_NAME(vec_t)
#define WIDTH ((int64_t)(sizeof(VEC) / sizeof(BN_T)))

/* An unaligned load of one vector: memcpy, which the compiler turns into one instruction. */
#define LOAD(dst, src) memcpy(&(dst), (src), sizeof(VEC))

/* y = x * a + b over n values (ATen's rounding: see use_fma); returns the values' float sum. */
INLINE BN_T BN_NAME(scale_and_sum)(const BN_T *restrict x, BN_T *restrict y, int64_t n, BN_T a, BN_T b,
                                       int use_fma) {
    if (use_fma)
        for (int64_t i = 0; i < n; i++) y[i] = BN_FMA(x[i], a, b);
    else
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * a + b;
    VEC acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 2 * WIDTH <= n; i += 2 * WIDTH) {
        VEC v0, v1;
        LOAD(v0, x + i), LOAD(v1, x + i + WIDTH);
        acc0 += v0, acc1 += v1;
    }
    acc0 += acc1;
    BN_T total = 0;
    for (int j = 0; j < WIDTH; j++) total += acc0[j];
    for (; i < n; i++) total += x[i];
    return total;
}

/* Adds the sum of x - shift and of its squares over n values to s1 and s2. */
INLINE void BN_NAME(shifted_sums)(const BN_T *restrict x, int64_t n, BN_T shift, double *s1, double *s2) {
    VEC sum0 = {0}, sum1 = {0}, sq0 = {0}, sq1 = {0};
    int64_t i = 0;
    for (; i + 2 * WIDTH <= n; i += 2 * WIDTH) {
        VEC d0, d1;
        LOAD(d0, x + i), LOAD(d1, x + i + WIDTH);
        d0 -= shift, d1 -= shift;
        sum0 += d0, sum1 += d1, sq0 += d0 * d0, sq1 += d1 * d1;
    }
    for (int j = 0; j < WIDTH; j++) *s1 += (double)sum0[j] + sum1[j], *s2 += (double)sq0[j] + sq1[j];
    for (; i < n; i++) {
        BN_T d = x[i] - shift;
        *s1 += d, *s2 += (double)(d * d);
    }
}
#undef VEC
#undef WIDTH
#undef LOAD

INLINE int BN_NAME(all_finite)(const BN_T *x, int64_t n, int64_t stride) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i * stride])) return 0;
    return 1;
}

/* One tile of n contiguous values of one channel: normalized, then summed from the cache. */
INLINE int BN_NAME(plane_tile)(const BN_T *x, BN_T *y, int64_t n, BN_T a, BN_T b, int use_fma, moments_t *acc) {
    BN_T shift = BN_NAME(scale_and_sum)(x, y, n, a, b, use_fma) / (BN_T)n;
    if (!isfinite(shift)) shift = 0;
    double s1 = 0, s2 = 0;
    BN_NAME(shifted_sums)(x, n, shift, &s1, &s2);
    int overflowed = !(isfinite(s1) && isfinite(s2)) && BN_NAME(all_finite)(x, n, 1);
    return tile_moments(acc, (double)n, shift, s1, s2, overflowed);
}

/* (N, C, S) contiguous: channels [begin, end) in memory order, a tile being up to TILE values
   of one plane. */
HOT static int BN_NAME(run_planes)(BN_NAME(job_t) *job, int64_t begin, int64_t end) {
    int64_t c_total = job->channels, s = job->inner;
    int status = BN_OK;
    for (int64_t c = begin; c < end; c++) job->moments[c] = (moments_t){0, 0, 0};
    for (int64_t n = 0; n < job->outer; n++)
        for (int64_t c = begin; c < end; c++)
            for (int64_t off = 0; off < s; off += TILE) {
                int64_t len = s - off < TILE ? s - off : TILE, at = (n * c_total + c) * s + off;
                if (!BN_NAME(plane_tile)(job->x + at, job->y + at, len, job->alpha[c], job->beta[c], job->use_fma,
                                         &job->moments[c]))
                    status = BN_OVERFLOW; /* the output is still written in full */
            }
    return status;
}

/* (R, C) row-major: rows [begin, end), a tile being a block of rows across all channels. */
HOT static int BN_NAME(run_rows)(BN_NAME(job_t) *job, int64_t begin, int64_t end, moments_t *moments) {
    int64_t c_total = job->channels, tile_rows = ROWS_TILE / c_total < 32 ? 32 : ROWS_TILE / c_total;
    BN_T *buffer = malloc(3 * (size_t)c_total * sizeof(BN_T));
    if (!buffer) return BN_NO_MEMORY;
    BN_T *restrict shift = buffer, *restrict a1 = buffer + c_total, *restrict a2 = buffer + 2 * c_total;
    const BN_T *restrict alpha = job->alpha, *restrict beta = job->beta;
    int status = BN_OK;
    for (int64_t k = 0; k < c_total; k++) moments[k] = (moments_t){0, 0, 0};
    for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
        int64_t rows = end - r0 < tile_rows ? end - r0 : tile_rows;
        const BN_T *x = job->x + r0 * c_total;
        BN_T *y = job->y + r0 * c_total;
        for (int64_t k = 0; k < c_total; k++) shift[k] = 0, a1[k] = 0, a2[k] = 0;
        for (int64_t r = 0; r < rows; r++) {
            const BN_T *restrict xr = x + r * c_total;
            BN_T *restrict yr = y + r * c_total;
            if (job->use_fma)
                for (int64_t k = 0; k < c_total; k++) yr[k] = BN_FMA(xr[k], alpha[k], beta[k]);
            else
                for (int64_t k = 0; k < c_total; k++) yr[k] = xr[k] * alpha[k] + beta[k];
            for (int64_t k = 0; k < c_total; k++) shift[k] += xr[k];
        }
        for (int64_t k = 0; k < c_total; k++) {
            shift[k] /= (BN_T)rows;
            if (!isfinite(shift[k])) shift[k] = 0;
        }
        for (int64_t r = 0; r < rows; r++) {
            const BN_T *restrict xr = x + r * c_total;
            for (int64_t k = 0; k < c_total; k++) {
                BN_T d = xr[k] - shift[k];
                a1[k] += d, a2[k] += d * d;
            }
        }
        for (int64_t k = 0; k < c_total; k++) {
            int overflowed = !(isfinite(a1[k]) && isfinite(a2[k])) && BN_NAME(all_finite)(x + k, rows, c_total);
            if (!tile_moments(&moments[k], (double)rows, shift[k], a1[k], a2[k], overflowed)) status = BN_OVERFLOW;
        }
    }
    free(buffer);
    return status;
}

static int BN_NAME(run_part)(part_t *part) {
    BN_NAME(job_t) *job = part->job;
    if (job->inner > 1) return BN_NAME(run_planes)(job, part->begin, part->end);
    return BN_NAME(run_rows)(job, part->begin, part->end, part->moments);
}

/* The entry point: see cpu.py for the arguments. Returns BN_OK, BN_OVERFLOW or BN_NO_MEMORY. */
int BN_NAME(bn_eval_moments)(const BN_T *x, BN_T *y, int64_t outer, int64_t channels, int64_t inner,
                             const BN_T *running_mean, const BN_T *running_var, const BN_T *weight,
                             const BN_T *bias, double eps, int use_fma, int64_t previous_count,
                             const double *previous_mean, const double *previous_m2, double *mean_out,
                             double *m2_out, int nthreads) {
    int64_t units = inner > 1 ? channels : outer;
    int n = thread_count(outer * channels * inner, units, nthreads);
    BN_T *terms = malloc(2 * (size_t)channels * sizeof(BN_T));
    moments_t *moments = malloc((size_t)channels * (inner > 1 ? 1 : n) * sizeof(moments_t));
    if (!terms || !moments) {
        free(terms);
        free(moments);
        return BN_NO_MEMORY;
    }
    BN_T *alpha = terms, *beta = terms + channels;
    for (int64_t c = 0; c < channels; c++) {
        BN_T invstd = 1 / BN_SQRT(running_var[c] + (BN_T)eps);
        BN_T w = weight ? weight[c] : (BN_T)1, b = bias ? bias[c] : (BN_T)0;
        alpha[c] = invstd * w;
        beta[c] = use_fma ? BN_FMA(-running_mean[c], alpha[c], b) : b - running_mean[c] * alpha[c];
    }
    BN_NAME(job_t) job = {sizeof(BN_T) == sizeof(double), x, y, outer, channels, inner, alpha, beta, use_fma, moments};
    part_t parts[MAX_THREADS];
    for (int t = 0; t < n; t++)
        parts[t] = (part_t){units * t / n, units * (t + 1) / n, &job, moments + (inner > 1 ? 0 : t * channels), BN_OK};
    run_parts(parts, n);
    int status = BN_OK;
    for (int t = 0; t < n; t++)
        if (status == BN_OK || parts[t].status == BN_NO_MEMORY) status = parts[t].status;
    if (status == BN_OK) {
        for (int64_t c = 0; c < channels; c++) {
            moments_t total = {0, 0, 0};
            if (previous_count > 0) total = (moments_t){(double)previous_count, previous_mean[c], previous_m2[c]};
            int parts_per_channel = inner > 1 ? 1 : n;
            for (int t = 0; t < parts_per_channel; t++) {
                moments_t m = moments[t * channels + c];
                chan_merge(&total, m.count, m.mean, m.m2);
            }
            mean_out[c] = total.mean;
            m2_out[c] = total.m2;
        }
    }
    free(terms);
    free(moments);
    return status;
}

#endif
