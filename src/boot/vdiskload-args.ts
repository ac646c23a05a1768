/**
 * vdiskload's command line (pure): attach, detach (-d) or list (-l).
 *
 *   vdiskload [--ro|--snapshot] [--name NAME] [--map auto|direct|loop|nbd] IMAGE|DEF.vdisk.json
 *   vdiskload -d NAME|IMAGE
 *   vdiskload -l [--json]
 */
import type { VdiskMapPath, VdiskMode } from './plan.ts';

export type VdiskloadCommand =
  | { action: 'attach'; image: string; mode: VdiskMode; map: VdiskMapPath; name?: string }
  | { action: 'detach'; target: string }
  | { action: 'list'; json: boolean }
  | { action: 'help' };

export const VDISKLOAD_USAGE = [
  'usage: vdiskload [--ro|--snapshot] [--name NAME] [--map auto|direct|loop|nbd] IMAGE|DEF.vdisk.json',
  '       vdiskload -d NAME|IMAGE      take the image\'s devices down again',
  '       vdiskload -l [--json]        list the images vdboot attached (at boot too)',
  'Attaches a VHD, VHDX, VDI, VMDK, QCOW, QCOW2, raw image or a .vdisk.json definition as',
  '/dev/mapper/NAME (default vdiskN) with /dev/mapper/NAMEpK for its partitions; read-write',
  'unless --ro (read-only) or --snapshot (writes go to RAM and are dropped at detach).',
].join('\n');

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** dm names: what dmsetup accepts and a /dev/mapper file name can hold, and not vdboot's own. */
export function checkName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$/.test(name)) {
    throw new UsageError(`--name ${JSON.stringify(name)}: a name is 1 to 64 letters, digits, "_", ".", "+" or "-", beginning with a letter or digit`);
  }
  if (name === 'control' || name === 'vdhost') throw new UsageError(`--name ${name}: that name is reserved (device-mapper's control node, vdboot's host view); choose another`);
  if (/(-base|-part\d+)$/.test(name)) throw new UsageError(`--name ${name}: a name ending in -base or -partN would be confused with the devices vdiskload makes for an image; choose another`);
}

const MAPS: readonly VdiskMapPath[] = ['auto', 'direct', 'loop', 'nbd'];

export function parseVdiskloadArgs(args: readonly string[]): VdiskloadCommand {
  let mode: VdiskMode | undefined;
  let map: VdiskMapPath = 'auto';
  let name: string | undefined;
  let detach = false;
  let list = false;
  let json = false;
  const rest: string[] = [];
  const setMode = (m: VdiskMode, flag: string): void => {
    if (mode !== undefined && mode !== m) throw new UsageError(`${flag}: only one of --ro and --snapshot`);
    mode = m;
  };
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const value = (flag: string): string => {
      const eq = a.indexOf('=');
      if (eq > 0 && a.startsWith('--')) return a.slice(eq + 1);
      const v = args[++i];
      if (v === undefined) throw new UsageError(`${flag} needs a value`);
      return v;
    };
    const flag = a.startsWith('--') && a.includes('=') ? a.slice(0, a.indexOf('=')) : a;
    switch (flag) {
      case '-h': case '--help': return { action: 'help' };
      case '-r': case '--ro': case '--read-only': setMode('ro', a); break;
      case '--snapshot': setMode('snapshot', a); break;
      case '--rw': setMode('rw', a); break;
      case '-n': case '--name': name = value(flag); checkName(name); break;
      case '--map': {
        const m = value(flag);
        if (!MAPS.includes(m as VdiskMapPath)) throw new UsageError(`--map ${m}: choose auto, direct, loop or nbd`);
        map = m as VdiskMapPath;
        break;
      }
      case '-d': case '--detach': detach = true; break;
      case '-l': case '--list': list = true; break;
      case '--json': json = true; break;
      case '--': rest.push(...args.slice(i + 1)); i = args.length; break;
      default:
        if (a.startsWith('-') && a !== '-') throw new UsageError(`unknown option ${a}`);
        rest.push(a);
    }
  }
  if (list) {
    if (detach || rest.length || mode || name) throw new UsageError('-l takes no image and no other option than --json');
    return { action: 'list', json };
  }
  if (json) throw new UsageError('--json goes with -l');
  if (detach) {
    if (rest.length !== 1 || mode || name || map !== 'auto') throw new UsageError('-d takes one NAME or IMAGE and no other option');
    return { action: 'detach', target: rest[0]! };
  }
  if (rest.length === 0) throw new UsageError('no image given');
  if (rest.length > 1) throw new UsageError(`one image at a time (got ${rest.length}: ${rest.join(' ')})`);
  return { action: 'attach', image: rest[0]!, mode: mode ?? 'rw', map, ...(name ? { name } : {}) };
}
