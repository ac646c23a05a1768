/*
 * io-probe: the guest side of bench/vdisk-io.ts. Measures sequential and random throughput
 * on files (or block devices) with O_DIRECT, so neither the guest's page cache nor its
 * readahead hides the data path under them (raw partition, vdboot's direct path, loop over
 * ntfs-3g, qemu-nbd).
 *
 *   io-probe SEQ_MIB RAND_OPS ROUNDS MIN_SECONDS NAME=FILE [NAME=FILE ...]
 *
 * Several targets are measured side by side in one run, so that they can be compared pair
 * by pair under the same load: the benchmark gives the root filesystem's scratch file (the
 * path under test) and the same scratch file on the plain ext4 partition of the same disk.
 * Phases, in this order, each made of passes timed with CLOCK_MONOTONIC, each write pass
 * ending with fsync (so data pushed into a loop device's backing file or qemu-nbd counts):
 *   seq write  SEQ_MIB blocks of 1 MiB from offset 0
 *   seq read   the same blocks
 *   rand write RAND_OPS blocks of 4 KiB at pseudo-random 4 KiB-aligned offsets in that range
 *   rand read  RAND_OPS blocks of 4 KiB at other pseudo-random offsets
 * Within a round every phase runs on all targets before the next phase starts, its passes
 * interleaved by time: each pass goes to the target that has run least so far in the phase
 * (ties to the first target in odd rounds, to the last in even ones), so targets of like
 * speed alternate pass by pass (A B A B …) and whatever else the machine is doing falls on
 * both sides alike. Every target sees the same pseudo-random offsets.
 * Before each pass the guest's caches are dropped (sync; /proc/sys/vm/drop_caches, not
 * timed), so a loop device's buffered backing file starts cold too. A phase repeats its pass
 * on a target until its timed passes add up to MIN_SECONDS, so a fast path is measured over enough time
 * and a slow one is not made to run for minutes.
 *
 * Every 4 KiB block written carries a stamp (its offset xor a per-phase key xor a
 * per-target key) in its first 8 bytes; reads check the stamps, so a path that loses or
 * misplaces writes, or that reads another target's blocks, is reported rather than measured.
 * Output: for each round and target
 *   VDBOOT-IO-ROUND target=NAME round=R seq_write_mibs=… seq_read_mibs=… rand_write_iops=… rand_read_iops=…
 * then for each target, with its best round per measure (the one least disturbed by other
 * work on the machine) and the blocks whose stamp was wrong:
 *   VDBOOT-IO target=NAME seq_write_mibs=… seq_read_mibs=… rand_write_iops=… rand_read_iops=… seq_mib=… rand_ops=… rounds=… passes=… bad_blocks=…
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

#define MAX_TARGETS 4
#define SEED 0x9e3779b97f4a7c15ULL

struct target {
  const char *name, *path;
  int fd;
  uint64_t key;       /* xored into every stamp of this target */
  uint64_t rng_state; /* each target draws the same offsets */
  double best[4];     /* highest rate of any round, in units (MiB or operations) per second */
  unsigned long bad, passes;
};

static struct target targets[MAX_TARGETS];
static int ntargets;
static const char *failing = "io-probe";

