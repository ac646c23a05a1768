/**
 * Boots a kernel + initramfs + disks under QEMU and talks to it over the serial console.
 *
 * `bootVm(opts)` starts `qemu-system-x86_64` and returns a `Vm` handle: the console
 * transcript (kept whole, mirrored to a log file for failures), `waitFor(marker)`,
 * `send(text)`, `waitExit()`, `kill()`. Every VM is killed when its owner gives up on it
 * (timeouts kill), when the Node process exits, and — as a backstop if Node itself dies
 * without running exit handlers — by `timeout(1)` after `maxLifetimeMs`.
 *
 * Acceleration: KVM only when /dev/kvm opens AND a tiny probe boot under KVM really runs
 * (some machines expose /dev/kvm but hang or fail in it); the probe has a watchdog and its
 * answer is cached for the process. Otherwise TCG. `VDBOOT_ACCEL=tcg|kvm` overrides.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { StringDecoder } from 'node:string_decoder';

export type DiskInterface = 'virtio-blk' | 'virtio-scsi' | 'ahci' | 'nvme' | 'usb-storage' | 'ide';

export interface VmDisk {
  /** image file on the host */
  file: string;
  /** qemu block format: raw (default), qcow2, vpc, vhdx, vdi, vmdk… */
  format?: string;
  /** the controller the guest sees it on; default virtio-blk */
  interface?: DiskInterface;
  /** the guest cannot write it (qemu refuses writes) */
  readonly?: boolean;
  /** writes go to a temporary overlay, the file is never changed */
  snapshot?: boolean;
  /** the disk's serial number (shows as /dev/disk/by-id/…); nvme gets one by default */
  serial?: string;
}

export type Accel = 'kvm' | 'tcg';

export interface BootOptions {
  /** kernel image; default: the newest /boot/vmlinuz-* */
  kernel?: string;
  /** initramfs; none by default */
  initrd?: string;
  /**
   * kernel command line, appended after the harness's console defaults
   * (`console=ttyS0,115200 panic=-1 printk.time=1`), so `--` and init arguments stay last
   * and later keys override the defaults.
   */
  append?: string;
  /** leave out the console defaults above (default: include them) */
  noDefaultAppend?: boolean;
  disks?: VmDisk[];
  /** guest RAM in MiB; default 512 */
  memoryMiB?: number;
  /** virtual CPUs; default 1 */
  cpus?: number;
  /**
   * 'bios' (SeaBIOS, default) or 'uefi' (OVMF, with a private copy of the variable store).
   * Note: OVMF's direct kernel boot appends ` initrd=initrd` to the command line, after any
   * `--`, so the guest's init then gets an extra "initrd=initrd" argument.
   */
  firmware?: 'bios' | 'uefi';
  /** 'auto' (default): KVM when the probe boot works, else TCG */
  accel?: Accel | 'auto';
  /** qemu machine type; default 'pc' */
  machine?: string;
  /** more qemu arguments, appended last */
  extraArgs?: string[];
  /** serial console log; default: a file in a fresh temp dir (see Vm.logFile) */
  logFile?: string;
  /** a name for messages and the default log file name */
  name?: string;
  /** hard limit on the VM's life, enforced outside Node by timeout(1); default 15 min */
  maxLifetimeMs?: number;
  /** mirror the console to stderr as it arrives (also: VDBOOT_QEMU_ECHO=1) */
  echo?: boolean;
  /**
   * Boot from the network instead of `kernel`: a virtio-net card on QEMU's user network with
   * `restrict=on` (no host sockets), its TFTP server on `tftp` and DHCP naming `bootfile`;
   * the firmware's iPXE (Debian's ipxe-qemu) fetches and runs it. No -kernel, -initrd, -append.
   */
  netboot?: { tftp: string; bootfile: string };
}

