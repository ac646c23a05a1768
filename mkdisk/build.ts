/**
 * `vdboot mkdisk`: a directory or a tar archive becomes a disk image with an ext2/3/4, xfs
 * or btrfs filesystem, in a partition table vdboot writes itself, in any container format
 * vdboot writes, without root and without mounting anything. (xfs and btrfs: fs-xfs.ts and
 * fs-btrfs.ts say what each mkfs keeps and what vdboot mends.)
 *
 * How owners survive without root: `mke2fs -d` copies a directory's owners, modes, links
 * and device nodes as it sees them. This e2fsprogs (1.47.0) cannot read tar archives
 * itself (that came in 1.47.1), so an archive is unpacked under `fakeroot` and mke2fs
 * runs under the same fakeroot state: tar's chown and mknod calls are recorded there
 * instead of failing, and mke2fs's stat calls see them. (As root, fakeroot is not needed
 * and not used.)
 *
 * The disk is first built as a sparse raw file next to the output (the filesystem made
 * straight into its partition with `mke2fs -E offset=`), then written in the asked format
 * by the engine-neutral writers in src/formats/writers from its non-zero ranges.
 */
import { spawnSync } from 'node:child_process';
import { randomUUID, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { writeGpt, writeMbr, type TableRegion } from '../src/formats/partitions.ts';
import { GPT_TYPE } from '../src/formats/guid.ts';
import { formatFromFileName, writeImage, type OutputFormat } from '../src/formats/writers/index.ts';
import { hostAllocatedRanges, openFileSink, openRawSource, randomIdentity } from './image-file.ts';
import { BOOT_PARTITION_BYTES, BIOS_BOOT_BYTES, installBootLoader, type BootSetup, type PartitionScheme } from './boot.ts';
import { lastLines, listTree, type TreeEntry } from './tree-listing.ts';
import { makeXfs, readXfsSuperblock, xfsPrototype, type XfsProto } from './fs-xfs.ts';
import { makeBtrfs, readBtrfsSuperblock } from './fs-btrfs.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

export type FsType = 'ext2' | 'ext3' | 'ext4' | 'xfs' | 'btrfs';
export const FS_TYPES: readonly FsType[] = ['ext4', 'ext3', 'ext2', 'xfs', 'btrfs'];

/** The smallest filesystem each mkfs makes (mkfs.xfs refuses under 300 MB; btrfs needs room for its DUP metadata). */
const MIN_FS_BYTES: Record<FsType, number> = { ext2: 8 * MiB, ext3: 8 * MiB, ext4: 8 * MiB, xfs: 320 * MiB, btrfs: 160 * MiB };

export class MkdiskError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MkdiskError';
  }
}

export interface SizeSpec {
  bytes: number;
  /** true for `+SIZE`: at least this much free space in the filesystem */
  free: boolean;
}

export interface MkdiskOptions {
  /** a directory, or a tar archive (any compression tar recognizes) */
  source: string;
  output: string;
  /** default: by the output's extension */
  format?: OutputFormat;
  fs?: FsType;
  label?: string;
  size?: SizeSpec;
  partition?: PartitionScheme;
  bootable?: boolean;
  /** the kernel for --bootable (default: the newest /boot/vmlinuz-*) */
  kernel?: string;
  /** extra kernel command line for --bootable */
  append?: string;
  /** where the temporary tree and raw disk go (default: next to the output) */
  tmpDir?: string;
  /** a step done, for the person at the terminal */
  log?: (line: string) => void;
  /** fraction done while writing the container */
  progress?: (done: number, total: number) => void;
}

export interface MkdiskResult {
  output: string;
  format: OutputFormat;
  diskSize: number;
  fileSize: number;
  partition: PartitionScheme;
  /** where the filesystem lies on the disk */
  fsOffset: number;
  fsSize: number;
  fsUuid: string;
  /** the root partition's PARTUUID (GPT GUID, or MBR SIGNATURE-NN) */
  partUuid?: string;
  /** the kernel command line a --bootable disk boots with */
  cmdline?: string;
  /** content measured in the source */
  contentBytes: number;
  files: number;
}

