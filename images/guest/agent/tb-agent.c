/*
 * tb-agent: Testbed guest agent (see docs/guest-agent.md, the binding spec).
 *
 * Threads:
 *   heartbeat  SCHED_FIFO, one UDP datagram per period (absolute-time sleeps)
 *   memory     page writer + continuous verifier over a locked working set, paced by the
 *              clock (open-loop, tb.mem_mode=clock) or by the CPU it gets (tb.mem_mode=cpu)
 *   disk       O_DIRECT|O_DSYNC ring of crc32-protected 4 KiB blocks
 *   main       status line on /dev/console once a second
 *
 * Build: gcc -O2 -static -pthread -o tb-agent tb-agent.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / 8)
#define BLK 4096u
#define DISK_MAX_SPAN (256ull << 20)
#define DISK_BATCH_MAX 256u /* blocks per pwrite */
#define HB_SIZE 96

/* ------------------------------------------------------------------ config */

static struct {
    char vm[32];
    int net;                 /* tb.ip given */
    int have_observer;
    struct sockaddr_in observer;
    char observer_s[64];
    char ip_s[64];
    uint64_t hb_us;
    uint64_t mem_rate, mem_wss;
    int mem_cpu;             /* tb.mem_mode=cpu: the rate is per CPU-second the guest gets */
    uint64_t disk_rate, disk_span;
    char disk_dev[128];
} cfg;

/* ------------------------------------------------------------ shared state */

static uint64_t st_mem_written, st_mem_verified, st_mem_errors;
static uint64_t st_disk_seq, st_disk_errors, st_disk_blocks;
static uint64_t st_hb_seq, st_hb_late, st_hb_maxgap_ns, st_hb_senderr;
static uint64_t st_mem_gen;
static unsigned st_flags;
static int mem_active, disk_active;

#define LD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define ST(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define ADD(x, v) __atomic_add_fetch(&(x), (v), __ATOMIC_RELAXED)
#define SETFLAG(b) __atomic_or_fetch(&st_flags, (b), __ATOMIC_RELAXED)

#define F_MEMVIOL 1u
#define F_DISKVIOL 2u
#define F_MEMON 4u
#define F_DISKON 8u

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ----------------------------------------------------------------- console */

static int con_fd = -1;
static pthread_mutex_t con_mu = PTHREAD_MUTEX_INITIALIZER;

static void con(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    pthread_mutex_lock(&con_mu);
    int fd = con_fd >= 0 ? con_fd : 1;
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        p += w;
        n -= w;
    }
    pthread_mutex_unlock(&con_mu);
}

/* Rate limit for violation lines: at most VIOL_BURST lines per second per kind. */
#define VIOL_BURST 10
struct vlimit { uint64_t sec; unsigned n; uint64_t suppressed; };

static int viol_allow(struct vlimit *v)
{
    uint64_t s = now_ns() / 1000000000ull;
    if (s != v->sec) {
        v->sec = s;
        v->n = 0;
    }
    if (v->n >= VIOL_BURST) {
        v->suppressed++;
        return 0;
    }
    v->n++;
    return 1;
}

/* ------------------------------------------------------------- cmdline */

static uint64_t parse_u64(const char *s, uint64_t dflt)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s)
        return dflt;
    /* optional binary suffixes: K M G */
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    }
    return v;
}