export interface ConsoleLine {
  /** the line as printed, without \r\n (kernel timestamp prefix kept) */
  text: string;
  /** the kernel's own timestamp in seconds when the line starts with `[   1.234567]` */
  kernelTime?: number;
  /** milliseconds since qemu was started, when the line was complete */
  hostMs: number;
}

export interface VmExit {
  /** qemu's exit code, null when killed by a signal */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** the harness killed it (timeout, kill(), process exit) */
  killed: boolean;
  /** the maxLifetimeMs backstop ended it (timeout(1) exits 124 then) */
  lifetimeExceeded: boolean;
}

export interface Vm {
  readonly name: string;
  readonly pid: number;
  readonly accel: Accel;
  /** the full qemu command line */
  readonly argv: readonly string[];
  /** the kernel command line passed with -append */
  readonly cmdline: string;
  readonly logFile: string;
  /** the whole console so far, lines joined with \n (\r removed), incl. an unfinished last line */
  transcript(): string;
  /** the complete console lines so far */
  lines(): readonly ConsoleLine[];
  /** qemu's own stderr so far */
  stderr(): string;
  /**
   * Waits until a console line (or the unfinished last line, e.g. a shell prompt, once it has
   * stayed unfinished for 300 ms) matches,
   * searching from just after the previous waitFor's match, and returns that line. A string
   * matches anywhere in the line; the console echoes what send() types, so to wait for a
   * command's answer use an anchored RegExp (/^42$/) rather than a string it contains.
   * Rejects when the timeout passes (the VM keeps running: kill it or waitExit) or when the
   * VM exits first, with the console's last lines and the log file's path in the message.
   */
  waitFor(marker: string | RegExp, timeoutMs: number): Promise<string>;
  /** as waitFor, returning the line with its timestamps */
  waitForLine(marker: string | RegExp, timeoutMs: number): Promise<ConsoleLine>;
  /** types text on the serial console (add '\n' to press Enter) */
  send(text: string): void;
  /** waits for qemu to exit; on timeout kills it and rejects */
  waitExit(timeoutMs: number): Promise<VmExit>;
  /** kills qemu (SIGKILL to its process group) and waits for it to be gone */
  kill(): Promise<VmExit>;
  readonly exited: boolean;
}

export class VmError extends Error {
  constructor(message: string, readonly vm: Vm) {
    super(message);
    this.name = 'VmError';
  }
}

const QEMU = 'qemu-system-x86_64';
/** how long an unfinished console line that matches a waitFor gets to complete before it counts as a prompt */
const PROMPT_GRACE_MS = 300;

/** Process groups of every running qemu (with its timeout(1) wrapper), killed at exit. */
const live = new Set<number>();
let exitHookInstalled = false;

function killGroup(pid: number): void {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

let logsPruned = false;

/** Deletes console logs older than a day, once per process, so the log directory stays small. */
function pruneOldLogs(logDir: string): void {
  if (logsPruned) return;
  logsPruned = true;
  const dayAgo = Date.now() - 24 * 3600_000;
  for (const f of fs.readdirSync(logDir)) {
    try {
      const p = path.join(logDir, f);
      if (fs.statSync(p).mtimeMs < dayAgo) fs.rmSync(p, { force: true });
    } catch {
      // another process pruned it first
    }
  }
}

/** Waits (polling) until no process of the group is left, or the time is up. */
async function groupGone(pid: number, timeoutMs: number): Promise<boolean> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      process.kill(-pid, 0);
    } catch {
      return true;
    }
    if (Date.now() > until) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const pid of live) killGroup(pid);
  });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const onSignal = (): void => {
      for (const pid of live) killGroup(pid);
      process.removeListener(sig, onSignal);
      // Only re-raise when nobody else handles it, so the default action still happens.
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.on(sig, onSignal);
  }
}

/** The newest installed kernel image, /boot/vmlinuz-* by version order. */
export function defaultKernel(): string {
  const kernels = fs
    .readdirSync('/boot')
    .filter((f) => f.startsWith('vmlinuz-'))
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  if (kernels.length === 0) {
    throw new Error('No kernel in /boot (vmlinuz-*): install linux-image-amd64, or pass opts.kernel.');
  }
  return path.join('/boot', kernels[kernels.length - 1]!);
}