/** Parses `2G`, `512M`, `1.5GiB`, `+300M`, `4096` (bytes). */
export function parseSize(text: string): SizeSpec {
  const m = /^(\+)?(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$/i.exec(text.trim());
  if (!m) throw new MkdiskError(`--size ${text}: give a size such as 2G, 512M or +300M (K, M, G, T are powers of 1024)`);
  const unit = { '': 1, k: KiB, m: MiB, g: GiB, t: 1024 * GiB }[m[3]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const bytes = Math.round(Number(m[2]) * unit);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new MkdiskError(`--size ${text}: the size must be above zero`);
  return { bytes, free: m[1] === '+' };
}

export function formatBytes(n: number): string {
  if (n >= GiB) return `${(n / GiB).toFixed(2)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(1)} MiB`;
  if (n >= KiB) return `${(n / KiB).toFixed(1)} KiB`;
  return `${n} bytes`;
}

function run(cmd: string, args: string[], what: string): { stdout: string; stderr: string; status: number } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB, env: { ...process.env, LC_ALL: 'C' } });
  if (r.error) throw new MkdiskError(`${what}: ${cmd} could not run (${r.error.message}); install its Debian package`);
  return { stdout: r.stdout, stderr: r.stderr, status: r.status ?? 1 };
}

/** What the source holds: bytes as ext4 stores them (4 KiB blocks) and the number of inodes. */
export interface ContentSize {
  bytes: number;
  inodes: number;
}

export function measureTree(dir: string): ContentSize {
  let bytes = 0;
  let inodes = 0;
  const seen = new Set<string>();
  const walk = (p: string): void => {
    const st = fs.lstatSync(p);
    inodes++;
    if (st.isDirectory()) {
      const names = fs.readdirSync(p);
      bytes += Math.max(4096, Math.ceil((names.length * 32) / 4096) * 4096);
      for (const n of names) walk(path.join(p, n));
    } else if (st.isFile()) {
      if (st.nlink > 1) {
        const key = `${st.dev}:${st.ino}`;
        if (seen.has(key)) return;
        seen.add(key);
      }
      bytes += Math.ceil(st.size / 4096) * 4096;
      // indirect/extent blocks of big files
      bytes += Math.ceil(st.size / (1024 * MiB)) * 4096;
    } else if (st.isSymbolicLink()) {
      if (st.size > 59) bytes += 4096;
    }
  };
  walk(dir);
  return { bytes, inodes };
}

/**
 * The size of an ext filesystem that holds `content` and leaves about `free` bytes:
 * the content plus mke2fs's own overhead (inode tables at one 256-byte inode per 16 KiB,
 * group descriptors and bitmaps, the journal, 5% reserved for root), rounded to 1 MiB.
 * It is an estimate; mkdisk checks the result and grows it when short.
 */
export function estimateFsSize(content: ContentSize, free: number, fsType: FsType): number {
  const data = content.bytes + free;
  if (fsType === 'xfs') {
    // the log (64 MiB from 300 MiB up in xfsprogs 6.1), AG headers, 512-byte inodes
    return Math.max(MIN_FS_BYTES.xfs, Math.ceil((data * 1.1 + 80 * MiB + content.inodes * 512 * 1.2) / MiB) * MiB);
  }
  if (fsType === 'btrfs') {
    // metadata is DUP on one device: inodes, names and small files count twice
    return Math.max(MIN_FS_BYTES.btrfs, Math.ceil((data * 1.15 + 64 * MiB + content.inodes * 1200) / MiB) * MiB);
  }
  let size = Math.ceil(data * 1.07) + 2 * MiB;
  const journal = (s: number) => (fsType === 'ext2' ? 0 : s < 128 * MiB ? 4 * MiB : s < GiB ? 16 * MiB : s < 2 * GiB ? 32 * MiB : s < 16 * GiB ? 64 * MiB : 128 * MiB);
  size += journal(size);
  size = Math.ceil(size / 0.95);
  const inodeBytes = Math.max(size / 16384, content.inodes * 1.3) * 256;
  size += inodeBytes;
  return Math.max(8 * MiB, Math.ceil(size / MiB) * MiB);
}

