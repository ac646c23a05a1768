/// <reference path="./quickjs-native.d.ts" />
/**
 * The Sys adapter for vdboot's static host: wraps the native module `sys` (init/host.c).
 * The boot entry does:
 *
 *   import * as native from 'sys';
 *   import { quickjsSys } from '../sys/quickjs.ts';
 *   const sys = quickjsSys(native);
 *
 * Native failures become real `SysError`s (code = errno's name), created by the factory
 * registered here, so `instanceof SysError` and `isSysError` both work.
 */
import type * as NativeModule from 'sys';
import { SysError, type AtSys, type Sys } from './sys.ts';

export type NativeSys = typeof NativeModule;

/** What the static host offers beyond the Sys port. */
export interface QuickjsSys extends Sys, AtSys {
  /** fork(2): the child's pid in the parent, 0 in the child, which must end with `_exit`. */
  fork(): number;
  /** _exit(2) without cleanup, for forked children. As PID 1: the rescue shell. */
  _exit(code: number): never;
  dup2(oldFd: number, newFd: number): number;
  /** pipe2(O_CLOEXEC): [readFd, writeFd] */
  pipe(): [number, number];
  /** sendfile(2): up to count bytes of inFd from offset (-1: its file position) to outFd, inside the kernel (root archives' file bodies) */
  sendfile(outFd: number, inFd: number, offset: number, count: number): number;
  /** splice(2): offsets -1 for pipes; bytes moved, 0 at the end of the input */
  splice(inFd: number, inOffset: number, outFd: number, outOffset: number, count: number, flags?: number): number;
  /** fcntl(2) with an integer argument (F_SETPIPE_SZ for a decompressor's pipe) */
  fcntl(fd: number, cmd: number, arg: number): number;
  /** posix_fadvise(2): WILLNEED (3) reads a root archive ahead while it is unpacked */
  fadvise(fd: number, offset: number, length: number, advice: number): void;
  /** umask(2): sets the mask, returns the previous one (the kernel starts init with 0o022). */
  umask(mask: number): number;
  /** utimensat(2): atime and mtime set to sec.nsec; AT_SYMLINK_NOFOLLOW when noFollow (root archives keep their times) */
  utimensat(path: string, sec: number, nsec: number, noFollow: boolean): void;
  /** lsetxattr(2) (root archives keep file capabilities) */
  lsetxattr(path: string, name: string, value: Uint8Array): void;
  /** setpriority(2) on this process: 19 lets every other process run first. */
  nice(value: number): void;
  uname(): { sysname: string; nodename: string; release: string; version: string; machine: string };
  /** UTF-8 bytes as a string, decoded in C (readText uses it when the Sys has it). */
  utf8Decode(bytes: Uint8Array): string;
  /** The sum of the bytes as unsigned numbers, computed in C (tar header checksums: ReaderOptions.byteSum). */
  byteSum(bytes: Uint8Array): number;
  /** Debug output: arguments joined by spaces, newline, on fd 1 / fd 2. */
  print(...args: unknown[]): void;
  printErr(...args: unknown[]): void;
  /** The host's environment ("KEY=value"), as the kernel passed it to init. */
  readonly env: readonly string[];
}

export function quickjsSys(native: NativeSys): QuickjsSys {
  native.setErrorFactory((code, errno, call) => new SysError(code, errno, call));
  return {
    open: native.open,
    close: native.close,
    pread: native.pread,
    pwrite: native.pwrite,
    read: native.read,
    write: native.write,
    ioctl: native.ioctl,
    ioctlInt: native.ioctlInt,
    fsync: native.fsync,
    truncate: native.truncate,
    stat: native.stat,
    lstat: native.lstat,
    statfs: native.statfs,
    readdir: native.readdir,
    readlink: native.readlink,
    mkdir: native.mkdir,
    rmdir: native.rmdir,
    unlink: native.unlink,
    symlink: native.symlink,
    link: native.link,
    rename: native.rename,
    mknod: native.mknod,
    chmod: native.chmod,
    lchown: native.lchown,
    mount: native.mount,
    umount2: native.umount2,
    chdir: native.chdir,
    chroot: native.chroot,
    pivotRoot: native.pivotRoot,
    finitModule: native.finitModule,
    memfdCreate: native.memfdCreate,
    argv: () => native.args.slice(),
    getpid: native.getpid,
    execve: native.execve,
    spawn: native.spawn,
    waitpid: native.waitpid,
    kill: native.kill,
    exit: native.exit,
    ueventSocket: native.ueventSocket,
    socket: native.socket,
    connect: native.connect,
    setsockopt: native.setsockopt,
    poll: native.poll,
    monotonicMs: native.monotonicMs,
    uptimeSec: native.uptimeSec,
    sleepMs: native.sleepMs,
    kexecFileLoad: native.kexecFileLoad,
    sync: native.sync,
    reboot: native.reboot,
    fork: native.fork,
    _exit: native._exit,
    dup2: native.dup2,
    pipe: native.pipe,
    sendfile: native.sendfile,
    splice: native.splice,
    fcntl: native.fcntl,
    fadvise: native.fadvise,
    umask: native.umask,
    utimensat: native.utimensat,
    lsetxattr: native.lsetxattr,
    openat: native.openat,
    openat2: native.openat2,
    mkdirat: native.mkdirat,
    unlinkat: native.unlinkat,
    fchmodat: native.fchmodat,
    mknodat: native.mknodat,
    fchownat: native.fchownat,
    symlinkat: native.symlinkat,
    linkat: native.linkat,
    fstatat: native.fstatat,
    utimensatAt: native.utimensatAt,
    nice: native.nice,
    uname: native.uname,
    utf8Decode: native.utf8Decode,
    byteSum: native.byteSum,
    print: native.print,
    printErr: native.printErr,
    env: native.env,
  };
}
