/**
 * Unpacks an archive (tar or newc, already decompressed) into a directory through the
 * Sys port, as root: numeric owners, modes with setuid/setgid/sticky, times, symlinks,
 * hard links, device nodes, FIFOs and extended attributes (security.capability).
 *
 * Order per entry matters and is the kernel's, not a matter of taste:
 *   create → write data → lchown → chmod → lsetxattr → utimensat
 * chown clears setuid/setgid and drops security.capability, and writing a file drops
 * security.capability, so the mode and the xattrs come after both. Directory times are
 * set last, deepest first, since creating entries inside a directory changes its mtime.
 *
 * The archive is untrusted. Nothing is ever created or written outside `root`; an entry
 * that would need it is refused (skipped, counted in `refused`, the boot goes on):
 *  - a name or hard-link target with a ".." component ("outside");
 *  - a name or hard-link target below a symbolic link the archive made earlier: the kernel
 *    would follow it wherever it points, e.g. "data/dv -> /dev" then "data/dv/vda" would
 *    open the host's disk ("symlink"). `root` is a new, empty tmpfs, so every symbolic link
 *    in it is one the archive made, and the set below knows them all;
 *  - a hard link to a name not unpacked before it, or to a directory ("hardlink");
 *  - the root itself named as anything but a directory ("root").
 * Absolute names are unpacked relative to `root` (the readers drop the leading "/", as
 * GNU tar does). Device nodes and FIFOs are created as the archive says: a root archive
 * legitimately holds /dev/console or /dev/null, the node is only a name inside the new
 * root (the guest's own root can make any node anyway), and vdboot never writes data
 * through one: a regular file replaces an earlier entry of the same name (O_EXCL create,
 * after unlinking it), and data carried by a hard link goes only into a regular file.
 */
import { type ArchiveEntry, type ArchiveReader, hasDotDot } from '../formats/archive-stream.ts';
import { FormatError } from '../formats/block-reader.ts';
import { isSysError, O, S, type Sys } from '../sys/sys.ts';
import { mkdirs } from './fsutil.ts';

/** What the unpacker uses beyond the Sys port when the host offers it. */
export interface UnpackSys extends Sys {
  /** utimensat(AT_FDCWD, path, [atime = mtime, mtime], AT_SYMLINK_NOFOLLOW when `noFollow`) */
  utimensat?(path: string, sec: number, nsec: number, noFollow: boolean): void;
  /** lsetxattr(path, name, value, 0) */
  lsetxattr?(path: string, name: string, value: Uint8Array): void;
  /** umask(2); with it, entries are created with their final mode and most chmod calls are saved */
  umask?(mask: number): number;
}

/** createEntry's answer for an entry that already existed (a directory named again): its metadata must be set. */
const KEPT = -2;

export interface UnpackStats {
  entries: number;
  files: number;
  dirs: number;
  /** bytes of file data written */
  bytes: number;
  xattrs: number;
  /** things the person at the console should know (once each) */
  warnings: string[];
  /** entries not unpacked because they would have reached outside the root (see the top of this file) */
  refused: Refusals;
}

export type RefusalReason = 'outside' | 'symlink' | 'hardlink' | 'root';

export interface Refusals {
  total: number;
  byReason: Record<RefusalReason, number>;
  /** the first few refused entries, each with why, for the console */
  examples: string[];
}

/** How many refused entries are named one by one on the console. */
const REFUSAL_EXAMPLES = 5;

const REASON_WORDS: Record<RefusalReason, string> = {
  outside: 'outside the root',
  symlink: 'through a symbolic link',
  hardlink: 'hard links to nothing unpacked before',
  root: 'replacing the root itself',
};

/** "3 entries refused (2 outside the root, 1 through a symbolic link)", or '' when none was. */
export function refusalSummary(r: Refusals): string {
  if (r.total === 0) return '';
  const parts = (Object.keys(REASON_WORDS) as RefusalReason[]).filter((k) => r.byReason[k] > 0).map((k) => `${r.byReason[k]} ${REASON_WORDS[k]}`);
  return `${r.total} ${r.total === 1 ? 'entry' : 'entries'} refused (${parts.join(', ')})`;
}

export interface UnpackOptions {
  /** Called after every entry (and every MiB of a large file), for the progress line. */
  onProgress?: () => void;
  /** Size of the write chunks. */
  chunk?: number;
}

