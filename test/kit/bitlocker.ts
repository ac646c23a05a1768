/**
 * The BitLocker volumes Windows made (test/data/bitlocker/bitlk-images.tar.xz), unpacked for
 * a test, with what their images.conf and `cryptsetup bitlkDump` say about them (the oracles).
 * These volumes are stripped (cryptsetup's test suite kept only what its hash test needs: the
 * NTFS inside is zeros); test/kit/bitlocker-host.ts writes an NTFS with an image into one,
 * for boots from a BitLocker host.
 *
 *   unpackBitLockerImages(dir): string          unpacks once into dir; returns the images' folder
 *   readImagesConf(folder): Map<name, BitLockerConf>   images.conf, one section per image
 *   bitlkDump(image): BitlkDump | null          cryptsetup bitlkDump parsed (null: no cryptsetup)
 *   unlockInInitramfs(opts)                     a QEMU boot unlocking volumes in vdboot's initramfs
 *   useBitLockerVolumes(): BitLockerSuite       a test file's volumes, initramfs and VMs
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { BITLOCKER_DIR } from './data.ts';
import { cleanupTmpDirs, makeTmpDir } from './oracle.ts';

export function unpackBitLockerImages(dir: string): string {
  const out = path.join(dir, 'bitlk-images');
  if (!fs.existsSync(path.join(out, 'images.conf'))) {
    execFileSync('tar', ['-xJf', path.join(BITLOCKER_DIR, 'bitlk-images.tar.xz'), '-C', dir]);
  }
  return out;
}

/** One [section] of images.conf: keys as written (CIPHER, GUID, PW, RP, *_VMK_GUID, SHA256SUM, …). */
export type BitLockerConf = Record<string, string>;

export function readImagesConf(folder: string): Map<string, BitLockerConf> {
  const out = new Map<string, BitLockerConf>();
  let cur: BitLockerConf | undefined;
  for (const line of fs.readFileSync(path.join(folder, 'images.conf'), 'utf8').split('\n')) {
    const sec = /^\[(.+)\]$/.exec(line.trim());
    if (sec) { cur = {}; out.set(sec[1]!, cur); continue; }
    const kv = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (kv && cur) cur[kv[1]!] = kv[2]!;
  }
  return out;
}

export interface BitlkDump {
  toGo: boolean;
  version: number;
  guid: string;
  sectorSize: number;
  volumeSize: number;
  description: string;
  cipher: string;
  keyBits: number;
  /** VMK keyslots: GUID and cryptsetup's protection text ("VMK protected with passphrase"). */
  vmks: { guid: string; protection: string; name?: string }[];
  metadataOffsets: number[];
  /** the FVE metadata areas with their sizes (cryptsetup maps them as zeros) */
  metadataAreas: { offset: number; size: number }[];
  volumeHeader: { offset: number; size: number };
}

export function hasCryptsetup(): boolean {
  return spawnSync('sh', ['-c', 'command -v cryptsetup']).status === 0;
}

export function bitlkDump(image: string): BitlkDump | null {
  if (!hasCryptsetup()) return null;
  const text = execFileSync('cryptsetup', ['bitlkDump', image], { encoding: 'utf8' });
  const field = (name: string): string => {
    const m = new RegExp(`^${name}:\\s*(.*)$`, 'm').exec(text);
    if (!m) throw new Error(`bitlkDump ${image}: no "${name}:" line in\n${text}`);
    return m[1]!.trim();
  };
  const vmks: BitlkDump['vmks'] = [];
  for (const m of text.matchAll(/^ *\d+: VMK\n(?:\s*Name:\s*(.*)\n)?\s*GUID:\s*(\S+)\n\s*Protection:\s*(.+)$/gm)) {
    vmks.push({ guid: m[2]!, protection: m[3]!.trim(), ...(m[1] !== undefined ? { name: m[1].trim() } : {}) });
  }
  const metadataOffsets = [...text.matchAll(/FVE metadata area\n\s*Offset:\s*(\d+)/g)].map((m) => Number(m[1]));
  const metadataAreas = [...text.matchAll(/FVE metadata area\n\s*Offset:\s*(\d+) \[bytes\]\n\s*Size:\s*(\d+)/g)].map((m) => ({ offset: Number(m[1]), size: Number(m[2]) }));
  const vh = /Volume header\n\s*Offset:\s*(\d+) \[bytes\]\n\s*Size:\s*(\d+)/.exec(text);
  return {
    toGo: /^Info for BITLK To Go device/m.test(text),
    version: Number(field('Version')),
    guid: field('GUID'),
    sectorSize: parseInt(field('Sector size'), 10),
    volumeSize: parseInt(field('Volume size'), 10),
    description: field('Description'),
    cipher: `${field('Cipher name')}-${field('Cipher mode')}`,
    keyBits: parseInt(field('Cipher key'), 10),
    vmks,
    metadataOffsets,
    metadataAreas,
    volumeHeader: vh ? { offset: Number(vh[1]), size: Number(vh[2]) } : { offset: -1, size: -1 },
  };
}

