/**
 * The boot plan: the kernel command line turned into plain data, by a pure function.
 * The same plan drives the real boot (execute.ts) and the host's dry run.
 */
import { Cmdline } from './cmdline.ts';
import { type DeviceSpec, formatDeviceSpec, parseDeviceSpec } from './devspec.ts';
import { planStack, type StackOptions } from './stack-plan.ts';
import { planNet, type NetOptions } from './net-cmdline.ts';
import { parseNbdUrl, type NbdUrl } from '../formats/nbd.ts';

export type RootSource =
  /** root on a block device: root=/dev/…, UUID=, LABEL=, PARTUUID=, PARTLABEL= */
  | { kind: 'block'; device: DeviceSpec }
  /** root=vdisk:[HOST:]PATH — an image file on a host filesystem (HOST undefined: search every partition) */
  | { kind: 'vdisk'; host?: DeviceSpec; path: string; nbd?: NbdUrl }
  /** root=tmpfs:HOST:PATH (or root=tmpfs:HOST rd.tmpfs.imgfile=PATH) — an archive unpacked into a tmpfs root; size: rd.tmpfs.size= as written */
  | { kind: 'tmpfs'; host: DeviceSpec; path: string; size?: string };

export type BreakPoint = 'pre-mount' | 'pre-switch';

/** rd.vdisk.root: which partition of the image is root. */
export type VdiskRootChoice =
  /**
   * GPT "Linux root (x86-64)", else the only Linux filesystem, else the unpartitioned whole
   * disk; `subvol`: rootflags= names a btrfs subvolume (subvol=/subvolid=), so among several
   * Linux filesystems (Fedora's /boot ext4 beside its btrfs) the only btrfs is root
   */
  | { by: 'auto'; subvol?: string }
  | { by: 'number'; number: number }
  | { by: 'spec'; spec: DeviceSpec };

/** How the virtual disk may be written: rw (the image takes the writes), ro, snapshot (writes go to RAM). */
export type VdiskMode = 'rw' | 'ro' | 'snapshot';
/** The data path (DESIGN §3): auto picks the fastest one that is correct. */
export type VdiskMapPath = 'auto' | 'direct' | 'loop' | 'nbd';

/** An image to attach without making it root (rd.vdisk.attach, rd.ntfsloop). */
export interface VdiskAttach {
  host?: DeviceSpec;
  path: string;
  /** rd.vdisk.attach=nbd://SERVER[:PORT]/EXPORT: the image is an export of an NBD server */
  nbd?: NbdUrl;
  /** the option that asked for it, for messages */
  from: string;
}

/** rd.vdisk.bitlocker.key=KEYPATH[:KEYDEV] */
export interface BitLockerKeyOption {
  path: string;
  /** where the file is; undefined: every partition vdboot reads is searched */
  device?: DeviceSpec;
}

/** rd.vdisk.bitlocker.key's value: KEYPATH[:KEYDEV]; a message for a malformed one. */
export function parseBitLockerKey(text: string, parseSpec: (t: string) => DeviceSpec | undefined = parseDeviceSpec): BitLockerKeyOption | string {
  const colon = text.indexOf(':');
  const path = colon < 0 ? text : text.slice(0, colon);
  const devText = colon < 0 ? undefined : text.slice(colon + 1);
  if (!path.startsWith('/')) return `rd.vdisk.bitlocker.key=${text}: the key file's path must start with /, e.g. rd.vdisk.bitlocker.key=/bitlocker.txt:LABEL=KEYS`;
  if (devText === undefined || devText === '') return { path };
  const device = parseSpec(devText);
  if (!device) return `rd.vdisk.bitlocker.key=${text}: ${devText} is not a device (use /dev/NAME, UUID=, LABEL=, PARTUUID= or PARTLABEL=)`;
  return { path, device };
}

/** How long I/O on a network image waits for a server that went away, by default (rd.vdisk.nbd.timeout=). */
export const NBD_RECONNECT_DEFAULT_S = 300;

