/* Kernel attack surface and network exfiltration attempts, run inside a moat sandbox by
 * tests/suite/attacks_kernel.rs and tests/suite/attacks_net.rs.
 *
 * Usage: kernel NAME [ARGS...]. Each case prints `RAN NAME` first (flushed, so a case that
 * gets the process killed still proves it ran), then one `LABEL: RESULT` line per attempt,
 * where RESULT is `OK` (the call succeeded) or the errno's name (`EPERM`, ...).
 *
 * Where it is cheap, an attempt passes arguments for which the kernel itself (without the
 * seccomp filter) would answer something other than the expected errno: e.g. `unshare(0)`
 * succeeds, `personality(READ_IMPLIES_EXEC)` succeeds, `ioctl(/dev/null, TIOCSTI)` is ENOTTY,
 * `socket(AF_PACKET)` is EPERM (no CAP_NET_RAW) where the filter says EAFNOSUPPORT. So the
 * expected answer shows that the filter decided, not a capability check further in.
 *
 * Every call that matters goes through syscall(SYS_...) so glibc wrappers cannot interfere.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_alg.h>
#include <linux/netlink.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <ftw.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif
#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef AF_ALG
#define AF_ALG 38
#endif
#ifndef SOCK_PACKET
#define SOCK_PACKET 10
#endif
#define OPEN_TREE_CLONE_ 1
#define READ_IMPLIES_EXEC_ 0x0400000

static void ran(const char *name) {
    printf("RAN %s\n", name);
    fflush(stdout);
}

/* Prints `label: OK` for ret >= 0, else `label: ERRNO_NAME` (errno as the call left it). */
static void report(const char *label, long ret) {
    if (ret >= 0) {
        printf("%s: OK\n", label);
    } else {
        const char *n = strerrorname_np(errno);
        if (n)
            printf("%s: %s\n", label, n);
        else
            printf("%s: errno %d\n", label, errno);
    }
    fflush(stdout);
}

/* unshare and clone with each CLONE_NEW* flag; clone3. */
static int do_namespaces(void) {
    static const struct {
        const char *name;
        unsigned long flag;
    } flags[] = {
        {"NEWNS", CLONE_NEWNS},     {"NEWCGROUP", CLONE_NEWCGROUP},
        {"NEWUTS", CLONE_NEWUTS},   {"NEWIPC", CLONE_NEWIPC},
        {"NEWUSER", CLONE_NEWUSER}, {"NEWPID", CLONE_NEWPID},
        {"NEWNET", CLONE_NEWNET},   {"NEWTIME", CLONE_NEWTIME},
    };
    char label[64];
    ran("namespaces");
    /* unshare(0) is a no-op that the kernel always allows: EPERM here is the filter. */
    report("unshare 0", syscall(SYS_unshare, 0UL));
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        snprintf(label, sizeof label, "unshare %s", flags[i].name);
        report(label, syscall(SYS_unshare, flags[i].flag));
    }
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        snprintf(label, sizeof label, "clone %s", flags[i].name);
        /* Like fork (no new stack); a child that somehow appears exits at once. */
        long r = syscall(SYS_clone, flags[i].flag | SIGCHLD, 0UL, 0UL, 0UL, 0UL);
        if (r == 0)
            _exit(0);
        if (r > 0)
            waitpid((pid_t)r, NULL, 0);
        report(label, r);
    }
    /* clone3 with flags the filter cannot see: ENOSYS, so glibc falls back to clone. */
    struct {
        uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    } args = {.flags = CLONE_NEWUSER | CLONE_NEWNS, .exit_signal = SIGCHLD};
    long r = syscall(SYS_clone3, &args, sizeof args);
    if (r == 0)
        _exit(0);
    if (r > 0)
        waitpid((pid_t)r, NULL, 0);
    report("clone3 NEWUSER|NEWNS", r);
    struct {
        uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    } plain = {.exit_signal = SIGCHLD};
    r = syscall(SYS_clone3, &plain, sizeof plain);
    if (r == 0)
        _exit(0);
    if (r > 0)
        waitpid((pid_t)r, NULL, 0);
    report("clone3 plain", r);
    /* Ordinary process creation still works (glibc's fork uses clone). */
    pid_t p = fork();
    if (p == 0)
        _exit(7);
    int st = 0;
    if (p > 0)
        waitpid(p, &st, 0);
    report("fork", p > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 7 ? 0 : -1);
    return 0;
}

