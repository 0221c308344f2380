/*
 * Recording stand-in for libkrun.so.1 -- a test double for the cffi binding and the
 * launcher only; it never stands in for a VM. Every krun_* call appends one JSON line with
 * its arguments to $KRUN_STUB_LOG. String arrays are walked to their NULL terminator
 * (an array that is not terminated within 4096 entries is logged as "UNTERMINATED").
 * $KRUN_STUB_FAIL="krun_name:-errno" makes that function fail. krun_start_enter logs, then
 * _exit($KRUN_STUB_EXIT), like the real one ends the process with the guest's status.
 * Build variants: -DSTUB_OLD (no krun_disable_implicit_vsock/krun_add_vsock, i.e. < 1.17),
 * -DSTUB_NO_BLK (no krun_add_disk2), -DSTUB_NO_EXTRAS (no krun_add_net_unixstream and no
 * krun_add_virtiofs3, like a 1.17 build without NET=1).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static FILE *logf_(void) {
    const char *path = getenv("KRUN_STUB_LOG");
    return path ? fopen(path, "a") : NULL;
}

static void put_str(FILE *f, const char *s) {
    if (!s) { fputs("null", f); return; }
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static void put_arr(FILE *f, const char *const a[]) {
    if (!a) { fputs("null", f); return; }
    fputc('[', f);
    for (int i = 0; i < 4096; i++) {
        if (!a[i]) { fputc(']', f); return; }
        if (i) fputc(',', f);
        put_str(f, a[i]);
    }
    fputs("],\"unterminated\":true", f);
}

static int32_t result(const char *name) {
    const char *fail = getenv("KRUN_STUB_FAIL");
    size_t n = strlen(name);
    if (fail && strncmp(fail, name, n) == 0 && fail[n] == ':') return (int32_t)atoi(fail + n + 1);
    return 0;
}

#define BEGIN(name) FILE *f = logf_(); if (f) { fprintf(f, "{\"fn\":\"%s\"", name);
#define END(name) fputs("}\n", f); fclose(f); } return result(name);

int32_t krun_set_log_level(uint32_t level) {
    BEGIN("krun_set_log_level") fprintf(f, ",\"level\":%u", level); END("krun_set_log_level")
}
int32_t krun_create_ctx(void) {
    FILE *f = logf_();
    if (f) { fputs("{\"fn\":\"krun_create_ctx\"}\n", f); fclose(f); }
    int32_t r = result("krun_create_ctx");
    return r < 0 ? r : 7; /* a recognisable ctx id */
}
int32_t krun_free_ctx(uint32_t ctx) {
    BEGIN("krun_free_ctx") fprintf(f, ",\"ctx\":%u", ctx); END("krun_free_ctx")
}
int32_t krun_set_vm_config(uint32_t ctx, uint8_t vcpus, uint32_t mib) {
    BEGIN("krun_set_vm_config") fprintf(f, ",\"ctx\":%u,\"vcpus\":%u,\"ram_mib\":%u", ctx, vcpus, mib);
    END("krun_set_vm_config")
}
static char root_path[4096];
int32_t krun_set_root(uint32_t ctx, const char *path) {
    if (path) snprintf(root_path, sizeof root_path, "%s", path);
    BEGIN("krun_set_root") fprintf(f, ",\"ctx\":%u,\"path\":", ctx); put_str(f, path); END("krun_set_root")
}
#ifndef STUB_OLD
int32_t krun_disable_implicit_vsock(uint32_t ctx) {
    BEGIN("krun_disable_implicit_vsock") fprintf(f, ",\"ctx\":%u", ctx); END("krun_disable_implicit_vsock")
}
int32_t krun_add_vsock(uint32_t ctx, uint32_t tsi) {
    BEGIN("krun_add_vsock") fprintf(f, ",\"ctx\":%u,\"tsi_features\":%u", ctx, tsi); END("krun_add_vsock")
}
#endif
int32_t krun_add_vsock_port2(uint32_t ctx, uint32_t port, const char *path, bool listen) {
    BEGIN("krun_add_vsock_port2")
    fprintf(f, ",\"ctx\":%u,\"port\":%u,\"listen\":%s,\"path\":", ctx, port, listen ? "true" : "false");
    put_str(f, path);
    END("krun_add_vsock_port2")
}
int32_t krun_set_workdir(uint32_t ctx, const char *path) {
    BEGIN("krun_set_workdir") fprintf(f, ",\"ctx\":%u,\"path\":", ctx); put_str(f, path); END("krun_set_workdir")
}
int32_t krun_set_exec(uint32_t ctx, const char *exec_path, const char *const argv[],
                      const char *const envp[]) {
    BEGIN("krun_set_exec")
    fprintf(f, ",\"ctx\":%u,\"exec\":", ctx); put_str(f, exec_path);
    fputs(",\"argv\":", f); put_arr(f, argv);
    fputs(",\"envp\":", f); put_arr(f, envp);
    END("krun_set_exec")
}
int32_t krun_set_console_output(uint32_t ctx, const char *path) {
    BEGIN("krun_set_console_output") fprintf(f, ",\"ctx\":%u,\"path\":", ctx); put_str(f, path);
    END("krun_set_console_output")
}
#ifndef STUB_NO_BLK
int32_t krun_add_disk2(uint32_t ctx, const char *id, const char *path, uint32_t fmt, bool ro) {
    BEGIN("krun_add_disk2")
    fprintf(f, ",\"ctx\":%u,\"format\":%u,\"read_only\":%s,\"id\":", ctx, fmt, ro ? "true" : "false");
    put_str(f, id); fputs(",\"path\":", f); put_str(f, path);
    END("krun_add_disk2")
}
#endif
#ifndef STUB_NO_EXTRAS
int32_t krun_add_net_unixstream(uint32_t ctx, const char *path, int fd, uint8_t *const mac,
                                uint32_t features, uint32_t flags) {
    char link[64] = "", target[128] = "";
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n > 0) target[n] = 0;
    BEGIN("krun_add_net_unixstream")
    fprintf(f, ",\"ctx\":%u,\"fd\":%d,\"features\":%u,\"flags\":%u,\"path\":", ctx, fd, features, flags);
    put_str(f, path);
    fprintf(f, ",\"mac\":\"%02x:%02x:%02x:%02x:%02x:%02x\",\"fd_target\":", mac[0], mac[1], mac[2],
            mac[3], mac[4], mac[5]);
    put_str(f, target);
    END("krun_add_net_unixstream")
}
int32_t krun_add_virtiofs3(uint32_t ctx, const char *tag, const char *path, uint64_t shm,
                           bool ro) {
    BEGIN("krun_add_virtiofs3")
    fprintf(f, ",\"ctx\":%u,\"shm_size\":%llu,\"read_only\":%s,\"tag\":", ctx,
            (unsigned long long)shm, ro ? "true" : "false");
    put_str(f, tag); fputs(",\"path\":", f); put_str(f, path);
    END("krun_add_virtiofs3")
}
#endif
int32_t krun_add_virtiofs(uint32_t ctx, const char *tag, const char *path) {
    BEGIN("krun_add_virtiofs") fprintf(f, ",\"ctx\":%u,\"tag\":", ctx); put_str(f, tag);
    fputs(",\"path\":", f); put_str(f, path);
    END("krun_add_virtiofs")
}
int32_t krun_start_enter(uint32_t ctx) {
    FILE *f = logf_();
    if (f) {
        /* Which descriptors did the launcher leave open? (it must close inherited ones) */
        /* Could the VM (this process, once it entered) write into its boot folder? */
        int writable = -1;
        if (root_path[0]) {
            char p[4200];
            snprintf(p, sizeof p, "%s/.stub-write-test", root_path);
            FILE *t = fopen(p, "w");
            writable = t != NULL;
            if (t) { fclose(t); unlink(p); }
        }
        fprintf(f, "{\"fn\":\"krun_start_enter\",\"root_writable\":%d,\"ctx\":%u,\"open_fds\":[", writable, ctx);
        int first = 1;
        for (int fd = 0; fd < 256; fd++) {
            if (fd == fileno(f)) continue;
            char p[64];
            snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
            if (access(p, F_OK) == 0) { fprintf(f, first ? "%d" : ",%d", fd); first = 0; }
        }
        fputs("]}\n", f);
        fclose(f);
    }
    int32_t r = result("krun_start_enter");
    if (r < 0) return r;
    const char *code = getenv("KRUN_STUB_EXIT");
    _exit(code ? atoi(code) : 0);
}
