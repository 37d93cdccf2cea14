// The Python module seqkern._C. The ops themselves are registered with the
// dispatcher by TORCH_LIBRARY_FRAGMENT(seqkern_C, ...) in csrc/<family>.cpp when
// this shared library is loaded; Python reaches them as torch.ops.seqkern_C.*.
// Plain CPython API here (no pybind11) so this translation unit builds in a second.
#include <Python.h>

static PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef SEQKERN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "seqkern C++/CUDA kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
