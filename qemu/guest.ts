/**
 * A tiny guest root filesystem for end-to-end boots: busybox-static as /bin/busybox with a
 * link per applet, and a /sbin/init shell script that prints what the tests assert on
 * (uptime at start, pid, arguments, the root mount and its mode, the kernel command line),
 * optionally writes a file, runs commands, then powers off, opens a shell, or reboots.
 *
 * The facts are printed one per line before the final marker, so when the marker is seen
 * every fact is already in the transcript:
 *   VDBOOT-GUEST uptime=2.31
 *   VDBOOT-GUEST pid=1
 *   VDBOOT-GUEST argv0=/sbin/init
 *   VDBOOT-GUEST argc=2
 *   VDBOOT-GUEST arg1=hello world
 *   VDBOOT-GUEST root=/dev/vda / ext4 rw,relatime 0 0
 *   VDBOOT-GUEST cmdline=console=ttyS0 …
 *   VDBOOT-GUEST-OK
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const GUEST_MARKER = 'VDBOOT-GUEST-OK';
export const GUEST_FACT = 'VDBOOT-GUEST ';

export interface GuestOptions {
  /** the line printed after the facts; default VDBOOT-GUEST-OK */
  marker?: string;
  /** a file the guest writes (then syncs) on its root before finishing, e.g. to check rw boots */
  writeFile?: { path: string; content: string };
  /** shell lines run after the facts and the file, before the final action */
  commands?: string[];
  /**
   * what init does last: 'poweroff' (default: remount / read-only, sync, power off),
   * 'shell' (an interactive busybox sh on the console), 'reboot', 'exit' (init exits,
   * so the kernel panics; with panic=-1 and -no-reboot qemu ends), or { exec } to hand
   * over to a command, e.g. { exec: '/run/initramfs/shutdown poweroff' } (the initramfs's
   * shutdown hand-off, as a guest without systemd would call it).
   */
  then?: 'poweroff' | 'shell' | 'reboot' | 'exit' | { exec: string };
  /** keep kernel messages on the console after init starts (default: console loglevel 1) */
  kernelMessages?: boolean;
  /** extra files: guest path → content */
  files?: Record<string, string | Uint8Array>;
  /** busybox binary to install; default /bin/busybox (from busybox-static) */
  busybox?: string;
  /**
   * kernel modules to copy into the guest and insmod (with their dependencies, in order)
   * before anything else, e.g. { kernelVersion: '6.1.0-56-amd64', names: ['exfat', 'vfat'] }.
   * Already loaded ones are skipped silently.
   */
  modules?: { kernelVersion: string; names: string[] };
}

export interface GuestFacts {
  /** first field of /proc/uptime when init started, in seconds */
  uptime: number;
  pid: number;
  argv0: string;
  args: string[];
  /** the root line of /proc/mounts */
  root: { device: string; fstype: string; options: string[]; mode: 'ro' | 'rw' };
  cmdline: string;
  /** the file the guest wrote, when asked to */
  wrote?: string;
  /** every `VDBOOT-GUEST key=value` line, including ones printed by `commands` */
  facts: Record<string, string>;
}

