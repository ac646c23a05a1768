/**
 * Benchmark: map a synthetic VHDX whose BAT says 1,000,000 blocks are allocated, and a
 * QCOW2 whose L2 tables say 1,000,000 clusters are (qemu-img, preallocation=metadata,
 * 64 KiB clusters), on Node and inside QuickJS (issue 3: under 1 s and under 5 s).
 *
 * The image is written directly (file identifier, two headers, two region tables,
 * metadata, BAT) as a sparse file: 1 MiB blocks (the smallest VHDX allows), the first
 * half of them contiguous in the file (they merge into one extent), the second half in
 * reverse order (they cannot merge). Prints the time to open and map it, and the size of
 * the merged map and of its device-mapper table.
 *
 *   npx tsx bench/map.ts [BLOCKS] [--no-quickjs]
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { openImage } from '../src/formats/chain.ts';
import { crc32c } from '../src/formats/crc.ts';
import { dmTable, summarizeMap } from '../src/formats/extent-ops.ts';
import { utf16leEncode } from '../src/formats/text.ts';
import { nodeChainHost } from '../src/sys/node-reader.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

function guid(text: string): Uint8Array {
  const h = text.replace(/-/g, '');
  const x = Uint8Array.from(h.match(/../g)!.map((b) => parseInt(b, 16)));
  return Uint8Array.from([x[3]!, x[2]!, x[1]!, x[0]!, x[5]!, x[4]!, x[7]!, x[6]!, ...x.subarray(8)]);
}

function withCrc(b: Uint8Array): Uint8Array {
  new DataView(b.buffer).setUint32(4, crc32c(b), true);
  return b;
}

export function writeSyntheticVhdx(file: string, blocks: number): { batEntries: number } {
  const blockSize = MiB;
  const chunkRatio = (2 ** 23 * 512) / blockSize;
  const batEntries = blocks + Math.floor((blocks - 1) / chunkRatio);
  const batLength = Math.ceil((batEntries * 8) / MiB) * MiB;
  const metaOffset = MiB;
  const batOffset = 2 * MiB;
  const dataStart = batOffset + batLength;
  const fd = fs.openSync(file, 'w');
  try {
    const ident = new Uint8Array(64 * KiB);
    ident.set([0x76, 0x68, 0x64, 0x78, 0x66, 0x69, 0x6c, 0x65]);
    ident.set(utf16leEncode('vdboot bench'), 8);
    fs.writeSync(fd, ident, 0, ident.length, 0);
    for (const [at, seq] of [[64 * KiB, 1n], [128 * KiB, 2n]] as const) {
      const h = new Uint8Array(4 * KiB);
      const dv = new DataView(h.buffer);
      h.set([0x68, 0x65, 0x61, 0x64]); // "head"
      dv.setBigUint64(8, seq, true);
      h.set(guid('11111111-2222-3333-4444-555555555555'), 32);
      dv.setUint16(66, 1, true);
      fs.writeSync(fd, withCrc(h), 0, h.length, at);
    }
    const rt = new Uint8Array(64 * KiB);
    const rdv = new DataView(rt.buffer);
    rt.set([0x72, 0x65, 0x67, 0x69]); // "regi"
    rdv.setUint32(8, 2, true);
    const region = (i: number, g: string, off: number, len: number) => {
      rt.set(guid(g), 16 + i * 32);
      rdv.setBigUint64(16 + i * 32 + 16, BigInt(off), true);
      rdv.setUint32(16 + i * 32 + 24, len, true);
      rdv.setUint32(16 + i * 32 + 28, 1, true);
    };
    region(0, '2dc27766-f623-4200-9d64-115e9bfd4a08', batOffset, batLength);
    region(1, '8b7ca206-4790-4b9a-b8fe-575f050f886e', metaOffset, MiB);
    withCrc(rt);
    fs.writeSync(fd, rt, 0, rt.length, 192 * KiB);
    fs.writeSync(fd, rt, 0, rt.length, 256 * KiB);

    const meta = new Uint8Array(MiB);
    const mdv = new DataView(meta.buffer);
    meta.set([0x6d, 0x65, 0x74, 0x61, 0x64, 0x61, 0x74, 0x61]); // "metadata"
    const items: [string, Uint8Array][] = [];
    const u32 = (v: number) => { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, v, true); return b; };
    const u64 = (v: number) => { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, BigInt(v), true); return b; };
    items.push(['caa16737-fa36-4d43-b3b6-33f0aa44e76b', Uint8Array.from([...u32(blockSize), ...u32(0)])]);
    items.push(['2fa54224-cd1b-4876-b211-5dbed83bf4b8', u64(blocks * blockSize)]);
    items.push(['8141bf1d-a96f-4709-ba47-f233a8faab5f', u32(512)]);
    items.push(['cda348c7-445d-4471-9cc9-e9885251c556', u32(4096)]);
    mdv.setUint16(10, items.length, true);
    let itemAt = 64 * KiB;
    items.forEach(([g, value], i) => {
      meta.set(guid(g), 32 + i * 32);
      mdv.setUint32(32 + i * 32 + 16, itemAt, true);
      mdv.setUint32(32 + i * 32 + 20, value.length, true);
      mdv.setUint32(32 + i * 32 + 24, 4, true);
      meta.set(value, itemAt);
      itemAt += 64;
    });
    fs.writeSync(fd, meta, 0, meta.length, metaOffset);

    const bat = new Uint8Array(batEntries * 8);
    const bdv = new DataView(bat.buffer);
    const half = Math.floor(blocks / 2);
    for (let b = 0; b < blocks; b++) {
      // first half contiguous, second half in reverse order
      const slot = b < half ? b : half + (blocks - 1 - b);
      const offsetMb = dataStart / MiB + slot;
      const i = b + Math.floor(b / chunkRatio);
      bdv.setUint32(i * 8, 6 | ((offsetMb & 0xfff) << 20), true);
      bdv.setUint32(i * 8 + 4, Math.floor(offsetMb / 4096), true);
    }
    fs.writeSync(fd, bat, 0, bat.length, batOffset);
    fs.ftruncateSync(fd, dataStart + blocks * blockSize);
  } finally {
    fs.closeSync(fd);
  }
  return { batEntries };
}

/** Maps the same file inside QuickJS (quickjs-emscripten, the engine the init runs on). */
async function mapInQuickJS(file: string): Promise<{ ms: number; cpuMs: number; extents: number }> {
  const { build } = await import('esbuild');
  const { getQuickJS } = await import('quickjs-emscripten');
  const bundle = await build({
    stdin: {
      contents: `import { openImage } from './src/formats/chain.ts';
globalThis.runMap = (p) => {
  const host = { openFile: (name) => ({ name, size: __size(name), read: (o, l) => new Uint8Array(__read(o, l)) }) };
  const t0 = Date.now();
  const img = openImage(p, host);
  return JSON.stringify({ ms: Date.now() - t0, extents: img.map.extents.length });
};`,
      resolveDir: path.resolve(path.dirname(new URL(import.meta.url).pathname), '..'),
      loader: 'ts',
    },
    bundle: true, format: 'iife', write: false, target: 'es2022', platform: 'neutral',
  });
  const QuickJS = await getQuickJS();
  const rt = QuickJS.newRuntime();
  rt.setMemoryLimit(1024 * 1024 * 1024);
  const vm = rt.newContext();
  const fd = fs.openSync(file, 'r');
  try {
    const sizeFn = vm.newFunction('__size', () => vm.newNumber(fs.fstatSync(fd).size));
    const readFn = vm.newFunction('__read', (o, l) => {
      const buf = Buffer.alloc(vm.getNumber(l));
      fs.readSync(fd, buf, 0, buf.length, vm.getNumber(o));
      return vm.newArrayBuffer(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length));
    });
    vm.setProp(vm.global, '__size', sizeFn);
    vm.setProp(vm.global, '__read', readFn);
    sizeFn.dispose();
    readFn.dispose();
    vm.unwrapResult(vm.evalCode(bundle.outputFiles[0]!.text)).dispose();
    const c0 = process.cpuUsage();
    const res = vm.unwrapResult(vm.evalCode(`runMap(${JSON.stringify(file)})`));
    const c1 = process.cpuUsage(c0);
    const out = JSON.parse(vm.getString(res)) as { ms: number; extents: number };
    res.dispose();
    return { ...out, cpuMs: Math.round((c1.user + c1.system) / 1000) };
  } finally {
    fs.closeSync(fd);
    vm.dispose();
    rt.dispose();
  }
}

