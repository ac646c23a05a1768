/*
 * vdboot's native host: runs the embedded init bundle (QuickJS bytecode) as PID 1 and
 * gives it the native module `sys`: one JavaScript function per Linux syscall, nothing
 * more. Policy (what to mount, which modules to load, switch_root) lives in TypeScript.
 *
 * Conventions of the `sys` module:
 * - Failures throw a SysError-shaped exception: { name: 'SysError', code: 'ENOENT',
 *   errno: 2, call: 'open /dev/vda' }. When the script registered a factory with
 *   setErrorFactory(fn), the exception is fn(code, errno, call) instead.
 * - Wrong argument types throw TypeError: numbers must be numbers, paths strings.
 * - Offsets and sizes are JavaScript numbers (64-bit offsets, exact up to 2^53).
 * - Byte buffers are ArrayBuffers or typed-array views; the kernel reads and writes
 *   their memory in place.
 *
 * PID 1 must never exit (the kernel would panic). If the script throws, its promise
 * rejects, it returns, or it calls exit, the host prints why on the console and runs a
 * rescue shell (/bin/sh) on the console, restarting it whenever it exits, reaping
 * every child while it waits.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include <linux/netlink.h>
#include <linux/openat2.h>

#include "quickjs.h"

extern const uint8_t vdboot_init_bytecode[];
extern const uint32_t vdboot_init_bytecode_size;

#define countof(a) (sizeof(a) / sizeof((a)[0]))

static pid_t host_pid;            /* the pid the host started with */
static int host_argc;
static char **host_argv, **host_envp;
static JSValue error_factory;     /* JS_UNDEFINED or a function (code, errno, call) */
static _Noreturn void rescue(const char *why);

/* ---------------------------------------------------------------- errno names ------ */

static const struct { int num; const char *name; } errno_names[] = {
#define ERRNO_NAME(e) { e, #e },
#include "errno-names.h"
#undef ERRNO_NAME
};

static const char *errno_name(int e)
{
    for (size_t i = 0; i < countof(errno_names); i++)
        if (errno_names[i].num == e)
            return errno_names[i].name;
    return "EUNKNOWN";
}

/* ------------------------------------------------------------------- console ------- */

static void write_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t r = write(fd, s, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        s += r;
        n -= (size_t)r;
    }
}

/* Opens /dev/console. As PID 1 in an initramfs without /dev/console, mounts devtmpfs on
 * /dev just long enough to open it, then detaches the mount again: the host leaves the
 * mount table to the script. */
static int open_console(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0 || getpid() != 1)
        return fd;
    mkdir("/dev", 0755);
    if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0)
        return -1;
    fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
    umount2("/dev", MNT_DETACH);
    return fd;
}

/* Makes sure fds 0, 1 and 2 exist: the kernel leaves them closed when the initramfs has
 * no /dev/console, and every print would vanish. */
static void ensure_stdio(void)
{
    int fd = -1;
    for (int i = 0; i < 3; i++) {
        if (fcntl(i, F_GETFD) >= 0)
            continue;
        if (fd < 0 && (fd = open_console()) < 0)
            fd = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (fd >= 0)
            dup2(fd, i);
    }
    if (fd > 2)
        close(fd);
    for (int i = 0; i < 3; i++)
        fcntl(i, F_SETFD, 0);
}

/* Prints a message on fd 2 and, when that is not the console itself, on /dev/console:
 * whoever watches the machine sees why it stopped. */
static void report(const char *msg)
{
    size_t n = strlen(msg);
    write_all(2, msg, n);
    if (getpid() != host_pid || host_pid != 1)
        return;
    int con = open_console();
    if (con < 0)
        return;
    struct stat a, b;
    if (fstat(2, &a) != 0 || fstat(con, &b) != 0 || a.st_rdev != b.st_rdev || !S_ISCHR(a.st_mode))
        write_all(con, msg, n);
    close(con);
}

/* ----------------------------------------------------------- exceptions ------------ */