static void parse_cmdline(void)
{
    char buf[4096];
    cfg.hb_us = 1000;
    cfg.mem_wss = 64ull << 20;
    snprintf(cfg.disk_dev, sizeof cfg.disk_dev, "/dev/vda");
    snprintf(cfg.vm, sizeof cfg.vm, "unnamed");

    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(tok, "tb.", 3))
            continue;
        char *eq = strchr(tok, '=');
        if (!eq)
            continue;
        *eq = 0;
        const char *k = tok + 3, *v = eq + 1;
        if (!strcmp(k, "vm")) {
            memset(cfg.vm, 0, sizeof cfg.vm);
            strncpy(cfg.vm, v, 31);
        } else if (!strcmp(k, "ip")) {
            cfg.net = *v != 0;
            snprintf(cfg.ip_s, sizeof cfg.ip_s, "%s", v);
        } else if (!strcmp(k, "observer")) {
            char host[64];
            snprintf(host, sizeof host, "%s", v);
            char *c = strrchr(host, ':');
            if (c) {
                *c = 0;
                memset(&cfg.observer, 0, sizeof cfg.observer);
                cfg.observer.sin_family = AF_INET;
                cfg.observer.sin_port = htons((uint16_t)atoi(c + 1));
                if (inet_pton(AF_INET, host, &cfg.observer.sin_addr) == 1) {
                    cfg.have_observer = 1;
                    snprintf(cfg.observer_s, sizeof cfg.observer_s, "%s", v);
                }
            }
        } else if (!strcmp(k, "hb_us")) {
            cfg.hb_us = parse_u64(v, 1000);
        } else if (!strcmp(k, "mem_rate")) {
            cfg.mem_rate = parse_u64(v, 0);
        } else if (!strcmp(k, "mem_mode")) {
            cfg.mem_cpu = !strcmp(v, "cpu");
        } else if (!strcmp(k, "mem_wss")) {
            cfg.mem_wss = parse_u64(v, 64ull << 20);
        } else if (!strcmp(k, "disk_rate")) {
            cfg.disk_rate = parse_u64(v, 0);
        } else if (!strcmp(k, "disk_dev")) {
            snprintf(cfg.disk_dev, sizeof cfg.disk_dev, "%s", v);
        } else if (!strcmp(k, "disk_span")) {
            cfg.disk_span = parse_u64(v, 0);
        }
    }
    if (cfg.hb_us < 100)
        cfg.hb_us = 100;
}

/* ------------------------------------------------------------- heartbeat */

static int hb_sock = -1;

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); } /* x86: LE */
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static void *hb_thread(void *arg)
{
    (void)arg;
    uint8_t pkt[HB_SIZE];
    uint64_t period = cfg.hb_us * 1000ull;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    uint64_t last = 0, seq = 0;

    for (;;) {
        uint64_t t = now_ns();
        if (last) {
            uint64_t gap = t - last;
            if (gap > LD(st_hb_maxgap_ns))
                ST(st_hb_maxgap_ns, gap);
            if (gap > 5000000ull)
                ADD(st_hb_late, 1);
        }
        last = t;
        seq++;
        ST(st_hb_seq, seq);
        if (hb_sock >= 0) {
            memset(pkt, 0, sizeof pkt);
            memcpy(pkt, "TBHB", 4);
            put16(pkt + 4, 1);
            put16(pkt + 6, (uint16_t)LD(st_flags));
            put64(pkt + 8, seq);
            put64(pkt + 16, t);
            put64(pkt + 24, LD(st_mem_written));
            put64(pkt + 32, LD(st_mem_verified));
            put64(pkt + 40, LD(st_mem_errors));
            put64(pkt + 48, LD(st_disk_seq));
            put64(pkt + 56, LD(st_disk_errors));
            memcpy(pkt + 64, cfg.vm, 32);
            if (sendto(hb_sock, pkt, sizeof pkt, MSG_DONTWAIT,
                       (struct sockaddr *)&cfg.observer, sizeof cfg.observer) < 0)
                ADD(st_hb_senderr, 1);
        }
        /* next tick on the absolute grid; after a long stall, resync instead of bursting */
        uint64_t nx = (uint64_t)next.tv_sec * 1000000000ull + next.tv_nsec + period;
        uint64_t after = now_ns();
        if (after > nx + period)
            nx = after + period;
        next.tv_sec = nx / 1000000000ull;
        next.tv_nsec = nx % 1000000000ull;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
    }
    return NULL;
}

/* ---------------------------------------------------------------- memory */

