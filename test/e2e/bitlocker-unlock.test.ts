/**
 * End to end: BitLocker volumes made by Windows (test/data/bitlocker), unlocked in vdboot's
 * own initramfs under QEMU by Debian's cryptsetup.
 *  1. root=vdisk:/dev/vda:/VMs/missing.vhdx on a BitLocker volume: the console asks for the
 *     key (echo off); a wrong one is refused with the try count, the recovery password opens
 *     it as /dev/mapper/bitlk-GUID; the image is not on the NTFS inside, so the boot stops in
 *     the rescue shell, naming the path and what it searched.
 *  2. In that shell, the initramfs's cryptsetup opens the other volumes (AES-CBC, the
 *     Elephant diffuser, AES-XTS 256, BitLocker To Go) with their password and with their
 *     recovery password; each opened device's SHA-256 is the one images.conf records.
 * What is not here: an image booted from the NTFS inside a BitLocker volume (writing the
 * image into it needs device-mapper, so a builder VM) — the simulation test covers that
 * path with a stand-in for the decryption.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { hasCryptsetup, readImagesConf, unpackBitLockerImages, type BitLockerConf } from '../kit/bitlocker.ts';
import { cleanupTmpDirs, makeTmpDir } from '../kit/oracle.ts';

const FIRST = 'bitlk-aes-xts-128';
const OTHERS = ['bitlk-aes-cbc-128', 'bitlk-aes-cbc-elephant-128', 'bitlk-aes-xts-256', 'bitlk-togo-aes-xts-128'];

let dir: string;
let images: string;
let conf: Map<string, BitLockerConf>;
let initrd: string;
const vms: Vm[] = [];

beforeAll(() => {
  if (!hasCryptsetup()) return;
  dir = makeTmpDir();
  images = unpackBitLockerImages(dir);
  conf = readImagesConf(images);
  initrd = path.join(dir, 'initrd.img');
  const r = writeInitramfs(initrd, { kernel: defaultKernel() });
  if (!r.manifest.tools.cryptsetup) throw new Error('the initramfs has no cryptsetup');
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  cleanupTmpDirs();
});

describe.skipIf(!hasCryptsetup())('end to end: BitLocker volumes unlocked in vdboot\'s initramfs', { timeout: 900_000 }, () => {
  it('the recovery password typed after a wrong key opens the host; the initramfs\'s cryptsetup opens CBC, Elephant, XTS-256 and To Go volumes with password and recovery password, SHA-256 as images.conf', async () => {
    const first = conf.get(FIRST)!;
    const disks = [FIRST, ...OTHERS].map((n) => ({ file: path.join(images, `${n}.img`), snapshot: true }));
    const vm = await bootVm({ initrd, append: 'root=vdisk:/dev/vda:/VMs/missing.vhdx rd.timeout=30', disks, name: 'bitlocker-unlock' });
    vms.push(vm);
    const prompt = (n: number) => `Enter the recovery password (48 digits) or password (try ${n} of 3): `;
    await vm.waitFor(prompt(1), 300_000);
    vm.send('123456-000000-000000-000000-000000-000000-000000-000000\n');
    await vm.waitFor('No key available with this passphrase (try 1 of 3).', 300_000);
    await vm.waitFor(prompt(2), 60_000);
    vm.send(`${first.RP}\n`);
    await vm.waitFor(new RegExp(`unlocked /dev/vda \\(BitLocker ${first.GUID}\\) with the key typed \\(try 2 of 3\\) as /dev/mapper/bitlk-${first.GUID}`), 300_000);
    await vm.waitFor('Could not find /VMs/missing.vhdx', 120_000);
    await vm.waitFor('vdboot# ', 120_000);
    const beforeShell = vm.transcript();
    expect(beforeShell).not.toContain(first.RP); // echo off
    expect(beforeShell).toMatch(/found host partition of the root image \/dev\/vda at \/dev\/vda \(BitLocker\)/);

    const sum = async (label: string, command: string): Promise<string> => {
      vm.send(`${command}; echo "SUM ${label} $(sha256sum < /dev/mapper/t | cut -c1-64)"; cryptsetup close t 2>/dev/null\n`);
      const line = await vm.waitFor(new RegExp(`^SUM ${label} `), 300_000);
      return line.slice(`SUM ${label} `.length).trim();
    };
    // the host the boot opened, read whole
    vm.send(`echo "SUM host $(sha256sum < /dev/mapper/bitlk-${first.GUID} | cut -c1-64)"\n`);
    const host = (await vm.waitFor(/^SUM host /, 300_000)).slice('SUM host '.length).trim();
    expect(host).toBe(first.SHA256SUM);
    const letters = 'bcdefgh';
    for (const [i, name] of OTHERS.entries()) {
      const c = conf.get(name)!;
      const dev = `/dev/vd${letters[i]}`;
      for (const [kind, key] of [['pw', c.PW!], ['rp', c.RP!]] as const) {
        const got = await sum(`${name}-${kind}`, `printf '%s' '${key}' | cryptsetup open --type bitlk --key-file=- ${dev} t`);
        expect(got, `${name} ${kind}`).toBe(c.SHA256SUM);
      }
    }
    vm.send('poweroff -f\n');
    await vm.waitExit(120_000);
  });
});
