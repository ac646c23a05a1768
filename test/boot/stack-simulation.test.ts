/**
 * The production bundle on QuickJS against the fake kernel, for a root behind LUKS and LVM:
 * a GPT disk whose second partition is a real LUKS2 header (cryptsetup luksFormat) followed
 * by a real LVM PV (lvm2's tools, test/kit/lvm.ts) with a root LV holding ext4. The fake's
 * dm-crypt target reads the payload through unencrypted, and a fake cryptsetup (below)
 * checks the passphrase on its stdin, then creates the mapping through device-mapper as
 * cryptsetup does. Covered: the console prompt with echo off, wrong tries counted, three
 * wrong ones ending in the rescue shell with the device and the cmdline to fix, LVM's dm
 * names and uuids, and rd.luks=0 / rd.lvm=0.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DM_CMD, dmRequest, packDmIoctl, unpackDmIoctl } from '../../src/boot/dm.ts';
import type { FakeKernel, FakeMachine } from '../../src/sys/fake.ts';
import { O, S } from '../../src/sys/sys.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { makeLvmPv, type LvmLayout } from '../kit/stack-disk.ts';
import { runBundleInQuickJS } from './sim-harness.ts';
import { GUEST_TREE, simMachine, type BuiltDisk } from './sim-machine.ts';

const can = lvmAvailable() && spawnSync('cryptsetup', ['--version'], { stdio: 'ignore' }).status === 0;
const LUKS_UUID = '0b6a1c3e-2d4f-4a5b-8c6d-7e8f9a0b1c2d';
const PASS = 'sesame';
const DATA_SECTORS = 2048; // the LUKS2 data segment starts 1 MiB in
let dir: string;
let disk: BuiltDisk;
let lvm: LvmLayout;
/** a root archive (tar) holding an executable /sbin/init */
let rootArchive: Uint8Array;

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-stack-sim-'));
  const tree = path.join(dir, 'tree');
  fs.mkdirSync(path.join(tree, 'sbin'), { recursive: true });
  fs.writeFileSync(path.join(tree, 'sbin', 'init'), '#!/bin/sh\necho from the archive\n', { mode: 0o755 });
  execFileSync('tar', ['-cf', path.join(dir, 'rootfs.tar'), '-C', tree, '.']);
  rootArchive = new Uint8Array(fs.readFileSync(path.join(dir, 'rootfs.tar')));
  const root = path.join(dir, 'root.ext4');
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'lv root', root, '4M']);
  lvm = makeLvmPv(dir, 8, 'sim-vg', [{ name: 'root', sizeMiB: 4, image: root }, { name: 'swap', sizeMiB: 1 }]);
  const luks = path.join(dir, 'luks.img');
  fs.writeFileSync(luks, '');
  fs.truncateSync(luks, DATA_SECTORS * 512 + 8 * 1024 * 1024);
  const keyFile = path.join(dir, 'pass');
  fs.writeFileSync(keyFile, PASS);
  execFileSync('cryptsetup', ['luksFormat', '-q', '--type', 'luks2', '--uuid', LUKS_UUID, '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000',
    '--luks2-metadata-size', '16k', '--luks2-keyslots-size', '512k', '--offset', String(DATA_SECTORS), '--key-file', keyFile, luks]);
  // the payload in plaintext: the fake's crypt target reads it through
  const fd = fs.openSync(luks, 'r+');
  fs.writeSync(fd, fs.readFileSync(lvm.pv), 0, 8 * 1024 * 1024, DATA_SECTORS * 512);
  fs.closeSync(fd);
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 12 * 1024 * 1024);
  execFileSync('sfdisk', ['-q', img], { input: `label: gpt\nstart=2048, size=2048, type=uefi, name=esp\nstart=4096, size=${fs.statSync(luks).size / 512}, name=cryptroot\n` });
  execFileSync('dd', [`if=${luks}`, `of=${img}`, 'bs=512', 'seek=4096', 'conv=notrunc', 'status=none']);
  disk = {
    bytes: new Uint8Array(fs.readFileSync(img)),
    partitions: [
      { name: 'vda1', number: 1, start: 2048 * 512, size: 2048 * 512, uuid: '' },
      { name: 'vda2', number: 2, start: 4096 * 512, size: fs.statSync(luks).size, uuid: '' },
    ],
  };
}, 60_000);