/* The new mount API, and mount(2) itself. */
static int do_mount_api(void) {
    ran("mount_api");
    report("fsopen tmpfs", syscall(SYS_fsopen, "tmpfs", 0UL));
    /* Without OPEN_TREE_CLONE open_tree needs no capability (it is an O_PATH open). */
    report("open_tree /", syscall(SYS_open_tree, AT_FDCWD, "/", 0UL));
    report("open_tree / CLONE", syscall(SYS_open_tree, AT_FDCWD, "/", (unsigned long)OPEN_TREE_CLONE_));
    /* Invalid flags: the kernel itself would say EINVAL. */
    report("move_mount", syscall(SYS_move_mount, AT_FDCWD, "/tmp", AT_FDCWD, "/", 0xFFFFFFFFUL));
    report("mount_setattr", syscall(SYS_mount_setattr, AT_FDCWD, "/", 0xFFFFFFFFUL, NULL, 0UL));
    report("mount tmpfs", syscall(SYS_mount, "none", "/tmp", "tmpfs", 0UL, NULL));
    report("umount2 /", syscall(SYS_umount2, "/", 2UL /* MNT_DETACH */));
    report("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
    report("chroot /tmp", syscall(SYS_chroot, "/tmp"));
    return 0;
}

/* Kernel subsystems the profile denies outright. */
static int do_denied(void) {
    ran("denied");
    /* A NULL params pointer: the kernel would say EFAULT. */
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1UL, NULL));
    report("io_uring_enter", syscall(SYS_io_uring_enter, 0UL, 0UL, 0UL, 0UL, NULL, 0UL));
    report("io_uring_register", syscall(SYS_io_uring_register, 0UL, 0UL, NULL, 0UL));
    /* An unknown command with size 0: the kernel would say EINVAL. */
    report("bpf", syscall(SYS_bpf, 9999UL, NULL, 0UL));
    /* A NULL attr: the kernel would say EFAULT. */
    report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0UL, -1L, -1L, 0UL));
    report("userfaultfd", syscall(SYS_userfaultfd, 0UL));
    /* An unknown operation: the kernel would say EOPNOTSUPP. */
    report("keyctl", syscall(SYS_keyctl, 9999UL, 0UL, 0UL, 0UL, 0UL));
    report("add_key", syscall(SYS_add_key, "user", "moat", "x", 1UL, -2L /* session */));
    report("request_key", syscall(SYS_request_key, "user", "moat", NULL, 0UL));
    report("kexec_load", syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0UL));
    report("kexec_file_load", syscall(SYS_kexec_file_load, -1L, -1L, 0UL, "", 0UL));
    report("init_module", syscall(SYS_init_module, NULL, 0UL, ""));
    report("finit_module", syscall(SYS_finit_module, 0L, "", 0UL));
    report("delete_module", syscall(SYS_delete_module, "moat", 0UL));
    return 0;
}

