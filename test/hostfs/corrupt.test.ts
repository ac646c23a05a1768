import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { bytesReader, isFormatError } from '../../src/formats/block-reader.ts';
import { pseudoRandom, run, tmpDir } from './helpers.ts';
import { mkntfs, ntfscp } from './ntfs-oracle.ts';
import { writeExfatFiles } from '../../qemu/exfat-writer.ts';

/** Damaged volumes per filesystem: 1000 in npm test, FUZZ_CASES under npm run fuzz. */
const ROUNDS = Number(process.env['FUZZ_CASES'] ?? 1000);

let dir: string;
beforeAll(() => { dir = tmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

/**
 * Damages a few bytes inside `regions` of a real volume, many times over, and uses the
 * volume each time: every failure must be a FormatError (a message for the user),
 * never a TypeError, a RangeError from a huge allocation, or a hang.
 */
async function fuzz(image: Buffer, regions: [number, number][], names: string[], rounds: number): Promise<{ formatErrors: number; survived: number }> {
  let seed = 12345;
  const rnd = (n: number): number => {
    seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0;
    return seed % n;
  };
  let formatErrors = 0;
  let survived = 0;
  for (let round = 0; round < rounds; round++) {
    // let the test runner's messages through during long runs (npm run fuzz)
    if (round % 250 === 249) await new Promise((done) => setImmediate(done));
    const saved: [number, number][] = [];
    for (let k = 1 + rnd(4); k > 0; k--) {
      const [start, end] = regions[rnd(regions.length)]!;
      const at = start + rnd(end - start);
      saved.push([at, image[at]!]);
      image[at] = rnd(256);
    }
    try {
      const fsys = openHostFs(bytesReader('fuzz.img', image));
      if (fsys) {
        fsys.writeBlocker();
        fsys.readdir('/');
        const found = [];
        for (const n of names) {
          const f = fsys.lookup(n);
          fsys.readFile(f, 0, Math.min(f.size, 1 << 20));
          found.push(f);
        }
        // the ownership proof a direct map runs first (a whole-volume pass) meets the damage too
        fsys.proveOwnership?.(found);
      }
      survived++;
    } catch (e) {
      if (!isFormatError(e)) throw new Error(`round ${round}: ${String(e)} after damaging bytes ${saved.map(([a]) => a).join(', ')}`);
      formatErrors++;
    }
    for (const [at, v] of saved.reverse()) image[at] = v;
  }
  return { formatErrors, survived };
}

describe('damaged volumes fail with FormatError, never a crash', () => {
  it('NTFS: random damage to MFT records and index blocks', async () => {
    const img = path.join(dir, 'n.img');
    mkntfs(img, 16, 4096);
    const files: Record<string, Buffer> = {};
    for (let i = 0; i < 40; i++) files[`file number ${i}.bin`] = pseudoRandom(i % 2 ? 300 : 20_000, i + 1);
    ntfscp(img, files, dir);
    const image = fs.readFileSync(img);
    const mftLcn = +run('ntfsinfo', ['-m', img]).toString().match(/LCN of Data Attribute for FILE_MFT: (\d+)/)![1]!;
    const regions: [number, number][] = [[mftLcn * 4096, mftLcn * 4096 + 80 * 1024]];
    for (let at = image.indexOf('INDX'); at >= 0; at = image.indexOf('INDX', at + 4096)) {
      if (at % 4096 === 0) regions.push([at, at + 4096]);
    }
    expect(regions.length).toBeGreaterThan(1); // the root index outgrew its record
    const r = await fuzz(image, regions, ['/file number 0.bin', '/FILE NUMBER 39.BIN', '/file number 17.bin'], ROUNDS);
    expect(r.formatErrors).toBeGreaterThan(0);
    expect(r.survived).toBeGreaterThan(0);
  });

  it('FAT16 and exFAT: random damage to the boot sector, FAT and directories', async () => {
    const fat = path.join(dir, 'f.img');
    fs.writeFileSync(fat, Buffer.alloc(0));
    fs.truncateSync(fat, 16 << 20);
    run('mkfs.vfat', ['-F', '16', fat]);
    const src = path.join(dir, 'long file name.bin');
    fs.writeFileSync(src, pseudoRandom(100_000, 4));
    run('mmd', ['-i', fat, '::/A Folder'], { env: { LC_ALL: 'C.UTF-8' } });
    run('mcopy', ['-i', fat, src, '::/A Folder/long file name.bin'], { env: { LC_ALL: 'C.UTF-8' } });
    const image = fs.readFileSync(fat);
    const r = await fuzz(image, [[0, 512], [512, 256 * 1024]], ['/A Folder/long file name.bin'], ROUNDS);
    expect(r.formatErrors + r.survived).toBe(ROUNDS);

    const ex = path.join(dir, 'x.img');
    fs.writeFileSync(ex, Buffer.alloc(0));
    fs.truncateSync(ex, 16 << 20);
    run('mkfs.exfat', ['-c', '4096', ex]);
    writeExfatFiles(ex, { '/Folder/long file name.bin': pseudoRandom(100_000, 5), '/small.bin': pseudoRandom(3000, 6) }, ['/Folder']);
    const ximage = fs.readFileSync(ex);
    // the FAT, the bitmap, the up-case table and the root directory all lie in the first MiB
    const rx = await fuzz(ximage, [[0, 512], [512 * 12, 1 << 20]], ['/Folder/long file name.bin', '/small.bin'], ROUNDS);
    expect(rx.formatErrors + rx.survived).toBe(ROUNDS);
  });
});
