// Operator schemas of pathsgd. Each backend registers its kernels in its own
// file (csrc/cpu/*.cpp, csrc/cuda/*.cu); Python calls them only through
// pathsgd/ops.py, which also holds the fake (meta) kernels for torch.compile.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing pathsgd._C runs the static TORCH_LIBRARY initializers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // Whether at::parallel_for in the CPU kernels can use threads (built with -fopenmp).
#ifdef _OPENMP
  const long with_openmp = 1;
#else
  const long with_openmp = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_OPENMP", with_openmp) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

// The Path-SGD update ops take torch.optim.SGD's hyper-parameters as one bundle: `float[] sgd` in
// the field order of pathsgd/sgd_params.py (SgdParams.packed(); unpacked by SgdArgs in
// path_sgd_math.h) and `Tensor? lr_tensor` for a tensor lr.
TORCH_LIBRARY(pathsgd, m) {
  // gamma_out * exp(out_log_scale) = |W|^p (gamma_in * exp(in_log_scale)) + |b|^p,
  // with gamma_out normalized to max 1 (see DESIGN.md section 2, numerics).
  m.def(
      "gamma_forward(Tensor weight, Tensor? bias, Tensor gamma_in, Tensor gamma_in_log_scale, "
      "float p) -> (Tensor, Tensor)");
  // One pass over W (and grad, momentum buffer): returns the normalized
  // gamma_out of the layer's input, |W_old|^pT gamma_out, and, when grad is
  // given, applies the Path-SGD update with kappa_ij = gamma_out_i * gamma_in_j.
  m.def(
      "fused_dense_step_(Tensor(a!) weight, Tensor? grad, Tensor(b!)? momentum_buffer, "
      "Tensor gamma_in, Tensor gamma_in_log_scale, Tensor gamma_out, Tensor gamma_out_log_scale, "
      "float p, float[] sgd, Tensor? lr_tensor) -> (Tensor, Tensor)");
  // The fused step of a whole chain of dense layers in one call (csrc/dense_chain_step.h): gamma
  // forward, every layer's fused pass output to input, the biases' multi-tensor update. params: the
  // chain's weights, then the biases of the layers in bias_layers (grads and momentum_buffers in the
  // same order; no buffers without momentum). gamma0: empty when the chain starts at the model
  // input; when the chain is the head of a larger model, its input gamma (a float64 vector), which
  // the op replaces with the gamma_out at the chain's input (float64), from the old weights: what
  // the model before the head needs. workspace: a byte tensor the caller keeps across steps for the
  // op's small tensors (csrc/workspace.h; CUDA). Few arguments and no outputs: from Python each one
  // costs a conversion every step, which is most of a small model's step.
  m.def(
      "dense_chain_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] bias_layers, "
      "Tensor(c!)[] gamma0, float p, float[] sgd, Tensor? lr_tensor, Tensor(d!)? workspace=None) -> ()");
  // The step of a conv net in one call (csrc/trunk_chain_step.h): the trunk's abs-pow forward
  // program, the head's dense_chain_step_, the trunk's VJP program seeded with the head's
  // gamma_out, the trunk's scaled_sgd_update_. params: the trunk's parameters (leaf order), then the
  // head's (as dense_chain_step_); grads and momentum_buffers in the same order; layout: the
  // programs and how they connect (reference.trunk_layout); factors: the programs' scale factors.
  m.def(
      "trunk_chain_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] layout, "
      "float[] factors, float p, float[] sgd, Tensor? lr_tensor, Tensor(d!)? workspace=None) -> ()");
  // Multi-tensor Path-SGD update with materialized float64 kappa (conv weights, biases).
  m.def(
      "scaled_sgd_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor[] kappas, float p, float[] sgd, Tensor? lr_tensor) -> ()");
  // Multi-tensor clamp_(lo, hi) (WGAN weight clipping).
  m.def("clamp_(Tensor(a!)[] tensors, float lo, float hi) -> ()");
  // A conv net's abs-pow network over compiled programs (csrc/abs_pow_programs.cpp; the programs
  // are described in pathsgd/reference.py): its forward, the value of every computing node;
  // its backward, the kappa of every |w|^p leaf.
  m.def("abs_pow_forward(Tensor input, Tensor[] leaves, int[] program, float[] factors) -> Tensor[]");
  m.def(
      "abs_pow_vjp(Tensor[] values, Tensor[] leaves, Tensor[] seeds, int[] seed_slots, int[] program, "
      "float[] factors) -> Tensor[]");
}