/** An unpack failure with the entry it happened at; the cause is kept for ENOSPC checks. */
export class UnpackError extends Error {
  constructor(message: string, readonly entry: ArchiveEntry | undefined, readonly reason: unknown) {
    super(message);
    this.name = 'UnpackError';
  }
}

const TYPE_BITS: Record<string, number> = { char: S.IFCHR, block: S.IFBLK, fifo: S.IFIFO };

export function unpackArchive(sys: UnpackSys, reader: ArchiveReader, root: string, opts: UnpackOptions = {}): UnpackStats {
  const refused: Refusals = { total: 0, byReason: { outside: 0, symlink: 0, hardlink: 0, root: 0 }, examples: [] };
  const stats: UnpackStats = { entries: 0, files: 0, dirs: 0, bytes: 0, xattrs: 0, warnings: [], refused };
  /** Skips the entry (the reader skips its body at the next header) and counts it. */
  const refuse = (entry: ArchiveEntry, reason: RefusalReason, why: string): void => {
    refused.total += 1;
    refused.byReason[reason] += 1;
    if (refused.examples.length < REFUSAL_EXAMPLES) refused.examples.push(`"${entry.path || '/'}" (${entry.type}, header at byte ${entry.offset}): ${why}`);
  };
  const chunk = opts.chunk ?? 1 << 20;
  const symlinks = new Set<string>();
  const dirTimes: { path: string; sec: number; nsec: number }[] = [];
  const canTime = typeof sys.utimensat === 'function';
  const canXattr = typeof sys.lsetxattr === 'function';
  let warnedTime = false;
  let warnedXattr = false;
  const refusedXattrs = new Set<string>();
  let safeDir = '';
  let safeLinks = 0;
  let linksMade = 0;

  // With no umask, a new entry gets exactly the mode it is created with: chmod is then needed
  // only where chown clears bits (setuid, setgid) or mkdir ignores them (setgid).
  const oldMask = typeof sys.umask === 'function' ? sys.umask(0) : undefined;
  const exactModes = oldMask !== undefined;
  // A new entry is owned by root:root, unless its directory is setgid (it then takes the directory's group).
  let setgidDirs = false;
  try {
    for (;;) {
      const entry = reader.next();
      if (!entry) break;
      stats.entries += 1;
      // Read once: every property read is a lookup in QuickJS.
      const name = entry.path;
      const type = entry.type;
      try {
        if (hasDotDot(name)) {
          refuse(entry, 'outside', 'its name has a ".." component, which could leave the root');
          continue;
        }
        if (name === '' && type !== 'dir') {
          refuse(entry, 'root', 'it names the root directory itself as a non-directory');
          continue;
        }
        // An entry below a symlink the archive created would be written wherever the link points.
        // (Entries of one directory usually follow each other: its ancestors are checked once.)
        const slash = name.lastIndexOf('/');
        const dir = slash > 0 ? name.slice(0, slash) : '';
        if (dir !== safeDir || linksMade !== safeLinks) {
          const link = linkAbove(name, symlinks);
          if (link !== undefined) {
            refuse(entry, 'symlink', `it lies under "${link}", which the archive made a symbolic link; vdboot does not write through links`);
            continue;
          }
        }
        safeDir = dir;
        safeLinks = linksMade;
        if (type === 'hardlink') {
          const why = hardLinkRefusal(sys, entry.linkTarget, entry.size, root, symlinks);
          if (why !== undefined) {
            refuse(entry, why[0], why[1]);
            continue;
          }
        }
        const path = name === '' ? root : `${root}/${name}`;
        const perm = entry.perm;
        const fd = createEntry(sys, entry, path, root, symlinks, exactModes ? perm & 0o1777 : 0o700);
        // A name made again is dropped from `symlinks` by createEntry; a hard link to a link is a link.
        if (type === 'symlink' || (type === 'hardlink' && symlinks.has(entry.linkTarget))) {
          symlinks.add(name);
          linksMade += 1;
        }
        const size = entry.size;
        if (fd >= 0 || (size > 0 && type !== 'dir')) stats.bytes += writeBody(sys, reader, fd >= 0 ? fd : openForData(sys, entry, path), size, chunk, opts.onProgress);
        if (type === 'hardlink') {
          // Data on a later name of the inode (GNU cpio) moved its time: put the archive's back.
          if (entry.size > 0 && canTime) sys.utimensat!(path, entry.mtimeSec, entry.mtimeNsec, true);
          continue; // the inode's owner, mode and times came with the first name
        }
        const fresh = fd !== KEPT && name !== '';
        const uid = entry.uid;
        const gid = entry.gid;
        if (!fresh || uid !== 0 || gid !== 0 || setgidDirs) sys.lchown(path, uid, gid);
        if (type !== 'symlink' && (!fresh || !exactModes || setgidDirs || (perm & 0o6000) !== 0)) sys.chmod(path, perm);
        if (type === 'dir' && (perm & 0o2000) !== 0) setgidDirs = true;
        if (entry.xattrs.length !== 0) {
          if (canXattr) {
            for (const x of entry.xattrs) {
              try {
                sys.lsetxattr!(path, x.name, x.value);
                stats.xattrs += 1;
              } catch (e) {
                // tmpfs takes security.* and trusted.*; user.* only on newer kernels. An attribute
                // the kernel refuses costs that attribute, not the boot.
                if (!isSysError(e)) throw e;
                const key = `${x.name}:${e.code}`;
                if (!refusedXattrs.has(key)) {
                  refusedXattrs.add(key);
                  stats.warnings.push(`the tmpfs refused extended attribute ${x.name} on "${entry.path}" (${e.code}); entries carrying it keep their other attributes`);
                }
              }
            }
          } else if (!warnedXattr) {
            warnedXattr = true;
            stats.warnings.push(`this vdboot host cannot set extended attributes: "${entry.path}" and others lose theirs (${entry.xattrs.map((x) => x.name).join(', ')})`);
          }
        }
        if (type === 'dir') {
          stats.dirs += 1;
          dirTimes.push({ path, sec: entry.mtimeSec, nsec: entry.mtimeNsec });
        } else {
          if (type === 'file') stats.files += 1;
          if (canTime) sys.utimensat!(path, entry.mtimeSec, entry.mtimeNsec, true);
          else if (!warnedTime) {
            warnedTime = true;
            stats.warnings.push('this vdboot host cannot set file times: unpacked files carry the time of the boot');
          }
        }
      } catch (e) {
        const where = `"${entry.path || '/'}" (${entry.type}, header at byte ${entry.offset} of the archive)`;
        if (e instanceof UnpackError) throw e;
        if (isSysError(e)) throw new UnpackError(`could not create ${where}: ${e.message}`, entry, e);
        throw new UnpackError(`${(e as Error).message}${(e as Error).message.includes(entry.path) ? '' : ` (at ${where})`}`, entry, e);
      }
      if ((stats.entries & 31) === 0) opts.onProgress?.();
    }
  } finally {
    if (oldMask !== undefined) sys.umask!(oldMask);
  }
  if (canTime) {
    // Deepest first, so setting a parent's time is the last change to it.
    for (let i = dirTimes.length - 1; i >= 0; i--) {
      const d = dirTimes[i]!;
      sys.utimensat!(d.path, d.sec, d.nsec, true);
    }
  }
  return stats;
}

