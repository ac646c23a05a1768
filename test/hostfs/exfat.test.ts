import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostFileReader, type HostFs } from '../../src/formats/host-volume.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { fileReader, fuseWorks, pseudoRandom, run, tmpDir, unmount } from './helpers.ts';

let dir: string;
beforeAll(() => { dir = tmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

function mkexfat(img: string, mib: number, clusterSize: number, label: string): void {
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, mib << 20);
  run('mkfs.exfat', ['-c', String(clusterSize), '-L', label, img]);
}

function open(img: string): HostFs {
  const fsys = openHostFs(fileReader(img));
  expect(fsys?.type).toBe('exfat');
  return fsys!;
}

/**
 * exfatprogs cannot put files into a volume, and exfat-fuse insists on a block device
 * (its "blkdev" FUSE option): the volume is attached to a loop device for the fill.
 */
function loopAndFuseWork(): boolean {
  if (!fuseWorks() || !fs.existsSync('/usr/sbin/mount.exfat-fuse')) return false;
  const r = spawnSync('losetup', ['-f'], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.startsWith('/dev/loop');
}

function withExfatMount(img: string, fill: (mnt: string) => void): void {
  const loop = run('losetup', ['-f', '--show', img]).toString().trim();
  try {
    const mnt = fs.mkdtempSync(path.join(dir, 'mnt-'));
    run('mount.exfat-fuse', [loop, mnt]);
    try { fill(mnt); } finally { unmount(mnt); }
  } finally {
    run('losetup', ['-d', loop]);
  }
}

describe('exFAT (mkfs.exfat)', () => {
  it('an empty volume: its label and cluster size as dump.exfat reports them, an empty root', () => {
    const img = path.join(dir, 'empty.img');
    mkexfat(img, 16, 32768, 'Leer');
    const dump = run('dump.exfat', [img]).toString();
    const fsys = open(img);
    expect(fsys.label).toBe(dump.match(/Volume label:\s+(.*)/)![1]!.trim());
    expect(fsys.clusterSize).toBe(+dump.match(/Cluster size:\s+(\d+)/)![1]!);
    expect(fsys.readdir('/')).toEqual([]);
    expect(fsys.writeBlocker()).toBeNull();
    const err = (() => { try { fsys.lookup('/disk.vhd'); } catch (e) { return e as Error; } return null; })()!;
    expect(isFormatError(err)).toBe(true);
    expect(err.message).toContain('/disk.vhd not found');
  });

  it('the VolumeDirty flag (set while a driver has it mounted) blocks writing', () => {
    const img = path.join(dir, 'dirty.img');
    mkexfat(img, 16, 4096, 'Dirty');
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, Buffer.from([0x02]), 0, 1, 106); // VolumeFlags: outside the boot checksum, as the spec intends
    fs.closeSync(fd);
    expect(open(img).writeBlocker()).toMatch(/dirty.*fsck\.exfat/s);
  });

  it('a damaged boot region (checksum mismatch) is refused', () => {
    const img = path.join(dir, 'badboot.img');
    mkexfat(img, 16, 4096, 'Bad');
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, Buffer.from([0x07]), 0, 1, 100); // VolumeSerialNumber: inside the checksum
    fs.closeSync(fd);
    expect(() => openHostFs(fileReader(img))).toThrow(/checksum/);
  });
});

