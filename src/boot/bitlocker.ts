/**
 * BitLocker host partitions: the partition that holds the image file is BitLocker-encrypted
 * (Windows 11 turns device encryption on by default). vdboot reads the FVE metadata itself
 * (src/formats/bitlocker.ts) to name the protectors and refuse what cannot be unlocked, then
 * runs `cryptsetup open --type bitlk` (cryptsetup.ts's runner) with the key — a recovery password or password typed on
 * the console (echo off, three tries), or read from a file on another device
 * (rd.vdisk.bitlocker.key=KEYPATH:KEYDEV: a text file with the password, or a .BEK startup
 * key) — and the unlocked /dev/mapper/bitlk-GUID is the host from then on, read by vdboot's
 * own NTFS reader, mapped directly, mounted as vdhost.
 *
 * Never happens: key derivation in the interpreter (cryptsetup does it natively), a key
 * written to a file (it goes to cryptsetup's stdin through a memfd, dropped after), a write
 * to the BitLocker volume (the mapping is the user's read-write host only as far as the
 * image boot writes its own file through it, as on an unencrypted NTFS).
 */
import { FormatError } from '../formats/block-reader.ts';
import {
  type BitLockerVolume, bitLockerKeyNeed, describeBitLocker, protectorText, readBitLocker,
} from '../formats/bitlocker.ts';
import { openHostFs } from '../formats/hostfs.ts';
import { utf16leDecode, utf8Decode, utf8Encode } from '../formats/text.ts';
import { openBlockReader } from './blockdev.ts';
import { BootFailure, type InitContext } from './context.ts';
import { CRYPTSETUP_WRONG_KEY, cryptsetupTool, openCrypt, promptSecret } from './cryptsetup.ts';
import { formatDeviceSpec, type BlockDeviceInfo } from './devspec.ts';
import type { BitLockerKeyOption } from './plan.ts';
import { waitForDevice, waitForUevents } from './devwait.ts';
import { DeviceMapper } from './dm.ts';
import { mountPathOf } from './mount-device.ts';

export const BITLOCKER_TRIES = 3;
/** dm names of unlocked BitLocker hosts begin with this (the shutdown hand-off finds them by it). */
export const BITLOCKER_DM_PREFIX = 'bitlk-';
/** Key files larger than this are not BitLocker keys (a .BEK file is a few hundred bytes). */
const MAX_KEY_FILE = 64 * 1024;

/** The dm name for an unlocked BitLocker volume: stable across boots, from its GUID. */
export function bitLockerMapName(vol: BitLockerVolume): string {
  return `${BITLOCKER_DM_PREFIX}${vol.guid}`;
}

function keyText(key: BitLockerKeyOption | undefined): string {
  return key ? `${key.path} on ${key.device ? formatDeviceSpec(key.device) : 'any partition'}` : '';
}

/** What the boot does with this volume, for `vdboot inspect` / `vdboot plan` and the console. */
export function bitLockerBootLines(vol: BitLockerVolume, name: string, key: BitLockerKeyOption | undefined): string[] {
  const need = bitLockerKeyNeed(vol, name);
  const lines = describeBitLocker(vol);
  if (need.kind === 'refused') lines.push(`at boot: refused — ${need.message}`);
  else if (need.kind === 'clear-key') lines.push('at boot: opened with its clear key (BitLocker protection is suspended): no key asked');
  else {
    const typed = need.accepts.filter((k) => k !== 'startup-key').map(protectorText);
    const ask = typed.length ? `asks for the ${typed.join(' or ')} on the console (echo off, ${BITLOCKER_TRIES} tries)` : 'needs the startup key file: rd.vdisk.bitlocker.key=/NAME.BEK:KEYDEV';
    lines.push(key ? `at boot: reads the key from ${keyText(key)} (rd.vdisk.bitlocker.key); ${typed.length ? `if it does not open the volume, ${ask}` : 'nothing to type'}` : `at boot: ${ask}${typed.length && need.accepts.includes('startup-key') ? ', or takes the startup key file given by rd.vdisk.bitlocker.key=/NAME.BEK:KEYDEV' : ''}`);
    if (vol.variant === 'to-go') lines.push('  (a BitLocker To Go drive: the NTFS, exFAT or FAT filesystem inside is the host)');
  }
  return lines;
}

