/**
 * Real LVM2 physical volumes made by lvm2's own tools on this machine, which has loop
 * devices but no device-mapper: `--driverloaded n` lets pvcreate, vgcreate and lvcreate
 * write labels and metadata without activating anything. A private lvm.conf accepts only
 * the loop devices made here, so no other disk on the machine is scanned or touched.
 * Needs root (losetup); `lvmAvailable()` says whether this machine can.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export function lvmAvailable(): boolean {
  return process.getuid?.() === 0 && spawnSync('lvm', ['version'], { stdio: 'ignore' }).status !== null
    && spawnSync('losetup', ['--version'], { stdio: 'ignore' }).status === 0;
}

export class LvmLab {
  readonly loops = new Map<string, string>(); // file → /dev/loopN
  private readonly etc: string;

  constructor(readonly dir: string) {
    this.etc = path.join(dir, 'lvm-etc');
    fs.mkdirSync(this.etc, { recursive: true });
    this.writeConfig();
  }

  private writeConfig(): void {
    const accept = [...this.loops.values()].map((d) => `"a|^${d}$|"`).concat('"r|.*|"').join(', ');
    fs.writeFileSync(path.join(this.etc, 'lvm.conf'), [
      `devices { filter = [ ${accept} ] global_filter = [ ${accept} ] obtain_device_list_from_udev = 0 use_devicesfile = 0 scan_lvs = 0 }`,
      'activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }',
      'global { locking_dir = "' + path.join(this.dir, 'lock') + '" }',
      'backup { backup = 0 archive = 0 }',
      '',
    ].join('\n'));
  }

  /** A new file of `mib` MiB attached to a loop device; returns the device. */
  attach(file: string, mib: number): string {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, mib * 1024 * 1024);
    const dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
    this.loops.set(file, dev);
    this.writeConfig();
    return dev;
  }

  /** Runs an lvm command (`pvcreate`, `lvs`, …) without device-mapper; returns stdout. */
  lvm(cmd: string, ...args: string[]): string {
    const noDm = ['pvcreate', 'vgcreate', 'lvcreate', 'lvextend', 'vgextend', 'vgcfgbackup', 'lvs', 'vgs', 'pvs', 'lvrename', 'lvremove'].includes(cmd) ? ['--driverloaded', 'n'] : [];
    const r = spawnSync('lvm', [cmd, ...noDm, ...args], {
      encoding: 'utf8',
      env: { ...process.env, LVM_SYSTEM_DIR: this.etc, LVM_SUPPRESS_FD_WARNINGS: '1' },
    });
    if (r.status !== 0) throw new Error(`lvm ${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
    return r.stdout;
  }

  /** `lvm <cmd> --reportformat json` parsed: the rows of its first report. */
  report<T = Record<string, string>>(cmd: 'pvs' | 'vgs' | 'lvs', fields: string, ...args: string[]): T[] {
    const out = JSON.parse(this.lvm(cmd, '--reportformat', 'json', '--units', 's', '--nosuffix', '-o', fields, ...args)) as { report: Record<string, T[]>[] };
    const first = out.report[0]!;
    return Object.values(first)[0]!;
  }

  /** Detaches every loop device (the files stay, for reading). */
  close(): void {
    for (const dev of this.loops.values()) spawnSync('losetup', ['-d', dev]);
    this.loops.clear();
  }
}
