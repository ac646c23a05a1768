/**
 * Boots a disk under QEMU through its firmware alone (SeaBIOS or OVMF), with no -kernel:
 * the harness in qemu/ always loads a kernel itself, and a bootable disk must be shown to
 * boot without one. Resolves with the console once `marker` appears; rejects with the
 * console's tail when qemu exits first or the time runs out.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
export const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';
/** OVMF that enforces Secure Boot (needs SMM), with Microsoft's keys enrolled and Secure Boot on (Debian's ovmf). */
export const OVMF_CODE_SECBOOT = '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd';
export const OVMF_VARS_MS = '/usr/share/OVMF/OVMF_VARS_4M.ms.fd';

export interface FirmwareBoot {
  disk: string;
  format: string;
  firmware: 'bios' | 'uefi';
  marker: string;
  timeoutMs: number;
  /** disk interface: virtio (default) or ide */
  interface?: 'virtio' | 'ide';
  /** console text that ends the wait at once as a failure (default: vdboot starting its rescue shell) */
  failOn?: string;
  /** UEFI with Secure Boot enforced and only Microsoft's keys (q35 with SMM, secure flash) */
  secureBoot?: boolean;
  /** guest memory (default 512 MiB; a kexec needs room for a second kernel and initramfs) */
  memoryMiB?: number;
  /** false: the guest's writes reach the disk file (default true: they are dropped) */
  snapshot?: boolean;
  /** 'exit': after the marker, wait for qemu to end (the guest powers off) before resolving */
  until?: 'marker' | 'exit';
}

export function bootFromDisk(o: FirmwareBoot): Promise<string> {
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-fwboot-'));
  const args = [
    '--signal=KILL', String(Math.ceil(o.timeoutMs / 1000) + 5), 'qemu-system-x86_64',
    '-machine', o.secureBoot ? 'q35,smm=on' : 'pc', '-accel', 'tcg', '-m', String(o.memoryMiB ?? 512), '-nodefaults', '-display', 'none', '-no-reboot',
    '-serial', 'stdio',
    '-drive', `file=${o.disk},format=${o.format},if=${o.interface ?? 'virtio'},snapshot=${o.snapshot === false ? 'off' : 'on'}`,
  ];
  if (o.secureBoot) {
    if (o.firmware !== 'uefi') throw new Error('Secure Boot needs firmware: \'uefi\'');
    const vars = path.join(scratch, 'vars.fd');
    fs.copyFileSync(OVMF_VARS_MS, vars);
    args.push('-global', 'driver=cfi.pflash01,property=secure,value=on',
      '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${OVMF_CODE_SECBOOT}`, '-drive', `if=pflash,format=raw,unit=1,file=${vars}`);
  } else if (o.firmware === 'uefi') {
    const vars = path.join(scratch, 'vars.fd');
    fs.copyFileSync(OVMF_VARS, vars);
    args.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${OVMF_CODE}`, '-drive', `if=pflash,format=raw,unit=1,file=${vars}`);
  }
  const child = spawn('timeout', args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  return new Promise<string>((resolve, reject) => {
    const finish = (err?: Error) => {
      clearTimeout(timer);
      try { process.kill(-child.pid!, 'SIGKILL'); } catch { /* already gone */ }
      fs.rmSync(scratch, { recursive: true, force: true });
      if (err) reject(err); else resolve(out);
    };
    const timer = setTimeout(() => finish(new Error(`no "${o.marker}" within ${o.timeoutMs} ms; console tail:\n${out.slice(-3000)}`)), o.timeoutMs);
    const failOn = o.failOn ?? 'starting the rescue shell';
    const onData = (b: Buffer) => {
      out += b.toString('latin1');
      if (out.includes(o.marker)) {
        if (o.until !== 'exit') finish();
      } else if (out.includes(failOn)) finish(new Error(`"${failOn}" before "${o.marker}"; console tail:\n${out.slice(-3000)}`));
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', (b: Buffer) => { out += b.toString('latin1'); });
    // 'close': after the console's last bytes, which may come after the process's exit
    child.on('close', () => {
      if (!out.includes(o.marker)) finish(new Error(`qemu exited before "${o.marker}"; console tail:\n${out.slice(-3000)}`));
      else if (o.until === 'exit') finish();
    });
  });
}
