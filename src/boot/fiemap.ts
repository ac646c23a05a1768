/**
 * Hosts vdboot does not read itself (ext4, xfs, btrfs, …): the kernel mounts them
 * (read-only unless something is written through them) at /run/vdboot/host, vdboot reads
 * image files through that mount, and asks the filesystem where a file's bytes lie with
 * FS_IOC_FIEMAP. The answer becomes the same HostFile extents vdboot's own NTFS/FAT
 * readers give, so the planner composes image map ∘ file extents the same way and takes
 * the direct path when every extent lies, as it is, on the partition.
 *
 * Not mappable directly (the planner takes the loop path and says why): extents whose
 * place the filesystem does not know or that are not stored as plain blocks (UNKNOWN,
 * DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL), and SHARED
 * extents (reflinked: a write in place would change another file too). UNWRITTEN extents
 * (preallocated, read as zeros) become `uninitialized`: read as zero, never written in
 * place. Gaps are holes.
 *
 * struct fiemap and struct fiemap_extent (linux/fiemap.h) are packed here; the test
 * compiles the real header to check the layout.
 */
import { FormatError, type BlockReader } from '../formats/block-reader.ts';
import type { ChainHost } from '../formats/chain.ts';
import type { FileExtent, HostFile } from '../formats/host-volume.ts';
import { joinHostPath, splitHostPath } from '../formats/host-volume.ts';
import { isSysError, O, type Sys } from '../sys/sys.ts';
import { openBlockReader } from './blockdev.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import type { ImageHost } from './image-host.ts';

export const FIEMAP_HEADER_SIZE = 32;
export const FIEMAP_EXTENT_SIZE = 56;
/** _IOWR('f', 11, struct fiemap) */
export const FS_IOC_FIEMAP = 0xc020660b;
/** _IOR('X', 31, struct fsxattr) */
export const FS_IOC_FSGETXATTR = 0x801c581f;
export const FSXATTR_SIZE = 28;
export const FS_XFLAG_REALTIME = 0x00000001;

export const FIEMAP_FLAG = { SYNC: 0x1, XATTR: 0x2 } as const;
export const FIEMAP_EXTENT = {
  LAST: 0x1,
  UNKNOWN: 0x2,
  DELALLOC: 0x4,
  ENCODED: 0x8,
  DATA_ENCRYPTED: 0x80,
  NOT_ALIGNED: 0x100,
  DATA_INLINE: 0x200,
  DATA_TAIL: 0x400,
  UNWRITTEN: 0x800,
  MERGED: 0x1000,
  SHARED: 0x2000,
} as const;

/** Why an extent with the flag cannot be mapped onto the partition as it is. */
const UNMAPPABLE: readonly [number, string][] = [
  [FIEMAP_EXTENT.UNKNOWN, 'its place on the disk is not known yet'],
  [FIEMAP_EXTENT.DELALLOC, 'it is not allocated on the disk yet (delayed allocation)'],
  [FIEMAP_EXTENT.ENCODED, 'it is stored encoded (compressed)'],
  [FIEMAP_EXTENT.DATA_ENCRYPTED, 'it is stored encrypted'],
  [FIEMAP_EXTENT.NOT_ALIGNED, 'it is not aligned to the disk\'s blocks'],
  [FIEMAP_EXTENT.DATA_INLINE, 'it is stored inside the filesystem\'s metadata (inline)'],
  [FIEMAP_EXTENT.DATA_TAIL, 'it shares a block with other files\' tails'],
  [FIEMAP_EXTENT.SHARED, 'it is shared with another file (reflinked or in a snapshot): a write in place would change that file too'],
];

/**
 * Filesystems whose files vdboot maps directly. ext2/3/4 and xfs: FIEMAP reports byte
 * offsets on the one block device they are mounted from, and they never move a file's
 * blocks on their own. btrfs: FIEMAP reports addresses in btrfs's own logical space, which
 * vdboot translates through the chunk tree (single-device, "single" data chunks only).
 * bcachefs (its own address space), f2fs and nilfs2 (move blocks when they clean their
 * logs) and the rest take the loop path.
 */
export const FIEMAP_DIRECT_FS: ReadonlySet<string> = new Set(['ext2', 'ext3', 'ext4', 'xfs', 'btrfs']);

/** _IOR('f', 1, long) on 64-bit; the kernel reads and writes an int */
export const FS_IOC_GETFLAGS = 0x80086601;
export const FS_NOCOW_FL = 0x00800000;

