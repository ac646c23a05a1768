/**
 * A simulated kernel behind the Sys port, for simulation tests: an in-memory tree with
 * mounts, procfs/sysfs/devtmpfs generated from a machine description (disks with real
 * bytes, partitions, device modaliases), finit_module, spawn and execve recorded.
 * The simulation ends at execve (the guest's init) or when the rescue shell is waited
 * for more often than the machine allows: both throw SimulationEnd.
 */
import { AT, type AtSys, O, RESOLVE, S, SysError, type PollFd, type Stat, type StatFs, type Sys, type WaitResult } from './sys.ts';

export interface FakePartition {
  /** kernel name, e.g. "vda1" */
  name: string;
  number: number;
  /** bytes from the disk's start */
  start: number;
  size: number;
}

export interface FakeDisk {
  /** kernel name, e.g. "vda" */
  name: string;
  bytes: Uint8Array;
  major: number;
  minor: number;
  partitions?: FakePartition[];
  /** the modalias of the controller that brings this disk (its module must load before the disk appears) */
  needsModule?: string;
  /** appears this many simulated ms after its module loaded (a USB disk) */
  appearsAfterMs?: number;
  /** its node refuses to open (ENXIO) for this many simulated ms after it appeared, as 6.12's virtio_blk under emulation */
  openableAfterMs?: number;
  /** the filesystem tree a mount of this disk (or of a partition by name) shows */
  trees?: Record<string, FakeTree>;
}

/** A directory tree: path → file content (string), or a symlink / special entry. */
export type FakeTree = Record<string, string | { symlink: string } | { mode: number; content?: string } | { dir: true } | { bytes: Uint8Array }>;

export interface FakeMachine {
  cmdline: string;
  argv?: string[];
  disks: FakeDisk[];
  /** modalias strings of devices on the "pci" bus, keyed by a device id */
  pciDevices?: Record<string, string>;
  /** the initramfs contents (the manifest, module files, /bin/sh …) */
  initramfs: FakeTree;
  /** how many rescue shells may run and exit before the simulation ends (rd.break tests) */
  shellExits?: number;
  /** modules whose finit_module fails, with the errno name */
  moduleErrors?: Record<string, string>;
  /**
   * The module compressions finit_module decompresses with MODULE_INIT_COMPRESSED_FILE
   * (CONFIG_MODULE_DECOMPRESS and the format it was built for); default none. As the real
   * kernel: that flag on a kernel without it is EOPNOTSUPP, on another format or a plain
   * module EINVAL; a compressed module without it is ENOEXEC (no ELF header).
   */
  moduleDecompress?: Array<'xz' | 'zst' | 'gz'>;
  /**
   * Programs a spawn with `stdio` runs, by name (busybox's applet when the path is
   * busybox): stdin's bytes in, stdout's bytes and the exit status out.
   */
  programs?: Record<string, (stdin: Uint8Array, argv: string[], kernel: FakeKernel) => { stdout: Uint8Array; exitCode: number }>;
  /**
   * dm-crypt: what a `crypt` target's device reads as once decrypted, by the device its
   * table names ("/dev/vda1"); a crypt target on any other device fails to load (EINVAL,
   * as a wrong key or cipher would leave it unreadable). Without it, any well-formed crypt
   * table loads.
   */
  cryptPlaintext?: Record<string, Uint8Array>;
  /**
   * What the person at the console types. As a list of lines: reads of /dev/console return
   * it line by line (end of input after the last), TCGETS/TCSETS work and
   * `events.consoleReads` records whether echo was on for each line read. As one string:
   * fd 0 and /dev/console read it as a terminal in canonical mode, a line per read at most.
   */
  consoleInput?: string | string[];
  /**
   * The filesystem tree a mount of a device-mapper device shows, by dm name ("vdisk0p2",
   * "vdhost"). The mount also checks that the device's bytes start with an ext or NTFS
   * superblock, so a wrong table fails the mount as the kernel would.
   */
  deviceTrees?: Record<string, FakeTree>;
  /** RAM in KiB (/proc/meminfo's MemTotal); default 1 GiB */
  memKiB?: number;
  /** the running kernel's release (/proc/sys/kernel/osrelease); default "sim" */
  kernelRelease?: string;
  /** kexec_file_load fails with this errno name (EPERM, EKEYREJECTED, ENOEXEC, ENOSYS …) */
  kexecError?: string;
  /**
   * What syscalls cost in simulated time (the clock advances by it at each call, as a
   * real kernel's work would): tests of the boot timings. Default 0: only sleeps and
   * polls move the clock.
   */
  syscallMs?: { finitModule?: number; mount?: number };
}

/** One device-mapper target as the simulated kernel received it. */
export interface FakeDmTarget {
  start: number;
  length: number;
  type: string;
  params: string;
}

export type FakeDmEvent =
  | { op: 'create'; name: string; uuid: string }
  | { op: 'load'; name: string; targets: FakeDmTarget[]; readOnly: boolean }
  | { op: 'resume' | 'suspend' | 'remove'; name: string };

export type FakeLoopEvent =
  | { op: 'attach'; device: string; file: string; readOnly: boolean; offset: number; sizeLimit: number }
  | { op: 'detach'; device: string };

interface FakeDm {
  name: string;
  uuid: string;
  minor: number;
  live?: { targets: FakeDmTarget[]; readOnly: boolean };
  inactive?: { targets: FakeDmTarget[]; readOnly: boolean };
  suspended: boolean;
}

interface FakeLoop {
  n: number;
  node?: Node;
  file?: string;
  offset: number;
  sizeLimit: number;
  readOnly: boolean;
}

const DM_MAJOR = 253;
const LOOP_MAJOR = 7;
/** _IOR(0x94, 39, struct btrfs_ioctl_vol_args) */
const BTRFS_IOC_DEVICES_READY = ((2 << 30) | (4096 << 16) | (0x94 << 8) | 39) >>> 0;

export class SimulationEnd extends Error {
  constructor(readonly reason: 'exec' | 'shell' | 'reboot' | 'exit' | 'stuck', detail: string) {
    super(`simulation ended: ${reason} ${detail}`);
    this.name = 'SimulationEnd';
  }
}

/** What an inode carries beyond its kind (set by chown, utimensat, setxattr; 0 and none by default). */
interface NodeMeta {
  uid?: number;
  gid?: number;
  mtimeSec?: number;
  mtimeNsec?: number;
  xattrs?: Map<string, Uint8Array>;
}

type Node = NodeMeta & (
  | { kind: 'dir'; mode: number; fs: number; entries: Map<string, Node>; mounted?: Node[] }
  | { kind: 'file'; mode: number; fs: number; data: Uint8Array | (() => Uint8Array) }
  | { kind: 'link'; mode: number; fs: number; target: string }
  // a FIFO is a 'chr' node whose mode says S.IFIFO
  | { kind: 'blk' | 'chr'; mode: number; fs: number; major: number; minor: number });

/** Inode numbers, given on first stat: names of one inode (hard links) share theirs. */
const inodeNumbers = new WeakMap<object, number>();
let nextInode = 2;

interface OpenFile {
  node: Node;
  path: string;
  flags: number;
  pos: number;
}

const ERRNO: Record<string, number> = { EPERM: 1, ETXTBSY: 26, EOPNOTSUPP: 95, ENOEXEC: 8, EKEYREJECTED: 129, ENXIO: 6, EACCES: 13, ENOTTY: 25, ENOENT: 2, EIO: 5, EBADF: 9, EAGAIN: 11, EEXIST: 17, ENOTDIR: 20, EISDIR: 21, EINVAL: 22, ENODEV: 19, EBUSY: 16, ENOTEMPTY: 39, ELOOP: 40, ENOSYS: 38, ECHILD: 10, ENOTBLK: 15, EFAULT: 14 };

function fail(code: string, call: string): never {
  throw new SysError(code, ERRNO[code] ?? 0, call);
}

const enc = (s: string): Uint8Array => {
  const out: number[] = [];
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
  }
  return Uint8Array.from(out);
};

export interface FakeEvents {
  mounts: { source: string; target: string; fstype: string; flags: number; data: string }[];
  modules: string[];
  /** every finit_module that loaded a module: its flags, and what the fd was (a file in the tree, or a memfd) */
  moduleLoads: { name: string; flags: number; from: 'file' | 'memfd'; bytes: Uint8Array }[];
  spawns: { path: string; argv: string[] }[];
  /** each line read from /dev/console, and whether the terminal echoed it (ECHO in c_lflag) */
  consoleReads: { line: string; echo: boolean }[];
  /** the exec that ended the simulation, and the device whose filesystem was / then */
  exec?: { path: string; argv: string[]; envp: string[]; rootDevice: string };
  rebooted?: number;
  /** device-mapper ioctls in the order they were made */
  dm: FakeDmEvent[];
  /** loop devices attached and detached */
  loops: FakeLoopEvent[];
  /** umount2 targets, in order */
  umounts: string[];
  /** BTRFS_IOC_DEVICES_READY calls on /dev/btrfs-control: the path, and whether its filesystem then had every member */
  btrfsReady: { path: string; ready: boolean }[];
  /** what kexec_file_load was given: the kernel file's path and bytes, the initramfs's bytes */
  kexec?: { kernelPath: string; kernel: Uint8Array; initrd?: Uint8Array; cmdline: string; flags: number };
}

let fsCounter = 1;