static void fail(const char *what) {
  printf("VDBOOT-IO error=%s on %s: %s\n", what, failing, strerror(errno));
  fflush(stdout);
  exit(1);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xorshift64*: the same offsets in every run */
static uint64_t rng(uint64_t *state) {
  *state ^= *state >> 12;
  *state ^= *state << 25;
  *state ^= *state >> 27;
  return *state * 0x2545F4914F6CDD1DULL;
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

/* counts the 4 KiB blocks whose stamp is neither this target's sequential nor random writer's */
static unsigned long check(const unsigned char *buf, size_t len, uint64_t offset, uint64_t target_key) {
  unsigned long bad = 0;
  for (size_t i = 0; i < len; i += RAND_BLOCK) {
    uint64_t v;
    memcpy(&v, buf + i, sizeof v);
    if (v != ((offset + i) ^ SEQ_KEY ^ target_key) && v != ((offset + i) ^ RAND_KEY ^ target_key)) bad++;
  }
  return bad;
}

enum phase { SEQ_WRITE, SEQ_READ, RAND_WRITE, RAND_READ };
static const char *const phase_name[] = {"sequential write", "sequential read", "random write", "random read"};

static unsigned char *buf;
static uint64_t seq_bytes, rand_blocks;
static long rand_ops;

/* One pass of a phase on one target; returns its duration in seconds (the cache drop before it not counted). */
static double pass(struct target *t, enum phase ph) {
  failing = t->path;
  drop_caches();
  double t0 = now();
  switch (ph) {
  case SEQ_WRITE:
    for (uint64_t off = 0; off < seq_bytes; off += SEQ_BLOCK) {
      stamp(buf, SEQ_BLOCK, off, SEQ_KEY ^ t->key);
      if (pwrite(t->fd, buf, SEQ_BLOCK, (off_t)off) != SEQ_BLOCK) fail(phase_name[ph]);
    }
    if (fsync(t->fd) < 0) fail("fsync after the sequential write");
    break;
  case SEQ_READ:
    for (uint64_t off = 0; off < seq_bytes; off += SEQ_BLOCK) {
      if (pread(t->fd, buf, SEQ_BLOCK, (off_t)off) != SEQ_BLOCK) fail(phase_name[ph]);
      t->bad += check(buf, SEQ_BLOCK, off, t->key);
    }
    break;
  case RAND_WRITE:
    for (long i = 0; i < rand_ops; i++) {
      uint64_t off = (rng(&t->rng_state) % rand_blocks) * RAND_BLOCK;
      stamp(buf, RAND_BLOCK, off, RAND_KEY ^ t->key);
      if (pwrite(t->fd, buf, RAND_BLOCK, (off_t)off) != RAND_BLOCK) fail(phase_name[ph]);
    }
    if (fsync(t->fd) < 0) fail("fsync after the random write");
    break;
  case RAND_READ:
    for (long i = 0; i < rand_ops; i++) {
      uint64_t off = (rng(&t->rng_state) % rand_blocks) * RAND_BLOCK;
      if (pread(t->fd, buf, RAND_BLOCK, (off_t)off) != RAND_BLOCK) fail(phase_name[ph]);
      t->bad += check(buf, RAND_BLOCK, off, t->key);
    }
    break;
  }
  t->passes++;
  return now() - t0;
}

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: io-probe SEQ_MIB RAND_OPS ROUNDS MIN_SECONDS NAME=FILE [NAME=FILE ...]\n");
    return 2;
  }
  long seq_mib = strtol(argv[1], NULL, 10);
  rand_ops = strtol(argv[2], NULL, 10);
  long rounds = strtol(argv[3], NULL, 10);
  double min_seconds = strtod(argv[4], NULL);
  if (seq_mib <= 0 || rand_ops <= 0 || rounds <= 0 || !(min_seconds >= 0)) {
    fprintf(stderr, "io-probe: SEQ_MIB, RAND_OPS and ROUNDS must be positive, MIN_SECONDS not negative\n");
    return 2;
  }
  if (argc - 5 > MAX_TARGETS) {
    fprintf(stderr, "io-probe: at most %d targets\n", MAX_TARGETS);
    return 2;
  }
  seq_bytes = (uint64_t)seq_mib * SEQ_BLOCK;
  rand_blocks = seq_bytes / RAND_BLOCK;

  for (int a = 5; a < argc; a++) {
    struct target *t = &targets[ntargets];
    char *eq = strchr(argv[a], '=');
    if (!eq || eq == argv[a] || !eq[1]) {
      fprintf(stderr, "io-probe: a target is NAME=FILE, not \"%s\"\n", argv[a]);
      return 2;
    }
    *eq = '\0';
    t->name = argv[a];
    t->path = failing = eq + 1;
    /* distinct per target and never zero, so a block of one target read through another fails its check */
    t->key = (uint64_t)(ntargets + 1) * 0xd6e8feb86659fd93ULL;
    t->rng_state = SEED;
    t->fd = open(t->path, O_RDWR | O_DIRECT);
    if (t->fd < 0) fail("open");
    struct stat st;
    if (fstat(t->fd, &st) < 0) fail("fstat");
    uint64_t size = (uint64_t)st.st_size;
    if (S_ISBLK(st.st_mode) && ioctl(t->fd, BLKGETSIZE64, &size) < 0) fail("BLKGETSIZE64");
    if (seq_bytes > size) {
      printf("VDBOOT-IO error=%s holds %llu bytes, fewer than the %ld MiB asked for\n", t->path, (unsigned long long)size, seq_mib);
      return 1;
    }
    ntargets++;
  }

  if (posix_memalign((void **)&buf, 4096, SEQ_BLOCK) != 0) fail("posix_memalign");
  uint64_t fill = SEED ^ 0xffULL;
  for (size_t i = 0; i < SEQ_BLOCK; i++) buf[i] = (unsigned char)(rng(&fill) >> 56); /* not zeros: no path may shortcut them */

  for (long round = 0; round < rounds; round++) {
    double rate[MAX_TARGETS][4];
    for (int ph = SEQ_WRITE; ph <= RAND_READ; ph++) {
      /* Passes interleaved by time: the next pass goes to the target that has run the least
       * so far in this phase (ties to A in even rounds, to B in odd ones), until every target
       * has run MIN_SECONDS and at least one pass. Targets of like speed thus alternate pass
       * by pass over the whole phase; a much slower one still runs only as long as it must. */
      double seconds[MAX_TARGETS] = {0}, units[MAX_TARGETS] = {0};
      unsigned long npass[MAX_TARGETS] = {0};
      for (;;) {
        int next = -1;
        for (int k = 0; k < ntargets; k++) {
          int i = round % 2 ? ntargets - 1 - k : k;
          if (npass[i] > 0 && seconds[i] >= min_seconds) continue; /* done */
          if (next < 0 || seconds[i] < seconds[next]) next = i;
        }
        if (next < 0) break;
        seconds[next] += pass(&targets[next], (enum phase)ph);
        units[next] += ph <= SEQ_READ ? (double)seq_mib : (double)rand_ops;
        npass[next]++;
      }
      for (int k = 0; k < ntargets; k++) {
        rate[k][ph] = units[k] / seconds[k];
        if (rate[k][ph] > targets[k].best[ph]) targets[k].best[ph] = rate[k][ph];
      }
    }
    for (int k = 0; k < ntargets; k++) {
      printf("VDBOOT-IO-ROUND target=%s round=%ld seq_write_mibs=%.2f seq_read_mibs=%.2f rand_write_iops=%.1f rand_read_iops=%.1f\n", targets[k].name,
             round + 1, rate[k][SEQ_WRITE], rate[k][SEQ_READ], rate[k][RAND_WRITE], rate[k][RAND_READ]);
    }
    fflush(stdout);
  }

  unsigned long bad = 0;
  for (int k = 0; k < ntargets; k++) {
    struct target *t = &targets[k];
    close(t->fd);
    printf("VDBOOT-IO target=%s seq_write_mibs=%.2f seq_read_mibs=%.2f rand_write_iops=%.1f rand_read_iops=%.1f seq_mib=%ld rand_ops=%ld rounds=%ld passes=%lu bad_blocks=%lu\n",
           t->name, t->best[SEQ_WRITE], t->best[SEQ_READ], t->best[RAND_WRITE], t->best[RAND_READ], seq_mib, rand_ops, rounds, t->passes, t->bad);
    bad += t->bad;
  }
  fflush(stdout);
  return bad ? 1 : 0;
}