/** Free blocks × block size, and the UUID, from an ext superblock at `offset` of `file`. */
export function readExtSuperblock(file: string, offset: number): { freeBytes: number; uuid: string; blockSize: number; blocks: number } {
  const fd = fs.openSync(file, 'r');
  try {
    const sb = Buffer.alloc(1024);
    fs.readSync(fd, sb, 0, 1024, offset + 1024);
    if (sb.readUInt16LE(0x38) !== 0xef53) throw new MkdiskError(`no ext superblock at byte ${offset + 1024} of ${file}`);
    const blockSize = 1024 << sb.readUInt32LE(0x18);
    const is64 = (sb.readUInt32LE(0x60) & 0x80) !== 0;
    const free = sb.readUInt32LE(0x0c) + (is64 ? sb.readUInt32LE(0x158) * 2 ** 32 : 0);
    const blocks = sb.readUInt32LE(0x04) + (is64 ? sb.readUInt32LE(0x150) * 2 ** 32 : 0);
    const u = sb.subarray(0x68, 0x78).toString('hex');
    return { freeBytes: free * blockSize, blockSize, blocks, uuid: `${u.slice(0, 8)}-${u.slice(8, 12)}-${u.slice(12, 16)}-${u.slice(16, 20)}-${u.slice(20)}` };
  } finally {
    fs.closeSync(fd);
  }
}

interface PreparedSource {
  /** the directory mke2fs reads */
  dir: string;
  /** run mke2fs through fakeroot with this state file */
  fakerootState?: string;
  /** the tree as listed for XFS and btrfs, and XFS's prototype: made once, kept across size retries */
  entries?: TreeEntry[];
  xfsProto?: XfsProto;
}

function prepareSource(source: string, scratch: string, log: (l: string) => void): PreparedSource {
  let st: fs.Stats;
  try {
    st = fs.statSync(source);
  } catch {
    throw new MkdiskError(`the source ${source} does not exist: give a directory or a tar archive`);
  }
  if (st.isDirectory()) return { dir: source };
  if (!st.isFile()) throw new MkdiskError(`the source ${source} is neither a directory nor a file (a tar archive)`);
  const dir = path.join(scratch, 'tree');
  fs.mkdirSync(dir);
  log(`unpacking ${source}`);
  const asRoot = process.getuid?.() === 0;
  const state = path.join(scratch, 'fakeroot.state');
  // GNU tar recognizes gzip, bzip2, xz, zstd, lz4 and lzip archives by their content.
  const tarArgs = ['-x', '-f', path.resolve(source), '-C', dir, '--numeric-owner', '--same-owner', '--same-permissions', '--no-overwrite-dir'];
  const r = asRoot ? run('tar', tarArgs, 'unpacking the archive') : run('fakeroot', ['-s', state, '--', 'tar', ...tarArgs], 'unpacking the archive');
  if (r.status !== 0) {
    throw new MkdiskError(`could not unpack ${source} as a tar archive: ${lastLines(r.stderr)}`);
  }
  return { dir, fakerootState: asRoot ? undefined : state };
}

interface Layout {
  diskSize: number;
  fsOffset: number;
  fsSize: number;
  regions: TableRegion[];
  partUuid?: string;
  boot?: { biosBootOffset?: number; espOffset: number; espSize: number };
}

function planLayout(scheme: PartitionScheme, fsSize: number, bootable: boolean, label: string | undefined): Layout {
  const lead = MiB;
  if (scheme === 'none') {
    if (bootable) throw new MkdiskError('--bootable needs a partition table (--partition gpt or mbr) for the boot partition');
    return { diskSize: fsSize, fsOffset: 0, fsSize, regions: [] };
  }
  if (scheme === 'gpt') {
    const parts: Parameters<typeof writeGpt>[0]['partitions'] = [];
    let at = lead;
    let boot: Layout['boot'];
    if (bootable) {
      parts.push({ start: at, size: BIOS_BOOT_BYTES, type: GPT_TYPE.biosBoot, uuid: randomUUID(), name: 'BIOS boot' });
      at += BIOS_BOOT_BYTES;
      parts.push({ start: at, size: BOOT_PARTITION_BYTES, type: GPT_TYPE.efiSystem, uuid: randomUUID(), name: 'EFI system' });
      boot = { biosBootOffset: lead, espOffset: at, espSize: BOOT_PARTITION_BYTES };
      at += BOOT_PARTITION_BYTES;
    }
    const partUuid = randomUUID();
    parts.push({ start: at, size: fsSize, type: GPT_TYPE.linuxRootX86_64, uuid: partUuid, name: (label ?? 'root').slice(0, 36) });
    const diskSize = at + fsSize + MiB;
    const gpt = writeGpt({ diskSize, sectorSize: 512, diskGuid: randomUUID(), partitions: parts });
    return { diskSize, fsOffset: at, fsSize, regions: gpt.regions, partUuid, boot };
  }
  let at = lead;
  const parts: Parameters<typeof writeMbr>[0]['partitions'] = [];
  let boot: Layout['boot'];
  if (bootable) {
    parts.push({ start: at, size: BOOT_PARTITION_BYTES, type: 0xef, bootable: true });
    boot = { espOffset: at, espSize: BOOT_PARTITION_BYTES };
    at += BOOT_PARTITION_BYTES;
  }
  parts.push({ start: at, size: fsSize, type: 0x83 });
  const diskSize = at + fsSize;
  const signature = randomBytes(4).readUInt32LE(0) || 1;
  const mbr = writeMbr({ diskSize, sectorSize: 512, diskSignature: signature, partitions: parts });
  const partUuid = `${signature.toString(16).padStart(8, '0')}-${String(parts.length).padStart(2, '0')}`;
  return { diskSize, fsOffset: at, fsSize, regions: mbr.regions, partUuid, boot };
}

