/**
 * LVs that need device-mapper to be made (thin, cache and raid1 LVs), built in a QEMU
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

/** The LV kinds the builder makes: a thin LV in a pool, a cached LV (cache pool on the same PV), a raid1 LV over two PVs. */
export type LvmRootKind = 'thin' | 'cache' | 'raid1';

export interface LvmRootDisks {
  /** the PV disks, in the order to attach them: one, or two for raid1 */
  disks: string[];
  vg: string;
  lv: string;
  transcript: string;
}

/**
 * An empty `sizeMiB` disk made into VG `vg` with a thin pool and a thin LV `lv` of
 * `lvMiB` holding `fsImage`. `initrd` is a vdboot initramfs built with lvm (and
 * thin-provisioning-tools) in it; `kernel` the kernel it is for.
 */
export async function buildThinRoot(dir: string, opts: { initrd: string; kernel?: string; fsImage: string; vg: string; lv: string; sizeMiB: number; lvMiB: number }): Promise<ThinRootDisk> {
  const r = await buildLvmRoot(dir, { ...opts, kind: 'thin' });
  return { disk: r.disks[0]!, vg: r.vg, lv: r.lv, transcript: r.transcript };
}

/**
 * Empty disks of `sizeMiB` (two for raid1) made into VG `vg` whose LV `lv` of `lvMiB`, of
 * the given kind, holds `fsImage`: thin (a pool of lvMiB + 8 MiB), cache (a linear LV
 * converted to a cached LV with an 8 MiB cache pool, writethrough) or raid1 (two legs, one
 * per disk, made with --nosync and then written whole by dd, so both legs hold the data).
 */
export async function buildLvmRoot(dir: string, opts: { kind: LvmRootKind; initrd: string; kernel?: string; fsImage: string; vg: string; lv: string; sizeMiB: number; lvMiB: number }): Promise<LvmRootDisks> {
  const count = opts.kind === 'raid1' ? 2 : 1;
  const disks = Array.from({ length: count }, (_, i) => path.join(dir, `${opts.vg}.${opts.kind}${count > 1 ? `-${i + 1}` : ''}.img`));
  for (const disk of disks) {
    fs.writeFileSync(disk, '');
    fs.truncateSync(disk, opts.sizeMiB << 20);
  }
  // the PV disks first (vda, vdb), then the filesystem to copy
  const pvs = disks.map((_, i) => `/dev/vd${String.fromCharCode(97 + i)}`);
  const source = `/dev/vd${String.fromCharCode(97 + count)}`;
  const vm = await bootVm({
    name: `lvm-${opts.kind}-builder`,
    ...(opts.kernel ? { kernel: opts.kernel } : {}),
    initrd: opts.initrd,
    // pre-switch: the disks are there (the root, the filesystem to copy, is mounted read-only)
    append: `root=${source} ro rd.break=pre-switch`,
    disks: [...disks.map((file) => ({ file })), { file: opts.fsImage, readonly: true }],
  });
  try {
    await vm.waitFor('vdboot# ', 300_000);
    const accept = pvs.map((p) => `"a|^${p}$|"`).join(', ');
    const config = `devices { filter = [ ${accept}, "r|.*|" ] global_filter = [ ${accept}, "r|.*|" ] obtain_device_list_from_udev = 0 use_devicesfile = 0 hints = "none" } activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } global { locking_dir = "/run/lock/lvm" } backup { backup = 0 archive = 0 }`;
    vm.send(`export DM_DISABLE_UDEV=1 LVM_SUPPRESS_FD_WARNINGS=1; C='${config}'; mkdir -p /run/lock/lvm\n`);
    const make: Record<LvmRootKind, string[]> = {
      thin: [
        'modprobe dm_thin_pool; true', // lvm says it if the module is missing
        `lvm lvcreate -y --config "$C" --type thin-pool -L ${opts.lvMiB + 8}m -n pool ${opts.vg}`,
        `lvm lvcreate -y --config "$C" -V ${opts.lvMiB}m -T ${opts.vg}/pool -n ${opts.lv}`,
      ],
      cache: [
        'modprobe dm_cache; modprobe dm_cache_smq; true',
        `lvm lvcreate -y --config "$C" -L ${opts.lvMiB}m -n ${opts.lv} ${opts.vg}`,
        `lvm lvcreate -y --config "$C" --type cache-pool -L 8m -n cpool ${opts.vg}`,
        `lvm lvconvert -y --config "$C" --type cache --cachemode writethrough --cachepool ${opts.vg}/cpool ${opts.vg}/${opts.lv}`,
      ],
      raid1: [
        'modprobe dm_raid; modprobe raid1; true',
        `lvm lvcreate -y --config "$C" --type raid1 -m 1 --nosync -L ${opts.lvMiB}m -n ${opts.lv} ${opts.vg}`,
      ],
    };
    const steps = [
      `lvm pvcreate -y --config "$C" ${pvs.join(' ')}`,
      `lvm vgcreate --config "$C" -s 1m ${opts.vg} ${pvs.join(' ')}`,
      ...make[opts.kind],
      `dd if=${source} of=/dev/mapper/${opts.vg}-${opts.lv} bs=1M conv=fsync 2>&1 | tail -1; sync`,
      `lvm lvs -a --config "$C" -o lv_name,segtype,devices ${opts.vg}`,
      `lvm vgchange --config "$C" -an ${opts.vg}`,
    ];
    // one step at a time, each with its exit code, so a failure shows which and why
    for (const [i, step] of steps.entries()) {
      vm.send(`${step}; echo "STEP-${i}-RC=$?"\n`);
      const line = await vm.waitFor(new RegExp(`^STEP-${i}-RC=\\d+$`), 300_000);
      if (!line.endsWith('=0')) throw new Error(`building the ${opts.kind} LV failed in the builder VM at "${step}":\n${vm.transcript().split('\n').slice(-30).join('\n')}`);
    }
    const transcript = vm.transcript();
    vm.send('sync; poweroff -f\n');
    await vm.waitExit(120_000);
    return { disks, vg: opts.vg, lv: opts.lv, transcript };
  } finally {
    if (!vm.exited) await vm.kill();
  }
}