/**
 * A kernel unpacked by scripts/fetch-kernel.sh (Debian 12's 6.12 by default) into
 * .cache/kernels/RELEASE/boot/vmlinuz-RELEASE, its modules beside it; the newest of the
 * series, or undefined when none is there. mkinitramfs finds the modules from the path.
 */
export function cachedKernel(series = '6.12'): string | undefined {
  const cache = path.join(path.dirname(new URL(import.meta.url).pathname), '..', '.cache', 'kernels');
  if (!fs.existsSync(cache)) return undefined;
  const releases = fs.readdirSync(cache)
    .filter((r) => r.startsWith(`${series}.`) && fs.existsSync(path.join(cache, r, 'boot', `vmlinuz-${r}`)))
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  const r = releases.at(-1);
  return r ? path.normalize(path.join(cache, r, 'boot', `vmlinuz-${r}`)) : undefined;
}

/** The kernel version of a /boot/vmlinuz-VERSION path (its modules live in /lib/modules/VERSION). */
export function kernelVersion(kernel: string): string {
  const base = path.basename(kernel);
  if (!base.startsWith('vmlinuz-')) throw new Error(`Cannot tell the version of kernel ${kernel}: expected /boot/vmlinuz-VERSION`);
  return base.slice('vmlinuz-'.length);
}

/** Debian's initramfs-tools image for a kernel, /boot/initrd.img-VERSION. */
export function debianInitrd(kernel = defaultKernel()): string {
  return path.join('/boot', `initrd.img-${kernelVersion(kernel)}`);
}

// ---- acceleration probe ------------------------------------------------------------------

let accelDecision: Promise<Accel> | undefined;
let vmCounter = 0;

/**
 * Whether KVM really works here: /dev/kvm opens read-write, and the kernel, booted under
 * KVM without a root, prints its banner within `firstOutputMs` and panics its way out
 * (panic=-1, -no-reboot) within `watchdogMs`. Some machines expose a /dev/kvm whose guests
 * never print anything (a tiny real-mode boot sector runs, a kernel hangs), so only a real
 * kernel boot counts. Cached for the process (and for this machine boot, see accelCacheFile).
 * VDBOOT_ACCEL=kvm|tcg skips the probe.
 */
export function probeAccel(kernel?: string, firstOutputMs = 4000, watchdogMs = 20_000): Promise<Accel> {
  const forced = process.env.VDBOOT_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return Promise.resolve(forced);
  accelDecision ??= (async () => {
    const cached = readAccelCache();
    if (cached) return cached;
    const accel: Accel = (await runKvmProbe(kernel ?? defaultKernel(), firstOutputMs, watchdogMs)) ? 'kvm' : 'tcg';
    writeAccelCache(accel);
    return accel;
  })();
  return accelDecision;
}

/**
 * The decision is also kept for this boot of the machine (keyed by the kernel's boot_id)
 * in the temp dir, so each test worker does not pay the probe again.
 */
function accelCacheFile(): string | undefined {
  try {
    const bootId = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    return path.join(os.tmpdir(), `vdboot-accel-${bootId}`);
  } catch {
    return undefined;
  }
}

function readAccelCache(): Accel | undefined {
  const file = accelCacheFile();
  try {
    const v = file ? fs.readFileSync(file, 'utf8').trim() : '';
    return v === 'kvm' || v === 'tcg' ? v : undefined;
  } catch {
    return undefined;
  }
}

function writeAccelCache(accel: Accel): void {
  const file = accelCacheFile();
  if (!file) return;
  try {
    fs.writeFileSync(`${file}.${process.pid}`, accel);
    fs.renameSync(`${file}.${process.pid}`, file);
  } catch {
    // the cache is an optimisation only
  }
}

