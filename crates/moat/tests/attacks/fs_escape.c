/* Filesystem-escape and information-leak probes, run inside a moat sandbox.
 *
 * Usage: fs_escape ACTION [ARGS...]. Each action prints `RAN <action>` before it tries
 * anything, then one line per attempt: `<what>: <ERRNO_NAME>` when the call failed, `<what>:
 * OK` when it succeeded, or `<what>: <value>`. stdout is line-buffered, so every line written
 * before a seccomp kill still reaches the test.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <unistd.h>

static const char *en(int e) {
    const char *n = strerrorname_np(e);
    return n ? n : "UNKNOWN_ERRNO";
}

/* Prints `what: OK` when rc >= 0, else `what: ERRNO`. */
static void report(const char *what, long rc) {
    if (rc >= 0)
        printf("%s: OK\n", what);
    else
        printf("%s: %s\n", what, en(errno));
}

static int same_file(const struct stat *a, const struct stat *b) {
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* chroot() and the classic chroot escape: chdir("..") far above the root, then chroot("."). */
static int act_chroot(void) {
    struct stat root, here;
    char cwd[PATH_MAX];
    mkdir("/tmp/jail", 0755);
    report("chroot", chroot("/tmp/jail"));
    if (chdir("/tmp/jail") != 0)
        return 1;
    int rc = 0;
    for (int i = 0; i < 256; i++)
        if (chdir("..") != 0)
            rc = -1;
    report("chdir_dotdot_x256", rc);
    report("chroot_dot", chroot("."));
    if (stat("/", &root) != 0 || stat(".", &here) != 0)
        return 1;
    printf("cwd_is_root: %s\n", same_file(&root, &here) ? "yes" : "no");
    printf("getcwd: %s\n", getcwd(cwd, sizeof cwd) ? cwd : en(errno));
    /* the host's tree, were we above the root: none of these exist in the sandbox */
    report("stat_oldroot", stat("oldroot", &here));
    report("stat_newroot", stat("newroot", &here));
    report("stat_root_home", stat("root/.bashrc", &here));
    report("stat_boot", stat("boot", &here));
    return 0;
}

/* open("/..") and friends all land on the sandbox's own root. */
static int act_dotdot(void) {
    struct stat root, st;
    if (stat("/", &root) != 0)
        return 1;
    const char *paths[] = {"/..", "/../..", "/proc/self/root/..", "/proc/1/root/..",
                           "/tmp/../../..", "/proc/self/cwd/../../.."};
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++) {
        int fd = open(paths[i], O_RDONLY | O_DIRECTORY);
        if (fd < 0) {
            printf("open %s: %s\n", paths[i], en(errno));
            continue;
        }
        fstat(fd, &st);
        printf("open %s: %s\n", paths[i], same_file(&root, &st) ? "sandbox_root" : "ELSEWHERE");
        close(fd);
    }
    /* openat(fd_of_root, "..") */
    int r = open("/", O_RDONLY | O_DIRECTORY);
    int fd = openat(r, "..", O_RDONLY | O_DIRECTORY);
    if (fd >= 0 && fstat(fd, &st) == 0)
        printf("openat root ..: %s\n", same_file(&root, &st) ? "sandbox_root" : "ELSEWHERE");
    else
        printf("openat root ..: %s\n", en(errno));
    return 0;
}

