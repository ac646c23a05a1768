/**
 * Test disks built without root and without mounting anything: filesystem images from
 * directories or file lists (ext4 with `mke2fs -d`, NTFS with `mkntfs` + `ntfscp` + a small
 * libntfs-3g helper for directories, FAT32 with `mkfs.vfat` + mtools, exFAT with
 * `mkfs.exfat` + vdboot's own exFAT writer in exfat-writer.ts), partitioned disks assembled
 * from partition images (`sfdisk` script on a sparse file + `dd conv=notrunc`), and
 * conversion to any format qemu-img writes.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeExfatFiles } from './exfat-writer.ts';

const MiB = 1024 * 1024;

/** Content of a file to put on a filesystem: the bytes, a string (UTF-8), or a host file. */
export type FileContent = string | Uint8Array | { hostFile: string };
/** Path inside the filesystem ('/a/b c/ü.txt' or 'a/b') → content. Parents are created. */
export type FileTree = Record<string, FileContent>;

export interface FilesystemOptions {
  /** image size in MiB */
  sizeMiB: number;
  label?: string;
  /** ext4: a UUID; ntfs: 16 hex digits; vfat/exfat: 8 hex digits (volume serial) */
  uuid?: string;
  files?: FileTree;
  /** empty directories to create */
  dirs?: string[];
}

