/**
 * Unlocking LUKS volumes at boot: every LUKS device found (or those rd.luks.uuid= names)
 * is opened with cryptsetup as /dev/mapper/luks-UUID (systemd's name, so the booted
 * system's crypttab finds it open and does not ask again; rd.luks.name=UUID=NAME
 * overrides). The key comes from rd.luks.key=PATH[:KEYDEV] — a file on another device,
 * read by vdboot's own NTFS/exFAT/FAT reader or from a read-only mount — else from the
 * console: echo off, rd.luks.options=tries=N tries (3), then the rescue shell.
 *
 * Nothing is written to the LUKS device: cryptsetup open only reads the header.
 */
import type { BlockReader } from '../formats/block-reader.ts';
import { openHostFs } from '../formats/hostfs.ts';
import { describeLuks, parseLuksHeader } from '../formats/luks.ts';
import { utf8Encode } from '../formats/text.ts';
import { isSysError } from '../sys/sys.ts';
import { openBlockReader } from './blockdev.ts';
import { BootFailure, type InitContext } from './context.ts';
import { CRYPTSETUP_WRONG_KEY, openCrypt, promptSecret } from './cryptsetup.ts';
import { deviceMatches, formatDeviceSpec, type BlockDeviceInfo } from './devspec.ts';
import { exists, mkdirs, readFileBytes, readTextOr } from './fsutil.ts';
import { mountDevice } from './mount-device.ts';
import type { LuksKeySource } from './stack-plan.ts';

const KEY_MOUNT = '/run/vdboot/keydev';
/** cryptsetup's own limit for a key file */
const MAX_KEY_FILE = 8 * 1024 * 1024;

/** The mapping name for a LUKS volume: rd.luks.name's, else systemd's luks-UUID. */
export function luksMappingName(ctx: InitContext, uuid: string): string {
  const u = uuid.toLowerCase();
  return ctx.plan.stack.luks.names.find((n) => n.uuid === u)?.name ?? `luks-${u}`;
}

/** Whether this LUKS device should be opened now (rd.luks=0, rd.luks.uuid=, already open). */
export function wantsUnlock(ctx: InitContext, dev: BlockDeviceInfo): boolean {
  const o = ctx.plan.stack.luks;
  if (!o.enabled || dev.fsType !== 'crypto_LUKS' || !dev.uuid) return false;
  if (o.uuids.length && !o.uuids.includes(dev.uuid.toLowerCase())) return false;
  return !exists(ctx.sys, `/dev/mapper/${luksMappingName(ctx, dev.uuid)}`);
}

/**
 * Opens one LUKS device. Returns the mapping's path. A key file that is given but cannot be
 * read, or that cryptsetup refuses, falls back to the console prompt (saying why); when no
 * try is left, a BootFailure names the device and the command line to fix.
 */