export interface VdiskOptions {
  root: VdiskRootChoice;
  mode: VdiskMode;
  map: VdiskMapPath;
  /** rd.vdisk.expand (default on): expand a dynamic image in place before a rw mapping */
  expand: boolean;
  /**
   * rd.vdisk.allow-outside=1: the image may name files outside its folder, absolute paths
   * and device nodes (extents, data files, parents, partition images). Absent: refused.
   */
  allowOutside?: boolean;
  attach: VdiskAttach[];
  /** rd.vdisk.bitlocker.key=KEYPATH[:KEYDEV]: the key of a BitLocker host partition, in a file */
  bitlockerKey?: BitLockerKeyOption;
  /** the compatibility syntax the vdisk root came from (rd.hostdev, loop=), for the console */
  compat?: string;
  /** rd.vdisk.overlay.size=: the most RAM a snapshot's writes may take (a tmpfs size: 2G, 50%) */
  overlaySize?: string;
  /** rd.vdisk.overlay=: the first image's writes go to a persistent overlay on a local disk */
  overlay?: OverlayOption;
  /**
   * rd.vdisk.nbd.timeout=S: how long I/O on a network image waits for its server to come
   * back while vdboot's reconnect daemon retries (undefined: NBD_RECONNECT_DEFAULT_S)
   */
  nbdTimeout?: number;
}

/**
 * rd.vdisk.overlay=DEVICE or DEVICE:/PATH: where a client's writes to a shared image are
 * kept across reboots (overlay.ts). `init`: rd.vdisk.overlay.init — "blank" (=1) makes an
 * overlay on a device with no signature; "reset" also replaces an overlay made over another
 * image (its writes are dropped); "no" (default) uses only an overlay that exists.
 */
export interface OverlayOption {
  device: DeviceSpec;
  /** a preallocated file on the device's filesystem (NTFS, exFAT, FAT) instead of the whole device */
  path?: string;
  init: 'no' | 'blank' | 'reset';
  /** the option as written, for messages */
  text: string;
}

/** rd.vdisk.overlay's value: a device spec, or DEVICE:/PATH for a file; a message for anything else. */
export function parseOverlaySpec(text: string): { device: DeviceSpec; path?: string } | string {
  const example = 'e.g. rd.vdisk.overlay=PARTLABEL=vdboot-overlay or rd.vdisk.overlay=LABEL=DATA:/vdboot/client.cow';
  const cut = text.indexOf(':/');
  if (cut < 0) {
    const device = parseDeviceSpec(text);
    return device ? { device } : `rd.vdisk.overlay=${text} is not a device (/dev/NAME, UUID=, LABEL=, PARTUUID=, PARTLABEL=) nor DEVICE:/PATH of a file; ${example}`;
  }
  const devText = text.slice(0, cut);
  const path = text.slice(cut + 1).replace(/\\/g, '/');
  const device = parseDeviceSpec(devText);
  if (!device) return `rd.vdisk.overlay=${text}: "${devText}" is not a device spec; use LABEL=…, UUID=…, PARTUUID=… or /dev/NAME before the path, ${example}`;
  if (path === '/' || path.endsWith('/')) return `rd.vdisk.overlay=${text}: ${path} names a folder, not the overlay file; ${example}`;
  return { device, path };
}

export interface BootPlan {
  root: RootSource;
  /** rd.vdisk.*: how image files (root=vdisk: and attached ones) are put on the kernel */
  vdisk: VdiskOptions;
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
  /** rd.vdboot.kexec and the marker of a boot that already jumped (kexec.ts) */
  kexec: KexecSetting;
  /** rd.luks.*, rd.lvm.*, resume=: the layers between a partition and the root filesystem */
  stack: StackOptions;
  /** ip=, ifname=, rd.neednet: the network, for an NBD image or when asked */
  net: NetOptions;
  /** things the person at the console should know: unknown or malformed keys */
  warnings: string[];
}

/**
 * rd.vdboot.kexec: when to start the root's own kernel instead of going on with this one.
 * auto (default): when the root's newest kernel is newer than the running one, or the root
 * has no modules for the running one; on (=1): the root's newest kernel whenever it is not
 * the running one; off (=0): never; version: that kernel.
 */