/**
 * For `vdboot plan`: the host is BitLocker, so the dry run stops before the image (it has no
 * key). FormatError field "bitlocker-host" (not a failure) or "bitlocker-refused" (a TPM-only
 * volume: the boot would stop).
 */
export function bitLockerPlanStop(dev: BlockDeviceInfo, vol: BitLockerVolume, key: BitLockerKeyOption | undefined, path: string): FormatError {
  const need = bitLockerKeyNeed(vol, dev.path);
  if (need.kind === 'refused') return new FormatError(need.message, 'bitlocker-refused', dev.path);
  return new FormatError(
    `${path} is on ${dev.path}, a BitLocker volume:\n${bitLockerBootLines(vol, dev.path, key).map((l) => `  ${l}`).join('\n')}\n` +
      `At boot cryptsetup unlocks it as /dev/mapper/${bitLockerMapName(vol)} and vdboot finds ${path} on the filesystem inside. ` +
      'Without the key, this machine cannot show the image chain or device-mapper tables.',
    'bitlocker-host', dev.path,
  );
}

// ---------------------------------------------------------------------------------------
// At boot

/** The key file's content as cryptsetup wants it: a .BEK file as it is, a text file's first line. */
export function keyFromFile(bytes: Uint8Array): { key: Uint8Array; kind: 'startup-key' | 'text' } {
  // A .BEK file is an FVE metadata structure: its u32 size at 0 is the file's size and its
  // header size at 8 is 48 (as the metadata header of a volume).
  const le32 = (o: number) => (bytes[o]! | (bytes[o + 1]! << 8) | (bytes[o + 2]! << 16) | (bytes[o + 3]! << 24)) >>> 0;
  if (bytes.length >= 48 && le32(0) === bytes.length && le32(8) === 48) return { key: bytes, kind: 'startup-key' };
  let text: string;
  if (bytes.length >= 2 && bytes[0] === 0xff && bytes[1] === 0xfe) text = utf16leDecode(bytes.subarray(2, bytes.length & ~1)); // Notepad's "Unicode"
  else text = utf8Decode(bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf ? bytes.subarray(3) : bytes);
  const line = (text.split(/\r?\n/).find((l) => l.trim() !== '') ?? '').replace(/\s+$/, '');
  return { key: utf8Encode(line), kind: 'text' };
}

/** Reads the key file named by rd.vdisk.bitlocker.key with vdboot's own readers (FAT, exFAT, NTFS). */
function readKeyFile(ctx: InitContext, key: BitLockerKeyOption): Uint8Array {
  const { sys } = ctx;
  const tryDevice = (dev: BlockDeviceInfo): Uint8Array | string => {
    let reader;
    try { reader = openBlockReader(sys, dev.path, dev.size); } catch (e) { return `${dev.path}: ${(e as Error).message}`; }
    try {
      const fs = openHostFs(reader);
      if (!fs) return `${dev.path}: no FAT, exFAT or NTFS filesystem`;
      const file = fs.lookup(key.path);
      if (file.size > MAX_KEY_FILE) return `${dev.path}: ${key.path} is ${file.size} bytes, too large for a key file`;
      return fs.readFile(file, 0, file.size);
    } catch (e) {
      return `${dev.path}: ${(e as Error).message}`;
    } finally {
      reader.close();
    }
  };
  if (key.device) {
    const dev = waitForDevice(ctx, key.device, 'key device (rd.vdisk.bitlocker.key)');
    const r = tryDevice(dev);
    if (typeof r === 'string') throw new BootFailure(`Could not read the BitLocker key file: ${r}. Check rd.vdisk.bitlocker.key=${key.path}:${formatDeviceSpec(key.device)}.`);
    return r;
  }
  const tried: string[] = [];
  for (const dev of ctx.devices.scan()) {
    if (dev.fsType !== 'vfat' && dev.fsType !== 'exfat' && dev.fsType !== 'ntfs') continue;
    const r = tryDevice(dev);
    if (typeof r !== 'string') return r;
    tried.push(r);
  }
  throw new BootFailure(`Could not find the BitLocker key file ${key.path} (rd.vdisk.bitlocker.key) on any FAT, exFAT or NTFS partition${tried.length ? `:\n  ${tried.join('\n  ')}` : ' (none found)'}. Name its device: rd.vdisk.bitlocker.key=${key.path}:LABEL=…`);
}

