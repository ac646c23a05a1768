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
 * Every entry is made by its last component from an open descriptor of the directory it
 * goes in (openat, mkdirat, symlinkat, linkat, mknodat, fchownat, utimensat …), not by a
 * path the kernel walks again from "/" at every call: entries of one directory follow each
 * other, so its descriptor is opened once and kept (a few dozen are kept open).
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
 * Beyond the archive's own symbolic links, which the unpacker tracks, the kernel checks
 * too: a directory is opened from the root's descriptor by openat2 with RESOLVE_BENEATH and
 * RESOLVE_NO_SYMLINKS, so no symbolic link and no ".." is followed on the way to it,
 * whatever the tracking missed (on kernels without openat2, each component is checked
 * not to be a link before it is opened); a hard link's target is reached the same way.
 * Absolute names are unpacked relative to `root` (the readers drop the leading "/", as
 * GNU tar does). Device nodes and FIFOs are created as the archive says: a root archive
 * legitimately holds /dev/console or /dev/null, the node is only a name inside the new
 * root (the guest's own root can make any node anyway), and vdboot never writes data
 * through one: a regular file replaces an earlier entry of the same name (O_EXCL create,
 * after unlinking it), and data carried by a hard link goes only into a regular file.
 */
import { type ArchiveEntry, type ArchiveReader, hasDotDot } from '../formats/archive-stream.ts';
import { FormatError } from '../formats/block-reader.ts';
import { AT, type AtSys, isSysError, O, RESOLVE, S, type Sys, SysError } from '../sys/sys.ts';

/** What the unpacker uses beyond the Sys port: the *at calls, and the rest when the host offers it. */
export interface UnpackSys extends Sys, AtSys {
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

/** An entry the kernel would not reach from the root without a link or a "..": refused, not a failure. */
class Refused {
  constructor(readonly reason: RefusalReason, readonly why: string) {}
}

const TYPE_BITS: Record<string, number> = { char: S.IFCHR, block: S.IFBLK, fifo: S.IFIFO };
/** A directory descriptor used only to resolve names from: nothing is read through it. */
const DIR_FLAGS = O.PATH | O.DIRECTORY | O.CLOEXEC;
const BENEATH = RESOLVE.BENEATH | RESOLVE.NO_SYMLINKS | RESOLVE.NO_MAGICLINKS;
/** How many directory descriptors stay open (checked every 32 entries; an entry opens two at most). */
const MAX_DIR_FDS = 48;
const FILE_FLAGS = O.WRONLY | O.CREAT | O.EXCL | O.CLOEXEC;

/**
 * Open descriptors of the root's directories, by archive path ('' is the root). A
 * directory is opened from the root's descriptor without following any symbolic link
 * (see the top of the file), and made first, with its missing parents, when asked to.
 */
class DirFds {
  private readonly fds = new Map<string, number>();
  /** The last directory asked for, and its descriptor: entries of one directory follow each other. */
  private lastDir = '';
  private lastFd: number;
  private openat2 = true;

  constructor(private readonly sys: UnpackSys, readonly rootFd: number) {
    this.lastFd = rootFd;
    this.fds.set('', rootFd);
  }

  /** The descriptor of `dir` (no leading or trailing "/"); its missing directories made (0o755) when `create`. */
  get(dir: string, create: boolean): number {
    if (dir === this.lastDir) return this.lastFd;
    let fd = this.fds.get(dir);
    if (fd === undefined) {
      fd = this.open(dir, create);
      this.fds.set(dir, fd);
    }
    this.lastDir = dir;
    this.lastFd = fd;
    return fd;
  }

  private open(dir: string, create: boolean): number {
    try {
      return this.resolve(this.rootFd, dir);
    } catch (e) {
      if (e instanceof Refused || !create || !isSysError(e, 'ENOENT')) throw e;
    }
    // Archives may leave parent directories out (tar of single files): make the missing
    // ones from the root down, each from the one above it, holding two descriptors at most.
    let fd = this.rootFd;
    try {
      for (let at = 0; ;) {
        const slash = dir.indexOf('/', at);
        const name = slash < 0 ? dir.slice(at) : dir.slice(at, slash);
        try {
          this.sys.mkdirat(fd, name, 0o755);
        } catch (e) {
          if (!isSysError(e, 'EEXIST')) throw e;
        }
        const next = this.resolve(fd, name, dir);
        if (fd !== this.rootFd) this.sys.close(fd);
        fd = next;
        if (slash < 0) return fd;
        at = slash + 1;
      }
    } catch (e) {
      if (fd !== this.rootFd) this.sys.close(fd);
      throw e;
    }
  }

  /** Opens `path` from the directory `from`: no ".." and no symbolic link on the way, the kernel checks it. */
  private resolve(from: number, path: string, whole = path): number {
    const sys = this.sys;
    if (this.openat2) {
      try {
        return sys.openat2(from, path, DIR_FLAGS, 0, BENEATH);
      } catch (e) {
        if (isSysError(e, 'ELOOP')) throw new Refused('symlink', `the way to "${whole}" passes a symbolic link; vdboot does not write through links`);
        if (isSysError(e, 'EXDEV')) throw new Refused('outside', `the way to "${whole}" leaves the root`);
        if (!isSysError(e, 'ENOSYS') && !isSysError(e, 'EPERM')) throw e;
        this.openat2 = false; // Linux before 5.6 (EPERM: a seccomp filter that does not know it)
      }
    }
    // Component by component, each checked to be a directory and not a link before it is opened.
    let fd = from;
    let at = 0;
    try {
      for (;;) {
        const slash = path.indexOf('/', at);
        const name = slash < 0 ? path.slice(at) : path.slice(at, slash);
        if (name === '..') throw new Refused('outside', `the way to "${whole}" leaves the root`);
        const type = sys.fstatat(fd, name, AT.SYMLINK_NOFOLLOW).mode & S.IFMT;
        if (type === S.IFLNK) throw new Refused('symlink', `the way to "${whole}" passes a symbolic link; vdboot does not write through links`);
        if (type !== S.IFDIR) throw new SysError('ENOTDIR', 20, `openat ${whole}`);
        const next = sys.openat(fd, name, DIR_FLAGS);
        if (fd !== from) sys.close(fd);
        fd = next;
        if (slash < 0) return fd;
        at = slash + 1;
      }
    } catch (e) {
      if (fd !== from) sys.close(fd);
      throw e;
    }
  }

  /** Closes the descriptors of `dir` and of the directories below it: it was removed, they name nothing now. */
  forget(dir: string): void {
    const below = `${dir}/`;
    for (const [d, fd] of this.fds) {
      if (d !== dir && !d.startsWith(below)) continue;
      this.sys.close(fd);
      this.fds.delete(d);
    }
    if (this.lastDir === dir || this.lastDir.startsWith(below)) {
      this.lastDir = '';
      this.lastFd = this.rootFd;
    }
  }

  /** Closes every descriptor when too many are open (`all`: at the end). Called between entries, when none is in use. */
  trim(all: boolean): void {
    if (!all && this.fds.size <= MAX_DIR_FDS) return;
    for (const fd of this.fds.values()) if (fd !== this.rootFd) this.sys.close(fd);
    this.fds.clear();
    this.fds.set('', this.rootFd);
    this.lastDir = '';
    this.lastFd = this.rootFd;
  }
}

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
  const dirTimes: { dir: string; base: string; sec: number; nsec: number }[] = [];
  const canXattr = typeof sys.lsetxattr === 'function';
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
  let rootFd: number;
  try {
    rootFd = sys.open(root, DIR_FLAGS);
  } catch (e) {
    if (oldMask !== undefined) sys.umask!(oldMask);
    throw new UnpackError(`could not open the new root ${root}: ${(e as Error).message}`, undefined, e);
  }
  const dirs = new DirFds(sys, rootFd);
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
        let linkFrom: LinkSource | undefined;
        if (type === 'hardlink') {
          const found = hardLinkSource(sys, dirs, entry.linkTarget, entry.size, symlinks);
          if (found instanceof Refused) {
            refuse(entry, found.reason, found.why);
            continue;
          }
          linkFrom = found;
        }
        // Where the entry is made: its name in its directory's descriptor (the root itself by its path).
        let dfd: number;
        try {
          dfd = name === '' ? AT.FDCWD : dirs.get(dir, true);
        } catch (e) {
          if (!(e instanceof Refused)) throw e;
          refuse(entry, e.reason, e.why);
          continue;
        }
        const base = name === '' ? root : slash > 0 ? name.slice(slash + 1) : name;
        const perm = entry.perm;
        const fd = createEntry(sys, dirs, entry, dfd, base, linkFrom, symlinks, exactModes ? perm & 0o1777 : 0o700);
        // A name made again is dropped from `symlinks` by createEntry; a hard link to a link is a link.
        if (type === 'symlink' || (type === 'hardlink' && symlinks.has(entry.linkTarget))) {
          symlinks.add(name);
          linksMade += 1;
        }
        const size = entry.size;
        if (fd >= 0 || (size > 0 && type !== 'dir')) stats.bytes += writeBody(sys, reader, fd >= 0 ? fd : openForData(sys, entry, dfd, base), size, chunk, opts.onProgress);
        if (type === 'hardlink') {
          // Data on a later name of the inode (GNU cpio) moved its time: put the archive's back.
          if (entry.size > 0) sys.utimensatAt(dfd, base, entry.mtimeSec, entry.mtimeNsec, AT.SYMLINK_NOFOLLOW);
          continue; // the inode's owner, mode and times came with the first name
        }
        const fresh = fd !== KEPT && name !== '';
        const uid = entry.uid;
        const gid = entry.gid;
        if (!fresh || uid !== 0 || gid !== 0 || setgidDirs) sys.fchownat(dfd, base, uid, gid, AT.SYMLINK_NOFOLLOW);
        if (type !== 'symlink' && (!fresh || !exactModes || setgidDirs || (perm & 0o6000) !== 0)) sys.fchmodat(dfd, base, perm);
        if (type === 'dir' && (perm & 0o2000) !== 0) setgidDirs = true;
        if (entry.xattrs.length !== 0) {
          if (canXattr) {
            // By path: Linux has no lsetxattr relative to a directory. The path holds no link
            // (its directory was reached without one) and nothing else changes the tree.
            const path = name === '' ? root : `${root}/${name}`;
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
          dirTimes.push({ dir, base: name === '' ? '' : base, sec: entry.mtimeSec, nsec: entry.mtimeNsec });
        } else {
          if (type === 'file') stats.files += 1;
          sys.utimensatAt(dfd, base, entry.mtimeSec, entry.mtimeNsec, AT.SYMLINK_NOFOLLOW);
        }
      } catch (e) {
        const where = `"${entry.path || '/'}" (${entry.type}, header at byte ${entry.offset} of the archive)`;
        if (e instanceof UnpackError) throw e;
        if (isSysError(e)) throw new UnpackError(`could not create ${where}: ${e.message}`, entry, e);
        throw new UnpackError(`${(e as Error).message}${(e as Error).message.includes(entry.path) ? '' : ` (at ${where})`}`, entry, e);
      }
      if ((stats.entries & 31) === 0) {
        opts.onProgress?.();
        dirs.trim(false);
      }
    }
    // Deepest first, so setting a parent's time is the last change to it. A directory
    // replaced since (by a later member of its name) is skipped, not followed.
    for (let i = dirTimes.length - 1; i >= 0; i--) {
      const d = dirTimes[i]!;
      if (d.base === '') {
        sys.utimensatAt(AT.FDCWD, root, d.sec, d.nsec, AT.SYMLINK_NOFOLLOW);
        continue;
      }
      let dfd: number;
      try {
        dfd = dirs.get(d.dir, false);
      } catch (e) {
        if (e instanceof Refused || isSysError(e, 'ENOENT') || isSysError(e, 'ENOTDIR')) continue;
        throw e;
      }
      sys.utimensatAt(dfd, d.base, d.sec, d.nsec, AT.SYMLINK_NOFOLLOW);
      dirs.trim(false);
    }
  } finally {
    dirs.trim(true);
    sys.close(dirs.rootFd);
    if (oldMask !== undefined) sys.umask!(oldMask);
  }
  return stats;
}

