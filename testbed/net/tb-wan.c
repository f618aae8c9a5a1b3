/* tb-wan: the packet-level delay line between two sites (for kernels without sch_netem).
 *
 *   tb-wan CONF IF_A IF_B
 *
 * Moves Ethernet frames between two interfaces of its network namespace (the
 * WAN namespace's legs to the site routers) through one timed FIFO per
 * direction: each frame leaves delay +- jitter after it arrived, is dropped
 * with probability loss, and never overtakes an earlier frame (jitter delays,
 * it does not reorder). Bandwidth is not shaped here: the sites' tbf does it.
 *
 * CONF holds one line "gen=G delay_us=D jitter_us=J loss_ppm=L" (one-way,
 * applied to each direction). SIGHUP: read CONF again. SIGHUP and SIGUSR1 both
 * write CONF.status: "gen=G req=R" then the counters, so a controller knows
 * the settings it wrote are in force. SIGTERM/SIGINT: exit.
 *
 * Frames are read and written with their virtio_net_hdr (PACKET_VNET_HDR), so
 * checksum offload survives the trip. The controller sets gso_max_segs 1 on the
 * sending side: GSO packets the header cannot describe (UDP tunnels: VXLAN)
 * would otherwise be dropped by the kernel before they reach us.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXFRAME 65536
#define RING_BYTES (256u << 20)        /* per direction: > 1 s at 1 Gbit/s */
#define WRAP 0xffffffffu

struct rec { uint64_t release_ns; uint32_t len; uint32_t pad; };

struct queue {
    unsigned char *buf;
    size_t head, tail, used;            /* byte offsets; used = bytes held incl. headers/wrap */
    uint64_t last_release;
    uint64_t in, out, lost, overflow, too_big, send_err, bytes_out;
};

static volatile sig_atomic_t want_reload = 1, want_status = 1, want_exit = 0, status_req = 0;
static uint64_t gen, delay_ns, jitter_ns;
static uint32_t loss_ppm;
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static const char *conf_path;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t xrand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static void on_hup(int s) { (void)s; want_reload = 1; want_status = 1; status_req++; }
static void on_usr1(int s) { (void)s; want_status = 1; status_req++; }
static void on_term(int s) { (void)s; want_exit = 1; }

static void reload(void) {
    FILE *f = fopen(conf_path, "r");
    if (!f) { fprintf(stderr, "tb-wan: cannot open %s: %s\n", conf_path, strerror(errno)); return; }
    unsigned long long g = 0, d = 0, j = 0, l = 0;
    int n = fscanf(f, "gen=%llu delay_us=%llu jitter_us=%llu loss_ppm=%llu", &g, &d, &j, &l);
    fclose(f);
    if (n != 4) { fprintf(stderr, "tb-wan: %s: expected 'gen=G delay_us=D jitter_us=J loss_ppm=L'\n", conf_path); return; }
    gen = g; delay_ns = d * 1000ull; jitter_ns = j * 1000ull; loss_ppm = (uint32_t)l;
    fprintf(stderr, "tb-wan: gen %llu: delay %llu us, jitter %llu us, loss %llu ppm\n", g, d, j, l);
}

static void write_status(struct queue q[2]) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s.status", conf_path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "gen=%llu req=%d delay_us=%llu jitter_us=%llu loss_ppm=%u\n", (unsigned long long)gen,
            (int)status_req, (unsigned long long)(delay_ns / 1000), (unsigned long long)(jitter_ns / 1000), loss_ppm);
    for (int d = 0; d < 2; d++)
        fprintf(f, "dir%d in=%llu out=%llu bytes_out=%llu lost=%llu overflow=%llu too_big=%llu send_err=%llu queued_bytes=%zu\n",
                d, (unsigned long long)q[d].in, (unsigned long long)q[d].out, (unsigned long long)q[d].bytes_out,
                (unsigned long long)q[d].lost, (unsigned long long)q[d].overflow, (unsigned long long)q[d].too_big,
                (unsigned long long)q[d].send_err, q[d].used);
    fclose(f);
    rename(tmp, path);
}

static int open_port(const char *ifname) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) { perror("tb-wan: socket(AF_PACKET)"); exit(2); }
    unsigned idx = if_nametoindex(ifname);
    if (!idx) { fprintf(stderr, "tb-wan: no interface %s\n", ifname); exit(2); }
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = (int)idx };
    if (bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("tb-wan: bind"); exit(2); }
    int one = 1, big = 64 << 20;
    setsockopt(s, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    /* Frames carry a virtio_net_hdr: checksum-offloaded packets (CHECKSUM_PARTIAL) keep their
     * "checksum still to do" mark across the delay line instead of arriving with a bad checksum. */
    if (setsockopt(s, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) { perror("tb-wan: PACKET_VNET_HDR"); exit(2); }
    if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0) perror("tb-wan: SO_RCVBUFFORCE");
    if (setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) < 0) perror("tb-wan: SO_SNDBUFFORCE");
    return s;
}

static size_t rec_size(uint32_t len) { return sizeof(struct rec) + ((len + 7u) & ~7u); }

static int enqueue(struct queue *q, const unsigned char *frame, uint32_t len, uint64_t release) {
    size_t need = rec_size(len);
    size_t tail = q->tail, extra = 0;
    if (tail + need > RING_BYTES) {            /* does not fit before the end: wrap */
        extra = RING_BYTES - tail;
        tail = 0;
    }
    if (q->used + extra + need > RING_BYTES) return -1;
    if (extra) {
        if (extra >= sizeof(struct rec)) ((struct rec *)(q->buf + q->tail))->len = WRAP;
        q->used += extra;
    }
    struct rec *r = (struct rec *)(q->buf + tail);
    r->release_ns = release; r->len = len;
    memcpy(q->buf + tail + sizeof *r, frame, len);
    q->tail = tail + need;
    q->used += need;
    return 0;
}

