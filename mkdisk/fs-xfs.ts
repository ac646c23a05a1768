/**
 * `vdboot mkdisk --fs xfs`: an XFS filesystem made from a tree without root and without
 * mounting, by `mkfs.xfs -p PROTOFILE` (xfsprogs 6.1's prototype file), then mended with
 * `xfs_db -x` where the prototype file falls short.
 *
 * What the prototype file expresses: directories, regular files (their content copied from
 * a path), symlinks, character and block devices, fifos; owner and group numbers; the
 * permission bits with setuid and setgid. What it does not, and what vdboot does about it:
 * - the sticky bit (/tmp's 1777): written into the inode afterwards by `xfs_db -x`
 *   (`write core.mode`), on the unmounted image file;
 * - hard links: every name becomes its own inode with a copy of the content (the prototype
 *   file has no way to name an inode twice); the log says how many;
 * - sockets: left out (a socket file means nothing without the process that made it); the
 *   log says how many;
 * - names and symlink targets with white space, names starting with ":" (a comment) or
 *   named "$" (the end of a directory): refused, naming them, since the tokens cannot hold
 *   them;
 * - timestamps and extended attributes: not carried (the files get the time of the build).
 * The content path of each regular file goes through a numbered symlink in the scratch
 * directory, so the source's own paths never need to be tokens.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { formatUuid } from '../src/formats/vhd.ts';
import { lastLines, type TreeEntry } from './tree-listing.ts';

export class XfsProtoError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MkdiskError';
  }
}

const UNSAFE_TOKEN = /[\s]/;

/** The mode column: type, setuid, setgid, three octal digits. */
function protoMode(e: TreeEntry): string {
  const type = { file: '-', dir: 'd', symlink: 'l', char: 'c', block: 'b', fifo: 'p', socket: '?' }[e.type];
  return `${type}${e.mode & 0o4000 ? 'u' : '-'}${e.mode & 0o2000 ? 'g' : '-'}${(e.mode & 0o777).toString(8).padStart(3, '0')}`;
}

export interface XfsProto {
  text: string;
  /** paths (from the root, with a leading /) whose mode needs xfs_db afterwards: the sticky bit */
  modeFixes: { path: string; mode: number }[];
  /** names that became copies of a hard-linked file */
  hardLinkCopies: number;
  socketsLeftOut: number;
}

/**
 * The prototype file for `entries` (listTree's order: parents first). Regular files' content
 * comes from symlinks made in `contentDir` (numbered) to `sourceDir`'s files.
 */
export function xfsPrototype(entries: readonly TreeEntry[], sourceDir: string, contentDir: string): XfsProto {
  const bad: string[] = [];
  const children = new Map<string, TreeEntry[]>();
  for (const e of entries) {
    if (e.path === '') continue;
    const name = path.posix.basename(e.path);
    if (UNSAFE_TOKEN.test(name) || name.startsWith(':') || name === '$') bad.push(`"${e.path}" (its name)`);
    else if (e.type === 'symlink' && (UNSAFE_TOKEN.test(e.target!) || e.target!.startsWith(':') || e.target === '')) bad.push(`"${e.path}" (its link target "${e.target}")`);
    const parent = path.posix.dirname(e.path) === '.' ? '' : path.posix.dirname(e.path);
    let list = children.get(parent);
    if (!list) children.set(parent, (list = []));
    list.push(e);
  }
  if (bad.length > 0) {
    throw new XfsProtoError(
      `${bad.length} name${bad.length > 1 ? 's' : ''} cannot be written into an XFS filesystem without root: ${bad.slice(0, 5).join(', ')}${bad.length > 5 ? ', …' : ''}. ` +
      'mkfs.xfs (xfsprogs 6.1) reads the tree from a prototype file whose tokens cannot hold white space, a leading ":" or the name "$". ' +
      'Rename them, or use --fs ext4 or --fs btrfs, which keep any name.',
    );
  }
  const root = entries.find((e) => e.path === '');
  if (!root || root.type !== 'dir') throw new XfsProtoError('the source tree has no root directory');
  fs.mkdirSync(contentDir, { recursive: true });
  const lines = ['vdboot', '0 0'];
  const modeFixes: XfsProto['modeFixes'] = [];
  const seenInodes = new Set<number>();
  let hardLinkCopies = 0;
  let socketsLeftOut = 0;
  let n = 0;
  const typeBits = { file: 0o100000, dir: 0o040000, symlink: 0o120000, char: 0o020000, block: 0o060000, fifo: 0o010000, socket: 0o140000 };
  const emit = (e: TreeEntry, depth: number): void => {
    const indent = ' '.repeat(depth);
    const head = `${protoMode(e)} ${e.uid} ${e.gid}`;
    if (e.mode & 0o1000) modeFixes.push({ path: `/${e.path}`, mode: typeBits[e.type] | (e.mode & 0o7777) });
    const name = e.path === '' ? '' : `${path.posix.basename(e.path)} `;
    switch (e.type) {
      case 'dir':
        lines.push(`${indent}${name}${head}`);
        for (const c of children.get(e.path) ?? []) emit(c, depth + 1);
        lines.push(`${indent}$`);
        return;
      case 'file': {
        if (e.nlink > 1) {
          if (seenInodes.has(e.ino)) hardLinkCopies++;
          seenInodes.add(e.ino);
        }
        const link = path.join(contentDir, String(n++));
        fs.symlinkSync(path.resolve(sourceDir, e.path), link);
        lines.push(`${indent}${name}${head} ${link}`);
        return;
      }
      case 'symlink': lines.push(`${indent}${name}${head} ${e.target}`); return;
      case 'char': case 'block': lines.push(`${indent}${name}${head} ${e.major} ${e.minor}`); return;
      case 'fifo': lines.push(`${indent}${name}${head}`); return;
      case 'socket': socketsLeftOut++; return;
    }
  };
  emit(root, 0);
  return { text: `${lines.join('\n')}\n`, modeFixes, hardLinkCopies, socketsLeftOut };
}