/* Throws a SysError for the current errno; fmt describes the call ("open %s"). */
static JSValue throw_errno(JSContext *ctx, const char *fmt, ...)
{
    int e = errno;
    char call[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(call, sizeof(call), fmt, ap);
    va_end(ap);
    const char *code = errno_name(e);
    JSValue err;
    if (JS_IsFunction(ctx, error_factory)) {
        JSValue args[3] = { JS_NewString(ctx, code), JS_NewInt32(ctx, e), JS_NewString(ctx, call) };
        err = JS_Call(ctx, error_factory, JS_UNDEFINED, 3, args);
        for (int i = 0; i < 3; i++)
            JS_FreeValue(ctx, args[i]);
        if (JS_IsException(err))
            return err;
    } else {
        char msg[600];
        snprintf(msg, sizeof(msg), "%s: %s", call, code);
        err = JS_NewError(ctx);
        JS_SetPropertyStr(ctx, err, "message", JS_NewString(ctx, msg));
        JS_SetPropertyStr(ctx, err, "name", JS_NewString(ctx, "SysError"));
        JS_SetPropertyStr(ctx, err, "code", JS_NewString(ctx, code));
        JS_SetPropertyStr(ctx, err, "errno", JS_NewInt32(ctx, e));
        JS_SetPropertyStr(ctx, err, "call", JS_NewString(ctx, call));
    }
    return JS_Throw(ctx, err);
}

/* --------------------------------------------------------- argument checks --------- */

static JSValueConst arg(int argc, JSValueConst *argv, int i)
{
    return i < argc ? argv[i] : JS_UNDEFINED;
}

static int get_int64(JSContext *ctx, int argc, JSValueConst *argv, int i, const char *fn, int64_t *out)
{
    JSValueConst v = arg(argc, argv, i);
    if (!JS_IsNumber(v)) {
        JS_ThrowTypeError(ctx, "sys.%s: argument %d must be a number", fn, i + 1);
        return -1;
    }
    return JS_ToInt64(ctx, out, v);
}

static int get_int(JSContext *ctx, int argc, JSValueConst *argv, int i, const char *fn, int *out)
{
    int64_t v;
    if (get_int64(ctx, argc, argv, i, fn, &v) < 0)
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        JS_ThrowRangeError(ctx, "sys.%s: argument %d out of range: %lld", fn, i + 1, (long long)v);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* Optional number: undefined gives def. */
static int get_int_opt(JSContext *ctx, int argc, JSValueConst *argv, int i, const char *fn, int def, int *out)
{
    if (JS_IsUndefined(arg(argc, argv, i))) {
        *out = def;
        return 0;
    }
    return get_int(ctx, argc, argv, i, fn, out);
}

/* A string argument as a C string (free with JS_FreeCString); NULL after throwing. */
static const char *get_str(JSContext *ctx, int argc, JSValueConst *argv, int i, const char *fn)
{
    JSValueConst v = arg(argc, argv, i);
    if (!JS_IsString(v)) {
        JS_ThrowTypeError(ctx, "sys.%s: argument %d must be a string", fn, i + 1);
        return NULL;
    }
    size_t len;
    const char *s = JS_ToCStringLen(ctx, &len, v);
    if (s && strlen(s) != len) {
        JS_FreeCString(ctx, s);
        JS_ThrowTypeError(ctx, "sys.%s: argument %d contains a NUL character", fn, i + 1);
        return NULL;
    }
    return s;
}

/* A string, or null/undefined for a NULL pointer (mount's optional arguments). */
static int get_str_or_null(JSContext *ctx, int argc, JSValueConst *argv, int i, const char *fn, const char **out)
{
    JSValueConst v = arg(argc, argv, i);
    *out = NULL;
    if (JS_IsNull(v) || JS_IsUndefined(v))
        return 0;
    *out = get_str(ctx, argc, argv, i, fn);
    return *out ? 0 : -1;
}

/* A numeric property of a view (byteOffset, byteLength); -1 when it is not one. */
static int64_t view_number(JSContext *ctx, JSValueConst v, const char *name)
{
    JSValue n = JS_GetPropertyStr(ctx, v, name);
    int64_t r = -1;
    if (!JS_IsNumber(n) || JS_ToInt64(ctx, &r, n) < 0)
        r = -1;
    JS_FreeValue(ctx, n);
    return r;
}

/* The memory of an ArrayBuffer, a typed array or a DataView (any view whose buffer,
 * byteOffset and byteLength describe a range of an ArrayBuffer). */
static int get_bytes(JSContext *ctx, int argc, JSValueConst *argv, int i, const char *fn, uint8_t **ptr, size_t *len)
{
    JSValueConst v = arg(argc, argv, i);
    size_t off, n, per, total;
    uint8_t *p;
    if (!JS_IsObject(v))
        goto bad;
    JSValue ab = JS_GetTypedArrayBuffer(ctx, v, &off, &n, &per);
    if (JS_IsException(ab)) {
        JS_FreeValue(ctx, JS_GetException(ctx));
        /* an ArrayBuffer itself? */
        p = JS_GetArrayBuffer(ctx, &total, v);
        if (p || !JS_HasException(ctx)) {
            *ptr = p;
            *len = p ? total : 0;
            return 0;
        }
        JS_FreeValue(ctx, JS_GetException(ctx));
        /* a DataView (or another view) */
        ab = JS_GetPropertyStr(ctx, v, "buffer");
        int64_t o = view_number(ctx, v, "byteOffset"), l = view_number(ctx, v, "byteLength");
        if (JS_IsException(ab) || o < 0 || l < 0) {
            JS_FreeValue(ctx, ab);
            goto bad;
        }
        off = (size_t)o;
        n = (size_t)l;
    }
    p = JS_GetArrayBuffer(ctx, &total, ab);
    JS_FreeValue(ctx, ab);
    if (!p && JS_HasException(ctx))
        return -1;
    if (!p && n == 0)
        total = 0;
    if (off > total || n > total - off)
        goto bad;
    *ptr = p ? p + off : p;
    *len = n;
    return 0;
bad:
    if (JS_HasException(ctx))
        JS_FreeValue(ctx, JS_GetException(ctx));
    JS_ThrowTypeError(ctx, "sys.%s: argument %d must be an ArrayBuffer, a typed array or a DataView", fn, i + 1);
    return -1;
}

/* The length of an array (the caller checked JS_IsArray). */
static int array_length(JSContext *ctx, JSValueConst a, int64_t *n)
{
    JSValue v = JS_GetPropertyStr(ctx, a, "length");
    int r = JS_ToInt64(ctx, n, v);
    JS_FreeValue(ctx, v);
    return r;
}

/* A JS array of strings as a NULL-terminated, malloc'ed char*[] (free with free_strv). */
static void free_strv(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

static char **get_strv(JSContext *ctx, int argc, JSValueConst *argv, int i, const char *fn)
{
    JSValueConst v = arg(argc, argv, i);
    int64_t n;
    if (!JS_IsArray(ctx, v) || array_length(ctx, v, &n) < 0 || n > 65536) {
        if (!JS_HasException(ctx))
            JS_ThrowTypeError(ctx, "sys.%s: argument %d must be an array of strings", fn, i + 1);
        return NULL;
    }
    char **out = calloc((size_t)n + 1, sizeof(char *));
    if (!out) {
        JS_ThrowOutOfMemory(ctx);
        return NULL;
    }
    for (int64_t k = 0; k < n; k++) {
        JSValue e = JS_GetPropertyUint32(ctx, v, (uint32_t)k);
        const char *s = NULL;
        size_t len = 0;
        if (JS_IsString(e))
            s = JS_ToCStringLen(ctx, &len, e);
        JS_FreeValue(ctx, e);
        if (!s || strlen(s) != len) {
            if (s)
                JS_FreeCString(ctx, s);
            if (!JS_HasException(ctx))
                JS_ThrowTypeError(ctx, "sys.%s: argument %d[%lld] must be a string without NUL", fn, i + 1, (long long)k);
            free_strv(out);
            return NULL;
        }
        out[k] = strdup(s);
        JS_FreeCString(ctx, s);
        if (!out[k]) {
            free_strv(out);
            JS_ThrowOutOfMemory(ctx);
            return NULL;
        }
    }
    return out;
}

/* Closes every fd >= from except keep (-1: none). */
static void close_fds_from(int from, int keep)
{
    if (keep >= from) {
        if (keep > from && syscall(SYS_close_range, from, keep - 1, 0) != 0)
            for (int fd = from; fd < keep; fd++)
                close(fd);
        from = keep + 1;
    }
    if (syscall(SYS_close_range, from, ~0U, 0) != 0)
        for (int fd = from; fd < 1024; fd++)
            close(fd);
}

/* ------------------------------------------------------------------- files --------- */

/* The open flags of src/sys/sys.ts's O are x86-64's numbers. Elsewhere (aarch64) O_DIRECTORY
 * and O_NOFOLLOW have other values (x86-64's O_DIRECTORY is aarch64's O_DIRECT, which
 * openat2 refuses with O_PATH; its O_NOFOLLOW is O_LARGEFILE, which follows links): they are
 * translated here. */
static int open_flags(int flags)
{
#if defined(__x86_64__)
    return flags;
#else
    int out = flags & ~(0200000 | 0400000);
    if (flags & 0200000)
        out |= O_DIRECTORY;
    if (flags & 0400000)
        out |= O_NOFOLLOW;
    return out;
#endif
}

static JSValue sys_open(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int flags, mode;
    /* mode defaults to 0666 (less the umask) like most runtimes, not to 0 */
    if (get_int(ctx, argc, argv, 1, "open", &flags) || get_int_opt(ctx, argc, argv, 2, "open", 0666, &mode))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 0, "open");
    if (!path)
        return JS_EXCEPTION;
    int fd;
    /* openat(2) directly: musl's open() follows O_CLOEXEC with an fcntl for kernels older
     * than 2.6.23, one more syscall per file when a root archive is unpacked. */
    flags = open_flags(flags);
    do fd = (int)syscall(SYS_openat, AT_FDCWD, path, flags, (mode_t)mode); while (fd < 0 && errno == EINTR);
    JSValue r = fd < 0 ? throw_errno(ctx, "open %s", path) : JS_NewInt32(ctx, fd);
    JS_FreeCString(ctx, path);
    return r;
}

static JSValue sys_close(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd;
    if (get_int(ctx, argc, argv, 0, "close", &fd))
        return JS_EXCEPTION;
    if (close(fd) != 0 && errno != EINTR)
        return throw_errno(ctx, "close fd %d", fd);
    return JS_UNDEFINED;
}

/* magic: 0 pread, 1 pwrite, 2 read, 3 write */
static JSValue sys_rw(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    static const char *names[] = { "pread", "pwrite", "read", "write" };
    const char *fn = names[magic];
    int fd;
    int64_t off = 0;
    uint8_t *buf;
    size_t len;
    if (get_int(ctx, argc, argv, 0, fn, &fd))
        return JS_EXCEPTION;
    if (magic < 2) {
        if (get_int64(ctx, argc, argv, 2, fn, &off))
            return JS_EXCEPTION;
        if (off < 0)
            return JS_ThrowRangeError(ctx, "sys.%s: negative offset %lld", fn, (long long)off);
    }
    if (get_bytes(ctx, argc, argv, 1, fn, &buf, &len))
        return JS_EXCEPTION;
    ssize_t r;
    do {
        switch (magic) {
        case 0: r = pread(fd, buf, len, (off_t)off); break;
        case 1: r = pwrite(fd, buf, len, (off_t)off); break;
        case 2: r = read(fd, buf, len); break;
        default: r = write(fd, buf, len); break;
        }
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return magic < 2 ? throw_errno(ctx, "%s fd %d at %lld", fn, fd, (long long)off)
                         : throw_errno(ctx, "%s fd %d", fn, fd);
    return JS_NewInt64(ctx, r);
}

/* sendfile(outFd, inFd, offset, count): up to count bytes of inFd from offset (-1: from
 * and moving its file position) written to outFd inside the kernel; returns how many
 * (0 at the end of the input). */
static JSValue sys_sendfile(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int out, in;
    int64_t off, count;
    if (get_int(ctx, argc, argv, 0, "sendfile", &out) || get_int(ctx, argc, argv, 1, "sendfile", &in) ||
        get_int64(ctx, argc, argv, 2, "sendfile", &off) || get_int64(ctx, argc, argv, 3, "sendfile", &count))
        return JS_EXCEPTION;
    if (off < -1 || count < 0)
        return JS_ThrowRangeError(ctx, "sys.sendfile: offset %lld, count %lld", (long long)off, (long long)count);
    off_t pos = (off_t)off;
    ssize_t r;
    do r = sendfile(out, in, off < 0 ? NULL : &pos, (size_t)count); while (r < 0 && errno == EINTR);
    if (r < 0)
        return throw_errno(ctx, "sendfile fd %d at %lld to fd %d", in, (long long)off, out);
    return JS_NewInt64(ctx, r);
}

/* splice(inFd, inOffset, outFd, outOffset, count, flags): offsets -1 for pipes (and to
 * use the file position); returns the bytes moved (0 at the end of the input). */
static JSValue sys_splice(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int in, out, flags;
    int64_t inOff, outOff, count;
    if (get_int(ctx, argc, argv, 0, "splice", &in) || get_int64(ctx, argc, argv, 1, "splice", &inOff) ||
        get_int(ctx, argc, argv, 2, "splice", &out) || get_int64(ctx, argc, argv, 3, "splice", &outOff) ||
        get_int64(ctx, argc, argv, 4, "splice", &count) || get_int_opt(ctx, argc, argv, 5, "splice", 0, &flags))
        return JS_EXCEPTION;
    if (inOff < -1 || outOff < -1 || count < 0)
        return JS_ThrowRangeError(ctx, "sys.splice: offsets %lld, %lld, count %lld", (long long)inOff, (long long)outOff, (long long)count);
    loff_t a = (loff_t)inOff, b = (loff_t)outOff;
    ssize_t r;
    do r = splice(in, inOff < 0 ? NULL : &a, out, outOff < 0 ? NULL : &b, (size_t)count, (unsigned)flags);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return throw_errno(ctx, "splice fd %d to fd %d", in, out);
    return JS_NewInt64(ctx, r);
}

/* fadvise(fd, offset, len, advice): posix_fadvise (POSIX_FADV_WILLNEED = 3 starts reading
 * a range into the page cache without waiting for it). */
static JSValue sys_fadvise(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd, advice;
    int64_t off, len;
    if (get_int(ctx, argc, argv, 0, "fadvise", &fd) || get_int64(ctx, argc, argv, 1, "fadvise", &off) ||
        get_int64(ctx, argc, argv, 2, "fadvise", &len) || get_int(ctx, argc, argv, 3, "fadvise", &advice))
        return JS_EXCEPTION;
    int r = posix_fadvise(fd, (off_t)off, (off_t)len, advice);
    if (r != 0) {
        errno = r;
        return throw_errno(ctx, "fadvise fd %d", fd);
    }
    return JS_UNDEFINED;
}

/* fcntl(fd, cmd, arg) with an integer argument (F_GETFL, F_SETPIPE_SZ, ...): fcntl's result. */
static JSValue sys_fcntl(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd, cmd;
    int64_t a;
    if (get_int(ctx, argc, argv, 0, "fcntl", &fd) || get_int(ctx, argc, argv, 1, "fcntl", &cmd) ||
        get_int64(ctx, argc, argv, 2, "fcntl", &a))
        return JS_EXCEPTION;
    int r = fcntl(fd, cmd, (long)a);
    if (r < 0)
        return throw_errno(ctx, "fcntl fd %d cmd %d", fd, cmd);
    return JS_NewInt32(ctx, r);
}

static JSValue sys_ioctl(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd;
    int64_t req;
    uint8_t *buf;
    size_t len;
    if (get_int(ctx, argc, argv, 0, "ioctl", &fd) || get_int64(ctx, argc, argv, 1, "ioctl", &req) ||
        get_bytes(ctx, argc, argv, 2, "ioctl", &buf, &len))
        return JS_EXCEPTION;
    int r = ioctl(fd, (unsigned long)(uint32_t)req, buf);
    if (r < 0)
        return throw_errno(ctx, "ioctl 0x%llx on fd %d", (unsigned long long)(uint32_t)req, fd);
    return JS_NewInt32(ctx, r);
}

static JSValue sys_ioctl_int(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd;
    int64_t req, a;
    if (get_int(ctx, argc, argv, 0, "ioctlInt", &fd) || get_int64(ctx, argc, argv, 1, "ioctlInt", &req) ||
        get_int64(ctx, argc, argv, 2, "ioctlInt", &a))
        return JS_EXCEPTION;
    int r = ioctl(fd, (unsigned long)(uint32_t)req, (unsigned long)a);
    if (r < 0)
        return throw_errno(ctx, "ioctl 0x%llx on fd %d", (unsigned long long)(uint32_t)req, fd);
    return JS_NewInt32(ctx, r);
}

static JSValue sys_fsync(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd;
    if (get_int(ctx, argc, argv, 0, "fsync", &fd))
        return JS_EXCEPTION;
    if (fsync(fd) != 0)
        return throw_errno(ctx, "fsync fd %d", fd);
    return JS_UNDEFINED;
}

static JSValue sys_truncate(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd;
    int64_t len;
    if (get_int(ctx, argc, argv, 0, "truncate", &fd) || get_int64(ctx, argc, argv, 1, "truncate", &len))
        return JS_EXCEPTION;
    if (ftruncate(fd, (off_t)len) != 0)
        return throw_errno(ctx, "truncate fd %d to %lld", fd, (long long)len);
    return JS_UNDEFINED;
}

/* ------------------------------------------------------------------ the tree ------- */

static JSValue stat_object(JSContext *ctx, const struct stat *st)
{
    JSValue o = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, o, "mode", JS_NewUint32(ctx, st->st_mode));
    JS_SetPropertyStr(ctx, o, "size", JS_NewInt64(ctx, st->st_size));
    JS_SetPropertyStr(ctx, o, "rdevMajor", JS_NewUint32(ctx, major(st->st_rdev)));
    JS_SetPropertyStr(ctx, o, "rdevMinor", JS_NewUint32(ctx, minor(st->st_rdev)));
    JS_SetPropertyStr(ctx, o, "devMajor", JS_NewUint32(ctx, major(st->st_dev)));
    JS_SetPropertyStr(ctx, o, "devMinor", JS_NewUint32(ctx, minor(st->st_dev)));
    JS_SetPropertyStr(ctx, o, "ino", JS_NewInt64(ctx, (int64_t)st->st_ino));
    JS_SetPropertyStr(ctx, o, "nlink", JS_NewInt64(ctx, (int64_t)st->st_nlink));
    JS_SetPropertyStr(ctx, o, "uid", JS_NewUint32(ctx, st->st_uid));
    JS_SetPropertyStr(ctx, o, "gid", JS_NewUint32(ctx, st->st_gid));
    JS_SetPropertyStr(ctx, o, "mtimeSec", JS_NewInt64(ctx, st->st_mtim.tv_sec));
    return o;
}

/* magic: 0 stat, 1 lstat */
static JSValue sys_stat(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    const char *fn = magic ? "lstat" : "stat";
    const char *path = get_str(ctx, argc, argv, 0, fn);
    if (!path)
        return JS_EXCEPTION;
    struct stat st;
    int r = magic ? lstat(path, &st) : stat(path, &st);
    JSValue v = r != 0 ? throw_errno(ctx, "%s %s", fn, path) : stat_object(ctx, &st);
    JS_FreeCString(ctx, path);
    return v;
}

static JSValue sys_statfs(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    const char *path = get_str(ctx, argc, argv, 0, "statfs");
    if (!path)
        return JS_EXCEPTION;
    struct statfs s;
    JSValue o;
    if (statfs(path, &s) != 0) {
        o = throw_errno(ctx, "statfs %s", path);
    } else {
        o = JS_NewObject(ctx);
        JS_SetPropertyStr(ctx, o, "type", JS_NewInt64(ctx, (int64_t)(uint32_t)s.f_type));
        JS_SetPropertyStr(ctx, o, "blockSize", JS_NewInt64(ctx, (int64_t)s.f_bsize));
        JS_SetPropertyStr(ctx, o, "blocks", JS_NewInt64(ctx, (int64_t)s.f_blocks));
        JS_SetPropertyStr(ctx, o, "blocksFree", JS_NewInt64(ctx, (int64_t)s.f_bfree));
        JS_SetPropertyStr(ctx, o, "blocksAvailable", JS_NewInt64(ctx, (int64_t)s.f_bavail));
    }
    JS_FreeCString(ctx, path);
    return o;
}

static JSValue sys_readdir(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    const char *path = get_str(ctx, argc, argv, 0, "readdir");
    if (!path)
        return JS_EXCEPTION;
    DIR *d = opendir(path);
    if (!d) {
        JSValue e = throw_errno(ctx, "readdir %s", path);
        JS_FreeCString(ctx, path);
        return e;
    }
    JSValue list = JS_NewArray(ctx);
    uint32_t n = 0;
    struct dirent *de;
    for (;;) {
        errno = 0;
        if (!(de = readdir(d)))
            break;
        if (de->d_name[0] == '.' && (!de->d_name[1] || (de->d_name[1] == '.' && !de->d_name[2])))
            continue;
        JS_SetPropertyUint32(ctx, list, n++, JS_NewString(ctx, de->d_name));
    }
    if (errno != 0) {
        JS_FreeValue(ctx, list);
        list = throw_errno(ctx, "readdir %s", path);
    }
    closedir(d);
    JS_FreeCString(ctx, path);
    return list;
}

static JSValue sys_readlink(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    const char *path = get_str(ctx, argc, argv, 0, "readlink");
    if (!path)
        return JS_EXCEPTION;
    char buf[PATH_MAX + 1];
    ssize_t n = readlink(path, buf, sizeof(buf) - 1);
    JSValue v;
    if (n < 0) {
        v = throw_errno(ctx, "readlink %s", path);
    } else {
        buf[n] = 0;
        v = JS_NewStringLen(ctx, buf, (size_t)n);
    }
    JS_FreeCString(ctx, path);
    return v;
}

/* One path, optional number: magic 0 mkdir, 1 rmdir, 2 unlink, 3 chmod, 4 chdir, 5 chroot */
static JSValue sys_path_op(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    static const char *names[] = { "mkdir", "rmdir", "unlink", "chmod", "chdir", "chroot" };
    const char *fn = names[magic];
    int mode = 0;
    if ((magic == 0 || magic == 3) && get_int(ctx, argc, argv, 1, fn, &mode))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 0, fn);
    if (!path)
        return JS_EXCEPTION;
    int r;
    switch (magic) {
    case 0: r = mkdir(path, (mode_t)mode); break;
    case 1: r = rmdir(path); break;
    case 2: r = unlink(path); break;
    case 3: r = chmod(path, (mode_t)mode); break;
    case 4: r = chdir(path); break;
    default: r = chroot(path); break;
    }
    JSValue v = r != 0 ? throw_errno(ctx, "%s %s", fn, path) : JS_UNDEFINED;
    JS_FreeCString(ctx, path);
    return v;
}

/* Two paths: magic 0 symlink(target, path), 1 link(target, path), 2 rename(from, to),
 * 3 pivotRoot(newRoot, putOld). */
static JSValue sys_two_paths(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    static const char *names[] = { "symlink", "link", "rename", "pivotRoot" };
    const char *fn = names[magic];
    const char *a = get_str(ctx, argc, argv, 0, fn);
    if (!a)
        return JS_EXCEPTION;
    const char *b = get_str(ctx, argc, argv, 1, fn);
    if (!b) {
        JS_FreeCString(ctx, a);
        return JS_EXCEPTION;
    }
    int r;
    switch (magic) {
    case 0: r = symlink(a, b); break;
    case 1: r = link(a, b); break;
    case 2: r = rename(a, b); break;
    default: r = (int)syscall(SYS_pivot_root, a, b); break;
    }
    JSValue v = r != 0 ? throw_errno(ctx, magic == 2 ? "%s %s to %s" : "%s %s at %s", fn, a, b) : JS_UNDEFINED;
    JS_FreeCString(ctx, a);
    JS_FreeCString(ctx, b);
    return v;
}

static JSValue sys_mknod(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int mode, maj, min;
    if (get_int(ctx, argc, argv, 1, "mknod", &mode) || get_int(ctx, argc, argv, 2, "mknod", &maj) ||
        get_int(ctx, argc, argv, 3, "mknod", &min))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 0, "mknod");
    if (!path)
        return JS_EXCEPTION;
    JSValue v = mknod(path, (mode_t)mode, makedev((unsigned)maj, (unsigned)min)) != 0
                    ? throw_errno(ctx, "mknod %s (%d:%d)", path, maj, min) : JS_UNDEFINED;
    JS_FreeCString(ctx, path);
    return v;
}

