/**
 * LVs that need device-mapper to be made (thin pools and thin volumes), built in a QEMU
 * builder VM: vdboot's own initramfs with LVM's program (`--with lvm`), stopped at
 * rd.break=pre-switch, where lvm2's real tools create the PV, the VG, the pool and the LV
 * on an empty disk and `dd` copies a filesystem image (the second disk) into the LV. The
 * build machine has loop devices but no device-mapper, so this cannot happen on it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { bootVm } from '../../qemu/harness.ts';

export interface ThinRootDisk {
  /** the PV disk: VG `vg` with thin pool `pool` and thin LV `lv` holding the filesystem */
  disk: string;
  vg: string;
  lv: string;
  /** the builder VM's console, for failures */
  transcript: string;
}

/**
 * An empty `sizeMiB` disk made into VG `vg` with a thin pool and a thin LV `lv` of
 * `lvMiB` holding `fsImage`. `initrd` is a vdboot initramfs built with lvm (and
 * thin-provisioning-tools) in it; `kernel` the kernel it is for.
 */
export async function buildThinRoot(dir: string, opts: { initrd: string; kernel?: string; fsImage: string; vg: string; lv: string; sizeMiB: number; lvMiB: number }): Promise<ThinRootDisk> {
  const disk = path.join(dir, `${opts.vg}.thin.img`);
  fs.writeFileSync(disk, '');
  fs.truncateSync(disk, opts.sizeMiB << 20);
  const vm = await bootVm({
    name: 'lvm-thin-builder',
    ...(opts.kernel ? { kernel: opts.kernel } : {}),
    initrd: opts.initrd,
    // pre-switch: the disks are there (the root, the filesystem to copy, is mounted read-only)
    append: 'root=/dev/vdb ro rd.break=pre-switch',
    disks: [{ file: disk }, { file: opts.fsImage, readonly: true }],
  });
  try {
    await vm.waitFor('vdboot# ', 300_000);
    const config = 'devices { filter = [ "a|^/dev/vda$|", "r|.*|" ] global_filter = [ "a|^/dev/vda$|", "r|.*|" ] obtain_device_list_from_udev = 0 use_devicesfile = 0 hints = "none" } activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } global { locking_dir = "/run/lock/lvm" } backup { backup = 0 archive = 0 }';
    const poolMiB = opts.lvMiB + 8;
    vm.send(`export DM_DISABLE_UDEV=1 LVM_SUPPRESS_FD_WARNINGS=1; C='${config}'; mkdir -p /run/lock/lvm\n`);
    const steps = [
      'modprobe dm_thin_pool; true', // lvm says it if the module is missing
      'lvm pvcreate -y --config "$C" /dev/vda',
      `lvm vgcreate --config "$C" -s 1m ${opts.vg} /dev/vda`,
      `lvm lvcreate -y --config "$C" --type thin-pool -L ${poolMiB}m -n pool ${opts.vg}`,
      `lvm lvcreate -y --config "$C" -V ${opts.lvMiB}m -T ${opts.vg}/pool -n ${opts.lv}`,
      `dd if=/dev/vdb of=/dev/mapper/${opts.vg}-${opts.lv} bs=1M conv=fsync 2>&1 | tail -1; sync`,
      `lvm vgchange --config "$C" -an ${opts.vg}`,
    ];
    // one step at a time, each with its exit code, so a failure shows which and why
    for (const [i, step] of steps.entries()) {
      vm.send(`${step}; echo "STEP-${i}-RC=$?"\n`);
      const line = await vm.waitFor(new RegExp(`^STEP-${i}-RC=\\d+$`), 300_000);
      if (!line.endsWith('=0')) throw new Error(`building the thin LV failed in the builder VM at "${step}":\n${vm.transcript().split('\n').slice(-30).join('\n')}`);
    }
    const transcript = vm.transcript();
    vm.send('sync; poweroff -f\n');
    await vm.waitExit(120_000);
    return { disk, vg: opts.vg, lv: opts.lv, transcript };
  } finally {
    if (!vm.exited) await vm.kill();
  }
}
