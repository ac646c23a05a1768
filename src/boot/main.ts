/** The init bundle's entry on QuickJS: the native `sys` module, then vdboot's PID 1. */
import * as native from 'sys';
import { quickjsSys } from '../sys/quickjs.ts';
import { runInit } from './init.ts';
import { runShutdown } from './shutdown.ts';

const sys = quickjsSys(native);
const argv = sys.argv();
// The same binary is /run/initramfs/shutdown at power-off (systemd's initrd interface).
if (/(^|\/)shutdown$/.test(argv[0] ?? '')) runShutdown(sys, argv.slice(1));
else runInit(sys, argv.slice(1));