export class FakeKernel implements Sys, AtSys {
  readonly events: FakeEvents = { mounts: [], modules: [], moduleLoads: [], spawns: [], consoleReads: [], dm: [], loops: [], umounts: [], btrfsReady: [] };
  /** the console's termios as TCSETS last set it (kernel struct termios, 36 bytes); echo on at start */
  private termios: Uint8Array = (() => { const t = new Uint8Array(36); new DataView(t.buffer).setUint32(12, 0o10 | 0o2, true); return t; })();
  private readonly consoleBytes: number[] = [];

  private resumeNode: Node | undefined;

  /** What was written to /sys/power/resume (resume=), or undefined when nothing was. */
  get sysPowerResume(): string | undefined {
    const n = this.resumeNode;
    if (!n || n.kind !== 'file' || typeof n.data === 'function' || n.data.length === 0) return undefined;
    return decodeUtf8(n.data);
  }

  /** Everything written to the console (fds 1 and 2), as text. */
  get consoleText(): string {
    let s = '';
    for (const b of this.consoleBytes) s += String.fromCharCode(b);
    try {
      return decodeURIComponent(escape(s));
    } catch {
      return s;
    }
  }
  private root: Node;
  private cwd = '/';
  private clock = 0;
  private readonly fds = new Map<number, OpenFile>();
  private nextFd = 3;
  private shellRuns = 0;
  /** exit statuses of programs that ran to completion at their spawn (waitpid returns them) */
  private readonly finished = new Map<number, number>();
  private readonly loadedAt = new Map<string, number>();
  private readonly pending: string[] = [];
  private readonly ueventFds = new Set<number>();
  private readonly initramfsFs: number;
  /** which device each mounted disk filesystem came from */
  private readonly deviceOfFs = new Map<Node, string>();

  constructor(readonly machine: FakeMachine) {
    this.initramfsFs = fsCounter++;
    this.root = this.buildTree(machine.initramfs, this.initramfsFs);
  }

  // ---------------------------------------------------------------- trees

  private buildTree(tree: FakeTree, fs: number): Node {
    const root: Node = { kind: 'dir', mode: S.IFDIR | 0o755, fs, entries: new Map() };
    for (const [path, v] of Object.entries(tree)) {
      const parts = path.split('/').filter(Boolean);
      let dir = root as Extract<Node, { kind: 'dir' }>;
      for (const p of parts.slice(0, -1)) {
        let next = dir.entries.get(p);
        if (!next) dir.entries.set(p, (next = { kind: 'dir', mode: S.IFDIR | 0o755, fs, entries: new Map() }));
        if (next.kind !== 'dir') throw new Error(`fake tree: ${path} under a non-directory`);
        dir = next;
      }
      const name = parts[parts.length - 1]!;
      if (typeof v === 'string') dir.entries.set(name, { kind: 'file', mode: S.IFREG | 0o644, fs, data: enc(v) });
      else if ('symlink' in v) dir.entries.set(name, { kind: 'link', mode: S.IFLNK | 0o777, fs, target: v.symlink });
      else if ('bytes' in v) dir.entries.set(name, { kind: 'file', mode: S.IFREG | 0o644, fs, data: v.bytes });
      else if ('dir' in v) { if (!dir.entries.has(name)) dir.entries.set(name, { kind: 'dir', mode: S.IFDIR | 0o755, fs, entries: new Map() }); }
      else dir.entries.set(name, { kind: 'file', mode: v.mode, fs, data: enc(v.content ?? '') });
    }
    return root;
  }

  private visibleDisks(): FakeDisk[] {
    return this.machine.disks.filter((d) => {
      if (!d.needsModule) return true;
      const at = this.loadedAt.get(d.needsModule);
      return at !== undefined && this.clock >= at + (d.appearsAfterMs ?? 0);
    });
  }

  private procTree(): Node {
    const root = this.buildTree({
      cmdline: `${this.machine.cmdline}\n`, mounts: '', modules: '', 'sys/kernel/osrelease': `${this.machine.kernelRelease ?? 'sim'}\n`,
      meminfo: `MemTotal:       ${this.machine.memKiB ?? 1048576} kB\n`,
    }, fsCounter++);
    // /proc/modules: the modules loaded so far, one "NAME SIZE REFS DEPS STATE ADDRESS" line each
    const modules = root.kind === 'dir' ? root.entries.get('modules') : undefined;
    if (modules?.kind === 'file') modules.data = () => enc([...this.loadedAt.keys()].map((m) => `${m} 16384 0 - Live 0x0000000000000000\n`).join(''));
    return root;
  }

  private sysTree(): Node {
    const fs = fsCounter++;
    const t: FakeTree = { 'bus/pci/devices/.keep': '', 'class/block/.keep': '', 'module/.keep': '', 'power/resume': '' };
    for (const [id, alias] of Object.entries(this.machine.pciDevices ?? {})) t[`bus/pci/devices/${id}/modalias`] = `${alias}\n`;
    const root = this.buildTree(t, fs);
    const power = root.kind === 'dir' ? root.entries.get('power') : undefined;
    this.resumeNode = power?.kind === 'dir' ? power.entries.get('resume') : undefined;
    // sysfs is generated on each lookup of /sys/class/block, see dynamicSys().
    return root;
  }

  /** /sys/class/block as the kernel shows it now. */
  private blockClass(): Node {
    const fs = 999_999;
    const t: FakeTree = {};
    for (const d of this.visibleDisks()) {
      t[`${d.name}`] = { symlink: `../../devices/virtual/block/${d.name}` };
    }
    for (const d of this.visibleDisks()) for (const p of d.partitions ?? []) t[p.name] = { symlink: `../../devices/virtual/block/${d.name}/${p.name}` };
    for (const dm of this.dms.values()) t[`dm-${dm.minor}`] = { symlink: `../../devices/virtual/block/dm-${dm.minor}` };
    for (const l of this.loops.values()) t[`loop${l.n}`] = { symlink: `../../devices/virtual/block/loop${l.n}` };
    const node = this.buildTree(t, fs);
    return node;
  }

  private blockDevicesDir(): Node {
    const t: FakeTree = {};
    for (const d of this.visibleDisks()) {
      t[`${d.name}/dev`] = `${d.major}:${d.minor}\n`;
      t[`${d.name}/size`] = `${Math.floor(d.bytes.length / 512)}\n`;
      for (const p of d.partitions ?? []) {
        t[`${d.name}/${p.name}/dev`] = `${d.major}:${d.minor + p.number}\n`;
        t[`${d.name}/${p.name}/size`] = `${Math.floor(p.size / 512)}\n`;
        t[`${d.name}/${p.name}/partition`] = `${p.number}\n`;
        t[`${d.name}/${p.name}/start`] = `${Math.floor(p.start / 512)}\n`;
      }
    }
    for (const dm of this.dms.values()) {
      t[`dm-${dm.minor}/dev`] = `${DM_MAJOR}:${dm.minor}\n`;
      t[`dm-${dm.minor}/size`] = `${dm.live ? dmSectors(dm.live.targets) : 0}\n`;
      t[`dm-${dm.minor}/ro`] = `${dm.live?.readOnly ? 1 : 0}\n`;
      t[`dm-${dm.minor}/dm/name`] = `${dm.name}\n`;
      t[`dm-${dm.minor}/dm/uuid`] = `${dm.uuid}\n`;
    }
    for (const l of this.loops.values()) {
      t[`loop${l.n}/dev`] = `${LOOP_MAJOR}:${l.n}\n`;
      t[`loop${l.n}/size`] = `${Math.floor((this.blockByNumber(LOOP_MAJOR, l.n)?.size ?? 0) / 512)}\n`;
      if (l.file) t[`loop${l.n}/loop/backing_file`] = `${l.file}\n`;
    }
    return this.buildTree(t, 999_998);
  }

  private devTree(): Node {
    const fs = fsCounter++;
    const root = this.buildTree({}, fs) as Extract<Node, { kind: 'dir' }>;
    root.entries.set('console', { kind: 'chr', mode: S.IFCHR | 0o600, fs, major: 5, minor: 1 });
    root.entries.set('null', { kind: 'chr', mode: S.IFCHR | 0o666, fs, major: 1, minor: 3 });
    root.entries.set('loop-control', { kind: 'chr', mode: S.IFCHR | 0o660, fs, major: 10, minor: 237 });
    root.entries.set('btrfs-control', { kind: 'chr', mode: S.IFCHR | 0o600, fs, major: 10, minor: 234 });
    return root;
  }

  private diskBytes(name: string): { bytes: Uint8Array; start: number; size: number } | undefined {
    for (const d of this.visibleDisks()) {
      if (d.name === name) return { bytes: d.bytes, start: 0, size: d.bytes.length };
      for (const p of d.partitions ?? []) if (p.name === name) return { bytes: d.bytes, start: p.start, size: p.size };
    }
    return undefined;
  }

