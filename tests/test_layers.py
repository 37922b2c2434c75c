import torch
from torch import nn

from deepzoo.layers import ACTIVATIONS, Dense


def test_dense_written_out_equals_torch_linear():
    torch.manual_seed(0)
    dense, linear = Dense(5, 3), nn.Linear(5, 3)
    with torch.no_grad():
        linear.weight.copy_(dense.W.T)  # nn.Linear stores W as [out, in]: z = x Wᵀ + b
        linear.bias.copy_(torch.randn(3))
        dense.b.copy_(linear.bias)
    x = torch.randn(8, 5)
    torch.testing.assert_close(dense(x), linear(x))


def test_activation_derivatives_as_the_notes_write_them_equal_autograd():
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    z = z[z != 0]  # ReLU has no derivative at 0
    for name, activation in ACTIVATIONS.items():
        zz = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(activation.g(zz).sum(), zz)
        torch.testing.assert_close(activation.derivative(z), grad, msg=name)


def test_the_notes_single_neuron_example():
    """ŷ = g(1 + 3x₁ − 2x₂): at x = (−1, 2), z = 1 − 3 − 4 = −6."""
    neuron = Dense(2, 1, "sigmoid")
    with torch.no_grad():
        neuron.W.copy_(torch.tensor([[3.0], [-2.0]]))
        neuron.b.fill_(1.0)
    y = neuron(torch.tensor([[-1.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(y.squeeze(), torch.sigmoid(torch.tensor([-6.0, 1.0])))
    # the decision boundary is the line 1 + 3x₁ − 2x₂ = 0, where ŷ = 0.5
    assert neuron(torch.tensor([[1.0, 2.0]])).item() == 0.5
