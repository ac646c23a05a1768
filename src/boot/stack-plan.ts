/**
 * The storage stack's part of the boot plan: rd.luks.* (unlock), rd.lvm.* (activate) and
 * resume=, read from the command line by a pure function, with dracut's and systemd's
 * spellings. What the keys mean is in README.md ("LUKS and LVM").
 */
import type { Cmdline } from './cmdline.ts';
import { type DeviceSpec, parseDeviceSpec } from './devspec.ts';

export interface LuksKeySource {
  /** the key file's path: on KEYDEV when given, else in the initramfs */
  path: string;
  device?: DeviceSpec;
  /** rd.luks.key=UUID=PATH[:DEV]: only for that volume */
  uuid?: string;
}

export interface LuksOptions {
  /** rd.luks=0 turns unlocking off */
  enabled: boolean;
  /** rd.luks.uuid=: only these volumes (empty: every LUKS volume found) */
  uuids: string[];
  /** rd.luks.name=UUID=NAME: the mapping's name (default luks-UUID, as systemd names it) */
  names: { uuid: string; name: string }[];
  /** cryptsetup options from rd.luks.options= (discard → --allow-discards, …) */
  cryptsetupArgs: string[];
  keys: LuksKeySource[];
  /** passphrase tries on the console before the rescue shell */
  tries: number;
}

export interface LvmOptions {
  /** rd.lvm=0 turns activation off */
  enabled: boolean;
  /** rd.lvm.vg=: only these VGs */
  vgs: string[];
  /** rd.lvm.lv=VG/LV: only these LVs */
  lvs: string[];
}

export interface StackOptions {
  luks: LuksOptions;
  lvm: LvmOptions;
  /** resume=: the swap device to resume from (plain roots and root=tmpfs: boots; refused for root=vdisk:) */
  resume?: DeviceSpec;
}

const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/** rd.luks.uuid accepts luks-UUID and UUID=UUID too, as dracut and systemd do. */
export function normalizeLuksUuid(text: string): string | undefined {
  const t = text.replace(/^luks-/, '').replace(/^UUID=/, '');
  return UUID.test(t) ? t.toLowerCase() : undefined;
}

/** rd.luks.options words → cryptsetup open arguments. */
const LUKS_OPTIONS: Record<string, string> = {
  discard: '--allow-discards',
  'allow-discards': '--allow-discards',
  readonly: '--readonly',
  'read-only': '--readonly',
  'no-read-workqueue': '--perf-no_read_workqueue',
  'no-write-workqueue': '--perf-no_write_workqueue',
  'same-cpu-crypt': '--perf-same_cpu_crypt',
  'submit-from-crypt-cpus': '--perf-submit_from_crypt_cpus',
};

function off(v: string | undefined): boolean {
  return v === '0' || v === 'no' || v === 'false';
}

export function planStack(cmd: Cmdline, warnings: string[]): StackOptions {
  const luks: LuksOptions = { enabled: !off(cmd.get('rd.luks')) && !off(cmd.get('luks')), uuids: [], names: [], cryptsetupArgs: [], keys: [], tries: 3 };
  for (const key of ['rd.luks.uuid', 'luks.uuid']) {
    for (const v of cmd.all(key)) {
      const u = normalizeLuksUuid(v);
      if (u) luks.uuids.push(u);
      else warnings.push(`${key}=${v} is not a LUKS UUID (like 0b6a1c3e-…); it is ignored`);
    }
  }
  for (const key of ['rd.luks.name', 'luks.name']) {
    for (const v of cmd.all(key)) {
      const eq = v.indexOf('=');
      const u = eq > 0 ? normalizeLuksUuid(v.slice(0, eq)) : undefined;
      const name = v.slice(eq + 1);
      if (!u || !/^[A-Za-z0-9_.+-]{1,120}$/.test(name)) {
        warnings.push(`${key}=${v} is not UUID=NAME (a LUKS UUID and a mapping name of letters, digits, . _ + -); it is ignored`);
        continue;
      }
      luks.names.push({ uuid: u, name });
      if (!luks.uuids.includes(u)) luks.uuids.push(u);
    }
  }
  for (const key of ['rd.luks.options', 'luks.options']) {
    for (const v of cmd.all(key)) {
      // systemd: rd.luks.options=UUID=opts applies to one volume; vdboot applies it to all it opens
      const opts = /^[0-9a-fA-F-]{36}=/.test(v) ? v.slice(37) : v;
      for (const word of opts.split(',').filter(Boolean)) {
        const arg = LUKS_OPTIONS[word];
        if (arg) { if (!luks.cryptsetupArgs.includes(arg)) luks.cryptsetupArgs.push(arg); }
        else if (/^(tries)=(\d+)$/.test(word)) luks.tries = Math.max(1, Math.min(10, Number(word.slice(6))));
        else warnings.push(`${key}: option "${word}" is not one vdboot passes to cryptsetup (it knows ${Object.keys(LUKS_OPTIONS).join(', ')}, tries=N); it is ignored`);
      }
    }
  }
  for (const key of ['rd.luks.key', 'luks.key']) {
    for (const v of cmd.all(key)) {
      let rest = v;
      let uuid: string | undefined;
      const m = /^([0-9a-fA-F-]{36})=(.*)$/.exec(rest);
      if (m && normalizeLuksUuid(m[1]!)) { uuid = normalizeLuksUuid(m[1]!); rest = m[2]!; }
      // KEYPATH[:KEYDEV]; KEYDEV is a device spec, which may itself hold ":" only after UUID= etc.
      const cut = rest.indexOf(':');
      const path = cut < 0 ? rest : rest.slice(0, cut);
      const devText = cut < 0 ? undefined : rest.slice(cut + 1);
      if (!path.startsWith('/')) { warnings.push(`${key}=${v}: the key file's path must start with / (rd.luks.key=/keys/root.key:LABEL=USB); it is ignored`); continue; }
      const src: LuksKeySource = { path };
      if (uuid) src.uuid = uuid;
      if (devText !== undefined && devText !== '') {
        const dev = parseDeviceSpec(devText);
        if (!dev) { warnings.push(`${key}=${v}: "${devText}" is not a device spec (LABEL=…, UUID=…, PARTUUID=…, /dev/…); it is ignored`); continue; }
        src.device = dev;
      }
      luks.keys.push(src);
    }
  }
  const lvm: LvmOptions = { enabled: !off(cmd.get('rd.lvm')), vgs: [], lvs: [] };
  for (const v of cmd.all('rd.lvm.vg')) {
    if (/^[A-Za-z0-9_.+-]+$/.test(v)) lvm.vgs.push(v);
    else warnings.push(`rd.lvm.vg=${v} is not a VG name; it is ignored`);
  }
  for (const v of cmd.all('rd.lvm.lv')) {
    if (/^[A-Za-z0-9_.+-]+\/[A-Za-z0-9_.+-]+$/.test(v)) lvm.lvs.push(v);
    else warnings.push(`rd.lvm.lv=${v} is not VG/LV; it is ignored`);
  }
  const out: StackOptions = { luks, lvm };
  const resume = cmd.get('resume');
  if (resume !== undefined && resume !== '') {
    const spec = parseDeviceSpec(resume);
    if (spec) out.resume = spec;
    else warnings.push(`resume=${resume} is not a device spec (UUID=…, LABEL=…, /dev/…); nothing is resumed`);
  }
  return out;
}
