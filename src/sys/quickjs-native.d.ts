/**
 * The native module `sys` of vdboot's static host (init/host.c), as the init bundle
 * imports it: `import * as native from 'sys'`. One function per syscall; failures throw
 * a SysError-shaped exception (see setErrorFactory); wrong argument types throw TypeError.
 * Byte buffers may be ArrayBuffers, typed arrays or DataViews: the kernel works on
 * their memory in place (a view: only its byteOffset..byteOffset+byteLength range).
 */
declare module 'sys' {
  type Bytes = ArrayBuffer | ArrayBufferView;

  /** The host's argv (argv[0] is "/init"; the kernel adds cmdline words without "="). */
  export const args: string[];
  /** The host's environment as "KEY=value" strings (the kernel passes cmdline words with "="). */
  export const env: string[];

  /** Makes every later syscall failure throw factory(code, errno, call). */
  export function setErrorFactory(factory: (code: string, errno: number, call: string) => Error): void;

  /** mode defaults to 0o666 (less the umask) */
  export function open(path: string, flags: number, mode?: number): number;
  export function close(fd: number): void;
  export function pread(fd: number, buf: Bytes, offset: number): number;
  export function pwrite(fd: number, buf: Bytes, offset: number): number;
  export function read(fd: number, buf: Bytes): number;
  export function write(fd: number, buf: Bytes): number;
  /** ioctl(fd, request, pointer to arg's memory); returns ioctl's result. */
  export function ioctl(fd: number, request: number, arg: Bytes): number;
  export function ioctlInt(fd: number, request: number, arg: number): number;
  /** sendfile(2): up to count bytes of inFd from offset (-1: from its file position) written to outFd inside the kernel; 0 at the end of the input. */
  export function sendfile(outFd: number, inFd: number, offset: number, count: number): number;
  /** splice(2): offsets -1 for pipes (or the file position); the bytes moved, 0 at the end of the input. */
  export function splice(inFd: number, inOffset: number, outFd: number, outOffset: number, count: number, flags?: number): number;
  /** fcntl(2) with an integer argument (F_SETPIPE_SZ …); fcntl's result. */
  export function fcntl(fd: number, cmd: number, arg: number): number;
  /** posix_fadvise(2) (4th argument: POSIX_FADV_WILLNEED = 3 reads a range ahead without waiting). */
  export function fadvise(fd: number, offset: number, length: number, advice: number): void;
  export function fsync(fd: number): void;
  /** ftruncate(2) */
  export function truncate(fd: number, length: number): void;

  export interface NativeStat {
    mode: number; size: number; rdevMajor: number; rdevMinor: number; devMajor: number; devMinor: number;
    ino: number; nlink: number; uid: number; gid: number; mtimeSec: number;
  }
  export function stat(path: string): NativeStat;
  export function lstat(path: string): NativeStat;
  export function statfs(path: string): { type: number; blockSize: number; blocks: number; blocksFree: number; blocksAvailable: number };
  /** Entry names without "." and "..". */
  export function readdir(path: string): string[];
  export function readlink(path: string): string;
  export function mkdir(path: string, mode: number): void;
  export function rmdir(path: string): void;
  export function unlink(path: string): void;
  export function symlink(target: string, path: string): void;
  export function link(target: string, path: string): void;
  export function rename(from: string, to: string): void;
  export function mknod(path: string, mode: number, major: number, minor: number): void;
  export function chmod(path: string, mode: number): void;
  export function lchown(path: string, uid: number, gid: number): void;
  /** utimensat(AT_FDCWD, path, [t, t]) with t = sec.nsec; AT_SYMLINK_NOFOLLOW when noFollow */
  export function utimensat(path: string, sec: number, nsec: number, noFollow: boolean): void;
  /** lsetxattr(path, name, value, 0) */
  export function lsetxattr(path: string, name: string, value: Uint8Array | ArrayBuffer): void;
  /** openat(2): path relative to the directory fd dirfd (-100: AT_FDCWD); mode defaults to 0o666. */
  export function openat(dirfd: number, path: string, flags: number, mode?: number): number;
  /** openat2(2) with struct open_how { flags, mode, resolve } (RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS …); ENOSYS before Linux 5.6. */
  export function openat2(dirfd: number, path: string, flags: number, mode: number, resolve: number): number;
  export function mkdirat(dirfd: number, path: string, mode: number): void;
  /** unlinkat(2); flags AT_REMOVEDIR (0x200) removes a directory. */
  export function unlinkat(dirfd: number, path: string, flags: number): void;
  /** fchmodat(dirfd, path, mode, 0): follows a symbolic link, like chmod(2). */
  export function fchmodat(dirfd: number, path: string, mode: number): void;
  export function mknodat(dirfd: number, path: string, mode: number, major: number, minor: number): void;
  /** fchownat(2); flags AT_SYMLINK_NOFOLLOW (0x100) changes a symbolic link itself. */
  export function fchownat(dirfd: number, path: string, uid: number, gid: number, flags: number): void;
  export function symlinkat(target: string, dirfd: number, path: string): void;
  /** linkat(2) without AT_SYMLINK_FOLLOW: a symbolic link named by oldPath is linked itself. */
  export function linkat(oldDirfd: number, oldPath: string, newDirfd: number, newPath: string, flags: number): void;
  /** fstatat(2); flags AT_SYMLINK_NOFOLLOW (0x100) stats a symbolic link itself. */
  export function fstatat(dirfd: number, path: string, flags: number): NativeStat;
  /** utimensat(dirfd, path, [t, t], flags) with t = sec.nsec */
  export function utimensatAt(dirfd: number, path: string, sec: number, nsec: number, flags: number): void;