/* runc CVE-2019-5736: reach the runtime's binary through /proc/PID/exe and write it. */
static int act_exe(void) {
    char buf[PATH_MAX];
    ssize_t n = readlink("/proc/1/exe", buf, sizeof buf - 1);
    if (n >= 0) {
        buf[n] = 0;
        printf("readlink /proc/1/exe: %s\n", buf);
    } else {
        printf("readlink /proc/1/exe: %s\n", en(errno));
    }
    report("open /proc/1/exe wronly", open("/proc/1/exe", O_WRONLY));
    report("open /proc/1/exe rdonly", open("/proc/1/exe", O_RDONLY));
    report("open /proc/1/exe path", open("/proc/1/exe", O_PATH));
    report("open /proc/1/map_files", open("/proc/1/map_files", O_RDONLY | O_DIRECTORY));
    report("open /proc/self/exe wronly", open("/proc/self/exe", O_WRONLY));
    report("open /proc/self/exe rdwr", open("/proc/self/exe", O_RDWR));
    char *argv[] = {"exe", NULL};
    char *envp[] = {NULL};
    report("execve /proc/1/exe", execve("/proc/1/exe", argv, envp));
    return 0;
}

/* runc CVE-2024-21626: an inherited fd pointing outside the root, reached through
 * /proc/self/fd or openat(fd, ".."). */
static int act_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) {
        printf("opendir /proc/self/fd: %s\n", en(errno));
        return 1;
    }
    int own = dirfd(d), fds[1024], nfds = 0;
    struct dirent *e;
    while ((e = readdir(d)) && nfds < 1024) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd != own)
            fds[nfds++] = fd;
    }
    closedir(d);
    printf("fds:");
    for (int i = 0; i < nfds; i++)
        printf("%s%d", i ? "," : " ", fds[i]);
    printf("\n");
    for (int i = 0; i < nfds; i++) {
        char link[64], target[PATH_MAX], what[96];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fds[i]);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n < 0) {
            printf("fd %d target: %s\n", fds[i], en(errno));
        } else {
            target[n] = 0;
            char *colon = strchr(target, ':');
            if (colon && target[0] != '/')
                *colon = 0; /* pipe:[1234] -> pipe */
            printf("fd %d target: %s\n", fds[i], target);
        }
        snprintf(what, sizeof what, "fd %d openat ..", fds[i]);
        report(what, openat(fds[i], "..", O_RDONLY));
        snprintf(what, sizeof what, "fd %d fchdir", fds[i]);
        report(what, fchdir(fds[i]));
        snprintf(what, sizeof what, "fd %d reopen ..", fds[i]);
        char via[96];
        snprintf(via, sizeof via, "/proc/self/fd/%d/..", fds[i]);
        report(what, open(via, O_RDONLY));
    }
    char cwd[PATH_MAX];
    printf("getcwd: %s\n", getcwd(cwd, sizeof cwd) ? cwd : en(errno));
    ssize_t n = readlink("/proc/self/cwd", cwd, sizeof cwd - 1);
    if (n >= 0) {
        cwd[n] = 0;
        printf("proc cwd: %s\n", cwd);
    }
    return 0;
}

/* open(PATH, O_WRONLY) then write one line. */
static int act_write(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        int fd = open(argv[i], O_WRONLY);
        if (fd < 0) {
            printf("%s: %s\n", argv[i], en(errno));
            continue;
        }
        struct stat st;
        fstat(fd, &st);
        ssize_t w = write(fd, "|/tmp/pwn\n", 10);
        if (w < 0)
            printf("%s: opened, write %s\n", argv[i], en(errno));
        else if (S_ISCHR(st.st_mode))
            printf("%s: OK wrote to chr(%u,%u)\n", argv[i], major(st.st_rdev), minor(st.st_rdev));
        else
            printf("%s: OK wrote %zd bytes\n", argv[i], w);
        close(fd);
    }
    return 0;
}

/* Create PATH (a file, or a directory when it ends in '/'). */
static int act_create(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        size_t l = strlen(argv[i]);
        if (l && argv[i][l - 1] == '/') {
            char p[PATH_MAX];
            snprintf(p, sizeof p, "%.*s", (int)(l - 1), argv[i]);
            report(argv[i], mkdir(p, 0755));
        } else {
            report(argv[i], open(argv[i], O_WRONLY | O_CREAT | O_EXCL, 0644));
        }
    }
    return 0;
}