  private treeForDevice(source: string): FakeTree | undefined {
    const name = source.replace(/^\/dev\//, '');
    for (const d of this.visibleDisks()) if (d.trees && d.trees[name]) return d.trees[name];
    return undefined;
  }

  // ---------------------------------------------------------------- path walking

  /** An absolute path with "." and ".." resolved lexically. */
  private abs(path: string): string {
    const p = path.startsWith('/') ? path : `${this.cwd === '/' ? '' : this.cwd}/${path}`;
    const out: string[] = [];
    for (const c of p.split('/')) {
      if (c === '' || c === '.') continue;
      if (c === '..') out.pop();
      else out.push(c);
    }
    return `/${out.join('/')}`;
  }

  /** Resolves a path to its node; follows symlinks (the last one only when `follow`). */
  private lookup(path: string, follow = true, depth = 0): Node {
    if (depth > 40) fail('ELOOP', `lookup ${path}`);
    const parts = this.abs(path).split('/').filter((c) => c && c !== '.');
    let node = this.top(this.root);
    const trail: Node[] = [];
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i]!;
      if (part === '..') { node = trail.pop() ?? node; continue; }
      if (node.kind !== 'dir') fail('ENOTDIR', `lookup ${path}`);
      let next = this.child(node, part, parts.slice(0, i + 1));
      if (!next) fail('ENOENT', `lookup ${path}`);
      next = this.top(next);
      if (next.kind === 'link' && (follow || i < parts.length - 1)) {
        const base = next.target.startsWith('/') ? next.target : `/${parts.slice(0, i).join('/')}/${next.target}`;
        const rest = parts.slice(i + 1).join('/');
        return this.lookup(rest ? `${base}/${rest}` : base, follow, depth + 1);
      }
      trail.push(node);
      node = next;
    }
    return node;
  }

  private top(node: Node): Node {
    return node.kind === 'dir' && node.mounted?.length ? this.top(node.mounted[node.mounted.length - 1]!) : node;
  }

  /** Directory entries, with the dynamic parts of sysfs and devtmpfs. */
  private child(dir: Extract<Node, { kind: 'dir' }>, name: string, pathParts: string[]): Node | undefined {
    const dyn = this.dynamicEntries(dir);
    return dyn?.get(name) ?? dir.entries.get(name);
    void pathParts;
  }

  private dynamicEntries(dir: Extract<Node, { kind: 'dir' }>): Map<string, Node> | undefined {
    if ((dir as { dynamic?: string }).dynamic === 'class-block') return (this.blockClass() as Extract<Node, { kind: 'dir' }>).entries;
    if ((dir as { dynamic?: string }).dynamic === 'devices-block') return (this.blockDevicesDir() as Extract<Node, { kind: 'dir' }>).entries;
    if ((dir as { dynamic?: string }).dynamic === 'dev') {
      const m = new Map(dir.entries);
      for (const d of this.visibleDisks()) {
        m.set(d.name, { kind: 'blk', mode: S.IFBLK | 0o660, fs: dir.fs, major: d.major, minor: d.minor });
        for (const p of d.partitions ?? []) m.set(p.name, { kind: 'blk', mode: S.IFBLK | 0o660, fs: dir.fs, major: d.major, minor: d.minor + p.number });
      }
      for (const dm of this.dms.values()) m.set(`dm-${dm.minor}`, { kind: 'blk', mode: S.IFBLK | 0o660, fs: dir.fs, major: DM_MAJOR, minor: dm.minor });
      for (const l of this.loops.values()) m.set(`loop${l.n}`, { kind: 'blk', mode: S.IFBLK | 0o660, fs: dir.fs, major: LOOP_MAJOR, minor: l.n });
      return m;
    }
    return undefined;
  }

  private parentAndName(path: string): { dir: Extract<Node, { kind: 'dir' }>; name: string } {
    const abs = this.abs(path).replace(/\/+$/, '');
    const cut = abs.lastIndexOf('/');
    const dir = this.lookup(cut <= 0 ? '/' : abs.slice(0, cut));
    if (dir.kind !== 'dir') fail('ENOTDIR', path);
    return { dir, name: abs.slice(cut + 1) };
  }

  // ---------------------------------------------------------------- Sys: files

  open(path: string, flags: number, mode = 0o644): number {
    // /proc/self/fd/N opens the file behind fd N anew, as Linux does (a memfd included)
    const self = /^\/proc\/self\/fd\/(\d+)$/.exec(path);
    const behind = self ? this.fds.get(Number(self[1])) : undefined;
    if (behind) {
      const fd = this.nextFd++;
      this.fds.set(fd, { node: behind.node, path: behind.path, flags, pos: 0 });
      return fd;
    }
    let node: Node;
    try {
      node = this.lookup(path);
      if (node.kind === 'blk') this.checkOpenable(node.major, node.minor, path);
    } catch (e) {
      if (!(flags & 0o100)) throw e;
      const { dir, name } = this.parentAndName(path);
      node = { kind: 'file', mode: S.IFREG | mode, fs: dir.fs, data: new Uint8Array(0) };
      dir.entries.set(name, node);
    }
    const fd = this.nextFd++;
    this.fds.set(fd, { node, path: this.abs(path), flags, pos: 0 });
    return fd;
  }

  /** ENXIO while a disk (or one of its partitions) is listed but not yet openable (FakeDisk.openableAfterMs). */
  private checkOpenable(major: number, _minor: number, path: string): void {
    for (const d of this.machine.disks) {
      if (d.major !== major || !d.openableAfterMs || !d.needsModule) continue;
      const at = this.loadedAt.get(d.needsModule);
      if (at !== undefined && this.clock < at + (d.appearsAfterMs ?? 0) + d.openableAfterMs) fail('ENXIO', `open ${path}`);
    }
  }

  close(fd: number): void {
    if (!this.fds.delete(fd) && !this.ueventFds.delete(fd)) fail('EBADF', `close ${fd}`);
  }

  private bytesOf(f: OpenFile): { bytes: Uint8Array; start: number; size: number } {
    const n = f.node;
    if (n.kind === 'file') {
      const data = typeof n.data === 'function' ? n.data() : n.data;
      return { bytes: data, start: 0, size: data.length };
    }
    if (n.kind === 'blk') {
      const byNumber = this.blockByNumber(n.major, n.minor);
      if (byNumber) return byNumber;
      const name = f.path.replace(/^\/dev\//, '');
      const d = this.diskBytes(name);
      if (!d) fail('ENODEV', `open ${f.path}`);
      return d;
    }
    if (n.kind === 'chr') return { bytes: new Uint8Array(0), start: 0, size: 0 };
    fail('EISDIR', `read ${f.path}`);
  }

  pread(fd: number, buf: Uint8Array, offset: number): number {
    const f = this.fds.get(fd) ?? fail('EBADF', `pread ${fd}`);
    const { bytes, start, size } = this.bytesOf(f);
    if (offset >= size) return 0;
    const n = Math.min(buf.length, size - offset);
    buf.set(bytes.subarray(start + offset, start + offset + n));
    return n;
  }

  pwrite(fd: number, buf: Uint8Array, offset: number): number {
    const f = this.fds.get(fd) ?? fail('EBADF', `pwrite ${fd}`);
    this.dmBytes.clear();
    if (f.node.kind !== 'file' || typeof f.node.data === 'function') fail('EINVAL', `pwrite ${f.path}`);
    const old = f.node.data as Uint8Array;
    const next = new Uint8Array(Math.max(old.length, offset + buf.length));
    next.set(old);
    next.set(buf, offset);
    f.node.data = next;
    return buf.length;
  }

  /** sendfile(2): up to `count` bytes of `inFd` from `offset` (-1: its position) appended at `outFd`'s position. */
  sendfile(outFd: number, inFd: number, offset: number, count: number): number {
    const f = this.fds.get(inFd) ?? fail('EBADF', `sendfile ${inFd}`);
    const buf = new Uint8Array(Math.min(count, 1 << 20));
    const n = this.pread(inFd, buf, offset < 0 ? f.pos : offset);
    if (offset < 0) f.pos += n;
    return n > 0 ? this.write(outFd, buf.subarray(0, n)) : 0;
  }

  read(fd: number, buf: Uint8Array): number {
    if (this.ueventFds.has(fd)) {
      const msg = this.pending.shift();
      if (!msg) fail('EAGAIN', 'read uevent');
      const b = enc(msg);
      buf.set(b.subarray(0, buf.length));
      return Math.min(b.length, buf.length);
    }
    const cn = this.fds.get(fd)?.node;
    const typed = this.machine.consoleInput;
    if (!Array.isArray(typed) && ((fd === 0 && !this.fds.has(0)) || (cn?.kind === 'chr' && cn.major === 5 && cn.minor === 1))) {
      // a terminal in canonical mode: one line per read at most
      const input = enc(typed ?? '');
      const nl = input.indexOf(10, this.consoleRead);
      const avail = (nl < 0 ? input.length : nl + 1) - this.consoleRead;
      const n = Math.max(0, Math.min(buf.length, avail));
      buf.set(input.subarray(this.consoleRead, this.consoleRead + n));
      this.consoleRead += n;
      return n;
    }
    const f = this.fds.get(fd) ?? fail('EBADF', `read ${fd}`);
    if (f.node.kind === 'chr' && f.node.major === 5 && f.node.minor === 1) {
      const line = Array.isArray(typed) ? typed.shift() : undefined;
      if (line === undefined) return 0;
      const lflag = new DataView(this.termios.buffer).getUint32(12, true);
      const echo = (lflag & 0o10) !== 0;
      this.events.consoleReads.push({ line, echo });
      if (echo) for (const b of enc(`${line}\n`)) this.consoleBytes.push(b);
      else if (lflag & 0o100) this.consoleBytes.push(10); // ECHONL
      const b = enc(`${line}\n`);
      buf.set(b.subarray(0, buf.length));
      return Math.min(b.length, buf.length);
    }
    const n = this.pread(fd, buf, f.pos);
    f.pos += n;
    return n;
  }

  write(fd: number, buf: Uint8Array): number {
    const cn = this.fds.get(fd)?.node;
    if (fd === 1 || fd === 2 || (cn?.kind === 'chr' && cn.major === 5 && cn.minor === 1)) {
      for (const b of buf) this.consoleBytes.push(b);
      return buf.length;
    }
    const f = this.fds.get(fd) ?? fail('EBADF', `write ${fd}`);
    const n = this.pwrite(fd, buf, f.pos);
    f.pos += n;
    return n;
  }

  ioctl(fd: number, request: number, arg: ArrayBuffer): number {
    const f = this.fds.get(fd);
    const n = f?.node;
    if (n && n.kind === 'chr' && n.major === 10 && n.minor === 236 && ((request >>> 8) & 0xff) === 0xfd) return this.dmIoctl(request & 0xff, arg);
    if (n && n.kind === 'blk' && n.major === LOOP_MAJOR && request === 0x4c0a) return this.loopConfigure(n.minor, arg);
    if (n && n.kind === 'chr' && n.major === 10 && n.minor === 234 && request === BTRFS_IOC_DEVICES_READY) return this.btrfsDevicesReady(arg);
    if (n && n.kind === 'chr' && n.major === 5 && n.minor === 1 && (request === 0x5401 || request === 0x5402)) {
      // TCGETS / TCSETS on the console
      if (arg.byteLength < 36) fail('EFAULT', 'termios');
      if (request === 0x5401) new Uint8Array(arg).set(this.termios);
      else this.termios = new Uint8Array(arg.slice(0, 36));
      return 0;
    }
    if (n && n.kind === 'chr') fail('ENOTTY', `ioctl 0x${request.toString(16)}`);
    fail('ENOSYS', `ioctl 0x${request.toString(16)}`);
  }

  ioctlInt(fd: number, request: number, _arg: number): number {
    this.dmBytes.clear();
    const n = this.fds.get(fd)?.node;
    if (n && n.kind === 'chr' && n.major === 10 && n.minor === 237 && request === 0x4c82) {
      let k = 0;
      while (this.loops.get(k)?.node) k++;
      if (!this.loops.has(k)) this.loops.set(k, { n: k, offset: 0, sizeLimit: 0, readOnly: false });
      return k;
    }
    if (n && n.kind === 'blk' && n.major === LOOP_MAJOR && request === 0x4c01) {
      const l = this.loops.get(n.minor);
      if (!l?.node) fail('ENXIO', `LOOP_CLR_FD loop${n.minor}`);
      if (this.claimed().has(`${LOOP_MAJOR}:${n.minor}`)) fail('EBUSY', `LOOP_CLR_FD loop${n.minor}`);
      this.loops.set(n.minor, { n: n.minor, offset: 0, sizeLimit: 0, readOnly: false });
      this.events.loops.push({ op: 'detach', device: `/dev/loop${n.minor}` });
      return 0;
    }
    fail('ENOSYS', `ioctl 0x${request.toString(16)}`);
  }

  fsync(_fd: number): void {}

  truncate(fd: number, length: number): void {
    const f = this.fds.get(fd) ?? fail('EBADF', `ftruncate ${fd}`);
    if (f.node.kind !== 'file' || typeof f.node.data === 'function') fail('EINVAL', `ftruncate ${f.path}`);
    const next = new Uint8Array(length);
    next.set(f.node.data.subarray(0, Math.min(length, f.node.data.length)));
    f.node.data = next;
  }

  // ---------------------------------------------------------------- device-mapper and loop

  private readonly dms = new Map<string, FakeDm>();
  /** bytes of machine.consoleInput read so far */
  private consoleRead = 0;

  /**
   * What a program (cryptsetup) does through libdevmapper: creates, loads and resumes a dm
   * device, by the same ioctl paths vdboot's own device-mapper code takes.
   */
  createDmDevice(name: string, uuid: string, targets: FakeDmTarget[], readOnly: boolean): void {
    const pack = (fields: { name: string; uuid?: string; targets?: FakeDmTarget[]; flags?: number }): ArrayBuffer => {
      const specs = (fields.targets ?? []).map((t) => {
        const params = enc(`${t.params}\0`);
        const size = (40 + params.length + 7) & ~7;
        return { t, params, size };
      });
      const total = 312 + specs.reduce((a, x) => a + x.size, 0);
      const buf = new ArrayBuffer(total);
      const v = new DataView(buf);
      const b = new Uint8Array(buf);
      v.setUint32(0, 4, true);
      v.setUint32(8, total, true);
      v.setUint32(12, total, true);
      v.setUint32(16, 312, true);
      v.setUint32(20, specs.length, true);
      v.setUint32(28, fields.flags ?? 0, true);
      b.set(enc(fields.name), 48);
      if (fields.uuid) b.set(enc(fields.uuid), 176);
      let off = 312;
      for (const x of specs) {
        v.setBigUint64(off, BigInt(x.t.start), true);
        v.setBigUint64(off + 8, BigInt(x.t.length), true);
        v.setUint32(off + 20, x.size, true);
        b.set(enc(x.t.type), off + 24);
        b.set(x.params, off + 40);
        off += x.size;
      }
      return buf;
    };
    this.dmIoctl(3, pack({ name, uuid }));
    this.dmIoctl(9, pack({ name, targets, flags: readOnly ? 1 : 0 }));
    this.dmIoctl(6, pack({ name }));
  }
  /** dm devices' bytes, read through their tables; dropped whenever a table, loop or file changes */
  private readonly dmBytes = new Map<number, Uint8Array>();
  private nextDmMinor = 0;
  private readonly loops = new Map<number, FakeLoop>();

  /** A block device's bytes by device number: disks, partitions, dm devices (through their table), loops. */
  private blockByNumber(major: number, minor: number, depth = 0): { bytes: Uint8Array; start: number; size: number } | undefined {
    if (depth > 16) fail('ELOOP', 'device stack');
    if (major === DM_MAJOR) {
      const dm = [...this.dms.values()].find((d) => d.minor === minor);
      if (!dm?.live) return undefined;
      let bytes = this.dmBytes.get(dm.minor);
      if (!bytes) this.dmBytes.set(dm.minor, (bytes = this.materialize(dm.live.targets, depth)));
      return { bytes, start: 0, size: bytes.length };
    }
    if (major === LOOP_MAJOR) {
      const l = this.loops.get(minor);
      if (!l?.node || l.node.kind !== 'file') return l ? { bytes: new Uint8Array(0), start: 0, size: 0 } : undefined;
      const data = typeof l.node.data === 'function' ? l.node.data() : l.node.data;
      const size = Math.max(0, Math.min(data.length - l.offset, l.sizeLimit || Infinity));
      return { bytes: data, start: l.offset, size };
    }
    for (const d of this.visibleDisks()) {
      if (d.major !== major) continue;
      if (d.minor === minor) return { bytes: d.bytes, start: 0, size: d.bytes.length };
      for (const p of d.partitions ?? []) if (d.minor + p.number === minor) return { bytes: d.bytes, start: p.start, size: p.size };
    }
    return undefined;
  }

  /** "major:minor" or a /dev path, as a dm table names a device. */
  private resolveDevice(ref: string): { major: number; minor: number } {
    const m = /^(\d+):(\d+)$/.exec(ref);
    if (m) return { major: Number(m[1]), minor: Number(m[2]) };
    let node: Node;
    try { node = this.lookup(ref); } catch { fail('ENODEV', `dm: device ${ref}`); }
    if (node.kind !== 'blk') fail('EINVAL', `dm: ${ref} is not a block device`);
    return { major: node.major, minor: node.minor };
  }

  /** The devices named by live and loaded tables: claimed, so mounting them fails with EBUSY. */
  private claimed(): Set<string> {
    const out = new Set<string>();
    for (const dm of this.dms.values()) {
      for (const t of [...(dm.live?.targets ?? []), ...(dm.inactive?.targets ?? [])]) {
        const refs = t.type === 'linear' ? [t.params.split(' ')[0]!] : t.type === 'snapshot' ? t.params.split(' ').slice(0, 2) : t.type === 'crypt' ? [t.params.split(' ')[3]!] : [];
        for (const r of refs) {
          try {
            const d = this.resolveDevice(r);
            out.add(`${d.major}:${d.minor}`);
          } catch { /* gone */ }
        }
      }
    }
    return out;
  }

  private materialize(targets: FakeDmTarget[], depth: number): Uint8Array {
    const out = new Uint8Array(dmSectors(targets) * 512);
    for (const t of targets) {
      const at = t.start * 512;
      const len = t.length * 512;
      if (t.type === 'crypt' && !this.machine.cryptPlaintext) {
        // "cipher key iv_offset device offset": the simulation does not encrypt; the device's
        // bytes past the offset read through as the plaintext (machine.cryptPlaintext, when
        // given, says what each device decrypts to instead)
        const p = t.params.split(' ');
        const dev = this.resolveDevice(p[3]!);
        const src = this.blockByNumber(dev.major, dev.minor, depth + 1) ?? fail('ENXIO', `dm: ${p[3]} has no bytes`);
        const from = Number(p[4]) * 512;
        const n = Math.max(0, Math.min(len, src.size - from));
        out.set(src.bytes.subarray(src.start + from, src.start + from + n), at);
      } else if (t.type === 'striped') {
        // "N chunk dev1 off1 dev2 off2 …"
        const p = t.params.split(' ');
        const count = Number(p[0]);
        const chunk = Number(p[1]) * 512;
        const srcs = Array.from({ length: count }, (_, k) => {
          const dev = this.resolveDevice(p[2 + 2 * k]!);
          return { src: this.blockByNumber(dev.major, dev.minor, depth + 1) ?? fail('ENXIO', `dm: ${p[2 + 2 * k]} has no bytes`), from: Number(p[3 + 2 * k]) * 512 };
        });
        for (let o = 0; o < len; o += chunk) {
          const c = o / chunk;
          const s = srcs[c % count]!;
          const at2 = s.from + Math.floor(c / count) * chunk;
          out.set(s.src.bytes.subarray(s.src.start + at2, s.src.start + at2 + chunk), at + o);
        }
      } else if (t.type === 'linear' || t.type === 'snapshot') {
        const [ref, off] = t.params.split(' ');
        const dev = this.resolveDevice(ref!);
        const src = this.blockByNumber(dev.major, dev.minor, depth + 1) ?? fail('ENXIO', `dm: ${ref} has no bytes`);
        const from = t.type === 'linear' ? Number(off) * 512 : 0;
        const n = Math.max(0, Math.min(len, src.size - from));
        out.set(src.bytes.subarray(src.start + from, src.start + from + n), at);
      } else if (t.type === 'crypt') {
        const p = t.params.split(' ');
        const plain = this.machine.cryptPlaintext?.[p[3]!] ?? fail('ENXIO', `dm: crypt ${p[3]} has no plaintext`);
        const from = Number(p[4]) * 512;
        out.set(plain.subarray(from, Math.min(plain.length, from + len)), at);
      }
    }
    return out;
  }

  private dmIoctl(cmd: number, buf: ArrayBuffer): number {
    this.dmBytes.clear();
    const v = new DataView(buf);
    const bytes = new Uint8Array(buf);
    if (buf.byteLength < 312 || v.getUint32(0, true) !== 4) fail('EINVAL', 'dm ioctl: bad struct dm_ioctl');
    const dataSize = v.getUint32(12, true);
    if (dataSize > buf.byteLength) fail('EINVAL', 'dm ioctl: data_size past the buffer');
    const cstr = (off: number, max: number) => {
      let end = off;
      while (end < off + max && bytes[end] !== 0) end++;
      return decodeUtf8(bytes.subarray(off, end));
    };
    const name = cstr(48, 128);
    const flags = v.getUint32(28, true);
    const get = () => this.dms.get(name) ?? fail('ENXIO', `dm: no device ${name}`);
    switch (cmd) {
      case 0: // VERSION
        v.setUint32(0, 4, true); v.setUint32(4, 47, true); v.setUint32(8, 0, true);
        return 0;
      case 3: { // DEV_CREATE
        if (!name || this.dms.has(name)) fail('EBUSY', `dm create ${name}`);
        const uuid = cstr(176, 129);
        if (uuid && [...this.dms.values()].some((d) => d.uuid === uuid)) fail('EBUSY', `dm create ${name}: uuid ${uuid} in use`);
        const dm: FakeDm = { name, uuid, minor: this.nextDmMinor++, suspended: true };
        this.dms.set(name, dm);
        v.setBigUint64(40, BigInt((dm.minor & 0xff) + DM_MAJOR * 256 + (dm.minor & ~0xff) * 4096), true);
        this.events.dm.push({ op: 'create', name, uuid });
        return 0;
      }
      case 9: { // TABLE_LOAD
        const dm = get();
        const count = v.getUint32(20, true);
        let off = v.getUint32(16, true);
        const targets: FakeDmTarget[] = [];
        for (let i = 0; i < count; i++) {
          if (off + 40 > dataSize) fail('EINVAL', `dm load ${name}: target ${i} past data_size`);
          const next = v.getUint32(off + 20, true);
          const t: FakeDmTarget = { start: Number(v.getBigUint64(off, true)), length: Number(v.getBigUint64(off + 8, true)), type: cstr(off + 24, 16), params: cstr(off + 40, (i === count - 1 ? dataSize - off : next) - 40) };
          targets.push(t);
          if (next <= 0 && i < count - 1) fail('EINVAL', `dm load ${name}: bad next`);
          off += next;
        }
        let pos = 0;
        for (const t of targets) {
          if (t.start !== pos || t.length <= 0) fail('EINVAL', `dm load ${name}: targets not contiguous at sector ${t.start}`);
          pos += t.length;
          if (!['linear', 'striped', 'crypt', 'zero', 'error', 'snapshot', 'snapshot-origin'].includes(t.type)) fail('EINVAL', `dm load ${name}: unknown target type ${t.type}`);
          if (t.type === 'crypt') {
            // <cipher> <key> <iv_offset> <device> <offset> [options]
            const p = t.params.split(' ');
            if (p.length < 5 || !/^\d+$/.test(p[4]!)) fail('EINVAL', `dm load ${name}: crypt params "${t.params}"`);
            if (this.machine.cryptPlaintext && !this.machine.cryptPlaintext[p[3]!]) fail('EINVAL', `dm load ${name}: crypt params "${t.params}": no plaintext for ${p[3]}`);
            this.resolveDevice(p[3]!);
          }
          if (t.type === 'linear') {
            const [ref, off0] = t.params.split(' ');
            if (!ref || !/^\d+$/.test(off0 ?? '')) fail('EINVAL', `dm load ${name}: linear params "${t.params}"`);
            const d = this.resolveDevice(ref);
            const size = this.blockByNumber(d.major, d.minor)?.size ?? fail('ENXIO', `dm load ${name}: ${ref}`);
            if ((Number(off0) + t.length) * 512 > size) fail('EINVAL', `dm load ${name}: ${ref} is too small for ${t.params} + ${t.length}`);
          }
          if (t.type === 'snapshot') {
            const p = t.params.split(' ');
            if (p.length !== 4 || !['N', 'P', 'PO'].includes(p[2]!)) fail('EINVAL', `dm load ${name}: snapshot params "${t.params}"`);
            this.resolveDevice(p[0]!);
            this.resolveDevice(p[1]!);
          }
        }
        // A device held by a mounted filesystem cannot be claimed (the kernel's exclusive open).
        for (const t of targets) {
          if (t.type !== 'linear') continue;
          const d = this.resolveDevice(t.params.split(' ')[0]!);
          if (this.mountedDevices().has(`${d.major}:${d.minor}`)) fail('EBUSY', `dm load ${name}: ${t.params.split(' ')[0]} is mounted`);
        }
        dm.inactive = { targets, readOnly: (flags & 1) !== 0 };
        this.events.dm.push({ op: 'load', name, targets, readOnly: (flags & 1) !== 0 });
        return 0;
      }
      case 6: { // DEV_SUSPEND: suspend, or resume (activating a loaded table)
        const dm = get();
        if (flags & 2) {
          dm.suspended = true;
          this.events.dm.push({ op: 'suspend', name });
          return 0;
        }
        if (dm.inactive) {
          dm.live = dm.inactive;
          dm.inactive = undefined;
        }
        if (!dm.live) fail('EINVAL', `dm resume ${name}: no table`);
        dm.suspended = false;
        this.events.dm.push({ op: 'resume', name });
        return 0;
      }
      case 12: { // TABLE_STATUS: with DM_STATUS_TABLE_FLAG, the live table as loaded
        const dm = get();
        if (!(flags & (1 << 4))) fail('ENOTTY', `dm table status ${name}: only the table form is simulated`);
        const targets = dm.live?.targets ?? [];
        const start = 312;
        let rel = 0;
        let full = false;
        for (const t of targets) {
          const params = enc(`${t.params}\0`);
          const at = start + rel;
          const next = (rel + 40 + params.length + 7) & ~7;
          if (start + next > dataSize) {
            full = true;
            break;
          }
          v.setBigUint64(at, BigInt(t.start), true);
          v.setBigUint64(at + 8, BigInt(t.length), true);
          v.setInt32(at + 16, 0, true);
          v.setUint32(at + 20, next, true);
          bytes.fill(0, at + 24, at + 40);
          bytes.set(enc(t.type), at + 24);
          bytes.set(params, at + 40);
          rel = next;
        }
        v.setUint32(16, start, true);
        v.setUint32(20, full ? 0 : targets.length, true);
        v.setUint32(28, full ? flags | (1 << 8) : flags & ~(1 << 8), true);
        return 0;
      }
      case 4: { // DEV_REMOVE
        const dm = get();
        if (this.claimed().has(`${DM_MAJOR}:${dm.minor}`) || this.mountedDevices().has(`${DM_MAJOR}:${dm.minor}`)) fail('EBUSY', `dm remove ${name}`);
        this.dms.delete(name);
        this.events.dm.push({ op: 'remove', name });
        return 0;
      }
      default:
        fail('ENOTTY', `dm ioctl ${cmd}`);
    }
  }

  /** btrfs's device list: fsid → devid → the path it was registered by (scan, DEVICES_READY or mount) */
  private readonly btrfsMembers = new Map<string, Map<number, string>>();

  /** The btrfs superblock fields of a block device's bytes (fsid, devid, num_devices), or undefined when it holds none. */
  private btrfsSuperOf(major: number, minor: number): { fsid: string; devid: number; numDevices: number } | undefined {
    const b = this.blockByNumber(major, minor);
    if (!b || b.size < 0x11000) return undefined;
    const sb = b.bytes.subarray(b.start + 0x10000, b.start + 0x11000);
    if (String.fromCharCode(...sb.subarray(0x40, 0x48)) !== '_BHRfS_M') return undefined;
    const v = new DataView(sb.buffer, sb.byteOffset, sb.byteLength);
    const fsid = Array.from(sb.subarray(0x20, 0x30), (x) => x.toString(16).padStart(2, '0')).join('');
    return { fsid, devid: Number(v.getBigUint64(0xc9, true)), numDevices: Number(v.getBigUint64(0x88, true)) };
  }

  /** Registers a btrfs member as the kernel's device list does; true when its filesystem has every member. */
  private registerBtrfs(path: string, node: Node): boolean | undefined {
    if (node.kind !== 'blk') return undefined;
    const sb = this.btrfsSuperOf(node.major, node.minor);
    if (!sb) return undefined;
    let members = this.btrfsMembers.get(sb.fsid);
    if (!members) this.btrfsMembers.set(sb.fsid, (members = new Map()));
    members.set(sb.devid, path);
    return members.size >= sb.numDevices;
  }

  /** BTRFS_IOC_DEVICES_READY: struct btrfs_ioctl_vol_args { __s64 fd; char name[4088]; }; 0 when ready, 1 when members are missing. */
  private btrfsDevicesReady(buf: ArrayBuffer): number {
    if (buf.byteLength !== 4096) fail('EFAULT', 'BTRFS_IOC_DEVICES_READY');
    const name = new Uint8Array(buf, 8);
    const end = name.indexOf(0);
    if (end <= 0) fail('EINVAL', 'BTRFS_IOC_DEVICES_READY: no path');
    const path = decodeUtf8(name.subarray(0, end));
    const node = this.lookup(path);
    if (node.kind !== 'blk') fail('ENOTBLK', `BTRFS_IOC_DEVICES_READY ${path}`);
    const ready = this.registerBtrfs(path, node) ?? fail('EINVAL', `BTRFS_IOC_DEVICES_READY ${path}: no btrfs superblock`);
    this.events.btrfsReady.push({ path, ready });
    return ready ? 0 : 1;
  }

  private loopConfigure(n: number, buf: ArrayBuffer): number {
    this.dmBytes.clear();
    const l = this.loops.get(n) ?? fail('ENXIO', `loop${n}`);
    if (l.node) fail('EBUSY', `LOOP_CONFIGURE loop${n}`);
    const v = new DataView(buf);
    const file = this.fds.get(v.getUint32(0, true)) ?? fail('EBADF', `LOOP_CONFIGURE loop${n}`);
    if (file.node.kind !== 'file') fail('EINVAL', `LOOP_CONFIGURE loop${n}: ${file.path} is not a file`);
    const offset = Number(v.getBigUint64(8 + 24, true));
    const sizeLimit = Number(v.getBigUint64(8 + 32, true));
    const readOnly = (v.getUint32(8 + 52, true) & 1) !== 0;
    this.loops.set(n, { n, node: file.node, file: file.path, offset, sizeLimit, readOnly });
    this.events.loops.push({ op: 'attach', device: `/dev/loop${n}`, file: file.path, readOnly, offset, sizeLimit });
    return 0;
  }

  /** Device numbers of mounted filesystems' sources. */
  private mountedDevices(): Set<string> {
    const out = new Set<string>();
    for (const source of this.deviceOfFs.values()) {
      try {
        const d = this.resolveDevice(source);
        out.add(`${d.major}:${d.minor}`);
      } catch { /* not a device */ }
    }
    return out;
  }

  /** The tree to show for a mount of a dm device, after checking its bytes hold a filesystem. */
  private dmTreeFor(source: string): FakeTree | undefined {
    let node: Node;
    try { node = this.lookup(source); } catch { return undefined; }
    if (node.kind !== 'blk' || node.major !== DM_MAJOR) return undefined;
    const dm = [...this.dms.values()].find((d) => d.minor === node.minor);
    if (!dm) fail('ENXIO', `mount ${source}`);
    const tree = this.machine.deviceTrees?.[dm.name];
    if (!tree) fail('EINVAL', `mount ${source}: no filesystem`);
    const b = this.blockByNumber(DM_MAJOR, dm.minor)!;
    const at = (o: number, n: number) => b.bytes.subarray(b.start + o, b.start + o + n);
    const ext = b.size > 1082 && at(1080, 2)[0] === 0x53 && at(1080, 2)[1] === 0xef;
    const ntfs = b.size > 11 && String.fromCharCode(...at(3, 8)) === 'NTFS    ';
    const btrfs = b.size > 0x10048 && String.fromCharCode(...at(0x10040, 8)) === '_BHRfS_M';
    if (!ext && !ntfs && !btrfs) fail('EINVAL', `mount ${source}: no ext, NTFS or btrfs superblock on ${dm.name}`);
    return tree;
  }

  // ---------------------------------------------------------------- Sys: the tree

  private statOf(node: Node, path: string): Stat {
    const size = node.kind === 'file' ? (typeof node.data === 'function' ? 4096 : node.data.length) : node.kind === 'blk' ? this.diskBytes(path.replace(/^\/dev\//, ''))?.size ?? 0 : 0;
    let ino = inodeNumbers.get(node);
    if (ino === undefined) inodeNumbers.set(node, (ino = nextInode++));
    return {
      mode: node.mode, size, ino, nlink: 1, uid: node.uid ?? 0, gid: node.gid ?? 0, mtimeSec: node.mtimeSec ?? 0,
      devMajor: 0, devMinor: node.fs,
      rdevMajor: node.kind === 'blk' || node.kind === 'chr' ? node.major : 0,
      rdevMinor: node.kind === 'blk' || node.kind === 'chr' ? node.minor : 0,
    };
  }

  stat(path: string): Stat { return this.statOf(this.lookup(path), this.abs(path)); }
  lstat(path: string): Stat { return this.statOf(this.lookup(path, false), this.abs(path)); }

  statfs(path: string): StatFs {
    const node = this.lookup(path);
    return { type: node.fs === this.initramfsFs ? 0x858458f6 : 0xef53, blockSize: 4096, blocks: 0, blocksFree: 0, blocksAvailable: 0 };
  }

  readdir(path: string): string[] {
    const node = this.lookup(path);
    if (node.kind !== 'dir') fail('ENOTDIR', `readdir ${path}`);
    const dyn = this.dynamicEntries(node);
    return [...new Set([...(dyn?.keys() ?? []), ...node.entries.keys()])].filter((n) => n !== '.keep');
  }

  readlink(path: string): string {
    const node = this.lookup(path, false);
    if (node.kind !== 'link') fail('EINVAL', `readlink ${path}`);
    return node.target;
  }

  mkdir(path: string, mode: number): void {
    const { dir, name } = this.parentAndName(path);
    if (dir.entries.has(name) || this.dynamicEntries(dir)?.has(name)) fail('EEXIST', `mkdir ${path}`);
    dir.entries.set(name, { kind: 'dir', mode: S.IFDIR | mode, fs: dir.fs, entries: new Map() });
  }

  rmdir(path: string): void {
    const { dir, name } = this.parentAndName(path);
    const n = dir.entries.get(name) ?? fail('ENOENT', `rmdir ${path}`);
    if (n.kind !== 'dir') fail('ENOTDIR', `rmdir ${path}`);
    if (n.mounted?.length) fail('EBUSY', `rmdir ${path}`);
    if (n.entries.size) fail('ENOTEMPTY', `rmdir ${path}`);
    dir.entries.delete(name);
  }

  unlink(path: string): void {
    const { dir, name } = this.parentAndName(path);
    const n = dir.entries.get(name) ?? fail('ENOENT', `unlink ${path}`);
    if (n.kind === 'dir') fail('EISDIR', `unlink ${path}`);
    dir.entries.delete(name);
  }

  symlink(target: string, path: string): void {
    const { dir, name } = this.parentAndName(path);
    if (dir.entries.has(name)) fail('EEXIST', `symlink ${path}`);
    dir.entries.set(name, { kind: 'link', mode: S.IFLNK | 0o777, fs: dir.fs, target });
  }

  link(target: string, path: string): void {
    const node = this.lookup(target, false);
    const { dir, name } = this.parentAndName(path);
    dir.entries.set(name, node);
  }

  rename(from: string, to: string): void {
    const a = this.parentAndName(from);
    const node = a.dir.entries.get(a.name) ?? fail('ENOENT', `rename ${from}`);
    const b = this.parentAndName(to);
    a.dir.entries.delete(a.name);
    b.dir.entries.set(b.name, node);
  }

  mknod(path: string, mode: number, major: number, minor: number): void {
    const { dir, name } = this.parentAndName(path);
    const kind = (mode & S.IFMT) === S.IFBLK ? 'blk' : 'chr';
    dir.entries.set(name, { kind, mode, fs: dir.fs, major, minor });
  }

  chmod(path: string, mode: number): void {
    const n = this.lookup(path);
    n.mode = (n.mode & S.IFMT) | (mode & 0o7777);
  }

  lchown(_path: string, _uid: number, _gid: number): void {}

  // ---------------------------------------------------------------- Sys: names from a directory fd

  private umaskValue = 0o022;

  umask(mask: number): number {
    const old = this.umaskValue;
    this.umaskValue = mask & 0o777;
    return old;
  }

  /** The path an *at call names: an absolute path as it is, else relative to the directory fd (or the cwd). */
  private atPath(dirfd: number, path: string, call: string): string {
    if (path.startsWith('/') || dirfd === AT.FDCWD) return path;
    const dir = this.fds.get(dirfd) ?? fail('EBADF', `${call} ${path}`);
    if (dir.node.kind !== 'dir') fail('ENOTDIR', `${call} ${path}`);
    return path === '' ? dir.path : `${dir.path}/${path}`;
  }

  /** Whether a name exists (not following a symbolic link at its end). */
  private present(path: string): boolean {
    try {
      this.lookup(path, false);
      return true;
    } catch {
      return false;
    }
  }

  openat(dirfd: number, path: string, flags: number, mode = 0o666): number {
    const p = this.atPath(dirfd, path, 'openat');
    const exists = this.present(p);
    if (exists && (flags & O.CREAT) && (flags & O.EXCL)) fail('EEXIST', `openat ${path}`);
    if (exists && (flags & O.NOFOLLOW) && !(flags & O.PATH) && this.lookup(p, false).kind === 'link') fail('ELOOP', `openat ${path}`);
    if (exists && (flags & O.DIRECTORY) && this.lookup(p, !(flags & O.NOFOLLOW)).kind !== 'dir') fail('ENOTDIR', `openat ${path}`);
    return this.open(p, flags, (mode & ~this.umaskValue) & 0o7777);
  }

  /** openat2(2): RESOLVE_BENEATH refuses ".." and absolute names (EXDEV), RESOLVE_NO_SYMLINKS any link on the way (ELOOP). */
  openat2(dirfd: number, path: string, flags: number, mode: number, resolve: number): number {
    const parts = path.split('/');
    if ((resolve & RESOLVE.BENEATH) && (path.startsWith('/') || parts.includes('..'))) fail('EXDEV', `openat2 ${path}`);
    if (resolve & RESOLVE.NO_SYMLINKS) {
      let cur = this.atPath(dirfd, '', 'openat2');
      for (const part of parts) {
        cur = `${cur}/${part}`;
        if (this.lookup(cur, false).kind === 'link') fail('ELOOP', `openat2 ${path}`);
      }
    }
    return this.openat(dirfd, path, flags, mode);
  }

  mkdirat(dirfd: number, path: string, mode: number): void {
    this.mkdir(this.atPath(dirfd, path, 'mkdirat'), mode & ~this.umaskValue & 0o7777);
  }

  unlinkat(dirfd: number, path: string, flags: number): void {
    const p = this.atPath(dirfd, path, 'unlinkat');
    if (flags & AT.REMOVEDIR) this.rmdir(p);
    else this.unlink(p);
  }

  fchmodat(dirfd: number, path: string, mode: number): void {
    this.chmod(this.atPath(dirfd, path, 'fchmodat'), mode);
  }

  mknodat(dirfd: number, path: string, mode: number, major: number, minor: number): void {
    const p = this.atPath(dirfd, path, 'mknodat');
    if (this.present(p)) fail('EEXIST', `mknodat ${path}`);
    this.mknod(p, (mode & S.IFMT) | (mode & ~this.umaskValue & 0o7777), major, minor);
  }

  fchownat(dirfd: number, path: string, uid: number, gid: number, flags: number): void {
    const n = this.lookup(this.atPath(dirfd, path, 'fchownat'), !(flags & AT.SYMLINK_NOFOLLOW));
    n.uid = uid;
    n.gid = gid;
    // chown clears setuid and setgid (of files; a directory keeps its setgid), as Linux does
    if (n.kind !== 'dir' && n.kind !== 'link') n.mode &= ~0o6000;
  }

  symlinkat(target: string, dirfd: number, path: string): void {
    this.symlink(target, this.atPath(dirfd, path, 'symlinkat'));
  }

  linkat(oldDirfd: number, oldPath: string, newDirfd: number, newPath: string, _flags: number): void {
    const from = this.atPath(oldDirfd, oldPath, 'linkat');
    const to = this.atPath(newDirfd, newPath, 'linkat');
    if (this.lookup(from, false).kind === 'dir') fail('EPERM', `linkat ${oldPath}`);
    if (this.present(to)) fail('EEXIST', `linkat ${newPath}`);
    this.link(from, to);
  }

  fstatat(dirfd: number, path: string, flags: number): Stat {
    const p = this.atPath(dirfd, path, 'fstatat');
    return flags & AT.SYMLINK_NOFOLLOW ? this.lstat(p) : this.stat(p);
  }

  utimensatAt(dirfd: number, path: string, sec: number, nsec: number, flags: number): void {
    const n = this.lookup(this.atPath(dirfd, path, 'utimensat'), !(flags & AT.SYMLINK_NOFOLLOW));
    n.mtimeSec = sec;
    n.mtimeNsec = nsec;
  }

  lsetxattr(path: string, name: string, value: Uint8Array): void {
    const n = this.lookup(path, false);
    (n.xattrs ??= new Map()).set(name, value.slice());
  }

  /** An inode's extended attributes, for tests (lgetxattr without following a link). */
  xattrsOf(path: string): Map<string, Uint8Array> {
    return new Map(this.lookup(path, false).xattrs ?? []);
  }

  /** An inode's time to the nanosecond, for tests. */
  mtimeOf(path: string): { sec: number; nsec: number } {
    const n = this.lookup(path, false);
    return { sec: n.mtimeSec ?? 0, nsec: n.mtimeNsec ?? 0 };
  }

  // ---------------------------------------------------------------- Sys: mounts

  mount(source: string, target: string, fstype: string, flags: number, data: string): void {
    this.clock += this.machine.syscallMs?.mount ?? 0;
    const MS_MOVE = 8192;
    const node = this.lookup(target, true);
    if (node.kind !== 'dir') fail('ENOTDIR', `mount on ${target}`);
    // `node` is the top of the mount stack at target; mount on the underlying directory.
    const under = this.underlying(target);
    if (flags & MS_MOVE) {
      const src = this.underlying(source);
      const moved = src.mounted?.pop() ?? fail('EINVAL', `move ${source}`);
      (under.mounted ??= []).push(moved);
      // A process's working directory follows the moved mount (it holds the directory, not the path).
      const from = this.abs(source);
      if (this.cwd === from || this.cwd.startsWith(`${from}/`)) this.cwd = this.abs(target) + this.cwd.slice(from.length);
      this.cwd = this.abs(this.cwd);
      this.events.mounts.push({ source, target, fstype: 'move', flags, data });
      return;
    }
    let fsRoot: Node;
    if (fstype === 'proc') fsRoot = this.procTree();
    else if (fstype === 'sysfs') {
      fsRoot = this.sysTree();
      const cls = (fsRoot as Extract<Node, { kind: 'dir' }>).entries.get('class') as Extract<Node, { kind: 'dir' }>;
      const blk = cls.entries.get('block') as Extract<Node, { kind: 'dir' }>;
      (blk as { dynamic?: string }).dynamic = 'class-block';
      const devices = this.buildTree({}, fsRoot.fs) as Extract<Node, { kind: 'dir' }>;
      const virtual = this.buildTree({}, fsRoot.fs) as Extract<Node, { kind: 'dir' }>;
      const block = this.buildTree({}, fsRoot.fs);
      (block as { dynamic?: string }).dynamic = 'devices-block';
      virtual.entries.set('block', block);
      devices.entries.set('virtual', virtual);
      (fsRoot as Extract<Node, { kind: 'dir' }>).entries.set('devices', devices);
    } else if (fstype === 'devtmpfs') {
      fsRoot = this.devTree();
      (fsRoot as { dynamic?: string }).dynamic = 'dev';
    } else if (fstype === 'tmpfs' || fstype === 'devpts') fsRoot = this.buildTree({}, fsCounter++);
    else {
      let srcNode: Node | undefined;
      try { srcNode = this.lookup(source); } catch { srcNode = undefined; }
      if (srcNode?.kind === 'blk' && this.claimed().has(`${srcNode.major}:${srcNode.minor}`)) fail('EBUSY', `mount ${source}: held by device-mapper`);
      // btrfs: the mounted device registers itself; a filesystem missing members fails
      // (open_ctree: missing devices) unless mounted degraded
      if (srcNode && this.registerBtrfs(this.abs(source), srcNode) === false && !data.split(',').includes('degraded')) fail('EINVAL', `mount ${source}: btrfs devices missing`);
      const tree = this.dmTreeFor(source) ?? this.treeForDevice(source);
      if (!tree) fail(this.diskBytes(source.replace(/^\/dev\//, '')) ? 'EINVAL' : 'ENOENT', `mount ${source}`);
      fsRoot = this.buildTree(tree, fsCounter++);
      this.deviceOfFs.set(fsRoot, source);
    }
    (under.mounted ??= []).push(fsRoot);
    this.events.mounts.push({ source, target, fstype, flags, data });
  }

  /** The directory node at `path` before mounts on it are applied (the mountpoint). */
  private underlying(path: string): Extract<Node, { kind: 'dir' }> {
    const abs = this.abs(path).replace(/\/+$/, '');
    if (abs === '' || abs === '/') return this.root as Extract<Node, { kind: 'dir' }>;
    const { dir, name } = this.parentAndName(abs);
    const n = this.child(dir, name, []) ?? fail('ENOENT', `mountpoint ${path}`);
    if (n.kind !== 'dir') fail('ENOTDIR', `mountpoint ${path}`);
    return n;
  }

  umount2(target: string, _flags: number): void {
    const under = this.underlying(target);
    if (!under.mounted?.length) fail('EINVAL', `umount ${target}`);
    const gone = under.mounted.pop()!;
    this.deviceOfFs.delete(gone);
    this.events.umounts.push(this.abs(target));
  }

  chdir(path: string): void {
    const n = this.lookup(path);
    if (n.kind !== 'dir') fail('ENOTDIR', `chdir ${path}`);
    this.cwd = this.abs(path);
  }

  chroot(path: string): void {
    const target = this.abs(path);
    const node = this.lookup(target);
    if (node.kind !== 'dir') fail('ENOTDIR', `chroot ${path}`);
    this.root = node;
    this.cwd = '/';
  }

  /** pivot_root(2): `newRoot` becomes /, the old root is mounted on `putOld` (a directory under newRoot). */
  pivotRoot(newRoot: string, putOld: string): void {
    const next = this.lookup(newRoot);
    if (next.kind !== 'dir') fail('ENOTDIR', `pivot_root ${newRoot}`);
    const old = this.top(this.root);
    const put = this.underlying(putOld);
    (put.mounted ??= []).push(old);
    this.root = next;
    this.cwd = '/';
  }

  // ---------------------------------------------------------------- Sys: modules, processes

  memfdCreate(name: string, _flags: number): number {
    const fd = this.nextFd++;
    this.fds.set(fd, { node: { kind: 'file', mode: S.IFREG | 0o777, fs: 0, data: new Uint8Array(0) }, path: `/memfd:${name}`, flags: 2 /* O_RDWR */, pos: 0 });
    return fd;
  }

  finitModule(fd: number, _params: string, flags: number): void {
    this.clock += this.machine.syscallMs?.finitModule ?? 0;
    const f = this.fds.get(fd) ?? fail('EBADF', 'finit_module');
    const name = (f.path.split('/').pop() ?? '').replace(/^memfd:/, '').replace(/\.ko(\..*)?$/, '').replace(/-/g, '_');
    if (f.node.kind !== 'file') fail('EINVAL', `finit_module ${name}`);
    // kernel_read_file: deny_write_access fails while any fd has the file open for writing
    for (const o of this.fds.values()) if (o.node === f.node && (o.flags & 3) !== 0) fail('ETXTBSY', `finit_module ${name}`);
    const bytes = typeof f.node.data === 'function' ? f.node.data() : f.node.data;
    const format = compressionMagic(bytes);
    if (flags & 4) {
      if (!(this.machine.moduleDecompress ?? []).length) fail('EOPNOTSUPP', `finit_module ${name}`);
      if (!format || !this.machine.moduleDecompress!.includes(format)) fail('EINVAL', `finit_module ${name}`);
    } else if (format) fail('ENOEXEC', `finit_module ${name}`);
    if (this.loadedAt.has(name)) fail('EEXIST', `finit_module ${name}`);
    const err = this.machine.moduleErrors?.[name];
    if (err) fail(err, `finit_module ${name}`);
    this.loadedAt.set(name, this.clock);
    this.events.modules.push(name);
    this.events.moduleLoads.push({ name, flags, from: f.path.startsWith('/memfd:') ? 'memfd' : 'file', bytes });
    for (const d of this.machine.disks) if (d.needsModule === name) this.pending.push(`add@/devices/virtual/block/${d.name}\0ACTION=add\0SUBSYSTEM=block\0DEVNAME=${d.name}\0`);
  }

  argv(): string[] { return this.machine.argv ?? ['/init']; }
  getpid(): number { return 1; }

  execve(path: string, argv: string[], envp: string[]): never {
    const node = this.lookup(path);
    if (node.kind !== 'file' || !(node.mode & 0o111)) fail(node.kind === 'file' ? 'EACCES' : 'ENOENT', `execve ${path}`);
    this.events.exec = { path, argv, envp, rootDevice: this.deviceOfFs.get(this.top(this.root)) ?? '(initramfs)' };
    throw new SimulationEnd('exec', path);
  }

  spawn(path: string, argv: string[], _envp: string[], opts?: { stdio?: [number, number, number] }): number {
    const node = this.lookup(path);
    if (node.kind !== 'file') fail('ENOENT', `spawn ${path}`);
    this.events.spawns.push({ path, argv });
    const pid = 100 + this.events.spawns.length;
    const base = path.split('/').pop() ?? '';
    const program = this.machine.programs?.[base === 'busybox' ? (argv[1] ?? '') : base];
    if (program && opts?.stdio) {
      // runs to completion now: stdin read from its position to the end, stdout written at its position
      const [inFd, outFd] = opts.stdio;
      const chunks: number[] = [];
      const buf = new Uint8Array(65536);
      for (let n; (n = this.read(inFd, buf)) > 0; ) for (let i = 0; i < n; i++) chunks.push(buf[i]!);
      const r = program(Uint8Array.from(chunks), argv, this);
      this.write(outFd, r.stdout);
      this.finished.set(pid, r.exitCode);
    }
    return pid;
  }

  waitpid(pid: number, _flags: number): WaitResult {
    const exitCode = this.finished.get(pid);
    if (exitCode !== undefined) {
      this.finished.delete(pid);
      return { pid, status: exitCode << 8, exitCode, termSignal: 0 };
    }
    this.shellRuns++;
    if (this.shellRuns > (this.machine.shellExits ?? 0)) throw new SimulationEnd('shell', `pid ${pid}`);
    return { pid, status: 0, exitCode: 0, termSignal: 0 };
  }

  kill(_pid: number, _signal: number): void {}
  exit(code: number): never { throw new SimulationEnd('exit', String(code)); }

  // ---------------------------------------------------------------- Sys: events, time

  ueventSocket(): number {
    const fd = this.nextFd++;
    this.ueventFds.add(fd);
    return fd;
  }

  /** The simulated machine has no network: sockets fail as on a kernel without them. */
  socket(domain: number, _type: number, _protocol: number): number {
    fail('EAFNOSUPPORT', `socket domain ${domain}`);
  }

  connect(fd: number, _address: Uint8Array, _timeoutMs: number): void {
    fail('EBADF', `connect fd ${fd}`);
  }

  setsockopt(fd: number, _level: number, _name: number, _value: Uint8Array): void {
    fail('EBADF', `setsockopt fd ${fd}`);
  }

  poll(fds: PollFd[], timeoutMs: number): number[] {
    const ready = () => fds.map((p) => (this.ueventFds.has(p.fd) && this.pending.length ? 1 : 0));
    let r = ready();
    if (r.some(Boolean) || timeoutMs === 0) return r;
    this.sleepMs(timeoutMs < 0 ? 1000 : timeoutMs);
    r = ready();
    return r;
  }

  monotonicMs(): number { return this.clock; }
  uptimeSec(): number { return 1 + this.clock / 1000; }

  sleepMs(ms: number): void {
    const before = this.clock;
    this.clock += ms;
    // Disks whose time has come announce themselves.
    for (const d of this.machine.disks) {
      if (!d.needsModule) continue;
      const at = this.loadedAt.get(d.needsModule);
      if (at === undefined) continue;
      const due = at + (d.appearsAfterMs ?? 0);
      if (due > before && due <= this.clock) this.pending.push(`add@/devices/virtual/block/${d.name}\0ACTION=add\0SUBSYSTEM=block\0DEVNAME=${d.name}\0`);
    }
    if (this.clock > 3_600_000) throw new SimulationEnd('stuck', 'an hour of simulated time passed');
  }

  kexecFileLoad(kernelFd: number, initrdFd: number, cmdline: string, flags: number): void {
    const bytesOf = (fd: number): { path: string; data: Uint8Array } => {
      const f = this.fds.get(fd) ?? fail('EBADF', 'kexec_file_load');
      if (f.node.kind !== 'file') fail('EINVAL', `kexec_file_load ${f.path}`);
      return { path: f.path, data: typeof f.node.data === 'function' ? f.node.data() : f.node.data.slice() };
    };
    const kernel = bytesOf(kernelFd);
    const initrd = initrdFd >= 0 ? bytesOf(initrdFd).data : undefined;
    if (this.machine.kexecError) fail(this.machine.kexecError, `kexec_file_load fd ${kernelFd}`);
    this.events.kexec = { kernelPath: kernel.path, kernel: kernel.data, ...(initrd ? { initrd } : {}), cmdline, flags };
  }

  sync(): void {}
  reboot(cmd: number): never {
    this.events.rebooted = cmd;
    throw new SimulationEnd('reboot', cmd.toString(16));
  }
}

/** The compression a module file's first bytes say (xz, zstd, gzip magic), or undefined. */
function compressionMagic(b: Uint8Array): 'xz' | 'zst' | 'gz' | undefined {
  const starts = (m: number[]) => m.every((v, i) => b[i] === v);
  if (starts([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])) return 'xz';
  if (starts([0x28, 0xb5, 0x2f, 0xfd])) return 'zst';
  if (starts([0x1f, 0x8b])) return 'gz';
  return undefined;
}

function dmSectors(targets: FakeDmTarget[]): number {
  return targets.reduce((a, t) => Math.max(a, t.start + t.length), 0);
}

function decodeUtf8(b: Uint8Array): string {
  let s = '';
  for (const c of b) s += String.fromCharCode(c);
  try {
    return decodeURIComponent(escape(s));
  } catch {
    return s;
  }
}