export interface KexecSetting {
  mode: 'auto' | 'on' | 'off' | 'version';
  /** for mode "version": the release, as in /boot/vmlinuz-RELEASE */
  version?: string;
  /** rd.vdboot.kexeced=1 is on the command line: this boot is the jump's, never jump again */
  done: boolean;
}

/** The marker vdboot adds to the command line of the kernel it starts with kexec. */
export const KEXEC_MARKER = 'rd.vdboot.kexeced';

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
const OWN_NAMESPACES = ['rd.vdboot.', 'rd.vdisk.', 'rd.tmpfs.', 'rd.break', 'rd.shell', 'rd.timeout', 'rd.luks', 'rd.lvm'];

/** dracut options that vdboot does not implement: a warning says they are ignored. */
const FOREIGN_RD = /^rd\.(md|dm|iscsi|nfs|retry|live|multipath|zfcp|znet|cio_accept|driver|fstab|auto|hostonly|info|udev|memdebug|emergency|cmdline|plymouth|split_lock|kiwi)/;

export function planBoot(cmdlineText: string, kernelInitArgs: string[] = []): BootPlan {
  const cmd = new Cmdline(cmdlineText);
  const warnings: string[] = [];

  const vdisk = planVdiskOptions(cmd, warnings);
  const subvol = (cmd.get('rootflags') ?? '').split(',').find((o) => /^subvol(id)?=./.test(o));
  if (subvol && vdisk.root.by === 'auto') vdisk.root = { by: 'auto', subvol };
  const compatRoot = compatVdiskRoot(cmd, vdisk, warnings);
  const rootText = cmd.get('root');
  if (!compatRoot && (rootText === undefined || rootText === '')) {
    throw new PlanError('No root= on the kernel command line. Add one, e.g. root=UUID=… , root=LABEL=… , root=/dev/sda2 or root=vdisk:LABEL=Windows:/VMs/linux.vhdx');
  }
  const root = compatRoot ?? parseRoot(rootText!, cmd.get('rd.tmpfs.imgfile'));
  const tmpfsSize = cmd.get('rd.tmpfs.size');
  if (root.kind === 'tmpfs' && tmpfsSize) root.size = tmpfsSize;
  // A tmpfs root only reads the images it attaches (the archive's host is never written).
  if (root.kind === 'tmpfs' && cmd.get('rd.vdisk.mode') === undefined) vdisk.mode = 'ro';
  // A network image is shared by many clients: each one's writes stay in its own RAM overlay.
  const nbdImages = (root.kind === 'vdisk' && root.nbd ? 1 : 0) + vdisk.attach.filter((a) => a.nbd).length;
  if (nbdImages && cmd.get('rd.vdisk.mode') === undefined) vdisk.mode = 'snapshot';
  const net = planNet({ ip: cmd.all('ip'), ifname: cmd.all('ifname'), neednet: cmd.get('rd.neednet') }, warnings);
  if (nbdImages) net.need = true;
  const overlaySize = cmd.get('rd.vdisk.overlay.size');
  const overlay = planOverlayOption(cmd, nbdImages + (root.kind === 'vdisk' && !root.nbd ? 1 : 0) + vdisk.attach.filter((a) => !a.nbd).length, warnings);
  if (overlay) {
    vdisk.overlay = overlay;
    if (cmd.get('rd.vdisk.mode') === undefined) vdisk.mode = 'snapshot';
    if (vdisk.mode !== 'snapshot') {
      throw new PlanError(`rd.vdisk.overlay=${overlay.text} keeps the image's writes on ${formatDeviceSpec(overlay.device)} and never writes the image, but rd.vdisk.mode=${vdisk.mode} asks ${vdisk.mode === 'rw' ? 'to write the image itself' : 'to write nothing'}. Remove one of the two.`);
    }
    if (overlaySize !== undefined) warnings.push(`rd.vdisk.overlay.size=${overlaySize} is ignored: the writes go to the persistent overlay rd.vdisk.overlay=${overlay.text}, whose size is its device's`);
  }
  if (overlaySize !== undefined && !overlay) {
    if (/^\d+[kKmMgG%]?$/.test(overlaySize)) vdisk.overlaySize = overlaySize;
    else warnings.push(`rd.vdisk.overlay.size=${overlaySize} is not a size (e.g. 2G, 512M or 25%); the overlay is limited by /run only`);
  }
  const nbdTimeout = cmd.get('rd.vdisk.nbd.timeout');
  if (nbdTimeout !== undefined) {
    if (/^\d+$/.test(nbdTimeout) && Number(nbdTimeout) >= 1 && Number(nbdTimeout) <= 86400) vdisk.nbdTimeout = Number(nbdTimeout);
    else warnings.push(`rd.vdisk.nbd.timeout=${nbdTimeout} is not a number of seconds from 1 to 86400; I/O waits ${NBD_RECONNECT_DEFAULT_S} s for a server that went away`);
  }

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
    vdisk,
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
    kexec: planKexec(cmd, warnings),
    stack: planStack(cmd, warnings),
    net,
    warnings,
  };

  // Resuming an image's system needs the record a read-write boot leaves (resume-record.ts):
  // a snapshot's writes, the hibernation image among them, live in RAM and are gone.
  if (plan.stack.resume && root.kind === 'vdisk' && plan.vdisk.mode !== 'rw') {
    warnings.push(`resume=${cmd.get('resume')} is ignored: rd.vdisk.mode=${plan.vdisk.mode} ${plan.vdisk.mode === 'ro' ? 'writes nothing to the image' : 'keeps this boot\'s writes in RAM'}, so there is no hibernation image to resume and none can be made; resuming inside an image needs rd.vdisk.mode=rw`);
    delete plan.stack.resume;
  }
  // rd.vdisk.mode is the images' mode: it makes a root inside the image read-only, not a
  // plain root beside rd.vdisk.attach= images (a root that turns out to lie on an attached
  // read-only image is mounted read-only at boot, as its device is: init.ts).
  if (vdisk.mode === 'ro' && !readOnly && root.kind === 'vdisk') {
    warnings.push('rd.vdisk.mode=ro makes the image read-only, so the root is mounted read-only despite rw');
    plan.readOnly = true;
  }
  // Keys vdboot reads later (tmpfs options) are consumed here so they draw no warning.
  for (const key of ['rd.tmpfs.size', 'rd.tmpfs.imgfile']) cmd.all(key);
  for (const p of cmd.unused(OWN_NAMESPACES)) {
    warnings.push(`unknown option ${p.key}${p.value === undefined ? '' : `=${p.value}`} is ignored (vdboot knows: rd.break, rd.shell, rd.timeout, rd.neednet, rd.vdboot.debug, rd.vdboot.kexec, rd.vdisk.*, rd.tmpfs.*, rd.luks, rd.luks.uuid/.name/.key/.options, rd.lvm, rd.lvm.vg/.lv)`);
  }
  for (const p of cmd.params) {
    if (FOREIGN_RD.test(p.key)) warnings.push(`${p.key} is a dracut option vdboot does not implement; it is ignored`);
  }
  return plan;
}

