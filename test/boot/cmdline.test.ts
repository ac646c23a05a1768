import { describe, expect, it } from 'vitest';
import { Cmdline, splitCmdline } from '../../src/boot/cmdline.ts';
import { planBoot, PlanError } from '../../src/boot/plan.ts';

describe('kernel command line grammar', () => {
  it('splits on spaces and keeps bare flags apart from key=value', () => {
    const p = splitCmdline('BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet  console=ttyS0,115200n8\n');
    expect(p.params).toEqual([
      { key: 'BOOT_IMAGE', value: '/vmlinuz' },
      { key: 'root', value: '/dev/vda1' },
      { key: 'ro', value: undefined },
      { key: 'quiet', value: undefined },
      { key: 'console', value: 'ttyS0,115200n8' },
    ]);
    expect(p.initArgs).toEqual([]);
  });

  it('drops the quotes around a value with spaces, as the kernel does', () => {
    const p = splitCmdline('root="vdisk:LABEL=My Disk:/VMs/My VM.vhdx" rw');
    expect(p.params[0]).toEqual({ key: 'root', value: 'vdisk:LABEL=My Disk:/VMs/My VM.vhdx' });
    expect(p.params[1]).toEqual({ key: 'rw', value: undefined });
  });

  it('drops the quotes around a whole quoted parameter', () => {
    const p = splitCmdline('"root=LABEL=a b" x="y"');
    expect(p.params).toEqual([{ key: 'root', value: 'LABEL=a b' }, { key: 'x', value: 'y' }]);
  });

  it('gives everything after -- to the init, quotes removed', () => {
    const p = splitCmdline('root=/dev/sda -- single "a b" --verbose');
    expect(p.params.map((x) => x.key)).toEqual(['root']);
    expect(p.initArgs).toEqual(['single', 'a b', '--verbose']);
  });

  it('keeps non-ASCII text intact', () => {
    const p = splitCmdline('root="vdisk:LABEL=Données:/Users/Jörg/VMs/My Linux.vhdx"');
    expect(p.params[0]!.value).toBe('vdisk:LABEL=Données:/Users/Jörg/VMs/My Linux.vhdx');
  });

  it('last value wins for single keys; all values for repeated keys', () => {
    const c = new Cmdline('root=/dev/a root=/dev/b rd.vdisk.attach=X:/a rd.vdisk.attach=Y:/b');
    expect(c.get('root')).toBe('/dev/b');
    expect(c.all('rd.vdisk.attach')).toEqual(['X:/a', 'Y:/b']);
    expect(c.get('missing')).toBeUndefined();
  });
});

describe('boot plan', () => {
  it('plans a plain root with every device-spec form', () => {
    expect(planBoot('root=/dev/vda2').root).toEqual({ kind: 'block', device: { by: 'path', value: '/dev/vda2' } });
    expect(planBoot('root=UUID=0a1b-2c3d').root).toEqual({ kind: 'block', device: { by: 'uuid', value: '0a1b-2c3d' } });
    expect(planBoot('root=LABEL="my root"').root).toEqual({ kind: 'block', device: { by: 'label', value: 'my root' } });
    expect(planBoot('root=PARTUUID=abc-01').root).toEqual({ kind: 'block', device: { by: 'partuuid', value: 'abc-01' } });
    expect(planBoot('root=PARTLABEL=linux').root).toEqual({ kind: 'block', device: { by: 'partlabel', value: 'linux' } });
    expect(planBoot('root=/dev/disk/by-label/my\\x20root').root).toEqual({ kind: 'block', device: { by: 'label', value: 'my root' } });
  });

  it('is read-only by default and the last of ro/rw wins', () => {
    expect(planBoot('root=/dev/vda').readOnly).toBe(true);
    expect(planBoot('root=/dev/vda rw').readOnly).toBe(false);
    expect(planBoot('root=/dev/vda rw ro').readOnly).toBe(true);
  });

  it('reads init=, its arguments, rootfstype, rootflags, waits and debugging keys', () => {
    const p = planBoot('root=/dev/vda init=/bin/custom rootfstype=ext4 rootflags=noatime,data=ordered rootwait rootdelay=2 rd.timeout=5 rd.break=pre-mount rd.shell=0 quiet rd.vdboot.debug -- a "b c"', ['single']);
    expect(p.init).toBe('/bin/custom');
    expect(p.initArgs).toEqual(['single', 'a', 'b c']);
    expect(p.rootFsType).toBe('ext4');
    expect(p.rootFlags).toBe('noatime,data=ordered');
    expect([p.rootWait, p.rootDelaySec, p.timeoutSec]).toEqual([true, 2, 5]);
    expect(p.breakAt).toEqual(['pre-mount']);
    expect([p.shell, p.quiet, p.debug]).toEqual([false, true, true]);
    expect(p.warnings).toEqual([]);
  });

  it('does not repeat kernel-passed init arguments that also follow --', () => {
    expect(planBoot('root=/dev/vda -- single', ['single']).initArgs).toEqual(['single']);
  });

  it('warns about unknown vdboot keys and malformed values, naming them', () => {
    const p = planBoot('root=/dev/vda rd.vdboot.frobnicate=1 rd.timeout=soon rd.break=later rd.md.uuid=x rd.luks.uuid=x');
    expect(p.timeoutSec).toBe(30);
    expect(p.warnings.join('\n')).toMatch(/rd\.vdboot\.frobnicate=1/);
    expect(p.warnings.join('\n')).toMatch(/rd\.timeout=soon/);
    expect(p.warnings.join('\n')).toMatch(/rd\.break=later/);
    expect(p.warnings.join('\n')).toMatch(/rd\.md\.uuid .*does not implement/);
    expect(p.warnings.join('\n')).toMatch(/rd\.luks\.uuid=x is not a LUKS UUID/);
  });

  it('parses vdisk and tmpfs roots with and without a host', () => {
    expect(planBoot('root="vdisk:LABEL=Windows:/Users/Jörg/VMs/My Linux.vhdx"').root).toEqual({
      kind: 'vdisk', host: { by: 'label', value: 'Windows' }, path: '/Users/Jörg/VMs/My Linux.vhdx',
    });
    expect(planBoot('root=vdisk:/VMs/a.vhdx').root).toEqual({ kind: 'vdisk', path: '/VMs/a.vhdx' });
    expect(planBoot('root=vdisk:/dev/sda1:/VMs/a.vdi').root).toEqual({ kind: 'vdisk', host: { by: 'path', value: '/dev/sda1' }, path: '/VMs/a.vdi' });
    expect(planBoot('root=tmpfs:UUID=1234-ABCD:/root.tar.zst').root).toEqual({ kind: 'tmpfs', host: { by: 'uuid', value: '1234-ABCD' }, path: '/root.tar.zst' });
  });

  it('refuses a missing or unintelligible root with a message that shows the fix', () => {
    expect(() => planBoot('quiet')).toThrow(PlanError);
    expect(() => planBoot('quiet')).toThrow(/No root= .*root=UUID=/);
    expect(() => planBoot('root=sda1')).toThrow(/root=sda1 is not a device/);
    expect(() => planBoot('root=vdisk:relative.vhd')).toThrow(/must start with \//);
  });
});
