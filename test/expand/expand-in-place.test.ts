/**
 * expandInPlace (src/boot/expand.ts) against a small Sys whose host mount is a temp
 * directory: the image is a real qemu-img file written through node's fs, and the test
 * decides what the "kernel" does (mounts, unmounts, free space, failed writes, an ntfs-3g
 * daemon that does not exit). Checks what the boot says and that the image stays whole.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { expandInPlace, EXPAND_MOUNT, type ExpandTarget } from '../../src/boot/expand.ts';
import type { ExpansionNeeded } from '../../src/boot/expand-plan.ts';
import { BootFailure, type InitContext } from '../../src/boot/context.ts';
import { MS, SysError, type Stat, type StatFs } from '../../src/sys/sys.ts';
import { makeImage, QEMU_FMT, qemuRaw, sha, tmpDir, unallocatedBytes } from './helpers.ts';

const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const MiB = 1 << 20;
const HOST = '/run/vdboot/host';

interface Opts {
  /** free bytes statfs reports */
  free?: number;
  /** pwrite fails with ENOSPC once this many bytes were written past `limitFrom` */
  spaceLeft?: number;
  limitFrom?: number;
  /** umount2 of the expansion mount fails with this code on its n-th call (1-based) */
  umountFails?: { call: number; code: string };
  /** an ntfs-3g host whose daemon never exits */
  ntfs3g?: boolean;
}

/** A Sys where EXPAND_MOUNT and HOST show `root`, with the boot's other parts stubbed. */
function world(root: string, o: Opts = {}) {
  const mounts: { target: string; fstype: string; flags: number }[] = [];
  const umounts: string[] = [];
  const lines: string[] = [];
  const fds = new Map<number, number>();
  let clock = 0;
  let written = 0;
  const real = (p: string): string => {
    for (const m of [EXPAND_MOUNT, HOST]) if (p.startsWith(`${m}/`)) return path.join(root, p.slice(m.length));
    throw new SysError('ENOENT', 2, `open ${p}`);
  };
  const wrap = <T>(call: string, f: () => T): T => {
    try {
      return f();
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code) throw new SysError(code, 0, call);
      throw e;
    }
  };
  let next = 10;
  const sys = {
    open: (p: string, flags: number) => {
      if (p === '/proc/4242/cmdline') {
        fds.set(next, -1);
        return next++;
      }
      const fd = wrap(`open ${p}`, () => fs.openSync(real(p), (flags & 3) === 2 ? 'r+' : 'r'));
      fds.set(next, fd);
      return next++;
    },
    close: (fd: number) => {
      const r = fds.get(fd)!;
      if (r >= 0) fs.closeSync(r);
      fds.delete(fd);
    },
    read: (fd: number, buf: Uint8Array) => {
      // /proc/4242/cmdline: the daemon's argv, then the end of the file
      if (fds.get(fd) === -2) return 0;
      if (fds.get(fd) !== -1) throw new SysError('EBADF', 9, 'read');
      const cmd = new TextEncoder().encode('@ntfs-3g-expand\0-o\0');
      buf.set(cmd);
      fds.set(fd, -2);
      return cmd.length;
    },
    pread: (fd: number, buf: Uint8Array, off: number) => fs.readSync(fds.get(fd)!, buf, 0, buf.length, off),
    pwrite: (fd: number, buf: Uint8Array, off: number) => {
      if (o.spaceLeft !== undefined && off + buf.length > (o.limitFrom ?? 0)) {
        if (written + buf.length > o.spaceLeft) throw new SysError('ENOSPC', 28, `pwrite ${off}`);
        written += buf.length;
      }
      return fs.writeSync(fds.get(fd)!, buf, 0, buf.length, off);
    },
    stat: (p: string): Stat => ({ size: fs.statSync(real(p)).size } as Stat),
    fsync: () => undefined,
    truncate: (fd: number, n: number) => fs.ftruncateSync(fds.get(fd)!, n),
    statfs: (): StatFs => ({ type: 0, blockSize: 4096, blocks: 1 << 30, blocksFree: 1 << 30, blocksAvailable: Math.floor((o.free ?? 64 * 2 ** 30) / 4096) }),
    mkdir: () => { throw new SysError('EEXIST', 17, 'mkdir'); },
    mount: (_src: string, target: string, fstype: string, flags: number) => { mounts.push({ target, fstype, flags }); },
    umount2: (target: string) => {
      umounts.push(target);
      if (o.umountFails && umounts.length === o.umountFails.call) throw new SysError(o.umountFails.code, 16, `umount ${target}`);
    },
    spawn: () => 100,
    waitpid: (pid: number) => ({ pid: pid === 100 ? 100 : 0, exitCode: 0 }),
    readdir: (p: string) => (p === '/proc' ? ['self', '4242'] : []),
    monotonicMs: () => clock,
    sleepMs: (ms: number) => { clock += ms; },
    sync: () => undefined,
    ioctlInt: () => 0,
  };
  const log = {
    info: (s: string) => lines.push(`info: ${s}`),
    warn: (s: string) => lines.push(`warn: ${s}`),
    debug: () => undefined,
  };
  const ctx = {
    sys, log,
    manifest: { filesystems: o.ntfs3g ? {} : { ntfs3: 'ntfs3', vfat: 'vfat' }, tools: o.ntfs3g ? { ntfs3g: '/bin/ntfs-3g' } : {} },
    modules: { loadFilesystem: () => true, load: () => ({}), reportFailures: () => undefined },
  } as unknown as InitContext;
  return { ctx, mounts, umounts, lines };
}

