/**
 * What every boot step shares: the context runInit (init.ts) builds before it looks for
 * the root — the plan, the console, the manifest, the module loader, the device scanner,
 * the uevent socket — and BootFailure, the error a step throws when the person at the
 * console can act on it. Steps (vdisk-exec.ts, tmpfs-root.ts, expand.ts, …) import this
 * file, never init.ts.
 */
import type { InitramfsManifest } from '../formats/manifest.ts';
import type { Sys } from '../sys/sys.ts';
import type { ConsoleLog } from './console.ts';
import type { DeviceScanner } from './devices.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import type { ModuleLoader } from './modules.ts';
import type { BootPlan } from './plan.ts';
import type { VdiskPlan } from './vdisk.ts';

/** A failure the person at the console can act on: the message is the whole story. */
export class BootFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BootFailure';
  }
}

export interface InitContext {
  sys: Sys;
  log: ConsoleLog;
  plan: BootPlan;
  manifest: InitramfsManifest;
  modules: ModuleLoader;
  devices: DeviceScanner;
  /** the NETLINK uevent socket, or -1 when the kernel gave none */
  ueventFd: number;
  /**
   * The storage stack (stack.ts): called after every device scan to unlock LUKS volumes and
   * activate LVs; true when it made devices (scan again). `notes` explain a root that never
   * appeared (a VG missing a PV); `resume` hands resume= to the kernel before the root is mounted.
   */
  stack?: { onDevices(devices: BlockDeviceInfo[]): boolean; notes(): string[]; resume(images?: readonly VdiskPlan[]): void };
}
