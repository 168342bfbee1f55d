/*
 * TEST-ONLY. Loaded with LD_PRELOAD into QEMU by the test suite and the local demo, because
 * they run guests under TCG. Production hosts use KVM and never load this.
 *
 * It works around two QEMU COLO bugs that only exist under TCG:
 *  1. the BQL self-deadlock of the primary at a checkpoint (pthread_cond_wait below; from
 *     ftkvm's shared COLO notes, colo/lab/colo-tcg-bql-fix.c, unchanged);
 *  2. lost dirty pages (QEMU 7.2; fixed upstream in 9.0 by "physmem: Fix migration dirty
 *     bitmap coherency with TCG memory access", not in Debian's 7.2.22): the fast path of
 *     cpu_physical_memory_sync_dirty_bitmap() clears the migration dirty bits without
 *     resetting TCG's TLB dirty state, so later guest writes through existing TLB entries are
 *     never logged. A checkpoint then misses pages: the primary does not send them and the
 *     secondary does not revert its own writes. Seen as guest kernel oopses on the secondary
 *     (e.g. alloc_inode reading a NULL super_operations) after a few checkpoints.
 *  3. stale translated code on the secondary: colo_flush_ram_cache() overwrites guest pages
 *     with memcpy() and never invalidates TCG's translation blocks.
 *  Fix for 2 and 3 (__vfprintf_chk below): QEMU logs trace events through libc. Tests enable
 *     `-trace enable=migration_bitmap_sync_end -trace enable=colo_flush_ram_cache_end,file=/dev/null`.
 *     On migration_bitmap_sync_end (primary: right after each sync, vCPUs stopped during a
 *     checkpoint) and on colo_flush_ram_cache_end (secondary: after its sync and the page copy,
 *     vCPUs stopped) we queue QEMU's own tlb_flush_all_cpus_synced(): every vCPU drops its TLB
 *     before it runs again, so new TLB entries see the now-clean dirty bits and log writes.
 *     On the secondary we also queue tb_flush() for the overwritten code.
 *     Proper fixes: the upstream commit above, and tb_flush() in colo_flush_ram_cache().
 */
/*
 * LD_PRELOAD workaround for QEMU COLO under TCG (bug seen in 7.2 and 10.0.13).
 *
 * Bug: during each COLO checkpoint the primary's migration thread calls
 * qemu_savevm_live_state() WITHOUT holding the BQL (migration/colo.c,
 * colo_do_checkpoint_transaction).  RAM's save_live_complete then runs
 * migration_bitmap_sync() -> memory_global_after_dirty_log_sync() ->
 * tcg_log_global_after_sync() (system/physmem.c) -> run_on_cpu(cpu, do_nothing)
 * -> qemu_cond_wait(&qemu_work_cond, &bql), which assumes the BQL is held:
 *  1. pthread_cond_wait() on a mutex the caller does not own "unlocks" it, waits
 *     and RE-ACQUIRES it: the migration thread silently ends up owning the BQL
 *     (bql_locked() still false) and self-deadlocks at the next bql_lock()
 *     (before vm_start); main loop + QMP hang behind it.
 *  2. Without the BQL, do_run_on_cpu() also races with the vCPU: the kick
 *     (halt_cond broadcast) or the completion broadcast on qemu_work_cond can
 *     be lost, and the checkpoint hangs in do_run_on_cpu forever (intermittent,
 *     roughly 1 in 20-40 checkpoints here).
 *
 * Workaround: if pthread_cond_wait() is called on a mutex the caller does not
 * own, take the mutex, re-broadcast every condvar someone is currently waiting
 * on with that mutex (re-delivers a lost kick; QEMU loops tolerate spurious
 * wakeups), wait at most 10 ms (a lost completion signal only costs 10 ms, the
 * caller re-checks its condition and calls again), and drop the mutex again.
 * Proper fix: bql_lock()/bql_unlock() around qemu_savevm_live_state() in colo.c.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <dlfcn.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <time.h>
#include <string.h>
#include <stdarg.h>
#include <stdio.h>

static int (*real_wait)(pthread_cond_t *, pthread_mutex_t *);
#define NW 256
static struct { pthread_cond_t *c; pthread_mutex_t *m; } waits[NW];
static pthread_mutex_t tab = PTHREAD_MUTEX_INITIALIZER;

int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
{
    int r, i, slot = -1;

    if (!real_wait) {
        real_wait = dlvsym(RTLD_NEXT, "pthread_cond_wait", "GLIBC_2.3.2");
    }
    if (m->__data.__owner != (int)syscall(SYS_gettid)) {
        pthread_mutex_lock(m);                     /* now nobody is between check and wait */
        pthread_mutex_lock(&tab);
        for (i = 0; i < NW; i++) {
            if (waits[i].m == m && waits[i].c != c) {
                pthread_cond_broadcast(waits[i].c); /* re-deliver a possibly lost kick */
            }
        }
        pthread_mutex_unlock(&tab);
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);         /* QEMU condvars use CLOCK_MONOTONIC */
        ts.tv_nsec += 10 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
        pthread_cond_clockwait(c, m, CLOCK_MONOTONIC, &ts);  /* timeout == spurious wakeup */
        pthread_mutex_unlock(m);
        return 0;
    }
    pthread_mutex_lock(&tab);                      /* register this (cond, mutex) wait */
    for (i = 0; i < NW; i++) {
        if (!waits[i].c) { waits[i].c = c; waits[i].m = m; slot = i; break; }
    }
    pthread_mutex_unlock(&tab);
    r = real_wait(c, m);
    if (slot >= 0) {
        pthread_mutex_lock(&tab); waits[slot].c = NULL; waits[slot].m = NULL; pthread_mutex_unlock(&tab);
    }
    return r;
}

/* ---- 2 + 3: TLB dirty state and stale translations ----------------------------------- */
static void *first_cpu_state(void)
{
    static void **cpus_head;                                   /* QTAILQ_HEAD: tqh_first at 0 */
    if (!cpus_head) {
        cpus_head = (void **)dlsym(RTLD_DEFAULT, "cpus");
    }
    return cpus_head ? *cpus_head : NULL;
}

static void colo_tcg_resync(int flush_translations)
{
    static void (*tlb_flush_all_synced)(void *cpu);
    static void (*tb_flush_fn)(void *cpu);
    void *cpu = first_cpu_state();
    if (!tlb_flush_all_synced) {
        tlb_flush_all_synced = (void (*)(void *))dlsym(RTLD_DEFAULT, "tlb_flush_all_cpus_synced");
        tb_flush_fn = (void (*)(void *))dlsym(RTLD_DEFAULT, "tb_flush");
    }
    if (!cpu) {
        return;
    }
    if (tlb_flush_all_synced) {
        tlb_flush_all_synced(cpu);
    }
    if (flush_translations && tb_flush_fn) {
        tb_flush_fn(cpu);
    }
}

int __vfprintf_chk(FILE *f, int flag, const char *fmt, va_list ap)
{
    static int (*real_vfprintf_chk)(FILE *, int, const char *, va_list);
    if (!real_vfprintf_chk) {
        real_vfprintf_chk = (int (*)(FILE *, int, const char *, va_list))dlsym(RTLD_NEXT, "__vfprintf_chk");
    }
    if (strstr(fmt, "migration_bitmap_sync_end")) {
        colo_tcg_resync(0);
    } else if (strstr(fmt, "colo_flush_ram_cache_end")) {
        colo_tcg_resync(1);
    }
    return real_vfprintf_chk(f, flag, fmt, ap);
}
