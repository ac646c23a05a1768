/** rd.vdisk.* and the compatibility syntaxes of DESIGN §2, as the boot plan reads them. */
import { describe, expect, it } from 'vitest';
import { planBoot, PlanError } from '../../src/boot/plan.ts';

describe('rd.vdisk.* options', () => {
  it('defaults: auto root, rw image, auto path, expansion on, nothing attached', () => {
    const p = planBoot('root=vdisk:LABEL=Windows:/VMs/a.vhdx');
    expect(p.vdisk).toEqual({ root: { by: 'auto' }, mode: 'rw', map: 'auto', expand: true, attach: [] });
    expect(p.warnings).toEqual([]);
  });

  it('reads root, mode, map and expand; unknown values warn and keep the default', () => {
    const p = planBoot('root=vdisk:/a.vhd rd.vdisk.root=PARTUUID=0fc63daf-8483-4772-8e79-3d69d8477de4 rd.vdisk.mode=snapshot rd.vdisk.map=direct rd.vdisk.expand=0');
    expect(p.vdisk).toMatchObject({ root: { by: 'spec', spec: { by: 'partuuid', value: '0fc63daf-8483-4772-8e79-3d69d8477de4' } }, mode: 'snapshot', map: 'direct', expand: false });
    const q = planBoot('root=vdisk:/a.vhd rd.vdisk.root=seven rd.vdisk.mode=fast rd.vdisk.map=fuse');
    expect(q.vdisk).toMatchObject({ root: { by: 'auto' }, mode: 'rw', map: 'auto' });
    expect(q.warnings.join('\n')).toMatch(/rd\.vdisk\.root=seven is not a partition number/);
    expect(q.warnings.join('\n')).toMatch(/rd\.vdisk\.mode=fast is not rw, ro or snapshot/);
    expect(q.warnings.join('\n')).toMatch(/rd\.vdisk\.map=fuse is not auto, direct, loop or nbd/);
  });

  it('rd.vdisk.allow-outside=1 lets an image name files outside its folder; absent or 0 it is off; other values warn', () => {
    expect(planBoot('root=vdisk:/a.vhd rd.vdisk.allow-outside=1').vdisk.allowOutside).toBe(true);
    expect(planBoot('root=vdisk:/a.vhd rd.vdisk.allow-outside').vdisk.allowOutside).toBe(true);
    expect(planBoot('root=vdisk:/a.vhd rd.vdisk.allow-outside=0').vdisk.allowOutside).toBeUndefined();
    const p = planBoot('root=vdisk:/a.vhd rd.vdisk.allow-outside=maybe');
    expect(p.vdisk.allowOutside).toBeUndefined();
    expect(p.warnings.join('\n')).toMatch(/rd\.vdisk\.allow-outside=maybe is neither 0 nor 1; files outside the image's folder stay refused/);
  });

  it('rd.vdisk.root by number', () => {
    expect(planBoot('root=vdisk:/a.vhd rd.vdisk.root=3').vdisk.root).toEqual({ by: 'number', number: 3 });
  });

  it('rd.vdisk.mode=ro forces a read-only root mount even with rw, and says so', () => {
    const p = planBoot('root=vdisk:/a.vhd rd.vdisk.mode=ro rw');
    expect(p.readOnly).toBe(true);
    expect(p.warnings.join('\n')).toMatch(/mounted read-only despite rw/);
  });

  it('rd.vdisk.mode=ro with rd.vdisk.attach= is the attached images\' mode: a plain root stays rw, a tmpfs root too', () => {
    for (const cmdline of ['root=UUID=1234 rd.vdisk.attach=LABEL=Win:/a.vhdx rd.vdisk.mode=ro rw', 'root=/dev/sda2 rd.ntfsloop=LABEL=Win:/a.vhdx rd.vdisk.mode=ro rw']) {
      const p = planBoot(cmdline);
      expect(p.vdisk.mode, cmdline).toBe('ro');
      expect(p.readOnly, cmdline).toBe(false);
      expect(p.warnings.join('\n'), cmdline).not.toMatch(/despite rw/);
    }
    const tmpfs = planBoot('root=tmpfs:LABEL=IN:/r.tar rd.vdisk.attach=LABEL=Win:/a.vhdx rd.vdisk.mode=ro rw');
    expect(tmpfs.readOnly).toBe(false);
    // without rw the kernel's default stays: read-only
    expect(planBoot('root=UUID=1234 rd.vdisk.attach=LABEL=Win:/a.vhdx rd.vdisk.mode=ro').readOnly).toBe(true);
  });

  it('rd.vdisk.attach and rd.ntfsloop repeat, in command-line order, with or without a host', () => {
    const p = planBoot('root=UUID=1234 rd.vdisk.attach=/a.vhdx rd.ntfsloop=LABEL=Win:/b.vdi rd.vdisk.attach="LABEL=My Disk:/VMs/c d.vmdk"');
    expect(p.vdisk.attach).toEqual([
      { path: '/a.vhdx', from: 'rd.vdisk.attach=/a.vhdx' },
      { host: { by: 'label', value: 'Win' }, path: '/b.vdi', from: 'rd.ntfsloop=LABEL=Win:/b.vdi' },
      { host: { by: 'label', value: 'My Disk' }, path: '/VMs/c d.vmdk', from: 'rd.vdisk.attach=LABEL=My Disk:/VMs/c d.vmdk' },
    ]);
    expect(p.root).toEqual({ kind: 'block', device: { by: 'uuid', value: '1234' } });
  });

  it('a malformed attach warns and is skipped', () => {
    const p = planBoot('root=/dev/sda1 rd.vdisk.attach=relative.vhd');
    expect(p.vdisk.attach).toEqual([]);
    expect(p.warnings.join('\n')).toMatch(/rd\.vdisk\.attach=relative\.vhd: the path must start with \/.*; that image is not attached/);
  });
});

describe('compatibility syntaxes', () => {
  it('dracut-vdfuseloop: rd.hostdev + rd.vdisk (+ rd.vdloop) boot the image, root= may be absent', () => {
    const p = planBoot('rd.hostdev=LABEL=Windows rd.vdisk=\\VMs\\linux.vdi rd.vdloop=/dev/vdhost/Partition3');
    expect(p.root).toEqual({ kind: 'vdisk', host: { by: 'label', value: 'Windows' }, path: '/VMs/linux.vdi' });
    expect(p.vdisk.root).toEqual({ by: 'number', number: 3 });
    expect(p.vdisk.compat).toBe('rd.hostdev/rd.vdisk');
  });

  it('dracut-vdfuseloop: rd.hostdev without rd.vdisk explains the pair', () => {
    expect(() => planBoot('rd.hostdev=LABEL=Windows root=/dev/sda1')).toThrow(PlanError);
    expect(() => planBoot('rd.hostdev=LABEL=Windows root=/dev/sda1')).toThrow(/go together/);
  });

  it('Wubi: root=HOST loop=PATH makes the loop file the root image', () => {
    const p = planBoot('root=UUID=4DCB098C11377238 loop=/ubuntu/disks/root.disk loopflags=defaults ro');
    expect(p.root).toEqual({ kind: 'vdisk', host: { by: 'uuid', value: '4DCB098C11377238' }, path: '/ubuntu/disks/root.disk' });
    expect(p.vdisk.compat).toBe('loop=');
    expect(p.warnings).toEqual([]);
  });

  it('Wubi: loop= needs a device in root=', () => {
    expect(() => planBoot('loop=/ubuntu/disks/root.disk')).toThrow(/needs root= to name the partition/);
  });
});
