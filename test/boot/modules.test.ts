import { describe, expect, it } from 'vitest';
import { parseUevent, storageTier } from '../../src/boot/modules.ts';

describe('coldplug order', () => {
  it('puts modern storage controllers first, legacy storage next, USB after, the rest last', () => {
    // modalias strings as QEMU's devices show them in /sys/bus/*/devices/*/modalias
    expect(storageTier('pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00')).toBe(0); // virtio-blk
    expect(storageTier('pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01')).toBe(0); // ICH9 AHCI
    expect(storageTier('pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02')).toBe(0); // NVMe
    expect(storageTier('virtio:d00000002v00001AF4')).toBe(0);
    expect(storageTier('virtio:d00000008v00001AF4')).toBe(0);
    expect(storageTier('pci:v00008086d00007010sv00001AF4sd00001100bc01sc01i80')).toBe(1); // PIIX IDE
    expect(storageTier('pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30')).toBe(2); // xHCI
    expect(storageTier('usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00')).toBe(2); // USB disk
    expect(storageTier('acpi:PNP0303:')).toBe(3);
    expect(storageTier('virtio:d00000001v00001AF4')).toBe(3); // virtio-net
    expect(storageTier('pci:v00001234d00001111sv00001AF4sd00001100bc03sc00i00')).toBe(3); // VGA
  });

  it('reads uevent messages field by field', () => {
    const msg = new TextEncoder().encode('add@/devices/pci0000:00/0000:00:04.0/virtio1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio1\0SUBSYSTEM=virtio\0MODALIAS=virtio:d00000002v00001AF4\0SEQNUM=812\0');
    expect(parseUevent(msg)).toMatchObject({ ACTION: 'add', SUBSYSTEM: 'virtio', MODALIAS: 'virtio:d00000002v00001AF4', SEQNUM: '812' });
  });
});