function need(p: string): ExpansionNeeded {
  // the planner's expansion plan: expandInPlace reads its own again from the file as the driver sees it
  return { name: 'ExpansionNeeded', message: 'needs expanding', path: p, unallocated: MiB, expansion: { blocks: 1 }, fills: [] } as unknown as ExpansionNeeded;
}

function target(fsType: string, p: string, kernelMount?: ExpandTarget['kernelMount']): ExpandTarget {
  return { device: { path: '/dev/vda1', fsType } as ExpandTarget['device'], description: `/dev/vda1 (${fsType})`, path: p, ...(kernelMount ? { kernelMount } : {}) };
}

function failure(f: () => unknown): BootFailure {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(BootFailure);
    return e as BootFailure;
  }
  throw new Error('expected a BootFailure');
}

/** A host directory holding one dynamic image at /VMs/<name>. */
function host(format: 'vhd' | 'vdi' | 'vhdx' | 'vmdk', sizeMiB: number): { root: string; rel: string; file: string } {
  const root = fs.mkdtempSync(path.join(dir, 'host-'));
  fs.mkdirSync(path.join(root, 'VMs'));
  const img = makeImage(dir, format, sizeMiB, [[0, 65536, 0x5a]]);
  const rel = `/VMs/disk.${format}`;
  fs.renameSync(img, path.join(root, rel));
  return { root, rel, file: path.join(root, rel) };
}