/** Quotes a string for a POSIX shell. */
export function shellQuote(s: string): string {
  // a POSIX shell takes everything literally between single quotes, except the quote itself
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** A shell line printing `VDBOOT-GUEST key=value` (value is shell text, expanded by the guest), for `commands`. */
export function guestFact(key: string, shellValue: string): string {
  return `echo "${GUEST_FACT}${key}=${shellValue}"`;
}

/**
 * Waits (up to 5 s) until the serial port has sent what init wrote: `poweroff -f` does not
 * wait for the UART, and on a loaded host the last lines of a long transcript were lost with
 * the machine (the marker among them). The 8250 driver counts sent bytes in
 * /proc/tty/driver/serial; the line is done when the count stops moving for 0.1 s.
 */
const CONSOLE_DRAIN = 'a=; i=0; while [ $i -lt 50 ]; do b=$(grep -o "tx:[0-9]*" /proc/tty/driver/serial 2>/dev/null | tr "\\n" " "); [ "$b" = "$a" ] && break; a=$b; i=$((i+1)); sleep 0.1; done';

export function guestInitScript(opts: GuestOptions = {}): string {
  const marker = opts.marker ?? GUEST_MARKER;
  const f = (s: string): string => `echo "${GUEST_FACT}${s}"`;
  const lines = [
    '#!/bin/busybox sh',
    '# vdboot test guest init: prints facts for the tests, then does what it was built to do.',
    'export PATH=/bin:/sbin:/usr/bin:/usr/sbin',
    '[ -r /proc/uptime ] || mount -t proc proc /proc',
    'read -r up _ < /proc/uptime',
    opts.kernelMessages ? '' : 'echo 1 > /proc/sys/kernel/printk',
    '[ -d /sys/kernel ] || mount -t sysfs sysfs /sys',
    '[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev',
    ...(opts.modules
      ? moduleClosure(opts.modules.kernelVersion, opts.modules.names).map(
          (m) => `insmod /lib/modules/${opts.modules!.kernelVersion}/${m} 2>/dev/null`,
        )
      : []),
    f('uptime=$up'),
    f('pid=$$'),
    f('argv0=$0'),
    f('argc=$#'),
    'i=1',
    `for a in "$@"; do ${f('arg$i=$a')}; i=$((i+1)); done`,
    // the last "/" entry is the mounted root (an initramfs "rootfs /" line may precede it)
    `${f('root=$(awk \'$2 == "/" { r = $0 } END { print r }\' /proc/mounts)')}`,
    `${f('cmdline=$(cat /proc/cmdline)')}`,
  ];
  if (opts.writeFile) {
    const p = shellQuote(opts.writeFile.path);
    lines.push(
      `mkdir -p "$(dirname ${p})"`,
      `printf '%s' ${shellQuote(opts.writeFile.content)} > ${p} && sync && ${f(`wrote=${opts.writeFile.path.replace(/["`$\\]/g, '\\$&')}`)}`,
    );
  }
  lines.push(...(opts.commands ?? []));
  lines.push(`echo ${shellQuote(marker)}`);
  const then = opts.then ?? 'poweroff';
  if (typeof then === 'object') {
    lines.push('sync', `exec ${then.exec}`);
    return lines.filter((l) => l !== '').join('\n') + '\n';
  }
  switch (then) {
    case 'poweroff':
      lines.push('sync', 'mount -o remount,ro / 2>/dev/null', CONSOLE_DRAIN, 'poweroff -f');
      break;
    case 'reboot':
      lines.push('sync', 'mount -o remount,ro / 2>/dev/null', CONSOLE_DRAIN, 'reboot -f');
      break;
    case 'shell':
      lines.push('exec sh </dev/console >/dev/console 2>&1');
      break;
    case 'exit':
      lines.push('exit 0');
      break;
  }
  return lines.filter((l) => l !== '').join('\n') + '\n';
}

/**
 * Fills `dir` with the guest root: /bin/busybox + applet links in /bin, /sbin/init,
 * empty /proc /sys /dev /run /tmp /mnt /root, /etc/os-release, and `opts.files`.
 */
export function buildGuestRoot(dir: string, opts: GuestOptions = {}): void {
  const busybox = opts.busybox ?? '/bin/busybox';
  if (!fs.existsSync(busybox)) throw new Error(`No busybox at ${busybox}: install busybox-static.`);
  for (const d of ['bin', 'sbin', 'etc', 'proc', 'sys', 'dev', 'run', 'tmp', 'mnt', 'root', 'usr/bin', 'usr/sbin']) {
    fs.mkdirSync(path.join(dir, d), { recursive: true });
  }
  fs.copyFileSync(busybox, path.join(dir, 'bin/busybox'));
  fs.chmodSync(path.join(dir, 'bin/busybox'), 0o755);
  const applets = execFileSync(busybox, ['--list'], { encoding: 'utf8' }).split('\n').filter(Boolean);
  for (const applet of applets) {
    if (applet === 'busybox' || applet === 'init') continue;
    const link = path.join(dir, 'bin', applet);
    if (!fs.existsSync(link)) fs.symlinkSync('busybox', link);
  }
  fs.writeFileSync(path.join(dir, 'sbin/init'), guestInitScript(opts), { mode: 0o755 });
  if (opts.modules) {
    const base = path.join('/lib/modules', opts.modules.kernelVersion);
    for (const m of moduleClosure(opts.modules.kernelVersion, opts.modules.names)) {
      const target = path.join(dir, base, m);
      fs.mkdirSync(path.dirname(target), { recursive: true });
      fs.copyFileSync(path.join(base, m), target);
    }
  }
  fs.writeFileSync(path.join(dir, 'etc/os-release'), 'NAME="vdboot test guest"\nID=vdboot-guest\n');
  for (const [p, content] of Object.entries(opts.files ?? {})) {
    const target = path.join(dir, p);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, content);
  }
}

/**
 * Reads the guest's facts from a console transcript (the last complete set, so a second
 * boot's facts win). Throws when the marker or a fact is missing.
 */
export function parseGuestFacts(transcript: string, marker = GUEST_MARKER): GuestFacts {
  const all = transcript.split('\n');
  let end = all.length - 1;
  while (end >= 0 && !all[end]!.endsWith(marker)) end--;
  if (end < 0) throw new Error(`The guest's marker ${marker} is not in the transcript.`);
  // This boot's facts start at its uptime line; other console lines may sit in between.
  let start = end - 1;
  while (start >= 0 && !all[start]!.includes(`${GUEST_FACT}uptime=`)) start--;
  if (start < 0) throw new Error(`The guest printed ${marker} without its facts (no "${GUEST_FACT}uptime=" line before it).`);
  const facts = new Map<string, string>();
  for (const line of all.slice(start, end)) {
    const at = line.indexOf(GUEST_FACT);
    if (at < 0) continue;
    const kv = line.slice(at + GUEST_FACT.length);
    const eq = kv.indexOf('=');
    if (eq > 0) facts.set(kv.slice(0, eq), kv.slice(eq + 1));
  }
  const need = (k: string): string => {
    const v = facts.get(k);
    if (v === undefined) throw new Error(`The guest did not print its "${k}" fact before ${marker}.`);
    return v;
  };
  const argc = Number(need('argc'));
  const args: string[] = [];
  for (let i = 1; i <= argc; i++) args.push(need(`arg${i}`));
  const rootFields = need('root').split(/\s+/);
  const options = (rootFields[3] ?? '').split(',');
  return {
    uptime: Number(need('uptime')),
    pid: Number(need('pid')),
    argv0: need('argv0'),
    args,
    root: {
      device: rootFields[0] ?? '',
      fstype: rootFields[2] ?? '',
      options,
      mode: options.includes('ro') ? 'ro' : 'rw',
    },
    cmdline: need('cmdline'),
    ...(facts.has('wrote') ? { wrote: facts.get('wrote')! } : {}),
    facts: Object.fromEntries(facts),
  };
}

/** A module's name as the kernel spells it: file name without .ko*, '-' as '_'. */
function moduleName(file: string): string {
  return path.basename(file).replace(/\.ko(\.\w+)?$/, '').replace(/-/g, '_');
}

/**
 * The .ko files (paths relative to /lib/modules/VERSION) needed to load `names`, in load
 * order (dependencies first), from modules.dep, with modules.softdep "pre:" modules
 * resolved through modules.alias. Built-in modules need no file and are left out; an
 * unknown name throws.
 */
export function moduleClosure(kernelVersion: string, names: string[], modulesDir = '/lib/modules'): string[] {
  const base = path.join(modulesDir, kernelVersion);
  const deps = new Map<string, { file: string; deps: string[] }>();
  for (const line of fs.readFileSync(path.join(base, 'modules.dep'), 'utf8').split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const file = line.slice(0, colon);
    deps.set(moduleName(file), { file, deps: line.slice(colon + 1).trim().split(/\s+/).filter(Boolean).map(moduleName) });
  }
  const builtin = new Set(
    fs.readFileSync(path.join(base, 'modules.builtin'), 'utf8').split('\n').filter(Boolean).map(moduleName),
  );
  const aliases = new Map<string, string[]>();
  for (const line of fs.readFileSync(path.join(base, 'modules.alias'), 'utf8').split('\n')) {
    const [kw, alias, mod] = line.split(/\s+/);
    if (kw !== 'alias' || !alias || !mod || /[*?[]/.test(alias)) continue;
    aliases.set(alias, [...(aliases.get(alias) ?? []), mod]);
  }
  const softPre = new Map<string, string[]>();
  for (const line of fs.readFileSync(path.join(base, 'modules.softdep'), 'utf8').split('\n')) {
    const m = /^softdep\s+(\S+)\s+pre:\s*([^:]*?)(\s+post:.*)?$/.exec(line);
    if (m) softPre.set(moduleName(m[1]!), m[2]!.split(/\s+/).filter(Boolean));
  }
  const order: string[] = [];
  const seen = new Set<string>();
  const visit = (name: string, optional: boolean): void => {
    const n = moduleName(name);
    if (seen.has(n) || builtin.has(n)) return;
    const entry = deps.get(n);
    if (!entry) {
      const targets = aliases.get(name) ?? aliases.get(n);
      if (targets) {
        for (const t of targets) visit(t, true);
        return;
      }
      if (optional) return;
      throw new Error(`Kernel ${kernelVersion} has no module "${name}" (not in modules.dep, modules.builtin or modules.alias).`);
    }
    seen.add(n);
    for (const pre of softPre.get(n) ?? []) visit(pre, true);
    for (const d of entry.deps) visit(d, false);
    order.push(entry.file);
  };
  for (const name of names) visit(name, false);
  return order;
}
