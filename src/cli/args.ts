/**
 * The argument walk every vdboot command shares: `--flag VALUE`, `--flag=VALUE`, and short
 * flags with their value in the next argument. `onArg(flag, value, arg)` handles one
 * argument (`flag` is `arg` without any "=VALUE"); calling `value()` takes the flag's value —
 * the text after "=", else the next argument — and throws `missing(flag)` when there is none.
 */
export function walkArgs(
  args: readonly string[],
  onArg: (flag: string, value: () => string, arg: string) => void,
  missing: (flag: string) => Error,
): void {
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1;
    const flag = eq > 0 ? arg.slice(0, eq) : arg;
    const value = (): string => {
      if (eq > 0) return arg.slice(eq + 1);
      const v = args[++i];
      if (v === undefined) throw missing(flag);
      return v;
    };
    onArg(flag, value, arg);
  }
}