static JSValue sys_lchown(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int64_t uid, gid;
    if (get_int64(ctx, argc, argv, 1, "lchown", &uid) || get_int64(ctx, argc, argv, 2, "lchown", &gid))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 0, "lchown");
    if (!path)
        return JS_EXCEPTION;
    JSValue v = lchown(path, (uid_t)uid, (gid_t)gid) != 0 ? throw_errno(ctx, "lchown %s", path) : JS_UNDEFINED;
    JS_FreeCString(ctx, path);
    return v;
}

/* utimensat(path, sec, nsec, noFollow): atime and mtime both set to sec.nsec. */
static JSValue sys_utimensat(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int64_t sec, nsec;
    if (get_int64(ctx, argc, argv, 1, "utimensat", &sec) || get_int64(ctx, argc, argv, 2, "utimensat", &nsec))
        return JS_EXCEPTION;
    if (nsec < 0 || nsec > 999999999)
        return JS_ThrowRangeError(ctx, "sys.utimensat: nanoseconds out of range: %lld", (long long)nsec);
    int nofollow = JS_ToBool(ctx, arg(argc, argv, 3));
    const char *path = get_str(ctx, argc, argv, 0, "utimensat");
    if (!path)
        return JS_EXCEPTION;
    struct timespec ts[2] = { { (time_t)sec, (long)nsec }, { (time_t)sec, (long)nsec } };
    JSValue v = utimensat(AT_FDCWD, path, ts, nofollow ? AT_SYMLINK_NOFOLLOW : 0) != 0
                    ? throw_errno(ctx, "utimensat %s", path) : JS_UNDEFINED;
    JS_FreeCString(ctx, path);
    return v;
}

