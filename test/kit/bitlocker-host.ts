/**
 * A Windows-made BitLocker volume (test/data/bitlocker) made into a BitLocker *host*: an NTFS
 * inside the unlocked volume, holding an image file, written through cryptsetup's own bitlk
 * mapping in a builder VM (vdboot's initramfs stopped at rd.break=pre-switch). The build
 * machine has no device-mapper, so the encryption cannot happen on it.
 *
 * The test volumes are stripped (their NTFS is zeros), so the NTFS is made here. cryptsetup
 * maps the FVE metadata areas and the volume header's own sectors (where the first sectors of
 * the NTFS are kept, encrypted) as `zero` segments, which read as zeros and drop writes;
 * Windows' NTFS keeps its own files off them, a fresh mkntfs does not. So:
 *  1. on the host, mkntfs an image of the volume's size; `ntfs-tool reserve` fills its free
 *     space and keeps the files that hold a cluster of a zero segment (in /$FVE-reserved,
 *     hidden and system); ntfscluster must name only those as their owners; ntfscp the image;
 *  2. in the builder VM, open the copy of the volume with its recovery password, dd the NTFS
 *     into the mapping, drop the caches, read the mapping back with O_DIRECT to another disk;
 *  3. on the host, the read-back must equal the NTFS written except in the zero segments,
 *     which read as zeros (the filler bytes are 0xa5, so a segment cryptsetup drops writes to
 *     that bitlkDump did not name would show), and the image read from it by ntfscat must be
 *     byte-identical to the one written (SHA-256).
 * The result is kept in .cache/bitlocker-host/KEY/, KEY hashing the inputs (the volume, the
 * caller's recipe for the image, this file's and ntfs-tool's sources), so the builder VM runs
 * once per machine (and again after a change to one of them).
 *
 *   bitLockerHost(opts): Promise<BitLockerHost>
 *   throughMapping(opts): Promise<void>  a volume's unlocked content read (after writing) in a VM
 *   guestOnBitLockerHost(suite)          the test guest's VHDX at /VMs/guest.vhdx in bitlk-aes-xts-128
 *   zeroSegments(dump): Range[]          the unlocked volume's ranges cryptsetup maps as zeros
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { clusterOwners, makeExt4, makeNtfs, ntfsAdd, ntfsRead, ntfsReserve } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, guestInitScript, type GuestOptions } from '../../qemu/guest.ts';
import { bootVm } from '../../qemu/harness.ts';
import { bitlkDump, type BitLockerConf, type BitLockerSuite, type BitlkDump } from './bitlocker.ts';
import { makeGuestDisk } from './guest-disk.ts';
import { makeTmpDir } from './oracle.ts';
import { COUNTER_COMMANDS } from './rw-check.ts';

const CACHE_DIR = fileURLToPath(new URL('../../.cache/bitlocker-host/', import.meta.url));
const CLUSTER = 4096;

export interface Range {
  offset: number;
  size: number;
}

export interface BitLockerHost {
  /** the BitLocker volume with the NTFS inside (in the cache: copy it before a boot writes to it) */
  volume: string;
  /** the image's path on the NTFS inside */
  imagePath: string;
  imageSha256: string;
  /** the NTFS serial number (16 hex digits), as the volume's images.conf UUID */
  ntfsSerial: string;
  /** SHA-256 of the whole unlocked volume as the builder VM read it back */
  unlockedSha256: string;
  zeroSegments: Range[];
  /** the files keeping the zero segments from other files (ntfscluster's names) */
  reserved: string[];
}

/**
 * The ranges of the unlocked volume that cryptsetup's bitlk mapping shows as zeros: every FVE
 * metadata area, and the volume header's place (its first sectors are mapped to the start of
 * the volume, where the NTFS boot sector is read). Sorted, adjacent ones merged.
 */
export function zeroSegments(dump: BitlkDump): Range[] {
  const all = [...dump.metadataAreas, ...(dump.volumeHeader.size > 0 ? [dump.volumeHeader] : [])].sort((a, b) => a.offset - b.offset);
  const out: Range[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.size) last.size = Math.max(last.size, r.offset + r.size - last.offset);
    else out.push({ ...r });
  }
  return out;
}

