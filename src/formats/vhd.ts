/** VHD reader (in progress). */
import { FormatError } from './block-reader.ts';
import type { FormatReader } from './image.ts';

export const vhdFormat: FormatReader = {
  format: 'vhd',
  probe: () => false,
  open(file) {
    throw new FormatError(`${file.name}: VHD is not supported yet`);
  },
};