/* lsetxattr(path, name, value): sets an extended attribute without following a symlink. */
static JSValue sys_lsetxattr(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    uint8_t *value;
    size_t len;
    if (get_bytes(ctx, argc, argv, 2, "lsetxattr", &value, &len))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 0, "lsetxattr");
    if (!path)
        return JS_EXCEPTION;
    const char *name = get_str(ctx, argc, argv, 1, "lsetxattr");
    if (!name) {
        JS_FreeCString(ctx, path);
        return JS_EXCEPTION;
    }
    JSValue v = lsetxattr(path, name, value, len, 0) != 0 ? throw_errno(ctx, "lsetxattr %s %s", path, name) : JS_UNDEFINED;
    JS_FreeCString(ctx, name);
    JS_FreeCString(ctx, path);
    return v;
}

/* ------------------------------------------- names relative to a directory fd ------- *
 * The *at calls resolve a name from an open directory (dirfd; -100 is AT_FDCWD), so a
 * root archive's entries are created by their last component from the directory they
 * are in, not by a whole path walked again from "/" for every call, and a directory is
 * reached once, by openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, without following
 * any symbolic link. */

/* openat(dirfd, path, flags, mode) */
static JSValue sys_openat(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int dirfd, flags, mode;
    if (get_int(ctx, argc, argv, 0, "openat", &dirfd) || get_int(ctx, argc, argv, 2, "openat", &flags) ||
        get_int_opt(ctx, argc, argv, 3, "openat", 0666, &mode))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 1, "openat");
    if (!path)
        return JS_EXCEPTION;
    int fd;
    flags = open_flags(flags);
    do fd = (int)syscall(SYS_openat, dirfd, path, flags, (mode_t)mode); while (fd < 0 && errno == EINTR);
    JSValue r = fd < 0 ? throw_errno(ctx, "openat %s", path) : JS_NewInt32(ctx, fd);
    JS_FreeCString(ctx, path);
    return r;
}

/* openat2(dirfd, path, flags, mode, resolve): ENOSYS before Linux 5.6. */
static JSValue sys_openat2(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int dirfd, flags, mode, resolve;
    if (get_int(ctx, argc, argv, 0, "openat2", &dirfd) || get_int(ctx, argc, argv, 2, "openat2", &flags) ||
        get_int(ctx, argc, argv, 3, "openat2", &mode) || get_int(ctx, argc, argv, 4, "openat2", &resolve))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 1, "openat2");
    if (!path)
        return JS_EXCEPTION;
    struct open_how how = { .flags = (uint64_t)(uint32_t)open_flags(flags), .mode = (uint64_t)(uint32_t)mode, .resolve = (uint64_t)(uint32_t)resolve };
    int fd;
    do fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how)); while (fd < 0 && errno == EINTR);
    JSValue r = fd < 0 ? throw_errno(ctx, "openat2 %s", path) : JS_NewInt32(ctx, fd);
    JS_FreeCString(ctx, path);
    return r;
}

/* dirfd, path, then numbers: magic 0 mkdirat(mode), 1 unlinkat(flags), 2 fchmodat(mode),
 * 3 mknodat(mode, major, minor), 4 fchownat(uid, gid, flags) */
static JSValue sys_at_op(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    static const char *names[] = { "mkdirat", "unlinkat", "fchmodat", "mknodat", "fchownat" };
    static const int counts[] = { 1, 1, 1, 3, 3 };
    const char *fn = names[magic];
    int dirfd;
    int64_t n[3] = { 0, 0, 0 };
    if (get_int(ctx, argc, argv, 0, fn, &dirfd))
        return JS_EXCEPTION;
    for (int i = 0; i < counts[magic]; i++) {
        if (get_int64(ctx, argc, argv, 2 + i, fn, &n[i]))
            return JS_EXCEPTION;
        if (n[i] < 0 || n[i] > UINT32_MAX)
            return JS_ThrowRangeError(ctx, "sys.%s: argument %d out of range: %lld", fn, 3 + i, (long long)n[i]);
    }
    const char *path = get_str(ctx, argc, argv, 1, fn);
    if (!path)
        return JS_EXCEPTION;
    int r;
    switch (magic) {
    case 0: r = mkdirat(dirfd, path, (mode_t)n[0]); break;
    case 1: r = unlinkat(dirfd, path, (int)n[0]); break;
    case 2: r = fchmodat(dirfd, path, (mode_t)n[0], 0); break;
    case 3: r = mknodat(dirfd, path, (mode_t)n[0], makedev((unsigned)n[1], (unsigned)n[2])); break;
    default: r = fchownat(dirfd, path, (uid_t)n[0], (gid_t)n[1], (int)n[2]); break;
    }
    JSValue v = r != 0 ? throw_errno(ctx, "%s %s", fn, path) : JS_UNDEFINED;
    JS_FreeCString(ctx, path);
    return v;
}

/* symlinkat(target, dirfd, path) */
static JSValue sys_symlinkat(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int dirfd;
    if (get_int(ctx, argc, argv, 1, "symlinkat", &dirfd))
        return JS_EXCEPTION;
    const char *target = get_str(ctx, argc, argv, 0, "symlinkat");
    if (!target)
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 2, "symlinkat");
    if (!path) {
        JS_FreeCString(ctx, target);
        return JS_EXCEPTION;
    }
    JSValue v = symlinkat(target, dirfd, path) != 0 ? throw_errno(ctx, "symlinkat %s", path) : JS_UNDEFINED;
    JS_FreeCString(ctx, target);
    JS_FreeCString(ctx, path);
    return v;
}

/* linkat(oldDirfd, oldPath, newDirfd, newPath, flags) */
static JSValue sys_linkat(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int olddir, newdir, flags;
    if (get_int(ctx, argc, argv, 0, "linkat", &olddir) || get_int(ctx, argc, argv, 2, "linkat", &newdir) ||
        get_int(ctx, argc, argv, 4, "linkat", &flags))
        return JS_EXCEPTION;
    const char *a = get_str(ctx, argc, argv, 1, "linkat");
    if (!a)
        return JS_EXCEPTION;
    const char *b = get_str(ctx, argc, argv, 3, "linkat");
    if (!b) {
        JS_FreeCString(ctx, a);
        return JS_EXCEPTION;
    }
    JSValue v = linkat(olddir, a, newdir, b, flags) != 0 ? throw_errno(ctx, "linkat %s at %s", a, b) : JS_UNDEFINED;
    JS_FreeCString(ctx, a);
    JS_FreeCString(ctx, b);
    return v;
}

/* fstatat(dirfd, path, flags) */
static JSValue sys_fstatat(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int dirfd, flags;
    if (get_int(ctx, argc, argv, 0, "fstatat", &dirfd) || get_int(ctx, argc, argv, 2, "fstatat", &flags))
        return JS_EXCEPTION;
    const char *path = get_str(ctx, argc, argv, 1, "fstatat");
    if (!path)
        return JS_EXCEPTION;
    struct stat st;
    JSValue v = fstatat(dirfd, path, &st, flags) != 0 ? throw_errno(ctx, "fstatat %s", path) : stat_object(ctx, &st);
    JS_FreeCString(ctx, path);
    return v;
}

/* utimensatAt(dirfd, path, sec, nsec, flags): atime and mtime both set to sec.nsec. */
static JSValue sys_utimensat_at(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int dirfd, flags;
    int64_t sec, nsec;
    if (get_int(ctx, argc, argv, 0, "utimensatAt", &dirfd) || get_int64(ctx, argc, argv, 2, "utimensatAt", &sec) ||
        get_int64(ctx, argc, argv, 3, "utimensatAt", &nsec) || get_int(ctx, argc, argv, 4, "utimensatAt", &flags))
        return JS_EXCEPTION;
    if (nsec < 0 || nsec > 999999999)
        return JS_ThrowRangeError(ctx, "sys.utimensatAt: nanoseconds out of range: %lld", (long long)nsec);
    const char *path = get_str(ctx, argc, argv, 1, "utimensatAt");
    if (!path)
        return JS_EXCEPTION;
    struct timespec ts[2] = { { (time_t)sec, (long)nsec }, { (time_t)sec, (long)nsec } };
    JSValue v = utimensat(dirfd, path, ts, flags) != 0 ? throw_errno(ctx, "utimensat %s", path) : JS_UNDEFINED;
    JS_FreeCString(ctx, path);
    return v;
}

/* ------------------------------------------------------------ mounts and roots ----- */

/* mount(source, target, fstype, flags, data): source, fstype and data may be null. */
static JSValue sys_mount(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int64_t flags;
    const char *src = NULL, *target = NULL, *type = NULL, *data = NULL;
    JSValue v = JS_EXCEPTION;
    if (get_int64(ctx, argc, argv, 3, "mount", &flags))
        return JS_EXCEPTION;
    if (get_str_or_null(ctx, argc, argv, 0, "mount", &src) ||
        !(target = get_str(ctx, argc, argv, 1, "mount")) ||
        get_str_or_null(ctx, argc, argv, 2, "mount", &type) ||
        get_str_or_null(ctx, argc, argv, 4, "mount", &data))
        goto done;
    if (mount(src, target, type && *type ? type : NULL, (unsigned long)flags, data && *data ? data : NULL) != 0)
        v = throw_errno(ctx, "mount %s on %s (%s)", src ? src : "none", target, type && *type ? type : "-");
    else
        v = JS_UNDEFINED;
done:
    JS_FreeCString(ctx, src);
    JS_FreeCString(ctx, target);
    JS_FreeCString(ctx, type);
    JS_FreeCString(ctx, data);
    return v;
}

