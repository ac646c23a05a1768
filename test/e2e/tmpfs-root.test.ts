/**
 * End to end: root=tmpfs: under QEMU. One disk holds NTFS, FAT32, exFAT and ext4
 * partitions with root archives made by GNU tar (pax with xattrs), a docker-export-style
 * tarball and GNU cpio, in every compression vdboot reads (each compression once, spread
 * over the four host filesystems: every boot costs ~20 s under TCG). The guest checks that
 * / is a tmpfs of the asked size and that owners, modes, hard links, symlinks, device
 * nodes, a FIFO, times and a file capability (getcap) came through. Failures: an archive
 * too big for rd.tmpfs.size is refused before unpacking, a truncated one names its entry;
 * both end in the rescue shell with the partial root left.
 */
import { execFileSync, execSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sharedLibraries, writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExfat, makeExt4, makeFat, makeNtfs, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, guestFact, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, type Vm } from '../../qemu/harness.ts';

const MTIME = 1_600_000_000;
let dir: string;
let initrd: string;
/** Debian 12's 6.12 kernel (scripts/fetch-kernel.sh), and its default initramfs */
const kernel612 = cachedKernel('6.12');
let initrd612: string | undefined;
let disk: string;
const vms: Vm[] = [];

/** The checks the guest runs, printed as facts. */
const CHECKS = [
  guestFact('rootline', "$(awk '$2 == \"/\" { r = $3 \" \" $4 } END { print r }' /proc/mounts)"),
  guestFact('dfsize', "$(df -k / | awk 'NR==2 { print $2 }')"),
  guestFact('dfused', "$(df -k / | awk 'NR==2 { print $3 }')"),
  guestFact('home', '$(stat -c "%u:%g %a" /home/user)'),
  guestFact('notes', '$(stat -c "%u:%g %a" /home/user/notes)'),
  guestFact('prog', '$(stat -c "%a %h %i" /bin/prog)'),
  guestFact('proglink', '$(stat -c "%a %h %i" /bin/prog-link)'),
  guestFact('sgid', '$(stat -c "%u:%g %a" /usr/bin/sgid)'),
  guestFact('sticky', '$(stat -c "%a" /tmp2)'),
  guestFact('lib', '$(readlink /lib2)'),
  guestFact('chardev', '$(stat -c "%F %t:%T %a" /etc/testnull)'),
  guestFact('blockdev', '$(stat -c "%F %t:%T" /etc/testsda)'),
  guestFact('fifo', '$(stat -c "%F" /var/fifo)'),
  guestFact('mtime', '$(stat -c "%Y" /etc/hostname)'),
  guestFact('dirmtime', '$(stat -c "%Y" /usr/share)'),
  guestFact('content', '$(cat /etc/hostname)'),
  guestFact('bigsum', '$(md5sum /usr/share/big.bin | cut -d" " -f1)'),
  guestFact('getcap', '$(/usr/sbin/getcap /bin/ping2 2>&1)'),
  guestFact('hosts', '$(grep -c " /run/vdboot/archive-host " /proc/mounts)'),
  // the host partition was read-only (BLKROSET) only while vdboot read the archive
  // (device-mapper views of attached images are read-only on purpose: not counted)
  guestFact('devro', '$(for d in /sys/class/block/*; do case ${d##*/} in dm-*) ;; *) cat $d/ro ;; esac; done | sort -u | tr -d "\\n")'),
  guestFact('handoff', '$(test -x /run/initramfs/shutdown && echo yes)'),
];

let bigSum: string;

