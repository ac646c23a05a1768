/**
 * `vdboot mkdisk --fs btrfs`: a btrfs filesystem made from a tree without root and without
 * mounting, by `mkfs.btrfs --rootdir` (btrfs-progs 6.2), run under the archive's fakeroot
 * state so it sees the owners and device nodes. It keeps owners, modes (sticky included),
 * symlinks, hard links (one inode, its names), fifos and timestamps.
 *
 * One gap is mended afterwards: btrfs-progs 6.2 writes every device node with device
 * number 0 (its inode item's rdev is never set from the source). vdboot writes the
 * numbers into the inode items itself, in the unmounted image file:
 * - the fs tree's leaves and items are listed by `btrfs inspect-internal dump-tree -t fs`;
 *   --rootdir gives each source inode the objectid st_ino + 256, and the item found there
 *   must be a device of the source's type or nothing is written;
 * - each leaf's physical copies (metadata is DUP: two) come from `btrfs-map-logical`; each
 *   copy must carry its own logical address and a correct checksum before it is touched;
 * - rdev (the kernel's dev_t, major << 20 | minor) goes at byte 56 of the inode item, the leaf's
 *   CRC-32C over bytes 32..nodesize is recomputed, both copies are written;
 * - `btrfs check --readonly` must pass afterwards.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { crc32c } from '../src/formats/crc.ts';
import { formatUuid } from '../src/formats/vhd.ts';
import { lastLines, type TreeEntry } from './tree-listing.ts';

export class BtrfsBuildError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MkdiskError';
  }
}

const SUPERBLOCK = 0x10000;
const LEAF_HEADER = 101;
const FIRST_FREE_OBJECTID = 256;
const INODE_MODE = 52;
const INODE_RDEV = 56;

function tool(cmd: string, args: string[], fakerootState?: string): { status: number; out: string } {
  const [c, a] = fakerootState ? ['fakeroot', ['-i', fakerootState, '--', cmd, ...args]] : [cmd, args];
  const r = spawnSync(c, a, { encoding: 'utf8', maxBuffer: 1024 * 1024 * 1024, env: { ...process.env, LC_ALL: 'C' } });
  if (r.error) throw new BtrfsBuildError(`${cmd} could not run (${r.error.message}); install btrfs-progs`);
  return { status: r.status ?? 1, out: `${r.stderr}\n${r.stdout}` };
}

/** `{ok: false}` when the content does not fit `fsFile`'s size, so the caller grows it. */
export function makeBtrfs(fsFile: string, sourceDir: string, entries: readonly TreeEntry[], label: string | undefined, fakerootState?: string): { ok: true } | { ok: false; why: string } {
  const args = ['-q', '-f', ...(label !== undefined ? ['-L', label] : []), '--rootdir', sourceDir, fsFile];
  const r = tool('mkfs.btrfs', args, fakerootState);
  if (r.status !== 0) {
    if (/not enough free space|No space left|ENOSPC|too small/i.test(r.out)) return { ok: false, why: lastLines(r.out) };
    throw new BtrfsBuildError(`mkfs.btrfs failed (exit ${r.status}): ${lastLines(r.out)}`);
  }
  const devices = entries.filter((e) => e.type === 'char' || e.type === 'block');
  if (devices.length > 0) writeDeviceNumbers(fsFile, devices);
  return { ok: true };
}

/** btrfs keeps the kernel's own dev_t in the inode item: major << 20 | minor (MKDEV). */
export function encodeDev(major: number, minor: number): bigint {
  return (BigInt(major) << 20n) | BigInt(minor);
}

interface ItemAt { leaf: number; itemoff: number }

/** objectid → where its INODE_ITEM lies, from dump-tree's text. */
function inodeItems(fsFile: string): Map<number, ItemAt> {
  const r = tool('btrfs', ['inspect-internal', 'dump-tree', '-t', 'fs', fsFile]);
  if (r.status !== 0) throw new BtrfsBuildError(`btrfs inspect-internal dump-tree failed: ${lastLines(r.out)}`);
  const items = new Map<number, ItemAt>();
  let leaf = -1;
  for (const line of r.out.split('\n')) {
    const l = /^leaf (\d+) items/.exec(line);
    if (l) { leaf = Number(l[1]); continue; }
    const m = /^\s+item \d+ key \((\d+) INODE_ITEM 0\) itemoff (\d+) itemsize (\d+)/.exec(line);
    if (m && leaf >= 0) items.set(Number(m[1]), { leaf, itemoff: Number(m[2]) });
  }
  return items;
}