/**
 * Opens an existing name to receive an entry's data (a hard link that carries the
 * inode's bytes). Only a regular file, and never through a symbolic link: a crafted
 * archive could otherwise hard-link a symlink or a device node and have its bytes
 * written onto /dev/sda or a host file.
 */
function openForData(sys: UnpackSys, entry: ArchiveEntry, path: string): number {
  const st = sys.lstat(path);
  if ((st.mode & S.IFMT) !== S.IFREG) {
    throw new FormatError(`entry "${entry.path}" at byte ${entry.offset} carries ${entry.size} bytes of data for a name that is not a regular file; vdboot writes data only into regular files (the archive may be malicious or damaged)`, 'type', entry.type);
  }
  return sys.open(path, O.WRONLY | O.NOFOLLOW | O.CLOEXEC, 0);
}

/**
 * Creates the entry; for a regular file returns its open fd (the body is written next),
 * else -1, or KEPT for a directory that was there already.
 */
function createEntry(sys: UnpackSys, entry: ArchiveEntry, path: string, root: string, symlinks: Set<string>, mode: number): number {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return makeEntry(sys, entry, path, root, mode);
    } catch (e) {
      if (attempt >= 2) throw e;
      if (isSysError(e, 'ENOENT')) {
        // Archives may leave parent directories out (tar of single files): create them.
        const parent = path.slice(0, path.lastIndexOf('/'));
        mkdirs(sys, parent, 0o755);
        continue;
      }
      if (isSysError(e, 'EEXIST')) {
        const st = sys.lstat(path);
        const isDir = (st.mode & S.IFMT) === S.IFDIR;
        if (entry.type === 'dir' && isDir) return KEPT; // a directory named twice, or made for a child first: keep it
        // A later member replaces an earlier one with the same name, as tar does.
        if (isDir) sys.rmdir(path);
        else sys.unlink(path);
        symlinks.delete(entry.path);
        continue;
      }
      throw e;
    }
  }
}

