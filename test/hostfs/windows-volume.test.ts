import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { isFormatError } from '../../src/formats/block-reader.ts';
import type { HostFile } from '../../src/formats/host-volume.ts';
import { fileReader, run, tmpDir } from './helpers.ts';
import { expectSameAsNtfs3g } from './ntfs-oracle.ts';
import { REAL_WORLD_DIR } from '../kit/data.ts';

const SAMPLE = path.join(REAL_WORLD_DIR, 'windows_volume.qcow2.xz');

let dir: string;
beforeAll(() => { dir = tmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

/** ntfsls -R's tree: directory → entries (directories end in "/"). */
function ntfslsTree(img: string): Map<string, string[]> {
  const tree = new Map<string, string[]>();
  let cur = '';
  for (const line of run('ntfsls', ['-a', '-s', '-R', '-F', img]).toString().split('\n')) {
    if (line.endsWith(':') && line.startsWith('/')) { cur = line.slice(0, -1).replace(/\/$/, '') || '/'; tree.set(cur, []); continue; }
    if (line && line !== './' && line !== '../') tree.get(cur)!.push(line);
  }
  return tree;
}

it.skipIf(!fs.existsSync(SAMPLE))('an NTFS volume formatted by Windows (dfvfs test data): every directory lists like ntfsls, every file reads like ntfscat', () => {
  const qcow = path.join(dir, 'w.qcow2');
  fs.writeFileSync(qcow, run('xz', ['-dc', SAMPLE]));
  const img = path.join(dir, 'w.raw');
  run('qemu-img', ['convert', '-O', 'raw', qcow, img]);
  const fsys = openHostFs(fileReader(img))!;
  expect(fsys.type).toBe('ntfs');
  const tree = ntfslsTree(img);
  expect(tree.size).toBeGreaterThan(3);
  let files = 0;
  for (const [d, entries] of tree) {
    const ours = fsys.readdir(d).map((e) => e.name + (e.isDir ? '/' : ''));
    expect([...ours].sort(), d).toEqual([...entries].sort());
    for (const e of entries.filter((x) => !x.endsWith('/'))) {
      const p = d === '/' ? `/${e}` : `${d}/${e}`;
      // ntfscat shows these differently from their raw unnamed stream: $MFT and $MFTMirr
      // with the records' fixups applied, $Secure as its $SDS stream
      if (['/$MFT', '/$MFTMirr', '/$Secure'].includes(p)) continue;
      const cat = spawnSync('ntfscat', [img, p], { maxBuffer: 1 << 30 });
      if (cat.status === 0) {
        expectSameAsNtfs3g(img, fsys, fsys.lookup(p.toUpperCase()), fsys.clusterSize);
        files++;
      } else {
        // no unnamed data stream ($Secure, $Extend's indexes): a clear error, as ntfscat gives
        expect(() => fsys.lookup(p), p).toThrow(/no data stream/);
      }
    }
  }
  expect(files).toBeGreaterThan(5);
  expect(fsys.lookup('/windows/system32/CONFIG/SysLog').path).toBe('/Windows/System32/config/syslog');
});

it.skipIf(!fs.existsSync(SAMPLE))('the same volume: every file with clusters is proven its own (no cross-link seen where Windows made none)', () => {
  const qcow = path.join(dir, 'w2.qcow2');
  fs.writeFileSync(qcow, run('xz', ['-dc', SAMPLE]));
  const img = path.join(dir, 'w2.raw');
  run('qemu-img', ['convert', '-O', 'raw', qcow, img]);
  const fsys = openHostFs(fileReader(img))!;
  const files: HostFile[] = [];
  for (const [d, entries] of ntfslsTree(img)) {
    for (const e of entries.filter((x) => !x.endsWith('/'))) {
      const p = d === '/' ? `/${e}` : `${d}/${e}`;
      if (p.startsWith('/$')) continue; // system files are owners, not images
      try {
        const f = fsys.lookup(p);
        if (f.extents.length) files.push(f);
      } catch (e) {
        if (!isFormatError(e)) throw e;
      }
    }
  }
  expect(files.length).toBeGreaterThan(0);
  expect(() => fsys.proveOwnership!(files)).not.toThrow();
});
