/**
 * The Sys port: everything the boot core needs from the outside world, shaped like
 * the Linux syscalls behind it. Adapters: `quickjs.ts` (the native `sys` module of
 * the static host, at boot), `node.ts` (host side, for the CLI and tests), `fake.ts`
 * (a simulated kernel for simulation tests).
 *
 * Conventions, shared by every adapter:
 * - Failures throw a `SysError` whose `code` is errno's name (`ENOENT`, `EBUSY`, …).
 * - Offsets and sizes are JavaScript numbers (exact up to 2^53 bytes = 8 PiB).
 * - Paths are strings; the native host encodes them as UTF-8.
 * - Every call is synchronous: PID 1 is one thread that waits in `poll`.
 */

export class SysError extends Error {
  constructor(
    /** errno's name, e.g. "ENOENT" */
    readonly code: string,
    /** errno's number */
    readonly errno: number,
    /** the call and its main argument, e.g. "mount /dev/vda1 on /root" */
    readonly call: string,
  ) {
    super(`${call}: ${code}`);
    this.name = 'SysError';
  }
}

export function isSysError(e: unknown, code?: string): e is SysError {
  return (
    typeof e === 'object' && e !== null && (e as { name?: unknown }).name === 'SysError' &&
    (code === undefined || (e as SysError).code === code)
  );
}

export interface Stat {
  /** st_mode: file type bits and permissions */
  mode: number;
  size: number;
  /** st_rdev for device nodes, as (major << 8 | minor) packing of the kernel's new_encode_dev */
  rdevMajor: number;
  rdevMinor: number;
  devMajor: number;
  devMinor: number;
  ino: number;
  nlink: number;
  uid: number;
  gid: number;
  mtimeSec: number;
}

export interface StatFs {
  type: number;
  blockSize: number;
  blocks: number;
  blocksFree: number;
  blocksAvailable: number;
}

export interface PollFd {
  fd: number;
  events: number;
}

export interface WaitResult {
  pid: number;
  /** raw wait status: use exitCode/termSignal */
  status: number;
  /** exit code when the child exited normally, else -1 */
  exitCode: number;
  /** the signal that ended the child, else 0 */
  termSignal: number;
}

/** open(2) flags, x86-64's values (the static host translates O_DIRECTORY and O_NOFOLLOW where they differ, on aarch64). */
export const O = {
  RDONLY: 0,
  WRONLY: 1,
  RDWR: 2,
  CREAT: 0o100,
  EXCL: 0o200,
  NOCTTY: 0o400,
  TRUNC: 0o1000,
  APPEND: 0o2000,
  NONBLOCK: 0o4000,
  DIRECTORY: 0o200000,
  NOFOLLOW: 0o400000,
  CLOEXEC: 0o2000000,
  /** a handle on the name only: a directory to resolve from, nothing read or written through it */
  PATH: 0o10000000,
} as const;

/** memfd_create(2) flags. */
export const MFD = { CLOEXEC: 1 } as const;

/** finit_module(2) flags. */
export const MODULE_INIT = { IGNORE_MODVERSIONS: 1, IGNORE_VERMAGIC: 2, COMPRESSED_FILE: 4 } as const;

/** mount(2) flags. */
export const MS = {
  RDONLY: 1,
  NOSUID: 2,
  NODEV: 4,
  NOEXEC: 8,
  REMOUNT: 32,
  NOATIME: 1024,
  BIND: 4096,
  MOVE: 8192,
  REC: 16384,
  SILENT: 32768,
  PRIVATE: 1 << 18,
  SHARED: 1 << 20,
  RELATIME: 1 << 21,
} as const;

/** st_mode file types. */
export const S = {
  IFMT: 0o170000,
  IFSOCK: 0o140000,
  IFLNK: 0o120000,
  IFREG: 0o100000,
  IFBLK: 0o060000,
  IFDIR: 0o040000,
  IFCHR: 0o020000,
  IFIFO: 0o010000,
} as const;