static JSValue sys_umount2(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int flags;
    if (get_int_opt(ctx, argc, argv, 1, "umount2", 0, &flags))
        return JS_EXCEPTION;
    const char *target = get_str(ctx, argc, argv, 0, "umount2");
    if (!target)
        return JS_EXCEPTION;
    JSValue v = umount2(target, flags) != 0 ? throw_errno(ctx, "umount %s", target) : JS_UNDEFINED;
    JS_FreeCString(ctx, target);
    return v;
}

/* --------------------------------------------------------------------- modules ----- */

static JSValue sys_finit_module(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd, flags;
    if (get_int(ctx, argc, argv, 0, "finitModule", &fd) || get_int_opt(ctx, argc, argv, 2, "finitModule", 0, &flags))
        return JS_EXCEPTION;
    const char *params = "";
    if (!JS_IsUndefined(arg(argc, argv, 1)) && !(params = get_str(ctx, argc, argv, 1, "finitModule")))
        return JS_EXCEPTION;
    long r = syscall(SYS_finit_module, fd, params, flags);
    JSValue v = r != 0 ? throw_errno(ctx, "finit_module fd %d", fd) : JS_UNDEFINED;
    if (!JS_IsUndefined(arg(argc, argv, 1)))
        JS_FreeCString(ctx, params);
    return v;
}

/* ------------------------------------------------------------------- processes ----- */

static JSValue sys_getpid(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    return JS_NewInt32(ctx, getpid());
}

static JSValue sys_execve(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    char **av = get_strv(ctx, argc, argv, 1, "execve");
    if (!av)
        return JS_EXCEPTION;
    char **ev = get_strv(ctx, argc, argv, 2, "execve");
    const char *path = ev ? get_str(ctx, argc, argv, 0, "execve") : NULL;
    JSValue v = JS_EXCEPTION;
    if (path) {
        execve(path, av, ev);
        v = throw_errno(ctx, "execve %s", path);
        JS_FreeCString(ctx, path);
    }
    free_strv(av);
    free_strv(ev);
    return v;
}

/* Reads a boolean property of an options object (absent: false). */
static int opt_bool(JSContext *ctx, JSValueConst opts, const char *name)
{
    if (!JS_IsObject(opts))
        return 0;
    JSValue v = JS_GetPropertyStr(ctx, opts, name);
    int b = JS_ToBool(ctx, v);
    JS_FreeValue(ctx, v);
    return b > 0;
}

/* spawn(path, argv, envp, {stdio?: [in, out, err], setsid?, ctty?}) → pid.
 * The child gets the given fds as 0, 1, 2, every other fd closed, optionally a new
 * session with fd 0 as its controlling tty, then execve. When execve fails the child
 * reports errno through a close-on-exec pipe and _exits 127; the parent reaps it and
 * throws, so a missing program is an exception here, not a silent exit status. */
static JSValue sys_spawn(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    JSValueConst opts = arg(argc, argv, 3);
    int stdio[3] = { 0, 1, 2 };
    int has_stdio = 0;
    if (!JS_IsUndefined(opts) && !JS_IsNull(opts) && !JS_IsObject(opts))
        return JS_ThrowTypeError(ctx, "sys.spawn: argument 4 must be an object");
    if (JS_IsObject(opts)) {
        JSValue s = JS_GetPropertyStr(ctx, opts, "stdio");
        if (!JS_IsUndefined(s)) {
            int64_t n;
            if (!JS_IsArray(ctx, s) || array_length(ctx, s, &n) < 0 || n != 3) {
                JS_FreeValue(ctx, s);
                return JS_ThrowTypeError(ctx, "sys.spawn: stdio must be an array of 3 fds");
            }
            for (int i = 0; i < 3; i++) {
                JSValue e = JS_GetPropertyUint32(ctx, s, (uint32_t)i);
                int ok = JS_IsNumber(e) && JS_ToInt32(ctx, &stdio[i], e) == 0 && stdio[i] >= 0;
                JS_FreeValue(ctx, e);
                if (!ok) {
                    JS_FreeValue(ctx, s);
                    return JS_ThrowTypeError(ctx, "sys.spawn: stdio[%d] must be an fd", i);
                }
            }
            has_stdio = 1;
        }
        JS_FreeValue(ctx, s);
    }
    int want_setsid = opt_bool(ctx, opts, "setsid"), want_ctty = opt_bool(ctx, opts, "ctty");
    char **av = get_strv(ctx, argc, argv, 1, "spawn");
    if (!av)
        return JS_EXCEPTION;
    char **ev = get_strv(ctx, argc, argv, 2, "spawn");
    const char *path = ev ? get_str(ctx, argc, argv, 0, "spawn") : NULL;
    JSValue v = JS_EXCEPTION;
    if (!path)
        goto out;

    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) {
        v = throw_errno(ctx, "spawn %s (pipe)", path);
        goto out;
    }
    /* Keep the report pipe above the fds the child rearranges. */
    int rp = fcntl(p[1], F_DUPFD_CLOEXEC, 10);
    close(p[1]);
    pid_t pid = rp < 0 ? -1 : fork();
    if (pid == 0) {
        int e = 0;
        if (want_setsid && setsid() < 0)
            e = errno;
        if (!e && has_stdio) {
            int tmp[3];
            for (int i = 0; i < 3 && !e; i++)
                if ((tmp[i] = fcntl(stdio[i], F_DUPFD_CLOEXEC, 10)) < 0)
                    e = errno;
            for (int i = 0; i < 3 && !e; i++)
                if (dup2(tmp[i], i) < 0)
                    e = errno;
        }
        if (!e && want_ctty && ioctl(0, TIOCSCTTY, 1) < 0)
            e = errno;
        if (!e) {
            close_fds_from(3, rp);
            sigset_t all;
            sigemptyset(&all);
            sigprocmask(SIG_SETMASK, &all, NULL);
            execve(path, av, ev);
            e = errno;
        }
        write(rp, &e, sizeof(e));
        _exit(127);
    }
    int fork_errno = errno;
    if (rp >= 0)
        close(rp);
    if (pid < 0) {
        close(p[0]);
        errno = fork_errno;
        v = throw_errno(ctx, "spawn %s", path);
        goto out;
    }
    int child_errno = 0;
    ssize_t n;
    do n = read(p[0], &child_errno, sizeof(child_errno)); while (n < 0 && errno == EINTR);
    close(p[0]);
    if (n == (ssize_t)sizeof(child_errno)) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        errno = child_errno;
        v = throw_errno(ctx, "spawn %s", path);
    } else {
        v = JS_NewInt32(ctx, pid);
    }
out:
    if (path)
        JS_FreeCString(ctx, path);
    free_strv(av);
    free_strv(ev);
    return v;
}

/* fork() → the child's pid in the parent, 0 in the child. The child runs the same
 * script from here on and must end with _exit (or exit). */
static JSValue sys_fork(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    pid_t pid = fork();
    if (pid < 0)
        return throw_errno(ctx, "fork");
    return JS_NewInt32(ctx, pid);
}

static JSValue sys_waitpid(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int pid, flags, status = 0;
    if (get_int(ctx, argc, argv, 0, "waitpid", &pid) || get_int_opt(ctx, argc, argv, 1, "waitpid", 0, &flags))
        return JS_EXCEPTION;
    pid_t r;
    do r = waitpid(pid, &status, flags); while (r < 0 && errno == EINTR);
    if (r < 0)
        return throw_errno(ctx, "waitpid %d", pid);
    JSValue o = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, o, "pid", JS_NewInt32(ctx, r));
    JS_SetPropertyStr(ctx, o, "status", JS_NewInt32(ctx, status));
    JS_SetPropertyStr(ctx, o, "exitCode", JS_NewInt32(ctx, r > 0 && WIFEXITED(status) ? WEXITSTATUS(status) : -1));
    JS_SetPropertyStr(ctx, o, "termSignal", JS_NewInt32(ctx, r > 0 && WIFSIGNALED(status) ? WTERMSIG(status) : 0));
    return o;
}

static JSValue sys_kill(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int pid, sig;
    if (get_int(ctx, argc, argv, 0, "kill", &pid) || get_int(ctx, argc, argv, 1, "kill", &sig))
        return JS_EXCEPTION;
    if (kill(pid, sig) != 0)
        return throw_errno(ctx, "kill %d signal %d", pid, sig);
    return JS_UNDEFINED;
}

/* magic 0: exit (the host's own exit), 1: _exit. PID 1 never exits: it starts the
 * rescue shell instead. */
static JSValue sys_exit(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    int code;
    if (get_int_opt(ctx, argc, argv, 0, magic ? "_exit" : "exit", 0, &code))
        return JS_EXCEPTION;
    if (getpid() == 1) {
        char msg[128];
        snprintf(msg, sizeof(msg), "the init script called exit(%d), but PID 1 must not exit", code);
        rescue(msg);
    }
    if (magic)
        _exit(code);
    exit(code);
}

static JSValue sys_dup2(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int a, b;
    if (get_int(ctx, argc, argv, 0, "dup2", &a) || get_int(ctx, argc, argv, 1, "dup2", &b))
        return JS_EXCEPTION;
    if (dup2(a, b) < 0)
        return throw_errno(ctx, "dup2 %d to %d", a, b);
    return JS_NewInt32(ctx, b);
}

/* umask(mask) → the previous mask (the kernel starts init with 022). */
static JSValue sys_umask(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int mask;
    if (get_int(ctx, argc, argv, 0, "umask", &mask))
        return JS_EXCEPTION;
    return JS_NewInt32(ctx, (int)umask((mode_t)(mask & 0777)));
}

