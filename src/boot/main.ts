/** The init bundle's entry on QuickJS: the native `sys` module, then vdboot's PID 1. */
import * as native from 'sys';
import { quickjsSys } from '../sys/quickjs.ts';
import { runInit } from './init.ts';
import { runShutdown } from './shutdown.ts';
import { RECONNECT_ARGV0, runNbdReconnect } from './nbd-reconnect.ts';
import { runVdiskload } from './vdiskload.ts';

const sys = quickjsSys(native);
const argv = sys.argv();
// The same binary attaches images on a running system as vdiskload (a link named so, or
// "init vdiskload …"): an ordinary command, not process 1.
if ((argv[0] ?? '').replace(/^.*\//, '') === 'vdiskload') sys.exit(runVdiskload(sys, argv.slice(1)));
if (argv[1] === 'vdiskload' && sys.getpid() !== 1) sys.exit(runVdiskload(sys, argv.slice(2)));
// Network images' reconnect daemon, started by the init under "@vdboot-nbd" (the "@" spares
// it from systemd's final kill): it outlives switch_root and re-makes lost NBD connections.
if (argv[0] === RECONNECT_ARGV0 && sys.getpid() !== 1) sys.exit(runNbdReconnect(sys, argv.slice(1)));
// vdboot mounts over /proc, /dev and /run, switches roots and powers off: only ever as
// process 1 (of the initramfs, or of the shutdown hand-off), never by accident on a
// running system.
if (sys.getpid() !== 1) {
  sys.printErr('vdboot: this program is the init of an initramfs and runs only as process 1; it did nothing.');
  sys.exit(2);
}
// The same binary is /run/initramfs/shutdown at power-off (systemd's initrd interface).
if (/(^|\/)shutdown$/.test(argv[0] ?? '')) runShutdown(sys, argv.slice(1));
else runInit(sys, argv.slice(1));
