/**
 * The boot plan: the kernel command line turned into plain data, by a pure function.
 * The same plan drives the real boot (execute.ts) and the host's dry run.
 */
import { Cmdline } from './cmdline.ts';
import { type DeviceSpec, parseDeviceSpec } from './devspec.ts';

export type RootSource =
  /** root on a block device: root=/dev/…, UUID=, LABEL=, PARTUUID=, PARTLABEL= */
  | { kind: 'block'; device: DeviceSpec }
  /** root=vdisk:[HOST:]PATH — an image file on a host filesystem (HOST undefined: search every partition) */
  | { kind: 'vdisk'; host?: DeviceSpec; path: string }
  /** root=tmpfs:HOST:PATH — an archive unpacked into a tmpfs root */
  | { kind: 'tmpfs'; host: DeviceSpec; path: string };

export type BreakPoint = 'pre-mount' | 'pre-switch';

export interface BootPlan {
  root: RootSource;
  /** rootfstype=; undefined: probe the superblock */
  rootFsType?: string;
  /** rootflags= */
  rootFlags: string;
  /** ro unless `rw` (the kernel's own default) */
  readOnly: boolean;
  /** init=; undefined: the first of DEFAULT_INITS that exists in the root */
  init?: string;
  /** arguments for the init: those after `--`, and those the kernel passed to /init */
  initArgs: string[];
  /** rootwait: wait for the root device without a time limit */
  rootWait: boolean;
  /** rootdelay=: seconds to wait before looking for root */
  rootDelaySec: number;
  /** rd.timeout=: seconds to wait for devices (default 30) */
  timeoutSec: number;
  breakAt: BreakPoint[];
  /** rd.shell=0 turns the rescue shell off */
  shell: boolean;
  quiet: boolean;
  debug: boolean;
  /** things the person at the console should know: unknown or malformed keys */
  warnings: string[];
}

/** Tried in order when there is no init=, as the kernel does. */
export const DEFAULT_INITS = ['/sbin/init', '/etc/init', '/bin/init', '/bin/sh'];

/** A command line vdboot cannot boot from: the message says what and what to do. */
export class PlanError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PlanError';
  }
}

/** Keys vdboot reads or knows to be the kernel's; others in vdboot's namespaces draw a warning. */
const OWN_NAMESPACES = ['rd.vdboot.', 'rd.vdisk.', 'rd.tmpfs.', 'rd.break', 'rd.shell', 'rd.timeout'];

/** dracut options that vdboot does not implement: a warning says they are ignored. */
const FOREIGN_RD = /^rd\.(luks|lvm|md|dm|iscsi|neednet|nfs|retry|live|multipath|zfcp|znet|cio_accept|driver|fstab|auto|hostonly|info|udev|memdebug|emergency|cmdline|plymouth|split_lock|kiwi)/;

