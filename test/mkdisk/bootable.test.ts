/**
 * `vdboot mkdisk --bootable`: the disk boots under QEMU through its firmware alone (no
 * -kernel): SeaBIOS runs GRUB's boot code from the MBR, OVMF runs \EFI\BOOT\BOOTX64.EFI,
 * both read the same grub.cfg, load the kernel and vdboot's initramfs from the boot
 * partition, and vdboot mounts the root partition by PARTUUID and starts the guest init.
 * The three boots run side by side.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdisk, type MkdiskResult } from '../../mkdisk/build.ts';
import { buildGuestRoot, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { cleanupTmpDirs, makeTmpDir, run } from '../kit/oracle.ts';
import { bootFromDisk } from './firmware.ts';

const GPT_TYPES = {
  bios: '21686148-6449-6E6F-744E-656564454649',
  esp: 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B',
  root: '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709',
};

let dir: string;
let gpt: MkdiskResult;
let mbr: MkdiskResult;
let boots: Record<string, Promise<string>>;

function sfdisk(image: string) {
  return (JSON.parse(run('sfdisk', ['--json', image]).toString()) as {
    partitiontable: { label: string; partitions: { start: number; size: number; type: string; bootable?: boolean; uuid?: string }[] };
  }).partitiontable;
}

beforeAll(async () => {
  dir = makeTmpDir();
  const root = path.join(dir, 'root');
  buildGuestRoot(root, {});
  gpt = await mkdisk({ source: root, output: path.join(dir, 'boot-gpt.qcow2'), bootable: true, label: 'guest' });
  mbr = await mkdisk({ source: root, output: path.join(dir, 'boot-mbr.vhdx'), bootable: true, partition: 'mbr' });
  // Started here so the three TCG boots overlap; each test awaits its own.
  const start = (disk: string, format: string, firmware: 'bios' | 'uefi') =>
    bootFromDisk({ disk, format, firmware, marker: GUEST_MARKER, timeoutMs: 400_000 });
  boots = {
    'gpt-bios': start(gpt.output, 'qcow2', 'bios'),
    'gpt-uefi': start(gpt.output, 'qcow2', 'uefi'),
    'mbr-bios': start(mbr.output, 'vhdx', 'bios'),
  };
  for (const p of Object.values(boots)) p.catch(() => {}); // awaited in the tests
}, 120_000);

afterAll(() => cleanupTmpDirs());

describe('mkdisk --bootable', () => {
  it('GPT: a BIOS boot partition, a FAT32 EFI system partition with GRUB, the kernel and the initramfs, then the root partition', () => {
    const raw = path.join(dir, 'gpt.raw');
    run('qemu-img', ['convert', '-O', 'raw', gpt.output, raw]);
    const table = sfdisk(raw);
    expect(table.label).toBe('gpt');
    expect(table.partitions.map((p) => p.type)).toEqual([GPT_TYPES.bios, GPT_TYPES.esp, GPT_TYPES.root]);
    expect(table.partitions[2]!.uuid!.toLowerCase()).toBe(gpt.partUuid);
    const esp = `${raw}@@${table.partitions[1]!.start * 512}`;
    const listing = run('mdir', ['-i', esp, '-/', '-b', '::/'], {}).toString();
    for (const f of ['::/EFI/BOOT/BOOTX64.EFI', '::/boot/grub/grub.cfg', '::/boot/vdboot/vmlinuz', '::/boot/vdboot/initrd.img']) {
      expect(listing.toLowerCase()).toContain(f.toLowerCase());
    }
    const cfg = run('mtype', ['-i', esp, '::/boot/grub/grub.cfg']).toString();
    expect(cfg).toContain(`root=PARTUUID=${gpt.partUuid}`);
    // GRUB's boot code is in the MBR; the protective partition entry is still there.
    const mbrSector = fs.readFileSync(raw).subarray(0, 512);
    expect(mbrSector.subarray(0, 440).some((b) => b !== 0)).toBe(true);
    expect(mbrSector[446 + 4]).toBe(0xee);
    expect(Number(mbrSector.readBigUInt64LE(0x5c))).toBe(table.partitions[0]!.start);
    fs.rmSync(raw);
  });

  it('MBR: an active FAT partition (type ef) before the Linux partition', () => {
    const raw = path.join(dir, 'mbr.raw');
    run('qemu-img', ['convert', '-O', 'raw', mbr.output, raw]);
    const table = sfdisk(raw);
    expect(table.label).toBe('dos');
    expect(table.partitions.map((p) => p.type)).toEqual(['ef', '83']);
    expect(table.partitions[0]!.bootable).toBe(true);
    fs.rmSync(raw);
  });

  it.each(['gpt-bios', 'gpt-uefi', 'mbr-bios'])('%s: the firmware boots the disk without -kernel to the guest init on the root partition', async (name) => {
    const transcript = await boots[name]!;
    const facts = parseGuestFacts(transcript.replace(/\r/g, ''));
    const r = name.startsWith('gpt') ? gpt : mbr;
    expect(facts.cmdline).toContain(`root=PARTUUID=${r.partUuid}`);
    expect(facts.root.fstype).toBe('ext4');
    expect(facts.root.device).toBe(name.startsWith('gpt') ? '/dev/vda3' : '/dev/vda2');
  }, 420_000);
});