/* ptrace and process_vm_readv against PID 1 (and, as controls, against itself / a child). */
static int do_ptrace(void) {
    ran("ptrace");
    report("ptrace ATTACH 1", syscall(SYS_ptrace, 16UL /* PTRACE_ATTACH */, 1L, NULL, NULL));
    report("ptrace SEIZE 1", syscall(SYS_ptrace, 0x4206UL /* PTRACE_SEIZE */, 1L, NULL, NULL));
    char buf[64];
    struct iovec local = {buf, sizeof buf};
    struct iovec remote = {(void *)0x400000, sizeof buf};
    report("process_vm_readv 1", syscall(SYS_process_vm_readv, 1L, &local, 1UL, &remote, 1UL, 0UL));
    /* Reading its own memory: the kernel allows it; EPERM here is the filter. */
    static char secret[16] = "self";
    struct iovec r2 = {secret, sizeof secret};
    report("process_vm_readv self",
           syscall(SYS_process_vm_readv, (long)getpid(), &local, 1UL, &r2, 1UL, 0UL));
    /* PTRACE_TRACEME in a child: the kernel allows it. */
    pid_t p = fork();
    if (p == 0) {
        long r = syscall(SYS_ptrace, 0UL /* PTRACE_TRACEME */, 0L, NULL, NULL);
        _exit(r == 0 ? 0 : (errno & 0x7f));
    }
    int st = 0;
    waitpid(p, &st, 0);
    errno = WIFEXITED(st) ? WEXITSTATUS(st) : 0;
    report("ptrace TRACEME", WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1);
    report("kcmp", syscall(SYS_kcmp, 1L, (long)getpid(), 0UL, 0UL, 0UL));
    report("pidfd_getfd", syscall(SYS_pidfd_getfd, 0L, 0L, 0UL));
    return 0;
}

static int do_personality(void) {
    ran("personality");
    /* The kernel would accept both; the filter allows only moby's values and the query. */
    report("personality READ_IMPLIES_EXEC", syscall(SYS_personality, (unsigned long)READ_IMPLIES_EXEC_));
    report("personality ADDR_NO_RANDOMIZE", syscall(SYS_personality, 0x0040000UL));
    report("personality PER_BSD", syscall(SYS_personality, 0x0006UL));
    long q = syscall(SYS_personality, 0xFFFFFFFFUL);
    report("personality query", q);
    printf("personality now: %#lx\n", q);
    fflush(stdout);
    return 0;
}

/* getpid through the i386 ABI: the filter kills the process (SIGSYS) on the architecture.
 * %rdi is -1, which the i386 ABI ignores: where `int $0x80` reaches the x86_64 table instead
 * (gVisor), 20 is writev(-1, ...), a deterministic EBADF, and 165 is mount, which the
 * filter's x86_64 rules refuse. */
static int do_int80(void) {
    ran("int80");
    long ret = 20; /* __NR_getpid in the i386 table */
    __asm__ volatile("int $0x80" : "+a"(ret) : "D"(-1L) : "memory");
    printf("int80: returned %ld\n", ret);
    ret = 165; /* getresuid in the i386 table, mount in the x86_64 one */
    __asm__ volatile("int $0x80" : "+a"(ret) : "D"(0L), "S"(0L), "d"(0L) : "memory");
    printf("int80 165: returned %ld\n", ret);
    return 0;
}

static void *int80_thread(void *arg) {
    (void)arg;
    long ret = 20;
    __asm__ volatile("int $0x80" : "+a"(ret) : "D"(-1L) : "memory");
    return (void *)ret;
}

/* The same from a second thread: the whole process dies, not only the thread. */
static int do_int80_thread(void) {
    ran("int80_thread");
    pthread_t t;
    if (pthread_create(&t, NULL, int80_thread, NULL) != 0) {
        printf("pthread_create failed\n");
        return 1;
    }
    sleep(2);
    void *ret = NULL;
    pthread_join(t, &ret);
    printf("int80_thread: thread returned %ld\n", (long)ret);
    printf("int80_thread: main thread survived\n");
    return 0;
}

/* getpid with the x32 bit: killed by the filter (the kernel has no x32 ABI: ENOSYS). */
static int do_x32(void) {
    ran("x32");
    long r = syscall(0x40000000L | 39L);
    report("x32 getpid", r);
    return 0;
}

