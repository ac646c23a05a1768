/**
 * The guest's own kernel under Secure Boot: a stick made by `vdboot kit --esp` (Debian's
 * signed shim and GRUB, the build machine's signed 6.1 kernel and vdboot's initramfs) boots
 * under OVMF with Secure Boot enforced and only Microsoft's keys. The image on the NTFS
 * partition holds Debian's 6.12 kernel and its modules, so vdboot starts it with
 * kexec_file_load; the locked-down 6.1 kernel checks its signature (Debian's Secure Boot CA,
 * which shim vouches for) and 6.12 comes up locked down too, with the guest's init on it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MOK_MANAGER, SHIM, SIGNED_GRUB } from '../../mkdisk/secureboot.ts';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeFat, makeNtfs, makePartitionedDisk, type FileTree } from '../../qemu/disks.ts';
import { GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { cachedKernel, defaultKernel, kernelVersion } from '../../qemu/harness.ts';
import { main, type CliIO } from '../../src/cli/main.ts';
import { makeKexecGuestDisk } from '../kit/guest-disk.ts';
import { treeOf } from '../kit/host-disk.ts';
import { cleanupTmpDirs, makeTmpDir } from '../kit/oracle.ts';
import { bootFromDisk, OVMF_CODE_SECBOOT, OVMF_VARS_MS } from './firmware.ts';

const MiB = 1024 * 1024;
const IMAGE = '/VMs/linux.vhdx';
const newKernel = cachedKernel('6.12');
const ready = newKernel !== undefined && [SHIM, SIGNED_GRUB, MOK_MANAGER, OVMF_CODE_SECBOOT, OVMF_VARS_MS].every((f) => fs.existsSync(f));

afterAll(() => cleanupTmpDirs());


describe.skipIf(!ready)('kexec under Secure Boot', () => {
  it('the kit\'s signed 6.1 chain starts the image\'s signed 6.12 with kexec_file_load: both locked down, the guest on 6.12', async () => {
    const dir = makeTmpDir();
    // the guest's modules are chosen by the names the running initramfs has
    const running = writeInitramfs(path.join(dir, 'running.img'), { kernel: defaultKernel() }).manifest;
    const disk = makeKexecGuestDisk(dir, newKernel!, running, { kernelMessages: true, commands: [guestFact('kernel', '$(uname -r)')], then: { exec: '/run/initramfs/shutdown poweroff' } }, 'kexec root');
    const root = path.join(dir, 'stick');
    fs.mkdirSync(path.join(root, 'VMs'), { recursive: true });
    convertImage(disk, path.join(root, IMAGE), 'vhdx', ['subformat=fixed']);
    const esp = path.join(dir, 'esp');
    fs.mkdirSync(esp);
    let out = '';
    const io = { stdout: (s: string) => { out += s; }, stderr: (s: string) => { out += s; }, async stdoutBytes() {} } as unknown as CliIO;
    expect(await main(['kit', '--image', path.join(root, IMAGE), '--root-dir', root, '--esp', esp, '--host', 'LABEL=SBNTFS', '--append', 'console=ttyS0,115200', '-q'], io), out).toBe(0);
    const espImg = path.join(dir, 'esp.img');
    makeFat(espImg, { sizeMiB: 64, label: 'VDBOOT-ESP', files: treeOf(esp) });
    const ntfs = path.join(dir, 'ntfs.img');
    makeNtfs(ntfs, { sizeMiB: 320, label: 'SBNTFS', partitionStartSector: (65 * MiB) / 512, files: { [IMAGE]: { hostFile: path.join(root, IMAGE) } } });
    const stick = path.join(dir, 'stick.img');
    makePartitionedDisk(stick, { table: 'gpt', partitions: [{ image: espImg, type: 'uefi', name: 'EFI system partition' }, { image: ntfs, type: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7', name: 'Basic data partition' }] });
    fs.rmSync(ntfs);
    fs.rmSync(espImg);

    const t = (await bootFromDisk({ disk: stick, format: 'raw', firmware: 'uefi', secureBoot: true, snapshot: true, memoryMiB: 1024, until: 'exit', marker: GUEST_MARKER, timeoutMs: 600_000 })).replace(/\r/g, '');
    const jump = t.indexOf('kexec: jumping to 6.12');
    expect(jump, t.slice(-3000)).toBeGreaterThan(0);
    const [before, after] = [t.slice(0, jump), t.slice(jump)];
    expect(before).toMatch(/EFI stub: UEFI Secure Boot is enabled/);
    expect(before).toMatch(/Kernel is locked down from EFI Secure Boot/);
    expect(before).toMatch(new RegExp(`kexec: starting the root's kernel 6\\.12\\.\\S+ \\(/boot/vmlinuz-\\S+\\) instead of the running ${kernelVersion(defaultKernel()).replace(/\./g, '\\.')}`));
    expect(after).toMatch(/Kernel is locked down from EFI Secure Boot/);
    expect(after).toMatch(/secureboot: Secure boot enabled/);
    const facts = parseGuestFacts(after);
    expect(facts.facts.kernel).toBe(kernelVersion(newKernel!));
    expect(facts.cmdline).toContain('rd.vdboot.kexeced=1');
  }, 900_000);
});
