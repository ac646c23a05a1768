/**
 * `vdboot plan` against an NTFS host disk whose image sets were crafted to break the
 * promise "a mapping never points outside the image file's own extents" (issue #14):
 * runlists edited to point at $MFT or at another file's clusters (cross-links $Bitmap
 * cannot see), one file under two spellings, paths leaving the image's folder. Each is
 * refused for rw and ro alike, naming the file, the other owner and what to do.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planAgainstDevices } from '../../src/cli/plan.ts';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { openNtfs } from '../../src/formats/ntfs.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { BASIC_DATA, devicesOf, loadNtfsMkdir, makeHostDisk, makeNtfs, pseudoRandom, sh, tmpDir } from './helpers.ts';

let dir: string;
let hostDisk: string;
let fatDisk: string;
let xdllRecord = 0;

const KiB = 1024;

/**
 * Points the (single) run of `file`'s $DATA at cluster `lcn`, in the volume image: the
 * edit a damaged or hostile runlist makes. A fresh mkntfs volume has a contiguous $MFT.
 */
function pointRunAt(ntfsImg: string, file: string, lcn: number): void {
  const buf = fs.readFileSync(ntfsImg);
  const vol = openNtfs(bytesReader(ntfsImg, buf));
  const no = Number(/^ntfs:(\d+)$/.exec(vol.lookup(file).id!)![1]);
  const at = vol.boot.mftLcn * vol.clusterSize + no * vol.boot.mftRecordSize;
  let pos = at + buf.readUInt16LE(at + 0x14);
  while (buf.readUInt32LE(pos) !== 0x80) pos += buf.readUInt32LE(pos + 4);
  expect(buf[pos + 8], `${file} is non-resident`).toBe(1);
  const rl = pos + buf.readUInt16LE(pos + 0x20);
  const lenSize = buf[rl]! & 15;
  const ofsSize = buf[rl]! >> 4;
  expect(buf[rl + 1 + lenSize + ofsSize], `${file} has one run`).toBe(0);
  expect(rl + 1 + lenSize + ofsSize - at).toBeLessThan(510); // clear of the first fixup
  expect(lcn).toBeLessThan(2 ** (8 * ofsSize - 1));
  for (let i = 0; i < ofsSize; i++) buf[rl + 1 + lenSize + i] = Math.floor(lcn / 256 ** i) & 255;
  fs.writeFileSync(ntfsImg, buf);
}