export const POLLIN = 1;
export const POLLOUT = 4;

/** socket(2) domains, types and protocols. */
export const AF = { INET: 2, INET6: 10, NETLINK: 16 } as const;
export const SOCK = { STREAM: 1, DGRAM: 2, RAW: 3 } as const;
export const NETLINK = { ROUTE: 0, GENERIC: 16 } as const;
/** setsockopt(2) levels and options: SOL_NETLINK, NETLINK_ADD_MEMBERSHIP (linux/netlink.h). */
export const SOL_NETLINK = 270;
export const NETLINK_ADD_MEMBERSHIP = 1;

/** reboot(2) commands. */
export const REBOOT = {
  RESTART: 0x01234567,
  HALT: 0xcdef0123,
  POWER_OFF: 0x4321fedc,
  /** LINUX_REBOOT_CMD_KEXEC: start the kernel loaded by kexec_file_load */
  KEXEC: 0x45584543,
} as const;

/** The *at calls' flags and their special directory fd. */
export const AT = {
  FDCWD: -100,
  SYMLINK_NOFOLLOW: 0x100,
  REMOVEDIR: 0x200,
} as const;

/** openat2(2)'s resolve flags (struct open_how). */
export const RESOLVE = {
  NO_XDEV: 0x01,
  NO_MAGICLINKS: 0x02,
  NO_SYMLINKS: 0x04,
  BENEATH: 0x08,
} as const;

/**
 * Names resolved from an open directory (dirfd, or AT.FDCWD) rather than from "/": what
 * the root-archive unpacker creates entries with, one component from the directory each
 * is in. The static host and the fake kernel have them; callers test for `openat`.
 */
export interface AtSys {
  openat(dirfd: number, path: string, flags: number, mode?: number): number;
  /** openat2(2): `resolve` is RESOLVE's flags; ENOSYS on kernels before 5.6 */
  openat2(dirfd: number, path: string, flags: number, mode: number, resolve: number): number;
  mkdirat(dirfd: number, path: string, mode: number): void;
  /** flags AT.REMOVEDIR for a directory */
  unlinkat(dirfd: number, path: string, flags: number): void;
  /** follows a symbolic link (Linux has no fchmodat that does not, before 6.6) */
  fchmodat(dirfd: number, path: string, mode: number): void;
  /** mode carries the file type (S.IFBLK, S.IFCHR, S.IFIFO) */
  mknodat(dirfd: number, path: string, mode: number, major: number, minor: number): void;
  /** flags AT.SYMLINK_NOFOLLOW for a symbolic link itself */
  fchownat(dirfd: number, path: string, uid: number, gid: number, flags: number): void;
  symlinkat(target: string, dirfd: number, path: string): void;
  /** without AT_SYMLINK_FOLLOW: a symbolic link is linked itself, never followed */
  linkat(oldDirfd: number, oldPath: string, newDirfd: number, newPath: string, flags: number): void;
  fstatat(dirfd: number, path: string, flags: number): Stat;
  /** utimensat(2): atime and mtime set to sec.nsec */
  utimensatAt(dirfd: number, path: string, sec: number, nsec: number, flags: number): void;
}

export interface Sys {
  // --- files ---
  open(path: string, flags: number, mode?: number): number;
  close(fd: number): void;
  /** Reads up to buf.length bytes at offset; returns the count (0 at end of file). */
  pread(fd: number, buf: Uint8Array, offset: number): number;
  pwrite(fd: number, buf: Uint8Array, offset: number): number;
  /** read(2)/write(2) at the current position (consoles, pipes, sockets, /proc files). */
  read(fd: number, buf: Uint8Array): number;
  write(fd: number, buf: Uint8Array): number;
  /** ioctl(2) with a struct argument: the kernel reads and writes `arg` in place. */
  ioctl(fd: number, request: number, arg: ArrayBuffer): number;
  /** ioctl(2) with an integer argument (LOOP_CLR_FD, BLKRRPART, …). */
  ioctlInt(fd: number, request: number, arg: number): number;
  fsync(fd: number): void;
  /** ftruncate(2) */
  truncate(fd: number, length: number): void;