/* Terminal injection on fd 0, whatever it is: the filter answers before the driver. */
static int do_tty(void) {
    ran("tty");
    char c = 'x';
    report("TIOCSTI", syscall(SYS_ioctl, 0L, 0x5412UL, &c));
    char sel[2] = {2 /* TIOCL_PASTESEL-ish subcode */, 0};
    report("TIOCLINUX", syscall(SYS_ioctl, 0L, 0x541CUL, sel));
    report("TIOCSTI high bits", syscall(SYS_ioctl, 0L, 0xdead000000005412UL, &c));
    report("TIOCLINUX high bits", syscall(SYS_ioctl, 0L, 0xffffffff0000541cUL, sel));
    /* Same on a descriptor that is certainly not a terminal: the kernel would say ENOTTY. */
    int fd = open("/dev/null", O_RDWR);
    report("TIOCSTI /dev/null", syscall(SYS_ioctl, (long)fd, 0x5412UL, &c));
    /* A harmless ioctl still works: FIONREAD on a pipe. */
    int pfd[2];
    int n = -1;
    if (pipe(pfd) == 0)
        report("FIONREAD pipe", syscall(SYS_ioctl, (long)pfd[0], (unsigned long)FIONREAD, &n));
    return 0;
}

static void sock(const char *label, long family, long type, long proto) {
    long r = syscall(SYS_socket, family, type, proto);
    report(label, r);
    if (r >= 0)
        close((int)r);
}

