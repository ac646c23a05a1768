import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { bytesReader, isFormatError } from '../../src/formats/block-reader.ts';
import { firstClearBit } from '../../src/formats/ntfs.ts';
import { pseudoRandom, tmpDir } from './helpers.ts';
import { mkntfs, ntfscp } from './ntfs-oracle.ts';

let dir: string;
beforeAll(() => { dir = tmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

describe('NTFS: a file is mapped only onto clusters $Bitmap gives it', () => {
  it('firstClearBit finds the first 0 bit LSB-first at any alignment', () => {
    const bits = new Uint8Array(64).fill(0xff);
    expect(firstClearBit(bits, 0, 512)).toBe(-1);
    for (const hole of [0, 5, 8, 13, 200, 511]) {
      bits.fill(0xff);
      bits[hole >> 3]! &= ~(1 << (hole & 7));
      for (const from of [0, 3, 8, 9]) {
        const expected = hole >= from ? hole : -1;
        expect(firstClearBit(bits, from, 512 - from), `hole ${hole} from ${from}`).toBe(expected);
      }
      // a range that ends before the hole sees none
      if (hole > 0) expect(firstClearBit(bits, 0, hole)).toBe(-1);
    }
  });

  it('a file whose cluster is marked free in $Bitmap is refused with the cluster and chkdsk', () => {
    const img = path.join(dir, 'n.img');
    mkntfs(img, 16, 4096);
    const body = pseudoRandom(300_000, 7);
    ntfscp(img, { 'disk.img': body }, dir);
    const image = fs.readFileSync(img);
    const volume = openHostFs(bytesReader('n.img', image))!;
    const file = volume.lookup('/disk.img');
    expect(Buffer.from(volume.readFile(file, 0, file.size)).equals(body)).toBe(true);
    const data = file.extents.filter((e) => e.kind === 'data');
    expect(data.length).toBeGreaterThan(0);
    // clear the $Bitmap bit of the file's last cluster
    const last = data[data.length - 1]!;
    const cluster = Math.floor((last.deviceOffset! + last.length - 1) / 4096);
    const bitmap = volume.lookup('/$Bitmap');
    const bitmapBytes = volume.readFile(bitmap, 0, bitmap.size);
    expect(bitmapBytes[cluster >> 3]! & (1 << (cluster & 7))).not.toBe(0);
    let at = -1;
    for (const e of bitmap.extents) {
      if (e.kind === 'data' && (cluster >> 3) >= e.fileOffset && (cluster >> 3) < e.fileOffset + e.length) at = e.deviceOffset + ((cluster >> 3) - e.fileOffset);
    }
    expect(at).toBeGreaterThan(0);
    image[at] = image[at]! & ~(1 << (cluster & 7));
    const damaged = openHostFs(bytesReader('n.img', image))!;
    let err: unknown;
    try { damaged.lookup('/disk.img'); } catch (e) { err = e; }
    expect(isFormatError(err)).toBe(true);
    expect(String((err as Error).message)).toContain(`cluster ${cluster} is marked free in $Bitmap`);
    expect(String((err as Error).message)).toContain('chkdsk /f');
  });
});