function buildRoot(root: string): void {
  buildGuestRoot(root, { commands: CHECKS, then: { exec: '/run/initramfs/shutdown poweroff' } });
  const p = (x: string): string => path.join(root, x);
  for (const d of ['home/user', 'usr/share', 'usr/lib', 'var', 'tmp2', 'etc']) fs.mkdirSync(p(d), { recursive: true });
  fs.writeFileSync(p('etc/hostname'), 'tmpfs-guest\n');
  fs.writeFileSync(p('home/user/notes'), 'mine\n');
  fs.chownSync(p('home/user'), 1000, 1000);
  fs.chmodSync(p('home/user'), 0o700);
  fs.chownSync(p('home/user/notes'), 1000, 100);
  fs.chmodSync(p('home/user/notes'), 0o640);
  fs.writeFileSync(p('bin/prog'), '#!/bin/sh\necho prog\n');
  fs.chmodSync(p('bin/prog'), 0o4755);
  fs.linkSync(p('bin/prog'), p('bin/prog-link'));
  fs.writeFileSync(p('usr/bin/sgid'), 'x\n');
  fs.chownSync(p('usr/bin/sgid'), 0, 42);
  fs.chmodSync(p('usr/bin/sgid'), 0o2755);
  fs.chmodSync(p('tmp2'), 0o1777);
  fs.symlinkSync('usr/lib', p('lib2'));
  execFileSync('mknod', ['-m', '0620', p('etc/testnull'), 'c', '1', '3']);
  execFileSync('mknod', [p('etc/testsda'), 'b', '8', '0']);
  execFileSync('mkfifo', [p('var/fifo')]);
  const big = Buffer.alloc(3 << 20);
  for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(p('usr/share/big.bin'), big);
  bigSum = execFileSync('md5sum', [p('usr/share/big.bin')], { encoding: 'utf8' }).split(' ')[0]!;
  // getcap with its libraries, at the same paths.
  const getcap = '/usr/sbin/getcap';
  fs.mkdirSync(p('usr/sbin'), { recursive: true });
  fs.copyFileSync(getcap, p('usr/sbin/getcap'));
  for (const lib of sharedLibraries(getcap)) {
    fs.mkdirSync(path.dirname(p(lib)), { recursive: true });
    fs.copyFileSync(lib, p(lib));
  }
  fs.copyFileSync(p('bin/busybox'), p('bin/ping2'));
  execFileSync('setcap', ['cap_net_raw+ep', p('bin/ping2')]);
  const all = execFileSync('find', [root, '-depth'], { encoding: 'utf8' }).split('\n').filter(Boolean);
  execFileSync('touch', ['-h', '-d', `@${MTIME}`, ...all]);
}