static int do_sockets(void) {
    ran("sockets");
    /* AF_PACKET without CAP_NET_RAW: the kernel would say EPERM. */
    sock("AF_PACKET raw", AF_PACKET, SOCK_RAW, htons(3 /* ETH_P_ALL */));
    sock("AF_PACKET dgram", AF_PACKET, SOCK_DGRAM, htons(3));
    /* This host has virtio vsock: the kernel would create it. */
    sock("AF_VSOCK stream", AF_VSOCK, SOCK_STREAM, 0);
    sock("AF_VSOCK dgram", AF_VSOCK, SOCK_DGRAM, 0);
    /* AF_ALG needs no privilege in the kernel. */
    sock("AF_ALG", AF_ALG, SOCK_SEQPACKET, 0);
    sock("AF_NETLINK AUDIT", AF_NETLINK, SOCK_RAW, NETLINK_AUDIT);
    sock("AF_NETLINK KOBJECT_UEVENT", AF_NETLINK, SOCK_RAW, NETLINK_KOBJECT_UEVENT);
    sock("AF_NETLINK SOCK_DIAG", AF_NETLINK, SOCK_RAW, NETLINK_SOCK_DIAG);
    sock("AF_NETLINK NETFILTER", AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
    sock("AF_NETLINK ROUTE", AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    sock("AF_INET raw ICMP", AF_INET, SOCK_RAW, IPPROTO_ICMP);
    sock("AF_INET raw RAW", AF_INET, SOCK_RAW, IPPROTO_RAW);
    sock("AF_INET6 raw ICMPV6", AF_INET6, SOCK_RAW, IPPROTO_ICMPV6);
    sock("AF_INET SOCK_PACKET", AF_INET, SOCK_PACKET, htons(3));
    sock("AF_BLUETOOTH", 31, SOCK_RAW, 0);
    int sv[2];
    report("socketpair AF_INET", syscall(SYS_socketpair, (long)AF_INET, (long)SOCK_STREAM, 0L, sv));
    report("socketpair AF_UNIX", syscall(SYS_socketpair, (long)AF_UNIX, (long)SOCK_STREAM, 0L, sv));
    sock("AF_INET stream", AF_INET, SOCK_STREAM, 0);
    sock("AF_INET6 dgram", AF_INET6, SOCK_DGRAM, 0);
    return 0;
}

static void sig(const char *label, pid_t pid, int s) {
    report(label, syscall(SYS_kill, (long)pid, (long)s));
}

/* Signals to the sandbox's init: it must survive, and so must this process. */
static int do_kill_init(void) {
    ran("kill_init");
    sig("kill 1 0", 1, 0);
    sig("kill 1 SIGTERM", 1, SIGTERM);
    sig("kill 1 SIGKILL", 1, SIGKILL);
    sig("kill 1 SIGSTOP", 1, SIGSTOP);
    report("tgkill 1 SIGKILL", syscall(SYS_tgkill, 1L, 1L, (long)SIGKILL));
    usleep(100 * 1000);
    printf("kill_init: alive\n");
    return 0;
}

/* kill(-1, SIGKILL): everything this process may signal, except itself and init. */
static int do_kill_all(void) {
    ran("kill_all");
    pid_t child = fork();
    if (child == 0) {
        pause();
        _exit(0);
    }
    usleep(50 * 1000);
    sig("kill -1 SIGKILL", -1, SIGKILL);
    int st = 0;
    waitpid(child, &st, 0);
    printf("child: %s\n", WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL ? "SIGKILL" : "survived");
    usleep(100 * 1000);
    printf("kill_all: alive\n");
    return 0;
}

/* A host process's pid, given as an argument: not in this pid namespace. */
static int do_kill_host(int argc, char **argv) {
    ran("kill_host");
    if (argc < 3)
        return 2;
    pid_t pid = (pid_t)atoi(argv[2]);
    sig("kill host 0", pid, 0);
    sig("kill host SIGKILL", pid, SIGKILL);
    report("pidfd_open host", syscall(SYS_pidfd_open, (long)pid, 0UL));
    report("tgkill host", syscall(SYS_tgkill, (long)pid, (long)pid, (long)SIGKILL));
    /* As a process group: the host sleep leads none, nor could one be seen from here. */
    sig("kill -host SIGKILL", -pid, SIGKILL);
    return 0;
}

/* ---- network ---- */

static int do_ifaces(void) {
    ran("ifaces");
    struct if_nameindex *ifs = if_nameindex();
    if (!ifs) {
        report("if_nameindex", -1);
        return 0;
    }
    printf("ifaces:");
    for (struct if_nameindex *i = ifs; i->if_index; i++)
        printf(" %s", i->if_name);
    printf("\n");
    if_freenameindex(ifs);
    return 0;
}

/* A non-blocking connect, so a broken sandbox cannot hang the test on an unanswered SYN. */
static void connect_to(const char *label, int family, int type, const struct sockaddr *sa,
                       socklen_t len) {
    int fd = (int)syscall(SYS_socket, (long)family, (long)(type | SOCK_NONBLOCK), 0L);
    if (fd < 0) {
        report(label, -1);
        return;
    }
    report(label, syscall(SYS_connect, (long)fd, sa, (long)len));
    close(fd);
}

static void ping_to(const char *label, int family, int proto, const struct sockaddr *sa,
                    socklen_t len, unsigned char type) {
    long fd = syscall(SYS_socket, (long)family, (long)(SOCK_DGRAM | SOCK_NONBLOCK), (long)proto);
    report(label, fd);
    if (fd < 0)
        return;
    unsigned char echo[8] = {type, 0, 0, 0, 0, 0, 0, 1};
    char what[64];
    snprintf(what, sizeof what, "%s sendto", label);
    report(what, syscall(SYS_sendto, fd, echo, (long)sizeof echo, 0L, sa, (long)len));
    close((int)fd);
}

static int do_egress(void) {
    ran("egress");
    struct sockaddr_in v4 = {.sin_family = AF_INET, .sin_port = htons(80)};
    inet_pton(AF_INET, "192.0.2.1", &v4.sin_addr);
    connect_to("tcp4 192.0.2.1:80", AF_INET, SOCK_STREAM, (struct sockaddr *)&v4, sizeof v4);
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6, .sin6_port = htons(80)};
    inet_pton(AF_INET6, "2001:db8::1", &v6.sin6_addr);
    connect_to("tcp6 [2001:db8::1]:80", AF_INET6, SOCK_STREAM, (struct sockaddr *)&v6, sizeof v6);

    struct sockaddr_in dns = {.sin_family = AF_INET, .sin_port = htons(53)};
    inet_pton(AF_INET, "192.0.2.1", &dns.sin_addr);
    int u = (int)syscall(SYS_socket, (long)AF_INET, (long)(SOCK_DGRAM | SOCK_NONBLOCK), 0L);
    report("udp4 sendto 192.0.2.1:53",
           syscall(SYS_sendto, (long)u, "\0\0\1\0\0\1\0\0\0\0\0\0\0\0\1\0\1", 17L, 0L, &dns,
                   (long)sizeof dns));
    close(u);
    struct sockaddr_in6 dns6 = {.sin6_family = AF_INET6, .sin6_port = htons(53)};
    inet_pton(AF_INET6, "2001:db8::1", &dns6.sin6_addr);
    u = (int)syscall(SYS_socket, (long)AF_INET6, (long)(SOCK_DGRAM | SOCK_NONBLOCK), 0L);
    report("udp6 sendto [2001:db8::1]:53",
           syscall(SYS_sendto, (long)u, "x", 1L, 0L, &dns6, (long)sizeof dns6));
    close(u);
    /* Ping sockets (ICMP without raw privilege), then raw ICMP. Where a ping socket opens,
     * an echo request to the documentation address shows whether it has a route. */
    ping_to("icmp4 dgram", AF_INET, IPPROTO_ICMP, (struct sockaddr *)&v4, sizeof v4, 8);
    ping_to("icmp6 dgram", AF_INET6, IPPROTO_ICMPV6, (struct sockaddr *)&v6, sizeof v6, 128);
    sock("icmp4 raw", AF_INET, SOCK_RAW, IPPROTO_ICMP);
    sock("icmp6 raw", AF_INET6, SOCK_RAW, IPPROTO_ICMPV6);
    return 0;
}

static const char *eai_name(int e) {
    switch (e) {
    case 0: return "OK";
    case EAI_AGAIN: return "EAI_AGAIN";
    case EAI_NONAME: return "EAI_NONAME";
    case EAI_FAIL: return "EAI_FAIL";
    case EAI_NODATA: return "EAI_NODATA";
    case EAI_SYSTEM: return "EAI_SYSTEM";
    case EAI_FAMILY: return "EAI_FAMILY";
    case EAI_SERVICE: return "EAI_SERVICE";
    case EAI_MEMORY: return "EAI_MEMORY";
    default: return "EAI_OTHER";
    }
}

static int do_dns(void) {
    ran("dns");
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    int e = getaddrinfo("example.com", "80", &hints, &res);
    printf("getaddrinfo example.com: %s\n", eai_name(e));
    if (e == 0)
        freeaddrinfo(res);
    /* localhost resolves from /etc/hosts without any network, when the file is there. */
    res = NULL;
    e = getaddrinfo("localhost", "80", &hints, &res);
    printf("getaddrinfo localhost: %s\n", eai_name(e));
    if (e == 0)
        freeaddrinfo(res);
    return 0;
}

/* UDP connect to each resolver address given (a UDP connect sends nothing: it only picks a
 * route). Only for a loopback address, where the packet cannot leave the sandbox, is a query
 * then sent and an answer awaited. */
static int do_resolver(int argc, char **argv) {
    ran("resolver");
    for (int i = 2; i < argc; i++) {
        struct sockaddr_storage ss = {0};
        socklen_t len;
        int family, loop;
        struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
        if (inet_pton(AF_INET, argv[i], &a4->sin_addr) == 1) {
            family = a4->sin_family = AF_INET;
            a4->sin_port = htons(53);
            len = sizeof *a4;
            loop = (ntohl(a4->sin_addr.s_addr) >> 24) == 127;
        } else if (inet_pton(AF_INET6, argv[i], &a6->sin6_addr) == 1) {
            family = a6->sin6_family = AF_INET6;
            a6->sin6_port = htons(53);
            len = sizeof *a6;
            loop = IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr);
        } else {
            printf("resolver %s: BADADDR\n", argv[i]);
            continue;
        }
        char label[128];
        snprintf(label, sizeof label, "resolver %s", argv[i]);
        int fd = (int)syscall(SYS_socket, (long)family, (long)SOCK_DGRAM, 0L);
        long r = syscall(SYS_connect, (long)fd, &ss, (long)len);
        if (r == 0 && !loop) {
            printf("%s: CONNECTED\n", label); /* a route exists: send nothing */
            close(fd);
            continue;
        }
        if (r == 0) {
            struct timeval tv = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            static const char q[] = "\x12\x34\1\0\0\1\0\0\0\0\0\0"
                                    "\7example\3com\0\0\1\0\1";
            r = syscall(SYS_sendto, (long)fd, q, (long)(sizeof q - 1), 0L, NULL, 0L);
            if (r >= 0) {
                char buf[512];
                r = syscall(SYS_recvfrom, (long)fd, buf, (long)sizeof buf, 0L, NULL, NULL);
            }
        }
        report(label, r);
        close(fd);
    }
    return 0;
}

