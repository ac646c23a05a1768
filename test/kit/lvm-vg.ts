/**
 * A VG over several PV images, made by lvm2's own tools without device-mapper
 * (test/kit/lvm.ts), with linear or striped LVs whose content is written where `lvs`
 * says each stripe lies: chunk k of the LV (stripe_size bytes) goes to stripe k mod n, row
 * k div n, of that stripe's PE range — the layout dm-striped reads.
 */
import fs from 'node:fs';
import path from 'node:path';
import { LvmLab } from './lvm.ts';

export interface VgLv {
  name: string;
  sizeMiB: number;
  /** number of stripes (lvcreate -i); default linear */
  stripes?: number;
  /** stripe size in KiB (lvcreate -I); default 64 */
  stripeKiB?: number;
  /** a file (a filesystem made beforehand) written into the LV */
  image?: string;
}

export interface VgLayout {
  vg: string;
  /** the PV image files, in the order asked */
  pvs: string[];
  lvs: Record<string, { uuid: string; stripes: number }>;
}

/** PV images `pvs` (name → MiB) in `dir`, one VG `vg` over all of them, and `lvs`. */
export function makeLvmVg(dir: string, vg: string, pvs: { name: string; sizeMiB: number }[], lvs: VgLv[]): VgLayout {
  const lab = new LvmLab(path.join(dir, `lvm-lab-${vg}`));
  try {
    const files = pvs.map((p) => path.join(dir, p.name));
    const devs = pvs.map((p, i) => lab.attach(files[i]!, p.sizeMiB));
    lab.lvm('pvcreate', '-q', ...devs);
    lab.lvm('vgcreate', '-q', '-s', '1m', vg, ...devs);
    for (const lv of lvs) {
      const striped = (lv.stripes ?? 1) > 1 ? ['-i', String(lv.stripes), '-I', `${lv.stripeKiB ?? 64}k`] : [];
      lab.lvm('lvcreate', '-q', '-an', '-Zn', '-n', lv.name, '-L', `${lv.sizeMiB}m`, ...striped, vg);
    }
    const peStart = new Map(lab.report('pvs', 'pv_name,pe_start').map((r) => [r.pv_name!, Number(r.pe_start) * 512]));
    const fileOf = new Map(devs.map((d, i) => [d, files[i]!]));
    const rows = lab.report('lvs', 'lv_name,lv_uuid,seg_pe_ranges,stripes,stripe_size,vg_extent_size,seg_start_pe', '--segments');
    const out: VgLayout = { vg, pvs: files, lvs: {} };
    const writes: { file: string; offset: number; bytes: Buffer }[] = [];
    for (const lv of lvs) {
      const segs = rows.filter((r) => r.lv_name === lv.name);
      if (segs.length !== 1) throw new Error(`LV ${lv.name} has ${segs.length} segments; the kit writes one-segment LVs only`);
      const seg = segs[0]!;
      const extent = Number(seg.vg_extent_size) * 512;
      const stripes = seg.seg_pe_ranges!.split(' ').map((r) => {
        const m = /^(.+):(\d+)-(\d+)$/.exec(r)!;
        return { file: fileOf.get(m[1]!)!, offset: peStart.get(m[1]!)! + Number(m[2]) * extent };
      });
      out.lvs[lv.name] = { uuid: seg.lv_uuid!, stripes: stripes.length };
      if (!lv.image) continue;
      const bytes = fs.readFileSync(lv.image);
      if (bytes.length > lv.sizeMiB * 1024 * 1024) throw new Error(`${lv.image} is larger than LV ${lv.name}`);
      const chunk = stripes.length > 1 ? Number(seg.stripe_size) * 512 : bytes.length;
      for (let k = 0; k * chunk < bytes.length; k++) {
        const s = stripes[k % stripes.length]!;
        writes.push({ file: s.file, offset: s.offset + Math.floor(k / stripes.length) * chunk, bytes: bytes.subarray(k * chunk, (k + 1) * chunk) });
      }
    }
    lab.close();
    for (const w of writes) {
      const fd = fs.openSync(w.file, 'r+');
      try {
        fs.writeSync(fd, w.bytes, 0, w.bytes.length, w.offset);
      } finally {
        fs.closeSync(fd);
      }
    }
    return out;
  } finally {
    lab.close();
  }
}
