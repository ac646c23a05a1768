/**
 * FIEMAP (hosts the kernel mounts): struct fiemap against linux/fiemap.h compiled with
 * gcc, the conversion of its extents into the HostFile extents the planner composes, on
 * packed replies and on the real kernel's reply for a file on this machine's filesystem
 * (filefrag, another FIEMAP client, is the oracle for where the extents lie).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, fsyncSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  BTRFS_BLOCK_GROUP,
  BTRFS_CHUNK,
  BTRFS_CHUNK_ITEM_KEY,
  BTRFS_CHUNK_TREE_OBJECTID,
  BTRFS_FIRST_CHUNK_TREE_OBJECTID,
  BTRFS_FS_INFO_SIZE,
  BTRFS_IOC_FS_INFO,
  BTRFS_IOC_TREE_SEARCH,
  BTRFS_SEARCH_ARGS_SIZE,
  BTRFS_SEARCH_HEADER_SIZE,
  BTRFS_SEARCH_KEY_SIZE,
  btrfsToDevice,
  FIEMAP_EXTENT,
  FIEMAP_EXTENT_SIZE,
  FIEMAP_FLAG,
  FIEMAP_HEADER_SIZE,
  FS_IOC_FIEMAP,
  FS_IOC_FSGETXATTR,
  FS_IOC_GETFLAGS,
  FS_NOCOW_FL,
  FS_XFLAG_REALTIME,
  FSXATTR_SIZE,
  fiemapToFileExtents,
  packBtrfsChunkSearch,
  packFiemapRequest,
  readFiemap,
  unpackBtrfsChunkSearch,
  unpackFiemap,
  type BtrfsChunk,
  type FiemapExtent,
} from '../../src/boot/fiemap.ts';
import type { Sys } from '../../src/sys/sys.ts';

const dir = mkdtempSync(join(tmpdir(), 'vdboot-fiemap-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function compile(name: string, source: string): string {
  const src = join(dir, `${name}.c`);
  writeFileSync(src, source);
  const bin = join(dir, name);
  execFileSync('gcc', ['-O1', '-o', bin, src]);
  return bin;
}

function headerFacts(): Record<string, number> {
  const bin = compile('facts', `#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/fiemap.h>
#define P(n, v) printf("%s %lu\\n", n, (unsigned long)(v))
int main(void) {
  P("fiemap", sizeof(struct fiemap)); P("extent", sizeof(struct fiemap_extent)); P("fsxattr", sizeof(struct fsxattr));
  P("fm_start", offsetof(struct fiemap, fm_start)); P("fm_length", offsetof(struct fiemap, fm_length));
  P("fm_flags", offsetof(struct fiemap, fm_flags)); P("fm_mapped_extents", offsetof(struct fiemap, fm_mapped_extents));
  P("fm_extent_count", offsetof(struct fiemap, fm_extent_count)); P("fm_extents", offsetof(struct fiemap, fm_extents));
  P("fe_logical", offsetof(struct fiemap_extent, fe_logical)); P("fe_physical", offsetof(struct fiemap_extent, fe_physical));
  P("fe_length", offsetof(struct fiemap_extent, fe_length)); P("fe_flags", offsetof(struct fiemap_extent, fe_flags));
  P("fsx_xflags", offsetof(struct fsxattr, fsx_xflags));
  P("FS_IOC_FIEMAP", FS_IOC_FIEMAP); P("FS_IOC_FSGETXATTR", FS_IOC_FSGETXATTR); P("FS_XFLAG_REALTIME", FS_XFLAG_REALTIME);
  P("FIEMAP_FLAG_SYNC", FIEMAP_FLAG_SYNC); P("FIEMAP_FLAG_XATTR", FIEMAP_FLAG_XATTR);
  P("LAST", FIEMAP_EXTENT_LAST); P("UNKNOWN", FIEMAP_EXTENT_UNKNOWN); P("DELALLOC", FIEMAP_EXTENT_DELALLOC);
  P("ENCODED", FIEMAP_EXTENT_ENCODED); P("DATA_ENCRYPTED", FIEMAP_EXTENT_DATA_ENCRYPTED); P("NOT_ALIGNED", FIEMAP_EXTENT_NOT_ALIGNED);
  P("DATA_INLINE", FIEMAP_EXTENT_DATA_INLINE); P("DATA_TAIL", FIEMAP_EXTENT_DATA_TAIL); P("UNWRITTEN", FIEMAP_EXTENT_UNWRITTEN);
  P("MERGED", FIEMAP_EXTENT_MERGED); P("SHARED", FIEMAP_EXTENT_SHARED);
  return 0;
}
`);
  const out = execFileSync(bin, { encoding: 'utf8' });
  return Object.fromEntries(out.trim().split('\n').map((l) => { const [k, v] = l.split(' '); return [k!, Number(v)]; }));
}

/** A reply as the kernel writes it, at the header's offsets. */
function packReply(facts: Record<string, number>, extents: FiemapExtent[], room = extents.length): ArrayBuffer {
  const buf = new ArrayBuffer(facts.fiemap! + room * facts.extent!);
  const v = new DataView(buf);
  v.setUint32(facts.fm_mapped_extents!, extents.length, true);
  v.setUint32(facts.fm_extent_count!, room, true);
  extents.forEach((e, i) => {
    const o = facts.fm_extents! + i * facts.extent!;
    v.setBigUint64(o + facts.fe_logical!, BigInt(e.logical), true);
    v.setBigUint64(o + facts.fe_physical!, BigInt(e.physical), true);
    v.setBigUint64(o + facts.fe_length!, BigInt(e.length), true);
    v.setUint32(o + facts.fe_flags!, e.flags, true);
  });
  return buf;
}