static int sockets_found;

static int scan_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)ftw;
    if (flag == FTW_D &&
        (!strcmp(path, "/proc") || !strcmp(path, "/sys")))
        return FTW_SKIP_SUBTREE;
    if (S_ISSOCK(st->st_mode)) {
        printf("socket file: %s\n", path);
        sockets_found++;
    }
    return FTW_CONTINUE;
}

/* Every socket file the sandbox's file system holds (none, from the host or otherwise). */
static int do_socket_files(void) {
    ran("socket_files");
    nftw("/", scan_one, 64, FTW_PHYS | FTW_ACTIONRETVAL);
    printf("socket files: %d\n", sockets_found);
    return 0;
}

/* connect to 127.0.0.1:PORT, where the host has a listener on its own loopback. */
static int do_host_tcp(int argc, char **argv) {
    ran("host_tcp");
    if (argc < 3)
        return 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = (int)syscall(SYS_socket, (long)AF_INET, (long)SOCK_STREAM, 0L);
    report("tcp4 127.0.0.1", syscall(SYS_connect, (long)fd, &a, (long)sizeof a));
    close(fd);
    struct sockaddr_in6 b = {.sin6_family = AF_INET6, .sin6_port = a.sin_port};
    b.sin6_addr = in6addr_loopback;
    fd = (int)syscall(SYS_socket, (long)AF_INET6, (long)SOCK_STREAM, 0L);
    report("tcp6 ::1", syscall(SYS_connect, (long)fd, &b, (long)sizeof b));
    close(fd);
    return 0;
}