export interface FiemapExtent {
  logical: number;
  physical: number;
  length: number;
  flags: number;
}

/** struct fiemap asking for up to `count` extents of [start, start+length). */
export function packFiemapRequest(start: number, length: number, flags: number, count: number): ArrayBuffer {
  if (!Number.isSafeInteger(count) || count < 0 || count > 1 << 16) throw new RangeError(`fiemap: ${count} extents per call is out of range`);
  const buf = new ArrayBuffer(FIEMAP_HEADER_SIZE + count * FIEMAP_EXTENT_SIZE);
  const v = new DataView(buf);
  v.setBigUint64(0, BigInt(start), true);
  v.setBigUint64(8, BigInt(length), true);
  v.setUint32(16, flags >>> 0, true);
  v.setUint32(20, 0, true); // fm_mapped_extents (out)
  v.setUint32(24, count, true); // fm_extent_count
  return buf;
}

function safe(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`FIEMAP: ${what} is ${v}, beyond what vdboot can address (2^53 bytes)`, what, v);
  return Number(v);
}

/** The extents the kernel wrote into a packed struct fiemap. */
export function unpackFiemap(buf: ArrayBuffer): { flags: number; extents: FiemapExtent[] } {
  if (buf.byteLength < FIEMAP_HEADER_SIZE) throw new FormatError(`FIEMAP: a ${buf.byteLength}-byte reply is shorter than its header`, 'fiemap', buf.byteLength);
  const v = new DataView(buf);
  const mapped = v.getUint32(20, true);
  const room = v.getUint32(24, true);
  const fit = Math.floor((buf.byteLength - FIEMAP_HEADER_SIZE) / FIEMAP_EXTENT_SIZE);
  if (mapped > room || mapped > fit) throw new FormatError(`FIEMAP: the kernel reports ${mapped} extents for room of ${Math.min(room, fit)}`, 'fm_mapped_extents', mapped);
  const extents: FiemapExtent[] = [];
  for (let i = 0; i < mapped; i++) {
    const o = FIEMAP_HEADER_SIZE + i * FIEMAP_EXTENT_SIZE;
    extents.push({
      logical: safe(v.getBigUint64(o, true), 'fe_logical'),
      physical: safe(v.getBigUint64(o + 8, true), 'fe_physical'),
      length: safe(v.getBigUint64(o + 16, true), 'fe_length'),
      flags: v.getUint32(o + 40, true),
    });
  }
  return { flags: v.getUint32(16, true), extents };
}

/** The most extents vdboot asks for: a file in more pieces is not mapped directly. */
export const FIEMAP_MAX_EXTENTS = 1 << 20;
const BATCH = 512;

/**
 * All extents of an open file of `size` bytes, in file order: FIEMAP_FLAG_SYNC on the
 * first call (dirty data gets its blocks first), then on from the end of the last extent
 * until the kernel says LAST or nothing more is mapped.
 */
export function readFiemap(sys: Sys, fd: number, size: number, maxExtents = FIEMAP_MAX_EXTENTS): FiemapExtent[] {
  const all: FiemapExtent[] = [];
  let start = 0;
  let flags: number = FIEMAP_FLAG.SYNC;
  while (start < size) {
    const buf = packFiemapRequest(start, size - start, flags, BATCH);
    sys.ioctl(fd, FS_IOC_FIEMAP, buf);
    flags = 0;
    const { extents } = unpackFiemap(buf);
    if (extents.length === 0) break;
    for (const e of extents) all.push(e);
    if (all.length > maxExtents) {
      throw new FormatError(`the file is in more than ${maxExtents} pieces on the disk, too many to map one by one`, 'extents', all.length);
    }
    const last = extents[extents.length - 1]!;
    if (last.flags & FIEMAP_EXTENT.LAST) break;
    const next = last.logical + last.length;
    if (next <= start) throw new FormatError(`FIEMAP: the extent at ${last.logical} does not move past ${start}`, 'fe_logical', last.logical);
    start = next;
  }
  return all;
}

/**
 * FIEMAP's extents as HostFile extents covering [0, size): data, `uninitialized` for
 * UNWRITTEN, `hole` for gaps. Extents the kernel reports past the end of the file
 * (blocks preallocated beyond it) are cut off. `problems` says why the file cannot be
 * mapped directly (flags above, overlaps, places outside the partition); empty when it can.
 */