/**
 * rd.vdisk.overlay= and rd.vdisk.overlay.init=. A malformed overlay stops the boot: going on
 * with a RAM snapshot would lose every write the user meant to keep at the next power-off.
 */
function planOverlayOption(cmd: Cmdline, images: number, warnings: string[]): OverlayOption | undefined {
  const text = cmd.get('rd.vdisk.overlay');
  const initText = cmd.get('rd.vdisk.overlay.init');
  if (text === undefined || text === '') {
    if (initText !== undefined) warnings.push(`rd.vdisk.overlay.init=${initText} is ignored: there is no rd.vdisk.overlay=`);
    return undefined;
  }
  const spec = parseOverlaySpec(text);
  if (typeof spec === 'string') throw new PlanError(`${spec}. The boot stops rather than keep the writes in RAM, where they would be lost at power-off.`);
  let init: OverlayOption['init'] = 'no';
  if (initText !== undefined) {
    if (initText === '' || initText === '1' || initText === 'yes' || initText === 'true') init = 'blank';
    else if (initText === 'reset') init = 'reset';
    else if (!(initText === '0' || initText === 'no' || initText === 'false')) throw new PlanError(`rd.vdisk.overlay.init=${initText} is not 0, 1 or reset (1: make a new overlay on a device with no filesystem or other signature; reset: also replace an overlay made over another image, dropping its writes)`);
  }
  if (images === 0) {
    warnings.push(`rd.vdisk.overlay=${text} is ignored: no image is booted or attached (root=vdisk:…, rd.vdisk.attach=…)`);
    return undefined;
  }
  if (images > 1) warnings.push(`rd.vdisk.overlay=${text} keeps the writes of the first image (vdisk0) only; the other images' writes stay in RAM`);
  return { ...spec, init, text };
}