export function planBoot(cmdlineText: string, kernelInitArgs: string[] = []): BootPlan {
  const cmd = new Cmdline(cmdlineText);
  const warnings: string[] = [];

  const rootText = cmd.get('root');
  if (rootText === undefined || rootText === '') {
    throw new PlanError('No root= on the kernel command line. Add one, e.g. root=UUID=… , root=LABEL=… , root=/dev/sda2 or root=vdisk:LABEL=Windows:/VMs/linux.vhdx');
  }
  const root = parseRoot(rootText);

  const seconds = (key: string, fallback: number): number => {
    const v = cmd.get(key);
    if (v === undefined) return fallback;
    if (!/^\d+(\.\d+)?$/.test(v)) {
      warnings.push(`${key}=${v} is not a number of seconds; using ${fallback}`);
      return fallback;
    }
    return Number(v);
  };

  const breakAt: BreakPoint[] = [];
  for (const v of cmd.all('rd.break')) {
    const points = v === '' ? ['pre-switch'] : v.split(',');
    for (const p of points) {
      if (p === 'pre-mount' || p === 'pre-switch') breakAt.push(p);
      else warnings.push(`rd.break=${p} is not a break point vdboot knows; use rd.break=pre-mount or rd.break=pre-switch`);
    }
  }

  let shell = true;
  const shellValue = cmd.get('rd.shell');
  if (shellValue !== undefined) {
    if (shellValue === '0' || shellValue === 'no' || shellValue === 'false') shell = false;
    else if (!(shellValue === '' || shellValue === '1' || shellValue === 'yes' || shellValue === 'true')) {
      warnings.push(`rd.shell=${shellValue} is neither 0 nor 1; the rescue shell stays on`);
    }
  }

  // `ro` and `rw`: the last one on the line wins, as with the kernel.
  let readOnly = true;
  for (const p of cmd.params) {
    if (p.value === undefined && (p.key === 'ro' || p.key === 'rw')) readOnly = p.key === 'ro';
  }

  const rootFsType = cmd.get('rootfstype') || undefined;
  const init = cmd.get('init') || undefined;
  if (init !== undefined && !init.startsWith('/')) warnings.push(`init=${init} is not an absolute path; it is looked up inside the root as /${init}`);

  const plan: BootPlan = {
    root,
    rootFsType,
    rootFlags: cmd.get('rootflags') ?? '',
    readOnly,
    init: init === undefined ? undefined : init.startsWith('/') ? init : `/${init}`,
    initArgs: [...kernelInitArgs.filter((a) => !cmd.initArgs.includes(a)), ...cmd.initArgs],
    rootWait: cmd.has('rootwait'),
    rootDelaySec: seconds('rootdelay', 0),
    timeoutSec: seconds('rd.timeout', 30),
    breakAt,
    shell,
    quiet: cmd.has('quiet'),
    debug: cmd.has('rd.vdboot.debug') || cmd.has('rd.debug'),
    warnings,
  };

  // Keys vdboot reads later (vdisk/tmpfs options) are consumed here so they draw no warning.
  for (const key of ['rd.vdisk.root', 'rd.vdisk.mode', 'rd.vdisk.map', 'rd.vdisk.expand', 'rd.vdisk.attach', 'rd.tmpfs.size', 'rd.tmpfs.imgfile']) cmd.all(key);
  for (const p of cmd.unused(OWN_NAMESPACES)) {
    warnings.push(`unknown option ${p.key}${p.value === undefined ? '' : `=${p.value}`} is ignored (vdboot knows: rd.break, rd.shell, rd.timeout, rd.vdboot.debug, rd.vdisk.*, rd.tmpfs.*)`);
  }
  for (const p of cmd.params) {
    if (FOREIGN_RD.test(p.key)) warnings.push(`${p.key} is a dracut option vdboot does not implement; it is ignored`);
  }
  return plan;
}

/** root= forms: a device spec, vdisk:[HOST:]PATH, tmpfs:HOST:PATH. */
function parseRoot(text: string): RootSource {
  if (text.startsWith('vdisk:')) {
    const rest = text.slice('vdisk:'.length);
    const { host, path } = splitHostPath(rest, 'vdisk');
    return host === undefined ? { kind: 'vdisk', path } : { kind: 'vdisk', host, path };
  }
  if (text.startsWith('tmpfs:')) {
    const rest = text.slice('tmpfs:'.length);
    const { host, path } = splitHostPath(rest, 'tmpfs');
    if (host === undefined) throw new PlanError(`root=${text}: name the partition that holds the archive, e.g. root=tmpfs:LABEL=USB:/images/root.tar.zst`);
    return { kind: 'tmpfs', host, path };
  }
  const device = parseDeviceSpec(text);
  if (!device) {
    throw new PlanError(`root=${text} is not a device vdboot understands. Use /dev/NAME, UUID=…, LABEL=…, PARTUUID=…, PARTLABEL=…, or vdisk:HOST:PATH for an image file`);
  }
  return { kind: 'block', device };
}

/**
 * HOST:PATH where PATH begins with `/`: the host spec ends at the first `:/`.
 * A lone PATH (no `:/`) leaves the host to be searched.
 */
function splitHostPath(text: string, kind: string): { host?: DeviceSpec; path: string } {
  const cut = text.indexOf(':/');
  if (cut < 0) {
    const path = text.replace(/\\/g, '/');
    if (!path.startsWith('/')) throw new PlanError(`root=${kind}:${text}: the path must start with /, e.g. root=${kind}:LABEL=Windows:/VMs/linux.vhdx`);
    return { path };
  }
  const hostText = text.slice(0, cut);
  const host = parseDeviceSpec(hostText);
  if (!host) throw new PlanError(`root=${kind}:${text}: "${hostText}" is not a device spec; use LABEL=…, UUID=…, PARTUUID=… or /dev/NAME before the path`);
  return { host, path: text.slice(cut + 1).replace(/\\/g, '/') };
}