function run(cmd: string, args: string[], env?: NodeJS.ProcessEnv): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: env ? { ...process.env, ...env } : process.env, maxBuffer: 64 * MiB });
  if (r.error) throw new Error(`${cmd} could not run (${r.error.message}): is its Debian package installed?`);
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (exit ${r.status}):\n${(r.stderr || r.stdout).trim()}`);
  }
  return r.stdout;
}

/** Names that need a UTF-8 locale in ntfs-3g's and mtools' tools. */
const UTF8 = { LC_ALL: 'C.UTF-8' };

function normalize(p: string): string {
  const parts = p.split('/').filter((x) => x !== '' && x !== '.');
  if (parts.includes('..')) throw new Error(`Path ${p} contains "..": give paths inside the filesystem.`);
  return '/' + parts.join('/');
}

/** Every directory that must exist for the files and dirs, parents first. */
function directoriesOf(files: FileTree = {}, dirs: string[] = []): string[] {
  const all = new Set<string>();
  const add = (d: string): void => {
    const n = normalize(d);
    if (n === '/') return;
    add(path.posix.dirname(n));
    all.add(n);
  };
  for (const f of Object.keys(files)) add(path.posix.dirname(normalize(f)));
  for (const d of dirs) add(d);
  return [...all];
}

function withTempDir<T>(body: (dir: string) => T): T {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-disk-'));
  try {
    return body(dir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** A host file holding `content` (the host file itself when it is one). */
function hostFileFor(content: FileContent, scratch: string): string {
  if (typeof content === 'object' && 'hostFile' in content) return content.hostFile;
  const f = path.join(scratch, `f${crypto.randomBytes(6).toString('hex')}`);
  fs.writeFileSync(f, content);
  return f;
}

/** Writes a FileTree into a host directory. */
export function writeTree(dir: string, files: FileTree = {}, dirs: string[] = []): void {
  for (const d of directoriesOf(files, dirs)) fs.mkdirSync(path.join(dir, d), { recursive: true });
  for (const [p, content] of Object.entries(files)) {
    const target = path.join(dir, normalize(p));
    if (typeof content === 'object' && 'hostFile' in content) fs.copyFileSync(content.hostFile, target);
    else fs.writeFileSync(target, content);
  }
}

function createSparse(file: string, bytes: number): void {
  fs.rmSync(file, { force: true });
  fs.writeFileSync(file, '');
  fs.truncateSync(file, bytes);
}

// ---- ext4 --------------------------------------------------------------------------------

export interface Ext4Options extends FilesystemOptions {
  /** copy this host directory's contents to the root (with `files` on top) */
  fromDir?: string;
  /** mke2fs -t: ext2, ext3 or ext4 (default) */
  type?: 'ext2' | 'ext3' | 'ext4';
}

/** An ext2/3/4 image populated with `mke2fs -d`. */
export function makeExt4(image: string, opts: Ext4Options): void {
  withTempDir((scratch) => {
    let source = opts.fromDir;
    if (opts.files || opts.dirs) {
      source = path.join(scratch, 'root');
      fs.mkdirSync(source);
      if (opts.fromDir) fs.cpSync(opts.fromDir, source, { recursive: true, verbatimSymlinks: true });
      writeTree(source, opts.files, opts.dirs);
    }
    createSparse(image, opts.sizeMiB * MiB);
    const args = ['-q', '-F', '-t', opts.type ?? 'ext4'];
    if (opts.label !== undefined) args.push('-L', opts.label);
    if (opts.uuid !== undefined) args.push('-U', opts.uuid);
    if (source) args.push('-d', source);
    args.push(image);
    run('mke2fs', args, { E2FSPROGS_FAKE_TIME: process.env.SOURCE_DATE_EPOCH ?? '' });
  });
}

// ---- NTFS --------------------------------------------------------------------------------

export interface NtfsOptions extends FilesystemOptions {
  /** sector where the partition starts on its disk (written to the boot sector for Windows) */
  partitionStartSector?: number;
  /** cluster size in bytes (mkntfs -c) */
  clusterSize?: number;
}

const here = path.dirname(fileURLToPath(import.meta.url));

/**
 * The ntfs-tool helper (qemu/ntfs-tool.c: mkdir, write-fragmented, set-flags, reserve), compiled
 * against libntfs-3g on first use and cached in .cache/ by the source's hash. Needs gcc and
 * ntfs-3g-dev.
 */
export function ntfsTool(): string {
  const source = path.join(here, 'ntfs-tool.c');
  const hash = crypto.createHash('sha256').update(fs.readFileSync(source)).digest('hex').slice(0, 16);
  const cacheDir = path.join(here, '..', '.cache', 'qemu');
  const tool = path.join(cacheDir, `ntfs-tool-${hash}`);
  if (fs.existsSync(tool)) return tool;
  fs.mkdirSync(cacheDir, { recursive: true });
  const tmp = `${tool}.${process.pid}.tmp`;
  const r = spawnSync('gcc', ['-O2', '-o', tmp, source, '-lntfs-3g'], { encoding: 'utf8' });
  if (r.status !== 0) {
    throw new Error(`Could not build ${source} (needs gcc and the Debian package ntfs-3g-dev):\n${r.stderr ?? r.error}`);
  }
  fs.renameSync(tmp, tool); // atomic: parallel builders end with the same file
  return tool;
}

/** An NTFS image made by mkntfs; directories through ntfs-tool, files through ntfscp. */
export function makeNtfs(image: string, opts: NtfsOptions): void {
  createSparse(image, opts.sizeMiB * MiB);
  const args = ['-q', '-F', '-f', '-s', '512', '-H', '255', '-S', '63', '-p', String(opts.partitionStartSector ?? 0)];
  if (opts.label !== undefined) args.push('-L', opts.label);
  if (opts.clusterSize !== undefined) args.push('-c', String(opts.clusterSize));
  args.push(image);
  run('mkntfs', args);
  if (opts.uuid !== undefined) {
    if (!/^[0-9a-fA-F]{16}$/.test(opts.uuid)) throw new Error(`NTFS serial ${opts.uuid}: give 16 hex digits.`);
    run('ntfslabel', ['-q', `--new-serial=${opts.uuid}`, image]);
  }
  ntfsAdd(image, opts.files, opts.dirs);
}

/**
 * Keeps clusters [first, first+count) of each range of an NTFS image away from every other
 * file (ntfs-tool reserve): files in `dir` (hidden, system) hold them, made by filling the
 * free space with `chunkBytes` files and deleting those that hold none. Throws, naming the
 * clusters, when one already belongs to something else (the image is then left full).
 */
export function ntfsReserve(image: string, dir: string, ranges: { first: number; count: number }[], chunkBytes = 64 * 1024): void {
  run(ntfsTool(), [image, 'reserve', normalize(dir), String(chunkBytes), ...ranges.map((r) => `${r.first}+${r.count}`)], UTF8);
}

/** Adds files and directories to an existing NTFS image (parents are created). */
export function ntfsAdd(image: string, files: FileTree = {}, dirs: string[] = []): void {
  const directories = directoriesOf(files, dirs);
  if (directories.length) run(ntfsTool(), [image, 'mkdir', ...directories], UTF8);
  withTempDir((scratch) => {
    for (const [p, content] of Object.entries(files)) {
      run('ntfscp', ['-q', '-f', image, hostFileFor(content, scratch), normalize(p)], UTF8);
    }
  });
}

/**
 * Adds a file in about size/chunkBytes fragments (default chunk: 4 KiB), with one cluster
 * of `fillerPath` (default: the file's path + ".filler") between fragments. With a few
 * hundred fragments the file's runlist spills into extension records ($ATTRIBUTE_LIST).
 * Parents are created. Check the result with `ntfsinfo -F PATH -v IMAGE` ("Total runs").
 */
export function ntfsAddFragmented(
  image: string,
  file: string,
  content: FileContent,
  opts: { chunkBytes?: number; fillerPath?: string } = {},
): void {
  const dest = normalize(file);
  const filler = normalize(opts.fillerPath ?? `${dest}.filler`);
  const parents = directoriesOf({ [dest]: '', [filler]: '' });
  withTempDir((scratch) => {
    if (parents.length) run(ntfsTool(), [image, 'mkdir', ...parents], UTF8);
    run(ntfsTool(), [image, 'write-fragmented', dest, hostFileFor(content, scratch), filler, String(opts.chunkBytes ?? 4096)], UTF8);
  });
}

/** NTFS $Volume flags (ntfs-3g's layout.h): what Windows and ntfs-3g leave behind. */
export const NTFS_VOLUME_FLAGS = { dirty: 0x0001, resizeLogFile: 0x0002, upgradeOnMount: 0x0004, mountedOnNT4: 0x0008, deleteUsnUnderway: 0x0010, repairObjectId: 0x0020, chkdskUnderway: 0x4000, modifiedByChkdsk: 0x8000 } as const;

/** Writes the NTFS volume flags, e.g. NTFS_VOLUME_FLAGS.dirty for "not cleanly unmounted". */
export function ntfsSetVolumeFlags(image: string, flags: number): void {
  run(ntfsTool(), [image, 'set-flags', flags.toString(16)]);
}

/** The NTFS volume flags as ntfsinfo reports them (0 = clean), e.g. to check a clean shutdown. */
export function ntfsVolumeFlags(image: string): number {
  const out = run('ntfsinfo', ['-f', '-m', image]);
  const m = /Volume Flags: 0x([0-9a-fA-F]+)/.exec(out);
  if (!m) throw new Error(`ntfsinfo printed no volume flags for ${image}:\n${out}`);
  return parseInt(m[1]!, 16);
}

/**
 * Copies `source` into an NTFS image as a sparse file, as `cp` leaves one on a Linux
 * machine: the image is mounted with ntfs-3g (FUSE: needs root and /dev/fuse) and cp
 * --sparse=always skips the zero runs, so the file has holes inside compression units that
 * are partly allocated. `sparseCopySupported()` says whether this machine can.
 */
export function ntfsAddSparse(image: string, file: string, source: string): void {
  withTempDir((mnt) => {
    run('ntfs-3g', [image, mnt]);
    try {
      const dest = path.join(mnt, normalize(file));
      fs.mkdirSync(path.dirname(dest), { recursive: true });
      run('cp', ['--sparse=always', source, dest]);
    } finally {
      run('umount', [mnt]);
    }
  });
}

/** Whether ntfsAddSparse can run here (root, /dev/fuse, ntfs-3g). */
export function sparseCopySupported(): boolean {
  return process.getuid?.() === 0 && fs.existsSync('/dev/fuse') && spawnSync('ntfs-3g', ['--version']).status !== null;
}

/** Reads a file from an NTFS image (ntfscat). */
export function ntfsRead(image: string, file: string): Buffer {
  return execFileSync('ntfscat', [image, normalize(file)], { env: { ...process.env, ...UTF8 }, maxBuffer: 1024 * MiB });
}

/** The files holding clusters [first, first+count) of an NTFS image, by ntfscluster (paths, sorted, each once). */
export function clusterOwners(image: string, first: number, count: number): string[] {
  const out = execFileSync('ntfscluster', ['-c', `${first}-${first + count - 1}`, image], { encoding: 'utf8', env: { ...process.env, ...UTF8 }, stdio: ['ignore', 'pipe', 'pipe'] });
  return [...new Set([...out.matchAll(/^Inode \d+ (.+?)(?:\/\$[A-Z_]+)?$/gm)].map((m) => m[1]!))].sort();
}

// ---- FAT32 -------------------------------------------------------------------------------

export interface FatOptions extends FilesystemOptions {
  /** FAT width; default 32 (needs at least 33 MiB) */
  fatBits?: 12 | 16 | 32;
}

/** A FAT image made by mkfs.vfat, filled with mtools (mmd, mcopy). */
export function makeFat(image: string, opts: FatOptions): void {
  const bits = opts.fatBits ?? 32;
  if (bits === 32 && opts.sizeMiB < 33) throw new Error(`FAT32 needs at least 33 MiB; ${opts.sizeMiB} MiB asked.`);
  createSparse(image, opts.sizeMiB * MiB);
  const args = ['-F', String(bits)];
  if (opts.label !== undefined) args.push('-n', opts.label);
  if (opts.uuid !== undefined) args.push('-i', opts.uuid);
  args.push(image);
  run('mkfs.vfat', args);
  fatAdd(image, opts.files, opts.dirs);
}

/** Adds files and directories to an existing FAT image with mtools. */
export function fatAdd(image: string, files: FileTree = {}, dirs: string[] = []): void {
  const env = { ...UTF8, MTOOLS_SKIP_CHECK: '1' };
  for (const d of directoriesOf(files, dirs)) run('mmd', ['-i', image, `::${d}`], env);
  withTempDir((scratch) => {
    for (const [p, content] of Object.entries(files)) {
      run('mcopy', ['-o', '-i', image, hostFileFor(content, scratch), `::${normalize(p)}`], env);
    }
  });
}

/** Reads a file from a FAT image (mtype). */
export function fatRead(image: string, file: string): Buffer {
  return execFileSync('mcopy', ['-n', '-i', image, `::${normalize(file)}`, '-'], {
    env: { ...process.env, ...UTF8, MTOOLS_SKIP_CHECK: '1' },
    maxBuffer: 1024 * MiB,
  });
}

// ---- exFAT -------------------------------------------------------------------------------

/**
 * An exFAT image made by mkfs.exfat. exfatprogs has no tool that adds files without
 * mounting, so files and directories are written by vdboot's own small exFAT writer
 * (exfat-writer.ts: contiguous allocation, checked with fsck.exfat).
 */
export function makeExfat(image: string, opts: FilesystemOptions & { clusterSize?: number }): void {
  createSparse(image, opts.sizeMiB * MiB);
  const args: string[] = [];
  if (opts.label !== undefined) args.push('-L', opts.label);
  if (opts.clusterSize !== undefined) args.push('-c', String(opts.clusterSize));
  args.push(image);
  run('mkfs.exfat', args);
  if (opts.uuid !== undefined) run('tune.exfat', ['-I', `0x${opts.uuid}`, image]);
  if (opts.files || opts.dirs) {
    const entries: Record<string, Uint8Array> = {};
    for (const [p, content] of Object.entries(opts.files ?? {})) {
      entries[normalize(p)] =
        typeof content === 'string' ? Buffer.from(content) : content instanceof Uint8Array ? content : fs.readFileSync(content.hostFile);
    }
    writeExfatFiles(image, entries, directoriesOf(opts.files, opts.dirs));
  }
}

// ---- partitioned disks -------------------------------------------------------------------

export interface PartitionSpec {
  /** a filesystem image to copy into the partition */
  image?: string;
  /** partition size in MiB; default: the image's size rounded up to whole MiB */
  sizeMiB?: number;
  /**
   * sfdisk type: a GPT type GUID or alias (linux, uefi, "microsoft basic data" …), or an
   * MBR hex id (83, 7, c, ef …). Default: Linux filesystem.
   */
  type?: string;
  /** GPT partition name (PARTLABEL) */
  name?: string;
  /** GPT partition UUID (PARTUUID) */
  uuid?: string;
  /** MBR boot flag */
  bootable?: boolean;
}

export interface DiskOptions {
  table: 'gpt' | 'dos';
  partitions: PartitionSpec[];
  /** GPT disk GUID or MBR disk id (0x12345678) */
  diskId?: string;
  /** first partition's start and alignment in MiB; default 1 */
  alignMiB?: number;
}

export interface PartitionLayout {
  /** 1-based partition number */
  number: number;
  /** byte offset on the disk */
  offset: number;
  /** bytes */
  size: number;
  type: string;
  uuid?: string;
  name?: string;
}

function quoteSfdisk(s: string): string {
  if (/["\n]/.test(s)) throw new Error(`Partition name ${JSON.stringify(s)} cannot contain quotes or newlines.`);
  return `"${s}"`;
}

/** A disk image with a GPT or MBR table whose partitions hold the given images. */
export function makePartitionedDisk(out: string, opts: DiskOptions): PartitionLayout[] {
  const align = (opts.alignMiB ?? 1) * MiB;
  if (opts.table === 'dos' && opts.partitions.length > 4) throw new Error('An MBR table holds at most 4 primary partitions here.');
  let offset = align;
  const lines = [`label: ${opts.table}`, 'unit: sectors'];
  if (opts.diskId) lines.push(`label-id: ${opts.diskId}`);
  const placed: { spec: PartitionSpec; offset: number; size: number }[] = [];
  for (const spec of opts.partitions) {
    const imageSize = spec.image ? fs.statSync(spec.image).size : 0;
    const size = spec.sizeMiB !== undefined ? spec.sizeMiB * MiB : Math.ceil(imageSize / MiB) * MiB;
    if (size <= 0) throw new Error('A partition needs an image or a sizeMiB.');
    if (imageSize > size) throw new Error(`Image ${spec.image} (${imageSize} bytes) is larger than its partition (${size} bytes).`);
    const fields = [`start=${offset / 512}`, `size=${size / 512}`];
    fields.push(`type=${spec.type ?? (opts.table === 'gpt' ? 'linux' : '83')}`);
    if (spec.name !== undefined) fields.push(`name=${quoteSfdisk(spec.name)}`);
    if (spec.uuid !== undefined) fields.push(`uuid=${spec.uuid}`);
    if (spec.bootable) fields.push('bootable');
    lines.push(fields.join(', '));
    placed.push({ spec, offset, size });
    offset = Math.ceil((offset + size) / align) * align;
  }
  // GPT keeps a backup table in the last 33 sectors.
  createSparse(out, offset + (opts.table === 'gpt' ? MiB : 0));
  const r = spawnSync('sfdisk', ['--no-reread', '--no-tell-kernel', '-q', out], { input: lines.join('\n') + '\n', encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`sfdisk failed on ${out} (exit ${r.status}):\n${r.stderr}\nscript:\n${lines.join('\n')}`);
  for (const p of placed) {
    if (!p.spec.image) continue;
    run('dd', [`if=${p.spec.image}`, `of=${out}`, 'bs=1M', `seek=${p.offset}`, 'oflag=seek_bytes', 'conv=notrunc,sparse', 'status=none']);
  }
  return readPartitions(out);
}

/** The partitions of a disk image as sfdisk --json reports them, in bytes. */
export function readPartitions(disk: string): PartitionLayout[] {
  const table = JSON.parse(run('sfdisk', ['--json', disk])).partitiontable as {
    sectorsize?: number;
    partitions?: { node: string; start: number; size: number; type: string; uuid?: string; name?: string }[];
  };
  const sector = table.sectorsize ?? 512;
  return (table.partitions ?? []).map((p) => ({
    number: Number(/(\d+)$/.exec(p.node)?.[1]),
    offset: p.start * sector,
    size: p.size * sector,
    type: p.type,
    ...(p.uuid !== undefined ? { uuid: p.uuid } : {}),
    ...(p.name !== undefined ? { name: p.name } : {}),
  }));
}

// ---- formats -----------------------------------------------------------------------------

/**
 * Converts an image with `qemu-img convert -O format` (raw, qcow2, vpc, vhdx, vdi, vmdk…).
 * `options` go to -o, e.g. ['subformat=fixed'] for a fixed VHD, ['subformat=streamOptimized'].
 */
export function convertImage(src: string, dst: string, format: string, options: string[] = [], srcFormat = 'raw'): void {
  const args = ['convert', '-f', srcFormat, '-O', format];
  if (options.length) args.push('-o', options.join(','));
  args.push(src, dst);
  run('qemu-img', args);
}
