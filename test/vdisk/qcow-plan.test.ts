/**
 * Booting a qcow (version 1) image: planned on an NTFS host made with mkntfs + ntfscp,
 * the planned tables read back against qemu-img convert -O raw; rw and compressed images
 * go to qemu-nbd (format "qcow") or are refused with the remedies.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planAgainstDevices } from '../../src/cli/plan.ts';
import { BASIC_DATA, convert, devicesOf, loadNtfsMkdir, makeGuestDisk, makeHostDisk, makeNtfs, qemuRaw, readPlanned, sh, tmpDir } from './helpers.ts';

let dir: string;
let hostDisk: string;
const images: Record<string, string> = {};

beforeAll(async () => {
  await loadNtfsMkdir();
  dir = tmpDir();
  const guestRaw = makeGuestDisk(dir);
  images.plain = convert(guestRaw, path.join(dir, 'plain.qcow'), 'qcow');
  images.compressed = path.join(dir, 'compressed.qcow');
  // qemu 7.2's convert -c -O qcow exits 1 after writing every cluster (a zero-length
  // compressed write its qcow driver refuses): the result is checked with compare instead.
  try { sh('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow', guestRaw, images.compressed]); } catch { /* compared below */ }
  sh('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow', guestRaw, images.compressed]);
  const ntfs = makeNtfs(dir, 'host', 80, 'Windows', { '/VMs/plain.qcow': images.plain, '/VMs/compressed.qcow': images.compressed }, ['/VMs']);
  hostDisk = makeHostDisk(dir, 'host', [{ image: ntfs, type: BASIC_DATA }]);
}, 120_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function planError(cmdline: string, opts: { nbd?: boolean } = {}): string {
  const d = devicesOf([hostDisk]);
  try {
    planAgainstDevices(cmdline, d.devices, opts);
  } catch (e) {
    return (e as Error).message;
  } finally {
    d.close();
  }
  throw new Error(`${cmdline}: planned without error`);
}

describe('vdisk plan: qcow version 1', () => {
  for (const mode of ['ro', 'snapshot'] as const) {
    it(`rd.vdisk.mode=${mode}: direct, the tables read what qemu-img reads, root by the GPT root type`, () => {
      const d = devicesOf([hostDisk]);
      try {
        const vp = planAgainstDevices(`root=vdisk:LABEL=Windows:/VMs/plain.qcow rd.vdisk.mode=${mode}`, d.devices).vdisks[0]!;
        expect(vp.chain[0]).toMatchObject({ format: 'qcow', subformat: 'v1' });
        expect(vp.path).toBe('direct');
        expect(vp.root?.partition.number).toBe(2);
        const oracle = qemuRaw(images.plain!, dir);
        expect(vp.size).toBe(oracle.length);
        const whole = readPlanned(vp.devices, d.devices, vp.name, 0, vp.size);
        expect(Buffer.from(whole).equals(oracle)).toBe(true);
      } finally {
        d.close();
      }
    });
  }

  it('rw: refused without qemu-nbd (qcow is not expanded in place), served by qemu-nbd -f qcow with it', () => {
    expect(planError('root=vdisk:LABEL=Windows:/VMs/plain.qcow rw')).toMatch(/does not expand qcow \(version 1\) images in place.*rd\.vdisk\.mode=snapshot/s);
    const d = devicesOf([hostDisk]);
    try {
      const vp = planAgainstDevices('root=vdisk:LABEL=Windows:/VMs/plain.qcow rw', d.devices, { nbd: true }).vdisks[0]!;
      expect(vp.path).toBe('nbd');
      expect(vp.nbd).toEqual({ file: '/VMs/plain.qcow', format: 'qcow', readOnly: false });
    } finally {
      d.close();
    }
  });

  it('compressed clusters: refused for device-mapper naming them, read through qemu-nbd when it is there', () => {
    expect(planError('root=vdisk:LABEL=Windows:/VMs/compressed.qcow rd.vdisk.mode=ro')).toMatch(/zlib-compressed qcow cluster/);
    const d = devicesOf([hostDisk]);
    try {
      const vp = planAgainstDevices('root=vdisk:LABEL=Windows:/VMs/compressed.qcow rd.vdisk.mode=ro', d.devices, { nbd: true }).vdisks[0]!;
      expect(vp.path).toBe('nbd');
      expect(vp.nbd).toEqual({ file: '/VMs/compressed.qcow', format: 'qcow', readOnly: true });
    } finally {
      d.close();
    }
  });
});