/** What the disk's size leaves for the filesystem when the whole disk is `diskSize`. */
function fsSizeForDisk(diskSize: number, scheme: PartitionScheme, bootable: boolean): number {
  const boot = bootable ? BOOT_PARTITION_BYTES + (scheme === 'gpt' ? BIOS_BOOT_BYTES : 0) : 0;
  const overhead = scheme === 'none' ? 0 : scheme === 'gpt' ? 2 * MiB : MiB;
  return Math.floor((diskSize - overhead - boot) / (4 * KiB)) * 4 * KiB;
}

/**
 * XFS and btrfs have no mkfs option to start at an offset: the filesystem is made in a file
 * of its own in the scratch directory, then its allocated ranges are copied into the raw
 * disk at the partition's offset (holes stay holes).
 */
function makeFsInFile(raw: string, layout: Layout, src: PreparedSource, opts: MkdiskOptions, scratch: string): { ok: true } | { ok: false; why: string } {
  const fsFile = path.join(scratch, 'fs.img');
  fs.rmSync(fsFile, { force: true });
  fs.writeFileSync(fsFile, '');
  fs.truncateSync(fsFile, layout.fsSize);
  const entries = (src.entries ??= listTree(src.dir, src.fakerootState));
  let made: { ok: true } | { ok: false; why: string };
  if (opts.fs === 'xfs') {
    if (!src.xfsProto) {
      const contentDir = path.join(scratch, 'xfs-content');
      fs.rmSync(contentDir, { recursive: true, force: true });
      src.xfsProto = xfsPrototype(entries, src.dir, contentDir);
    }
    const proto = src.xfsProto;
    made = makeXfs(fsFile, proto, path.join(scratch, 'xfs.proto'), opts.label);
    if (made.ok && proto.hardLinkCopies > 0) opts.log?.(`xfs: ${proto.hardLinkCopies} hard-linked names became copies of their file (mkfs.xfs's prototype file cannot link)`);
    if (made.ok && proto.socketsLeftOut > 0) opts.log?.(`xfs: ${proto.socketsLeftOut} sockets left out`);
  } else {
    made = makeBtrfs(fsFile, src.dir, entries, opts.label, src.fakerootState);
  }
  if (made.ok) copyInto(fsFile, raw, layout.fsOffset, layout.fsSize);
  fs.rmSync(fsFile, { force: true });
  return made;
}

/** Copies the allocated ranges of `from` into `to` at `offset` (at most `size` bytes). */
function copyInto(from: string, to: string, offset: number, size: number): void {
  const src = fs.openSync(from, 'r');
  const dst = fs.openSync(to, 'r+');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (const r of hostAllocatedRanges(from, size)) {
      for (let at = r.start; at < r.start + r.length; at += buf.length) {
        const n = fs.readSync(src, buf, 0, Math.min(buf.length, r.start + r.length - at), at);
        if (n <= 0) break;
        fs.writeSync(dst, buf, 0, n, offset + at);
      }
    }
  } finally {
    fs.closeSync(src);
    fs.closeSync(dst);
  }
}