  /** source, fstype and data may be null; "" fstype/data are passed as NULL. */
  export function mount(source: string | null, target: string, fstype: string | null, flags: number, data: string | null): void;
  export function umount2(target: string, flags?: number): void;
  export function chdir(path: string): void;
  export function chroot(path: string): void;
  export function pivotRoot(newRoot: string, putOld: string): void;
  export function finitModule(fd: number, params?: string, flags?: number): void;

  export function getpid(): number;
  export function execve(path: string, argv: string[], envp: string[]): never;
  /**
   * fork + [setsid] + stdio fds as 0/1/2 + [fd 0 as controlling tty] + every other fd
   * closed + execve. Throws (after reaping the child) when execve fails; the child's
   * status would be exit code 127.
   */
  export function spawn(path: string, argv: string[], envp: string[],
    opts?: { stdio?: [number, number, number]; setsid?: boolean; ctty?: boolean }): number;
  /** fork(2): the child's pid in the parent, 0 in the child, which must end with _exit. */
  export function fork(): number;
  export function waitpid(pid: number, flags?: number): { pid: number; status: number; exitCode: number; termSignal: number };
  export function kill(pid: number, signal: number): void;
  /** As PID 1 both start the host's rescue shell instead of exiting. */
  export function exit(code?: number): never;
  export function _exit(code?: number): never;
  export function dup2(oldFd: number, newFd: number): number;
  /** pipe2(O_CLOEXEC): [readFd, writeFd] */
  export function pipe(): [number, number];
  /** memfd_create(2): an anonymous in-memory file; flags MFD_CLOEXEC = 1. */
  export function memfdCreate(name: string, flags?: number): number;
  /** umask(2): sets the mask, returns the previous one (the kernel starts init with 0o022). */
  export function umask(mask: number): number;
  /** setpriority(PRIO_PROCESS, 0, value): this process's nice value, -20 (first) to 19 (last). */
  export function nice(value: number): void;

  /** Non-blocking, close-on-exec; read() throws EAGAIN when nothing is queued. */
  export function ueventSocket(): number;
  /** socket(domain, type | SOCK_CLOEXEC, protocol) */
  export function socket(domain: number, type: number, protocol: number): number;
  /** connect(2) with a struct sockaddr's bytes, waiting at most timeoutMs (ETIMEDOUT) */
  export function connect(fd: number, address: Bytes, timeoutMs: number): void;
  /** setsockopt(fd, level, name, value) */
  export function setsockopt(fd: number, level: number, name: number, value: Bytes): void;
  export function poll(fds: { fd: number; events: number }[], timeoutMs: number): number[];
  export function monotonicMs(): number;
  export function uptimeSec(): number;
  export function sleepMs(ms: number): void;
  export function sync(): void;
  /** kexec_file_load(kernelFd, initrdFd, strlen(cmdline) + 1, cmdline, flags); initrdFd -1 adds KEXEC_FILE_NO_INITRAMFS. */
  export function kexecFileLoad(kernelFd: number, initrdFd: number, cmdline: string, flags?: number): void;
  export function reboot(cmd: number): never;

  /** Arguments joined by spaces, newline, to fd 1 (print) or fd 2 (printErr). */
  export function print(...args: unknown[]): void;
  export function printErr(...args: unknown[]): void;
  /** UTF-8 bytes as a string (invalid sequences as U+FFFD), decoded in C. */
  export function utf8Decode(bytes: Bytes): string;
  /** The sum of the bytes as unsigned numbers (tar header checksums), computed in C. */
  export function byteSum(bytes: Bytes): number;
  export function uname(): { sysname: string; nodename: string; release: string; version: string; machine: string };
}