static inline uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* pattern(i, g, w) = mix64(i, g) ^ (w * K): every word depends on page index,
 * generation and word index. */
#define WORD_K 0xd6e8feb86659fd93ull
static inline uint64_t page_base(uint64_t i, uint64_t g)
{
    return mix64(i * 0x9e3779b97f4a7c15ull ^ mix64(g ^ 0x54424147454e54ull));
}

static void page_write(uint64_t *p, uint64_t i, uint64_t g)
{
    uint64_t b = page_base(i, g);
    for (unsigned w = 0; w < WORDS_PER_PAGE; w++)
        p[w] = b ^ ((uint64_t)w * WORD_K);
}

/* returns -1 if page holds generation g, else the first bad word index */
static int page_check(const uint64_t *p, uint64_t i, uint64_t g)
{
    uint64_t b = page_base(i, g);
    uint64_t acc = 0;
    for (unsigned w = 0; w < WORDS_PER_PAGE; w++)
        acc |= p[w] ^ (b ^ ((uint64_t)w * WORD_K));
    if (!acc)
        return -1;
    for (unsigned w = 0; w < WORDS_PER_PAGE; w++)
        if (p[w] != (b ^ ((uint64_t)w * WORD_K)))
            return (int)w;
    return 0;
}

static uint64_t *wss;
static uint64_t wss_pages;

static void mem_report(uint64_t i, uint64_t expect, uint64_t cursor, uint64_t G, int badw,
                       struct vlimit *vl)
{
    uint64_t *p = wss + i * WORDS_PER_PAGE;
    ADD(st_mem_errors, 1);
    SETFLAG(F_MEMVIOL);
    if (!viol_allow(vl))
        return;
    /* identify what the page holds: a nearby generation, or garbage */
    char found[160];
    int matched = 0;
    for (int64_t d = -3; d <= 3 && !matched; d++) {
        int64_t g = (int64_t)expect + d;
        if (d == 0 || g < 0)
            continue;
        if (page_check(p, i, (uint64_t)g) < 0) {
            snprintf(found, sizeof found, "%lld", (long long)g);
            matched = 1;
        }
    }
    if (!matched) {
        int nbad = 0;
        uint64_t b = page_base(i, expect);
        for (unsigned w = 0; w < WORDS_PER_PAGE; w++)
            if (p[w] != (b ^ ((uint64_t)w * WORD_K)))
                nbad++;
        snprintf(found, sizeof found, "corrupt bad_words=%d first_word=%d value=0x%016llx want=0x%016llx",
                 nbad, badw, (unsigned long long)p[badw],
                 (unsigned long long)(b ^ ((uint64_t)badw * WORD_K)));
    }
    con("TBAGENT VIOLATION memory page=%llu expected_gen=%llu found=%s cursor=%llu gen=%llu%s",
        (unsigned long long)i, (unsigned long long)expect, found,
        (unsigned long long)cursor, (unsigned long long)G,
        vl->suppressed ? " (earlier lines suppressed)" : "");
    vl->suppressed = 0;
}

static uint64_t virt_to_gpa(const void *v)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        return 0;
    uint64_t ent = 0;
    off_t off = (off_t)((uintptr_t)v / PAGE) * 8;
    ssize_t n = pread(fd, &ent, 8, off);
    close(fd);
    if (n != 8 || !(ent & (1ull << 63)))
        return 0;
    return (ent & ((1ull << 55) - 1)) * PAGE + ((uintptr_t)v % PAGE);
}

static volatile uint64_t burn_sink, burst_check_sink;

/* CPU work with no memory traffic: n rounds of mixing */
static void burn(uint64_t n)
{
    uint64_t z = burn_sink;
    for (uint64_t i = 0; i < n; i++)
        z = mix64(z);
    burn_sink = z;
}

