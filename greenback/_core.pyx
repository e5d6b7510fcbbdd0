# cython: language_level=3, embedsignature=True, binding=True
# cython: boundscheck=False, wraparound=False
"""greenback's hot path: the portal shim, the worker greenlets and ``await_``.

How a portal works
------------------
A *portal* sits between an event loop and the code of one task. Every time the
loop resumes the task (a "step"), the portal runs the step inside a *worker*
greenlet instead of the loop's own greenlet. If synchronous code in that step
calls :func:`await_`, ``await_`` can then switch from the worker straight back
to the loop's greenlet, handing over whatever the awaited coroutine yielded
(a future, a Trio trap, ...). When the loop resumes the task, the portal
switches back into the suspended ``await_``.

Nothing travels through the greenlet switches themselves: the value to send,
the exception to throw, and what the step produced are all C fields of the
:class:`Portal`, and the portal whose step is running is a per-thread C
variable. One switch into the worker and one switch out is the whole cost of
a step.

Three kinds of portal share one class:

* ``MODE_TASK``: installed as a task's coroutine by ``bestow_portal``; wraps
  the task's original coroutine for the rest of its life.
* ``MODE_RUN``: awaited by ``with_portal_run(fn, ...)``; wraps ``fn(...)``.
* ``MODE_SYNC``: awaited by ``with_portal_run_sync(fn, ...)``; calls ``fn``
  inside a worker.

(``with_portal_run*`` and ``ensure_portal`` are ``async def`` functions in
the facade, greenback._portal: the first two create a one-shot portal only
when the task has none yet, and the last calls :func:`portalize_running_task`
before its checkpoint. ``greenback.await_`` is a one-line Python function
there around the C function :func:`await_` below.)
"""

cimport cython
from libc.stdint cimport uint64_t
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF

from greenback._greenlet cimport (
    PyGreenlet,
    PyGreenlet_ACTIVE,
    PyGreenlet_STARTED,
    PyGreenlet_GetCurrent,
    PyGreenlet_GetParent,
    PyGreenlet_New,
    PyGreenlet_SetParent,
    PyGreenlet_Switch,
    import_greenlet,
)

import asyncio
import atexit
import gc
import os
import threading
import warnings
from collections.abc import Coroutine as _Coroutine
from functools import partial

import greenlet
import sniffio

from greenback._errors import (
    FOREIGN_GREENLET_ERROR as _FOREIGN_GREENLET_ERROR,
    IN_GC_ERROR as _IN_GC_ERROR,
    ORPHANED_AWAIT_ERROR as _ORPHANED_AWAIT_ERROR,
    TASK_LAYOUT_ERROR as _TASK_LAYOUT_ERROR,
    exception_from_throw_args as _exception_from_throw_args,
    task_layout_unknown_error as _task_layout_unknown_error,
)
from greenback import _task_layout, _tasks
from greenback._worker import make_worker_class, real_parent, run_worker

import_greenlet()


