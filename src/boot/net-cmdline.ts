/**
 * The network options of the kernel command line, dracut's and the kernel's way (the
 * kernel's Documentation/admin-guide/nfs/nfsroot.rst, dracut.cmdline(7)), as plain data:
 *
 *   ip=dhcp | on | any                          DHCP on every interface with a link
 *   ip=IFACE:dhcp[:MTU[:MAC]]                   DHCP on one interface
 *   ip=CLIENT:[SERVER]:GW:NETMASK:HOSTNAME:IFACE:none|off|dhcp[:MTU[:MAC]]  (kernel: …:DNS0:DNS1:NTP)
 *   ifname=NAME:MAC                             the interface with that MAC is called NAME
 *   rd.neednet=1                                bring the network up even without a network root
 *
 * IPv4 only: IPv6 methods (dhcp6, auto6, link6) draw a warning.
 */

export interface IpConfig {
  method: 'dhcp' | 'static';
  /** undefined: every interface (dhcp), or the only one (static) */
  iface?: string;
  /** static: the client's address and prefix length */
  address?: string;
  prefix?: number;
  gateway?: string;
  /** the kernel's server-ip field (for a network root when the URL has none) */
  server?: string;
  hostname?: string;
  mtu?: number;
  mac?: string;
  /** the option as written, for messages */
  text: string;
}

export interface NetOptions {
  ip: IpConfig[];
  ifnames: { name: string; mac: string }[];
  /** rd.neednet=1 */
  need: boolean;
}

const MAC = /^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$/;
const IFACE = /^[A-Za-z0-9_.@-]{1,15}$/;

/** A dotted IPv4 address's four bytes; undefined for anything else. */
export function parseIpv4(text: string): Uint8Array | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
  if (!m) return undefined;
  const b = m.slice(1).map(Number);
  return b.every((x) => x <= 255) ? Uint8Array.from(b) : undefined;
}

export function isIpv4(text: string): boolean {
  return parseIpv4(text) !== undefined;
}

/** 255.255.255.0 or 24 → 24; undefined for a netmask whose ones are not contiguous. */
export function prefixLength(netmask: string): number | undefined {
  if (/^\d{1,2}$/.test(netmask)) return Number(netmask) <= 32 ? Number(netmask) : undefined;
  if (!isIpv4(netmask)) return undefined;
  const n = netmask.split('.').reduce((a, x) => a * 256 + Number(x), 0);
  let bits = 0;
  while (bits < 32 && (n & (2 ** (31 - bits))) !== 0) bits++;
  const ones = bits === 0 ? 0 : 2 ** 32 - 2 ** (32 - bits);
  return ones === n ? bits : undefined;
}

const DHCP = new Set(['dhcp', 'on', 'any', 'single-dhcp', 'both']);
const V6 = new Set(['dhcp6', 'auto6', 'either6', 'link6', 'link-local']);

