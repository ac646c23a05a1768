/**
 * Test scenery for image boots: a guest disk (GPT, ESP + ext4 root made by mke2fs -d),
 * converted by qemu-img into the formats under test, put on an NTFS partition of a host
 * disk with mkntfs + ntfscp; and a device-mapper emulator that reads a planned device
 * through its targets, so a plan's tables are checked against `qemu-img convert -O raw`.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { diskFileDevices, planAgainstDevices } from '../../src/cli/plan.ts';
import { parsePartitionTable } from '../../src/formats/partitions.ts';
import type { HostDevice } from '../../src/boot/hostdev.ts';
import type { DmDevicePlan } from '../../src/boot/vdisk.ts';
import { pseudoRandom } from '../hostfs/helpers.ts';

export const GUEST_LABEL = 'guestroot';
export const ROOT_TYPE = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';
export const BASIC_DATA = 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';

export function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
}

export function sh(cmd: string, args: string[], input?: string): string {
  return execFileSync(cmd, args, { input, encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C.UTF-8' } });
}

/** Deterministic pseudo-random bytes (one generator for every test's data). */
export { pseudoRandom };

/** An ext4 filesystem image of `sizeMiB` holding /sbin/init and a random blob. */
export function makeGuestFs(dir: string, name: string, sizeMiB: number, label = GUEST_LABEL): string {
  const content = path.join(dir, `${name}.d`);
  fs.mkdirSync(path.join(content, 'sbin'), { recursive: true });
  fs.writeFileSync(path.join(content, 'sbin', 'init'), '#!/bin/sh\necho guest\n', { mode: 0o755 });
  fs.writeFileSync(path.join(content, 'blob'), pseudoRandom(1 << 20, sizeMiB * 7 + label.length));
  const img = path.join(dir, `${name}.ext4`);
  sh('truncate', ['-s', `${sizeMiB}M`, img]);
  sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', label, '-d', content, img]);
  return img;
}

/**
 * A 16 MiB guest disk: GPT with an ESP (2 MiB, 1 MiB in) and a root partition of type
 * `rootType` (12 MiB at 3 MiB) holding ext4. Returns the raw file.
 */
export function makeGuestDisk(dir: string, name = 'guest', rootType = ROOT_TYPE): string {
  const fsImg = makeGuestFs(dir, `${name}-root`, 12);
  const disk = path.join(dir, `${name}.raw`);
  sh('truncate', ['-s', '16M', disk]);
  sh('sfdisk', ['-q', disk], `label: gpt\nstart=2048, size=4096, type=uefi, name=esp\nstart=6144, size=24576, type=${rootType}, name=linux\n`);
  sh('dd', [`if=${fsImg}`, `of=${disk}`, 'bs=512', 'seek=6144', 'conv=notrunc', 'status=none']);
  return disk;
}

export function convert(src: string, dst: string, format: string, options: string[] = []): string {
  sh('qemu-img', ['convert', '-f', 'raw', '-O', format, ...(options.length ? ['-o', options.join(',')] : []), src, dst]);
  return dst;
}