function mirrors(fsFile: string, logical: number): number[] {
  const r = tool('btrfs-map-logical', ['-l', String(logical), fsFile]);
  const out = [...r.out.matchAll(/^mirror \d+ logical (\d+) physical (\d+)/gm)].filter((m) => Number(m[1]) === logical).map((m) => Number(m[2]));
  if (r.status !== 0 || out.length === 0) throw new BtrfsBuildError(`btrfs-map-logical found no copy of tree block ${logical}: ${lastLines(r.out)}`);
  return out;
}

function writeDeviceNumbers(fsFile: string, devices: readonly TreeEntry[]): void {
  const fd = fs.openSync(fsFile, 'r+');
  try {
    const sb = Buffer.alloc(4096);
    fs.readSync(fd, sb, 0, sb.length, SUPERBLOCK);
    if (sb.toString('latin1', 0x40, 0x48) !== '_BHRfS_M') throw new BtrfsBuildError(`no btrfs superblock in ${fsFile}`);
    const nodesize = sb.readUInt32LE(0x94);
    const csumType = sb.readUInt16LE(0xc4);
    if (csumType !== 0) throw new BtrfsBuildError(`btrfs checksum type ${csumType}: vdboot writes device numbers into crc32c filesystems only`);
    if (nodesize < 4096 || nodesize > 65536) throw new BtrfsBuildError(`btrfs node size ${nodesize} is out of range`);
    const items = inodeItems(fsFile);
    const byLeaf = new Map<number, { itemoff: number; dev: TreeEntry }[]>();
    for (const d of devices) {
      const at = items.get(d.ino + FIRST_FREE_OBJECTID);
      if (!at) throw new BtrfsBuildError(`the device node ${d.path} (inode ${d.ino}) has no inode item ${d.ino + FIRST_FREE_OBJECTID} in the new filesystem`);
      let list = byLeaf.get(at.leaf);
      if (!list) byLeaf.set(at.leaf, (list = []));
      if (!list.some((x) => x.itemoff === at.itemoff)) list.push({ itemoff: at.itemoff, dev: d });
    }
    for (const [leaf, patches] of byLeaf) {
      for (const physical of mirrors(fsFile, leaf)) {
        const node = Buffer.alloc(nodesize);
        if (fs.readSync(fd, node, 0, nodesize, physical) !== nodesize) throw new BtrfsBuildError(`tree block ${leaf} at byte ${physical} lies past the end of ${fsFile}`);
        if (Number(node.readBigUInt64LE(0x30)) !== leaf) throw new BtrfsBuildError(`the copy of tree block ${leaf} at byte ${physical} names block ${node.readBigUInt64LE(0x30)}`);
        if (crc32c(node.subarray(32)) !== node.readUInt32LE(0)) throw new BtrfsBuildError(`the copy of tree block ${leaf} at byte ${physical} fails its checksum`);
        for (const { itemoff, dev } of patches) {
          const at = LEAF_HEADER + itemoff;
          if (at + INODE_RDEV + 8 > nodesize) throw new BtrfsBuildError(`inode item of ${dev.path} lies outside its tree block`);
          const mode = node.readUInt32LE(at + INODE_MODE);
          const want = (dev.type === 'char' ? 0o020000 : 0o060000) | (dev.mode & 0o7777);
          if (mode !== want) throw new BtrfsBuildError(`inode item of ${dev.path} has mode 0${mode.toString(8)}, not the device's 0${want.toString(8)}; nothing written`);
          node.writeBigUInt64LE(encodeDev(dev.major!, dev.minor!), at + INODE_RDEV);
        }
        node.fill(0, 0, 32);
        node.writeUInt32LE(crc32c(node.subarray(32)), 0);
        fs.writeSync(fd, node, 0, nodesize, physical);
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  const check = tool('btrfs', ['check', '--readonly', fsFile]);
  if (check.status !== 0) throw new BtrfsBuildError(`btrfs check failed after writing the device numbers: ${lastLines(check.out)}`);
}

/** Free bytes (total minus used) and the UUID from the btrfs superblock of the filesystem at byte `offset` of `file`. */
export function readBtrfsSuperblock(file: string, offset = 0): { freeBytes: number; uuid: string } {
  const fd = fs.openSync(file, 'r');
  try {
    const sb = Buffer.alloc(4096);
    fs.readSync(fd, sb, 0, sb.length, offset + SUPERBLOCK);
    if (sb.toString('latin1', 0x40, 0x48) !== '_BHRfS_M') throw new BtrfsBuildError(`no btrfs superblock at byte ${offset + SUPERBLOCK} of ${file}`);
    const total = Number(sb.readBigUInt64LE(0x70));
    const used = Number(sb.readBigUInt64LE(0x78));
    return { freeBytes: Math.max(0, total - used), uuid: formatUuid(sb.subarray(0x20, 0x30)) };
  } finally {
    fs.closeSync(fd);
  }
}
