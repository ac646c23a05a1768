/**
 * device-mapper's persistent snapshot store read on the host, without device-mapper: the
 * merged view a snapshot device showed, for checking a persistent overlay after the guest
 * powered off (e2fsck, debugfs on the result). Layout (drivers/md/dm-snap-persistent.c):
 * chunk 0 is the header (magic "SnAp", valid, version 1, chunk size in sectors); then
 * areas, each one chunk of exceptions ({old_chunk, new_chunk}, 64-bit little-endian, as
 * many as fit in a chunk) followed by that many data chunks. The first exception whose
 * new_chunk is 0 ends the list.
 */
const SNAP_MAGIC = 0x70416e53;

export interface MergedSnapshot {
  merged: Buffer;
  exceptions: number;
  chunkBytes: number;
}

/** `base` with every chunk the store holds put over it. Throws on a store that is not one. */
export function mergeSnapshotStore(base: Buffer, store: Buffer): MergedSnapshot {
  const magic = store.readUInt32LE(0);
  const valid = store.readUInt32LE(4);
  const version = store.readUInt32LE(8);
  const chunkSectors = store.readUInt32LE(12);
  if (magic !== SNAP_MAGIC) throw new Error(`no snapshot store header (magic ${magic.toString(16)})`);
  if (valid !== 1 || version !== 1) throw new Error(`snapshot store valid=${valid} version=${version}`);
  const chunkBytes = chunkSectors * 512;
  const perArea = chunkBytes / 16;
  const merged = Buffer.from(base);
  let exceptions = 0;
  for (let area = 0; ; area++) {
    const at = (1 + area * (perArea + 1)) * chunkBytes;
    if (at + chunkBytes > store.length) return { merged, exceptions, chunkBytes };
    for (let i = 0; i < perArea; i++) {
      const oldChunk = Number(store.readBigUInt64LE(at + i * 16));
      const newChunk = Number(store.readBigUInt64LE(at + i * 16 + 8));
      if (newChunk === 0) return { merged, exceptions, chunkBytes };
      if ((newChunk + 1) * chunkBytes > store.length) throw new Error(`exception ${exceptions}: chunk ${newChunk} lies past the store's ${store.length} bytes`);
      if (oldChunk * chunkBytes >= base.length) throw new Error(`exception ${exceptions}: chunk ${oldChunk} lies past the base's ${base.length} bytes`);
      store.copy(merged, oldChunk * chunkBytes, newChunk * chunkBytes, Math.min((newChunk + 1) * chunkBytes, newChunk * chunkBytes + base.length - oldChunk * chunkBytes));
      exceptions++;
    }
  }
}
