/** ntfs-3g's own tools as the oracle for vdboot's NTFS reader. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import type { HostFile, HostFs } from '../../src/formats/host-volume.ts';
import { hostFileReader } from '../../src/formats/host-volume.ts';
import { run } from './helpers.ts';

export function mkntfs(img: string, sizeMiB: number, clusterSize: number, label = 'Windows', sectorSize = 512): void {
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, sizeMiB * 1024 * 1024); // sparse: only what mkntfs writes takes disk space
  run('mkntfs', ['-F', '-f', '-q', '-s', String(sectorSize), '-c', String(clusterSize), '-L', label, img]);
}

/** Copies host files into the volume's root with ntfscp (no mount needed). */
export function ntfscp(img: string, files: Record<string, Buffer>, dir: string): void {
  for (const [name, data] of Object.entries(files)) {
    const src = path.join(dir, 'src.bin');
    fs.writeFileSync(src, data);
    run('ntfscp', ['-q', '-f', img, src, name]);
  }
}

export function ntfscat(img: string, p: string): Buffer {
  return run('ntfscat', [img, p]);
}

/** ntfscluster's runs of the unnamed $DATA (all its parts, in VCN order): lcn -1 for a hole. */
export function ntfsclusterRuns(img: string, p: string): { vcn: number; lcn: number; length: number }[] {
  const out = run('ntfscluster', ['-F', p, img]).toString();
  const runs: { vcn: number; lcn: number; length: number }[] = [];
  let inData = false;
  for (const line of out.split('\n')) {
    const head = line.match(/^\s+0x([0-9a-f]+) - /);
    if (head) { inData = head[1] === '80'; continue; }
    const m = line.match(/^\s+(\d+)\s+(-?\d+)\s+(\d+)\s*$/);
    // an extension record's part starts with the VCNs it does not map (LCN -2: not mapped here)
    if (inData && m && +m[2]! >= -1) runs.push({ vcn: +m[1]!, lcn: +m[2]!, length: +m[3]! });
  }
  return runs.sort((a, b) => a.vcn - b.vcn);
}

/** ntfsinfo's facts about a file's unnamed $DATA and its attribute layout. */
export function ntfsinfoFile(img: string, p: string): { initializedSize: number; dataSize: number; dataParts: number; hasAttributeList: boolean } {
  const out = run('ntfsinfo', ['-F', p, img]).toString();
  const data = out.slice(out.indexOf('$DATA (0x80)'));
  return {
    initializedSize: +(data.match(/Initialized size:\s+(\d+)/)?.[1] ?? NaN),
    dataSize: +(data.match(/Data size:\s+(\d+)/)?.[1] ?? NaN),
    dataParts: (out.match(/Dumping attribute \$DATA \(0x80\)/g) ?? []).length,
    hasAttributeList: out.includes('$ATTRIBUTE_LIST (0x20)'),
  };
}

/** Names in a directory as ntfsls lists them (Win32/POSIX names; DOS duplicates left out). */
export function ntfsls(img: string, dir: string): string[] {
  return run('ntfsls', ['-a', '-s', '-p', dir, img]).toString().split('\n').filter((n) => n !== '' && n !== '.' && n !== '..');
}

/**
 * The file read through vdboot's extents equals ntfscat's output byte for byte, and
 * every cluster of it sits where ntfscluster says.
 */
export function expectSameAsNtfs3g(img: string, fsys: HostFs, file: HostFile, clusterSize: number): void {
  const want = ntfscat(img, file.path);
  expect(file.size).toBe(want.length);
  const got = hostFileReader(fsys, file).read(0, file.size);
  expect(Buffer.from(got).equals(want)).toBe(true);
  if (file.resident) return;
  const runs = ntfsclusterRuns(img, file.path);
  const clusters = Math.ceil(file.size / clusterSize);
  const oracle = new Float64Array(clusters).fill(NaN);
  for (const r of runs) for (let i = 0; i < r.length && r.vcn + i < clusters; i++) oracle[r.vcn + i] = r.lcn < 0 ? -1 : r.lcn + i;
  const ours = new Float64Array(clusters).fill(NaN);
  let covered = 0;
  for (const e of file.extents) {
    expect(e.fileOffset).toBe(covered);
    covered += e.length;
    const dev = e.kind === 'hole' ? undefined : e.deviceOffset;
    for (let c = Math.floor(e.fileOffset / clusterSize); c * clusterSize < e.fileOffset + e.length; c++) {
      ours[c] = dev === undefined ? -1 : (dev - (e.fileOffset - c * clusterSize)) / clusterSize;
    }
  }
  expect(covered).toBe(file.size);
  // report the first cluster that differs, not a diff of thousands of numbers
  const bad = ours.findIndex((x, i) => !Object.is(x, oracle[i]));
  expect(bad < 0 ? 'all clusters agree' : `cluster ${bad}: vdboot says LCN ${ours[bad]}, ntfscluster says ${oracle[bad]}`).toBe('all clusters agree');
}
