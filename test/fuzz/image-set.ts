/**
 * Fuzz target: multi-file image sets. Each case is a VMDK descriptor (extents FLAT, SPARSE,
 * ZERO, VMFS, a parent hint) or a qcow2 (a data file, a backing file; made by qemu-img,
 * its names then rewritten) whose names come from a pool of aliases of one file ("d.raw",
 * "./d.raw", "D.RAW", "sub/../d.raw"), the image itself, its sparse neighbours, paths out
 * of the folder, a device node, a Windows path and a missing file; sometimes with the
 * header bytes mutated too. The files live in an in-memory folder /vm.
 *
 * The independent checker resolves every name itself (its own "." / ".." / case rules,
 * not vdboot's) to the file it is, then asks of the map vdboot accepted: every data extent
 * lies inside its file, inside /vm unless allow-outside was given, never on a device; no
 * two data extents share a byte of one file (whatever the spelling or the layer); no data
 * extent lies on any layer's metadata (header, tables) of the same file.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError, isFormatError, type BlockReader } from '../../src/formats/block-reader.ts';
import { openImage, type ChainHost } from '../../src/formats/chain.ts';
import type { OpenedImage } from '../../src/formats/image.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { qemuImgIn, qemuIoIn } from '../kit/oracle.ts';
import { CheckFailure, mutateBytes, type Rng, undoBytes } from './engine.ts';

const MiB = 1024 * 1024;
const FOLDER = '/vm';

/** The names an image of the set may use; every one is resolved by the checker on its own. */
const NAMES = [
  'd.raw', './d.raw', 'D.RAW', 'sub/../d.raw', '../vm/d.raw', 'C:\\VMs\\d.raw', 'sub/e.raw',
  'desc.vmdk', './desc.vmdk', 's.vmdk', 'S.VMDK', 'q.qcow2', './q.qcow2', 'b.qcow2', 'base.vmdk',
  '../x/s.bin', '/x/s.bin', '/dev/sda', 'missing.raw', 'sub',
];

/** Names of a few files only: d.raw by five spellings, the sparse s.vmdk by two, the image itself. */
const ALIASES = ['d.raw', './d.raw', 'D.RAW', 'sub/../d.raw', 'C:\\VMs\\d.raw', 's.vmdk', 'S.VMDK', 'desc.vmdk', 'q.qcow2'];

interface MemFile {
  bytes: Uint8Array;
  kind: 'file' | 'device' | 'other';
}

export interface ImageSetSeeds {
  files: Map<string, MemFile>;
  /** qcow2 made with data_file=DDDDDDDDDDDD and backing BBBBBBBBBBBB (names rewritten per case) */
  qcow2: Uint8Array[];
}

export function buildImageSetSeeds(dir: string): ImageSetSeeds {
  const files = new Map<string, MemFile>();
  const pattern = (n: number, v: number): Uint8Array => {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i += 512) b[i] = v, b[i + 1] = (i >> 9) & 0xff;
    return b;
  };
  files.set('/vm/d.raw', { bytes: pattern(MiB, 0x44), kind: 'file' });
  files.set('/vm/sub/e.raw', { bytes: pattern(MiB, 0x45), kind: 'file' });
  files.set('/vm/sub', { bytes: new Uint8Array(0), kind: 'other' });
  files.set('/x/s.bin', { bytes: pattern(MiB, 0x53), kind: 'file' });
  files.set('/dev/sda', { bytes: pattern(4 * MiB, 0x5a), kind: 'device' });
  qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', 's.vmdk', '1M');
  qemuIoIn(dir, 's.vmdk', ['write -P 0x11 0 64k', 'write -P 0x22 512k 4k'], 'vmdk');
  files.set('/vm/s.vmdk', { bytes: new Uint8Array(fs.readFileSync(path.join(dir, 's.vmdk'))), kind: 'file' });
  qemuImgIn(dir, 'create', '-q', '-f', 'vmdk', 'base.vmdk', '1M');
  qemuIoIn(dir, 'base.vmdk', ['write -P 0x33 0 128k'], 'vmdk');
  files.set('/vm/base.vmdk', { bytes: new Uint8Array(fs.readFileSync(path.join(dir, 'base.vmdk'))), kind: 'file' });
  qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'b.qcow2', '1M');
  qemuIoIn(dir, 'b.qcow2', ['write -P 0x55 0 64k'], 'qcow2');
  files.set('/vm/b.qcow2', { bytes: new Uint8Array(fs.readFileSync(path.join(dir, 'b.qcow2'))), kind: 'file' });
  const qcow2: Uint8Array[] = [];
  fs.writeFileSync(path.join(dir, 'BBBBBBBBBBBB'), Buffer.alloc(MiB));
  // a data file and a backing file; a raw data file with its tables preallocated; a backing file with preallocated tables
  for (const [backing, opts] of [[true, ['data_file=DDDDDDDDDDDD']], [false, ['data_file=DDDDDDDDDDDD', 'data_file_raw=on', 'preallocation=metadata']], [true, []]] as const) {
    const name = `q${qcow2.length}.qcow2`;
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', '-u', ...(backing ? ['-b', 'BBBBBBBBBBBB', '-F', 'raw'] : []), '-o', ['cluster_size=4096', ...opts].join(','), name, '1M');
    if (opts.length !== 3) qemuIoIn(dir, name, ['write -P 0x66 0 16k', 'write -P 0x67 512k 8k'], 'qcow2');
    qcow2.push(new Uint8Array(fs.readFileSync(path.join(dir, name))));
  }
  return { files, qcow2 };
}