export function fiemapToFileExtents(raw: readonly FiemapExtent[], size: number, deviceSize: number): { extents: FileExtent[]; problems: string[] } {
  const extents: FileExtent[] = [];
  const counts = new Map<string, number>();
  const problem = (why: string): void => { counts.set(why, (counts.get(why) ?? 0) + 1); };
  const push = (e: FileExtent): void => {
    const last = extents[extents.length - 1];
    if (last && last.kind === e.kind && last.fileOffset + last.length === e.fileOffset) {
      if (e.kind === 'data' && last.kind === 'data' && last.deviceOffset + last.length === e.deviceOffset) { last.length += e.length; return; }
      if (e.kind !== 'data') { last.length += e.length; return; }
    }
    extents.push(e);
  };
  let pos = 0;
  for (const e of raw) {
    if (e.length <= 0) continue;
    if (e.logical < pos) {
      problem(`the filesystem reports overlapping extents (at byte ${e.logical})`);
      continue;
    }
    if (e.logical >= size) break;
    if (e.logical > pos) push({ kind: 'hole', fileOffset: pos, length: e.logical - pos });
    const length = Math.min(e.length, size - e.logical);
    const bad = UNMAPPABLE.filter(([flag]) => e.flags & flag).map(([, why]) => why);
    for (const why of bad) problem(why);
    if (bad.length === 0 && (e.logical % 512 !== 0 || e.physical % 512 !== 0)) problem('it does not start on a 512-byte sector');
    if (bad.length === 0 && e.physical + e.length > deviceSize) problem(`the filesystem places it at byte ${e.physical}, outside the ${deviceSize}-byte partition`);
    if (e.flags & FIEMAP_EXTENT.UNWRITTEN) push({ kind: 'uninitialized', fileOffset: e.logical, length });
    else push({ kind: 'data', fileOffset: e.logical, length, deviceOffset: e.physical });
    pos = e.logical + length;
  }
  if (pos < size) push({ kind: 'hole', fileOffset: pos, length: size - pos });
  const problems = [...counts].map(([why, n]) => `${n} extent${n === 1 ? '' : 's'}: ${why}`);
  return { extents, problems };
}

function xflags(sys: Sys, fd: number): number | undefined {
  try {
    const buf = new ArrayBuffer(FSXATTR_SIZE);
    sys.ioctl(fd, FS_IOC_FSGETXATTR, buf);
    return new DataView(buf).getUint32(0, true);
  } catch {
    return undefined;
  }
}

// ---- btrfs: logical addresses → places on the device, through the chunk tree ----------

/** _IOWR(0x94, 17, struct btrfs_ioctl_search_args) */
export const BTRFS_IOC_TREE_SEARCH = 0xd0009411;
/** _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args) */
export const BTRFS_IOC_FS_INFO = 0x8400941f;
export const BTRFS_SEARCH_KEY_SIZE = 104;
export const BTRFS_SEARCH_ARGS_SIZE = 4096;
export const BTRFS_SEARCH_HEADER_SIZE = 32;
export const BTRFS_FS_INFO_SIZE = 1024;
export const BTRFS_CHUNK_TREE_OBJECTID = 3;
export const BTRFS_FIRST_CHUNK_TREE_OBJECTID = 256;
export const BTRFS_CHUNK_ITEM_KEY = 228;
/** offsets in struct btrfs_chunk and struct btrfs_stripe */
export const BTRFS_CHUNK = { length: 0, type: 24, numStripes: 44, stripes: 48, stripeSize: 32, stripeDevid: 0, stripeOffset: 8 } as const;
export const BTRFS_BLOCK_GROUP = { DATA: 0x1, RAID0: 0x8, RAID1: 0x10, DUP: 0x20, RAID10: 0x40, RAID5: 0x80, RAID6: 0x100, RAID1C3: 0x200, RAID1C4: 0x400 } as const;
const PROFILE_MASK = 0x7f8;

export interface BtrfsChunk {
  /** logical start and length */
  logical: number;
  length: number;
  type: number;
  stripes: { devid: number; offset: number }[];
}

