/**
 * End to end: a VHDX booted from inside a BitLocker volume made by Windows (test/data/bitlocker),
 * unlocked in vdboot's own initramfs under QEMU by Debian's cryptsetup.
 *
 * The volume (bitlk-aes-xts-128) is stripped (cryptsetup's test suite kept only what its hash
 * test needs; the NTFS is zeros), so test/kit/bitlocker-host.ts writes an NTFS into it through
 * cryptsetup's bitlk mapping in a builder VM, with the FVE metadata areas held by reserved
 * files and a VHDX of the test guest (every block allocated) at /VMs/guest.vhdx, read back
 * byte-identical through the mapping (cached: the builder runs once per machine).
 *  1. root=vdisk:/dev/vda:/VMs/guest.vhdx rw: the console asks for the key (echo off); a wrong
 *     one is refused with the try count, the recovery password typed opens the volume as
 *     /dev/mapper/bitlk-GUID, vdboot's NTFS reader finds the VHDX inside, maps it and boots
 *     the guest, which counts its boot in /count (0 before) and powers off through vdboot's
 *     shutdown hand-off (the BitLocker mapping removed last).
 *  2. The same volume with the password in a key file on a FAT stick
 *     (rd.vdisk.bitlocker.key=/bitlocker.txt:LABEL=USB), rd.break=pre-switch: in that shell,
 *     the initramfs's cryptsetup opens an Elephant-diffuser volume (AES-CBC) with its
 *     password, SHA-256 as images.conf; then the guest boots and reads the count the first
 *     boot wrote (the rw path proven by reading back).
 * Measured (TCG, two busy cores): 169 s with the host cached (boots 76 s + 86 s); the builder
 * adds 67-114 s once. Every volume with both keys, To Go volumes among them, and the first
 * volume's SHA-256 as images.conf: test/full/bitlocker-volumes.full.ts. The whole unlocked
 * volume read back after a rw boot and checked (NTFS, VHDX, e2fsck):
 * test/full/bitlocker-host.full.ts. test/boot/bitlocker-simulation.test.ts covers the boot
 * steps with a stand-in for the decryption.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, type Vm } from '../../qemu/harness.ts';
import { hasCryptsetup, useBitLockerVolumes } from '../kit/bitlocker.ts';
import { GUEST_HOST_VOLUME, GUEST_IMAGE_PATH, guestOnBitLockerHost, type BitLockerHost } from '../kit/bitlocker-host.ts';
import { hostDisk } from '../kit/host-disk.ts';
import { makeTmpDir } from '../kit/oracle.ts';

const suite = useBitLockerVolumes();
const VOLUME = GUEST_HOST_VOLUME;
const IMAGE_PATH = GUEST_IMAGE_PATH;

let host: BitLockerHost;
let volume: string;

async function boot(name: string, append: string, disks: { file: string; snapshot?: boolean }[]): Promise<Vm> {
  const vm = await bootVm({ initrd: suite.initrd, append, disks, name });
  suite.vms.push(vm);
  return vm;
}

describe.skipIf(!hasCryptsetup())('end to end: a VHDX on the NTFS inside a Windows-made BitLocker volume', { timeout: 1_200_000 }, () => {
  it('the builder wrote the NTFS through the bitlk mapping; the VHDX read back is byte-identical', async () => {
    host = await guestOnBitLockerHost(suite);
    // bitlkDump's three FVE metadata areas and the volume header (next to the first) are held
    expect(host.zeroSegments.length).toBe(3);
    expect(host.reserved.length).toBeGreaterThanOrEqual(3);
    volume = path.join(makeTmpDir(), 'bitlocker-host.img');
    fs.copyFileSync(host.volume, volume);
  }, 1_200_000);

  it('root=vdisk: on the BitLocker host, rw: a wrong key refused with the try count, the recovery password typed opens it (echo off), the guest boots', async () => {
    const conf = suite.conf.get(VOLUME)!;
    const vm = await boot('bitlocker-vhdx-typed', `root=vdisk:/dev/vda:${IMAGE_PATH} rw rd.timeout=30`, [{ file: volume }]);
    const prompt = (n: number) => `Enter the recovery password (48 digits) or password (try ${n} of 3): `;
    await vm.waitFor(prompt(1), 300_000);
    vm.send('123456-000000-000000-000000-000000-000000-000000-000000\n');
    await vm.waitFor('No key available with this passphrase (try 1 of 3).', 300_000);
    await vm.waitFor(prompt(2), 60_000);
    vm.send(`${conf.RP}\n`);
    await vm.waitFor(new RegExp(`unlocked /dev/vda \\(BitLocker ${conf.GUID}\\) with the key typed \\(try 2 of 3\\) as /dev/mapper/bitlk-${conf.GUID}`), 300_000);
    await vm.waitFor(GUEST_MARKER, 300_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    await vm.waitExit(120_000);
    expect(t).not.toContain(conf.RP); // echo off
    expect(t).toMatch(/found host partition of the root image \/dev\/vda at \/dev\/vda \(BitLocker\)/);
    // vdboot's own NTFS reader found the image inside; the direct path maps it onto the unlocked volume
    expect(t).toMatch(new RegExp(`vdisk0: ${IMAGE_PATH} on /dev/mapper/bitlk-${conf.GUID} \\(ntfs, LABEL="Windows"\\): vhdx dynamic, direct: the image is fully mappable`));
    // the metadata areas as the kernel's table holds them: as many bytes as bitlkDump names (the
    // kit's oracle merges the volume header with the metadata area beside it; the table does not)
    const kib = host.zeroSegments.reduce((a, z) => a + z.size, 0) / 1024;
    const areas = new RegExp(`/dev/mapper/bitlk-${conf.GUID}: (\\d+) BitLocker metadata areas \\(${kib} KiB\\) read as zeros there; no image may lie in them`).exec(t);
    expect(areas, 'the metadata areas line').not.toBeNull();
    expect(Number(areas![1])).toBeGreaterThanOrEqual(host.zeroSegments.length);
    expect(facts.root).toMatchObject({ fstype: 'ext4', mode: 'rw' });
    expect(facts.facts.count).toBe('0');
    const end = vm.transcript().slice(t.length);
    expect(end).toContain(`removed /dev/mapper/bitlk-${conf.GUID}`);
    expect(end.indexOf(`removed /dev/mapper/bitlk-${conf.GUID}`)).toBeGreaterThan(end.indexOf('removed /dev/mapper/vdisk0'));
    expect(end).not.toMatch(/could not remove/);
  });

  it('the password in a key file on a stick opens it; in the pre-switch shell cryptsetup opens an Elephant volume by its password (SHA-256 as images.conf); the guest reads the count the first boot wrote', async () => {
    const conf = suite.conf.get(VOLUME)!;
    const dir = makeTmpDir();
    const stick = hostDisk(dir, 'stick', 'vfat', { '/bitlocker.txt': `${conf.PW}\r\n` }, { sizeMiB: 34 });
    const others = [{ name: 'bitlk-aes-cbc-elephant-128', key: 'PW' }] as const;
    const vm = await boot('bitlocker-vhdx-keyfile', `root=vdisk:/dev/vda:${IMAGE_PATH} rw rd.vdisk.bitlocker.key=/bitlocker.txt:LABEL=USB rd.break=pre-switch rd.timeout=30`, [
      { file: volume }, { file: stick.disk, snapshot: true },
      ...others.map((o) => ({ file: path.join(suite.images, `${o.name}.img`), snapshot: true })),
    ]);
    await vm.waitFor(new RegExp(`unlocked /dev/vda \\(BitLocker ${conf.GUID}\\) with the key in .*bitlocker\\.txt.* as /dev/mapper/bitlk-${conf.GUID}`), 300_000);
    await vm.waitFor('vdboot# ', 300_000);
    expect(vm.transcript()).not.toMatch(/Enter the recovery password/);
    for (const [i, o] of others.entries()) {
      const c = suite.conf.get(o.name)!;
      const dev = `/dev/vd${'cdefgh'[i]}`;
      vm.send(`printf '%s' '${c[o.key]!}' | cryptsetup open --type bitlk --key-file=- ${dev} t; echo "SUM ${o.name} $( (sha256sum < /dev/mapper/t || echo FAILED) | cut -c1-64)"; cryptsetup close t\n`);
      // anchored on the answer (64 hex digits), not the echoed command line
      const line = await vm.waitFor(new RegExp(`^SUM ${o.name} ([0-9a-f]{64}|FAILED)$`), 300_000);
      expect(line.slice(`SUM ${o.name} `.length).trim(), `${o.name} ${o.key}`).toBe(c.SHA256SUM);
    }
    vm.send('exit\n');
    await vm.waitFor(GUEST_MARKER, 300_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(120_000);
    expect(facts.facts.count).toBe('1');
    expect(facts.root.mode).toBe('rw');
  });
});
