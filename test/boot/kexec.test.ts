/**
 * The kexec step's pure parts: rd.vdboot.kexec in the plan, the decision (which kernel,
 * and why, or why not), the command line for the new kernel, kexec_file_load's errors.
 */
import { describe, expect, it } from 'vitest';
import { decideKexec, explainKexecError, kexecCmdline, type RootKernel } from '../../src/boot/kexec.ts';
import { planBoot, type KexecSetting } from '../../src/boot/plan.ts';
import { SysError } from '../../src/sys/sys.ts';

const RUNNING = '6.1.0-57-amd64';
const NEW = '6.12.118+deb12-amd64';
const k = (release: string, hasModules = true): RootKernel => ({ release, path: `/boot/vmlinuz-${release}`, hasModules });
const auto: KexecSetting = { mode: 'auto', done: false };

describe('rd.vdboot.kexec in the plan', () => {
  it('auto by default, 0, 1, a release, the marker', () => {
    expect(planBoot('root=/dev/vda1').kexec).toEqual({ mode: 'auto', done: false });
    expect(planBoot('root=/dev/vda1 rd.vdboot.kexec=auto').kexec).toEqual({ mode: 'auto', done: false });
    expect(planBoot('root=/dev/vda1 rd.vdboot.kexec=0').kexec).toEqual({ mode: 'off', done: false });
    expect(planBoot('root=/dev/vda1 rd.vdboot.kexec=1').kexec).toEqual({ mode: 'on', done: false });
    expect(planBoot(`root=/dev/vda1 rd.vdboot.kexec=${NEW}`).kexec).toEqual({ mode: 'version', version: NEW, done: false });
    expect(planBoot('root=/dev/vda1 rd.vdboot.kexeced=1').kexec).toEqual({ mode: 'auto', done: true });
  });

  it('a value it does not know draws a warning and means auto; neither key is "unknown"', () => {
    const p = planBoot('root=/dev/vda1 rd.vdboot.kexec=sometimes rd.vdboot.kexeced=1');
    expect(p.kexec).toEqual({ mode: 'auto', done: true });
    expect(p.warnings).toEqual([expect.stringMatching(/rd\.vdboot\.kexec=sometimes is not auto, 0, 1 or a kernel release/)]);
  });
});