/* CVE-2022-0492: mount a cgroup v1 hierarchy and set its release_agent. */
static int act_cgroup(void) {
    mkdir("/tmp/cg", 0755);
    const char *ctl[] = {"memory", "rdma", "pids", "none,name=x"};
    int mounted = 0;
    for (size_t i = 0; i < sizeof ctl / sizeof *ctl; i++) {
        char what[64];
        snprintf(what, sizeof what, "mount cgroup %s", ctl[i]);
        int rc = mount("cgroup", "/tmp/cg", "cgroup", 0, ctl[i]);
        report(what, rc);
        if (rc == 0) {
            mounted = 1;
            break;
        }
    }
    report("mount cgroup2", mount("cgroup2", "/tmp/cg", "cgroup2", 0, NULL));
    if (mounted) {
        int fd = open("/tmp/cg/release_agent", O_WRONLY);
        report("open release_agent", fd);
        if (fd >= 0)
            report("write release_agent", write(fd, "/tmp/pwn", 8));
    }
    /* a cgroup filesystem already mounted somewhere in the sandbox? */
    report("open /sys/fs/cgroup/memory/release_agent",
           open("/sys/fs/cgroup/memory/release_agent", O_WRONLY));
    return 0;
}

/* Shocker: open_by_handle_at with a guessed handle for the host's root directory. */
static int act_handle(void) {
    struct {
        unsigned int handle_bytes;
        int handle_type;
        unsigned char f_handle[8];
    } h = {8, 1, {2, 0, 0, 0, 0, 0, 0, 0}}; /* FILEID_INO32_GEN, inode 2 */
    int dfd = open("/usr", O_RDONLY | O_DIRECTORY);
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, dfd, &h, O_RDONLY));
    struct {
        unsigned int handle_bytes;
        int handle_type;
        unsigned char f_handle[128];
    } mine = {128, 0, {0}};
    int mount_id;
    report("name_to_handle_at",
           syscall(SYS_name_to_handle_at, AT_FDCWD, "/usr", &mine, &mount_id, 0));
    return 0;
}

/* Identity and capabilities after exec (of a setuid or file-capability binary). */
static int act_whoami(void) {
    struct stat st;
    if (stat("/proc/self/exe", &st) == 0)
        printf("exe mode: %04o owner: %u\n", st.st_mode & 07777, st.st_uid);
    uid_t r, e, s;
    getresuid(&r, &e, &s);
    printf("resuid: %u %u %u\n", r, e, s);
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Cap", 3) || !strncmp(line, "NoNewPrivs", 10))
            fputs(line, stdout);
    if (f)
        fclose(f);
    /* The same from the kernel itself (gVisor's /proc/self/status has no NoNewPrivs line). */
    printf("prctl no_new_privs: %d\n", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    return 0;
}

/* mknod a block and a character device. */
static int act_mknod(void) {
    report("mknod blk 8:0 /tmp/sda", mknod("/tmp/sda", S_IFBLK | 0600, makedev(8, 0)));
    report("mknod blk 254:0 /tmp/vda", mknod("/tmp/vda", S_IFBLK | 0600, makedev(254, 0)));
    report("mknod chr 1:1 /tmp/mem", mknod("/tmp/mem", S_IFCHR | 0600, makedev(1, 1)));
    report("mknodat blk 8:0 /work/sda",
           mknodat(AT_FDCWD, "/work/sda", S_IFBLK | 0600, makedev(8, 0)));
    report("mknod fifo /tmp/fifo", mknod("/tmp/fifo", S_IFIFO | 0600, 0));
    return 0;
}

/* open(PATH, O_RDWR), falling back to O_RDONLY to tell "absent" from "read-only". */
static int act_open(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        int fd = open(argv[i], O_RDWR);
        if (fd >= 0) {
            printf("%s: OK\n", argv[i]);
            close(fd);
            continue;
        }
        printf("%s: %s\n", argv[i], en(errno));
    }
    return 0;
}