async function runKvmProbe(kernel: string, firstOutputMs: number, watchdogMs: number): Promise<boolean> {
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return false;
  }
  const child = spawn(
    QEMU,
    ['-accel', 'kvm', '-cpu', 'host', '-nodefaults', '-display', 'none', '-m', '256', '-no-reboot',
      '-serial', 'stdio', '-kernel', kernel, '-append', 'console=ttyS0,115200 panic=-1 loglevel=7'],
    { stdio: ['ignore', 'pipe', 'pipe'], detached: true },
  );
  if (child.pid === undefined) return false;
  installExitHook();
  const pid = child.pid;
  live.add(pid);
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString('latin1')));
  child.stderr!.resume();
  const code = await new Promise<number | null>((resolve) => {
    const silent = setTimeout(() => {
      if (!out.includes('Linux version')) killGroup(pid);
    }, firstOutputMs);
    const watchdog = setTimeout(() => killGroup(pid), watchdogMs);
    child.on('error', () => resolve(null));
    child.on('close', (c) => {
      clearTimeout(silent);
      clearTimeout(watchdog);
      resolve(c);
    });
  });
  live.delete(pid);
  return code === 0 && out.includes('Linux version') && out.includes('Kernel panic');
}

// ---- qemu command line -------------------------------------------------------------------

const OVMF_CODE = ['/usr/share/OVMF/OVMF_CODE_4M.fd', '/usr/share/OVMF/OVMF_CODE.fd'];
const OVMF_VARS: Record<string, string> = {
  '/usr/share/OVMF/OVMF_CODE_4M.fd': '/usr/share/OVMF/OVMF_VARS_4M.fd',
  '/usr/share/OVMF/OVMF_CODE.fd': '/usr/share/OVMF/OVMF_VARS.fd',
};

// no_timer_check: a heavily loaded host can make a TCG guest's IO-APIC timer check fail and panic.
const DEFAULT_APPEND = 'console=ttyS0,115200 panic=-1 printk.time=1 no_timer_check';

function driveOption(disk: VmDisk, id: string): string {
  // qemu's option syntax takes a literal comma as ",,"
  const parts = [`file=${disk.file.replace(/,/g, ',,')}`, `format=${disk.format ?? 'raw'}`, 'if=none', `id=${id}`];
  if (disk.readonly) parts.push('readonly=on');
  if (disk.snapshot) parts.push('snapshot=on');
  return parts.join(',');
}

/** The qemu arguments for the disks: controllers first (one of each kind), then devices. */
export function diskArgs(disks: readonly VmDisk[], machine = 'pc'): string[] {
  const args: string[] = [];
  const kinds = new Set(disks.map((d) => d.interface ?? 'virtio-blk'));
  if (kinds.has('virtio-scsi')) args.push('-device', 'virtio-scsi-pci,id=scsi0');
  if (kinds.has('ahci')) args.push('-device', 'ahci,id=ahci0');
  if (kinds.has('usb-storage')) args.push('-device', 'qemu-xhci,id=xhci0');
  let ahciPort = 0;
  let idePort = 0;
  let scsiLun = 0;
  disks.forEach((disk, i) => {
    const id = `disk${i}`;
    args.push('-drive', driveOption(disk, id));
    const serial = disk.serial ? `,serial=${disk.serial}` : '';
    switch (disk.interface ?? 'virtio-blk') {
      case 'virtio-blk':
        args.push('-device', `virtio-blk-pci,drive=${id}${serial}`);
        break;
      case 'virtio-scsi':
        args.push('-device', `scsi-hd,drive=${id},bus=scsi0.0,channel=0,scsi-id=${scsiLun++},lun=0${serial}`);
        break;
      case 'ahci':
        if (ahciPort >= 6) throw new Error('At most 6 AHCI disks: one AHCI controller has 6 ports.');
        args.push('-device', `ide-hd,drive=${id},bus=ahci0.${ahciPort++}${serial}`);
        break;
      case 'nvme':
        args.push('-device', `nvme,drive=${id},serial=${disk.serial ?? `vdboot${i}`}`);
        break;
      case 'usb-storage':
        args.push('-device', `usb-storage,drive=${id},bus=xhci0.0${serial}`);
        break;
      case 'ide': {
        if (machine.startsWith('q35')) throw new Error('interface "ide" needs the pc machine (q35 has AHCI: use "ahci").');
        if (idePort >= 4) throw new Error('At most 4 IDE disks (2 buses × master/slave).');
        const bus = idePort >> 1;
        const unit = idePort & 1;
        idePort++;
        args.push('-device', `ide-hd,drive=${id},bus=ide.${bus},unit=${unit}${serial}`);
        break;
      }
      default:
        throw new Error(`Unknown disk interface "${String(disk.interface)}": use virtio-blk, virtio-scsi, ahci, nvme, usb-storage or ide.`);
    }
  });
  return args;
}

