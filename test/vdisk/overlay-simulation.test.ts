/**
 * rd.vdisk.overlay in the production init bundle, run by QuickJS against the fake kernel:
 * a dynamic VHDX (qemu-img) on an NTFS host disk, and a second disk for the overlay. The
 * overlay's record is written here as vdboot writes it, with the identity the planner computes
 * for that very image (the oracle: the image file on the host), or for the image changed by
 * qemu-io. What the init does with each: maps the store and boots, or refuses before any
 * device-mapper device exists.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, rmSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FakeDmEvent, FakeMachine } from '../../src/sys/fake.ts';
import { planVdisk } from '../../src/boot/vdisk.ts';
import { encodeOverlayRecord, OVERLAY_STORE_OFFSET, type BaseIdentity } from '../../src/formats/overlay.ts';
import { nodeChainHost } from '../../src/sys/node-reader.ts';
import { runBundleInQuickJS } from '../boot/sim-harness.ts';
import { GUEST_TREE, simInitramfs, simManifest } from '../boot/sim-machine.ts';
import { BASIC_DATA, convert, fakeDiskOf, loadNtfsMkdir, makeGuestDisk, makeHostDisk, makeNtfs, tmpDir } from './helpers.ts';

const MiB = 1 << 20;
let dir: string;
let hostDisk: Uint8Array;
let partitions: { name: string; number: number; start: number; size: number }[];
let identity: BaseIdentity;
let changedIdentity: BaseIdentity;
let ext4Bytes: Uint8Array;

/** The identity the planner computes for `file`, as the image at /VMs/dynamic.vhdx on the host (the name is part of it). */
function identityOf(file: string): BaseIdentity {
  const host = { description: 'test', device: '/dev/null', chain: nodeChainHost({ allowOutside: true }), layout: () => null, writeBlocker: null };
  const id = planVdisk({ index: 0, path: file, mode: 'snapshot', map: 'auto', expand: false, persistentOverlay: true }, host).baseIdentity!;
  expect(id.source).toBe(file);
  return { ...id, source: '/VMs/dynamic.vhdx' };
}

beforeAll(async () => {
  if (!existsSync('build/init.js')) throw new Error('build/init.js is missing: run "npm run build" first');
  await loadNtfsMkdir();
  dir = tmpDir();
  const raw = makeGuestDisk(dir);
  const dynamic = convert(raw, path.join(dir, 'dynamic.vhdx'), 'vhdx', ['block_size=1M']);
  identity = identityOf(dynamic);
  const changed = path.join(dir, 'changed.vhdx');
  copyFileSync(dynamic, changed);
  execFileSync('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x5a 10M 64k', changed], { stdio: 'ignore' });
  changedIdentity = identityOf(changed);
  const ntfs = makeNtfs(dir, 'win', 60, 'Windows', { '/VMs/dynamic.vhdx': dynamic }, ['/VMs']);
  const file = makeHostDisk(dir, 'host', [{ image: ntfs, type: BASIC_DATA }]);
  ({ bytes: hostDisk, partitions } = fakeDiskOf(file));
  const ext4 = path.join(dir, 'home.ext4');
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'home', ext4, '8M']);
  ext4Bytes = new Uint8Array(readFileSync(ext4));
}, 60_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function overlayWith(base: BaseIdentity): Uint8Array {
  const bytes = new Uint8Array(8 * MiB);
  bytes.set(encodeOverlayRecord({ version: 1, storeOffset: OVERLAY_STORE_OFFSET, chunkSectors: 8, base }), 0);
  return bytes;
}

function machine(cmdline: string, overlay: Uint8Array): FakeMachine {
  return {
    cmdline,
    disks: [
      { name: 'vda', bytes: hostDisk, major: 254, minor: 0, partitions, needsModule: 'virtio_blk' },
      { name: 'vdb', bytes: overlay, major: 254, minor: 16, needsModule: 'virtio_blk' },
    ],
    pciDevices: { '0000:00:04.0': 'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00', virtio1: 'virtio:d00000002v00001AF4' },
    initramfs: simInitramfs(simManifest()),
    deviceTrees: { vdisk0p2: GUEST_TREE },
  };
}