/** Makes the entry's inode; a regular file's open fd is returned for its body, else -1 (KEPT for the root). */
function makeEntry(sys: UnpackSys, entry: ArchiveEntry, path: string, root: string, mode: number): number {
  switch (entry.type) {
    case 'file':
      return sys.open(path, O.WRONLY | O.CREAT | O.EXCL | O.CLOEXEC, mode & 0o777);
    case 'dir':
      if (entry.path === '') return KEPT; // the root itself: metadata only
      sys.mkdir(path, mode);
      return -1;
    case 'symlink':
      sys.symlink(entry.linkTarget, path);
      return -1;
    case 'hardlink':
      sys.link(`${root}/${entry.linkTarget}`, path);
      return -1;
    case 'char':
    case 'block':
    case 'fifo':
      sys.mknod(path, TYPE_BITS[entry.type]! | (mode & 0o777), entry.devMajor, entry.devMinor);
      return -1;
  }
}

/** The first ancestor of `name` that the archive made a symbolic link, if any. */
function linkAbove(name: string, symlinks: Set<string>): string | undefined {
  for (let i = name.indexOf('/'); i > 0; i = name.indexOf('/', i + 1)) {
    const parent = name.slice(0, i);
    if (symlinks.has(parent)) return parent;
  }
  return undefined;
}

/**
 * Why a hard link to `target` may not be made, or undefined when it may: the target must be
 * a name unpacked before it, inside the root without ".." or a symbolic link on the way
 * (link(2) follows the links of the target's directories), and not a directory; and when the
 * entry carries data, a regular file (data for a link to a symbolic link or a device node
 * would be written wherever it points).
 */
function hardLinkRefusal(sys: Sys, target: string, size: number, root: string, symlinks: Set<string>): [RefusalReason, string] | undefined {
  if (hasDotDot(target)) return ['outside', `it is a hard link to "${target}", whose ".." could leave the root`];
  const link = linkAbove(target, symlinks);
  if (link !== undefined) return ['symlink', `it is a hard link to "${target}", which lies under "${link}", a symbolic link the archive made`];
  let mode: number;
  try {
    mode = sys.lstat(`${root}/${target}`).mode & S.IFMT;
  } catch (e) {
    if (!isSysError(e, 'ENOENT') && !isSysError(e, 'ENOTDIR')) throw e;
    return ['hardlink', `it is a hard link to "${target}", which the archive did not hold before it`];
  }
  if (mode === S.IFDIR) return ['hardlink', `it is a hard link to "${target}", a directory`];
  if (size > 0 && mode !== S.IFREG) {
    const what = mode === S.IFLNK ? 'a symbolic link' : 'not a regular file';
    return [mode === S.IFLNK ? 'symlink' : 'hardlink', `it carries ${size} bytes of data for a hard link to "${target}", ${what}; vdboot writes data only into regular files`];
  }
  return undefined;
}

/**
 * Writes the entry's body into `fd` (a new file, or the inode a hard link shares) and
 * closes it. What the reader already holds in memory is written from there; the rest
 * goes straight from the archive into the file inside the kernel when the source can.
 */
function writeBody(sys: Sys, reader: ArchiveReader, fd: number, size: number, chunk: number, onProgress?: () => void): number {
  let written = 0;
  const direct = reader.bodyTo !== undefined;
  try {
    while (written < size) {
      let k = direct ? reader.bodyTo!(fd, chunk) : 0;
      if (k === 0) {
        const b = reader.body(chunk);
        k = b.length;
        if (k === 0) break;
        let off = 0;
        while (off < k) off += sys.write(fd, off === 0 ? b : b.subarray(off));
      }
      written += k;
      if (written % (4 << 20) < k) onProgress?.();
    }
  } finally {
    sys.close(fd);
  }
  return written;
}