// ---- the VM ------------------------------------------------------------------------------

const KERNEL_TIME = /^\[\s*(\d+\.\d+)\]/;
/**
 * The complete lines at the start of `text` (carriage returns already removed) and the
 * unfinished rest. When the kernel printed a whole message into the middle of another line
 * (vdboot's console writes go through the tty, printk does not), the message becomes a line
 * of its own and the interrupted line goes on with what follows it.
 */
export function takeConsoleLines(text: string, hostMs: number): { lines: ConsoleLine[]; rest: string } {
  const out: ConsoleLine[] = [];
  let pending = text;
  let nl: number;
  while ((nl = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, nl);
    const k = MIDLINE_KERNEL.exec(line);
    if (k && k.index > 0) {
      const message = line.slice(k.index);
      const t = KERNEL_TIME.exec(message);
      out.push({ text: message, hostMs, ...(t ? { kernelTime: Number(t[1]) } : {}) });
      pending = line.slice(0, k.index) + pending.slice(nl + 1);
      continue;
    }
    pending = pending.slice(nl + 1);
    const t = KERNEL_TIME.exec(line);
    out.push({ text: line, hostMs, ...(t ? { kernelTime: Number(t[1]) } : {}) });
  }
  return { lines: out, rest: pending };
}

/** A printk timestamp (six decimals; vdboot's own stamps have three) anywhere in a line. */
const MIDLINE_KERNEL = /\[\s*\d+\.\d{6}\] /;

function matches(marker: string | RegExp, text: string): boolean {
  if (typeof marker === 'string') return text.includes(marker);
  marker.lastIndex = 0;
  return marker.test(text);
}

