/**
 * exFAT cross-links (issue #14): before an image file on exFAT is mapped, each of its
 * clusters must be its own. Volumes made by mkfs.exfat with files added by the test kit's
 * writer, then one directory entry edited as damage or a hostile edit leaves it (its set
 * checksum recomputed, so the reader takes it): another file's entry starting inside the
 * image's chain (FAT-chained and NoFatChain), an image whose entry points at the
 * allocation bitmap, the up-case table or the root directory, a cluster the bitmap marks
 * free. Each is refused by `vdboot plan` against a host disk, naming the cluster, the other
 * owner and fsck.exfat / chkdsk /f; the unedited volume plans read-write.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { makeExfat } from '../../qemu/disks.ts';
import { planOnVolume, pseudoRandom, tmpDir } from './helpers.ts';

const KiB = 1024;
let dir: string;
let base: Buffer;

interface Geometry {
  clusterSize: number;
  heapOffset: number;
  fatOffset: number;
  rootCluster: number;
}

function geometry(img: Buffer): Geometry {
  const ss = 2 ** img[108]!;
  return { clusterSize: ss * 2 ** img[109]!, fatOffset: img.readUInt32LE(80) * ss, heapOffset: img.readUInt32LE(88) * ss, rootCluster: img.readUInt32LE(96) };
}

/** Where the root directory's entries are (its first cluster: enough for these volumes). */
function rootBytes(img: Buffer): number {
  const g = geometry(img);
  return g.heapOffset + (g.rootCluster - 2) * g.clusterSize;
}

/** The byte offset of the stream extension entry of the root directory's file `name`. */
function streamEntry(img: Buffer, name: string): { set: number; stream: number; count: number } {
  const at = rootBytes(img);
  const { clusterSize } = geometry(img);
  for (let pos = at; pos < at + clusterSize; pos += 32) {
    if (img[pos] !== 0x85) continue;
    const count = img[pos + 1]!;
    const len = img[pos + 32 + 3]!;
    let n = '';
    for (let k = 2; k <= count && n.length < len; k++) for (let i = 0; i < 15 && n.length < len; i++) n += String.fromCharCode(img.readUInt16LE(pos + k * 32 + 2 + i * 2));
    if (n === name) return { set: pos, stream: pos + 32, count };
    pos += count * 32;
  }
  throw new Error(`${name} is not in the root directory`);
}

function fixSetChecksum(img: Buffer, set: number, count: number): void {
  let sum = 0;
  for (let i = 0; i < (count + 1) * 32; i++) {
    if (i === 2 || i === 3) continue;
    sum = ((sum & 1 ? 0x8000 : 0) + (sum >> 1) + img[set + i]!) & 0xffff;
  }
  img.writeUInt16LE(sum, set + 2);
}

/** A copy of the volume with `name`'s entry starting at cluster `first` (NoFatChain set when asked). */
function withFirstCluster(name: string, first: number, noFatChain = false): Buffer {
  const img = Buffer.from(base);
  const e = streamEntry(img, name);
  img.writeUInt32LE(first, e.stream + 20);
  if (noFatChain) img[e.stream + 1] = img[e.stream + 1]! | 0x02;
  fixSetChecksum(img, e.set, e.count);
  return img;
}

function clusterOf(img: Buffer, file: string): number {
  const v = openHostFs(bytesReader('x', img))!;
  const g = geometry(img);
  return ((v.lookup(file).extents[0] as { deviceOffset: number }).deviceOffset - g.heapOffset) / g.clusterSize + 2;
}

/** The root directory's entry for a system stream (0x81 bitmap, 0x82 up-case): its first cluster. */
function systemCluster(img: Buffer, type: number): number {
  const at = rootBytes(img);
  for (let pos = at; pos < at + geometry(img).clusterSize; pos += 32) if (img[pos] === type) return img.readUInt32LE(pos + 20);
  throw new Error(`no entry 0x${type.toString(16)}`);
}

function plan(img: Buffer, file: string, mode = 'rw'): string {
  return planOnVolume(dir, img, { ext: 'exfat', label: 'STICK', file, mode });
}

beforeAll(() => {
  dir = tmpDir();
  const vol = path.join(dir, 'stick.exfat');
  makeExfat(vol, {
    sizeMiB: 24, label: 'STICK', clusterSize: 4096,
    files: { '/a.raw': pseudoRandom(64 * KiB, 1), '/b.raw': pseudoRandom(8 * KiB, 2), '/VMs/c.raw': pseudoRandom(16 * KiB, 3) },
  });
  base = fs.readFileSync(vol);
}, 120_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('exFAT cross-links: every cluster of the image is its own', () => {
  it('the volume as made: every file is proven its own, and the image plans read-write', () => {
    const v = openHostFs(bytesReader('stick', base))!;
    expect(() => v.proveOwnership!([v.lookup('/a.raw'), v.lookup('/b.raw'), v.lookup('/VMs/c.raw')])).not.toThrow();
    expect(plan(base, '/a.raw')).toMatch(/^planned: /);
  });

  it('another file\'s entry starting inside the image\'s chain (FAT-chained, then NoFatChain): both files are refused, naming the cluster', () => {
    const inside = clusterOf(base, '/a.raw') + 3;
    for (const noFatChain of [false, true]) {
      const img = withFirstCluster('b.raw', inside, noFatChain);
      const a = plan(img, '/a.raw', 'ro');
      expect(a).toMatch(new RegExp(`/a\\.raw: its cluster ${inside} also belongs to /b\\.raw: the files are cross-linked`));
      expect(a).toContain('chkdsk /f');
      expect(plan(img, '/b.raw', 'ro')).toMatch(/\/b\.raw: its cluster \d+ also belongs to \/a\.raw|cross-linked/);
    }
  });

  it('an image whose entry points at the allocation bitmap, the up-case table or the root directory is refused, naming it', () => {
    const g = geometry(base);
    for (const [cluster, what] of [[systemCluster(base, 0x81), 'the allocation bitmap'], [systemCluster(base, 0x82), 'the up-case table'], [g.rootCluster, 'the root directory']] as const) {
      const msg = plan(withFirstCluster('b.raw', cluster, true), '/b.raw', 'ro');
      expect(msg, what).toContain(`also belongs to ${what}`);
    }
  });

  it('an image cluster the allocation bitmap marks free is refused', () => {
    const img = Buffer.from(base);
    const g = geometry(img);
    const c = clusterOf(img, '/VMs/c.raw');
    const bitmapAt = g.heapOffset + (systemCluster(img, 0x81) - 2) * g.clusterSize;
    img[bitmapAt + ((c - 2) >> 3)] &= ~(1 << ((c - 2) & 7));
    expect(plan(img, '/VMs/c.raw', 'ro')).toMatch(new RegExp(`/VMs/c\\.raw: its cluster ${c} is marked free in the allocation bitmap`));
  });
});