/**
 * Unlocks the BitLocker host `dev` and returns the unlocked device (/dev/mapper/bitlk-GUID,
 * probed). BootFailure, naming the device and the command line to fix, when it cannot:
 * a TPM-only volume, no cryptsetup in the initramfs, three wrong keys.
 */
export function unlockBitLocker(ctx: InitContext, dev: BlockDeviceInfo, key: BitLockerKeyOption | undefined, onUnlocked: (dmName: string) => void): BlockDeviceInfo {
  const { sys, log } = ctx;
  let vol: BitLockerVolume;
  const reader = openBlockReader(sys, dev.path, dev.size);
  try {
    vol = readBitLocker(reader);
  } catch (e) {
    throw new BootFailure(`The image's host ${dev.path} is BitLocker, but its metadata cannot be read: ${(e as Error).message}`);
  } finally {
    reader.close();
  }
  for (const c of vol.copies) if (c.damage) log.warn(`${dev.path}: BitLocker metadata copy ${c.index + 1} at ${c.offset} is damaged (${c.damage}); copy ${vol.used + 1} used instead`);
  const need = bitLockerKeyNeed(vol, dev.path);
  if (need.kind === 'refused') throw new BootFailure(need.message);
  const name = bitLockerMapName(vol);
  // cryptsetup and its kernel modules (dm_crypt, xts, cbc, aes); BootFailure naming what to install when absent
  cryptsetupTool(ctx, `${dev.path} is BitLocker-encrypted (${vol.protectors.map((p) => protectorText(p.kind)).join(', ')}): unlocking it`);
  // Read-only unless the image boots read-write (its writes, and an expansion, go through the host).
  const readOnly = ctx.plan.vdisk.mode !== 'rw';
  const open = (k: Uint8Array, what: string): boolean => {
    const failed = log.step('unlock', () => openCrypt(ctx, { type: 'bitlk', device: dev.path, name, key: k, args: readOnly ? ['--readonly'] : [] }),
      (r) => r.ok ? `unlocked ${dev.path} (BitLocker ${vol.guid}) with ${what} as /dev/mapper/${name}` : `${dev.path}: ${what} did not open it`);
    if (failed.ok) return true;
    if (failed.exitCode !== CRYPTSETUP_WRONG_KEY) {
      // cryptsetup refuses some volumes whatever the key (encrypt-on-write, partially converted).
      const unsupported = /not supported|cannot be activated/.test(failed.message);
      throw new BootFailure(`cryptsetup could not open ${dev.path} (BitLocker ${vol.guid}): ${failed.message} (exit ${failed.exitCode}). ` +
        (unsupported
          ? 'cryptsetup cannot open this BitLocker volume in its current state. In Windows, let the encryption finish ("manage-bde -status" shows "Fully Encrypted", 100%), or turn BitLocker off for this partition ("manage-bde -off"), then boot again.'
          : 'Check that the initramfs has dm_crypt and the kernel has AES-XTS/CBC; the rescue shell has cryptsetup to try by hand.'));
    }
    if (!what.startsWith('the key typed')) log.warn(`${what} did not open ${dev.path}: ${failed.message}`);
    return false;
  };

  let unlocked = false;
  // A clear key opens the volume whatever is given; cryptsetup still wants a non-empty key file.
  if (need.kind === 'clear-key') unlocked = open(utf8Encode('-'), 'its clear key');
  if (!unlocked && key) {
    const k = keyFromFile(readKeyFile(ctx, key));
    unlocked = open(k.key, `the ${k.kind === 'startup-key' ? 'startup key' : 'key'} in ${keyText(key)}`);
  }
  const typed = need.kind === 'secret' ? need.accepts.filter((k) => k !== 'startup-key') : [];
  if (!unlocked && typed.length) {
    const what = typed.map(protectorText).join(' or ');
    for (let attempt = 1; attempt <= BITLOCKER_TRIES && !unlocked; attempt++) {
      const secret = promptSecret(sys, `\nvdboot: ${dev.path} is BitLocker-encrypted${vol.description ? ` ("${vol.description}")` : ''}.\nEnter the ${what} (try ${attempt} of ${BITLOCKER_TRIES}): `);
      if (secret === undefined) break;
      unlocked = open(utf8Encode(secret.trim()), `the key typed (try ${attempt} of ${BITLOCKER_TRIES})`);
      if (!unlocked) log.write(`No key available with this passphrase (try ${attempt} of ${BITLOCKER_TRIES}).\n`);
    }
  }
  if (!unlocked) {
    throw new BootFailure(
      `${dev.path} (BitLocker ${vol.guid}${vol.description ? `, "${vol.description}"` : ''}) was not unlocked: no key given opened it` +
        `${typed.length ? ` (${BITLOCKER_TRIES} tries on the console)` : ''}. ` +
        `It accepts: ${vol.protectors.map((p) => protectorText(p.kind)).join(', ')}. ` +
        'Type the 48-digit recovery password (Windows: manage-bde -protectors -get C:, or your Microsoft account\'s recovery keys) at the prompt, ' +
        'or put it in a text file on a stick and boot with rd.vdisk.bitlocker.key=/recovery.txt:LABEL=STICK. ' +
        `In the rescue shell: cryptsetup open --type bitlk ${dev.path} ${name}`,
    );
  }
  onUnlocked(name);
  return unlockedDevice(ctx, name);
}