export async function bootVm(opts: BootOptions = {}): Promise<Vm> {
  const name = opts.name ?? 'vm';
  const kernel = opts.kernel ?? defaultKernel();
  const machine = opts.machine ?? 'pc';
  const requested = opts.accel ?? 'auto';
  const accel: Accel = requested === 'auto' ? await probeAccel(kernel) : requested;
  const cmdline = [opts.noDefaultAppend ? '' : DEFAULT_APPEND, opts.append ?? ''].filter(Boolean).join(' ');

  // Logs stay after the VM (for failures), all in one directory; private files go with the VM.
  let logFile = opts.logFile;
  if (!logFile) {
    const logDir = path.join(os.tmpdir(), 'vdboot-qemu-logs');
    fs.mkdirSync(logDir, { recursive: true });
    pruneOldLogs(logDir);
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    logFile = path.join(logDir, `${name.replace(/[^\w.-]/g, '_')}-${stamp}-${process.pid}-${++vmCounter}.log`);
  }
  const privateDir = opts.firmware === 'uefi' ? fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-vm-')) : undefined;

  const qemuArgs = [
    '-machine', machine,
    '-accel', accel,
    ...(accel === 'kvm' ? ['-cpu', 'host'] : []),
    '-m', String(opts.memoryMiB ?? 512),
    '-smp', String(opts.cpus ?? 1),
    '-nodefaults', '-display', 'none', '-no-reboot',
    '-serial', 'stdio',
    ...(opts.netboot
      ? ['-netdev', `user,id=net0,restrict=on,tftp=${opts.netboot.tftp.replace(/,/g, ',,')},bootfile=${opts.netboot.bootfile.replace(/,/g, ',,')}`, '-device', 'virtio-net-pci,netdev=net0', '-boot', 'n']
      : ['-kernel', kernel, ...(opts.initrd ? ['-initrd', opts.initrd] : []), '-append', cmdline]),
  ];
  if (opts.firmware === 'uefi') {
    const code = OVMF_CODE.find((f) => fs.existsSync(f));
    if (!code) throw new Error('UEFI boot needs OVMF (Debian package ovmf): no OVMF_CODE*.fd in /usr/share/OVMF.');
    const vars = path.join(privateDir!, 'OVMF_VARS.fd');
    fs.copyFileSync(OVMF_VARS[code]!, vars);
    qemuArgs.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${code}`);
    qemuArgs.push('-drive', `if=pflash,format=raw,unit=1,file=${vars}`);
  }
  qemuArgs.push(...diskArgs(opts.disks ?? [], machine), ...(opts.extraArgs ?? []));

  const lifetimeS = Math.ceil((opts.maxLifetimeMs ?? 15 * 60_000) / 1000);
  const argv = ['timeout', '--signal=KILL', String(lifetimeS), QEMU, ...qemuArgs];
  installExitHook();
  const started = Date.now();
  // detached: qemu and its timeout(1) wrapper get their own process group, killed as one.
  const child: ChildProcess = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
  const pid = child.pid;
  if (pid === undefined) {
    throw new Error(`Could not start ${QEMU} (is qemu-system-x86 installed?)`);
  }
  live.add(pid);

  const logFd = fs.openSync(logFile, 'w');
  fs.writeSync(logFd, `# ${argv.map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(' ')}\n`);
  const echo = opts.echo ?? process.env.VDBOOT_QEMU_ECHO === '1';

  const lines: ConsoleLine[] = [];
  let pending = '';
  let stderrText = '';
  let cursor = 0; // index of the first line the next waitFor may match
  let exitInfo: VmExit | undefined;
  let killedByUs = false;
  let finishing = false;
  const listeners = new Set<() => void>();
  const notify = (): void => {
    for (const l of [...listeners]) l();
  };

  const decoder = new StringDecoder('utf8'); // a character may straddle two chunks
  child.stdout!.on('data', (chunk: Buffer) => {
    const text = decoder.write(chunk);
    fs.writeSync(logFd, text);
    if (echo) process.stderr.write(text);
    pending += text.replace(/\r/g, '');
    const taken = takeConsoleLines(pending, Date.now() - started);
    lines.push(...taken.lines);
    pending = taken.rest;
    notify();
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    const text = chunk.toString('utf8');
    stderrText += text;
    fs.writeSync(logFd, `# qemu stderr: ${text}`);
  });
  child.stdin!.on('error', () => {
    // qemu gone: writes to its stdin fail, waitFor/waitExit report the exit
  });

  const exited = new Promise<VmExit>((resolve) => {
    const finish = async (code: number | null, signal: NodeJS.Signals | null): Promise<void> => {
      if (exitInfo || finishing) return;
      finishing = true;
      // qemu itself (the wrapper's child) may still be a zombie waiting for its reaper.
      await groupGone(pid, 3000);
      live.delete(pid);
      if (privateDir) fs.rmSync(privateDir, { recursive: true, force: true });
      exitInfo = { code, signal, killed: killedByUs, lifetimeExceeded: code === 124 && !killedByUs };
      try {
        fs.writeSync(logFd, `\n# qemu exited: code=${code} signal=${signal}${killedByUs ? ' (killed by the harness)' : ''}\n`);
        fs.closeSync(logFd);
      } catch {
        // already closed
      }
      resolve(exitInfo);
      notify();
    };
    child.on('close', (code, signal) => void finish(code, signal));
    child.on('error', (e) => {
      stderrText += String(e);
      void finish(null, null);
    });
  });

  const tail = (n = 30): string => {
    const all = lines.slice(-n).map((l) => l.text);
    if (pending) all.push(pending);
    return all.join('\n');
  };
  const describe = (): string =>
    `\n--- last console lines of ${name} (full log: ${logFile}) ---\n${tail()}\n---` +
    (stderrText ? `\nqemu stderr: ${stderrText.trim()}` : '');

  const vm: Vm = {
    name,
    pid,
    accel,
    argv,
    cmdline,
    logFile,
    transcript: () => lines.map((l) => l.text).concat(pending ? [pending] : []).join('\n'),
    lines: () => lines,
    stderr: () => stderrText,
    get exited() {
      return exitInfo !== undefined;
    },
    waitFor: async (marker, timeoutMs) => (await vm.waitForLine(marker, timeoutMs)).text,
    waitForLine: (marker, timeoutMs) =>
      new Promise<ConsoleLine>((resolve, reject) => {
        let timer: NodeJS.Timeout | undefined;
        let grace: NodeJS.Timeout | undefined;
        const done = (): void => {
          listeners.delete(check);
          if (timer) clearTimeout(timer);
          if (grace) clearTimeout(grace);
        };
        function check(): void {
          for (let i = cursor; i < lines.length; i++) {
            if (matches(marker, lines[i]!.text)) {
              cursor = i + 1;
              done();
              resolve(lines[i]!);
              return;
            }
          }
          if (pending && cursor <= lines.length && matches(marker, pending) && !grace) {
            // An unfinished line matches: a prompt, or a line still being printed. Given
            // PROMPT_GRACE_MS to complete (then the loop above returns it whole), else it is
            // taken as a prompt, and consumed once it completes.
            grace = setTimeout(() => {
              if (!pending || cursor > lines.length || !matches(marker, pending)) {
                grace = undefined;
                check();
                return;
              }
              cursor = lines.length + 1;
              done();
              resolve({ text: pending, hostMs: Date.now() - started });
            }, PROMPT_GRACE_MS);
          }
          if (exitInfo) {
            done();
            if (pending && cursor <= lines.length && matches(marker, pending)) {
              resolve({ text: pending, hostMs: Date.now() - started });
              return;
            }
            reject(new VmError(`${name}: qemu exited (code ${exitInfo.code}, signal ${exitInfo.signal}) before ${String(marker)} appeared on the console.${describe()}`, vm));
          }
        }
        listeners.add(check);
        timer = setTimeout(() => {
          done();
          reject(new VmError(`${name}: no ${String(marker)} on the console within ${timeoutMs / 1000} s.${describe()}`, vm));
        }, timeoutMs);
        check();
      }),
    send: (text) => {
      if (exitInfo) throw new VmError(`${name}: cannot type on the console, qemu has exited.${describe()}`, vm);
      child.stdin!.write(text);
    },
    waitExit: async (timeoutMs) => {
      let timer: NodeJS.Timeout | undefined;
      const timedOut = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), timeoutMs)));
      const result = await Promise.race([exited, timedOut]);
      clearTimeout(timer);
      if (result === 'timeout') {
        await vm.kill();
        throw new VmError(`${name}: still running after ${timeoutMs / 1000} s; killed it.${describe()}`, vm);
      }
      return result;
    },
    kill: async () => {
      if (!exitInfo) {
        killedByUs = true;
        killGroup(pid);
      }
      return exited;
    },
  };
  return vm;
}

/** Boots a VM, runs `body` with it, and always kills the VM afterwards. */
export async function withVm<T>(opts: BootOptions, body: (vm: Vm) => Promise<T>): Promise<T> {
  const vm = await bootVm(opts);
  try {
    return await body(vm);
  } finally {
    await vm.kill();
  }
}
