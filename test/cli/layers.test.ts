/**
 * `vdboot inspect` and `vdboot plan` show the layers between partitions and filesystems
 * without a key: LUKS headers (checked against cryptsetup luksDump), LVM VGs and LVs
 * (against lvs), the filesystem on an LV (against the image written there), and where the
 * boot would ask for a passphrase.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../../src/cli/main.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsAdd } from '../../qemu/disks.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { makeLuks2, makeLvmPv, type LuksImage, type LvmLayout } from '../kit/stack-disk.ts';

const can = lvmAvailable() && fs.existsSync('/usr/sbin/cryptsetup');
const UUID = '6d2e4f10-3a5b-4c7d-8e9f-a0b1c2d3e4f5';
let dir: string;
let encrypted: string;
let plainLvm: string;
let host: string;
let luks: LuksImage;
let lvm: LvmLayout;

function io(): CliIO & { out: string; err: string } {
  const o = { out: '', err: '', stdout(t: string) { o.out += t; }, stderr(t: string) { o.err += t; }, async stdoutBytes() {} };
  return o;
}

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-layers-'));
  const rootFs = path.join(dir, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: 8, label: 'lvroot', uuid: '11111111-2222-4333-8444-555555555555' });
  lvm = makeLvmPv(dir, 16, 'data', [{ name: 'root', sizeMiB: 8, image: rootFs }, { name: 'swap-1', sizeMiB: 2 }]);
  plainLvm = path.join(dir, 'plain-lvm.raw');
  makePartitionedDisk(plainLvm, { table: 'gpt', partitions: [{ image: lvm.pv, name: 'pv' }] });
  const key = path.join(dir, 'key');
  fs.writeFileSync(key, 'key file bytes');
  const pv2 = makeLvmPv(path.join(dir), 12, 'crypt-vg', [{ name: 'root', sizeMiB: 8 }]);
  luks = makeLuks2(dir, pv2.pv, key, 'pass', UUID);
  const boot = path.join(dir, 'boot.ext4');
  makeExt4(boot, { sizeMiB: 4, label: 'boot' });
  encrypted = path.join(dir, 'encrypted.raw');
  makePartitionedDisk(encrypted, { table: 'gpt', partitions: [{ image: boot, name: 'boot' }, { image: luks.file, name: 'cryptroot' }] });
  const vhdx = path.join(dir, 'enc.vhdx');
  convertImage(encrypted, vhdx, 'vhdx', ['subformat=dynamic']);
  const ntfs = path.join(dir, 'host.ntfs');
  makeNtfs(ntfs, { sizeMiB: 64, label: 'Windows' });
  ntfsAdd(ntfs, { 'VMs/enc.vhdx': { hostFile: vhdx } });
  host = path.join(dir, 'host.raw');
  makePartitionedDisk(host, { table: 'gpt', partitions: [{ image: ntfs, type: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7' }] });
}, 120_000);

afterAll(() => { if (dir) fs.rmSync(dir, { recursive: true, force: true }); });

describe.skipIf(!can)('vdboot inspect / plan: LUKS and LVM layers', () => {
  it('inspect: the LUKS header as luksDump reads it, without a key', async () => {
    const o = io();
    expect(await main(['inspect', encrypted], o)).toBe(0);
    const dump = execFileSync('cryptsetup', ['luksDump', luks.file], { encoding: 'utf8' });
    const offset = /^\toffset:\s*(\d+) \[bytes\]/m.exec(dump)![1];
    const slots = [...dump.matchAll(/^ {2}(\d+): luks2$/gm)].map((m) => `${m[1]} (pbkdf2)`).join(', ');
    expect(o.out).toContain(`layers:\n  partition 2: LUKS2 aes-xts-plain64 512-bit, data at byte ${offset}, key slots ${slots}, UUID ${UUID}`);
    expect(o.out).toMatch(/a passphrase typed on the console; what it holds \(PV, filesystem\) is known once unlocked/);
  });

  it('inspect: the VG and its LVs as lvs reports them, with the filesystem on the linear LV', async () => {
    const o = io();
    expect(await main(['inspect', plainLvm], o)).toBe(0);
    expect(o.out).toContain(`VG data (UUID ${lvm.vgUuid}, seqno `);
    expect(o.out).toContain(`  LV root: ${(lvm.lvs.root!.size / 1048576).toFixed(1)} MiB linear → /dev/mapper/data-root, ext4 LABEL="lvroot" UUID=11111111-2222-4333-8444-555555555555`);
    expect(o.out).toContain(`  LV swap-1: ${(lvm.lvs['swap-1']!.size / 1048576).toFixed(1)} MiB linear → /dev/mapper/data-swap--1`);
    const j = io();
    expect(await main(['inspect', plainLvm, '--json'], j)).toBe(0);
    expect((JSON.parse(j.out) as { layers: string[] }).layers.length).toBe(3);
  });

  it('plan (plain root): both disks\' layers, where the key comes from, and the root looked for after activation', async () => {
    const o = io();
    expect(await main(['plan', '--cmdline', 'root=/dev/data/root rd.luks.key=/k:LABEL=boot', '--disk', encrypted, '--disk', plainLvm], o)).toBe(0);
    expect(o.out).toContain(`/dev/sda2: LUKS2 aes-xts-plain64 512-bit`);
    expect(o.out).toContain(`→ opened as /dev/mapper/luks-${UUID}: key file /k on LABEL=boot; if that fails, a passphrase is asked on the console (3 tries)`);
    expect(o.out).toContain('VG data (UUID');
    expect(o.out).toMatch(/\/dev\/data\/root on \/root \(\?, ro\) — looked for after unlocking and activation/);
  });

  it('plan (root=vdisk:): the LUKS partition inside the image and the passphrase prompt', async () => {
    const o = io();
    expect(await main(['plan', '--cmdline', 'root=vdisk:LABEL=Windows:/VMs/enc.vhdx rd.vdisk.mode=ro', '--disk', host], o)).toBe(0);
    expect(o.out).toContain(`/dev/mapper/vdisk0p2 (in /VMs/enc.vhdx): LUKS, UUID ${UUID} → opened as /dev/mapper/luks-${UUID}: a passphrase is asked on the console here (3 tries`);
    expect(o.out).toMatch(/root: after unlocking and activation, the only Linux filesystem behind partition 2 \(LUKS\)/);
  });
});