/* AF_UNIX connect to a path, or to an abstract name when it starts with '@'. */
static int do_unix(int argc, char **argv) {
    ran("unix");
    if (argc < 3)
        return 2;
    for (int i = 2; i < argc; i++) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        size_t n = strlen(argv[i]);
        if (n >= sizeof a.sun_path)
            return 2;
        memcpy(a.sun_path, argv[i], n);
        if (argv[i][0] == '@')
            a.sun_path[0] = '\0';
        char label[160];
        snprintf(label, sizeof label, "unix %s", argv[i]);
        int fd = (int)syscall(SYS_socket, (long)AF_UNIX, (long)SOCK_STREAM, 0L);
        report(label,
               syscall(SYS_connect, (long)fd, &a, (long)(offsetof(struct sockaddr_un, sun_path) + n)));
        close(fd);
    }
    return 0;
}

/* A server and a client on the sandbox's own loopback can talk. */
static void loopback(const char *label, int family) {
    struct sockaddr_storage ss = {0};
    socklen_t len;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof *a;
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        len = sizeof *a;
    }
    int srv = socket(family, SOCK_STREAM, 0);
    if (srv < 0 || bind(srv, (struct sockaddr *)&ss, len) != 0 || listen(srv, 1) != 0 ||
        getsockname(srv, (struct sockaddr *)&ss, &len) != 0) {
        report(label, -1);
        return;
    }
    pid_t p = fork();
    if (p == 0) {
        int c = accept(srv, NULL, NULL);
        char buf[16] = {0};
        ssize_t n = read(c, buf, sizeof buf);
        if (n > 0)
            write(c, buf, (size_t)n);
        _exit(0);
    }
    close(srv);
    int c = socket(family, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&ss, len) != 0) {
        report(label, -1);
        kill(p, SIGKILL);
        waitpid(p, NULL, 0);
        return;
    }
    write(c, "ping", 4);
    char buf[16] = {0};
    ssize_t n = read(c, buf, sizeof buf);
    waitpid(p, NULL, 0);
    printf("%s: %s\n", label, n == 4 && memcmp(buf, "ping", 4) == 0 ? "OK" : "BAD");
    fflush(stdout);
    close(c);
}