describe.skipIf(!loopAndFuseWork())('exFAT volumes filled through exfat-fuse', () => {
  it('contiguous and FAT-chained files, non-ASCII names through the up-case table, a multi-cluster directory', () => {
    const img = path.join(dir, 'stick.img');
    mkexfat(img, 64, 4096, 'MyStick');
    const image = pseudoRandom(3_000_000, 1);
    const fragmented = pseudoRandom(2_000_000, 2);
    const names: string[] = [];
    let listing: string[] = [];
    let vmsListing: string[] = [];
    withExfatMount(img, (m) => {
      fs.mkdirSync(path.join(m, 'Users/Jörg/VMs'), { recursive: true });
      fs.writeFileSync(path.join(m, 'Users/Jörg/VMs/My Linux.vhdx'), image);
      // two files growing in turns, 4 KiB at a time: their clusters interleave, so the FAT chains them
      const a = fs.openSync(path.join(m, 'Users/Jörg/VMs/Ζ fragmentiert.img'), 'w');
      const b = fs.openSync(path.join(m, 'Users/Jörg/VMs/other.bin'), 'w');
      for (let o = 0; o < fragmented.length; o += 4096) {
        fs.writeSync(a, fragmented, o, Math.min(4096, fragmented.length - o));
        fs.writeSync(b, Buffer.alloc(4096, 0xaa));
      }
      fs.closeSync(a);
      fs.closeSync(b);
      fs.mkdirSync(path.join(m, 'many'));
      for (let i = 0; i < 300; i++) {
        const n = `Eintrag mit einem recht langen Namen Nummer ${i} äöü.txt`;
        names.push(n);
        fs.writeFileSync(path.join(m, 'many', n), n);
      }
      listing = fs.readdirSync(path.join(m, 'many'));
      vmsListing = fs.readdirSync(path.join(m, 'Users/Jörg/VMs'));
    });
    expect(run('fsck.exfat', ['-n', img]).toString()).toMatch(/clean/);

    const fsys = open(img);
    expect(fsys.label).toBe('MyStick');
    const f = fsys.lookup('users\\JÖRG\\vms\\MY LINUX.VHDX');
    expect(f.path).toBe('/Users/Jörg/VMs/My Linux.vhdx');
    expect(f.extents.length).toBe(1);
    expect(Buffer.from(hostFileReader(fsys, f).read(0, f.size)).equals(image)).toBe(true);

    // Greek capital zeta: only the volume's up-case table says ζ and Ζ are one letter
    const g = fsys.lookup('/Users/Jörg/VMs/ζ FRAGMENTIERT.IMG');
    expect(g.path).toBe('/Users/Jörg/VMs/Ζ fragmentiert.img');
    expect(g.extents.length).toBeGreaterThan(100);
    expect(Buffer.from(hostFileReader(fsys, g).read(0, g.size)).equals(fragmented)).toBe(true);
    // a read across extent boundaries
    expect(Buffer.from(fsys.readFile(g, 4000, 10_000)).equals(fragmented.subarray(4000, 14_000))).toBe(true);

    expect(fsys.readdir('/Users/Jörg/VMs').map((e) => e.name).sort()).toEqual(vmsListing.sort());
    const many = fsys.readdir('/many');
    expect(many.map((e) => e.name).sort()).toEqual(listing.sort());
    for (const n of [names[0]!, names[150]!, names[299]!]) {
      const h = fsys.lookup(`/many/${n}`);
      expect(Buffer.from(fsys.readFile(h, 0, h.size)).toString()).toBe(n);
    }
    const err = (() => { try { fsys.lookup('/Users/Jörg/VMs/My Linux.vhd'); } catch (e) { return e as Error; } return null; })()!;
    expect(err.message).toContain('/Users/Jörg/VMs has no "My Linux.vhd"');
    expect(err.message).toContain('"My Linux.vhdx"');
  });

  it('bytes past the valid data length are uninitialized extents and read as zeros (ValidDataLength lowered by hand, fsck.exfat still clean)', () => {
    // exfat-fuse always zero-fills, so no tool here leaves ValidDataLength short of the
    // size (Windows and Linux's exfat driver do, after a preallocation). The test lowers
    // that one field of a real entry set and fixes its checksum; fsck.exfat confirms the
    // volume is still consistent.
    const img = path.join(dir, 'vdl.img');
    mkexfat(img, 16, 4096, 'VDL');
    const data = pseudoRandom(200_000, 8);
    withExfatMount(img, (m) => fs.writeFileSync(path.join(m, 'prealloc.img'), data));
    const image = fs.readFileSync(img);
    const nameAt = image.indexOf(Buffer.from('prealloc.img', 'utf16le'));
    const set = nameAt - 2 - 64; // file entry, stream extension, then the name entry (its name at byte 2)
    expect(image[set]).toBe(0x85);
    expect(image[set + 32]).toBe(0xc0);
    image.writeBigUInt64LE(50_000n, set + 32 + 8);
    const count = image[set + 1]! + 1;
    let sum = 0;
    for (let i = 0; i < count * 32; i++) {
      if (i === 2 || i === 3) continue;
      sum = (((sum & 1) ? 0x8000 : 0) + (sum >> 1) + image[set + i]!) & 0xffff;
    }
    image.writeUInt16LE(sum, set + 2);
    fs.writeFileSync(img, image);
    expect(run('fsck.exfat', ['-n', img]).toString()).toMatch(/clean/);

    const fsys = open(img);
    const f = fsys.lookup('/PREALLOC.IMG');
    expect(f.size).toBe(200_000);
    expect(f.extents.map((e) => [e.kind, e.fileOffset, e.length])).toEqual([['data', 0, 50_000], ['uninitialized', 50_000, 150_000]]);
    const u = f.extents[1]! as { deviceOffset?: number };
    expect(u.deviceOffset).toBe((f.extents[0] as { deviceOffset: number }).deviceOffset + 50_000);
    const got = Buffer.from(hostFileReader(fsys, f).read(0, f.size));
    expect(got.subarray(0, 50_000).equals(data.subarray(0, 50_000))).toBe(true);
    expect(got.subarray(50_000).every((b) => b === 0)).toBe(true);
  });
});
