/**
 * raw: the file is the disk. Always the last format tried: anything no other reader
 * recognizes by its content is a raw disk.
 */
import type { FormatReader, ImageLayer } from './image.ts';

export const rawFormat: FormatReader = {
  format: 'raw',
  probe: () => true,
  open(file, ctx): ImageLayer {
    return {
      format: 'raw',
      subformat: 'raw',
      size: file.size,
      files: [ctx.path],
      extents: file.size > 0 ? [{ kind: 'data', start: 0, length: file.size, file: 0, offset: 0 }] : [],
      details: {},
    };
  },
};