afterAll(() => { if (dir) fs.rmSync(dir, { recursive: true, force: true }); });

/** cryptsetup open as the fake runs it: the passphrase on stdin, then the dm device made through the kernel's ioctls. */
function fakeCryptsetup(stdin: Uint8Array, argv: string[], k: FakeKernel): { stdout: Uint8Array; exitCode: number } {
  const out = (s: string) => new TextEncoder().encode(s);
  if (argv[1] !== 'open' || !argv.includes('--type') || !argv.includes('--key-file=-')) return { stdout: out(`unexpected arguments ${argv.join(' ')}\n`), exitCode: 1 };
  if (new TextDecoder().decode(stdin) !== PASS) return { stdout: out('No key available with this passphrase.\n'), exitCode: 2 };
  const [device, name] = argv.slice(-2) as [string, string];
  const st = k.stat(device);
  // libdevmapper makes the control node itself when devtmpfs has not
  try { k.mkdir('/dev/mapper', 0o755); } catch { /* exists */ }
  try { k.mknod('/dev/mapper/control', S.IFCHR | 0o600, 10, 236); } catch { /* exists */ }
  const fd = k.open('/dev/mapper/control', O.RDWR);
  const call = (cmd: number, fields: Parameters<typeof packDmIoctl>[0], targets: Parameters<typeof packDmIoctl>[1] = []) => {
    const buf = packDmIoctl(fields, targets);
    k.ioctl(fd, dmRequest(cmd), buf);
    return unpackDmIoctl(buf);
  };
  const created = call(DM_CMD.DEV_CREATE, { name, uuid: `CRYPT-LUKS2-${LUKS_UUID.replace(/-/g, '')}-${name}` });
  const sectors = (fs.statSync(path.join(dir, 'luks.img')).size / 512) - DATA_SECTORS;
  call(DM_CMD.TABLE_LOAD, { name }, [{ start: 0, length: sectors, type: 'crypt', params: `aes-xts-plain64 :64:logon:cryptsetup:x 0 ${st.rdevMajor}:${st.rdevMinor} ${DATA_SECTORS}` }]);
  call(DM_CMD.DEV_SUSPEND, { name });
  k.mknod(`/dev/mapper/${name}`, S.IFBLK | 0o600, created.dev.major, created.dev.minor);
  k.close(fd);
  return { stdout: new Uint8Array(0), exitCode: 0 };
}

function machine(cmdline: string, typed: string[], over: Partial<FakeMachine> = {}): FakeMachine {
  const m = simMachine(cmdline, disk, { deviceTrees: { 'sim--vg-root': GUEST_TREE }, consoleInput: typed, programs: { cryptsetup: fakeCryptsetup }, ...over });
  const manifest = JSON.parse(m.initramfs['etc/vdboot/manifest.json'] as string);
  manifest.tools.cryptsetup = '/usr/sbin/cryptsetup';
  m.initramfs['etc/vdboot/manifest.json'] = JSON.stringify(manifest);
  m.initramfs['usr/sbin/cryptsetup'] = { mode: 0o100755, content: 'cryptsetup' };
  return m;
}

async function boot(cmdline: string, typed: string[], over: Partial<FakeMachine> = {}) {
  const r = await runBundleInQuickJS(machine(cmdline, typed, over));
  if (r.escaped) throw new Error(`an exception escaped the init:\n${r.escaped}\nconsole:\n${r.kernel.consoleText}`);
  return r;
}

