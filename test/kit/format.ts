/**
 * What the format readers' unit tests share: opening one layer of a file made by qemu-img
 * (siblings opened from the same folder, as the chain does), and checking that a bad input
 * is refused with a FormatError whose message names the problem.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import { isFormatError, type BlockReader } from '../../src/formats/block-reader.ts';
import type { ImageLayer, OpenContext } from '../../src/formats/image.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';

/** The context a layer is opened with: siblings by path from the file's folder; the folder's listing when asked for. */
export function siblingContext(file: string, opts: { listing?: boolean } = {}): OpenContext {
  const ctx: OpenContext = { path: file, openFile: (p) => openFileReader(path.resolve(path.dirname(file), p)) };
  if (opts.listing) ctx.listDir = () => fs.readdirSync(path.dirname(file));
  return ctx;
}

/** One layer of `file` opened by `open` (a format's open function), the reader closed after. */
export function openLayer<L extends ImageLayer>(open: (r: BlockReader, ctx: OpenContext) => L, file: string, opts: { listing?: boolean } = {}): L {
  const r = openFileReader(file);
  try {
    return open(r, siblingContext(file, opts));
  } finally {
    r.close();
  }
}

/** `fn` throws a FormatError whose message matches `pattern` (any other error, or none, fails). */
export function expectFormatError(fn: () => unknown, pattern: RegExp): void {
  let err: unknown;
  try { fn(); } catch (e) { err = e; }
  expect(isFormatError(err), `expected a FormatError, got ${String(err)}`).toBe(true);
  expect((err as Error).message).toMatch(pattern);
}

/** A BlockReader over a file that counts the bytes read (for tests of how little a probe reads). */
export function countingFileReader(file: string): BlockReader & { bytesRead: number } {
  const f = openFileReader(file);
  const r = {
    name: f.name,
    size: f.size,
    bytesRead: 0,
    read(offset: number, length: number): Uint8Array {
      const b = f.read(offset, length);
      r.bytesRead += length;
      return b;
    },
  };
  return r;
}
