/**
 * The registry of image formats, and detection by content (never by file name).
 *
 *   FORMAT_READERS: FormatReader[]   in probe order; raw is last and accepts anything.
 *   detectFormat(file: BlockReader, readers = FORMAT_READERS): FormatReader
 *   readerFor(format: ImageFormat, readers = FORMAT_READERS): FormatReader | undefined
 *
 * A new format adds ONE line to FORMAT_READERS, before rawFormat.
 */
import { isFormatError, type BlockReader } from './block-reader.ts';
import type { FormatReader, ImageFormat } from './image.ts';
import { qcowFormat } from './qcow.ts';
import { qcow2Format } from './qcow2.ts';
import { rawFormat } from './raw.ts';
import { vdiFormat } from './vdi.ts';
import { vhdFormat } from './vhd.ts';
import { vhdxFormat } from './vhdx.ts';
import { vdiskJsonFormat } from './vdisk-json.ts';
import { vmdkFormat } from './vmdk.ts';

export const FORMAT_READERS: FormatReader[] = [
  vhdxFormat,
  vhdFormat,
  qcowFormat,
  qcow2Format,
  vdiFormat,
  vmdkFormat,
  vdiskJsonFormat,
  // other formats: one line each, above this comment
  rawFormat,
];

/** How many bytes of the head probes see (fewer for a smaller file). */
export const PROBE_BYTES = 4096;

export function detectFormat(file: BlockReader, readers: readonly FormatReader[] = FORMAT_READERS): FormatReader {
  const head = file.read(0, Math.min(PROBE_BYTES, file.size));
  for (const r of readers) {
    try {
      if (r.probe(head, file)) return r;
    } catch (e) {
      if (!isFormatError(e)) throw e;
    }
  }
  return rawFormat;
}

export function readerFor(format: ImageFormat, readers: readonly FormatReader[] = FORMAT_READERS): FormatReader | undefined {
  return readers.find((r) => r.format === format);
}