cdef extern from *:
    """
    #if defined(_MSC_VER)
    #  define GB_THREAD_LOCAL __declspec(thread)
    #else
    #  define GB_THREAD_LOCAL __thread
    #endif

    /* The portal whose step is running on this OS thread, or NULL.  Borrowed:
       the step that sets it holds a reference for as long as it is set. */
    static GB_THREAD_LOCAL PyObject *gb_active_portal = NULL;

    /* Whether this thread is running a garbage collection (and so possibly
       a __del__ method or weakref callback).  Set from gc.callbacks. */
    static GB_THREAD_LOCAL int gb_collecting = 0;

    /* The thread's current contextvars.Context (borrowed, may be NULL).  There
       is no public getter that does not copy it; the field is in the public
       struct _ts (Include/cpython/pystate.h) from 3.10 through 3.14. */
    static inline PyObject *gb_current_context(void) {
        return PyThreadState_Get()->context;
    }

    /* Take the exception being raised, normalized, as a new reference. */
    static PyObject *gb_fetch_exception(void) {
    #if PY_VERSION_HEX >= 0x030C0000
        return PyErr_GetRaisedException();
    #else
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        PyErr_NormalizeException(&t, &v, &tb);
        if (tb != NULL) {
            PyException_SetTraceback(v, tb);
            Py_DECREF(tb);
        }
        Py_XDECREF(t);
        return v;
    #endif
    }

    /* Raise `exc` (borrowed) again with its own traceback and no implicit
       chaining: it continues the propagation that gb_fetch_exception paused. */
    static void gb_reraise(PyObject *exc) {
    #if PY_VERSION_HEX >= 0x030C0000
        Py_INCREF(exc);
        PyErr_SetRaisedException(exc);
    #else
        PyObject *tb = PyException_GetTraceback(exc);
        Py_INCREF(Py_TYPE(exc));
        Py_INCREF(exc);
        PyErr_Restore((PyObject *)Py_TYPE(exc), exc, tb);
    #endif
    }

    /* Signal "returned `value`" the way a generator's send() does. */
    static void gb_set_stop_iteration(PyObject *value) {
        if (value == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
            return;
        }
        /* Wrap explicitly: PyErr_SetObject would unpack a tuple `value`. */
        PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
        if (stop != NULL) {
            PyErr_SetObject(PyExc_StopIteration, stop);
            Py_DECREF(stop);
        }
    }

    /* Raise exc_type(msg) from `cause` (borrowed). */
    static void gb_raise_from(PyObject *exc_type, const char *msg, PyObject *cause) {
        PyErr_SetString(exc_type, msg);
        PyObject *exc = gb_fetch_exception();
        Py_INCREF(cause);
        PyException_SetCause(exc, cause);
        Py_INCREF(cause);
        PyException_SetContext(exc, cause);
        gb_reraise(exc);
        Py_DECREF(exc);
    }

    /* Return -1 so that Cython propagates the exception that is already set
       (adding a traceback entry for the calling function only). */
    static inline int gb_propagate(void) { return -1; }

    /* Close `it` if it has a close() method. 0 on success, -1 on error. */
    static int gb_close_iter(PyObject *it) {
        PyObject *close = PyObject_GetAttrString(it, "close");
        if (close == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                return -1;
            PyErr_Clear();
            return 0;
        }
        PyObject *r = PyObject_CallNoArgs(close);
        Py_DECREF(close);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }

    /* Throw `exc` into the iterator `it`, as `await` does when its awaiting
       frame is resumed with an exception.  Same contract as PyIter_Send. */
    static PySendResult gb_throw(PyObject *it, PyObject *exc, PyObject **result) {
        *result = NULL;
        if (PyErr_GivenExceptionMatches(exc, PyExc_GeneratorExit)) {
            /* Like `await`: close what is awaited (a no-op if it is already
               finished), then raise GeneratorExit at the await itself. */
            if (gb_close_iter(it) < 0)
                return PYGEN_ERROR;
            gb_reraise(exc);
            return PYGEN_ERROR;
        }
        PyObject *meth = PyObject_GetAttrString(it, "throw");
        if (meth == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                return PYGEN_ERROR;
            PyErr_Clear();
            /* No throw(): the exception surfaces at the await itself. */
            gb_reraise(exc);
            return PYGEN_ERROR;
        }
        PyObject *r = PyObject_CallOneArg(meth, exc);
        Py_DECREF(meth);
        if (r != NULL) {
            *result = r;
            return PYGEN_NEXT;
        }
        if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
            PyObject *stop = gb_fetch_exception();
            PyObject *value = PyObject_GetAttrString(stop, "value");
            Py_DECREF(stop);
            if (value == NULL) return PYGEN_ERROR;
            *result = value;
            return PYGEN_RETURN;
        }
        return PYGEN_ERROR;
    }

    /* The iterator that `await aw` would drive, or NULL with TypeError set. */
    static PyObject *gb_awaitable_iter(PyObject *aw) {
        if (PyCoro_CheckExact(aw)) {
            Py_INCREF(aw);
            return aw;
        }
        PyTypeObject *tp = Py_TYPE(aw);
        if (PyGen_CheckExact(aw)) {
            /* Generator-based coroutines (@types.coroutine) are awaitable. */
            PyObject *code = PyObject_GetAttrString(aw, "gi_code");
            if (code == NULL) return NULL;
            int iterable = (((PyCodeObject *)code)->co_flags & CO_ITERABLE_COROUTINE) != 0;
            Py_DECREF(code);
            if (iterable) {
                Py_INCREF(aw);
                return aw;
            }
        }
        else if (tp->tp_as_async != NULL && tp->tp_as_async->am_await != NULL) {
            PyObject *it = tp->tp_as_async->am_await(aw);
            if (it == NULL) return NULL;
            if (PyCoro_CheckExact(it)) {
                Py_DECREF(it);
                PyErr_SetString(PyExc_TypeError, "__await__() returned a coroutine");
                return NULL;
            }
            if (!PyIter_Check(it)) {
                PyErr_Format(PyExc_TypeError,
                             "__await__() returned non-iterator of type '%.100s'",
                             Py_TYPE(it)->tp_name);
                Py_DECREF(it);
                return NULL;
            }
            return it;
        }
        PyErr_Format(PyExc_TypeError,
                     "object %.100s can't be used in 'await' expression; "
                     "greenback.await_() takes a coroutine or another awaitable",
                     tp->tp_name);
        return NULL;
    }

    /* Portals are coroutines to the outside world.  Cython has no way to
       define am_send, nor send()/throw() methods that leave tracebacks alone,
       so those are written as plain C functions and put on the type here. */
    static int gb_install_coroutine_slots(PyTypeObject *tp, iternextfunc next,
                                          sendfunc am_send, PyMethodDef *methods) {
        if (tp->tp_as_async == NULL) {
            PyErr_SetString(PyExc_SystemError, "greenback.Portal has no tp_as_async");
            return -1;
        }
        tp->tp_as_async->am_send = am_send;
    #ifdef Py_TPFLAGS_HAVE_AM_SEND
        tp->tp_flags |= Py_TPFLAGS_HAVE_AM_SEND;
    #endif
        tp->tp_iternext = next;
        for (PyMethodDef *m = methods; m->ml_name != NULL; m++) {
            PyObject *descr = PyDescr_NewMethod(tp, m);
            if (descr == NULL) return -1;
            int rc = PyDict_SetItemString(tp->tp_dict, m->ml_name, descr);
            Py_DECREF(descr);
            if (rc < 0) return -1;
        }
        PyType_Modified(tp);
        return 0;
    }
    """
    PyObject* gb_active_portal
    int gb_collecting
    PyObject* gb_current_context()
    PyObject* gb_fetch_exception()
    void gb_reraise(PyObject* exc)
    void gb_set_stop_iteration(PyObject* value)
    int gb_propagate() except -1

    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    PySendResult PyIter_Send(PyObject* it, PyObject* arg, PyObject** result)
    PySendResult gb_throw(PyObject* it, PyObject* exc, PyObject** result)
    PyObject* gb_awaitable_iter(PyObject* aw)
    int gb_close_iter(PyObject* it)

    ctypedef PyObject* (*iternextfunc)(PyObject*)
    ctypedef PySendResult (*sendfunc)(PyObject*, PyObject*, PyObject**)
    ctypedef PyObject* (*PyCFunction)(PyObject*, PyObject*)
    ctypedef struct PyMethodDef:
        const char* ml_name
        PyCFunction ml_meth
        int ml_flags
        const char* ml_doc
    int METH_O, METH_VARARGS, METH_NOARGS
    ctypedef struct PyTypeObject
    int PyContextVar_Get(object var, PyObject* default_value, PyObject** value) except -1
    int gb_install_coroutine_slots(PyTypeObject* tp, iternextfunc next,
                                   sendfunc am_send, PyMethodDef* methods) except -1
    object PyCFunction_NewEx(PyMethodDef* ml, PyObject* self, PyObject* module)

    # Raw C-API calls: NULL / -1 results are checked by hand, so that no
    # traceback entry of greenback's is added to the wrapped code's errors.
    PyObject* PyObject_Call(PyObject* fn, PyObject* args, PyObject* kwargs)
    PyObject* PyObject_CallNoArgs(PyObject* fn)
    PyObject* PyObject_CallOneArg(PyObject* fn, PyObject* arg)
    PyObject* PyObject_GetAttr(PyObject* obj, PyObject* name)
    int PyObject_SetAttr(PyObject* obj, PyObject* name, PyObject* value)
    int PyList_Append(PyObject* lst, PyObject* item)
    int PyErr_ExceptionMatches(PyObject* exc)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    void PyErr_SetString(PyObject* exc, const char* msg)
    void PyErr_SetObject(PyObject* exc, PyObject* value)
    void PyErr_WriteUnraisable(PyObject* obj)
    PyObject* PyExc_StopIteration
    PyObject* PyExc_RuntimeError
    PyObject* PyExc_ValueError
    void gb_raise_from(PyObject* exc_type, const char* msg, PyObject* cause)


cdef extern from "_stack_guard.h":
    int gb_check_stack() noexcept
    Py_ssize_t gb_stack_room() noexcept


cdef enum:
    MODE_TASK = 0
    MODE_RUN = 1
    MODE_SYNC = 2

# What the worker reports back after a unit of work.
cdef enum:
    OUT_NONE = 0     # nothing: the worker never ran (it died or was killed)
    OUT_YIELD = 1    # out_value is an event loop trap to pass to the loop
    OUT_RETURN = 2   # out_value is the return value
    OUT_RAISE = 3    # out_value is the exception raised

# Idle workers kept per thread; more than this are let go.
DEF MAX_PARKED_WORKERS = 64


# ---------------------------------------------------------------------------
# Worker greenlets
#
# A worker is tied to a portal only while an await_() is suspended in it.
# Between steps that end in a native await, it goes back to its thread's pool,
# so thousands of portal tasks share a handful of greenlets.
# ---------------------------------------------------------------------------

cdef extern from *:
    """
    /* This thread's _WorkerPool, borrowed: the threading.local of the Python
       thread state `gb_pool_owner` owns it.  A native thread that calls into
       Python (ctypes callbacks, PyGILState_Ensure) gets a new thread state
       for every call on the same OS thread, so the pool is only this thread
       state's if the ids match; the pool also clears this when it dies. */
    static GB_THREAD_LOCAL PyObject *gb_pool = NULL;
    static GB_THREAD_LOCAL uint64_t gb_pool_owner = 0;

    static inline uint64_t gb_tstate_id(void) {
        return PyThreadState_GetID(PyThreadState_Get());
    }

    /* The pool, for code that knows the id of its thread state already. */
    static inline PyObject *gb_pool_of(uint64_t tstate_id) {
        if (gb_pool != NULL && gb_pool_owner != tstate_id)
            gb_pool = NULL;
        return gb_pool;
    }

    static inline PyObject *gb_thread_pool(void) {
        return gb_pool_of(gb_tstate_id());
    }

    static inline void gb_set_thread_pool(PyObject *pool) {
        gb_pool = pool;
        gb_pool_owner = gb_tstate_id();
    }
    """
    PyObject* gb_pool
    PyObject* gb_thread_pool()
    PyObject* gb_pool_of(uint64_t tstate_id)
    void gb_set_thread_pool(PyObject* pool)
    uint64_t gb_tstate_id()


