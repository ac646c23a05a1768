/**
 * Run by test/tmpfs/unpackers.ts inside quickjs-emscripten against the fake kernel: the
 * boot's unpacker, through the real QuickJS adapter, on an archive file of the fake tree,
 * the way tmpfs-root.ts streams it (openArchiveStream, one refilled entry object).
 * argv: ARCHIVE TARGET OPTIONS-JSON; prints "TMPFS-QJS {stats | error}" and exits.
 */
import * as native from 'sys';
import { StreamCursor } from '../../src/formats/archive-stream.ts';
import { openArchive } from '../../src/formats/archive.ts';
import type { BlockReader } from '../../src/formats/block-reader.ts';
import { openArchiveStream } from '../../src/boot/unpack-source.ts';
import { unpackArchive, type UnpackSys } from '../../src/boot/unpack.ts';
import { quickjsSys } from '../../src/sys/quickjs.ts';
import { SysError } from '../../src/sys/sys.ts';

const sys = quickjsSys(native);
const [archive, target, optionsJson] = native.args.slice(1);
const options = JSON.parse(optionsJson ?? '{}') as { umask?: boolean; fail?: { call: string; code: string } };
const unpackSys: Record<string, unknown> = { ...sys };
if (!options.umask) unpackSys.umask = undefined;
const fail = options.fail;
if (fail) unpackSys[fail.call] = () => { throw new SysError(fail.code, 0, fail.call); };

let result: unknown;
const stream = openArchiveStream(sys, { name: archive!, size: sys.stat(archive!).size } as BlockReader, archive, 'none', undefined);
try {
  const reader = openArchive(new StreamCursor(stream.source), archive!, { reuseEntry: true, byteSum: sys.byteSum, utf8Decode: sys.utf8Decode });
  result = { stats: unpackArchive(unpackSys as unknown as UnpackSys, reader, target!) };
  stream.finish();
} catch (e) {
  const err = e as { name?: string; message?: string; entry?: { path: string }; reason?: { code?: string } };
  result = { error: { name: err.name, message: err.message, entry: err.entry?.path, code: err.reason?.code } };
  stream.abort();
}
// The console takes bytes: anything past ASCII goes as a JSON escape.
sys.print(`TMPFS-QJS ${JSON.stringify(result).replace(/[\u0080-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)}`);
sys.exit(0);
