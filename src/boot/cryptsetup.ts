/**
 * Running Debian's cryptsetup at boot, and asking the console for a secret. Key derivation
 * (PBKDF2, Argon2) and key-slot decryption happen inside cryptsetup and the kernel, never in
 * the interpreter. The key reaches cryptsetup through a memfd on its stdin
 * (`--key-file=-`): it is never written to a file, and the memfd is closed right after.
 *
 * Reusable for any type cryptsetup opens (luks, bitlk): `openCrypt(ctx, request)`.
 */
import { findModule } from '../formats/manifest.ts';
import { utf8Decode, utf8Encode } from '../formats/text.ts';
import { MFD, O, type Sys } from '../sys/sys.ts';
import { BootFailure, type InitContext } from './context.ts';

/** What unlocking needs from the kernel; mkinitramfs includes them with cryptsetup (CRYPT_MODULES). */
const CRYPT_MODULES = ['dm_crypt', 'af_alg', 'algif_skcipher', 'xts', 'essiv', 'cbc', 'aesni_intel', 'sha256_ssse3'];

export interface CryptOpenRequest {
  /** cryptsetup's --type: luks, bitlk, … */
  type: string;
  device: string;
  /** the mapping name: /dev/mapper/NAME */
  name: string;
  /** the key file's bytes or the passphrase (without a newline) */
  key: Uint8Array;
  /** further cryptsetup open arguments (--allow-discards, --readonly, …) */
  args: string[];
}

export interface CryptOpenResult {
  ok: boolean;
  exitCode: number;
  /** what cryptsetup printed, trimmed */
  message: string;
}

/** cryptsetup's exit code for a key that opens no key slot (EPERM). */
export const CRYPTSETUP_WRONG_KEY = 2;


/** The cryptsetup program of this initramfs, with its kernel modules loaded; BootFailure when absent. */
export function cryptsetupTool(ctx: InitContext, what: string): string {
  const tool = ctx.manifest.tools.cryptsetup;
  if (!tool) {
    if (ctx.manifest.build.hostonly?.toolsLeftOut?.includes('cryptsetup')) {
      throw new BootFailure(`${what} needs cryptsetup, which this initramfs does not have: it was built with --hostonly on a machine without encrypted disks. Build it again with --with cryptsetup (or without --hostonly).`);
    }
    throw new BootFailure(`${what} needs cryptsetup, which this initramfs does not have: install Debian's cryptsetup-bin on the machine that builds it and run "vdboot mkinitramfs" again (without --without cryptsetup).`);
  }
  {
    const present = CRYPT_MODULES.filter((m) => findModule(ctx.manifest, m));
    ctx.modules.reportFailures(ctx.modules.load(present));
  }
  return tool;
}

/**
 * `cryptsetup open --type TYPE --key-file=- DEVICE NAME`, the key on stdin from a memfd,
 * its messages captured. Creates /dev/mapper/NAME on success; changes nothing on failure.
 */
export function openCrypt(ctx: InitContext, req: CryptOpenRequest): CryptOpenResult {
  const { sys } = ctx;
  const tool = cryptsetupTool(ctx, `Unlocking ${req.device}`);
  const keyFd = sys.memfdCreate('vdboot-key', MFD.CLOEXEC);
  const outFd = sys.memfdCreate('vdboot-cryptsetup', MFD.CLOEXEC);
  try {
    if (req.key.length) sys.pwrite(keyFd, req.key, 0);
    const argv = ['cryptsetup', 'open', '--type', req.type, '--key-file=-', '--disable-locks', ...req.args, req.device, req.name];
    // No udev here: libdevmapper makes /dev/mapper/NAME itself instead of waiting for it.
    const env = ['DM_DISABLE_UDEV=1', 'LC_ALL=C', 'PATH=/usr/sbin:/usr/bin:/sbin:/bin'];
    const pid = sys.spawn(tool, argv, env, { stdio: [keyFd, outFd, outFd] });
    let r = sys.waitpid(pid, 0);
    while (r.pid !== pid) r = sys.waitpid(pid, 0);
    const out = new Uint8Array(4096);
    let n = 0;
    try { n = sys.pread(outFd, out, 0); } catch { n = 0; }
    const message = utf8Decode(out.subarray(0, Math.max(0, n))).trim();
    return { ok: r.exitCode === 0 && r.termSignal === 0, exitCode: r.termSignal ? 128 + r.termSignal : r.exitCode, message };
  } finally {
    sys.close(keyFd);
    sys.close(outFd);
  }
}

// --- the console -------------------------------------------------------------------------

const TCGETS = 0x5401;
const TCSETS = 0x5402;
/** sizeof(struct termios) as TCGETS fills it (kernel layout, not glibc's) */
const TERMIOS_SIZE = 36;
const LFLAG_OFFSET = 12;
const ECHO = 0o10;
const ECHONL = 0o100;

/**
 * Asks for a secret on /dev/console with echo off (the terminal's settings restored after,
 * whatever happens). Returns the line without its newline, or undefined when there is no
 * console to ask on or it reached end of input.
 */
export function promptSecret(sys: Sys, prompt: string): string | undefined {
  let fd: number;
  try {
    fd = sys.open('/dev/console', O.RDWR | O.NOCTTY);
  } catch {
    return undefined;
  }
  let saved: ArrayBuffer | undefined;
  try {
    try {
      const t = new ArrayBuffer(TERMIOS_SIZE);
      sys.ioctl(fd, TCGETS, t);
      saved = t.slice(0);
      const v = new DataView(t);
      v.setUint32(LFLAG_OFFSET, (v.getUint32(LFLAG_OFFSET, true) & ~ECHO) | ECHONL, true);
      sys.ioctl(fd, TCSETS, t);
    } catch {
      saved = undefined; // not a terminal: nothing to hide, nothing to restore
    }
    sys.write(fd, utf8Encode(prompt));
    const line: number[] = [];
    const buf = new Uint8Array(256);
    for (;;) {
      const n = sys.read(fd, buf);
      if (n <= 0) {
        if (line.length === 0) return undefined;
        break;
      }
      const nl = buf.subarray(0, n).indexOf(10);
      for (let i = 0; i < (nl < 0 ? n : nl); i++) line.push(buf[i]!);
      if (nl >= 0 || line.length > 4096) break;
    }
    if (!saved) sys.write(fd, utf8Encode('\n'));
    if (line.length && line[line.length - 1] === 13) line.pop();
    return utf8Decode(Uint8Array.from(line));
  } finally {
    if (saved) { try { sys.ioctl(fd, TCSETS, saved); } catch { /* the console went away */ } }
    sys.close(fd);
  }
}
