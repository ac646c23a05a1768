import { execFileSync, spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { ConsoleLog } from '../../src/boot/console.ts';
import { ModuleLoader, openModuleFile, parseUevent, storageTier } from '../../src/boot/modules.ts';
import type { InitramfsManifest } from '../../src/formats/manifest.ts';
import { FakeKernel, type FakeMachine, type FakeTree } from '../../src/sys/fake.ts';
import { MODULE_INIT } from '../../src/sys/sys.ts';

describe('coldplug order', () => {
  it('puts modern storage controllers first, legacy storage next, USB after, the rest last', () => {
    // modalias strings as QEMU's devices show them in /sys/bus/*/devices/*/modalias
    expect(storageTier('pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00')).toBe(0); // virtio-blk
    expect(storageTier('pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01')).toBe(0); // ICH9 AHCI
    expect(storageTier('pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02')).toBe(0); // NVMe
    expect(storageTier('virtio:d00000002v00001AF4')).toBe(0);
    expect(storageTier('virtio:d00000008v00001AF4')).toBe(0);
    expect(storageTier('pci:v00008086d00007010sv00001AF4sd00001100bc01sc01i80')).toBe(1); // PIIX IDE
    expect(storageTier('pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30')).toBe(2); // xHCI
    expect(storageTier('usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00')).toBe(2); // USB disk
    expect(storageTier('acpi:PNP0303:')).toBe(3);
    expect(storageTier('virtio:d00000001v00001AF4')).toBe(3); // virtio-net
    expect(storageTier('pci:v00001234d00001111sv00001AF4sd00001100bc03sc00i00')).toBe(3); // VGA
  });

  it('reads uevent messages field by field', () => {
    const msg = new TextEncoder().encode('add@/devices/pci0000:00/0000:00:04.0/virtio1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio1\0SUBSYSTEM=virtio\0MODALIAS=virtio:d00000002v00001AF4\0SEQNUM=812\0');
    expect(parseUevent(msg)).toMatchObject({ ACTION: 'add', SUBSYSTEM: 'virtio', MODALIAS: 'virtio:d00000002v00001AF4', SEQNUM: '812' });
  });
});

/** Real .ko.xz / .ko.gz bytes made by xz and gzip from a stand-in module body. */
function compressed(tool: 'xz' | 'gzip', body: Uint8Array): Uint8Array {
  return new Uint8Array(execFileSync(tool, tool === 'xz' ? ['-c', '--check=crc32'] : ['-n', '-c'], { input: body }));
}

const body = (name: string) => new TextEncoder().encode(`\x7fELF stand-in for ${name}.ko\n`.repeat(40));

/** A manifest of three modules (ext4 needs jbd2 and crc16), as mkinitramfs writes it for a kernel shipping .ko.xz. */
function xzManifest(decompressors?: InitramfsManifest['decompressors']): InitramfsManifest {
  const mod = (name: string, deps: string[] = [], compression: '' | 'xz' = 'xz') => ({ name, path: `/lib/modules/r/kernel/${name}.ko${compression ? '.xz' : ''}`, deps, softPre: [], softPost: [], options: '', compression });
  return {
    version: 1,
    kernelRelease: 'r',
    build: { generator: 'test', sourceDateEpoch: 0, compression: 'zstd', modulesDir: '/lib/modules/r', addedModules: [] },
    modules: { crc16: mod('crc16', [], ''), jbd2: mod('jbd2'), ext4: mod('ext4', ['crc16', 'jbd2']) },
    aliases: [],
    builtin: [],
    preload: [],
    filesystems: { ext4: 'ext4' },
    tools: { busybox: '/bin/busybox' },
    ...(decompressors ? { decompressors } : {}),
  };
}

function machine(manifest: InitramfsManifest, over: Partial<FakeMachine> = {}): FakeMachine {
  const initramfs: FakeTree = { 'bin/busybox': { mode: 0o100755, content: 'busybox' } };
  for (const m of Object.values(manifest.modules)) initramfs[m.path.slice(1)] = { bytes: m.compression ? compressed('xz', body(m.name)) : body(m.name) };
  return { cmdline: '', disks: [], initramfs, ...over };
}

const xzcat = (stdin: Uint8Array) => {
  const r = spawnSync('xz', ['-dc'], { input: stdin });
  return { stdout: new Uint8Array(r.stdout), exitCode: r.status ?? 1 };
};

describe('loading compressed modules', () => {
  it('a kernel with MODULE_DECOMPRESS (6.12) gets each .ko.xz as shipped with MODULE_INIT_COMPRESSED_FILE; a plain .ko with flags 0', () => {
    const manifest = xzManifest();
    const k = new FakeKernel(machine(manifest, { moduleDecompress: ['xz'] }));
    const report = new ModuleLoader(k, manifest, new ConsoleLog(k)).load(['ext4']);
    expect(report.failed).toEqual([]);
    expect(k.events.moduleLoads.map(({ name, flags, from }) => ({ name, flags, from }))).toEqual([
      { name: 'crc16', flags: 0, from: 'file' },
      { name: 'jbd2', flags: MODULE_INIT.COMPRESSED_FILE, from: 'file' },
      { name: 'ext4', flags: MODULE_INIT.COMPRESSED_FILE, from: 'file' },
    ]);
    expect(k.events.spawns).toEqual([]); // nothing decompressed outside the kernel
  });

  it('a kernel without it: busybox xzcat decompresses only the modules loaded, into a memfd the kernel loads read-only', () => {
    const manifest = xzManifest({ xz: ['/bin/busybox', 'xzcat'] });
    const k = new FakeKernel(machine(manifest, { programs: { xzcat } }));
    const report = new ModuleLoader(k, manifest, new ConsoleLog(k)).load(['jbd2']);
    expect(report).toEqual({ loaded: ['jbd2'], failed: [] });
    expect(k.events.spawns).toEqual([{ path: '/bin/busybox', argv: ['/bin/busybox', 'xzcat'] }]);
    const [load] = k.events.moduleLoads;
    expect(load).toMatchObject({ name: 'jbd2', flags: 0, from: 'memfd' });
    expect(Buffer.from(load!.bytes).equals(Buffer.from(body('jbd2')))).toBe(true);
  });

  it('the same kernel refuses a .ko.xz without a decompressor (ENOEXEC) and the flag (EOPNOTSUPP): the manifest decides', () => {
    const plainFinit = xzManifest();
    const k = new FakeKernel(machine(plainFinit));
    const r = new ModuleLoader(k, plainFinit, new ConsoleLog(k)).load(['jbd2']);
    expect(r.failed).toEqual([{ name: 'jbd2', error: 'EOPNOTSUPP' }]);
  });

  it('a decompressor that fails is reported with the module, and its users are not tried', () => {
    const manifest = xzManifest({ xz: ['/bin/busybox', 'xzcat'] });
    const k = new FakeKernel(machine(manifest, { programs: { xzcat: () => ({ stdout: new Uint8Array(0), exitCode: 1 }) } }));
    const loader = new ModuleLoader(k, manifest, new ConsoleLog(k));
    const r = loader.load(['ext4']);
    expect(r.loaded).toEqual(['crc16']);
    expect(r.failed[0]).toEqual({ name: 'jbd2', error: '/bin/busybox xzcat could not decompress /lib/modules/r/kernel/jbd2.ko.xz (exit status 1)' });
    expect(r.failed[1]).toEqual({ name: 'ext4', error: 'its dependency jbd2 failed' });
  });

  it('openModuleFile closes the writable memfd before the load (the kernel answers ETXTBSY otherwise)', () => {
    const manifest = xzManifest({ xz: ['/bin/busybox', 'xzcat'] });
    const k = new FakeKernel(machine(manifest, { programs: { xzcat } }));
    const file = openModuleFile(k, manifest, manifest.modules.jbd2!);
    expect(file.flags).toBe(0);
    k.finitModule(file.fd, '', file.flags);
    // a memfd still open for writing is refused, as Linux refuses it
    const mem = k.memfdCreate('x', 1);
    k.write(mem, body('x'));
    expect(() => k.finitModule(mem, '', 0)).toThrow(/ETXTBSY/);
  });
});
