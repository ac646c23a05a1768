/**
 * npm run test:full — `vdboot mkdisk --fs xfs|btrfs` from a container-export-like tar
 * archive (owners, setuid, sticky, device nodes, a hard link, made under fakeroot), booted
 * in every way vdboot boots a root: on Linux 6.12 and 6.1; GPT (root=PARTUUID=), MBR
 * (root=UUID=) and a whole-disk filesystem (root=UUID=); the image as a dynamic VHDX on
 * NTFS booted by root=vdisk: (snapshot); and --bootable through SeaBIOS and GRUB alone.
 * Each guest prints stat lines of its files, compared with GNU stat on the source under
 * the archive's fakeroot state. (npm test boots GPT on 6.1 once per filesystem:
 * test/mkdisk/xfs-btrfs.test.ts.)
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdisk, type MkdiskResult } from '../../mkdisk/build.ts';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { makeNtfs, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { bootFromDisk } from '../mkdisk/firmware.ts';
import { BASIC_DATA } from '../kit/host-disk.ts';
import { run } from '../kit/oracle.ts';

const CHECKED = ['etc/hostname', 'etc/hostname.hard', 'home/user/notes.txt', 'bin/tool', 'tmp', 'nodes/null', 'nodes/vdx', 'bin/name-link'];
const STAT = '%n|%u|%g|%a|%F|%t|%T|%h';
const k612 = cachedKernel('6.12');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-full-mkdisk-fs-'));
const tree = path.join(dir, 'tree');
const archive = path.join(dir, 'export.tar.gz');
const state = path.join(dir, 'fakeroot.state');
const vms: Vm[] = [];
const initrds: Record<string, string> = {};

beforeAll(() => {
  buildGuestRoot(tree, {
    commands: [`for p in ${CHECKED.join(' ')}; do echo "VDBOOT-STAT $(stat -c '${STAT}' /$p)"; done`],
    files: { 'etc/hostname': 'full-matrix\n', 'home/user/notes.txt': 'the user owns this\n' },
  });
  fs.mkdirSync(path.join(tree, 'nodes'));
  fs.writeFileSync(path.join(tree, 'bin/tool'), crypto.randomBytes(200 * 1024));
  fs.symlinkSync('../etc/hostname', path.join(tree, 'bin/name-link'));
  fs.linkSync(path.join(tree, 'etc/hostname'), path.join(tree, 'etc/hostname.hard'));
  run('fakeroot', ['-s', state, '--', 'sh', '-c', [
    'set -e', `cd ${JSON.stringify(tree)}`, 'chown -R 0:0 .', 'chown -R 1234:99 home/user', 'chmod 4755 bin/tool', 'chmod 1777 tmp',
    'mknod nodes/null c 1 3', 'mknod nodes/vdx b 254 300', `tar --numeric-owner -czf ${JSON.stringify(archive)} .`,
  ].join('\n')]);
  initrds['6.1'] = path.join(dir, 'initrd-6.1.img');
  writeInitramfs(initrds['6.1'], { kernel: defaultKernel() });
  if (k612) {
    initrds['6.12'] = path.join(dir, 'initrd-6.12.img');
    writeInitramfs(initrds['6.12'], { kernel: k612 });
  }
}, 600_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (!process.env.VDBOOT_KEEP) fs.rmSync(dir, { recursive: true, force: true });
});

function expectFilesAsSource(transcript: string, fsType: 'xfs' | 'btrfs'): void {
  const facts = parseGuestFacts(transcript.replace(/\r/g, ''));
  expect(facts.root.fstype, transcript).toBe(fsType);
  const text = run('fakeroot', ['-i', state, '--', 'stat', '-c', STAT, ...CHECKED.map((p) => path.join(tree, p))]).toString();
  const want = new Map(text.trim().split('\n').map((l) => { const f = l.split('|'); return [path.relative(tree, f[0]!), f.slice(1)]; }));
  const seen = new Map([...transcript.replace(/\r/g, '').matchAll(/^VDBOOT-STAT \/(\S[^|]*)\|(.*)$/gm)].map((m) => [m[1]!, m[2]!.split('|')]));
  for (const p of CHECKED) {
    const w = [...want.get(p)!];
    if (fsType === 'xfs' && p.startsWith('etc/hostname')) w[6] = '1'; // hard links become copies on xfs
    if (w[3] === 'directory') w[6] = '-';
    const g = [...(seen.get(p) ?? [])];
    if (g[3] === 'directory') g[6] = '-';
    expect(g, p).toEqual(w);
  }
}

async function kernelBoot(name: string, series: '6.1' | '6.12', disk: string, format: string, append: string): Promise<string> {
  const vm = await bootVm({ kernel: series === '6.12' ? k612! : defaultKernel(), initrd: initrds[series], append, disks: [{ file: disk, format, snapshot: true }], name });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 600_000);
  return vm.transcript();
}

async function make(fsType: 'xfs' | 'btrfs', out: string, extra: Partial<Parameters<typeof mkdisk>[0]> = {}): Promise<MkdiskResult> {
  return mkdisk({ source: archive, output: path.join(dir, out), fs: fsType, label: `m${fsType}`, ...extra });
}

describe('mkdisk --fs xfs|btrfs: booted every way', { timeout: 900_000 }, () => {
  it.each(['xfs', 'btrfs'] as const)('%s on Linux 6.12: GPT, root=PARTUUID=', async (fsType) => {
    if (!k612) return;
    const r = await make(fsType, `gpt-612-${fsType}.qcow2`);
    expectFilesAsSource(await kernelBoot(`mkfs-612-${fsType}`, '6.12', r.output, 'qcow2', `root=PARTUUID=${r.partUuid}`), fsType);
  });

  it.each(['xfs', 'btrfs'] as const)('%s on Linux 6.1: MBR, root=UUID=', async (fsType) => {
    const r = await make(fsType, `mbr-${fsType}.vdi`, { partition: 'mbr' });
    expectFilesAsSource(await kernelBoot(`mkfs-mbr-${fsType}`, '6.1', r.output, 'vdi', `root=UUID=${r.fsUuid}`), fsType);
  });

  it.each(['xfs', 'btrfs'] as const)('%s on Linux 6.1: no partition table, root=UUID=', async (fsType) => {
    const r = await make(fsType, `whole-${fsType}.vmdk`, { partition: 'none' });
    expectFilesAsSource(await kernelBoot(`mkfs-whole-${fsType}`, '6.1', r.output, 'vmdk', `root=UUID=${r.fsUuid}`), fsType);
  });

  it.each(['xfs', 'btrfs'] as const)('%s: a dynamic VHDX on NTFS booted by root=vdisk: (snapshot)', async (fsType) => {
    const r = await make(fsType, `ntfs-${fsType}.vhdx`);
    const ntfs = path.join(dir, `host-${fsType}.ntfs`);
    makeNtfs(ntfs, { sizeMiB: 64, label: 'Windows', files: { '/VMs/root.vhdx': { hostFile: r.output } } });
    const disk = path.join(dir, `host-${fsType}.img`);
    makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });
    const t = await kernelBoot(`mkfs-ntfs-${fsType}`, '6.1', disk, 'raw', 'root=vdisk:LABEL=Windows:/VMs/root.vhdx rd.vdisk.mode=snapshot');
    expectFilesAsSource(t, fsType);
  });

  it.each(['xfs', 'btrfs'] as const)('%s: --bootable, through SeaBIOS and GRUB alone', async (fsType) => {
    const r = await make(fsType, `boot-${fsType}.qcow2`, { bootable: true });
    expectFilesAsSource(await bootFromDisk({ disk: r.output, format: 'qcow2', firmware: 'bios', marker: GUEST_MARKER, timeoutMs: 600_000 }), fsType);
  });
});
