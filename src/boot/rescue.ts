/** The rescue shell on the console: for rd.break, and after any failure. */
import { O, REBOOT, type Sys } from '../sys/sys.ts';
import type { ConsoleLog } from './console.ts';
import { INIT_ENV } from './switchroot.ts';

export const SHELL = '/bin/sh';
export const SHELL_ENV = [...INIT_ENV, 'PS1=vdboot# ', 'ENV=', 'SHELL=/bin/sh'];

/** Runs one interactive shell on the console and waits for it to exit. False when none could start. */
export function runShell(sys: Sys, log: ConsoleLog): boolean {
  let fd = -1;
  try {
    fd = sys.open('/dev/console', O.RDWR | O.NOCTTY);
  } catch {
    fd = -1;
  }
  let pid: number;
  try {
    const stdio: [number, number, number] | undefined = fd >= 0 ? [fd, fd, fd] : undefined;
    pid = sys.spawn(SHELL, ['sh'], SHELL_ENV, { stdio, setsid: true, ctty: true });
  } catch (e) {
    log.error(`the rescue shell ${SHELL} could not start: ${(e as Error).message}`);
    return false;
  } finally {
    if (fd >= 0) sys.close(fd);
  }
  // Other children (storage daemons) may end meanwhile: wait for the shell itself.
  while (sys.waitpid(pid, 0).pid !== pid);
  return true;
}

/** rd.break: a shell, then the boot goes on when it exits. */
export function breakShell(sys: Sys, log: ConsoleLog, point: string): void {
  log.info(`rd.break=${point}: starting a shell; leave it (exit or Ctrl-D) to continue booting`);
  runShell(sys, log);
}

/**
 * After a failure: the shell again and again, never returning — PID 1 must not exit
 * (the kernel would panic). With rd.shell=0 the machine halts instead, after the message.
 */
export function failureShell(sys: Sys, log: ConsoleLog, shellEnabled: boolean, beforeHalt?: () => void): never {
  if (!shellEnabled) {
    log.info('rd.shell=0: no rescue shell; the system halts. Remove rd.shell=0 to get a shell here.');
    // Image devices and the host filesystem come down first, so the host is left clean.
    beforeHalt?.();
    sys.sync();
    sys.reboot(REBOOT.HALT);
  }
  for (;;) {
    log.info('starting the rescue shell; type "reboot -f" to restart, "poweroff -f" to turn off');
    if (!runShell(sys, log)) {
      for (;;) sys.sleepMs(3_600_000);
    }
  }
}