/* setpriority(PRIO_PROCESS, 0, nice): this process's nice value (-20..19). */
static JSValue sys_nice(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int value;
    if (get_int(ctx, argc, argv, 0, "nice", &value))
        return JS_EXCEPTION;
    if (setpriority(PRIO_PROCESS, 0, value) != 0)
        return throw_errno(ctx, "setpriority");
    return JS_UNDEFINED;
}

static JSValue sys_pipe(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0)
        return throw_errno(ctx, "pipe");
    JSValue a = JS_NewArray(ctx);
    JS_SetPropertyUint32(ctx, a, 0, JS_NewInt32(ctx, p[0]));
    JS_SetPropertyUint32(ctx, a, 1, JS_NewInt32(ctx, p[1]));
    return a;
}

/* memfdCreate(name, flags) → fd: memfd_create(2), an anonymous file in memory (flags:
 * MFD_CLOEXEC = 1, …). A decompressor writes a module into one; the kernel loads it. */
static JSValue sys_memfd_create(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int flags;
    const char *name = get_str(ctx, argc, argv, 0, "memfdCreate");
    if (!name)
        return JS_EXCEPTION;
    if (get_int_opt(ctx, argc, argv, 1, "memfdCreate", 0, &flags)) {
        JS_FreeCString(ctx, name);
        return JS_EXCEPTION;
    }
    long fd = syscall(SYS_memfd_create, name, (unsigned int)flags);
    JSValue v = fd < 0 ? throw_errno(ctx, "memfd_create %s", name) : JS_NewInt32(ctx, (int)fd);
    JS_FreeCString(ctx, name);
    return v;
}

/* -------------------------------------------------------------- events and time ---- */

/* A NETLINK_KOBJECT_UEVENT socket (non-blocking, close-on-exec) bound to the kernel's
 * uevent multicast group, with a large receive buffer so a burst of coldplug events
 * is not dropped. read() on it throws EAGAIN when nothing is queued: poll first. */
static JSValue sys_uevent_socket(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_KOBJECT_UEVENT);
    if (fd < 0)
        return throw_errno(ctx, "socket NETLINK_KOBJECT_UEVENT");
    int size = 16 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    struct sockaddr_nl sa;
    memset(&sa, 0, sizeof(sa));
    sa.nl_family = AF_NETLINK;
    sa.nl_groups = 1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        JSValue e = throw_errno(ctx, "bind uevent socket");
        close(fd);
        return e;
    }
    return JS_NewInt32(ctx, fd);
}

/* socket(domain, type, protocol): close-on-exec is added. A TCP socket for a network
 * root's server (AF_INET/AF_INET6), a netlink socket for the kernel's nbd and routing
 * families (AF_NETLINK with NETLINK_GENERIC or NETLINK_ROUTE). */
static JSValue sys_socket(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int domain, type, protocol;
    if (get_int(ctx, argc, argv, 0, "socket", &domain) || get_int(ctx, argc, argv, 1, "socket", &type) ||
        get_int(ctx, argc, argv, 2, "socket", &protocol))
        return JS_EXCEPTION;
    int fd = socket(domain, type | SOCK_CLOEXEC, protocol);
    if (fd < 0)
        return throw_errno(ctx, "socket domain %d type %d", domain, type);
    return JS_NewInt32(ctx, fd);
}

/* connect(fd, sockaddr bytes, timeoutMs): the socket is made non-blocking for the
 * connect, waited for at most timeoutMs (ETIMEDOUT after), and left as it was. */
static JSValue sys_connect(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd, timeout;
    uint8_t *addr;
    size_t len;
    if (get_int(ctx, argc, argv, 0, "connect", &fd) || get_bytes(ctx, argc, argv, 1, "connect", &addr, &len) ||
        get_int(ctx, argc, argv, 2, "connect", &timeout))
        return JS_EXCEPTION;
    if (len < sizeof(sa_family_t) || len > sizeof(struct sockaddr_storage))
        return JS_ThrowRangeError(ctx, "connect: the address is %zu bytes long", len);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return throw_errno(ctx, "connect fd %d", fd);
    int r = connect(fd, (struct sockaddr *)addr, (socklen_t)len);
    if (r < 0 && errno == EINPROGRESS) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        int n;
        do
            n = poll(&p, 1, timeout);
        while (n < 0 && errno == EINTR);
        if (n == 0) {
            errno = ETIMEDOUT;
            r = -1;
        } else if (n > 0) {
            int err = 0;
            socklen_t el = sizeof(err);
            if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
                err = errno;
            errno = err;
            r = err ? -1 : 0;
        } else
            r = -1;
    }
    int saved = errno;
    fcntl(fd, F_SETFL, flags);
    errno = saved;
    if (r < 0)
        return throw_errno(ctx, "connect fd %d", fd);
    return JS_UNDEFINED;
}

/* setsockopt(fd, level, name, value bytes): a netlink socket joins a generic netlink
 * family's multicast group (SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, the group id). */
static JSValue sys_setsockopt(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int fd, level, name;
    uint8_t *value;
    size_t len;
    if (get_int(ctx, argc, argv, 0, "setsockopt", &fd) || get_int(ctx, argc, argv, 1, "setsockopt", &level) ||
        get_int(ctx, argc, argv, 2, "setsockopt", &name) || get_bytes(ctx, argc, argv, 3, "setsockopt", &value, &len))
        return JS_EXCEPTION;
    if (len > 256)
        return JS_ThrowRangeError(ctx, "setsockopt: the value is %zu bytes long", len);
    if (setsockopt(fd, level, name, value, (socklen_t)len) != 0)
        return throw_errno(ctx, "setsockopt fd %d level %d option %d", fd, level, name);
    return JS_UNDEFINED;
}

/* poll([{fd, events}], timeoutMs) → revents per entry. Interrupted by a signal: all 0. */
static JSValue sys_poll(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    JSValueConst list = arg(argc, argv, 0);
    int64_t n;
    int timeout;
    if (!JS_IsArray(ctx, list))
        return JS_ThrowTypeError(ctx, "sys.poll: argument 1 must be an array of {fd, events}");
    if (array_length(ctx, list, &n) < 0)
        return JS_EXCEPTION;
    if (n > 4096)
        return JS_ThrowRangeError(ctx, "sys.poll: %lld fds is too many", (long long)n);
    if (get_int(ctx, argc, argv, 1, "poll", &timeout))
        return JS_EXCEPTION;
    struct pollfd fds[n ? n : 1];
    for (int64_t i = 0; i < n; i++) {
        JSValue e = JS_GetPropertyUint32(ctx, list, (uint32_t)i);
        JSValue fd = JS_GetPropertyStr(ctx, e, "fd"), ev = JS_GetPropertyStr(ctx, e, "events");
        int ok = JS_IsNumber(fd) && JS_IsNumber(ev) && JS_ToInt32(ctx, &fds[i].fd, fd) == 0;
        int32_t events = 0;
        ok = ok && JS_ToInt32(ctx, &events, ev) == 0;
        fds[i].events = (short)events;
        fds[i].revents = 0;
        JS_FreeValue(ctx, fd);
        JS_FreeValue(ctx, ev);
        JS_FreeValue(ctx, e);
        if (!ok)
            return JS_ThrowTypeError(ctx, "sys.poll: entry %lld must be {fd: number, events: number}", (long long)i);
    }
    int r = poll(fds, (nfds_t)n, timeout);
    if (r < 0 && errno != EINTR)
        return throw_errno(ctx, "poll");
    JSValue out = JS_NewArray(ctx);
    for (int64_t i = 0; i < n; i++)
        JS_SetPropertyUint32(ctx, out, (uint32_t)i, JS_NewInt32(ctx, r < 0 ? 0 : fds[i].revents));
    return out;
}

/* magic 0: CLOCK_MONOTONIC in ms, 1: CLOCK_BOOTTIME in s (both with fractions) */
static JSValue sys_clock(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    struct timespec ts;
    clock_gettime(magic ? CLOCK_BOOTTIME : CLOCK_MONOTONIC, &ts);
    if (magic)
        return JS_NewFloat64(ctx, (double)ts.tv_sec + ts.tv_nsec / 1e9);
    return JS_NewFloat64(ctx, (double)ts.tv_sec * 1e3 + ts.tv_nsec / 1e6);
}