/** The checker's own resolution of a name to the file it is (its key in `files`), or undefined. */
function resolve(name: string, caseInsensitive: boolean, files: Map<string, MemFile>): string | undefined {
  let p = name;
  const win = /^[A-Za-z]:[\\/]/.exec(p) ? p.slice(Math.max(p.lastIndexOf('\\'), p.lastIndexOf('/')) + 1) : undefined;
  if (win !== undefined) p = `${FOLDER}/${win}`;
  const parts: string[] = [];
  for (const x of (p.startsWith('/') ? p : `${FOLDER}/${p}`).split('/')) {
    if (x === '' || x === '.') continue;
    if (x === '..') parts.pop();
    else parts.push(x);
  }
  const full = `/${parts.join('/')}`;
  if (files.has(full)) return full;
  if (caseInsensitive) for (const k of files.keys()) if (k.toLowerCase() === full.toLowerCase()) return k;
  return undefined;
}

function vmdkDescriptor(r: Rng, label: string[]): string {
  const lines = ['# Disk DescriptorFile', 'version=1', `CID=${r.chance(0.5) ? '12345678' : 'fffffffe'}`];
  const parent = r.chance(0.2);
  lines.push(`parentCID=${parent ? r.pick(['ffffffff', '00000000', '5a5a5a5a']) : 'ffffffff'}`);
  lines.push(`createType="${r.pick(['monolithicFlat', 'twoGbMaxExtentFlat', 'twoGbMaxExtentSparse', 'vmfs', 'custom', 'monolithicSparse'])}"`);
  if (parent) lines.push(`parentFileNameHint="${r.pick(NAMES)}"`);
  if (r.chance(0.5)) {
    // well-formed: FLAT extents of plausible sizes over names of few files, so that sets are
    // accepted unless an alias, a neighbour's tables or a parent's bytes give them away
    const n = 1 + r.int(3);
    for (let i = 0; i < n; i++) {
      const name = r.pick(r.chance(0.7) ? ALIASES : NAMES);
      const sectors = r.pick([256, 512, 1024]);
      const off = r.pick([0, 0, 256, 512, 1024]);
      lines.push(`${r.pick(['RW', 'RW', 'RDONLY'])} ${sectors} ${r.chance(0.8) ? 'FLAT' : 'SPARSE'} "${name}" ${off}`);
    }
    label.push(`descriptor: ${lines.slice(2).join(' | ')}`);
    return lines.join('\n') + '\n';
  }
  const n = 1 + r.int(3);
  for (let i = 0; i < n; i++) {
    const type = r.pick(['FLAT', 'FLAT', 'SPARSE', 'ZERO', 'VMFS']);
    const sectors = r.pick([2048, 1024, 2048, 128, 1, 4096, r.int(5000)]);
    const access = r.pick(['RW', 'RW', 'RDONLY', 'NOACCESS']);
    const name = r.pick(NAMES);
    const off = type === 'FLAT' || type === 'VMFS' ? ` ${r.pick([0, 0, 1, 1024, 2047, 4096, r.int(3000)])}` : '';
    lines.push(type === 'ZERO' ? `${access} ${sectors} ZERO` : `${access} ${sectors} ${type} "${name}"${off}`);
  }
  label.push(`descriptor: ${lines.slice(2).join(' | ')}`);
  return lines.join('\n') + '\n';
}

