/**
 * Brings the network up for a network root (or rd.neednet=1), with busybox's `ip` and
 * `udhcpc`: interfaces renamed by ifname=, links up, carrier waited for within rd.timeout,
 * then the static address and default route of ip=…:none, or a DHCP lease (udhcpc runs
 * once in the foreground and quits with the lease; its script, written to /run, sets the
 * address and route and records them). The console gets one line per interface: link,
 * address, where it came from. Failure names every interface seen with its state.
 */
import type { Sys } from '../sys/sys.ts';
import { BootFailure, type InitContext } from './context.ts';
import { mkdirs, readTextOr, writeText } from './fsutil.ts';
import { waitForUevents } from './devwait.ts';
import type { IpConfig, NetOptions } from './net-cmdline.ts';

const NET = '/sys/class/net';
const DHCP_DIR = '/run/vdboot/net';

interface Iface {
  name: string;
  mac: string;
  driver: string;
  carrier: boolean;
  operstate: string;
}

function listIfaces(sys: Sys): Iface[] {
  let names: string[];
  try {
    names = sys.readdir(NET);
  } catch {
    return [];
  }
  return names.filter((n) => n !== 'lo' && readTextOr(sys, `${NET}/${n}/type`) === '1').sort().map((name) => {
    let driver = '?';
    try {
      driver = sys.readlink(`${NET}/${name}/device/driver`).split('/').pop() ?? '?';
    } catch { /* virtual */ }
    return {
      name,
      mac: readTextOr(sys, `${NET}/${name}/address`) ?? '?',
      driver,
      carrier: readTextOr(sys, `${NET}/${name}/carrier`) === '1',
      operstate: readTextOr(sys, `${NET}/${name}/operstate`) ?? '?',
    };
  });
}

function describeIfaces(list: Iface[]): string {
  if (!list.length) return '  (no Ethernet interface at all: the network card\'s driver is not in the initramfs, or the machine has none)';
  return list.map((i) => `  ${i.name}: ${i.driver}, ${i.mac}, ${i.operstate}, ${i.carrier ? 'link' : 'no link'}`).join('\n');
}

function run(ctx: InitContext, argv: string[], what: string): void {
  const { sys } = ctx;
  const bb = ctx.manifest.tools.busybox;
  const pid = sys.spawn(bb, [bb, ...argv], ['PATH=/bin:/sbin:/usr/bin:/usr/sbin']);
  const r = sys.waitpid(pid, 0);
  if (r.exitCode !== 0) throw new BootFailure(`${what} failed: "busybox ${argv.join(' ')}" exited with ${r.exitCode}${r.termSignal ? ` (signal ${r.termSignal})` : ''}`);
}

/** What the network came up as, for the console and the network root. */
export interface NetUp {
  iface: string;
  address: string;
  /** the kernel's server-ip field, or the DHCP server */
  server?: string;
}

/**
 * Waits for interfaces and carrier, configures `opts` and returns the configured interface.
 * `why`: what needs the network, for messages ("root=vdisk:nbd://…").
 */
