/**
 * Engine neutrality: the image readers and the chain resolver, bundled as they are for
 * the init, run inside QuickJS (quickjs-emscripten) and give the same maps, bytes and
 * errors as on Node.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { crc32 } from '../../src/formats/crc.ts';
import { readMapped } from '../../src/formats/read-map.ts';
import { cleanupTmpDirs, makeTmpDir, qemuImg, qemuIo } from '../kit/oracle.ts';
import { openHostImage } from '../../src/sys/host-image.ts';

afterAll(cleanupTmpDirs);

const MiB = 1024 * 1024;

function onNode(p: string): unknown {
  try {
    const img = openHostImage(p);
    try {
      let crc = 0;
      for (let pos = 0; pos < img.map.size; pos += MiB) crc = crc32(readMapped(img, pos, Math.min(MiB, img.map.size - pos)), crc);
      return { map: img.map, formats: img.layers.map((l) => `${l.layer.format} ${l.layer.subformat}`), crc };
    } finally {
      img.close();
    }
  } catch (e) {
    return { error: (e as Error).name, message: (e as Error).message };
  }
}

describe('engine neutrality', () => {
  it('VHD, VHDX and a qcow2-over-VHDX chain map and read the same inside QuickJS as on Node', async () => {
    const dir = makeTmpDir();
    const vhd = path.join(dir, 'a.vhd');
    qemuImg('create', '-q', '-f', 'vpc', vhd, '6M');
    qemuIo(vhd, 'vpc', ['write -P 0x11 1M 2M', 'write -P 0x12 5M 4k']);
    const vhdx = path.join(dir, 'b.vhdx');
    qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', vhdx, '6M');
    qemuIo(vhdx, 'vhdx', ['write -P 0x21 0 1536k', 'write -z 3M 1M']);
    const overlay = path.join(dir, 'c.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'b.vhdx', '-F', 'vhdx', overlay);
    qemuIo(overlay, 'qcow2', ['write -P 0x31 1M 64k']);
    const broken = path.join(dir, 'broken.vhd');
    const b = fs.readFileSync(vhd);
    b[b.length - 512 + 64] ^= 1;
    b[64] ^= 1;
    fs.writeFileSync(broken, b);
    const images = [vhd, vhdx, overlay, broken];

    const { build } = await import('esbuild');
    const { getQuickJS } = await import('quickjs-emscripten');
    const root = path.resolve(__dirname, '../..');
    const bundle = await build({
      stdin: {
        contents: `import { openImage } from './src/formats/chain.ts';
import { readMapped } from './src/formats/read-map.ts';
import { crc32 } from './src/formats/crc.ts';
globalThis.runImage = (p) => {
  const host = { openFile: (name) => {
    const size = __open(name);
    if (size < 0) { const e = new Error(name + ': not found'); e.code = 'ENOENT'; throw e; }
    return { name, size, read: (o, l) => new Uint8Array(__read(name, o, l)) };
  } };
  try {
    const img = openImage(p, host);
    let crc = 0;
    for (let pos = 0; pos < img.map.size; pos += 1048576) crc = crc32(readMapped(img, pos, Math.min(1048576, img.map.size - pos)), crc);
    return JSON.stringify({ map: img.map, formats: img.layers.map((l) => l.layer.format + ' ' + l.layer.subformat), crc });
  } catch (e) {
    return JSON.stringify({ error: e.name, message: e.message });
  }
};`,
        resolveDir: root, loader: 'ts',
      },
      bundle: true, format: 'iife', write: false, target: 'es2022', platform: 'neutral',
    });
    const QuickJS = await getQuickJS();
    const vm = QuickJS.newContext();
    const fds = new Map<string, number>();
    try {
      const openFn = vm.newFunction('__open', (h) => {
        const name = vm.getString(h);
        try {
          const fd = fds.get(name) ?? fs.openSync(name, 'r');
          fds.set(name, fd);
          return vm.newNumber(fs.fstatSync(fd).size);
        } catch {
          return vm.newNumber(-1);
        }
      });
      const readFn = vm.newFunction('__read', (h, o, l) => {
        const buf = Buffer.alloc(vm.getNumber(l));
        fs.readSync(fds.get(vm.getString(h))!, buf, 0, buf.length, vm.getNumber(o));
        return vm.newArrayBuffer(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length));
      });
      vm.setProp(vm.global, '__open', openFn);
      vm.setProp(vm.global, '__read', readFn);
      openFn.dispose();
      readFn.dispose();
      vm.unwrapResult(vm.evalCode(bundle.outputFiles[0]!.text)).dispose();
      for (const p of images) {
        const res = vm.unwrapResult(vm.evalCode(`runImage(${JSON.stringify(p)})`));
        const inQuickJS = JSON.parse(vm.getString(res));
        res.dispose();
        expect(inQuickJS, p).toEqual(JSON.parse(JSON.stringify(onNode(p))));
      }
      expect((onNode(overlay) as { formats: string[] }).formats.map((f) => f.split(' ')[0])).toEqual(['qcow2', 'vhdx']);
      expect((onNode(broken) as { error: string }).error).toBe('FormatError');
    } finally {
      vm.dispose();
      for (const fd of fds.values()) fs.closeSync(fd);
    }
  });
});
