/**
 * The root's own kernel: when the root just mounted holds a newer kernel in /boot than the
 * one running, or has no modules for the running one, vdboot starts that kernel with
 * kexec_file_load instead of switching to the root, with an initramfs assembled here:
 * vdboot's own files (this initramfs, read back from the rootfs we run on) and the new
 * kernel's modules for the same module set, with a manifest computed from the root's
 * modules.dep / modules.alias / modules.builtin. The new kernel's command line is this
 * one plus rd.vdboot.kexeced=1, so the jump happens once.
 *
 * Order, and what each failure leaves:
 *  1. decide (nothing touched);
 *  2. assemble the initramfs in /run (RAM; the root is only read);
 *  3. kexec_file_load: the kernel copies both files and checks the signature where its
 *     policy asks (Secure Boot lockdown). A refusal ends the step here: the boot goes on
 *     with the running kernel, and the console says what will be missing;
 *  4. from here on there is no way back: the root is unmounted, the image's devices and
 *     the host taken down (shutdown.ts's takeDownInPlace), everything synced;
 *  5. reboot(LINUX_REBOOT_CMD_KEXEC). Nothing is written to the root or the image.
 */
import { cpioLayout, type CpioInput } from '../formats/cpio.ts';
import { bzImageRelease, compareKernelReleases, manifestForKernel, parseModulesBuiltin, parseModulesDep, parseSoftdeps, type ModuleIndex } from '../formats/kmod-index.ts';
import { MANIFEST_PATH } from '../formats/manifest.ts';
import { utf8Encode } from '../formats/text.ts';
import { isSysError, MS, O, REBOOT, S, type Sys } from '../sys/sys.ts';
import { BootFailure, type InitContext } from './context.ts';
import { exists, mkdirs, readText, readTextOr } from './fsutil.ts';
import { KEXEC_MARKER, type KexecSetting } from './plan.ts';
import { takeDownInPlace } from './shutdown.ts';

/** A kernel found in the root's /boot. */
export interface RootKernel {
  release: string;
  /** path inside the root, e.g. /boot/vmlinuz-6.12.118+deb12-amd64 */
  path: string;
  /** the root has /lib/modules/RELEASE/modules.dep */
  hasModules: boolean;
}

export type KexecDecision =
  | { jump: true; kernel: RootKernel; reason: string }
  /** `warning`: what the person at the console should know when staying (modules missing) */
  | { jump: false; reason: string; warning?: string };

/**
 * Whether to start one of the root's kernels, and which: a pure function of the setting,
 * the running release, the root's kernels and whether the root has modules for the
 * running kernel.
 */
