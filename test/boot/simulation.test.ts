/**
 * The production init bundle, run by QuickJS against the fake kernel, for a matrix of
 * command lines: it must reach the exec of the guest's init with the right root, or end
 * in the rescue shell with a message that says why.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import type { InitramfsManifest } from '../../src/formats/manifest.ts';
import { MODULE_INIT, MS, REBOOT } from '../../src/sys/sys.ts';
import { runBundleInQuickJS } from './sim-harness.ts';
import { buildGptDisk, PART_NAME, ROOT_LABEL, ROOT_UUID, simInitramfs, simMachine, simManifest, type BuiltDisk } from './sim-machine.ts';

let disk: BuiltDisk;

beforeAll(() => {
  if (!existsSync('build/init.js')) throw new Error('build/init.js is missing: run "npm run build" first');
  disk = buildGptDisk();
});

async function boot(cmdline: string, over: Parameters<typeof simMachine>[2] = {}) {
  const r = await runBundleInQuickJS(simMachine(cmdline, disk, over));
  if (r.escaped) throw new Error(`an exception escaped the init:\n${r.escaped}\nconsole:\n${r.kernel.consoleText}`);
  return r;
}

function rootMount(r: Awaited<ReturnType<typeof boot>>) {
  return r.kernel.events.mounts.find((m) => m.target === '/root');
}

describe('simulation: the init bundle on QuickJS reaches the guest init', () => {
  const specs = () => [
    ['/dev/vda2'],
    [`UUID=${ROOT_UUID}`],
    [`UUID=${ROOT_UUID.toUpperCase()}`],
    [`"LABEL=${ROOT_LABEL}"`],
    [`PARTUUID=${disk.partitions[1]!.uuid}`],
    [`PARTLABEL=${PART_NAME}`],
    [`/dev/disk/by-label/${ROOT_LABEL.replace(' ', '\\x20')}`],
  ];

  it('finds the root by every device-spec form', async () => {
    for (const [spec] of specs()) {
      const r = await boot(`console=ttyS0 root=${spec}`);
      expect(r.end?.reason, `${spec}\n${r.kernel.consoleText}`).toBe('exec');
      expect(rootMount(r), spec).toMatchObject({ source: '/dev/vda2', fstype: 'ext4' });
      expect(r.kernel.events.exec).toMatchObject({ path: '/sbin/init', argv: ['/sbin/init'] });
    }
  });

  it('mounts read-only by default and read-write with rw; passes rootflags', async () => {
    const ro = await boot('root=/dev/vda2');
    expect(rootMount(ro)!.flags & MS.RDONLY).toBe(MS.RDONLY);
    const rw = await boot('root=/dev/vda2 rw rootflags=noatime,data=ordered');
    expect(rootMount(rw)!.flags & MS.RDONLY).toBe(0);
    expect(rootMount(rw)!.flags & MS.NOATIME).toBe(MS.NOATIME);
    expect(rootMount(rw)!.data).toBe('data=ordered');
  });

  it('loads dependencies before the modules that need them, and the filesystem module before mounting', async () => {
    const r = await boot('root=/dev/vda2');
    const mods = r.kernel.events.modules;
    for (const [dep, user] of [['virtio', 'virtio_blk'], ['virtio_ring', 'virtio_blk'], ['jbd2', 'ext4'], ['mbcache', 'ext4']]) {
      expect(mods.indexOf(dep!), mods.join(',')).toBeGreaterThanOrEqual(0);
      expect(mods.indexOf(dep!)).toBeLessThan(mods.indexOf(user!));
    }
    expect(mods).not.toContain('usb_storage');
    expect(new Set(mods).size).toBe(mods.length);
  });

  it('moves /dev /proc /sys /run into the new root and execs init= with the arguments after --', async () => {
    const r = await boot('root=/dev/vda2 init=/bin/custom-init -- single "two words"');
    expect(r.kernel.events.exec).toMatchObject({ path: '/bin/custom-init', argv: ['/bin/custom-init', 'single', 'two words'] });
    const moves = r.kernel.events.mounts.filter((m) => m.fstype === 'move').map((m) => `${m.source}->${m.target}`);
    expect(moves).toEqual(['/dev->/root/dev', '/proc->/root/proc', '/sys->/root/sys', '/run->/root/run', '.->/']);
    expect(r.kernel.events.exec!.rootDevice).toBe('/dev/vda2');
  });

  it('waits for a USB disk that appears after its driver loaded', async () => {
    const r = await boot(`root=UUID=${ROOT_UUID}`, { usb: true });
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.consoleText).toMatch(/found root device UUID=\S+ at \/dev\/vda2 \(ext4\) after (1\.[5-9]|[2-9])/);
  });

  it('logs each step with the time it took', async () => {
    const r = await boot('root=/dev/vda2');
    expect(r.kernel.consoleText).toMatch(/loading \d+ modules for the devices present \(\d+\.\d\d s\)/);
    expect(r.kernel.consoleText).toMatch(/mounted \/dev\/vda2 \(ext4, ro\) on \/root \(\d+\.\d\d s\)/);
    expect(r.kernel.consoleText).toMatch(/starting \/sbin\/init \(vdboot took/);
  });

  it('quiet keeps the console silent when all goes well', async () => {
    const r = await boot('root=/dev/vda2 quiet');
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.consoleText).toBe('');
  });
});

describe('simulation: failures end in the rescue shell with the reason', () => {
  it('a root that never appears lists every block device seen and starts the shell', async () => {
    const r = await boot('root=LABEL=nosuchdisk rd.timeout=2');
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.events.spawns[0]).toMatchObject({ path: '/bin/sh' });
    const text = r.kernel.consoleText;
    expect(text).toMatch(/root device LABEL=nosuchdisk did not appear within 2 s/);
    expect(text).toMatch(new RegExp(`/dev/vda2 .*ext4 LABEL="${ROOT_LABEL}" UUID=${ROOT_UUID} PARTUUID=${disk.partitions[1]!.uuid} PARTLABEL="${PART_NAME}"`));
    expect(text).toMatch(/\/dev\/vda .*gpt table/);
    expect(text).toMatch(/No device has the label "nosuchdisk"/);
  });

  it('rd.shell=0 halts instead of starting a shell', async () => {
    const r = await boot('root=LABEL=nosuchdisk rd.timeout=1 rd.shell=0');
    expect(r.end?.reason).toBe('reboot');
    expect(r.kernel.events.rebooted).toBe(REBOOT.HALT);
    expect(r.kernel.events.spawns).toEqual([]);
  });

  it('a missing init names what was tried', async () => {
    const r = await boot('root=/dev/vda2 init=/sbin/nothing');
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/no init to start \(\/sbin\/nothing: not found\)/);
  });

  it('a filesystem type the kernel refuses is named with the errno and a hint', async () => {
    const r = await boot('root=/dev/vda1');
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/\/dev\/vda1 holds no filesystem vdboot recognises/);
  });

  it('a module that fails to load is named with its errno and the boot continues', async () => {
    const r = await boot('root=/dev/vda2', { moduleErrors: { virtio_pci: 'ENOEXEC', jbd2: 'ENODEV' } });
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.consoleText).toMatch(/module virtio_pci did not load: ENOEXEC/);
    expect(r.kernel.consoleText).toMatch(/module ext4 did not load: its dependency jbd2 failed/);
    // ENODEV (nothing to drive) is normal and stays off the console unless debugging.
    expect(r.kernel.consoleText).not.toMatch(/jbd2 did not load/);
  });

  it('unknown vdboot options draw a warning that names them', async () => {
    const r = await boot('root=/dev/vda2 rd.vdboot.colour=blue');
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.consoleText).toMatch(/WARNING: unknown option rd\.vdboot\.colour=blue/);
  });

  it('rd.break=pre-mount starts a shell, then the boot goes on', async () => {
    const r = await boot('root=/dev/vda2 rd.break=pre-mount', { shellExits: 1 });
    expect(r.kernel.events.spawns.length).toBe(1);
    expect(r.end?.reason).toBe('exec');
  });

  it('a command line without root= explains how to write one', async () => {
    const r = await boot('console=ttyS0');
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/No root= on the kernel command line/);
  });
});

describe('simulation: modules kept compressed (.ko.xz, as Debian 12\'s 6.12 ships them)', () => {
  /** simManifest with every module at its .ko.xz path, and the initramfs holding real xz bytes. */
  function xzMachine(cmdline: string, over: Parameters<typeof simMachine>[2], decompressors?: InitramfsManifest['decompressors']) {
    const manifest = simManifest();
    for (const m of Object.values(manifest.modules)) Object.assign(m, { path: `${m.path}.xz`, compression: 'xz' });
    if (decompressors) manifest.decompressors = decompressors;
    const initramfs = simInitramfs(manifest);
    for (const m of Object.values(manifest.modules)) initramfs[m.path.slice(1)] = { bytes: new Uint8Array(execFileSync('xz', ['-c', '--check=crc32'], { input: `\x7fELF ${m.name}\n` })) };
    return simMachine(cmdline, disk, { ...over, initramfs });
  }

  it('CONFIG_MODULE_DECOMPRESS: every module goes to finit_module as shipped, with MODULE_INIT_COMPRESSED_FILE', async () => {
    const r = await boot('root=/dev/vda2', { ...xzMachine('root=/dev/vda2', {}), moduleDecompress: ['xz'] });
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    const loads = r.kernel.events.moduleLoads;
    expect(loads.map((l) => l.name)).toEqual(expect.arrayContaining(['virtio_pci', 'virtio_blk', 'jbd2', 'ext4']));
    for (const l of loads) expect(l, l.name).toMatchObject({ flags: MODULE_INIT.COMPRESSED_FILE, from: 'file' });
    expect(r.kernel.events.spawns).toEqual([]);
  });

  it('without it: busybox xzcat decompresses each module loaded into a memfd, and the boot reaches the guest', async () => {
    let runs = 0;
    const xzcat = (stdin: Uint8Array) => {
      runs++;
      return { stdout: new Uint8Array(execFileSync('xz', ['-dc'], { input: stdin })), exitCode: 0 };
    };
    const m = xzMachine('root=/dev/vda2', { programs: { xzcat } }, { xz: ['/bin/busybox', 'xzcat'] });
    const r = await boot('root=/dev/vda2', m);
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    const loads = r.kernel.events.moduleLoads;
    for (const l of loads) {
      expect(l, l.name).toMatchObject({ flags: 0, from: 'memfd' });
      expect(new TextDecoder().decode(l.bytes)).toBe(`\x7fELF ${l.name}\n`);
    }
    expect(loads.map((l) => l.name)).not.toContain('usb_storage'); // only what this machine needs
    expect(runs).toBe(loads.length);
    expect(r.kernel.events.spawns.every((s) => s.argv.join(' ') === '/bin/busybox xzcat')).toBe(true);
  });
});

describe('simulation: a disk listed in /sys before it can be opened', () => {
  it('is not taken for the root until it opens (ENXIO at first, as 6.12\'s virtio_blk under emulation)', async () => {
    const m = simMachine('root=/dev/vda2', disk);
    m.disks[0]!.openableAfterMs = 700;
    const r = await boot('root=/dev/vda2', m);
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    expect(r.kernel.consoleText).toMatch(/found root device \/dev\/vda2 at \/dev\/vda2 \(ext4\)/);
    expect(rootMount(r)).toMatchObject({ source: '/dev/vda2', fstype: 'ext4' });
  });
});
