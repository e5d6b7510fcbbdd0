# greenlet's C API (greenlet/greenlet.h), declared once for the whole package.
#
# The header keeps a static table of function pointers that PyGreenlet_Import()
# fills from the "greenlet._C_API" capsule; every call below goes through it.
# Return values are declared as raw pointers on purpose: callers check for NULL
# themselves, so an exception coming out of a switch is never given a
# traceback entry for greenback's own C frames.

from cpython.ref cimport PyObject

cdef extern from "greenlet/greenlet.h":
    ctypedef struct PyGreenlet:
        pass

    void** _PyGreenlet_API
    void PyGreenlet_Import()

    PyGreenlet* PyGreenlet_GetCurrent()
    PyGreenlet* PyGreenlet_New(PyObject* run, PyGreenlet* parent)
    PyObject* PyGreenlet_Switch(PyGreenlet* g, PyObject* args, PyObject* kwargs)
    int PyGreenlet_SetParent(PyGreenlet* g, PyGreenlet* nparent)
    PyGreenlet* PyGreenlet_GetParent(PyGreenlet* g)
    int PyGreenlet_ACTIVE(PyGreenlet* g)
    int PyGreenlet_STARTED(PyGreenlet* g)
    int PyGreenlet_Check(object obj)


cdef inline int import_greenlet() except -1:
    PyGreenlet_Import()
    if _PyGreenlet_API == NULL:
        # PyCapsule_Import has set an exception only in some failure modes.
        raise ImportError(
            "greenback could not load greenlet's C API (greenlet._C_API); "
            "reinstall greenlet (pip install --force-reinstall greenlet)"
        )
    return 0