export function decideKexec(setting: KexecSetting, running: string, kernels: readonly RootKernel[], runningModulesPresent: boolean): KexecDecision {
  const usable = kernels.filter((k) => k.hasModules).sort((a, b) => compareKernelReleases(b.release, a.release));
  const listed = kernels.length ? kernels.map((k) => `${k.release}${k.hasModules ? '' : ' (no modules)'}`).join(', ') : 'none';
  const missing = runningModulesPresent ? undefined : `the root has no modules for the running kernel ${running} (no /lib/modules/${running}): drivers and filesystems beyond the initramfs's will not load in the booted system, nor will its firewall, sound or network modules`;
  const stay = (reason: string, extra?: string): KexecDecision => {
    const warning = missing ? `${missing}${extra ? `; ${extra}` : ''}` : undefined;
    return warning ? { jump: false, reason, warning } : { jump: false, reason };
  };
  if (setting.done) return stay(`this kernel was started by vdboot's kexec (${KEXEC_MARKER}=1): no second jump`);
  if (setting.mode === 'off') return stay('rd.vdboot.kexec=0', `the root's kernels: ${listed}; drop rd.vdboot.kexec=0 to boot the newest of them`);
  if (setting.mode === 'version') {
    const k = kernels.find((x) => x.release === setting.version);
    if (!k) return stay(`rd.vdboot.kexec=${setting.version}: the root has no /boot/vmlinuz-${setting.version}`, `the root's kernels: ${listed}`);
    if (!k.hasModules) return stay(`rd.vdboot.kexec=${setting.version}: the root has no /lib/modules/${setting.version} for it`, `the root's kernels: ${listed}`);
    if (k.release === running) return stay(`rd.vdboot.kexec=${setting.version}: that kernel is already running`);
    return { jump: true, kernel: k, reason: `rd.vdboot.kexec=${setting.version} asks for it` };
  }
  const newest = usable[0];
  // A root without kernels (a container-like root, or /boot on a partition of its own that
  // is not mounted yet) is common and no mistake: said only with rd.vdboot.debug.
  if (!newest && kernels.length === 0) return { jump: false, reason: 'the root has no kernel in /boot (vmlinuz-RELEASE)' };
  if (!newest) return stay(`none of the root's kernels (${listed}) has its modules in the root`, `install the modules of one of them (${listed})`);
  if (newest.release === running) return stay(`the root's newest kernel ${newest.release} is the running one`);
  if (setting.mode === 'on') return { jump: true, kernel: newest, reason: `rd.vdboot.kexec=1 (running ${running})` };
  if (compareKernelReleases(newest.release, running) > 0) return { jump: true, kernel: newest, reason: `it is newer than the running ${running}` };
  if (!runningModulesPresent) return { jump: true, kernel: newest, reason: `the root has no modules for the running ${running}` };
  return stay(`the running kernel ${running} is at least as new as the root's newest (${newest.release})`);
}

/** The kernels in `root`/boot: vmlinuz-RELEASE files, with whether their modules are there. */
export function rootKernels(sys: Sys, root: string): RootKernel[] {
  let names: string[] = [];
  try { names = sys.readdir(`${root}/boot`); } catch { return []; }
  const out: RootKernel[] = [];
  for (const n of names.sort()) {
    const m = /^vmlinuz-(.+)$/.exec(n);
    if (!m || /\.(old|bak|sig|efi\.signed)$/.test(n)) continue;
    try {
      if ((sys.stat(`${root}/boot/${n}`).mode & S.IFMT) !== S.IFREG) continue;
    } catch { continue; }
    out.push({ release: m[1]!, path: `/boot/${n}`, hasModules: exists(sys, `${root}/lib/modules/${m[1]}/modules.dep`) });
  }
  return out;
}

/**
 * The kexec step, after the root is mounted on `root`: returns when the boot goes on with
 * the running kernel (nothing to do, not wanted, or refused: then the console says why);
 * otherwise never returns.
 */
