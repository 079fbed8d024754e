/* The first-stage scan of IVF-QINCo2 over faiss's inverted lists, with tables given per query.
 *
 * Loaded by qinco2/ivfsearch/shortlist_scan.py through ctypes (compiled at first use by
 * qinco2/native.py). For query q and probed list l, the distance of a code i_0 .. i_{M-1}, b is
 *
 *     base[q, p] + sum_m (qtab[q, m, i_m] + ltab[l, m, i_m]) + norms[b]
 *
 * where ltab and norms may be NULL (inner-product indexes, whose caller negates the
 * similarities). The k smallest per query are returned in increasing order, with their ids;
 * -1 ids and FLT_MAX distances (as faiss) where fewer than k codes were scanned. Queries run in parallel
 * (OpenMP, the runtime torch loaded).
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>

#define K 256

/* Replace the top (largest) of a max-heap of k (distance, id) pairs and sift down. */
static void heap_replace_top(float *hd, int64_t *hi, int64_t k, float d, int64_t id) {
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && hd[c + 1] > hd[c]) c++;
        if (hd[c] <= d) break;
        hd[i] = hd[c];
        hi[i] = hi[c];
        i = c;
    }
    hd[i] = d;
    hi[i] = id;
}

/* Sort the heap in increasing distance (heap sort, in place). */
static void heap_sort(float *hd, int64_t *hi, int64_t k) {
    for (int64_t n = k - 1; n > 0; n--) {
        float d = hd[n];
        int64_t id = hi[n];
        hd[n] = hd[0];
        hi[n] = hi[0];
        heap_replace_top(hd, hi, n, d, id);
    }
}

/* Returns the number of codes scanned, or -1 when scratch memory could not be allocated. */
int64_t qinco2_scan(int64_t nq, int64_t nprobe, int64_t k, int64_t M, int64_t code_size,
                    const float *qtab, const float *ltab, const float *norms, const float *base,
                    const int64_t *assign, const int64_t *code_ptrs, const int64_t *id_ptrs,
                    const int64_t *sizes, float *out_d, int64_t *out_i) {
    int64_t scanned = 0;
    int failed = 0;
#pragma omp parallel reduction(+ : scanned) reduction(| : failed)
    {
        float *table = ltab ? (float *)malloc(sizeof(float) * M * K) : NULL;
        if (ltab && !table) failed = 1;
#pragma omp for schedule(dynamic, 16)
        for (int64_t q = 0; q < nq; q++) {
            float *hd = out_d + q * k;
            int64_t *hi = out_i + q * k;
            for (int64_t j = 0; j < k; j++) {
                hd[j] = FLT_MAX;
                hi[j] = -1;
            }
            if (failed) continue;
            const float *qt = qtab + q * M * K;
            for (int64_t p = 0; p < nprobe; p++) {
                int64_t l = assign[q * nprobe + p];
                if (l < 0 || sizes[l] == 0) continue;
                const float *t = qt;
                if (ltab) {
                    const float *lt = ltab + l * M * K;
                    for (int64_t j = 0; j < M * K; j++) table[j] = qt[j] + lt[j];
                    t = table;
                }
                const uint8_t *codes = (const uint8_t *)code_ptrs[l];
                const int64_t *ids = (const int64_t *)id_ptrs[l];
                float b = base[q * nprobe + p];
                for (int64_t j = 0; j < sizes[l]; j++) {
                    const uint8_t *c = codes + j * code_size;
                    float d = b;
                    for (int64_t m = 0; m < M; m++) d += t[m * K + c[m]];
                    if (norms) d += norms[c[M]];
                    if (d < hd[0]) heap_replace_top(hd, hi, k, d, ids[j]);
                }
                scanned += sizes[l];
            }
            heap_sort(hd, hi, k);
        }
        free(table);
    }
    return failed ? -1 : scanned;
}
