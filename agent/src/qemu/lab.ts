// Lab mode (TEST-ONLY): QEMU 7.2's COLO under TCG needs the LD_PRELOAD shim of test/tcg-shim
// AND the trace events it hooks; with the preload alone the replica's memory silently diverges
// (measured: the secondary's kernel crashed within seconds of most protections, 3-18 times per
// run). One option (`qemu.tcg_lab_shim`) adds both, so a lab cannot get half of it. Production
// (KVM) never sets it.
import type { Config } from '../config/schema.ts';

/** The trace events the shim hooks (colo-tcg-bql-fix.c): enabled, their output discarded. */
export const TCG_SHIM_TRACE_ARGS = ['-trace', 'enable=migration_bitmap_sync_end', '-trace', 'enable=colo_flush_ram_cache_end,file=/dev/null'];

type QemuSettings = Config['qemu'];

/** QEMU's environment: the configured one, plus the shim's LD_PRELOAD in lab mode. */
export function qemuEnv(q: QemuSettings): Record<string, string> {
  return q.tcg_lab_shim ? { ...q.env, LD_PRELOAD: q.tcg_lab_shim } : q.env;
}

/** Arguments appended to every QEMU command line: the shim's trace events in lab mode, then extra_args. */
export function qemuExtraArgs(q: QemuSettings): string[] {
  return q.tcg_lab_shim ? [...TCG_SHIM_TRACE_ARGS, ...q.extra_args] : q.extra_args;
}