export function kexecRootKernel(ctx: InitContext, root: string): void {
  const { sys, log, plan } = ctx;
  const running = readTextOr(sys, '/proc/sys/kernel/osrelease') ?? ctx.manifest.kernelRelease;
  const kernels = rootKernels(sys, root);
  const decision = decideKexec(plan.kexec, running, kernels, exists(sys, `${root}/lib/modules/${running}`));
  if (!decision.jump) {
    if (decision.warning) log.warn(`staying on kernel ${running} (${decision.reason}): ${decision.warning}`);
    else log.debug(`kexec: staying on kernel ${running}: ${decision.reason}`);
    return;
  }
  const k = decision.kernel;
  log.info(`kexec: starting the root's kernel ${k.release} (${k.path}) instead of the running ${running}: ${decision.reason}`);
  const staying = (what: string): void => {
    const missing = exists(sys, `${root}/lib/modules/${running}`) ? '' : `; the root has no modules for ${running} (no /lib/modules/${running}), so drivers and filesystems beyond the initramfs's will not load`;
    log.warn(`${what}. Booting on with the running kernel ${running}${missing}. To stop trying, add rd.vdboot.kexec=0`);
  };

  // The coldplug child would compete for the CPU with the assembly below, for devices the
  // next kernel finds again by itself; switch_root would stop it soon anyway (should the
  // jump be refused, the booted system's udev loads what it did not).
  ctx.modules.stopColdplug();
  let initrdPath: string;
  try {
    const kernelPath = `${root}${k.path}`;
    checkKernelImage(sys, kernelPath, k.release);
    initrdPath = log.step('kexec initramfs', () => assembleInitramfs(ctx, root, k.release), (r) => `assembled an initramfs for ${k.release}: ${r.modules} modules, ${(r.bytes / 1048576).toFixed(1)} MiB${r.missing.length ? ` (${k.release} has none of: ${r.missing.join(', ')})` : ''}`).path;
  } catch (e) {
    staying(`Could not prepare kernel ${k.release} for kexec: ${(e as Error).message}`);
    return;
  }

  const cmdline = kexecCmdline(readTextOr(sys, '/proc/cmdline') ?? '');
  let t = sys.monotonicMs();
  const lap = (what: string): void => {
    const now = sys.monotonicMs();
    log.debug(`kexec: ${what} in ${((now - t) / 1000).toFixed(2)} s`);
    t = now;
  };
  try {
    loadKernel(sys, `${root}${k.path}`, initrdPath, cmdline);
    lap('kexec_file_load (the kernel copies, hashes and checks both files)');
  } catch (e) {
    staying(`The running kernel refused to load ${k.path} with kexec_file_load: ${explainKexecError(e)}`);
    return;
  } finally {
    try { sys.unlink(initrdPath); } catch { /* the kernel has its copy */ }
  }

  // From here on the root goes away: no way back to switch_root.
  if (ctx.ueventFd >= 0) {
    try { sys.close(ctx.ueventFd); } catch { /* closed */ }
    ctx.ueventFd = -1;
  }
  unmountRoot(ctx, root);
  lap('root unmounted');
  takeDownInPlace(sys, log, [root]);
  sys.sync();
  lap('devices and host taken down, synced');
  log.info(`kexec: jumping to ${k.release}`);
  try {
    sys.reboot(REBOOT.KEXEC);
  } catch (e) {
    throw new BootFailure(`kexec into ${k.release} failed after the root was unmounted (${(e as Error).message}). Reboot; add rd.vdboot.kexec=0 to boot with the running kernel ${running}.`);
  }
}

/**
 * This command line plus the marker (once), for the kernel started by kexec. The marker
 * goes before a lone `--`: what follows belongs to the init, and the kernel would pass the
 * marker on to it instead of keeping it in the command line.
 */
export function kexecCmdline(current: string): string {
  const text = current.replace(/[\r\n]+/g, ' ').trim();
  let dashes = -1;
  let inQuote = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') inQuote = !inQuote;
    else if (!inQuote && c === '-' && text[i + 1] === '-' && (i === 0 || text[i - 1] === ' ') && (i + 2 === text.length || text[i + 2] === ' ')) {
      dashes = i;
      break;
    }
  }
  const params = dashes < 0 ? text : text.slice(0, dashes).trimEnd();
  if (new RegExp(`(^|\\s)${KEXEC_MARKER.replace(/\./g, '\\.')}=`).test(params)) return text;
  const marked = `${params} ${KEXEC_MARKER}=1`.trim();
  return dashes < 0 ? marked : `${marked} ${text.slice(dashes)}`;
}

/** A damaged or foreign file is refused before anything else happens (kexec would say only ENOEXEC). */
function checkKernelImage(sys: Sys, path: string, release: string): void {
  const fd = sys.open(path, O.RDONLY | O.CLOEXEC);
  let head: Uint8Array;
  try {
    head = new Uint8Array(0x10000);
    head = head.subarray(0, sys.pread(fd, head, 0));
  } finally {
    sys.close(fd);
  }
  const found = bzImageRelease(head);
  if (!found) throw new Error(`${path} is not an x86 Linux kernel (no bzImage setup header "HdrS" at 0x202): damaged, or another architecture's`);
  if (found !== release) throw new Error(`${path} says it is kernel ${found}, not ${release}; its modules would not fit`);
}

