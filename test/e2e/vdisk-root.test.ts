/**
 * End to end: root=vdisk: under QEMU. A guest disk (GPT, root partition of type
 * "Linux root (x86-64)" with ext4) is converted by qemu-img and copied onto an NTFS
 * partition (mkntfs + ntfscp); vdboot's initramfs maps it with device-mapper straight
 * onto the NTFS partition's sectors, the guest writes a file, hands over to
 * /run/initramfs/shutdown (as a guest without systemd does), and on the host the image
 * passes `qemu-img check`, holds the file, and the NTFS volume is still clean.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsRead } from '../../qemu/disks.ts';
import { buildGuestRoot, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { sliceReader } from '../../src/formats/partitions.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';

const BASIC_DATA = 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';
const ROOT_TYPE = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';
const NOTE = 'written by the guest on a vdisk root';

let dir: string;
let initrd: string;
let guestRaw: string;
const vms: Vm[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-vdisk-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  const rootDir = join(dir, 'root');
  buildGuestRoot(rootDir, { writeFile: { path: '/home/note.txt', content: NOTE }, then: { exec: '/run/initramfs/shutdown poweroff' } });
  const fsImg = join(dir, 'root.ext4');
  makeExt4(fsImg, { sizeMiB: 24, label: 'vdisk root', fromDir: rootDir });
  guestRaw = join(dir, 'guest.raw');
  makePartitionedDisk(guestRaw, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fsImg, type: ROOT_TYPE, name: 'linux' }] });
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

/** The host disk: one NTFS partition "Windows" holding the image at `path`. */
function hostDisk(name: string, image: string, path: string): { disk: string; ntfsOffset: number; ntfsSize: number } {
  const ntfs = join(dir, `${name}.ntfs`);
  makeNtfs(ntfs, { sizeMiB: 120, label: 'Windows', files: { [path]: { hostFile: image } } });
  const disk = join(dir, `${name}.img`);
  const layout = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });
  return { disk, ntfsOffset: layout[0]!.offset, ntfsSize: layout[0]!.size };
}

/** Copies the NTFS partition out of the host disk (to read it with ntfs-3g's tools). */
function extractPartition(disk: string, offset: number, size: number, out: string): string {
  const bytes = readFileSync(disk).subarray(offset, offset + size);
  writeFileSync(out, bytes);
  return out;
}

/** The guest's file, read from the image on the host: qemu-img convert, then debugfs on the root partition. */
function fileInImage(image: string, format: string, guestPath: string): string {
  const raw = join(dir, `check-${Date.now()}.raw`);
  execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', image, raw]);
  const part = join(dir, `check-${Date.now()}.ext4`);
  // root partition: 3 MiB in (1 MiB alignment, 2 MiB ESP), as makePartitionedDisk lays it out
  execFileSync('dd', [`if=${raw}`, `of=${part}`, 'bs=1M', 'skip=3', 'status=none']);
  const out = execFileSync('debugfs', ['-R', `cat ${guestPath}`, part], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  rmSync(raw);
  rmSync(part);
  return out;
}

describe('end to end: root=vdisk: on an NTFS partition, direct path', { timeout: 420_000 }, () => {
  for (const c of [
    { format: 'qcow2', qemuFormat: 'qcow2', options: ['preallocation=metadata'], file: '/VMs/My Linux.qcow2' },
    { format: 'vhdx', qemuFormat: 'vhdx', options: ['subformat=fixed'], file: '/VMs/linux.vhdx' },
    { format: 'raw', qemuFormat: 'raw', options: [], file: '/linux.img' },
  ]) {
    it(`${c.format}: boots rw, the guest writes a file, the shutdown hand-off runs; qemu-img check passes and the file is in the image`, async () => {
      const image = join(dir, `image.${c.format}`);
      convertImage(guestRaw, image, c.qemuFormat, c.options);
      const host = hostDisk(c.format, image, c.file);
      const vm = await bootVm({
        initrd,
        append: `"root=vdisk:LABEL=Windows:${c.file}" rw`,
        disks: [{ file: host.disk, interface: 'virtio-blk' }],
        name: `vdisk-${c.format}`,
      });
      vms.push(vm);
      await vm.waitFor(GUEST_MARKER, 240_000);
      const facts = parseGuestFacts(vm.transcript());
      expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
      expect(facts.wrote).toBe('/home/note.txt');
      await vm.waitExit(120_000);
      const t = vm.transcript();
      expect(t).toMatch(/vdisk0: .* direct: the image is fully mappable/);
      expect(t).toMatch(/shutdown hand-off \(poweroff\)/);
      expect(t).toMatch(/removed \/dev\/mapper\/vdisk0\r?\n/);
      // On the host: the image out of NTFS, checked and read by qemu-img.
      const ntfs = extractPartition(host.disk, host.ntfsOffset, host.ntfsSize, join(dir, `${c.format}-after.ntfs`));
      const after = join(dir, `after.${c.format}`);
      writeFileSync(after, ntfsRead(ntfs, c.file));
      if (c.format !== 'raw') execFileSync('qemu-img', ['check', '-f', c.qemuFormat, after]);
      expect(fileInImage(after, c.qemuFormat, '/home/note.txt')).toBe(NOTE);
      // NTFS itself was never written: no dirty flag, no hibernation.
      const r = openFileReader(host.disk);
      try {
        const fs = openHostFs(sliceReader(r, host.ntfsOffset, host.ntfsSize, 'ntfs'));
        expect(fs?.writeBlocker()).toBeNull();
      } finally {
        r.close();
      }
    });
  }
});