@cython.final
@cython.auto_pickle(False)
cdef class _WorkerPool:
    """The idle worker greenlets of one thread, as a C stack."""

    cdef PyObject* workers[MAX_PARKED_WORKERS]   # owned references
    # The gr_context each worker holds, so that it is set only when it must
    # change. Borrowed: the worker's own gr_context keeps it alive.
    cdef PyObject* contexts[MAX_PARKED_WORKERS]
    cdef int count

    def __dealloc__(self):
        global gb_pool
        if gb_pool == <PyObject*>self:
            gb_pool = NULL
        self.release()

    cdef void release(self) noexcept:
        """Let every parked worker go: greenlet then ends each one."""
        while self.count > 0:
            self.count -= 1
            Py_XDECREF(self.workers[self.count])

    cdef void forget_all(self) noexcept:
        """Drop every parked worker without ending it (see
        _after_fork_in_child): their references are leaked on purpose."""
        self.count = 0

    cdef void forget_context(self, PyObject* ctx) noexcept:
        """Make parked workers drop `ctx`, whose task has finished."""
        cdef int i
        for i in range(self.count):
            if self.contexts[i] == ctx:
                if _set_context(self.workers[i], <PyObject*>None) < 0:
                    PyErr_WriteUnraisable(self.workers[i])
                self.contexts[i] = <PyObject*>None


cdef object _thread_state = threading.local()
# Greenlets of steps that were suspended in a deleted thread state (see
# Portal._abandon): kept alive for good, never switched into.
cdef list _abandoned_greenlets = []
cdef object _GR_CONTEXT = "gr_context"

cdef extern from *:
    """
    /* greenlet's own setter of gr_context, called directly for greenback's
       workers: what setattr(worker, "gr_context", ctx) ends up calling, minus
       the attribute lookup. Set once the worker class exists (see
       _use_context_setter); until then, and for any other object, setattr. */
    static PyTypeObject *gb_worker_type = NULL;
    static setter gb_context_setter = NULL;
    static void *gb_context_closure = NULL;

    static void gb_use_context_setter(PyObject *worker_type, PyObject *descr) {
        if (!Py_IS_TYPE(descr, &PyGetSetDescr_Type))
            return;
        PyGetSetDef *def = ((PyGetSetDescrObject *)descr)->d_getset;
        if (def->set == NULL)
            return;
        gb_context_setter = def->set;
        gb_context_closure = def->closure;
        gb_worker_type = (PyTypeObject *)worker_type;
    }

    static inline int gb_set_context(PyObject *g, PyObject *name, PyObject *ctx) {
        if (Py_TYPE(g) == gb_worker_type)
            return gb_context_setter(g, ctx, gb_context_closure);
        return PyObject_SetAttr(g, name, ctx);
    }
    """
    void gb_use_context_setter(object worker_type, object descr)
    int gb_set_context(PyObject* g, PyObject* name, PyObject* ctx)


cdef inline int _set_context(PyObject* worker, PyObject* ctx) noexcept:
    """setattr(worker, "gr_context", ctx): 0, or -1 with an exception set."""
    return gb_set_context(worker, <PyObject*>_GR_CONTEXT, ctx)


def _release_parked_workers():
    """At exit, end this thread's parked workers while greenlet still can:
    after interpreter finalization starts, it would leak their frames."""
    cdef PyObject* pool = gb_thread_pool()
    if pool != NULL:
        (<_WorkerPool>pool).release()


atexit.register(_release_parked_workers)


def _new_worker():
    # A fresh greenlet costs ~10 us (it maps a new frame-stack block), hence
    # the pool. Each step makes itself the worker's parent (see _set_parent).
    if gb_thread_pool() == NULL:
        pool = _thread_state.pool = _WorkerPool()
        gb_set_thread_pool(<PyObject*>pool)
    return _Worker(_worker_entry)


cdef int _set_parent(PyObject* worker, PyObject* step) noexcept:
    """Make the greenlet running a step the parent of its worker: a worker
    that dies hands its exception there, not to whichever greenlet happened
    to create it. 0, or -1 with an exception set."""
    cdef PyGreenlet* parent = PyGreenlet_GetParent(<PyGreenlet*>worker)
    if parent != NULL:
        Py_DECREF(<object>parent)
        if <PyObject*>parent == step:
            return 0
    elif PyErr_Occurred():
        return -1
    return PyGreenlet_SetParent(<PyGreenlet*>worker, <PyGreenlet*>step)


cdef void _park(object worker, PyObject* ctx, uint64_t tstate_id) noexcept:
    """Return an idle worker, which holds context `ctx`, to the pool of this
    thread (whose thread state has id `tstate_id`)."""
    cdef _WorkerPool pool
    cdef PyObject* p = gb_pool_of(tstate_id)
    if p == NULL:
        return  # the thread's pool is gone; let the worker go
    pool = <_WorkerPool>p
    if pool.count >= MAX_PARKED_WORKERS:
        return
    Py_INCREF(worker)
    pool.workers[pool.count] = <PyObject*>worker
    pool.contexts[pool.count] = ctx
    pool.count += 1


cdef inline PyObject* _current_greenlet() noexcept:
    """The running greenlet, borrowed (a greenlet is alive while it runs), or
    NULL with an exception set when greenlet can no longer say, as happens
    while the interpreter shuts down."""
    cdef PyGreenlet* g = PyGreenlet_GetCurrent()
    if g == NULL:
        if not PyErr_Occurred():
            PyErr_SetString(PyExc_RuntimeError,
                            "greenlet is not available (is the interpreter shutting down?)")
        return NULL
    Py_DECREF(<object>g)
    return <PyObject*>g


cdef bint _greenlet_usable() noexcept:
    if _current_greenlet() == NULL:
        PyErr_Clear()
        return False
    return True


def _serve_portals():
    """Body of every worker greenlet: do the unit of work that the active
    portal asks for, report back to the greenlet that runs the step, repeat.

    It holds no reference to a portal while parked: a task that is dropped
    must be able to free its portal, whose finalizer then unwinds this worker.
    """
    cdef PyObject* me = _current_greenlet()
    cdef PyObject* p
    cdef PyObject* r
    if me == NULL:
        gb_propagate()
    while True:
        p = gb_active_portal
        if p == NULL or <PyObject*>(<Portal>p).worker != me:
            # Resumed by something other than a step of our portal: greenlet
            # is killing us (GreenletExit), or someone switched here by hand.
            return None
        if (<Portal>p)._work() < 0:
            # Killed while in user code (GreenletExit from greenlet): let the
            # exception end this worker, as greenlet expects.
            gb_propagate()
        # Re-read: if greenlet killed this worker while it was suspended in
        # await_(), the step that resumed the work is gone and so may be `p`.
        p = gb_active_portal
        if p == NULL or <PyObject*>(<Portal>p).worker != me:
            return None
        r = PyGreenlet_Switch(<PyGreenlet*>(<Portal>p).outer, NULL, NULL)
        if r == NULL:
            # Thrown into while parked (GreenletExit on kill): let it end us.
            gb_propagate()
        Py_DECREF(<object>r)


# A worker's first frame must be a real Python frame: greenlet refuses to set
# gr_context on a suspended greenlet whose stack holds only C frames.
_worker_entry = partial(run_worker, _serve_portals)


# ---------------------------------------------------------------------------
# The portal
# ---------------------------------------------------------------------------