function sha256Of(file: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(1 << 20);
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0;) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/**
 * The NTFS for the unlocked volume, in `dir`: `size` bytes, serial `serial`, the zero segments
 * held by reserved files, `image` at `imagePath`. Returns the file and the reserved files'
 * names, checked with ntfscluster (each cluster of a segment owned by one of them only).
 */
function makeInnerNtfs(dir: string, size: number, serial: string, segments: Range[], image: string, imagePath: string): { ntfs: string; reserved: string[] } {
  const ntfs = path.join(dir, 'inner.ntfs');
  if (size % (1 << 20)) throw new Error(`the unlocked volume is ${size} bytes, not whole MiB`);
  makeNtfs(ntfs, { sizeMiB: size / (1 << 20), label: 'Windows', clusterSize: CLUSTER, uuid: serial });
  const clusters = segments.map((r) => {
    const first = Math.floor(r.offset / CLUSTER);
    return { first, count: Math.ceil((r.offset + r.size) / CLUSTER) - first };
  });
  ntfsReserve(ntfs, '/$FVE-reserved', clusters);
  const reserved = new Set<string>();
  for (const c of clusters) {
    const owners = clusterOwners(ntfs, c.first, c.count);
    if (!owners.length || owners.some((o) => !o.startsWith('/$FVE-reserved/'))) throw new Error(`clusters ${c.first}+${c.count} of the NTFS are not held by /$FVE-reserved files only: ${owners.join(', ') || 'free'}`);
    for (const o of owners) reserved.add(o);
  }
  ntfsAdd(ntfs, { [imagePath]: { hostFile: image } });
  return { ntfs, reserved: [...reserved].sort() };
}

/**
 * Byte ranges (4 KiB blocks) where `a` and `b` differ; both files of one size.
 */