/** A disk definition whose partition images (and table file) are names from the pool; sometimes with a character changed. */
function vdiskJson(r: Rng, label: string[]): string {
  const parts = [];
  for (let i = 0, n = 1 + r.int(3); i < n; i++) parts.push({ image: r.pick(r.chance(0.6) ? ALIASES : NAMES), type: r.pick(['linux', 'esp', '83', 'linux-root-x86-64', 'nonsense']) });
  const def: Record<string, unknown> = { vdisk: r.chance(0.9) ? 1 : r.pick([0, 2, '1']), table: r.pick(['gpt', 'mbr', 'gpt', 'apm']), partitions: parts };
  if (r.chance(0.3)) def['sectorSize'] = r.pick([512, 4096, 1000]);
  if (r.chance(0.3)) def['alignment'] = r.pick([4096, 1048576, 3, 0]);
  if (r.chance(0.3)) def['tableFile'] = r.pick(NAMES);
  let text = JSON.stringify(def);
  if (r.chance(0.2)) {
    const at = r.int(text.length);
    text = text.slice(0, at) + r.pick(['"', '/', '.', '0', '9', '}', '..']) + text.slice(at + 1);
  }
  label.push(`vdisk.json ${text}`);
  return text;
}

/** Rewrites the qcow2's data file and backing file names (12-byte slots) to names from the pool. */
function qcow2Names(r: Rng, seed: Uint8Array, label: string[]): Uint8Array {
  const b = seed.slice();
  const dv = new DataView(b.buffer);
  const enc = new TextEncoder();
  const put = (at: number, name: string) => {
    b.fill(0, at, at + 12);
    b.set(enc.encode(name).subarray(0, 12), at);
  };
  const short = NAMES.filter((n) => enc.encode(n).length <= 12);
  // backing file: offset u64 at 8, size u32 at 16
  const backingAt = Number(dv.getBigUint64(8));
  if (backingAt === 0) {
    // no slot for a name in this seed
  } else if (r.chance(0.25)) {
    dv.setBigUint64(8, 0n);
    dv.setUint32(16, 0);
    label.push('no backing file');
  } else {
    const name = r.pick(short);
    put(backingAt, name);
    dv.setUint32(16, enc.encode(name).length);
    label.push(`backing "${name}"`);
  }
  // the external data file header extension (magic 0x44415441)
  let at = 104 + (dv.getUint32(0) === 0x514649fb && dv.getUint32(4) >= 3 ? dv.getUint32(100) - 104 : 0);
  for (let guard = 0; guard < 16 && at + 8 <= b.length; guard++) {
    const magic = dv.getUint32(at);
    const len = dv.getUint32(at + 4);
    if (magic === 0) break;
    if (magic === 0x44415441) {
      const name = r.pick(short);
      put(at + 8, name);
      dv.setUint32(at + 4, enc.encode(name).length);
      label.push(`data_file "${name}"`);
      break;
    }
    at += 8 + Math.ceil(len / 8) * 8;
  }
  return b;
}