/**
 * One QEMU boot of vdboot's initramfs (`initrd`) with Windows-made BitLocker volumes as virtio
 * disks: the first is the root=vdisk: host, unlocked at the console prompt (a wrong key, then
 * its recovery password); in the rescue shell that follows, the initramfs's cryptsetup opens
 * each of `others` with each of `keys`, and every opened device's SHA-256 must be the one
 * images.conf records. Powers the VM off at the end.
 */
export async function unlockInInitramfs(opts: { images: string; conf: Map<string, BitLockerConf>; initrd: string; first: string; others: { name: string; keys: ('PW' | 'RP')[] }[]; name: string; vms: Vm[] }): Promise<void> {
  const { images, conf, initrd, vms } = opts;
  const first = conf.get(opts.first)!;
  const disks = [opts.first, ...opts.others.map((o) => o.name)].map((n) => ({ file: path.join(images, `${n}.img`), snapshot: true }));
  const vm = await bootVm({ initrd, append: 'root=vdisk:/dev/vda:/VMs/missing.vhdx rd.timeout=30', disks, name: opts.name });
  vms.push(vm);
  const prompt = (n: number) => `Enter the recovery password (48 digits) or password (try ${n} of 3): `;
  await vm.waitFor(prompt(1), 300_000);
  vm.send('123456-000000-000000-000000-000000-000000-000000-000000\n');
  await vm.waitFor('No key available with this passphrase (try 1 of 3).', 300_000);
  await vm.waitFor(prompt(2), 60_000);
  vm.send(`${first.RP}\n`);
  await vm.waitFor(new RegExp(`unlocked /dev/vda \\(BitLocker ${first.GUID}\\) with the key typed \\(try 2 of 3\\) as /dev/mapper/bitlk-${first.GUID}`), 300_000);
  // The test volumes are stripped (cryptsetup's test suite zeroed what its hash test does
  // not need): the NTFS inside is not whole, and vdboot's reader says so, naming the device.
  await vm.waitFor(new RegExp(`ERROR: /dev/mapper/bitlk-${first.GUID}: MFT record \\d+ has signature .* the MFT is damaged`), 120_000);
  await vm.waitFor('vdboot# ', 120_000);
  const beforeShell = vm.transcript();
  expect(beforeShell).not.toContain(first.RP); // echo off
  expect(beforeShell).toMatch(/found host partition of the root image \/dev\/vda at \/dev\/vda \(BitLocker\)/);

  const sum = async (label: string, command: string): Promise<string> => {
    vm.send(`${command}; echo "SUM ${label} $( (sha256sum < /dev/mapper/t || echo FAILED) | cut -c1-64)"; cryptsetup close t 2>/dev/null\n`);
    // anchored on the answer (64 hex digits), not the echoed command line
    const line = await vm.waitFor(new RegExp(`^SUM ${label} ([0-9a-f]{64}|FAILED)$`), 300_000);
    return line.slice(`SUM ${label} `.length).trim();
  };
  // the host the boot opened, read whole
  vm.send(`echo "SUM host $( (sha256sum < /dev/mapper/bitlk-${first.GUID} || echo FAILED) | cut -c1-64)"\n`);
  const host = (await vm.waitFor(/^SUM host ([0-9a-f]{64}|FAILED)$/, 300_000)).slice('SUM host '.length).trim();
  expect(host).toBe(first.SHA256SUM);
  const letters = 'bcdefghijklmnopqrstuvwxyz';
  for (const [i, { name, keys }] of opts.others.entries()) {
    const c = conf.get(name)!;
    const dev = `/dev/vd${letters[i]}`;
    for (const kind of keys) {
      const got = await sum(`${name}-${kind}`, `printf '%s' '${c[kind]!}' | cryptsetup open --type bitlk --key-file=- ${dev} t`);
      expect(got, `${name} ${kind}`).toBe(c.SHA256SUM);
    }
  }
  vm.send('poweroff -f\n');
  await vm.waitExit(120_000);
}

/** What a test file that boots the BitLocker volumes shares: the unpacked volumes, images.conf, an initramfs with cryptsetup, its VMs. */
export interface BitLockerSuite {
  images: string;
  conf: Map<string, BitLockerConf>;
  initrd: string;
  vms: Vm[];
}

/**
 * Registers the file's beforeAll (the volumes unpacked, the default kernel's initramfs
 * built, with cryptsetup) and afterAll (VMs killed, temporary folders removed); the fields
 * are filled when the tests run. Nothing is done without cryptsetup on this machine (the
 * tests skip themselves then).
 */
export function useBitLockerVolumes(): BitLockerSuite {
  const suite: BitLockerSuite = { images: '', conf: new Map(), initrd: '', vms: [] };
  beforeAll(() => {
    if (!hasCryptsetup()) return;
    const dir = makeTmpDir();
    suite.images = unpackBitLockerImages(dir);
    suite.conf = readImagesConf(suite.images);
    suite.initrd = path.join(dir, 'initrd.img');
    const r = writeInitramfs(suite.initrd, { kernel: defaultKernel() });
    if (!r.manifest.tools.cryptsetup) throw new Error('the initramfs has no cryptsetup');
  }, 300_000);
  afterAll(async () => {
    for (const vm of suite.vms) if (!vm.exited) await vm.kill();
    cleanupTmpDirs();
  });
  return suite;
}