static int do_loopback(void) {
    ran("loopback");
    loopback("loopback4", AF_INET);
    loopback("loopback6", AF_INET6);
    return 0;
}

/* The descriptors the workload starts with. */
static int do_fds(void) {
    ran("fds");
    DIR *d = opendir("/proc/self/fd");
    if (!d) {
        report("opendir", -1);
        return 0;
    }
    int self = dirfd(d);
    printf("fds:");
    struct dirent *e;
    int fds[256], n = 0;
    while ((e = readdir(d)) && n < 256) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd != self)
            fds[n++] = fd;
    }
    closedir(d);
    /* readdir order is ascending for /proc/self/fd, but sort to be sure. */
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (fds[j] < fds[i]) {
                int t = fds[i];
                fds[i] = fds[j];
                fds[j] = t;
            }
    for (int i = 0; i < n; i++)
        printf(" %d", fds[i]);
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: kernel NAME [ARGS...]\n");
        return 2;
    }
    const char *c = argv[1];
    if (!strcmp(c, "namespaces")) return do_namespaces();
    if (!strcmp(c, "mount_api")) return do_mount_api();
    if (!strcmp(c, "denied")) return do_denied();
    if (!strcmp(c, "ptrace")) return do_ptrace();
    if (!strcmp(c, "personality")) return do_personality();
    if (!strcmp(c, "int80")) return do_int80();
    if (!strcmp(c, "int80_thread")) return do_int80_thread();
    if (!strcmp(c, "x32")) return do_x32();
    if (!strcmp(c, "tty")) return do_tty();
    if (!strcmp(c, "sockets")) return do_sockets();
    if (!strcmp(c, "kill_init")) return do_kill_init();
    if (!strcmp(c, "kill_all")) return do_kill_all();
    if (!strcmp(c, "kill_host")) return do_kill_host(argc, argv);
    if (!strcmp(c, "ifaces")) return do_ifaces();
    if (!strcmp(c, "egress")) return do_egress();
    if (!strcmp(c, "dns")) return do_dns();
    if (!strcmp(c, "resolver")) return do_resolver(argc, argv);
    if (!strcmp(c, "socket_files")) return do_socket_files();
    if (!strcmp(c, "host_tcp")) return do_host_tcp(argc, argv);
    if (!strcmp(c, "unix")) return do_unix(argc, argv);
    if (!strcmp(c, "loopback")) return do_loopback();
    if (!strcmp(c, "fds")) return do_fds();
    fprintf(stderr, "unknown case %s\n", c);
    return 2;
}