/** A TREE_SEARCH for the chunk items at logical addresses from `minOffset` on. */
export function packBtrfsChunkSearch(minOffset: number): ArrayBuffer {
  const buf = new ArrayBuffer(BTRFS_SEARCH_ARGS_SIZE);
  const v = new DataView(buf);
  const max = 0xffffffffffffffffn;
  v.setBigUint64(0, BigInt(BTRFS_CHUNK_TREE_OBJECTID), true); // tree_id
  v.setBigUint64(8, BigInt(BTRFS_FIRST_CHUNK_TREE_OBJECTID), true); // min_objectid
  v.setBigUint64(16, BigInt(BTRFS_FIRST_CHUNK_TREE_OBJECTID), true); // max_objectid
  v.setBigUint64(24, BigInt(minOffset), true); // min_offset
  v.setBigUint64(32, max, true); // max_offset
  v.setBigUint64(40, 0n, true); // min_transid
  v.setBigUint64(48, max, true); // max_transid
  v.setUint32(56, BTRFS_CHUNK_ITEM_KEY, true); // min_type
  v.setUint32(60, BTRFS_CHUNK_ITEM_KEY, true); // max_type
  v.setUint32(64, 4096, true); // nr_items: as many as fit
  return buf;
}

/** The chunk items a TREE_SEARCH wrote into its buffer. */
export function unpackBtrfsChunkSearch(buf: ArrayBuffer): BtrfsChunk[] {
  const v = new DataView(buf);
  const count = v.getUint32(64, true);
  const chunks: BtrfsChunk[] = [];
  let o = BTRFS_SEARCH_KEY_SIZE;
  for (let i = 0; i < count; i++) {
    if (o + BTRFS_SEARCH_HEADER_SIZE > buf.byteLength) throw new FormatError(`btrfs TREE_SEARCH: item ${i} of ${count} lies past the end of the reply`, 'nr_items', count);
    const offset = safe(v.getBigUint64(o + 16, true), 'chunk key offset');
    const type = v.getUint32(o + 24, true);
    const len = v.getUint32(o + 28, true);
    const d = o + BTRFS_SEARCH_HEADER_SIZE;
    if (d + len > buf.byteLength) throw new FormatError(`btrfs TREE_SEARCH: item ${i} (${len} bytes) lies past the end of the reply`, 'len', len);
    o = d + len;
    if (type !== BTRFS_CHUNK_ITEM_KEY) continue;
    if (len < BTRFS_CHUNK.stripes) throw new FormatError(`btrfs chunk item at ${offset} has only ${len} bytes`, 'len', len);
    const n = v.getUint16(d + BTRFS_CHUNK.numStripes, true);
    if (n === 0 || BTRFS_CHUNK.stripes + n * BTRFS_CHUNK.stripeSize > len) throw new FormatError(`btrfs chunk item at ${offset}: ${n} stripes do not fit its ${len} bytes`, 'num_stripes', n);
    const stripes = [];
    for (let k = 0; k < n; k++) {
      const so = d + BTRFS_CHUNK.stripes + k * BTRFS_CHUNK.stripeSize;
      stripes.push({ devid: safe(v.getBigUint64(so + BTRFS_CHUNK.stripeDevid, true), 'stripe devid'), offset: safe(v.getBigUint64(so + BTRFS_CHUNK.stripeOffset, true), 'stripe offset') });
    }
    chunks.push({ logical: offset, length: safe(v.getBigUint64(d + BTRFS_CHUNK.length, true), 'chunk length'), type: Number(v.getBigUint64(d + BTRFS_CHUNK.type, true) & 0xffffffffn), stripes });
  }
  return chunks;
}

/** Every chunk of the btrfs holding the open file `fd`, by logical address. */
export function readBtrfsChunks(sys: Sys, fd: number): BtrfsChunk[] {
  const all: BtrfsChunk[] = [];
  let from = 0;
  for (let round = 0; round < 100000; round++) {
    const buf = packBtrfsChunkSearch(from);
    sys.ioctl(fd, BTRFS_IOC_TREE_SEARCH, buf);
    const got = unpackBtrfsChunkSearch(buf);
    if (got.length === 0) break;
    all.push(...got);
    from = got[got.length - 1]!.logical + 1;
  }
  return all.sort((a, b) => a.logical - b.logical);
}

function profileName(type: number): string {
  const names = Object.entries(BTRFS_BLOCK_GROUP).filter(([k, bit]) => k !== 'DATA' && type & bit).map(([k]) => k);
  return names.length ? names.join('|') : 'single';
}

/**
 * btrfs's logical extents as places on its one device: each extent split where it
 * crosses chunks, each piece moved by its chunk's stripe offset. Only "single" chunks with
 * one stripe map 1:1; anything else (DUP, RAID: several copies or stripes) is a problem,
 * as is an address no chunk covers. Extents with a problem flag pass as they are
 * (fiemapToFileExtents names them).
 */
