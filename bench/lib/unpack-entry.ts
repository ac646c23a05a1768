/**
 * Run by bench/unpack-native.ts on the build machine inside vdboot's static host (the
 * same QuickJS, -O2, and native `sys` module as the init): unpacks an uncompressed tar
 * with the boot's unpacker into a directory, or only reads it (`parse`), and prints the
 * CPU time it took (user and system, from /proc/self/stat) as one line.
 *
 *   init ARCHIVE TARGET unpack|parse
 */
import * as native from 'sys';
import { StreamCursor } from '../../src/formats/archive-stream.ts';
import { openArchive } from '../../src/formats/archive.ts';
import type { BlockReader } from '../../src/formats/block-reader.ts';
import { openArchiveStream } from '../../src/boot/unpack-source.ts';
import { unpackArchive, type UnpackSys } from '../../src/boot/unpack.ts';
import { quickjsSys } from '../../src/sys/quickjs.ts';
import { readTextOr } from '../../src/boot/fsutil.ts';

const sys = quickjsSys(native);
const [archive, target, mode] = native.args.slice(1);

/** utime + stime of this process in clock ticks (100 Hz on Linux). */
function cpuTicks(): number {
  const stat = readTextOr(sys, '/proc/self/stat') ?? '';
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

function userTicks(): number {
  const stat = readTextOr(sys, "/proc/self/stat") ?? "";
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[11]);
}

const size = sys.stat(archive!).size;
const reader = { name: archive!, size } as BlockReader;
const t0 = cpuTicks();
const u0 = userTicks();
const w0 = sys.monotonicMs();
const stream = openArchiveStream(sys, reader, archive, 'none', undefined);
const tar = openArchive(new StreamCursor(stream.source), archive!, { reuseEntry: true, byteSum: sys.byteSum, utf8Decode: sys.utf8Decode });
let entries = 0;
if (mode === 'parse') {
  for (let e = tar.next(); e; e = tar.next()) entries += 1;
} else {
  entries = unpackArchive(sys as UnpackSys, tar, target!).entries;
}
stream.finish();
sys.print(`UNPACK-NATIVE ${JSON.stringify({ entries, cpuMs: (cpuTicks() - t0) * 10, userMs: (userTicks() - u0) * 10, wallMs: sys.monotonicMs() - w0 })}`);
sys.exit(0);
