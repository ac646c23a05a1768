/** VHDX reader (in progress). */
import { FormatError } from './block-reader.ts';
import type { FormatReader } from './image.ts';

export const vhdxFormat: FormatReader = {
  format: 'vhdx',
  probe: () => false,
  open(file) {
    throw new FormatError(`${file.name}: VHDX is not supported yet`);
  },
};