describe('expanding in place at boot', () => {
  it('on a kernel-mounted host the host is handed back through makeReadOnly after the expansion, so the boot knows it is read-only again', () => {
    const h = host('vhd', 8);
    const w = world(h.root);
    const calls: string[] = [];
    const plan = expandInPlace(w.ctx, need(h.rel), target('ext4', h.rel, { dir: HOST, makeWritable: () => calls.push('rw'), makeReadOnly: () => calls.push('ro') }));
    expect(plan.expansion?.blocks).toBeGreaterThan(0);
    expect(calls).toEqual(['rw', 'ro']);
    // expand.ts leaves the remount to the boot's callback
    expect(w.mounts.filter((m) => m.flags & MS.REMOUNT)).toEqual([]);
    expect(unallocatedBytes(h.file, 'vpc')).toBe(0);
  });

  it('a kernel-mounted host that cannot be made read-only again stops the boot, naming the mount and the rescue shell', () => {
    const h = host('vhd', 8);
    const w = world(h.root);
    const e = failure(() => expandInPlace(w.ctx, need(h.rel), target('ext4', h.rel, {
      dir: HOST, makeWritable: () => undefined, makeReadOnly: () => { throw new SysError('EBUSY', 16, `mount ${HOST}`); },
    })));
    expect(e.message).toMatch(/\/run\/vdboot\/host could not be made read-only again after the expansion \(EBUSY\)/);
    expect(e.message).toMatch(/rescue shell, unmount it \("umount \/run\/vdboot\/host"/);
  });

  it('a FAT32 host refuses an image that would grow past 4 GiB − 1 before mounting it read-write, naming the sizes and exFAT/NTFS, snapshot and preallocation', () => {
    const h = host('vhd', 5 * 1024);
    const before = sha(h.file);
    const w = world(h.root);
    const e = failure(() => expandInPlace(w.ctx, need(h.rel), target('vfat', h.rel)));
    expect(e.message).toMatch(/it would grow to 5\.\d+ GiB \(\d+ bytes\), but \/dev\/vda1 \(vfat\) is FAT32, where a file holds at most 4 GiB − 1 byte \(4294967295 bytes\)/);
    expect(e.message).toMatch(/exFAT or NTFS/);
    expect(e.message).toMatch(/rd\.vdisk\.mode=snapshot/);
    expect(e.message).toMatch(/preallocate/);
    expect(e.message).toMatch(/Nothing was written/);
    expect(w.mounts.map((m) => m.flags & MS.RDONLY)).toEqual([MS.RDONLY]);
    expect(w.umounts).toEqual([EXPAND_MOUNT]);
    expect(sha(h.file)).toBe(before);
  });

  it('a host that runs out of room during the data phase: the file is truncated back, the console says it was rolled back, the host is unmounted', () => {
    const h = host('vdi', 24);
    const before = qemuRaw(h.file, QEMU_FMT.vdi!);
    const oldSha = sha(h.file);
    const w = world(h.root, { spaceLeft: 3 * MiB, limitFrom: fs.statSync(h.file).size });
    const e = failure(() => expandInPlace(w.ctx, need(h.rel), target('ntfs', h.rel)));
    expect(e.message).toMatch(/Expanding \/VMs\/disk\.vdi on \/dev\/vda1 \(ntfs\) failed: pwrite \d+: ENOSPC\. The expansion was rolled back: \/VMs\/disk\.vdi was truncated to its former [\d.]+ \w+ \(\d+ bytes\), and reads as before; the boot stops here/);
    expect(sha(h.file)).toBe(oldSha);
    expect(qemuRaw(h.file, QEMU_FMT.vdi!).equals(before)).toBe(true);
    expect(w.umounts).toEqual([EXPAND_MOUNT, EXPAND_MOUNT]);
  });

  it('an expansion mount that does not unmount afterwards stops the boot, naming the mount and the rescue shell', () => {
    const h = host('vhd', 8);
    const w = world(h.root, { umountFails: { call: 2, code: 'EBUSY' } });
    const e = failure(() => expandInPlace(w.ctx, need(h.rel), target('ntfs', h.rel)));
    expect(e.message).toMatch(/\/run\/vdboot\/expand could not be unmounted \(EBUSY\)\. vdboot will not map \/dev\/vda1 while/);
    expect(e.message).toMatch(/rescue shell, unmount it \("umount \/run\/vdboot\/expand"/);
  });

  it('an ntfs-3g daemon still running after the unmount stops the boot instead of mapping the partition under it', () => {
    const h = host('vhd', 8);
    const w = world(h.root, { ntfs3g: true });
    const e = failure(() => expandInPlace(w.ctx, need(h.rel), target('ntfs', h.rel)));
    expect(e.message).toMatch(/ntfs-3g \(pid 4242\), which wrote \/dev\/vda1 for the expansion, is still running 120 s after \/run\/vdboot\/expand was unmounted/);
    expect(e.message).toMatch(/umount \/run\/vdboot\/expand/);
  });

  it('an image the host driver does not find: one refusal naming the path, the driver and the alternatives, not a raw ENOENT', () => {
    const h = host('vhd', 8);
    const w = world(h.root);
    const e = failure(() => expandInPlace(w.ctx, need('/VMs/Disk.VHD'), target('ntfs', '/VMs/Disk.VHD')));
    expect(e.message).toMatch(/^\/VMs\/Disk\.VHD on \/dev\/vda1 \(ntfs\) cannot be mapped read-write as it is .*: ntfs3 could not open or read \/run\/vdboot\/expand\/VMs\/Disk\.VHD \(ENOENT\): the driver does not find the file/);
    expect(e.message).toMatch(/Nothing was written\. Instead: boot with rd\.vdisk\.mode=snapshot/);
    expect(w.umounts).toEqual([EXPAND_MOUNT]);
  });

  it('a refusal whose read-only mount then does not unmount: the boot stops with both, the refusal and the mount to unmount', () => {
    const h = host('vhd', 8);
    const w = world(h.root, { umountFails: { call: 1, code: 'EBUSY' } });
    const e = failure(() => expandInPlace(w.ctx, need('/VMs/missing.vhd'), target('ntfs', '/VMs/missing.vhd')));
    expect(e.message).toMatch(/ntfs3 could not open or read \/run\/vdboot\/expand\/VMs\/missing\.vhd \(ENOENT\)/);
    expect(e.message).toMatch(/\n\/run\/vdboot\/expand could not be unmounted \(EBUSY\).*umount \/run\/vdboot\/expand/);
  });
});