function sh(cmd: string, cwd: string): void {
  execSync(cmd, { cwd, stdio: ['ignore', 'ignore', 'inherit'], shell: '/bin/bash' });
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-tmpfs-e2e-'));
  initrd = path.join(dir, 'initrd.img');
  // without ntfs-3g (included by default on kernels without ntfs3): NTFS hosts through vdboot's direct path alone
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  const root = path.join(dir, 'root');
  buildRoot(root);
  const a = (n: string): string => path.join(dir, n);
  const pax = "tar --format=pax --xattrs --xattrs-include='security.*' -C root -cf - .";
  sh(`${pax} | gzip -c > ${a('root.tar.gz')}`, dir);
  sh(`${pax} | xz -T1 -c > ${a('root.tar.xz')}`, dir);
  sh(`${pax} > ${a('root.tar')} && zstd -q -c ${a('root.tar')} > ${a('root.tar.zst')}`, dir);
  sh(`${pax} | bzip2 -c > ${a('root.tar.bz2')}`, dir);
  sh(`${pax} | lz4 -q -c > ${a('root.tar.lz4')}`, dir);
  // docker export: members without "./", numeric owners, GNU format, no compression.
  sh(`tar --numeric-owner --xattrs --xattrs-include='security.*' -C root -cf ${a('docker.tar')} $(ls -A root)`, dir);
  sh(`cd root && find . | cpio --quiet -o -H newc | xz --format=lzma -c > ${a('root.cpio.lzma')}`, dir);
  // Cut inside a member's data (the big file is the largest): the reader must name that member.
  fs.writeFileSync(a('truncated.tar'), fs.readFileSync(a('root.tar')).subarray(0, 6_000_000));
  const file = (n: string) => ({ hostFile: a(n) });
  // An image file on NTFS holding a FAT16 volume with the archive: PATH inside an image (rd.vdisk.attach).
  const inner = a('inner.img');
  makeFat(inner, { sizeMiB: 16, fatBits: 16, label: 'INIMAGE', files: { '/root.tar.gz': file('root.tar.gz') } });
  convertImage(inner, a('stick.vhdx'), 'vhdx');
  const ntfs = a('ntfs.img');
  makeNtfs(ntfs, { sizeMiB: 64, label: 'WinData', files: { '/images/root.tar.gz': file('root.tar.gz'), '/images/root.tar.lz4': file('root.tar.lz4'), '/images/truncated.tar': file('truncated.tar'), '/images/stick.vhdx': file('stick.vhdx') } });
  const fat = a('fat.img');
  makeFat(fat, { sizeMiB: 40, label: 'FATSTICK', files: { '/root.tar.xz': file('root.tar.xz'), '/root.cpio.lzma': file('root.cpio.lzma') } });
  const exfat = a('exfat.img');
  makeExfat(exfat, { sizeMiB: 24, label: 'EXSTICK', files: { '/live/root.tar.zst': file('root.tar.zst') } });
  const ext4 = a('ext4.img');
  makeExt4(ext4, { sizeMiB: 48, label: 'linuxhost', files: { '/srv/root.tar.bz2': file('root.tar.bz2'), '/srv/docker.tar': file('docker.tar') } });
  disk = a('disk.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, name: 'ntfs' }, { image: fat, name: 'fat' }, { image: exfat, name: 'exfat' }, { image: ext4, name: 'ext4' }] });
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function boot(append: string, name: string, on612 = false): Promise<Vm> {
  if (on612 && !initrd612) {
    initrd612 = path.join(dir, 'initrd-612.img');
    writeInitramfs(initrd612, { kernel: kernel612! });
  }
  const vm = await bootVm({ ...(on612 ? { kernel: kernel612!, initrd: initrd612! } : { initrd }), append, disks: [{ file: disk, snapshot: true }], name: `tmpfs-${name}`, memoryMiB: 512 });
  vms.push(vm);
  return vm;
}

async function bootToGuest(append: string, name: string, on612 = false) {
  const vm = await boot(append, name, on612);
  await vm.waitFor(GUEST_MARKER, 240_000);
  const facts = parseGuestFacts(vm.transcript()).facts;
  await vm.waitExit(60_000);
  return { vm, facts };
}

function expectTree(f: Record<string, string>, opts: { xattrs: boolean }): void {
  expect(f.rootline).toMatch(/^tmpfs rw/);
  expect(f.home).toBe('1000:1000 700');
  expect(f.notes).toBe('1000:100 640');
  const [pmode, plinks, pino] = f.prog!.split(' ');
  expect([pmode, plinks]).toEqual(['4755', '2']);
  expect(f.proglink!.split(' ')[2]).toBe(pino);
  expect(f.sgid).toBe('0:42 2755');
  expect(f.sticky).toBe('1777');
  expect(f.lib).toBe('usr/lib');
  expect(f.chardev).toBe('character special file 1:3 620');
  expect(f.blockdev).toBe('block special file 8:0');
  expect(f.fifo).toBe('fifo');
  expect(f.content).toBe('tmpfs-guest');
  expect(f.bigsum).toBe(bigSum);
  expect(f.mtime).toBe(String(MTIME));
  expect(f.dirmtime).toBe(String(MTIME));
  if (opts.xattrs) expect(f.getcap).toMatch(/\/bin\/ping2 cap_net_raw[=+]ep/);
  expect(f.hosts).toBe('0');
  expect(f.devro).toBe('0');
  expect(f.handoff).toBe('yes');
}

describe('end to end: root=tmpfs: under QEMU', { timeout: 400_000 }, () => {
  it('NTFS, gzip (GNU tar pax with xattrs), rd.tmpfs.size=96M: / is a 96 MiB tmpfs and the whole tree came through', async () => {
    const { facts, vm } = await bootToGuest('root=tmpfs:LABEL=WinData:/images/root.tar.gz rd.tmpfs.size=96M', 'ntfs-gzip');
    expectTree(facts, { xattrs: true });
    expect(facts.dfsize).toBe(String(96 * 1024));
    expect(vm.transcript()).toMatch(/unpacked \d+ entries/);
  });

  it.skipIf(!kernel612)('on the 6.12 kernel (modules .ko.xz, ntfs3): NTFS, gzip, the default initramfs; the whole tree came through', async () => {
    const { facts, vm } = await bootToGuest('root=tmpfs:LABEL=WinData:/images/root.tar.gz rd.tmpfs.size=96M', 'ntfs-gzip-612', true);
    expectTree(facts, { xattrs: true });
    expect(vm.transcript()).toMatch(/Linux version 6\.12\./);
  });

  it('FAT32, xz; default size: the unpacked size plus 50%', async () => {
    const { facts } = await bootToGuest('root=tmpfs:LABEL=FATSTICK:/root.tar.xz', 'fat-xz');
    expectTree(facts, { xattrs: true });
    const size = Number(facts.dfsize);
    const used = Number(facts.dfused);
    expect(size).toBeGreaterThanOrEqual(Math.floor(used * 1.4));
    expect(size).toBeLessThanOrEqual(Math.ceil(used * 1.6) + 64);
  });

  it('exFAT, zstd', async () => {
    const { facts } = await bootToGuest('root=tmpfs:LABEL=EXSTICK:/live/root.tar.zst', 'exfat-zstd');
    expectTree(facts, { xattrs: true });
  });

  it('ext4, bzip2, dracut form root=tmpfs:HOST rd.tmpfs.imgfile=PATH: the host is unmounted before the guest starts', async () => {
    const { facts } = await bootToGuest('root=tmpfs:LABEL=linuxhost rd.tmpfs.imgfile=/srv/root.tar.bz2', 'ext4-bzip2');
    expectTree(facts, { xattrs: true });
  });

  it('NTFS, lz4', async () => {
    const { facts } = await bootToGuest('root=tmpfs:LABEL=WinData:/images/root.tar.lz4', 'ntfs-lz4');
    expectTree(facts, { xattrs: true });
  });

  it('ext4, a docker-export-style tarball (no "./", numeric owners) boots as it is', async () => {
    const { facts } = await bootToGuest('root=tmpfs:LABEL=linuxhost:/srv/docker.tar', 'ext4-docker');
    expectTree(facts, { xattrs: true });
  });

  it('FAT32, newc cpio compressed with lzma (cpio keeps no xattrs)', async () => {
    const { facts } = await bootToGuest('root=tmpfs:LABEL=FATSTICK:/root.cpio.lzma', 'fat-cpio');
    expectTree(facts, { xattrs: false });
  });

  it('PATH inside an image file: rd.vdisk.attach first, then the archive on the attached FAT volume', async () => {
    const { facts, vm } = await bootToGuest('root=tmpfs:LABEL=INIMAGE:/root.tar.gz rd.vdisk.attach=LABEL=WinData:/images/stick.vhdx', 'in-image');
    expectTree(facts, { xattrs: true });
    expect(vm.transcript()).toMatch(/found host partition of the root archive LABEL=INIMAGE at \/dev\/(dm-\d+|mapper\/vdisk0)/);
  });

  it('an archive bigger than rd.tmpfs.size is refused before unpacking, naming the sizes; the rescue shell answers', async () => {
    const vm = await boot('root=tmpfs:LABEL=WinData:/images/root.tar.gz rd.tmpfs.size=2M', 'too-big');
    await vm.waitFor(/unpacks to at least [\d.]+ MiB, more than the tmpfs may hold: 2\.0 MiB \(rd\.tmpfs\.size=2M\)/, 240_000);
    await vm.waitFor(/vdboot# /, 30_000);
    vm.send('grep -c " /root " /proc/mounts\n');
    await vm.waitFor(/^0$/m, 30_000);
    await vm.kill();
  });

  it('a truncated archive stops with the entry and offset; the partial root is left in /root', async () => {
    const vm = await boot('root=tmpfs:LABEL=WinData:/images/truncated.tar', 'truncated');
    await vm.waitFor(/truncated: entry "[^"]+" \(header at byte \d+\) ends early: \d+ of its bytes are missing after byte 6000000\. .*left in \/root for inspection/, 240_000);
    await vm.waitFor(/vdboot# /, 30_000);
    vm.send('echo partial-$(ls -A /root | wc -l)\n');
    await vm.waitFor(/^partial-[1-9]/m, 30_000);
    await vm.kill();
  });
});