beforeAll(async () => {
  await loadNtfsMkdir();
  dir = tmpDir();
  const src = (name: string, bytes: Buffer) => {
    const p = path.join(dir, name);
    fs.writeFileSync(p, bytes);
    return p;
  };
  const ntfs = makeNtfs(dir, 'host', 40, 'Host', {
    '/Windows/x.dll': src('x.dll', pseudoRandom(32 * KiB, 1)),
    '/Windows/y.bin': src('y.bin', pseudoRandom(32 * KiB, 6)),
    '/VMs/linux.raw': src('linux.raw', pseudoRandom(32 * KiB, 2)),
    '/VMs/mft.raw': src('mft.raw', pseudoRandom(32 * KiB, 3)),
    '/VMs/dll.raw': src('dll.raw', pseudoRandom(32 * KiB, 4)),
    '/VMs/d.raw': src('d.raw', pseudoRandom(32 * KiB, 5)),
    '/VMs/case.vmdk': src('case.vmdk', Buffer.from('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 64 FLAT "d.raw" 0\nRW 64 FLAT "D.RAW" 0\n')),
    '/VMs/abs.vmdk': src('abs.vmdk', Buffer.from('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 64 FLAT "/Windows/y.bin" 0\n')),
    '/VMs/case2.vmdk': src('case2.vmdk', Buffer.from('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 64 FLAT "../vms/D.raw" 0\n')),
    '/VMs/up.vmdk': src('up.vmdk', Buffer.from('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 64 FLAT "../Windows/y.bin" 0\n')),
  }, ['/Windows', '/VMs']);
  const vol = openNtfs(bytesReader(ntfs, fs.readFileSync(ntfs)));
  const dll = vol.lookup('/Windows/x.dll');
  xdllRecord = Number(dll.id!.slice(5));
  const dllLcn = (dll.extents[0] as { deviceOffset: number }).deviceOffset / vol.clusterSize;
  pointRunAt(ntfs, '/VMs/mft.raw', vol.boot.mftLcn);
  pointRunAt(ntfs, '/VMs/dll.raw', dllLcn);
  hostDisk = makeHostDisk(dir, 'host', [{ image: ntfs, type: BASIC_DATA }]);

  // FAT32: b.raw's chain (2 clusters) is made to end in a.raw's last cluster, as a cross-link leaves it.
  const fat = path.join(dir, 'usb.vfat');
  sh('truncate', ['-s', '34M', fat]);
  sh('mkfs.vfat', ['-F', '32', '-n', 'USB', fat]);
  const cs0 = fs.readFileSync(fat).subarray(0, 512);
  const clusterBytes = cs0.readUInt16LE(11) * cs0[13]!;
  sh('mcopy', ['-i', fat, src('a.raw', pseudoRandom(64 * KiB, 7)), '::/a.raw']);
  sh('mcopy', ['-i', fat, src('b.raw', pseudoRandom(2 * clusterBytes, 8)), '::/b.raw']);
  const img = fs.readFileSync(fat);
  const reserved = img.readUInt16LE(14);
  const fats = img[16]!;
  const fatSectors = img.readUInt32LE(36);
  const dataOffset = (reserved + fats * fatSectors) * 512;
  const usb = openHostFs(bytesReader(fat, img))!;
  const clusterOf = (off: number) => (off - dataOffset) / clusterBytes + 2;
  const a = usb.lookup('/a.raw');
  const lastA = a.extents[a.extents.length - 1] as { deviceOffset: number; length: number };
  const aLast = clusterOf(lastA.deviceOffset + lastA.length - clusterBytes);
  const bFirst = clusterOf((usb.lookup('/b.raw').extents[0] as { deviceOffset: number }).deviceOffset);
  for (let k = 0; k < fats; k++) img.writeUInt32LE(aLast, (reserved + k * fatSectors) * 512 + bFirst * 4);
  fs.writeFileSync(fat, img);
  fatDisk = makeHostDisk(dir, 'usb', [{ image: fat, type: BASIC_DATA }]);
}, 120_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function planError(cmdline: string, opts: { allowOutside?: boolean } = {}, disks = [hostDisk]): string {
  const d = devicesOf(disks);
  try {
    planAgainstDevices(cmdline, d.devices, opts);
  } catch (e) {
    return (e as Error).message;
  } finally {
    d.close();
  }
  throw new Error(`${cmdline}: planned without error`);
}

function planned(cmdline: string, opts: { allowOutside?: boolean } = {}) {
  const d = devicesOf([hostDisk]);
  try {
    return planAgainstDevices(cmdline, d.devices, opts);
  } finally {
    d.close();
  }
}

const attach = (p: string, mode: string) => `root=/dev/sda1 rd.vdisk.attach=LABEL=Host:${p} rd.vdisk.mode=${mode}`;

describe('NTFS cross-links: a file\'s clusters must be its own', () => {
  it('an untouched file plans direct, rw', () => {
    expect(planned(attach('/VMs/linux.raw', 'rw')).vdisks[0]!.path).toBe('direct');
  });

  for (const mode of ['rw', 'ro', 'snapshot']) {
    it(`a runlist pointing at $MFT is refused (${mode}), naming $MFT and chkdsk /f`, () => {
      const msg = planError(attach('/VMs/mft.raw', mode));
      expect(msg).toMatch(/\/VMs\/mft\.raw: its cluster \d+ also belongs to \$MFT \(MFT record 0\)/);
      expect(msg).toContain('chkdsk /f');
    });
  }

  for (const mode of ['rw', 'ro']) {
    it(`a runlist pointing at another file's clusters is refused (${mode}), naming that file and its record`, () => {
      const msg = planError(attach('/VMs/dll.raw', mode));
      expect(msg).toMatch(new RegExp(`/VMs/dll\\.raw: its cluster \\d+ also belongs to /Windows/x\\.dll \\(MFT record ${xdllRecord}\\)`));
      expect(msg).toContain('chkdsk /f');
    });
  }

  it('the other file, looked at alone, is refused too: the cross-link is seen from both sides', () => {
    expect(planError(attach('/Windows/x.dll', 'ro'))).toMatch(/\/Windows\/x\.dll: its cluster \d+ also belongs to \/VMs\/dll\.raw/);
  });
});

describe('image sets on NTFS: identity and confinement', () => {
  it('D.RAW and d.raw are one file (one MFT record): mapping both is refused', () => {
    expect(planError(attach('/VMs/case.vmdk', 'ro'))).toContain('mapped onto the same bytes of /VMs/d.raw');
  });

  it('"../vms/D.raw" from /VMs is inside the folder: NTFS names differ in case only', () => {
    expect(planned(attach('/VMs/case2.vmdk', 'ro')).vdisks[0]!.path).toBe('direct');
  });

  it('a VMDK extent "/Windows/y.bin" or "../Windows/y.bin" is refused, naming the path and rd.vdisk.allow-outside=1', () => {
    for (const p of ['/VMs/abs.vmdk', '/VMs/up.vmdk']) {
      const msg = planError(attach(p, 'rw'));
      expect(msg).toContain('names /Windows/y.bin');
      expect(msg).toContain("the image's folder /VMs");
      expect(msg).toContain('rd.vdisk.allow-outside=1');
    }
  });

  it('rd.vdisk.allow-outside=1 (or --allow-outside) lets the person open it', () => {
    expect(planned(`${attach('/VMs/abs.vmdk', 'ro')} rd.vdisk.allow-outside=1`).vdisks[0]!.path).toBe('direct');
    expect(planned(attach('/VMs/up.vmdk', 'ro'), { allowOutside: true }).vdisks[0]!.path).toBe('direct');
  });
});

describe('FAT32 cross-links: another chain joining the file\'s chain', () => {
  it('both files of a cross-link are refused, naming the clusters and fsck.vfat / chkdsk /f', () => {
    for (const f of ['/a.raw', '/b.raw']) {
      const msg = planError(`root=/dev/sda1 rd.vdisk.attach=LABEL=USB:${f} rd.vdisk.mode=ro`, {}, [fatDisk]);
      expect(msg).toMatch(new RegExp(`${f.replace('.', '\\.')}: its cluster \\d+ is also reached from cluster \\d+`));
      expect(msg).toContain('chkdsk /f');
    }
  });
});
