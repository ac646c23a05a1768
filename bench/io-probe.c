/*
 * io-probe: the guest side of bench/vdisk-io.ts. Measures sequential and random throughput
 * on a file (or block device) with O_DIRECT, so neither the guest's page cache nor its
 * readahead hides the data path under it (raw partition, vdboot's direct path, loop over
 * ntfs-3g, qemu-nbd).
 *
 *   io-probe FILE SEQ_MIB RAND_OPS [ROUNDS [MIN_SECONDS [SEED]]]
 *
 * Phases, in this order, each made of passes timed with CLOCK_MONOTONIC, each write pass
 * ending with fsync (so data pushed into a loop device's backing file or qemu-nbd counts):
 *   seq write  SEQ_MIB blocks of 1 MiB from offset 0
 *   seq read   the same blocks
 *   rand write RAND_OPS blocks of 4 KiB at pseudo-random 4 KiB-aligned offsets in that range
 *   rand read  RAND_OPS blocks of 4 KiB at other pseudo-random offsets
 * Before each pass the guest's caches are dropped (sync; /proc/sys/vm/drop_caches, not
 * timed), so a loop device's buffered backing file starts cold too. A phase repeats its pass
 * until the timed passes add up to MIN_SECONDS (default 2), so a fast path is measured over
 * enough time and a slow one is not made to run for minutes. The four phases run ROUNDS
 * times (default 3) and each measure's best round is reported: on a machine shared with
 * other work, the fastest round is the one least disturbed by it.
 *
 * Every 4 KiB block written carries a stamp (its offset xor a per-phase key) in its first
 * 8 bytes; reads check the stamps, so a path that loses or misplaces writes is reported
 * rather than measured. Output: one line
 *   VDBOOT-IO seq_write_mibs=… seq_read_mibs=… rand_write_iops=… rand_read_iops=… seq_mib=… rand_ops=… rounds=… passes=… bad_blocks=…
 * or "VDBOOT-IO error=…" on failure (exit status 1).
 *
 * Built static with musl-gcc by the benchmark; needs nothing else in the guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* <linux/fs.h> is not on musl-gcc's include path */
#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t)
#endif

#define SEQ_BLOCK (1024 * 1024)
#define RAND_BLOCK 4096
#define SEQ_KEY 0x5eb5eb5eb5eb5eb5ULL
#define RAND_KEY 0x7a2d7a2d7a2d7a2dULL

static const char *target;