const facts = headerFacts();
const KiB = 1024;
const MiB = 1024 * KiB;

describe('struct fiemap', () => {
  it('has the sizes, offsets, request numbers and flags of linux/fiemap.h', () => {
    expect(FIEMAP_HEADER_SIZE).toBe(facts.fiemap);
    expect(FIEMAP_HEADER_SIZE).toBe(facts.fm_extents);
    expect(FIEMAP_EXTENT_SIZE).toBe(facts.extent);
    expect(FSXATTR_SIZE).toBe(facts.fsxattr);
    expect(facts.fsx_xflags).toBe(0);
    expect(FS_IOC_FIEMAP).toBe(facts.FS_IOC_FIEMAP);
    expect(FS_IOC_FSGETXATTR).toBe(facts.FS_IOC_FSGETXATTR);
    expect(FS_XFLAG_REALTIME).toBe(facts.FS_XFLAG_REALTIME);
    expect(FIEMAP_FLAG).toEqual({ SYNC: facts.FIEMAP_FLAG_SYNC, XATTR: facts.FIEMAP_FLAG_XATTR });
    for (const [name, value] of Object.entries(FIEMAP_EXTENT)) expect([name, value]).toEqual([name, facts[name]]);
  });

  it('packs a request at the header\'s offsets and reads extents back from them', () => {
    const buf = packFiemapRequest(4096, 8 * MiB, FIEMAP_FLAG.SYNC, 3);
    expect(buf.byteLength).toBe(facts.fiemap! + 3 * facts.extent!);
    const v = new DataView(buf);
    expect(Number(v.getBigUint64(facts.fm_start!, true))).toBe(4096);
    expect(Number(v.getBigUint64(facts.fm_length!, true))).toBe(8 * MiB);
    expect(v.getUint32(facts.fm_flags!, true)).toBe(FIEMAP_FLAG.SYNC);
    expect(v.getUint32(facts.fm_extent_count!, true)).toBe(3);
    expect(v.getUint32(facts.fm_mapped_extents!, true)).toBe(0);
    const extents = [
      { logical: 0, physical: 2 ** 40, length: MiB, flags: 0 },
      { logical: MiB, physical: 7 * MiB, length: 4096, flags: FIEMAP_EXTENT.UNWRITTEN | FIEMAP_EXTENT.LAST },
    ];
    expect(unpackFiemap(packReply(facts, extents, 3)).extents).toEqual(extents);
  });

  it('refuses a reply claiming more extents than it has room for', () => {
    const buf = packReply(facts, [{ logical: 0, physical: 0, length: 4096, flags: 0 }]);
    new DataView(buf).setUint32(facts.fm_mapped_extents!, 5, true);
    expect(() => unpackFiemap(buf)).toThrow(/reports 5 extents for room of 1/);
  });
});

