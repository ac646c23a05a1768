/**
 * `vdboot kit --esp DIR`: the Secure Boot chain with no key to enroll (Debian's shim signed
 * by Microsoft's UEFI CA, Debian's signed GRUB, Debian's signed kernel, vdboot's initramfs).
 *  - statically: the files are Debian's own, and the signers the kit names are the ones
 *    sbverify lists; the grub.cfg passes grub-script-check and uses no insmod; an unsigned
 *    kernel (its signature removed with sbattach) is called out; on a FAT root dir the
 *    chain goes into the root dir itself;
 *  - booted under OVMF with Secure Boot enforced and only Microsoft's keys enrolled: a stick
 *    (GPT: FAT32 ESP from the kit's tree, NTFS with a dynamic VHDX) boots to the guest's init
 *    with the kernel reporting Secure Boot, the VHDX expanded in place and mounted rw, and a
 *    second boot sees the first one's write; the same firmware refuses the kit's unsigned
 *    GRUB ("Access Denied"), which proves the firmware really enforces Secure Boot.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../../src/cli/main.ts';
import { parseKitArgs } from '../../src/cli/kit.ts';
import { hasPeSignature, MOK_MANAGER, SHIM, SIGNED_GRUB } from '../../mkdisk/secureboot.ts';
import { convertImage, makeFat, makeNtfs, makePartitionedDisk, ntfsRead, type FileTree } from '../../qemu/disks.ts';
import { GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { treeOf } from '../kit/host-disk.ts';
import { cleanupTmpDirs, makeTmpDir } from '../kit/oracle.ts';
import { bootFromDisk, OVMF_CODE_SECBOOT, OVMF_VARS_MS } from './firmware.ts';

const MiB = 1024 * 1024;
const IMAGE = '/VMs/Linux Guest.vhdx';
const BASIC_DATA = 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';
const ready = [SHIM, SIGNED_GRUB, MOK_MANAGER, OVMF_CODE_SECBOOT, OVMF_VARS_MS].every((f) => fs.existsSync(f));

let dir: string;
let guestRaw: string;

async function vdboot(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const io: CliIO = { stdout: (t) => { out += t; }, stderr: (t) => { err += t; }, stdoutBytes: async () => {} };
  return { code: await main(args, io), out, err };
}


/** The issuers' CNs sbverify lists for a signed file: the oracle for the kit's "signed by". */
function sbverifyIssuers(file: string): string[] {
  const out = execFileSync('sbverify', ['--list', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const cns: string[] = [];
  const lines = out.split('\n');
  for (let i = 0; i < lines.length; i++) {
    if (!/^image signature issuers:/.test(lines[i]!)) continue;
    for (let j = i + 1; j < lines.length && /^ - /.test(lines[j]!); j++) {
      const cn = /CN=([^/]+)/.exec(lines[j]!)?.[1]?.trim();
      if (cn && !cns.includes(cn)) cns.push(cn);
    }
  }
  return cns;
}

function virtualSize(vhdx: string): number {
  return (JSON.parse(execFileSync('qemu-img', ['info', '-f', 'vhdx', '--output=json', vhdx], { encoding: 'utf8' })) as { 'virtual-size': number })['virtual-size'];
}

/**
 * A staging root with the guest as a dynamic VHDX at IMAGE, in 1 MiB blocks, some of them
 * absent: the file is smaller than the disk it holds.
 */
function stickRoot(name: string): string {
  const root = path.join(dir, name);
  fs.mkdirSync(path.join(root, 'VMs'), { recursive: true });
  const vhdx = path.join(root, IMAGE);
  convertImage(guestRaw, vhdx, 'vhdx', ['block_size=1M']);
  if (fs.statSync(vhdx).size >= virtualSize(vhdx)) throw new Error(`${vhdx} holds every block: it would not test the expansion`);
  return root;
}

beforeAll(() => {
  dir = makeTmpDir();
  guestRaw = makeGuestDisk(dir, {
    kernelMessages: true,
    commands: [
      // a boot counter on the guest's root: the second boot sees what the first one wrote
      'n=$(cat /home/count 2>/dev/null || echo 0); n=$((n+1)); mkdir -p /home; echo $n > /home/count; sync',
      guestFact('count', '$n'),
      guestFact('secureboot', "$(dmesg | grep -c 'secureboot: Secure boot enabled')"),
      guestFact('lockdown', "$(dmesg | grep -c 'Kernel is locked down from EFI Secure Boot')"),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }).raw;
}, 120_000);

afterAll(() => cleanupTmpDirs());

describe.skipIf(!ready)('vdboot kit --esp: the Secure Boot chain', () => {
  let root: string;
  let esp: string;
  let kit: { code: number; out: string; err: string };

  beforeAll(async () => {
    root = stickRoot('stick');
    esp = path.join(dir, 'esp');
    fs.mkdirSync(esp);
    kit = await vdboot('kit', '--image', path.join(root, IMAGE), '--root-dir', root, '--esp', esp, '--host', 'LABEL=SBNTFS',
      '--append', 'rd.vdisk.mode=rw rw console=ttyS0,115200', '-q');
  }, 120_000);

  it('writes Debian\'s shim, signed GRUB and MokManager in EFI/BOOT and EFI/vdboot, the kernel and initramfs in EFI/vdboot', () => {
    expect(kit.err).toBe('');
    expect(kit.code).toBe(0);
    const same = (rel: string, from: string) => expect(fs.readFileSync(path.join(esp, rel)).equals(fs.readFileSync(from)), rel).toBe(true);
    for (const d of ['EFI/BOOT', 'EFI/vdboot']) {
      same(`${d}/grubx64.efi`, SIGNED_GRUB);
      same(`${d}/mmx64.efi`, MOK_MANAGER);
    }
    same('EFI/BOOT/BOOTX64.EFI', SHIM);
    same('EFI/vdboot/shimx64.efi', SHIM);
    same('EFI/vdboot/vmlinuz', path.join(root, 'boot/vdboot/vmlinuz'));
    same('EFI/vdboot/initrd.img', path.join(root, 'boot/vdboot/initrd.img'));
    // the kit's own GRUB for machines without Secure Boot is still there, and unsigned
    expect(hasPeSignature(fs.readFileSync(path.join(root, 'boot/vdboot/grubx64.efi')))).toBe(false);
    expect(hasPeSignature(fs.readFileSync(SIGNED_GRUB))).toBe(true);
  });

  it('names who signed each file, as sbverify lists them', () => {
    const line = (rel: string) => kit.out.split('\n').find((l) => l.trimStart().startsWith(`${rel} `)) ?? '';
    for (const [rel, file] of [['EFI/BOOT/BOOTX64.EFI', SHIM], ['EFI/vdboot/grubx64.efi', SIGNED_GRUB], ['EFI/vdboot/vmlinuz', path.join(esp, 'EFI/vdboot/vmlinuz')]] as const) {
      const issuers = sbverifyIssuers(file);
      expect(issuers.length, rel).toBeGreaterThan(0);
      for (const cn of issuers) expect(line(rel), rel).toContain(cn);
    }
    expect(line('EFI/BOOT/BOOTX64.EFI')).toContain('Microsoft Corporation UEFI CA 2011');
    expect(line('EFI/vdboot/vmlinuz')).toMatch(/signed by Debian Secure Boot CA, verified by shim/);
    expect(line('EFI/vdboot/initrd.img')).toMatch(/not signed/);
    expect(kit.out).not.toMatch(/WARNING/);
  });

  it('grub.cfg: read from GRUB\'s own folder, built-in commands only, the kit\'s kernel line; grub-script-check accepts it', () => {
    const cfg = fs.readFileSync(path.join(esp, 'EFI/vdboot/grub.cfg'), 'utf8');
    expect(fs.readFileSync(path.join(esp, 'EFI/BOOT/grub.cfg'), 'utf8')).toBe(cfg);
    // Debian's signed GRUB falls back to $cmdpath/grub.cfg (its embedded configuration says so)
    expect(execFileSync('strings', [SIGNED_GRUB], { encoding: 'utf8', maxBuffer: 1 << 26 })).toContain('source $cmdpath/grub.cfg');
    expect(cfg).not.toMatch(/insmod/);
    expect(cfg).toContain(`linux \${vdboot_esp}/EFI/vdboot/vmlinuz 'root=vdisk:LABEL=SBNTFS:${IMAGE}' rd.vdisk.mode=rw rw console=ttyS0,115200`);
    const check = spawnSync('grub-script-check', [path.join(esp, 'EFI/vdboot/grub.cfg')], { encoding: 'utf8' });
    expect(check.status, check.stderr).toBe(0);
  });

  it('an unsigned kernel is called out: it will not start under Secure Boot, and what to do', async () => {
    const unsigned = path.join(dir, 'vmlinuz-unsigned');
    fs.copyFileSync(path.join(esp, 'EFI/vdboot/vmlinuz'), unsigned);
    execFileSync('sbattach', ['--remove', unsigned]);
    expect(hasPeSignature(fs.readFileSync(unsigned))).toBe(false);
    const r2 = stickRoot('unsigned');
    const esp2 = path.join(dir, 'esp-unsigned');
    fs.mkdirSync(esp2);
    const r = await vdboot('kit', '--image', path.join(r2, IMAGE), '--root-dir', r2, '--esp', esp2, '--kernel', unsigned, '--no-grub-images');
    expect(r.code).toBe(0);
    expect(r.err).toMatch(/Secure Boot: the kernel .*vmlinuz-unsigned is not signed, so shim and GRUB will not start it under Secure Boot.*give --kernel a signed kernel/);
    expect(r.out).toMatch(/EFI\/vdboot\/vmlinuz +the kernel: not signed: will NOT start under Secure Boot/);
    expect(r.out).toMatch(/WARNING: the kernel/);
  }, 120_000);

  it('--esp with --no-secure-boot is refused as contradictory', () => {
    expect(() => parseKitArgs(['--image', 'a.vhdx', '--root-dir', '.', '--esp', 'e', '--no-secure-boot'])).toThrow(/--esp DIR is where the Secure Boot chain goes, and --no-secure-boot asks for none/);
  });

  it('without --esp, on a FAT root dir the chain goes into the root dir; elsewhere the kit says to give --esp', async () => {
    const bin = path.join(dir, 'fake-bin');
    fs.mkdirSync(bin, { recursive: true });
    const r2 = stickRoot('fat-root');
    const saved = process.env.PATH;
    const run = async (fstype: string) => {
      fs.writeFileSync(path.join(bin, 'findmnt'), `#!/bin/sh\necho 'SOURCE="/dev/sdz1" FSTYPE="${fstype}" TARGET="${fs.realpathSync(r2)}" UUID="1234-ABCD"'\n`, { mode: 0o755 });
      process.env.PATH = `${bin}:${saved}`;
      try {
        return await vdboot('kit', '--image', path.join(r2, IMAGE), '--root-dir', r2, '--no-grub-images');
      } finally {
        process.env.PATH = saved;
      }
    };
    const ntfs = await run('ntfs');
    expect(ntfs.code).toBe(0);
    expect(ntfs.err).toMatch(/is on ntfs, which firmware cannot read: no Secure Boot chain written; give --esp DIR/);
    expect(fs.existsSync(path.join(r2, 'EFI'))).toBe(false);
    const fat = await run('vfat');
    expect(fat.code).toBe(0);
    expect(fs.readFileSync(path.join(r2, 'EFI/BOOT/BOOTX64.EFI')).equals(fs.readFileSync(SHIM))).toBe(true);
    expect(fs.readFileSync(path.join(r2, 'EFI/vdboot/grub.cfg'), 'utf8')).toContain('root=vdisk:UUID=1234-ABCD:');
  }, 120_000);

  describe('booted under OVMF with Secure Boot enforced (Microsoft\'s keys only)', () => {
    let stick: string;
    let ntfsOffset: number;
    let ntfsSize: number;
    let unsignedBoot: Promise<string>;

    beforeAll(() => {
      const espImg = path.join(dir, 'esp.img');
      makeFat(espImg, { sizeMiB: 64, label: 'VDBOOT-ESP', files: treeOf(esp) });
      const ntfs = path.join(dir, 'ntfs.img');
      const start = 65 * MiB; // after the ESP at 1 MiB
      makeNtfs(ntfs, { sizeMiB: 160, label: 'SBNTFS', partitionStartSector: start / 512, files: treeOf(root) });
      stick = path.join(dir, 'stick.img');
      const layout = makePartitionedDisk(stick, { table: 'gpt', partitions: [{ image: espImg, type: 'uefi', name: 'EFI system partition' }, { image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });
      if (layout[1]!.offset !== start) throw new Error(`NTFS partition at ${layout[1]!.offset}, made for ${start}`);
      ntfsOffset = layout[1]!.offset;
      ntfsSize = layout[1]!.size;

      // The same ESP, but the firmware's default loader is the kit's unsigned GRUB.
      const espUnsigned = path.join(dir, 'esp-unsigned.img');
      makeFat(espUnsigned, { sizeMiB: 64, files: { ...treeOf(esp), '/EFI/BOOT/BOOTX64.EFI': { hostFile: path.join(root, 'boot/vdboot/grubx64.efi') } } });
      const unsignedStick = path.join(dir, 'stick-unsigned.img');
      makePartitionedDisk(unsignedStick, { table: 'gpt', partitions: [{ image: espUnsigned, type: 'uefi' }] });
      unsignedBoot = bootFromDisk({ disk: unsignedStick, format: 'raw', firmware: 'uefi', secureBoot: true, marker: 'BdsDxe: No bootable option', timeoutMs: 300_000 });
      unsignedBoot.catch(() => {});
    }, 120_000);

    /** The VHDX as it is now on the stick's NTFS partition. */
    function vhdxOnStick(): string {
      const part = path.join(dir, 'ntfs-after.img');
      const fd = fs.openSync(stick, 'r');
      const buf = Buffer.alloc(ntfsSize);
      fs.readSync(fd, buf, 0, ntfsSize, ntfsOffset);
      fs.closeSync(fd);
      fs.writeFileSync(part, buf);
      const out = path.join(dir, 'after.vhdx');
      fs.writeFileSync(out, ntfsRead(part, IMAGE));
      return out;
    }

    it('shim → signed GRUB → signed kernel → vdboot: the dynamic VHDX on NTFS is expanded and booted rw; the kernel reports Secure Boot', async () => {
      const t = (await bootFromDisk({ disk: stick, format: 'raw', firmware: 'uefi', secureBoot: true, snapshot: false, until: 'exit', marker: GUEST_MARKER, timeoutMs: 480_000 })).replace(/\r/g, '');
      expect(t).toMatch(/EFI stub: UEFI Secure Boot is enabled/);
      expect(t).toMatch(/secureboot: Secure boot enabled/);
      const facts = parseGuestFacts(t);
      expect(facts.facts.secureboot).toBe('1');
      expect(facts.facts.lockdown).toBe('1');
      expect(facts.cmdline).toContain(`"root=vdisk:LABEL=SBNTFS:${IMAGE}" rd.vdisk.mode=rw rw`);
      expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
      expect(facts.facts.count).toBe('1');
      expect(t).toMatch(/expanding \/VMs\/Linux Guest\.vhdx in place/);
      expect(t).toMatch(/reboot: Power down/);
      const after = vhdxOnStick();
      const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', after], { encoding: 'utf8' });
      expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
      // expanded in place: every block is now in the file
      expect(fs.statSync(after).size).toBeGreaterThan(virtualSize(after));
    }, 500_000);

    it('a second Secure Boot boot sees the first one\'s write', async () => {
      const t = (await bootFromDisk({ disk: stick, format: 'raw', firmware: 'uefi', secureBoot: true, snapshot: false, until: 'exit', marker: GUEST_MARKER, timeoutMs: 480_000 })).replace(/\r/g, '');
      const facts = parseGuestFacts(t);
      expect(facts.facts.secureboot).toBe('1');
      expect(facts.root.mode).toBe('rw');
      expect(facts.facts.count).toBe('2');
      expect(t).not.toMatch(/expanding \/VMs\/Linux Guest\.vhdx in place/);
      // the oracle: the count file inside the image on the host, read by qemu-img and debugfs
      const raw = path.join(dir, 'after.raw');
      execFileSync('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', vhdxOnStick(), raw]);
      const part = `${raw}.ext4`;
      execFileSync('dd', [`if=${raw}`, `of=${part}`, 'bs=1M', 'skip=3', 'status=none']);
      expect(execFileSync('debugfs', ['-R', 'cat /home/count', part], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()).toBe('2');
    }, 500_000);

    it('the same firmware refuses the kit\'s unsigned GRUB: "Access Denied", no GRUB and no kernel', async () => {
      const t = (await unsignedBoot).replace(/\r/g, '');
      expect(t).toMatch(/BdsDxe: failed to load Boot\d+ .*: Access Denied/);
      expect(t).not.toMatch(/Linux version|vdboot: loading the kernel|GNU GRUB/);
    }, 320_000);
  });
});