static JSValue sys_sleep_ms(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    double ms;
    if (!JS_IsNumber(arg(argc, argv, 0)) || JS_ToFloat64(ctx, &ms, argv[0]) < 0)
        return JS_ThrowTypeError(ctx, "sys.sleepMs: argument 1 must be a number");
    if (!(ms > 0))
        return JS_UNDEFINED;
    if (ms > 1e12)
        ms = 1e12; /* about 30 years: forever, without overflowing time_t arithmetic */
    struct timespec ts = { (time_t)(ms / 1000), (long)((ms - (double)(time_t)(ms / 1000) * 1000) * 1e6) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
    return JS_UNDEFINED;
}

/* --------------------------------------------------------------------- the end ----- */

static JSValue sys_sync(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    sync();
    return JS_UNDEFINED;
}

/* kexec_file_load(kernel_fd, initrd_fd, cmdline, flags): the kernel reads both files and
   checks the kernel's signature where its policy asks; initrd_fd -1 means none. */
static JSValue sys_kexec_file_load(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int kernel_fd, initrd_fd, flags;
    if (get_int(ctx, argc, argv, 0, "kexecFileLoad", &kernel_fd) || get_int(ctx, argc, argv, 1, "kexecFileLoad", &initrd_fd) ||
        get_int_opt(ctx, argc, argv, 3, "kexecFileLoad", 0, &flags))
        return JS_EXCEPTION;
    const char *cmdline = get_str(ctx, argc, argv, 2, "kexecFileLoad");
    if (!cmdline)
        return JS_EXCEPTION;
    unsigned long f = (unsigned long)(unsigned)flags;
    if (initrd_fd < 0)
        f |= 0x4; /* KEXEC_FILE_NO_INITRAMFS */
    long r = syscall(SYS_kexec_file_load, kernel_fd, initrd_fd < 0 ? -1 : initrd_fd, strlen(cmdline) + 1, cmdline, f);
    JSValue v = r != 0 ? throw_errno(ctx, "kexec_file_load fd %d", kernel_fd) : JS_UNDEFINED;
    JS_FreeCString(ctx, cmdline);
    return v;
}

static JSValue sys_reboot(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    int64_t cmd;
    if (get_int64(ctx, argc, argv, 0, "reboot", &cmd))
        return JS_EXCEPTION;
    reboot((int)(uint32_t)cmd);
    return throw_errno(ctx, "reboot 0x%llx", (unsigned long long)(uint32_t)cmd);
}

/* ------------------------------------------------------------ debugging, misc ------ */

/* UTF-8 bytes as a string, invalid sequences as U+FFFD (QuickJS's own decoder): the
   interpreter turns megabytes of text (a kernel's modules.alias) into a string far more
   slowly, and under emulation that shows. A codec over a buffer, no file format. */
/* byteSum(bytes): the sum of the bytes as unsigned numbers (tar header checksums: in the
 * interpreter a 512-byte header's sum cost about 44,000 instructions, a third of reading a
 * header; here a few hundred). */
static JSValue sys_byte_sum(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    uint8_t *p;
    size_t len;
    if (get_bytes(ctx, argc, argv, 0, "byteSum", &p, &len))
        return JS_EXCEPTION;
    /* Eight bytes at a time in 16-bit lanes (each lane gains at most 510 per word: flushed
     * every 128 words, before it can overflow), then the bytes left over. */
    const uint64_t M = 0x00ff00ff00ff00ffULL;
    uint64_t sum = 0, lanes = 0;
    size_t i = 0, n = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        lanes += (w & M) + ((w >> 8) & M);
        if (++n == 128) {
            sum += (lanes & 0xffff) + ((lanes >> 16) & 0xffff) + ((lanes >> 32) & 0xffff) + (lanes >> 48);
            lanes = 0;
            n = 0;
        }
    }
    sum += (lanes & 0xffff) + ((lanes >> 16) & 0xffff) + ((lanes >> 32) & 0xffff) + (lanes >> 48);
    for (; i < len; i++)
        sum += p[i];
    return JS_NewInt64(ctx, (int64_t)sum);
}

static JSValue sys_utf8_decode(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    uint8_t *p;
    size_t n;
    if (get_bytes(ctx, argc, argv, 0, "utf8Decode", &p, &n))
        return JS_EXCEPTION;
    return JS_NewStringLen(ctx, (const char *)(p ? p : (uint8_t *)""), n);
}

/* Writes the arguments, separated by spaces, and a newline to fd (magic). */
static JSValue sys_print(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv, int magic)
{
    for (int i = 0; i < argc; i++) {
        size_t len;
        const char *s = JS_ToCStringLen(ctx, &len, argv[i]);
        if (!s)
            return JS_EXCEPTION;
        if (i)
            write_all(magic, " ", 1);
        write_all(magic, s, len);
        JS_FreeCString(ctx, s);
    }
    write_all(magic, "\n", 1);
    return JS_UNDEFINED;
}

static JSValue sys_uname(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    struct utsname u;
    if (uname(&u) != 0)
        return throw_errno(ctx, "uname");
    JSValue o = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, o, "sysname", JS_NewString(ctx, u.sysname));
    JS_SetPropertyStr(ctx, o, "nodename", JS_NewString(ctx, u.nodename));
    JS_SetPropertyStr(ctx, o, "release", JS_NewString(ctx, u.release));
    JS_SetPropertyStr(ctx, o, "version", JS_NewString(ctx, u.version));
    JS_SetPropertyStr(ctx, o, "machine", JS_NewString(ctx, u.machine));
    return o;
}

/* setErrorFactory((code, errno, call) => Error): how syscall failures are thrown. */
static JSValue sys_set_error_factory(JSContext *ctx, JSValueConst this_val, int argc, JSValueConst *argv)
{
    JSValueConst f = arg(argc, argv, 0);
    if (!JS_IsFunction(ctx, f) && !JS_IsUndefined(f))
        return JS_ThrowTypeError(ctx, "sys.setErrorFactory: argument 1 must be a function");
    JS_FreeValue(ctx, error_factory);
    error_factory = JS_DupValue(ctx, f);
    return JS_UNDEFINED;
}

static const JSCFunctionListEntry sys_funcs[] = {
    JS_CFUNC_DEF("open", 3, sys_open),
    JS_CFUNC_DEF("close", 1, sys_close),
    JS_CFUNC_MAGIC_DEF("pread", 3, sys_rw, 0),
    JS_CFUNC_MAGIC_DEF("pwrite", 3, sys_rw, 1),
    JS_CFUNC_MAGIC_DEF("read", 2, sys_rw, 2),
    JS_CFUNC_MAGIC_DEF("write", 2, sys_rw, 3),
    JS_CFUNC_DEF("ioctl", 3, sys_ioctl),
    JS_CFUNC_DEF("sendfile", 4, sys_sendfile),
    JS_CFUNC_DEF("splice", 6, sys_splice),
    JS_CFUNC_DEF("fcntl", 3, sys_fcntl),
    JS_CFUNC_DEF("fadvise", 4, sys_fadvise),
    JS_CFUNC_DEF("ioctlInt", 3, sys_ioctl_int),
    JS_CFUNC_DEF("fsync", 1, sys_fsync),
    JS_CFUNC_DEF("truncate", 2, sys_truncate),
    JS_CFUNC_MAGIC_DEF("stat", 1, sys_stat, 0),
    JS_CFUNC_MAGIC_DEF("lstat", 1, sys_stat, 1),
    JS_CFUNC_DEF("statfs", 1, sys_statfs),
    JS_CFUNC_DEF("readdir", 1, sys_readdir),
    JS_CFUNC_DEF("readlink", 1, sys_readlink),
    JS_CFUNC_MAGIC_DEF("mkdir", 2, sys_path_op, 0),
    JS_CFUNC_MAGIC_DEF("rmdir", 1, sys_path_op, 1),
    JS_CFUNC_MAGIC_DEF("unlink", 1, sys_path_op, 2),
    JS_CFUNC_MAGIC_DEF("chmod", 2, sys_path_op, 3),
    JS_CFUNC_MAGIC_DEF("chdir", 1, sys_path_op, 4),
    JS_CFUNC_MAGIC_DEF("chroot", 1, sys_path_op, 5),
    JS_CFUNC_MAGIC_DEF("symlink", 2, sys_two_paths, 0),
    JS_CFUNC_MAGIC_DEF("link", 2, sys_two_paths, 1),
    JS_CFUNC_MAGIC_DEF("rename", 2, sys_two_paths, 2),
    JS_CFUNC_MAGIC_DEF("pivotRoot", 2, sys_two_paths, 3),
    JS_CFUNC_DEF("mknod", 4, sys_mknod),
    JS_CFUNC_DEF("lchown", 3, sys_lchown),
    JS_CFUNC_DEF("utimensat", 4, sys_utimensat),
    JS_CFUNC_DEF("lsetxattr", 3, sys_lsetxattr),
    JS_CFUNC_DEF("openat", 4, sys_openat),
    JS_CFUNC_DEF("openat2", 5, sys_openat2),
    JS_CFUNC_MAGIC_DEF("mkdirat", 3, sys_at_op, 0),
    JS_CFUNC_MAGIC_DEF("unlinkat", 3, sys_at_op, 1),
    JS_CFUNC_MAGIC_DEF("fchmodat", 3, sys_at_op, 2),
    JS_CFUNC_MAGIC_DEF("mknodat", 5, sys_at_op, 3),
    JS_CFUNC_MAGIC_DEF("fchownat", 5, sys_at_op, 4),
    JS_CFUNC_DEF("symlinkat", 3, sys_symlinkat),
    JS_CFUNC_DEF("linkat", 5, sys_linkat),
    JS_CFUNC_DEF("fstatat", 3, sys_fstatat),
    JS_CFUNC_DEF("utimensatAt", 5, sys_utimensat_at),
    JS_CFUNC_DEF("mount", 5, sys_mount),
    JS_CFUNC_DEF("umount2", 2, sys_umount2),
    JS_CFUNC_DEF("finitModule", 3, sys_finit_module),
    JS_CFUNC_DEF("getpid", 0, sys_getpid),
    JS_CFUNC_DEF("execve", 3, sys_execve),
    JS_CFUNC_DEF("spawn", 4, sys_spawn),
    JS_CFUNC_DEF("fork", 0, sys_fork),
    JS_CFUNC_DEF("waitpid", 2, sys_waitpid),
    JS_CFUNC_DEF("kill", 2, sys_kill),
    JS_CFUNC_MAGIC_DEF("exit", 1, sys_exit, 0),
    JS_CFUNC_MAGIC_DEF("_exit", 1, sys_exit, 1),
    JS_CFUNC_DEF("dup2", 2, sys_dup2),
    JS_CFUNC_DEF("pipe", 0, sys_pipe),
    JS_CFUNC_DEF("memfdCreate", 2, sys_memfd_create),
    JS_CFUNC_DEF("umask", 1, sys_umask),
    JS_CFUNC_DEF("nice", 1, sys_nice),
    JS_CFUNC_DEF("ueventSocket", 0, sys_uevent_socket),
    JS_CFUNC_DEF("socket", 3, sys_socket),
    JS_CFUNC_DEF("connect", 3, sys_connect),
    JS_CFUNC_DEF("setsockopt", 4, sys_setsockopt),
    JS_CFUNC_DEF("poll", 2, sys_poll),
    JS_CFUNC_MAGIC_DEF("monotonicMs", 0, sys_clock, 0),
    JS_CFUNC_MAGIC_DEF("uptimeSec", 0, sys_clock, 1),
    JS_CFUNC_DEF("sleepMs", 1, sys_sleep_ms),
    JS_CFUNC_DEF("sync", 0, sys_sync),
    JS_CFUNC_DEF("reboot", 1, sys_reboot),
    JS_CFUNC_DEF("kexecFileLoad", 4, sys_kexec_file_load),
    JS_CFUNC_MAGIC_DEF("print", 1, sys_print, 1),
    JS_CFUNC_MAGIC_DEF("printErr", 1, sys_print, 2),
    JS_CFUNC_DEF("uname", 0, sys_uname),
    JS_CFUNC_DEF("utf8Decode", 1, sys_utf8_decode),
    JS_CFUNC_DEF("byteSum", 1, sys_byte_sum),
    JS_CFUNC_DEF("setErrorFactory", 1, sys_set_error_factory),
};