/**
 * Opens an existing name to receive an entry's data (a hard link that carries the
 * inode's bytes). Only a regular file, and never through a symbolic link: a crafted
 * archive could otherwise hard-link a symlink or a device node and have its bytes
 * written onto /dev/sda or a host file.
 */
function openForData(sys: UnpackSys, entry: ArchiveEntry, dfd: number, base: string): number {
  const st = sys.fstatat(dfd, base, AT.SYMLINK_NOFOLLOW);
  if ((st.mode & S.IFMT) !== S.IFREG) {
    throw new FormatError(`entry "${entry.path}" at byte ${entry.offset} carries ${entry.size} bytes of data for a name that is not a regular file; vdboot writes data only into regular files (the archive may be malicious or damaged)`, 'type', entry.type);
  }
  return sys.openat(dfd, base, O.WRONLY | O.NOFOLLOW | O.CLOEXEC, 0);
}

/**
 * Creates the entry as `base` in the directory `dfd`; for a regular file returns its open
 * fd (the body is written next), else -1, or KEPT for a directory that was there already.
 */
function createEntry(sys: UnpackSys, dirs: DirFds, entry: ArchiveEntry, dfd: number, base: string, linkFrom: LinkSource | undefined, symlinks: Set<string>, mode: number): number {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return makeEntry(sys, entry, dfd, base, linkFrom, mode);
    } catch (e) {
      if (attempt >= 1 || !isSysError(e, 'EEXIST')) throw e;
      const isDir = (sys.fstatat(dfd, base, AT.SYMLINK_NOFOLLOW).mode & S.IFMT) === S.IFDIR;
      if (entry.type === 'dir' && isDir) return KEPT; // a directory named twice, or made for a child first: keep it
      // A later member replaces an earlier one with the same name, as tar does.
      sys.unlinkat(dfd, base, isDir ? AT.REMOVEDIR : 0);
      if (isDir) dirs.forget(entry.path); // the entry's own directory (its parent) stays open
      symlinks.delete(entry.path);
    }
  }
}

