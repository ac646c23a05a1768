/** Builds fake machines for simulation tests from real disk images (mke2fs, sfdisk). */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { InitramfsManifest } from '../../src/formats/manifest.ts';
import type { FakeDisk, FakeMachine, FakeTree } from '../../src/sys/fake.ts';

export const ROOT_UUID = '5b1c3f0e-7a52-4c1b-9d43-2f6e8a9b0c11';
export const ROOT_LABEL = 'sim root';
export const PART_NAME = 'linux-root';

export interface BuiltDisk {
  bytes: Uint8Array;
  partitions: { name: string; number: number; start: number; size: number; uuid: string; partName?: string }[];
}

/** A GPT disk: partition 1 empty (ESP type), partition 2 an ext4 root made by mke2fs -d. */
export function buildGptDisk(): BuiltDisk {
  const dir = mkdtempSync(join(tmpdir(), 'vdboot-sim-'));
  const content = join(dir, 'content');
  mkdirSync(join(content, 'sbin'), { recursive: true });
  writeFileSync(join(content, 'sbin', 'init'), '#!/bin/sh\necho hello\n', { mode: 0o755 });
  const fsImg = join(dir, 'root.ext4');
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', ROOT_LABEL, '-U', ROOT_UUID, '-d', content, fsImg, '4M'], { env: { ...process.env, E2FSPROGS_FAKE_TIME: '1' } });
  const disk = join(dir, 'disk.img');
  execFileSync('truncate', ['-s', '8M', disk]);
  execFileSync('sfdisk', ['-q', disk], {
    input: `label: gpt\nstart=2048, size=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\nstart=4096, size=8192, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=${PART_NAME}\n`,
  });
  execFileSync('dd', [`if=${fsImg}`, `of=${disk}`, 'bs=512', 'seek=4096', 'conv=notrunc', 'status=none']);
  const json = JSON.parse(execFileSync('sfdisk', ['--json', disk], { encoding: 'utf8' })) as {
    partitiontable: { partitions: { node: string; start: number; size: number; uuid: string; name?: string }[] };
  };
  const partitions = json.partitiontable.partitions.map((p, i) => ({
    name: `vda${i + 1}`,
    number: i + 1,
    start: p.start * 512,
    size: p.size * 512,
    uuid: p.uuid.toLowerCase(),
    partName: p.name,
  }));
  return { bytes: new Uint8Array(readFileSync(disk)), partitions };
}

/** A small manifest: virtio_blk with its dependency chain, ext4, a USB storage driver. */
export function simManifest(): InitramfsManifest {
  const mod = (name: string, deps: string[] = []) => ({ name, path: `/lib/modules/sim/${name}.ko`, deps, softPre: [], softPost: [], options: '', compression: '' as const });
  return {
    version: 1,
    kernelRelease: 'sim',
    build: { generator: 'test', sourceDateEpoch: 0, compression: 'none', modulesDir: '/lib/modules/sim', addedModules: [] },
    modules: {
      virtio: mod('virtio'),
      virtio_ring: mod('virtio_ring'),
      virtio_pci: mod('virtio_pci', ['virtio', 'virtio_ring']),
      virtio_blk: mod('virtio_blk', ['virtio', 'virtio_ring']),
      crc16: mod('crc16'),
      mbcache: mod('mbcache'),
      jbd2: mod('jbd2'),
      ext4: mod('ext4', ['crc16', 'mbcache', 'jbd2']),
      usb_storage: mod('usb_storage'),
    },
    aliases: [
      ['pci:v00001AF4d00001001sv*sd*bc*sc*i*', ['virtio_pci']],
      ['usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*', ['usb_storage']],
      ['virtio:d00000002v*', ['virtio_blk']],
    ],
    builtin: [],
    preload: ['ext4'],
    filesystems: { ext4: 'ext4', ext3: 'ext4', ext2: 'ext4', tmpfs: '', proc: '' },
    tools: { busybox: '/bin/busybox' },
  };
}

export function simInitramfs(manifest: InitramfsManifest): FakeTree {
  const tree: FakeTree = {
    'etc/vdboot/manifest.json': JSON.stringify(manifest),
    'bin/sh': { mode: 0o100755, content: 'busybox' },
    'bin/busybox': { mode: 0o100755, content: 'busybox' },
    'init': { mode: 0o100755, content: 'vdboot' },
    'root': { dir: true },
  };
  for (const m of Object.values(manifest.modules)) tree[m.path.slice(1)] = 'module';
  return tree;
}

export const GUEST_TREE: FakeTree = {
  'sbin/init': { symlink: '/lib/systemd/systemd' },
  'lib/systemd/systemd': { mode: 0o100755, content: 'systemd' },
  'bin/custom-init': { mode: 0o100755, content: 'custom' },
  'etc/os-release': 'ID=sim\n',
};

export function simMachine(cmdline: string, disk: BuiltDisk, over: Partial<FakeMachine> & { usb?: boolean } = {}): FakeMachine {
  const manifest = simManifest();
  const fake: FakeDisk = {
    name: 'vda',
    bytes: disk.bytes,
    major: 254,
    minor: 0,
    partitions: disk.partitions.map(({ name, number, start, size }) => ({ name, number, start, size })),
    needsModule: over.usb ? 'usb_storage' : 'virtio_blk',
    appearsAfterMs: over.usb ? 1500 : 0,
    trees: { vda2: GUEST_TREE },
  };
  return {
    cmdline,
    disks: [fake],
    pciDevices: over.usb
      ? { '0000:00:05.0': 'usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00' }
      : { '0000:00:04.0': 'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00', virtio1: 'virtio:d00000002v00001AF4' },
    initramfs: simInitramfs(manifest),
    ...over,
  };
}