/**
 * The scanned device behind /dev/mapper/NAME (the kernel lists it as dm-N), with the node
 * made when cryptsetup made none (no udev here), named by its mapper path.
 */
function unlockedDevice(ctx: InitContext, name: string): BlockDeviceInfo {
  const { sys } = ctx;
  const mapped = `/dev/mapper/${name}`;
  const deadline = sys.monotonicMs() + 10_000;
  for (;;) {
    for (const d of ctx.devices.scan()) {
      if (!/^dm-\d+$/.test(d.name) || d.notReady) continue;
      if (d.dmName !== name) continue;
      // libdevmapper makes the node itself when no udev runs; if it did not, mountPathOf does.
      return { ...d, path: mountPathOf(sys, d), deadRanges: deadRangesOf(ctx, name) };
    }
    if (sys.monotonicMs() >= deadline) {
      throw new BootFailure(`cryptsetup reported ${mapped} open, but no such device-mapper device appeared within 10 s. The rescue shell has "cryptsetup status ${name}".`);
    }
    waitForUevents(ctx, 200);
  }
}

/**
 * The ranges cryptsetup's mapping fills with `zero` (or `error`) targets: the FVE metadata
 * areas, which read as zeros and swallow writes. Windows' NTFS keeps them as its own reserved
 * clusters, so no image file lies there; an NTFS written by other tools may not, and the
 * planner refuses an image whose clusters reach into one (vdisk.ts).
 */
function deadRangesOf(ctx: InitContext, name: string): Array<{ offset: number; length: number }> {
  const dm = new DeviceMapper(ctx.sys);
  try {
    const dead = dm.table(name).filter((t) => t.type === 'zero' || t.type === 'error').map((t) => ({ offset: t.start * 512, length: t.length * 512 }));
    if (dead.length) ctx.log.info(`/dev/mapper/${name}: ${dead.length} BitLocker metadata area${dead.length > 1 ? 's' : ''} (${dead.reduce((a, d) => a + d.length, 0) / 1024} KiB) read${dead.length > 1 ? '' : 's'} as zeros there; no image may lie in ${dead.length > 1 ? 'them' : 'it'}`);
    return dead;
  } catch (e) {
    throw new BootFailure(`cannot read the device-mapper table of /dev/mapper/${name} (${(e as Error).message}), so vdboot cannot tell where the BitLocker metadata areas lie, which no image may touch. The rescue shell has "cryptsetup status ${name}".`);
  } finally {
    dm.close();
  }
}

/** Whether the host device found for an image is BitLocker (and must be unlocked first). */
export function isBitLockerHost(dev: BlockDeviceInfo): boolean {
  return dev.fsType === 'BitLocker';
}
