/**
 * In-place expansion at boot, in the production init bundle run by QuickJS against the
 * fake kernel: the refusals that must come before anything is written. The fake kernel
 * reports no free space, and its NTFS partition can be mounted only when the test gives
 * it a tree; the image's bytes on the host disk are checked unchanged.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MS } from '../../src/sys/sys.ts';
import type { FakeMachine } from '../../src/sys/fake.ts';
import type { InitramfsManifest } from '../../src/formats/manifest.ts';
import { runBundleInQuickJS } from '../boot/sim-harness.ts';
import { simInitramfs, simManifest } from '../boot/sim-machine.ts';
import { BASIC_DATA, convert, devicesOf, loadNtfsMkdir, makeGuestDisk, makeHostDisk, makeNtfs, tmpDir } from '../vdisk/helpers.ts';

let dir: string;
let hostDisk: Uint8Array;
let dynamic: Uint8Array;
let partitions: { name: string; number: number; start: number; size: number }[];

beforeAll(async () => {
  if (!existsSync('build/init.js')) throw new Error('build/init.js is missing: run "npm run build" first');
  await loadNtfsMkdir();
  dir = tmpDir();
  const raw = makeGuestDisk(dir);
  const img = convert(raw, path.join(dir, 'dynamic.vhdx'), 'vhdx', ['block_size=1M']);
  dynamic = new Uint8Array(readFileSync(img));
  const ntfs = makeNtfs(dir, 'win', 60, 'Windows', { '/VMs/dynamic.vhdx': img }, ['/VMs']);
  const file = makeHostDisk(dir, 'host', [{ image: ntfs, type: BASIC_DATA }]);
  hostDisk = new Uint8Array(readFileSync(file));
  const d = devicesOf([file]);
  const { parsePartitionTable } = await import('../../src/formats/partitions.ts');
  const table = parsePartitionTable({ name: file, size: hostDisk.length, read: (o, l) => hostDisk.subarray(o, o + l) });
  partitions = d.devices.filter((x) => x.info.partNumber).map((x) => ({ name: `vda${x.info.partNumber}`, number: x.info.partNumber!, start: table.partitions.find((t) => t.number === x.info.partNumber)!.start, size: x.info.size }));
  d.close();
}, 60_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function machine(cmdline: string, manifest: InitramfsManifest, withTree: boolean): FakeMachine {
  return {
    cmdline,
    disks: [{
      name: 'vda', bytes: hostDisk, major: 254, minor: 0, partitions, needsModule: 'virtio_blk',
      ...(withTree ? { trees: { vda1: { 'VMs/dynamic.vhdx': { bytes: dynamic } } } } : {}),
    }],
    pciDevices: { '0000:00:04.0': 'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00', virtio1: 'virtio:d00000002v00001AF4' },
    initramfs: simInitramfs(manifest),
  };
}

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

describe('simulation: expanding a dynamic image at boot refuses before writing', () => {
  it('an initramfs without a writing NTFS driver (no ntfs3, no ntfs-3g): the console names --with ntfs-3g and the alternatives; nothing is mounted or made', async () => {
    const before = sha(hostDisk);
    const r = await runBundleInQuickJS(machine('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rw', simManifest(), false));
    const text = r.kernel.consoleText;
    expect(text).toMatch(/\/VMs\/dynamic\.vhdx on \/dev\/vda1 \(ntfs, LABEL="Windows"\) cannot be mapped read-write as it is/);
    expect(text).toMatch(/no NTFS driver that writes .*vdboot mkinitramfs --with ntfs-3g/);
    expect(text).toMatch(/Nothing was written/);
    expect(text).toMatch(/rd\.vdisk\.mode=snapshot/);
    expect(text).toMatch(/starting the rescue shell/);
    expect(r.kernel.events.dm.filter((e) => e.op === 'create')).toEqual([]);
    expect(r.kernel.events.mounts.filter((m) => m.source === '/dev/vda1')).toEqual([]);
    expect(sha(hostDisk)).toBe(before);
  });

  it('every image is located before any is expanded: a missing attached image stops the boot before the root image\'s host is even mounted to measure', async () => {
    const m = simManifest();
    m.filesystems.ntfs3 = 'ntfs3';
    const before = sha(hostDisk);
    const r = await runBundleInQuickJS(machine('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rw rd.vdisk.attach=LABEL=Windows:/VMs/missing.vhdx rd.timeout=1', m, true));
    const text = r.kernel.consoleText;
    expect(text).toMatch(/missing\.vhdx/);
    expect(text).toMatch(/starting the rescue shell/);
    expect(text).not.toMatch(/expand/i);
    expect(r.kernel.events.mounts.filter((x) => x.source === '/dev/vda1'), text).toEqual([]);
    expect(r.kernel.events.dm.filter((e) => e.op === 'create')).toEqual([]);
    expect(sha(hostDisk)).toBe(before);
  });

  it('with ntfs3, a host without room: mounted read-only to measure, refused with the growth and the free space, never mounted read-write', async () => {
    const m = simManifest();
    m.filesystems.ntfs3 = 'ntfs3';
    const r = await runBundleInQuickJS(machine('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rw', m, true));
    const text = r.kernel.consoleText;
    const mounts = r.kernel.events.mounts.filter((x) => x.source === '/dev/vda1');
    expect(mounts.length, text).toBe(1);
    expect(mounts[0]).toMatchObject({ target: '/run/vdboot/expand', fstype: 'ntfs3' });
    expect(mounts[0]!.flags & MS.RDONLY).toBe(MS.RDONLY);
    expect(text).toMatch(/it would grow by [\d.]+ MiB \(\d+ bytes\) \(\d+ absent blocks of 1\.0 MiB, to [\d.]+ MiB \(\d+ bytes\)\), but the host has only 0 B free/);
    expect(text).toMatch(/rd\.vdisk\.map=nbd/);
    expect(text).toMatch(/starting the rescue shell/);
    expect(r.kernel.events.dm.filter((e) => e.op === 'create')).toEqual([]);
  });

  it('rd.vdisk.expand=0 refuses at planning, naming it, without mounting the host', async () => {
    const m = simManifest();
    m.filesystems.ntfs3 = 'ntfs3';
    const r = await runBundleInQuickJS(machine('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rw rd.vdisk.expand=0', m, true));
    const text = r.kernel.consoleText;
    expect(text).toMatch(/rd\.vdisk\.expand=0 forbids expanding it in place/);
    expect(r.kernel.events.mounts.filter((x) => x.source === '/dev/vda1')).toEqual([]);
  });
});