function loadKernel(sys: Sys, kernelPath: string, initrdPath: string, cmdline: string): void {
  const kfd = sys.open(kernelPath, O.RDONLY | O.CLOEXEC);
  try {
    const ifd = sys.open(initrdPath, O.RDONLY | O.CLOEXEC);
    try {
      sys.kexecFileLoad(kfd, ifd, cmdline, 0);
    } finally {
      sys.close(ifd);
    }
  } finally {
    sys.close(kfd);
  }
}

/** kexec_file_load's errors, for the person at the console. */
export function explainKexecError(e: unknown): string {
  if (!isSysError(e)) return (e as Error).message;
  switch (e.code) {
    case 'EPERM': return 'EPERM: kexec is not allowed (Secure Boot lockdown with a kernel not signed by a key this kernel trusts, or kexec disabled by kernel.kexec_load_disabled)';
    case 'EKEYREJECTED': case 'ENOKEY': case 'EBADMSG': case 'EKEYEXPIRED': case 'EKEYREVOKED':
      return `${e.code}: the kernel's signature was rejected (sign it with a key in the kernel's or the machine owner's keyring, or boot without Secure Boot)`;
    case 'ENOEXEC': return 'ENOEXEC: not a kernel image the running kernel can load (damaged, compressed differently, or another architecture)';
    case 'ENOSYS': return 'ENOSYS: the running kernel was built without kexec_file_load (CONFIG_KEXEC_FILE)';
    case 'ENOMEM': return 'ENOMEM: not enough memory for the second kernel and its initramfs';
    case 'EBUSY': return 'EBUSY: another kexec image is being loaded';
    default: return e.message;
  }
}

const RUN_DIR = '/run/vdboot';
/** top-level mount points of early boot: their contents are not vdboot's files */
const API_DIRS = new Set(['proc', 'sys', 'dev', 'run', 'root', 'tmp']);

/**
 * The initramfs for `release` as a newc cpio in /run: this initramfs's files (read from
 * the rootfs we run on, without the mounts on it and without the running kernel's
 * modules), the new kernel's modules from `root`/lib/modules/RELEASE as they are
 * (compressed modules stay compressed), and its manifest.
 */
