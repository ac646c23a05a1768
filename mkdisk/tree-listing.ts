/**
 * A source tree as the filesystem builders that take a list (mkfs.xfs's prototype file) or
 * need fixing afterwards (mkfs.btrfs's device numbers) see it: every entry's type, owner,
 * mode, inode, link count, size, symlink target and device numbers.
 *
 * It is read with GNU find (and stat for device numbers), not Node's lstat, because an
 * unpacked archive's owners and device nodes exist only in fakeroot's state: find and stat
 * run under `fakeroot -i STATE` and see them, while Node's stat calls bypass fakeroot's
 * library. Records are NUL-separated, so any byte a name may hold survives.
 */
import { spawnSync } from 'node:child_process';

export type EntryType = 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket';

export interface TreeEntry {
  /** relative to the tree's root; '' is the root itself */
  path: string;
  type: EntryType;
  /** permission bits with setuid, setgid and sticky (07777) */
  mode: number;
  uid: number;
  gid: number;
  ino: number;
  nlink: number;
  size: number;
  /** a symlink's target */
  target?: string;
  /** a device node's numbers */
  major?: number;
  minor?: number;
}

const TYPES: Record<string, EntryType> = { f: 'file', d: 'dir', l: 'symlink', c: 'char', b: 'block', p: 'fifo', s: 'socket' };

function runTool(cmd: string, args: string[], fakerootState: string | undefined): string {
  const [c, a] = fakerootState ? ['fakeroot', ['-i', fakerootState, '--', cmd, ...args]] : [cmd, args];
  const r = spawnSync(c, a, { encoding: 'latin1', maxBuffer: 1024 * 1024 * 1024, env: { ...process.env, LC_ALL: 'C' } });
  if (r.error) throw new Error(`listing the source: ${c} could not run (${r.error.message})`);
  if (r.status !== 0) throw new Error(`listing the source: ${cmd} failed (exit ${r.status}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** Text read as latin1 (bytes kept one per char) back to the UTF-8 string Node uses for names. */
function fromBytes(s: string): string {
  return Buffer.from(s, 'latin1').toString('utf8');
}

/** Every entry of `dir`, the root first, parents before their children. */
export function listTree(dir: string, fakerootState?: string): TreeEntry[] {
  const out = runTool('find', [dir, '-printf', '%y %U %G %m %i %n %s\\0%P\\0%l\\0'], fakerootState);
  const parts = out.split('\0');
  const entries: TreeEntry[] = [];
  const devices: TreeEntry[] = [];
  for (let i = 0; i + 2 < parts.length; i += 3) {
    const [y, uid, gid, mode, ino, nlink, size] = parts[i]!.split(' ');
    const type = TYPES[y!];
    if (!type) throw new Error(`listing the source: ${fromBytes(parts[i + 1]!)} has a file type find calls "${y}"`);
    const e: TreeEntry = {
      path: fromBytes(parts[i + 1]!), type, mode: parseInt(mode!, 8), uid: Number(uid), gid: Number(gid),
      ino: Number(ino), nlink: Number(nlink), size: Number(size),
    };
    if (type === 'symlink') e.target = fromBytes(parts[i + 2]!);
    if (type === 'char' || type === 'block') devices.push(e);
    entries.push(e);
  }
  if (devices.length > 0) {
    // stat's %t/%T: major and minor in hex, one line per device (names given as arguments, not parsed back)
    const text = runTool('stat', ['--printf', '%t %T\\n', ...devices.map((d) => `${dir}/${d.path}`)], fakerootState);
    const lines = text.split('\n');
    devices.forEach((d, k) => {
      const [maj, min] = (lines[k] ?? '').split(' ');
      d.major = parseInt(maj ?? '', 16);
      d.minor = parseInt(min ?? '', 16);
      if (!Number.isInteger(d.major) || !Number.isInteger(d.minor)) throw new Error(`listing the source: no device numbers for ${d.path}`);
    });
  }
  return entries;
}

/** The last lines of a builder tool's output, joined for an error message. */
export function lastLines(text: string, count = 3): string {
  return text.trim().split('\n').filter(Boolean).slice(-count).join('; ');
}