/** One ip= value; a string is a message for the console. */
export function parseIp(text: string): IpConfig | string {
  if (DHCP.has(text)) return { method: 'dhcp', text };
  if (V6.has(text)) return `ip=${text}: IPv6 configuration is not supported by vdboot; use ip=dhcp or a static IPv4 ip=CLIENT::GW:NETMASK:HOSTNAME:IFACE:none`;
  const f = text.split(':');
  // IFACE:METHOD[:MTU[:MAC]] (dracut)
  if (f.length >= 2 && f.length <= 4 + 5 && !isIpv4(f[0]!) && f[0] !== '' && (DHCP.has(f[1]!) || V6.has(f[1]!) || f[1] === 'none' || f[1] === 'off')) {
    if (!IFACE.test(f[0]!)) return `ip=${text}: "${f[0]}" is not an interface name`;
    if (V6.has(f[1]!)) return `ip=${text}: IPv6 configuration is not supported by vdboot; use ip=${f[0]}:dhcp`;
    if (f[1] === 'none' || f[1] === 'off') return `ip=${text}: ${f[1]} with no address configures nothing; use ip=${f[0]}:dhcp or ip=CLIENT::GW:NETMASK::${f[0]}:none`;
    // MAC addresses contain colons: the fields after MTU are the MAC's six
    const cfg: IpConfig = { method: 'dhcp', iface: f[0]!, text };
    const extra = tail(f.slice(2), text, cfg);
    return typeof extra === 'string' ? extra : cfg;
  }
  if (f.length < 7) return `ip=${text} is not a form vdboot knows: ip=dhcp, ip=IFACE:dhcp, or ip=CLIENT:[SERVER]:GW:NETMASK:HOSTNAME:IFACE:none`;
  const [client, server, gw, mask, hostname, iface, method] = f as [string, string, string, string, string, string, string];
  const cfg: IpConfig = { method: 'static', text };
  if (iface) {
    if (!IFACE.test(iface)) return `ip=${text}: "${iface}" is not an interface name`;
    cfg.iface = iface;
  }
  if (hostname) cfg.hostname = hostname;
  if (server) {
    if (!isIpv4(server)) return `ip=${text}: the server field "${server}" is not an IPv4 address`;
    cfg.server = server;
  }
  if (DHCP.has(method) && !client) {
    cfg.method = 'dhcp';
  } else if (method === 'none' || method === 'off' || method === '' || (DHCP.has(method) && client)) {
    if (!client) return `ip=${text}: a static configuration needs the client's address first, e.g. ip=192.168.1.20::192.168.1.1:255.255.255.0::eth0:none`;
    if (!isIpv4(client)) return `ip=${text}: the client address "${client}" is not an IPv4 address`;
    cfg.address = client;
    if (mask) {
      const p = prefixLength(mask);
      if (p === undefined) return `ip=${text}: the netmask "${mask}" is not a netmask (255.255.255.0 or 24)`;
      cfg.prefix = p;
    } else cfg.prefix = defaultPrefix(client);
    if (gw) {
      if (!isIpv4(gw)) return `ip=${text}: the gateway "${gw}" is not an IPv4 address`;
      cfg.gateway = gw;
    }
  } else if (V6.has(method)) {
    return `ip=${text}: IPv6 configuration is not supported by vdboot`;
  } else {
    return `ip=${text}: "${method}" is not none, off or dhcp`;
  }
  // dracut: …:METHOD[:MTU[:MAC]]; the kernel: …:METHOD:DNS0:DNS1:NTP (addresses, ignored)
  const rest = f.slice(7);
  if (rest.length && rest.every((x) => x === '' || isIpv4(x))) return cfg;
  const extra = tail(rest, text, cfg);
  return typeof extra === 'string' ? extra : cfg;
}

/** [MTU[:MAC…]] after the method */
function tail(rest: string[], text: string, cfg: IpConfig): string | undefined {
  if (rest.length === 0) return undefined;
  const [mtu, ...mac] = rest;
  if (mtu) {
    if (!/^\d+$/.test(mtu) || Number(mtu) < 68 || Number(mtu) > 65535) return `ip=${text}: the MTU "${mtu}" is not a number from 68 to 65535`;
    cfg.mtu = Number(mtu);
  }
  if (mac.length) {
    const m = mac.join(':');
    if (!MAC.test(m)) return `ip=${text}: "${m}" is not a MAC address (aa:bb:cc:dd:ee:ff)`;
    cfg.mac = m.toLowerCase();
  }
  return undefined;
}

/** The classful prefix when no netmask is given, as the kernel does. */
function defaultPrefix(addr: string): number {
  const a = Number(addr.split('.')[0]);
  return a < 128 ? 8 : a < 192 ? 16 : 24;
}

/** ifname=NAME:MAC */
export function parseIfname(text: string): { name: string; mac: string } | string {
  const cut = text.indexOf(':');
  const name = cut < 0 ? text : text.slice(0, cut);
  const mac = cut < 0 ? '' : text.slice(cut + 1);
  if (!IFACE.test(name)) return `ifname=${text}: "${name}" is not an interface name`;
  if (!MAC.test(mac)) return `ifname=${text}: "${mac}" is not a MAC address; write ifname=NAME:aa:bb:cc:dd:ee:ff`;
  return { name, mac: mac.toLowerCase() };
}

/** ip=, ifname=, rd.neednet from the command line's values. */
export function planNet(values: { ip: string[]; ifname: string[]; neednet?: string }, warnings: string[]): NetOptions {
  const out: NetOptions = { ip: [], ifnames: [], need: false };
  for (const v of values.ip) {
    if (v === 'off' || v === 'none') continue;
    const c = parseIp(v);
    if (typeof c === 'string') warnings.push(`${c}; that ip= is ignored`);
    else out.ip.push(c);
  }
  for (const v of values.ifname) {
    const n = parseIfname(v);
    if (typeof n === 'string') warnings.push(`${n}; it is ignored`);
    else out.ifnames.push(n);
  }
  const need = values.neednet;
  if (need !== undefined && need !== '0' && need !== 'no' && need !== 'false') out.need = true;
  return out;
}
