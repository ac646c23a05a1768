/**
 * The kit's windows-install.cmd and windows-uninstall.cmd, checked as text: cmd.exe's line
 * ends, the admin check before anything else, the paths, the quoting of a name with spaces
 * and parentheses, the order of the steps, and each failure path undoing what came before.
 */
import { describe, expect, it } from 'vitest';
import { windowsEntryName, windowsInstallScript, windowsUninstallScript } from '../../mkdisk/windows-scripts.ts';

const TITLE = 'Linux from /VMs/Linux Guest.vhdx (vdboot)';
const install = windowsInstallScript(TITLE);
const uninstall = windowsUninstallScript(TITLE);
const lines = (s: string) => s.split('\r\n');

/** The index of the first line matching `re`, failing the test when there is none. */
function at(script: string, re: RegExp): number {
  const i = lines(script).findIndex((l) => re.test(l));
  expect(i, `no line matches ${re}`).toBeGreaterThanOrEqual(0);
  return i;
}

/** The lines of the block `if errorlevel 1 (` … `)` or the label that follows line `i`. */
function blockAfter(script: string, i: number): string[] {
  const ls = lines(script);
  const out: string[] = [];
  for (let j = i + 1; j < ls.length && ls[j] !== ')'; j++) out.push(ls[j]!);
  return out;
}

describe('windows-install.cmd and windows-uninstall.cmd', () => {
  it('CRLF line ends only, plain ASCII, ending with a line end', () => {
    for (const s of [install, uninstall]) {
      expect(s.endsWith('\r\n')).toBe(true);
      expect(s.replace(/\r\n/g, '')).not.toMatch(/[\r\n]/);
      expect(s).toMatch(/^[\x20-\x7e\r\n]*$/);
    }
  });

  it('the admin check comes first, and without rights nothing is changed', () => {
    for (const s of [install, uninstall]) {
      const check = at(s, /^net session >nul 2>&1$/);
      for (const step of [/^mountvol S: \/S$/, /^xcopy /, /^bcdedit /, /^rmdir /]) {
        const i = lines(s).findIndex((l) => step.test(l.trim()));
        if (i >= 0) expect(i, String(step)).toBeGreaterThan(check);
      }
      const block = blockAfter(s, check + 1);
      expect(block.join('\n')).toMatch(/administrator rights[\s\S]*nothing was changed[\s\S]*exit \/b 1/);
    }
  });

  it('install: mounts the ESP at S:, copies the folder it is in to \\EFI\\vdboot, adds the entry for shimx64.efi, remembers its id', () => {
    const order = [
      /^mountvol S: \/S$/,
      /^xcopy "%SRC%" "S:\\EFI\\vdboot\\" \/E \/I \/Y \/Q$/,
      /^for \/f "tokens=2 delims=\{\}" %%G in \('bcdedit \/copy \{bootmgr\} \/d "Linux from \/VMs\/Linux Guest\.vhdx \(vdboot\)"'\) do set "ID=\{%%G\}"$/,
      /^bcdedit \/set !ID! path \\EFI\\vdboot\\shimx64\.efi$/,
      /^bcdedit \/set \{fwbootmgr\} displayorder !ID! \/addlast$/,
      /^>"S:\\EFI\\vdboot\\bcd-id\.txt" echo !ID!$/,
      /^bcdedit \/enum !ID!$/,
      /^mountvol S: \/D$/,
    ].map((re) => at(install, re));
    for (let i = 1; i < order.length; i++) expect(order[i]).toBeGreaterThan(order[i - 1]!);
    expect(install).toContain('set "SRC=%~dp0"');
    // a Debian on the PC: its signed GRUB would read EFI\debian\grub.cfg first
    expect(at(install, /^if exist "S:\\EFI\\debian\\grub\.cfg" echo vdboot: note: .*Debian's GRUB menu/)).toBeLessThan(at(install, /^xcopy /));
    expect(install).toContain('setlocal EnableExtensions EnableDelayedExpansion');
  });

  it('install: S: in use or an earlier install stops it before any change; each later failure undoes the steps before it', () => {
    const inUse = at(install, /^if exist S:\\ \($/);
    expect(inUse).toBeLessThan(at(install, /^mountvol S: \/S$/));
    expect(blockAfter(install, inUse).join('\n')).toMatch(/nothing was changed[\s\S]*exit \/b 1/);
    const again = at(install, /^if exist "S:\\EFI\\vdboot\\bcd-id\.txt" \($/);
    expect(again).toBeLessThan(at(install, /^xcopy /));
    expect(blockAfter(install, again).join('\n')).toMatch(/windows-uninstall\.cmd first[\s\S]*mountvol S: \/D[\s\S]*exit \/b 1/);
    const copyFailed = blockAfter(install, at(install, /^xcopy /) + 1).join('\n');
    expect(copyFailed).toMatch(/rmdir \/s \/q "S:\\EFI\\vdboot"[\s\S]*mountvol S: \/D/);
    const noId = blockAfter(install, at(install, /^if not defined ID \($/)).join('\n');
    expect(noId).toMatch(/rmdir \/s \/q "S:\\EFI\\vdboot"[\s\S]*mountvol S: \/D/);
    const undo = lines(install).slice(at(install, /^:undo$/)).join('\n');
    expect(undo).toMatch(/bcdedit \/delete !ID![\s\S]*rmdir \/s \/q "S:\\EFI\\vdboot"[\s\S]*mountvol S: \/D[\s\S]*exit \/b 1/);
    expect(lines(install).filter((l) => l === 'if errorlevel 1 goto :undo')).toHaveLength(2);
  });

  it('uninstall: reads the id install wrote, deletes that entry, removes the folder, unmounts', () => {
    const order = [
      /^mountvol S: \/S$/,
      /^if not exist "S:\\EFI\\vdboot\\bcd-id\.txt" \($/,
      /^set \/p ID=<"S:\\EFI\\vdboot\\bcd-id\.txt"$/,
      /^bcdedit \/delete !ID!$/,
      /^rmdir \/s \/q "S:\\EFI\\vdboot"$/,
      /^mountvol S: \/D$/,
    ].map((re) => at(uninstall, re));
    for (let i = 1; i < order.length; i++) expect(order[i]).toBeGreaterThan(order[i - 1]!);
    expect(uninstall).not.toMatch(/bcdedit \/copy|xcopy/);
  });

  it('parentheses inside if-blocks are escaped; names lose the characters cmd.exe expands inside quotes', () => {
    for (const s of [install, uninstall]) {
      let depth = 0;
      for (const l of lines(s)) {
        const t = l.trim();
        if (t === ')') { depth--; continue; }
        if (depth > 0 && t.startsWith('echo')) expect(t.replace(/\^[()]/g, '').replace(/"[^"]*"/g, ''), t).not.toMatch(/[()]/);
        if (/\($/.test(t) && /^if /.test(t)) depth++;
      }
      expect(depth).toBe(0);
    }
    expect(windowsEntryName('50% "done" ^! Linux')).toBe('50 done  Linux');
    expect(windowsEntryName('Linux é')).toBe('Linux ?');
    expect(windowsEntryName('""')).toBe('Linux (vdboot)');
    expect(windowsInstallScript('a "b" 100%')).toContain('/d "a b 100"');
  });
});
