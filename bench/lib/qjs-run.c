/*
 * A QuickJS runner for benchmarks: evaluates one script with the same QuickJS sources and
 * optimization (-O2) as the init's host, and prints the CPU time the script took
 * ("cpu_ms N" on stderr), so a benchmark can measure the interpreter the boot runs on
 * rather than quickjs-emscripten or Node. `print` is QuickJS's own (quickjs-libc).
 * Built by bench/lib/native-quickjs.ts from build/native/host's objects.
 */
#include <stdio.h>
#include <sys/resource.h>
#include "quickjs.h"
#include "quickjs-libc.h"

static double cpu_ms(void)
{
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3 + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: qjs-run SCRIPT [ARGS...]\n");
        return 2;
    }
    JSRuntime *rt = JS_NewRuntime();
    js_std_init_handlers(rt);
    JSContext *ctx = JS_NewContext(rt);
    js_std_add_helpers(ctx, argc - 1, argv + 1);
    size_t len;
    uint8_t *buf = js_load_file(ctx, &len, argv[1]);
    if (!buf) {
        perror(argv[1]);
        return 1;
    }
    double t0 = cpu_ms();
    JSValue v = JS_Eval(ctx, (char *)buf, len, argv[1], JS_EVAL_TYPE_GLOBAL);
    if (JS_IsException(v)) {
        js_std_dump_error(ctx);
        return 1;
    }
    js_std_loop(ctx);
    fprintf(stderr, "cpu_ms %.0f\n", cpu_ms() - t0);
    return 0;
}
