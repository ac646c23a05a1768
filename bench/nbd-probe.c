/*
 * nbd-probe: the guest side of bench/nbd-io.ts.
 *
 *   nbd-probe attach HOST PORT EXPORT /dev/nbdN
 *       Connects to an NBD server (fixed newstyle handshake, NBD_OPT_EXPORT_NAME), hands the
 *       socket to the kernel's nbd driver (NBD_SET_SIZE, NBD_SET_FLAGS, NBD_SET_SOCK) and
 *       leaves a child in NBD_DO_IT serving the device; returns once the device has its size.
 *       What a plain initramfs (or nbd-client) does, with nothing in user space in the data
 *       path after the handshake.
 *
 *   nbd-probe read SEQ_MIB RAND_OPS ROUNDS NAME=DEV [NAME=DEV ...]
 *       Reads the devices with O_DIRECT, in rounds; in each round every phase runs on every
 *       target before the next phase (targets in turn, the order reversed in odd rounds):
 *         seq read   SEQ_MIB blocks of 1 MiB from offset 0
 *         rand read  RAND_OPS blocks of 4 KiB at pseudo-random 4 KiB-aligned offsets in that range
 *       Each pass adds up the first 8 bytes of every 4 KiB block it read; the targets serve the
 *       same virtual disk, so their sums must agree (the benchmark checks). Output per round:
 *         VDBOOT-NBD target=NAME round=R seq_read_mibs=… rand_read_iops=… seq_sum=… rand_sum=…
 *       or "VDBOOT-NBD error=…" (exit 1).
 *
 * Built static with musl-gcc by the benchmark. Struct-free: the ioctl numbers are linux/nbd.h's.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NBD_SET_SOCK _IO(0xab, 0)
#define NBD_SET_BLKSIZE _IO(0xab, 1)
#define NBD_SET_SIZE _IO(0xab, 2)
#define NBD_DO_IT _IO(0xab, 3)
#define NBD_CLEAR_SOCK _IO(0xab, 4)
#define NBD_SET_TIMEOUT _IO(0xab, 9)
#define NBD_SET_FLAGS _IO(0xab, 10)

static int fail(const char *what) {
  printf("VDBOOT-NBD error=%s:%s\n", what, strerror(errno));
  fflush(stdout);
  return 1;
}

static int read_all(int fd, void *buf, size_t n) {
  uint8_t *p = buf;
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static int write_all(int fd, const void *buf, size_t n) {
  const uint8_t *p = buf;
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static uint64_t be64(const uint8_t *b) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | b[i];
  return v;
}

static int attach(const char *host, int port, const char *name, const char *dev) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0) return fail("socket");
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) { errno = EINVAL; return fail("address"); }
  if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) return fail("connect");
  int one = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  uint8_t hello[18];
  if (read_all(s, hello, 18) < 0) return fail("server greeting");
  if (memcmp(hello, "NBDMAGIC", 8) != 0 || memcmp(hello + 8, "IHAVEOPT", 8) != 0) { errno = EPROTO; return fail("not a fixed-newstyle NBD server"); }
  uint16_t sflags = (uint16_t)(hello[16] << 8 | hello[17]);
  uint32_t cflags = htonl((sflags & 1) | (sflags & 2)); /* FIXED_NEWSTYLE, NO_ZEROES when offered */
  if (write_all(s, &cflags, 4) < 0) return fail("client flags");
  size_t len = strlen(name);
  uint8_t opt[16];
  memcpy(opt, "IHAVEOPT", 8);
  uint32_t o = htonl(1), l = htonl((uint32_t)len); /* NBD_OPT_EXPORT_NAME */
  memcpy(opt + 8, &o, 4);
  memcpy(opt + 12, &l, 4);
  if (write_all(s, opt, 16) < 0 || write_all(s, name, len) < 0) return fail("export name");
  uint8_t info[10];
  if (read_all(s, info, 10) < 0) { errno = ENOENT; return fail("the server closed the connection (no such export?)"); }
  if (!(sflags & 2)) {
    uint8_t zeros[124];
    if (read_all(s, zeros, 124) < 0) return fail("handshake padding");
  }
  uint64_t size = be64(info);
  unsigned long tflags = (unsigned long)(info[8] << 8 | info[9]);
  int nbd = open(dev, O_RDWR);
  if (nbd < 0) return fail(dev);
  if (ioctl(nbd, NBD_SET_BLKSIZE, 512UL) < 0) return fail("NBD_SET_BLKSIZE");
  if (ioctl(nbd, NBD_SET_SIZE, (unsigned long)size) < 0) return fail("NBD_SET_SIZE");
  if (ioctl(nbd, NBD_SET_FLAGS, tflags) < 0) return fail("NBD_SET_FLAGS");
  if (ioctl(nbd, NBD_SET_SOCK, (unsigned long)s) < 0) return fail("NBD_SET_SOCK");
  pid_t pid = fork();
  if (pid < 0) return fail("fork");
  if (pid == 0) {
    /* serves the device until it is disconnected */
    ioctl(nbd, NBD_DO_IT);
    ioctl(nbd, NBD_CLEAR_SOCK);
    _exit(0);
  }
  char sys[64];
  snprintf(sys, sizeof sys, "/sys/block/%s/size", strrchr(dev, '/') ? strrchr(dev, '/') + 1 : dev);
  for (int i = 0; i < 200; i++) {
    FILE *f = fopen(sys, "r");
    unsigned long long sectors = 0;
    if (f) {
      if (fscanf(f, "%llu", &sectors) != 1) sectors = 0;
      fclose(f);
    }
    if (sectors > 0) return 0;
    usleep(50000);
  }
  errno = ETIMEDOUT;
  return fail("the nbd device did not get its size");
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint64_t lcg_state;
static uint64_t lcg(void) {
  lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return lcg_state >> 17;
}

