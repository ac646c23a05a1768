/**
 * End to end: a hostile root archive under QEMU. A GNU tar archive that boots a guest also
 * holds a symbolic link data/dv -> /dev followed by a file data/dv/vda (the host's own disk
 * in the VM), ".." names, an absolute name and a hard link out of the root. vdboot unpacks
 * it from an NTFS host disk (attached read-write, no QEMU snapshot): the guest boots, the
 * console counts the refused entries, /dev/vda is still the disk, and afterwards the host
 * disk is byte-identical to what it was (root=tmpfs never writes the host).
 */
import { execFileSync, execSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { makeNtfs, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, guestFact, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';

let dir: string;
let initrd: string;
let disk: string;
let diskSum: string;
const vms: Vm[] = [];

function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-tmpfs-hostile-'));
  initrd = path.join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  const root = path.join(dir, 'root');
  buildGuestRoot(root, {
    commands: [
      guestFact('dv', '$(readlink /data/dv)'),
      guestFact('vda', '$(stat -c "%F" /dev/vda)'),
      guestFact('ok', '$(cat /data/ok.txt)'),
      guestFact('abs', '$(cat /abs/name.txt)'),
      guestFact('h2', '$(test -e /h2 && echo present || echo absent)'),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  });
  fs.mkdirSync(path.join(root, 'data'));
  fs.writeFileSync(path.join(root, 'data/ok.txt'), 'kept\n');
  const tar = path.join(dir, 'hostile.tar');
  execFileSync('tar', ['-C', root, '-cf', tar, '.']);
  // The hostile members, appended with tar --append: the link first, then a tree where
  // data/dv is a directory holding vda (the member that would go through the link).
  const link = path.join(dir, 'link');
  fs.mkdirSync(path.join(link, 'data'), { recursive: true });
  fs.symlinkSync('/dev', path.join(link, 'data/dv'));
  execFileSync('tar', ['-C', link, '-rf', tar, 'data/dv']);
  const evil = path.join(dir, 'evil');
  fs.mkdirSync(path.join(evil, 'data/dv'), { recursive: true });
  fs.writeFileSync(path.join(evil, 'data/dv/vda'), 'PWNED'.repeat(1000));
  fs.writeFileSync(path.join(evil, 'escape'), 'ESCAPED\n');
  fs.writeFileSync(path.join(evil, 'abs'), 'absolute\n');
  fs.writeFileSync(path.join(evil, 'h1'), 'linked\n');
  fs.linkSync(path.join(evil, 'h1'), path.join(evil, 'h2'));
  execSync(`tar -P -C ${evil} -rf ${tar} --transform='s,^escape$,../escape,' --transform='s,^abs$,/abs/name.txt,' --transform='s,^h1$,../../h-out,' data/dv/vda escape abs h1 h2`);
  execFileSync('gzip', ['-n', tar]);
  const ntfs = path.join(dir, 'ntfs.img');
  makeNtfs(ntfs, { sizeMiB: 32, label: 'WinData', files: { '/images/hostile.tar.gz': { hostFile: `${tar}.gz` } } });
  disk = path.join(dir, 'disk.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, name: 'ntfs' }] });
  fs.rmSync(ntfs);
  diskSum = sha256(disk);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('end to end: a hostile root=tmpfs archive', { timeout: 400_000 }, () => {
  it('symlink to /dev then a file through it, "..", an absolute name, a hard link out: refused and counted, the guest boots, the host disk is unchanged', async () => {
    const vm = await bootVm({ initrd, append: 'root=tmpfs:LABEL=WinData:/images/hostile.tar.gz', disks: [{ file: disk }], name: 'tmpfs-hostile', memoryMiB: 512 });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 300_000);
    const facts = parseGuestFacts(vm.transcript()).facts;
    await vm.waitExit(60_000);
    const console = vm.transcript();
    expect(console).toMatch(/unpack: 4 entries refused \(3 outside the root, 1 through a symbolic link\); nothing was written outside the new root/);
    expect(console).toMatch(/refused "data\/dv\/vda" \(file, header at byte \d+\): it lies under "data\/dv", which the archive made a symbolic link/);
    expect(facts).toMatchObject({ dv: '/dev', vda: 'block special file', ok: 'kept', abs: 'absolute', h2: 'absent' });
    // The guest's /dev/vda is the device, not the archive's 5000 bytes (nor is anything else).
    expect(console).not.toContain('PWNED');
    expect(sha256(disk)).toBe(diskSum);
  });
});