describe('FIEMAP extents as host file extents', () => {
  const dev = 64 * MiB;

  it('data, UNWRITTEN as uninitialized, gaps and the tail as holes; blocks past the end of the file cut off', () => {
    const r = fiemapToFileExtents([
      { logical: 0, physical: MiB, length: 64 * KiB, flags: FIEMAP_EXTENT.MERGED },
      { logical: 64 * KiB, physical: MiB + 64 * KiB, length: 64 * KiB, flags: 0 }, // contiguous on both sides: merged
      { logical: 256 * KiB, physical: 9 * MiB, length: 128 * KiB, flags: FIEMAP_EXTENT.UNWRITTEN },
      { logical: 384 * KiB, physical: 5 * MiB, length: 8 * KiB, flags: FIEMAP_EXTENT.LAST },
    ], 390 * KiB, dev);
    expect(r.problems).toEqual([]);
    expect(r.extents).toEqual([
      { kind: 'data', fileOffset: 0, length: 128 * KiB, deviceOffset: MiB },
      { kind: 'hole', fileOffset: 128 * KiB, length: 128 * KiB },
      { kind: 'uninitialized', fileOffset: 256 * KiB, length: 128 * KiB },
      { kind: 'data', fileOffset: 384 * KiB, length: 6 * KiB, deviceOffset: 5 * MiB },
    ]);
    // a sparse tail
    expect(fiemapToFileExtents([{ logical: 0, physical: MiB, length: 4096, flags: FIEMAP_EXTENT.LAST }], 3 * 4096, dev).extents.at(-1))
      .toEqual({ kind: 'hole', fileOffset: 4096, length: 8192 });
  });

  it('names every extent that cannot be mapped in place: shared (reflinked), encoded, inline, not known yet, outside the partition', () => {
    const r = fiemapToFileExtents([
      { logical: 0, physical: MiB, length: 4096, flags: FIEMAP_EXTENT.SHARED },
      { logical: 4096, physical: 2 * MiB, length: 4096, flags: FIEMAP_EXTENT.SHARED },
      { logical: 8192, physical: 3 * MiB, length: 4096, flags: FIEMAP_EXTENT.ENCODED },
      { logical: 12288, physical: 0, length: 4096, flags: FIEMAP_EXTENT.UNKNOWN | FIEMAP_EXTENT.DELALLOC },
      { logical: 16384, physical: 0, length: 100, flags: FIEMAP_EXTENT.DATA_INLINE | FIEMAP_EXTENT.NOT_ALIGNED | FIEMAP_EXTENT.LAST },
    ], 16484, dev);
    expect(r.problems).toEqual([
      '2 extents: it is shared with another file (reflinked or in a snapshot): a write in place would change that file too',
      '1 extent: it is stored encoded (compressed)',
      '1 extent: its place on the disk is not known yet',
      '1 extent: it is not allocated on the disk yet (delayed allocation)',
      '1 extent: it is not aligned to the disk\'s blocks',
      '1 extent: it is stored inside the filesystem\'s metadata (inline)',
    ]);
    expect(fiemapToFileExtents([{ logical: 0, physical: dev - 4096, length: 8192, flags: 0 }], 8192, dev).problems)
      .toEqual([`1 extent: the filesystem places it at byte ${dev - 4096}, outside the ${dev}-byte partition`]);
    expect(fiemapToFileExtents([{ logical: 0, physical: MiB + 100, length: 4096, flags: 0 }], 4096, dev).problems)
      .toEqual(['1 extent: it does not start on a 512-byte sector']);
    expect(fiemapToFileExtents([{ logical: 0, physical: MiB, length: 8192, flags: 0 }, { logical: 4096, physical: 5 * MiB, length: 4096, flags: 0 }], 8192, dev).problems)
      .toEqual(['1 extent: the filesystem reports overlapping extents (at byte 4096)']);
  });

  it('reads the extents in batches: SYNC on the first call only, each next call from the end of the last extent', () => {
    const all: FiemapExtent[] = Array.from({ length: 1200 }, (_, i) => ({ logical: i * 8192, physical: (2000 - i) * 8192, length: 4096, flags: i === 1199 ? FIEMAP_EXTENT.LAST : 0 }));
    const calls: { start: number; flags: number }[] = [];
    const sys = {
      ioctl(fd: number, request: number, arg: ArrayBuffer): number {
        expect([fd, request]).toEqual([7, FS_IOC_FIEMAP]);
        const v = new DataView(arg);
        const start = Number(v.getBigUint64(facts.fm_start!, true));
        calls.push({ start, flags: v.getUint32(facts.fm_flags!, true) });
        const room = v.getUint32(facts.fm_extent_count!, true);
        const reply = all.filter((e) => e.logical + e.length > start).slice(0, room);
        new Uint8Array(arg).set(new Uint8Array(packReply(facts, reply, room)));
        return 0;
      },
    } as unknown as Sys;
    const got = readFiemap(sys, 7, 1200 * 8192);
    expect(got).toEqual(all);
    expect(calls).toEqual([
      { start: 0, flags: FIEMAP_FLAG.SYNC },
      { start: 511 * 8192 + 4096, flags: 0 },
      { start: 1023 * 8192 + 4096, flags: 0 },
    ]);
    expect(() => readFiemap(sys, 7, 1200 * 8192, 1000)).toThrow(/more than 1000 pieces/);
  });
});

