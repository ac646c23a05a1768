// End to end through the harness, before vdboot's own init exists: Debian's kernel with
// Debian's initramfs-tools image boots the harness's busybox guest from an ext4 disk.
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { makeExfat, makeExt4, makeFat } from '../../qemu/disks.ts';
import { buildGuestRoot, guestFact, parseGuestFacts, shellQuote } from '../../qemu/guest.ts';
import { bootVm, debianInitrd, defaultKernel, kernelVersion, type Vm } from '../../qemu/harness.ts';

let dir: string;
let vm: Vm | undefined;
const exfatFile = crypto.randomBytes(150_000);
const fatFile = crypto.randomBytes(70_000);
const md5 = (b: Uint8Array): string => crypto.createHash('md5').update(b).digest('hex');

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
});
afterAll(async () => {
  await vm?.kill();
  fs.rmSync(dir, { recursive: true, force: true });
});

it('boots Debian kernel + initramfs-tools to the guest init on /dev/vda rw, which reads exFAT and FAT disks, answers on the console and powers off', async () => {
  const exfatPath = '/VMs/My Dir/Jörg ü.vhdx';
  const fatPath = '/a dir/Grüße.img';
  const waitFor = (dev: string): string =>
    `i=0; while [ ! -b ${dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done`;
  const root = path.join(dir, 'root');
  buildGuestRoot(root, {
    writeFile: { path: '/var/tmp/from the guest.txt', content: 'written by the guest' },
    modules: { kernelVersion: kernelVersion(defaultKernel()), names: ['exfat', 'vfat', 'nls_cp437', 'nls_ascii', 'nls_utf8'] },
    commands: [
      waitFor('/dev/nvme0n1'),
      waitFor('/dev/sda'),
      guestFact('serial', '$(cat /sys/block/vda/serial)'),
      'mkdir -p /mnt/x /mnt/f',
      'mount -t exfat -o ro /dev/nvme0n1 /mnt/x',
      guestFact('exfat', `$(md5sum ${shellQuote('/mnt/x' + exfatPath)} | cut -d" " -f1)`),
      'mount -t vfat -o ro,utf8 /dev/sda /mnt/f',
      guestFact('fat', `$(md5sum ${shellQuote('/mnt/f' + fatPath)} | cut -d" " -f1)`),
    ],
    then: 'shell',
  });
  const rootImg = path.join(dir, 'root.ext4');
  makeExt4(rootImg, { sizeMiB: 32, fromDir: root, label: 'guestroot' });
  const exfatImg = path.join(dir, 'stick.exfat');
  makeExfat(exfatImg, { sizeMiB: 16, label: 'EX', files: { [exfatPath]: exfatFile } });
  const fatImg = path.join(dir, 'stick.fat');
  makeFat(fatImg, { sizeMiB: 34, label: 'FAT', files: { [fatPath]: fatFile } });

  vm = await bootVm({
    name: 'debian-initramfs',
    initrd: debianInitrd(),
    append: 'root=/dev/vda rw -- first "two words"',
    disks: [
      { file: rootImg, serial: 'VDROOT' },
      { file: exfatImg, interface: 'nvme', readonly: true },
      { file: fatImg, interface: 'virtio-scsi', snapshot: true },
    ],
  });
  const marker = await vm.waitForLine('VDBOOT-GUEST-OK', 180_000);
  const facts = parseGuestFacts(vm.transcript());
  expect(facts.pid).toBe(1);
  expect(facts.argv0).toBe('/sbin/init');
  expect(facts.args).toEqual(['first', 'two words']);
  expect(facts.root).toMatchObject({ device: '/dev/vda', fstype: 'ext4', mode: 'rw' });
  expect(facts.cmdline).toBe(vm.cmdline);
  expect(facts.uptime).toBeGreaterThan(0);
  expect(facts.facts.serial).toBe('VDROOT');
  expect(facts.facts.exfat).toBe(md5(exfatFile));
  expect(facts.facts.fat).toBe(md5(fatFile));
  expect(facts.wrote).toBe('/var/tmp/from the guest.txt');
  // the kernel's own timestamps are parsed from its lines
  const stamped = vm.lines().filter((l) => l.kernelTime !== undefined);
  expect(stamped.length).toBeGreaterThan(10);
  expect(stamped.some((l) => /Linux version/.test(l.text))).toBe(true);
  expect(marker.hostMs).toBeGreaterThan(0);

  vm.send('echo $((6*7))\n');
  expect(await vm.waitFor(/^42$/, 20_000)).toBe('42');
  // a read-only remount checkpoints the journal, so debugfs on the host sees the file
  vm.send('mount -o remount,ro /; poweroff -f\n');
  const exit = await vm.waitExit(30_000);
  expect(exit).toMatchObject({ code: 0, killed: false });
  expect(fs.readFileSync(vm.logFile, 'utf8')).toContain('VDBOOT-GUEST-OK');

  const written = execFileSync('debugfs', ['-R', 'cat "/var/tmp/from the guest.txt"', rootImg], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  expect(written).toBe('written by the guest');
}, 300_000); // generous for a loaded machine: a TCG boot of the 33 MB initramfs-tools image takes 20–60 s