export function btrfsToDevice(raw: readonly FiemapExtent[], chunks: readonly BtrfsChunk[]): { extents: FiemapExtent[]; problems: string[] } {
  const out: FiemapExtent[] = [];
  const problems = new Set<string>();
  const skip = UNMAPPABLE.reduce((m, [flag]) => m | flag, 0);
  for (const e of raw) {
    if (e.flags & skip || e.length <= 0) {
      out.push(e);
      continue;
    }
    let done = 0;
    while (done < e.length) {
      const at = e.physical + done;
      const c = chunks.find((x) => x.logical <= at && at < x.logical + x.length);
      if (!c) {
        problems.add(`btrfs address ${at} (file byte ${e.logical + done}) lies in no chunk`);
        break;
      }
      const n = Math.min(e.length - done, c.logical + c.length - at);
      if ((c.type & PROFILE_MASK) !== 0 || c.stripes.length !== 1) {
        problems.add(`parts lie in a ${profileName(c.type)} chunk at ${c.logical}, kept in ${c.stripes.length} places: a write to one of them would leave the others stale`);
      }
      out.push({ logical: e.logical + done, physical: c.stripes[0]!.offset + (at - c.logical), length: n, flags: e.flags & ~FIEMAP_EXTENT.LAST });
      done += n;
    }
  }
  return { extents: out, problems: [...problems] };
}

function fsInfoDevices(sys: Sys, fd: number): number | undefined {
  try {
    const buf = new ArrayBuffer(BTRFS_FS_INFO_SIZE);
    sys.ioctl(fd, BTRFS_IOC_FS_INFO, buf);
    return safe(new DataView(buf).getBigUint64(8, true), 'num_devices');
  } catch {
    return undefined;
  }
}

function inodeFlags(sys: Sys, fd: number): number | undefined {
  try {
    const buf = new ArrayBuffer(8);
    sys.ioctl(fd, FS_IOC_GETFLAGS, buf);
    return new DataView(buf).getUint32(0, true);
  } catch {
    return undefined;
  }
}

export interface KernelImageHost {
  host: ImageHost & { chain: ChainHost };
  /** the image as found: its normalized path and size */
  file: HostFile;
  /** closes every file opened through the mount (the host must be unmountable afterwards) */
  close(): void;
}

/**
 * The planner's view of a host mounted by the kernel at `mount` (its device `device`,
 * mounted as `fsType`): files read through the mount, their places on `device` from
 * FIEMAP. Throws FormatError naming the path when the image is not there.
 */
