/* A guard on the C stack for greenback's compiled core.
 *
 * Each level of sync -> async nesting (await_() of a with_portal_run_sync()
 * call whose function calls await_() again, ...) runs one more portal step,
 * whose worker greenlet starts below the current stack pointer. Python 3.10
 * and 3.11 have no guard on C recursion, so deep enough nesting would run
 * off the end of the thread's stack. await_() and every portal step check
 * the room left first, and raise RecursionError when little is left.
 *
 * Greenlets copy slices of the thread's stack in and out, but every
 * greenlet of a thread runs at the addresses of that thread's stack, so the
 * address of a local variable measures how deep the running code is.
 *
 * Python 3.12 and 3.13 count C recursion instead, and raise RecursionError
 * when the count runs out. Where that happens as a portal's await_() starts
 * the coroutine it awaits, CPython 3.13 corrupts memory (the process then
 * crashes at exit), so the guard also stops while a few levels' worth of
 * that count are left.
 *
 * Python 3.14 dropped that count (PyThreadState.c_recursion_remaining) and
 * checks the stack pointer against limits of its own instead. Its bounds may
 * differ from ours (another platform call, or a guess where there is none),
 * so the guard also stops a few of its margins before CPython's own limit:
 * the interpreter's error must never be the one that fires inside a switch.
 */
#ifndef GREENBACK_STACK_GUARD_H
#define GREENBACK_STACK_GUARD_H

#include <Python.h>

#if defined(_WIN32)
#  include <windows.h>
#  define GB_GUARD_TLS __declspec(thread)
#else
#  include <pthread.h>
#  define GB_GUARD_TLS __thread
#endif

/* Room kept free below the last check: enough for one more nesting level,
   the interpreter's own use until its next check, and raising the error. */
#define GB_STACK_MARGIN ((size_t)256 * 1024)

/* Per thread: 0 not looked up yet, 1 gb_stack_limit is set, -1 unknown. */
static GB_GUARD_TLS int gb_stack_state = 0;
static GB_GUARD_TLS char *gb_stack_limit = NULL;

static void gb_stack_init(void) {
    char *low = NULL;
    size_t size = 0;
#if defined(__linux__)
    pthread_attr_t attr;
    void *addr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        if (pthread_attr_getstack(&attr, &addr, &size) == 0)
            low = (char *)addr;
        pthread_attr_destroy(&attr);
    }
#elif defined(__APPLE__)
    size = pthread_get_stacksize_np(pthread_self());
    low = (char *)pthread_get_stackaddr_np(pthread_self()) - size;
#elif defined(_WIN32)
    ULONG_PTR lo, hi;
    GetCurrentThreadStackLimits(&lo, &hi);
    low = (char *)lo;
    size = (size_t)(hi - lo);
#endif
    if (low == NULL || size == 0) {
        gb_stack_state = -1;  /* no guard here; CPython 3.12+ still has its own */
        return;
    }
    /* Small stacks (threading.stack_size()) keep a quarter free instead. */
    gb_stack_limit = low + (GB_STACK_MARGIN < size / 4 ? GB_STACK_MARGIN : size / 4);
    gb_stack_state = 1;
}

/* The bytes of C stack left above the guard's limit (negative: past it), or
   PY_SSIZE_T_MAX where the thread's stack bounds are unknown. */
static Py_ssize_t gb_stack_room(void) {
    char here;
    if (gb_stack_state == 0)
        gb_stack_init();
    if (gb_stack_state < 0)
        return PY_SSIZE_T_MAX;
    return (Py_ssize_t)(&here - gb_stack_limit);
}

/* C recursion units kept in hand on 3.12 and 3.13 (a nesting level uses
   about 3, more if its sync code recurses through C). */
#define GB_C_RECURSION_MARGIN 64

/* On 3.14+, CPython's own stack margins kept in hand above its limit: 64 KiB
   on 64-bit release builds, many nesting levels' worth, yet small enough for
   threads with small stacks. */
#define GB_CPYTHON_STACK_MARGINS 4

/* 0 if there is room to nest once more, or -1 with RecursionError set. */
static inline int gb_check_stack(void) {
#if PY_VERSION_HEX >= 0x030C0000 && PY_VERSION_HEX < 0x030E0000
    if (gb_stack_room() >= 0
            && PyThreadState_GET()->c_recursion_remaining >= GB_C_RECURSION_MARGIN)
        return 0;
#elif PY_VERSION_HEX >= 0x030E0000
    /* Declared by CPython 3.14's public headers for its trashcan macros. */
    if (gb_stack_room() >= 0
            && !_Py_ReachedRecursionLimitWithMargin(PyThreadState_GET(),
                                                    GB_CPYTHON_STACK_MARGINS))
        return 0;
#else
    if (gb_stack_room() >= 0)
        return 0;
#endif
    PyErr_SetString(PyExc_RecursionError,
        "greenback: the C stack is nearly exhausted by nested portals "
        "(await_() of code that awaits through another portal, many levels "
        "deep); reduce the nesting depth");
    return -1;
}

#endif