@cython.final
@cython.auto_pickle(False)
cdef class Portal:
    """A coroutine shim that runs each step of what it wraps in a worker
    greenlet, so that :func:`await_` can suspend from synchronous code.

    Instances are created by :func:`greenback.bestow_portal`,
    :func:`with_portal_run` and :func:`with_portal_run_sync`; they behave as
    coroutines (``send``, ``throw``, ``close``, ``__await__``) and show the
    frames of the coroutine they wrap to introspection tools.
    """

    cdef int mode
    cdef bint started
    cdef bint finished
    cdef bint running
    cdef object coro      # what the steps drive (MODE_TASK/RUN), once known
    cdef object fn        # MODE_RUN/SYNC: the function, until it is called
    cdef object args
    cdef object kwargs
    cdef object worker    # the worker greenlet, while the portal is live
    cdef object resume    # greenlet to switch into for the next step
    cdef object outer     # greenlet running the current step
    cdef object last_ctx  # context last propagated into the worker
    # The context the current step started in: the context of the task it
    # runs for (see _usable_portal). Borrowed, and read only during the step,
    # while the event loop holds it as its current context.
    cdef PyObject* step_ctx
    # The Python thread state the worker was taken in (see _step).
    cdef uint64_t worker_tstate
    cdef object awaiting  # what a suspended await_() waits on (for cr_await)
    cdef object send_value
    cdef object send_exc
    cdef object out_value
    cdef int out_kind

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "greenback.Portal objects come from ensure_portal(), bestow_portal(), "
            "with_portal_run() and with_portal_run_sync(); don't create them directly")

    # --- the step, on the event loop's side --------------------------------
    # These are noexcept C functions that return -1 with an exception set:
    # Cython would add a traceback entry to every exception it propagates,
    # and the wrapped code's exceptions must reach the loop untouched.

    cdef int _step(self, object value, object exc) noexcept:
        """Run one step. Returns 0 if the wrapped code yielded (the trap is in
        out_value), 1 if it returned (the value is in out_value), or -1 with
        an exception set."""
        global gb_active_portal
        cdef PyObject* prev
        cdef PyObject* r
        cdef PyObject* ctx
        cdef uint64_t tstate_id
        if self.running:
            PyErr_SetString(PyExc_ValueError, "coroutine already executing")
            return -1
        if self.finished:
            PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine")
            return -1
        if gb_check_stack() < 0:
            return -1
        self.started = True
        tstate_id = gb_tstate_id()
        if self.resume is not None and self.worker_tstate != tstate_id:
            # Suspended mid-step in a thread state that is gone: a native
            # thread's earlier callback. Switching back into frames of a
            # deleted thread state crashes, in greenlet, so fail instead.
            self._abandon()
            PyErr_SetObject(PyExc_RuntimeError, <PyObject*>_ORPHANED_AWAIT_ERROR)
            return -1
        r = _current_greenlet()
        if r == NULL:
            return -1
        if <PyObject*>self.outer != r:
            self.outer = <object>r
            if self.resume is not None and _set_parent(<PyObject*>self.worker, r) < 0:
                return -1
        ctx = gb_current_context()
        if ctx == NULL:
            ctx = <PyObject*>None
        if self.resume is None:
            # Nothing is suspended mid-step: any idle worker can run this one.
            if self._take_worker(ctx, tstate_id) < 0:
                return -1
        elif ctx != <PyObject*>self.last_ctx:
            if self._follow_context(ctx) < 0:
                return -1

        self.send_value = value
        self.send_exc = exc
        self.out_kind = OUT_NONE
        self.step_ctx = ctx
        prev = gb_active_portal
        gb_active_portal = <PyObject*>self
        self.running = True
        r = PyGreenlet_Switch(<PyGreenlet*>self.resume, NULL, NULL)
        self.running = False
        gb_active_portal = prev
        if r == NULL:
            self.send_value = self.send_exc = None
            if PyGreenlet_STARTED(<PyGreenlet*>self.resume) and not PyGreenlet_ACTIVE(
                    <PyGreenlet*>self.resume):
                # The worker died on the way in, before it could take the
                # step: a signal handler raised in its Python entry frame.
                # The exception ends the step; a dead worker can't serve
                # another one, so the portal is over.
                self.out_kind = OUT_NONE
                self._finish(tstate_id)
            # Otherwise the switch itself failed: stepped from another
            # thread than the worker's (greenlet.error says so).
            return -1
        Py_DECREF(<object>r)

        if self.out_kind == OUT_YIELD:
            if self.resume is None:
                # The step ended in a native await: the worker is idle again.
                _park(self.worker, <PyObject*>self.last_ctx, tstate_id)
                self.worker = None
            return 0
        self._finish(tstate_id)
        if self.out_kind == OUT_RETURN:
            return 1
        if self.out_kind == OUT_RAISE:
            return self._raise_out_value()
        PyErr_SetString(
            PyExc_RuntimeError,
            "greenback's worker greenlet ended without finishing the step; "
            "was it killed, or switched away from by hand?")
        return -1

    cdef int _raise_out_value(self) noexcept:
        exc = self.out_value
        self.out_value = None
        if self.mode == MODE_SYNC and isinstance(exc, StopIteration):
            # As in a generator, StopIteration must not pass for a return.
            gb_raise_from(PyExc_RuntimeError,
                          "with_portal_run_sync() function raised StopIteration",
                          <PyObject*>exc)
        else:
            gb_reraise(<PyObject*>exc)
        return -1

    cdef int _create_coro(self) noexcept:
        """MODE_RUN: call fn and get the iterator that awaiting it drives."""
        cdef PyObject* aw
        cdef PyObject* it
        if self.fn is None:
            PyErr_SetString(PyExc_RuntimeError, "this greenback portal has nothing to run")
            return -1
        fn, args, kwargs = self.fn, self.args, self.kwargs
        self.fn = self.args = self.kwargs = None
        aw = PyObject_Call(<PyObject*>fn, <PyObject*>args,
                           <PyObject*>kwargs if kwargs else NULL)
        if aw == NULL:
            return -1
        it = gb_awaitable_iter(aw)
        Py_DECREF(<object>aw)
        if it == NULL:
            return -1
        self.coro = <object>it
        Py_DECREF(<object>it)
        return 0

    cdef int _take_worker(self, PyObject* ctx, uint64_t tstate_id) noexcept:
        """Attach an idle worker and give it the context `ctx`."""
        cdef PyObject* w
        cdef PyObject* held
        cdef _WorkerPool pool
        cdef PyObject* p = gb_pool_of(tstate_id)
        if p != NULL and (<_WorkerPool>p).count > 0:
            pool = <_WorkerPool>p
            pool.count -= 1
            w = pool.workers[pool.count]
            held = pool.contexts[pool.count]
            self.worker = <object>w
            Py_DECREF(<object>w)  # the pool's reference
        else:
            w = PyObject_CallNoArgs(<PyObject*>_new_worker)
            if w == NULL:
                return -1
            self.worker = <object>w
            Py_DECREF(<object>w)
            held = <PyObject*>None  # a new greenlet has no context yet
        self.resume = self.worker
        if held != ctx and _set_context(<PyObject*>self.worker, ctx) < 0:
            return -1
        if _set_parent(<PyObject*>self.worker, <PyObject*>self.outer) < 0:
            return -1
        self.last_ctx = <object>ctx
        self.worker_tstate = tstate_id
        return 0

    cdef int _follow_context(self, PyObject* ctx) noexcept:
        # The task's context changed (Trio's Task.context can be assigned)
        # while an await_() is suspended in the worker. Follow it, unless the
        # worker entered another context itself (Context.run() around an
        # await_()), which wins.
        cdef PyObject* cur = PyObject_GetAttr(<PyObject*>self.worker, <PyObject*>_GR_CONTEXT)
        if cur == NULL:
            return -1
        cdef bint follow = cur == <PyObject*>self.last_ctx
        Py_DECREF(<object>cur)
        if follow:
            if _set_context(<PyObject*>self.worker, ctx) < 0:
                return -1
            self.last_ctx = <object>ctx
        return 0

    cdef void _abandon(self) noexcept:
        """Give up on a step suspended in a deleted thread state: keep its
        greenlets alive for good (freeing one would switch into it to end it)
        and never resume them."""
        if PyList_Append(<PyObject*>_abandoned_greenlets, <PyObject*>self.worker) < 0 or (
                self.resume is not self.worker and PyList_Append(
                    <PyObject*>_abandoned_greenlets, <PyObject*>self.resume) < 0):
            PyErr_WriteUnraisable(<PyObject*>self)
        self.finished = True
        self.worker = self.resume = self.outer = self.last_ctx = None
        self.coro = self.awaiting = self.fn = self.args = self.kwargs = None
        self.send_value = self.send_exc = None

    cdef void _finish(self, uint64_t tstate_id) noexcept:
        """Mark the portal done and park its worker for reuse."""
        cdef PyObject* pool
        self.finished = True
        worker = self.worker
        ctx = self.last_ctx
        self.worker = self.resume = self.outer = self.last_ctx = None
        self.coro = self.awaiting = None
        self.send_value = self.send_exc = None
        if worker is None or self.out_kind == OUT_NONE:
            return
        if self.mode == MODE_TASK and ctx is not None:
            # The task is over: idle workers must not keep its context alive.
            if _set_context(<PyObject*>worker, <PyObject*>None) < 0:
                PyErr_WriteUnraisable(<PyObject*>worker)
                return
            pool = gb_pool_of(tstate_id)
            if pool != NULL:
                (<_WorkerPool>pool).forget_context(<PyObject*>ctx)
            _park(worker, <PyObject*>None, tstate_id)
        else:
            _park(worker, <PyObject*>ctx, tstate_id)

    # --- the unit of work, on the worker's side ----------------------------

    cdef int _work(self) noexcept:
        """Called in the worker: start the function, or send/throw into the
        coroutine, then record what came out in the portal. Returns 0, or -1
        with an exception set if the worker was killed meanwhile (then
        `self` may be gone and is not touched)."""
        cdef PyObject* res = NULL
        cdef PySendResult status
        if self.send_exc is not None and self.coro is None:
            # Thrown into before it started: the function never runs.
            self.fn = self.args = self.kwargs = None
            exc = self.send_exc
            self.send_exc = None
            gb_reraise(<PyObject*>exc)
            status = PYGEN_ERROR
        elif self.mode == MODE_SYNC and self.fn is not None:
            fn, args, kwargs = self.fn, self.args, self.kwargs
            self.fn = self.args = self.kwargs = None
            self.send_value = None
            res = PyObject_Call(<PyObject*>fn, <PyObject*>args,
                                <PyObject*>kwargs if kwargs else NULL)
            status = PYGEN_RETURN if res != NULL else PYGEN_ERROR
        else:
            status = self._send_into_coro(&res)
        # Killed while inside user code? Then `self` may be gone: don't touch it.
        if gb_active_portal != <PyObject*>self:
            if res != NULL:
                Py_DECREF(<object>res)
            return -1 if status == PYGEN_ERROR else 0
        if status == PYGEN_ERROR:
            self.out_kind = OUT_RAISE
            self.out_value = <object>gb_fetch_exception()
            Py_DECREF(self.out_value)
            return 0
        self.out_kind = OUT_YIELD if status == PYGEN_NEXT else OUT_RETURN
        self.resume = None  # back in the serve loop: idle, nothing suspended
        self.out_value = <object>res
        Py_DECREF(<object>res)
        return 0

    cdef PySendResult _send_into_coro(self, PyObject** res) noexcept:
        if self.coro is None and self._create_coro() < 0:
            return PYGEN_ERROR
        # Hold the coroutine for the duration: it must not be freed while it
        # runs, even if the portal lets go of it.
        coro = self.coro
        value, exc = self.send_value, self.send_exc
        self.send_value = self.send_exc = None
        if exc is None:
            return PyIter_Send(<PyObject*>coro, <PyObject*>value, res)
        return gb_throw(<PyObject*>coro, <PyObject*>exc, res)

    # --- coroutine protocol --------------------------------------------------
    # send(), throw(), __next__ and am_send are C functions installed at
    # import (see _portal_send and friends below); these Cython definitions
    # only make Cython create the slots.

    def __await__(self):
        return self

    def __next__(self):
        raise NotImplementedError  # replaced by _portal_iternext at import

    def send(self, value):
        raise NotImplementedError  # replaced by _portal_send at import

    def throw(self, typ, val=None, tb=None):
        raise NotImplementedError  # replaced by _portal_throw at import

    def close(self):
        """close() -> raise GeneratorExit inside the wrapped code."""
        cdef int rc
        if self.running:
            raise ValueError("coroutine already executing")
        if self.finished:
            return None
        if not self.started or (self.resume is None and not _greenlet_usable()):
            # Nothing runs in a worker, so the wrapped coroutine (if any) can
            # be closed right here; at interpreter exit this is the only way.
            self.finished = True
            self.fn = self.args = self.kwargs = None
            coro, self.coro = self.coro, None
            if coro is not None:
                coro.close()
            return None
        if self.resume is not None and (
                self.worker_tstate != gb_tstate_id() or not _greenlet_usable()):
            # An await_() is suspended where it can't be resumed: in a deleted
            # thread state (see _step), or anywhere once greenlet is being
            # finalized at interpreter exit. Its frames are left as they are,
            # quietly: the program's own error, if any, is what matters.
            self._abandon()
            return None
        rc = self._step(None, GeneratorExit())
        if rc < 0:
            try:
                gb_propagate()
            except (GeneratorExit, StopIteration):
                return None
        if rc == 0:
            self.out_value = None
            raise RuntimeError("coroutine ignored GeneratorExit")

    def __del__(self):
        if self.finished:
            return
        if not self.started and self.mode != MODE_TASK:
            warnings.warn(
                f"coroutine '{self.__qualname__}' was never awaited",
                RuntimeWarning, stacklevel=1, source=self)
            self.finished = True
            self.fn = self.args = self.kwargs = None
            return
        if self.resume is not None and not self.running:
            # An await_() is suspended in a worker, with sync frames above it
            # that only this portal can unwind: throw GeneratorExit through
            # them. Otherwise the wrapped coroutine is suspended at a native
            # await and closes itself when it is released, as usual.
            try:
                self.close()
            except greenlet.error:
                # The worker belongs to another thread (perhaps one that has
                # ended): it can't be resumed from here. greenlet disposes of
                # it with that thread; a finalizer has nobody to tell.
                self.finished = True

    # --- introspection: look like the coroutine we wrap ---------------------

    @property
    def cr_frame(self):
        coro = self.coro
        if coro is None:
            return None
        try:
            return coro.cr_frame
        except AttributeError:
            return getattr(coro, "gi_frame", None)

    @property
    def cr_await(self):
        if self.awaiting is not None:
            return self.awaiting
        coro = self.coro
        if coro is None:
            return None
        try:
            return coro.cr_await
        except AttributeError:
            return getattr(coro, "gi_yieldfrom", None)

    @property
    def cr_code(self):
        coro = self.coro
        if coro is None:
            return None
        try:
            return coro.cr_code
        except AttributeError:
            return getattr(coro, "gi_code", None)

    @property
    def cr_running(self):
        return self.running

    @property
    def cr_suspended(self):
        return self.started and not self.finished and not self.running

    @property
    def cr_origin(self):
        return None

    @property
    def __name__(self):
        return self._name(False)

    @property
    def __qualname__(self):
        return self._name(True)

    cdef str _name(self, bint qualified):
        if self.coro is not None:
            try:
                return self.coro.__qualname__ if qualified else self.coro.__name__
            except AttributeError:
                pass
        return ("greenback task portal", "with_portal_run", "with_portal_run_sync")[self.mode]

    def __repr__(self):
        target = self.coro if self.coro is not None else self.fn
        return f"<greenback portal {self._name(True)} around {target!r}>"

    # --- queries used by the Python facade -----------------------------------

    @property
    def await_greenlet(self):
        """The greenlet in which an await_() is suspended on this portal's
        behalf, or None. Its frames are the sync code between the wrapped
        coroutine and the await_() (for stack introspection tools)."""
        return self.resume if self.awaiting is not None else None

    @property
    def provides_portal(self):
        """True while this object gives its task a portal."""
        return self._provides_portal()

    cdef inline bint _provides_portal(self) noexcept:
        return not self.finished and (self.started or self.mode == MODE_TASK)

    def detach(self):
        """Stop being a portal, once the task runs its original coroutine
        again. Only between steps, and only while no await_() is suspended."""
        if self.mode != MODE_TASK or self.running or self.finished:
            raise RuntimeError("only a live, idle task portal can be detached")
        if self.resume is not None:
            raise RuntimeError("cannot detach a portal while await_() is suspended in it")
        self.finished = True
        self.coro = None
        self.last_ctx = None