/** Free bytes and UUID of the filesystem made at `offset` of the raw disk. */
function readFsInfo(raw: string, offset: number, fsType: FsType): { freeBytes: number; uuid: string } {
  if (fsType === 'xfs') return readXfsSuperblock(raw, offset);
  if (fsType === 'btrfs') return readBtrfsSuperblock(raw, offset);
  return readExtSuperblock(raw, offset);
}

function makeFilesystem(raw: string, layout: Layout, src: PreparedSource, opts: MkdiskOptions, inodes: number, scratch: string): { ok: true } | { ok: false; why: string } {
  const fsType = opts.fs ?? 'ext4';
  if (fsType === 'xfs' || fsType === 'btrfs') return makeFsInFile(raw, layout, src, opts, scratch);
  const args = ['-q', '-F', '-t', fsType, '-b', '4096', '-N', String(inodes), '-d', src.dir, '-E', `offset=${layout.fsOffset},nodiscard,root_owner=0:0`];
  if (opts.label !== undefined) args.push('-L', opts.label);
  args.push(raw, `${layout.fsSize / KiB}k`);
  const r = src.fakerootState ? run('fakeroot', ['-i', src.fakerootState, '--', 'mke2fs', ...args], 'making the filesystem') : run('mke2fs', args, 'making the filesystem');
  if (r.status === 0) return { ok: true };
  const text = `${r.stderr}\n${r.stdout}`.trim();
  if (/Could not allocate (block|inode)|No space left|too many inodes|inode table/i.test(text)) return { ok: false, why: text.split('\n').filter(Boolean).slice(-1)[0] ?? text };
  throw new MkdiskError(`mke2fs failed (exit ${r.status}): ${text}`);
}