function assembleInitramfs(ctx: InitContext, root: string, release: string): { path: string; bytes: number; modules: number; missing: string[] } {
  const { sys, log } = ctx;
  let t = sys.monotonicMs();
  const lap = (what: string): void => {
    const now = sys.monotonicMs();
    log.debug(`kexec initramfs: ${what} in ${((now - t) / 1000).toFixed(2)} s`);
    t = now;
  };
  const modDir = `${root}/lib/modules/${release}`;
  const depText = readText(sys, `${modDir}/modules.dep`);
  const aliasText = readTextOr(sys, `${modDir}/modules.alias`) ?? '';
  const modinfoText = readTextOr(sys, `${modDir}/modules.builtin.modinfo`) ?? '';
  lap(`module index files of ${release} read (${((depText.length + aliasText.length + modinfoText.length) / 1048576).toFixed(1)} MiB of text)`);
  const dep = parseModulesDep(depText);
  const index: ModuleIndex = {
    release,
    ...dep,
    softdeps: parseSoftdeps(readTextOr(sys, `${modDir}/modules.softdep`) ?? ''),
    builtin: parseModulesBuiltin(readTextOr(sys, `${modDir}/modules.builtin`) ?? ''),
  };
  lap('modules.dep parsed');
  const loaded = loadedModules(sys);
  const made = manifestForKernel(index, aliasText, modinfoText, ctx.manifest, loaded);
  lap(`module index of ${release} read, ${made.files.length} modules chosen${loaded ? ` for the ${loaded.size} this boot loaded` : ''}`);
  const compressed = made.files.find((f) => /\.ko\.(xz|zst|gz)$/.test(f.rel));
  if (compressed) {
    const config = readTextOr(sys, `${root}/boot/config-${release}`);
    if (config !== undefined && !/^CONFIG_MODULE_DECOMPRESS=y$/m.test(config)) {
      throw new Error(`its modules are compressed (${compressed.rel}) and it cannot decompress them itself (no CONFIG_MODULE_DECOMPRESS in /boot/config-${release})`);
    }
  }

  const inputs: CpioInput[] = [];
  const skip = new Set([MANIFEST_PATH, `/lib/modules/${ctx.manifest.kernelRelease}`]);
  const rootDev = sys.stat('/');
  const walk = (dir: string): void => {
    for (const name of sys.readdir(dir === '' ? '/' : dir).sort()) {
      const path = `${dir}/${name}`;
      if (skip.has(path)) continue;
      const st = sys.lstat(path);
      const type = st.mode & S.IFMT;
      if (dir === '' && API_DIRS.has(name)) {
        inputs.push({ type: 'dir', path, mode: st.mode & 0o7777 });
        continue;
      }
      if (type === S.IFDIR) {
        inputs.push({ type: 'dir', path, mode: st.mode & 0o7777 });
        // another filesystem mounted here (not part of the initramfs)
        if (st.devMajor === rootDev.devMajor && st.devMinor === rootDev.devMinor) walk(path);
      } else if (type === S.IFREG) inputs.push({ type: 'external', path, source: path, size: st.size, mode: st.mode & 0o7777 });
      else if (type === S.IFLNK) inputs.push({ type: 'symlink', path, target: sys.readlink(path) });
      else if (type === S.IFCHR || type === S.IFBLK) inputs.push({ type: type === S.IFCHR ? 'char' : 'block', path, major: st.rdevMajor, minor: st.rdevMinor, mode: st.mode & 0o7777 });
    }
  };
  walk('');
  lap(`this initramfs's ${inputs.length} entries listed`);
  // the nodes the kernel needs before devtmpfs: /dev is a mount now, its own nodes hidden
  inputs.push({ type: 'char', path: 'dev/console', major: 5, minor: 1, mode: 0o600 });
  inputs.push({ type: 'char', path: 'dev/null', major: 1, minor: 3, mode: 0o666 });
  for (const f of made.files) {
    const path = `${modDir}/${f.rel}`;
    let size: number;
    try {
      const st = sys.stat(path);
      if ((st.mode & S.IFMT) !== S.IFREG) throw new Error('not a regular file');
      size = st.size;
    } catch (e) {
      throw new Error(`the root's /lib/modules/${release}/${f.rel} cannot be read (${isSysError(e) ? e.code : (e as Error).message}): its modules are incomplete; reinstall the kernel's package`);
    }
    inputs.push({ type: 'external', path: f.path, source: path, size, mode: 0o644 });
  }
  lap('module files looked up');
  inputs.push({ type: 'file', path: MANIFEST_PATH, data: utf8Encode(JSON.stringify(made.manifest) + '\n'), mode: 0o644 });
  lap('manifest written out');
  const osRelease = inputs.findIndex((i) => i.type === 'external' && i.path === '/etc/initrd-release');
  if (osRelease >= 0) {
    const text = readText(sys, '/etc/initrd-release').replace(/^VDBOOT_KERNEL=.*$/m, `VDBOOT_KERNEL="${release}"`);
    inputs[osRelease] = { type: 'file', path: '/etc/initrd-release', data: utf8Encode(text), mode: (inputs[osRelease] as { mode?: number }).mode ?? 0o644 };
  }

  const pieces = cpioLayout(inputs);
  lap('archive laid out');
  mkdirs(sys, RUN_DIR);
  const path = `${RUN_DIR}/kexec-initrd.cpio`;
  const fd = sys.open(path, O.WRONLY | O.CREAT | O.TRUNC | O.CLOEXEC, 0o600);
  let bytes = 0;
  try {
    for (const p of pieces) bytes += p instanceof Uint8Array ? writeAll(sys, fd, p) : copyFileInto(sys, fd, p.source, p.size);
  } finally {
    sys.close(fd);
  }
  lap(`cpio written to ${path}`);
  return { path, bytes, modules: made.files.length, missing: made.missing };
}