export function kernelImageHost(sys: Sys, mount: string, device: BlockDeviceInfo, fsType: string, description: string, imagePath: string, writable: boolean): KernelImageHost {
  const opened: { close(): void }[] = [];
  const full = (p: string): string => `${mount}${joinHostPath(splitHostPath(p))}`;
  const statFile = (p: string) => {
    const norm = joinHostPath(splitHostPath(p));
    let st;
    try {
      st = sys.stat(full(norm));
    } catch (e) {
      if (isSysError(e, 'ENOENT') || isSysError(e, 'ENOTDIR')) throw notFound(sys, mount, norm, description);
      throw e;
    }
    if ((st.mode & 0o170000) !== 0o100000) throw new FormatError(`${norm} on ${description} is not a regular file`, 'path', norm);
    return { norm, st };
  };
  const chain: ChainHost = {
    openFile(p: string): BlockReader {
      const { norm, st } = statFile(p);
      const r = openBlockReader(sys, full(norm), st.size);
      opened.push(r);
      return r;
    },
    fileId(p: string): string {
      const { st } = statFile(p);
      return `${st.devMajor}:${st.devMinor}:${st.ino}`;
    },
    // A link inside the mount resolves in the initramfs (an absolute target leaves the host
    // filesystem): files an image names must be plain files (chain.ts's confinement).
    fileKind(p: string) {
      const type = sys.lstat(full(joinHostPath(splitHostPath(p)))).mode & 0o170000;
      return type === 0o100000 ? 'file' : type === 0o120000 ? 'link' : type === 0o060000 || type === 0o020000 ? 'device' : 'other';
    },
    listDir(dir: string): string[] {
      const d = full(dir);
      return sys.readdir(d).filter((n) => {
        try { return (sys.stat(`${d}/${n}`).mode & 0o170000) === 0o100000; } catch { return false; }
      });
    },
  };
  const layout = (p: string) => {
    const { norm, st } = statFile(p);
    if (!FIEMAP_DIRECT_FS.has(fsType)) {
      throw new FormatError(
        fsType === 'bcachefs'
          ? `${fsType} reports where ${norm} lies in its own address space, which spans devices, not as places on ${device.path}`
          : `vdboot does not map files of ${fsType} directly (it maps ext2/3/4, xfs and btrfs files through FIEMAP)`,
        'fstype', fsType,
      );
    }
    const fd = sys.open(full(norm), O.RDONLY | O.CLOEXEC);
    try {
      if (fsType === 'xfs' && ((xflags(sys, fd) ?? 0) & FS_XFLAG_REALTIME)) {
        throw new FormatError(`${norm} lies on the xfs realtime device, not on ${device.path}`, 'xflags', FS_XFLAG_REALTIME);
      }
      if (fsType === 'btrfs' && writable && !((inodeFlags(sys, fd) ?? 0) & FS_NOCOW_FL)) {
        throw new FormatError(
          `btrfs keeps a checksum of every data block of ${norm}: a write that bypasses btrfs leaves them wrong, and btrfs refuses to read the file afterwards. ` +
            `A file created No_COW ("chattr +C" on the empty file, then filled) has none and is mapped directly`,
          'flags', norm,
        );
      }
      let raw: FiemapExtent[];
      const early: string[] = [];
      try {
        raw = readFiemap(sys, fd, st.size);
        if (fsType === 'btrfs') {
          const devices = fsInfoDevices(sys, fd);
          // a chunk's stripe on another device of a multi-device btrfs would map onto the wrong partition
          if (devices === undefined) early.push('btrfs did not say how many devices it spans (BTRFS_IOC_FS_INFO failed)');
          else if (devices !== 1) early.push(`the btrfs spans ${devices} devices`);
          const t = btrfsToDevice(raw, readBtrfsChunks(sys, fd));
          raw = t.extents;
          early.push(...t.problems);
        }
      } catch (e) {
        if (isSysError(e)) throw new FormatError(`${fsType} could not say where ${norm} lies (${e.code})`, 'fiemap', e.code);
        throw e;
      }
      const converted = fiemapToFileExtents(raw, st.size, device.size);
      const { extents } = converted;
      const problems = [...early, ...converted.problems];
      if (problems.length) {
        const shown = problems.slice(0, 4).join('; ') + (problems.length > 4 ? `; and ${problems.length - 4} more` : '');
        throw new FormatError(`parts of ${norm} cannot be mapped onto ${device.path} as they are: ${shown}`, 'fiemap', norm);
      }
      return { device: device.path, extents, size: st.size };
    } finally {
      sys.close(fd);
    }
  };
  const { norm, st } = statFile(imagePath);
  return {
    host: {
      description,
      device: device.path,
      chain,
      layout,
      writeBlocker: null,
      layoutSource: fsType === 'btrfs' ? "btrfs's FIEMAP and chunk tree" : `${fsType}'s FIEMAP`,
    },
    file: { path: norm, size: st.size, extents: [] },
    close(): void {
      for (const r of opened.splice(0)) {
        try { r.close(); } catch { /* already closed */ }
      }
    },
  };
}

/** "not found" for a kernel-mounted host: the last directory that exists and a few of its names. */
function notFound(sys: Sys, mount: string, path: string, description: string): FormatError {
  const parts = splitHostPath(path);
  let dir: string[] = [];
  for (let i = 0; i < parts.length; i++) {
    const next = [...parts.slice(0, i + 1)];
    try {
      if ((sys.stat(`${mount}${joinHostPath(next)}`).mode & 0o170000) !== 0o040000) break;
      dir = next;
    } catch {
      break;
    }
  }
  let names: string[] = [];
  try { names = sys.readdir(`${mount}${joinHostPath(dir)}`).sort().slice(0, 12); } catch { /* unreadable */ }
  const missing = parts[dir.length] ?? '';
  return new FormatError(
    `${description}: ${path} not found: ${joinHostPath(dir)} has no "${missing}"${names.length ? `; it holds ${names.map((n) => `"${n}"`).join(', ')}` : ' (the directory is empty)'}. Names on this filesystem are case-sensitive.`,
    'path', path,
  );
}
