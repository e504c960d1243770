/* Resource exhaustion attacks, run inside a moat sandbox by tests/suite/attacks_resources.rs.
 *
 * Usage: res MODE [ARGS...] [MARKER]
 * Every mode prints "RAN MODE" (flushed) before the attack, then one line per result in the
 * form "name: VALUE", where VALUE is a count, OK, or the errno name of the failure.
 * Extra trailing arguments are ignored: tests pass a unique marker to find leftovers on the
 * host by command line.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *errname(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case ENFILE: return "ENFILE";
    case EMFILE: return "EMFILE";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case EDQUOT: return "EDQUOT";
    case ENOSYS: return "ENOSYS";
    default: {
        static char buf[32];
        snprintf(buf, sizeof buf, "E%d", e);
        return buf;
    }
    }
}

static void ran(const char *mode) {
    printf("RAN %s\n", mode);
    fflush(stdout);
    /* The marker must reach the host before the attack can end the whole sandbox (in the
     * gvisor tier the host's OOM killer takes the sentry, and with it what the agent had not
     * relayed yet): a moment for the agent to send it, which a loaded machine needs. */
    usleep(100 * 1000);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Every process forks as fast as it can, forever; shared counters record the outcomes. The
 * first process watches for `secs` seconds, prints the counters and exits (which ends the
 * sandbox: init's exit kills the rest). */
static int forkbomb(int secs) {
    struct counters {
        atomic_long ok, eagain, other;
        atomic_int other_errno;
    } *c = mmap(NULL, sizeof *c, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (c == MAP_FAILED) {
        printf("mmap: %s\n", errname(errno));
        return 1;
    }
    ran("forkbomb");
    pid_t first = fork();
    if (first < 0) {
        printf("first fork: %s\n", errname(errno));
        return 1;
    }
    if (first == 0) {
        for (;;) {
            pid_t p = fork();
            if (p > 0)
                atomic_fetch_add(&c->ok, 1);
            else if (p < 0 && errno == EAGAIN)
                atomic_fetch_add(&c->eagain, 1);
            else if (p < 0) {
                atomic_store(&c->other_errno, errno);
                atomic_fetch_add(&c->other, 1);
            }
        }
    }
    sleep(secs);
    long ok = atomic_load(&c->ok) + 1; /* + the first fork */
    long eagain = atomic_load(&c->eagain);
    printf("forks_ok: %ld\n", ok);
    printf("fork_failed: %s\n", eagain > 0 ? "EAGAIN" : "none");
    printf("eagain_over_1000: %s\n", eagain > 1000 ? "yes" : "no");
    printf("other_failures: %ld\n", atomic_load(&c->other));
    if (atomic_load(&c->other) > 0)
        printf("other_errno: %s\n", errname(atomic_load(&c->other_errno)));
    fflush(stdout);
    return 0;
}

/* malloc and touch 1 MiB at a time, up to `mb` MiB. */
static int heap(long mb) {
    ran("heap");
    for (long i = 0; i < mb; i++) {
        char *p = malloc(1 << 20);
        if (!p) {
            printf("heap: ENOMEM at %ld\n", i);
            return 1;
        }
        memset(p, 0x5a, 1 << 20);
    }
    printf("heap: survived %ld\n", mb);
    return 0;
}

/* One mmap of `mb` MiB with MAP_POPULATE: the kernel faults every page in. */
static int populate(long mb) {
    ran("populate");
    void *p = mmap(NULL, (size_t)mb << 20, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        printf("populate: %s\n", errname(errno));
        return 1;
    }
    printf("populate: survived %ld\n", mb);
    return 0;
}

/* A memfd grown by write(2), 1 MiB at a time, up to `mb` MiB. */
static int memfd(long mb) {
    ran("memfd");
    int fd = memfd_create("balloon", 0);
    if (fd < 0) {
        printf("memfd_create: %s\n", errname(errno));
        return 1;
    }
    static char buf[1 << 20];
    memset(buf, 0x5a, sizeof buf);
    for (long i = 0; i < mb; i++) {
        if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) {
            printf("memfd: %s at %ld\n", errname(errno), i);
            return 1;
        }
    }
    printf("memfd: survived %ld\n", mb);
    return 0;
}

/* Writes `path` 1 MiB at a time until a write fails (or `mb` MiB). */
static int fill(const char *path, long mb) {
    ran("fill");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        printf("open: %s\n", errname(errno));
        return 1;
    }
    static char buf[1 << 20];
    memset(buf, 0x5a, sizeof buf);
    long total = 0;
    for (long i = 0; i < mb; i++) {
        ssize_t n = write(fd, buf, sizeof buf);
        if (n > 0)
            total += n;
        if (n != (ssize_t)sizeof buf) {
            int e = errno;
            if (n > 0) { /* short write: the next one reports the error */
                n = write(fd, buf, sizeof buf);
                e = errno;
            }
            printf("fill_mib: %ld\n", total >> 20);
            printf("fill: %s\n", n < 0 ? errname(e) : "short");
            return 0;
        }
    }
    printf("fill: survived %ld\n", mb);
    return 0;
}

