/* membw: the memory read-bandwidth probe behind transact-edge's roofline.
 *
 *   membw THREADS MIB PASSES   ->   prints "read_GBps <best>"
 *
 * A STREAM-style read kernel: a MIB-sized buffer (far larger than any last-level cache) is filled
 * once, then each of THREADS threads sums its own contiguous slice with 64-bit loads into four
 * independent accumulators; a pass is timed between two barriers and the best of PASSES is
 * reported, in 1e9 bytes per second. Token generation in llama.cpp is the same access pattern:
 * every weight streamed once per token by all threads.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t *buf;
static size_t words, nthreads, passes;
static pthread_barrier_t barrier;
static volatile uint64_t sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
    size_t id = (size_t)arg, n = words / nthreads, lo = id * n;
    const uint64_t *p = buf + lo;
    for (size_t k = 0; k < passes; k++) {
        uint64_t a = 0, b = 0, c = 0, d = 0;
        pthread_barrier_wait(&barrier);
        for (size_t i = 0; i + 4 <= n; i += 4) { a += p[i]; b += p[i + 1]; c += p[i + 2]; d += p[i + 3]; }
        sink += a ^ b ^ c ^ d;
        pthread_barrier_wait(&barrier);
    }
    return NULL;
}

int main(int argc, char **argv) {
    nthreads = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 512;
    passes = argc > 3 ? strtoul(argv[3], NULL, 10) : 10;
    if (nthreads < 1 || mib < 1 || passes < 1) { fprintf(stderr, "usage: membw THREADS MIB PASSES\n"); return 2; }
    words = mib * 1024 * 1024 / sizeof(uint64_t);
    buf = malloc(words * sizeof(uint64_t));
    if (!buf) { fprintf(stderr, "membw: cannot allocate %zu MiB\n", mib); return 1; }
    for (size_t i = 0; i < words; i++) buf[i] = i;
    pthread_barrier_init(&barrier, NULL, (unsigned)nthreads + 1);
    pthread_t *th = malloc(nthreads * sizeof(pthread_t));
    for (size_t i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, reader, (void *)i);
    double best = 0;
    for (size_t k = 0; k < passes; k++) {
        pthread_barrier_wait(&barrier);
        double t0 = now();
        pthread_barrier_wait(&barrier);
        double gbps = (double)(words / nthreads * nthreads) * sizeof(uint64_t) / (now() - t0) / 1e9;
        if (gbps > best) best = gbps;
    }
    for (size_t i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
    printf("read_GBps %.3f\n", best);
    return 0;
}