/**
 * The modules this boot loaded (/proc/modules' first column), or undefined when none are
 * (everything reached so far was built in, and the new kernel may need as modules what the
 * running one has built in) or the list cannot be read: then the whole running set goes.
 * The second boot runs on the same machine towards the same root, so these are what it
 * needs; the booted system loads the rest from the root's own /lib/modules.
 */
export function loadedModules(sys: Sys): Set<string> | undefined {
  const text = readTextOr(sys, '/proc/modules');
  if (text === undefined) return undefined;
  const names = new Set<string>();
  for (const line of text.split('\n')) {
    const name = line.slice(0, line.indexOf(' ') >>> 0);
    if (name) names.add(name.replace(/-/g, '_'));
  }
  return names.size ? names : undefined;
}

function writeAll(sys: Sys, fd: number, data: Uint8Array): number {
  for (let off = 0; off < data.length;) off += sys.write(fd, data.subarray(off, off + (4 << 20)));
  return data.length;
}

/** sendfile(2) where the host has it (the static init): file bodies copied inside the kernel. */
type WithSendfile = Sys & { sendfile?(outFd: number, inFd: number, offset: number, count: number): number };

/**
 * Exactly `size` bytes of the file at `source` appended to `out` (at its file position):
 * with sendfile, the bytes of programs and modules never pass through the interpreter;
 * without it (or where sendfile says EINVAL), read and written in 1 MiB pieces. A file
 * that is shorter or longer than its stat said (changed while read) is an error: the
 * archive's header already holds the size.
 */
function copyFileInto(sys: WithSendfile, out: number, source: string, size: number): number {
  const fd = sys.open(source, O.RDONLY | O.CLOEXEC);
  try {
    let off = 0;
    let viaSendfile = typeof sys.sendfile === 'function';
    let buf: Uint8Array | undefined;
    while (off < size) {
      let n: number;
      if (viaSendfile) {
        try {
          n = sys.sendfile!(out, fd, off, size - off);
        } catch (e) {
          if (!isSysError(e, 'EINVAL') && !isSysError(e, 'ENOSYS')) throw e;
          viaSendfile = false;
          continue;
        }
      } else {
        buf ??= new Uint8Array(Math.min(size, 1 << 20));
        n = sys.pread(fd, buf.subarray(0, Math.min(buf.length, size - off)), off);
        if (n > 0) writeAll(sys, out, buf.subarray(0, n));
      }
      if (n <= 0) throw new Error(`${source} ended at byte ${off} of the ${size} it had a moment before (changed while read)`);
      off += n;
    }
    const extra = sys.pread(fd, new Uint8Array(1), size);
    if (extra > 0) throw new Error(`${source} grew past the ${size} bytes it had a moment before (changed while read)`);
    return size;
  } finally {
    sys.close(fd);
  }
}

/**
 * Unmounts the root before the jump (what a plain root needs; an image's devices are
 * taken down afterwards by takeDownInPlace). Busy: remounted read-only and detached, so
 * its data is on disk.
 */
function unmountRoot(ctx: InitContext, root: string): void {
  const { sys, log } = ctx;
  try {
    sys.umount2(root, 0);
    log.info(`unmounted ${root}`);
  } catch (e) {
    if (isSysError(e, 'EINVAL') || isSysError(e, 'ENOENT')) return;
    try { sys.mount('', root, '', MS.REMOUNT | MS.RDONLY, ''); } catch { /* best effort */ }
    try { sys.umount2(root, 2 /* MNT_DETACH */); } catch { /* best effort */ }
    log.warn(`${root} was busy (${(e as Error).message}): remounted read-only and detached`);
  }
}
