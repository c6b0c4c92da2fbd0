// Op schemas (defined once, for every backend) and the pybind11 module prefkernels._C.
#include <torch/extension.h>

// TORCH_LIBRARY through one more macro, so a `prefkernels` macro expands before torch < 2.7
// stringizes the namespace: tests/cuda_emu compiles these schemas under prefkernels_emu.
#define PK_DEFINE_OPS(ns, m) TORCH_LIBRARY(ns, m)

PK_DEFINE_OPS(prefkernels, m) {
  // (loss f32: [P,K] for reduction 0 (none), [] for 1 (mean) and 2 (sum); rewards [N,K] f32,
  //  pair_grad [2,P,K] f32: d loss[p,k] / d rewards of the chosen and rejected row; pooled_pos [N] i64)
  m.def(
      "bt_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor? attention_mask, "
      "Tensor? last_index, Tensor? cu_seqlens, Tensor? chosen_index, Tensor? rejected_index, "
      "Tensor? margin, float label_smoothing, float center_coef, int reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  // (rewards [N,K] f32, pooled_pos [N] i64)
  m.def(
      "pool_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor? attention_mask, "
      "Tensor? last_index, Tensor? cu_seqlens) -> (Tensor, Tensor)");
  // (grad_hidden like hidden (contiguous) or [0] when not needed, grad_weight like weight,
  //  grad_bias [K] f32: the coefficients summed over the rows with a valid pooled position).
  // Coefficients: grad_coef [M, K] (M = N, or the entries of the CSR row_ptr/row_entry), each
  // times grad_loss * loss_scale when grad_loss is given: [] for every entry, or [P, K] with
  // M = 2P (entry e belongs to pair e mod P), so bt_forward's pair_grad and the loss's gradient
  // go in as they are.
  m.def(
      "pool_backward(Tensor grad_coef, Tensor? grad_loss, float loss_scale, Tensor? row_ptr, "
      "Tensor? row_entry, Tensor hidden, Tensor weight, Tensor pooled_pos, bool need_grad_hidden) "
      "-> (Tensor, Tensor, Tensor)");
  // (row_ptr [rows + 1], row_entry [2P]) int64: the CSR of the 2P pair entries by row (entry e < P:
  // row chosen_index[e], else rejected_index[e - P]), each row's entries in ascending order, as a
  // stable sort by row gives them; row n's are row_entry[row_ptr[n] : row_ptr[n + 1]]. Entries of
  // rows outside [0, rows) lie outside every row's segment. pool_backward's row_ptr/row_entry.
  m.def("rows_csr(Tensor chosen_index, Tensor rejected_index, int rows) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefkernels compiled kernels; the ops live in torch.ops.prefkernels";
#ifdef PREFKERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