describe('FIEMAP on this machine\'s filesystem', () => {
  // The kernel fills a request packed by vdboot (a tiny C program only makes the ioctl);
  // filefrag is the oracle for where the extents lie.
  const fiemapCall = compile('fiemap-call', `#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/fiemap.h>
int main(int argc, char **argv) {
  static char buf[1 << 20];
  size_t n = fread(buf, 1, sizeof buf, stdin);
  int fd = open(argv[1], O_RDONLY);
  if (fd < 0 || ioctl(fd, FS_IOC_FIEMAP, buf) != 0) { perror("fiemap"); return 2; }
  fwrite(buf, 1, n, stdout);
  return 0;
}
`);
  const supported = (() => {
    const probe = join(dir, 'probe');
    writeFileSync(probe, 'x');
    const r = spawnSync(fiemapCall, [probe], { input: Buffer.from(packFiemapRequest(0, 4096, FIEMAP_FLAG.SYNC, 1)) });
    return r.status === 0;
  })();

  it.skipIf(!supported)('data, a preallocated (unwritten) range and holes come back as data, uninitialized and hole at filefrag\'s places', () => {
    const file = join(dir, 'sparse.img');
    const fd = openSync(file, 'w');
    writeSync(fd, Buffer.alloc(MiB, 0xa5), 0, MiB, 0);
    writeSync(fd, Buffer.alloc(256 * KiB, 0x5a), 0, 256 * KiB, 1536 * KiB);
    writeSync(fd, Buffer.alloc(256 * KiB, 0x3c), 0, 256 * KiB, 2 * MiB);
    fsyncSync(fd);
    closeSync(fd);
    // 1 MiB..1.25 MiB preallocated (unwritten); 1.25..1.5 and 1.75..2 MiB stay holes
    execFileSync('fallocate', ['-n', '-o', String(MiB), '-l', String(256 * KiB), file]);
    const size = 2 * MiB + 256 * KiB;

    const request = packFiemapRequest(0, size, FIEMAP_FLAG.SYNC, 64);
    const reply = execFileSync(fiemapCall, [file], { input: Buffer.from(request) });
    const raw = unpackFiemap(reply.buffer.slice(reply.byteOffset, reply.byteOffset + reply.byteLength)).extents;
    const { extents, problems } = fiemapToFileExtents(raw, size, 2 ** 50);
    expect(problems).toEqual([]);
    // ext4 may place one written range in several runs: compare what each kind covers
    const cover = (kind: string) => {
      const out: [number, number][] = [];
      for (const e of extents.filter((x) => x.kind === kind)) {
        const last = out[out.length - 1];
        if (last && last[1] === e.fileOffset) last[1] += e.length;
        else out.push([e.fileOffset, e.fileOffset + e.length]);
      }
      return out;
    };
    expect(cover('data')).toEqual([[0, MiB], [1536 * KiB, 1792 * KiB], [2 * MiB, size]]);
    expect(cover('uninitialized')).toEqual([[MiB, 1280 * KiB]]);
    expect(cover('hole')).toEqual([[1280 * KiB, 1536 * KiB], [1792 * KiB, 2 * MiB]]);

    // filefrag: "ext: logical..: physical..: length: expected: flags:" in 4096-byte blocks
    const ff = execFileSync('filefrag', ['-v', '-b4096', file], { encoding: 'utf8' });
    const oracle = [...ff.matchAll(/^\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+)\.\.\s*(\d+):\s+(\d+):(.*)$/gm)]
      .map((m) => ({ logical: Number(m[1]) * 4096, physical: Number(m[3]) * 4096, length: Number(m[5]) * 4096, unwritten: /unwritten/.test(m[6]!) }));
    expect(oracle.length).toBeGreaterThan(0);
    for (const o of oracle) {
      const e = extents.find((x) => x.fileOffset <= o.logical && o.logical < x.fileOffset + x.length)!;
      expect(e.kind).toBe(o.unwritten ? 'uninitialized' : 'data');
      if (e.kind === 'data') expect(e.deviceOffset + (o.logical - e.fileOffset)).toBe(o.physical);
    }
  });
});