cdef Portal _new_portal(int mode, object fn, tuple args, dict kwargs):
    cdef Portal portal = Portal.__new__(Portal)
    portal.mode = mode
    portal.fn = fn
    portal.args = args
    portal.kwargs = kwargs
    return portal


# --- the C implementations of the coroutine protocol ------------------------

cdef inline PyObject* _result_or_stop(Portal self, int rc, bint stop_for_none) noexcept:
    cdef PyObject* out
    if rc < 0:
        return NULL
    out = <PyObject*>self.out_value
    if rc == 0:
        Py_INCREF(<object>out)
        self.out_value = None
        return out
    if stop_for_none or out != <PyObject*>None:
        gb_set_stop_iteration(out)
    self.out_value = None
    return NULL


cdef PyObject* _portal_iternext(PyObject* self) noexcept:
    # A NULL return with no exception set means "returned None".
    return _result_or_stop(<Portal>self, (<Portal>self)._step(None, None), False)


cdef PySendResult _portal_am_send(PyObject* self, PyObject* arg, PyObject** result) noexcept:
    cdef Portal portal = <Portal>self
    cdef int rc = portal._step(<object>arg, None)
    if rc < 0:
        result[0] = NULL
        return PYGEN_ERROR
    result[0] = <PyObject*>portal.out_value
    Py_INCREF(portal.out_value)
    portal.out_value = None
    return PYGEN_NEXT if rc == 0 else PYGEN_RETURN