static struct rec *peek(struct queue *q) {
    if (!q->used) return NULL;
    if (RING_BYTES - q->head < sizeof(struct rec) || ((struct rec *)(q->buf + q->head))->len == WRAP) {
        q->used -= RING_BYTES - q->head;
        q->head = 0;
        if (!q->used) return NULL;
    }
    return (struct rec *)(q->buf + q->head);
}

static void pop(struct queue *q, struct rec *r) {
    size_t n = rec_size(r->len);
    q->head += n; q->used -= n;
    if (!q->used) q->head = q->tail = 0;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: tb-wan CONF IF_A IF_B\n"); return 2; }
    conf_path = argv[1];
    prctl(PR_SET_TIMERSLACK, 1000UL);       /* wake within ~1 us of the release time, not 50 us */
    /* A link keeps time even when the CPU is busy with guests: real-time priority (low), if allowed.
     * It sleeps in ppoll whenever nothing is due, and the kernel's RT throttling bounds a busy spell. */
    struct sched_param sp = { .sched_priority = 10 };
    if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0) perror("tb-wan: SCHED_FIFO (continuing without)");
    int sock[2] = { open_port(argv[2]), open_port(argv[3]) };
    struct queue q[2];                       /* q[d]: frames that arrived on port d, leaving on port 1-d */
    memset(q, 0, sizeof q);
    for (int d = 0; d < 2; d++) {
        q[d].buf = malloc(RING_BYTES);
        if (!q[d].buf) { fprintf(stderr, "tb-wan: out of memory\n"); return 2; }
    }
    rng ^= (uint64_t)getpid() << 32 ^ now_ns();
    struct sigaction sa = { 0 };
    sa.sa_handler = on_hup; sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = on_usr1; sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_term; sigaction(SIGTERM, &sa, NULL); sigaction(SIGINT, &sa, NULL);

    static unsigned char bufs[BATCH][MAXFRAME];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    sigset_t empty, blocked;
    sigemptyset(&empty); sigemptyset(&blocked);
    sigaddset(&blocked, SIGHUP); sigaddset(&blocked, SIGUSR1); sigaddset(&blocked, SIGTERM); sigaddset(&blocked, SIGINT);
    sigprocmask(SIG_BLOCK, &blocked, NULL);
    fprintf(stderr, "tb-wan: forwarding %s <-> %s\n", argv[2], argv[3]);

    while (!want_exit) {
        if (want_reload) { want_reload = 0; reload(); }
        if (want_status) { want_status = 0; write_status(q); }
        int busy = 0;
        for (int d = 0; d < 2; d++) {         /* receive what is there */
            for (int i = 0; i < BATCH; i++) {
                iov[i].iov_base = bufs[i]; iov[i].iov_len = MAXFRAME;
                memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
                msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
            }
            int n = recvmmsg(sock[d], msgs, BATCH, MSG_DONTWAIT, NULL);
            if (n <= 0) continue;
            busy = 1;
            uint64_t t = now_ns();
            for (int i = 0; i < n; i++) {
                uint32_t len = msgs[i].msg_len;
                q[d].in++;
                if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) { q[d].too_big++; continue; }
                if (loss_ppm && xrand() % 1000000u < loss_ppm) { q[d].lost++; continue; }
                uint64_t rel = t + delay_ns;
                if (jitter_ns) {
                    int64_t j = (int64_t)(xrand() % (2 * jitter_ns + 1)) - (int64_t)jitter_ns;
                    rel = (int64_t)rel + j < (int64_t)t ? t : (uint64_t)((int64_t)rel + j);
                }
                if (rel < q[d].last_release) rel = q[d].last_release;   /* never reorder */
                if (enqueue(&q[d], bufs[i], len, rel) < 0) { q[d].overflow++; continue; }
                q[d].last_release = rel;
            }
        }
        uint64_t t = now_ns(), next = UINT64_MAX;
        for (int d = 0; d < 2; d++) {         /* send what is due */
            struct rec *r;
            while ((r = peek(&q[d])) != NULL) {
                if (r->release_ns > t) { if (r->release_ns < next) next = r->release_ns; break; }
                ssize_t w = send(sock[1 - d], (unsigned char *)(r + 1), r->len, 0);
                if (w < 0) {
                    if (errno == ENOBUFS || errno == EAGAIN) {       /* device queue full: try again soon */
                        next = t + 20000;
                        break;
                    }
                    q[d].send_err++;
                } else {
                    q[d].out++; q[d].bytes_out += r->len;
                }
                pop(&q[d], r);
                busy = 1;
            }
        }
        /* Signals are blocked except inside ppoll: a busy loop polls with a zero timeout to take them. */
        struct pollfd pf[2] = { { .fd = sock[0], .events = POLLIN }, { .fd = sock[1], .events = POLLIN } };
        struct timespec ts = { 0, 0 }, *tp = NULL;
        if (busy) {
            tp = &ts;
        } else if (next != UINT64_MAX) {
            uint64_t now = now_ns(), wait = next > now ? next - now : 0;
            ts.tv_sec = (time_t)(wait / 1000000000ull); ts.tv_nsec = (long)(wait % 1000000000ull);
            tp = &ts;
        }
        ppoll(pf, 2, tp, &empty);
    }
    fprintf(stderr, "tb-wan: exiting\n");
    return 0;
}