async function boot(cmdline: string, overlay: Uint8Array) {
  const r = await runBundleInQuickJS(machine(cmdline, overlay));
  if (r.escaped) throw new Error(`an exception escaped the init:\n${r.escaped}\nconsole:\n${r.kernel.consoleText}`);
  return r;
}

const ROOT = 'root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rd.vdisk.overlay=/dev/vdb';
const loads = (events: FakeDmEvent[]) => events.filter((e): e is Extract<FakeDmEvent, { op: 'load' }> => e.op === 'load');

describe('simulation: rd.vdisk.overlay', () => {
  it('an overlay made over this image: its store under a persistent snapshot, no RAM store, the guest started', async () => {
    const r = await boot(`${ROOT} rw`, overlayWith(identity));
    const text = r.kernel.consoleText;
    expect(r.end?.reason, text).toBe('exec');
    expect(r.kernel.events.dm.filter((e) => e.op === 'create').map((e) => e.name)).toEqual(['vdisk0-overlay', 'vdisk0-cow', 'vdisk0-base', 'vdisk0', 'vdisk0p1', 'vdisk0p2', 'vdhost']);
    const l = loads(r.kernel.events.dm);
    expect(l.find((x) => x.name === 'vdisk0-overlay')!.targets).toEqual([{ start: 0, length: 16384, type: 'linear', params: '/dev/vdb 0' }]);
    expect(l.find((x) => x.name === 'vdisk0-cow')!.targets).toEqual([{ start: 0, length: 16384 - 2048, type: 'linear', params: '/dev/mapper/vdisk0-overlay 2048' }]);
    expect(l.find((x) => x.name === 'vdisk0')!.targets).toEqual([{ start: 0, length: 32768, type: 'snapshot', params: '/dev/mapper/vdisk0-base /dev/mapper/vdisk0-cow P 8' }]);
    expect(r.kernel.events.loops).toEqual([]);
    expect(text).toMatch(/vdisk0: writes go to the persistent overlay \/dev\/vdb \(8(\.0)? MiB\), kept from earlier boots/);
  });

  it('an overlay made over another version of the image (a copy qemu-io wrote): refused, saying what changed, before any device exists', async () => {
    const r = await boot(ROOT, overlayWith(changedIdentity));
    const text = r.kernel.consoleText;
    expect(r.end?.reason, text).toBe('shell');
    expect(text).toMatch(/rd\.vdisk\.overlay=\/dev\/vdb \(\/dev\/vdb\) holds writes made over \/VMs\/dynamic\.vhdx \(vhdx dynamic, 16(\.0)? MiB\), but the image booted now is not that image: layer 1 was written since \(DataWriteGuid [0-9a-f-]{36}, was [0-9a-f-]{36}\); its allocation tables changed\./);
    expect(text).toMatch(/rd\.vdisk\.overlay\.init=reset/);
    expect(r.kernel.events.dm).toEqual([]);
  });

  it('a blank device without rd.vdisk.overlay.init=1, and an ext4 one even with it: refused, nothing made', async () => {
    const blank = await boot(ROOT, new Uint8Array(8 * MiB));
    expect(blank.end?.reason).toBe('shell');
    expect(blank.kernel.consoleText).toMatch(/rd\.vdisk\.overlay=\/dev\/vdb \(\/dev\/vdb\) is not an overlay yet .* boot once with rd\.vdisk\.overlay\.init=1/);
    expect(blank.kernel.events.dm).toEqual([]);
    const ext4 = await boot(`${ROOT} rd.vdisk.overlay.init=1`, ext4Bytes);
    expect(ext4.end?.reason).toBe('shell');
    expect(ext4.kernel.consoleText).toMatch(/holds a filesystem of type ext4, LABEL=home, UUID=[0-9a-f-]+; vdboot never writes over that/);
    expect(ext4.kernel.events.dm).toEqual([]);
  });
});