  // --- the tree ---
  stat(path: string): Stat;
  lstat(path: string): Stat;
  statfs(path: string): StatFs;
  /** Entry names, without "." and "..". */
  readdir(path: string): string[];
  readlink(path: string): string;
  mkdir(path: string, mode: number): void;
  rmdir(path: string): void;
  unlink(path: string): void;
  symlink(target: string, path: string): void;
  link(target: string, path: string): void;
  rename(from: string, to: string): void;
  /** mknod(2): mode carries the file type (S.IFBLK, S.IFCHR, …) */
  mknod(path: string, mode: number, major: number, minor: number): void;
  chmod(path: string, mode: number): void;
  /** lchown(2): does not follow symlinks */
  lchown(path: string, uid: number, gid: number): void;

  // --- mounts and roots ---
  mount(source: string, target: string, fstype: string, flags: number, data: string): void;
  umount2(target: string, flags: number): void;
  chdir(path: string): void;
  chroot(path: string): void;
  pivotRoot(newRoot: string, putOld: string): void;

  // --- modules ---
  /** finit_module(2) on an open module file; flags MODULE_INIT_COMPRESSED_FILE (4): the kernel decompresses it. */
  finitModule(fd: number, params: string, flags: number): void;
  /** memfd_create(2): an anonymous in-memory file, read and write (flags: MFD.CLOEXEC …). */
  memfdCreate(name: string, flags: number): number;

  // --- processes ---
  /** This process's argv: for the init, what the kernel passed (argv[0] is "/init"). */
  argv(): string[];
  getpid(): number;
  /** execve(2): returns only by throwing. */
  execve(path: string, argv: string[], envp: string[]): never;
  /**
   * fork + (optional setsid/controlling tty) + execve in the child. Returns the child's pid.
   * `stdio`: fds for the child's 0, 1, 2 (default: inherit).
   */
  spawn(path: string, argv: string[], envp: string[], opts?: { stdio?: [number, number, number]; setsid?: boolean; ctty?: boolean }): number;
  /** waitpid(2); flags 1 = WNOHANG (then pid 0 means still running). */
  waitpid(pid: number, flags: number): WaitResult;
  kill(pid: number, signal: number): void;
  exit(code: number): never;

  // --- events and time ---
  /** A NETLINK_KOBJECT_UEVENT socket bound to the kernel's uevent multicast group. */
  ueventSocket(): number;
  /** socket(2), close-on-exec: TCP for a network root's server, netlink for the nbd and routing families. */
  socket(domain: number, type: number, protocol: number): number;
  /** connect(2) to a struct sockaddr's bytes, waiting at most timeoutMs (then ETIMEDOUT). */
  connect(fd: number, address: Uint8Array, timeoutMs: number): void;
  /** setsockopt(2) with the option value's bytes (a netlink socket joining a multicast group). */
  setsockopt(fd: number, level: number, name: number, value: Uint8Array): void;
  /** poll(2): returns revents per fd (0 where nothing happened). */
  poll(fds: PollFd[], timeoutMs: number): number[];
  /** Monotonic clock in milliseconds (CLOCK_MONOTONIC, with fractions). */
  monotonicMs(): number;
  /** CLOCK_BOOTTIME in seconds: the kernel's own uptime, for "reached init at" logs. */
  uptimeSec(): number;
  sleepMs(ms: number): void;

  // --- the end ---
  /**
   * kexec_file_load(2): loads the kernel in `kernelFd` (and the initramfs in `initrdFd`, or
   * -1 for none) to start with `cmdline` at the next reboot(REBOOT.KEXEC). The kernel
   * verifies the image's signature itself where its policy asks (lockdown, KEXEC_SIG).
   */
  kexecFileLoad(kernelFd: number, initrdFd: number, cmdline: string, flags: number): void;
  sync(): void;
  reboot(cmd: number): never;
}
