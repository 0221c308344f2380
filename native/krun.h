/*
 * The subset of the libkrun v1 C API (libkrun.so.1) that smol-kernel uses, declared for
 * cffi's ABI mode (no headers or compiler needed at run time). Written from the API facts
 * in docs/libkrun.md; every function returns 0 or a negative errno unless noted.
 *
 * Required (libkrun >= 1.17: the first release that can run a guest with no network):
 *   krun_set_log_level, krun_create_ctx, krun_free_ctx, krun_set_vm_config, krun_set_root,
 *   krun_disable_implicit_vsock, krun_add_vsock, krun_add_vsock_port2, krun_set_workdir,
 *   krun_set_exec, krun_set_console_output, krun_start_enter
 * Optional (probed; a feature is refused with a reason when its symbol is missing):
 *   krun_add_disk2           BLK=1 builds: the guest image is a disk (always needed)
 *   krun_add_net_unixstream  NET=1 builds, >= 1.15: network=True (passt)
 *   krun_add_virtiofs        host folder shares, read-write
 *   krun_add_virtiofs3       >= 1.18: read-only shares, enforced on the host
 */
int32_t krun_set_log_level(uint32_t level);
int32_t krun_create_ctx(void);
int32_t krun_free_ctx(uint32_t ctx_id);
int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib);
int32_t krun_set_root(uint32_t ctx_id, const char *root_path);
int32_t krun_disable_implicit_vsock(uint32_t ctx_id);
int32_t krun_add_vsock(uint32_t ctx_id, uint32_t tsi_features);
int32_t krun_add_vsock_port2(uint32_t ctx_id, uint32_t port, const char *c_filepath, bool listen);
int32_t krun_set_workdir(uint32_t ctx_id, const char *workdir_path);
int32_t krun_set_exec(uint32_t ctx_id, const char *exec_path, const char *const argv[],
                      const char *const envp[]);
int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath);
int32_t krun_add_disk2(uint32_t ctx_id, const char *block_id, const char *disk_path,
                       uint32_t disk_format, bool read_only);
int32_t krun_add_net_unixstream(uint32_t ctx_id, const char *c_path, int fd, uint8_t *const c_mac,
                                uint32_t features, uint32_t flags);
int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path);
int32_t krun_add_virtiofs3(uint32_t ctx_id, const char *c_tag, const char *c_path,
                           uint64_t shm_size, bool read_only);
int32_t krun_start_enter(uint32_t ctx_id);
