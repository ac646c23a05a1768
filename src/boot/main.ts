/** The init bundle's entry on QuickJS: the native `sys` module, then vdboot's PID 1. */
import * as native from 'sys';
import { quickjsSys } from '../sys/quickjs.ts';
import { runInit } from './init.ts';

const sys = quickjsSys(native);
runInit(sys, sys.argv().slice(1));