export function bringUpNetwork(ctx: InitContext, opts: NetOptions, why: string): NetUp {
  const { sys, log, plan } = ctx;
  const cfg: IpConfig = opts.ip[0] ?? { method: 'dhcp', text: 'dhcp (no ip= given)' };
  if (opts.ip.length > 1) log.warn(`only the first ip= is configured (${cfg.text}); the others are ignored`);
  const deadline = sys.monotonicMs() + plan.timeoutSec * 1000;
  const fix = `Fix the command line: ip=dhcp, ip=IFACE:dhcp, or ip=CLIENT::GATEWAY:NETMASK::IFACE:none; ifname=NAME:MAC names an interface; rd.timeout=SECONDS waits longer.`;

  // 1. The interfaces (their drivers load with coldplug), renamed by ifname=.
  let list = listIfaces(sys);
  const wanted = cfg.iface;
  // a wanted name that ifname= gives to a MAC is there once the card with that MAC is (it is renamed below)
  const named = (name: string) => list.some((i) => i.name === name || opts.ifnames.some((n) => n.name === name && n.mac === i.mac));
  const present = () => (wanted ? named(wanted) : list.length > 0) && opts.ifnames.every((n) => list.some((i) => i.name === n.name || i.mac === n.mac));
  // Network cards appear once their bus driver is up (virtio_pci, then virtio0): their
  // uevents load the drivers; after 2 s every present device's driver is asked for again.
  let rescanned = false;
  const start = sys.monotonicMs();
  while (!present() && sys.monotonicMs() < deadline) {
    waitForUevents(ctx, 200);
    if (!rescanned && sys.monotonicMs() - start > 2000) {
      rescanned = true;
      ctx.modules.finishColdplug();
      ctx.modules.reportFailures(ctx.modules.coldplug());
    }
    list = listIfaces(sys);
  }
  for (const n of opts.ifnames) {
    const i = list.find((x) => x.mac === n.mac);
    if (i && i.name !== n.name) run(ctx, ['ip', 'link', 'set', 'dev', i.name, 'name', n.name], `renaming ${i.name} to ${n.name} (ifname=${n.name}:${n.mac})`);
  }
  list = listIfaces(sys);
  const candidates = list.filter((i) => (wanted ? i.name === wanted : true) && (!cfg.mac || i.mac === cfg.mac));
  if (!candidates.length) {
    throw new BootFailure(`${why} needs the network, but ${wanted ? `there is no interface ${wanted}` : 'there is no Ethernet interface'} after ${plan.timeoutSec} s. Interfaces seen:\n${describeIfaces(list)}\n${fix}`);
  }

  // 2. Links up; the first with carrier is used (every candidate is tried for DHCP without a name).
  run(ctx, ['ip', 'link', 'set', 'dev', 'lo', 'up'], 'bringing up lo');
  for (const i of candidates) {
    run(ctx, ['ip', 'link', 'set', 'dev', i.name, ...(cfg.mtu ? ['mtu', String(cfg.mtu)] : []), 'up'], `bringing up ${i.name}`);
  }
  let up: Iface | undefined;
  for (;;) {
    list = listIfaces(sys);
    up = list.find((i) => candidates.some((c) => c.name === i.name) && i.carrier);
    if (up || sys.monotonicMs() >= deadline) break;
    sys.sleepMs(100);
  }
  if (!up) throw new BootFailure(`${why} needs the network, but no interface has a link after ${plan.timeoutSec} s (is the cable in, the switch port on?). Interfaces seen:\n${describeIfaces(list)}\n${fix}`);
  log.info(`net: ${up.name} (${up.driver}, ${up.mac}) has a link`);

  // 3. The address.
  if (cfg.method === 'static') {
    run(ctx, ['ip', 'addr', 'add', `${cfg.address}/${cfg.prefix}`, 'dev', up.name], `setting ${cfg.address}/${cfg.prefix} on ${up.name}`);
    if (cfg.gateway) run(ctx, ['ip', 'route', 'add', 'default', 'via', cfg.gateway, 'dev', up.name], `adding the default route via ${cfg.gateway}`);
    log.info(`net: ${up.name} is ${cfg.address}/${cfg.prefix}${cfg.gateway ? `, gateway ${cfg.gateway}` : ''} (ip=${cfg.text})`);
    return { iface: up.name, address: cfg.address!, ...(cfg.server ? { server: cfg.server } : {}) };
  }
  const lease = dhcp(ctx, up.name, Math.max(1, Math.round((deadline - sys.monotonicMs()) / 1000)));
  if (!lease) {
    throw new BootFailure(`${why} needs the network, but no DHCP server answered on ${up.name} within ${plan.timeoutSec} s. Interfaces seen:\n${describeIfaces(listIfaces(sys))}\nIs a DHCP server on that network? ${fix}`);
  }
  log.info(`net: ${up.name} is ${lease.ip}/${lease.prefix} by DHCP from ${lease.serverid ?? '?'}${lease.router ? `, gateway ${lease.router}` : ''}`);
  return { iface: up.name, address: lease.ip, ...(cfg.server ? { server: cfg.server } : lease.siaddr && lease.siaddr !== '0.0.0.0' ? { server: lease.siaddr } : {}) };
}

interface Lease {
  ip: string;
  prefix: number;
  router?: string;
  serverid?: string;
  siaddr?: string;
}

/** One DHCP lease with udhcpc in the foreground (-q: quit once bound, -n: give up after the tries). */
function dhcp(ctx: InitContext, iface: string, seconds: number): Lease | undefined {
  const { sys } = ctx;
  const bb = ctx.manifest.tools.busybox;
  mkdirs(sys, DHCP_DIR);
  const script = `${DHCP_DIR}/udhcpc.script`;
  // udhcpc calls it with deconfig, then bound (variables: interface ip subnet mask router serverid siaddr).
  writeText(sys, script, [
    `#!${bb} sh`,
    `bb=${bb}`,
    'case "$1" in',
    '  deconfig) $bb ip -4 addr flush dev "$interface" ;;',
    '  bound|renew)',
    '    $bb ip -4 addr flush dev "$interface"',
    '    $bb ip addr add "$ip/${mask:-24}" dev "$interface" || exit 1',
    '    for r in $router; do $bb ip route add default via "$r" dev "$interface"; break; done',
    `    echo "ip=$ip mask=$mask router=$router serverid=$serverid siaddr=$siaddr" > ${DHCP_DIR}/lease.$interface ;;`,
    'esac',
    'exit 0',
    '',
  ].join('\n'), 0o755);
  const tries = Math.max(1, Math.ceil(seconds / 2));
  const pid = sys.spawn(bb, ['udhcpc', '-f', '-q', '-n', '-i', iface, '-t', String(tries), '-T', '2', '-A', '1', '-s', script], []);
  sys.waitpid(pid, 0);
  const text = readTextOr(sys, `${DHCP_DIR}/lease.${iface}`);
  if (!text) return undefined;
  const f = Object.fromEntries(text.split(' ').map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
  if (!f.ip) return undefined;
  const lease: Lease = { ip: f.ip, prefix: Number(f.mask) || 24 };
  if (f.router) lease.router = f.router.split(' ')[0]!;
  if (f.serverid) lease.serverid = f.serverid;
  if (f.siaddr) lease.siaddr = f.siaddr;
  return lease;
}
