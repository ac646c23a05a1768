/**
 * root=vdisk: on a BitLocker host partition, in the production init bundle run by QuickJS
 * against the fake kernel. The host partition holds a volume Windows encrypted
 * (test/data/bitlocker); the fake cryptsetup checks each key it is given with the real
 * cryptsetup (`open --test-passphrase` on the same volume, no device-mapper needed) and, when
 * it opens, creates the dm-crypt device through the fake kernel's device-mapper. The fake
 * kernel's crypt target reads as an NTFS made by mkntfs holding a VHD (decryption itself is
 * the one thing stood in for). Checked: the prompt and its three tries, the key bytes that
 * reach cryptsetup, the image mapped straight onto /dev/mapper/bitlk-GUID, the rescue shell
 * after three wrong keys, and the shutdown hand-off closing the BitLocker mapping last.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FakeDmEvent, FakeKernel, FakeMachine } from '../../src/sys/fake.ts';
import { REBOOT } from '../../src/sys/sys.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { readImagesConf, unpackBitLockerImages } from '../kit/bitlocker.ts';
import { BASIC_DATA, convert, fakeDiskOf, loadNtfsMkdir, makeGuestDisk, makeHostDisk, makeNtfs, tmpDir } from '../vdisk/helpers.ts';
import { runBundleInQuickJS } from './sim-harness.ts';
import { GUEST_TREE, simInitramfs, simManifest } from './sim-machine.ts';

const IMAGE = 'bitlk-aes-xts-128';
let dir: string;
let volume: string;
let conf: Record<string, string>;
let hostDisk: Uint8Array;
let plain: Uint8Array;
let partitions: { name: string; number: number; start: number; size: number }[];
let images: string;
let keys: string;

/** A GPT disk: partition 1 (PARTLABEL Windows) the BitLocker volume, partition 2 a FAT labelled KEYS. */
function hostDiskWith(vol: string, name: string): { bytes: Uint8Array; partitions: typeof partitions } {
  return fakeDiskOf(makeHostDisk(dir, name, [{ image: vol, type: BASIC_DATA, label: 'Windows' }, { image: keys, type: BASIC_DATA, label: 'keys' }]));
}

beforeAll(async () => {
  if (!existsSync('build/init.js')) throw new Error('build/init.js is missing: run "npm run build" first');
  await loadNtfsMkdir();
  dir = tmpDir();
  images = unpackBitLockerImages(dir);
  volume = path.join(images, `${IMAGE}.img`);
  conf = readImagesConf(images).get(IMAGE)!;
  const vhd = convert(makeGuestDisk(dir), path.join(dir, 'linux.vhd'), 'vpc', ['subformat=fixed']);
  // What the volume reads as once unlocked: an NTFS of the volume's size holding the image.
  plain = new Uint8Array(readFileSync(makeNtfs(dir, 'plain', 100, 'Windows', { '/VMs/linux.vhd': vhd }, ['/VMs'])));
  // The key stick: the recovery password as Notepad saves it (UTF-8 with BOM, CRLF), and a startup key.
  keys = path.join(dir, 'keys.img');
  execFileSync('mkfs.vfat', ['-C', '-n', 'KEYS', keys, String(4096)], { stdio: 'pipe' });
  writeFileSync(path.join(dir, 'recovery.txt'), Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(`${conf.RP}\r\n`)]));
  execFileSync('mmd', ['-i', keys, '::/BitLocker'], { stdio: 'pipe' });
  execFileSync('mcopy', ['-i', keys, path.join(dir, 'recovery.txt'), '::/BitLocker/recovery.txt'], { stdio: 'pipe' });
  execFileSync('mcopy', ['-i', keys, path.join(images, '4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK'), '::/4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK'], { stdio: 'pipe' });
  ({ bytes: hostDisk, partitions } = hostDiskWith(volume, 'host'));
}, 120_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** A zero target the fake cryptsetup puts in its table (sectors), as over an FVE metadata area. */
let zeroArea: { start: number; length: number } | undefined;
/** Keys the fake cryptsetup was given, as text. */
let keysGiven: string[] = [];
/** The same, as bytes. */
let keysRaw: Buffer[] = [];

