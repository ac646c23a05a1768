/**
 * The boot timings under rd.vdboot.debug: the production bundle on QuickJS against the
 * fake kernel, whose syscalls cost simulated time (finit_module, mount) and whose USB disk
 * appears a set time after its driver loaded. The summary line must list the steps, put
 * the module and device-wait time where it was spent, and add up.
 */
import { existsSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { BootTimings } from '../../src/boot/timings.ts';
import { runBundleInQuickJS } from './sim-harness.ts';
import { buildGptDisk, ROOT_UUID, simMachine, type BuiltDisk } from './sim-machine.ts';

let disk: BuiltDisk;

beforeAll(() => {
  if (!existsSync('build/init.js')) throw new Error('build/init.js is missing: run "npm run build" first');
  disk = buildGptDisk();
});

/** "label 12 (child 3, …)" → the ms of each top-level step, and the "= SUM of TOTAL ms" tail. */
function parseSummary(line: string) {
  const m = /timings: script started at [\d.]+ s; (.*) = (\d+) of (\d+) ms(?:; (.*))?$/.exec(line);
  if (!m) throw new Error(`no timing summary in: ${line}`);
  const top = new Map<string, number>();
  let depth = 0;
  for (const token of m[1]!.split(/(\(|\)|, )/)) {
    if (token === '(') depth++;
    else if (token === ')') depth--;
    else if (token === ', ' || token === '') continue;
    else {
      const t = /^\s*(\S+) (\d+)\s*$/.exec(token);
      if (t && depth === 0) top.set(t[1]!, Number(t[2]));
    }
  }
  const counters = new Map<string, { count: number; ms: number }>();
  for (const c of (m[4] ?? '').split(', ').filter(Boolean)) {
    const k = /^(\S+) (\d+) in (\d+) ms$/.exec(c);
    if (k) counters.set(k[1]!, { count: Number(k[2]), ms: Number(k[3]) });
  }
  return { top, sum: Number(m[2]), total: Number(m[3]), counters, inner: m[1]! };
}

describe('boot timings (rd.vdboot.debug)', () => {
  it('a plain root: the summary lists each step, puts module and device time where it went, and adds up', async () => {
    const r = await runBundleInQuickJS(
      simMachine(`root=UUID=${ROOT_UUID} rd.vdboot.debug`, disk, { usb: true, syscallMs: { finitModule: 7, mount: 40 } }),
    );
    const text = r.kernel.consoleText;
    expect(r.end?.reason, text).toBe('exec');
    const line = text.split('\n').find((l) => l.includes('timings: '));
    expect(line, text).toBeDefined();
    const s = parseSummary(line!);
    for (const step of ['early-mounts', 'cmdline', 'manifest', 'coldplug', 'root-device', 'root-mount', 'choose-init', 'kexec-check', 'shutdown-handoff', 'switch-prep']) {
      expect(s.top.has(step), `${step} in ${line}`).toBe(true);
    }
    // The steps do not overlap: their sum is at most the whole, and here (nothing else
    // costs simulated time) all of it, give or take rounding.
    expect(s.sum).toBeLessThanOrEqual(s.total + s.top.size);
    expect(s.sum).toBeGreaterThanOrEqual(s.total - s.top.size);
    // Every finit_module costs 7 ms: the modules the init loaded itself.
    const loads = r.kernel.events.moduleLoads.length;
    expect(loads).toBeGreaterThan(3);
    expect(s.counters.get('modules')?.count).toBe(loads);
    expect(s.counters.get('modules')?.ms).toBe(7 * loads);
    // The USB disk appears 1.5 s after usb_storage loads: the wait for the root is there.
    expect(s.top.get('root-device')!).toBeGreaterThanOrEqual(1500);
    expect(s.counters.get('uevent-waits')!.ms).toBeGreaterThanOrEqual(1400);
    // The root mount costs 40 ms plus ext4 and its dependencies (7 ms each).
    expect(s.top.get('root-mount')!).toBeGreaterThanOrEqual(40);
    expect(s.inner).toMatch(/root-mount \d+ \(mount 40\)/);
    expect(s.total).toBeLessThan(5000);
  });

  it('without rd.vdboot.debug there is no summary line', async () => {
    const r = await runBundleInQuickJS(simMachine('root=/dev/vda2', disk));
    expect(r.end?.reason).toBe('exec');
    expect(r.kernel.consoleText).not.toContain('timings: ');
  });
});

describe('the root filesystem loads with the storage drivers, before the root device appears', () => {
  const order = (r: Awaited<ReturnType<typeof runBundleInQuickJS>>) => r.kernel.events.modules;

  it('rootfstype= names it: ext4 and its dependencies load before the USB disk\'s driver', async () => {
    const r = await runBundleInQuickJS(simMachine(`root=UUID=${ROOT_UUID} rootfstype=ext4`, disk, { usb: true }));
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    const mods = order(r);
    expect(mods.indexOf('ext4'), mods.join(',')).toBeGreaterThanOrEqual(0);
    expect(mods.indexOf('jbd2')).toBeLessThan(mods.indexOf('ext4'));
    expect(mods.indexOf('ext4')).toBeLessThan(mods.indexOf('usb_storage'));
    expect(new Set(mods).size).toBe(mods.length);
    expect(r.kernel.consoleText).toMatch(/modules for the devices present and the root's filesystem \(ext4\)/);
  });

  it('the manifest\'s type known at build time does the same; without either, ext4 loads once the disk is there', async () => {
    const withHint = simMachine(`root=UUID=${ROOT_UUID}`, disk, { usb: true });
    const manifestPath = 'etc/vdboot/manifest.json';
    const m = JSON.parse(withHint.initramfs[manifestPath] as string);
    m.build.rootFsType = 'ext4';
    withHint.initramfs[manifestPath] = JSON.stringify(m);
    const hinted = order(await runBundleInQuickJS(withHint));
    expect(hinted.indexOf('ext4'), hinted.join(',')).toBeLessThan(hinted.indexOf('usb_storage'));
    const plain = order(await runBundleInQuickJS(simMachine(`root=UUID=${ROOT_UUID}`, disk, { usb: true })));
    expect(plain.indexOf('ext4'), plain.join(',')).toBeGreaterThan(plain.indexOf('usb_storage'));
  });
});

describe('BootTimings', () => {
  it('nested steps are listed inside their parent and counted once; a throwing step is timed too', () => {
    let now = 0;
    const t = new BootTimings(() => now);
    t.time('a', () => { now += 5; });
    t.time('b', () => {
      now += 1;
      t.time('c', () => { now += 10; });
      expect(() => t.time('d', () => { now += 2; throw new Error('x'); })).toThrow('x');
    });
    now += 3;
    t.count('modules', 2, 8);
    t.count('modules', 1, 4);
    expect(t.summary()).toBe('a 5, b 13 (c 10, d 2) = 18 of 21 ms; modules 3 in 12 ms');
  });
});
