/**
 * FAT32 cross-links that no FAT entry shows (issue #14): another directory entry whose
 * first cluster lies inside the image's chain, in its middle or at its start. The FAT
 * pass alone cannot see them (every FAT entry still points where the image's own chain
 * goes); the proof reads every directory. A volume made by mkfs.vfat with files copied in
 * by mcopy, then one 8.3 entry's first cluster edited by hand; each case is refused by
 * `vdboot plan` against a host disk, naming the cluster, the other entry and
 * fsck.vfat / chkdsk /f; the unedited volume plans read-write.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { planOnVolume, pseudoRandom, sh, tmpDir } from './helpers.ts';

const KiB = 1024;
let dir: string;
let base: Buffer;

interface Geometry { clusterBytes: number; dataOffset: number; rootCluster: number }

function geometry(img: Buffer): Geometry {
  const bps = img.readUInt16LE(11);
  const reserved = img.readUInt16LE(14);
  const fats = img[16]!;
  const fatSectors = img.readUInt32LE(36);
  return { clusterBytes: bps * img[13]!, dataOffset: (reserved + fats * fatSectors) * bps, rootCluster: img.readUInt32LE(44) };
}

/** The byte offset of the 8.3 entry `name83` (11 bytes, space-padded) in the directory starting at `cluster` (its first cluster). */
function entryAt(img: Buffer, cluster: number, name83: string): number {
  const g = geometry(img);
  const at = g.dataOffset + (cluster - 2) * g.clusterBytes;
  for (let pos = at; pos < at + g.clusterBytes; pos += 32) if (img.toString('latin1', pos, pos + 11) === name83) return pos;
  throw new Error(`${name83} is not in the directory at cluster ${cluster}`);
}

function firstCluster(img: Buffer, entry: number): number {
  return img.readUInt16LE(entry + 20) * 65536 + img.readUInt16LE(entry + 26);
}

/** A copy of the volume whose entry at byte `entry` starts at cluster `c`. */
function withFirst(entry: number, c: number): Buffer {
  const img = Buffer.from(base);
  img.writeUInt16LE(c >>> 16, entry + 20);
  img.writeUInt16LE(c & 0xffff, entry + 26);
  return img;
}

function plan(img: Buffer, file: string): string {
  return planOnVolume(dir, img, { ext: 'vfat', label: 'USB', file });
}

beforeAll(() => {
  dir = tmpDir();
  const vol = path.join(dir, 'usb.vfat');
  sh('truncate', ['-s', '40M', vol]);
  sh('mkfs.vfat', ['-F', '32', '-n', 'USB', vol]);
  const put = (name: string, bytes: Buffer, to: string) => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, bytes);
    sh('mcopy', ['-i', vol, f, to]);
  };
  sh('mmd', ['-i', vol, '::/VMS']);
  put('A.RAW', pseudoRandom(64 * KiB, 1), '::/A.RAW');
  put('B.RAW', pseudoRandom(8 * KiB, 2), '::/B.RAW');
  put('C.RAW', pseudoRandom(16 * KiB, 3), '::/VMS/C.RAW');
  base = fs.readFileSync(vol);
}, 120_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('FAT32 cross-links: another entry starting inside the image\'s chain', () => {
  it('the volume as made: every file is proven its own, and the image plans read-write', () => {
    const v = openHostFs(bytesReader('usb', base))!;
    v.proveOwnership!(['/A.RAW', '/B.RAW', '/VMS/C.RAW'].map((p) => v.lookup(p)));
    expect(plan(base, '/A.RAW')).toMatch(/^planned: .*"mode":"rw"/);
  });

  it('an entry in a subdirectory starting in the middle of the image\'s chain: the image and that file are refused, naming the cluster', () => {
    const g = geometry(base);
    const a = firstCluster(base, entryAt(base, g.rootCluster, 'A       RAW'));
    const vms = firstCluster(base, entryAt(base, g.rootCluster, 'VMS        '));
    // C.RAW made to start where the image's last 16 KiB begin: its chain is the image's own
    // tail and ends with it, so no FAT entry changes and C.RAW reads as a sound file
    const inside = a + (64 * KiB - 16 * KiB) / g.clusterBytes;
    const img = withFirst(entryAt(base, vms, 'C       RAW'), inside);
    const v = openHostFs(bytesReader('usb', img))!;
    expect(v.lookup('/VMS/C.RAW').extents).toEqual([{ kind: 'data', fileOffset: 0, length: 16 * KiB, deviceOffset: g.dataOffset + (inside - 2) * g.clusterBytes }]);
    const msg = plan(img, '/A.RAW');
    expect(msg).toContain(`/A.RAW: its cluster ${inside} is also the first cluster of /VMS/C.RAW`);
    expect(msg).toContain('fsck.vfat or chkdsk /f');
    // C.RAW itself: the FAT already shows its first cluster reached from the image's chain
    expect(plan(img, '/VMS/C.RAW')).toContain(`/VMS/C.RAW: its cluster ${inside} is also reached from cluster ${inside - 1}`);
  });

  it('a second entry starting at the image\'s first cluster (one chain, two names) is refused too', () => {
    const g = geometry(base);
    const a = firstCluster(base, entryAt(base, g.rootCluster, 'A       RAW'));
    const img = withFirst(entryAt(base, g.rootCluster, 'B       RAW'), a);
    expect(plan(img, '/A.RAW')).toContain(`/A.RAW: its cluster ${a} is also the first cluster of /B.RAW`);
  });

  it('a directory whose first cluster is inside the image is refused, named as a directory', () => {
    const g = geometry(base);
    const a = firstCluster(base, entryAt(base, g.rootCluster, 'A       RAW'));
    const vmsEntry = entryAt(base, g.rootCluster, 'VMS        ');
    const img = withFirst(vmsEntry, a + 2);
    expect(plan(img, '/A.RAW')).toContain(`/A.RAW: its cluster ${a + 2} is also the first cluster of /VMS (a directory)`);
  });
});
