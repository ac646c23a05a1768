/**
 * The benchmark's floor: the smallest initramfs that can boot a root on a block device.
 * busybox, the .ko files of the named modules with their dependencies, and a /init script
 * that loads them with insmod, waits for root=, mounts it (ro/rw, rootfstype=) and
 * switch_roots to init= (default /sbin/init) with the kernel's init arguments. No udev, no
 * probing, no fsck, no error handling beyond "wait, then give up": the reference point any
 * real initramfs is measured against.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { moduleClosure } from './guest.ts';

export interface FloorOptions {
  kernelVersion: string;
  /** modules to load, in this order, each after its dependencies; default: virtio-blk + ext4 */
  modules?: string[];
  /** zstd level; default 10 */
  zstdLevel?: number;
  /** where the kernel's modules are (MODULES_DIR/VERSION/…); default /lib/modules */
  modulesDir?: string;
  busybox?: string;
}

export const FLOOR_MODULES = ['virtio_pci', 'virtio_blk', 'ext4'];

export function floorInitScript(modules: string[]): string {
  return `#!/bin/busybox sh
# vdboot benchmark floor: load modules, mount root, switch_root. Nothing else.
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in ${modules.join(' ')}; do insmod /lib/modules/$m; done
root= mode=ro fstype=ext4 init=/sbin/init
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root=\${arg#root=} ;;
    rootfstype=*) fstype=\${arg#rootfstype=} ;;
    init=*) init=\${arg#init=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
  esac
done
i=0
while [ ! -b "$root" ]; do
  i=$((i+1)); [ $i -gt 1000 ] && { echo "floor: no root device $root"; exec sh; }
  sleep 0.01
done
mkdir -p /newroot
mount -t "$fstype" -o "$mode" "$root" /newroot || exec sh
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$init" "$@"
`;
}

/** Builds the floor initramfs (newc cpio, zstd) at `out`; returns its size in bytes. */
export function buildFloorInitramfs(out: string, opts: FloorOptions): number {
  const modulesDir = opts.modulesDir ?? '/lib/modules';
  const modules = moduleClosure(opts.kernelVersion, opts.modules ?? FLOOR_MODULES, modulesDir);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-floor-'));
  try {
    for (const d of ['bin', 'dev', 'proc', 'sys', 'newroot']) fs.mkdirSync(path.join(dir, d));
    fs.copyFileSync(opts.busybox ?? '/bin/busybox', path.join(dir, 'bin/busybox'));
    fs.chmodSync(path.join(dir, 'bin/busybox'), 0o755);
    for (const applet of ['sh', 'mount', 'umount', 'insmod', 'sleep', 'mkdir', 'cat', 'switch_root']) {
      fs.symlinkSync('busybox', path.join(dir, 'bin', applet));
    }
    const modDir = path.join(dir, 'lib/modules');
    for (const m of modules) {
      fs.mkdirSync(path.join(modDir, path.dirname(m)), { recursive: true });
      // as the kernel ships them (6.12: .ko.xz, which busybox's insmod decompresses)
      fs.copyFileSync(path.join(modulesDir, opts.kernelVersion, m), path.join(modDir, m));
    }
    fs.writeFileSync(path.join(dir, 'init'), floorInitScript(modules), { mode: 0o755 });
    const r = spawnSync(
      'sh',
      ['-c', `find . | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible -R 0:0 | zstd -q -f -T0 -${opts.zstdLevel ?? 10} -o "$0"`, out],
      { cwd: dir, encoding: 'utf8' },
    );
    if (r.status !== 0) throw new Error(`Building the floor initramfs failed: ${r.stderr}`);
    return fs.statSync(out).size;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