function writeRegions(raw: string, regions: TableRegion[]): void {
  const fd = fs.openSync(raw, 'r+');
  try {
    for (const r of regions) fs.writeSync(fd, r.bytes, 0, r.bytes.length, r.offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function validateLabel(label: string, fsType: FsType = 'ext4'): void {
  const max = fsType === 'xfs' ? 12 : fsType === 'btrfs' ? 255 : 16;
  const what = fsType === 'xfs' ? 'an XFS' : fsType === 'btrfs' ? 'a btrfs' : 'an ext';
  if (Buffer.byteLength(label, 'utf8') > max) throw new MkdiskError(`--label "${label}" is longer than the ${max} bytes ${what} filesystem label holds`);
}

export async function mkdisk(opts: MkdiskOptions): Promise<MkdiskResult> {
  const log = opts.log ?? (() => {});
  const fsType = opts.fs ?? 'ext4';
  const scheme = opts.partition ?? 'gpt';
  const bootable = opts.bootable ?? false;
  const format = opts.format ?? formatFromFileName(opts.output);
  if (opts.label !== undefined) validateLabel(opts.label, fsType);
  const outDir = path.dirname(path.resolve(opts.output));
  if (!fs.existsSync(outDir)) throw new MkdiskError(`the output's directory ${outDir} does not exist`);
  const scratch = fs.mkdtempSync(path.join(opts.tmpDir ?? outDir, '.vdboot-mkdisk-'));
  try {
    const src = prepareSource(opts.source, scratch, log);
    const content = measureTree(src.dir);
    log(`content: ${formatBytes(content.bytes)} in ${content.inodes} files and directories`);
    // Boot files are prepared before the layout: the boot partition must hold them.
    let bootSetup: BootSetup | undefined;

    let fsSize: number;
    let wantFree = 0;
    if (opts.size && !opts.size.free) {
      fsSize = fsSizeForDisk(Math.ceil(opts.size.bytes / MiB) * MiB, scheme, bootable);
      if (fsSize < 4 * MiB) throw new MkdiskError(`--size ${formatBytes(opts.size.bytes)} leaves no room for a filesystem next to the partition table${bootable ? ' and the boot partition' : ''}`);
      if (fsSize < MIN_FS_BYTES[fsType] && fsType !== 'ext2' && fsType !== 'ext3' && fsType !== 'ext4') {
        throw new MkdiskError(`--size ${formatBytes(opts.size.bytes)} leaves ${formatBytes(fsSize)} for the filesystem; ${fsType} needs at least ${formatBytes(MIN_FS_BYTES[fsType])}: give a larger --size or --size +FREE`);
      }
    } else {
      wantFree = opts.size?.bytes ?? Math.max(64 * MiB, Math.ceil(content.bytes / 4));
      fsSize = estimateFsSize(content, wantFree, fsType);
    }
    const raw = path.join(scratch, 'disk.raw');
    let layout: Layout | undefined;
    for (let attempt = 0; ; attempt++) {
      layout = planLayout(scheme, fsSize, bootable, opts.label);
      fs.rmSync(raw, { force: true });
      fs.writeFileSync(raw, '');
      fs.truncateSync(raw, layout.diskSize);
      const inodes = Math.max(Math.ceil(content.inodes * 1.25) + 1024, Math.floor(fsSize / 16384));
      log(`making ${fsType} (${formatBytes(fsSize)}) on a ${scheme === 'none' ? 'disk without partition table' : `${scheme.toUpperCase()} disk`} of ${formatBytes(layout.diskSize)}`);
      const made = makeFilesystem(raw, layout, src, opts, Math.min(inodes, Math.floor(fsSize / 1024)), scratch);
      const free = made.ok ? readFsInfo(raw, layout.fsOffset, fsType).freeBytes : -1;
      if (made.ok && free >= wantFree) break;
      if (opts.size && !opts.size.free) {
        throw new MkdiskError(
          `the content (${formatBytes(content.bytes)} in ${content.inodes} files and directories) does not fit a ${formatBytes(layout.diskSize)} disk: ` +
          `its ${fsType} filesystem would be ${formatBytes(fsSize)} (mke2fs: ${made.ok ? 'full' : made.why}). ` +
          `Give a larger --size (about ${formatBytes(Math.ceil(estimateFsSize(content, 16 * MiB, fsType) * 1.1 / MiB) * MiB + layout.diskSize - fsSize)}) or --size +FREE to size the disk to the content.`,
        );
      }
      if (attempt >= 4) throw new MkdiskError(`could not size the filesystem for ${formatBytes(content.bytes)} of content plus ${formatBytes(wantFree)} free after ${attempt + 1} tries`);
      const short = made.ok ? wantFree - free : Math.max(content.bytes / 4, 16 * MiB);
      fsSize = Math.ceil((fsSize + short * 1.1 + 4 * MiB) / MiB) * MiB;
      log(`the filesystem was ${made.ok ? `${formatBytes(wantFree - free)} short of the free space asked for` : 'too small'}; trying ${formatBytes(fsSize)}`);
    }
    writeRegions(raw, layout.regions);
    const sb = readFsInfo(raw, layout.fsOffset, fsType);
    let cmdline: string | undefined;
    if (bootable) {
      const rootSpec = layout.partUuid ? `PARTUUID=${layout.partUuid}` : `UUID=${sb.uuid}`;
      bootSetup = await installBootLoader({
        raw, scheme, espOffset: layout.boot!.espOffset, espSize: layout.boot!.espSize,
        biosBootOffset: layout.boot!.biosBootOffset,
        kernel: opts.kernel, append: `root=${rootSpec} rw${opts.append ? ` ${opts.append}` : ''}`, scratch, log,
      });
      cmdline = bootSetup.cmdline;
    }

    log(`writing ${opts.output} (${format})`);
    let fileSize: number;
    if (format === 'raw' && renameAcross(raw, opts.output)) {
      fileSize = layout.diskSize;
    } else {
      // Written next to the output, then renamed: a failed run leaves no half-written image under its name.
      const source = openRawSource(raw);
      const tmpOut = `${opts.output}.vdboot-tmp`;
      const sink = openFileSink(tmpOut);
      try {
        fileSize = writeImage(format, source, sink, { identity: randomIdentity(), progress: opts.progress, fileName: path.basename(opts.output) }).fileSize;
      } catch (e) {
        fs.rmSync(tmpOut, { force: true });
        throw e;
      } finally {
        sink.close();
        source.close();
      }
      fs.renameSync(tmpOut, opts.output);
    }
    return {
      output: opts.output, format, diskSize: layout.diskSize, fileSize, partition: scheme,
      fsOffset: layout.fsOffset, fsSize: layout.fsSize, fsUuid: sb.uuid, partUuid: layout.partUuid, cmdline,
      contentBytes: content.bytes, files: content.inodes,
    };
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

/** Moves a file when both names are on one filesystem; false (and nothing done) when they are not. */
function renameAcross(from: string, to: string): boolean {
  try {
    fs.renameSync(from, to);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EXDEV') return false;
    throw e;
  }
}
