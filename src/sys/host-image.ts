/**
 * An image with its whole chain, opened from host files (Node only): what `vdboot map`,
 * `inspect` and `cat` read, and what `vdboot kit` checks before it writes boot entries.
 *
 *   openHostImage(path: string, opts?: { allowOutside?: boolean }): OpenedImage & { close(): void }
 *       openImage through node-reader.ts's nodeChainHost; close() closes every file it
 *       opened (on a failure they are closed before the error goes on).
 */
import { openImage } from '../formats/chain.ts';
import type { OpenedImage } from '../formats/image.ts';
import { nodeChainHost } from './node-reader.ts';

/** Opens an image chain from host files; `close()` closes every file it opened. */
export function openHostImage(path: string, opts: { allowOutside?: boolean } = {}): OpenedImage & { close(): void } {
  const host = nodeChainHost(opts);
  try {
    return Object.assign(openImage(path, host), { close: () => host.close() });
  } catch (e) {
    host.close();
    throw e;
  }
}