struct target {
  const char *name;
  int fd;
  double seq, rnd;
  uint64_t seq_sum, rnd_sum;
};

static uint64_t block_sum(const uint8_t *buf, size_t n) {
  uint64_t sum = 0;
  for (size_t at = 0; at < n; at += 4096) {
    uint64_t v;
    memcpy(&v, buf + at, 8);
    sum += v;
  }
  return sum;
}

static int seq_pass(struct target *t, long mib, uint8_t *buf) {
  double t0 = now();
  uint64_t sum = 0;
  for (long i = 0; i < mib; i++) {
    if (pread(t->fd, buf, 1 << 20, (off_t)i << 20) != 1 << 20) return fail(t->name);
    sum += block_sum(buf, 1 << 20);
  }
  t->seq = (double)mib / (now() - t0);
  t->seq_sum = sum;
  return 0;
}

static int rand_pass(struct target *t, long mib, long ops, uint8_t *buf) {
  lcg_state = 0x5eed;
  uint64_t blocks = (uint64_t)mib * 256;
  double t0 = now();
  uint64_t sum = 0;
  for (long i = 0; i < ops; i++) {
    off_t at = (off_t)(lcg() % blocks) * 4096;
    if (pread(t->fd, buf, 4096, at) != 4096) return fail(t->name);
    sum += block_sum(buf, 4096);
  }
  t->rnd = (double)ops / (now() - t0);
  t->rnd_sum = sum;
  return 0;
}

static int probe(int argc, char **argv) {
  long mib = strtol(argv[2], NULL, 10), ops = strtol(argv[3], NULL, 10), rounds = strtol(argv[4], NULL, 10);
  int n = argc - 5;
  if (mib < 1 || ops < 1 || rounds < 1 || n < 1) { errno = EINVAL; return fail("usage: nbd-probe read SEQ_MIB RAND_OPS ROUNDS NAME=DEV..."); }
  struct target *t = calloc((size_t)n, sizeof *t);
  for (int i = 0; i < n; i++) {
    char *eq = strchr(argv[5 + i], '=');
    if (!eq) { errno = EINVAL; return fail(argv[5 + i]); }
    *eq = 0;
    t[i].name = argv[5 + i];
    t[i].fd = open(eq + 1, O_RDONLY | O_DIRECT);
    if (t[i].fd < 0) return fail(eq + 1);
  }
  uint8_t *buf;
  if (posix_memalign((void **)&buf, 4096, 1 << 20) != 0) return fail("memory");
  for (long r = 0; r < rounds; r++) {
    for (int k = 0; k < n; k++) {
      struct target *x = &t[r % 2 ? n - 1 - k : k];
      if (seq_pass(x, mib, buf)) return 1;
    }
    for (int k = 0; k < n; k++) {
      struct target *x = &t[r % 2 ? n - 1 - k : k];
      if (rand_pass(x, mib, ops, buf)) return 1;
    }
    for (int i = 0; i < n; i++) {
      printf("VDBOOT-NBD target=%s round=%ld seq_read_mibs=%.2f rand_read_iops=%.1f seq_sum=%llx rand_sum=%llx\n", t[i].name, r, t[i].seq, t[i].rnd,
             (unsigned long long)t[i].seq_sum, (unsigned long long)t[i].rnd_sum);
    }
    fflush(stdout);
  }
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc == 6 && strcmp(argv[1], "attach") == 0) return attach(argv[2], atoi(argv[3]), argv[4], argv[5]);
  if (argc >= 6 && strcmp(argv[1], "read") == 0) return probe(argc, argv);
  fprintf(stderr, "usage: nbd-probe attach HOST PORT EXPORT /dev/nbdN | nbd-probe read SEQ_MIB RAND_OPS ROUNDS NAME=DEV...\n");
  return 2;
}
