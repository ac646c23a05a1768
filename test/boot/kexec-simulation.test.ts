/**
 * The kexec step in the production bundle, run by QuickJS against the fake kernel: a root
 * with a newer kernel in /boot and no modules for the running one ends in
 * kexec_file_load + reboot(LINUX_REBOOT_CMD_KEXEC) with an initramfs assembled from
 * vdboot's own files and the new kernel's modules; every way of not jumping (refused,
 * damaged, rd.vdboot.kexec=0, already jumped) boots on with the running kernel.
 */
import { existsSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { readCpio } from '../../src/formats/cpio.ts';
import type { InitramfsManifest } from '../../src/formats/manifest.ts';
import type { FakeTree } from '../../src/sys/fake.ts';
import { REBOOT } from '../../src/sys/sys.ts';
import { runBundleInQuickJS } from './sim-harness.ts';
import { buildGptDisk, GUEST_TREE, simMachine, type BuiltDisk } from './sim-machine.ts';

const RUNNING = '6.1.0-57-amd64';
const NEW = '6.12.1-sim';
let disk: BuiltDisk;

beforeAll(() => {
  if (!existsSync('build/init.js')) throw new Error('build/init.js is missing: run "npm run build" first');
  disk = buildGptDisk();
});

/** The start of a bzImage whose setup header names `release`. */
function bzImage(release: string): Uint8Array {
  const b = new Uint8Array(0x2000);
  b.set([0x48, 0x64, 0x72, 0x53], 0x202);
  b[0x20e] = 0x00; b[0x20f] = 0x04; // kernel_version at 0x600
  b.set(Array.from(`${release} (sim@example) #1 SMP`, (c) => c.charCodeAt(0)), 0x600);
  return b;
}

const MOD = `/lib/modules/${NEW}`;
function guestWithKernel(kernel: Uint8Array = bzImage(NEW)): FakeTree {
  const files: Record<string, string> = {
    virtio: 'kernel/drivers/virtio/virtio.ko.xz', virtio_ring: 'kernel/drivers/virtio/virtio_ring.ko.xz', virtio_pci: 'kernel/drivers/virtio/virtio_pci.ko.xz',
    virtio_blk: 'kernel/drivers/block/virtio_blk.ko.xz', crc16: 'kernel/lib/crc16.ko.xz', mbcache: 'kernel/fs/mbcache.ko.xz', jbd2: 'kernel/fs/jbd2/jbd2.ko.xz',
    ext4: 'kernel/fs/ext4/ext4.ko.xz', usb_storage: 'kernel/drivers/usb/storage/usb-storage.ko.xz', snd: 'kernel/sound/core/snd.ko.xz',
  };
  const deps: Record<string, string[]> = { virtio_pci: ['virtio', 'virtio_ring'], virtio_blk: ['virtio', 'virtio_ring'], ext4: ['crc16', 'mbcache', 'jbd2'] };
  const tree: FakeTree = { ...GUEST_TREE, [`boot/vmlinuz-${NEW}`]: { bytes: kernel }, [`boot/config-${NEW}`]: 'CONFIG_MODULE_DECOMPRESS=y\n' };
  tree[`${MOD.slice(1)}/modules.dep`] = Object.entries(files).map(([n, f]) => `${f}: ${(deps[n] ?? []).map((d) => files[d]).join(' ')}`.trimEnd() + '\n').join('');
  tree[`${MOD.slice(1)}/modules.alias`] = 'alias fs-ext4 ext4\nalias virtio:d00000002v* virtio_blk\nalias pci:v00001AF4d00001001sv*sd*bc*sc*i* virtio_pci\nalias pci:v*d*sv*sd*bc04sc03i* snd\n';
  tree[`${MOD.slice(1)}/modules.builtin`] = 'kernel/fs/proc/proc.ko\n';
  tree[`${MOD.slice(1)}/modules.builtin.modinfo`] = 'tmpfs.alias=fs-tmpfs\0';
  for (const f of Object.values(files)) tree[`${MOD.slice(1)}/${f}`] = `xz module ${f}`;
  return tree;
}

async function boot(cmdline: string, opts: { kernel?: Uint8Array; kexecError?: string; without?: string } = {}) {
  const machine = simMachine(cmdline, disk, { kernelRelease: RUNNING, ...(opts.kexecError ? { kexecError: opts.kexecError } : {}) });
  const tree = guestWithKernel(opts.kernel);
  if (opts.without) delete tree[opts.without];
  machine.disks[0]!.trees = { vda2: tree };
  const r = await runBundleInQuickJS(machine);
  if (r.escaped) throw new Error(`an exception escaped the init:\n${r.escaped}\nconsole:\n${r.kernel.consoleText}`);
  return r;
}

describe('simulation: the root\'s own kernel (kexec)', () => {
  it('a newer kernel in /boot: kexec_file_load with an assembled initramfs, the root unmounted, reboot(KEXEC)', async () => {
    const r = await boot('console=ttyS0 root=/dev/vda2');
    const ev = r.kernel.events;
    expect(r.end?.reason, r.kernel.consoleText).toBe('reboot');
    expect(ev.rebooted).toBe(REBOOT.KEXEC);
    expect(ev.exec).toBeUndefined();
    expect(ev.kexec).toMatchObject({ kernelPath: `/root/boot/vmlinuz-${NEW}`, cmdline: 'console=ttyS0 root=/dev/vda2 rd.vdboot.kexeced=1', flags: 0 });
    expect(ev.umounts).toContain('/root');
    expect(r.kernel.consoleText).toMatch(new RegExp(`kexec: starting the root's kernel 6\\.12\\.1-sim \\(/boot/vmlinuz-6\\.12\\.1-sim\\) instead of the running ${RUNNING}: it is newer`));
    // the running set less usb_storage, which this boot did not load (/proc/modules)
    expect(r.kernel.consoleText).toMatch(/assembled an initramfs for 6\.12\.1-sim: 8 modules/);
    expect(r.kernel.events.modules).not.toContain('usb_storage');

    const entries = new Map(readCpio(ev.kexec!.initrd!).map((e) => [e.name, e]));
    // vdboot's own files, without the running kernel's modules and without the mounts' contents
    for (const f of ['init', 'bin/busybox', 'bin/sh', 'dev/console', 'dev/null', 'proc', 'sys', 'run', 'root']) expect(entries.has(f), f).toBe(true);
    expect([...entries.keys()].filter((n) => n.startsWith('lib/modules/sim'))).toEqual([]);
    expect([...entries.keys()].filter((n) => /^(proc|sys|run|dev)\/./.test(n)).sort()).toEqual(['dev/console', 'dev/null']);
    // the new kernel's modules as they are, compressed, and its manifest
    expect(new TextDecoder().decode(entries.get(`lib/modules/${NEW}/kernel/fs/ext4/ext4.ko.xz`)!.data)).toBe('xz module kernel/fs/ext4/ext4.ko.xz');
    expect(entries.has(`lib/modules/${NEW}/kernel/sound/core/snd.ko.xz`)).toBe(false);
    expect(entries.has(`lib/modules/${NEW}/kernel/drivers/usb/storage/usb-storage.ko.xz`)).toBe(false);
    expect(entries.has(`lib/modules/${NEW}/kernel/drivers/virtio/virtio_pci.ko.xz`)).toBe(true);
    const manifest = JSON.parse(new TextDecoder().decode(entries.get('etc/vdboot/manifest.json')!.data)) as InitramfsManifest;
    expect(manifest.kernelRelease).toBe(NEW);
    expect(manifest.modules.ext4).toMatchObject({ path: `${MOD}/kernel/fs/ext4/ext4.ko.xz`, deps: ['jbd2', 'mbcache', 'crc16'], compression: 'xz' });
    expect(manifest.filesystems).toEqual({ ext4: 'ext4', tmpfs: '' });
    expect(manifest.aliases.map(([p]) => p)).toEqual(['fs-ext4', 'pci:v00001AF4d00001001sv*sd*bc*sc*i*', 'virtio:d00000002v*']);
  });

  it('init= and the init\'s arguments after -- reach the new kernel as they were, the marker before --', async () => {
    const r = await boot('root=/dev/vda2 init=/bin/custom-init -- single "two words"');
    expect(r.kernel.events.kexec?.cmdline).toBe('root=/dev/vda2 init=/bin/custom-init rd.vdboot.kexeced=1 -- single "two words"');
  });

  it('a module file missing from the root: nothing is loaded, the console names the file and the remedy', async () => {
    const r = await boot('root=/dev/vda2', { without: `${MOD.slice(1)}/kernel/fs/jbd2/jbd2.ko.xz` });
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.events.kexec).toBeUndefined();
    expect(r.kernel.consoleText).toMatch(new RegExp(`Could not prepare kernel 6\\.12\\.1-sim for kexec: the root's /lib/modules/6\\.12\\.1-sim/kernel/fs/jbd2/jbd2\\.ko\\.xz cannot be read \\(ENOENT\\): its modules are incomplete; reinstall the kernel's package\\. Booting on with the running kernel ${RUNNING}`));
  });

  it('a refused kexec (EKEYREJECTED) boots on with the running kernel and says what is missing', async () => {
    const r = await boot('root=/dev/vda2', { kexecError: 'EKEYREJECTED' });
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    expect(r.kernel.events.exec).toMatchObject({ path: '/sbin/init', rootDevice: '/dev/vda2' });
    expect(r.kernel.events.rebooted).toBeUndefined();
    expect(r.kernel.consoleText).toMatch(new RegExp(`refused to load /boot/vmlinuz-6\\.12\\.1-sim with kexec_file_load: EKEYREJECTED: the kernel's signature was rejected.*Booting on with the running kernel ${RUNNING}; the root has no modules for ${RUNNING}`));
  });

  it('EPERM (lockdown) is explained the same way', async () => {
    const r = await boot('root=/dev/vda2', { kexecError: 'EPERM' });
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.consoleText).toMatch(/EPERM: kexec is not allowed \(Secure Boot lockdown/);
  });

  it('a damaged kernel file is refused before kexec_file_load', async () => {
    const r = await boot('root=/dev/vda2', { kernel: new Uint8Array(4096) });
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.events.kexec).toBeUndefined();
    expect(r.kernel.consoleText).toMatch(/is not an x86 Linux kernel \(no bzImage setup header "HdrS" at 0x202\): damaged/);
  });

  it('rd.vdboot.kexec=0 stays, saying what is missing; the marker of a jump already made stays too', async () => {
    const off = await boot('root=/dev/vda2 rd.vdboot.kexec=0');
    expect(off.end?.reason).toBe('exec');
    expect(off.kernel.events.kexec).toBeUndefined();
    expect(off.kernel.consoleText).toMatch(new RegExp(`WARNING: staying on kernel ${RUNNING} \\(rd.vdboot.kexec=0\\): the root has no modules for the running kernel ${RUNNING}`));
    const again = await boot('root=/dev/vda2 rd.vdboot.kexeced=1');
    expect(again.end?.reason).toBe('exec');
    expect(again.kernel.events.kexec).toBeUndefined();
    expect(again.kernel.consoleText).toMatch(/no second jump/);
  });
});