/* ns per burn round, the fastest of several 10 ms windows (a loaded host only makes a window slower) */
static double burn_ns_per_round(void)
{
    double best = 1e9;
    for (int k = 0; k < 12; k++) {
        uint64_t t = now_ns(), n = 0;
        while (now_ns() - t < 10000000ull) {
            burn(1000);
            n += 1000;
        }
        double per = (double)(now_ns() - t) / (double)n;
        if (per < best)
            best = per;
    }
    return best;
}

static void *mem_thread(void *arg)
{
    (void)arg;
    uint64_t npages = cfg.mem_wss / PAGE;
    if (npages < 2)
        npages = 2;
    size_t len = npages * PAGE;
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        con("TBAGENT error memory: mmap %zu bytes: %s; memory workload off", len, strerror(errno));
        return NULL;
    }
    madvise(m, len, MADV_NOHUGEPAGE); /* keep 4 KiB pages: stable per-page gpa */
    if (mlock(m, len) < 0)
        con("TBAGENT warning memory: mlock: %s", strerror(errno));
    wss = m;
    wss_pages = npages;

    /* State: pages [0, c) hold G+1, pages [c, n) hold G. */
    uint64_t G = 1, c = 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < npages; i++)
        page_write(wss + i * WORDS_PER_PAGE, i, G);
    ADD(st_mem_written, npages);
    ST(st_mem_gen, G);
    uint64_t gpa = virt_to_gpa((char *)m + PAGE);
    con("TBAGENT wss page=1 gpa=0x%llx pages=%llu fill_ms=%llu", (unsigned long long)gpa,
        (unsigned long long)npages, (unsigned long long)((now_ns() - t0) / 1000000));
    mem_active = 1;
    SETFLAG(F_MEMON);

    struct vlimit vl = {0};
    uint64_t v = 0;                       /* verifier position */
    const double rate = (double)cfg.mem_rate;
    /* CPU-bound: each page costs a fixed amount of CPU work, sized so that a whole vCPU writes
     * mem_rate; the rate then follows the CPU the guest gets (a stun slows it, a debt is never repaid) */
    uint64_t burn_rounds = 0;
    if (cfg.mem_cpu && rate > 0) {
        double per_round = burn_ns_per_round();
        double fastest = 1e18; /* ns per page write + 8 page checks, fastest of several windows */
        for (int k = 0; k < 8; k++) {
            uint64_t t = now_ns();
            for (unsigned j = 0; j < 64; j++) {
                page_write(wss + ((c + j) % npages) * WORDS_PER_PAGE, (c + j) % npages, G);
                for (unsigned q = 0; q < 8; q++)
                    burst_check_sink += (uint64_t)page_check(wss + ((v + q) % npages) * WORDS_PER_PAGE,
                                                             (v + q) % npages, G);
            }
            double per = (double)(now_ns() - t) / 64.0;
            if (per < fastest)
                fastest = per;
        }
        double budget = 1e9 * PAGE / rate;
        burn_rounds = budget > fastest ? (uint64_t)((budget - fastest) / per_round) : 0;
        con("TBAGENT memory cpu-bound rate=%llu page_ns=%.0f burn_ns=%.2f burn_rounds=%llu",
            (unsigned long long)cfg.mem_rate, fastest, per_round, (unsigned long long)burn_rounds);
    }
    double tokens = 0;                    /* bytes we may write now */
    const double cap = rate * 0.05 > PAGE * 16 ? rate * 0.05 : PAGE * 16; /* max 50 ms of burst */
    uint64_t last = now_ns();

    for (;;) {
        uint64_t t = now_ns();
        if (cfg.mem_cpu) {
            tokens = PAGE; /* one page now, then the CPU work that paces it */
        } else {
            tokens += rate * (double)(t - last) / 1e9;
            if (tokens > cap)
                tokens = cap; /* CPU could not keep up: drop the debt, go as fast as possible */
        }
        last = t;
        unsigned nw = 0;
        while (tokens >= PAGE && nw < 64) {
            page_write(wss + c * WORDS_PER_PAGE, c, G + 1);
            c++;
            if (c == npages) {
                c = 0;
                G++;
                ST(st_mem_gen, G);
            }
            tokens -= PAGE;
            nw++;
        }
        if (nw)
            ADD(st_mem_written, nw);
        /* verify a few pages between clock reads */
        for (unsigned k = 0; k < 8; k++) {
            uint64_t expect = v < c ? G + 1 : G;
            int bad = page_check(wss + v * WORDS_PER_PAGE, v, expect);
            if (bad >= 0) {
                mem_report(v, expect, c, G, bad, &vl);
                page_write(wss + v * WORDS_PER_PAGE, v, expect); /* repair: count once */
            }
            if (++v == npages)
                v = 0;
        }
        ADD(st_mem_verified, 8);
        if (burn_rounds)
            burn(burn_rounds);
        if (rate == 0 && v % 256 == 0) {
            /* verify-only: about one pass over the working set per second */
            uint64_t pause_ns = 256ull * 1000000000ull / npages;
            struct timespec ts = {(time_t)(pause_ns / 1000000000ull), (long)(pause_ns % 1000000000ull)};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ disk */

static uint32_t crc_tab[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_tab[i] = c;
    }
}

static uint32_t crc32_ieee(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    while (n--)
        c = crc_tab[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static uint64_t disk_nblocks;

static uint64_t blk_index(uint64_t seq) { return 1 + (seq - 1) % (disk_nblocks - 1); }

static void blk_fill(uint8_t *b, uint64_t seq, uint64_t t)
{
    memcpy(b, "TBDISK01", 8);
    put64(b + 8, seq);
    put64(b + 16, blk_index(seq));
    put64(b + 24, t);
    uint64_t x = mix64(seq ^ 0x4449534b50415944ull) | 1;
    uint64_t *w = (uint64_t *)(b + 40);
    for (unsigned i = 0; i < (BLK - 40) / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
    }
    uint32_t crc = crc32_ieee(b + 40, BLK - 40), z = 0;
    memcpy(b + 32, &crc, 4);
    memcpy(b + 36, &z, 4);
}

/* 0 ok; else a reason string via *why. If want_seq is 0, any seq is accepted. */
static int blk_check(const uint8_t *b, uint64_t idx, uint64_t want_seq, const char **why,
                     uint64_t *found_seq)
{
    uint64_t seq, bi;
    uint32_t crc;
    memcpy(&seq, b + 8, 8);
    memcpy(&bi, b + 16, 8);
    memcpy(&crc, b + 32, 4);
    *found_seq = seq;
    if (memcmp(b, "TBDISK01", 8)) { *why = "magic"; return 1; }
    if (crc32_ieee(b + 40, BLK - 40) != crc) { *why = "crc"; return 1; }
    if (bi != idx) { *why = "index"; return 1; }
    if (seq == 0 || blk_index(seq) != idx) { *why = "seq-index"; return 1; }
    if (want_seq && seq != want_seq) { *why = "seq"; return 1; }
    /* payload must be the one derived from seq */
    uint64_t x = mix64(seq ^ 0x4449534b50415944ull) | 1;
    const uint64_t *w = (const uint64_t *)(b + 40);
    for (unsigned i = 0; i < (BLK - 40) / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (w[i] != x) { *why = "payload"; return 1; }
    }
    return 0;
}

static struct vlimit disk_vl;

static void disk_violation(const char *fmt, ...)
{
    ADD(st_disk_errors, 1);
    SETFLAG(F_DISKVIOL);
    if (!viol_allow(&disk_vl))
        return;
    char buf[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    con("TBAGENT VIOLATION disk %s", buf);
}

static int pread_full(int fd, void *b, size_t n, off_t off)
{
    size_t d = 0;
    while (d < n) {
        ssize_t r = pread(fd, (char *)b + d, n - d, off + d);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        d += r;
    }
    return 0;
}

static int pwrite_full(int fd, const void *b, size_t n, off_t off)
{
    size_t d = 0;
    while (d < n) {
        ssize_t r = pwrite(fd, (const char *)b + d, n - d, off + d);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        d += r;
    }
    return 0;
}

static void verify_block(int fd, uint8_t *rb, uint64_t seq, const char *what)
{
    uint64_t idx = blk_index(seq), fs = 0;
    const char *why = "";
    if (pread_full(fd, rb, BLK, (off_t)(idx * BLK)) < 0) {
        disk_violation("block=%llu expected_seq=%llu read-error=%s (%s)", (unsigned long long)idx,
                       (unsigned long long)seq, strerror(errno), what);
        return;
    }
    if (blk_check(rb, idx, seq, &why, &fs))
        disk_violation("block=%llu expected_seq=%llu found_seq=%llu reason=%s (%s)",
                       (unsigned long long)idx, (unsigned long long)seq, (unsigned long long)fs,
                       why, what);
}

static void *disk_thread(void *arg)
{
    (void)arg;
    int fd, warned = 0;
    for (;;) {
        fd = open(cfg.disk_dev, O_RDWR | O_DIRECT | O_DSYNC);
        if (fd >= 0)
            break;
        if (!warned++)
            con("TBAGENT error disk: open %s: %s (retrying every second)", cfg.disk_dev, strerror(errno));
        sleep(1);
    }
    uint64_t devsize = 0;
    if (ioctl(fd, BLKGETSIZE64, &devsize) < 0) {
        struct stat sb;
        if (fstat(fd, &sb) == 0)
            devsize = sb.st_size;
    }
    uint64_t span = cfg.disk_span ? cfg.disk_span : devsize;
    if (!cfg.disk_span && span > DISK_MAX_SPAN)
        span = DISK_MAX_SPAN;
    if (span > devsize)
        span = devsize;
    disk_nblocks = span / BLK;
    if (disk_nblocks < 2) {
        con("TBAGENT error disk: %s too small (%llu bytes); disk workload off", cfg.disk_dev,
            (unsigned long long)devsize);
        close(fd);
        return NULL;
    }
    uint8_t *buf, *rb;
    if (posix_memalign((void **)&buf, 4096, DISK_BATCH_MAX * BLK) ||
        posix_memalign((void **)&rb, 4096, DISK_BATCH_MAX * BLK)) {
        con("TBAGENT error disk: out of memory");
        return NULL;
    }

    /* Resume after an agent restart: if the ring header matches, continue after
     * the highest valid sequence number so the ring stays consecutive. */
    uint64_t seq = 0;
    if (pread_full(fd, rb, BLK, 0) == 0 && !memcmp(rb, "TBRING01", 8)) {
        uint64_t nb, bs;
        memcpy(&nb, rb + 8, 8);
        memcpy(&bs, rb + 16, 8);
        if (nb == disk_nblocks && bs == BLK) {
            for (uint64_t b = 1; b < disk_nblocks; b += DISK_BATCH_MAX) {
                uint64_t cnt = disk_nblocks - b < DISK_BATCH_MAX ? disk_nblocks - b : DISK_BATCH_MAX;
                if (pread_full(fd, rb, cnt * BLK, (off_t)(b * BLK)) < 0)
                    break;
                for (uint64_t k = 0; k < cnt; k++) {
                    const char *why;
                    uint64_t fs;
                    if (!blk_check(rb + k * BLK, b + k, 0, &why, &fs) && fs > seq)
                        seq = fs;
                }
            }
            if (seq)
                con("TBAGENT disk resume: ring on %s holds seq up to %llu", cfg.disk_dev,
                    (unsigned long long)seq);
        }
    }
    memset(buf, 0, BLK);
    memcpy(buf, "TBRING01", 8);
    put64(buf + 8, disk_nblocks);
    put64(buf + 16, BLK);
    if (pwrite_full(fd, buf, BLK, 0) < 0) {
        con("TBAGENT error disk: writing ring header: %s", strerror(errno));
    }
    ST(st_disk_seq, seq);
    disk_active = 1;
    SETFLAG(F_DISKON);
    con("TBAGENT disk ring dev=%s nblocks=%llu span=%llu", cfg.disk_dev,
        (unsigned long long)disk_nblocks, (unsigned long long)(disk_nblocks * BLK));

    const double rate = (double)cfg.disk_rate;
    double tokens = 0;
    const double cap = rate * 0.2 > BLK ? rate * 0.2 : BLK;
    uint64_t last = now_ns(), last_rb = last, last_rand = last;
    uint64_t rnd = mix64(last);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    const uint64_t period = 10000000ull; /* 10 ms */

    for (;;) {
        uint64_t t = now_ns();
        tokens += rate * (double)(t - last) / 1e9;
        last = t;
        if (tokens > cap)
            tokens = cap;
        while (tokens >= BLK) {
            uint64_t want = (uint64_t)(tokens / BLK);
            if (want > DISK_BATCH_MAX)
                want = DISK_BATCH_MAX;
            /* contiguous run in the ring, stopping at the wrap */
            uint64_t first = seq + 1, idx = blk_index(first);
            uint64_t room = disk_nblocks - idx;
            if (want > room)
                want = room;
            uint64_t wt = now_ns();
            for (uint64_t k = 0; k < want; k++)
                blk_fill(buf + k * BLK, first + k, wt);
            if (pwrite_full(fd, buf, want * BLK, (off_t)(idx * BLK)) < 0) {
                disk_violation("write-error block=%llu count=%llu: %s", (unsigned long long)idx,
                               (unsigned long long)want, strerror(errno));
                sleep(1);
                tokens = 0;
                break;
            }
            seq += want;
            ST(st_disk_seq, seq);
            ADD(st_disk_blocks, want);
            tokens -= (double)want * BLK;
        }
        t = now_ns();
        if (seq && t - last_rb >= 100000000ull) { /* every 100 ms: the newest block */
            last_rb = t;
            verify_block(fd, rb, seq, "recent");
        }
        if (seq && t - last_rand >= 1000000000ull) { /* every second: a random live block */
            last_rand = t;
            uint64_t live = seq < disk_nblocks - 1 ? seq : disk_nblocks - 1;
            rnd = mix64(rnd);
            uint64_t s = seq - rnd % live;
            verify_block(fd, rb, s, "random");
        }
        uint64_t nx = (uint64_t)next.tv_sec * 1000000000ull + next.tv_nsec + period;
        uint64_t after = now_ns();
        if (after > nx)
            nx = after + period / 10;
        next.tv_sec = nx / 1000000000ull;
        next.tv_nsec = nx % 1000000000ull;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
    }
    return NULL;
}

/* ------------------------------------------------------------------ main */

static int start_thread(pthread_t *th, void *(*fn)(void *), int fifo_prio)
{
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 256 * 1024);
    if (fifo_prio) {
        struct sched_param sp = {.sched_priority = fifo_prio};
        pthread_attr_setinheritsched(&a, PTHREAD_EXPLICIT_SCHED);
        pthread_attr_setschedpolicy(&a, SCHED_FIFO);
        pthread_attr_setschedparam(&a, &sp);
    }
    int r = pthread_create(th, &a, fn, NULL);
    if (r && fifo_prio) {
        con("TBAGENT warning: SCHED_FIFO heartbeat refused (%s); running it SCHED_OTHER", strerror(r));
        pthread_attr_setinheritsched(&a, PTHREAD_INHERIT_SCHED);
        r = pthread_create(th, &a, fn, NULL);
    }
    pthread_attr_destroy(&a);
    return r;
}

/* `tb-agent --insmod A.ko B.ko ...`: load kernel modules in order from one
 * process (init uses it: one exec instead of one busybox insmod per module).
 * Exit status 0 only if every module loaded (or was already loaded). */
static int insmod_all(int argc, char **argv)
{
    int rc = 0;
    for (int i = 2; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)) {
            fprintf(stderr, "TBINIT insmod %s: %s\n", argv[i], strerror(errno));
            rc = 1;
        }
        if (fd >= 0)
            close(fd);
    }
    return rc;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--insmod"))
        return insmod_all(argc, argv);
    con_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    parse_cmdline();
    crc_init();

    if (mlockall(MCL_CURRENT | MCL_FUTURE) < 0)
        con("TBAGENT warning: mlockall: %s", strerror(errno));

    if (cfg.net && cfg.have_observer) {
        hb_sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (hb_sock < 0)
            con("TBAGENT warning: socket: %s", strerror(errno));
    }
    con("TBAGENT start vm=%s ip=%s observer=%s hb_us=%llu mem_rate=%llu mem_wss=%llu "
        "disk_rate=%llu disk_dev=%s disk_span=%llu network=%s",
        cfg.vm, cfg.net ? cfg.ip_s : "none", cfg.have_observer ? cfg.observer_s : "none",
        (unsigned long long)cfg.hb_us, (unsigned long long)cfg.mem_rate,
        (unsigned long long)cfg.mem_wss, (unsigned long long)cfg.disk_rate, cfg.disk_dev,
        (unsigned long long)cfg.disk_span, hb_sock >= 0 ? "on" : "off");

    pthread_t th_hb, th_mem, th_disk;
    if (start_thread(&th_hb, hb_thread, 80)) {
        con("TBAGENT error: cannot start heartbeat thread");
        return 1;
    }
    /* Always on: with mem_rate=0 the working set is filled once and only verified
     * (one pass a second), so even an idle guest's memory is checked across a move. */
    if (cfg.mem_wss && start_thread(&th_mem, mem_thread, 0))
        con("TBAGENT error: cannot start memory thread");
    if (cfg.disk_rate && start_thread(&th_disk, disk_thread, 0))
        con("TBAGENT error: cannot start disk thread");

    /* status once a second */
    uint64_t t0 = now_ns(), tl = t0;
    uint64_t mw = LD(st_mem_written), mv = LD(st_mem_verified), db = LD(st_disk_blocks);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        next.tv_sec += 1;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
        uint64_t t = now_ns();
        double dt = (double)(t - tl) / 1e9;
        uint64_t mw2 = LD(st_mem_written), mv2 = LD(st_mem_verified), db2 = LD(st_disk_blocks);
        uint64_t maxgap = LD(st_hb_maxgap_ns);
        ST(st_hb_maxgap_ns, 0);
        con("TBAGENT status t=%.1f hb_seq=%llu hb_late=%llu hb_maxgap_us=%llu hb_senderr=%llu "
            "mem=%s mem_MBps=%.1f verify_MBps=%.1f mem_gen=%llu mem_written=%llu mem_verified=%llu "
            "mem_errors=%llu disk=%s disk_MBps=%.2f disk_seq=%llu disk_errors=%llu flags=0x%x",
            (double)(t - t0) / 1e9, (unsigned long long)LD(st_hb_seq),
            (unsigned long long)LD(st_hb_late), (unsigned long long)(maxgap / 1000),
            (unsigned long long)LD(st_hb_senderr), mem_active ? "on" : "off",
            (double)(mw2 - mw) * PAGE / dt / 1e6, (double)(mv2 - mv) * PAGE / dt / 1e6,
            (unsigned long long)LD(st_mem_gen), (unsigned long long)mw2, (unsigned long long)mv2,
            (unsigned long long)LD(st_mem_errors), disk_active ? "on" : "off",
            (double)(db2 - db) * BLK / dt / 1e6, (unsigned long long)LD(st_disk_seq),
            (unsigned long long)LD(st_disk_errors), LD(st_flags));
        mw = mw2;
        mv = mv2;
        db = db2;
        tl = t;
    }
}