const isMain = import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith('bench/map.ts');
const quickjs = !process.argv.includes('--no-quickjs');
const blocks = Number(process.argv.slice(2).find((a) => !a.startsWith('--')) ?? 1_000_000);
if (isMain) await runBench();

async function runBench(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-'));
  try {
    const vhdx = path.join(dir, 'million.vhdx');
    const { batEntries } = writeSyntheticVhdx(vhdx, blocks);
    await measure(vhdx, `VHDX with ${blocks} allocated 1 MiB blocks (${batEntries} BAT entries, ${(blocks / 1024).toFixed(0)} GiB virtual)`);
    const qcow2 = path.join(dir, 'million.qcow2');
    const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536,preallocation=metadata', qcow2, `${blocks * 64}K`], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr}`);
    await measure(qcow2, `QCOW2 with ${blocks} allocated 64 KiB clusters (${((blocks * 64) / 1024 / 1024).toFixed(0)} GiB virtual, L2 tables by qemu-img)`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function measure(file: string, title: string): Promise<void> {
  const host = nodeChainHost();
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const img = openImage(file, host);
  const t1 = performance.now();
  const c1 = process.cpuUsage(c0);
  const table = dmTable(img.map);
  const t2 = performance.now();
  const c2 = process.cpuUsage(c0);
  host.close();
  const s = summarizeMap(img.map);
  process.stdout.write(
    `${title}\n` +
      `  open + map + validate: ${(t1 - t0).toFixed(0)} ms wall, ${((c1.user + c1.system) / 1000).toFixed(0)} ms CPU (Node ${process.version}; target under 1 s)\n` +
      `  merged map: ${s.extents} extents (${s.dataExtents} data)\n` +
      `  dm table: ${table.length} lines, ${table.reduce((n, l) => n + l.length + 1, 0)} bytes, made in ${(t2 - t1).toFixed(0)} ms wall, ${((c2.user + c2.system - c1.user - c1.system) / 1000).toFixed(0)} ms CPU\n`,
  );
  if (quickjs) {
    const q = await mapInQuickJS(file);
    process.stdout.write(`  QuickJS (quickjs-emscripten): open + map + validate ${q.ms} ms wall, ${q.cpuMs} ms CPU, ${q.extents} extents (target under 5 s)\n`);
  }
}