describe('btrfs: logical addresses through the chunk tree', () => {
  const bt = (() => {
    const bin = compile('btrfs-facts', `#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/btrfs.h>
#include <linux/btrfs_tree.h>
#define P(n, v) printf("%s %lu\\n", n, (unsigned long)(v))
int main(void) {
  P("key", sizeof(struct btrfs_ioctl_search_key)); P("args", sizeof(struct btrfs_ioctl_search_args));
  P("header", sizeof(struct btrfs_ioctl_search_header)); P("fsinfo", sizeof(struct btrfs_ioctl_fs_info_args));
  P("tree_id", offsetof(struct btrfs_ioctl_search_key, tree_id)); P("min_objectid", offsetof(struct btrfs_ioctl_search_key, min_objectid));
  P("max_objectid", offsetof(struct btrfs_ioctl_search_key, max_objectid)); P("min_offset", offsetof(struct btrfs_ioctl_search_key, min_offset));
  P("max_offset", offsetof(struct btrfs_ioctl_search_key, max_offset)); P("min_transid", offsetof(struct btrfs_ioctl_search_key, min_transid));
  P("max_transid", offsetof(struct btrfs_ioctl_search_key, max_transid)); P("min_type", offsetof(struct btrfs_ioctl_search_key, min_type));
  P("max_type", offsetof(struct btrfs_ioctl_search_key, max_type)); P("nr_items", offsetof(struct btrfs_ioctl_search_key, nr_items));
  P("h_objectid", offsetof(struct btrfs_ioctl_search_header, objectid)); P("h_offset", offsetof(struct btrfs_ioctl_search_header, offset));
  P("h_type", offsetof(struct btrfs_ioctl_search_header, type)); P("h_len", offsetof(struct btrfs_ioctl_search_header, len));
  P("num_devices", offsetof(struct btrfs_ioctl_fs_info_args, num_devices));
  P("c_length", offsetof(struct btrfs_chunk, length)); P("c_type", offsetof(struct btrfs_chunk, type));
  P("c_num_stripes", offsetof(struct btrfs_chunk, num_stripes)); P("c_stripe", offsetof(struct btrfs_chunk, stripe));
  P("stripe", sizeof(struct btrfs_stripe)); P("s_devid", offsetof(struct btrfs_stripe, devid)); P("s_offset", offsetof(struct btrfs_stripe, offset));
  P("BTRFS_IOC_TREE_SEARCH", BTRFS_IOC_TREE_SEARCH); P("BTRFS_IOC_FS_INFO", BTRFS_IOC_FS_INFO);
  P("FS_IOC_GETFLAGS", FS_IOC_GETFLAGS); P("FS_NOCOW_FL", FS_NOCOW_FL);
  P("CHUNK_TREE", BTRFS_CHUNK_TREE_OBJECTID); P("FIRST_CHUNK_TREE", BTRFS_FIRST_CHUNK_TREE_OBJECTID); P("CHUNK_ITEM", BTRFS_CHUNK_ITEM_KEY);
  P("DATA", BTRFS_BLOCK_GROUP_DATA); P("RAID0", BTRFS_BLOCK_GROUP_RAID0); P("RAID1", BTRFS_BLOCK_GROUP_RAID1); P("DUP", BTRFS_BLOCK_GROUP_DUP);
  P("RAID10", BTRFS_BLOCK_GROUP_RAID10); P("RAID5", BTRFS_BLOCK_GROUP_RAID5); P("RAID6", BTRFS_BLOCK_GROUP_RAID6);
  P("RAID1C3", BTRFS_BLOCK_GROUP_RAID1C3); P("RAID1C4", BTRFS_BLOCK_GROUP_RAID1C4);
  return 0;
}
`);
    const out = execFileSync(bin, { encoding: 'utf8' });
    return Object.fromEntries(out.trim().split('\n').map((l) => { const [k, v] = l.split(' '); return [k!, Number(v)]; }));
  })();

  /** A TREE_SEARCH reply as the kernel writes it: the key with nr_items, then header + item per chunk. */
  function packSearchReply(chunks: BtrfsChunk[]): ArrayBuffer {
    const buf = new ArrayBuffer(bt.args!);
    const v = new DataView(buf);
    v.setUint32(bt.nr_items!, chunks.length, true);
    let o = bt.key!;
    for (const c of chunks) {
      const len = bt.c_stripe! + c.stripes.length * bt.stripe!;
      v.setBigUint64(o + bt.h_objectid!, 256n, true);
      v.setBigUint64(o + bt.h_offset!, BigInt(c.logical), true);
      v.setUint32(o + bt.h_type!, bt.CHUNK_ITEM!, true);
      v.setUint32(o + bt.h_len!, len, true);
      const d = o + bt.header!;
      v.setBigUint64(d + bt.c_length!, BigInt(c.length), true);
      v.setBigUint64(d + bt.c_type!, BigInt(c.type), true);
      v.setUint16(d + bt.c_num_stripes!, c.stripes.length, true);
      c.stripes.forEach((s, k) => {
        v.setBigUint64(d + bt.c_stripe! + k * bt.stripe! + bt.s_devid!, BigInt(s.devid), true);
        v.setBigUint64(d + bt.c_stripe! + k * bt.stripe! + bt.s_offset!, BigInt(s.offset), true);
      });
      o = d + len;
    }
    return buf;
  }

  it('has the sizes, offsets, request numbers and constants of linux/btrfs.h and btrfs_tree.h', () => {
    expect([BTRFS_SEARCH_KEY_SIZE, BTRFS_SEARCH_ARGS_SIZE, BTRFS_SEARCH_HEADER_SIZE, BTRFS_FS_INFO_SIZE]).toEqual([bt.key, bt.args, bt.header, bt.fsinfo]);
    expect([bt.tree_id, bt.min_objectid, bt.max_objectid, bt.min_offset, bt.max_offset, bt.min_transid, bt.max_transid, bt.min_type, bt.max_type, bt.nr_items]).toEqual([0, 8, 16, 24, 32, 40, 48, 56, 60, 64]);
    expect([bt.h_offset, bt.h_type, bt.h_len, bt.num_devices]).toEqual([16, 24, 28, 8]);
    expect(BTRFS_CHUNK).toEqual({ length: bt.c_length, type: bt.c_type, numStripes: bt.c_num_stripes, stripes: bt.c_stripe, stripeSize: bt.stripe, stripeDevid: bt.s_devid, stripeOffset: bt.s_offset });
    expect([BTRFS_IOC_TREE_SEARCH, BTRFS_IOC_FS_INFO, FS_IOC_GETFLAGS, FS_NOCOW_FL]).toEqual([bt.BTRFS_IOC_TREE_SEARCH, bt.BTRFS_IOC_FS_INFO, bt.FS_IOC_GETFLAGS, bt.FS_NOCOW_FL]);
    expect([BTRFS_CHUNK_TREE_OBJECTID, BTRFS_FIRST_CHUNK_TREE_OBJECTID, BTRFS_CHUNK_ITEM_KEY]).toEqual([bt.CHUNK_TREE, bt.FIRST_CHUNK_TREE, bt.CHUNK_ITEM]);
    for (const [name, value] of Object.entries(BTRFS_BLOCK_GROUP)) expect([name, value]).toEqual([name, bt[name]]);
    const req = new DataView(packBtrfsChunkSearch(12345));
    expect(Number(req.getBigUint64(bt.tree_id!, true))).toBe(bt.CHUNK_TREE);
    expect(Number(req.getBigUint64(bt.min_offset!, true))).toBe(12345);
    expect([req.getUint32(bt.min_type!, true), req.getUint32(bt.max_type!, true)]).toEqual([bt.CHUNK_ITEM, bt.CHUNK_ITEM]);
  });

  it('moves each extent by its chunk\'s stripe, splitting where it crosses chunks; DUP, RAID and unmapped addresses are named', () => {
    const chunks: BtrfsChunk[] = [
      { logical: 13 * MiB, length: 8 * MiB, type: BTRFS_BLOCK_GROUP.DATA, stripes: [{ devid: 1, offset: 13 * MiB }] },
      { logical: 61 * MiB, length: 8 * MiB, type: BTRFS_BLOCK_GROUP.DATA, stripes: [{ devid: 1, offset: MiB }] },
      { logical: 69 * MiB, length: 8 * MiB, type: BTRFS_BLOCK_GROUP.DATA, stripes: [{ devid: 1, offset: 101 * MiB }] },
      { logical: 200 * MiB, length: 8 * MiB, type: BTRFS_BLOCK_GROUP.DATA | BTRFS_BLOCK_GROUP.DUP, stripes: [{ devid: 1, offset: 150 * MiB }, { devid: 1, offset: 158 * MiB }] },
    ];
    const got = unpackBtrfsChunkSearch(packSearchReply(chunks));
    expect(got).toEqual(chunks);
    // a 4 MiB extent crossing from the second chunk into the third
    const r = btrfsToDevice([{ logical: 0, physical: 67 * MiB, length: 4 * MiB, flags: FIEMAP_EXTENT.LAST }], got);
    expect(r.problems).toEqual([]);
    expect(r.extents).toEqual([
      { logical: 0, physical: 7 * MiB, length: 2 * MiB, flags: 0 },
      { logical: 2 * MiB, physical: 101 * MiB, length: 2 * MiB, flags: 0 },
    ]);
    expect(fiemapToFileExtents(r.extents, 4 * MiB, 128 * MiB).extents).toEqual([
      { kind: 'data', fileOffset: 0, length: 2 * MiB, deviceOffset: 7 * MiB },
      { kind: 'data', fileOffset: 2 * MiB, length: 2 * MiB, deviceOffset: 101 * MiB },
    ]);
    expect(btrfsToDevice([{ logical: 0, physical: 201 * MiB, length: 4096, flags: 0 }], got).problems)
      .toEqual([`parts lie in a DUP chunk at ${200 * MiB}, kept in 2 places: a write to one of them would leave the others stale`]);
    expect(btrfsToDevice([{ logical: 0, physical: 100 * MiB, length: 4096, flags: 0 }], got).problems)
      .toEqual([`btrfs address ${100 * MiB} (file byte 0) lies in no chunk`]);
    // extents flagged unmappable (compressed) pass untranslated, for fiemapToFileExtents to name
    const enc = { logical: 0, physical: 300 * MiB, length: 4096, flags: FIEMAP_EXTENT.ENCODED };
    expect(btrfsToDevice([enc], got)).toEqual({ extents: [enc], problems: [] });
  });
});
