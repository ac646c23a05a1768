/*
 * dm-linear: the guest side of the device-mapper control in bench/vdisk-io.ts. Makes
 * /dev/mapper/NAME, one dm-linear target over the whole of DEVICE — the least any
 * device-mapper path can be — so the benchmark can measure what one device-mapper remap
 * costs on this machine, next to vdboot's direct path and the plain partition.
 *
 *   dm-linear NAME DEVICE
 *
 * DM_DEV_CREATE, DM_TABLE_LOAD and DM_DEV_SUSPEND (resume) on /dev/mapper/control, with the
 * structures of <linux/dm-ioctl.h> written out here (musl-gcc has no kernel headers), then
 * the device node. Built static with musl-gcc by the benchmark.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t)
#endif

struct dm_ioctl {
  uint32_t version[3];
  uint32_t data_size;
  uint32_t data_start;
  uint32_t target_count;
  int32_t open_count;
  uint32_t flags;
  uint32_t event_nr;
  uint32_t padding;
  uint64_t dev;
  char name[128];
  char uuid[129];
  char data[7];
};

struct dm_target_spec {
  uint64_t sector_start;
  uint64_t length;
  int32_t status;
  uint32_t next;
  char target_type[16];
};

#define DM_CMD(nr) _IOWR(0xfd, nr, struct dm_ioctl)
#define DM_DEV_CREATE DM_CMD(3)
#define DM_DEV_SUSPEND DM_CMD(6)
#define DM_TABLE_LOAD DM_CMD(9)

union dm_buffer {
  struct dm_ioctl io;
  char raw[4096];
};

/* A request for device NAME with no targets: version 4, its data right after the struct. */
static void request(union dm_buffer *b, const char *name) {
  memset(b, 0, sizeof *b);
  b->io.version[0] = 4;
  b->io.data_size = sizeof b->io;
  b->io.data_start = sizeof b->io;
  snprintf(b->io.name, sizeof b->io.name, "%s", name);
}

static int fail(const char *what) {
  printf("VDBOOT-IO error=dm-linear:%s:%s\n", what, strerror(errno));
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: dm-linear NAME DEVICE\n");
    return 2;
  }
  _Static_assert(sizeof(struct dm_ioctl) == 312, "struct dm_ioctl is 312 bytes");
  _Static_assert(sizeof(struct dm_target_spec) == 40, "struct dm_target_spec is 40 bytes");
  int dev = open(argv[2], O_RDONLY | O_CLOEXEC);
  if (dev < 0) return fail("open device");
  uint64_t bytes = 0;
  if (ioctl(dev, BLKGETSIZE64, &bytes) != 0) return fail("BLKGETSIZE64");
  close(dev);
  int ctl = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) return fail("open /dev/mapper/control");

  union dm_buffer b;
  request(&b, argv[1]);
  if (ioctl(ctl, DM_DEV_CREATE, &b) != 0) return fail("DM_DEV_CREATE");
  uint64_t d = b.io.dev;
  unsigned major = (unsigned)((d >> 8) & 0xfff), minor = (unsigned)((d & 0xff) | ((d >> 12) & 0xfff00));

  request(&b, argv[1]);
  b.io.target_count = 1;
  struct dm_target_spec *t = (struct dm_target_spec *)(b.raw + sizeof b.io);
  t->sector_start = 0;
  t->length = bytes / 512;
  snprintf(t->target_type, sizeof t->target_type, "linear");
  char *params = (char *)(t + 1);
  int n = snprintf(params, 256, "%s 0", argv[2]);
  uint32_t spec = (uint32_t)((sizeof *t + (size_t)n + 1 + 7) & ~(size_t)7);
  t->next = spec;
  b.io.data_size = (uint32_t)(sizeof b.io + spec);
  if (ioctl(ctl, DM_TABLE_LOAD, &b) != 0) return fail("DM_TABLE_LOAD");

  request(&b, argv[1]);
  if (ioctl(ctl, DM_DEV_SUSPEND, &b) != 0) return fail("DM_DEV_SUSPEND (resume)");
  close(ctl);

  char node[160];
  snprintf(node, sizeof node, "/dev/mapper/%s", argv[1]);
  unlink(node);
  if (mknod(node, S_IFBLK | 0600, makedev(major, minor)) != 0) return fail("mknod");
  printf("dm-linear: %s is %u:%u, linear over %s (%llu sectors)\n", node, major, minor, argv[2], (unsigned long long)(bytes / 512));
  return 0;
}