cdef PyObject* _portal_send(PyObject* self, PyObject* arg) noexcept:
    return _result_or_stop(<Portal>self, (<Portal>self)._step(<object>arg, None), True)


cdef PyObject* _portal_throw(PyObject* self, PyObject* args) noexcept:
    cdef PyObject* exc = PyObject_Call(<PyObject*>_exception_from_throw_args, args, NULL)
    if exc == NULL:
        return NULL
    cdef int rc = (<Portal>self)._step(None, <object>exc)
    Py_DECREF(<object>exc)
    return _result_or_stop(<Portal>self, rc, True)


cdef PyMethodDef _portal_methods[3]
_portal_methods[0].ml_name = "send"
_portal_methods[0].ml_meth = <PyCFunction>_portal_send
_portal_methods[0].ml_flags = METH_O
_portal_methods[0].ml_doc = "send(value) -> next yielded value or raise StopIteration."
_portal_methods[1].ml_name = "throw"
_portal_methods[1].ml_meth = <PyCFunction>_portal_throw
_portal_methods[1].ml_flags = METH_VARARGS
_portal_methods[1].ml_doc = "throw(value) -> next yielded value or raise StopIteration."
_portal_methods[2].ml_name = NULL

gb_install_coroutine_slots(<PyTypeObject*>Portal, _portal_iternext,
                           _portal_am_send, _portal_methods)


# ---------------------------------------------------------------------------
# The public entry points
# ---------------------------------------------------------------------------

def run_portal(async_fn, tuple args, dict kwargs):
    """A portal that awaits ``async_fn(*args, **kwargs)`` when awaited."""
    return _new_portal(MODE_RUN, async_fn, args, kwargs)


def run_sync_portal(sync_fn, tuple args, dict kwargs):
    """A portal that calls ``sync_fn(*args, **kwargs)`` when awaited."""
    return _new_portal(MODE_SYNC, sync_fn, args, kwargs)


def make_task_portal(coro, started):
    """The portal to install as a task's coroutine in place of *coro*;
    *started* says whether *coro* has begun running."""
    return _make_task_portal(coro, started)


cdef Portal _make_task_portal(object coro, bint started):
    cdef Portal portal = Portal.__new__(Portal)
    portal.mode = MODE_TASK
    portal.coro = coro
    portal.started = started
    return portal


cdef inline bint _gives_portal(object coro) noexcept:
    """isinstance(coro, Portal) and coro.provides_portal, without a lookup."""
    return isinstance(coro, Portal) and (<Portal>coro)._provides_portal()


# ---------------------------------------------------------------------------
# ensure_portal(): once per task, but programs that spawn many portal tasks
# call it all the time, so it is compiled and looks things up only once: no
# Python frame runs in it but the task lookup's own (trio.lowlevel's
# current_task) and the checkpoint it returns.
# ---------------------------------------------------------------------------

cdef object _sniffio_thread_local = sniffio.thread_local
cdef object _sniffio_cvar = sniffio.current_async_library_cvar
cdef object _asyncio_current_task = asyncio.current_task
cdef object _asyncio_get_running_loop = asyncio._get_running_loop
cdef object _asyncio_checkpoint = _tasks._asyncio_checkpoint
cdef object _trio_lowlevel = None  # trio.lowlevel, once a Trio task needed it
cdef object _c_task_type = type(None)  # _asyncio.Task where it exists
try:
    from _asyncio import Task as _CTask
    _c_task_type = _CTask
except ImportError:  # only CPython has the C Task
    pass


cdef object _trio_ll():
    global _trio_lowlevel
    if _trio_lowlevel is None:
        import trio.lowlevel
        _trio_lowlevel = trio.lowlevel
    return _trio_lowlevel


def portalize_running_task():
    """ensure_portal()'s work: give the running task a portal unless it has
    one, and return the checkpoint to await next (what
    ``_tasks.checkpoint(library)`` returns for the task's library)."""
    if _usable_portal() != NULL:
        return _checkpoint(_running_library(_sniffio_name()))
    if PyErr_Occurred():
        gb_propagate()
    return _checkpoint(_install_portal_in_running_task())


cdef object _checkpoint(str library):
    # _tasks.checkpoint(library), minus its Python frame.
    if library == "trio":
        return _trio_ll().checkpoint()
    return _asyncio_checkpoint()


cdef object _sniffio_name():
    """What sniffio.current_async_library() looks at first: its thread-local
    name (Trio sets it while it runs), else its context variable."""
    cdef PyObject* value
    name = _sniffio_thread_local.name
    if name is None:
        # _sniffio_cvar.get(None); the value is a new reference, or NULL
        # when the variable is unset and has no default.
        PyContextVar_Get(_sniffio_cvar, NULL, &value)
        if value != NULL:
            name = <object>value
            Py_DECREF(name)
    return name


