// Autograd for pad and unpad, each the other's backward. In C++ rather than
// torch.library.register_autograd: a Python autograd kernel costs ~15 us on every call, even
// when nothing needs a gradient, which is more than the whole op on small batches.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace provcollate {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor pad_op(const at::Tensor& values, const at::Tensor& offsets, const c10::SymInt& max_len,
                  const at::Scalar& pad_value, bool left) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("provcollate::pad", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, const at::Scalar&,
                            bool)>();
  return op.call(values, offsets, max_len, pad_value, left);
}

at::Tensor unpad_op(const at::Tensor& padded, const at::Tensor& offsets, const c10::SymInt& total,
                    bool left) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("provcollate::unpad", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, bool)>();
  return op.call(padded, offsets, total, left);
}

class Pad : public torch::autograd::Function<Pad> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& values,
                            const at::Tensor& offsets, c10::SymInt max_len,
                            const at::Scalar& pad_value, bool left) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = pad_op(values, offsets, max_len, pad_value, left);  // validates first
    ctx->save_for_backward({offsets});
    ctx->saved_data["total"] = values.sym_size(0);
    ctx->saved_data["left"] = left;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor offsets = ctx->get_saved_variables()[0];
    // Gradients of padding positions are dropped: padding never came from values.
    return {unpad_op(grads[0], offsets, ctx->saved_data["total"].toSymInt(),
                     ctx->saved_data["left"].toBool()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class Unpad : public torch::autograd::Function<Unpad> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& padded,
                            const at::Tensor& offsets, c10::SymInt total, bool left) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = unpad_op(padded, offsets, total, left);  // validates first
    ctx->save_for_backward({offsets});
    ctx->saved_data["max_len"] = padded.sym_size(1);
    ctx->saved_data["left"] = left;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor offsets = ctx->get_saved_variables()[0];
    return {pad_op(grads[0], offsets, ctx->saved_data["max_len"].toSymInt(), 0,
                   ctx->saved_data["left"].toBool()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether a call must build a graph node. When it need not (no grad mode, or an input that
// needs no gradient), the op runs below autograd at once, as torch's generated kernels do:
// Function::apply would still build a context and a node, which costs as much as a small op.
bool records_grad(const at::Tensor& input) {
  return (at::GradMode::is_enabled() && input.requires_grad()) || input._fw_grad(/*level=*/0).defined();
}

at::Tensor pad_autograd(const at::Tensor& values, const at::Tensor& offsets, c10::SymInt max_len,
                        const at::Scalar& pad_value, bool left) {
  if (!records_grad(values)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return pad_op(values, offsets, max_len, pad_value, left);
  }
  return Pad::apply(values, offsets, std::move(max_len), pad_value, left);
}

at::Tensor unpad_autograd(const at::Tensor& padded, const at::Tensor& offsets, c10::SymInt total,
                          bool left) {
  if (!records_grad(padded)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return unpad_op(padded, offsets, total, left);
  }
  return Unpad::apply(padded, offsets, std::move(total), left);
}

}  // namespace

TORCH_LIBRARY_IMPL(provcollate, Autograd, m) {
  m.impl("pad", &pad_autograd);
  m.impl("unpad", &unpad_autograd);
}

}  // namespace provcollate