/** One case: build the set, open it with vdboot's chain, check the map independently. */
export function imageSetCase(seeds: ImageSetSeeds, r: Rng, label: string[]): 'ok' | 'refused' {
  const files = new Map(seeds.files);
  const caseInsensitive = r.chance(0.5);
  const allowOutside = r.chance(0.15);
  label.push(`caseInsensitive=${caseInsensitive} allowOutside=${allowOutside}`);
  const desc = new TextEncoder().encode(vmdkDescriptor(r, label));
  files.set('/vm/desc.vmdk', { bytes: desc, kind: 'file' });
  const q = qcow2Names(r, r.pick(seeds.qcow2), label);
  files.set('/vm/q.qcow2', { bytes: q, kind: 'file' });
  files.set('/vm/disk.vdisk.json', { bytes: new TextEncoder().encode(vdiskJson(r, label)), kind: 'file' });
  const top = r.pick(['/vm/desc.vmdk', '/vm/desc.vmdk', '/vm/q.qcow2', '/vm/q.qcow2', '/vm/disk.vdisk.json']);
  label.push(`opens ${top}`);
  // sometimes the header bytes are mutated too (the set's names stay)
  const topFile = files.get(top)!;
  const undo = top.endsWith('.qcow2') && r.chance(0.3) ? mutateBytes(r, topFile.bytes, [[0, 112], [Number(new DataView(topFile.bytes.buffer).getBigUint64(40) & 0xffffffn), 64]], label) : [];
  const reader = (key: string, name: string): BlockReader => {
    const f = files.get(key)!;
    return {
      name,
      size: f.bytes.length,
      read(offset: number, length: number): Uint8Array {
        if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > f.bytes.length) {
          throw new FormatError(`${name}: read of ${length} at ${offset} past the end (${f.bytes.length})`, 'offset', offset);
        }
        if (length > 64 * MiB) throw new Error(`fuzz: a ${length}-byte read`);
        return f.bytes.slice(offset, offset + length);
      },
    };
  };
  const host: ChainHost = {
    openFile(p) {
      const key = resolve(p, caseInsensitive, files);
      if (key === undefined || files.get(key)!.kind === 'other') throw Object.assign(new Error(`${p}: not found`), { code: 'ENOENT' });
      return reader(key, p);
    },
    fileId: (p) => {
      const key = resolve(p, caseInsensitive, files);
      if (key === undefined) throw Object.assign(new Error(`${p}: not found`), { code: 'ENOENT' });
      return key;
    },
    fileKind: (p) => {
      const key = resolve(p, caseInsensitive, files);
      if (key === undefined) throw Object.assign(new Error(`${p}: not found`), { code: 'ENOENT' });
      return files.get(key)!.kind;
    },
    caseInsensitive,
    allowOutside,
    listDir: (d) => [...files.keys()].filter((k) => k.startsWith(`${d}/`) && !k.slice(d.length + 1).includes('/')).map((k) => k.slice(d.length + 1)),
  };
  let img: OpenedImage;
  try {
    img = openImage(top, host);
  } catch (e) {
    undoBytes(topFile.bytes, undo);
    if (isFormatError(e)) return 'refused';
    const code = (e as { code?: string }).code;
    if (code === 'ENOENT') return 'refused'; // a missing file is named by the opener
    throw e;
  }
  try {
    checkImageSet(img, files, caseInsensitive, allowOutside, label);
    if (img.map.size > 0) {
      const len = Math.min(4096, img.map.size);
      readMapped(img, r.int(img.map.size - len + 1), len);
    }
  } finally {
    undoBytes(topFile.bytes, undo);
  }
  return 'ok';
}

function checkImageSet(img: OpenedImage, files: Map<string, MemFile>, caseInsensitive: boolean, allowOutside: boolean, label: string[]): void {
  const idOf = (name: string): string => {
    const key = resolve(name, caseInsensitive, files);
    if (key === undefined) throw new CheckFailure(`the map names "${name}", which is no file of the set`);
    return key;
  };
  const mapIds = img.map.files.map(idOf);
  for (const id of mapIds) {
    const kind = files.get(id)!.kind;
    // allow-outside lifts confinement, device nodes included (the person trusts the set)
    if (kind === 'other' || (kind === 'device' && !allowOutside)) throw new CheckFailure(`the map uses ${id}, a ${kind}`);
    if (!allowOutside && !id.startsWith(`${FOLDER}/`)) throw new CheckFailure(`the map uses ${id}, outside ${FOLDER}`);
  }
  // every layer's own structures, by file identity
  const meta: { id: string; s: number; e: number; what: string }[] = [];
  for (const l of img.layers) {
    for (const m of l.layer.metadata ?? []) {
      const name = l.layer.files[m.file];
      if (name === undefined) throw new CheckFailure(`metadata of ${l.path} names file index ${m.file}`);
      const base = l.path.slice(0, l.path.lastIndexOf('/')) || '/';
      meta.push({ id: idOf(name.startsWith('/') ? name : `${base}/${name}`), s: m.offset, e: m.offset + m.length, what: `${l.path} ${m.what}` });
    }
  }
  const used = new Map<string, [number, number, number][]>();
  for (const x of img.map.extents) {
    if (x.kind !== 'data') continue;
    const id = mapIds[x.file]!;
    const size = files.get(id)!.bytes.length;
    if (x.offset < 0 || x.length <= 0 || x.offset + x.length > size) throw new CheckFailure(`data at ${x.start} maps ${x.length} bytes at ${x.offset} of ${id} (${size} bytes)`);
    for (const m of meta) {
      if (m.id === id && x.offset < m.e && m.s < x.offset + x.length) throw new CheckFailure(`data at ${x.start} (${id} @ ${x.offset}+${x.length}) lies on ${m.what} [${m.s}, ${m.e})`);
    }
    let list = used.get(id);
    if (!list) used.set(id, (list = []));
    list.push([x.offset, x.offset + x.length, x.start]);
  }
  for (const [id, list] of used) {
    list.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < list.length; i++) {
      if (list[i]![0] < list[i - 1]![1]) throw new CheckFailure(`virtual ${list[i - 1]![2]} and ${list[i]![2]} both map ${id} @ ${list[i]![0]}`);
    }
  }
  label.push(`accepted: ${img.map.files.join(', ')}`);
}