cdef str _running_library(object name):
    """_tasks.current_library(), given what _sniffio_name() said, minus its
    Python frames where sniffio's answer needs no second look: only "trio"
    does, when an asyncio loop is running in this thread (perhaps one inside
    a Trio task)."""
    if name == "asyncio" or (name == "trio" and _asyncio_get_running_loop() is None):
        return name
    return _tasks.current_library()  # raises outside async code, or if unsupported


cdef str _install_portal_in_running_task():
    """Portalize the running task; return its library's name. Detects the
    library in sniffio's order, finding the task only once."""
    name = _sniffio_name()
    if name is None:
        try:
            task = _asyncio_current_task()
        except RuntimeError:  # no running loop
            task = None
        if task is not None:
            _install_in_asyncio_task(task)
            return "asyncio"
    library = _running_library(name)
    if library == "trio":
        # What _tasks.current_task_of("trio") returns, minus its frame.
        _install_in_trio_task(_trio_ll().current_task())
    else:
        _install_in_asyncio_task(_tasks.current_task_of(library))
    return library


cdef void _install_in_trio_task(object task) except *:
    coro = task.coro
    if not _gives_portal(coro):
        # The task is running, so no send is pending for the old coroutine.
        task.coro = _make_task_portal(coro, True)


cdef void _install_in_asyncio_task(object task) except *:
    cdef PyObject* field
    if type(task) is _c_task_type and _c_task_coro_offset > 0:
        # What get_coro() returns: the field that _set_c_task_coro writes.
        field = (<PyObject**>(<char*><PyObject*>task + _c_task_coro_offset))[0]
        coro = <object>field if field != NULL else task.get_coro()
    else:
        coro = task.get_coro()
    if _gives_portal(coro):
        return
    portal = _make_task_portal(coro, True)
    if isinstance(task, _c_task_type):
        _set_c_task_coro(task, coro, portal)
    else:
        task._coro = portal  # the pure-Python Task lets us assign it


# ---------------------------------------------------------------------------
# Which portal serves the code that is running
#
# The active portal is per thread, but sync code in a portal's step may run
# an event loop of its own (nest_asyncio's run_until_complete(), trio.run()),
# whose tasks then run inside that step. Each task runs its steps in its own
# contextvars.Context, so the portal remembers the context its step started
# in: code running in that context belongs to the portal's task. Only when
# the contexts differ (a nested loop's task, or the task's own code inside
# Context.run() or a greenlet it started) is the running task looked up.
# ---------------------------------------------------------------------------

cdef inline PyObject* _usable_portal() noexcept:
    """The portal that await_() would use here, or NULL. Borrowed. NULL with
    an exception set if the task lookup raised a BaseException that is not
    an Exception (a signal handler's KeyboardInterrupt): it is the caller's."""
    cdef PyObject* p = gb_active_portal
    if p == NULL or (<Portal>p).step_ctx == gb_current_context():
        return p
    return _usable_portal_slow(p)


cdef PyObject* _usable_portal_slow(PyObject* p) noexcept:
    step_ctx = <object>(<Portal>p).step_ctx
    try:
        task_ctx = _tasks.current_task_context()
    except LookupError:
        # The task's context can't be told (an unknown asyncio C Task
        # layout): trust the per-thread portal, as before nested loops.
        return p
    except Exception:
        return NULL
    except BaseException as error:
        # A signal handler's KeyboardInterrupt, say: it is the caller's.
        gb_reraise(<PyObject*>error)
        return NULL
    return p if task_ctx is step_ctx else NULL


def in_active_portal():
    """True if :func:`await_` would work here: a portal's step is running
    on behalf of the current task."""
    if _usable_portal() != NULL:
        return True
    if PyErr_Occurred():
        gb_propagate()
    return False


# ---------------------------------------------------------------------------
# await_
#
# A C function, not a Cython def: Cython would add a traceback entry named
# "greenback._core.await_" to every exception that leaves it, including the
# awaited code's own. The facade (greenback._portal.await_) is a one-line
# Python function around it, so tracebacks and stack tools see exactly one
# frame per call, named "await_", as with upstream greenback.
# ---------------------------------------------------------------------------

cdef PyObject* _await(PyObject* module, PyObject* aw) noexcept:
    cdef PyObject* p = _usable_portal()
    cdef PyObject* me
    cdef PyObject* itp
    cdef PyObject* res = NULL
    cdef PyObject* r
    cdef PySendResult status
    cdef Portal portal
    if gb_check_stack() < 0:
        return _raise(_refusal(<object>aw, None))
    if p == NULL:
        if PyErr_Occurred():
            return _raise(_refusal(<object>aw, None))
        return _raise(_no_portal_error(<object>aw))
    if gb_collecting:
        return _raise(_refusal(<object>aw, _IN_GC_ERROR))
    me = _current_greenlet()
    if me == NULL:
        return _raise(_refusal(<object>aw, None))
    if me != <PyObject*>(<Portal>p).worker and not _descends_from(me, <PyObject*>(<Portal>p).worker):
        return _raise(_refusal(<object>aw, _FOREIGN_GREENLET_ERROR))
    itp = gb_awaitable_iter(aw)
    if itp == NULL:
        return NULL
    it = <object>itp
    Py_DECREF(it)
    value = None
    exc = None
    while True:
        if exc is None:
            status = PyIter_Send(itp, <PyObject*>value, &res)
        else:
            status = gb_throw(itp, <PyObject*>exc, &res)
            exc = None
        value = None
        if status == PYGEN_RETURN:
            return res
        if status == PYGEN_ERROR:
            return NULL
        if p == NULL:
            # Detached by a kill (see below) and the coroutine wants to
            # suspend again: there is no event loop to give it to.
            Py_DECREF(<object>res)
            if gb_close_iter(itp) == 0:
                PyErr_SetString(PyExc_RuntimeError, "greenback.await_() lost its portal")
            return NULL
        # Hand the trap to the step that resumed us, and wait to be resumed.
        portal = <Portal>p
        portal.out_value = <object>res
        Py_DECREF(portal.out_value)
        portal.out_kind = OUT_YIELD
        if <PyObject*>portal.resume != me:
            portal.resume = <object>me
        portal.awaiting = it
        r = <PyObject*>portal.outer
        portal = None  # hold no reference while suspended (see _serve_portals)
        r = PyGreenlet_Switch(<PyGreenlet*>r, NULL, NULL)
        if r == NULL:
            # greenlet threw into us (GreenletExit when this greenlet is
            # garbage-collected). The portal may be gone: unwind the awaited
            # coroutine with the exception, then let it propagate.
            p = NULL
            exc = <object>gb_fetch_exception()
            Py_DECREF(exc)
            continue
        Py_DECREF(<object>r)
        p = gb_active_portal
        portal = <Portal>p
        value = portal.send_value
        exc = portal.send_exc
        portal.send_value = portal.send_exc = portal.awaiting = None
        portal = None


cdef PyMethodDef _await_def
_await_def.ml_name = "await_"
_await_def.ml_meth = <PyCFunction>_await
_await_def.ml_flags = METH_O
_await_def.ml_doc = (
    "await_(aw, /)\n--\n\n"
    "The switch behind greenback.await_(): drive the awaitable *aw* from "
    "synchronous code inside a portal's step, suspending the step whenever "
    "*aw* yields to the event loop.")
await_ = PyCFunction_NewEx(&_await_def, NULL, <PyObject*>__name__)