function differences(a: string, b: string): Range[] {
  const out: Range[] = [];
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const size = fs.fstatSync(fa).size;
    if (fs.fstatSync(fb).size !== size) throw new Error(`${a} and ${b} differ in size`);
    const ba = Buffer.alloc(1 << 20);
    const bb = Buffer.alloc(1 << 20);
    for (let off = 0; off < size; off += ba.length) {
      const n = Math.min(ba.length, size - off);
      fs.readSync(fa, ba, 0, n, off);
      fs.readSync(fb, bb, 0, n, off);
      for (let i = 0; i < n; i += 4096) {
        if (ba.subarray(i, i + 4096).equals(bb.subarray(i, i + 4096))) continue;
        const last = out[out.length - 1];
        if (last && last.offset + last.size === off + i) last.size += 4096;
        else out.push({ offset: off + i, size: 4096 });
      }
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
  return out;
}

function allZero(file: string, r: Range): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(r.size);
    fs.readSync(fd, buf, 0, r.size, r.offset);
    return buf.every((b) => b === 0);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * The unlocked content of BitLocker `volume` (a file of `size` bytes unlocked), read in a VM:
 * vdboot's initramfs `initrd` stopped at rd.break=pre-switch, where cryptsetup opens it with
 * `key`; first `write` (a file of the unlocked size) is written into the mapping when given;
 * then the mapping is read with O_DIRECT (not the page cache of what was written) into
 * `readBack` (made here, `size` bytes). Each step's exit code is checked.
 */
export async function throughMapping(opts: { initrd: string; volume: string; key: string; size: number; write?: string; readBack: string; name: string }): Promise<void> {
  fs.writeFileSync(opts.readBack, '');
  fs.truncateSync(opts.readBack, opts.size);
  // a root to stop before (pre-switch: every disk's node is made by then)
  const dir = makeTmpDir();
  const rootDir = path.join(dir, 'root');
  buildGuestRoot(rootDir, {});
  const root = path.join(dir, 'root.ext4');
  makeExt4(root, { sizeMiB: 8, fromDir: rootDir });
  const vm = await bootVm({
    name: opts.name, initrd: opts.initrd, append: 'root=/dev/vdc ro rd.break=pre-switch rd.timeout=30',
    disks: [{ file: opts.volume }, { file: opts.readBack }, { file: root, readonly: true }, ...(opts.write ? [{ file: opts.write, readonly: true }] : [])],
  });
  try {
    await vm.waitFor('vdboot# ', 300_000);
    const steps = [
      `printf '%s' '${opts.key.replace(/'/g, `'\\''`)}' | cryptsetup open --type bitlk --key-file=- /dev/vda t`,
      `[ "$(blockdev --getsize64 /dev/mapper/t)" = ${opts.size} ]`,
      ...(opts.write ? ['dd if=/dev/vdd of=/dev/mapper/t bs=1M conv=fsync 2>&1 | tail -1'] : []),
      'sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/mapper/t of=/dev/vdb bs=1M iflag=direct conv=fsync 2>&1 | tail -1',
      'cryptsetup close t && sync',
    ];
    // one step at a time, each with its exit code, so a failure shows which and why
    for (const [i, step] of steps.entries()) {
      vm.send(`${step}; echo "STEP-${i}-RC=$?"\n`);
      const line = await vm.waitFor(new RegExp(`^STEP-${i}-RC=\\d+$`), 600_000);
      if (!line.endsWith('=0')) throw new Error(`${opts.name}: "${step.replace(opts.key, 'KEY')}" failed in the VM:\n${vm.transcript().split('\n').slice(-30).join('\n')}`);
    }
    vm.send('poweroff -f\n');
    await vm.waitExit(120_000);
  } finally {
    if (!vm.exited) await vm.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The BitLocker host made from volume `name` of the unpacked test volumes (`images`, `conf`):
 * from the cache, else built (see the top of this file). `makeImage(dir)` makes the image
 * file (only on a cache miss); `recipe` must change whenever what it makes changes (it keys
 * the cache). `initrd` is a vdboot initramfs with cryptsetup for the default kernel.
 */
export async function bitLockerHost(opts: { images: string; conf: Map<string, BitLockerConf>; name: string; initrd: string; imagePath: string; recipe: string; makeImage: (dir: string) => string }): Promise<BitLockerHost> {
  const conf = opts.conf.get(opts.name);
  if (!conf?.RP) throw new Error(`images.conf has no recovery password for ${opts.name}`);
  const source = path.join(opts.images, `${opts.name}.img`);
  const key = createHash('sha256').update(JSON.stringify({
    source: sha256Of(source), recipe: opts.recipe, imagePath: opts.imagePath,
    // the steps: this file and the tool that reserves the zero segments
    kit: sha256Of(fileURLToPath(import.meta.url)), ntfsTool: sha256Of(fileURLToPath(new URL('../../qemu/ntfs-tool.c', import.meta.url))),
  })).digest('hex').slice(0, 24);
  const entry = path.join(CACHE_DIR, key);
  const meta = path.join(entry, 'host.json');
  if (fs.existsSync(meta)) return { ...JSON.parse(fs.readFileSync(meta, 'utf8')) as BitLockerHost, volume: path.join(entry, 'volume.img') };

  const dump = bitlkDump(source);
  if (!dump) throw new Error('building a BitLocker host needs cryptsetup on this machine (bitlkDump)');
  const segments = zeroSegments(dump);
  const dir = makeTmpDir();
  const image = opts.makeImage(dir);
  const imageSha256 = sha256Of(image);
  const ntfsSerial = conf.UUID && /^[0-9A-Fa-f]{16}$/.test(conf.UUID) ? conf.UUID : '5644424F4F544249';
  const { ntfs, reserved } = makeInnerNtfs(dir, dump.volumeSize, ntfsSerial, segments, image, opts.imagePath);
  const volume = path.join(dir, 'volume.img');
  fs.copyFileSync(source, volume);
  const readBack = path.join(dir, 'read-back.ntfs');

  await throughMapping({ initrd: opts.initrd, volume, key: conf.RP, size: dump.volumeSize, write: ntfs, readBack, name: 'bitlocker-host-builder' });

  // What the mapping reads now is what was written, except in the zero segments: zeros there.
  const outside = differences(ntfs, readBack).filter((d) => !segments.some((s) => d.offset >= s.offset && d.offset + d.size <= s.offset + s.size));
  if (outside.length) throw new Error(`the unlocked volume read back differs from the NTFS written outside the zero segments ${JSON.stringify(segments)}: ${JSON.stringify(outside.slice(0, 10))}`);
  const nonZero = segments.filter((s) => !allZero(readBack, s));
  if (nonZero.length) throw new Error(`zero segments that do not read as zeros (bitlkDump and cryptsetup's table disagree): ${JSON.stringify(nonZero)}`);
  const got = createHash('sha256').update(ntfsRead(readBack, opts.imagePath)).digest('hex');
  if (got !== imageSha256) throw new Error(`${opts.imagePath} read back through the mapping has SHA-256 ${got}, written ${imageSha256}`);

  const host: BitLockerHost = {
    volume: path.join(entry, 'volume.img'), imagePath: opts.imagePath, imageSha256, ntfsSerial,
    unlockedSha256: sha256Of(readBack), zeroSegments: segments, reserved,
  };
  fs.mkdirSync(entry, { recursive: true });
  // renamed into place: a test file building the same entry at the same time never reads half a copy
  fs.copyFileSync(volume, `${host.volume}.${process.pid}.tmp`);
  fs.renameSync(`${host.volume}.${process.pid}.tmp`, host.volume);
  fs.writeFileSync(`${meta}.${process.pid}.tmp`, `${JSON.stringify({ ...host, volume: 'volume.img' }, null, 2)}\n`);
  fs.renameSync(`${meta}.${process.pid}.tmp`, meta); // last: an entry without host.json is not used
  for (const f of [ntfs, readBack, image, volume]) fs.rmSync(f, { force: true });
  return host;
}

/** The volume, and the image path on its NTFS, of guestOnBitLockerHost. */
export const GUEST_HOST_VOLUME = 'bitlk-aes-xts-128';
export const GUEST_IMAGE_PATH = '/VMs/guest.vhdx';
/**
 * The guest inside: it counts its boots in /count (rw-check.ts) and ends through vdboot's
 * shutdown hand-off, which removes the BitLocker mapping last.
 */
export const BITLOCKER_GUEST: GuestOptions = { commands: [...COUNTER_COMMANDS, `if [ -x /run/initramfs/shutdown ]; then echo ${GUEST_MARKER}; sync; exec /run/initramfs/shutdown poweroff; fi`] };

/**
 * The test guest (test/kit/guest-disk.ts, BITLOCKER_GUEST) as a VHDX with every block
 * allocated (a rw boot then needs no expansion; qemu-img's fixed VHDX comes out twice the
 * disk's size, too large for the 100 MiB volume), at GUEST_IMAGE_PATH on the NTFS inside
 * GUEST_HOST_VOLUME: one cache entry shared by every test that boots it.
 */
export function guestOnBitLockerHost(suite: BitLockerSuite): Promise<BitLockerHost> {
  return bitLockerHost({
    ...suite, name: GUEST_HOST_VOLUME, imagePath: GUEST_IMAGE_PATH,
    recipe: JSON.stringify({ guest: guestInitScript(BITLOCKER_GUEST), busybox: sha256Of('/bin/busybox'), vhdx: 'dynamic, all allocated, 1M blocks' }),
    makeImage: (dir) => {
      const { raw } = makeGuestDisk(dir, BITLOCKER_GUEST, { uuid: '0b1d2c3e-4f50-4617-8a9b-0c1d2e3f4a5b' });
      const vhdx = path.join(dir, 'guest.vhdx');
      execFileSync('qemu-img', ['convert', '-q', '-S', '0', '-f', 'raw', '-O', 'vhdx', '-o', 'subformat=dynamic,block_size=1M', raw, vhdx]);
      fs.rmSync(raw);
      return vhdx;
    },
  });
}
