/**
 * The mounts of early boot, as data (the u-root way): executed in order; an entry
 * that already exists (the kernel mounted devtmpfs itself) is fine.
 */
import { isSysError, MS, type Sys } from '../sys/sys.ts';
import { mkdirs } from './fsutil.ts';

export interface MountEntry {
  source: string;
  target: string;
  fstype: string;
  flags: number;
  data: string;
}

export const EARLY_MOUNTS: MountEntry[] = [
  { source: 'proc', target: '/proc', fstype: 'proc', flags: MS.NOSUID | MS.NODEV | MS.NOEXEC, data: '' },
  { source: 'sysfs', target: '/sys', fstype: 'sysfs', flags: MS.NOSUID | MS.NODEV | MS.NOEXEC, data: '' },
  { source: 'devtmpfs', target: '/dev', fstype: 'devtmpfs', flags: MS.NOSUID, data: 'mode=0755' },
  { source: 'devpts', target: '/dev/pts', fstype: 'devpts', flags: MS.NOSUID | MS.NOEXEC, data: 'gid=5,mode=620,ptmxmode=000' },
  { source: 'tmpfs', target: '/run', fstype: 'tmpfs', flags: MS.NOSUID | MS.NODEV, data: 'mode=0755' },
];

/** The API filesystems moved into the new root at switch_root. */
export const MOVED_AT_SWITCH = ['/dev', '/proc', '/sys', '/run'];

export function mountEarly(sys: Sys, entries: MountEntry[] = EARLY_MOUNTS): string[] {
  const problems: string[] = [];
  for (const m of entries) {
    try {
      mkdirs(sys, m.target);
      sys.mount(m.source, m.target, m.fstype, m.flags, m.data);
    } catch (e) {
      // devtmpfs may be mounted by the kernel already (CONFIG_DEVTMPFS_MOUNT): EBUSY is fine.
      if (!isSysError(e, 'EBUSY')) problems.push(`mount ${m.fstype} on ${m.target}: ${(e as Error).message}`);
    }
  }
  return problems;
}

/** mount flags from ro/rw and a rootflags= string: flag words become MS_* bits, the rest stays data. */
export function mountOptions(readOnly: boolean, rootFlags: string): { flags: number; data: string } {
  let flags = readOnly ? MS.RDONLY : 0;
  const data: string[] = [];
  const words: Record<string, [number, boolean]> = {
    ro: [MS.RDONLY, true], rw: [MS.RDONLY, false], nosuid: [MS.NOSUID, true], nodev: [MS.NODEV, true],
    noexec: [MS.NOEXEC, true], noatime: [MS.NOATIME, true], relatime: [MS.RELATIME, true], suid: [MS.NOSUID, false],
    dev: [MS.NODEV, false], exec: [MS.NOEXEC, false], defaults: [0, true],
  };
  for (const w of rootFlags.split(',').filter(Boolean)) {
    const known = words[w];
    if (!known) data.push(w);
    else if (known[1]) flags |= known[0];
    else flags &= ~known[0];
  }
  return { flags, data: data.join(',') };
}