cdef extern from *:
    """
    /* What `await` accepts: an object whose type has __await__ (coroutines,
       futures, ...), or a generator-based coroutine (types.coroutine). */
    static int gb_is_awaitable(PyObject *o) {
        PyAsyncMethods *am = Py_TYPE(o)->tp_as_async;
        if (am != NULL && am->am_await != NULL)
            return 1;
        if (!PyGen_CheckExact(o))
            return 0;
        PyObject *code = PyObject_GetAttrString(o, "gi_code");
        if (code == NULL) {
            PyErr_Clear();
            return 0;
        }
        int flags = ((PyCodeObject *)code)->co_flags;
        Py_DECREF(code);
        return (flags & CO_ITERABLE_COROUTINE) != 0;
    }
    """
    int gb_is_awaitable(PyObject* o)


@cython.final
@cython.auto_pickle(False)
cdef class _ParentView:
    """What a worker greenlet's `parent` attribute returns: its real parent,
    except that switch(awaitable) called from inside the worker awaits it
    with await_() (the greenlet provider protocol; see greenback._worker).
    Every other use is passed on to the real parent."""

    cdef object worker

    def __cinit__(self, worker):
        self.worker = worker

    def switch(self, *args, **kwargs):
        cdef PyObject* r
        cdef PyObject* me = _current_greenlet()
        if me == NULL:
            gb_propagate()
        if (len(args) == 1 and not kwargs and me == <PyObject*>self.worker
                and gb_is_awaitable(<PyObject*>args[0])):
            r = _await(NULL, <PyObject*>args[0])
            if r == NULL:
                gb_propagate()
            result = <object>r
            Py_DECREF(result)
            return result
        return self.real().switch(*args, **kwargs)

    def real(self):
        parent = real_parent(self.worker)
        if parent is None:
            raise ValueError("this greenlet has no parent")
        return parent

    def __bool__(self):
        return True  # a worker is never a thread's main greenlet, the one without a parent

    def __getattr__(self, name):
        return getattr(self.real(), name)

    def __repr__(self):
        return f"<greenback worker's view of its parent {real_parent(self.worker)!r}>"


# Worker greenlets: greenlet providers whose awaits go through await_ (see
# greenback._worker).
_Worker = make_worker_class(_ParentView)


def _use_context_setter():
    # Only where setattr(worker, "gr_context", ...) would reach greenlet's
    # own getset descriptor (always, unless a class in between overrides it).
    for klass in _Worker.__mro__:
        descr = klass.__dict__.get("gr_context")
        if descr is not None:
            if klass is greenlet.greenlet:
                gb_use_context_setter(_Worker, descr)
            return


_use_context_setter()


cdef PyObject* _raise(object exc) noexcept:
    # Raise `exc` from the C function above, whose caller adds the traceback
    # entry.
    gb_reraise(<PyObject*>exc)
    return NULL


cdef bint _descends_from(PyObject* g, PyObject* ancestor) noexcept:
    """Whether greenlet `g` was started, directly or not, by `ancestor`:
    the greenlets that sync code under a portal starts may await too."""
    cdef PyGreenlet* parent
    cdef PyObject* current = g
    cdef bint found = False
    Py_INCREF(<object>current)
    while not found:
        parent = PyGreenlet_GetParent(<PyGreenlet*>current)
        Py_DECREF(<object>current)
        if parent == NULL:
            PyErr_Clear()
            return False
        current = <PyObject*>parent
        found = current == ancestor
    Py_DECREF(<object>current)
    return True


# These build the exception await_() raises instead of running `aw`, and close
# `aw` if it is a coroutine, so that Python does not warn that it was never
# awaited. They never raise: an error on the way is the exception to raise.

def _no_portal_error(aw):
    # A Python-level function, not a cdef one, so that the C compiler can't
    # inline it: its frame (about 180 bytes) would join _await's, and with it
    # every level of nested await_() calls (see _stack_guard.h).
    try:
        try:
            exc = _tasks.no_portal_error_here(Portal)
        finally:
            _close_unawaited(aw)
    except BaseException as error:  # outside async code, an unsupported library
        return error
    return exc


cdef object _refusal(object aw, str message):
    # message None: the exception is already set (by greenlet at interpreter
    # exit, or by the stack guard)
    cdef object exc
    if message is None:
        exc = <object>gb_fetch_exception()
        Py_DECREF(exc)
    else:
        exc = RuntimeError(message)
    try:
        _close_unawaited(aw)
    except BaseException as error:
        return error
    return exc


def _stack_room():
    """Bytes of C stack left before the nesting guard raises RecursionError
    (for tests and measurements)."""
    return gb_stack_room()


cdef int _close_unawaited(object aw) except -1:
    if isinstance(aw, _Coroutine):
        aw.close()
    return 0


def _gc_phase(phase, info):
    """gc.callbacks hook: track whether this thread is collecting."""
    global gb_collecting
    gb_collecting = phase == "start"


gc.callbacks.append(_gc_phase)


def _after_fork_in_child():
    """A child forked from sync code under a portal inherits the parent's
    running step and idle workers. They are copies of the parent's: running
    them would run the parent's event loop and tasks here. Forget them."""
    global gb_active_portal, gb_collecting
    cdef PyObject* pool = gb_thread_pool()
    gb_active_portal = NULL
    gb_collecting = 0
    if pool != NULL:
        (<_WorkerPool>pool).forget_all()


os.register_at_fork(after_in_child=_after_fork_in_child)




# ---------------------------------------------------------------------------
# asyncio's C Task keeps its coroutine in a field that Python cannot assign.
# Which field it is, and whether it is safe to write, is decided once by
# greenback._task_layout (shared with the pure-Python twin); nothing is
# written unless that positively identified the field.
# ---------------------------------------------------------------------------

cdef Py_ssize_t _c_task_coro_offset = -1


def _forget_c_task_coro_offset():
    """Look for the C Task's coroutine field again at the next swap (tests)."""
    global _c_task_coro_offset
    _c_task_coro_offset = -1


cdef list _c_task_words(object task, Py_ssize_t size):
    # Only the base type's own bytes: every _asyncio.Task instance has them.
    cdef PyObject** words = <PyObject**><PyObject*>task
    cdef Py_ssize_t i
    return [<size_t>words[i] for i in range(size // <Py_ssize_t>sizeof(PyObject*))]


def set_c_task_coro(task, old_coro, new_coro):
    """Replace the coroutine of an asyncio C ``Task`` (``_asyncio.Task``).

    The field is identified once (see greenback._task_layout), and checked
    again before every write: if it does not hold *old_coro*, nothing is
    written and RuntimeError is raised.
    """
    _set_c_task_coro(task, old_coro, new_coro)


cdef int _set_c_task_coro(object task, object old_coro, object new_coro) except -1:
    global _c_task_coro_offset
    cdef char* base = <char*><PyObject*>task
    cdef PyObject** slot
    cdef Py_ssize_t off = _c_task_coro_offset
    cdef Py_ssize_t size, word = sizeof(PyObject*)
    # Every call: the offset is only meaningful inside a C Task.
    if _c_task_type is type(None) or not isinstance(task, _c_task_type):
        raise TypeError(f"expected an _asyncio.Task, got {type(task).__name__}")
    if off < 0:
        size = (<object>_c_task_type).__basicsize__
        off = _task_layout.find_coro_offset(task, old_coro, _c_task_words(task, size), word)
        # Whatever decided it, never touch memory outside the base struct.
        if off < <Py_ssize_t>sizeof(PyObject) or off > size - word or off % word:
            raise RuntimeError(_task_layout_unknown_error(
                f"the coroutine field was placed at byte {off} of {size}"))
        _c_task_coro_offset = off
    slot = <PyObject**>(base + off)
    if slot[0] != <PyObject*>old_coro:
        raise RuntimeError(_TASK_LAYOUT_ERROR)
    Py_INCREF(new_coro)
    slot[0] = <PyObject*>new_coro
    Py_DECREF(old_coro)
    return 0