static void fail(const char *what) {
  printf("VDBOOT-IO error=%s on %s: %s\n", what, target, strerror(errno));
  fflush(stdout);
  exit(1);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xorshift64*: the same offsets in every run with the same seed */
static uint64_t rng_state;
static uint64_t rng(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545F4914F6CDD1DULL;
}

static void drop_caches(void) {
  sync();
  int knob = open("/proc/sys/vm/drop_caches", O_WRONLY);
  if (knob < 0) return; /* not fatal: /proc may be missing in odd guests */
  if (write(knob, "3\n", 2) < 0) {
    /* not fatal either */
  }
  close(knob);
}

static void stamp(unsigned char *buf, size_t len, uint64_t offset, uint64_t key) {
  for (size_t i = 0; i < len; i += RAND_BLOCK) {
    uint64_t v = (offset + i) ^ key;
    memcpy(buf + i, &v, sizeof v);
  }
}

/* counts the 4 KiB blocks whose stamp is neither the sequential nor the random writer's */
static unsigned long check(const unsigned char *buf, size_t len, uint64_t offset) {
  unsigned long bad = 0;
  for (size_t i = 0; i < len; i += RAND_BLOCK) {
    uint64_t v;
    memcpy(&v, buf + i, sizeof v);
    if (v != ((offset + i) ^ SEQ_KEY) && v != ((offset + i) ^ RAND_KEY)) bad++;
  }
  return bad;
}

enum phase { SEQ_WRITE, SEQ_READ, RAND_WRITE, RAND_READ };
static const char *const phase_name[] = {"sequential write", "sequential read", "random write", "random read"};

static int fd;
static unsigned char *buf;
static uint64_t seq_bytes, rand_blocks;
static long rand_ops;
static unsigned long bad, passes;

/* One pass of a phase; returns its duration in seconds (the cache drop before it not counted). */
static double pass(enum phase ph) {
  drop_caches();
  double t0 = now();
  switch (ph) {
  case SEQ_WRITE:
    for (uint64_t off = 0; off < seq_bytes; off += SEQ_BLOCK) {
      stamp(buf, SEQ_BLOCK, off, SEQ_KEY);
      if (pwrite(fd, buf, SEQ_BLOCK, (off_t)off) != SEQ_BLOCK) fail(phase_name[ph]);
    }
    if (fsync(fd) < 0) fail("fsync after the sequential write");
    break;
  case SEQ_READ:
    for (uint64_t off = 0; off < seq_bytes; off += SEQ_BLOCK) {
      if (pread(fd, buf, SEQ_BLOCK, (off_t)off) != SEQ_BLOCK) fail(phase_name[ph]);
      bad += check(buf, SEQ_BLOCK, off);
    }
    break;
  case RAND_WRITE:
    for (long i = 0; i < rand_ops; i++) {
      uint64_t off = (rng() % rand_blocks) * RAND_BLOCK;
      stamp(buf, RAND_BLOCK, off, RAND_KEY);
      if (pwrite(fd, buf, RAND_BLOCK, (off_t)off) != RAND_BLOCK) fail(phase_name[ph]);
    }
    if (fsync(fd) < 0) fail("fsync after the random write");
    break;
  case RAND_READ:
    for (long i = 0; i < rand_ops; i++) {
      uint64_t off = (rng() % rand_blocks) * RAND_BLOCK;
      if (pread(fd, buf, RAND_BLOCK, (off_t)off) != RAND_BLOCK) fail(phase_name[ph]);
      bad += check(buf, RAND_BLOCK, off);
    }
    break;
  }
  passes++;
  return now() - t0;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: io-probe FILE SEQ_MIB RAND_OPS [ROUNDS [MIN_SECONDS [SEED]]]\n");
    return 2;
  }
  target = argv[1];
  long seq_mib = strtol(argv[2], NULL, 10);
  rand_ops = strtol(argv[3], NULL, 10);
  long rounds = argc > 4 ? strtol(argv[4], NULL, 10) : 3;
  double min_seconds = argc > 5 ? strtod(argv[5], NULL) : 2.0;
  rng_state = argc > 6 ? strtoull(argv[6], NULL, 10) : 0x9e3779b97f4a7c15ULL;
  if (rng_state == 0) rng_state = 1;
  if (seq_mib <= 0 || rand_ops <= 0 || rounds <= 0 || !(min_seconds >= 0)) {
    fprintf(stderr, "io-probe: SEQ_MIB, RAND_OPS and ROUNDS must be positive, MIN_SECONDS not negative\n");
    return 2;
  }

  fd = open(target, O_RDWR | O_DIRECT);
  if (fd < 0) fail("open");
  struct stat st;
  if (fstat(fd, &st) < 0) fail("fstat");
  uint64_t size = (uint64_t)st.st_size;
  if (S_ISBLK(st.st_mode) && ioctl(fd, BLKGETSIZE64, &size) < 0) fail("BLKGETSIZE64");
  seq_bytes = (uint64_t)seq_mib * SEQ_BLOCK;
  if (seq_bytes > size) {
    printf("VDBOOT-IO error=%s holds %llu bytes, fewer than the %ld MiB asked for\n", target, (unsigned long long)size, seq_mib);
    return 1;
  }
  rand_blocks = seq_bytes / RAND_BLOCK;

  if (posix_memalign((void **)&buf, 4096, SEQ_BLOCK) != 0) fail("posix_memalign");
  for (size_t i = 0; i < SEQ_BLOCK; i++) buf[i] = (unsigned char)(rng() >> 56); /* not zeros: no path may shortcut them */

  /* best[ph]: the highest rate of any round, in units (MiB or operations) per second */
  double best[4] = {0, 0, 0, 0};
  for (long round = 0; round < rounds; round++) {
    for (int ph = SEQ_WRITE; ph <= RAND_READ; ph++) {
      double seconds = 0, units = 0;
      do {
        seconds += pass((enum phase)ph);
        units += ph <= SEQ_READ ? (double)seq_mib : (double)rand_ops;
      } while (seconds < min_seconds);
      if (units / seconds > best[ph]) best[ph] = units / seconds;
    }
  }
  close(fd);

  printf("VDBOOT-IO seq_write_mibs=%.2f seq_read_mibs=%.2f rand_write_iops=%.1f rand_read_iops=%.1f seq_mib=%ld rand_ops=%ld rounds=%ld passes=%lu bad_blocks=%lu\n",
         best[SEQ_WRITE], best[SEQ_READ], best[RAND_WRITE], best[RAND_READ], seq_mib, rand_ops, rounds, passes, bad);
  fflush(stdout);
  return bad ? 1 : 0;
}
