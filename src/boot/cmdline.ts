/**
 * The kernel command line as the kernel itself splits it (lib/cmdline.c next_arg):
 * parameters are separated by spaces; double quotes group spaces; a quote that opens a
 * whole parameter or a value is dropped together with its closing quote, so
 * `root="vdisk:LABEL=My Disk:/VMs/My VM.vhdx"` and `"root=vdisk:…"` both give the
 * value without quotes. Everything after a lone `--` belongs to the init.
 */

export interface CmdlineParam {
  key: string;
  /** undefined for a bare flag such as `ro`; '' for `key=` */
  value: string | undefined;
}

export interface ParsedCmdline {
  params: CmdlineParam[];
  /** arguments after `--`, for the init */
  initArgs: string[];
}

export function splitCmdline(text: string): ParsedCmdline {
  const params: CmdlineParam[] = [];
  const initArgs: string[] = [];
  let i = 0;
  const s = text.replace(/[\r\n\t]/g, ' ');
  let afterDashes = false;
  while (i < s.length) {
    while (i < s.length && s[i] === ' ') i++;
    if (i >= s.length) break;
    // One raw token: spaces inside quotes do not end it.
    let inQuote = false;
    const begin = i;
    while (i < s.length && (inQuote || s[i] !== ' ')) {
      if (s[i] === '"') inQuote = !inQuote;
      i++;
    }
    let token = s.slice(begin, i);
    if (afterDashes) {
      initArgs.push(stripQuotes(token));
      continue;
    }
    if (token === '--') {
      afterDashes = true;
      continue;
    }
    let wholeQuoted = false;
    if (token.startsWith('"')) {
      wholeQuoted = true;
      token = token.slice(1);
      if (token.endsWith('"')) token = token.slice(0, -1);
    }
    const eq = token.indexOf('=');
    if (eq < 0) {
      params.push({ key: token, value: undefined });
      continue;
    }
    const key = token.slice(0, eq);
    let value = token.slice(eq + 1);
    if (!wholeQuoted && value.startsWith('"')) {
      value = value.slice(1);
      if (value.endsWith('"')) value = value.slice(0, -1);
    }
    params.push({ key, value });
  }
  return { params, initArgs };
}

function stripQuotes(token: string): string {
  return token.length >= 2 && token.startsWith('"') && token.endsWith('"') ? token.slice(1, -1) : token;
}

/** Looks up parameters by key: the last one wins for single values, all of them for repeatable keys. */
export class Cmdline {
  readonly params: CmdlineParam[];
  readonly initArgs: string[];
  private readonly used = new Set<number>();

  constructor(text: string) {
    const parsed = splitCmdline(text);
    this.params = parsed.params;
    this.initArgs = parsed.initArgs;
  }

  /** The last value of `key` (a bare flag gives ''), or undefined. */
  get(key: string): string | undefined {
    for (let i = this.params.length - 1; i >= 0; i--) {
      const p = this.params[i]!;
      if (p.key === key) {
        this.markAll(key);
        return p.value ?? '';
      }
    }
    return undefined;
  }

  /** Every value of a repeatable key, in order. */
  all(key: string): string[] {
    const out: string[] = [];
    this.params.forEach((p, i) => {
      if (p.key === key) {
        this.used.add(i);
        out.push(p.value ?? '');
      }
    });
    return out;
  }

  has(key: string): boolean {
    return this.get(key) !== undefined;
  }

  /** Parameters in a namespace vdboot owns (`rd.vdboot.*`, `rd.vdisk.*`, …) that nothing asked for. */
  unused(namespaces: string[]): CmdlineParam[] {
    return this.params.filter((p, i) => !this.used.has(i) && namespaces.some((ns) => p.key.startsWith(ns)));
  }

  private markAll(key: string): void {
    this.params.forEach((p, i) => {
      if (p.key === key) this.used.add(i);
    });
  }
}