/** The virtual disk's bytes as qemu-img reads them: the oracle. */
export function qemuRaw(image: string, dir: string): Buffer {
  const out = path.join(dir, `oracle-${path.basename(image)}.raw`);
  // A fixed VHD probes as raw in qemu-img: name its format.
  sh('qemu-img', ['convert', ...(image.endsWith('.vhd') ? ['-f', 'vpc'] : []), '-O', 'raw', image, out]);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

/** An NTFS filesystem image holding `files` (path on NTFS → local file); `dirs` are made first (loadNtfsMkdir). */
export function makeNtfs(dir: string, name: string, sizeMiB: number, label: string, files: Record<string, string>, dirs: string[] = []): string {
  const img = path.join(dir, `${name}.ntfs`);
  sh('truncate', ['-s', `${sizeMiB}M`, img]);
  sh('mkntfs', ['-q', '-F', '-f', '-s', '512', '-L', label, img]);
  for (const d of dirs) ntfsMkdir(img, d);
  for (const [dest, src] of Object.entries(files)) sh('ntfscp', ['-q', '-f', img, src, dest]);
  return img;
}

type Disks = typeof import('../../qemu/disks.ts');
let disks: Disks | undefined;
function ntfsMkdir(img: string, d: string): void {
  if (!disks) throw new Error('call loadNtfsMkdir() first');
  disks.ntfsAdd(img, {}, [d]);
}

/** Directories, fragmented files and volume flags on NTFS without mounting: the qemu test helpers (libntfs-3g). */
export async function loadNtfsMkdir(): Promise<Disks> {
  disks = await import('../../qemu/disks.ts');
  return disks;
}

/** A GPT host disk whose partitions hold the given filesystem images (1 MiB aligned). */
export function makeHostDisk(dir: string, name: string, parts: { image?: string; sizeMiB?: number; type: string; label?: string }[]): string {
  const disk = path.join(dir, `${name}.img`);
  let offset = 1;
  const lines = ['label: gpt'];
  const placed: { image?: string; offset: number }[] = [];
  for (const p of parts) {
    const size = p.sizeMiB ?? Math.ceil(fs.statSync(p.image!).size / (1 << 20));
    lines.push(`start=${offset * 2048}, size=${size * 2048}, type=${p.type}${p.label ? `, name="${p.label}"` : ''}`);
    placed.push({ image: p.image, offset });
    offset += size;
  }
  sh('truncate', ['-s', `${offset + 1}M`, disk]);
  sh('sfdisk', ['-q', disk], `${lines.join('\n')}\n`);
  for (const p of placed) if (p.image) sh('dd', [`if=${p.image}`, `of=${disk}`, 'bs=1M', `seek=${p.offset}`, 'conv=notrunc', 'status=none']);
  return disk;
}

export function devicesOf(disks: string[]): { devices: HostDevice[]; close(): void } {
  return diskFileDevices(disks);
}

/** A partition of a fake kernel's disk (src/sys/fake.ts): kernel name, number, byte offset, size. */
export interface FakePartition { name: string; number: number; start: number; size: number }

/** A disk image file as the fake kernel's disk `vda`: its bytes, and its partitions with the offsets its table gives. */
export function fakeDiskOf(file: string): { bytes: Uint8Array; partitions: FakePartition[] } {
  const bytes = new Uint8Array(fs.readFileSync(file));
  const d = devicesOf([file]);
  try {
    const table = parsePartitionTable({ name: file, size: bytes.length, read: (o, l) => bytes.subarray(o, o + l) });
    const partitions = d.devices.filter((x) => x.info.partNumber).map((x) => ({
      name: `vda${x.info.partNumber}`, number: x.info.partNumber!, start: table.partitions.find((t) => t.number === x.info.partNumber)!.start, size: x.info.size,
    }));
    return { bytes, partitions };
  } finally {
    d.close();
  }
}

/**
 * Reads `length` bytes at `offset` of the planned device `name`, the way device-mapper
 * would: linear targets on host devices (read from the disk files) or other planned
 * devices, zero targets, and a snapshot's origin (its store is empty at boot).
 */
export function readPlanned(devices: readonly DmDevicePlan[], hosts: readonly HostDevice[], name: string, offset: number, length: number): Uint8Array {
  const dev = devices.find((d) => d.name === name);
  if (!dev) throw new Error(`no planned device ${name}`);
  const out = new Uint8Array(length);
  const end = offset + length;
  for (const t of dev.targets) {
    const ts = t.start * 512;
    const te = ts + t.length * 512;
    const s = Math.max(ts, offset);
    const e = Math.min(te, end);
    if (s >= e) continue;
    if (t.type === 'zero') continue;
    const [target, sectorText] = t.params.split(' ');
    const base = t.type === 'snapshot' ? 0 : Number(sectorText) * 512;
    const from = base + (s - ts);
    let bytes: Uint8Array;
    if (target!.startsWith('/dev/mapper/')) bytes = readPlanned(devices, hosts, target!.slice('/dev/mapper/'.length), from, e - s);
    else {
      const h = hosts.find((x) => x.info.path === target);
      if (!h) throw new Error(`target ${target} is no known device`);
      const r = h.open();
      bytes = r.read(from, e - s);
    }
    out.set(bytes, s - offset);
  }
  return out;
}

/**
 * `vdboot plan` of `rd.vdisk.attach=LABEL=LABEL:FILE` on a host disk whose one partition is
 * the volume `img` (written to DIR with extension `ext`): "planned: …" with the start of the
 * report, or the refusal's message. The disk and volume files are removed after.
 */
export function planOnVolume(dir: string, img: Buffer, opts: { ext: string; label: string; file: string; mode?: string }): string {
  const vol = path.join(dir, `v-${Math.random().toString(36).slice(2)}.${opts.ext}`);
  fs.writeFileSync(vol, img);
  const disk = makeHostDisk(dir, path.basename(vol, `.${opts.ext}`), [{ image: vol, type: BASIC_DATA }]);
  const d = devicesOf([disk]);
  try {
    const report = planAgainstDevices(`root=/dev/sda1 rd.vdisk.attach=LABEL=${opts.label}:${opts.file} rd.vdisk.mode=${opts.mode ?? 'rw'}`, d.devices);
    return `planned: ${JSON.stringify(report).slice(0, 300)}`;
  } catch (e) {
    return (e as Error).message;
  } finally {
    d.close();
    fs.rmSync(disk, { force: true });
    fs.rmSync(vol, { force: true });
  }
}