/** cryptsetup open --type bitlk --key-file=- … [--readonly] DEVICE NAME, the key judged by the real cryptsetup. */
function fakeCryptsetup(stdin: Uint8Array, argv: string[], kernel: FakeKernel): { stdout: Uint8Array; exitCode: number } {
  const [name, device] = [argv[argv.length - 1]!, argv[argv.length - 2]!];
  expect(argv.slice(0, 5)).toEqual(['cryptsetup', 'open', '--type', 'bitlk', '--key-file=-']);
  keysGiven.push(Buffer.from(stdin).toString('utf8'));
  keysRaw.push(Buffer.from(stdin));
  try {
    execFileSync('cryptsetup', ['open', '--test-passphrase', '--type', 'bitlk', '--key-file', '-', volume], { input: stdin, stdio: ['pipe', 'pipe', 'pipe'] });
  } catch (e) {
    const err = e as { status: number; stderr: Buffer };
    return { stdout: new Uint8Array(err.stderr), exitCode: err.status };
  }
  const uuid = `CRYPT-BITLK-${conf.GUID!.replace(/-/g, '')}-${name}`;
  const crypt = (start: number, length: number) => ({ start, length, type: 'crypt', params: `aes-xts-plain64 :32:logon:cryptsetup:${conf.GUID} ${start} ${device} ${start}` });
  const end = plain.length / 512;
  // cryptsetup's bitlk table: crypt targets with a zero target over each FVE metadata area
  const targets = zeroArea
    ? [crypt(0, zeroArea.start), { start: zeroArea.start, length: zeroArea.length, type: 'zero', params: '' }, crypt(zeroArea.start + zeroArea.length, end - zeroArea.start - zeroArea.length)]
    : [crypt(0, end)];
  kernel.createDmDevice(name, uuid, targets, argv.includes('--readonly'));
  return { stdout: new Uint8Array(0), exitCode: 0 };
}

function machine(cmdline: string, consoleInput: string, disk = { bytes: hostDisk, partitions }): FakeMachine {
  const manifest = simManifest();
  (manifest.tools as { cryptsetup?: string }).cryptsetup = '/sbin/cryptsetup';
  return {
    cmdline,
    consoleInput,
    disks: [{ name: 'vda', bytes: disk.bytes, major: 254, minor: 0, partitions: disk.partitions, needsModule: 'virtio_blk' }],
    pciDevices: { '0000:00:04.0': 'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00', virtio1: 'virtio:d00000002v00001AF4' },
    initramfs: { ...simInitramfs(manifest), 'sbin/cryptsetup': { mode: 0o100755, content: 'cryptsetup' } },
    programs: { cryptsetup: fakeCryptsetup },
    cryptPlaintext: { '/dev/vda1': plain },
    deviceTrees: { vdisk0p2: GUEST_TREE },
  };
}

async function boot(cmdline: string, typed: string, disk?: { bytes: Uint8Array; partitions: typeof partitions }) {
  keysGiven = [];
  keysRaw = [];
  const r = await runBundleInQuickJS(machine(cmdline, typed, disk));
  if (r.escaped) throw new Error(`an exception escaped the init:\n${r.escaped}\nconsole:\n${r.kernel.consoleText}`);
  if (process.env.VDBOOT_SHOW) process.stdout.write(r.kernel.consoleText);
  return r;
}

const created = (events: FakeDmEvent[]) => events.filter((e) => e.op === 'create').map((e) => e.name);