/** rd.vdboot.kexec=auto|0|1|VERSION and the marker rd.vdboot.kexeced=1. */
function planKexec(cmd: Cmdline, warnings: string[]): KexecSetting {
  const marker = cmd.get(KEXEC_MARKER);
  const done = marker !== undefined && marker !== '0';
  const v = cmd.get('rd.vdboot.kexec');
  if (v === undefined || v === 'auto') return { mode: 'auto', done };
  if (v === '0' || v === 'no' || v === 'false') return { mode: 'off', done };
  if (v === '' || v === '1' || v === 'yes' || v === 'true') return { mode: 'on', done };
  if (/^\d+\.\d+[\w.+~-]*$/.test(v)) return { mode: 'version', version: v, done };
  warnings.push(`rd.vdboot.kexec=${v} is not auto, 0, 1 or a kernel release such as 6.12.118+deb12-amd64; using auto`);
  return { mode: 'auto', done };
}

/** root= forms: a device spec, vdisk:[HOST:]PATH, tmpfs:HOST:PATH. */
function parseRoot(text: string, tmpfsImgfile?: string): RootSource {
  if (text.startsWith('vdisk:nbd:')) {
    const url = parseNbdUrl(text.slice('vdisk:'.length));
    if (typeof url === 'string') throw new PlanError(`root=${text}: ${url}`);
    return { kind: 'vdisk', path: `/${url.export}`, nbd: url };
  }
  if (text.startsWith('vdisk:')) {
    const rest = text.slice('vdisk:'.length);
    const { host, path } = splitHostPath(rest, 'vdisk');
    return host === undefined ? { kind: 'vdisk', path } : { kind: 'vdisk', host, path };
  }
  if (text.startsWith('tmpfs:')) {
    const rest = text.slice('tmpfs:'.length);
    // dracut's tmpfs-root form: root=tmpfs:HOST rd.tmpfs.imgfile=PATH
    if (tmpfsImgfile && !rest.includes(':/')) return { kind: 'tmpfs', ...splitHostPath(`${rest}:${tmpfsImgfile.startsWith('/') ? '' : '/'}${tmpfsImgfile}`, 'tmpfs'), host: tmpfsHost(rest, text) };
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

function tmpfsHost(hostText: string, text: string): DeviceSpec {
  const host = parseDeviceSpec(hostText);
  if (!host) throw new PlanError(`root=${text}: "${hostText}" is not a device spec; use LABEL=…, UUID=…, PARTUUID=… or /dev/NAME (with rd.tmpfs.imgfile=/path/to/root.tar.gz)`);
  return host;
}

/**
 * HOST:PATH where PATH begins with `/`: the host spec ends at the first `:/`.
 * A lone PATH (no `:/`) leaves the host to be searched.
 */
function splitHostPath(text: string, kind: string, prefix = `root=${kind}:`): { host?: DeviceSpec; path: string } {
  const cut = text.indexOf(':/');
  if (cut < 0) {
    const path = text.replace(/\\/g, '/');
    if (!path.startsWith('/')) throw new PlanError(`${prefix}${text}: the path must start with /, e.g. ${prefix}LABEL=Windows:/VMs/linux.vhdx`);
    return { path };
  }
  const hostText = text.slice(0, cut);
  const host = parseDeviceSpec(hostText);
  if (!host) throw new PlanError(`${prefix}${text}: "${hostText}" is not a device spec; use LABEL=…, UUID=…, PARTUUID=… or /dev/NAME before the path`);
  return { host, path: text.slice(cut + 1).replace(/\\/g, '/') };
}

const ROOT_BY_SPEC = /^(UUID|LABEL|PARTUUID|PARTLABEL)=/;

/** rd.vdisk.root, .mode, .map, .expand, .allow-outside, .attach and rd.ntfsloop. */
function planVdiskOptions(cmd: Cmdline, warnings: string[]): VdiskOptions {
  const out: VdiskOptions = { root: { by: 'auto' }, mode: 'rw', map: 'auto', expand: true, attach: [] };
  const rootText = cmd.get('rd.vdisk.root');
  if (rootText !== undefined && rootText !== '' && rootText !== 'auto') {
    if (/^\d+$/.test(rootText) && Number(rootText) >= 1 && Number(rootText) <= 256) out.root = { by: 'number', number: Number(rootText) };
    else {
      // /dev/mapper/VG-LV and /dev/VG/LV name an LV inside the image (found after activation)
      const spec = ROOT_BY_SPEC.test(rootText) || /^\/dev\/(mapper\/[^/]+|[^/]+\/[^/]+)$/.test(rootText) ? parseDeviceSpec(rootText) : undefined;
      if (spec) out.root = { by: 'spec', spec };
      else warnings.push(`rd.vdisk.root=${rootText} is not a partition number, PARTUUID=, PARTLABEL=, UUID=, LABEL=, /dev/mapper/VG-LV, /dev/VG/LV or auto; using auto`);
    }
  }
  const mode = cmd.get('rd.vdisk.mode');
  if (mode !== undefined) {
    if (mode === 'rw' || mode === 'ro' || mode === 'snapshot') out.mode = mode;
    else warnings.push(`rd.vdisk.mode=${mode} is not rw, ro or snapshot; using rw`);
  }
  const map = cmd.get('rd.vdisk.map');
  if (map !== undefined) {
    if (map === 'auto' || map === 'direct' || map === 'loop' || map === 'nbd') out.map = map;
    else warnings.push(`rd.vdisk.map=${map} is not auto, direct, loop or nbd; using auto`);
  }
  const expand = cmd.get('rd.vdisk.expand');
  if (expand !== undefined) {
    if (expand === '0' || expand === 'no' || expand === 'false') out.expand = false;
    else if (!(expand === '' || expand === '1' || expand === 'yes' || expand === 'true')) warnings.push(`rd.vdisk.expand=${expand} is neither 0 nor 1; expansion stays on`);
  }
  const outside = cmd.get('rd.vdisk.allow-outside');
  if (outside !== undefined) {
    if (outside === '' || outside === '1' || outside === 'yes' || outside === 'true') out.allowOutside = true;
    else if (!(outside === '0' || outside === 'no' || outside === 'false')) warnings.push(`rd.vdisk.allow-outside=${outside} is neither 0 nor 1; files outside the image's folder stay refused`);
  }
  const bitlockerKey = cmd.get('rd.vdisk.bitlocker.key');
  if (bitlockerKey !== undefined) {
    const k = parseBitLockerKey(bitlockerKey);
    if (typeof k === 'string') warnings.push(`${k}; the key is asked on the console instead`);
    else out.bitlockerKey = k;
  }
  const attachOne = (key: string, text: string) => {
    if (key === 'rd.vdisk.attach' && text.startsWith('nbd:')) {
      const url = parseNbdUrl(text);
      if (typeof url === 'string') warnings.push(`${key}=${url}; that image is not attached`);
      else out.attach.push({ path: `/${url.export}`, nbd: url, from: `${key}=${text}` });
      return;
    }
    try {
      const { host, path } = splitHostPath(text, key, `${key}=`);
      out.attach.push(host ? { host, path, from: `${key}=${text}` } : { path, from: `${key}=${text}` });
    } catch (e) {
      warnings.push(`${(e as Error).message}; that image is not attached`);
    }
  };
  // In command-line order: vdisk0, vdisk1, … follow the order the images are named in.
  cmd.all('rd.vdisk.attach');
  cmd.all('rd.ntfsloop');
  for (const p of cmd.params) if (p.key === 'rd.vdisk.attach' || p.key === 'rd.ntfsloop') attachOne(p.key, p.value ?? '');
  return out;
}

/**
 * Compatibility syntaxes that make an image the root (DESIGN §2):
 *  - dracut-vdfuseloop: rd.hostdev=HOST rd.vdisk=PATH [rd.vdloop=/dev/vdhost/PartitionN]
 *  - Wubi / initramfs-tools: root=HOST loop=PATH [loopflags=] [loopfstype=]
 */
function compatVdiskRoot(cmd: Cmdline, vdisk: VdiskOptions, warnings: string[]): RootSource | undefined {
  const hostdev = cmd.get('rd.hostdev');
  const vdPath = cmd.get('rd.vdisk');
  const vdloop = cmd.get('rd.vdloop');
  if (hostdev !== undefined || vdPath !== undefined) {
    if (!hostdev || !vdPath) {
      throw new PlanError(`rd.hostdev= and rd.vdisk= go together (dracut-vdfuseloop syntax): rd.hostdev=LABEL=Windows rd.vdisk=/VMs/linux.vdi; or use root=vdisk:HOST:PATH`);
    }
    const host = parseDeviceSpec(hostdev);
    if (!host) throw new PlanError(`rd.hostdev=${hostdev} is not a device spec; use LABEL=…, UUID=…, PARTUUID=… or /dev/NAME`);
    const path = vdPath.replace(/\\/g, '/');
    if (!path.startsWith('/')) throw new PlanError(`rd.vdisk=${vdPath}: the path must start with /, e.g. rd.vdisk=/VMs/linux.vdi`);
    if (vdloop !== undefined) {
      const m = /^\/dev\/vdhost\/Partition(\d+)$/.exec(vdloop);
      if (m && vdisk.root.by === 'auto') vdisk.root = { by: 'number', number: Number(m[1]) };
      else if (!m) warnings.push(`rd.vdloop=${vdloop} is not /dev/vdhost/PartitionN; the root partition is chosen by rd.vdisk.root`);
    }
    const root = cmd.get('root');
    if (root !== undefined && root !== '' && !root.startsWith('vdisk:') && !/^\/dev\/(loop|vdhost|mapper\/vdisk)/.test(root)) {
      warnings.push(`root=${root} is ignored: rd.hostdev= with rd.vdisk= boot the image's root partition`);
    }
    vdisk.compat = 'rd.hostdev/rd.vdisk';
    return { kind: 'vdisk', host, path };
  }
  const loop = cmd.get('loop');
  if (loop !== undefined && loop !== '') {
    const rootText = cmd.get('root');
    const host = rootText ? parseDeviceSpec(rootText) : undefined;
    if (!host) throw new PlanError(`loop=${loop} needs root= to name the partition that holds the file (Wubi syntax: root=UUID=… loop=/ubuntu/disks/root.disk)`);
    const path = loop.replace(/\\/g, '/');
    if (!path.startsWith('/')) throw new PlanError(`loop=${loop}: the path must start with /, e.g. loop=/ubuntu/disks/root.disk`);
    const flags = cmd.get('loopflags');
    if (flags !== undefined && flags !== '' && flags !== 'rw' && flags !== 'defaults') warnings.push(`loopflags=${flags} is ignored: use rootflags= for the root's mount options`);
    cmd.get('loopfstype');
    vdisk.compat = 'loop=';
    return { kind: 'vdisk', host, path };
  }
  return undefined;
}