export function unlockLuks(ctx: InitContext, dev: BlockDeviceInfo, devicesNow: () => BlockDeviceInfo[]): string {
  const { sys, log, plan } = ctx;
  const uuid = dev.uuid!.toLowerCase();
  const name = luksMappingName(ctx, uuid);
  let header = '';
  try {
    const r = openBlockReader(sys, dev.path, dev.size);
    try { header = describeLuks(parseLuksHeader(r)); } finally { r.close(); }
  } catch (e) {
    log.warn(`${dev.path}: the LUKS header could not be read by vdboot (${(e as Error).message}); cryptsetup will try`);
  }
  log.info(`${dev.path} is encrypted${header ? ` (${header})` : ''}: unlocking as /dev/mapper/${name}`);
  const opts = plan.stack.luks;
  for (const src of opts.keys.filter((k) => !k.uuid || k.uuid === uuid)) {
    let key: Uint8Array;
    try {
      key = readKeyFile(ctx, src, devicesNow());
    } catch (e) {
      log.warn(`${describeKey(src)}: ${(e as Error).message}; asking on the console instead`);
      continue;
    }
    const r = openCrypt(ctx, { type: 'luks', device: dev.path, name, key, args: opts.cryptsetupArgs });
    key.fill(0);
    if (r.ok) {
      log.info(`unlocked ${dev.path} with the key file ${describeKey(src)}: /dev/mapper/${name}`);
      return `/dev/mapper/${name}`;
    }
    log.warn(`the key file ${describeKey(src)} does not open ${dev.path}: ${r.message || `cryptsetup exit ${r.exitCode}`}`);
  }
  const fix = `Check the passphrase, or give a key file: rd.luks.key=/path/to/keyfile:LABEL=USB (a file on another device), or leave the volume locked with rd.luks=0 / rd.luks.uuid=OTHER.`;
  for (let attempt = 1; attempt <= opts.tries; attempt++) {
    const pass = promptSecret(sys, `Passphrase for ${dev.path} (${name}): `);
    if (pass === undefined) throw new BootFailure(`${dev.path} is encrypted (LUKS, UUID ${uuid}) and there is no console to ask for its passphrase, nor a key file that opens it. ${fix}`);
    const key = utf8Encode(pass);
    const r = openCrypt(ctx, { type: 'luks', device: dev.path, name, key, args: opts.cryptsetupArgs });
    key.fill(0);
    if (r.ok) {
      log.info(`unlocked ${dev.path}: /dev/mapper/${name}`);
      return `/dev/mapper/${name}`;
    }
    if (r.exitCode === CRYPTSETUP_WRONG_KEY) {
      log.warn(`No key available with this passphrase (try ${attempt} of ${opts.tries})`);
      continue;
    }
    throw new BootFailure(`cryptsetup could not open ${dev.path} as /dev/mapper/${name} (exit ${r.exitCode}): ${r.message || 'no message'}. ${fix}`);
  }
  const cmdline = readTextOr(sys, '/proc/cmdline')?.trim();
  throw new BootFailure(`${dev.path} (LUKS, UUID ${uuid}) stays locked: no key available with the passphrase after ${opts.tries} tries. ${fix} ` +
    `To change the command line, edit the boot entry${cmdline ? `; this boot's was:\n  ${cmdline}` : ' (this boot\'s is in /proc/cmdline)'}`);
}

function describeKey(src: LuksKeySource): string {
  return `${src.path}${src.device ? ` on ${formatDeviceSpec(src.device)}` : ' in the initramfs'}`;
}

/**
 * The key file's bytes: from the initramfs when no device is named; from an NTFS, exFAT
 * or FAT device through vdboot's own reader (no mount, so a partition an image's mapping
 * holds is read too); from any other filesystem through a read-only mount, unmounted after.
 */
function readKeyFile(ctx: InitContext, src: LuksKeySource, devices: BlockDeviceInfo[]): Uint8Array {
  const { sys } = ctx;
  if (!src.device) return readFileBytes(sys, src.path, MAX_KEY_FILE);
  const dev = devices.find((d) => !d.notReady && deviceMatches(src.device!, d));
  if (!dev) throw new Error(`the key device ${formatDeviceSpec(src.device)} is not present`);
  let reader: (BlockReader & { close(): void }) | undefined;
  try {
    reader = openBlockReader(sys, dev.path, dev.size);
    const fs = openHostFs(reader);
    if (fs) {
      const file = fs.lookup(src.path);
      if (file.size > MAX_KEY_FILE) throw new Error(`the key file is ${file.size} bytes, more than cryptsetup accepts (${MAX_KEY_FILE})`);
      return new Uint8Array(fs.readFile(file, 0, file.size));
    }
  } finally {
    reader?.close();
  }
  mkdirs(sys, KEY_MOUNT);
  mountDevice(ctx, dev, KEY_MOUNT, undefined, true, '');
  try {
    return readFileBytes(sys, `${KEY_MOUNT}${src.path}`, MAX_KEY_FILE);
  } catch (e) {
    throw new Error(isSysError(e, 'ENOENT') ? `${src.path} does not exist on ${dev.path}` : (e as Error).message);
  } finally {
    try { sys.umount2(KEY_MOUNT, 0); } catch { /* reported by the next mount */ }
  }
}