/** Makes the entry's inode; a regular file's open fd is returned for its body, else -1 (KEPT for the root). */
function makeEntry(sys: UnpackSys, entry: ArchiveEntry, dfd: number, base: string, linkFrom: LinkSource | undefined, mode: number): number {
  switch (entry.type) {
    case 'file':
      return sys.openat(dfd, base, FILE_FLAGS, mode & 0o777);
    case 'dir':
      if (entry.path === '') return KEPT; // the root itself: metadata only
      sys.mkdirat(dfd, base, mode);
      return -1;
    case 'symlink':
      sys.symlinkat(entry.linkTarget, dfd, base);
      return -1;
    case 'hardlink':
      sys.linkat(linkFrom!.dfd, linkFrom!.base, dfd, base, 0);
      return -1;
    case 'char':
    case 'block':
    case 'fifo':
      sys.mknodat(dfd, base, TYPE_BITS[entry.type]! | (mode & 0o777), entry.devMajor, entry.devMinor);
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

/** A hard link's target: its name in its directory's descriptor. */
interface LinkSource {
  dfd: number;
  base: string;
}

/**
 * Where a hard link to `target` links from, or why it may not be made: the target must be
 * a name unpacked before it, inside the root without ".." or a symbolic link on the way
 * (its directory is reached as every other, see DirFds), and not a directory; and when
 * the entry carries data, a regular file (data for a link to a symbolic link or a device
 * node would be written wherever it points).
 */
function hardLinkSource(sys: UnpackSys, dirs: DirFds, target: string, size: number, symlinks: Set<string>): LinkSource | Refused {
  if (hasDotDot(target)) return new Refused('outside', `it is a hard link to "${target}", whose ".." could leave the root`);
  const link = linkAbove(target, symlinks);
  if (link !== undefined) return new Refused('symlink', `it is a hard link to "${target}", which lies under "${link}", a symbolic link the archive made`);
  const slash = target.lastIndexOf('/');
  const base = target.slice(slash + 1);
  let dfd: number;
  let mode: number;
  try {
    dfd = dirs.get(slash > 0 ? target.slice(0, slash) : '', false);
    mode = sys.fstatat(dfd, base, AT.SYMLINK_NOFOLLOW).mode & S.IFMT;
  } catch (e) {
    if (e instanceof Refused) return new Refused(e.reason, `it is a hard link to "${target}": ${e.why}`);
    if (!isSysError(e, 'ENOENT') && !isSysError(e, 'ENOTDIR')) throw e;
    return new Refused('hardlink', `it is a hard link to "${target}", which the archive did not hold before it`);
  }
  if (mode === S.IFDIR) return new Refused('hardlink', `it is a hard link to "${target}", a directory`);
  if (size > 0 && mode !== S.IFREG) {
    const what = mode === S.IFLNK ? 'a symbolic link' : 'not a regular file';
    return new Refused(mode === S.IFLNK ? 'symlink' : 'hardlink', `it carries ${size} bytes of data for a hard link to "${target}", ${what}; vdboot writes data only into regular files`);
  }
  return { dfd, base };
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
      // What the reader holds in memory first (a small file's whole body), then kernel-side.
      let k = direct && written !== 0 ? reader.bodyTo!(fd, chunk) : 0;
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