static JSValue string_array(JSContext *ctx, char **v, int n)
{
    JSValue a = JS_NewArray(ctx);
    for (int i = 0; v && (n < 0 ? v[i] != NULL : i < n); i++)
        JS_SetPropertyUint32(ctx, a, (uint32_t)i, JS_NewString(ctx, v[i]));
    return a;
}

static int sys_module_init(JSContext *ctx, JSModuleDef *m)
{
    JS_SetModuleExport(ctx, m, "args", string_array(ctx, host_argv, host_argc));
    JS_SetModuleExport(ctx, m, "env", string_array(ctx, host_envp, -1));
    return JS_SetModuleExportList(ctx, m, sys_funcs, countof(sys_funcs));
}

/* ------------------------------------------------------------ running the script --- */

static JSModuleDef *module_loader(JSContext *ctx, const char *name, void *opaque)
{
    JS_ThrowReferenceError(ctx, "module '%s' is not built into vdboot's init (only 'sys' is)", name);
    return NULL;
}

/* Unhandled promise rejections, remembered until they are handled or the script ends. */
#define MAX_UNHANDLED 8
static JSValue unhandled[MAX_UNHANDLED][2];
static int unhandled_count;

static void rejection_tracker(JSContext *ctx, JSValueConst promise, JSValueConst reason, JS_BOOL is_handled, void *opaque)
{
    if (is_handled) {
        for (int i = 0; i < unhandled_count; i++) {
            if (JS_VALUE_GET_PTR(unhandled[i][0]) == JS_VALUE_GET_PTR(promise)) {
                JS_FreeValue(ctx, unhandled[i][0]);
                JS_FreeValue(ctx, unhandled[i][1]);
                unhandled[i][0] = unhandled[unhandled_count - 1][0];
                unhandled[i][1] = unhandled[unhandled_count - 1][1];
                unhandled_count--;
                return;
            }
        }
    } else if (unhandled_count < MAX_UNHANDLED) {
        unhandled[unhandled_count][0] = JS_DupValue(ctx, promise);
        unhandled[unhandled_count][1] = JS_DupValue(ctx, reason);
        unhandled_count++;
    }
}

/* "vdboot: <what>: <error>\n<stack>" on fd 2 and the console. */
static void report_exception(JSContext *ctx, const char *what, JSValueConst exc)
{
    char buf[8192];
    const char *s = JS_ToCString(ctx, exc);
    if (!s) {
        JS_FreeValue(ctx, JS_GetException(ctx));
    }
    int n = snprintf(buf, sizeof(buf), "vdboot: %s: %s\n", what, s ? s : "(an exception that cannot be printed)");
    if (s)
        JS_FreeCString(ctx, s);
    if (JS_IsObject(exc)) {
        JSValue st = JS_GetPropertyStr(ctx, exc, "stack");
        if (JS_IsString(st)) {
            const char *t = JS_ToCString(ctx, st);
            if (t && n >= 0 && (size_t)n < sizeof(buf))
                snprintf(buf + n, sizeof(buf) - (size_t)n, "%s", t);
            if (t)
                JS_FreeCString(ctx, t);
        }
        JS_FreeValue(ctx, st);
    }
    report(buf);
}

/* The end of the script, one way or another (why: NULL when the error was already
 * reported). PID 1 goes to the rescue shell; anything else (a test run, a forked child)
 * exits. */
static _Noreturn void script_ended(const char *why, int code)
{
    if (getpid() == 1)
        rescue(why);
    if (why) {
        char msg[512];
        snprintf(msg, sizeof(msg), "vdboot: %s\n", why);
        report(msg);
    }
    exit(code);
}

/* Runs queued promise jobs until none is left; errors of single jobs are reported. */
static void run_jobs(JSRuntime *rt)
{
    JSContext *c;
    int r;
    while ((r = JS_ExecutePendingJob(rt, &c)) != 0) {
        if (r < 0) {
            JSValue e = JS_GetException(c);
            report_exception(c, "error in a promise job", e);
            JS_FreeValue(c, e);
        }
    }
}

int main(int argc, char **argv, char **envp)
{
    host_pid = getpid();
    host_argc = argc;
    host_argv = argv;
    host_envp = envp;
    ensure_stdio();

    JSRuntime *rt = JS_NewRuntime();
    JSContext *ctx = rt ? JS_NewContext(rt) : NULL;
    if (!ctx)
        script_ended("cannot create the JavaScript runtime (out of memory)", 1);
    JS_SetMaxStackSize(rt, 4 << 20);
    JS_SetModuleLoaderFunc(rt, NULL, module_loader, NULL);
    JS_SetHostPromiseRejectionTracker(rt, rejection_tracker, NULL);
    error_factory = JS_UNDEFINED;

    /* console.log / console.error for debugging, like the `print` of qjs. */
    JSValue global = JS_GetGlobalObject(ctx);
    JSValue console = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, console, "log", JS_NewCFunctionMagic(ctx, sys_print, "log", 1, JS_CFUNC_generic_magic, 1));
    JS_SetPropertyStr(ctx, console, "info", JS_NewCFunctionMagic(ctx, sys_print, "info", 1, JS_CFUNC_generic_magic, 1));
    JS_SetPropertyStr(ctx, console, "warn", JS_NewCFunctionMagic(ctx, sys_print, "warn", 1, JS_CFUNC_generic_magic, 2));
    JS_SetPropertyStr(ctx, console, "error", JS_NewCFunctionMagic(ctx, sys_print, "error", 1, JS_CFUNC_generic_magic, 2));
    JS_SetPropertyStr(ctx, global, "console", console);
    JS_FreeValue(ctx, global);

    JSModuleDef *m = JS_NewCModule(ctx, "sys", sys_module_init);
    if (!m || JS_AddModuleExport(ctx, m, "args") || JS_AddModuleExport(ctx, m, "env") ||
        JS_AddModuleExportList(ctx, m, sys_funcs, countof(sys_funcs)))
        script_ended("cannot create the native module 'sys'", 1);

    JSValue val, obj = JS_ReadObject(ctx, vdboot_init_bytecode, vdboot_init_bytecode_size, JS_READ_OBJ_BYTECODE);
    if (JS_IsException(obj) || JS_ResolveModule(ctx, obj) < 0) {
        JSValue e = JS_GetException(ctx);
        report_exception(ctx, "cannot load the init script", e);
        script_ended(NULL, 1);
    }
    val = JS_EvalFunction(ctx, obj);
    if (JS_IsException(val)) {
        JSValue e = JS_GetException(ctx);
        report_exception(ctx, "the init script failed", e);
        script_ended(NULL, 1);
    }
    /* A module's evaluation is a promise (top-level await): run jobs until it settles. */
    for (;;) {
        JSPromiseStateEnum state = JS_PromiseState(ctx, val);
        if (state == JS_PROMISE_REJECTED) {
            JSValue e = JS_PromiseResult(ctx, val);
            report_exception(ctx, "the init script failed", e);
            script_ended(NULL, 1);
        }
        if (state != JS_PROMISE_PENDING)
            break;
        JSContext *c;
        int r = JS_ExecutePendingJob(rt, &c);
        if (r < 0) {
            JSValue e = JS_GetException(c);
            report_exception(c, "error in a promise job", e);
            JS_FreeValue(c, e);
        } else if (r == 0) {
            /* Every syscall is synchronous: nothing can settle the promise any more. */
            script_ended("the init script waits on a promise that nothing can settle", 1);
        }
    }
    JS_FreeValue(ctx, val);
    run_jobs(rt);
    if (unhandled_count > 0) {
        for (int i = 0; i < unhandled_count; i++)
            report_exception(ctx, "unhandled promise rejection", unhandled[i][1]);
        script_ended(NULL, 1);
    }
    script_ended(getpid() == 1 ? "the init script returned without starting the system" : NULL, 0);
}

/* --------------------------------------------------------------- rescue shell ------ */

/* The last resort of PID 1: a shell on the console, restarted whenever it exits, while
 * every child (and every orphan the kernel hands to PID 1) is reaped. Never returns. */
static _Noreturn void rescue(const char *why)
{
    static char *const sh_argv[] = { "sh", NULL };
    static char *const bb_argv[] = { "busybox", "sh", NULL };
    static char *const sh_envp[] = {
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/", "TERM=linux",
        "PS1=vdboot-rescue# ", NULL,
    };
    char msg[768];
    snprintf(msg, sizeof(msg), "%s%s%svdboot: starting a rescue shell on the console (it restarts when it exits)\n",
             why ? "vdboot: " : "", why ? why : "", why ? "\n" : "");
    report(msg);
    for (;;) {
        int con = open_console();
        if (con < 0)
            con = dup(0);
        time_t started = time(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            setsid();
            if (con >= 0) {
                dup2(con, 0);
                dup2(con, 1);
                dup2(con, 2);
                ioctl(0, TIOCSCTTY, 1);
            }
            close_fds_from(3, -1);
            sigset_t all;
            sigemptyset(&all);
            sigprocmask(SIG_SETMASK, &all, NULL);
            execve("/bin/sh", sh_argv, sh_envp);
            execve("/bin/busybox", bb_argv, sh_envp);
            write_all(2, "vdboot: cannot run /bin/sh or /bin/busybox: no rescue shell\n", 60);
            _exit(127);
        }
        if (con >= 0)
            close(con);
        for (;;) {
            pid_t r = waitpid(-1, NULL, 0);
            if (r == pid || (r < 0 && errno != EINTR))
                break;
        }
        if (pid < 0 || time(NULL) - started < 2)
            sleep(3); /* a shell that cannot start must not spin the CPU */
    }
}