describe('the kexec decision', () => {
  it('a newer kernel in /boot: jump to the newest one that has modules', () => {
    const d = decideKexec(auto, RUNNING, [k('6.1.0-9-amd64'), k(NEW), k('6.13.0-1-amd64', false)], true);
    expect(d).toMatchObject({ jump: true, kernel: { release: NEW }, reason: expect.stringContaining('newer than the running 6.1.0-57-amd64') });
  });

  it('numbers compare as numbers: 6.1.0-57 is newer than 6.1.0-9, so no jump', () => {
    expect(decideKexec(auto, RUNNING, [k('6.1.0-9-amd64')], true)).toMatchObject({ jump: false });
  });

  it('the running kernel\'s modules missing from the root: jump even to an older kernel', () => {
    const d = decideKexec(auto, NEW, [k(RUNNING)], false);
    expect(d).toMatchObject({ jump: true, kernel: { release: RUNNING }, reason: `the root has no modules for the running ${NEW}` });
  });

  it('the same kernel as the running one with its modules: stay, silently', () => {
    expect(decideKexec(auto, RUNNING, [k(RUNNING)], true)).toEqual({ jump: false, reason: `the root's newest kernel ${RUNNING} is the running one` });
  });

  it('rd.vdboot.kexec=0: stay, and say what is missing', () => {
    const d = decideKexec({ mode: 'off', done: false }, RUNNING, [k(NEW)], false);
    expect(d.jump).toBe(false);
    expect(d).toMatchObject({ reason: 'rd.vdboot.kexec=0', warning: expect.stringMatching(new RegExp(`^the root has no modules for the running kernel ${RUNNING} \\(no /lib/modules/${RUNNING}\\).*the root's kernels: 6\\.12\\.118\\+deb12-amd64; drop rd\\.vdboot\\.kexec=0`)) });
  });

  it('rd.vdboot.kexec=VERSION: that kernel, even when older; a missing one is named with the ones there are', () => {
    expect(decideKexec({ mode: 'version', version: '6.1.0-9-amd64', done: false }, RUNNING, [k('6.1.0-9-amd64'), k(NEW)], true)).toMatchObject({ jump: true, kernel: { release: '6.1.0-9-amd64' } });
    const d = decideKexec({ mode: 'version', version: '6.5.0-1-amd64', done: false }, RUNNING, [k(NEW)], false);
    expect(d).toMatchObject({ jump: false, reason: 'rd.vdboot.kexec=6.5.0-1-amd64: the root has no /boot/vmlinuz-6.5.0-1-amd64', warning: expect.stringContaining(`the root's kernels: ${NEW}`) });
    expect(decideKexec({ mode: 'version', version: NEW, done: false }, RUNNING, [k(NEW, false)], true)).toMatchObject({ jump: false, reason: expect.stringContaining(`no /lib/modules/${NEW}`) });
  });

  it('rd.vdboot.kexec=1: the newest kernel even when the running one would do', () => {
    expect(decideKexec({ mode: 'on', done: false }, NEW, [k(RUNNING)], true)).toMatchObject({ jump: true, kernel: { release: RUNNING } });
  });

  it('the marker of a jump already made: never a second one, whatever else holds', () => {
    for (const mode of ['auto', 'on'] as const) {
      const d = decideKexec({ mode, done: true }, RUNNING, [k(NEW)], false);
      expect(d).toMatchObject({ jump: false, reason: expect.stringContaining('rd.vdboot.kexeced=1'), warning: expect.stringContaining(`no modules for the running kernel ${RUNNING}`) });
    }
  });

  it('no kernel in /boot: stay without a word (a root without kernels is no mistake); kernels without modules: say so', () => {
    expect(decideKexec(auto, RUNNING, [], true)).toEqual({ jump: false, reason: 'the root has no kernel in /boot (vmlinuz-RELEASE)' });
    expect(decideKexec(auto, RUNNING, [], false)).toEqual({ jump: false, reason: 'the root has no kernel in /boot (vmlinuz-RELEASE)' });
    expect(decideKexec(auto, RUNNING, [k(NEW, false)], false)).toMatchObject({ jump: false, warning: expect.stringContaining(`install the modules of one of them (${NEW} (no modules))`) });
  });
});

describe('the new kernel\'s command line and kexec_file_load\'s errors', () => {
  it('this command line plus the marker, once', () => {
    expect(kexecCmdline('console=ttyS0 root=LABEL=x rd.vdboot.kexec=1\n')).toBe('console=ttyS0 root=LABEL=x rd.vdboot.kexec=1 rd.vdboot.kexeced=1');
    expect(kexecCmdline('root=LABEL=x rd.vdboot.kexeced=1')).toBe('root=LABEL=x rd.vdboot.kexeced=1');
  });

  it('the marker goes before a lone --, whose words belong to the init; a quoted -- is no separator', () => {
    expect(kexecCmdline('root=/dev/vda1 init=/bin/x -- single "two words"')).toBe('root=/dev/vda1 init=/bin/x rd.vdboot.kexeced=1 -- single "two words"');
    expect(kexecCmdline('root=/dev/vda1 --')).toBe('root=/dev/vda1 rd.vdboot.kexeced=1 --');
    expect(kexecCmdline('"root=LABEL=a -- b" quiet')).toBe('"root=LABEL=a -- b" quiet rd.vdboot.kexeced=1');
    expect(kexecCmdline('root=/dev/vda1 -- rd.vdboot.kexeced=1')).toBe('root=/dev/vda1 rd.vdboot.kexeced=1 -- rd.vdboot.kexeced=1');
    expect(kexecCmdline('root=/dev/vda1 --verbose')).toBe('root=/dev/vda1 --verbose rd.vdboot.kexeced=1');
  });

  it('EPERM, EKEYREJECTED, ENOEXEC, ENOSYS are explained for the console', () => {
    expect(explainKexecError(new SysError('EPERM', 1, 'kexec_file_load fd 5'))).toMatch(/Secure Boot lockdown/);
    expect(explainKexecError(new SysError('EKEYREJECTED', 129, 'kexec_file_load fd 5'))).toMatch(/signature was rejected/);
    expect(explainKexecError(new SysError('ENOEXEC', 8, 'kexec_file_load fd 5'))).toMatch(/damaged/);
    expect(explainKexecError(new SysError('ENOSYS', 38, 'kexec_file_load fd 5'))).toMatch(/CONFIG_KEXEC_FILE/);
  });
});