/**
 * Makes the XFS filesystem in `fsFile` (already sized). `{ok: false}` when the content does
 * not fit, so the caller grows the size and tries again.
 */
export function makeXfs(fsFile: string, proto: XfsProto, protoFile: string, label: string | undefined): { ok: true } | { ok: false; why: string } {
  fs.writeFileSync(protoFile, proto.text);
  const args = ['-q', '-f', ...(label !== undefined ? ['-L', label] : []), '-p', protoFile, fsFile];
  const r = spawnSync('mkfs.xfs', args, { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  if (r.error) throw new XfsProtoError(`making the filesystem: mkfs.xfs could not run (${r.error.message}); install xfsprogs`);
  if (r.status !== 0) {
    const text = `${r.stderr}\n${r.stdout}`;
    if (/No space left|ENOSPC|must be larger|too small|cannot reserve/i.test(text)) return { ok: false, why: lastLines(text) };
    throw new XfsProtoError(`mkfs.xfs failed (exit ${r.status}): ${lastLines(text)}`);
  }
  if (proto.modeFixes.length > 0) {
    // Expert-mode writes into the unmounted image file: the sticky bit the prototype file cannot say.
    const cmds = proto.modeFixes.flatMap((f) => ['-c', `path ${f.path}`, '-c', `write core.mode 0${f.mode.toString(8)}`]);
    const w = spawnSync('xfs_db', ['-x', ...cmds, fsFile], { encoding: 'utf8' });
    if (w.error || w.status !== 0 || /not found|no such|invalid/i.test(w.stderr)) {
      throw new XfsProtoError(`setting the sticky bit with xfs_db failed (exit ${w.status}): ${lastLines(w.stderr || w.stdout)}`);
    }
  }
  return { ok: true };
}

/** Free bytes and the UUID from the XFS superblock at byte `offset` of `file` (big-endian fields). */
export function readXfsSuperblock(file: string, offset = 0): { freeBytes: number; uuid: string } {
  const fd = fs.openSync(file, 'r');
  try {
    const sb = Buffer.alloc(512);
    fs.readSync(fd, sb, 0, 512, offset);
    if (sb.toString('latin1', 0, 4) !== 'XFSB') throw new XfsProtoError(`no XFS superblock at byte ${offset} of ${file}`);
    const blockSize = sb.readUInt32BE(4);
    const fdblocks = Number(sb.readBigUInt64BE(144));
    return { freeBytes: fdblocks * blockSize, uuid: formatUuid(sb.subarray(32, 48)) };
  } finally {
    fs.closeSync(fd);
  }
}