/* Read PATH: `ENOENT`..., `null_mask` (the /dev/null bind, nothing read), `empty_dir`,
 * `dir N entries`, or `N bytes`. */
static int act_read(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            printf("%s: %s\n", argv[i], en(errno));
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            DIR *d = opendir(argv[i]);
            if (!d) {
                printf("%s: %s\n", argv[i], en(errno));
                continue;
            }
            int n = 0;
            struct dirent *e;
            while ((e = readdir(d)))
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                    n++;
            closedir(d);
            if (n)
                printf("%s: dir %d entries\n", argv[i], n);
            else
                printf("%s: empty_dir\n", argv[i]);
            continue;
        }
        int fd = open(argv[i], O_RDONLY);
        if (fd < 0) {
            printf("%s: %s\n", argv[i], en(errno));
            continue;
        }
        char buf[65536];
        long total = 0;
        ssize_t n;
        while ((n = read(fd, buf, sizeof buf)) > 0 && total < (1 << 20))
            total += n;
        if (n < 0)
            printf("%s: read %s\n", argv[i], en(errno));
        else if (S_ISCHR(st.st_mode) && major(st.st_rdev) == 1 && minor(st.st_rdev) == 3 &&
                 total == 0)
            printf("%s: null_mask\n", argv[i]);
        else
            printf("%s: %ld bytes\n", argv[i], total);
        close(fd);
    }
    return 0;
}

/* dmesg: the kernel log through syslog(2). */
static int act_syslog(void) {
    char buf[4096];
    report("syslog READ_ALL", klogctl(3, buf, sizeof buf));
    report("syslog SIZE_BUFFER", klogctl(10, NULL, 0));
    report("syslog READ", klogctl(2, buf, sizeof buf));
    report("open /dev/kmsg", open("/dev/kmsg", O_RDONLY));
    return 0;
}

/* Every process visible in /proc, as `pid N: COMM`. */
static int act_pids(void) {
    DIR *d = opendir("/proc");
    struct dirent *e;
    printf("self: %d\n", getpid());
    while (d && (e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || end == e->d_name)
            continue;
        char p[64], comm[64] = "?";
        snprintf(p, sizeof p, "/proc/%ld/comm", pid);
        FILE *f = fopen(p, "r");
        if (f && fgets(comm, sizeof comm, f))
            comm[strcspn(comm, "\n")] = 0;
        if (f)
            fclose(f);
        printf("pid %ld: %s\n", pid, comm);
    }
    return 0;
}

/* Host and domain name. */
static int act_uts(void) {
    struct utsname u;
    uname(&u);
    printf("nodename: %s\n", u.nodename);
    printf("domainname: %s\n", u.domainname);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: fs_escape ACTION [ARGS...]\n");
        return 2;
    }
    const char *a = argv[1];
    printf("RAN %s\n", a);
    if (!strcmp(a, "chroot"))
        return act_chroot();
    if (!strcmp(a, "dotdot"))
        return act_dotdot();
    if (!strcmp(a, "exe"))
        return act_exe();
    if (!strcmp(a, "fds"))
        return act_fds();
    if (!strcmp(a, "write"))
        return act_write(argc, argv);
    if (!strcmp(a, "create"))
        return act_create(argc, argv);
    if (!strcmp(a, "cgroup"))
        return act_cgroup();
    if (!strcmp(a, "handle"))
        return act_handle();
    if (!strcmp(a, "whoami"))
        return act_whoami();
    if (!strcmp(a, "mknod"))
        return act_mknod();
    if (!strcmp(a, "open"))
        return act_open(argc, argv);
    if (!strcmp(a, "read"))
        return act_read(argc, argv);
    if (!strcmp(a, "syslog"))
        return act_syslog();
    if (!strcmp(a, "pids"))
        return act_pids();
    if (!strcmp(a, "uts"))
        return act_uts();
    fprintf(stderr, "unknown action %s\n", a);
    return 2;
}
