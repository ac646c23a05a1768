import { describe, expect, it } from 'vitest';
import { planBoot } from '../../src/boot/plan.ts';
import { lvOfPath } from '../../src/boot/lvm-activate.ts';
import { dmAliases } from '../../src/boot/devspec.ts';

const U = '5a1c0de1-7b2e-4c3d-9e8f-0123456789ab';

describe('rd.luks.*, rd.lvm.*, resume= on the command line', () => {
  it('defaults: unlock every LUKS volume found, three tries, activate what the root needs', () => {
    const p = planBoot('root=/dev/vg/root');
    expect(p.stack).toEqual({ luks: { enabled: true, uuids: [], names: [], cryptsetupArgs: [], keys: [], tries: 3 }, lvm: { enabled: true, vgs: [], lvs: [] } });
    expect(p.warnings).toEqual([]);
  });

  it('dracut and systemd spellings: rd.luks.uuid (luks- prefix), rd.luks.name, rd.luks.key with and without KEYDEV, rd.luks.options', () => {
    const p = planBoot(`root=/dev/vg/root rd.luks.uuid=luks-${U.toUpperCase()} rd.luks.name=${U}=cryptroot rd.luks.key=/keys/root.key:LABEL=USB rd.luks.key=/etc/k rd.luks.options=discard,tries=5 rd.lvm.vg=vg rd.lvm.lv=vg/root resume=/dev/vg/swap`);
    expect(p.stack.luks).toEqual({
      enabled: true, uuids: [U], names: [{ uuid: U, name: 'cryptroot' }], cryptsetupArgs: ['--allow-discards'], tries: 5,
      keys: [{ path: '/keys/root.key', device: { by: 'label', value: 'USB' } }, { path: '/etc/k' }],
    });
    expect(p.stack.lvm).toEqual({ enabled: true, vgs: ['vg'], lvs: ['vg/root'] });
    expect(p.stack.resume).toEqual({ by: 'path', value: '/dev/vg/swap' });
    expect(p.warnings).toEqual([]);
  });

  it('rd.luks=0 and rd.lvm=0 turn the steps off; they are no longer "dracut options vdboot ignores"', () => {
    const p = planBoot('root=/dev/sda1 rd.luks=0 rd.lvm=0');
    expect(p.stack.luks.enabled).toBe(false);
    expect(p.stack.lvm.enabled).toBe(false);
    expect(p.warnings.join()).not.toMatch(/dracut option/);
  });

  it('malformed values draw a warning naming them, never a failure', () => {
    const p = planBoot('root=/dev/sda1 rd.luks.uuid=nope rd.luks.name=x rd.luks.key=relative rd.luks.options=bogus rd.lvm.lv=novg rd.luks.frobnicate=1 resume=swap');
    expect(p.warnings).toEqual(expect.arrayContaining([
      expect.stringMatching(/rd\.luks\.uuid=nope is not a LUKS UUID/),
      expect.stringMatching(/rd\.luks\.name=x is not UUID=NAME/),
      expect.stringMatching(/rd\.luks\.key=relative: the key file's path must start with \//),
      expect.stringMatching(/option "bogus" is not one vdboot passes to cryptsetup/),
      expect.stringMatching(/rd\.lvm\.lv=novg is not VG\/LV/),
      expect.stringMatching(/unknown option rd\.luks\.frobnicate=1/),
      expect.stringMatching(/resume=swap is not a device spec/),
    ]));
  });

  it('rd.vdisk.root names an LV inside an image by /dev/mapper/VG-LV or /dev/VG/LV', () => {
    expect(planBoot('root=vdisk:/a.vhdx rd.vdisk.root=/dev/mapper/ubuntu--vg-root').vdisk.root).toEqual({ by: 'spec', spec: { by: 'path', value: '/dev/mapper/ubuntu--vg-root' } });
    expect(planBoot('root=vdisk:/a.vhdx rd.vdisk.root=/dev/ubuntu-vg/root').vdisk.root).toEqual({ by: 'spec', spec: { by: 'path', value: '/dev/ubuntu-vg/root' } });
  });

  it('LV paths: /dev/mapper/VG-LV with doubled dashes and /dev/VG/LV both name VG/LV; dm devices get both aliases', () => {
    expect(lvOfPath({ by: 'path', value: '/dev/mapper/ubuntu--vg-root' })).toEqual(['ubuntu-vg/root']);
    expect(lvOfPath({ by: 'path', value: '/dev/mapper/vg-swap--1' })).toEqual(['vg/swap-1']);
    expect(lvOfPath({ by: 'path', value: '/dev/fedora/root' })).toEqual(['fedora/root']);
    expect(lvOfPath({ by: 'path', value: '/dev/sda2' })).toEqual([]);
    expect(lvOfPath({ by: 'path', value: '/dev/disk/by-uuid' })).toEqual([]);
    expect(dmAliases('ubuntu--vg-swap_1', 'LVM-abc')).toEqual(['/dev/mapper/ubuntu--vg-swap_1', '/dev/ubuntu-vg/swap_1']);
    expect(dmAliases(`luks-${U}`, `CRYPT-LUKS2-x-luks-${U}`)).toEqual([`/dev/mapper/luks-${U}`]);
  });

  it('resume= for an image root is kept for a read-write boot (the record decides at boot) and refused for snapshot and ro, with the reason', () => {
    expect(planBoot('root=vdisk:LABEL=W:/a.vhdx rw resume=/dev/vg/swap').stack.resume).toEqual({ by: 'path', value: '/dev/vg/swap' });
    for (const mode of ['snapshot', 'ro']) {
      const p = planBoot(`root=vdisk:LABEL=W:/a.vhdx rd.vdisk.mode=${mode} resume=/dev/vg/swap`);
      expect(p.stack.resume).toBeUndefined();
      expect(p.warnings.join()).toMatch(new RegExp(`resume=/dev/vg/swap is ignored: rd\\.vdisk\\.mode=${mode} .*resuming inside an image needs rd\\.vdisk\\.mode=rw`));
    }
    // a network image is a snapshot by default
    expect(planBoot('root=vdisk:nbd://10.0.2.100/a.vhdx ip=dhcp resume=UUID=0b9c1c4e-3c5e-4b8f-9e2a-6a1d2f3e4b5c').stack.resume).toBeUndefined();
    expect(planBoot('root=/dev/vg/root resume=/dev/vg/swap').stack.resume).toEqual({ by: 'path', value: '/dev/vg/swap' });
  });
});