describe.skipIf(!can)('simulation: a root behind LUKS and LVM', () => {
  it('a wrong passphrase is counted, the right one opens luks-UUID, the root\'s LV alone is made with LVM\'s dm name and uuid, the root mounts', async () => {
    const r = await boot('root=/dev/sim-vg/root rw', ['wrong', PASS]);
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toMatch(new RegExp(`/dev/vda2 is encrypted \\(LUKS2 aes-xts-plain64 512-bit, data at byte ${DATA_SECTORS * 512}, key slots 0 \\(pbkdf2\\)\\): unlocking as /dev/mapper/luks-${LUKS_UUID}`));
    expect(t).toContain(`Passphrase for /dev/vda2 (luks-${LUKS_UUID}): `);
    expect(t).toContain('No key available with this passphrase (try 1 of 3)');
    expect(t).not.toContain(PASS);
    expect(r.kernel.events.consoleReads).toEqual([{ line: 'wrong', echo: false }, { line: PASS, echo: false }]);
    const creates = r.kernel.events.dm.filter((e) => e.op === 'create');
    // root=/dev/VG/LV: only the LV the root needs
    expect(creates.map((e) => e.name)).toEqual([`luks-${LUKS_UUID}`, 'sim--vg-root']);
    const root = creates.find((e) => e.name === 'sim--vg-root') as { uuid: string };
    expect(root.uuid).toBe(`LVM-${lvm.vgUuid.replace(/-/g, '')}${lvm.lvs.root!.uuid.replace(/-/g, '')}`);
    const load = r.kernel.events.dm.find((e) => e.op === 'load' && e.name === 'sim--vg-root') as { targets: { type: string; params: string; length: number }[] };
    expect(load.targets).toEqual([{ start: 0, length: lvm.lvs.root!.size / 512, type: 'linear', params: expect.stringMatching(new RegExp(` ${lvm.lvs.root!.offset / 512}$`)) }]);
    // found as dm-1, mounted by its mapping's name, as the booted system's /proc/mounts then shows it
    expect(t).toMatch(/found root device \/dev\/sim-vg\/root at \/dev\/dm-1 /);
    expect(r.kernel.events.mounts.find((m) => m.target === '/root')).toMatchObject({ source: '/dev/mapper/sim--vg-root', fstype: 'ext4' });
    expect(r.kernel.events.exec).toMatchObject({ path: '/sbin/init', rootDevice: '/dev/mapper/sim--vg-root' });
    // the booted system's udev takes both dm devices as activated through libdevmapper (udev-db.ts)
    const k = r.kernel;
    const dmDevs = k.readdir('/sys/class/block').filter((n) => n.startsWith('dm-')).map((n) => {
      const fd = k.open(`/sys/class/block/${n}/dev`, O.RDONLY);
      const b = new Uint8Array(32);
      const len = k.pread(fd, b, 0);
      k.close(fd);
      return `b${new TextDecoder().decode(b.subarray(0, len)).trim()}`;
    });
    expect(dmDevs).toHaveLength(2);
    expect(k.readdir('/run/udev/data').sort()).toEqual(dmDevs.sort());
    const fd = k.open(`/run/udev/data/${dmDevs[0]}`, O.RDONLY);
    const b = new Uint8Array(256);
    const len = k.pread(fd, b, 0);
    k.close(fd);
    expect(new TextDecoder().decode(b.subarray(0, len))).toContain('E:DM_UDEV_PRIMARY_SOURCE_FLAG=1\n');
  });

  it('three wrong passphrases end in the rescue shell naming the device and what to put on the command line', async () => {
    const r = await boot('root=/dev/sim-vg/root', ['a', 'b', 'c']);
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('shell');
    for (const n of [1, 2, 3]) expect(t).toContain(`No key available with this passphrase (try ${n} of 3)`);
    expect(t).toMatch(new RegExp(`/dev/vda2 \\(LUKS, UUID ${LUKS_UUID}\\) stays locked: no key available with the passphrase after 3 tries\\. .*rd\\.luks\\.key=`));
    expect(r.kernel.events.dm.filter((e) => e.op === 'create')).toEqual([]);
  });

  it('without a console to ask on (end of input), the failure says so', async () => {
    const r = await boot('root=/dev/sim-vg/root', []);
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/is encrypted \(LUKS, UUID .*\) and there is no console to ask for its passphrase/);
  });

  it('rd.luks=0 leaves the volume locked: the root never appears and the boot says what it saw', async () => {
    const r = await boot('root=/dev/sim-vg/root rd.luks=0 rd.timeout=1', []);
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).not.toContain('Passphrase');
    expect(r.kernel.consoleText).toMatch(/did not appear within 1 s[\s\S]*vda2 .*crypto_LUKS/);
  });

  it('rd.lvm.lv= activates only that LV; rd.lvm=0 none', async () => {
    const only = await boot(`root=UUID=${'x'} rd.lvm.lv=sim-vg/swap rd.timeout=1`, [PASS]);
    expect(only.kernel.events.dm.filter((e) => e.op === 'create').map((e) => e.name)).toEqual([`luks-${LUKS_UUID}`, 'sim--vg-swap']);
    const none = await boot('root=/dev/sim-vg/root rd.lvm=0 rd.timeout=1', [PASS]);
    expect(none.end?.reason).toBe('shell');
    expect(none.kernel.events.dm.filter((e) => e.op === 'create').map((e) => e.name)).toEqual([`luks-${LUKS_UUID}`]);
  });

  it('resume= on an LV: activated with the root and handed to the kernel as MAJ:MIN before the root is mounted', async () => {
    const r = await boot('root=/dev/sim-vg/root resume=/dev/sim-vg/swap', [PASS]);
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    const swap = r.kernel.events.dm.find((e) => e.op === 'create' && e.name === 'sim--vg-swap');
    expect(swap).toBeDefined();
    const st = r.kernel.stat('/dev/mapper/sim--vg-swap');
    expect(r.kernel.sysPowerResume).toBe(`${st.rdevMajor}:${st.rdevMinor}\n`);
    expect(t).toContain('resume=/dev/sim-vg/swap: no hibernation image on /dev/');
    expect(t.indexOf('resume=/dev/sim-vg/swap: no hibernation image')).toBeLessThan(t.indexOf('mounted /dev/'));
  });

  it('root=tmpfs: with resume= on an LV beside the archive\'s: the swap LV is activated and handed to the kernel before the archive\'s host is mounted, then the archive boots', async () => {
    const r = await boot('root=tmpfs:/dev/sim-vg/root:/images/rootfs.tar rd.tmpfs.size=8M resume=/dev/sim-vg/swap', [PASS], {
      deviceTrees: { 'sim--vg-root': { 'images/rootfs.tar': { bytes: rootArchive } } },
    });
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    const st = r.kernel.stat('/dev/mapper/sim--vg-swap');
    expect(r.kernel.sysPowerResume).toBe(`${st.rdevMajor}:${st.rdevMinor}\n`);
    const resumed = t.indexOf('resume=/dev/sim-vg/swap: no hibernation image on /dev/');
    expect(resumed).toBeGreaterThan(0);
    // the host: mounted read-only, after resume=, by its mapping's name
    const hostMount = t.indexOf('mounted /dev/mapper/sim--vg-root (ext4, ro');
    expect(hostMount, t).toBeGreaterThan(resumed);
    expect(r.kernel.events.mounts.find((m) => m.target === '/run/vdboot/archive-host')).toMatchObject({ source: '/dev/mapper/sim--vg-root' });
    expect(r.kernel.events.mounts.find((m) => m.target === '/root')).toMatchObject({ fstype: 'tmpfs' });
    expect(r.kernel.events.exec).toMatchObject({ path: '/sbin/init', rootDevice: '(initramfs)' });
    expect(t).not.toContain('is ignored');
  });
});
