/* guestload: the lab guest's workload, started by the initramfs /init.
 *
 *   guestload BURN_PCT DIRTY_MIB [DIRTY_MIB_S [FILL_MIB]]
 *
 * BURN_PCT (0..100): keep that share of ONE vCPU busy, as a duty cycle over 100 ms periods.
 * DIRTY_MIB (>= 0): allocate that many MiB and rewrite one byte in every 4 KiB page, in a
 * loop, as fast as the vCPU allows: a guest whose live migration does not converge.
 * DIRTY_MIB_S (> 0): at most that many MiB per second instead (paced per MiB written).
 * FILL_MIB (> 0): write that many MiB once and keep them (memory a long-running guest has
 * touched: a migration sends it, where never-touched pages go as zero pages).
 * Each part runs in its own process; the parent waits forever. Built with gcc -static.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void burn(int pct) {
    const double period_s = 0.1;
    double busy_s = period_s * pct / 100.0;
    volatile unsigned long x = 0;
    for (;;) {
        double start = now_s();
        while (now_s() - start < busy_s) {
            for (int i = 0; i < 1000; i++) x += (unsigned long)i;
        }
        double idle_s = period_s - (now_s() - start);
        if (idle_s > 0) {
            struct timespec ts = {0, (long)(idle_s * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
}

static void dirty(long mib, double mib_s) {
    size_t len = (size_t)mib << 20;
    volatile unsigned char *buf = malloc(len);
    if (buf == NULL) {
        printf("guestload: cannot allocate %ld MiB\n", mib);
        fflush(stdout);
        exit(1);
    }
    unsigned char v = 1; /* never 0: a page of zeros would cross as a zero page */
    unsigned long rounds = 0;
    double start = now_s(), written_mib = 0.0;
    for (;;) {
        for (size_t off = 0; off < len; off += 4096) {
            buf[off] = v;
            if (mib_s > 0 && (off & 0xFFFFF) == 0xFF000) { /* the last page of each MiB */
                written_mib += 1.0;
                double ahead_s = written_mib / mib_s - (now_s() - start);
                if (ahead_s > 0) {
                    struct timespec ts = {(time_t)ahead_s, (long)((ahead_s - (long)ahead_s) * 1e9)};
                    nanosleep(&ts, NULL);
                }
            }
        }
        if (++v == 0) v = 1;
        ++rounds;
        /* report rounds 1, 10, 100, 1000, then every 1000th (a round is a pass over the buffer) */
        if (rounds == 1 || rounds == 10 || rounds == 100 || rounds % 1000 == 0) {
            printf("guestload: dirtied %ld MiB %lu times\n", mib, rounds);
            fflush(stdout);
        }
    }
}

int main(int argc, char **argv) {
    int pct = argc > 1 ? atoi(argv[1]) : 0;
    long mib = argc > 2 ? atol(argv[2]) : 0;
    double mib_s = argc > 3 ? atof(argv[3]) : 0.0;
    long fill = argc > 4 ? atol(argv[4]) : 0;
    if (fill > 0) {
        unsigned char *keep = malloc((size_t)fill << 20);
        if (keep != NULL) memset(keep, 0xA5, (size_t)fill << 20);
        printf("guestload: filled %ld MiB\n", keep != NULL ? fill : 0L);
    }
    if (pct > 100) pct = 100;
    printf("guestload: burn_pct=%d dirty_mib=%ld dirty_mib_s=%g\n", pct, mib, mib_s);
    fflush(stdout);
    if (pct > 0 && fork() == 0) burn(pct);
    if (mib > 0 && fork() == 0) dirty(mib, mib_s);
    for (;;) {
        if (wait(NULL) < 0) pause();
    }
    return 0;
}