/* Creates empty files in `dir` until creation fails. */
static int inodes(const char *dir) {
    ran("inodes");
    char path[512];
    for (long i = 0;; i++) {
        snprintf(path, sizeof path, "%s/i%ld", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
        if (fd < 0) {
            printf("files: %ld\n", i);
            printf("inodes: %s\n", errname(errno));
            return 0;
        }
        close(fd);
    }
}

/* Opens /dev/null until open fails. */
static int fds(void) {
    ran("fds");
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    printf("nofile: %llu\n", (unsigned long long)rl.rlim_cur);
    for (long i = 0;; i++) {
        if (open("/dev/null", O_RDONLY) < 0) {
            printf("opened: %ld\n", i);
            printf("fds: %s\n", errname(errno));
            return 0;
        }
    }
}

static volatile int spin_stop;
static void *spinner(void *arg) {
    (void)arg;
    volatile unsigned long x = 0;
    while (!spin_stop)
        x++;
    return NULL;
}

/* `n` threads spin. With secs > 0, the main thread stops them after `secs` seconds of wall
 * time and prints the CPU time the process used; with secs == 0 they spin forever. */
static int spin(int n, double secs) {
    ran("spin");
    pthread_t t[64];
    if (n > 64)
        n = 64;
    double start = now_s();
    for (int i = 0; i < n; i++)
        if (pthread_create(&t[i], NULL, spinner, NULL) != 0) {
            printf("pthread_create: failed\n");
            return 1;
        }
    if (secs <= 0)
        for (;;)
            pause();
    while (now_s() - start < secs)
        usleep(10000);
    spin_stop = 1;
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long cpu_ms = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000 +
                  (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
    printf("wall_ms: %ld\n", (long)((now_s() - start) * 1000));
    printf("cpu_ms: %ld\n", cpu_ms);
    return 0;
}

/* Ignores SIGTERM (and SIGINT, SIGHUP), double-forks sleepers in new sessions, and sleeps. */
static int immortal(void) {
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    ran("immortal");
    for (int i = 0; i < 3; i++) {
        pid_t p = fork();
        if (p == 0) {
            setsid();
            if (fork() == 0) {
                /* the grandchild: orphaned, reparented to the sandbox's init */
                for (;;)
                    pause();
            }
            _exit(0);
        }
        if (p > 0)
            waitpid(p, NULL, 0);
    }
    /* The proof, from inside, that the sleepers run: the processes that are copies of this
     * one (same command line), and how many of them lead or sit in another session. */
    char self_cmd[4096], cmd[4096];
    ssize_t self_n = -1;
    int fd = open("/proc/self/cmdline", O_RDONLY);
    if (fd >= 0) {
        self_n = read(fd, self_cmd, sizeof self_cmd);
        close(fd);
    }
    int copies = 0, other_sessions = 0;
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        pid_t pid = (pid_t)atoi(e->d_name);
        if (pid <= 0 || pid == getpid())
            continue;
        char p[64];
        snprintf(p, sizeof p, "/proc/%d/cmdline", (int)pid);
        int cfd = open(p, O_RDONLY);
        if (cfd < 0)
            continue;
        ssize_t n = read(cfd, cmd, sizeof cmd);
        close(cfd);
        if (n == self_n && n > 0 && !memcmp(cmd, self_cmd, (size_t)n)) {
            copies++;
            if (getsid(pid) != getsid(0))
                other_sessions++;
        }
    }
    if (d)
        closedir(d);
    printf("immortal: sleepers %d, in other sessions %d\n", copies, other_sessions);
    printf("immortal: forked\n");
    fflush(stdout);
    for (;;)
        pause();
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: res MODE [ARGS...]\n");
        return 2;
    }
    const char *m = argv[1];
    const char *a2 = argc > 2 ? argv[2] : "0";
    const char *a3 = argc > 3 ? argv[3] : "0";
    if (!strcmp(m, "forkbomb"))
        return forkbomb(atoi(a2));
    if (!strcmp(m, "heap"))
        return heap(atol(a2));
    if (!strcmp(m, "populate"))
        return populate(atol(a2));
    if (!strcmp(m, "memfd"))
        return memfd(atol(a2));
    if (!strcmp(m, "fill"))
        return fill(a2, atol(a3));
    if (!strcmp(m, "inodes"))
        return inodes(a2);
    if (!strcmp(m, "fds"))
        return fds();
    if (!strcmp(m, "spin"))
        return spin(atoi(a2), atof(a3));
    if (!strcmp(m, "immortal"))
        return immortal();
    fprintf(stderr, "unknown mode %s\n", m);
    return 2;
}
