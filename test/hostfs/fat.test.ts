import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostFileReader, type HostFile, type HostFs } from '../../src/formats/host-volume.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { fileReader, pseudoRandom, run, tmpDir } from './helpers.ts';

// mtools converts long names through the locale's charset
const env = { LC_ALL: 'C.UTF-8', MTOOLS_SKIP_CHECK: '1' };
const m = (cmd: string, args: string[]): Buffer => run(cmd, args, { env });

let dir: string;
beforeAll(() => { dir = tmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

/** Where cluster 2 starts, from minfo's account of the boot sector (not from vdboot's parser). */
function dataAreaStart(img: string): { offset: number; clusterSize: number } {
  const info = m('minfo', ['-i', img]).toString();
  const num = (re: RegExp): number => +(info.match(re)?.[1] ?? 0);
  const sector = num(/sector size: (\d+) bytes/);
  const fatLen = num(/sectors per fat: (\d+)/) || num(/Big fatlen=(\d+)/);
  const rootSlots = num(/max available root directory slots: (\d+)/);
  const sectors = num(/reserved \(boot\) sectors: (\d+)/) + num(/fats: (\d+)/) * fatLen + Math.ceil((rootSlots * 32) / sector);
  return { offset: sectors * sector, clusterSize: num(/cluster size: (\d+) sectors/) * sector };
}

/** mshowfat's cluster ranges for a file, e.g. "<6-20><31-40>". */
function mshowfat(img: string, p: string): [number, number][] {
  const out = m('mshowfat', ['-i', img, `::${p}`]).toString();
  return [...out.matchAll(/<(\d+)(?:-(\d+))?>/g)].map((x) => [+x[1]!, +(x[2] ?? x[1])!] as [number, number]);
}

function expectSameAsMtools(img: string, fsys: HostFs, f: HostFile): void {
  const want = m('mtype', ['-i', img, `::${f.path}`]);
  expect(Buffer.from(hostFileReader(fsys, f).read(0, f.size)).equals(want)).toBe(true);
  // every cluster where mshowfat says
  const { offset, clusterSize } = dataAreaStart(img);
  const ours: number[] = [];
  for (const e of f.extents) {
    expect(e.kind).toBe('data');
    const dev = (e as { deviceOffset: number }).deviceOffset;
    for (let o = 0; o < e.length; o += clusterSize) ours.push((dev + o - offset) / clusterSize + 2);
  }
  const theirs: number[] = [];
  for (const [a, b] of mshowfat(img, f.path)) for (let c = a; c <= b; c++) theirs.push(c);
  expect(ours).toEqual(theirs);
}

describe('FAT12/16/32 (mkfs.vfat + mtools)', () => {
  for (const [bits, mib] of [[12, 3], [16, 24], [32, 48]] as const) {
    it(`FAT${bits}: long names with spaces and non-ASCII letters, 8.3 aliases, a fragmented file; bytes and clusters match mtools`, () => {
      const img = path.join(dir, `fat${bits}.img`);
      fs.writeFileSync(img, Buffer.alloc(0));
      fs.truncateSync(img, mib << 20);
      run('mkfs.vfat', ['-F', String(bits), '-n', `STICK${bits}`, img]);
      m('mmd', ['-i', img, '::/Users', '::/Users/Jörg', '::/Users/Jörg/VMs']);
      const small: string[] = [];
      for (let i = 0; i < 60; i++) {
        const p = path.join(dir, `f${i}.dat`);
        fs.writeFileSync(p, pseudoRandom(700, i + 1));
        small.push(p);
      }
      m('mcopy', ['-i', img, ...small, '::/Users/']);
      m('mdel', ['-i', img, ...small.filter((_, i) => i % 2 === 0).map((p) => `::/Users/${path.basename(p)}`)]);
      if (bits === 32) {
        // FAT32's FSInfo remembers where allocation left off; "unknown" makes mtools search from the start, into the gaps
        const fd = fs.openSync(img, 'r+');
        fs.writeSync(fd, Buffer.from([0xff, 0xff, 0xff, 0xff]), 0, 4, 512 + 0x1ec);
        fs.closeSync(fd);
      }
      const image = path.join(dir, 'image.bin');
      fs.writeFileSync(image, pseudoRandom(bits === 12 ? 200_000 : 1_500_000, bits));
      m('mcopy', ['-i', img, image, '::/Users/Jörg/VMs/My Linux.vhdx']);
      m('mcopy', ['-i', img, image, '::/Users/Jörg/VMs/Zweite Maschine mit langem Namen.img']);

      const fsys = openHostFs(fileReader(img))!;
      expect(fsys.type).toBe('vfat');
      expect(fsys.label).toBe(`STICK${bits}`);
      expect(fsys.writeBlocker()).toBeNull();
      const f = fsys.lookup('\\users\\JÖRG\\vms\\MY LINUX.VHDX');
      expect(f.path).toBe('/Users/Jörg/VMs/My Linux.vhdx');
      expect(f.extents.length).toBeGreaterThan(1); // it filled the gaps the deleted files left
      expectSameAsMtools(img, fsys, f);
      expectSameAsMtools(img, fsys, fsys.lookup('/Users/Jörg/VMs/zweite maschine mit langem namen.img'));

      // the 8.3 alias mtools generated finds the same file
      const listing = m('mdir', ['-i', img, '::/Users/Jörg/VMs']).toString();
      const alias = listing.match(/^(\S+)\s+(\S+)\s+[\d ]+\s.*My Linux\.vhdx$/m)!;
      expect(fsys.lookup(`/Users/Jörg/VMs/${alias[1]}.${alias[2]}`).extents).toEqual(f.extents);

      const names = fsys.readdir('/Users').map((e) => `${e.name}${e.isDir ? '/' : ''}`).sort();
      const mls = m('mdir', ['-i', img, '-b', '::/Users']).toString().split('\n').filter(Boolean)
        .map((l) => path.posix.basename(l.replace(/\/$/, '')) + (l.endsWith('/') ? '/' : '')).sort();
      expect(names.map((n) => n.toUpperCase())).toEqual(mls.map((n) => n.toUpperCase()));

      const err = (() => { try { fsys.lookup('/Users/Jörg/VMs/My Linux.vhd'); } catch (e) { return e as Error; } return null; })()!;
      expect(isFormatError(err)).toBe(true);
      expect(err.message).toContain('/Users/Jörg/VMs has no "My Linux.vhd"');
      expect(err.message).toContain('"My Linux.vhdx"');
    });
  }

  it('a FAT volume not unmounted cleanly (dirty bit) blocks writing', () => {
    const img = path.join(dir, 'dirty.img');
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 48 << 20);
    run('mkfs.vfat', ['-F', '32', img]);
    const fd = fs.openSync(img, 'r+');
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, 0x41);
    fs.writeSync(fd, Buffer.from([b[0]! | 1]), 0, 1, 0x41); // the bit Linux sets while mounted
    fs.closeSync(fd);
    expect(spawnSync('fsck.vfat', ['-n', img]).stdout.toString()).toMatch(/Dirty bit is set/);
    expect(openHostFs(fileReader(img))!.writeBlocker()).toMatch(/not unmounted cleanly/);
    spawnSync('fsck.vfat', ['-a', '-w', img], { stdio: 'ignore' }); // exits 1: "errors corrected"
    expect(run('fsck.vfat', ['-n', img]).toString()).not.toMatch(/Dirty bit/);
    expect(openHostFs(fileReader(img))!.writeBlocker()).toBeNull();
  });
});
