/**
 * The command line of a tmpfs root: vdboot's root=tmpfs:HOST:PATH, dracut's
 * root=tmpfs:HOST with rd.tmpfs.imgfile=PATH, rd.tmpfs.size in the forms tmpfs takes.
 */
import { describe, expect, it } from 'vitest';
import { planBoot, PlanError } from '../../src/boot/plan.ts';
import { parseTmpfsSize } from '../../src/boot/tmpfs-root.ts';

const GiB = 1024 ** 3;

describe('root=tmpfs: on the command line', () => {
  it('root=tmpfs:HOST:PATH with rd.tmpfs.size', () => {
    const p = planBoot('root=tmpfs:LABEL=USB:/images/root.tar.zst rd.tmpfs.size=2G');
    expect(p.root).toEqual({ kind: 'tmpfs', host: { by: 'label', value: 'USB' }, path: '/images/root.tar.zst', size: '2G' });
    expect(p.warnings).toEqual([]);
  });

  it('dracut form: root=tmpfs:HOST rd.tmpfs.imgfile=PATH', () => {
    const p = planBoot('root=tmpfs:UUID=1234-ABCD rd.tmpfs.imgfile=/live/root.tar.gz');
    expect(p.root).toMatchObject({ kind: 'tmpfs', host: { by: 'uuid' }, path: '/live/root.tar.gz' });
    expect(p.warnings).toEqual([]);
  });

  it('a quoted path with spaces and backslashes', () => {
    const p = planBoot('"root=tmpfs:LABEL=My Stick:/Live Images\\root.tar"');
    expect(p.root).toMatchObject({ kind: 'tmpfs', host: { by: 'label', value: 'My Stick' }, path: '/Live Images/root.tar' });
  });

  it('images attached for a tmpfs root are read-only unless rd.vdisk.mode says otherwise', () => {
    expect(planBoot('root=tmpfs:LABEL=IN:/r.tar rd.vdisk.attach=LABEL=Win:/a.vhdx').vdisk.mode).toBe('ro');
    expect(planBoot('root=tmpfs:LABEL=IN:/r.tar rd.vdisk.attach=LABEL=Win:/a.vhdx rd.vdisk.mode=snapshot').vdisk.mode).toBe('snapshot');
  });

  it('root=tmpfs:HOST without a path or rd.tmpfs.imgfile is refused with an example', () => {
    expect(() => planBoot('root=tmpfs:LABEL=USB')).toThrow(PlanError);
    expect(() => planBoot('root=tmpfs:LABEL=USB')).toThrow(/must start with \//);
  });
});

describe('rd.tmpfs.size', () => {
  const mem = 8 * GiB;
  it('takes bytes, k/m/g suffixes and a percentage of RAM', () => {
    expect(parseTmpfsSize('512M', mem)).toBe(512 * 1024 * 1024);
    expect(parseTmpfsSize('2g', mem)).toBe(2 * GiB);
    expect(parseTmpfsSize('1.5G', mem)).toBe(1.5 * GiB);
    expect(parseTmpfsSize('75%', mem)).toBe(6 * GiB);
    expect(parseTmpfsSize('2097152', mem)).toBe(2097152);
    expect(parseTmpfsSize('100MiB', mem)).toBe(100 * 1024 * 1024);
  });

  it('refuses what is not a size, naming the value', () => {
    expect(() => parseTmpfsSize('lots', mem)).toThrow(/rd.tmpfs.size=lots is not a size/);
    expect(() => parseTmpfsSize('10k', mem)).toThrow(/at least 1 MiB/);
  });

  it('refuses a tmpfs bigger than 90% of RAM, which would let an archive exhaust memory', () => {
    expect(parseTmpfsSize('90%', mem)).toBe(Math.ceil((mem * 0.9) / 4096) * 4096);
    expect(() => parseTmpfsSize('200%', mem)).toThrow(/rd\.tmpfs\.size=200% is .* more than .*\(90% of the .* RAM\)/);
    expect(() => parseTmpfsSize('64G', mem)).toThrow(/more than .* a tmpfs root may take here/);
  });
});