describe('simulation: root=vdisk: on a BitLocker host partition', () => {
  it('a wrong key, then the recovery password typed: unlocked as /dev/mapper/bitlk-GUID, the image mapped straight onto it, the guest\'s init runs; the shutdown closes the BitLocker mapping last', async () => {
    const map = `bitlk-${conf.GUID}`;
    const r = await boot('root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd rw', `not-the-key\n${conf.RP}\n`);
    const text = r.kernel.consoleText;
    expect(r.end?.reason, text).toBe('exec');
    expect(r.kernel.events.exec).toMatchObject({ path: '/sbin/init', rootDevice: '/dev/mapper/vdisk0p2' });
    expect(keysGiven).toEqual(['not-the-key', conf.RP]);
    expect(text).toContain(`/dev/vda1 is BitLocker-encrypted ("DESKTOP-NPM7RCA H: 7/4/2019").\nEnter the recovery password (48 digits) or password (try 1 of 3): `);
    expect(text).toContain('No key available with this passphrase (try 1 of 3).');
    expect(text).toMatch(new RegExp(`unlocked /dev/vda1 \\(BitLocker ${conf.GUID}\\) with the key typed \\(try 2 of 3\\) as /dev/mapper/${map}`));
    expect(text).not.toContain(conf.RP); // echo off: the key never reaches the console
    expect(created(r.kernel.events.dm)).toEqual([map, 'vdisk0', 'vdisk0p1', 'vdisk0p2', 'vdhost']);
    const vdisk0 = r.kernel.events.dm.find((e) => e.op === 'load' && e.name === 'vdisk0') as { targets: { type: string; params: string }[] };
    expect(vdisk0.targets.every((t) => t.type === 'linear' && t.params.startsWith(`/dev/mapper/${map} `))).toBe(true);
    const host = r.kernel.events.dm.find((e) => e.op === 'load' && e.name === map) as { readOnly: boolean };
    expect(host.readOnly).toBe(false);

    const k = r.kernel;
    k.pivotRoot('/run/initramfs', '/run/initramfs/oldroot');
    k.machine.argv = ['/shutdown', 'poweroff'];
    const before = k.events.dm.length;
    const s = await runBundleInQuickJS(k.machine, 'build/init.js', k);
    if (s.escaped) throw new Error(`${s.escaped}\n${k.consoleText}`);
    expect(s.end?.reason, k.consoleText).toBe('reboot');
    expect(k.events.rebooted).toBe(REBOOT.POWER_OFF);
    expect(k.events.dm.slice(before).filter((e) => e.op === 'remove').map((e) => e.name)).toEqual(['vdisk0p2', 'vdisk0p1', 'vdisk0', 'vdhost', map]);
  });

  it('three wrong keys: the rescue shell, naming the device, what it accepts and how to give the key; no image device is made', async () => {
    const r = await boot('root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd ro', 'one\ntwo\nthree\nfour\n');
    const text = r.kernel.consoleText;
    expect(r.end?.reason, text).toBe('shell');
    expect(keysGiven).toEqual(['one', 'two', 'three']);
    for (const n of [1, 2, 3]) expect(text).toContain(`No key available with this passphrase (try ${n} of 3).`);
    expect(text).toMatch(/\/dev\/vda1 \(BitLocker [0-9a-f-]{36}, "DESKTOP-NPM7RCA H: 7\/4\/2019"\) was not unlocked: no key given opened it \(3 tries on the console\)\. It accepts: password, recovery password \(48 digits\)\./);
    expect(text).toContain('rd.vdisk.bitlocker.key=/recovery.txt:LABEL=STICK');
    expect(text).toContain(`cryptsetup open --type bitlk /dev/vda1 bitlk-${conf.GUID}`);
    expect(created(r.kernel.events.dm)).toEqual([]);
  });

  it('the password typed, read-only boot: the BitLocker mapping is read-only too', async () => {
    const r = await boot('root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd ro rd.vdisk.mode=ro', `${conf.PW}\n`);
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    expect(keysGiven).toEqual([conf.PW]);
    const host = r.kernel.events.dm.find((e) => e.op === 'load' && e.name === `bitlk-${conf.GUID}`) as { readOnly: boolean };
    expect(host.readOnly).toBe(true);
  });

  it('rd.vdisk.bitlocker.key: the recovery password read from a text file on the key stick (BOM, CRLF): nothing typed', async () => {
    const r = await boot('root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd rw rd.vdisk.bitlocker.key=/BitLocker/recovery.txt:LABEL=KEYS', '');
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    expect(keysGiven).toEqual([conf.RP]);
    expect(r.kernel.consoleText).toMatch(/unlocked \/dev\/vda1 \(BitLocker [0-9a-f-]{36}\) with the key in \/BitLocker\/recovery.txt on LABEL=KEYS as \/dev\/mapper\/bitlk-/);
    expect(r.kernel.consoleText).not.toContain('Enter the');
  });

  it('rd.vdisk.bitlocker.key: a startup key (.BEK) from the stick opens a volume protected by one; a wrong file falls back to the prompt', async () => {
    const vol = path.join(images, 'bitlk-aes-xts-128-startup-key.img');
    const sk = readImagesConf(images).get('bitlk-aes-xts-128-startup-key')!;
    const saved = volume;
    volume = vol; // the fake cryptsetup judges keys against this volume
    try {
      const disk = hostDiskWith(vol, 'host-sk');
      const r = await boot('root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd rw rd.vdisk.bitlocker.key=/4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK:LABEL=KEYS', '', disk);
      expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
      expect(r.kernel.consoleText).toMatch(/with the startup key in \/4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK on LABEL=KEYS as \/dev\/mapper\/bitlk-/);
      // the .BEK file's bytes, as they are on the stick
      expect(keysRaw).toEqual([readFileSync(path.join(images, '4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK'))]);
      // The text file holds another volume's recovery password: refused, then the prompt takes this one's.
      const r2 = await boot('root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd rw rd.vdisk.bitlocker.key=/BitLocker/recovery.txt:LABEL=KEYS', `${sk.RP}\n`, disk);
      expect(r2.end?.reason, r2.kernel.consoleText).toBe('exec');
      expect(keysGiven).toEqual([conf.RP, sk.RP]);
      expect(r2.kernel.consoleText).toMatch(/WARNING: the key in \/BitLocker\/recovery.txt on LABEL=KEYS did not open \/dev\/vda1: No key available with this passphrase/);
    } finally {
      volume = saved;
    }
  });

  describe('the FVE metadata areas (zero targets in cryptsetup\'s table)', () => {
    /** Where /VMs/linux.vhd lies in the unlocked volume, by vdboot's NTFS reader: its first data run, in sectors. */
    function imageRun(): { start: number; length: number } {
      const fs = openHostFs({ name: 'plain', size: plain.length, read: (o, l) => plain.subarray(o, o + l) })!;
      const run = fs.lookup('/VMs/linux.vhd').extents.find((e) => e.kind === 'data')!;
      if (run.kind !== 'data') throw new Error('no data run');
      return { start: run.deviceOffset / 512, length: run.length / 512 };
    }
    afterAll(() => { zeroArea = undefined; });

    it('a metadata area over the image file\'s clusters: refused before anything maps it, naming the file and device bytes', async () => {
      const run = imageRun();
      // 64 KiB in the middle of the image's first run: inside the guest's disk, not its footer
      zeroArea = { start: run.start + Math.floor(run.length / 2 / 8) * 8, length: 128 };
      const r = await boot(`root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd rw rd.shell=0`, `${conf.RP}\n`);
      const text = r.kernel.consoleText;
      expect(text).toMatch(/\/VMs\/linux\.vhd on \/dev\/mapper\/bitlk-[0-9a-f-]+ .*: 65536 bytes of it \(file bytes \d+–\d+, device bytes \d+–\d+\) lie in a BitLocker metadata area, which the unlocked volume reads as zeros and where writes are dropped/);
      const from = zeroArea.start * 512;
      expect(text).toContain(`device bytes ${from}–${from + 65536 - 1}`);
      expect(text).toContain('chkdsk /f');
      expect(created(r.kernel.events.dm)).toEqual([`bitlk-${conf.GUID}`]);
    });

    it('metadata areas clear of the image file: read from the kernel\'s table, and the boot goes on', async () => {
      const run = imageRun();
      const end = plain.length / 512;
      // free space past the image file (the volume's last MiBs, before NTFS's backup boot sector)
      zeroArea = { start: Math.max(run.start + run.length, end - 4096), length: 128 };
      expect(zeroArea.start + zeroArea.length).toBeLessThan(end - 8);
      const r = await boot(`root=vdisk:PARTLABEL=Windows:/VMs/linux.vhd rw`, `${conf.RP}\n`);
      expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
      expect(r.kernel.consoleText).toContain(`/dev/mapper/bitlk-${conf.GUID}: 1 BitLocker metadata area (64 KiB) reads as zeros there; no image may lie in it`);
      expect(r.kernel.consoleText).not.toContain('lie in a BitLocker metadata area');
    });
  });
});
